"""Small helpers shared by the database tests."""

from __future__ import annotations

import difflib
import importlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click.testing
import numpy as np
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pyembed.corpora import ChunkRow, CorpusInfo
from pyembed.text import sha256


def unit(dims: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dims).astype(np.float32)
    return v / np.linalg.norm(v)


def rows(n: int, dims: int, prefix: str = "doc", seed: int = 0) -> list[ChunkRow]:
    return [ChunkRow(f"{prefix}{i}", 0, f"text of {prefix}{i}", unit(dims, seed + i),
                     {"n": i, "parity": "even" if i % 2 == 0 else "odd"}) for i in range(n)]


def count(conn: psycopg.Connection[Any], table: str) -> int:
    row = conn.execute(f"SELECT count(*) FROM pyembed.{table}").fetchone()  # test-only, fixed names
    assert row is not None
    return int(row[0])


def stored_chunks(app: psycopg.Connection[Any], corpus: CorpusInfo, n: int) -> list[int]:
    """n stored chunks of `corpus` without vectors (queued for its key); their text is
    "chunk 1", "chunk 2", ..."""
    with app.transaction():
        app.execute("INSERT INTO pyembed.documents (corpus_id, document_id, content_hash) "
                    "SELECT %s, 'd' || i, '\\x00' FROM generate_series(1, %s) i",
                    (corpus.corpus_id, n))
        return [r[0] for r in app.execute(
            "INSERT INTO pyembed.chunks (corpus_id, document_id, chunk_index, content) "
            "SELECT %s, 'd' || i, 0, 'chunk ' || i FROM generate_series(1, %s) i "
            "RETURNING chunk_id", (corpus.corpus_id, n))]


def chunk_hashes(n: int) -> list[bytes | None]:
    """The content hashes of the texts of the first n chunks stored_chunks makes."""
    return [sha256(f"chunk {i + 1}") for i in range(n)]


@contextmanager
def login_role(owner: psycopg.Connection[Any], dsn: str, prefix: str,
               options: sql.Composable | None = None) -> Iterator[str]:
    """`dsn` for a new login role (`options`: more CREATE ROLE options), which is dropped
    afterwards, its sessions ended first."""
    name, password = f"{prefix}_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    owner.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} {}").format(
        sql.Identifier(name), sql.Literal(password), options or sql.SQL("")))
    try:
        yield make_conninfo(dsn, user=name, password=password)
    finally:
        owner.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE usename = %s", (name,))
        # (A tenant's login holds its corpora's partitions' INSERT: README's DROP OWNED.)
        owner.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
        owner.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
UPDATE_GOLDEN_ENV = "PYEMBED_UPDATE_GOLDEN"


def assert_matches_golden(name: str, lines: list[str], test: str) -> None:
    """`lines` equal tests/golden/`name` (rewritten instead with PYEMBED_UPDATE_GOLDEN=1)."""
    path = GOLDEN_DIR / name
    text = "\n".join(lines) + "\n"
    if os.environ.get(UPDATE_GOLDEN_ENV) == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    golden = path.read_text() if path.exists() else ""
    if golden != text:
        diff = "".join(difflib.unified_diff(golden.splitlines(keepends=True),
                                            text.splitlines(keepends=True),
                                            f"{name} (expected)", "database (actual)"))
        pytest.fail(f"{name} changed:\n{diff}\nIf the change is intended, review it and run: "
                    f"{UPDATE_GOLDEN_ENV}=1 .venv/bin/pytest {test}", pytrace=False)


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape_metrics(port: int, proc: subprocess.Popen[bytes], seconds: float) -> str:
    """/metrics of the `pyembed metrics serve` process `proc` on `port`, once it answers
    (its error if it does not within `seconds`, or the process ends first)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return str(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                              timeout=5).read().decode())
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.2)


def sql_error(conn: psycopg.Connection[Any], query: Any, params: Any = ()) -> psycopg.Error:
    """The database error `query` raises (the test fails if it raises none)."""
    with pytest.raises(psycopg.Error) as err:
        conn.execute(query, params)
    return err.value



def in_background(work: Callable[[], object], errors: list[BaseException] | None = None
                  ) -> tuple[threading.Thread, list[BaseException]]:
    """A thread, not started yet, that runs `work`, and the list what it raises goes to
    (`errors`, or a new one): the test checks it."""
    caught = errors if errors is not None else []

    def run() -> None:
        try:
            work()
        except BaseException as e:  # handed to the test
            caught.append(e)

    return threading.Thread(target=run), caught

def waits_for_lock(watcher: Any, pid: int, thread: threading.Thread, tries: int = 800, *,
                   or_pause: bool = False) -> bool:
    """Whether the session `pid`, working in `thread`, is waiting for a lock, or with `or_pause`
    pausing between two tries (pg_sleep: pyembed.drop_corpus takes no lock by waiting but its
    first); False: its work ended first; AssertionError if it does neither within `tries` looks
    25 ms apart."""
    for _ in range(tries):
        if not thread.is_alive():
            return False
        if watcher.execute("SELECT wait_event_type = 'Lock' OR (%s AND wait_event = 'PgSleep') "
                           "FROM pg_stat_activity WHERE pid = %s",
                           (or_pause, pid)).fetchone() == (True,):
            return True
        time.sleep(0.025)
    raise AssertionError(f"session {pid} neither waited nor finished")


def run_cli(*args: str, env: dict[str, str] | None = None,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`pyembed *args` run in this process, as tests.test_cli.pyembed runs it in a new one (the
    same entry point, pyembed.cli.main, with no PYEMBED_ variable but those of `env`), for
    tests that check what a command does and prints rather than how a process starts: each new
    process imports the whole package again."""
    from pyembed import cli

    full: dict[str, str | None] = {k: None for k in os.environ if k.startswith("PYEMBED_")}
    full.update(env or {})
    with click.testing.CliRunner().isolation(input=stdin, env=full) as (out, err, _):
        # Made anew, as at a process's start: its consoles read COLUMNS when they are made.
        importlib.reload(cli)
        try:
            cli.main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        sys.stdout.flush()  # what print() wrote is still in the wrapper's buffer
        sys.stderr.flush()
        stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    return subprocess.CompletedProcess(["pyembed", *args], code, stdout, stderr)


PYEMBED_CALL = re.compile(r"\bpyembed\.(\w+)\s*\(")
"""A call of one of pyembed's functions in a function's body."""


def function_bodies(owner: psycopg.Connection[Any]) -> dict[str, str]:
    """Every function of the schema pyembed by name, the bodies of its overloads joined."""
    bodies: dict[str, str] = {}
    for name, src in owner.execute("SELECT p.proname, p.prosrc FROM pg_proc p "
                                   "WHERE p.pronamespace = 'pyembed'::regnamespace").fetchall():
        bodies[name] = bodies.get(name, "") + "\n" + src
    return bodies


def called_functions(bodies: dict[str, str], function: str) -> set[str]:
    """The function and those its body calls, transitively (by name, read from the bodies)."""
    seen: set[str] = set()
    todo = [function]
    while todo:
        name = todo.pop()
        if name in seen or name not in bodies:
            continue
        seen.add(name)
        todo.extend(PYEMBED_CALL.findall(bodies[name]))
    return seen


def assert_ingest_resumes(command: list[str], env: dict[str, str], fake_api: Any) -> None:
    """`command`, an ingest of "text number 0..9" stopped after 4 documents, run again: it
    exits 0, keeps the 4 as unchanged and sends only the other 6 texts to the fake Voyage."""
    fake_api.reset()
    again = subprocess.run(command, capture_output=True, text=True, env=env,
                           cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert again.returncode == 0, again
    assert "added 6, updated 0, unchanged 4" in again.stdout, again.stdout
    embedded = [t for r in fake_api.requests_to("voyage") for t in r.body["input"]]
    assert sorted(embedded) == sorted(f"text number {i}" for i in range(4, 10))


NEAREST_FUNCTION = r"^_nearest_c[0-9]+_[0-9a-f]{32}$"


def nearest_functions(owner: psycopg.Connection[Any]) -> set[str]:
    """The corpora's own vector legs in the catalogue (pyembed._nearest_functions' names)."""
    return {r[0] for r in owner.execute(
        "SELECT proname FROM pg_proc WHERE pronamespace = 'pyembed'::regnamespace "
        "AND proname ~ %s", (NEAREST_FUNCTION,))}


def nearest_functions_expected(owner: psycopg.Connection[Any]) -> set[str]:
    """One function for each key each corpus serves (its own, a migration's target)."""
    return {r[0] for r in owner.execute(
        "SELECT pyembed._nearest_function_name(c.corpus_id, k) FROM pyembed.corpora c, "
        "unnest(ARRAY[c.model_key, c.target_model_key]) k WHERE k IS NOT NULL")}


def assert_nearest_functions_in_line(owner: psycopg.Connection[Any]) -> None:
    """Each corpus's functions are the ones its row asks for, each as its template makes it."""
    assert nearest_functions(owner) == nearest_functions_expected(owner)
    assert owner.execute("SELECT * FROM pyembed._nearest_functions_problems()").fetchall() == []
