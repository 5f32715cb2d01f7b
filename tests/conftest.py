"""A real PostgreSQL for every database test: a local cluster in .pyembed-test/ of the repo.

Each test gets a fresh database cloned from a template that `pyembed install` brought to
head, plus connections as the owner and as the non-superuser application role.

Under pytest-xdist (`make test` runs `pytest -n 2`) each worker has a cluster of its own (gw0
the one in .pyembed-test/, gwN in .pyembed-test/gwN/), so that a test that changes cluster-wide
state (roles, settings, a standby) never meets another worker's tests. `--dist loadfile` keeps
a module's tests on one worker (test_localdb_port's tests take the ports of one another's
cluster), and the modules that make clusters of their own use `own_clusters`, which runs them
one at a time (`--dist loadgroup` split an xdist_group here: with pytest 9.2 and pytest-xdist
3.8 the node ids got no group suffix).
Like gw0's, each worker's cluster keeps running for the next run
(`PYEMBED_HOME=.pyembed-test/gw1 pyembed db stop` stops it).
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

import pyembed
from pyembed import schema
from pyembed.db import connect
from pyembed.localdb import APP_USER, OWNER, LocalCluster

pytest_plugins = ["tests.fakeapi.fixtures"]

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = "pyembed_template"


@dataclass
class Database:
    name: str
    owner_dsn: str
    app_dsn: str


def _dsn(cluster: LocalCluster, dbname: str, *, owner: bool) -> str:
    base = cluster.dsn(owner=owner)
    return base.rsplit("/", 1)[0] + "/" + dbname


BASE_HOME = Path(os.environ.get("PYEMBED_TEST_HOME", REPO / ".pyembed-test"))


def worker_home() -> Path:
    """This process's test cluster home: one per xdist worker."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return BASE_HOME if worker == "gw0" else BASE_HOME / worker


@contextmanager
def _one_at_a_time(name: str = "setup") -> Iterator[None]:
    """Workers make and start their clusters one after the other: two that chose a free port
    at once would both choose the same one."""
    BASE_HOME.mkdir(parents=True, exist_ok=True)
    with open(BASE_HOME / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


_own_clusters_held = False


@pytest.fixture(scope="module")
def own_clusters() -> Iterator[None]:
    """For a module whose tests make clusters (or standbys) of their own: each takes a free port
    seconds after choosing it, so two workers' such modules run one after the other (a lock of
    their own: a worker's session cluster does not wait for another worker's module)."""
    global _own_clusters_held
    with _one_at_a_time("own-clusters"):
        _own_clusters_held = True
        try:
            yield
        finally:
            _own_clusters_held = False


@pytest.fixture(scope="session", autouse=True)
def clusters_made_under_own_clusters() -> Iterator[None]:
    """A cluster or standby a test starts, other than its worker's, is started under
    own_clusters: else it races the other worker's for a free port (a standby of test_round_trips
    did), and the test fails only when they meet."""
    def checked(name: str) -> Any:
        real = getattr(LocalCluster, name)

        def call(self: LocalCluster, *args: Any, **kwargs: Any) -> Any:
            if self.home != worker_home() and not _own_clusters_held:
                raise AssertionError(f"LocalCluster.{name} of {self.home} outside own_clusters: "
                                     "use the own_clusters fixture in the module that makes it")
            return real(self, *args, **kwargs)
        return call

    mp = pytest.MonkeyPatch()
    for name in ("init", "start", "add_replica"):
        mp.setattr(LocalCluster, name, checked(name))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    with _one_at_a_time():
        c = LocalCluster(worker_home())
        c.init()
        c.start()
    # A throwaway cluster needs no flush to disk: without one, the CREATE DATABASE that gives
    # each test its database, and every commit, cost no wait for the disk.
    with _admin(c) as conn:
        conn.execute("ALTER SYSTEM SET fsync = off")
        conn.execute("SELECT pg_reload_conf()")
    yield c


def _admin(cluster: LocalCluster) -> psycopg.Connection[Any]:
    return psycopg.connect(_dsn(cluster, "postgres", owner=True), autocommit=True)


def create_database(cluster: LocalCluster, name: str, template: str | None = None) -> Database:
    with _admin(cluster) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        q = sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(OWNER))
        if template:
            q += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        conn.execute(q)
    return Database(name, _dsn(cluster, name, owner=True), _dsn(cluster, name, owner=False))


def drop_database(cluster: LocalCluster, name: str) -> None:
    with _admin(cluster) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def template_db(cluster: LocalCluster) -> Database:
    db = create_database(cluster, TEMPLATE)
    schema.install(db.owner_dsn)
    return db


@pytest.fixture
def empty_db(cluster: LocalCluster) -> Iterator[Database]:
    """A database with nothing installed."""
    db = create_database(cluster, f"t_{uuid.uuid4().hex[:12]}")
    yield db
    drop_database(cluster, db.name)


@pytest.fixture
def db(cluster: LocalCluster, template_db: Database) -> Iterator[Database]:
    """A fresh database at head."""
    db = create_database(cluster, f"t_{uuid.uuid4().hex[:12]}", template=template_db.name)
    yield db
    drop_database(cluster, db.name)


@pytest.fixture
def owner(db: Database) -> Iterator[psycopg.Connection[Any]]:
    with connect(db.owner_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def client(db: Database) -> Iterator[pyembed.Client]:
    """A pyembed client as the application role."""
    with pyembed.connect(db.app_dsn) as c:
        yield c


@pytest.fixture
def owner_client(db: Database) -> Iterator[pyembed.Client]:
    """A pyembed client as the owner (the model registry, tenants, migrations are its)."""
    with pyembed.connect(db.owner_dsn) as c:
        yield c


@pytest.fixture
def app(db: Database) -> Iterator[psycopg.Connection[Any]]:
    with connect(db.app_dsn, autocommit=True) as conn:
        yield conn


def pytest_report_header(config: pytest.Config) -> list[str]:
    try:
        with _one_at_a_time():
            c = LocalCluster(BASE_HOME)
            c.init()
            c.start()
        with psycopg.connect(_dsn(c, "postgres", owner=True)) as conn:
            server = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            exts = conn.execute("SELECT string_agg(name || ' ' || default_version, ', ') "
                                "FROM pg_available_extensions WHERE name IN "
                                "('vector', 'plpython3u')").fetchone()[0]  # type: ignore[index]
        return [f"pyembed: PostgreSQL {server}; {exts}; app role {APP_USER}"]
    except Exception as exc:  # the header must never break the run
        return [f"pyembed: test cluster not reachable yet ({exc})"]


@pytest.fixture
def plain(db: Database, owner: psycopg.Connection[Any]) -> Iterator[str]:
    """A login role with CONNECT on the database and nothing else (no tenant, no pyembed role);
    yields its DSN."""
    role = f"plain_{uuid.uuid4().hex[:6]}"
    owner.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw'").format(sql.Identifier(role)))
    owner.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
        sql.Identifier(db.name), sql.Identifier(role)))
    yield db.app_dsn.split("//", 1)[0] + f"//{role}:pw@" + db.app_dsn.split("@", 1)[1]
    owner.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
    owner.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
