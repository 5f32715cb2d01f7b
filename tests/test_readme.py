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
