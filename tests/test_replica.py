"""Searches served by a hot standby of the test cluster (made here with pg_basebackup -R): the
read path writes nothing there, the guard holds there, accounting stays on the primary, and a
replica that lags gives a clear answer instead of a silent empty result."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from prometheus_client import generate_latest
from psycopg import sql

import pyembed
from pyembed import health, schema
from pyembed.localdb import LocalCluster
from tests.conftest import Database, _dsn
from tests.helpers import run_cli
from tests.test_tenants import two  # noqa: F401  (the fixture: two tenants' DSNs)

pytestmark = pytest.mark.usefixtures("own_clusters")  # it makes clusters (conftest)

KEY = "fake/fake-hash@1:384"
OTHER = "fake/fake-hash@2:384"
DOCS = [(f"d{i}", f"error E40{i:02d} means the quota number {i} is used up") for i in range(30)]


@pytest.fixture(scope="module")
def standby(own_clusters: None, cluster: LocalCluster) -> Iterator[LocalCluster]:
    name = f"t{uuid.uuid4().hex[:6]}"
    replica = cluster.add_replica(name)
    yield replica
    cluster.remove_replica(name)


@pytest.fixture
def read_dsn(standby: LocalCluster, db: Database) -> str:
    wait_for(standby, db, "the database")
    return _dsn(standby, db.name, owner=False)


def wait_for(standby: LocalCluster, db: Database, query: str) -> None:
    """Until the standby has replayed what the primary committed before this call."""
    with psycopg.connect(db.owner_dsn, autocommit=True) as primary:
        lsn = primary.execute("SELECT pg_current_wal_lsn()").fetchone()
    with psycopg.connect(_dsn(standby, "postgres", owner=True), autocommit=True) as conn:
        for _ in range(500):
            row = conn.execute("SELECT pg_last_wal_replay_lsn() >= %s", lsn).fetchone()
            if row and row[0]:
                return
            conn.execute("SELECT pg_sleep(0.01)")
    raise AssertionError(f"the standby did not replay {query}")


def requests(owner: psycopg.Connection[Any]) -> int:
    row = owner.execute("SELECT coalesce(sum(requests), 0)::int FROM pyembed.usage").fetchone()
    return int(row[0]) if row else 0


def test_every_search_mode_on_the_standby_returns_what_the_primary_returns(
        db: Database, read_dsn: str, owner: psycopg.Connection[Any]) -> None:
    with pyembed.connect(db.app_dsn) as primary, \
            pyembed.connect(db.app_dsn, read_dsn=read_dsn) as split:
        split.create_corpus("docs", KEY).add(DOCS)  # the split client waits for its own writes
        docs, on_primary = split.corpus("docs"), primary.corpus("docs")
        assert split.read_conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        for mode in ("vector", "keyword", "hybrid"):
            got = [(h.document_id, round(h.score, 5)) for h in docs.search("E4007 quota", mode=mode)]
            want = [(h.document_id, round(h.score, 5))
                    for h in on_primary.search("E4007 quota", mode=mode)]
            assert got == want and got, mode
        vector = split.embedder(KEY).embed_query("E4007 quota")
        assert docs.search(vector, model_key=KEY)[0].document_id == \
            on_primary.search(vector, model_key=KEY)[0].document_id
        # The guard holds on the standby: another model's key is refused there too.
        with pytest.raises(pyembed.ModelMismatch):
            docs.search(vector, model_key=OTHER)
        # Accounting stayed on the primary: the queries' embeddings were reserved there.
        assert requests(owner) > 0


def test_sql_on_the_standby_searches_and_refuses_only_what_would_write(
        db: Database, standby: LocalCluster, read_dsn: str) -> None:
    with pyembed.connect(db.app_dsn) as client:
        client.create_corpus("docs", KEY).add(DOCS)
        client.conn.execute("SELECT pyembed.embed('cached query', %s, 'query')", (KEY,))
    wait_for(standby, db, "the corpus")
    with psycopg.connect(read_dsn, autocommit=True) as conn:
        vec = conn.execute("SELECT pyembed.embed('cached query', %s, 'query')", (KEY,)).fetchone()
        assert vec is not None  # a cache hit needs no provider call and no write
        hits = conn.execute("SELECT document_id FROM pyembed.search('docs', %s, %s, 3)",
                            (vec[0], KEY)).fetchall()
        assert len(hits) == 3
        assert conn.execute("SELECT count(*) FROM pyembed.search_text('docs', 'cached query', 3)"
                            ).fetchone() == (3,)
        assert conn.execute("SELECT count(*) FROM pyembed.search_keyword('docs', 'E4007', 3)"
                            ).fetchone() == (1,)
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT * FROM pyembed.search('docs', %s, %s, 3)", (vec[0], OTHER))
        assert err.value.sqlstate == "PE001"
        with pytest.raises(psycopg.Error) as err:  # a miss would have to account a call
            conn.execute("SELECT * FROM pyembed.search_text('docs', 'never asked before', 3)")
        assert err.value.sqlstate == "PE011"
        assert "embed on the primary" in (err.value.diag.message_hint or "")


def test_a_corpus_too_new_for_a_lagging_replica_is_a_clear_error(
        db: Database, standby: LocalCluster, read_dsn: str) -> None:
    with psycopg.connect(_dsn(standby, db.name, owner=True), autocommit=True) as replay:
        replay.execute("SELECT pg_wal_replay_pause()")
        try:
            with pyembed.connect(db.app_dsn) as writer:  # another client: no read-your-writes
                writer.create_corpus("fresh", KEY).add(DOCS[:3])
            with pyembed.connect(db.app_dsn, read_dsn=read_dsn) as reader:
                with pytest.raises(pyembed.ReadOnlyReplica, match="not on the read replica yet"):
                    reader.corpus("fresh").search("quota")
                reader.max_replica_wait = 0.3
                reader.corpus("fresh").add([("late", "a document the replica has not seen")])
                with pytest.raises(pyembed.ReadOnlyReplica, match="has not replayed"):
                    reader.corpus("fresh").search("quota")
        finally:
            replay.execute("SELECT pg_wal_replay_resume()")


def test_a_multi_host_read_dsn_skips_a_stopped_standby(db: Database, standby: LocalCluster,
                                                       cluster: LocalCluster) -> None:
    with pyembed.connect(db.app_dsn) as client:
        client.create_corpus("docs", KEY).add(DOCS)
    wait_for(standby, db, "the corpus")
    app = psycopg.conninfo.conninfo_to_dict(db.app_dsn)
    multi = psycopg.conninfo.make_conninfo(
        host="127.0.0.1,127.0.0.1", port=f"{standby.state().port},{cluster.state().port}",
        dbname=db.name, user=app["user"], password=app["password"],
        target_session_attrs="prefer-standby")
    with pyembed.connect(db.app_dsn, read_dsn=multi) as client:
        assert client.read_conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        assert client.corpus("docs").search("quota", k=2)
    standby.stop()
    try:
        with pyembed.connect(db.app_dsn, read_dsn=multi) as client:  # libpq moves on
            assert client.read_conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
            assert client.corpus("docs").search("quota", k=2)
        dead = psycopg.conninfo.make_conninfo(multi, host="127.0.0.1",
                                              port=str(standby.state().port))
        with pytest.raises(pyembed.DatabaseNotReady, match="no server of the read DSN"):
            pyembed.connect(db.app_dsn, read_dsn=dead)
    finally:
        standby.start()


def test_the_cli_makes_lists_and_removes_a_replica_and_status_shows_its_lag(
        cluster: LocalCluster, db: Database) -> None:
    env = {"PYEMBED_HOME": str(cluster.home), "PYEMBED_DSN": db.app_dsn, "COLUMNS": "200"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, env=env)

    name = f"c{uuid.uuid4().hex[:6]}"
    made = cli("db", "replica", "add", name)
    assert made.returncode == 0, made.stderr
    try:
        read_dsn = made.stdout.strip()
        with psycopg.connect(read_dsn) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        listed = cli("db", "replica", "list")
        assert name in listed.stdout and "bytes" in listed.stdout, listed.stdout
        status = cli("status")
        assert "replica" in status.stdout and "bytes behind" in status.stdout, status.stdout
    finally:
        removed = cli("db", "replica", "remove", name)
    assert removed.returncode == 0 and "removed" in removed.stdout
    assert name not in cli("db", "replica", "list").stdout


def as_role(dsn: str, role: str, password: str) -> str:
    """The same DSN logging in as another role."""
    return psycopg.conninfo.make_conninfo(dsn, user=role, password=password)


def test_the_search_command_with_a_read_dsn_finds_what_it_finds_on_the_primary(
        db: Database, standby: LocalCluster, read_dsn: str) -> None:
    with pyembed.connect(db.app_dsn) as client:
        client.create_corpus("docs", KEY).add(DOCS)
    wait_for(standby, db, "the corpus")
    env = {"PYEMBED_DSN": db.app_dsn, "COLUMNS": "200"}

    def search(mode: str, read: str | None) -> list[str]:
        out = run_cli("search", "docs", "E4007 quota", "-k", "5", "--mode", mode,
                      env={**env, "PYEMBED_READ_DSN": read} if read else env)
        assert out.returncode == 0, out.stderr
        rows = [[c.strip() for c in line.split("│")] for line in out.stdout.splitlines()]
        return [r[3] for r in rows if len(r) > 3 and r[1].isdigit()]  # the document column

    for mode in ("vector", "keyword", "hybrid"):
        on_primary = search(mode, None)
        assert on_primary and search(mode, read_dsn) == on_primary, mode
    # The command reads PYEMBED_READ_DSN: a read DSN that cannot connect is its error.
    nowhere = psycopg.conninfo.make_conninfo(read_dsn, dbname="no_such_database")
    bad = run_cli("search", "docs", "quota", env={**env, "PYEMBED_READ_DSN": nowhere})
    assert bad.returncode == 1 and "no server of the read DSN" in bad.stderr, bad.stderr


def test_the_orm_guarded_select_runs_on_the_standby_and_refuses_another_key_there(
        db: Database, standby: LocalCluster, read_dsn: str) -> None:
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from pyembed import orm
    from pyembed.schema import sqlalchemy_url

    with pyembed.connect(db.app_dsn) as client:
        client.create_corpus("kb", KEY).add(DOCS)
        vec = client.embedder(KEY).embed_query("quota number 7")
        want = [h.document_id for h in client.corpus("kb").search(vec, k=3, model_key=KEY)]
    wait_for(standby, db, "the corpus")
    engine = sa.create_engine(sqlalchemy_url(read_dsn))
    try:
        with Session(engine) as session:
            assert session.scalar(sa.select(sa.func.pg_is_in_recovery())) is True
            rows = session.execute(orm.search("kb", vec, KEY, k=3)).all()
            assert [r.document_id for r in rows] == want and rows[0].model_key == KEY
            with pytest.raises(pyembed.ModelMismatch) as err:  # (pyembed.orm's handle_error)
                session.execute(orm.search("kb", vec, OTHER, k=3)).all()
            assert isinstance(err.value.__cause__, psycopg.Error)
            assert err.value.__cause__.sqlstate == "PE001"
    finally:
        engine.dispose()


def test_a_tenants_rate_limit_holds_when_its_searches_run_on_the_standby(
        db: Database, standby: LocalCluster, read_dsn: str,
        owner: psycopg.Connection[Any]) -> None:
    from psycopg import sql

    from pyembed import tenants

    role = f"tr_{uuid.uuid4().hex[:6]}"
    tenants.create_tenant(owner, "limited", requests_per_minute=3)
    tenants.add_member(owner, "limited", role, create_login="pw")
    wait_for(standby, db, "the tenant's login role")
    try:
        with pyembed.connect(as_role(db.app_dsn, role, "pw"),
                             read_dsn=as_role(read_dsn, role, "pw")) as client:
            assert client.read_conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
            kb = client.create_corpus("kb", KEY)
            kb.add(DOCS[:5])  # one provider call: request 1
            assert kb.search("first question")  # a cache miss: request 2
            assert kb.search("first question")  # a cache hit: no request
            assert kb.search("second question")  # request 3
            with pytest.raises(pyembed.RateLimited, match="tenant limited is over its rate limit"):
                kb.search("third question")
            assert [(r.tenant, r.corpus, r.model_key, r.requests)
                    for r in tenants.usage(client.conn)] == [("limited", "kb", KEY, 3)]
        assert requests(owner) == 3  # pyembed.usage on the primary, read by the owner
    finally:
        owner.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
        owner.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_every_read_command_answers_on_the_standby(
        db: Database, standby: LocalCluster, read_dsn: str) -> None:
    """Status, doctor, recall, metrics and the listings pointed at the standby: each answers
    and none tries to write (a hot standby refuses every write)."""
    with pyembed.connect(db.app_dsn) as client:
        client.create_corpus("docs", KEY).add(DOCS)
        list(client.corpus("docs").search("E4007 quota", k=3))
    wait_for(standby, db, "the corpus")
    env = {"PYEMBED_DSN": read_dsn, "COLUMNS": "200"}
    for args in (("status",), ("doctor",), ("recall", "docs", "--queries", "5"), ("usage",),
                 ("cache", "stats"), ("corpus", "list"), ("corpus", "show", "docs"),
                 ("models",), ("migrate", "status", "docs"),
                 ("search", "docs", "E4007 quota", "-k", "3")):
        out = run_cli(*args, "--json", env=env)
        assert out.returncode == 0, (args, out.stdout, out.stderr)
        if args == ("doctor",):
            checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
            assert checks["PL/Python imports pyembed"]["status"] == "ok", checks
    from pyembed import metrics

    text = generate_latest(metrics.registry(read_dsn)).decode()
    assert "pyembed_up 1.0" in text, text


SECRET = "the merger plan of tenant a: acquire Initech in March"


def test_a_replica_shows_no_tenant_another_tenants_statements(
        standby: LocalCluster, db: Database, owner: psycopg.Connection[Any],
        two: dict[str, str]) -> None:  # noqa: F811
    """`pyembed db replica add` granted pg_monitor to pyembed_app, the group of every tenant's
    login, for `pyembed status`'s replica lag: every tenant then read every session's statement
    in pg_stat_activity, another tenant's documents and queries included. The lag comes from
    pyembed.replica_lag() now, and status still shows it."""
    wait_for(standby, db, "the database")
    with psycopg.connect(two["a"], autocommit=True) as a, \
            psycopg.connect(two["b"], autocommit=True) as b:
        a.execute("SELECT pyembed.create_corpus('docs', %s)", (KEY,))
        # The text in the statement, as psql and drivers that bind on the client send it.
        a.execute(sql.SQL("SELECT pyembed.add_document('docs', 'plan', {})").format(
            sql.Literal(SECRET)))
        seen = b.execute("SELECT pid, query FROM pg_stat_activity WHERE query LIKE %s",
                         (f"%{SECRET[:20]}%",)).fetchall()
        assert [q for _, q in seen if SECRET[:20] in q and "pg_stat_activity" not in q] == [], seen
        assert b.execute("SELECT pg_has_role('pyembed_app', 'pg_read_all_stats', 'USAGE')"
                         ).fetchone() == (False,)
        lag = [f for f in health.replicas(b) if f.subject == standby.home.name]
        assert lag and "bytes behind" in lag[0].value, lag


def test_an_install_takes_back_what_reads_past_the_tenant_policies(
        db: Database, owner: psycopg.Connection[Any]) -> None:
    """A database where pyembed_app was given pg_monitor (by `pyembed db replica add` before,
    or by hand) loses it at its next install: it showed every tenant every session's
    statement. So does pg_write_all_data, whose table-level DELETE lets a tenant LOCK any
    table of pyembed in any mode."""
    member = ("SELECT pg_has_role('pyembed_app', 'pg_read_all_stats', 'USAGE'), "
              "pg_has_role('pyembed_worker', 'pg_read_all_data', 'USAGE'), "
              "pg_has_role('pyembed_app', 'pg_write_all_data', 'USAGE'), "
              "pg_has_role('pyembed_operator', 'pg_read_all_stats', 'USAGE')")
    owner.execute("GRANT pg_monitor TO pyembed_app")
    owner.execute("GRANT pg_read_all_stats TO pyembed_operator")
    owner.execute("GRANT pg_read_all_data TO pyembed_worker")
    owner.execute("GRANT pg_write_all_data TO pyembed_app")
    try:
        assert owner.execute(member).fetchone() == (True, True, True, True)
        schema.install(db.owner_dsn)
        assert owner.execute(member).fetchone() == (False, False, False, False)
    finally:
        for granted, group in (("pg_monitor", "pyembed_app"), ("pg_read_all_data",
                                                                "pyembed_worker"),
                               ("pg_write_all_data", "pyembed_app"),
                               ("pg_read_all_stats", "pyembed_operator")):
            if owner.execute("SELECT pg_has_role(%s, %s, 'MEMBER')", (group, granted)
                             ).fetchone() == (True,):
                owner.execute(sql.SQL("REVOKE {} FROM {}").format(
                    sql.Identifier(granted), sql.Identifier(group)))


def test_every_python_write_on_the_standby_is_read_only_replica_naming_the_primary(
        db: Database, standby: LocalCluster, read_dsn: str) -> None:
    """A client or a worker whose DSN is a standby's: each write is ReadOnlyReplica (PE011)
    saying to write on the primary. Before, a Worker's batch raised psycopg's own
    ReadOnlySqlTransaction with its SQL CONTEXT, and Corpus.add's refusal gave a query's advice
    only (embed on the primary and search here)."""
    from pyembed.worker import Worker

    with pyembed.connect(db.app_dsn) as client:
        client.create_corpus("docs", KEY).add(DOCS[:3])
        client.conn.execute("SELECT pyembed.add_document('docs', 'queued', 'for a worker')")
    wait_for(standby, db, "the corpus")
    with pyembed.connect(read_dsn) as on_standby:
        docs = on_standby.corpus("docs")
        with pytest.raises(pyembed.ReadOnlyReplica, match="documents are added on the primary"):
            docs.add([("new", "a document written on a standby")])
        for write in (lambda: docs.delete(["d0"]),
                      lambda: on_standby.create_corpus("other", KEY),
                      lambda: on_standby.drop_corpus("docs")):
            with pytest.raises(pyembed.ReadOnlyReplica, match="run it on the primary"):
                write()
    with Worker(read_dsn) as worker:
        assert worker.pending() == 1  # reading the queue is no write
        with pytest.raises(pyembed.ReadOnlyReplica, match="run it on the primary"):
            worker.run_once()


def test_doctor_on_the_standby_says_it_is_one_and_asks_no_worker_there(
        db: Database, standby: LocalCluster, read_dsn: str) -> None:
    """Before, doctor on a standby said nothing of it: "replicas' lag: no streaming replicas",
    and with old queued work "worker alive: ... — fix: run `pyembed worker`", which cannot write
    there. Now the server line names a standby, the worker check is skipped for the primary, and
    the replicas' line says where its replicas are and how old its last replayed commit is."""
    with pyembed.connect(db.app_dsn) as client:
        client.create_corpus("docs", KEY)
        client.conn.execute("SELECT pyembed.add_document('docs', 'queued', 'for a worker')")
    wait_for(standby, db, "the queued document")
    out = run_cli("doctor", "--json", env={"PYEMBED_DSN": read_dsn})
    assert out.returncode == 0, out.stdout + out.stderr
    checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
    assert checks["server reachable"]["detail"].endswith("(a standby: read-only, it serves "
                                                         "searches)"), checks
    worker = checks["worker alive"]
    assert worker["status"] == "skip" and worker["detail"].startswith(
        "a standby (1 queued on its primary"), worker
    lag = checks["replicas' lag"]
    assert lag["status"] == "ok" and lag["detail"].startswith(
        "this server is a standby: its replicas are its primary's"), lag
    out = run_cli("doctor", "--json", env={"PYEMBED_DSN": db.app_dsn})
    checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
    assert "standby" not in checks["server reachable"]["detail"]
    assert checks["worker alive"]["status"] == "ok", checks
