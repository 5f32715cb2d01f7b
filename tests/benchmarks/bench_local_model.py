"""Benchmark of the local model (a script, not a test): throughput at batch 32 and 128, and
SciFact nDCG@10 / Recall@10 by exact search, next to the published 0.645 for
all-MiniLM-L6-v2.

    .venv/bin/python tests/benchmarks/bench_local_model.py --threads 2
    .venv/bin/python tests/benchmarks/bench_local_model.py --limit 300   # a quick look

Documents are embedded as title + " " + text through pyembed's Embedder with
truncate=True, as an application would. With --limit N only the first N documents are
searched, and only the test queries with a relevant document among them count, so the
quality figures are not comparable with the published one.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import numpy.typing as npt

REPO = Path(__file__).resolve().parents[2]
PUBLISHED_NDCG10 = 0.645


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data" / "scifact",
                        help="SciFact in BEIR layout (default: ../shared/data/scifact from the "
                             "repository root)")
    parser.add_argument("--limit", type=int, help="use only the first N documents")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--sample", type=int, default=512,
                        help="documents timed at each of batch 32 and 128 (default 512)")
    parser.add_argument("--batch", type=int, default=32,
                        help="batch size for embedding the whole corpus (default 32)")
    args = parser.parse_args()
    os.environ["PYEMBED_LOCAL_THREADS"] = str(args.threads)

    from pyembed.embedder import Embedder
    from pyembed.models import LOCAL_DEFAULT, InputType
    from pyembed.providers.local import shared_model

    doc_ids, docs = load_corpus(args.data / "corpus.jsonl", args.limit)
    queries = load_queries(args.data / "queries.jsonl")
    qrels = load_qrels(args.data / "qrels" / "test.tsv", set(doc_ids))
    print(f"data: {args.data.resolve()}: {len(docs)} documents, {len(qrels)} test queries; "
          f"{args.threads} thread(s)", flush=True)

    started = time.perf_counter()
    shared_model().embed(docs[:8])
    print(f"model loaded and warmed up in {time.perf_counter() - started:.2f} s", flush=True)

    def embedder(batch: int) -> Embedder:
        return Embedder(dataclasses.replace(LOCAL_DEFAULT, max_batch=batch), truncate=True)

    sample = docs[:args.sample]
    for batch in (32, 128):
        started = time.perf_counter()
        embedder(batch).embed(sample)
        elapsed = time.perf_counter() - started
        print(f"throughput at batch {batch:>3}: {len(sample) / elapsed:6.1f} texts/s "
              f"({len(sample)} documents in {elapsed:.1f} s)", flush=True)

    started = time.perf_counter()
    full = embedder(args.batch)
    parts = []
    for start in range(0, len(docs), 512):
        parts.append(full.embed(docs[start:start + 512]))
        done = min(start + 512, len(docs))
        rate = done / (time.perf_counter() - started)
        print(f"  corpus: {done}/{len(docs)} documents, {rate:.1f} texts/s", flush=True)
    doc_vectors = np.concatenate(parts)
    corpus_seconds = time.perf_counter() - started

    query_ids = sorted(qrels, key=int)
    query_vectors = full.embed([queries[q] for q in query_ids], InputType.QUERY)
    ndcg, recall = evaluate(query_vectors, doc_vectors, query_ids, doc_ids, qrels)

    print()
    print(f"corpus embedded at batch {args.batch}: {len(docs)} documents in "
          f"{corpus_seconds / 60:.1f} min = {len(docs) / corpus_seconds:.1f} texts/s")
    print(f"SciFact test ({len(query_ids)} queries, exact search): nDCG@10 {ndcg:.4f}, "
          f"Recall@10 {recall:.4f}; published nDCG@10 for all-MiniLM-L6-v2: "
          f"{PUBLISHED_NDCG10}")
    if args.limit:
        print("(--limit was given: not comparable with the published figure)")


def load_corpus(path: Path, limit: int | None) -> tuple[list[str], list[str]]:
    ids: list[str] = []
    texts: list[str] = []
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if limit is not None and len(ids) >= limit:
                break
            doc = json.loads(line)
            ids.append(str(doc["_id"]))
            texts.append(f"{doc.get('title', '')} {doc['text']}".strip())
    return ids, texts


def load_queries(path: Path) -> dict[str, str]:
    with path.open(encoding="utf-8") as lines:
        return {str(q["_id"]): q["text"] for q in map(json.loads, lines)}


def load_qrels(path: Path, doc_ids: set[str]) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    with path.open(encoding="utf-8") as rows:
        for row in csv.DictReader(rows, delimiter="\t"):
            if row["corpus-id"] in doc_ids and int(row["score"]) > 0:
                qrels[row["query-id"]][row["corpus-id"]] = int(row["score"])
    return dict(qrels)


def evaluate(queries: npt.NDArray[np.float32], docs: npt.NDArray[np.float32],
             query_ids: list[str], doc_ids: list[str],
             qrels: dict[str, dict[str, int]], k: int = 10) -> tuple[float, float]:
    """Mean nDCG@k and Recall@k of exact inner-product search."""
    scores = queries @ docs.T
    ndcgs, recalls = [], []
    for row, query_id in enumerate(query_ids):
        top = np.argsort(-scores[row], kind="stable")[:k]
        relevant = qrels[query_id]
        gains = [relevant.get(doc_ids[i], 0) for i in top]
        dcg = sum((2 ** g - 1) / math.log2(rank + 2) for rank, g in enumerate(gains))
        ideal = sorted(relevant.values(), reverse=True)[:k]
        idcg = sum((2 ** g - 1) / math.log2(rank + 2) for rank, g in enumerate(ideal))
        ndcgs.append(dcg / idcg)
        recalls.append(sum(1 for g in gains if g > 0) / len(relevant))
    return float(np.mean(ndcgs)), float(np.mean(recalls))


if __name__ == "__main__":
    main()
