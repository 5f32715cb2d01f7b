"""Worker leases on a real PostgreSQL: short leases renewed while a batch is in flight, a dead
worker's batch taken over, leases a drain could not wait for reported (and shown by `pyembed
status`), and several `pyembed worker` processes sharing one queue while one is killed.

The CLI runs as real processes; SLOW_CLI is `pyembed` with the fake provider slowed down and
logging each text it is asked for (with the process id), so that a kill lands mid-batch.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
import pytest

from pyembed import health
from pyembed.cache import PostgresCache
from pyembed.embedder import Embedder
from pyembed.models import InputType, ModelSpec
from pyembed.providers import TransientProviderError
from pyembed.worker import Worker, WorkerStats
from tests.conftest import REPO, Database
from tests.test_worker import (
    FAKE,
    RecordingProvider,
    add_docs,
    clean_env,
    cli,
    count,
    fake_embedder,
    fresh_vectors,
    held_beside,
    make_corpus,
    one,
    texts_for,
    wait_for,
)

SLOW_CLI = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from pyembed.providers.fake import FakeProvider

    log, pause = Path(os.environ["TEST_PROVIDER_LOG"]), float(os.environ["TEST_PROVIDER_PAUSE"])
    real = FakeProvider.embed_batch

    def embed_batch(self, texts, input_type):
        with log.open("a") as f:
            f.write("".join(f"{os.getpid()}\\t{t}\\n" for t in texts))
        time.sleep(pause)
        return real(self, texts, input_type)

    FakeProvider.embed_batch = embed_batch
    from pyembed.cli import main
    main(sys.argv[1:])
""")


def provider_log(log: Path) -> list[tuple[int, str]]:
    """(process id, text) for each text the slowed provider was asked for."""
    if not log.exists():
        return []
    return [(int(pid), text) for pid, text in
            (line.split("\t", 1) for line in log.read_text().splitlines())]


@contextmanager
def slow_workers(tmp_path: Path, dsn: str, n: int, *args: str, pause: float,
                 env: dict[str, str] | None = None) -> Iterator[list[subprocess.Popen[str]]]:
    """n `pyembed worker` processes with the slowed provider; killed if still running."""
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_CLI)
    full = clean_env() | {"PYEMBED_DSN": dsn, "TEST_PROVIDER_LOG": str(tmp_path / "calls.log"),
                          "TEST_PROVIDER_PAUSE": str(pause)} | (env or {})
    procs = [subprocess.Popen([sys.executable, str(script), "worker", *args], env=full, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def kill_mid_batch(proc: subprocess.Popen[str], log: Path) -> list[str]:
    """SIGKILL `proc` while its provider call is in flight; the texts of that call."""
    wait_for(lambda: any(pid == proc.pid for pid, _ in provider_log(log))
             or proc.poll() is not None, 30, "a batch in flight")
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    return [t for pid, t in provider_log(log) if pid == proc.pid]


def clock(moment: datetime) -> str:
    """HH:MM:SS in local time, as the CLI prints it."""
    return moment.astimezone().strftime("%H:%M:%S")


# -- a dead worker's batch -------------------------------------------------------------------
def test_a_dead_workers_batch_is_taken_over_when_its_short_lease_ends(
        db: Database, app: psycopg.Connection[Any], tmp_path: Path) -> None:
    make_corpus(app, "dead", FAKE)
    texts = texts_for(30, "dead")
    add_docs(app, "dead", texts)
    lease = {"PYEMBED_WORKER_LEASE": "2"}
    with slow_workers(tmp_path, db.app_dsn, 1, "--batch-size", "10", pause=60,
                      env=lease) as (dead,):
        killed = kill_mid_batch(dead, tmp_path / "calls.log")
    assert len(killed) == 10
    leased = one(app, "SELECT count(*) FROM pyembed.queue WHERE attempts = 1 AND "
                      "not_before BETWEEN now() AND now() + interval '2.5 s'")
    assert leased == 10, "the lease did not come from PYEMBED_WORKER_LEASE"

    start = time.monotonic()
    result = cli("worker", "--batch-size", "10", env={"PYEMBED_DSN": db.app_dsn} | lease)
    assert result.returncode == 0, result.stderr
    assert "embedded 30" in result.stdout
    assert time.monotonic() - start < 20
    assert count(app, "queue") == 0 and count(app, "queue_failed") == 0
    assert fresh_vectors(app) == 30
    assert Worker(db.app_dsn).lease_seconds <= 30  # short by default


def test_chunks_leased_past_the_drain_are_reported_and_shown_by_status(
        db: Database, app: psycopg.Connection[Any], tmp_path: Path) -> None:
    make_corpus(app, "stuck", FAKE)
    add_docs(app, "stuck", texts_for(30, "stuck"))
    with slow_workers(tmp_path, db.app_dsn, 1, "--batch-size", "10", "--lease", "120",
                      pause=60) as (dead,):
        kill_mid_batch(dead, tmp_path / "calls.log")
    until = clock(one(app, "SELECT max(not_before) FROM pyembed.queue"))

    result = cli("worker", "--batch-size", "10", env={"PYEMBED_DSN": db.app_dsn})
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert "embedded 20" in result.stdout
    assert result.stderr.strip().splitlines() == [
        f"error: 10 chunks are leased by another worker (or a dead one) until {until}; they "
        f"were not embedded"]
    assert count(app, "queue") == 10 and fresh_vectors(app) == 20

    found = {(f.area, f.subject): f for f in health.report(app)}
    queue = found["queue", f"stuck [active] {FAKE}"]
    assert queue.value == "10 queued, 0 failed, 10 leased"
    assert queue.note == f"leases end {until}"
    status = cli("status", env={"PYEMBED_DSN": db.app_dsn, "COLUMNS": "200"})
    assert "10 leased" in status.stdout and f"leases end {until}" in status.stdout


# -- renewal ---------------------------------------------------------------------------------
def test_a_lease_is_renewed_while_its_batch_is_in_flight_and_only_then(
        db: Database, app: psycopg.Connection[Any]) -> None:
    make_corpus(app, "slow", FAKE)
    add_docs(app, "slow", texts_for(5, "slow"))
    providers: list[RecordingProvider] = []

    def slow(provider: RecordingProvider, batch: list[str]) -> None:
        time.sleep(2.0)

    worker = Worker(db.app_dsn, lease_seconds=0.6, embedder_for=fake_embedder(providers, slow))
    other_providers: list[RecordingProvider] = []
    other = Worker(db.app_dsn, lease_seconds=0.6, embedder_for=fake_embedder(other_providers))
    stats = held_beside(worker, other, providers, "another worker")
    assert stats.embedded == 5 and not other_providers
    assert count(app, "queue") == 0

    # A batch given back for a retry is no longer renewed: it is due when its delay ends.
    add_docs(app, "slow", texts_for(5, "retry"), prefix="retry")

    class Unavailable(RecordingProvider):
        def embed_batch(self, texts: list[str],
                        input_type: InputType) -> npt.NDArray[np.float32]:
            raise TransientProviderError("fake (fake-hash): HTTP 503: try later", status=503)

    def unavailable(spec: ModelSpec, cache: PostgresCache) -> Embedder:
        return Embedder(spec, Unavailable(spec), cache=cache, max_retries=0)

    failing = Worker(db.app_dsn, lease_seconds=0.6, retry_base=0.05, embedder_for=unavailable)
    try:
        assert failing.run_once().retried == 5
        time.sleep(0.8)
        assert one(app, "SELECT count(*) FROM pyembed.queue WHERE not_before <= now()") == 5
    finally:
        failing.close()


def test_a_lease_renewal_the_server_refuses_keeps_its_connection_and_renews_later(
        db: Database, app: psycopg.Connection[Any], owner: psycopg.Connection[Any],
        caplog: pytest.LogCaptureFixture) -> None:
    """Leases' branch for a renewal the server refused (here a lock timeout: a statement's
    error, not a lost connection) had no test: it warns, keeps its connection, and the next
    renewal extends the leases of the batch still in flight."""
    make_corpus(app, "refused", FAKE)
    add_docs(app, "refused", texts_for(3, "refused"))
    providers: list[RecordingProvider] = []

    def slow(provider: RecordingProvider, batch: list[str]) -> None:
        time.sleep(3.0)

    # Every worker connection gives up a lock wait after 0.2 s.
    dsn = db.app_dsn + ("&" if "?" in db.app_dsn else "?") + "options=-c%20lock_timeout%3D200"
    worker = Worker(dsn, lease_seconds=0.6, embedder_for=fake_embedder(providers, slow))
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(stats=worker.run_once()))
    leases = "SELECT pid FROM pg_catalog.pg_stat_activity WHERE application_name = " \
             "'pyembed worker leases'"
    with caplog.at_level(logging.WARNING, logger="pyembed.worker"):
        thread.start()
        try:
            wait_for(lambda: bool(app.execute(leases).fetchall()), 10, "the first renewal")
            (before,) = app.execute(leases).fetchall()
            with owner.transaction():
                owner.execute("LOCK TABLE pyembed.queue IN ACCESS EXCLUSIVE MODE")
                time.sleep(0.7)  # three renewals' time
            time.sleep(0.5)
            renewed = one(app, "SELECT min(not_before) > now() FROM pyembed.queue")
            after = app.execute(leases).fetchall()
        finally:
            thread.join(timeout=20)
            worker.close()
    refused = [r.getMessage() for r in caplog.records
               if "could not renew the leases" in r.getMessage()]
    assert refused and all("SQLSTATE 55P03" in m for m in refused), refused
    assert after == [before], "the renewal's connection was dropped for a statement's error"
    assert renewed is True, "the leases were not renewed once the lock was gone"
    assert result["stats"].embedded == 3 and count(app, "queue") == 0


@pytest.mark.parametrize("other_writes", ["first", "last"])
def test_a_job_whose_lease_ran_out_is_written_and_counted_once(
        db: Database, app: psycopg.Connection[Any], owner: psycopg.Connection[Any],
        monkeypatch: pytest.MonkeyPatch, other_writes: str) -> None:
    """A worker whose lease ran out mid-batch (its renewals stalled) and another that took the
    batch over both wrote its vectors and both counted them embedded. Now the late worker's
    write takes only the jobs its claim still holds (pyembed.hold_jobs): whether the other
    worker wrote first or is still embedding, each job is written once, by the worker that
    holds it, and counted once; the late worker counts it stale."""
    make_corpus(app, "twice", FAKE)
    add_docs(app, "twice", texts_for(3, "twice"))
    late_providers: list[RecordingProvider] = []
    other_providers: list[RecordingProvider] = []
    late_done, other_embedding = threading.Event(), threading.Event()

    def other_waits(provider: RecordingProvider, batch: list[str]) -> None:
        other_embedding.set()
        if other_writes == "last":
            assert late_done.wait(20), "the late worker never finished"

    other = Worker(db.app_dsn, lease_seconds=0.3,
                   embedder_for=fake_embedder(other_providers, other_waits))
    result: dict[str, WorkerStats] = {}
    thread = threading.Thread(target=lambda: result.update(other=other.run_once()))

    def lease_runs_out(provider: RecordingProvider, batch: list[str]) -> None:
        time.sleep(0.5)  # past the lease, which nothing renews
        thread.start()
        if other_writes == "first":
            thread.join(timeout=20)
        else:
            assert other_embedding.wait(20), "the other worker never took the batch over"

    late = Worker(db.app_dsn, lease_seconds=0.3,
                  embedder_for=fake_embedder(late_providers, lease_runs_out))
    monkeypatch.setattr(late._leases, "hold", lambda items: None)
    written: list[Any] = []
    try:
        stats = late.run_once()
        written.append(owner.execute("SELECT chunk_id, created_at FROM pyembed.vectors "
                                     "ORDER BY chunk_id").fetchall())
        late_done.set()
        thread.join(timeout=20)
    finally:
        late_done.set()
        late.close()
        other.close()
    taken = result["other"]
    assert (stats.embedded, stats.stale) == (0, 3), stats
    assert (taken.embedded, taken.stale) == (3, 0), taken
    if other_writes == "first":
        # The late worker wrote nothing over the other's vectors.
        assert owner.execute("SELECT chunk_id, created_at FROM pyembed.vectors ORDER BY "
                             "chunk_id").fetchall() == written[0]
    else:
        assert written[0] == [], "the late worker wrote jobs another worker held"
    assert fresh_vectors(app) == 3 and count(app, "queue") == 0


# -- several workers -------------------------------------------------------------------------
def test_three_workers_share_a_queue_and_one_is_killed_mid_batch(
        db: Database, app: psycopg.Connection[Any], owner: psycopg.Connection[Any],
        tmp_path: Path) -> None:
    make_corpus(app, "shared", FAKE)
    texts = texts_for(36, "shared")
    add_docs(app, "shared", texts)
    log = tmp_path / "calls.log"
    start = time.monotonic()
    # Each call outlasts the lease: only its renewal keeps the batch from the other workers.
    with slow_workers(tmp_path, db.app_dsn, 3, "--batch-size", "6", "--lease", "2",
                      pause=3.0) as procs:
        victim, *survivors = procs
        killed = kill_mid_batch(victim, log)
        outputs = [proc.communicate(timeout=60) for proc in survivors]
    assert [p.returncode for p in survivors] == [0, 0], [err for _, err in outputs]
    embedded = [int(out.split("embedded ", 1)[1].split(",", 1)[0]) for out, _ in outputs]
    assert sum(embedded) == 36 and len(killed) == 6
    assert time.monotonic() - start < 30

    per_chunk = owner.execute("SELECT chunk_id, count(*) FROM pyembed.vectors "
                              "WHERE model_key = %s GROUP BY chunk_id", (FAKE,)).fetchall()
    assert len(per_chunk) == 36 and {n for _, n in per_chunk} == {1}
    assert fresh_vectors(app) == 36
    assert count(app, "queue") == 0 and count(app, "queue_failed") == 0
    calls = Counter(text for _, text in provider_log(log))
    assert set(calls) == set(texts)
    # Only the killed batch went to the provider twice (it died before reaching the cache).
    assert {t for t, n in calls.items() if n > 1} <= set(killed)
    assert max(calls.values()) <= 2
