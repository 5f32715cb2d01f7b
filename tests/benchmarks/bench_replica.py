"""Searches on a hot standby next to the primary, and the standby's lag under a bulk load
(issue 20's benchmark; a script, not a test).

    .venv/bin/python tests/benchmarks/bench_replica.py                 # 100,000 vectors, minutes
    .venv/bin/python tests/benchmarks/bench_replica.py --vectors 20000 --seconds 3  # a quick look

Everything runs in a fresh local cluster in a temporary folder (the replica, the cluster and
the folder are removed at the end, also after an error):

  setup (untimed, but its figures printed): `pyembed install`; a corpus pinned to
    fake/fake-hash@1:384; --vectors stored chunks (10 per document, short texts) INSERTed as
    the application role, their unit vectors (384-d by default, around Gaussian centres, fixed
    seed) loaded with `pyembed.bulk_load.load_vectors` (batches of 5,000 rows over two
    connections) with the corpus's HNSW index dropped and built again afterwards with
    `pyembed._create_vector_index`, as tests/benchmarks/bench_suite.py does; ANALYZE. Then a
    hot standby is made with `LocalCluster.add_replica` (pg_basebackup -R, streaming on
    loopback, same machine, same settings) and waited for until it has replayed the primary.
  1. search latency: `Corpus.search(vector, k=10, model_key=...)` (the guarded
    pyembed.search, vector mode, --queries precomputed query vectors, the same on both) through
    `pyembed.connect(dsn)` (primary) and `pyembed.connect(dsn, read_dsn=standby)` (searches
    on the standby), query by query interleaved, alternating which goes first, for --rounds
    rounds after an untimed warm-up pass. Printed: p50/p95 of each, and the standby/primary
    ratio of the p50s (and p95s) per round, then their median. Each search also writes its line
    of pyembed.query_log on the primary, as with the README's client (--no-query-log: off).
  2. throughput: --threads threads, each with a client of its own, searching the same queries
    in a loop for --seconds; primary and standby phases alternate (which goes first
    alternating) for --rounds rounds. Printed: searches/s of each (median of the rounds) and
    the median of the per-round standby/primary ratios.
  3. lag under a bulk load: another --vectors stored chunks in a second corpus (index dropped
    like the first load's, unless --load-with-index; chunks INSERTed untimed, then the standby
    waited for), then their vectors loaded through `load_vectors` on the primary while
    `LocalCluster.replica_lag` is sampled every --sample seconds (bytes of WAL the standby has
    not replayed, and for how long (0 once it has replayed all); beside it
    pg_stat_replication's replay_lag, the primary's view). Printed: max and p50 of each over
    the load, the load's rows/s, the WAL it wrote, and how long the standby took to replay
    the rest after the load's last commit.

Primary, standby and this client share the machine's cores: on a small machine the figures
show what a standby on the same host gives, not a second server's capacity.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import pyembed  # noqa: E402
from pyembed.bulk_load import LoadReport, load_vectors  # noqa: E402
from pyembed.localdb import LocalCluster  # noqa: E402
from pyembed.schema import install  # noqa: E402
from pyembed.text import sha256  # noqa: E402
from tests.benchmarks.common import (  # noqa: E402
    F32,
    clustered_unit_vectors,
    connect,
    cpu_stolen,
    cpu_times,
    load_average,
    percentiles_ms,
    print_environment,
    scalar,
    unit_centres,
)

CHUNKS_PER_DOCUMENT = 10
K = 10
REPLICA = "bench"
WORDS = ("invoice", "region", "backup", "account", "billing", "export", "latency", "replica",
         "schema", "index", "quota", "token", "refund", "webhook", "cluster", "retention")


# -- setup -------------------------------------------------------------------------------------

def texts_for(n: int, tag: str) -> list[str]:
    return [f"{tag} chunk {i}: a short note about {WORDS[i % 16]} {WORDS[(i // 16) % 16]} for "
            f"customer {i // CHUNKS_PER_DOCUMENT}" for i in range(n)]


def store_chunks(owner_dsn: str, app_dsn: str, name: str, model_key: str, texts: list[str],
                 drop_index: bool) -> tuple[int, list[int], list[str]]:
    """A corpus with these texts as stored chunks (10 per document), INSERTed as the
    application role, its HNSW index dropped when asked; returns its id, the chunk ids in
    text order and the indexes dropped."""
    with pyembed.connect(app_dsn) as client:
        corpus_id = client.create_corpus(name, model_key).info.corpus_id
    dropped: list[str] = []
    with connect(app_dsn, ef_search=None) as app:
        if drop_index:
            with connect(owner_dsn, ef_search=None) as owner:
                dropped = [r[0] for r in owner.execute("SELECT pyembed._vector_indexes(%s)",
                                                       (corpus_id,))]
                for index in dropped:
                    owner.execute(sql.SQL("DROP INDEX pyembed.{}").format(sql.Identifier(index)))
        n = len(texts)
        documents = [f"d{d}" for d in range((n + CHUNKS_PER_DOCUMENT - 1) // CHUNKS_PER_DOCUMENT)]
        # Row-level security refuses COPY into these tables: one INSERT ... unnest each.
        with app.transaction():
            app.execute("INSERT INTO pyembed.documents (corpus_id, document_id, content_hash) "
                        "SELECT %s, d, sha256(convert_to(d, 'UTF8')) FROM unnest(%s::text[]) d",
                        (corpus_id, documents))
            rows = app.execute(
                "INSERT INTO pyembed.chunks (corpus_id, document_id, chunk_index, content) "
                "SELECT %s, d, i, c FROM unnest(%s::text[], %s::int[], %s::text[]) AS t(d, i, c) "
                "RETURNING chunk_id, document_id, chunk_index",
                (corpus_id, [f"d{i // CHUNKS_PER_DOCUMENT}" for i in range(n)],
                 [i % CHUNKS_PER_DOCUMENT for i in range(n)], texts)).fetchall()
    where = {(d, i): c for c, d, i in rows}
    return corpus_id, [where[f"d{i // CHUNKS_PER_DOCUMENT}", i % CHUNKS_PER_DOCUMENT]
                       for i in range(len(texts))], dropped


def wait_replayed(owner: psycopg.Connection[Any], standby_owner_dsn: str,
                  timeout: float = 600.0) -> float:
    """Seconds until the standby has replayed what the primary had written at this call."""
    lsn = scalar(owner, "SELECT pg_current_wal_lsn()::text")
    started = time.perf_counter()
    with psycopg.connect(standby_owner_dsn, autocommit=True) as standby:
        while True:
            if scalar(standby, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)):
                return time.perf_counter() - started
            if time.perf_counter() - started > timeout:
                raise RuntimeError(f"the standby did not replay {lsn} in {timeout:.0f} s")
            time.sleep(0.02)


# -- 1. latency ----------------------------------------------------------------------------------

def latency(clients: dict[str, pyembed.Client], name: str, key: str, queries: F32,
            rounds: int) -> None:
    corpora = {label: c.corpus(name) for label, c in clients.items()}
    labels = list(corpora)
    same = 0
    for q in queries:  # warm-up pass, untimed; both must find the same chunks
        found = [[h.chunk_id for h in corpora[label].search(q, k=K, model_key=key)]
                 for label in labels]
        same += found[0] == found[1] and len(found[0]) == K
    times: dict[str, list[list[float]]] = {label: [] for label in labels}
    for rnd in range(rounds):
        for label in labels:
            times[label].append([])
        for i, q in enumerate(queries):
            order = labels if (i + rnd) % 2 == 0 else labels[::-1]
            for label in order:
                started = time.perf_counter()
                corpora[label].search(q, k=K, model_key=key)
                times[label][rnd].append(time.perf_counter() - started)
    print(f"\n1. search latency: Corpus.search(vector, k={K}, model_key=...), {len(queries)} "
          f"queries x {rounds} rounds, interleaved, after an untimed warm-up pass; ms")
    print(f"   the same {K} chunks on both for {same} of {len(queries)} queries")
    for label in labels:
        p50, p95, p99 = percentiles_ms([t for r in times[label] for t in r])
        per_round = ", ".join(f"{percentiles_ms(r, (50,))[0]:.2f}" for r in times[label])
        print(f"   {label:<8} p50 {p50:6.2f}  p95 {p95:6.2f}  p99 {p99:6.2f}   "
              f"(p50 per round: {per_round})")
    for q, what in ((50, "p50"), (95, "p95")):
        ratios = [percentiles_ms(s, (q,))[0] / percentiles_ms(p, (q,))[0]
                  for s, p in zip(times["standby"], times["primary"], strict=True)]
        print(f"   ratio standby/primary {what}: median {statistics.median(ratios):.2f} "
              f"(per round: {', '.join(f'{r:.2f}' for r in ratios)})")


# -- 2. throughput -------------------------------------------------------------------------------

def throughput_phase(corpora: list[pyembed.Corpus], key: str, queries: F32,
                     seconds: float) -> float:
    """Searches a second over all threads, each searching with its own client for `seconds`."""
    counts = [0] * len(corpora)
    errors: list[BaseException] = []
    start = threading.Barrier(len(corpora) + 1)
    stop = threading.Event()

    def run(n: int) -> None:
        corpus = corpora[n]
        i = n * len(queries) // len(corpora)
        start.wait()
        try:
            while not stop.is_set():
                corpus.search(queries[i % len(queries)], k=K, model_key=key)
                counts[n] += 1
                i += 1
        except BaseException as exc:  # reported after the phase
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(corpora))]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise errors[0]
    return sum(counts) / elapsed


def throughput(makers: dict[str, Callable[[], pyembed.Client]], name: str, key: str,
               queries: F32, threads: int, seconds: float, rounds: int) -> None:
    clients = {label: [make() for _ in range(threads)] for label, make in makers.items()}
    try:
        corpora = {label: [c.corpus(name) for c in cs] for label, cs in clients.items()}
        labels = list(corpora)
        for label in labels:  # warm-up, untimed
            throughput_phase(corpora[label], key, queries, min(2.0, seconds))
        rates: dict[str, list[float]] = {label: [] for label in labels}
        for rnd in range(rounds):
            for label in labels if rnd % 2 == 0 else labels[::-1]:
                rates[label].append(throughput_phase(corpora[label], key, queries, seconds))
    finally:
        for cs in clients.values():
            for c in cs:
                c.close()
    print(f"\n2. throughput: {threads} threads, each with its own client, {seconds:g} s per "
          f"phase, primary and standby phases alternating, {rounds} rounds (after a warm-up "
          f"phase each); searches/s")
    for label in labels:
        print(f"   {label:<8} median {statistics.median(rates[label]):8,.1f}   "
              f"(per round: {', '.join(f'{r:,.1f}' for r in rates[label])})")
    ratios = [s / p for s, p in zip(rates["standby"], rates["primary"], strict=True)]
    print(f"   ratio standby/primary searches/s: median {statistics.median(ratios):.2f} "
          f"(per round: {', '.join(f'{r:.2f}' for r in ratios)})")


# -- 3. lag under a bulk load --------------------------------------------------------------------

def lag_under_load(cluster: LocalCluster, owner: psycopg.Connection[Any], app_dsn: str,
                   standby_owner_dsn: str, key: str, vectors: F32,
                   args: argparse.Namespace) -> None:
    texts = texts_for(len(vectors), "load")
    started = time.perf_counter()
    corpus_id, chunk_ids, dropped = store_chunks(cluster.dsn(owner=True), app_dsn, "load", key,
                                                 texts,
                                                 drop_index=not args.load_with_index)
    stored = time.perf_counter() - started
    caught_up = wait_replayed(owner, standby_owner_dsn)
    hashes: list[bytes | None] = [sha256(t) for t in texts]
    samples: list[tuple[float, int, float | None, float | None]] = []
    sampler_errors: list[BaseException] = []
    stop = threading.Event()
    began = time.perf_counter()

    def sample() -> None:
        with psycopg.connect(cluster.dsn(owner=True), autocommit=True) as primary:
            while not stop.is_set():
                t = time.perf_counter() - began
                try:
                    lag = cluster.replica_lag(REPLICA)
                    row = primary.execute(
                        "SELECT extract(epoch FROM replay_lag)::float8 FROM "
                        "pg_stat_replication WHERE application_name = %s",
                        (REPLICA,)).fetchone()
                except BaseException as exc:  # reported after the load
                    sampler_errors.append(exc)
                    return
                behind, since = lag["bytes_behind"], lag["seconds_behind"]
                assert isinstance(behind, int) and (since is None or isinstance(since, float))
                samples.append((t, behind, since, row[0] if row else None))
                stop.wait(max(0.0, args.sample - (time.perf_counter() - began - t)))

    sampler = threading.Thread(target=sample)
    wal_before = scalar(owner, "SELECT pg_current_wal_lsn()::text")
    sampler.start()
    try:
        report: LoadReport = load_vectors("load", chunk_ids, key, vectors, hashes, dsn=app_dsn)
        load_end = time.perf_counter() - began
        wal_after = scalar(owner, "SELECT pg_current_wal_lsn()::text")
        replay = wait_replayed(owner, standby_owner_dsn)
        time.sleep(args.sample)  # a sample after the catch-up
    finally:
        stop.set()
        sampler.join()
    if sampler_errors:
        raise sampler_errors[0]
    wal = scalar(owner, "SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)::bigint",
                 (wal_after, wal_before))
    during = [s for s in samples if s[0] <= load_end]
    print(f"\n3. replica lag during a bulk load on the primary: load_vectors of {report.rows:,} "
          f"vectors into a second corpus (c{corpus_id}; "
          f"{'its HNSW index dropped' if dropped else 'with its HNSW index'}; "
          f"{report.batches} batches of 5,000 over 2 connections; its {len(texts):,} chunks "
          f"stored before, untimed, in {stored:.1f} s, the standby caught up in "
          f"{caught_up:.1f} s before the load)")
    print(f"   load: {report.rows_per_second:,.0f} rows/s ({report.seconds:.1f} s); "
          f"WAL written {wal / 2**20:,.0f} MiB ({wal / 2**20 / report.seconds:,.1f} MiB/s)")
    if not during:
        print("   no lag sample was taken during the load (it was shorter than one interval)")
    else:
        behind = [s[1] for s in during]
        since = [s[2] for s in during if s[2] is not None]
        replay_lag = [s[3] for s in during if s[3] is not None]
        print(f"   {len(during)} samples every {args.sample:g} s during the load:")
        print(f"   bytes behind (LocalCluster.replica_lag): max {max(behind) / 2**20:,.1f} MiB, "
              f"p50 {statistics.median(behind) / 2**20:,.1f} MiB")
        if since:
            print(f"   seconds behind (replica_lag): max "
                  f"{max(since):.2f} s, p50 {statistics.median(since):.2f} s")
        if replay_lag:
            print(f"   pg_stat_replication replay_lag (primary's view): max "
                  f"{max(replay_lag):.2f} s, p50 {statistics.median(replay_lag):.2f} s")
    print(f"   after the load's last commit the standby replayed the rest in {replay:.2f} s")


# -- main ----------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=int, default=100_000,
                        help="vectors in the searched corpus, and in the bulk load (100,000)")
    parser.add_argument("--dims", type=int, default=384,
                        help="dimensions: fake/fake-hash@1 has 384 (default) or 1024")
    parser.add_argument("--queries", type=int, default=500, help="query vectors (500)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed rounds of latency and of throughput (3)")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="seconds per throughput phase (10)")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads in the throughput phases, a client each (2)")
    parser.add_argument("--sample", type=float, default=0.5,
                        help="seconds between lag samples during the bulk load (0.5)")
    parser.add_argument("--load-with-index", action="store_true",
                        help="keep the second corpus's HNSW index during the bulk load")
    parser.add_argument("--no-query-log", action="store_true",
                        help="clients with log_queries=False (no query_log line per search)")
    parser.add_argument("--centres", type=int, default=1000, help="Gaussian centres (1,000)")
    parser.add_argument("--noise", type=float, default=1.5, help="noise norm (1.5)")
    parser.add_argument("--seed", type=int, default=20261125)
    args = parser.parse_args()
    key = f"fake/fake-hash@1:{args.dims}"

    started, cpu_at_start = time.perf_counter(), cpu_times()
    rng = np.random.default_rng(args.seed)
    centres = unit_centres(rng, args.centres, args.dims)
    vectors = clustered_unit_vectors(rng, centres, args.vectors, args.noise)
    queries = clustered_unit_vectors(rng, centres, args.queries, args.noise)

    home = Path(tempfile.mkdtemp(prefix="pyembed-bench-replica-"))
    home.chmod(0o755)  # the server's OS user (as root: postgres) must reach its folder
    cluster = LocalCluster(home)
    replica_made = False
    try:
        cluster.init()
        install(cluster.dsn(owner=True))
        owner_dsn, app_dsn = cluster.dsn(owner=True), cluster.dsn()
        with connect(owner_dsn) as owner:
            print(f"pyembed replica benchmark: {' '.join(sys.argv[1:]) or '(defaults)'}")
            print_environment(owner)
            print(f"cluster: fresh, in {home} (removed at the end); model key {key}; "
                  f"{args.vectors:,} unit {args.dims}-d vectors around {args.centres:,} centres "
                  f"(noise norm {args.noise}), {args.queries} queries, seed {args.seed}")
            name = f"bench-{uuid.uuid4().hex[:6]}"
            texts = texts_for(args.vectors, "search")
            t0 = time.perf_counter()
            corpus_id, chunk_ids, dropped = store_chunks(owner_dsn, app_dsn, name, key, texts,
                                                         drop_index=True)
            t1 = time.perf_counter()
            loaded = load_vectors(name, chunk_ids, key, vectors, [sha256(t) for t in texts],
                                  dsn=app_dsn)
            t2 = time.perf_counter()
            index = scalar(owner, "SELECT pyembed._create_vector_index(%s, %s)", (corpus_id, key))
            for table in ("vectors", "chunks", "documents"):
                owner.execute(sql.SQL("ANALYZE pyembed.{}").format(sql.Identifier(table)))
            t3 = time.perf_counter()
            size = scalar(owner, "SELECT pg_database_size(current_database())")
            print(f"setup: {args.vectors:,} chunks stored in {t1 - t0:.1f} s; vectors by "
                  f"load_vectors at {loaded.rows_per_second:,.0f} rows/s ({t2 - t1:.1f} s, "
                  f"index {', '.join(dropped) or '(none)'} dropped); {index} built and ANALYZE "
                  f"in {t3 - t2:.1f} s; database {size / 2**20:,.0f} MiB")
            replica = cluster.add_replica(REPLICA)
            replica_made = True
            t4 = time.perf_counter()
            standby_owner, standby_app = replica.dsn(owner=True), replica.dsn()
            replayed = wait_replayed(owner, standby_owner)
            print(f"standby {REPLICA}: pg_basebackup -R and start in {t4 - t3:.1f} s, replayed "
                  f"the primary {replayed:.1f} s later (port {replica.state().port}, the "
                  f"primary's settings)")

            log = not args.no_query_log
            print(f"clients: pyembed.connect(dsn{'' if log else ', log_queries=False'}) and "
                  f"pyembed.connect(dsn, read_dsn=standby"
                  f"{'' if log else ', log_queries=False'}); "
                  + ("each search also writes its pyembed.query_log line on the primary"
                     if log else "no query_log lines"))

            def primary_client() -> pyembed.Client:
                return pyembed.connect(app_dsn, log_queries=log)

            def standby_client() -> pyembed.Client:
                client = pyembed.connect(app_dsn, read_dsn=standby_app, log_queries=log)
                assert scalar(client.read_conn, "SELECT pg_is_in_recovery()")
                return client

            with primary_client() as on_primary, standby_client() as on_standby:
                latency({"primary": on_primary, "standby": on_standby}, name, key, queries,
                        args.rounds)
            throughput({"primary": primary_client, "standby": standby_client}, name, key,
                       queries, args.threads, args.seconds, args.rounds)
            lag_under_load(cluster, owner, app_dsn, standby_owner, key, vectors, args)
    finally:
        for step, undo in (("remove the replica",
                            lambda: replica_made and cluster.remove_replica(REPLICA)),
                           ("stop the cluster", cluster.stop),
                           ("delete the folder", lambda: shutil.rmtree(home))):
            try:
                undo()
            except Exception as exc:  # keep cleaning up
                print(f"cleanup: could not {step}: {exc}", file=sys.stderr)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; {cpu_stolen(cpu_at_start)}; at the "
          f"end: {load_average()}")


if __name__ == "__main__":
    main()
