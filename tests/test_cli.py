"""The command line as a user runs it: a subprocess, real databases, one-line errors."""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pyembed as pyembed_api
from pyembed.db import connect
from tests.conftest import REPO, Database
from tests.helpers import run_cli


def pyembed(*args: str, env: dict[str, str] | None = None,
            timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """`pyembed *args` in this process (tests.helpers.run_cli), or, given a timeout, in a process
    of its own that is ended then (for a command that may not return)."""
    if timeout is None:
        return run_cli(*args, env=env)
    full = {k: v for k, v in os.environ.items() if not k.startswith("PYEMBED_")}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "pyembed", *args], capture_output=True,
                          text=True, env=full, timeout=timeout, cwd=REPO)


def db_env(db: Database) -> dict[str, str]:
    return {"PYEMBED_DSN": db.app_dsn, "PYEMBED_OWNER_DSN": db.owner_dsn}


@pytest.fixture
def home() -> Iterator[Path]:
    path = REPO / ".pyembed-test" / f"cli-{uuid.uuid4().hex[:8]}"
    yield path
    pyembed("db", "stop", env={"PYEMBED_HOME": str(path)})
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.mark.usefixtures("own_clusters")  # it makes a cluster (conftest)
def test_db_lifecycle_in_a_project_folder(home: Path) -> None:
    env = {"PYEMBED_HOME": str(home)}
    status = pyembed("db", "status", env=env)
    assert "initialised: False" in status.stdout
    assert pyembed("db", "url", env=env).returncode == 1

    init = pyembed("db", "init", env=env)
    assert init.returncode == 0, init.stderr
    assert "created" in init.stdout
    assert "already exists" in pyembed("db", "init", env=env).stdout
    status = pyembed("db", "status", env=env).stdout
    assert "running: True" in status and "port:" in status
    url = pyembed("db", "url", env=env).stdout.strip()
    assert url.startswith("postgresql://pyembed_user:") and "@127.0.0.1:" in url
    owner_url = pyembed("db", "url", "--owner", env=env).stdout.strip()
    assert owner_url.startswith("postgresql://pyembed:")

    installed = pyembed("install", env=env)
    assert installed.returncode == 0, installed.stderr
    made = pyembed("corpus", "create", "notes", "--model", "fake/fake-hash@1:384", env=env)
    assert made.returncode == 0, made.stderr
    assert "notes" in pyembed("corpus", "list", env=env).stdout
    # The app role is not a superuser.
    check = subprocess.run(["psql", url, "-Atc", "SELECT rolsuper FROM pg_roles "
                            "WHERE rolname = current_user"], capture_output=True, text=True)
    assert check.stdout.strip() == "f"

    assert pyembed("db", "stop", env=env).stdout.strip() == "stopped"
    assert "running: False" in pyembed("db", "status", env=env).stdout
    down = pyembed("corpus", "list", env=env)
    assert down.returncode == 1
    assert down.stderr.startswith("error: cannot reach the database")
    # Another server takes the port while the cluster is stopped: start moves to a free one.
    old_port = int(url.rsplit(":", 1)[1].split("/")[0])
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", old_port))
        squatter.listen()
        assert pyembed("db", "start", env=env).stdout.strip() == "started"
        new_url = pyembed("db", "url", env=env).stdout.strip()
        assert f":{old_port}/" not in new_url
        assert "notes" in pyembed("corpus", "list", env=env).stdout


def test_errors_are_one_line_and_non_zero(db: Database) -> None:
    for args, words in [
        (("corpus", "show", "nope"), "unknown corpus 'nope'"),
        (("corpus", "create", "Bad.Name"), "invalid corpus name"),
        (("corpus", "create", "ok", "--model", "acme/none@1:3"), "unknown model key"),
        (("corpus", "create"), "Missing argument"),
        (("search", "docs", "q", "--filter", "[1]"), "--filter must be a JSON object"),
        (("metrics", "serve", "--port", "99999"), "less than or equal to 65535"),
        # Counts and windows out of range: before, negative sizes, or "no provider calls
        # recorded" for --days -1, or the database's "timestamp out of range".
        (("plan-storage", "--vectors", "-1"), "greater than or equal to 0"),
        (("usage", "--days", "-1"), "greater than or equal to 1"),
        (("usage", "--days", "99999999"), "less than or equal to 36500"),
        (("cache", "stats", "--days", "0"), "greater than or equal to 1"),
    ]:
        out = pyembed(*args, env=db_env(db))
        assert out.returncode != 0, args
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], out.stderr



def test_corpus_drop_without_yes_where_no_one_answers(db: Database) -> None:
    """Without --yes and with no terminal to answer on, the question ran into the refusal
    ("drop corpus docs and all its documents and vectors? [y/N]: error: aborted", one line):
    now the refusal alone says to pass --yes, and the corpus is kept."""
    with pyembed_api.connect(db.app_dsn) as client:
        client.create_corpus("docs", "fake/fake-hash@1:384").add([("a", "kept")])
    out = run_cli("corpus", "drop", "docs", env={"PYEMBED_DSN": db.app_dsn})
    assert out.returncode == 1 and out.stderr == (
        "error: corpus drop asks before it drops docs, and no one can answer (stdin is not a "
        "terminal): pass --yes\n"), out.stderr
    with pyembed_api.connect(db.app_dsn) as client:
        assert [c.name for c in client.corpora()] == ["docs"]


def test_documents_are_deleted_from_python_and_the_command_line(db: Database) -> None:
    """The application role deletes through pyembed.delete_documents only (it holds no DELETE):
    Corpus.delete and `pyembed corpus delete-documents` are that function's, with its count;
    an id the corpus lacks is skipped, a bad id or another tenant's corpus refused."""
    env = {"PYEMBED_DSN": db.app_dsn}
    with pyembed_api.connect(db.app_dsn) as client:
        docs = client.create_corpus("docs", "fake/fake-hash@1:384")
        docs.add([("a", "first"), ("b", "second"), ("c", "third")])
        assert docs.delete(["a", "nope"]) == 1
        assert [h.document_id for h in docs.search("third", k=5, mode="keyword")] == ["c"]
        with pytest.raises(pyembed_api.InvalidInput):
            docs.delete("b")  # a string is not a list of ids
        with pytest.raises(pyembed_api.InvalidInput):
            docs.delete(["b\x00"])
        with pytest.raises(pyembed_api.InvalidInput, match=r"a document id is 1\.\.512 characters"):
            docs.delete(["b", ""])  # an id no document can have: said, not skipped
    out = run_cli("corpus", "delete-documents", "docs", "b", "c", "zz", env=env)
    assert out.returncode == 0 and out.stdout.split() == (
        "deleted 2 of 3 documents from docs (the others are not in it)".split()), out
    out = run_cli("corpus", "delete-documents", "nope", "b", env=env)
    assert out.returncode == 1 and out.stderr.startswith("error: unknown corpus"), out.stderr
    with pyembed_api.connect(db.app_dsn) as client:
        assert client.corpus("docs").search("first second third", k=5, mode="keyword") == []


@pytest.mark.parametrize("group", [("corpus",), ("db",), ("db", "replica"), ("migrate",),
                                   ("eval",), ("cache",), ("metrics",), ("tenant",)])
def test_a_group_named_alone_shows_its_help_without_an_empty_error(group: tuple[str, ...]) -> None:
    out = pyembed(*group)
    assert out.returncode == 1 and "Usage:" in out.stdout, out
    assert out.stderr == "", out.stderr  # it was "error:  (see --help)"


def test_names_and_texts_print_as_they_are(db: Database, tmp_path: Path) -> None:
    """What a user typed or stored is printed as it is: never read as rich markup, which cut
    `[bold]x` to `x` in an error and crashed on `[/x]` with a traceback."""
    for name in ("[/x]", "[bold]x"):
        for args, env, words in [
            (("corpus", "show", name), db_env(db), f"unknown corpus '{name}'"),
            (("db", "replica", "remove", name), {"PYEMBED_HOME": str(tmp_path)}, f"not '{name}'"),
        ]:
            out = pyembed(*args, env=env)
            lines = out.stderr.strip().splitlines()
            assert out.returncode == 1 and len(lines) == 1, (args, out.stderr)
            assert lines[0].startswith("error: ") and words in lines[0], (args, out.stderr)
    made = pyembed("corpus", "create", "notes", "--model", "fake/fake-hash@1:384", env=db_env(db))
    assert made.returncode == 0, made.stderr
    again = pyembed("corpus", "create", "notes", "--model", "fake/fake-hash@1:384", "--exist-ok",
                    env=db_env(db))
    assert again.returncode == 0 and again.stdout.startswith("corpus exists: notes"), again
    other = pyembed("corpus", "create", "notes", "--model", "fake/fake-hash@1:1024", "--exist-ok",
                    env=db_env(db))
    assert other.returncode == 1 and "pinned to fake/fake-hash@1:384, not" in other.stderr
    (tmp_path / "a.txt").write_text("use x[i] and [/x] or [bold]y[/bold] here")
    assert pyembed("ingest", "notes", str(tmp_path / "a.txt"), "-q", env=db_env(db)).returncode == 0
    found = pyembed("search", "notes", "use x", env={**db_env(db), "COLUMNS": "200"})
    assert found.returncode == 0, found.stderr
    assert "use x[i] and [/x] or [bold]y[/bold] here" in found.stdout, found.stdout


def test_control_characters_in_stored_text_never_reach_the_terminal(db: Database) -> None:
    """Document text is anyone's (a scraped page, another tenant's upload): its escape sequences
    are shown as control pictures, never written to the terminal, where they set its title,
    recolour or hide lines and move the cursor to overwrite what pyembed printed."""
    hostile = "E9999 \x1b]0;pwned\x07 \x1b[8mhidden\x1b[0m \x1b[2J\x9b31m done"
    with psycopg.connect(db.app_dsn, autocommit=True) as app:
        app.execute("SELECT pyembed.create_corpus('ctl', 'fake/fake-hash@1:384')")
        app.execute("SELECT pyembed.add_document('ctl', %s, %s, %s)",
                    ("id", hostile, json.dumps({"note": "\x1b[2J"})))
    # An id with control characters is refused now (test_document_ids), but one stored before
    # that rule is still shown: made here as such a row, the rule's trigger off.
    with psycopg.connect(db.owner_dsn) as owner, owner.transaction():
        owner.execute("ALTER TABLE pyembed.documents DISABLE TRIGGER documents_id_checked")
        owner.execute("INSERT INTO pyembed.documents (corpus_id, document_id, content_hash, "
                      "metadata) SELECT corpus_id, %s, content_hash, metadata "
                      "FROM pyembed.documents WHERE document_id = 'id'", ("id\x1b[31m",))
        owner.execute("UPDATE pyembed.chunks SET document_id = %s WHERE document_id = 'id'",
                      ("id\x1b[31m",))
        owner.execute("DELETE FROM pyembed.documents WHERE document_id = 'id'")
        owner.execute("ALTER TABLE pyembed.documents ENABLE TRIGGER documents_id_checked")
    for args in (("search", "ctl", "E9999", "--mode", "keyword"),
                 ("search", "ctl", "E9999", "--mode", "keyword", "--group", "chunk")):
        out = pyembed(*args, env=db_env(db))
        assert out.returncode == 0, out.stderr
        assert not set(out.stdout) & {"\x1b", "\x07", "\x9b"}, repr(out.stdout)
        assert "\u241b]0;pwned\u2407" in out.stdout.replace("\n", "").replace(" ", "")


def test_a_port_in_use_is_a_one_line_error(db: Database) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        out = pyembed("metrics", "serve", "--port", str(taken.getsockname()[1]), env=db_env(db),
                      timeout=60)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr  # it was a traceback
    assert "Address already in use" in lines[0] and "serving" not in out.stdout, out


def test_a_database_without_the_schema_says_run_install(empty_db: Database) -> None:
    # One line whichever way the command connects: app or owner, connection or client.
    for args in (("corpus", "list"), ("cache", "stats"), ("models",), ("status",),
                 ("search", "docs", "a query"), ("migrate", "status", "docs"),
                 ("tenant", "create", "acme")):
        out = pyembed(*args, env=db_env(empty_db))
        assert out.returncode == 1, (args, out.stdout)
        assert out.stderr.strip() == ("error: this database has no pyembed schema: run "
                                      "`pyembed install`"), (args, out.stderr)


def test_install_sql_prints_a_reviewable_script() -> None:
    out = pyembed("install", "--sql")
    assert out.returncode == 0, out.stderr
    assert "CREATE TABLE pyembed.vectors" in out.stdout
    assert "pg_advisory_xact_lock" in out.stdout
    assert "COMMIT;" in out.stdout


def test_models_lists_keys_with_dimensions() -> None:
    out = pyembed("models", env={"COLUMNS": "250"})
    assert out.returncode == 0
    for key, dims in (("voyage/voyage-3@1:1024", 1024), ("openai/text-embedding-3-large@1:1024", 1024),
                      ("openai/text-embedding-3-large@1:3072", 3072),
                      ("cohere/embed-english-v3.0@3:1024", 1024),
                      ("local/all-minilm-l6-v2-int8@1:384", 384)):
        line = next(line for line in out.stdout.splitlines() if f" {key} " in line)
        assert f" {dims} " in line


def test_demo_runs_the_tour_and_shows_the_guard(db: Database) -> None:
    out = pyembed("demo", env={**db_env(db), "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    first_hit = next(i for i, line in enumerate(lines) if "query:" in line) + 1
    assert "error-e4012" in lines[first_hit]
    assert "refused by the database: model key mismatch" in out.stdout
    assert "local/all-minilm-l6-v2-int8@1:384" in out.stdout and "fake/fake-hash@1:384" in out.stdout


def test_cache_stats_and_purge(db: Database) -> None:
    env = db_env(db)
    assert "no cache lookups" in pyembed("cache", "stats", env=env).stdout
    assert pyembed("demo", env=env).returncode == 0
    stats = pyembed("cache", "stats", env={**env, "COLUMNS": "200"}).stdout
    assert "local/all-minilm-l6-v2-int8@1:384" in stats and "%" in stats
    purged = pyembed("cache", "purge", "--model", "local/all-minilm-l6-v2-int8@1:384", env=env)
    assert purged.returncode == 0
    assert purged.stdout.strip() == "deleted 11 cache entries"  # 10 documents + 1 query
    assert pyembed("search", "demo", "quota", env=env).returncode == 0  # one entry, made now
    aged = pyembed("cache", "purge", "--older-than", "1", env=env)
    assert (aged.returncode, aged.stdout.strip()) == (0, "deleted 0 cache entries")
    assert re.fullmatch(r"deleted [1-9]\d* cache entries",  # the search's query embeddings
                        pyembed("cache", "purge", "--older-than", "0", env=env).stdout.strip())
    assert "deleted 0" in pyembed("cache", "purge", "--older-than", "0", env=env).stdout
    bad = pyembed("cache", "purge", "--older-than", "-1", env=env)
    assert bad.returncode == 1 and "Invalid value for '--older-than'" in bad.stderr


def test_search_command_all_modes(db: Database) -> None:
    env = {**db_env(db), "COLUMNS": "200"}
    assert pyembed("demo", env=env).returncode == 0
    for mode in ("vector", "keyword", "hybrid"):
        out = pyembed("search", "demo", "error E4012 quota", "-k", "2", "--mode", mode, env=env)
        assert out.returncode == 0, out.stderr
        first = next(line for line in out.stdout.splitlines() if "│ 1 " in line)
        assert "error-e4012" in first, (mode, out.stdout)
    bad = pyembed("search", "demo", "x", "--filter", "{not json", env=env)
    assert bad.returncode == 1 and bad.stderr.startswith("error: --filter is not valid JSON")
    bad = pyembed("search", "demo", "x", "--mode", "fuzzy", env=env)
    assert bad.returncode == 1 and "mode must be one of" in bad.stderr


def test_alembic_cli_offline_script_equals_pyembed_install_sql() -> None:
    alembic = Path(sys.executable).parent / "alembic"
    out = subprocess.run([str(alembic), "upgrade", "head", "--sql"], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == pyembed("install", "--sql").stdout


def test_alembic_cli_online_reads_the_owner_dsn_and_keeps_rows(db: Database) -> None:
    """A DBA's `alembic current`, `downgrade -1` and `upgrade head` from the repo, with the
    owner's DSN in PYEMBED_OWNER_DSN as every owner command reads it: the schema is back at
    head with the corpus's rows. Before, each failed: there is no alembic.ini to read
    sqlalchemy.url from (pyproject.toml holds the config), and `current` has no destination."""
    with pyembed_api.connect(db.app_dsn) as client:
        client.create_corpus("kb", "fake/fake-hash@1:384").add(
            [pyembed_api.Document("d1", "quota exceeded")])
    rows = "SELECT d.*, c.content FROM pyembed.documents d JOIN pyembed.chunks c USING (corpus_id)"
    with psycopg.connect(db.owner_dsn) as conn:
        before = conn.execute(rows).fetchall()
    alembic = str(Path(sys.executable).parent / "alembic")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYEMBED_")}
    env["PYEMBED_OWNER_DSN"] = db.owner_dsn

    def run(*args: str) -> str:
        out = subprocess.run([alembic, *args], capture_output=True, text=True, cwd=REPO,
                             env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout

    head = run("heads").split()[0]
    assert run("current").split()[0] == head
    run("downgrade", "-1")
    assert run("current").split()[0] != head
    run("upgrade", "head")
    assert run("current").split()[0] == head
    with psycopg.connect(db.owner_dsn) as conn:
        assert conn.execute(rows).fetchall() == before
    with pyembed_api.connect(db.app_dsn) as client:
        assert [h.document_id for h in client.corpus("kb").search("quota", k=1)] == ["d1"]


def test_each_command_is_summarised_on_one_line_in_its_groups_list() -> None:
    """A docstring's line break mid-sentence must not break the command list's summary."""
    import inspect

    import typer

    from pyembed.cli import app

    def groups(group: typer.Typer, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...],
                                                                             typer.Typer]]:
        yield path, group
        for sub in group.registered_groups:
            assert sub.typer_instance is not None and sub.name
            yield from groups(sub.typer_instance, (*path, sub.name))

    checked = 0
    for path, group in groups(app, ()):
        listing = pyembed(*path, "--help", env={"COLUMNS": "250"}).stdout
        for info in group.registered_commands:
            doc = inspect.cleandoc(info.help or info.callback.__doc__ or "")  # type: ignore[union-attr]
            summary = " ".join(doc.split("\n\n")[0].split()).split(" Example:")[0]
            line = next(ln for ln in listing.splitlines()
                        if ln.strip("│ ").startswith(f"{info.name} "))
            assert summary in line, (path, info.name, line)
            checked += 1
    assert checked > 30


UNKNOWN_NAMES = [
    ("cache", "purge", "--model", "nope/none@1:1"),
    ("cache", "purge", "--model", "nope/none@1:1", "--expired"),
    ("search", "nope", "a query"),
    ("search", "known", "a query", "--rerank", "nope/none"),
    ("ingest", "nope", "{folder}"),
    ("ask", "nope", "a question"),
    ("corpus", "show", "nope"),
    ("corpus", "drop", "nope", "--yes"),
    ("corpus", "create", "new", "--model", "nope/none@1:1"),
    ("corpus", "index", "nope"),
    ("corpus", "reindex", "nope"),
    ("migrate", "plan", "nope", "--to", "fake/fake-hash@1:384"),
    ("migrate", "plan", "known", "--to", "nope/none@1:1"),
    ("migrate", "start", "known", "--to", "nope/none@1:1"),
    ("migrate", "status", "nope"),
    ("migrate", "shift", "nope", "10"),
    ("migrate", "complete", "nope"),
    ("migrate", "rollback", "nope"),
    ("migrate", "cleanup", "nope"),
    ("migrate", "backfill", "nope"),
    ("migrate", "validate", "nope"),
    ("eval", "add", "nope", "q1", "a query", "--relevant", "doc1"),
    ("eval", "compare", "nope", "fake/fake-hash@1:384"),
    ("eval", "compare", "known", "nope/none@1:1"),
]


@pytest.mark.parametrize("argv", UNKNOWN_NAMES, ids=" ".join)
def test_every_command_naming_an_unknown_corpus_or_model_says_so(
        db: Database, tmp_path: Path, argv: tuple[str, ...]) -> None:
    """A corpus or model key that does not exist is one clear error naming it, never a
    success that did nothing (`cache purge --model nope` said "deleted 0")."""
    with connect(db.app_dsn, autocommit=True) as app:
        app.execute("SELECT pyembed.create_corpus('known', 'fake/fake-hash@1:384')")
        app.execute("SELECT pyembed.add_document('known', 'doc1', 'a known text')")
    (tmp_path / "a.txt").write_text("a text\n")
    args = [a.replace("{folder}", str(tmp_path)) for a in argv]
    out = pyembed(*args, env=db_env(db), timeout=120)
    assert out.returncode != 0, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope" in lines[0], out.stderr


def _numeric_arguments() -> list[tuple[str, str]]:
    """(command, argument) for every numeric positional argument of the CLI."""
    import typer

    from pyembed.cli import app

    found = []

    def walk(command: Any, path: list[str]) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])
        for param in getattr(command, "params", []):
            kind = param.type_descriptor.annotation
            if type(param).__name__ == "TyperArgument" and kind in (int, float):
                found.append((" ".join(path), param.name))
                assert command.context_settings.get("ignore_unknown_options"), path

    walk(typer.main.get_command(app), [])
    return found


def test_a_negative_number_is_an_argument_with_its_range_error(
        db: Database, client: pyembed_api.Client) -> None:
    """Every numeric positional argument takes -1 as a number, refused by its range check
    with one line; before, `migrate shift demo -1` was "No such option: -1"."""
    assert _numeric_arguments() == [("migrate shift", "share")]
    client.create_corpus("demo", "fake/fake-hash@1:384")
    with psycopg.connect(db.owner_dsn, autocommit=True) as owner:
        owner.execute("SELECT pyembed.migration_start('demo', 'local/all-minilm-l6-v2-int8@1:384')")
    out = pyembed("migrate", "shift", "demo", "-1", env=db_env(db))
    assert out.returncode == 1, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "-1" in lines[0] and "option" not in lines[0], out.stderr


def _commands_and_numeric_options() -> list[tuple[list[str], list[str], list[str]]]:
    """(command path, its positional arguments' names, its numeric options) for every command."""
    import typer

    from pyembed.cli import app

    found = []

    def walk(command: Any, path: list[str]) -> None:
        subs = getattr(command, "commands", {})
        for name, sub in subs.items():
            walk(sub, [*path, name])
        if subs:
            return
        params = getattr(command, "params", [])
        found.append((path, [p.name for p in params if type(p).__name__ == "TyperArgument"],
                      [p.opts[0] for p in params if type(p).__name__ == "TyperOption"
                       and p.type_descriptor.annotation in (int, float)]))

    walk(typer.main.get_command(app), [])
    return found


ARGUMENT_VALUES = {"corpus": "docs", "query": "q", "question": "q", "paths": "README.md",
                   "name": "docs", "share": "10", "model_keys": "fake/fake-hash@1:1024"}
"""A value each positional argument accepts, for the commands of the walk below."""

OUT_OF_RANGE = {"--min-score": "nan"}
"""An option's value out of its range where -1 is not (a score may be negative)."""


def test_bad_input_exits_1_whoever_finds_it(db: Database) -> None:
    """Range checks typer's option parser made exited 2 (`worker --lease 0`, `usage --days 0`,
    `status --recall-alert 2`) where pyembed's own exited 1 (`worker --batch-size 0`,
    `search -k 0`). Every command now exits 1 with one line on bad input, from the parser or
    from pyembed: each numeric option out of its range, and an option no command has."""
    with connect(db.owner_dsn, autocommit=True) as conn:
        conn.execute("SELECT pyembed.create_corpus('docs', 'fake/fake-hash@1:384')")
        conn.execute("SELECT pyembed.add_document('docs', 'a', 'a text to embed')")
        conn.execute("SELECT pyembed.migration_start('docs', 'fake/fake-hash@1:1024')")
    env = {**db_env(db), "PYEMBED_WORKER_DSN": db.app_dsn}
    wrong, numeric = [], 0
    for path, arguments, options in _commands_and_numeric_options():
        args = [*path, *(ARGUMENT_VALUES.get(a, "x") for a in arguments)]
        if path == ["migrate", "shift"]:
            args[-1] = "-1"  # its numeric argument (the walk's values are all in range)
        tries = [[*args, "--no-such-option"]]
        tries += [[*args, option, OUT_OF_RANGE.get(option, "-1")] for option in options]
        if path == ["migrate", "shift"]:
            tries.append(args)
        for argv in tries:
            out = run_cli(*argv, env=env)
            lines = out.stderr.strip().splitlines()
            if out.returncode != 1 or len(lines) != 1 or not lines[0].startswith("error: "):
                wrong.append(f"{argv}: exit {out.returncode}: {out.stderr[-300:]!r}")
        numeric += len(options)
    assert wrong == [], "\n".join(wrong)
    assert numeric >= 30


# -- options checked before any display; counts that agree --------------------------------------
OPTIONS_OUT_OF_RANGE = [
    (["worker", "--lease", "1e9"], "lease must be above 0 and at most 86400 seconds"),
    (["worker", "--batch-size", "100000"], "batch_size must be 1..10000, got 100000"),
    (["worker", "--batch-size", "0"], "batch_size must be 1..10000, got 0"),
    (["worker", "--max-attempts", "0"], "max_attempts must be at least 1, got 0"),
    (["migrate", "backfill", "docs", "--batch-size", "0"], "batch_size must be 1..100000, got 0"),
    (["migrate", "backfill", "docs", "--batch-size", "-5"], "batch_size must be 1..100000"),
    (["migrate", "backfill", "docs", "--rate", "-1"], "rate must be a number of texts per "
                                                      "second above 0, got -1.0"),
    (["migrate", "backfill", "docs", "--rate", "0"], "rate must be a number"),
    (["ingest", "docs", "README.md", "--batch-size", "0"], "batch_size must be 1..10000, got 0"),
    (["ingest", "docs", "README.md", "--progress-every", "-1"], "progress_every must be 0"),
]
"""Each command that shows progress, with an option out of the range its check holds."""


@pytest.mark.parametrize("terminal", ["1", "0"], ids=["terminal", "pipe"])
def test_an_option_out_of_range_is_one_line_before_any_display(db: Database,
                                                               terminal: str) -> None:
    """`pyembed worker --lease 1e9` printed a blank line (its progress bar, started before the
    database checked the lease), then the error; `migrate backfill` too, and it took
    --batch-size 0 as the model's batch and --rate -1 or 0 as no limit. Now each command's
    progress shows from its first update, after its options were accepted: an option out of
    range is the error's one line and nothing on stdout, on a terminal or not."""
    env = {**db_env(db), "PYEMBED_WORKER_DSN": db.app_dsn, "TTY_COMPATIBLE": terminal}
    with connect(db.owner_dsn, autocommit=True) as conn:
        conn.execute("SELECT pyembed.create_corpus('docs', 'fake/fake-hash@1:384')")
        conn.execute("SELECT pyembed.add_document('docs', 'a', 'a text to embed')")
        conn.execute("SELECT pyembed.migration_start('docs', 'fake/fake-hash@1:1024')")
    wrong = []
    for args, message in OPTIONS_OUT_OF_RANGE:
        run = pyembed(*args, env=env)
        said = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", run.stderr)  # a terminal's colours
        if (run.returncode, run.stdout) != (1, "") or not said.startswith(
                f"error: {message}") or len(said.splitlines()) != 1:
            wrong.append(f"{args}: {run.returncode} {run.stdout!r} {run.stderr!r}")
    assert wrong == [], "\n".join(wrong)
    # The work itself: progress only on a terminal, the summary line alone otherwise.
    run = pyembed("worker", env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("embedded 1, failed 0") == (terminal == "0"), run.stdout


def test_ingests_counts_add_up_to_its_problems(db: Database, tmp_path: Path) -> None:
    """A .txt that is not UTF-8 was "failed 0" in the summary beside the error's "1
    problem(s)": the failed records and the files not read add up to the problems."""
    env = db_env(db)
    assert pyembed("corpus", "create", "docs", "--model", "fake/fake-hash@1:384",
                   env=env).returncode == 0
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 in Latin-1")
    run = pyembed("ingest", "docs", str(tmp_path / "latin1.txt"), env=env)
    assert run.returncode == 1
    assert "added 0, updated 0, unchanged 0, failed 0, 1 file(s) not read;" in run.stdout, \
        run.stdout
    assert run.stderr.splitlines()[-1] == "error: 1 problem(s) while ingesting; nothing was " \
                                          "loaded", run.stderr
    (tmp_path / "good.txt").write_text("a text in UTF-8")
    (tmp_path / "rows.jsonl").write_text('{"id": "r1", "text": "one"}\n{"id": "r1", '
                                         '"text": "again"}\nnot json\n')
    run = pyembed("ingest", "docs", str(tmp_path), str(tmp_path / "missing.md"), env=env)
    assert run.returncode == 0, run.stderr
    assert "added 2, updated 0, unchanged 0, failed 2, 2 file(s) not read;" in run.stdout, \
        run.stdout
    assert len([line for line in run.stderr.splitlines() if line.startswith("skipped")]) == 4


def test_index_settings_help_says_where_the_ranges_are_checked(db: Database) -> None:
    """`pyembed corpus index --help` gave each setting's range (m "2-100", ...), a second copy
    of what the corpora table checks (pyembed._index_settings_problem). The command's help now
    says where the ranges are held, each option's that its range is checked there, and none
    gives a figure of it; a value out of it is refused in the database's words, naming it."""
    import typer.main

    from pyembed import cli

    with connect(db.owner_dsn, autocommit=True) as conn:
        conn.execute("SELECT pyembed.create_corpus('docs', 'fake/fake-hash@1:384')")
        said = {setting: conn.execute("SELECT pyembed._index_settings_problem(%s)",
                                      (json.dumps({setting: 0}),)).fetchone()[0]
                for setting in ("m", "ef_construction", "ef_search", "oversample")}
    command = typer.main.get_command(cli.app).commands["corpus"].commands["index"]  # type: ignore[attr-defined]
    helps = {p.name: p.help or "" for p in command.params}
    assert "pyembed._index_settings_problem" in (command.help or ""), command.help
    for setting, problem in said.items():
        low, high = re.search(r"(\d+)\.\.(\d+)", problem).groups()  # type: ignore[union-attr]
        assert helps[setting].endswith("(its range: checked by the database, see above)"), \
            helps[setting]
        assert not re.search(rf"\b({low}|{high})\b", helps[setting]), helps[setting]
        run = pyembed("corpus", "index", "docs", f"--{setting.replace('_', '-')}", "0",
                      env=db_env(db))
        assert run.returncode == 1 and f"{low}..{high}" in run.stderr, run.stderr


def test_a_message_is_one_line_at_any_width(db: Database) -> None:
    """A message was wrapped at the console's width (80 columns in a pipe): `migrate start`
    printed "next: pyembed migrate backfill" and the corpus on two lines, `migrate status` its
    summary and each event's detail (a Python dict) on several. Tables still fold their cells."""
    name = "a-corpus-name-longer-than-the-screen-is-wide"
    env = {**db_env(db), "COLUMNS": "40"}

    def lines(*args: str) -> list[str]:
        run = run_cli(*args, env=env)
        assert run.returncode == 0, run
        out = run.stdout.splitlines()
        assert not [line for line in out if line.endswith(" ")], out  # a line cut at a space
        return out

    assert lines("corpus", "create", name, "--model", "fake/fake-hash@1:384") == [
        f"created corpus {name} pinned to fake/fake-hash@1:384 (vector)"]
    with pyembed_api.connect(db.app_dsn) as client:
        client.corpus(name).add([("a", "alpha text")])
    started = lines("migrate", "start", name, "--to", "fake/fake-hash@2:1024")
    assert len(started) == 1 and started[0].endswith(f"next: pyembed migrate backfill {name}")
    backfilled = lines("migrate", "backfill", name)
    assert backfilled[-1].endswith(f"next: pyembed migrate validate {name}"), backfilled
    summary, then, *events = lines("migrate", "status", name)
    assert summary == (f"{name}: fake/fake-hash@1:384 -> fake/fake-hash@2:1024, step "
                       "backfilled, traffic 0%, coverage 100.0% (1/1), queued 0, failed 0")
    assert then == f"  next: pyembed migrate validate {name}"
    assert [line.split()[2] for line in events] == ["backfilled", "start"], events
    assert json.loads(events[1].split("  ")[-1]) == {"from": "fake/fake-hash@1:384",
                                                     "to": "fake/fake-hash@2:1024"}
    table = lines("corpus", "list")
    assert max(len(line) for line in table) <= 40, table  # folded, not one long line


def _every_command() -> list[list[str]]:
    """The path of every command and group of the CLI, the root's ([]) first."""
    import typer

    from pyembed.cli import app

    found: list[list[str]] = []

    def walk(command: Any, path: list[str]) -> None:
        found.append(path)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return found


@pytest.mark.parametrize("width", [60, 120])
def test_every_commands_help_is_wrapped_at_the_terminals_width(width: int) -> None:
    """Each paragraph of a command's help fills the terminal's lines: a line ends only where
    the next word would not fit. Before, rich help kept the docstrings' own line breaks after
    the first paragraph, so `worker --help` read ragged at any width but the source's ("(other
    workers' leases" / "and retries due within a minute" / "are waited for); exits 3 ...")."""
    ragged = []
    for path in _every_command():
        out = run_cli(*path, "--help", env={"COLUMNS": str(width)})
        assert out.returncode == 0, (path, out.stderr)
        lines = out.stdout.splitlines()
        assert all(len(line) <= width for line in lines), (path, width)
        usage = next(i for i, line in enumerate(lines) if line.strip().startswith("Usage:"))
        box = next((i for i, line in enumerate(lines) if line.startswith("╭")), len(lines))
        prose = [line.strip() for line in lines[usage + 1:box]]
        for line, following in itertools.pairwise(prose):
            if line and following and len(line) + 1 + len(following.split()[0]) <= width - 2:
                ragged.append(f"pyembed {' '.join(path)} --help at {width}: {line!r} then "
                              f"{following!r}")
    assert len(_every_command()) > 40
    assert ragged == [], "\n".join(ragged)


def test_owner_commands_read_pyembed_dsn_when_no_owner_dsn_is_set(db: Database,
                                                                  tmp_path: Path) -> None:
    """The owner's commands read $PYEMBED_OWNER_DSN, else $PYEMBED_DSN, as their --help and the
    README say; the local cluster's owner only without either. Before, the help said 'default:
    the local cluster's owner' and the README 'without them they use the local cluster', while
    with $PYEMBED_DSN set the commands used it (found from outside, outside19: `pyembed migrate`
    with the local cluster's application DSN exported was OwnerOnly)."""
    env = {"PYEMBED_DSN": db.app_dsn, "PYEMBED_HOME": str(tmp_path / "none")}
    out = run_cli("tenant", "list", env=env)
    assert out.returncode == 1
    assert out.stderr.startswith("error: table pyembed.tenants is pyembed's owner role's"), out
    assert run_cli("tenant", "list", "--json",
                   env={**env, "PYEMBED_OWNER_DSN": db.owner_dsn}).returncode == 0
    for command in (["install"], ["migrate", "status"], ["tenant", "list"]):
        helped = run_cli(*command, "--help", env={**env, "COLUMNS": "300"}).stdout
        assert "owner DSN; default: $PYEMBED_DSN, else the local cluster's owner" in helped
