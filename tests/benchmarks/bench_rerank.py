"""Rerank stage figures (a script, not a test): what `rerank=` adds to a hybrid search of k=10
over 50 candidates, through the Voyage SDK to the fake rerank server on 127.0.0.1 (a miss: one
request, scores cached) and from the rerank cache (a hit: no request), beside the same search
without rerank and with the offline `fake` reranker; requests and usage rows counted.

    .venv/bin/python tests/benchmarks/bench_rerank.py [--documents 2000] [--queries 100]

The fake server scores by shared words: these are plumbing costs (SDK, HTTP on loopback, cache,
ledger), not a reranker's quality or a real service's latency.
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

import numpy as np

WORDS = ("quota refund invoice delivery password reset bucket region latency replica index "
         "vector tenant token limit error retry backup restore cluster schema migration key "
         "shard cache worker queue lease timeout storage billing account region").split()


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def timed(run: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = run()
    return (time.perf_counter() - started) * 1000.0, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--candidates", type=int, default=50)
    args = parser.parse_args()

    import pyembed
    from pyembed import tenants
    from tests.benchmarks.common import FAKE_KEY, local_database
    from tests.fakeapi.rerank import fake_reranker

    rng = random.Random(7)
    queries = [text(rng, 6) for _ in range(args.queries)]
    with local_database(".pyembed-bench-rerank") as target, fake_reranker("voyage") as name:
        assert target.app_dsn is not None
        client = pyembed.connect(target.app_dsn, log_queries=False)
        corpus = client.create_corpus("bench", FAKE_KEY)
        corpus.add([(f"d{i}", text(rng, 60)) for i in range(args.documents)])
        print(f"{args.documents:,} documents of 60 words (model {FAKE_KEY}), "
              f"{args.queries} queries, hybrid search, k=10, {args.candidates} candidates")
        for q in queries:  # warm: query embeddings cached, plans made
            corpus.retrieve(q, 10, mode="hybrid")

        def run(rerank: str | None) -> tuple[list[float], list[float]]:
            totals, stages = [], []
            for q in queries:
                ms, found = timed(lambda q=q: corpus.retrieve(
                    q, 10, mode="hybrid", rerank=rerank, rerank_candidates=args.candidates))
                totals.append(ms)
                stages.append(found.timings.get("rerank_ms") or 0.0)
            return totals, stages

        rows: list[tuple[str, list[float], list[float] | None]] = []
        plain, _ = run(None)
        rows.append(("no rerank", plain, None))
        miss, miss_stage = run(name)
        rows.append((f"{name}, cache miss (1 request)", miss, miss_stage))
        hit, hit_stage = run(name)
        rows.append((f"{name}, cache hit (no request)", hit, hit_stage))
        offline, offline_stage = run("fake")
        rows.append(("fake/overlap offline, miss", offline, offline_stage))
        print(f"{'':44} {'total p50':>10} {'p95':>8} {'rerank p50':>11} {'p95':>8}")
        for label, totals, stage in rows:
            t50, t95 = np.percentile(totals, [50, 95])
            s50, s95 = np.percentile(stage, [50, 95]) if stage else (float("nan"),) * 2
            print(f"{label:44} {t50:10.2f} {t95:8.2f} {s50:11.2f} {s95:8.2f}")
        used = [r for r in tenants.usage(client.conn) if r.model_key == name]
        print(f"usage ledger for {name}: {sum(r.requests for r in used)} requests, "
              f"{sum(r.tokens for r in used):,} estimated tokens "
              f"(expected {args.queries} requests: one per query, none on a hit)")
        client.close()


if __name__ == "__main__":
    main()
