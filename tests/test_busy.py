"""A lock another session holds for longer than a call waits (its lock_timeout, pyembed's own
bounds included) or a deadlock is `pyembed.Busy` from Python and a one-line error from the
command line that says so: never a raw psycopg error, nor "cannot reach the database" (the
database answered)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pyembed
from pyembed.db import connect, translate
from tests.conftest import Database
from tests.helpers import run_cli

KEY = "fake/fake-hash@1:384"


def _partition(owner: psycopg.Connection[Any], corpus: str) -> str:
    row = owner.execute("SELECT pyembed.vector_table(%s)", (corpus,)).fetchone()
    assert row is not None
    return str(row[0])


def _holding(db: Database, corpus: str) -> psycopg.Connection[Any]:
    """An owner's session holding the corpus's vectors partition until it rolls back."""
    holder = connect(db.owner_dsn)
    holder.execute(f"LOCK TABLE {_partition(holder, corpus)} IN ACCESS EXCLUSIVE MODE")
    return holder


def test_a_search_past_its_lock_timeout_is_busy(db: Database, client: pyembed.Client) -> None:
    client.create_corpus("docs", KEY).add([("a", "apple banana"), ("b", "cherry")])
    env = {"PYEMBED_DSN": db.app_dsn, "PGOPTIONS": "-c lock_timeout=200ms"}
    holder = _holding(db, "docs")
    try:
        with pyembed.connect(db.app_dsn) as waiting:
            waiting.conn.execute("SET lock_timeout = '200ms'")
            with pytest.raises(pyembed.Busy, match="lock timeout: another session holds"):
                waiting.corpus("docs").search("apple", k=1)
        cli = run_cli("search", "docs", "apple", "-k", "1", env=env)
    finally:
        holder.rollback()
        holder.close()
    assert cli.returncode == 1
    assert cli.stderr.startswith("error: canceling statement due to lock timeout: another "
                                 "session holds"), cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1
    # Once the holder is done, the same search answers.
    assert run_cli("search", "docs", "apple", "-k", "1", "--json", env=env).returncode == 0


def test_an_ingest_whose_bulk_load_cannot_start_is_busy_and_writes_nothing(
        db: Database, client: pyembed.Client, owner: psycopg.Connection[Any],
        tmp_path: Path) -> None:
    """begin_bulk_load waits at most 5 s for the corpus's partition (its own lock_timeout)."""
    client.create_corpus("empty", KEY)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": f"text number {i}"}) + "\n"
                            for i in range(5)), encoding="utf-8")
    env = {"PYEMBED_DSN": db.app_dsn}
    holder = _holding(db, "empty")
    try:
        cli = run_cli("ingest", "empty", str(path), "-q", env=env)
    finally:
        holder.rollback()
        holder.close()
    assert cli.returncode == 1
    assert cli.stderr.startswith("error: canceling statement due to lock timeout: another "
                                 "session holds"), cli.stderr
    assert owner.execute("SELECT count(*) FROM pyembed.documents").fetchone() == (0,)
    assert run_cli("ingest", "empty", str(path), "-q", env=env).returncode == 0
    assert owner.execute("SELECT count(*) FROM pyembed.vectors").fetchone() == (5,)


def test_a_deadlock_is_busy(db: Database) -> None:
    errors: list[psycopg.Error] = []
    with connect(db.owner_dsn) as first, connect(db.owner_dsn) as second:
        first.execute("SELECT pg_advisory_xact_lock(1, 1)")
        second.execute("SELECT pg_advisory_xact_lock(1, 2)")

        def cross(conn: psycopg.Connection[Any], other: int) -> None:
            try:
                conn.execute("SELECT pg_advisory_xact_lock(1, %s)", (other,))
            except psycopg.Error as exc:
                errors.append(exc)
            finally:
                conn.rollback()

        waiting = threading.Thread(target=cross, args=(first, 2))
        waiting.start()
        try:
            cross(second, 1)
        finally:
            waiting.join(30)
    assert len(errors) == 1, errors
    mapped = translate(errors[0])
    assert isinstance(mapped, pyembed.Busy)
    assert str(mapped).startswith("deadlock detected: another session holds")
