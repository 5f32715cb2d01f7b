"""Embedding cache figures (a script, not a test): query embedding on a cache hit end to end
from Python (p50/p99), 10,000 texts of which half are cached: provider calls and cache
round trips, and the store of 1,000 vectors (one cache_put) and its lookup.

    .venv/bin/python tests/benchmarks/bench_cache.py [--store-only] [--home FOLDER]
"""

from __future__ import annotations

import argparse
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


def store_figures(conn: psycopg.Connection[Any], runs: int = 15) -> None:
    """One cache_put of 1,000 vectors of 384 dimensions (fresh keys each run) and one
    cache_get of them: medians over `runs`."""
    import numpy as np

    from pyembed.cache import PostgresCache
    from pyembed.models import InputType, registry

    spec = registry.get("fake/fake-hash@1:384")
    cache = PostgresCache(conn)
    rng = np.random.default_rng(0)
    stores, lookups = [], []
    for run in range(runs):
        texts = [f"run {run} text {i}" for i in range(1000)]
        vectors = rng.standard_normal((1000, 384)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        t0 = time.perf_counter()
        cache.put_many(texts, vectors, spec, InputType.DOCUMENT)
        t1 = time.perf_counter()
        found = cache.get_many(texts, spec, InputType.DOCUMENT)
        t2 = time.perf_counter()
        assert len(found) == 1000 and np.array_equal(found[7], vectors[7])
        stores.append((t1 - t0) * 1000)
        lookups.append((t2 - t1) * 1000)
    print(f"cache store of 1,000 vectors (384 dims), median of {runs}: "
          f"{statistics.median(stores):.1f} ms; lookup of them: "
          f"{statistics.median(lookups):.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store-only", action="store_true",
                        help="only the store and lookup of 1,000 vectors")
    parser.add_argument("--home", default=".pyembed-bench-cache",
                        help="the local cluster's folder")
    args = parser.parse_args()
    from pyembed.cache import PostgresCache
    from pyembed.db import connect
    from pyembed.embedder import Embedder
    from pyembed.models import registry
    from pyembed.providers.fake import FakeProvider
    from tests.benchmarks.common import local_database

    with local_database(args.home) as target:
        app_dsn = target.app_dsn
        assert app_dsn is not None
        if args.store_only:
            with connect(app_dsn, autocommit=True) as conn:
                store_figures(conn)
            return
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
