"""SciFact through pyembed (a script, not a test): ingest the corpus, run the 300 test queries
through guarded vector search, keyword (BM25 in SQL) and hybrid search, and print nDCG@10 and
Recall@10 next to exact numpy search over the same vectors and the published figure.

    .venv/bin/python tests/benchmarks/bench_scifact.py            # ~6 min: embeds 5,183 abstracts
    .venv/bin/python tests/benchmarks/bench_scifact.py --limit 800 # a quick look (figures not comparable)

Each document (title + text) is one chunk; its embedding reads the model's first 256 tokens
(truncate=True), as sentence-transformers does for the published figure.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from pgvector import Vector

from tests.benchmarks.bench_local_model import (
    PUBLISHED_NDCG10,
    evaluate,
    load_corpus,
    load_qrels,
    load_queries,
)
from tests.benchmarks.common import connect, local_database, print_environment

REPO = Path(__file__).resolve().parents[2]
K = 10


def ranked_metrics(rankings: dict[str, list[str]], qrels: dict[str, dict[str, int]]
                   ) -> tuple[float, float]:
    import math

    ndcgs, recalls = [], []
    for qid, relevant in qrels.items():
        top = rankings.get(qid, [])[:K]
        gains = [relevant.get(d, 0) for d in top]
        dcg = sum((2 ** g - 1) / math.log2(i + 2) for i, g in enumerate(gains))
        ideal = sorted(relevant.values(), reverse=True)[:K]
        idcg = sum((2 ** g - 1) / math.log2(i + 2) for i, g in enumerate(ideal))
        ndcgs.append(dcg / idcg)
        recalls.append(sum(1 for g in gains if g > 0) / len(relevant))
    return float(np.mean(ndcgs)), float(np.mean(recalls))


def p50(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data" / "scifact")
    parser.add_argument("--limit", type=int, help="only the first N documents")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database")
    args = parser.parse_args()

    import pyembed
    from pyembed.search import search

    doc_ids, texts = load_corpus(args.data / "corpus.jsonl", args.limit)
    queries = load_queries(args.data / "queries.jsonl")
    qrels = load_qrels(args.data / "qrels" / "test.tsv", set(doc_ids))
    with local_database(".pyembed-bench", keep=args.keep) as target:
        owner = connect(target.owner_dsn)
        print_environment(owner)
        print(f"{len(doc_ids)} documents, {len(qrels)} test queries with a relevant document")
        assert target.app_dsn is not None
        with pyembed.connect(target.app_dsn) as client:
            corpus = client.create_corpus("scifact", pyembed.LOCAL_DEFAULT.key,
                                          chunk_tokens=100_000, chunk_overlap=0)
            started = time.perf_counter()
            for i in range(0, len(doc_ids), 256):
                corpus.add([pyembed.Document(d, t) for d, t in
                            zip(doc_ids[i:i + 256], texts[i:i + 256], strict=True)],
                           truncate=True)
                done = min(i + 256, len(doc_ids))
                rate = done / (time.perf_counter() - started)
                print(f"\r  ingested {done}/{len(doc_ids)} ({rate:.1f} docs/s)", end="", flush=True)
            print(f"\ningest: {time.perf_counter() - started:.0f} s")
            owner.execute("ANALYZE")

            embedder = client.embedder(corpus.model_key)
            qids = list(qrels)
            qvecs = embedder.embed([queries[q] for q in qids], pyembed.InputType.QUERY)
            rankings: dict[str, dict[str, list[str]]] = {m: {} for m in ("vector", "keyword",
                                                                         "hybrid")}
            times: dict[str, list[float]] = {m: [] for m in (*rankings, "plain")}
            corpus_id = corpus.info.corpus_id
            plain_sql = (f"SELECT chunk_id FROM pyembed.vectors WHERE corpus_id = {corpus_id} "
                         f"AND model_key = '{corpus.model_key}' ORDER BY "
                         "embedding::vector(384) <=> %s::vector(384) LIMIT 10")
            for qid, vec in zip(qids, qvecs, strict=True):
                for mode in rankings:
                    t0 = time.perf_counter()
                    hits = search(client.conn, "scifact", vec, corpus.model_key, K,
                                        mode=mode, text=queries[qid])
                    times[mode].append(time.perf_counter() - t0)
                    rankings[mode][qid] = [h.document_id for h in hits]
                t0 = time.perf_counter()
                owner.execute(plain_sql, (Vector(vec),)).fetchall()
                times["plain"].append(time.perf_counter() - t0)

        rows = owner.execute(
            "SELECT c.document_id, v.embedding FROM pyembed.vectors v JOIN pyembed.chunks c "
            "USING (corpus_id, chunk_id) WHERE v.corpus_id = %s", (corpus_id,)).fetchall()
        exact_ids = [r[0] for r in rows]
        exact_vecs = np.stack([np.asarray(r[1].to_numpy() if hasattr(r[1], "to_numpy") else r[1],
                                          dtype=np.float32) for r in rows])
        exact = evaluate(qvecs, exact_vecs, qids, exact_ids, qrels, K)

    print(f"\n{'search':<34}{'nDCG@10':>9}{'Recall@10':>11}{'p50 ms':>9}")
    print(f"{'published all-MiniLM-L6-v2':<34}{PUBLISHED_NDCG10:>9.4f}{'':>11}{'':>9}")
    print(f"{'exact numpy, same vectors':<34}{exact[0]:>9.4f}{exact[1]:>11.4f}{'':>9}")
    labels = {"vector": "guarded vector (HNSW)", "keyword": "keyword (BM25 in SQL)",
              "hybrid": "hybrid (RRF of both)"}
    results: dict[str, Any] = {}
    for mode, label in labels.items():
        results[mode] = ranked_metrics(rankings[mode], qrels)
        print(f"{label:<34}{results[mode][0]:>9.4f}{results[mode][1]:>11.4f}"
              f"{p50(times[mode]):>9.2f}")
    print(f"{'plain pgvector, same index':<34}{'':>9}{'':>11}{p50(times['plain']):>9.2f}")
    print(f"\nguarded vector - exact numpy nDCG@10: {results['vector'][0] - exact[0]:+.4f} "
          "(target within 0.005)")
    print(f"guarded / plain p50: {p50(times['vector']) / p50(times['plain']):.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
