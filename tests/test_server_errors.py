"""An error the server returned for a statement (a statement or lock timeout, a deadlock, a
serialization failure: psycopg's OperationalError, as a lost connection is) is said as what it
is and handled as one: the connection stays, the work is tried again."""

from __future__ import annotations

import logging
import threading
import time

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

import pyembed
from pyembed.metrics import PyembedCollector
from pyembed.worker import Worker
from tests.conftest import Database
from tests.test_reconnect import KEY, up


def _locked(owner_dsn: str, table: str, seconds: float) -> threading.Thread:
    """A session that holds `table` (ACCESS EXCLUSIVE) for `seconds`, started and holding."""
    held = threading.Event()

    def hold() -> None:
        with psycopg.connect(owner_dsn) as conn:
            conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
                sql.SQL(table)))
            held.set()
            time.sleep(seconds)
    thread = threading.Thread(target=hold)
    thread.start()
    assert held.wait(10)
    return thread


def test_a_worker_whose_statement_the_server_refuses_keeps_its_connection_and_batch(
        db: Database, client: pyembed.Client, caplog: pytest.LogCaptureFixture) -> None:
    """A lock timeout (as a statement timeout, a deadlock or a serialization failure: psycopg's
    OperationalError too) while the worker writes a batch: before, it logged "database connection
    lost", closed its connections and waited for its leases to run out. Now it logs what the
    server said, gives the batch's jobs back and writes them on the same connection."""
    client.create_corpus("docs", KEY)
    for i in range(3):
        client.conn.execute("SELECT pyembed.add_document('docs', %s, %s)", (f"d{i}", f"text {i}"))
    (partition,) = client.conn.execute("SELECT pyembed.vector_table('docs')").fetchone()
    worker = Worker(make_conninfo(db.app_dsn, options="-c lock_timeout=200"))
    try:
        pids = {worker._db().info.backend_pid}
        holder = _locked(db.owner_dsn, partition, 0.5)
        with caplog.at_level(logging.WARNING, logger="pyembed.worker"):
            stats = worker.run(drain=True, poll_interval=0.2, drain_wait=2)
        holder.join()
        pids.add(worker._db().info.backend_pid)
    finally:
        worker.close()
    assert stats.embedded == 3 and stats.failed == 0, stats
    assert "connection lost" not in caplog.text
    assert "LockNotAvailable, SQLSTATE 55P03" in caplog.text and "claimed again" in caplog.text
    assert len(pids) == 1, pids
    assert client.conn.execute("SELECT count(*), max(attempts) FROM pyembed.queue "
                               ).fetchone() == (0, None)


def test_a_scrape_the_server_refuses_keeps_the_collectors_connection(
        db: Database, caplog: pytest.LogCaptureFixture) -> None:
    """Before, a scrape whose statement timed out said pyembed_up 0 with nothing logged and
    dropped its connection, as if the database were gone. Now the log says what the server
    answered, and the next scrape uses the same connection."""
    collector = PyembedCollector(make_conninfo(db.app_dsn, options="-c lock_timeout=200"))
    try:
        assert up(collector) == 1.0
        assert collector._conn is not None
        pid = collector._conn.info.backend_pid
        holder = _locked(db.owner_dsn, "pyembed.corpora", 1.0)
        with caplog.at_level(logging.WARNING, logger="pyembed.metrics"):
            assert up(collector) == 0.0
        holder.join()
        assert "a scrape's statement failed: LockNotAvailable, SQLSTATE 55P03" in caplog.text
        assert up(collector) == 1.0
        assert collector._conn is not None and collector._conn.info.backend_pid == pid
    finally:
        collector.reconnect()


def test_a_recall_measurement_the_server_cancels_is_logged_not_a_lost_connection(
        db: Database, caplog: pytest.LogCaptureFixture) -> None:
    """A statement timeout (QueryCanceled, 57014: pyembed's Busy) while the worker measured
    recall was re-raised as if the connection were lost: the run loop said "database connection
    lost" and reconnected. Now the measurement says what failed and the worker goes on."""
    worker = Worker(make_conninfo(db.app_dsn, options="-c statement_timeout=300"),
                    recall_every=60)
    try:
        pid = worker._db().info.backend_pid
        holder = _locked(db.owner_dsn, "pyembed.recall_samples", 1.0)
        with caplog.at_level(logging.WARNING, logger="pyembed.worker"):
            assert worker.measure_recall(now=True) == []
        holder.join()
        assert ("recall measurement failed (tried again in 5 s): canceling statement due to "
                "statement timeout: the statement took longer than this session allows"
                in caplog.text)
        assert worker._db().info.backend_pid == pid
    finally:
        worker.close()
