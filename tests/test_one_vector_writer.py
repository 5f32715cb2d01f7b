"""Vectors are written by one function, pyembed.vectors.copy_vectors (COPY into the corpus's
partition, whose triggers check the key, the tenant and the norm): read from the code (pyembed/,
sql/) and from the database's function bodies, so that a second writer added tomorrow (five
once wrote vectors each its own way) fails here. Deletes and the one column the server keeps
(doc_no) are listed with why."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parent.parent
VECTOR_WRITE = re.compile(
    r"\b(INSERT\s+INTO|UPDATE|DELETE\s+FROM|COPY|TRUNCATE)\s+(?:ONLY\s+)?"
    r"(pyembed\.(?:vectors\w*|%I|\{\})|\{\}|vectors\w*)(?=[\s(\"'])|"
    r"\bvector_partition\s*\(", re.IGNORECASE)

ALLOWED = {
    # Where vectors are written, and why there.
    ("pyembed/vectors.py", "vector_partition("): "copy_vectors's COPY into the corpus's "
    "partition (and the function that names it): the one writer; corpora, the worker, "
    "migrations and bulk loads call it",
    ("pyembed/vectors.py", "COPY {}"): "as vector_partition(",
    ("sql/010-guards.sql", "UPDATE pyembed.vectors"): "a moved chunk's doc_no, the server's "
    "(pyembed._chunk_moved)",
    ("sql/015-chunks.sql", "DELETE FROM pyembed.vectors"): "a deleted chunk's vectors",
    ("sql/020-corpora.sql", "DELETE FROM pyembed.vectors"): "a replaced range's old vectors "
    "(pyembed._clear_vectors, called by copy_vectors)",
    ("sql/070-migrations.sql", "DELETE FROM pyembed.vectors"): "a migration's start (a rolled-back "
    "attempt's stale vectors of its key) and its cleanup (the old key's)",
}


def _writes(text: str) -> set[str]:
    return {" ".join(m.group(0).split()) for m in VECTOR_WRITE.finditer(text)}


def test_vectors_have_one_writer_in_the_code() -> None:
    found = set()
    for path in sorted([*REPO.glob("pyembed/**/*.py"), *REPO.glob("sql/*.sql")]):
        if "data" in path.relative_to(REPO).parts:
            continue
        text = "\n".join(line for line in path.read_text().splitlines()
                         if not line.lstrip().startswith(("#", "--")))
        found |= {(str(path.relative_to(REPO)), w) for w in _writes(text)}
    assert found == set(ALLOWED)


def test_no_function_of_the_database_writes_vectors_but_those_listed(
        owner: psycopg.Connection[Any]) -> None:
    """The installed function bodies (an upgrade's included): only the listed SQL files'
    functions delete or update vectors, and none inserts one."""
    bodies = owner.execute(
        "SELECT p.proname, p.prosrc FROM pg_proc p "
        "WHERE p.pronamespace = 'pyembed'::regnamespace").fetchall()
    writes = {(name, w.split()[0].upper()) for name, src in bodies for w in _writes(src)}
    assert {w for _, w in writes} <= {"DELETE", "UPDATE"}, writes
    assert {name for name, _ in writes} == {"_chunk_moved", "_chunks_deleted", "_clear_vectors",
                                            "migration_start", "migration_cleanup"}
