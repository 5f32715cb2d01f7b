"""The embedding cache key, shared by the Python package and the PL/Python functions."""

from __future__ import annotations

import hashlib


def cache_key(text: str, model_key: str, input_type: str) -> bytes:
    """sha256 of the stripped text, the model key and the input type, NUL-separated.

    Surrounding whitespace does not change the key; the model key and input type do.
    Texts containing NUL are rejected before they reach the cache, so the fields
    cannot run into each other.
    """
    payload = "\x00".join((text.strip(), model_key, str(input_type)))
    return hashlib.sha256(payload.encode("utf-8")).digest()
