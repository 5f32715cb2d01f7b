"""One model registry, the pyembed.models table: a model registered from SQL or Python shows in
`client.models()`, `pyembed models` and PL/Python; the built-in models are seeded by the schema."""

from __future__ import annotations

import re
from typing import Any

import psycopg

import pyembed
from pyembed.errors import InvalidInput
from pyembed.models import BUILTIN, KEY_BREAKS, ModelSpec
from tests.conftest import Database
from tests.helpers import run_cli
from tests.test_cli import db_env

WIDE = {"COLUMNS": "250"}


def settings(spec: ModelSpec) -> tuple[Any, ...]:
    """What the table stores of a spec (it has no MTEB score)."""
    return (spec.key, spec.distance, spec.normalized, spec.input_types, spec.max_batch,
            spec.max_tokens, spec.request_dimensions, spec.price_per_mtok, spec.description)


def listed_line(out: str, key: str) -> str:
    """The line of a `pyembed models` table (printed wide) that holds this key, whole."""
    lines = [line for line in out.splitlines() if f" {key} " in line]
    assert len(lines) == 1, f"{key} not listed once by `pyembed models`:\n{out}"
    return lines[0]


def test_builtin_models_are_in_a_fresh_database(client: pyembed.Client,
                                                app: psycopg.Connection[Any]) -> None:
    in_sql = {r[0] for r in app.execute("SELECT model_key FROM pyembed.models")}
    assert in_sql == {s.key for s in BUILTIN}
    by_key = {s.key: s for s in client.models()}
    assert [settings(by_key[s.key]) for s in BUILTIN] == [settings(s) for s in BUILTIN]


def test_a_model_registered_from_sql_shows_in_python_and_the_cli(
        db: Database, client: pyembed.Client, owner: psycopg.Connection[Any]) -> None:
    row = owner.execute("SELECT pyembed.register_model('fake', 'made-in-sql', '1', 48, "
                      "input_types => true, max_batch => 16, description => 'from SQL')").fetchone()
    assert row == ("fake/made-in-sql@1:48",)
    expected = ModelSpec("fake", "made-in-sql", "1", 48, max_batch=16, input_types=True,
                         description="from SQL")
    assert expected in client.models()
    assert client.embedder(expected.key).spec == expected
    out = run_cli("models", env={**db_env(db), **WIDE})
    assert out.returncode == 0, out.stderr
    line = listed_line(out.stdout, expected.key)
    assert " 48 " in line and " 16 " in line and "from SQL" in line


def test_a_model_registered_from_python_shows_in_sql_plpython_and_the_cli(
        db: Database, client: pyembed.Client, owner_client: pyembed.Client,
        app: psycopg.Connection[Any]) -> None:
    spec = ModelSpec("fake", "made-in-python", "2", 40, max_batch=8, max_tokens=300,
                     distance="dot", price_per_mtok=0.25, description="from Python")
    assert owner_client.register_model(spec) == spec.key
    out = run_cli("models", env={**db_env(db), **WIDE})
    assert out.returncode == 0, out.stderr
    line = listed_line(out.stdout, spec.key)
    assert " 40 " in line and " dot " in line and " 0.25 " in line and "from Python" in line
    row = app.execute("SELECT dimensions, distance, max_batch, max_tokens, price_per_mtok, "
                      "description FROM pyembed.models WHERE model_key = %s",
                      (spec.key,)).fetchone()
    assert row is not None and row[:4] == (40, "dot", 8, 300) and row[5] == "from Python"
    assert float(row[4]) == 0.25
    dims = app.execute("SELECT vector_dims(pyembed.embed('hello', %s))", (spec.key,)).fetchone()
    assert dims == (40,)  # PL/Python resolves the key from the same table
    assert spec in client.models()


def test_the_cli_folds_long_keys_instead_of_eliding_them(db: Database,
                                                         owner_client: pyembed.Client) -> None:
    spec = ModelSpec("fake", "a-model-id-long-enough-to-need-folding-in-a-narrow-terminal", "1",
                     64, description="a description long enough to wrap in a narrow terminal")
    owner_client.register_model(spec)
    out = run_cli("models", env={**db_env(db), "COLUMNS": "100"})
    assert out.returncode == 0, out.stderr
    assert "…" not in out.stdout
    # Folded, the key's cells read top to bottom give the key back whole.
    cells = [line.split("│")[1].strip() for line in out.stdout.splitlines() if "│" in line]
    first = next(i for i, cell in enumerate(cells) if cell.startswith("fake/a-"))
    folded = ""
    for cell in cells[first:]:
        folded += cell
        if len(folded) >= len(spec.key):
            break
    assert folded == spec.key


def test_the_cli_names_a_database_without_the_schema(empty_db: Database) -> None:
    out = run_cli("models", env=db_env(empty_db))
    assert out.returncode == 1
    assert "pyembed install" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_no_second_registry_in_memory() -> None:
    assert not hasattr(pyembed.models, "Registry")
    assert not hasattr(pyembed.registry, "register")


def _key_break_cases() -> list[str]:
    """Each KEY_BREAKS range's ends and their neighbours, the ASCII and C1 controls, and a few
    ordinary characters."""
    points = {ord(c) for c in "aZ9-_.é中😀"} | set(range(1, 0x21)) | set(range(0x7f, 0xa1))
    for m in re.finditer(r"\\u([0-9A-F]{4})", KEY_BREAKS):
        point = int(m.group(1), 16)
        points |= {point - 1, point, point + 1}
    return [chr(p) for p in sorted(points) if p > 0] + ["/", "@", ":"]


def test_a_model_spec_and_register_model_accept_the_same(owner: psycopg.Connection[Any]) -> None:
    """A ModelSpec is checked in Python (one is used without a database: the built-in registry,
    an Embedder) and pyembed.register_model checks again: the two accept the same key parts,
    dimensions and distances. Before, Python refused only space, tab, newline and NUL, and SQL
    the locale's [:space:] (with lc_ctype C.UTF-8: CR, VT, FF, U+2028, U+3000 too, NBSP
    not): a spec Python made was refused when registered."""
    cases: list[tuple[str, str, str, int, str]] = [("fake", f"a{c}b", "1", 8, "cosine")
                                                   for c in _key_break_cases()]
    cases += [("fake", "m", "1", d, "cosine") for d in (-1, 0, 1, 16000, 16001)]
    cases += [("fake", "m", "1", 8, d) for d in ("cosine", "dot", "l2", "L2", "ip", "")]
    cases += [("", "m", "1", 8, "cosine"), ("fake", "m", "", 8, "cosine"),
              ("fa ke", "m", "1", 8, "cosine"), ("fake", "m", "v\u30001", 8, "cosine")]
    disagree = []
    for provider, model_id, version, dims, distance in cases:
        try:
            ModelSpec(provider, model_id, version, dims, distance=distance)
            python = True
        except InvalidInput:
            python = False
        try:
            with owner.transaction(force_rollback=True):
                owner.execute("SELECT pyembed.register_model(%s, %s, %s, %s, %s)",
                              (provider, model_id, version, dims, distance))
            sql = True
        except psycopg.Error:
            sql = False
        if python != sql:
            disagree.append((provider, model_id, version, dims, distance, python))
    assert disagree == []
    source = owner.execute("SELECT prosrc FROM pg_proc WHERE oid = "
                           "'pyembed.register_model'::regproc").fetchone()
    # (an escape string: its backslashes doubled, read alike whatever the session's
    # standard_conforming_strings)
    assert source is not None and "E'[" + KEY_BREAKS.replace("\\", "\\\\") + "]'" in source[0]
