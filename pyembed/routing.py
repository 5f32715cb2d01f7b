"""Which model key serves a query while a corpus migrates: a stable share by query hash."""

from __future__ import annotations

import hashlib


def bucket(query: str) -> int:
    """0..99 from the sha256 of the stripped query: the same query always lands the same way."""
    return int.from_bytes(hashlib.sha256(query.strip().encode()).digest()[:8], "big") % 100


def serving_key(query: str, active: str, target: str | None, share: int) -> str:
    """The target key for `share` percent of queries (by hash), else the active key."""
    if target is None or share <= 0:
        return active
    return target if bucket(query) < share else active
