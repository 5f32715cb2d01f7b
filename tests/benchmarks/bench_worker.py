"""Benchmark of `pyembed worker` and of pyembed.embed() (a script, not a test).

    .venv/bin/python tests/benchmarks/bench_worker.py
    .venv/bin/python tests/benchmarks/bench_worker.py --fake 5000 --local 0 --batch 128

Prints the worker's throughput in texts/s with
  * the fake model in-process (the worker's own database cost: claim, cache, write),
  * the OpenAI-compatible fake API server through the real openai SDK,
  * the local MiniLM model,
each on freshly queued chunks with an empty cache, and the per-call overhead of
pyembed.embed() on a cache hit, timed inside PostgreSQL with clock_timestamp() around
`count(pyembed.embed(...)) FROM generate_series(1, N)` (median of several runs, after a
warm-up), as the application role.

It runs against the test cluster ($PYEMBED_TEST_HOME, default .pyembed-test in the
repository) in a scratch database brought to head and dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg import sql

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pyembed import schema  # noqa: E402
from pyembed.cache import PostgresCache  # noqa: E402
from pyembed.db import connect  # noqa: E402
from pyembed.embedder import Embedder  # noqa: E402
from pyembed.localdb import OWNER, LocalCluster  # noqa: E402
from pyembed.models import LOCAL_DEFAULT, ModelSpec  # noqa: E402
from pyembed.providers import provider_for  # noqa: E402
from pyembed.worker import Worker, WorkerStats  # noqa: E402
from tests.fakeapi import FakeAPI  # noqa: E402

FAKE = "fake/fake-hash@1:384"
OPENAI = "openai/text-embedding-3-small@1:1536"
LOCAL = LOCAL_DEFAULT.key

TIMER = """
CREATE FUNCTION pg_temp.embed_ms(n integer, model text) RETURNS float8
LANGUAGE plpgsql AS $$
DECLARE
  started timestamptz;
  done bigint;
BEGIN
  started := clock_timestamp();
  SELECT count(pyembed.embed('the same text every time', model)) INTO done
    FROM generate_series(1, n);
  RETURN extract(epoch FROM clock_timestamp() - started) * 1000 / done;
END
$$
"""


def scratch_database(cluster: LocalCluster) -> tuple[str, str, str]:
    """(name, owner DSN, app DSN) of a new database at head."""
    name = f"bench_worker_{uuid.uuid4().hex[:8]}"
    admin = cluster.dsn(owner=True).rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name),
                                                                   sql.Identifier(OWNER)))
    owner = cluster.dsn(owner=True).rsplit("/", 1)[0] + "/" + name
    app = cluster.dsn(owner=False).rsplit("/", 1)[0] + "/" + name
    schema.install(owner)
    return name, owner, app


def drop_database(cluster: LocalCluster, name: str) -> None:
    admin = cluster.dsn(owner=True).rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


def queue_chunks(app_dsn: str, corpus: str, model_key: str, n: int) -> None:
    """n single-chunk documents with distinct texts, queued by the chunk triggers."""
    with connect(app_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pyembed.create_corpus(%s, %s)", (corpus, model_key)).fetchone()
        assert row is not None
        corpus_id = row[0]
        with conn.transaction():
            conn.execute("INSERT INTO pyembed.documents (corpus_id, document_id, content_hash) "
                         "SELECT %s, 'd' || i, '\\x00' FROM generate_series(1, %s) i",
                         (corpus_id, n))
            conn.execute(
                "INSERT INTO pyembed.chunks (corpus_id, document_id, chunk_index, content) "
                "SELECT %s, 'd' || i, 0, format('%%s document %%s: a short support note about "
                "invoices, regions %%s and backups %%s of the customer account', %s::text, i, "
                "i %% 17, i %% 29) FROM generate_series(1, %s) i", (corpus_id, corpus, n))


def drain(app_dsn: str, batch: int,
          embedder_for: Callable[[ModelSpec, PostgresCache], Embedder] | None) -> WorkerStats:
    worker = Worker(app_dsn, batch_size=batch, embedder_for=embedder_for)
    try:
        return worker.run(drain=True, poll_interval=0.05, drain_wait=1.0)
    finally:
        worker.close()


def report(label: str, n: int, stats: WorkerStats) -> None:
    ok = "" if stats.embedded == n else f"  (expected {n}!)"
    print(f"worker, {label:<34} {stats.embedded:>5} texts in {stats.seconds:6.2f} s = "
          f"{stats.rate:8.1f} texts/s, {stats.batches} batches{ok}", flush=True)


def embed_overhead(app_dsn: str, model_key: str, calls: int, runs: int) -> list[float]:
    with connect(app_dsn, autocommit=True) as conn:
        conn.execute(TIMER)
        conn.execute("SELECT pg_temp.embed_ms(%s, %s)", (10, model_key))  # warm-up: load, cache
        results: list[float] = []
        for _ in range(runs):
            row = conn.execute("SELECT pg_temp.embed_ms(%s, %s)", (calls, model_key)).fetchone()
            assert row is not None
            results.append(float(row[0]))
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fake", type=int, default=2000,
                        help="chunks for the fake model and the fake API (default 2000)")
    parser.add_argument("--local", type=int, default=300,
                        help="chunks for the local model (default 300; 0 to skip)")
    parser.add_argument("--batch", type=int, default=64, help="worker batch size (default 64)")
    parser.add_argument("--calls", type=int, default=1000,
                        help="pyembed.embed() calls per timing run (default 1000)")
    parser.add_argument("--runs", type=int, default=5, help="timing runs (default 5)")
    args = parser.parse_args()

    cluster = LocalCluster(Path(os.environ.get("PYEMBED_TEST_HOME", REPO / ".pyembed-test")))
    cluster.init()
    cluster.start()
    name, _, app_dsn = scratch_database(cluster)
    print(f"database {name}; worker batch size {args.batch}; "
          f"PYEMBED_LOCAL_THREADS={os.environ.get('PYEMBED_LOCAL_THREADS', '1')}", flush=True)
    try:
        if args.fake:
            queue_chunks(app_dsn, "fake", FAKE, args.fake)
            report("fake model, in-process:", args.fake, drain(app_dsn, args.batch, None))

            with FakeAPI() as api:
                os.environ.update(api.env())
                os.environ["OPENAI_API_KEY"] = "sk-bench"

                def sdk(spec: ModelSpec, cache: PostgresCache) -> Embedder:
                    return Embedder(spec, provider_for(spec, timeout=10.0), cache=cache,
                                    max_retries=2)

                queue_chunks(app_dsn, "fakeapi", OPENAI, args.fake)
                stats = drain(app_dsn, args.batch, sdk)
                report(f"fake API, openai SDK ({OPENAI.split(':')[1]} dims):", args.fake, stats)
                print(f"  {len(api.requests)} HTTP requests to the fake server", flush=True)

        if args.local:
            queue_chunks(app_dsn, "local", LOCAL, args.local)
            report("local MiniLM int8:", args.local, drain(app_dsn, args.batch, None))

        print(f"pyembed.embed() on a cache hit, {args.calls} calls per run, "
              f"{args.runs} runs (ms per call):", flush=True)
        for key in (FAKE, LOCAL):
            runs = embed_overhead(app_dsn, key, args.calls, args.runs)
            print(f"  {key:<36} median {statistics.median(runs):.3f}  "
                  f"(runs: {', '.join(f'{r:.3f}' for r in runs)})", flush=True)
    finally:
        drop_database(cluster, name)


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - started:.1f} s")
