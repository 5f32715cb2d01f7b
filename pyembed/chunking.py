"""Split documents into overlapping chunks that fit a model's token limit."""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterator

from .text import SPACES, chars_within, estimate_tokens, has_text, over_tokens

_WORD = re.compile(f"[^{SPACES}]+[{SPACES}]*")
_SPACE = re.compile(f"[{SPACES}]*$")


def _words(text: str, max_tokens: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Where the words of `text[start:end]` end, with their trailing space, and each one's
    estimated tokens, in order, one at a time (each word starts where the one before ended); a
    word longer than `max_tokens` (a URL, base64, a run without spaces) in pieces of that many
    tokens, so that no chunk outgrows the limit the model is given."""
    for match in _WORD.finditer(text, start, end):
        word = match.group()
        cost = estimate_tokens(word)
        if cost <= max_tokens:
            yield match.end(), cost
            continue
        space = _SPACE.search(word)
        at, core = match.start(), match.end() - (len(space.group()) if space else 0)
        while (cut := at + max(1, chars_within(text, max_tokens, at, core))) < core:
            yield cut, estimate_tokens(text[at:cut])
            at = cut
        yield match.end(), estimate_tokens(text[at:match.end()])


def _stripped(text: str, start: int, end: int) -> tuple[int, int]:
    """The bounds of `text[start:end].strip()` in `text`, without copying it."""
    while end > start and text[end - 1].isspace():
        end -= 1
    while start < end and text[start].isspace():
        start += 1
    return start, end


def chunk_text(text: str, max_tokens: int = 200, overlap_tokens: int = 40) -> list[str]:
    """Consecutive windows of whole words, each at most `max_tokens` (estimated) long,
    each starting `overlap_tokens` before the previous one ended; a word longer than a window
    is cut into windows of its own. Short text is one chunk. A window without a visible
    character (a run of zero-width spaces or escapes longer than a window) is left out: the
    document's other windows hold its text, and chunks.content refuses it."""
    return list(iter_chunks(text, max_tokens, overlap_tokens))


def iter_chunks(text: str, max_tokens: int = 200, overlap_tokens: int = 40) -> Iterator[str]:
    """`chunk_text`'s chunks one at a time (`iter_spans`' slices of `text`)."""
    for start, end in iter_spans(text, max_tokens, overlap_tokens):
        yield text[start:end]


def iter_spans(text: str, max_tokens: int = 200, overlap_tokens: int = 40
               ) -> Iterator[tuple[int, int]]:
    """Where `chunk_text`'s chunks lie in `text`, as (start, end) of each, one at a time: a
    chunk is a stretch of the text (its words are), so a long document's chunks can be kept
    as two numbers each and sliced again when they are written. Only the current window's word
    ends are held, not a list of the document's words (an object each)."""
    if overlap_tokens >= max_tokens:
        raise ValueError("overlap must be smaller than the chunk size")
    start, end = _stripped(text, 0, len(text))
    # The estimate of the whole (which splits it into words) is only made for a text whose
    # length alone does not put it over the window.
    if not over_tokens(text, max_tokens, start, end):
        if end > start:
            yield start, end
        return
    words = _words(text, max_tokens, start, end)
    # The words from the window's start, read so far, as (where each ends, its tokens); the
    # window starts where the word before its first ended (`first`).
    window: deque[tuple[int, int]] = deque()
    first = start

    def more() -> bool:
        following = next(words, None)
        if following is None:
            return False
        window.append(following)
        return True

    while True:
        stop, used = 0, 0
        while stop < len(window) or more():
            cost = window[stop][1]
            if used + cost > max_tokens and stop > 0:
                break
            used += cost
            stop += 1
        span = _stripped(text, first, window[stop - 1][0])
        if has_text(text[span[0]:span[1]]):  # a window of format or control characters alone is no text
            yield span
        if stop == len(window):  # (the loop above stops there only when the words ran out)
            return
        back, kept = stop, 0
        while back > 1 and kept + window[back - 1][1] <= overlap_tokens:
            back -= 1
            kept += window[back][1]
        while back < stop and kept + window[stop][1] > max_tokens:
            kept -= window[back][1]  # else the next window is the overlap alone
            back += 1
        for _ in range(back):
            first = window.popleft()[0]


def fit_chunks(chunks: list[str], max_tokens: int,
               count: Callable[[list[str]], list[int] | None]) -> list[str]:
    """Split every chunk that the model's own tokenizer (`count`; when it answers None, for a
    model without one, `estimate_tokens`, as the embedder's limit check does) finds over
    `max_tokens`, at word boundaries, and a single word over it in halves of its characters:
    a corpus's windows may be wider than its model reads, and the estimate can run short."""
    return [text[start:end] for _, text, start, end
            in fit_spans([(0, chunk, 0, len(chunk)) for chunk in chunks], max_tokens, count)]


Span = tuple[int, str, int, int]
"""A chunk as (n, text, start, end): `text[start:end]`, where `text` is its document's, and
`n` says which document that is (its pieces keep it)."""


def fit_spans(spans: list[Span], max_tokens: int,
              count: Callable[[list[str]], list[int] | None]) -> list[Span]:
    """`fit_chunks` of chunks given where they lie in their documents' texts, answered the
    same way (its pieces are stretches of the chunks they come from)."""
    texts = [text[start:end] for _, text, start, end in spans]
    counts = count(texts)
    if counts is None:
        counts = [estimate_tokens(chunk) for chunk in texts]
    del texts  # (the pieces are sliced again below, a chunk at a time)
    out: list[Span] = []
    for span, n in zip(spans, counts, strict=True):
        key, text, start, end = span
        if n <= max_tokens or end - start < 2:
            out.append(span)
            continue
        words = [m.start() for m in _WORD.finditer(text, start, end)]
        if len(words) < 2:
            middle = start + (end - start) // 2
            halves = [(key, text, start, middle), (key, text, middle, end)]
        else:
            middle = words[len(words) // 2]
            halves = [(key, text, *_stripped(text, start, middle)),
                      (key, text, *_stripped(text, middle, end))]
        out += fit_spans([h for h in halves if has_text(h[1][h[2]:h[3]])], max_tokens, count)
    return out
