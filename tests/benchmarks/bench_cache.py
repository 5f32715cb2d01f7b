"""Embedding cache figures (a script, not a test): query embedding on a cache hit end to end
from Python (p50/p99), and 10,000 texts of which half are cached: provider calls and cache
round trips.

    .venv/bin/python tests/benchmarks/bench_cache.py
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import psycopg


class CountingConnection:
    """Counts the statements a PostgresCache sends (each is one round trip)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn, self.statements = conn, 0

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        self.statements += 1
        return self.conn.execute(*args, **kwargs)

    @property
    def closed(self) -> bool:
        return self.conn.closed


def main() -> None:
    from pyembed.cache import PostgresCache
    from pyembed.db import connect
    from pyembed.embedder import Embedder
    from pyembed.models import registry
    from pyembed.providers.fake import FakeProvider
    from tests.benchmarks.common import local_database

    with local_database(".pyembed-bench-cache") as target:
        app_dsn = target.app_dsn
        assert app_dsn is not None
        spec = registry.get("fake/fake-hash@1:384")
        local = registry.get("local/all-minilm-l6-v2-int8@1:384")
        with connect(app_dsn, autocommit=True) as conn:
            # 1. Query embedding on a cache hit, end to end (the local model's tokenizer counts
            #    tokens first, as it would for a real query).
            emb = Embedder(local, cache=PostgresCache(conn))
            emb.embed_query("how do I rotate an API key?")  # miss: embeds and stores
            samples = []
            for _ in range(2000):
                t0 = time.perf_counter()
                emb.embed_query("how do I rotate an API key?")
                samples.append((time.perf_counter() - t0) * 1000)
            samples.sort()
            print(f"cache-hit query embedding, {local.key}, 2,000 calls: "
                  f"p50 {statistics.median(samples):.3f} ms, p99 {samples[1979]:.3f} ms "
                  "(target p50 < 2 ms)")

            # 2. 10,000 texts, half cached.
            texts = [f"document number {i} about topic {i % 97}" for i in range(10_000)]
            warm = Embedder(spec, FakeProvider(spec), cache=PostgresCache(conn))
            warm.embed(texts[::2])
            counting = CountingConnection(conn)
            provider = FakeProvider(spec)
            cold = Embedder(spec, provider, cache=PostgresCache(counting))  # type: ignore[arg-type]
            t0 = time.perf_counter()
            cold.embed(texts)
            seconds = time.perf_counter() - t0
            expected = math.ceil(5000 / spec.max_batch)
            print(f"10,000 texts, 5,000 cached: {provider.calls} provider calls (expected "
                  f"ceil(5,000 / {spec.max_batch}) = {expected}), "
                  f"{sum(len(b) for b in provider.batches)} texts sent, "
                  f"{counting.statements} cache statements (1 lookup, 1 store; the hit "
                  "counts: a read-only check and 1 write), "
                  f"{seconds:.2f} s")


if __name__ == "__main__":
    main()
