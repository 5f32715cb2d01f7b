"""Split documents into overlapping chunks that fit a model's token limit."""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterator
from itertools import islice

from .text import estimate_tokens, has_text, most_chars, over_tokens

_WORD = re.compile(r"\S+\s*")
_SPACE = re.compile(r"\s*$")


def _words(text: str, max_tokens: int, start: int, end: int) -> Iterator[tuple[str, int]]:
    """The words of `text[start:end]` with their trailing space, and each one's estimated
    tokens, in order, one at a time; a word longer than `max_tokens` (a URL, base64, a run
    without spaces) in pieces of that many tokens, so that no chunk outgrows the limit the
    model is given."""
    size = most_chars(max_tokens)
    for match in _WORD.finditer(text, start, end):
        word = match.group()
        cost = estimate_tokens(word)
        if cost <= max_tokens:
            yield word, cost
            continue
        space = _SPACE.search(word)
        core = word[:space.start()] if space else word
        pieces = [core[i:i + size] for i in range(0, len(core), size)]
        pieces[-1] += word[len(core):]
        for piece in pieces:
            yield piece, estimate_tokens(piece)


def chunk_text(text: str, max_tokens: int = 200, overlap_tokens: int = 40) -> list[str]:
    """Consecutive windows of whole words, each at most `max_tokens` (estimated) long,
    each starting `overlap_tokens` before the previous one ended; a word longer than a window
    is cut into windows of its own. Short text is one chunk. A window without a visible
    character (a run of zero-width spaces or escapes longer than a window) is left out: the
    document's other windows hold its text, and chunks.content refuses it."""
    return list(iter_chunks(text, max_tokens, overlap_tokens))


def iter_chunks(text: str, max_tokens: int = 200, overlap_tokens: int = 40) -> Iterator[str]:
    """`chunk_text`'s chunks one at a time, holding only the words of the window being made:
    the memory a long document takes is its text and the chunks kept, not a list of its
    words (an object each)."""
    if overlap_tokens >= max_tokens:
        raise ValueError("overlap must be smaller than the chunk size")
    # The text without its outer whitespace, as bounds: text.strip() would copy it whole.
    start, end = 0, len(text)
    while end > start and text[end - 1].isspace():
        end -= 1
    while start < end and text[start].isspace():
        start += 1
    # The estimate of the whole (which splits it into words) is only made for a text whose
    # length alone does not put it over the window.
    if not over_tokens(text, max_tokens, start, end):
        if end > start:
            yield text[start:end]
        return
    words = _words(text, max_tokens, start, end)
    window: deque[tuple[str, int]] = deque()  # the words from the window's start, read so far

    def more() -> bool:
        following = next(words, None)
        if following is None:
            return False
        window.append(following)
        return True

    while True:
        end, used = 0, 0
        while end < len(window) or more():
            cost = window[end][1]
            if used + cost > max_tokens and end > 0:
                break
            used += cost
            end += 1
        chunk = "".join(word for word, _ in islice(window, end)).strip()
        if has_text(chunk):  # a window of format or control characters alone is no text
            yield chunk
        if end == len(window):  # (the loop above stops there only when the words ran out)
            return
        back, kept = end, 0
        while back > 1 and kept + window[back - 1][1] <= overlap_tokens:
            back -= 1
            kept += window[back][1]
        while back < end and kept + window[end][1] > max_tokens:
            kept -= window[back][1]  # else the next window is the overlap alone
            back += 1
        for _ in range(back):
            window.popleft()


def fit_chunks(chunks: list[str], max_tokens: int,
               count: Callable[[list[str]], list[int] | None]) -> list[str]:
    """Split every chunk that the model's own tokenizer (`count`; when it answers None, for a
    model without one, `estimate_tokens`, as the embedder's limit check does) finds over
    `max_tokens`, at word boundaries, and a single word over it in halves of its characters:
    a corpus's windows may be wider than its model reads, and the estimate can run short."""
    counts = count(chunks)
    if counts is None:
        counts = [estimate_tokens(chunk) for chunk in chunks]
    out: list[str] = []
    for chunk, n in zip(chunks, counts, strict=True):
        words = _WORD.findall(chunk)
        if n <= max_tokens or len(chunk) < 2:
            out.append(chunk)
            continue
        if len(words) < 2:
            halves = [chunk[:len(chunk) // 2], chunk[len(chunk) // 2:]]
        else:
            halves = ["".join(words[:len(words) // 2]).strip(),
                      "".join(words[len(words) // 2:]).strip()]
        out += fit_chunks([half for half in halves if has_text(half)], max_tokens, count)
    return out
