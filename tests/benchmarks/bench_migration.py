"""Benchmark of a model migration (a script, not a test): a 10,000-chunk SciFact corpus moves
from fake/fake-hash@1:384 (deterministic, offline) to local/all-minilm-l6-v2-int8@1:384 (the
real int8 MiniLM), through every step, while searches and writes keep running.

    PYEMBED_LOCAL_THREADS=2 .venv/bin/python tests/benchmarks/bench_migration.py
    .venv/bin/python tests/benchmarks/bench_migration.py --chunks 2000   # a quick look

Data: SciFact abstracts (title + " " + text) from --data (default ../shared/data/scifact of
the repo root), chunked by the corpus's own settings (200 estimated tokens, 40 overlap).
Documents judged relevant for SciFact's test queries are loaded first, then the others in
corpus order, skipping any whose chunks would overshoot, until exactly --chunks chunks are
stored (short synthetic texts fill any remainder). Evaluation queries: the first --queries
test queries (by id) whose relevant documents are all loaded.

Steps, each timed: plan, start, backfill (MiniLM, committed batches of 64), validate (the
evaluation queries on both keys: Recall@10, nDCG@10, ms/query, top-10 overlap), shift 10/50/100,
complete, cleanup; then a rollback variant (a second migration back to the fake model: start,
backfill, validate, shift 50, rollback, cleanup).

Load while it runs: a thread searches the corpus by text (SciFact claims, Python client,
application role) at --search-rate per second the whole time, and another thread adds one
small document per second to a second corpus (a write with dual-write off, to show whether
steps block writers). Latency is reported per phase: idle (before the backfill), backfill
(embedding), shadow index build (the end of the backfill), and after.

Without --dsn the benchmark runs in a fresh database of a local cluster in
<repo>/.pyembed-bench-migration (created on first use, stopped at the end if this run
started it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import psycopg
from psycopg import sql

REPO = Path(__file__).resolve().parents[2]
OLD = "fake/fake-hash@1:384"
NEW = "local/all-minilm-l6-v2-int8@1:384"
CORPUS = "scifact"
SIDE = "writes"  # the second corpus the writer thread adds to
CHUNK_TOKENS, CHUNK_OVERLAP = 200, 40

T = TypeVar("T")


@dataclass
class Target:
    owner_dsn: str
    app_dsn: str
    description: str


@contextmanager
def local_database(keep: bool) -> Iterator[Target]:
    """A fresh database in the benchmark cluster, installed to head; dropped afterwards."""
    from pyembed.localdb import LocalCluster
    from pyembed.schema import install

    cluster = LocalCluster(REPO / ".pyembed-bench-migration")
    was_running = cluster.running()
    cluster.init()  # (a first init also starts the server)
    cluster.start()
    name = f"bench_{uuid.uuid4().hex[:8]}"
    admin_dsn = cluster.dsn(owner=True)

    def in_db(dsn: str) -> str:
        return dsn.rsplit("/", 1)[0] + "/" + name

    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        install(in_db(admin_dsn))
        yield Target(in_db(admin_dsn), in_db(cluster.dsn(owner=False)),
                     f"fresh database {name} in {cluster.home}")
    finally:
        if not keep:
            with psycopg.connect(admin_dsn, autocommit=True) as admin:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                              .format(sql.Identifier(name)))
        if not was_running and not keep:
            cluster.stop()


@contextmanager
def given_database(owner_dsn: str, app_dsn: str | None) -> Iterator[Target]:
    from pyembed.schema import install

    if not app_dsn:
        raise SystemExit("--dsn needs --app-dsn (the application role's DSN)")
    install(owner_dsn)
    yield Target(owner_dsn, app_dsn, "the database given by --dsn")


# -- data ---------------------------------------------------------------------------------------
@dataclass
class Data:
    documents: list[tuple[str, str]]  # (id, text), chunk counts summing to the target
    chunks: int
    evals: list[tuple[str, str, list[str]]]  # (query id, text, relevant document ids)
    claims: list[str]  # every SciFact claim: the searcher's queries


def load_data(folder: Path, chunks: int, queries: int) -> Data:
    from pyembed.chunking import chunk_text

    corpus = [json.loads(line) for line in (folder / "corpus.jsonl").open()]
    texts = {str(d["_id"]): f"{d.get('title', '')} {d['text']}".strip() for d in corpus}
    claims = {str(q["_id"]): q["text"] for q in map(json.loads, (folder / "queries.jsonl").open())}
    qrels: dict[str, list[str]] = defaultdict(list)
    with (folder / "qrels" / "test.tsv").open() as f:
        next(f)
        for line in f:
            qid, did, score = line.split()
            if int(score) > 0:
                qrels[qid].append(did)
    relevant_first = list(dict.fromkeys(d for q in sorted(qrels, key=int) for d in qrels[q]))
    order = relevant_first + [d for d in texts if d not in set(relevant_first)]
    chosen: list[tuple[str, str]] = []
    total = 0
    for did in order:
        if did not in texts:
            continue
        n = len(chunk_text(texts[did], CHUNK_TOKENS, CHUNK_OVERLAP))
        if total + n <= chunks:
            chosen.append((did, texts[did]))
            total += n
        if total == chunks:
            break
    for i in range(chunks - total):  # (only if SciFact runs out)
        chosen.append((f"synthetic-{i}", f"synthetic filler text number {i} about nothing"))
    loaded = {d for d, _ in chosen}
    evals = [(q, claims[q], qrels[q]) for q in sorted(qrels, key=int)
             if q in claims and all(d in loaded for d in qrels[q])][:queries]
    return Data(chosen, chunks, evals, list(claims.values()))


# -- load while the steps run ----------------------------------------------------------------------
class Load(threading.Thread):
    """Runs `action` every `1/rate` s (no catching up), recording (phase, seconds, result)."""

    def __init__(self, name: str, rate: float, action: Callable[[int], str]) -> None:
        super().__init__(name=name, daemon=True)
        self.rate, self.action = rate, action
        self.phase = "idle"
        self.samples: list[tuple[str, float, str]] = []
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        i = 0
        next_at = time.perf_counter()
        while not self.halt.is_set():
            phase = self.phase
            started = time.perf_counter()
            try:
                result = self.action(i)
                self.samples.append((phase, time.perf_counter() - started, result))
            except Exception as exc:
                self.errors.append(f"{phase}: {exc!r}")
                self.samples.append((phase, time.perf_counter() - started, "error"))
            i += 1
            next_at = max(next_at + 1 / self.rate, time.perf_counter())
            self.halt.wait(max(0.0, next_at - time.perf_counter()))

    def stats(self, phase: str) -> tuple[int, float, float, float, Counter[str]]:
        ms = [s * 1000 for p, s, _ in self.samples if p == phase]
        results = Counter(r for p, _, r in self.samples if p == phase)
        if not ms:
            return 0, float("nan"), float("nan"), float("nan"), results
        p50, p95 = np.percentile(ms, [50, 95])
        return len(ms), float(p50), float(p95), max(ms), results


# -- the run ---------------------------------------------------------------------------------------
def timed(steps: list[tuple[str, float, str]], name: str, fn: Callable[[], T],
          note: Callable[[T], str] = lambda _: "") -> T:
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    steps.append((name, seconds, note(result)))
    print(f"  {name:<28} {seconds:9.2f} s  {note(result)}", flush=True)
    return result


def sizes(owner: psycopg.Connection[Any]) -> str:
    row = owner.execute(  # over the corpora's partitions
        """SELECT coalesce(sum(pg_table_size(relid)), 0), coalesce(sum(pg_indexes_size(relid)), 0)
             FROM pg_partition_tree('pyembed.vectors') WHERE isleaf""").fetchone()
    assert row is not None
    return f"vectors table {row[0] / 2**20:.1f} MiB, its indexes {row[1] / 2**20:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "scifact",
                        help="SciFact folder (corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    parser.add_argument("--chunks", type=int, default=10_000, help="chunks (default 10,000)")
    parser.add_argument("--queries", type=int, default=50, help="evaluation queries (50)")
    parser.add_argument("--search-rate", type=float, default=10.0,
                        help="searches per second by the search thread (default 10)")
    parser.add_argument("--max-drop", type=float, default=0.02, help="validation gate (0.02)")
    parser.add_argument("--dsn", help="owner DSN of a database to use instead of a fresh local one")
    parser.add_argument("--app-dsn", help="application-role DSN (with --dsn)")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds of load after each traffic step (default 3; idle: 2x)")
    parser.add_argument("--keep", action="store_true", help="keep the database")
    args = parser.parse_args()
    os.environ.setdefault("PYEMBED_LOCAL_THREADS", "2")  # read when MiniLM loads

    data = load_data(args.data, args.chunks, args.queries)
    target = (given_database(args.dsn, args.app_dsn) if args.dsn
              else local_database(args.keep))
    with target as t:
        run(t, args, data)


def run(t: Target, args: argparse.Namespace, data: Data) -> None:
    import pyembed
    from pyembed import evaluation, migration
    from pyembed.client import Document

    owner = pyembed.connect(t.owner_dsn)
    app = pyembed.connect(t.app_dsn)
    server = owner.conn.execute("SHOW server_version").fetchone()
    print(f"{t.description}; PostgreSQL {server[0] if server else '?'}; CPUs {os.cpu_count()}; "
          f"Python {platform.python_version()}; "
          f"PYEMBED_LOCAL_THREADS={os.environ.get('PYEMBED_LOCAL_THREADS')}")

    # Load the corpus on the old key, as the application role.
    started = time.perf_counter()
    corpus = app.create_corpus(CORPUS, OLD, chunk_tokens=CHUNK_TOKENS,
                               chunk_overlap=CHUNK_OVERLAP)
    for i in range(0, len(data.documents), 500):
        corpus.add([Document(d, text) for d, text in data.documents[i:i + 500]], truncate=False)
    app.create_corpus(SIDE, OLD)
    for qid, text, relevant in data.evals:
        evaluation.add_eval_query(app, CORPUS, qid, text, relevant)
    stored = owner.conn.execute("SELECT count(*) FROM pyembed.chunks WHERE corpus_id = "
                                "(SELECT corpus_id FROM pyembed.corpora WHERE name = %s)",
                                (CORPUS,)).fetchone()
    print(f"loaded {len(data.documents):,} documents, {stored[0] if stored else 0:,} chunks on "
          f"{OLD} in {time.perf_counter() - started:.1f} s; {len(data.evals)} evaluation "
          f"queries (SciFact test claims whose relevant abstracts are all loaded)")
    print(f"storage: {sizes(owner.conn)}")

    # Load threads: searches of the migrating corpus, writes to another corpus.
    searcher_client = pyembed.connect(t.app_dsn)
    writer_client = pyembed.connect(t.app_dsn)
    search_corpus = searcher_client.corpus(CORPUS)
    side = writer_client.corpus(SIDE)

    def search(i: int) -> str:
        hits = search_corpus.search(data.claims[(i * 7) % len(data.claims)], k=10)
        return hits[0].model_key if hits else "no results"

    def write(i: int) -> str:
        side.add([Document(f"w{i}", f"write {i} during the migration benchmark")])
        return "written"

    searcher = Load("searcher", args.search_rate, search)
    writer = Load("writer", 1.0, write)
    # Warm the query path of both models before timing anything.
    search_corpus.search("warm up", k=10)
    searcher_client.embedder(NEW).embed_query("warm up")
    searcher.start()
    writer.start()

    steps: list[tuple[str, float, str]] = []
    print("\nsteps:")
    try:
        plan = timed(steps, "plan", lambda: migration.plan(owner, CORPUS, NEW),
                     lambda p: f"{p.chunks:,} chunks, ~{p.tokens:,} tokens, {p.api_calls} calls, "
                               f"est. {p.hours:.2f} h, storage {p.storage_before[0] / 2**20:.1f}"
                               f" -> {p.storage_after[0] / 2**20:.1f} MiB raw")
        timed(steps, "start", lambda: migration.start(owner, CORPUS, NEW))
        time.sleep(2 * args.settle)  # idle baseline for the search latency
        searcher.phase = writer.phase = "backfill"
        marks: dict[str, float] = {}
        t0 = time.perf_counter()

        def progress(done: int, total: int) -> None:
            if done == total:
                searcher.phase = writer.phase = "index build"
                marks["embedded"] = time.perf_counter()
            elif done % 1024 == 0:
                rate = done / (time.perf_counter() - t0)
                print(f"    backfill {done:,}/{total:,} ({rate:.1f} texts/s)", flush=True)

        report = timed(steps, "backfill", lambda: migration.backfill(owner, CORPUS,
                                                                      progress=progress),
                       lambda r: f"{r.embedded:,} chunks, {r.rate:.1f} texts/s overall")
        searcher.phase = writer.phase = "after"
        build = time.perf_counter() - marks.get("embedded", time.perf_counter())
        print(f"    (embedding {report.seconds - build:.1f} s, shadow HNSW build + checks "
              f"{build:.1f} s)")
        print(f"  storage during the migration: {sizes(owner.conn)}")
        validation = timed(steps, "validate", lambda: migration.validate(
            owner, CORPUS, max_drop=args.max_drop), lambda v: f"passed: {v.passed}")
        print_validation(validation)
        if not validation.passed:
            print(f"  the gate (max drop {args.max_drop}) refused the new model; for the rest "
                  "of the timings it is validated again with --max-drop 1.0 (the DBA's call)")
            timed(steps, "validate (gate 1.0)", lambda: migration.validate(
                owner, CORPUS, max_drop=1.0), lambda v: f"passed: {v.passed}")
        for share in (10, 50, 100):
            timed(steps, f"shift {share}", shifter(owner, share))
            searcher.phase = writer.phase = f"shift {share}"
            time.sleep(args.settle)
        timed(steps, "complete", lambda: migration.complete(owner, CORPUS))
        searcher.phase = writer.phase = "completed"
        time.sleep(args.settle)
        timed(steps, "cleanup", lambda: migration.cleanup(owner, CORPUS),
              lambda n: f"{n:,} old vectors removed")
        print(f"  storage after cleanup: {sizes(owner.conn)}")
        searcher.phase = writer.phase = "cleaned"
        time.sleep(args.settle)

        print("\nrollback variant (a second migration, back to the fake model):")
        timed(steps, "rb: start", lambda: migration.start(owner, CORPUS, OLD))
        timed(steps, "rb: backfill", lambda: migration.backfill(owner, CORPUS),
              lambda r: f"{r.embedded:,} chunks, {r.rate:.0f} texts/s")
        timed(steps, "rb: validate", lambda: migration.validate(owner, CORPUS, max_drop=1.0),
              lambda v: f"new nDCG@10 {v.new.ndcg:.4f} vs {v.old.ndcg:.4f}")
        timed(steps, "rb: shift 50", lambda: migration.shift(owner, CORPUS, 50))
        searcher.phase = writer.phase = "rb: shift 50"
        time.sleep(args.settle)
        timed(steps, "rb: rollback", lambda: migration.rollback(owner, CORPUS))
        searcher.phase = writer.phase = "rb: rolled back"
        time.sleep(args.settle)
        timed(steps, "rb: cleanup", lambda: migration.cleanup(owner, CORPUS),
              lambda n: f"{n:,} shadow vectors removed")
    finally:
        searcher.halt.set()
        writer.halt.set()
        searcher.join(60)
        writer.join(60)

    print("\nload during the steps (searcher: text search of the migrating corpus from the "
          f"Python client at {args.search_rate:g}/s; writer: one document a second into "
          "another corpus):")
    phases = list(dict.fromkeys(p for p, _, _ in searcher.samples + writer.samples))
    print(f"  {'phase':<18} {'searches':>8} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}  "
          f"{'served by':<34} {'writes':>6} {'p50 ms':>8} {'max ms':>8}")
    for phase in phases:
        n, p50, p95, top, served = searcher.stats(phase)
        wn, wp50, _wp95, wtop, _written = writer.stats(phase)
        served_by = ", ".join(f"{k.split('/')[0]} {c}" for k, c in sorted(served.items()))
        print(f"  {phase:<18} {n:>8} {p50:>8.1f} {p95:>8.1f} {top:>8.1f}  {served_by:<34} "
              f"{wn:>6} {wp50:>8.1f} {wtop:>8.1f}")
    print(f"  search errors: {len(searcher.errors)}; write errors: {len(writer.errors)}")
    for e in (searcher.errors + writer.errors)[:5]:
        print(f"    {e[:200]}")
    print(f"\nplan: {plan}")
    for c in (owner, app, searcher_client, writer_client):
        c.close()


def shifter(owner: Any, share: int) -> Callable[[], int]:
    from pyembed import migration

    return lambda: migration.shift(owner, CORPUS, share)


def print_validation(v: Any) -> None:
    print(f"\n  validation: {v.queries} queries, gate max drop {v.max_drop}, top-10 overlap "
          f"{v.overlap:.1%}, passed {v.passed}")
    print(f"  {'model key':<36} {'Recall@10':>9} {'nDCG@10':>9} {'ms/query':>9}")
    for side in (v.old, v.new):
        print(f"  {side.model_key:<36} {side.recall:>9.4f} {side.ndcg:>9.4f} "
              f"{side.ms_per_query:>9.1f}")
    print()


if __name__ == "__main__":
    main()
