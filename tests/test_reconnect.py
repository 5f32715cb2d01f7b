"""Long-lived connections survive a PostgreSQL restart: the Client (and its corpora, embedders
and what else it hands out), the worker and the metrics endpoint open a new connection when
the server closed theirs between two calls, and never replay a call the loss interrupted.
Before, every call of a Client failed ("the connection is closed") until a new one was built,
a worker logged the loss and waited before its next batch, and the metrics endpoint answered
its first scrape with pyembed_up 0. A private cluster: the restarts disturb no other test."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

import pyembed
from pyembed import schema
from pyembed.localdb import LocalCluster
from pyembed.metrics import PyembedCollector
from pyembed.worker import Worker

pytestmark = pytest.mark.usefixtures("own_clusters")  # it makes clusters (conftest)

KEY = "fake/fake-hash@1:384"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    home = Path(tempfile.mkdtemp(prefix="pyembed-restart-", dir="/tmp"))
    home.chmod(0o755)  # the server's OS user must traverse it
    c = LocalCluster(home)
    try:  # a setup that fails stops and removes its cluster too
        c.init()
        c.start()
        schema.install(c.dsn(owner=True))
        yield c
    finally:
        c.stop()
        shutil.rmtree(home, ignore_errors=True)


def restart(cluster: LocalCluster) -> None:
    assert cluster.stop() and cluster.start()


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[pyembed.Client]:
    with psycopg.connect(cluster.dsn(owner=True), autocommit=True) as owner:
        owner.execute("DELETE FROM pyembed.corpora")
    c = pyembed.connect(cluster.dsn())
    yield c
    c.close()


def test_a_client_and_what_it_hands_out_survive_restarts(cluster: LocalCluster,
                                                         client: pyembed.Client) -> None:
    docs = client.create_corpus("docs", KEY)
    docs.add([("e4012", "Error E4012 means the quota is used up."),
              ("e5003", "Error E5003: the bucket is read-only.")])
    embedder = client.embedder(KEY)
    before = client._conn.info.backend_pid  # (client.conn would be handed to this code)

    restart(cluster)
    assert docs.search("E4012 quota", k=1)[0].document_id == "e4012"  # no error
    assert client._conn.info.backend_pid != before
    restart(cluster)
    assert embedder.embed(["a text embedded after a restart"]).shape == (1, 384)
    restart(cluster)
    assert docs.add([("e6001", "Error E6001: the token expired.")]).added == 1
    restart(cluster)
    assert [c.name for c in client.corpora()] == ["docs"]
    assert docs.search("E6001 token", k=1, mode="hybrid")[0].document_id == "e6001"


def test_a_transaction_you_opened_is_not_replayed(cluster: LocalCluster,
                                                  client: pyembed.Client) -> None:
    """Inside your own transaction the loss is one clear error (the server rolled it back),
    nothing of it is written again, and after client.reconnect() (the connection was yours:
    the client opens no other silently) the calls work on a new connection."""
    docs = client.create_corpus("docs", KEY)
    with pytest.raises(pyembed.DatabaseNotReady, match="inside a transaction opened on"):
        with client.conn.transaction():
            docs.add([("mine", "written in my transaction")])
            restart(cluster)
            docs.search("written", k=1)
    with pytest.raises(pyembed.DatabaseNotReady, match=r"client\.conn was handed to your code"):
        docs.search("written", k=1)
    client.reconnect()
    assert docs.search("written in my transaction", k=1, mode="keyword") == []
    assert docs.add([("mine", "written in my transaction")]).added == 1


def test_a_connection_lost_during_a_call_is_one_clear_error(cluster: LocalCluster,
                                                            client: pyembed.Client) -> None:
    docs = client.create_corpus("docs", KEY)
    with psycopg.connect(cluster.dsn(owner=True), autocommit=True) as owner:
        pid = client._conn.info.backend_pid

        def translate(text: str) -> str:  # runs inside the call, before its writes
            owner.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
            return text

        with pytest.raises(pyembed.DatabaseNotReady, match="lost during the call"):
            docs.add([("d", "some text")], translate=translate)
    assert docs.add([("d", "some text")]).added == 1  # the next call reconnects


@pytest.fixture
def roles(cluster: LocalCluster) -> Iterator[tuple[str, str]]:
    """A login in the application role, and a role it may SET ROLE to (another tenant's, say),
    dropped afterwards."""
    with psycopg.connect(cluster.dsn(owner=True), autocommit=True) as owner:
        owner.execute("CREATE ROLE other_tenant NOLOGIN IN ROLE pyembed_app")
        owner.execute("CREATE ROLE app_login LOGIN PASSWORD 'pw' IN ROLE pyembed_app, other_tenant")
    try:
        yield make_conninfo(cluster.dsn(), user="app_login", password="pw"), "other_tenant"
    finally:
        with psycopg.connect(cluster.dsn(owner=True), autocommit=True) as owner:
            owner.execute("DELETE FROM pyembed.corpora")  # (the test's, owned by no role)
            owner.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE usename = 'app_login'")
            owner.execute("DROP ROLE app_login")
            owner.execute("DROP ROLE other_tenant")


def test_a_role_set_on_the_clients_connection_is_never_dropped_by_a_reconnect(
        cluster: LocalCluster, client: pyembed.Client, roles: tuple[str, str]) -> None:
    """SET ROLE on client.conn, then a restart: a new connection would act as the login, so
    the call is DatabaseNotReady saying why, and stays so until client.reconnect(). Before,
    the call went on as the login, silently."""
    dsn, role = roles
    with pyembed.connect(dsn) as mine:
        docs = mine.create_corpus("docs", KEY)
        mine.conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        restart(cluster)
        for _ in range(2):
            with pytest.raises(pyembed.DatabaseNotReady, match="may have changed its role"):
                docs.search("anything", k=1)
        mine.reconnect()
        assert docs.search("anything", k=1) == []
        assert mine._conn.execute("SELECT current_user").fetchone() == ("app_login",)


def test_a_new_connection_that_would_act_as_another_role_is_refused(
        cluster: LocalCluster, client: pyembed.Client, roles: tuple[str, str]) -> None:
    """The connection was never handed out, but a new one acts otherwise than it did (the
    login's default role changed meanwhile): refused, the same."""
    dsn, role = roles
    with pyembed.connect(dsn) as mine:
        docs = mine.create_corpus("docs", KEY)
        with psycopg.connect(cluster.dsn(owner=True), autocommit=True) as owner:
            owner.execute(sql.SQL("ALTER ROLE app_login SET role = {}").format(sql.Literal(role)))
        restart(cluster)
        with pytest.raises(pyembed.DatabaseNotReady,
                           match=r"acted as role 'app_login'.*a new one acts as 'other_tenant'"):
            docs.search("anything", k=1)
        with psycopg.connect(cluster.dsn(owner=True), autocommit=True) as owner:
            owner.execute("ALTER ROLE app_login RESET role")
        assert docs.search("anything", k=1) == []  # the same identity again: reconnected


def test_the_worker_survives_a_restart(cluster: LocalCluster, client: pyembed.Client,
                                      caplog: pytest.LogCaptureFixture) -> None:
    """Its next batch opens new connections: no lost batch, no warning, no wait."""
    client.create_corpus("docs", KEY)
    add = "SELECT pyembed.add_document('docs', %s, %s)"
    client.conn.execute(add, ("a", "first text"))
    worker = Worker(cluster.dsn())
    try:
        assert worker.run(drain=True, poll_interval=0.05, drain_wait=0.5).embedded == 1
        restart(cluster)
        with psycopg.connect(cluster.dsn(), autocommit=True) as app:
            app.execute(add, ("b", "second text"))
        with caplog.at_level(logging.WARNING, logger="pyembed.worker"):
            stats = worker.run(drain=True, poll_interval=0.05, drain_wait=0.5)
        assert stats.embedded == 1 and stats.errors == []
        assert "connection lost" not in caplog.text
    finally:
        worker.close()


def _worker_with_one_job(dsn: str) -> Worker:
    """A corpus with one queued document, made as `dsn`'s login, and a Worker on `dsn`."""
    with pyembed.connect(dsn) as mine:
        mine.create_corpus("docs", KEY)
        mine.conn.execute("SELECT pyembed.add_document('docs', 'a', 'first text')")
        mine.conn.commit()
    return Worker(dsn)


def test_a_role_set_on_the_workers_connection_is_never_dropped_by_a_reconnect(
        cluster: LocalCluster, client: pyembed.Client, roles: tuple[str, str]) -> None:
    """As for a Client: SET ROLE on worker.conn (public), then a restart: the next batch is
    DatabaseNotReady saying why, until worker.reconnect(). Before, the worker went on as the
    login, silently."""
    dsn, role = roles
    worker = _worker_with_one_job(dsn)
    try:
        worker.conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        worker.conn.commit()
        restart(cluster)
        for _ in range(2):
            with pytest.raises(pyembed.DatabaseNotReady,
                               match=r"worker\.conn was handed to your code.*worker\.reconnect"):
                worker.run(drain=True, poll_interval=0.05, drain_wait=0.5)
        worker.reconnect()
        assert worker.run(drain=True, poll_interval=0.05, drain_wait=0.5).embedded == 1
        assert worker.conn.execute("SELECT current_user").fetchone() == ("app_login",)
    finally:
        worker.close()


def test_a_worker_whose_new_connection_would_act_as_another_role_refuses_it(
        cluster: LocalCluster, client: pyembed.Client, roles: tuple[str, str]) -> None:
    """Never handed out, but a new connection acts otherwise than the first did (the login's
    default role changed meanwhile): refused, as a Client's."""
    dsn, role = roles
    worker = _worker_with_one_job(dsn)
    try:
        assert worker.run(drain=True, poll_interval=0.05, drain_wait=0.5).embedded == 1
        with psycopg.connect(cluster.dsn(owner=True), autocommit=True) as owner:
            owner.execute(sql.SQL("ALTER ROLE app_login SET role = {}").format(sql.Literal(role)))
        restart(cluster)
        with pytest.raises(pyembed.DatabaseNotReady,
                           match=r"acted as role 'app_login'.*a new one acts as 'other_tenant'"):
            worker.run(drain=True, poll_interval=0.05, drain_wait=0.5)
    finally:
        worker.close()
        with psycopg.connect(cluster.dsn(owner=True), autocommit=True) as owner:
            owner.execute("ALTER ROLE app_login RESET role")


def test_the_metrics_endpoint_answers_its_first_scrape_after_a_restart(
        cluster: LocalCluster) -> None:
    collector = PyembedCollector(cluster.dsn())
    assert up(collector) == 1.0
    restart(cluster)
    assert up(collector) == 1.0  # was 0: the scrape met the closed connection


def up(collector: PyembedCollector) -> float:
    (family,) = [f for f in collector.collect() if f.name == "pyembed_up"]
    return float(family.samples[0].value)


def test_a_metrics_collector_whose_new_connection_would_act_as_another_role_refuses_it(
        cluster: LocalCluster, roles: tuple[str, str], caplog: pytest.LogCaptureFixture) -> None:
    """As a Client's and a worker's (db.reopen): after a restart, a new connection that acts
    otherwise than the first did is closed and the scrape says pyembed_up 0, logging why,
    until collector.reconnect(). Before, the collector went on as the other role, silently."""
    dsn, role = roles
    collector = PyembedCollector(dsn)
    try:
        assert up(collector) == 1.0
        with psycopg.connect(cluster.dsn(owner=True), autocommit=True) as owner:
            owner.execute(sql.SQL("ALTER ROLE app_login SET role = {}").format(sql.Literal(role)))
        restart(cluster)
        with caplog.at_level(logging.WARNING, logger="pyembed.metrics"):
            assert up(collector) == 0.0
        assert "acted as role 'app_login'" in caplog.text
        assert "a new one acts as 'other_tenant'" in caplog.text
        collector.reconnect()
        assert up(collector) == 1.0
        assert collector._conn is not None
        assert collector._conn.execute("SELECT current_user").fetchone() == (role,)
    finally:
        collector.reconnect()
        with psycopg.connect(cluster.dsn(owner=True), autocommit=True) as owner:
            owner.execute("ALTER ROLE app_login RESET role")
