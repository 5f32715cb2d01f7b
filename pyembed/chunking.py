"""Split documents into overlapping chunks that fit a model's token limit."""

from __future__ import annotations

import re
from collections.abc import Callable

from .text import estimate_tokens

_WORD = re.compile(r"\S+\s*")


def chunk_text(text: str, max_tokens: int = 200, overlap_tokens: int = 40) -> list[str]:
    """Consecutive windows of whole words, each at most `max_tokens` (estimated) long,
    each starting `overlap_tokens` before the previous one ended. Short text is one chunk."""
    if overlap_tokens >= max_tokens:
        raise ValueError("overlap must be smaller than the chunk size")
    text = text.strip()
    if estimate_tokens(text) <= max_tokens:
        return [text] if text else []
    words = _WORD.findall(text)
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
        chunks.append("".join(words[start:end]).strip())
        if end >= len(words):
            break
        back, kept = end, 0
        while back > start + 1 and kept + estimate_tokens(words[back - 1]) <= overlap_tokens:
            back -= 1
            kept += estimate_tokens(words[back])
        start = back
    return chunks


def fit_chunks(chunks: list[str], max_tokens: int,
               count: Callable[[list[str]], list[int] | None]) -> list[str]:
    """Split, at word boundaries, every chunk that the model's own tokenizer (`count`, which
    may answer None when it has none) finds over `max_tokens`; the estimate can run short."""
    counts = count(chunks)
    if counts is None:
        return chunks
    out: list[str] = []
    for chunk, n in zip(chunks, counts, strict=True):
        words = _WORD.findall(chunk)
        if n <= max_tokens or len(words) < 2:
            out.append(chunk)
            continue
        half = len(words) // 2
        out += fit_chunks(["".join(words[:half]).strip(), "".join(words[half:]).strip()],
                          max_tokens, count)
    return out
