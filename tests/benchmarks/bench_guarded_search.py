"""Benchmark of the guard's cost (a script, not a test): bulk load, HNSW build and search
through pyembed's guarded path next to plain pgvector, on the same vectors and server.

    .venv/bin/python tests/benchmarks/bench_guarded_search.py --n 20000   # a quick look
    .venv/bin/python tests/benchmarks/bench_guarded_search.py             # 100,000 vectors
    .venv/bin/python tests/benchmarks/bench_guarded_search.py --dsn postgresql://owner@host/db

Data: N random unit 384-d float32 vectors around 1,000 Gaussian centres (so that
neighbours are meaningful and HNSW recall is not trivially 1), and 200 queries from the
same distribution; fixed seed.

Load: both tables are loaded without an HNSW index, by binary COPY from Python.
Guarded: `pyembed.vectors.copy_vectors` into pyembed.vectors as the application role, with
the guard trigger, the per-row dimensions CHECK, the foreign key to chunks and the work
queue's dequeue trigger (documents and chunks are loaded first, untimed). Plain: a table
bench_plain(id bigint primary key, embedding vector(384)) loaded as pgvector-python shows.
Then the same HNSW index (m=16, ef_construction=64, cosine) is built on each.

Search: per query, `pyembed.search(corpus, vector, key, 10)` on an application-role
connection and `ORDER BY embedding <=> q LIMIT 10` on an owner connection, interleaved
(alternating which goes first), 3 rounds after an untimed warm-up; connections never
prepare statements (prepare_threshold=None). Recall@10 is against exact numpy search.

Without --dsn the benchmark runs in a fresh database of a local cluster in
<repo>/.pyembed-bench (created on first use, stopped at the end if this run started it).
"""

from __future__ import annotations

import argparse
import time
import uuid

import numpy as np
import numpy.typing as npt
import psycopg
from pgvector import Vector
from psycopg import sql

from tests.benchmarks.common import (
    Target,
    checkpoint,
    clustered_unit_vectors,
    connect,
    exact_top_k,
    given_database,
    index_line,
    local_database,
    percentiles,
    print_environment,
    scalar,
)

KEY = "fake/fake-hash@1:384"
DIMS = 384
CHUNKS_PER_DOCUMENT = 10
K = 10

F32 = npt.NDArray[np.float32]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="owner DSN of a database to use (default: a fresh database "
                                      "in the local benchmark cluster)")
    parser.add_argument("--app-dsn", help="application-role DSN for the guarded search (with "
                                          "--dsn; default: the owner connection with SET ROLE "
                                          "pyembed_app)")
    parser.add_argument("--n", type=int, default=100_000, help="vectors (default 100,000)")
    parser.add_argument("--queries", type=int, default=200, help="queries (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="timed search rounds (default 3)")
    parser.add_argument("--centres", type=int, default=1000, help="Gaussian centres (1,000)")
    parser.add_argument("--noise", type=float, default=1.5,
                        help="noise norm around a unit centre (default 1.5)")
    parser.add_argument("--seed", type=int, default=20261125)
    parser.add_argument("--keep", action="store_true", help="keep the database and its tables")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.centres, DIMS), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors = clustered_unit_vectors(rng, centres, args.n, args.noise)
    queries = clustered_unit_vectors(rng, centres, args.queries, args.noise)
    truth = exact_top_k(vectors, queries, K)

    target = (given_database(args.dsn, args.app_dsn) if args.dsn
              else local_database(".pyembed-bench", keep=args.keep))
    with target as t:
        run(t, args, vectors, queries, truth)


def run(t: Target, args: argparse.Namespace, vectors: F32, queries: F32,
        truth: list[set[int]]) -> None:
    from pyembed.corpora import create_corpus, drop_corpus
    from pyembed.text import sha256
    from pyembed.vectors import copy_vectors

    n = len(vectors)
    owner = connect(t.owner_dsn)
    app = connect(t.app_dsn) if t.app_dsn else connect(t.owner_dsn, as_app_role=True)
    corpus_name = f"bench-{uuid.uuid4().hex[:8]}"
    # Qualified: the owner's "$user" schema may be pyembed itself (an owner role named pyembed).
    plain = sql.Identifier("public", "bench_plain")
    try:
        print_environment(owner)
        print(f"database: {t.description}; application role: "
              f"{scalar(app, 'SELECT current_user')}")
        print(f"data: {n:,} unit {DIMS}-d float32 vectors around {args.centres:,} centres "
              f"(noise norm {args.noise}), {len(queries)} queries, seed {args.seed}; "
              f"model key {KEY}")
        print()

        # -- guarded: corpus, documents and chunks (untimed), index dropped before the load --
        corpus = create_corpus(app, corpus_name, KEY)
        index_names = [r[0] for r in owner.execute("SELECT pyembed._vector_indexes(%s)",
                                                   (corpus.corpus_id,))]
        for name in index_names:
            owner.execute(sql.SQL("DROP INDEX pyembed.{}").format(sql.Identifier(name)))
        documents = (n + CHUNKS_PER_DOCUMENT - 1) // CHUNKS_PER_DOCUMENT
        contents = [f"chunk {i} of the benchmark corpus" for i in range(n)]
        started = time.perf_counter()
        # Row-level security (tenants) refuses COPY into these tables: one INSERT each.
        with app.transaction():
            app.execute("INSERT INTO pyembed.documents (corpus_id, document_id, content_hash) "
                        "SELECT %s, d, sha256(convert_to(d, 'UTF8')) FROM unnest(%s::text[]) d",
                        (corpus.corpus_id, [f"d{d}" for d in range(documents)]))
            app.execute("INSERT INTO pyembed.chunks (corpus_id, document_id, chunk_index, content) "
                        "SELECT %s, d, i, c FROM unnest(%s::text[], %s::int[], %s::text[]) "
                        "AS t(d, i, c)",
                        (corpus.corpus_id, [f"d{i // CHUNKS_PER_DOCUMENT}" for i in range(n)],
                         [i % CHUNKS_PER_DOCUMENT for i in range(n)], contents))
        chunk_of = np.empty(n, dtype=np.int64)
        for chunk_id, document_id, chunk_index in app.execute(
                "SELECT chunk_id, document_id, chunk_index FROM pyembed.chunks "
                "WHERE corpus_id = %s", (corpus.corpus_id,)):
            chunk_of[int(document_id[1:]) * CHUNKS_PER_DOCUMENT + chunk_index] = chunk_id
        row_of_chunk = {int(c): i for i, c in enumerate(chunk_of)}
        queued = scalar(app, "SELECT count(*) FROM pyembed.queue WHERE corpus_id = %s",
                         (corpus.corpus_id,))
        print(f"setup (untimed): {documents:,} documents and {n:,} chunks by COPY in "
              f"{time.perf_counter() - started:.1f} s; {queued:,} chunks queued for embedding; "
              f"dropped index {', '.join(index_names) or '(none)'}")
        hashes = [sha256(text) for text in contents]

        # -- loads, both without an HNSW index --
        checkpoint(owner)
        started = time.perf_counter()
        with app.transaction(), app.cursor() as cur:
            copy_vectors(cur, corpus.corpus_id, [int(c) for c in chunk_of], KEY,
                               vectors, hashes)
        guarded_load = time.perf_counter() - started
        still_queued = scalar(app, "SELECT count(*) FROM pyembed.queue WHERE corpus_id = %s",
                               (corpus.corpus_id,))

        owner.execute(sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, embedding vector({}))")
                      .format(plain, sql.Literal(DIMS)))
        checkpoint(owner)
        started = time.perf_counter()
        with owner.transaction(), owner.cursor() as cur, cur.copy(
                sql.SQL("COPY {} (id, embedding) FROM STDIN WITH (FORMAT BINARY)")
                .format(plain)) as copy:
            copy.set_types(["int8", "vector"])
            for i, vec in enumerate(vectors):
                copy.write_row((i, vec))
        plain_load = time.perf_counter() - started

        print("\nbulk load (binary COPY, no HNSW index, one transaction):")
        print(f"  guarded  copy_vectors -> pyembed.vectors: {n / guarded_load:9,.0f} rows/s "
              f"({guarded_load:.2f} s; queue left for the corpus: {still_queued})")
        print(f"  plain    pgvector COPY      -> bench_plain:     {n / plain_load:9,.0f} rows/s "
              f"({plain_load:.2f} s)")
        print(f"  ratio guarded/plain rows/s: {plain_load / guarded_load:.2f}")

        # -- HNSW builds (m=16, ef_construction=64, cosine) --
        started = time.perf_counter()
        index = scalar(owner, "SELECT pyembed._create_vector_index(%s, %s)",
                        (corpus.corpus_id, KEY))
        guarded_build = time.perf_counter() - started
        started = time.perf_counter()
        owner.execute(sql.SQL("CREATE INDEX bench_plain_hnsw ON {} USING hnsw "
                              "(embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)")
                      .format(plain))
        plain_build = time.perf_counter() - started
        owner.execute("ANALYZE pyembed.vectors")
        owner.execute(sql.SQL("ANALYZE {}").format(plain))
        guarded_size = scalar(owner, "SELECT pg_relation_size(%s::regclass)",
                               (f"pyembed.{index}",))
        plain_size = scalar(owner,
                             "SELECT pg_relation_size('public.bench_plain_hnsw'::regclass)")
        print("\nHNSW build (m=16, ef_construction=64, cosine):")
        print(f"  guarded  {index}: {guarded_build:7.1f} s, {guarded_size / 2**20:6.1f} MiB "
              "(partial index on corpus and model key, expression embedding::vector(384))")
        print(f"  plain    bench_plain_hnsw:          {plain_build:7.1f} s, "
              f"{plain_size / 2**20:6.1f} MiB")
        print(f"  ratio guarded/plain build time: {guarded_build / plain_build:.2f}")

        # -- plans: both must use their HNSW index --
        q0 = Vector(queries[0])
        guarded_plan = [r[0] for r in owner.execute(
            sql.SQL("EXPLAIN (COSTS OFF) SELECT v.chunk_id FROM pyembed.vectors v "
                    "WHERE v.corpus_id = {} AND v.model_key = {} "
                    "ORDER BY (v.embedding::vector(384)) <=> %s::vector(384) LIMIT 10")
            .format(sql.Literal(corpus.corpus_id), sql.Literal(KEY)), (q0,))]
        plain_plan = [r[0] for r in owner.execute(
            sql.SQL("EXPLAIN (COSTS OFF) SELECT id FROM {} ORDER BY embedding <=> %s LIMIT 10")
            .format(plain), (q0,))]
        print(f"\nplans: guarded inner query: {index_line(guarded_plan)}; "
              f"plain: {index_line(plain_plan)}")

        # -- search, interleaved --
        guarded_sql = "SELECT chunk_id FROM pyembed.search(%s, %s, %s, 10)"
        plain_sql = sql.SQL("SELECT id FROM {} ORDER BY embedding <=> %s LIMIT 10").format(plain)

        def guarded(q: Vector) -> list[int]:
            return [row_of_chunk[r[0]] for r in app.execute(guarded_sql, (corpus_name, q, KEY))]

        def plain_search(q: Vector) -> list[int]:
            return [int(r[0]) for r in owner.execute(plain_sql, (q,))]

        qvecs = [Vector(q) for q in queries]
        for q in qvecs[:20]:  # warm-up, untimed
            guarded(q)
            plain_search(q)
        times: dict[str, list[float]] = {"guarded": [], "plain": []}
        recall: dict[str, list[float]] = {"guarded": [], "plain": []}
        runs = (("guarded", guarded), ("plain", plain_search))
        for rnd in range(args.rounds):
            for i, q in enumerate(qvecs):
                order = runs if (i + rnd) % 2 == 0 else runs[::-1]
                for label, fn in order:
                    started = time.perf_counter()
                    ids = fn(q)
                    times[label].append(time.perf_counter() - started)
                    recall[label].append(len(truth[i] & set(ids)) / K)
        print(f"\nsearch, k={K}, {len(qvecs)} queries x {args.rounds} rounds, interleaved "
              f"(after a {min(20, len(qvecs))}-query warm-up), ms:")
        p50s = {}
        for label, _ in runs:
            p50, p95, p99 = percentiles(times[label])
            p50s[label] = p50
            what = ("pyembed.search(...) as the app role" if label == "guarded"
                    else "ORDER BY embedding <=> q LIMIT 10 as the owner")
            print(f"  {label:<8} p50 {p50:6.2f}  p95 {p95:6.2f}  p99 {p99:6.2f}   "
                  f"recall@10 {np.mean(recall[label]):.4f}   ({what})")
        print(f"  ratio of p50s guarded/plain: {p50s['guarded'] / p50s['plain']:.2f}")
    finally:
        if not args.keep and not t.fresh:
            try:
                drop_corpus(app, corpus_name)
                owner.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(plain))
            except psycopg.Error as exc:
                print(f"cleanup failed: {exc}")
        app.close()
        owner.close()


if __name__ == "__main__":
    main()
