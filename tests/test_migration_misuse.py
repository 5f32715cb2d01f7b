"""A DBA's migration steps given the wrong thing, in SQL (as typed in psql), Python and the CLI: a
corpus dropped while its migration runs, every step twice and out of order, a share outside
1..100, a key nobody registered, another tenant's corpus and a tenant named wrong. Each refusal
is a pyembed error naming the problem (one line from the CLI), and changes nothing.
test_migration walks the steps in order and out of order from Python; test_sql_fuzz gives the
steps' arguments hostile values; test_cli_walk and test_api_walk the commands' and functions'."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

import pyembed
from pyembed import migration, tenants
from pyembed.errors import InvalidInput, MigrationError, UnknownCorpus, UnknownModel
from tests.conftest import Database
from tests.helpers import login_role, run_cli
from tests.test_cli_walk import digest
from tests.test_sql_errors import FAKE

TO = "fake/fake-hash@2:384"
STEPS: dict[str, Callable[[pyembed.Client, str], Any]] = {
    "plan": lambda c, n: migration.plan(c, n, TO),
    "start": lambda c, n: migration.start(c, n, TO),
    "backfill": lambda c, n: migration.backfill(c, n),
    "validate": lambda c, n: migration.validate(c, n, force=True),
    "shift": lambda c, n: migration.shift(c, n, 50),
    "complete": lambda c, n: migration.complete(c, n),
    "rollback": lambda c, n: migration.rollback(c, n),
    "cleanup": lambda c, n: migration.cleanup(c, n),
    "status": lambda c, n: migration.status(c, n),
}
"""Each step from Python, on a corpus named `n`."""
SQL_STEPS = {
    "start": f"SELECT pyembed.migration_start(%s, '{TO}')",
    "enqueue_backfill": "SELECT pyembed.migration_enqueue_backfill(%s)",
    "backfilled": "SELECT pyembed.migration_backfilled(%s)",
    "validated": "SELECT pyembed.migration_validated(%s, '{}', true, true)",
    "shift": "SELECT pyembed.migration_shift(%s, 50)",
    "complete": "SELECT pyembed.migration_complete(%s)",
    "rollback": "SELECT pyembed.migration_rollback(%s)",
    "cleanup": "SELECT pyembed.migration_cleanup(%s)",
    "index_status": "SELECT * FROM pyembed.index_status(%s)",
    "rebuild_index": "SELECT pyembed.rebuild_index(%s)",
    "set_index_settings": "SELECT pyembed.set_index_settings(%s, '{\"m\": 24}')",
}
"""Each owner's function that takes a corpus, as a DBA types it."""
CLI_STEPS = [["plan", "--to", TO], ["start", "--to", TO], ["backfill"], ["validate", "--force"],
             ["shift", "50"], ["complete"], ["rollback"], ["cleanup"], ["status"]]


def env(db: Database, **more: str) -> dict[str, str]:
    return {"PYEMBED_DSN": db.app_dsn, "PYEMBED_OWNER_DSN": db.owner_dsn, "COLUMNS": "200",
            **more}


def one_line(out: Any) -> str:
    """The one error line of a CLI run that failed."""
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), out
    assert out.stdout == "", out.stdout
    return str(lines[0])


@pytest.fixture
def docs(db: Database, owner: psycopg.Connection[Any]) -> None:
    """docs, of no tenant, on FAKE with three documents and an evaluation query; TO registered."""
    owner.execute("SELECT pyembed.register_model('fake', 'fake-hash', '2', 384)")
    owner.execute("SELECT pyembed.create_corpus('docs', %s)", (FAKE,))
    for i in range(3):
        owner.execute("SELECT pyembed.add_document('docs', %s, %s)", (f"d{i}", f"text {i}"))
    owner.execute("INSERT INTO pyembed.eval_queries (corpus_id, query_id, query, relevant) "
                  "SELECT corpus_id, 'q1', 'text 1', ARRAY['d1'] FROM pyembed.corpora")


def test_every_step_on_a_corpus_dropped_while_it_migrates_says_unknown_corpus(
        db: Database, owner: psycopg.Connection[Any], docs: None) -> None:
    """The corpus dropped (by its application) between two of the DBA's steps: each later step,
    from SQL, Python and the CLI, is UnknownCorpus naming it, and writes nothing."""
    with pyembed.connect(db.owner_dsn) as dba:
        migration.start(dba, "docs", TO)
        migration.backfill(dba, "docs")
        migration.validate(dba, "docs", force=True)
        migration.shift(dba, "docs", 10)
    with psycopg.connect(db.app_dsn, autocommit=True) as app:
        app.execute("SELECT pyembed.drop_corpus('docs')")
    before = digest(owner)
    for name, query in SQL_STEPS.items():
        with pytest.raises(psycopg.Error) as err:
            owner.execute(query, ("docs",))
        assert (err.value.sqlstate, err.value.diag.message_primary) == (
            "PE002", "unknown corpus 'docs'"), name
    with pyembed.connect(db.owner_dsn) as dba:
        for step in STEPS.values():
            with pytest.raises(UnknownCorpus, match="unknown corpus 'docs'"):
                step(dba, "docs")
    for args in CLI_STEPS:
        said = one_line(run_cli("migrate", args[0], "docs", *args[1:], env=env(db)))
        assert "unknown corpus 'docs'" in said, (args, said)
    assert digest(owner) == before


def test_each_step_twice_and_after_the_end(db: Database, owner: psycopg.Connection[Any],
                                           docs: None) -> None:
    """A step run again where it has nothing left to do answers as the first did or is refused as
    out of order (MigrationError, naming the step); a rollback or shift after complete is refused
    as no migration in progress; a share of 0 or 101, or a key nobody registered, is refused at
    any step. The CLI says the same in one line."""
    with pyembed.connect(db.owner_dsn) as dba:
        with pytest.raises(UnknownModel, match="unknown model key 'fake/nobody@1:384'"):
            migration.start(dba, "docs", "fake/nobody@1:384")
        migration.start(dba, "docs", TO)
        with pytest.raises(MigrationError, match="one at a time"):
            migration.start(dba, "docs", TO)
        first = migration.backfill(dba, "docs")
        again = migration.backfill(dba, "docs")
        assert (first.written, again.embedded, again.written, again.remaining) == (3, 0, 0, 0)
        assert owner.execute("SELECT migration_step FROM pyembed.corpora").fetchone() == (
            "backfilled",)
        for _ in range(2):
            assert migration.validate(dba, "docs", force=True).passed
        for share in (0, 101, -1):
            with pytest.raises(InvalidInput, match=rf"share must be 1\.\.100, got {share}"):
                migration.shift(dba, "docs", share)
        for _ in range(2):
            migration.shift(dba, "docs", 100)
        migration.complete(dba, "docs")
        for name in ("complete", "rollback", "shift", "validate", "backfill"):
            with pytest.raises(MigrationError, match="no migration in progress"):
                STEPS[name](dba, "docs")
        for _ in range(2):
            migration.cleanup(dba, "docs")
    for args, said in ((["rollback", "docs"], "corpus docs has no migration in progress: cannot "
                        "roll back"),
                       (["shift", "docs", "101"], "share must be 1..100, got 101"),
                       (["start", "docs", "--to", TO], "already on"),
                       (["start", "docs", "--to", "fake/nobody@1:384"], "unknown model key")):
        assert said in one_line(run_cli("migrate", *args, env=env(db))), args


@pytest.fixture
def acme(db: Database, owner: psycopg.Connection[Any], docs: None) -> Iterator[None]:
    """Tenant acme, whose own corpus is named docs too (on FAKE, one document)."""
    tenants.create_tenant(owner, "acme")
    with login_role(owner, db.app_dsn, "acme", sql.SQL("IN ROLE pyembed_app")) as login:
        tenants.add_member(owner, "acme", str(psycopg.conninfo.conninfo_to_dict(login)["user"]))
        with psycopg.connect(login, autocommit=True) as conn:
            conn.execute("SELECT pyembed.create_corpus('docs', %s)", (FAKE,))
            conn.execute("SELECT pyembed.add_document('docs', 'a1', 'acme text')")
        yield


def test_a_tenant_named_wrong_in_act_as_tenant_is_refused_not_read_as_no_tenant(
        db: Database, owner: psycopg.Connection[Any], acme: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The owner acts for a tenant through pyembed.act_as_tenant (README): a name no tenant has
    is PE005 naming the setting, from SQL, Python and the CLI. Before, it acted for no tenant: a
    DBA who typed acmee to migrate acme's corpus docs started a migration of the docs of no
    tenant, another corpus."""
    migrating = "SELECT c.tenant_id IS NULL FROM pyembed.migrations m JOIN pyembed.corpora c " \
                "USING (corpus_id)"
    said = "pyembed.act_as_tenant names no tenant: 'acmee'"
    before = digest(owner)
    with psycopg.connect(db.owner_dsn, autocommit=True) as conn:
        conn.execute("SET pyembed.act_as_tenant = 'acmee'")
        with pytest.raises(psycopg.Error) as err:
            conn.execute(f"SELECT pyembed.migration_start('docs', '{TO}')")
        assert (err.value.sqlstate, err.value.diag.message_primary) == ("PE005", said)
    out = run_cli("migrate", "start", "docs", "--to", TO,
                  env=env(db, PGOPTIONS="-c pyembed.act_as_tenant=acmee"))
    assert said in one_line(out)
    monkeypatch.setenv("PGOPTIONS", "-c pyembed.act_as_tenant=acmee")
    with pytest.raises(InvalidInput, match=said):
        with pyembed.connect(db.owner_dsn) as dba:
            migration.start(dba, "docs", TO)
    assert digest(owner) == before
    # Named right, it is acme's docs that migrates.
    monkeypatch.setenv("PGOPTIONS", "-c pyembed.act_as_tenant=acme")
    with pyembed.connect(db.owner_dsn) as dba:
        migration.start(dba, "docs", TO)
    assert owner.execute(migrating).fetchall() == [(False,)]
