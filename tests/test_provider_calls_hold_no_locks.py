"""No lock is held across an HTTP call to a provider: while a slow fake provider keeps a call
in flight, from inside the database (every PL/Python function that calls a provider, found in
the catalogue and in pyembed.indb's code) or from Python (a client's add, search and rerank, the
worker, a migration's backfill), a writer of any row of any of pyembed's tables (the catalogue's,
a new one included) and any advisory key is not kept waiting. A lock held there stalled every
writer of that row for the length of the call, and deadlocked with a writer that held what
the call needed next."""

from __future__ import annotations

import ast
import inspect
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

import pyembed
from pyembed import indb, migration
from pyembed.db import connect
from pyembed.loaded import LOCK_CLASS
from pyembed.localdb import APP_USER
from pyembed.worker import Worker
from tests.conftest import Database
from tests.fakeapi import FakeAPI

VOYAGE = "voyage/voyage-3@1:1024"
OPENAI = "openai/text-embedding-3-small@1:1536"
RERANKER = "voyage/rerank-2.5"
DELAY = 3.0
"""Seconds the slow fake provider takes to answer: the probes below run well within it."""

DOCS = [("a", "refunds are paid within five days"), ("b", "a late delivery is refunded"),
        ("c", "error E4007 means the quota is used up")]

PROVIDER_CALLS = {
    # Every PL/Python function of the schema whose pyembed.indb entry reaches a provider (an
    # embedder or a reranker), and a call of it (through its SQL wrapper) that makes one.
    "_embed": "SELECT pyembed.embed('a query never embedded', %(key)s, 'query')",
    "_embed_batch": "SELECT pyembed.embed_batch(ARRAY['one new text', 'another'], %(key)s)",
    "_search_text": "SELECT count(*) FROM pyembed.search_text('docs', 'a new question', 3)",
    "_search_reranked": "SELECT count(*) FROM pyembed.search_reranked('docs', 'late delivery', "
                        "%(reranker)s, k => 2, mode => 'keyword')",
}


def _indb_provider_entries() -> set[str]:
    """The functions of pyembed.indb that call `embedder` or `reranker`, directly or through
    another function of the module (read from its code)."""
    tree = ast.parse(inspect.getsource(indb))
    calls: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            calls[node.name] = {n.func.id for n in ast.walk(node)
                                if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    reach = {"embedder", "reranker"}
    grew = True
    while grew:
        new = {name for name, called in calls.items() if called & reach} - reach
        grew = bool(new)
        reach |= new
    return reach - {"embedder", "reranker"}


def test_every_plpython_function_that_calls_a_provider_is_probed(
        owner: psycopg.Connection[Any]) -> None:
    """The catalogue's PL/Python functions whose indb entry reaches a provider are the list
    above, a new one included."""
    entries = _indb_provider_entries()
    assert {"embed", "embed_batch", "search_text", "search_reranked"} <= entries
    found = set()
    for name, src in owner.execute(
            "SELECT p.proname, p.prosrc FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang "
            "WHERE p.pronamespace = 'pyembed'::regnamespace AND l.lanname LIKE 'plpython%'"):
        if set(re.findall(r"\bindb\.(\w+)", src)) & entries:
            found.add(name)
    assert found == set(PROVIDER_CALLS)


@pytest.fixture
def corpus(db: Database, fake_api: FakeAPI, monkeypatch: pytest.MonkeyPatch
           ) -> Iterator[tuple[pyembed.Client, Database]]:
    """A corpus embedded by Voyage at the fake API server, reached by the database (secrets)
    and by Python (environment), with a job queued, a cached query and a rerank cached, so that
    every table a call could lock has rows."""
    monkeypatch.setenv("VOYAGE_API_KEY", "pa-locks-1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-locks-1")
    with connect(db.owner_dsn, autocommit=True) as conn:
        conn.execute("SELECT pyembed.set_secret('VOYAGE_API_KEY', 'pa-locks-1')")
        conn.execute("SELECT pyembed.set_secret('PYEMBED_VOYAGE_BASE_URL', %s)",
                     (fake_api.base_url("voyage"),))
    with pyembed.connect(db.app_dsn) as client:
        docs = client.create_corpus("docs", VOYAGE)
        docs.add(DOCS)
        docs.search("refund", k=2)
        docs.search("refund", k=2, mode="keyword", rerank=RERANKER)
        yield client, db


def _probe(dsn: str) -> list[str]:
    """What a writer would wait for, from a session of its own: each table of the schema (the
    catalogue's) whose rows, or the table itself, a writer could not lock at once, and the
    advisory keys of this database any session holds."""
    blocked = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET lock_timeout = '100ms'")
        tables = [r[0] for r in conn.execute(
            "SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'pyembed'::regnamespace "
            "AND c.relkind IN ('r', 'p') ORDER BY 1")]
        assert {"queue", "usage", "embedding_cache", "corpora", "vectors"} <= set(tables)
        for table in tables:
            for statement, what in (
                    ("LOCK TABLE pyembed.{} IN ROW EXCLUSIVE MODE NOWAIT", "table"),
                    ("SELECT FROM pyembed.{} FOR NO KEY UPDATE NOWAIT", "rows")):
                try:
                    with conn.transaction(force_rollback=True):
                        conn.execute(sql.SQL(statement).format(sql.Identifier(table)))
                except psycopg.errors.LockNotAvailable:
                    blocked.append(f"{table} {what}")
        markers = [conn.execute(sql.SQL("SELECT pyembed.{}()").format(sql.Identifier(name))
                                ).fetchone()[0] for name in MARKERS]  # type: ignore[index]
        markers.append(LOCK_CLASS)  # pyembed.loaded: a backend's code stamp, taken with try
        blocked += [f"advisory {r[0]}:{r[1]}" for r in conn.execute(
            "SELECT classid, objid FROM pg_locks WHERE locktype = 'advisory' "
            "AND pid <> pg_backend_pid() AND NOT (objsubid = 2 AND classid::int = ANY (%s)) "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (markers,))]
    return blocked


MARKERS = {
    # Advisory keys held across calls on purpose, and why no writer waits for them: each is a
    # random key under the named class, taken with pg_try_advisory_lock* and only looked up in
    # pg_locks to tell a live session's claim from a dead one's
    # (test_only_the_install_waits_for_an_advisory_key).
    "_backfill_lock": "a running backfill's claim on its corpus (pyembed.backfillers)",
    "_bulk_load_lock": "a running bulk load's claim on its corpus (pyembed.bulk_loaders)",
}


def test_only_the_install_waits_for_an_advisory_key() -> None:
    """The code that may wait for an advisory key (pg_advisory_lock and its kin, not the
    pg_try_ ones) is the install's alone: the marker keys above are never waited for. (The
    functions an Alembic revision wrote are replaced by sql/'s on every install and upgrade.)"""
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    waits = re.compile(r"\bpg_advisory(?:_xact)?_lock(?:_shared)?\s*\(")
    found = sorted(f"{path.relative_to(repo)}" for path in [*repo.glob("sql/*.sql"),
                                                           *repo.glob("pyembed/**/*.py")]
                   if waits.search(path.read_text()))
    assert found == ["pyembed/schema.py"]


def _during_a_slow_call(fake_api: FakeAPI, db: Database, call: Callable[[], object]
                        ) -> list[str]:
    """Runs `call` in a thread against a fake provider answering after DELAY seconds and
    probes while its request is in flight; the call must then succeed."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # the finding
            errors.append(exc)

    fake_api.reset()
    fake_api.script([f"slow={DELAY}"] * 4)
    thread = threading.Thread(target=run)
    started = time.monotonic()
    thread.start()
    while not fake_api.requests and thread.is_alive() and time.monotonic() < started + 30:
        time.sleep(0.01)
    assert fake_api.requests, errors
    blocked = _probe(db.owner_dsn)
    assert thread.is_alive(), "the probe ran after the call: it proves nothing"
    thread.join(timeout=60)
    assert errors == []
    return blocked


@pytest.mark.parametrize("function", sorted(PROVIDER_CALLS))
def test_a_provider_call_inside_the_database_holds_no_lock_a_writer_needs(
        corpus: tuple[pyembed.Client, Database], fake_api: FakeAPI, function: str) -> None:
    _, db = corpus

    def call() -> None:
        with connect(db.app_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(APP_USER)))
            conn.execute("SET pyembed.http_retries = 0")
            conn.execute(PROVIDER_CALLS[function], {"key": VOYAGE, "reranker": RERANKER})

    assert _during_a_slow_call(fake_api, db, call) == []


def test_a_provider_call_inside_an_open_transaction_leaves_its_rows_unlocked(
        corpus: tuple[pyembed.Client, Database], fake_api: FakeAPI) -> None:
    """The caller's own transaction, open around the call (as an application's would be),
    holds nothing that another writer needs."""
    _, db = corpus

    def call() -> None:
        with connect(db.app_dsn) as conn, conn.transaction():
            conn.execute("SELECT count(*) FROM pyembed.search_text('docs', 'asked inside', 3)")
            conn.execute("SELECT pyembed.embed('then embedded inside', %s)", (VOYAGE,))

    assert _during_a_slow_call(fake_api, db, call) == []


PYTHON_CALLS: dict[str, Callable[[pyembed.Client], object]] = {
    "add": lambda client: client.corpus("docs").add([("n", "a new text added")]),
    "search": lambda client: client.corpus("docs").search("a query not cached yet", k=2),
    "hybrid": lambda client: client.corpus("docs").search("another new query", k=2,
                                                          mode="hybrid"),
    "rerank": lambda client: client.corpus("docs").search("refund late", k=2, mode="keyword",
                                                          rerank=RERANKER),
}


@pytest.mark.parametrize("path", sorted(PYTHON_CALLS))
def test_a_provider_call_from_python_holds_no_lock_a_writer_needs(
        corpus: tuple[pyembed.Client, Database], fake_api: FakeAPI, path: str) -> None:
    client, db = corpus
    assert _during_a_slow_call(fake_api, db, lambda: PYTHON_CALLS[path](client)) == []


def test_the_worker_holds_no_lock_while_it_embeds(
        corpus: tuple[pyembed.Client, Database], fake_api: FakeAPI) -> None:
    client, db = corpus
    client.conn.execute("SELECT pyembed.add_document('docs', 'queued', 'a text for the worker')")
    worker = Worker(db.app_dsn)
    try:
        assert _during_a_slow_call(fake_api, db, worker.run_once) == []
    finally:
        worker.close()
    assert client.conn.execute("SELECT count(*) FROM pyembed.queue").fetchone() == (0,)


def test_a_migration_backfill_holds_no_lock_while_it_embeds(
        corpus: tuple[pyembed.Client, Database], fake_api: FakeAPI) -> None:
    _, db = corpus
    with pyembed.connect(db.owner_dsn) as dba:
        migration.start(dba, "docs", OPENAI)
        blocked = _during_a_slow_call(fake_api, db, lambda: migration.backfill(dba, "docs"))
        assert migration.status(dba, "docs").step == "backfilled"
    assert blocked == []
