"""A DBA's settings of a session (a role's, a database's, PGOPTIONS): pyembed works under them,
or fails in its own words having changed nothing."""

from __future__ import annotations

import re
import uuid
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import pyembed
from pyembed import schema
from pyembed.dbcall import translated
from pyembed.errors import InstallError
from pyembed.schema import sql_files
from tests.conftest import Database, drop_database
from tests.helpers import run_cli

FAKE = "fake/fake-hash@1:384"

_DOLLAR = re.compile(r"\$([A-Za-z_][A-Za-z_0-9]*)?\$")


def plain_literals_with_backslashes(text: str) -> list[str]:
    """The plain '...' string literals of SQL `text` that hold a backslash, dollar-quoted text
    (a function's body, a DO block) read as SQL too. PostgreSQL reads such a literal by the
    session's standard_conforming_strings: with it off, '\\u00a0' is a character, not the regex
    escape it was written as, and '\\x9f' an invalid byte. An escape string (E'...') and the
    lines that continue it read alike under either setting."""
    found: list[str] = []
    i, n = 0, len(text)
    last_end, last_escape = -1, False
    while i < n:
        ch = text[i]
        if text.startswith("--", i):
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif ch == '"':
            j = text.find('"', i + 1)
            i = n if j < 0 else j + 1
        elif ch == "$" and (m := _DOLLAR.match(text, i)) and not (
                i and (text[i - 1].isalnum() or text[i - 1] == "_")):
            j = text.find(m.group(0), m.end())
            found += plain_literals_with_backslashes(text[m.end():n if j < 0 else j])
            i = n if j < 0 else j + len(m.group(0))
        elif ch == "'":
            between = text[last_end + 1:i] if last_end >= 0 else "x"
            continued = not between.strip() and "\n" in between
            escape = last_escape if continued else (
                i > 0 and text[i - 1] in "eE" and not (
                    i > 1 and (text[i - 2].isalnum() or text[i - 2] == "_")))
            j = i + 1
            while j < n:
                if escape and text[j] == "\\":
                    j += 2
                elif text.startswith("''", j):
                    j += 2
                elif text[j] == "'":
                    break
                else:
                    j += 1
            if not escape and "\\" in text[i:j + 1]:
                found.append(text[i:j + 1])
            last_end, last_escape = j, escape
            i = j + 1
        else:
            i += 1
    return found


def test_the_literal_reader_tells_plain_from_escape_strings() -> None:
    assert plain_literals_with_backslashes(
        "SELECT '\\d', E'\\\\d', 'a''\\b', $$ x ~ '\\s' $$, \"q'\\\" -- '\\z'\n"
        "/* '\\y' */ E'\\\\u'\n  '\\\\x', 'ok'") == ["'\\d'", "'a''\\b'", "'\\s'"]


def test_no_sql_of_pyembed_reads_differently_without_standard_conforming_strings(
        owner: psycopg.Connection[Any]) -> None:
    """Every function of schema pyembed (PL/pgSQL parses its statements at their first run, by
    the session's setting; a SQL function's body at each call), the per-corpus ones and those
    revisions made included, and every file of sql/ (its DO blocks run in the installing
    session) write a backslash in a string only in an escape string."""
    owner.execute("SELECT pyembed.create_corpus('lits', %s)", (FAKE,))
    bodies = owner.execute(
        "SELECT p.oid::regprocedure::text, p.prosrc FROM pg_catalog.pg_proc p "
        "JOIN pg_catalog.pg_language l ON l.oid = p.prolang "
        "WHERE p.pronamespace = 'pyembed'::regnamespace AND l.lanname IN ('sql', 'plpgsql')"
    ).fetchall()
    assert any(name.startswith("pyembed._nearest_c") for name, _ in bodies)
    found = {name: lits for name, src in bodies if (lits := plain_literals_with_backslashes(src))}
    found |= {path.name: lits for path in sql_files()
              if (lits := plain_literals_with_backslashes(path.read_text()))}
    assert found == {}


def _off(dsn: str) -> str:
    return make_conninfo(dsn, options="-c standard_conforming_strings=off")


def test_every_path_works_without_standard_conforming_strings(db: Database) -> None:
    """A session whose standard_conforming_strings is off (a role's or database's setting
    older applications need) creates, writes, searches in each mode, is refused in pyembed's
    words and drops, from SQL as from Python: it failed with `invalid byte sequence for encoding
    "UTF8": 0xa0` (keyword search, an error naming a value), `0x9f` (a drop) and `invalid regular
    expression` (a corpus's creation, every document's write); and a client's cache keys, which
    psycopg escapes by the setting, reached the database 66 bytes long."""
    with psycopg.connect(_off(db.app_dsn), autocommit=True) as sql:
        assert sql.execute("SHOW standard_conforming_strings").fetchone() == ("off",)
        sql.execute("SELECT pyembed.create_corpus('kb', %s)", (FAKE,))
        sql.execute("SELECT pyembed.add_document('kb', 'a', 'alpha text about keys')")
        sql.execute("SELECT pyembed.add_document('kb', 'b', 'beta text about models')")
        for mode in ("keyword", "hybrid"):
            assert sql.execute("SELECT document_id FROM pyembed.search_text('kb', 'alpha keys', "
                               "1, NULL, %s)", (mode,)).fetchall() == [("a",)], mode
        with pytest.raises(psycopg.Error, match=r"ends with whitespace \(U\+00A0\)"):
            sql.execute("SELECT pyembed.add_document('kb', %s, 'text')", ("d\u00a0",))
        with pytest.raises(psycopg.Error, match=r"unknown corpus 'a\\u001b\[31mb'"):
            sql.execute("SELECT pyembed.lookup_corpus(%s)", ("a\x1b[31mb",))
        sql.execute("SELECT pyembed.drop_corpus('kb')")
    with pyembed.connect(_off(db.app_dsn)) as client:
        kb = client.create_corpus("kb", FAKE)
        kb.add([("a", "alpha text about keys"), ("b", "beta text about models")])
        for mode in ("vector", "keyword", "hybrid"):
            assert kb.search("alpha keys", k=1, mode=mode)[0].document_id == "a", mode
        assert kb.search("alpha keys", k=1)[0].document_id == "a"  # its key from the cache
        with pytest.raises(pyembed.InvalidInput, match=r"ends with whitespace \(U\+00A0\)"):
            kb.add([("d\u00a0", "text")])
        client.drop_corpus("kb")


def test_an_install_works_where_the_database_turns_standard_conforming_strings_off(
        empty_db: Database) -> None:
    """The install's transaction sets it for itself: a revision's '\\u00a0' was an invalid byte
    under the database's setting (`install failed, nothing was changed: invalid byte sequence for
    encoding "UTF8": 0xa0`). Installed, a session under the setting works (above)."""
    with psycopg.connect(empty_db.owner_dsn, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("ALTER DATABASE {} SET standard_conforming_strings = off")
                     .format(psycopg.sql.Identifier(empty_db.name)))
    assert schema.install(empty_db.owner_dsn) == schema.head_revision()
    assert schema.install(empty_db.owner_dsn) == schema.head_revision()  # and again (sql/ only)


@pytest.mark.parametrize("orm", [False, True])
def test_an_install_in_a_database_not_in_utf8_stops_and_says_why(cluster: Any,
                                                                   orm: bool) -> None:
    """A LATIN1 (or SQL_ASCII) database took the install, then refused every document's write
    (`Unicode normalization can only be performed if server encoding is UTF8`, from `pyembed
    ingest`, Corpus.add and add_document alike). Now the install stops first, changing nothing,
    and names the fix; so does `pyembed install` (one line, exit 1). The same InstallError in a
    process that imported pyembed.orm, whose SQLAlchemy handler raised the PE013 as ConfigError
    past the install's own words."""
    if orm:
        import pyembed.orm  # noqa: F401  (its handle_error listener, for every engine)
    name = f"t_latin1_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(cluster.dsn(owner=True), autocommit=True) as admin:
        admin.execute(psycopg.sql.SQL(
            "CREATE DATABASE {} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        ).format(psycopg.sql.Identifier(name)))
    try:
        dsn = cluster.dsn(owner=True).rsplit("/", 1)[0] + "/" + name
        with pytest.raises(InstallError, match=(
                r"^install failed, nothing was changed: pyembed needs a database whose encoding "
                r"is UTF8, not LATIN1: .* \(hint: make one with CREATE DATABASE \.\.\. ENCODING "
                r"'UTF8' TEMPLATE template0")):
            schema.install(dsn)
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT to_regnamespace('pyembed')").fetchone() == (None,)
        out = run_cli("install", env={"PYEMBED_OWNER_DSN": dsn})
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.startswith("error: install failed, nothing was changed: pyembed needs "
                                     "a database whose encoding is UTF8, not LATIN1"), out.stderr
    finally:
        drop_database(cluster, name)


def _timing_out(dsn: str) -> str:
    return make_conninfo(dsn, options="-c statement_timeout=300")


def test_a_statement_timeout_is_busy_in_pyembeds_words_not_an_unreachable_database(
        db: Database, owner: psycopg.Connection[Any]) -> None:
    """A login whose statement_timeout cancels a statement pyembed waits on (here a table another
    session locked): Busy (PE012's class) naming the setting, from the connection's own first
    statements as from a call, and one line from the command line. It was `cannot reach the
    database: canceling statement due to statement timeout` (DatabaseNotReady) when the timeout
    hit the statements pyembed.connect runs, and psycopg's QueryCanceled from a call."""
    with pyembed.connect(db.app_dsn) as client:
        client.create_corpus("kb", FAKE).add([("a", "alpha text")])
    said = r"^canceling statement due to statement timeout: the statement took longer than this"
    with owner.transaction():  # the catalogue pyembed.connect reads the vector type from
        owner.execute("LOCK TABLE pg_catalog.pg_type IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(pyembed.Busy, match=said):
            pyembed.connect(_timing_out(db.app_dsn))
    with pyembed.connect(_timing_out(db.app_dsn)) as client:
        kb = client.corpus("kb")
        with owner.transaction():
            owner.execute("LOCK TABLE pyembed.chunks IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(pyembed.Busy, match=said):
                kb.search("alpha", k=1, mode="keyword")
            out = run_cli("search", "kb", "alpha", "--mode", "keyword",
                          env={"PYEMBED_DSN": _timing_out(db.app_dsn)})
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.startswith("error: canceling statement due to statement timeout: "
                                     "the statement took longer"), out.stderr
        assert kb.search("alpha", k=1, mode="keyword")[0].document_id == "a"  # and it goes on


def test_cache_days_are_utcs_whatever_the_sessions_time_zone(db: Database) -> None:
    """A session whose TimeZone puts it on another date than UTC's (UTC+14 from 10:00 UTC,
    else UTC-12) counts its cache hits into UTC's day, and the reports read that day as today:
    cache_stats.day was the session's current_date, so `pyembed cache stats` listed tomorrow's
    row, and each reader's "today" (cache_health) was its own."""
    with psycopg.connect(db.app_dsn, autocommit=True) as conn:
        utc = conn.execute("SELECT (now() AT TIME ZONE 'UTC')").fetchone()[0]  # type: ignore[index]
        zone = "Etc/GMT-14" if utc.hour >= 10 else "Etc/GMT+12"  # (POSIX signs: GMT-14 is +14)
        conn.execute("SELECT set_config('TimeZone', %s, false)", (zone,))
        assert conn.execute("SELECT current_date").fetchone() != (utc.date(),)
        conn.execute("SELECT pyembed.cache_count(ARRAY[%s], ARRAY[3]::bigint[], "
                     "ARRAY[1]::bigint[])", (FAKE,))
        assert conn.execute("SELECT day, hits, misses FROM pyembed.cache_report(1)"
                            ).fetchall() == [(utc.date(), 3, 1)]
        assert conn.execute("SELECT hits_today, misses_today FROM pyembed.cache_health"
                            ).fetchall() == [(3, 1)]


def test_a_serialization_failure_is_busy_in_pyembeds_words(
        db: Database, app: psycopg.Connection[Any]) -> None:
    """Under default_transaction_isolation serializable or repeatable read (a DBA's setting), a
    write that another session's committed write conflicts with fails with SQLSTATE 40001:
    Busy (retry; nothing changed), from db.translate as from the command line, where two
    `pyembed ingest` runs into one corpus under serializable gave psycopg's SerializationFailure
    (from Python) and its bare message (from the command line)."""
    app.execute("SELECT pyembed.create_corpus('kb', %s)", (FAKE,))
    app.execute("SELECT pyembed.add_document('kb', 'a', 'alpha text')")
    dsn = make_conninfo(db.app_dsn, options="-c default_transaction_isolation=repeatable\\ read")
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM pyembed.documents").fetchone() == (1,)
        app.execute("SELECT pyembed.add_document('kb', 'a', 'alpha text, changed')")
        with pytest.raises(pyembed.Busy, match=(
                r"^could not serialize access due to concurrent update: another session's "
                r"transaction changed what this one read or writes .* changed nothing: retry$")):
            with translated():
                conn.execute("SELECT pyembed.add_document('kb', 'a', 'alpha text, mine')")
    assert app.execute("SELECT content FROM pyembed.chunks").fetchall() == [
        ("alpha text, changed",)]
