"""One worker and one exporter for every tenant (revision 0037): a login in pyembed_operator
works each tenant's queue acting for that tenant (its partitions, cache, usage and limits, with
row-level security forced), the tenants taking turns; a tenant's own login still sees its own
tenant only, and no application login gains that reach."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pyembed
from pyembed import health, tenants
from pyembed.db import connect
from pyembed.doctor import check_worker
from pyembed.localdb import APP_USER, WORKER_USER, LocalCluster
from pyembed.metrics import registry
from pyembed.worker import Worker
from tests.conftest import Database
from tests.helpers import login_role, run_cli
from tests.test_worker import RecordingProvider, fake_embedder, held_beside

KEY = "fake/fake-hash@1:384"


@pytest.fixture
def operator(db: Database, owner: psycopg.Connection[Any]) -> Iterator[str]:
    """The DSN of a login as the local cluster's worker login is made: in pyembed_app,
    pyembed_worker and pyembed_operator, a member of no tenant."""
    with login_role(owner, db.app_dsn, "op", sql.SQL(
            "IN ROLE pyembed_app, pyembed_worker, pyembed_operator")) as dsn:
        yield dsn


def member(db: Database, owner: psycopg.Connection[Any], tenant: str,
           rpm: int | None = None) -> str:
    """A new tenant with one member login; its DSN (the login is dropped with the database's
    roles by the test's cleanup, `dropped`)."""
    role = f"m_{tenant}_{uuid.uuid4().hex[:6]}"
    tenants.create_tenant(owner, tenant, requests_per_minute=rpm)
    tenants.add_member(owner, tenant, role, create_login="pw")
    _made.append(role)
    return make_conninfo(db.app_dsn, user=role, password="pw")


_made: list[str] = []


@pytest.fixture(autouse=True)
def dropped(owner: psycopg.Connection[Any]) -> Iterator[None]:
    yield
    for role in _made:
        owner.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE usename = %s", (role,))
        owner.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
        owner.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    _made.clear()


def add(dsn: str, corpus: str, n: int, prefix: str = "d") -> None:
    """`n` documents queued in the login's tenant's corpus (made if need be), through
    pyembed.add_document, which queues them for the worker (an application's SQL path)."""
    with connect(dsn, autocommit=True) as conn:
        if conn.execute("SELECT FROM pyembed.corpora WHERE name = %s", (corpus,)).fetchone() is None:
            conn.execute("SELECT pyembed.create_corpus(%s, %s)", (corpus, KEY))
        with conn.cursor() as cur:
            cur.executemany("SELECT pyembed.add_document(%s, %s, %s)",
                            [(corpus, f"{prefix}{i}", f"text {prefix} {i} of {corpus}")
                             for i in range(n)])


def vectors(dsn: str, corpus: str) -> int:
    """Vectors of the login's tenant's corpus, counted as that login sees them."""
    with connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM pyembed.vectors v JOIN pyembed.corpora c "
                           "USING (corpus_id) WHERE c.name = %s", (corpus,)).fetchone()
    return int(row[0]) if row else 0


def queued(dsn: str) -> int:
    with connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM pyembed.queue").fetchone()
    return int(row[0]) if row else 0


def test_a_tenant_made_after_the_worker_started_is_embedded_by_it(
        db: Database, owner: psycopg.Connection[Any], operator: str) -> None:
    """The default worker's login acted for no tenant: a tenant's add_document stayed queued for
    ever. Now the one worker, started before the tenant existed, embeds its documents, writing
    into that tenant's partition acting for it, and its own corpus of no tenant's as well."""
    add(db.app_dsn, "docs", 2)
    with Worker(operator, batch_size=8) as worker:
        assert worker.run(drain=True, drain_wait=0).embedded == 2
        acme = member(db, owner, "acme")
        add(acme, "docs", 3)  # the same corpus name, the tenant's own corpus
        stats = worker.run(drain=True, drain_wait=0)
    assert stats.embedded == 3 and not stats.errors
    assert vectors(acme, "docs") == 3 and queued(acme) == 0
    assert vectors(db.app_dsn, "docs") == 2


def test_tenants_take_turns_so_a_long_queue_starves_no_one(
        db: Database, owner: psycopg.Connection[Any], operator: str) -> None:
    """A tenant's long queue, queued first, would be drained before another tenant's one job
    (claims take the oldest jobs first). Tenants with due jobs take turns, a batch each: the
    one job is embedded in the second batch."""
    big, small = member(db, owner, "big"), member(db, owner, "small")
    add(big, "docs", 40)
    add(small, "docs", 1)
    with Worker(operator, batch_size=5) as worker:
        first = worker.run_once()
        second = worker.run_once()
        assert first.embedded == 5 and second.embedded == 1
        assert vectors(small, "docs") == 1 and vectors(big, "docs") == 5
        worker.run(drain=True, drain_wait=0)
    assert vectors(big, "docs") == 40


def test_each_job_is_worked_under_its_tenants_limits_usage_and_cache(
        db: Database, owner: psycopg.Connection[Any], operator: str) -> None:
    """Provider calls are reserved for the job's tenant: its usage rows and cache entries, and
    a tenant over its requests per minute waits for the next minute while the others go on."""
    limited, free = member(db, owner, "limited", rpm=1), member(db, owner, "free")
    add(limited, "a", 2)
    add(limited, "b", 2)  # a second corpus: a second call, over the limit of 1 a minute
    add(free, "docs", 3)
    with Worker(operator, batch_size=16) as worker:
        stats = worker.run(drain=True, drain_wait=0)
    assert stats.embedded == 5 and stats.retried == 2
    assert any("over its rate limit" in e for e in stats.errors)
    rows = owner.execute("SELECT t.name, sum(u.requests) FROM pyembed.usage u "
                         "JOIN pyembed.tenants t USING (tenant_id) GROUP BY 1 ORDER BY 1"
                         ).fetchall()
    assert rows == [("free", 1), ("limited", 1)]
    for dsn, entries in ((limited, 2), (free, 3)):
        with connect(dsn) as conn:
            assert conn.execute("SELECT coalesce(sum(entries), 0) FROM "
                                "(SELECT max(entries) AS entries FROM pyembed.cache_report(1) "
                                "GROUP BY model_key) e").fetchone() == (entries,)
    assert queued(limited) == 2 and queued(free) == 0


def test_a_members_worker_sees_its_own_tenant_only(
        db: Database, owner: psycopg.Connection[Any]) -> None:
    """A tenant's login running `pyembed worker` works its own tenant's jobs only, whatever
    tenant it names (its pyembed.act_as_tenant changes nothing), and so does an application
    login of no tenant (the untenanted corpora's)."""
    a, b = member(db, owner, "a"), member(db, owner, "b")
    add(a, "docs", 2)
    add(b, "docs", 3)
    add(db.app_dsn, "docs", 1)
    with Worker(a) as worker:
        assert worker.run(drain=True, drain_wait=0).embedded == 2
        assert worker.pending() == 0
    named_b = make_conninfo(a, options="-c pyembed.act_as_tenant=b")
    with Worker(named_b) as worker:
        assert worker.run(drain=True, drain_wait=0).embedded == 0
    with Worker(make_conninfo(db.app_dsn, options="-c pyembed.act_as_tenant=b")) as worker:
        assert worker.run(drain=True, drain_wait=0).embedded == 1
    assert queued(b) == 3 and vectors(b, "docs") == 0


def test_no_tenants_login_gains_the_operators_reach(
        db: Database, owner: psycopg.Connection[Any]) -> None:
    """A login in pyembed_operator cannot be made a tenant's member, and a member granted
    pyembed_operator afterwards still acts for its own tenant only."""
    a, b = member(db, owner, "a"), member(db, owner, "b")
    add(b, "docs", 2)
    with login_role(owner, db.app_dsn, "opm", sql.SQL(
            "IN ROLE pyembed_app, pyembed_operator")) as dsn:
        role = psycopg.conninfo.conninfo_to_dict(dsn)["user"]
        with pytest.raises(pyembed.InvalidInput, match="is in pyembed_operator"):
            tenants.add_member(owner, "a", str(role))
    role_a = psycopg.conninfo.conninfo_to_dict(a)["user"]
    owner.execute(sql.SQL("GRANT pyembed_operator TO {}").format(sql.Identifier(str(role_a))))
    with connect(make_conninfo(a, options="-c pyembed.act_as_tenant=b")) as conn:
        assert conn.execute("SELECT * FROM pyembed.acting_tenants()").fetchall() == [(None, "a")]
        assert conn.execute("SELECT count(*) FROM pyembed.queue").fetchone() == (0,)
    with Worker(a) as worker:
        assert worker.run(drain=True, drain_wait=0).embedded == 0
    assert queued(b) == 2


def test_one_exporter_reports_every_tenant_and_a_tenants_its_own(
        db: Database, owner: psycopg.Connection[Any], operator: str) -> None:
    """`pyembed metrics serve` as the operator's login labels each tenant's figures with its
    name; as a tenant's login, its own tenant's only."""
    a, b = member(db, owner, "a"), member(db, owner, "b")
    add(a, "docs", 2)
    add(b, "kb", 3)

    def depths(dsn: str) -> dict[tuple[str, str], float]:
        out = {}
        for family in registry(dsn).collect():
            if family.name == "pyembed_queue_depth":
                for s in family.samples:
                    out[s.labels["tenant"], s.labels["corpus"]] = s.value
        return out

    assert depths(operator) == {("a", "docs"): 2, ("b", "kb"): 3}
    assert depths(a) == {("a", "docs"): 2}


def test_status_and_doctor_as_the_operator_name_each_tenants_figures(
        db: Database, owner: psycopg.Connection[Any], operator: str) -> None:
    """`pyembed status` run by the operator's login lists each tenant's corpora (its findings
    name their tenant) and `doctor`'s queue check counts every tenant's queue; a tenant's login
    sees its own only, as before."""
    a, b = member(db, owner, "a"), member(db, owner, "b")
    add(a, "docs", 2)
    add(b, "kb", 3)
    with connect(operator, autocommit=True) as conn:
        coverage = {(f.tenant, f.subject) for f in health.report(conn) if f.area == "coverage"}
        assert check_worker(conn).detail.startswith("5 queued")
    assert coverage == {("a", "docs [active] fake/fake-hash@1:384"),
                        ("b", "kb [active] fake/fake-hash@1:384")}
    with connect(a, autocommit=True) as conn:
        coverage = {(f.tenant, f.subject) for f in health.report(conn) if f.area == "coverage"}
        assert check_worker(conn).detail.startswith("2 queued")
    assert coverage == {("", "docs [active] fake/fake-hash@1:384")}


def test_an_operators_worker_naming_one_tenant_works_that_one_or_says_it_is_none(
        db: Database, owner: psycopg.Connection[Any], operator: str) -> None:
    """The operator's login whose session names a tenant (PGOPTIONS, as the owner's) works that
    tenant's queue alone; a name no tenant has is PE005 in one line, not no tenant."""
    a, b = member(db, owner, "a"), member(db, owner, "b")
    add(a, "docs", 2)
    add(b, "docs", 3)
    with Worker(make_conninfo(operator, options="-c pyembed.act_as_tenant=b")) as worker:
        assert worker.run(drain=True, drain_wait=0).embedded == 3
    assert queued(a) == 2
    with Worker(make_conninfo(operator, options="-c pyembed.act_as_tenant=nope")) as worker, \
            pytest.raises(pyembed.InvalidInput, match="names no tenant: 'nope'"):
        worker.run(drain=True, drain_wait=0)


def test_the_local_clusters_worker_login_works_and_reports_every_tenant(
        cluster: LocalCluster, db: Database, owner: psycopg.Connection[Any]) -> None:
    """The local cluster's worker login (what `pyembed worker` and `metrics serve` use by
    default there, and what `make demo`'s cluster has) is in pyembed_operator, its application
    login is not; `pyembed worker` as it embeds a tenant's queued documents."""
    member_of = "SELECT pg_has_role(%s, 'pyembed_operator', 'MEMBER')"
    assert owner.execute(member_of, (WORKER_USER,)).fetchone() == (True,)
    assert owner.execute(member_of, (APP_USER,)).fetchone() == (False,)
    acme = member(db, owner, "acme")
    add(acme, "docs", 2)
    password = conninfo_to_dict(cluster.dsn(worker=True))["password"]
    worker_dsn = make_conninfo(db.app_dsn, user=WORKER_USER, password=password)
    out = run_cli("worker", env={"PYEMBED_WORKER_DSN": worker_dsn, "PYEMBED_DSN": db.app_dsn})
    assert out.returncode == 0 and "embedded 2," in out.stdout, out.stdout + out.stderr
    assert vectors(acme, "docs") == 2


def test_the_operators_lease_on_a_tenants_batch_is_renewed_acting_for_that_tenant(
        db: Database, owner: psycopg.Connection[Any], operator: str) -> None:
    """The lease renewal runs on a connection of its own: renewing a tenant's jobs as the
    operator's login itself (no tenant) renewed none, and the tenant's own worker took over a
    batch still in flight. Renewed acting for the batch's tenant, the batch stays the operator
    worker's while its slow call lasts several leases."""
    acme = member(db, owner, "acme")
    add(acme, "docs", 3)
    providers: list[RecordingProvider] = []
    worker = Worker(operator, lease_seconds=0.6, recall_every=0,
                    embedder_for=fake_embedder(providers, lambda p, batch: time.sleep(2.0)))
    others: list[RecordingProvider] = []
    other = Worker(acme, lease_seconds=0.6, recall_every=0, embedder_for=fake_embedder(others))
    stats = held_beside(worker, other, providers, "the tenant's worker")
    assert stats.embedded == 3 and not others
    assert vectors(acme, "docs") == 3


def test_an_operator_login_made_after_the_install_writes_once_it_runs_again(
        db: Database, owner: psycopg.Connection[Any]) -> None:
    """Each partition grants its INSERT to each operator's login by name (never to the group,
    which reached a tenant's login granted pyembed_operator later): a login granted
    pyembed_operator after the tenant's corpus was made writes nothing of it, and says so in one
    line that names the fix, `pyembed install` (doctor warns of it too, test_privileges); once
    the owner has run it, the same worker embeds the tenant's queue."""
    from pyembed import schema

    acme = member(db, owner, "acme")
    add(acme, "docs", 2)
    with login_role(owner, db.app_dsn, "late", sql.SQL(
            "IN ROLE pyembed_app, pyembed_worker, pyembed_operator")) as late:
        out = run_cli("worker", env={"PYEMBED_WORKER_DSN": late})
        assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out
        assert "since the last `pyembed install`" in out.stderr, out
        assert vectors(acme, "docs") == 0
        schema.install(db.owner_dsn)
        out = run_cli("worker", env={"PYEMBED_WORKER_DSN": late})
        assert out.returncode == 0, out
        assert vectors(acme, "docs") == 2 and queued(acme) == 0
