"""Keyword search (BM25 in SQL) at 100k documents (a script, not a test): p50/p95 of
pyembed.search_keyword over SciFact's 300 test queries, on synthetic documents whose words are
drawn from SciFact's own word frequencies with SciFact's document lengths (so posting lists grow
as a real corpus's would), next to the same BM25 computed from scratch in one SQL statement
(numeric arithmetic, as before issue 22) to check the rankings are the same.

    .venv/bin/python tests/benchmarks/bench_keyword_scale.py              # 100k documents
    .venv/bin/python tests/benchmarks/bench_keyword_scale.py --documents 20000
    .venv/bin/python tests/benchmarks/bench_keyword_scale.py --reuse      # keep, then reuse
    .venv/bin/python tests/benchmarks/bench_keyword_scale.py --reuse --before keyword_before

The documents are written as the owner straight into pyembed.documents and pyembed.chunks
(one chunk each, no vectors: keyword search needs none), in statements of 5,000, so the keyword
index is built by its triggers as for any write. The database is thrown away afterwards, unless
--reuse: then it is kept (named by the document count), and a later --reuse run brings it to the
current schema and searches it as it is. --before NAME also searches a database of the same
cluster left at an earlier schema (a copy of the kept one, made with CREATE DATABASE NAME
TEMPLATE keyword_100000 before an upgrade) in the same round robin: its SQL functions are the
earlier code's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from tests.benchmarks.common import (
    Target,
    connect,
    load_average,
    local_database,
    percentiles_ms,
    print_environment,
)
from tests.benchmarks.scifact_data import DATA

FAKE_KEY = "fake/fake-hash@1:384"
# The statement pyembed._bm25 ran before issue 22 (numeric constants, heap reads), for rankings.
FROM_SCRATCH = """
WITH st AS (
  SELECT s.chunks::float8 AS n, s.total_len::float8 / greatest(s.chunks, 1) AS avgdl
    FROM pyembed.keyword_stats s WHERE s.corpus_id = %(c)s
), terms AS (
  SELECT l.lexeme, ln(1 + (st.n - l.df + 0.5) / (l.df + 0.5)) AS idf
    FROM (SELECT DISTINCT u.lexeme FROM unnest(to_tsvector('english', %(q)s)) u) q
    JOIN pyembed.lexeme_stats l ON l.corpus_id = %(c)s AND l.lexeme = q.lexeme, st
   WHERE l.df > 0
), scored AS (
  SELECT p.chunk_id,
         sum(t.idf * p.tf * 2.2 / (p.tf + 1.2 * (0.25 + 0.75 * p.doc_len / st.avgdl))) AS s
    FROM terms t, st,
         LATERAL (SELECT pp.chunk_id, pp.tf, pp.doc_len FROM pyembed.postings pp
                   WHERE pp.corpus_id = %(c)s AND pp.lexeme = t.lexeme OFFSET 0) p
   GROUP BY p.chunk_id
)
SELECT chunk_id, s FROM scored ORDER BY s DESC, chunk_id LIMIT 10"""


def synthetic_documents(data: Path, n: int, seed: int = 22) -> list[str]:
    words: Counter[str] = Counter()
    lengths = []
    with (data / "corpus.jsonl").open(encoding="utf-8") as lines:
        for line in lines:
            doc = json.loads(line)
            tokens = re.findall(r"\w+", f"{doc.get('title', '')} {doc['text']}".lower())
            words.update(tokens)
            lengths.append(len(tokens))
    vocab = np.array(list(words))
    p = np.array(list(words.values()), dtype=np.float64)
    p /= p.sum()
    rng = np.random.default_rng(seed)
    sizes = rng.choice(np.array(lengths), size=n)
    drawn = rng.choice(len(vocab), size=int(sizes.sum()), p=p)
    out, at = [], 0
    for size in sizes:
        out.append(" ".join(vocab[drawn[at:at + size]]) or "empty")
        at += size
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the database and search it again in later --reuse runs")
    parser.add_argument("--before", metavar="NAME",
                        help="also search this database (a copy left at an earlier schema)")
    args = parser.parse_args()

    from tests.benchmarks.bench_local_model import load_qrels, load_queries

    queries = load_queries(args.data / "queries.jsonl")
    test = sorted(load_qrels(args.data / "qrels" / "test.tsv",
                             {json.loads(line)["_id"] for line in
                              (args.data / "corpus.jsonl").open(encoding="utf-8")}), key=int)
    with local_database(".pyembed-bench-keyword", keep=args.keep,
                        name=f"keyword_{args.documents}" if args.reuse else None) as target:
        owner = connect(target.owner_dsn)
        print_environment(owner)
        corpus_id = owner.execute("SELECT corpus_id FROM pyembed.corpora WHERE name = "
                                  "'synthetic'").fetchone()
        if corpus_id is None:
            write(owner, synthetic_documents(args.data, args.documents))
            corpus_id = owner.execute("SELECT corpus_id FROM pyembed.corpora WHERE name = "
                                      "'synthetic'").fetchone()
        else:
            print(f"searching the kept corpus of {target.description}")
        assert corpus_id is not None
        postings = owner.execute("SELECT count(*) FROM pyembed.postings").fetchone()[0]  # type: ignore[index]
        print(f"{args.documents:,} documents, {postings:,} postings; "
              f"{len(test)} SciFact test queries")
        search_and_compare(target, owner, corpus_id[0], [queries[q] for q in test], args.before)


def write(owner: psycopg.Connection[Any], texts: list[str]) -> None:
    """The synthetic corpus, written as the owner in statements of 5,000 documents."""
    owner.execute("SELECT pyembed.create_corpus('synthetic', %s, '', 100000, 0)", (FAKE_KEY,))
    corpus_id = owner.execute("SELECT corpus_id FROM pyembed.corpora WHERE name = "
                              "'synthetic'").fetchone()[0]  # type: ignore[index]
    started = time.perf_counter()
    for i in range(0, len(texts), 5000):
        batch = texts[i:i + 5000]
        ids = [f"s{j}" for j in range(i, i + len(batch))]
        hashes = [hashlib.sha256(t.encode()).digest() for t in batch]
        with owner.transaction():
            owner.execute("INSERT INTO pyembed.documents (corpus_id, document_id, "
                          "content_hash) SELECT %s, unnest(%s::text[]), unnest(%s::bytea[])",
                          (corpus_id, ids, hashes))
            owner.execute("INSERT INTO pyembed.chunks (corpus_id, document_id, chunk_index, "
                          "content, content_hash) SELECT %s, d, 0, t, h FROM "
                          "unnest(%s::text[], %s::text[], %s::bytea[]) AS u(d, t, h)",
                          (corpus_id, ids, batch, hashes))
        print(f"\r  {i + len(batch):,} documents written", end="", flush=True)
    print(f"\nwritten in {time.perf_counter() - started:.0f} s")
    owner.execute("VACUUM ANALYZE")


def search_and_compare(target: Target, owner: psycopg.Connection[Any], corpus_id: int,
                       queries: list[str], before: str | None = None) -> None:
    """Each query through pyembed.search (and in the `before` database), then the from-scratch
    statement; their figures."""
    from pyembed.search import search
    from tests.benchmarks.common import in_database

    app = connect(target.app_dsn) if target.app_dsn else connect(target.owner_dsn,
                                                                 as_app_role=True)
    earlier = None
    if before:
        earlier = (connect(in_database(target.app_dsn, before)) if target.app_dsn
                   else connect(in_database(target.owner_dsn, before), as_app_role=True))
    new_times, old_times, before_times, same, same_before, worst = [], [], [], 0, 0, 0.0
    for text in queries:  # alternately: the load weighs on all alike
        t0 = time.perf_counter()
        hits = search(app, "synthetic", None, None, 10, mode="keyword", text=text)
        new_times.append(time.perf_counter() - t0)
        if earlier is not None:
            t0 = time.perf_counter()
            hits_before = search(earlier, "synthetic", None, None, 10, mode="keyword",
                                 text=text)
            before_times.append(time.perf_counter() - t0)
            same_before += [h.chunk_id for h in hits] == [h.chunk_id for h in hits_before]
        t0 = time.perf_counter()
        old = owner.execute(FROM_SCRATCH, {"c": corpus_id, "q": text}).fetchall()
        old_times.append(time.perf_counter() - t0)
        same += [h.chunk_id for h in hits] == [r[0] for r in old]
        worst = max([worst] + [abs(h.score - float(r[1])) for h, r in zip(hits, old,
                                                                           strict=False)])
    n50, n95 = percentiles_ms(new_times, (50, 95))
    o50, o95 = percentiles_ms(old_times, (50, 95))
    print(f"\nkeyword search (pyembed.search_keyword, k 10, app role): p50 {n50:.2f} ms, "
          f"p95 {n95:.2f} ms (target p50 <= 20 ms at 100k documents)")
    print(f"BM25 as before issue 22 (one statement, numeric arithmetic): p50 {o50:.2f} ms, "
          f"p95 {o95:.2f} ms; ratio of p50s {n50 / o50:.2f}; {load_average()}")
    print(f"same top 10 for {same}/{len(queries)} queries; largest score difference {worst:.2e}")
    if before_times:
        b50, b95 = percentiles_ms(before_times, (50, 95))
        print(f"in database {before} (its own SQL functions): p50 {b50:.2f} ms, p95 {b95:.2f} "
              f"ms, ratio of p50s to the from-scratch statement {b50 / o50:.2f}; same top 10 "
              f"as above for {same_before}/{len(queries)} queries")


if __name__ == "__main__":
    main()
