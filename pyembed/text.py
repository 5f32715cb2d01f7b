"""Texts: what can be stored and embedded, and the hashes that say a text or document is the same."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import InvalidInput, PyembedError

SPACES = (r"\u0009-\u000D\u001C-\u0020\u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F"
          r"\u205F\u3000")
"""What separates words wherever a text is split into them, as a regular expression's bracket
ranges that Python and PostgreSQL read alike: Python's str.isspace (Unicode's White_Space and the
separators U+001C..U+001F). The chunker cuts at them and pyembed._document_terms finds a chunk's
overlap with the one before by words split at the same ranges (tests/test_word_splitting.py
checks both sides over every code point): a locale's \\s, which it used, left U+00A0, U+2007,
U+202F, U+0085 and U+001C..U+001F inside words under C.UTF-8."""
_LAST_WORD = re.compile(f"[{SPACES}]+[^{SPACES}]*$")

INVISIBLE = (r"\x01-\x20\x7f-\xa0\xad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u1680"
             r"\u180e\u2000-\u200f\u2028-\u202f\u205f-\u2064\u2066-\u206f\u3000\ufeff"
             r"\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U00013438\U0001bca0-\U0001bca3"
             r"\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f")
"""The characters that are no text: Unicode's whitespace, control (Cc) and format (Cf)
characters, as a regular expression's bracket ranges that Python and PostgreSQL read alike. A
text of these alone is empty: the database's checks (pyembed._has_text, the CHECKs on
chunks.content and eval_queries.query, revision 0027) use the same ranges."""
_VISIBLE = re.compile(f"[^{INVISIBLE}]")


def has_text(text: str) -> bool:
    """Whether `text` has a character that is not whitespace, control or format (INVISIBLE)."""
    return _VISIBLE.search(text) is not None


def check_text(text: object, what: str = "text") -> str:
    """`text` if it can be stored and embedded; InvalidInput if it is not a string, is not
    text PostgreSQL can store (`check_storable`) or is empty, or only whitespace and control or
    format characters (INVISIBLE)."""
    if not isinstance(text, str):
        raise InvalidInput(f"{what} must be a string, got {type(text).__name__}")
    check_storable(text, what)
    if not has_text(text):
        raise InvalidInput(f"{what} is empty or only whitespace and control characters")
    return text


def text_list(texts: object, what: str = "texts") -> list[Any]:
    """`texts` as a list, for each to be checked; InvalidInput for one string (or bytes), which
    Python would iterate as its characters, each embedded or scored as a text of its own, and
    for anything that is not a sequence."""
    if isinstance(texts, str | bytes | bytearray):
        raise InvalidInput(f"{what} is a list of strings, not one {type(texts).__name__}: "
                           "give [text]")
    if not isinstance(texts, Sequence):
        raise InvalidInput(f"{what} is a list of strings, not a {type(texts).__name__}")
    return list(texts)


_PIECE = 1 << 20
"""Characters of a long text encoded at a time, to check or hash it."""


def check_storable(text: str, what: str = "text") -> str:
    """`text` if PostgreSQL can store it: no NUL byte, and valid Unicode (a lone surrogate, as
    JSON's "\\ud800" gives, has no UTF-8 form); else InvalidInput naming `what`."""
    if "\x00" in text:
        raise InvalidInput(f"{what} contains a NUL byte (\\x00), which PostgreSQL cannot store")
    for start in range(0, len(text), _PIECE):  # (a long document is not encoded whole)
        try:
            text[start:start + _PIECE].encode("utf-8")
        except UnicodeEncodeError as exc:
            at = start + exc.start
            raise InvalidInput(f"{what} contains a lone surrogate ({text[at]!r} at "
                               f"character {at}), which is not text: it has no UTF-8 "
                               "form") from None
    return text


def check_document_id(document_id: object) -> str:
    """`document_id` if it can be sent to the database: a string (InvalidInput otherwise) of
    text the driver can carry (`check_storable`). The rule for ids is the database's alone
    (pyembed._document_id_problem), asked before any embedding (corpora.document_hashes)."""
    if not isinstance(document_id, str):
        raise InvalidInput(f"a document id is 1..512 characters, got "
                           f"{type(document_id).__name__}")
    check_storable(document_id, f"document id {document_id!r}")
    return document_id


MAX_JSON_DEPTH = 100
"""How deep a metadata object or a filter may nest: Python's json module and pyembed's checks
recurse, and a deeper value raised RecursionError (a traceback from the CLI, an internal error
from SQL) instead of an error naming the value."""


def check_depth(value: object, what: str) -> None:
    """InvalidInput if objects and arrays in `value` nest more than MAX_JSON_DEPTH deep (or
    contain themselves); walked without recursion."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            raise _too_deep(what)
        stack.extend((child, depth + 1) for child in children)


def read_json(text: str, what: str, **options: Any) -> Any:
    """`text` parsed as JSON (json.loads with `options`; its ValueError for text that is not
    JSON), InvalidInput naming `what` when it nests deeper than MAX_JSON_DEPTH or holds a
    whole number Python cannot convert (`check_digits`)."""
    options.setdefault("parse_int", lambda digits: int(check_digits(digits, what)))
    try:
        value = json.loads(text, **options)
    except RecursionError:
        raise _too_deep(what) from None
    check_depth(value, what)
    return value


def check_digits(digits: str, what: str) -> str:
    """`digits` (a whole number's text) if Python converts it to an int: not past
    sys.get_int_max_str_digits(), whose ValueError no caller expects of a value."""
    limit = sys.get_int_max_str_digits()
    if limit and len(digits.lstrip("+-")) > limit:
        raise InvalidInput(f"{what} holds a whole number of {len(digits.lstrip('+-'))} digits, "
                           f"more than the {limit} Python converts")
    return digits


def check_whole_number(value: int, what: str) -> int:
    """`value` if it has a decimal text (json.dumps, str()), else InvalidInput naming `what`:
    Python refuses to convert an int past sys.get_int_max_str_digits() digits."""
    limit = sys.get_int_max_str_digits()
    # Digits from the bits (log10 2 a bit), exact to one: the text itself cannot be made.
    digits = abs(value).bit_length() * math.log10(2)
    if limit and digits > limit:
        raise InvalidInput(f"{what} is a whole number of about {int(digits) + 1} digits, more "
                           f"than the {limit} Python converts")
    return value


def number(value: object, what: str, low: float, high: float = math.inf, *,
           above: bool = False, unit: str = "",
           error: type[PyembedError] = InvalidInput) -> float:
    """`value` as a float from `low` (excluded when `above`) to `high`; `error` (InvalidInput)
    naming `what` and the range otherwise. A check written as `value < low` lets NaN through
    (every comparison with it is false), and an infinite wait or bound means none at all."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number_ = float(value)
        if math.isfinite(number_) and (number_ > low if above else number_ >= low) and (
                number_ <= high):
            return number_
    start = f"above {low:g}" if above else f"{low:g}"
    span = (f"{start} and at most {high:g}" if above else f"{start}..{high:g}"
            ) if math.isfinite(high) else (start if above else f"{start} or more")
    raise error(f"{what} must be {span}{f' {unit}' if unit else ''}, got {value!r}")


def _too_deep(what: str) -> InvalidInput:
    """The error for a value that nests deeper than MAX_JSON_DEPTH, however it was found."""
    return InvalidInput(f"{what} nests objects and arrays more than {MAX_JSON_DEPTH} levels deep")


def check_metadata(metadata: object, what: str = "metadata") -> Mapping[str, Any]:
    """`metadata` if pyembed.documents can store it as jsonb: a JSON object (a mapping with
    string keys) of finite numbers and storable text, else InvalidInput naming `what`. Values
    JSON has no type for are stored as their str(), as `document_hash` reads them."""
    if not isinstance(metadata, Mapping):
        raise InvalidInput(f"{what} must be a JSON object, got {type(metadata).__name__}")
    check_depth(metadata, what)
    check_json(metadata, what)
    return metadata


def check_json(value: object, what: str) -> None:
    """InvalidInput naming `what` for a value in `value` PostgreSQL's jsonb cannot hold (NUL, a
    lone surrogate, NaN or an infinity, a key that is not a string, an oversized whole number)."""
    if isinstance(value, str):
        check_storable(value, what)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInput(f"{what} is {value}: JSON has no NaN or infinite numbers")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidInput(f"{what} has a key that is not a string: {key!r}")
            check_storable(key, f"{what} key {key!r}")
            check_json(item, f"{what}[{key!r}]")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check_json(item, f"{what}[{index}]")
    elif isinstance(value, int) and not isinstance(value, bool):
        check_whole_number(value, what)
    elif value is not None and not isinstance(value, bool):
        check_storable(str(value), what)


def sha256(text: str) -> bytes:
    """A chunk's content hash (the database computes the same, pyembed._chunk_hash)."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def document_hash(text: str, metadata: Mapping[str, Any]) -> bytes:
    """What makes a document unchanged, on every ingest path: its text and its metadata."""
    digest = hashlib.sha256()
    for start in range(0, len(text), _PIECE):  # sha256 of the whole, not encoded whole
        digest.update(text[start:start + _PIECE].encode("utf-8"))
    digest.update(("\x00" + json.dumps(metadata, sort_keys=True, default=str)).encode("utf-8"))
    return digest.digest()


CHARS_PER_TOKEN = 4
"""estimate_tokens' rate for ASCII characters, the cheapest: a token per this many."""

_SIXTHS_OF_A_TOKEN = (4, 9, 18)
"""estimate_tokens' rate for a character of 2, 3 and 4 bytes of UTF-8, in sixths of a token:
2/3 (Cyrillic, Greek, Arabic, Hebrew), 3/2 (CJK, kana, Hangul, Thai, Devanagari), 3 (emoji and
the other characters past the BMP). A service's byte-level tokenizer reads those scripts in
fewer bytes a token than English, and a rarer character in several tokens: rates at the top
of what the services count, so that a limit checked here holds there."""

_ONLY_LEADS = tuple(bytes(b for b in range(256) if not low <= b <= high)
                    for low, high in ((0xE0, 0xEF), (0xF0, 0xF7)))
"""For bytes.translate: everything but the first bytes of 3- and of 4-byte characters."""


def estimate_tokens(text: str) -> int:
    """A cheap token estimate for any model: the larger of 1.3 per whitespace-separated
    word and its characters' rates (1/CHARS_PER_TOKEN for ASCII, more for other scripts:
    _SIXTHS_OF_A_TOKEN), rounded up. It leans high for English prose and for other scripts."""
    words = (len(text.split()) * 13 + 9) // 10
    if text.isascii():
        return max(words, -(-len(text) // CHARS_PER_TOKEN))
    encoded = text.encode("utf-8", "surrogatepass")
    three, four = (len(encoded.translate(None, leads)) for leads in _ONLY_LEADS)
    two = len(encoded) - len(text) - 2 * three - 3 * four
    one = len(text) - two - three - four
    two_rate, three_rate, four_rate = _SIXTHS_OF_A_TOKEN
    sixths = 6 * one + CHARS_PER_TOKEN * (two_rate * two + three_rate * three + four_rate * four)
    return max(words, -(-sixths // (6 * CHARS_PER_TOKEN)))


def most_chars(tokens: int) -> int:
    """The most characters a text can have and be estimated at most `tokens` (the estimate's
    character term at the ASCII rate, the lowest; its words and other scripts may count
    more)."""
    return tokens * CHARS_PER_TOKEN


def _most_words(tokens: int) -> int:
    """The most words a text can have and be estimated at most `tokens` (the word term)."""
    return tokens * 10 // 13


def over_tokens(text: str, limit: int, start: int = 0, end: int | None = None) -> bool:
    """Whether `estimate_tokens(text[start:end])` is over `limit`; a text whose length alone
    says so is neither split into words nor copied."""
    end = len(text) if end is None else end
    return end - start > most_chars(limit) or estimate_tokens(text[start:end]) > limit


def chars_within(text: str, limit: int, start: int = 0, end: int | None = None) -> int:
    """The length of the longest prefix of `text[start:end]` estimated at most `limit`
    tokens (the estimate grows with the prefix): `most_chars(limit)` for ASCII without
    spaces, fewer for other scripts."""
    end = len(text) if end is None else end
    low, high = 0, min(end - start, most_chars(limit))
    if not over_tokens(text, limit, start, start + high):
        return high
    while low + 1 < high:  # the prefix of `low` characters fits, that of `high` does not
        middle = (low + high) // 2
        if over_tokens(text, limit, start, start + middle):
            high = middle
        else:
            low = middle
    return low


def truncate_to_tokens(text: str, limit: int) -> str:
    """The longest prefix of `text`, ending at a word where possible, whose
    `estimate_tokens` is at most `limit`."""
    if estimate_tokens(text) <= limit:
        return text
    max_words = _most_words(limit)
    words = text.split(maxsplit=max_words)
    cut = text if len(words) <= max_words else text[:_end_of_words(text, max_words)]
    if estimate_tokens(cut) > limit:
        cut = cut[:chars_within(cut, limit)]
        if not text[len(cut)].isspace():
            match = _LAST_WORD.search(cut)
            if match and match.start() > 0:
                cut = cut[:match.start()]
    return cut.rstrip()


def _end_of_words(text: str, count: int) -> int:
    """The index just past the `count`-th whitespace-separated word of `text`."""
    end = 0
    for _ in range(count):
        while text[end].isspace():
            end += 1
        while end < len(text) and not text[end].isspace():
            end += 1
    return end
