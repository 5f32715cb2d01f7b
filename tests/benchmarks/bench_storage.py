"""Search by storage (a script, not a test): one corpus of clustered unit vectors, its HNSW index
rebuilt in each storage (vector, halfvec, binary) with the parameters pyembed's rule chooses for
its size and dimensions, and searched through pyembed.search beside plain pgvector on the same
index with the same settings.

    .venv/bin/python tests/benchmarks/bench_storage.py --rows 20000              # a quick look
    .venv/bin/python tests/benchmarks/bench_storage.py --rows 100000             # guard's cost
    .venv/bin/python tests/benchmarks/bench_storage.py --rows 250000 --dims 1024
    .venv/bin/python tests/benchmarks/bench_suite.py --mode-1m --storage-only    # 1M x 384-d

For each storage, in one run: the online rebuild's time (pyembed.index.rebuild_index: CREATE
INDEX CONCURRENTLY with pyembed's build settings, then the swap), the index size, the HNSW
parameters, and per query, interleaved (each path first in turn), after a warm-up:
  pyembed  pyembed.search(corpus, q, key, 10, group_by => 'chunk') as the application role:
           guard, vector leg (pyembed._nearest), texts;
  plain    pgvector's own statement for that storage on the same partition and index, as the
           owner, with the same hnsw.ef_search, joined to the chunks for the texts: the
           expression ORDER BY ... LIMIT 10 (vector, halfvec), or pgvector's re-ranking query
           (binary: the Hamming index's k x oversample nearest, ORDER BY the exact distance
           LIMIT 10).
recall@10 is against exact numpy search over the float32 vectors; pyembed's exact variant
(pyembed._nearest(..., exact => true), a sequential scan) is checked against it on a few
queries. Runs in a fresh database of a local cluster in <repo>/.pyembed-bench-suite.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from pgvector import Vector
from psycopg import sql

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pyembed.corpora import CorpusInfo, create_corpus  # noqa: E402
from pyembed.index import STORAGES, index_status, rebuild_index, set_index_settings  # noqa: E402
from pyembed.text import sha256  # noqa: E402
from pyembed.vectors import copy_vectors, vector_partition  # noqa: E402
from tests.benchmarks.common import (  # noqa: E402
    F32,
    Target,
    app_connection,
    clustered_unit_vectors,
    connect,
    cpu_stolen,
    cpu_times,
    exact_top_k,
    load_average,
    local_database,
    percentiles_ms,
    print_environment,
    recall_at_k,
    scalar,
    unit_centres,
)

FOLDER = ".pyembed-bench-suite"
K = 10
CHUNKS_PER_DOCUMENT = 10
LOAD_BATCH = 50_000
WORDS = ("invoice", "region", "backup", "account", "billing", "export", "latency", "replica",
         "schema", "index", "quota", "token", "refund", "webhook", "cluster", "retention")


@dataclass
class Data:
    vectors: F32
    queries: F32
    truth: list[set[int]]

    @property
    def n(self) -> int:
        return len(self.vectors)


def make_data(rows: int, dims: int, queries: int, centres: int, noise: float, seed: int) -> Data:
    rng = np.random.default_rng(seed)
    c = unit_centres(rng, centres, dims)
    vectors = clustered_unit_vectors(rng, c, rows, noise)
    qs = clustered_unit_vectors(rng, c, queries, noise)
    return Data(vectors, qs, exact_top_k(vectors, qs, K))


def text(i: int) -> str:
    return (f"chunk {i}: a short note about {WORDS[i % 16]} {WORDS[(i // 16) % 16]} and "
            f"{WORDS[(i * 7) % 16]} for customer {i // CHUNKS_PER_DOCUMENT}")


def load(owner: psycopg.Connection[Any], app: psycopg.Connection[Any], data: Data, name: str,
         key: str) -> tuple[CorpusInfo, list[int]]:
    """A corpus of data.n chunks with their vectors, written as the application role (documents
    and chunks by INSERT ... SELECT FROM unnest, vectors by copy_vectors), LOAD_BATCH rows a
    transaction, with the HNSW index dropped during the load (built after, per storage)."""
    corpus = create_corpus(app, name, key)
    for r in owner.execute("SELECT * FROM pyembed._vector_indexes(%s)", (corpus.corpus_id,)):
        owner.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier("pyembed", r[0])))
    ids: list[int] = []
    for start in range(0, data.n, LOAD_BATCH):
        rows = range(start, min(start + LOAD_BATCH, data.n))
        docs = sorted({i // CHUNKS_PER_DOCUMENT for i in rows})
        with app.transaction(), app.cursor() as cur:
            cur.execute("INSERT INTO pyembed.documents (corpus_id, document_id, content_hash) "
                        "SELECT %s, 'd' || d, '\\x00' FROM unnest(%s::int[]) AS t(d)",
                        (corpus.corpus_id, docs))
            cur.execute(
                "INSERT INTO pyembed.chunks (corpus_id, document_id, chunk_index, content) "
                "SELECT %s, 'd' || (i / %s), i %% %s, c FROM unnest(%s::int[], %s::text[]) "
                "AS t(i, c) ORDER BY i RETURNING chunk_id",
                (corpus.corpus_id, CHUNKS_PER_DOCUMENT, CHUNKS_PER_DOCUMENT, list(rows),
                 [text(i) for i in rows]))
            batch = [r[0] for r in cur.fetchall()]
            copy_vectors(cur, corpus.corpus_id, batch, key, data.vectors[start:rows.stop],
                         [sha256(text(i)) for i in rows])
        ids += batch
        print(f"   loaded {rows.stop:,} rows", flush=True)
    for table in ("pyembed.vectors", "pyembed.chunks", "pyembed.documents"):
        owner.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(*table.split("."))))
    return corpus, ids


def plain_statement(corpus: CorpusInfo, key: str, dims: int, storage: str,
                    candidates: int) -> sql.Composed:
    """pgvector's own statement for the storage, on pyembed's partition and index."""
    if storage == "binary":
        inner = sql.SQL(
            "SELECT c.chunk_id, c.embedding <=> %(q)s AS distance FROM (SELECT v.chunk_id, "
            "v.embedding FROM {part} v WHERE v.model_key = {key} ORDER BY "
            "binary_quantize(v.embedding)::bit({dims}) <~> binary_quantize(%(q)s)::bit({dims}) "
            "LIMIT {cand}) c ORDER BY 2 LIMIT 10")
    else:
        inner = sql.SQL(
            "SELECT v.chunk_id, (v.embedding::{t}({dims})) <=> %(q)s::{t}({dims}) AS distance "
            "FROM {part} v WHERE v.model_key = {key} ORDER BY 2 LIMIT 10")
    t = "vector" if storage == "vector" and dims <= 2000 else "halfvec"
    return sql.SQL("SELECT hit.chunk_id, ch.content, 1 - hit.distance FROM ({inner}) hit "
                   "JOIN pyembed.chunks ch ON ch.corpus_id = {cid} AND ch.chunk_id = hit.chunk_id "
                   "ORDER BY hit.distance").format(
        inner=inner.format(part=vector_partition(corpus.corpus_id), key=sql.Literal(key),
                           dims=sql.SQL(str(dims)), cand=sql.SQL(str(candidates)),
                           t=sql.SQL(t)),
        cid=sql.Literal(corpus.corpus_id))


@dataclass
class StorageResult:
    storage: str
    build_s: float
    index_bytes: int
    m: int
    ef_construction: int
    ef_search: int
    oversample: int
    p50: dict[str, float]
    p99: dict[str, float]
    recall: dict[str, float]
    exact_ok: str


def measure(t: Target, owner: psycopg.Connection[Any], data: Data, corpus: CorpusInfo,
            ids: Sequence[int], key: str, dims: int, storage: str,
            args: argparse.Namespace) -> StorageResult:
    started = time.perf_counter()
    rebuild_index(owner, corpus.name, storage)
    build = time.perf_counter() - started
    owner.execute(sql.SQL("ANALYZE {}").format(vector_partition(corpus.corpus_id)))
    st = index_status(owner, corpus.name)[0]
    assert st.storage == storage, st
    print(f"   {storage}: rebuilt online in {build:.1f} s, m {st.m}, ef_construction "
          f"{st.ef_construction}, index {(st.index_bytes or 0) / 2**20:.1f} MiB", flush=True)
    result = search_paths(t, owner, data, corpus, ids, key, dims, storage, args, build)
    for ef in args.ef_sweep:  # the same index at other ef_search settings (owner overrides)
        set_index_settings(owner, corpus.name, ef_search=ef)
        search_paths(t, owner, data, corpus, ids, key, dims, storage, args, build)
    if args.ef_sweep:
        set_index_settings(owner, corpus.name, ef_search=None)
    return result


def search_paths(t: Target, owner: psycopg.Connection[Any], data: Data, corpus: CorpusInfo,
                 ids: Sequence[int], key: str, dims: int, storage: str,
                 args: argparse.Namespace, build: float) -> StorageResult:
    row_of_chunk = {c: i for i, c in enumerate(ids)}
    st = index_status(owner, corpus.name)[0]
    candidates = K * st.oversample if storage == "binary" else K
    ef = max(st.ef_search, candidates)
    print(f"   {storage}, ef_search {ef}" + (f", oversample {st.oversample}"
                                           if storage == "binary" else "") + ":", flush=True)
    app = app_connection(t, ef_search=None)
    plain_conn = connect(t.owner_dsn, ef_search=ef)
    try:
        plain_sql = plain_statement(corpus, key, dims, storage, candidates)
        guarded_sql = ("SELECT chunk_id, content, score FROM pyembed.search(%s, %s, %s, 10, "
                       "group_by => 'chunk')")  # the nearest chunks, as plain returns

        def guarded(q: Vector) -> list[int]:
            return [row_of_chunk[r[0]] for r in app.execute(guarded_sql, (corpus.name, q, key))]

        def plain(q: Vector) -> list[int]:
            return [row_of_chunk[r[0]] for r in plain_conn.execute(plain_sql, {"q": q})]

        plan = [r[0] for r in plain_conn.execute(sql.SQL("EXPLAIN (COSTS OFF) ") + plain_sql,
                                                  {"q": Vector(data.queries[0])})]
        if not any("Index Scan" in line for line in plan):
            print("   ! the plain statement does not use the index:\n     " + "\n     ".join(plan))
        qvecs = [Vector(q) for q in data.queries]
        # pyembed's exact variant on a few queries, against numpy.
        exact_hits = 0
        checked = min(5, len(qvecs))
        for i in range(checked):
            got = scalar(owner, "SELECT ids FROM pyembed._nearest(%s, %s, %s, 10, NULL, true)",
                         (corpus.corpus_id, key, qvecs[i]))
            exact_hits += {row_of_chunk[c] for c in got} == data.truth[i]
        runs: list[tuple[str, Callable[[Vector], list[int]]]] = [
            ("pyembed", guarded), ("plain", plain)]
        orders = list(itertools.permutations(runs))
        for q in qvecs[:20]:  # warm-up, untimed
            for _, fn in runs:
                fn(q)
        times: dict[str, list[float]] = defaultdict(list)
        recall: dict[str, list[float]] = defaultdict(list)
        for rnd in range(args.rounds):
            for i, q in enumerate(qvecs):
                for label, fn in orders[(i + rnd) % len(orders)]:
                    t0 = time.perf_counter()
                    found = fn(q)
                    times[label].append(time.perf_counter() - t0)
                    if rnd == 0:
                        recall[label].append(recall_at_k(data.truth[i], found, K))
        p50 = {k: percentiles_ms(v, (50,))[0] for k, v in times.items()}
        p99 = {k: percentiles_ms(v, (99,))[0] for k, v in times.items()}
        rec = {k: float(np.mean(v)) for k, v in recall.items()}
        for label in ("pyembed", "plain"):
            print(f"     {label:<8} p50 {p50[label]:7.2f} ms  p99 {p99[label]:7.2f} ms  "
                  f"recall@10 {rec[label]:.4f}", flush=True)
        print(f"     ratio of p50s pyembed/plain: {p50['pyembed'] / p50['plain']:.2f}; exact "
              f"variant = numpy top-10 on {exact_hits}/{checked} queries; {load_average()}",
              flush=True)
        return StorageResult(storage, build, st.index_bytes or 0, st.m or 0,
                             st.ef_construction or 0, ef, st.oversample, p50, p99, rec,
                             f"{exact_hits}/{checked}")
    finally:
        app.close()
        plain_conn.close()


def summary(results: list[StorageResult]) -> None:
    by = {r.storage: r for r in results}
    print("\n   storage  build s   index MiB  m  ef_c  ef_s  recall@10 pyembed/plain  "
          "p50 pyembed/plain ms  p99 pyembed/plain ms")
    for r in results:
        print(f"   {r.storage:<8} {r.build_s:7.1f}  {r.index_bytes / 2**20:9.1f}  {r.m:2d}  "
              f"{r.ef_construction:4d}  {r.ef_search:4d}  {r.recall['pyembed']:.4f}/"
              f"{r.recall['plain']:.4f}        {r.p50['pyembed']:6.2f}/{r.p50['plain']:6.2f}"
              f"        {r.p99['pyembed']:6.2f}/{r.p99['plain']:6.2f}")
    v = by.get("vector")
    if v:
        print(f"   vector: recall@10 {v.recall['pyembed']:.4f} (target >= 0.95), p50 pyembed/plain "
              f"{v.p50['pyembed'] / v.p50['plain']:.2f} (target <= 1.2; <= 1.1 at 100k)")
        for other, target in (("halfvec", "recall within 0.005 of vector, index <= 55%"),
                              ("binary", "recall >= 0.95, index <= 10%")):
            o = by.get(other)
            if o:
                gap = o.recall['pyembed'] - v.recall['pyembed']
                print(f"   {other}: recall@10 {o.recall['pyembed']:.4f} ({gap:+.4f} "
                      f"vs vector), index {100 * o.index_bytes / max(v.index_bytes, 1):.1f}% of "
                      f"vector's; p50 pyembed/plain {o.p50['pyembed'] / o.p50['plain']:.2f}  "
                      f"(target: {target})")


def run(t: Target, owner: psycopg.Connection[Any], data: Data, dims: int, key: str,
        args: argparse.Namespace) -> list[StorageResult]:
    print(f"\nsearch by storage: {data.n:,} unit {dims}-d vectors, {len(data.queries)} queries x "
          f"{args.rounds} rounds interleaved after a 20-query warm-up, k={K}; storages "
          f"{', '.join(args.storages)}", flush=True)
    app = app_connection(t, ef_search=None)
    try:
        started = time.perf_counter()
        corpus, ids = load(owner, app, data, f"storage-{dims}", key)
        print(f"   load (untimed for the comparison): {time.perf_counter() - started:.0f} s",
              flush=True)
    finally:
        app.close()
    results = []
    for storage in args.storages:
        results.append(measure(t, owner, data, corpus, ids, key, dims, storage, args))
        summary(results)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storages", type=lambda s: s.split(","), default=list(STORAGES),
                        help="comma-separated, in this order (default vector,halfvec,binary)")
    parser.add_argument("--ef-sweep", type=lambda s: [int(x) for x in s.split(",") if x],
                        default=[], help="also search each index at these ef_search values")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dims", type=int, default=384, choices=(384, 1024))
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--centres", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=20261125)
    parser.add_argument("--keep", action="store_true")
    add_arguments(parser)
    args = parser.parse_args()
    started, cpu = time.perf_counter(), cpu_times()
    data = make_data(args.rows, args.dims, args.queries, args.centres, args.noise, args.seed)
    print(f"data: {data.n:,} unit {args.dims}-d vectors around {args.centres:,} centres (noise "
          f"{args.noise}), seed {args.seed}, exact top-{K} in {time.perf_counter() - started:.0f} s")
    with local_database(FOLDER, prefix="storage", keep=args.keep) as target:
        owner = connect(target.owner_dsn, ef_search=None)
        try:
            print_environment(owner, ())
            run(target, owner, data, args.dims, f"fake/fake-hash@1:{args.dims}", args)
        finally:
            owner.close()
    print(f"total {time.perf_counter() - started:.0f} s; {cpu_stolen(cpu)}; at the end: "
          f"{load_average()}")


if __name__ == "__main__":
    main()
