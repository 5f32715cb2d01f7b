"""The embedding cache key, shared by the Python package and the PL/Python functions."""

from __future__ import annotations

import hashlib
import time
import unicodedata


def nfc(text: str) -> str:
    """`text` in Unicode normal form NFC: the form pyembed keys and embeds a text in, as the
    database tokenises it for keyword search (sql/060-keyword.sql)."""
    return unicodedata.normalize("NFC", text)


def cache_key(text: str, model_key: str, input_type: str) -> bytes:
    """sha256 of the stripped text in Unicode normal form NFC, the model key and the input
    type, NUL-separated.

    Surrounding whitespace and the text's normal form (NFC or NFD: "é" composed or
    decomposed) do not change the key; the model key and input type do. Texts containing NUL
    are rejected before they reach the cache, so the fields cannot run into each other.
    """
    payload = "\x00".join((nfc(text.strip()), model_key, str(input_type)))
    return hashlib.sha256(payload.encode("utf-8")).digest()


class HitCounter:
    """Cache hits and misses per model, counted in memory and written now and then: a write
    on every lookup would serialise lookups on one row and fail on read-only replicas."""

    def __init__(self, every: int = 100, seconds: float = 10.0) -> None:
        self.every, self.seconds = every, seconds
        self.counts: dict[str, list[int]] = {}
        self._since = time.monotonic()

    def add(self, model_key: str, hits: int, misses: int) -> None:
        c = self.counts.setdefault(model_key, [0, 0])
        c[0] += hits
        c[1] += misses

    def due(self) -> bool:
        total = sum(h + m for h, m in self.counts.values())
        return total >= self.every or (total > 0 and
                                       time.monotonic() - self._since >= self.seconds)

    def take(self) -> tuple[list[str], list[int], list[int]]:
        """(models, hits, misses) to write, and a fresh start."""
        items = sorted(self.counts.items())
        self.counts, self._since = {}, time.monotonic()
        return [k for k, _ in items], [c[0] for _, c in items], [c[1] for _, c in items]

    def put_back(self, models: list[str], hits: list[int], misses: list[int]) -> None:
        for k, h, m in zip(models, hits, misses, strict=True):
            self.add(k, h, m)



def rerank_cache_key(query: str, text: str, reranker: str) -> bytes:
    """sha256 of "rerank", the stripped query, the stripped candidate text (both in NFC, as
    cache_key's) and the reranker's identity, NUL-separated (texts with NUL never reach a
    reranker)."""
    payload = "\x00".join(("rerank", nfc(query.strip()), nfc(text.strip()), reranker))
    return hashlib.sha256(payload.encode("utf-8")).digest()
