"""Texts: what can be stored and embedded, and the hashes that say a text or document is the same."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from .errors import InvalidInput

_LAST_WORD = re.compile(r"\s+\S*$")


def check_text(text: object, what: str = "text") -> str:
    """`text` if it can be stored and embedded; InvalidInput if it is not a string, contains
    NUL (PostgreSQL cannot store it) or is empty or only whitespace."""
    if not isinstance(text, str):
        raise InvalidInput(f"{what} must be a string, got {type(text).__name__}")
    if "\x00" in text:
        raise InvalidInput(f"{what} contains a NUL byte (\\x00), which PostgreSQL cannot store")
    if not text.strip():
        raise InvalidInput(f"{what} is empty or only whitespace")
    return text


def check_document_id(document_id: object) -> str:
    """`document_id` if pyembed.documents can store it (1..512 characters, its CHECK), else
    InvalidInput."""
    if not isinstance(document_id, str) or not 1 <= len(document_id) <= 512:
        got = (f"{len(document_id)} characters" if isinstance(document_id, str)
               else type(document_id).__name__)
        raise InvalidInput(f"a document id is 1..512 characters, got {got}")
    return document_id


def sha256(text: str) -> bytes:
    """A chunk's content hash (the database computes the same, pyembed._chunk_hash)."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def document_hash(text: str, metadata: Mapping[str, Any]) -> bytes:
    """What makes a document unchanged, on every ingest path: its text and its metadata."""
    return sha256(text + "\x00" + json.dumps(metadata, sort_keys=True, default=str))


def estimate_tokens(text: str) -> int:
    """A cheap token estimate for any model: the larger of 1.3 per whitespace-separated
    word and 1 per 4 characters, rounded up. It leans high for English prose."""
    return max((len(text.split()) * 13 + 9) // 10, (len(text) + 3) // 4)


def truncate_to_tokens(text: str, limit: int) -> str:
    """The longest prefix of `text`, ending at a word where possible, whose
    `estimate_tokens` is at most `limit`."""
    if estimate_tokens(text) <= limit:
        return text
    max_words = limit * 10 // 13
    words = text.split(maxsplit=max_words)
    cut = text if len(words) <= max_words else text[:_end_of_words(text, max_words)]
    if len(cut) > limit * 4:
        cut = cut[:limit * 4]
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
