"""Split documents into overlapping chunks that fit a model's token limit."""

from __future__ import annotations

import re
from collections.abc import Callable

from .text import estimate_tokens, has_text

_WORD = re.compile(r"\S+\s*")
_SPACE = re.compile(r"\s*$")


def _words(text: str, max_tokens: int) -> list[str]:
    """The words of `text` with their trailing space; a word longer than `max_tokens`
    (a URL, base64, a run without spaces) in pieces of that many tokens, so that no chunk
    outgrows the limit the model is given."""
    out: list[str] = []
    size = 4 * max_tokens  # estimate_tokens counts a token per 4 characters of one word
    for word in _WORD.findall(text):
        if estimate_tokens(word) <= max_tokens:
            out.append(word)
            continue
        space = _SPACE.search(word)
        core = word[:space.start()] if space else word
        pieces = [core[i:i + size] for i in range(0, len(core), size)]
        pieces[-1] += word[len(core):]
        out += pieces
    return out


def chunk_text(text: str, max_tokens: int = 200, overlap_tokens: int = 40) -> list[str]:
    """Consecutive windows of whole words, each at most `max_tokens` (estimated) long,
    each starting `overlap_tokens` before the previous one ended; a word longer than a window
    is cut into windows of its own. Short text is one chunk. A window without a visible
    character (a run of zero-width spaces or escapes longer than a window) is left out: the
    document's other windows hold its text, and chunks.content refuses it."""
    if overlap_tokens >= max_tokens:
        raise ValueError("overlap must be smaller than the chunk size")
    text = text.strip()
    if estimate_tokens(text) <= max_tokens:
        return [text] if text else []
    words = _words(text, max_tokens)
    chunks: list[str] = []
    start = 0
    while start < len(words):
        end, used = start, 0
        while end < len(words):
            cost = estimate_tokens(words[end])
            if used + cost > max_tokens and end > start:
                break
            used += cost
            end += 1
        chunk = "".join(words[start:end]).strip()
        if has_text(chunk):  # a window of format or control characters alone is no text
            chunks.append(chunk)
        if end >= len(words):
            break
        back, kept = end, 0
        while back > start + 1 and kept + estimate_tokens(words[back - 1]) <= overlap_tokens:
            back -= 1
            kept += estimate_tokens(words[back])
        while back < end and kept + estimate_tokens(words[end]) > max_tokens:
            kept -= estimate_tokens(words[back])  # else the next window is the overlap alone
            back += 1
        start = back
    return chunks


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
