"""Texts: what can be stored and embedded, and the hashes that say a text or document is the same."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from .errors import InvalidInput


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


def sha256(text: str) -> bytes:
    """A chunk's content hash (the database computes the same, pyembed._chunk_hash)."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def document_hash(text: str, metadata: Mapping[str, Any]) -> bytes:
    """What makes a document unchanged, on every ingest path: its text and its metadata."""
    return sha256(text + "\x00" + json.dumps(metadata, sort_keys=True, default=str))
