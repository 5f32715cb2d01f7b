"""What a backend imports: PL/Python runs its statements through plpy, so no module that a
function of sql/ imports pulls in the client's driver (psycopg, pgvector-python), which every
session's first call would otherwise pay for."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ("psycopg", "psycopg_binary", "pgvector")


def plpython_imports() -> list[str]:
    """The pyembed modules that the PL/Python functions of sql/ import."""
    found = set()
    for path in sorted((ROOT / "sql").glob("*.sql")):
        for frm, names, plain in re.findall(
                r"^\s*(?:from (pyembed[\w.]*) import ([\w, ]+)|import (pyembed[\w.]*))",
                path.read_text(), re.M):
            if plain:
                found.add(plain)
            else:
                found.update(f"{frm}.{n.strip()}" for n in names.split(","))
    return sorted(found)


def test_the_scan_finds_the_entry_points() -> None:
    assert {"pyembed.indb", "pyembed.bm25", "pyembed.config"} <= set(plpython_imports())


@pytest.mark.parametrize("module", plpython_imports())
def test_a_plpython_import_loads_no_driver(module: str) -> None:
    code = ("import importlib, sys\n"
            f"importlib.import_module({module!r})\n"
            f"print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {DRIVER!r})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT)}, check=True, timeout=120)
    assert out.stdout.split() == [], f"import {module} loads the driver: {out.stdout.strip()}"


def test_a_backends_first_embed_loads_no_driver(owner: psycopg.Connection[Any]) -> None:
    """Through a real backend: after a session's first pyembed.embed (which builds the
    embedder too), its interpreter holds pyembed and no driver module."""
    owner.execute("SELECT pyembed.embed('x', 'fake/fake-hash@1:384', 'query')")
    owner.execute(f"""CREATE FUNCTION pg_temp.loaded() RETURNS text[] LANGUAGE plpython3u AS $$
import sys
return sorted(m for m in sys.modules if m.split('.')[0] in {DRIVER!r} + ('pyembed',))
$$""")
    row = owner.execute("SELECT pg_temp.loaded()").fetchone()
    assert row is not None
    assert "pyembed.indb" in row[0]
    assert [m for m in row[0] if not m.startswith("pyembed")] == []
