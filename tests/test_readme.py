"""Every code example of the README runs (Python and SQL against a real database)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pgvector import Vector

import pyembed
from pyembed.corpora import ChunkRow, corpus_info, write_chunks
from tests.conftest import REPO, Database
from tests.helpers import unit

README = (REPO / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_python_example_runs_and_runs_again(db: Database, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The snippet twice, as a reader runs it again: the corpus exists the second time."""
    monkeypatch.setenv("PYEMBED_DSN", db.app_dsn)
    (code,) = blocks("python")
    for _ in range(2):
        exec(compile(code, "README.md", "exec"), {})
        out = capsys.readouterr().out.splitlines()
        assert len(out) == 2 and out[0].split()[1] == "e4012"
        assert out[0].split()[2] == pyembed.LOCAL_DEFAULT.key
    with pyembed.connect(db.app_dsn) as client:
        assert client.corpus("docs").search("E5003", k=5, mode="keyword")[0].document_id == "e5003"
        assert len(client.corpus("docs").search("error", k=5, mode="keyword")) == 2


def test_the_demos_refusal_is_the_one_the_readme_shows(db: Database) -> None:
    """The README's output of `make demo`'s step 5 is the guard's words as the demo prints them
    (they had gained quotes and a hint since it was written)."""
    from pyembed.demo import OTHER_MODEL, QUESTION

    shown = README.split("```\nrefused by the database: ", 1)[1].split("```", 1)[0]
    with pyembed.connect(db.app_dsn) as client:
        corpus = client.create_corpus("demo")
        corpus.add([("d", "Error E4012 means the monthly quota is used up.")])
        other = client.embedder(OTHER_MODEL).embed_query(QUESTION)
        with pytest.raises(pyembed.ModelMismatch) as refused:
            corpus.search(other, k=3, model_key=OTHER_MODEL)
    assert " ".join(str(refused.value).split()) == " ".join(shown.split())


def test_sql_example_behaves_as_documented(app: psycopg.Connection[Any]) -> None:
    sql = re.sub(r"--.*", "", blocks("sql")[0])
    statements = [s.strip() for s in sql.split(";") if s.strip()]
    assert len(statements) == 3
    app.execute(statements[0])
    info = corpus_info(app, "docs")
    write_chunks(app, info, [ChunkRow("d", 0, "text", unit(1024, 1))], info.model_key)
    ok, bad = statements[1:3]
    assert app.execute(ok.replace("$1::vector", "%s"), (Vector(unit(1024, 1)),)).fetchall()
    with pytest.raises(psycopg.Error) as err:
        app.execute(bad.replace("$1::vector", "%s"), (Vector(unit(1024, 1)),))
    assert err.value.sqlstate == "PE001"


def test_every_cli_command_in_the_readme_exists() -> None:
    import typer

    from pyembed.cli import app

    root = typer.main.get_command(app)
    seen = set()
    for line in "\n".join(blocks("sh")).splitlines():
        words = line.split("#")[0].split()
        if not words or words[0] != "pyembed":
            continue
        node, path = root, []
        for word in words[1:]:
            commands = getattr(node, "commands", {})
            if word not in commands:
                break
            node = commands[word]
            path.append(word)
        assert path and not hasattr(node, "commands"), f"no such command: {line}"
        seen.add(" ".join(path))
    assert {"db init", "install", "models", "corpus create", "ingest", "search", "ask", "worker",
            "cache stats", "status", "metrics serve", "usage", "migrate plan", "eval compare",
            "tenant create", "tenant add-member", "plan-storage"} <= seen
    assert Path(REPO / "docker" / "compose.yaml").exists()


def test_sql_from_any_client_example_runs(db: Database, app: psycopg.Connection[Any]) -> None:
    from pyembed.worker import Worker

    app.execute("SELECT pyembed.create_corpus('docs', %s)", (pyembed.LOCAL_DEFAULT.key,))
    sql = re.sub(r"--.*", "", blocks("sql")[1])
    add, *searches = [s.strip() for s in sql.split(";") if s.strip()]
    app.execute(add)
    worker = Worker(db.app_dsn)
    try:
        assert worker.run(drain=True, poll_interval=0.05, drain_wait=1).embedded == 1
    finally:
        worker.close()
    for statement in searches:
        assert app.execute(statement).fetchall(), statement


def test_secret_example_is_owner_only(owner: psycopg.Connection[Any],
                                      app: psycopg.Connection[Any]) -> None:
    sql = re.sub(r"--.*", "", blocks("sql")[2])
    for statement in (s.strip() for s in sql.split(";") if s.strip()):
        owner.execute(statement)
    assert owner.execute("SELECT count(*) FROM pyembed.secrets").fetchone() == (2,)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        app.execute("SELECT * FROM pyembed.secrets")


def test_rerank_sql_example_runs(db: Database, owner: psycopg.Connection[Any],
                                 app: psycopg.Connection[Any], fake_api: Any) -> None:
    """The reranking section's SQL, with the owner's key pointing Voyage's SDK at the fake
    server."""
    owner.execute("SELECT pyembed.set_secret('VOYAGE_API_KEY', 'pa-readme-rerank')")
    owner.execute("SELECT pyembed.set_secret('PYEMBED_VOYAGE_BASE_URL', %s)",
                  (fake_api.base_url("voyage"),))
    app.execute("SELECT pyembed.create_corpus('docs', 'fake/fake-hash@1:384')")
    docs = pyembed.connect(db.app_dsn)
    try:
        docs.corpus("docs").add([("e4012", "Error E4012 means the monthly quota is used up."),
                                 ("e5003", "Error E5003: the bucket is read-only.")])
    finally:
        docs.close()
    (block,) = [b for b in blocks("sql") if "search_reranked" in b]
    (statement,) = [s.strip() for s in block.split(";") if s.strip()]
    rows = app.execute(statement).fetchall()
    assert [r[0] for r in rows][:1] == ["e4012"] and {r[3] for r in rows} == {"voyage/rerank-2.5"}
    assert [r.path for r in fake_api.requests] == ["/voyage/v1/rerank"]


DOCS = {"README.md": README} | {f"docs/{p.name}": p.read_text()
                                 for p in sorted((REPO / "docs").glob("*.md"))}


def test_every_cli_option_the_docs_name_exists() -> None:
    """Each `--option` after `pyembed COMMAND` in README's and docs/'s shell blocks and inline
    commands is an option of that command, spelled as the code spells it."""
    import typer

    from pyembed.cli import app

    root = typer.main.get_command(app)
    wrong, checked = [], 0
    for name, text in DOCS.items():
        lines = "\n".join(re.findall(r"```sh\n(.*?)```", text, re.S)).splitlines()
        lines += re.findall(r"`(pyembed [^`]*)`", text)
        for line in lines:
            for part in re.split(r"[|;]|&&|\$\(", line.split("#")[0]):
                words = part.split()
                if "pyembed" not in words:
                    continue
                words = words[words.index("pyembed") + 1:]
                node: Any = root
                for word in words:
                    if word not in getattr(node, "commands", {}):
                        break
                    node = node.commands[word]
                if hasattr(node, "commands"):
                    continue
                options = {o for p in node.params for o in (*p.opts, *p.secondary_opts)}
                for word in words:
                    option = re.match(r"\[?(--[a-z][a-z0-9-]*)", word)
                    checked += bool(option)
                    if option and option.group(1) not in options | {"--help"}:
                        wrong.append(f"{name}: {node.name} has no {option.group(1)}: {part}")
    assert not wrong
    assert checked > 40


def _documented_sql_calls(functions: set[str]) -> list[tuple[str, str, list[str]]]:
    """(file, function, named arguments) of every `pyembed.f(...)` call in README and docs/,
    and of every `f(...)` that names one of `functions`."""
    calls = []
    for name, text in DOCS.items():
        for prefix, function, args in re.findall(r"(pyembed\.)?\b([a-z_]+)\(([^()]*)\)", text):
            if prefix or function in functions:
                calls.append((name, function, re.findall(r"([a-z_]+)\s*=>", args)))
    return calls


def test_every_sql_function_the_docs_call_exists_with_those_argument_names(
        owner: psycopg.Connection[Any]) -> None:
    """A call of `pyembed.f(..., name => ...)` in README or docs/ names a function of the schema
    (or of the Python package, `pyembed.connect(...)`) and arguments it has."""
    rows = owner.execute(
        "SELECT p.proname, coalesce(p.proargnames, '{}') FROM pg_proc p"
        " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'pyembed'").fetchall()
    arguments: dict[str, set[str]] = {}
    for function, names in rows:
        arguments.setdefault(function, set()).update(names)
    wrong = []
    calls = _documented_sql_calls(set(arguments))
    for name, function, named in calls:
        if function not in arguments:
            if not callable(getattr(pyembed, function, None)):
                wrong.append(f"{name}: no function pyembed.{function}")
            continue
        wrong += [f"{name}: pyembed.{function} has no argument {a}"
                  for a in named if a not in arguments[function]]
    assert not wrong
    assert sum(len(named) for _, _, named in calls) >= 10


def test_the_citus_layout_names_every_trigger(owner: psycopg.Connection[Any]) -> None:
    """docs/scale-out.md's "Triggers, one by one" says what becomes of each trigger on Citus: a
    trigger added to the schema must be given its row there (a corpus's partition included)."""
    owner.execute("SELECT pyembed.create_corpus('citus', 'fake/fake-hash@1:384')")
    names = {name for (name,) in owner.execute(
        "SELECT DISTINCT t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'pyembed' AND NOT t.tgisinternal")}
    section = DOCS["docs/scale-out.md"].split("### Triggers, one by one")[1].split("\n### ")[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("| `"))
    named = set(re.findall(r"`([a-z_]+)`", table))
    for stem, more in re.findall(r"`([a-z_]+?)_(?:insert|update|delete)`((?: / `_[a-z]+`)+)",
                                 table):
        named |= {stem + suffix for suffix in re.findall(r"`(_[a-z]+)`", more)}
    assert len(names) > 20
    assert sorted(names - named) == []


NOT_PYEMBEDS = {"colocate_with", "create_distributed_table", "enable_unsafe_triggers",
                "log_newpage_range", "pg_dist_authinfo", "pg_total_relation_size",
                "max_lifetime", "server_lifetime"}
"""Names docs/scale-out.md takes from PostgreSQL, Citus, psycopg_pool and PgBouncer, which
pyembed does not use."""


def test_every_name_the_docs_give_is_in_the_code() -> None:
    """A `snake_case` name in README or docs/ (a function, table, column, setting, constant) is
    a word of pyembed's code, SQL, revisions, tests or Docker files: a renamed or removed one
    (`mark_backfilled`) fails here instead of misleading a reader."""
    names = {name for text in DOCS.values()
             for name in re.findall(r"`(_?[a-z][a-z0-9]*_[a-z0-9_]+)`", text)}
    sources = [p for folder in ("pyembed", "sql", "alembic", "tests", "docker")
               for p in (REPO / folder).rglob("*")
               if p.is_file() and p.suffix in {".py", ".sql", ".sh", ".yaml", ".yml", ".example",
                                               ".Dockerfile", ""}
               and "data" not in p.relative_to(REPO).parts and p.name != "test_readme.py"]
    words = set(re.findall(r"[A-Za-z0-9_]+", "\n".join(
        p.read_text(errors="replace") for p in sources)))
    assert len(names) > 100
    assert sorted(names - words - NOT_PYEMBEDS) == []


def test_every_python_name_the_docs_give_exists() -> None:
    """`pyembed.MODULE.NAME` in README or docs/, where MODULE is one of the package's modules,
    names an attribute of it (`pyembed.db.twin`, `pyembed.bulk_load.load_vectors`)."""
    import importlib
    import pkgutil

    modules = {m.name for m in pkgutil.iter_modules(pyembed.__path__)}
    wrong, checked = [], 0
    for name, text in DOCS.items():
        for module, attribute in set(re.findall(r"\bpyembed\.([a-z_]+)\.([A-Za-z_]\w*)", text)):
            if module in modules:
                checked += 1
                if not hasattr(importlib.import_module(f"pyembed.{module}"), attribute):
                    wrong.append(f"{name}: pyembed.{module}.{attribute}")
    assert not wrong
    assert checked > 5


def test_every_environment_variable_the_package_reads_is_in_the_readme() -> None:
    """Each `PYEMBED_*` name in pyembed's source (an option's envvar, a setting it reads), and
    each service's API key and base URL variable, is named in README, so a user can find what
    changes its behaviour (ANTHROPIC_BASE_URL, which `ask` reads and checks, was not)."""
    source = "\n".join(p.read_text() for p in (REPO / "pyembed").rglob("*.py"))
    names = set(re.findall(r"\bPYEMBED_[A-Z_]+[A-Z]\b", source))
    assert len(names) > 10
    services = set(re.findall(r"\b[A-Z][A-Z0-9]*_(?:API_KEY|BASE_URL)\b", source))
    assert "VOYAGE_API_KEY" in services and "ANTHROPIC_BASE_URL" in services
    names |= services
    assert sorted(n for n in names if n not in README) == []



def test_every_secret_file_the_image_reads_is_in_the_readme() -> None:
    """The pyembed image's entrypoint turns each PYEMBED_*_FILE of its list into PYEMBED_*:
    README names every one (it had left out the worker's)."""
    script = (REPO / "docker" / "pyembed-entrypoint.sh").read_text()
    found = re.search(r"^for var in ([A-Z_ ]+); do$", script, re.M)
    assert found is not None
    files = [f"{name}_FILE" for name in found.group(1).split()]
    assert len(files) >= 3
    assert [f for f in files if f not in README] == []

def test_the_layout_names_every_module() -> None:
    """README's Layout names each module and package of pyembed/ (a new one gets its line)."""
    import pkgutil

    layout = README.split("## Layout", 1)[1]
    named = set(re.findall(r"`([a-z_0-9]+)/?`", layout))
    modules = {m.name for m in pkgutil.iter_modules(pyembed.__path__)} - {"__main__"}
    assert len(modules) > 30
    assert sorted(modules - named) == []


def test_the_readme_commands_run_as_a_user_without_sudo_once_everything_is_there(
        tmp_path: Path) -> None:
    """README: both commands run docker/install-host.sh first, which 'uses sudo when you are not
    root and finishes in seconds once everything is there'. A user who is not root, on a host
    without sudo (this suite's: make setup installed everything), stopped at once with 'run as
    root or install sudo'; now the run checks what is there and needs root only for what it
    must install, which it names. (`id` answers a user's uid here; the suite runs as root.)"""
    import os
    import subprocess

    shim = tmp_path / "id"
    shim.write_text('#!/bin/sh\n'
                    'if [ "$1" = "-u" ]; then echo 1000; else exec /usr/bin/id "$@"; fi\n')
    shim.chmod(0o755)
    path = os.pathsep.join(p for p in [str(tmp_path), *os.environ["PATH"].split(os.pathsep)]
                           if not (Path(p) / "sudo").exists())  # no sudo on the PATH
    out = subprocess.run(["bash", str(REPO / "docker" / "install-host.sh")], text=True,
                         capture_output=True, env={**os.environ, "PATH": path}, timeout=120)
    # Everything there: ready. Or, in a checkout whose code differs from what the server's
    # PL/Python has (a branch before its `make setup`), the one step that needs root named.
    assert (out.returncode == 0 and "ready: PostgreSQL" in out.stderr) or (
        out.returncode == 1 and "error: installing needs root (" in out.stderr
        and "/opt/pyembed/plpython" in out.stderr), out.stderr
