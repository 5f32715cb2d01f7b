"""Recall you can see: searches sample their query on the primary (never on a replica's read
path), the worker re-runs samples against exact search and records recall@10 per corpus and
key, `pyembed recall` measures on demand, and status, the health view and the metrics show it
with an alert below the threshold. The tables are the owner's."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

import pyembed
from pyembed import health, recall
from pyembed.localdb import LocalCluster
from pyembed.metrics import registry
from pyembed.worker import Worker
from tests.conftest import Database, _dsn
from tests.helpers import run_cli
from tests.test_cli import db_env
from tests.test_replica import standby, wait_for

__all__ = ["standby"]  # the replica fixture, shared with test_replica

KEY = "fake/fake-hash@1:384"
DOCS = [(f"d{i}", f"error E40{i:02d} means the quota number {i} is used up") for i in range(40)]


def samples(owner: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return owner.execute("SELECT c.name, s.model_key, s.filter FROM pyembed.recall_samples s "
                         "JOIN pyembed.corpora c USING (corpus_id) ORDER BY s.sample_id").fetchall()


def sampling(client: pyembed.Client, rate: float) -> None:
    client.conn.execute("SELECT set_config('pyembed.recall_sample_rate', %s, false)", (str(rate),))


def test_sampled_searches_are_rerun_by_the_worker_and_recall_is_reported(
        db: Database, owner: psycopg.Connection[Any]) -> None:
    with pyembed.connect(db.app_dsn) as client:
        docs = client.create_corpus("docs", KEY)
        docs.add(DOCS)
        sampling(client, 0.0)
        docs.search("not sampled at rate 0")
        assert samples(owner) == []
        sampling(client, 1.0)
        docs.search("E4007 quota")  # a miss
        docs.search("E4007 quota")  # a hit
        docs.search("E4012 quota", filter={"lang": "en"}, mode="hybrid")
        docs.search("E4012", mode="keyword")  # no vector: nothing to sample
        assert samples(owner) == [("docs", KEY, None), ("docs", KEY, None),
                                  ("docs", KEY, {"lang": "en"})]
        assert recall.report(client.conn) == []
    worker = Worker(db.app_dsn, recall_samples=2)
    try:
        first = worker.measure_recall()
        assert worker.measure_recall() == []  # rate limited: not again before recall_every
        second = worker.measure_recall(now=True)
    finally:
        worker.close()
    # The filter matches no chunk: that sample has nothing to find and counts for nothing.
    assert [(m.corpus, m.model_key, m.queries) for m in first] == [("docs", KEY, 2)]
    assert second == []
    assert first[0].recall_at_10 == 1.0  # 40 vectors: the HNSW search is exact
    assert samples(owner) == []
    with pyembed.connect(db.app_dsn) as client:
        (row,) = recall.report(client.conn)
        assert (row.corpus, row.model_key, row.recall_at_10, row.queries) == ("docs", KEY, 1.0, 2)
        (finding,) = health.recall(client.conn)
        assert finding.level == "ok" and finding.number == 1.0


def test_recall_on_demand_prints_json_and_records_a_measurement(
        db: Database, owner: psycopg.Connection[Any]) -> None:
    with pyembed.connect(db.app_dsn) as client:
        client.create_corpus("docs", KEY).add(DOCS)
    out = run_cli("recall", "docs", "--queries", "10", "--json", env=db_env(db))
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["recall_at_10"] == 1.0 and got["queries"] == 10 and got["model_key"] == KEY
    assert owner.execute("SELECT source, queries, recall_at_10 FROM pyembed.recall_measurements"
                         ).fetchall() == [("on demand", 10, 1.0)]
    missing = run_cli("recall", "nope", env=db_env(db))
    assert missing.returncode == 1 and "unknown corpus" in missing.stderr
    bad = run_cli("recall", "docs", "--queries", "0", env=db_env(db))
    assert bad.returncode != 0


def test_low_recall_alerts_in_status_and_is_exported(
        db: Database, owner: psycopg.Connection[Any]) -> None:
    with pyembed.connect(db.app_dsn) as client:
        docs = client.create_corpus("docs", KEY)
        docs.add(DOCS[:5])
    # A measurement as the worker would add it for an index that lost its neighbours.
    owner.execute("INSERT INTO pyembed.recall_measurements (corpus_id, model_key, source, "
                  "queries, recall_at_10) VALUES (%s, %s, 'sampled', 20, 0.8)",
                  (docs.info.corpus_id, KEY))
    status = run_cli("status", "--json", env=db_env(db))
    assert status.returncode == 1
    (low,) = [f for f in json.loads(status.stdout)["findings"] if f["area"] == "recall"]
    assert low["level"] == "alert" and low["number"] == 0.8 and "below 0.95" in low["note"]
    relaxed = run_cli("status", "--json", "--recall-alert", "0.7", env=db_env(db))
    assert [f["level"] for f in json.loads(relaxed.stdout)["findings"]
            if f["area"] == "recall"] == ["ok"]
    from prometheus_client import generate_latest

    text = generate_latest(registry(db.app_dsn)).decode()
    assert f'pyembed_recall_at_10{{corpus="docs",model_key="{KEY}",tenant="-"}} 0.8' in text


def test_the_application_role_reads_recall_only_through_its_functions(
        db: Database, app: psycopg.Connection[Any]) -> None:
    for table in ("recall_samples", "recall_measurements"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute(f"SELECT * FROM pyembed.{table}")  # fixed table names
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute(f"DELETE FROM pyembed.{table}")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        app.execute("SELECT pyembed._recall_at_10('docs', 1, %s, '[1,0]', NULL)", (KEY,))
    assert app.execute("SELECT * FROM pyembed.recall_health").fetchall() == []


def test_a_search_on_a_replica_is_sampled_on_the_primary_and_measured_on_the_replica(
        db: Database, standby: LocalCluster, owner: psycopg.Connection[Any]) -> None:
    wait_for(standby, db, "the database")
    read_dsn = _dsn(standby, db.name, owner=False)
    with pyembed.connect(db.app_dsn, read_dsn=read_dsn) as client:
        docs = client.create_corpus("docs", KEY)
        docs.add(DOCS)
        sampling(client, 1.0)
        client.read_conn.execute("SET pyembed.recall_sample_rate = 1")  # writes nothing there
        docs.search("E4007 quota")  # a miss: the primary records it
        wait_for(standby, db, "the cache entry")
        docs.search("E4007 quota")  # a hit on the replica: sampled from the primary's cache
        assert samples(owner) == [("docs", KEY, None), ("docs", KEY, None)]
        # On the replica, a measurement runs and records nothing.
        assert recall.measure(client.read_conn, "docs", 5)[0].recall_at_10 == 1.0
        assert recall.measure_sampled(client.read_conn) == []
    assert owner.execute("SELECT count(*) FROM pyembed.recall_measurements").fetchone() == (0,)


def test_a_direct_measure_recall_on_a_lost_connection_is_database_not_ready(
        db: Database, owner: psycopg.Connection[Any]) -> None:
    """Worker.measure_recall called directly, its backend gone: DatabaseNotReady saying nothing
    was recorded (as a client's call says a lost connection), and the next call opens a new
    connection. Before, psycopg's OperationalError (the run loop's signal to reconnect)."""
    with pyembed.connect(db.app_dsn) as client:
        client.create_corpus("docs", KEY).add(DOCS[:3])
    worker = Worker(db.app_dsn)
    try:
        assert worker.measure_recall(now=True) == []  # (no samples yet: connected)
        owner.execute("SELECT pg_terminate_backend(%s, 5000)", (worker.conn.info.backend_pid,))
        worker._handed_out = None  # (worker.conn above was for the pid: not the user's)
        with pytest.raises(pyembed.DatabaseNotReady, match=r"^the connection to the database was "
                           r"lost while measuring recall \(.*\): nothing of this measurement "
                           r"was recorded; the next call opens a new connection$"):
            worker.measure_recall(now=True)
        assert worker.measure_recall(now=True) == []
    finally:
        worker.close()


def test_a_failed_recall_measurement_is_tried_again_before_the_next_period(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """A measurement that failed (here refused, InvalidInput) is tried again RECALL_RETRY
    seconds later, doubled at each failure in a row up to the
    period, and once a period after one works. Before, a failure waited a whole period
    (recall_every, 60 s by default) before the next try. The worker's clock is the test's."""
    import pyembed.worker as worker_module

    clock = [1000.0]
    monkeypatch.setattr(worker_module.time, "monotonic", lambda: clock[0])
    tries: list[float] = []

    def failing(conn: Any, max_samples: int = 20) -> list[recall.Measurement]:
        tries.append(clock[0])
        if len(tries) <= 2:
            raise pyembed.InvalidInput("refused")
        return []

    monkeypatch.setattr(worker_module.recall, "measure_sampled", failing)
    worker = Worker(db.app_dsn, recall_every=3600.0)
    try:
        for at in (1000.0, 1004.0, 1005.0, 1014.0, 1015.0, 1016.0, 4614.0, 4615.0):
            clock[0] = at
            worker.measure_recall()
        # failed at 1000 (again in 5 s), at 1005 (in 10 s), worked at 1015, then a period later
        assert tries == [1000.0, 1005.0, 1015.0, 4615.0]
    finally:
        worker.close()
