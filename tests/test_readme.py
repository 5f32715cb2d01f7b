"""Every code example of the README runs (Python and SQL against a real database)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pgvector import Vector

import pyembed
from pyembed import store
from tests.conftest import REPO, Database
from tests.helpers import unit

README = (REPO / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_python_example_runs(db: Database, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PYEMBED_DSN", db.app_dsn)
    (code,) = blocks("python")
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].split()[1] == "e4012"
    assert out[0].split()[2] == pyembed.LOCAL_DEFAULT.key


def test_sql_example_behaves_as_documented(app: psycopg.Connection[Any]) -> None:
    sql = re.sub(r"--.*", "", blocks("sql")[0])
    statements = [s.strip() for s in sql.split(";") if s.strip()]
    assert len(statements) == 3
    app.execute(statements[0])
    info = store.corpus_info(app, "docs")
    store.write_chunks(app, info, [store.ChunkRow("d", 0, "text", unit(1024, 1))], info.model_key)
    ok, bad = statements[1:3]
    assert app.execute(ok.replace("$1::vector", "%s"), (Vector(unit(1024, 1)),)).fetchall()
    with pytest.raises(psycopg.Error) as err:
        app.execute(bad.replace("$1::vector", "%s"), (Vector(unit(1024, 1)),))
    assert err.value.sqlstate == "PE001"


def test_readme_mentions_only_existing_cli_commands() -> None:
    text = "\n".join(blocks("sh"))
    for cmd in ("db init", "install", "models", "corpus create", "corpus list"):
        assert f"pyembed {cmd}" in text or cmd in text
    assert Path(REPO / "docker" / "compose.yaml").exists()
