"""Every SQL entry point with every bad input, walked from the catalogue: each function in schema
pyembed that the application role (and so a tenant's login) or the worker role may EXECUTE,
called as a tenant's login, as the application role itself and (the worker's own functions) as a
worker's login, with hostile values in each argument in turn, chosen by the argument's type
(text, vectors, integers, counts, floats, jsonb, bytea, arrays), plus an unknown corpus and
another tenant's corpus where an argument names or numbers one. NULL in each argument is
test_sql_errors' walk; the owner's migration steps have theirs there too.

For each call: an error has a pyembed SQLSTATE (PExxx) or a standard one listed in STANDARD with
why, a message with no Python, internal name or NULL-as-None in it, never one of LEAKS, and a
message, detail and hint of at most LONGEST characters with no control or format character; the
transaction goes on after it (the call rolled back to a savepoint); a call that works leaves no
half-written document, and one that takes arrays together refuses one of them empty. And nothing
the walk did reached another session: every table of the schema (row counts and a checksum of
each, read by the owner) is as it was.

The functions that reach a provider (embed, embed_batch, search_text, search_reranked and the
searches by text) are called with the fake model and reranker, in-process: the values walked
here are the caller's arguments. A provider's own failures (missing keys, 429, 5xx, timeouts,
answers out of shape) are test_provider_errors', test_provider_answers' and
test_transport_retries', against tests/fakeapi's servers."""

from __future__ import annotations

import json
import re
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pyembed import db as pyembed_db
from pyembed import tenants
from pyembed.errors import InvalidInput
from pyembed.search import check_k
from tests.conftest import Database
from tests.helpers import login_role, run_cli, sql_error
from tests.test_cli import db_env
from tests.test_sql_errors import APP_FUNCTIONS, CALLS_THAT_WORK, FAKE, RAISES

DIMS = 384


@dataclass(frozen=True)
class Value:
    """A hostile value: a name for the report, the SQL that makes it (with %s for `param`)."""

    name: str
    sql: str
    param: Any = None
    cast: bool = True  # cast to the argument's type; False: passed as its own type (bigint)


def _vec(values: list[str]) -> str:
    return "[" + ",".join(values) + "]"


MB_TEXT = "word " * 200_000
TEXTS = [
    Value("empty", "%s", ""),
    Value("whitespace", "%s", " \t\n\u00a0\u3000"),
    Value("1 MB", "%s", MB_TEXT),
    Value("control characters", "%s", "a\x01\x07\x1b[31mb\x7f\x9fc\n"),
    Value("quotes", "%s", "it's \"quoted\" \\'"),
    Value("injection", "%s", "\"; DROP TABLE x; --"),
    Value("200 characters", "%s", "ж" * 200),
    Value("mixed scripts", "%s", "Straße Ωμέγα имя 名前 اسم"),
    Value("RTL marks", "%s", "abc\u202edef\u200f\u2066x"),
]
CORPUS_TEXTS = [Value("unknown corpus", "%s", "nope"),
                Value("another tenant's corpus", "%s", "theirs")]
INTEGERS = [Value("0", "0"), Value("-1", "-1"), Value("2^31-1", "2147483647"),
            Value("-2^31", "-2147483648"),
            Value("bigint past integer", "%s::bigint", 2**31, cast=False)]
CORPUS_IDS = [Value("unknown corpus id", "987654"),
              Value("another tenant's corpus id",
                    "(SELECT corpus_id FROM pyembed.corpora WHERE name = 'theirs')")]
BIGINTS = [Value("0", "0"), Value("-1", "-1"), Value("2^63-1", "9223372036854775807"),
           Value("-2^63", "-9223372036854775808")]
COUNTS = [Value("0", "0"), Value("-1", "-1"), Value("2.5", "2.5"), Value("NaN", "'NaN'"),
          Value("Infinity", "'Infinity'"), Value("-Infinity", "'-Infinity'"),
          Value("bigint past integer", "%s::bigint", 2**31, cast=False),
          Value("numeric past bigint", "1e30", cast=False)]
FLOATS = [Value("NaN", "'NaN'"), Value("Infinity", "'Infinity'"),
          Value("-Infinity", "'-Infinity'"), Value("-1", "-1"), Value("0", "0"),
          Value("huge", "1e300")]
REALS = [Value("NaN", "'NaN'"), Value("Infinity", "'Infinity'"), Value("-1", "-1"),
         Value("huge", "3e38")]
VECTORS = [
    Value("zero", "%s", _vec(["0"] * DIMS)),
    Value("wrong dimensions", "%s", "[1,2,3]"),
    Value("huge norm", "%s", _vec(["3e38"] * DIMS)),
    Value("tiny norm", "%s", _vec(["1e-38"] * DIMS)),
    Value("NaN", "%s", _vec(["NaN"] * DIMS)),
    Value("Infinity", "%s", _vec(["Infinity"] * DIMS)),
]
JSONS = [
    Value("array", "%s", "[1, 2]"), Value("string", "%s", '"s"'), Value("number", "%s", "1"),
    Value("null", "%s", "null"),
    Value("nested 2000 deep", "%s", '{"a":' * 2000 + "1" + "}" * 2000),
    Value("100k keys", "%s", json.dumps({f"k{i}": i for i in range(100_000)})),
    Value("hostile key", "%s", json.dumps({"\"; DROP TABLE x; --": "'", "": None})),
]
BYTEAS = [Value("empty", "''"), Value("1 MB", "%s", b"\x00" * 1_000_000),
          Value("33 bytes", "%s", b"\xff" * 33)]


def _arrays(work: str, kind: str) -> list[Value]:
    element = kind[:-2]
    big = 100 if element == "vector" else 100_000
    return [Value("empty array", "'{}'"), Value("NULL element", f"ARRAY[NULL::{element}]"),
            Value(f"{big} elements", f"array_fill((({work})::{kind})[1], ARRAY[{big}])")]


def values_for(name: str, arg: str, kind: str, work: str) -> list[Value]:
    """The hostile values an argument of this type (and name) takes."""
    if kind == "text":
        return TEXTS + (CORPUS_TEXTS if arg in ("corpus", "p_corpus") else [])
    if kind == "integer":
        values = INTEGERS + (CORPUS_IDS if arg.endswith("corpus_id") else [])
        return [v for v in values if name not in FROM_PYEMBED or v.cast]
    if kind == "numeric":
        return COUNTS
    if kind == "bigint":
        return BIGINTS
    if kind == "double precision":
        return FLOATS
    if kind == "real":
        return REALS
    if kind == "vector":
        return VECTORS
    if kind == "jsonb":
        return JSONS
    if kind == "bytea":
        return BYTEAS
    if kind.endswith("[]"):
        extra = [Value("hostile text", "%s", ["\"; DROP TABLE x; --", "", "\x01"])] \
            if kind == "text[]" else []
        return _arrays(work, kind) + extra
    if kind == "boolean":
        return []  # NULL only: test_sql_errors
    raise AssertionError(f"{name}.{arg}: a new type {kind}: add its hostile values")


FROM_PYEMBED = {
    # A function whose integer arguments pyembed's client fills with a number it read from the
    # database (a corpus id, a job's attempts) or checked first (check_k, dbcall.integer): no
    # caller passes one past integer, so the walk gives it none. A count a SQL client gives is
    # numeric instead (pyembed._count_arg).
    "_clear_vectors": "vectors.copy_vectors: the corpus id", "_dequeue_written": "as _clear_vectors",
    "_eval_queries_enough": "migration: the corpus id", "_vector_check": "the corpus id",
    "claim_jobs": "the worker's settings, checked (dbcall.integer)", "expire_jobs": "as claim_jobs",
    "fail_job": "the worker: a claimed job's corpus id and attempts", "hold_jobs": "as fail_job",
    "record_search": "query.py: the corpus id and k, checked", "reserve_query": "as record_search",
    "reserve_usage": "the corpus id and the counted requests", "search_query": "as record_search",
    "search_embedded": "as record_search",
}

LEAKS = {
    # A SQLSTATE that is never a clear error from inside a function: what it says.
    "XX000": "an internal error (a bug)", "42883": "function does not exist",
    "42P01": "an undefined table", "42703": "an undefined column",
    "2202E": "an array subscript out of range", "22012": "a division by zero",
    "22003": "a numeric value out of range", "38000": "an external routine's exception",
    "54001": "stack depth exceeded", "57014": "a statement timeout", "42501": "a privilege "
    "pyembed's function lacks", "23503": "a foreign key", "22P02": "an invalid text "
    "representation", "2201E": "an invalid logarithm", "54000": "a program limit",
    "42725": "a function that is not unique",
}
STANDARD = {
    # A standard SQLSTATE a hostile value may get, with why it is clear (and what it must name).
    "23514": "a table's CHECK, named <table>_<column>_bound / _check / _in_range / _object "
             "(README: InvalidInput in Python, naming the column)",
    "23502": "a NOT NULL, naming its column (README, as 23514)",
    "22000": "pgvector's input refuses NaN and Inf in a vector (README), before any function of "
             "pyembed is called: the caller's own literal",
}
CHECK = re.compile(r'^new row for relation "(\w+)" violates check constraint "(\w+)"')
PL_TAKES_NOTHING = {
    # A PL/Python function a caller may execute itself, and why its errors need no PL/pgSQL
    # wrapper (PL/Python puts the exception's class before every message it raises, PG 15:
    # "plpy.Error: ", which only a wrapper takes off): it takes no argument, so no caller's
    # value reaches it; it fails only when the server cannot import pyembed (doctor's report).
    "version": "the server's pyembed version, doctor's probe",
    "code_digest": "the server's pyembed code digest, doctor's check",
}
LONGEST = 1000
"""An error's message, detail or hint shows a caller's value cut (a 1 MB value is not read back
in every error and log line), and escapes its control and format characters (a terminal's
escape sequences, a right-to-left override that reorders the message as shown)."""
INTERNAL_WORDS = ("plpy", "Traceback", "PL/Python", "NoneType", "None", "nan", "spiexceptions",
                  "PL/pgSQL", "SQL statement")


def _snapshot(owner: psycopg.Connection[Any]) -> dict[str, tuple[int, str]]:
    """Every table of the schema: its row count and a checksum of its rows."""
    tables = [r[0] for r in owner.execute(
        "SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'pyembed'::regnamespace "
        "AND c.relkind IN ('r', 'p') AND NOT c.relispartition ORDER BY 1").fetchall()]
    out = {}
    for table in tables:
        row = owner.execute(sql.SQL(
            "SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') "
            "FROM pyembed.{} t").format(sql.Identifier(table))).fetchone()
        assert row is not None
        out[table] = (int(row[0]), str(row[1]))
    return out


HALF_WRITTEN = """
SELECT (SELECT count(*) FROM pyembed.documents d
         WHERE NOT EXISTS (SELECT FROM pyembed.chunks c WHERE c.corpus_id = d.corpus_id
                                                          AND c.document_id = d.document_id))
"""


@dataclass
class Walk:
    conn: psycopg.Connection[Any]
    wrong: list[str]
    calls: int = 0
    slowest: tuple[float, str] = (0.0, "")

    def call(self, name: str, args: list[str], params: list[Any], label: str,
             refused: bool = False) -> None:
        query = f"SELECT * FROM pyembed.{name}({', '.join(args)})"
        self.calls += 1
        began = time.monotonic()
        with self.conn.transaction(force_rollback=True):
            self.conn.execute("SELECT pyembed.current_tenant()")  # the transaction has begun
            try:
                with self.conn.transaction():
                    self.conn.execute(query, params).fetchall()
                    if refused:
                        self.wrong.append(f"{label}: works (arrays of one element each, and "
                                          "this one empty: its element's row is skipped)")
                    half = self.conn.execute(HALF_WRITTEN).fetchone()
                    if half != (0,):
                        self.wrong.append(f"{label}: works, and leaves {half} half-written "
                                          "documents")
            except psycopg.Error as err:
                self.judge(name, label, err)
            # The transaction goes on after the call, its error or not.
            assert self.conn.execute("SELECT 1").fetchone() == (1,), label
        took = time.monotonic() - began
        if took > self.slowest[0]:
            self.slowest = (took, label)

    def judge(self, name: str, label: str, err: psycopg.Error) -> None:
        state = err.sqlstate or ""
        message = err.diag.message_primary or ""
        said = f"{label}: {state} {message[:200]}"
        check = CHECK.match(message)
        if state == "23514" and not (check and pyembed_db.check_message(*check.groups())):
            self.wrong.append(f"{said} (a CHECK README does not describe)")
        elif state == "22000" and "not allowed in vector" not in message:
            self.wrong.append(f"{said} (not pgvector's input)")
        elif state in LEAKS:
            self.wrong.append(f"{said} ({LEAKS[state]})")
        elif not state.startswith("PE") and state not in STANDARD:
            self.wrong.append(f"{said} (a standard SQLSTATE not in STANDARD)")
        elif not message or any(w in message for w in INTERNAL_WORDS) \
                or any(w in (err.diag.message_detail or "") for w in INTERNAL_WORDS[:3]):
            self.wrong.append(f"{said} (an internal word)")
        for part, text in (("message", message), ("detail", err.diag.message_detail),
                           ("hint", err.diag.message_hint)):
            if len(text or "") > LONGEST:
                self.wrong.append(f"{said} (a {part} of {len(text or '')} characters)")
            if any(unicodedata.category(ch) in ("Cc", "Cf") for ch in text or ""):
                self.wrong.append(f"{said} (a {part} with a control or format character: "
                                  f"{text!r:.200})")


WORKER_CALLS = {
    # A call that works of each function the worker role adds to the application role's.
    "count_provider_error": ["'voyage'", "'rate_limited'"],
}


@pytest.fixture
def logins(db: Database, owner: psycopg.Connection[Any]) -> Iterator[dict[str, str]]:
    """The logins the walk calls as, by name: a tenant's (acme, whose corpus docs has a
    document; beta's corpus theirs is another tenant's), the application role's own (no tenant:
    its corpus docs has a document too), and a worker's (a member of pyembed_app and
    pyembed_worker, as `pyembed worker` logs in)."""
    with login_role(owner, db.app_dsn, "acme", sql.SQL("IN ROLE pyembed_app")) as acme, \
            login_role(owner, db.app_dsn, "beta", sql.SQL("IN ROLE pyembed_app")) as beta, \
            login_role(owner, db.app_dsn, "worker",
                       sql.SQL("IN ROLE pyembed_app, pyembed_worker")) as worker:
        for tenant, dsn, corpus in (("acme", acme, "docs"), ("beta", beta, "theirs"),
                                    (None, db.app_dsn, "docs")):
            if tenant:
                tenants.create_tenant(owner, tenant)
                tenants.add_member(owner, tenant,
                                   str(psycopg.conninfo.conninfo_to_dict(dsn)["user"]))
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SELECT pyembed.create_corpus(%s, %s)", (corpus, FAKE))
                conn.execute("SELECT pyembed.add_document(%s, 'd1', 'refunds take five days')",
                             (corpus,))
        yield {"a tenant's login": acme, "the application role": db.app_dsn, "a worker": worker}


def _walk(conn: psycopg.Connection[Any], functions: list[tuple[Any, ...]],
          calls: dict[str, list[str]]) -> Walk:
    walk = Walk(conn, [])
    for name, argnames, types, _defaults in functions:
        if name in RAISES:
            continue
        works = calls[name]
        arrays = [t.endswith("[]") and w != "NULL" for w, t in zip(works, types, strict=True)]
        for i, (arg, kind) in enumerate(zip(argnames or [], types, strict=False)):
            for value in values_for(name, arg, kind, works[i]):
                args = [f"({a})::{t}" for a, t in zip(works, types, strict=True)]
                args[i] = f"({value.sql})::{kind}" if value.cast else value.sql
                params = [value.param] if "%s" in value.sql else []
                # Arrays given together are one element each: one empty is refused (PE005),
                # where unnest padded it with NULLs.
                refused = value.name == "empty array" and sum(arrays) > 1 and arrays[i]
                walk.call(name, args, params, f"{name}({arg} {value.name})", refused)
    return walk


WORKER_ONLY = APP_FUNCTIONS.replace(
    "has_function_privilege(%s, p.oid, 'EXECUTE')",
    "has_function_privilege('pyembed_worker', p.oid, 'EXECUTE') "
    "AND NOT has_function_privilege('pyembed_app', p.oid, 'EXECUTE')")


@pytest.mark.parametrize("login", ["a tenant's login", "the application role"])
def test_hostile_values_in_every_argument_of_every_function_get_a_clear_error_and_lose_nothing(
        owner: psycopg.Connection[Any], logins: dict[str, str], login: str) -> None:
    """Every function the application role may execute (a tenant's login may execute the same:
    test_sql_errors), each argument in turn given each hostile value of its type, as a tenant's
    login and as the application role itself."""
    before = _snapshot(owner)
    began = time.monotonic()
    with psycopg.connect(logins[login], autocommit=True) as conn:
        conn.execute("SET statement_timeout = '10s'")
        functions = conn.execute(APP_FUNCTIONS, ("pyembed_app",)).fetchall()
        assert {f[0] for f in functions} <= set(CALLS_THAT_WORK) | set(RAISES), \
            "a new function: add its call to test_sql_errors.CALLS_THAT_WORK"
        walk = _walk(conn, functions, CALLS_THAT_WORK)
    print(f"{walk.calls} calls in {time.monotonic() - began:.1f} s; slowest "
          f"{walk.slowest[0]:.2f} s: {walk.slowest[1]}")
    assert walk.calls > 1000
    assert walk.wrong == [], "\n".join(walk.wrong)
    assert _snapshot(owner) == before


def test_hostile_values_in_the_worker_roles_own_functions(
        owner: psycopg.Connection[Any], logins: dict[str, str]) -> None:
    """The functions the worker role may execute beyond the application role's, as a worker."""
    before = _snapshot(owner)
    with psycopg.connect(logins["a worker"], autocommit=True) as conn:
        functions = conn.execute(WORKER_ONLY).fetchall()
        assert {f[0] for f in functions} == set(WORKER_CALLS), \
            "a new function of the worker role: add its call to WORKER_CALLS"
        walk = _walk(conn, functions, WORKER_CALLS)
    assert walk.calls > 10
    assert walk.wrong == [], "\n".join(walk.wrong)
    assert _snapshot(owner) == before


K_CALLS = [
    # Every function a SQL client gives a k, called as psql types it: a number past integer is a
    # bigint, one past bigint a numeric.
    "SELECT * FROM pyembed.search('docs', pyembed.embed('refunds', '{key}', 'query'), '{key}', {k})",
    "SELECT * FROM pyembed.search_text('docs', 'refunds', {k})",
    "SELECT * FROM pyembed.search_text('docs', 'refunds', k => {k}, mode => 'hybrid')",
    "SELECT * FROM pyembed.search_keyword('docs', 'refunds', {k})",
    "SELECT * FROM pyembed.search_hybrid('docs', 'refunds', pyembed.embed('refunds', '{key}', "
    "'query'), '{key}', {k})",
    "SELECT * FROM pyembed.search_reranked('docs', 'refunds', 'fake/overlap', {k})",
]


@pytest.mark.parametrize("k", [2**31, 10**20, 0, "2.5"])
def test_a_k_out_of_range_reads_the_same_in_sql_python_and_the_cli(
        db: Database, app: psycopg.Connection[Any], k: int | str) -> None:
    """Before, a k past PostgreSQL's integer failed in SQL as "function pyembed.search_text(
    unknown, unknown, bigint) does not exist" (the searches took integer k), where Python and the
    CLI said "k must be 1..1000, got 2147483648"."""
    app.execute("SELECT pyembed.create_corpus('docs', %s)", (FAKE,))
    app.execute("SELECT pyembed.add_document('docs', 'd1', 'refunds take five days')")
    said = f"k must be 1..1000, got {k}"
    if isinstance(k, int):
        with pytest.raises(InvalidInput) as python:
            check_k(k)
        assert str(python.value) == said
        out = run_cli("search", "docs", "refunds", "-k", str(k), env=db_env(db))
        assert (out.returncode, out.stderr.strip()) == (1, f"error: {said}")
    for call in K_CALLS:
        err = sql_error(app, call.format(key=FAKE, k=k))
        assert (err.sqlstate, err.diag.message_primary) == ("PE005", said), call


def test_no_role_but_the_owner_executes_a_pl_python_function_that_takes_a_value(
        owner: psycopg.Connection[Any], logins: dict[str, str]) -> None:
    """Walks the catalogue's PL/Python functions: one the application role, a tenant's login or
    the worker may execute is a wrapper's body whose errors reach them with PL/Python's
    "plpy.Error: " before the message (its wrapper takes it off), unless it takes no value at
    all (PL_TAKES_NOTHING). The body's own error is shown to read so, which is why the wrapper
    is needed. Before, the application role executed _add_document, add_document's body
    (add_document ran as its caller), and got 'plpy.Error: metadata must be a JSON object';
    this walk passed it by taking the prefix off."""
    plpython = [r[0] for r in owner.execute(
        "SELECT p.proname FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang "
        "WHERE p.pronamespace = 'pyembed'::regnamespace AND l.lanname = 'plpython3u'")]
    assert "_add_document" in plpython
    for login, dsn in logins.items():
        with psycopg.connect(dsn, autocommit=True) as conn:
            reachable = {r[0] for r in conn.execute(
                "SELECT p.proname FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang "
                "WHERE p.pronamespace = 'pyembed'::regnamespace AND l.lanname = 'plpython3u' "
                "AND has_function_privilege(p.oid, 'EXECUTE')")}
        assert reachable == set(PL_TAKES_NOTHING), login
        for name in PL_TAKES_NOTHING:
            assert owner.execute("SELECT pronargs FROM pg_proc WHERE oid = %s::regprocedure",
                                 (f"pyembed.{name}()",)).fetchone() == (0,)
    # What a body says to whoever calls it directly, and its wrapper without the prefix.
    body = sql_error(owner, "SELECT pyembed._add_document('docs', 'd1', 'text', '[1]')")
    assert body.diag.message_primary == "plpy.Error: metadata must be a JSON object"
    with psycopg.connect(logins["the application role"], autocommit=True) as app:
        err = sql_error(app, "SELECT pyembed.add_document('docs', 'd1', 'text', '[1]')")
        assert (err.sqlstate, err.diag.message_primary) == (
            "PE005", "metadata must be a JSON object")
