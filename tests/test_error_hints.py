"""Every pyembed error raised in SQL carries its fix in HINT, as PostgreSQL's own errors do, not
in its message: psql shows it on a line of its own, a driver in its own field, and Python and
the command line after the message as "(hint: ...)" (pyembed.db.translate). A walk of sql/'s
text finds each RAISE of a PExxx error (a new one included); the errors pyembed's Python raises
inside SQL (PL/Python: pyembed.indb.sql_error) carry the hint they were made with
(PyembedError's `hint`). Before, 41 of them had no HINT and several put the fix in the message
(PE008's "VOYAGE_API_KEY is not set: export it ...", PE006's "unknown model key ... (pyembed
models lists them)", "... : shift 100 first")."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pyembed
from tests.conftest import REPO

RAISE = re.compile(r"RAISE\s+EXCEPTION\s+USING\s+ERRCODE\s*=\s*'(PE\d{3})'")
STATES_ITS_VALUES = re.compile(r"\bmust\b|, not %s|\bat most\b|\bneeds\b")
"""A message that says which values are taken ('k must be 1..1000, got 0', 'group_by must be
document or chunk, not ...', 'x is NULL: pyembed.f() needs a value for it') is its own fix: a
HINT would say it again."""
STATES_ITS_VALUES_TOO = {
    # A message given by a variable, which says which values are taken: where its words come from.
    "022-vector-index.sql": "MESSAGE = problem",  # pyembed._index_settings_problem's: 'index
    # setting m must be an integer 2..100, got 1', the table CHECK's words too (test_storage)
}


def _raises(text: str) -> list[tuple[int, str]]:
    """(line, statement) of each RAISE of a PExxx error in `text`, to its ';' outside quotes."""
    found = []
    for m in RAISE.finditer(text):
        end, quoted = m.end(), False
        while end < len(text) and (text[end] != ";" or quoted):
            quoted ^= text[end] == "'"
            end += 1
        found.append((text.count("\n", 0, m.start()) + 1, text[m.start():end + 1]))
    return found


def test_every_pe_error_raised_in_sql_has_its_fix_in_hint() -> None:
    files = sorted((REPO / "sql").glob("*.sql"))
    walked = [(f, line, st) for f in files for line, st in _raises(f.read_text(encoding="utf-8"))]
    assert len(walked) > 100
    missing = [f"{Path(f).name}:{line}" for f, line, st in walked
               if not re.search(r"\bHINT\s*=", st)
               and not STATES_ITS_VALUES.search(st.split("MESSAGE", 1)[-1])
               and STATES_ITS_VALUES_TOO.get(Path(f).name, "\0") not in st]
    assert missing == []


def test_the_walk_finds_a_raise_without_hint() -> None:
    text = ("RAISE EXCEPTION USING ERRCODE = 'PE002', MESSAGE = format('unknown corpus id %s; "
            "really', id);\nRAISE EXCEPTION USING ERRCODE = 'PE005', MESSAGE = 'x', HINT = 'y';")
    (first, st), (second, _) = _raises(text)
    assert (first, second) == (1, 2)
    assert st.endswith("id);") and "HINT" not in st


def test_a_fix_in_sql_reaches_python_and_psql_as_the_hint(
        app: psycopg.Connection[Any], db: Any) -> None:
    with pytest.raises(psycopg.Error) as err:
        app.execute("SELECT pyembed.create_corpus('Bad Name', 'fake/fake-hash@1:384')")
    assert (err.value.diag.message_primary, err.value.diag.message_hint) == (
        "invalid corpus name 'Bad Name'",
        "use 1-63 lowercase letters, digits, _ or -, starting with a letter or digit")
    with pyembed.connect(db.app_dsn) as client, pytest.raises(pyembed.InvalidInput) as said:
        client.create_corpus("Bad Name", "fake/fake-hash@1:384")
    assert str(said.value) == ("invalid corpus name 'Bad Name' (hint: use 1-63 lowercase "
                               "letters, digits, _ or -, starting with a letter or digit)")


def test_pe008_and_pe006_from_pyembeds_python_in_sql_carry_their_hint(
        app: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.Error) as err:
        app.execute("SELECT pyembed.embed('text', 'openai/text-embedding-3-small@1:1536')")
    assert err.value.sqlstate == "PE008"
    assert err.value.diag.message_primary == "OPENAI_API_KEY is not set for the database"
    assert err.value.diag.message_hint == (
        "as the owner, run `pyembed secret set OPENAI_API_KEY` (or SELECT "
        "pyembed.set_secret('OPENAI_API_KEY', '...'))")
    with pytest.raises(psycopg.Error) as err:
        app.execute("SELECT pyembed.embed('text', 'nobody/none@1:3')")
    assert (err.value.sqlstate, err.value.diag.message_primary,
            err.value.diag.message_hint) == (
        "PE006", "unknown model key 'nobody/none@1:3'", "`pyembed models` lists the known keys")


def test_a_python_error_shows_its_hint_after_its_message() -> None:
    exc = pyembed.MissingAPIKey("VOYAGE_API_KEY is not set", hint="export it")
    assert (str(exc), exc.said, exc.hint) == (
        "VOYAGE_API_KEY is not set (hint: export it)", "VOYAGE_API_KEY is not set", "export it")
    assert str(pyembed.InvalidInput("no hint")) == "no hint"
