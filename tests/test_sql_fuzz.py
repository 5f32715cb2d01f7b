"""Every SQL entry point with every bad input, walked from the catalogue: each function in schema
pyembed that the application role (and so a tenant's login) or the worker role may EXECUTE,
called as a tenant's login, as the application role itself and (the worker's own functions) as a
worker's login, with hostile values in each argument in turn, chosen by the argument's type
(text, vectors, integers, counts, floats, jsonb, bytea, arrays), plus an unknown corpus and
another tenant's corpus where an argument names or numbers one; and every function only the
owner may execute (a DBA's in psql: migrations, the model registry, index settings and rebuilds,
secrets, and the helpers pyembed's functions call), as the owner, with the same values, where a
row type's value is a row naming nothing. NULL in each argument is test_sql_errors' walk; the
owner's migration steps have theirs there too.

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
from tests.test_sql_errors import APP_FUNCTIONS, CALLS_THAT_WORK, FAKE, RAISES, Q

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
    if kind in ROWS:
        return [Value(f"{kind} row of nothing", f"jsonb_populate_record(({work})::{kind}, %s)",
                      json.dumps(ROWS[kind]))]
    raise AssertionError(f"{name}.{arg}: a new type {kind}: add its hostile values")


ROWS = {
    # A row type an owner-only function takes (a row of a table, or the index rules): the
    # working row with the fields that name it changed to name nothing (or out of range).
    "pyembed.corpora": {"corpus_id": 987654, "name": "nope"},
    "pyembed.migrations": {"migration_id": 987654, "corpus_id": 987654},
    "pyembed._index_rules": {"m": -1, "ef_construction": 0, "ef_search": -1, "oversample": 0},
}

FROM_PYEMBED = {
    # A function whose integer arguments pyembed's client fills with a number it read from the
    # database (a corpus id, a job's attempts) or checked first (check_k, dbcall.integer): no
    # caller passes one past integer, so the walk gives it none. A count a SQL client gives is
    # numeric instead (pyembed._count_arg).
    "_clear_vectors": "vectors.copy_vectors: the corpus id", "_dequeue_written": "as _clear_vectors",
    "_eval_queries_enough": "migration: the corpus id", "_vector_check": "the corpus id",
    "fail_job": "the worker: a claimed job's corpus id and attempts", "hold_jobs": "as fail_job",
    "record_search": "query.py: the corpus id and k, checked", "reserve_query": "as record_search",
    "reserve_usage": "the corpus id and the counted requests", "search_query": "as record_search",
    "search_embedded": "as record_search",
    "_index_name": "migration_report (pyembed status): each corpus's own id",
    "_document_size_problem": "corpora.too_big: the corpus's own id, and counted sizes",
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
PL_TAKES_NOTHING: dict[str, str] = {
    # A PL/Python function a caller may execute itself, and why its errors need no PL/pgSQL
    # wrapper (PL/Python puts the exception's class before every message it raises, PG 15:
    # "plpy.Error: ", which only a wrapper takes off). None: version() and code_digest(), which
    # take no value, fail when the server cannot import pyembed, with PE013 and the fix
    # (pyembed._cannot_import), which only a wrapper shows without the prefix.
}
PL_BODIES = {
    # The owner's: a wrapper's PL/Python body, which only the owner may execute (the owner may
    # execute every function); PL/Python puts the exception's class before every error's
    # message ("plpy.Error: "), which the wrapper takes off.
    "_add_document": "add_document's body", "_embed": "embed's body",
    "_embed_batch": "embed_batch's body", "_version": "version's body",
    "_code_digest": "code_digest's body",
    "_bm25_top": "_bm25's scoring of the postings it packed (checked there; only a DBA's direct "
                 "call meets its PE005s, prefix and all: no wrapper on the keyword path)",
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
        if name in PL_BODIES and message.startswith("plpy.Error: "):
            message = message.removeprefix("plpy.Error: ")
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
          calls: dict[str, list[str]], given: dict[str, str] | None = None) -> Walk:
    """`given`: "function.argument" (or "function.*", or "function.argument=value") that the walk
    leaves out, as what pyembed's own functions give."""
    walk = Walk(conn, [])
    given = given or {}
    for name, argnames, types, _defaults in functions:
        if name in RAISES:
            continue
        works = calls[name]
        arrays = [t.endswith("[]") and w != "NULL" for w, t in zip(works, types, strict=True)]
        for i, (arg, kind) in enumerate(zip(argnames or [], types, strict=False)):
            if f"{name}.*" in given or f"{name}.{arg}" in given:
                continue
            for value in values_for(name, arg, kind, works[i]):
                if f"{name}.{arg}={value.name}" in given or (
                        name in given and kind == "integer" and not value.cast):
                    continue
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


# -- the owner's and DBA's functions ----------------------------------------------------------

OWNER_ONLY = APP_FUNCTIONS.replace(
    "has_function_privilege(%s, p.oid, 'EXECUTE')",
    "NOT has_function_privilege('pyembed_app', p.oid, 'EXECUTE') "
    "AND NOT has_function_privilege('pyembed_worker', p.oid, 'EXECUTE') "
    "AND p.prorettype <> 'trigger'::regtype "
    "AND p.proname !~ '^_nearest_c[0-9]+_[0-9a-f]{32}$'")
"""Every function of schema pyembed only its owner may execute (a trigger's function is called by
its trigger alone: PostgreSQL refuses any other call), but a corpus's own vector leg
(pyembed._nearest_c<id>_<md5 of key>, made per corpus and key by pyembed._nearest_functions): the
search gives each of its arguments, checked, and its name is not one the walk can list."""

TO = "fake/fake-hash@2:1024"
DOCS_ID = "(SELECT c.corpus_id FROM pyembed.corpora c WHERE c.name = 'docs' AND c.tenant_id IS NULL)"
DOCS = "(SELECT c FROM pyembed.corpora c WHERE c.name = 'docs' AND c.tenant_id IS NULL)"
CALM = "(SELECT c FROM pyembed.corpora c WHERE c.name = 'calm')"
MIGRATION = "pyembed._migration_of(" + DOCS + ")"
RULES = "pyembed._nearest_rules(384, 'cosine', 'vector', '{}', 10)"
POSTING = "'\\x0000000000010000000a'::bytea"  # one posting: place 0, tf 1, a 10-token chunk
GIVEN_BY_PYEMBED = {
    # An argument of an owner-only helper whose values only pyembed's own functions give, with
    # what gives them: the walk leaves out its hostile values (checking them in the helper would
    # check them twice, on a search's path for some). A helper named alone ("name"): its integer
    # arguments, which pyembed passes as integers (never a bigint), as FROM_PYEMBED's.
    **{f"{h}.*": "page arithmetic on a model's dimensions (the models table's CHECK) and the m "
                 "and ef the rule or index_settings (corpora_index_settings_known) give; "
                 "inlined into every search's index rules" for h in (
                     "_halfvec_ef", "_halfvec_m", "_hnsw_fitting_m", "_hnsw_per_page")},
    "_cannot_import.error": "repr() of what a PL/Python body's import raised, shown whole (a "
                            "path in it is the fix's clue)",
    "_vector_ranking.chunks": "search_hybrid's candidates, checked",
    "_document_terms.*": "a trigger's transition rows: a corpus id and document id each",
    "_one_each.*": "the calling function's name and its arrays' names, literals in pyembed's "
                   "functions; it raises by design",
    "_need.allowed": "the steps a migration step allows, a literal in it",
    "_need.action": "as _need.allowed",
    "_sample_recall.*": "a search's query, sampled (a random share) for the corpus and key it "
                        "just searched; the table's keys refuse any other",
    **{f"{h}.*": f"{h[1:]}'s body, given {h[1:]}'s arguments as they are: the application "
                 "role's walk gives them" for h in ("_search_text", "_search_reranked")},
    "_hybrid_ranking.*": "search_hybrid's body, given its arguments as they are (search_embedded "
                         "gives the same): the application role's walk gives them",
    "_ranked_hits.*": "search_query's and search_embedded's arguments as they are, the corpus "
                      "they looked up: the application role's walk gives them",
    "_hit_arrays.*": "a ranking's chunk ids and scores, made by pyembed's rankings for the "
                     "corpus its caller looked up",
    "_record_search.*": "record_search's body, given its arguments as they are (search_query "
                        "and search_embedded give theirs): the application role's walk gives "
                        "them",
    "_embed_batch.inputs=100000 elements": "embed_batch refuses more than 1,000 texts first (a "
                                           "PL/Python call cannot be cancelled)",
    **{h: "its integer arguments" for h in (
        "_advisory_held", "_bm25", "_bm25_top", "_build_target", "_bulk_loading",
        "_claim_backfill", "_count_arg",
        "_create_vector_index", "_dropped_meanwhile", "_heal_vector_index", "_packed_block",
        "_random_advisory_lock", "_rebuild_name", "_recall_at_10", "_record_recall",
        "_release_backfill", "_sample_recall", "_ranked_hits", "_hit_arrays", "_hybrid_ranking",
        "_record_search",
        "_search_reranked", "_search_text", "_index_build_settings",
        "_index_params", "_index_plan", "_index_spec", "_index_type", "_job_bounds", "_key_rows",
        "_keyword_ranking", "_lock_corpus", "_nearest", "_nearest_candidates",
        "_nearest_function_body", "_nearest_function_name", "_nearest_functions", "_nearest_in",
        "_nearest_rules", "_nearest_scans", "_nearest_settings", "_nearest_source",
        "_nearest_sql", "_norm_ok", "_swap_vector_index", "_vector_guard_expr",
        "_vector_index_sql", "_vector_indexes", "_vector_partition", "_vector_partition_name",
        "_vector_ranking", "_partition_writers")},
}

OWNER_RAISES = {
    # An owner-only function whose work is to raise an error, called only for it.
    "_one_each": "arrays given together of different lengths (pyembed's queue functions)",
    "_raise_again": "a PL/Python wrapper's error, raised again without PL/Python's prefix",
    "_cannot_import": "a PL/Python body's server that cannot import pyembed (PE013, the fix)",
}
OWNER_CALLS = {
    # A call of each function only the owner may execute, which works, on the walk's corpora:
    # docs (the application role's, its migration to TO serving 10%), calm (no migration), and
    # two without documents: begun (its migration started) and full (serving 100% from TO).
    "_acting_tenant": [],
    "_stale_member": [],
    "_add_document": ["'docs'", "'d9'", "'a text'", "'{}'"],
    "_code_digest": [],
    "_version": [],
    "_cannot_import": ["'ModuleNotFoundError(\"No module named ''numpy''\")'"],
    "_advisory_held": ["1", "2", "pg_backend_pid()", "'ExclusiveLock'"],
    "_analyze_grown": [],
    "_backfill_lock": [],
    "_bm25": [DOCS, "'refunds'", "10", "'{}'", "false"],
    "_bm25_top": [POSTING, "ARRAY[0]::bigint[]", "ARRAY[1]", "ARRAY[10]", "ARRAY[1.0]::float8[]",
                  "10", "5"],
    "_build_target": [DOCS_ID, f"'{FAKE}'"],
    "_bulk_load_lock": [],
    "_bulk_loading": [DOCS_ID, "false"],
    "_check_corpus_name": ["'c2'"],
    "_check_storage": ["'vector'"],
    "_claim_backfill": [DOCS_ID],
    "_corpus_named": ["'docs'"],
    "_count_arg": ["5", "'k'", "1", "1000"],
    "_create_vector_index": [DOCS_ID, f"'{FAKE}'"],
    "_document_terms": [f"ARRAY[{DOCS_ID}]", "ARRAY['d1']"],
    "_dropped_meanwhile": [DOCS_ID],
    "_embed": ["'a text'", f"'{FAKE}'", "'query'"],
    "_embed_batch": ["ARRAY['a text']", f"'{FAKE}'", "'query'"],
    "_ensure_error_counters": ["'voyage'"],
    "_expiry": ["60"],
    "_failure_reason": ["'refused'", "'fail_job'"],
    "_halfvec_ef": ["384", "'halfvec'", "16", "64"],
    "_halfvec_m": ["384", "'halfvec'", "16"],
    "_heal_vector_index": [DOCS_ID],
    "_hit_arrays": [DOCS_ID, "ARRAY[1]::bigint[]", "ARRAY[0.5]::float8[]", f"'{FAKE}'"],
    "_hnsw_fitting_m": ["384", "10"],
    "_hnsw_per_page": ["384", "16"],
    "_hybrid_ranking": [DOCS, "'refunds'", Q, f"'{FAKE}'", "5", "'{}'", "100", "60", "'document'",
                        "'relative'", "0.5", "NULL", "NULL", "NULL"],
    "_index_build_settings": [DOCS_ID, f"'{FAKE}'", "false", "'vector'"],
    "_index_params": ["'{}'", "1000", "384", "'vector'"],
    "_index_plan": ["384", "'cosine'", "'vector'", "'{}'", "1000"],
    "_index_settings_problem": ["'{}'"],
    "_index_settings_valid": ["'{}'"],
    "_index_spec": ["384", "'cosine'", "'vector'"],
    "_index_type": ["384", "'vector'"],
    "_indexable": [DOCS],
    "_job_bounds": ["10", "30"],
    "_key_rows": [DOCS_ID, f"'{FAKE}'"],
    "_key_storage": [DOCS, f"'{FAKE}'"],
    "_keyword_passages": [DOCS, "'refunds'", "ARRAY[1]::bigint[]"],
    "_keyword_ranking": [DOCS, "'refunds'", "10", "'{}'", "'document'", "true"],
    "_lock_corpus": [DOCS_ID],
    "_migration": ["'docs'"],
    "_migration_of": [DOCS],
    "_migration_step": [MIGRATION, "'a note'", "'{}'"],
    "_nearest": [DOCS_ID, f"'{FAKE}'", Q, "5", "'{}'", "false"],
    "_nearest_candidates": ["5", RULES],
    "_nearest_in": [DOCS_ID, f"'{FAKE}'", Q, "5", "'{}'", "false", "'vector'", "'{}'", "384",
                    "'cosine'", "1"],
    "_nearest_rules": ["384", "'cosine'", "'vector'", "'{}'", "1000"],
    "_nearest_scans": ["5", "false", RULES, "1"],
    "_nearest_settings": ["5", "false", "false", RULES, "1"],
    "_nearest_source": [DOCS_ID, f"'{FAKE}'", "false"],
    "_nearest_sql": [DOCS_ID, f"'{FAKE}'", "5", "false", "false", RULES, "'cosine'", "1"],
    "_nearest_text": ["'pyembed.vectors_c1 v WHERE true'", "false", "'embedding <=>'",
                      "'vector(384)'", "'<=>'", "5", "5", "'cosine'"],
    "_nearest_function_body": [DOCS_ID, f"'{FAKE}'", "'vector'"],
    "_nearest_function_name": [DOCS_ID, f"'{FAKE}'"],
    "_nearest_function_ok": ["'_nearest_c1_0'", "'BEGIN END'"],
    "_nearest_functions": [DOCS_ID],
    "_nearest_functions_problems": [],
    "_drop_nearest_function": ["'_nearest_c0_none'"],
    "_need": [MIGRATION, "'docs'", "ARRAY['shifting']", "'shift traffic on'"],
    "_need_target": [CALM, f"pyembed._migration_of({CALM})", f"'{TO}'"],
    "_needs": ["false", "'share'", "'migration_shift'"],
    "_norm_ok": ["1", "true"],
    "_one_each": ["'release_jobs'", "'ids, keys'", "ARRAY[1, 1]"],
    "_packed_block": [DOCS_ID, "'refund'", "0"],
    "_quoted": ["'a value'"],
    "_random_advisory_lock": ["1", "false"],
    "_raise_again": ["'PE005'", "'a message'", "''", "''"],
    "_rebuild_name": [DOCS_ID, f"'{FAKE}'"],
    "_recall_at_10": ["'docs'", DOCS_ID, f"'{FAKE}'", Q, "'{}'"],
    "_record_recall": [DOCS_ID, f"'{FAKE}'", "'sampled'", "1", "0.9"],
    "_release_backfill": [DOCS_ID],
    "_report_window": ["30", "'days'"],
    "_sample_recall": [DOCS_ID, f"'{FAKE}'", Q, "'{}'"],
    "_ranked_hits": [DOCS, "'vector'", "'refunds'", Q, f"'{FAKE}'", "5", "'{}'", "'{}'", "NULL",
                     "NULL", "NULL"],
    "_record_search": [DOCS_ID, f"'{FAKE}'", "'vector'", "5", "false", "1", "1", "NULL", "2",
                       "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "false"],
    "_search_reranked": ["'docs'", "'refunds'", "'fake/overlap'", "5", "'{}'", "'hybrid'", "10",
                         "'document'", "'relative'", "0.5"],
    "_search_text": ["'docs'", "'refunds'", "5", "'{}'", "'hybrid'", "'document'", "'relative'",
                     "0.5"],
    "_session_acts_for_tenants": [],
    "_session_tenant": [],
    "_swap_vector_index": [DOCS_ID, f"'{FAKE}'",
                           f"pyembed._index_name({DOCS_ID}, '{FAKE}')", "'vector'"],
    "_vector_guard_expr": [DOCS_ID],
    "_vector_index_sql": [DOCS_ID, f"'{FAKE}'", "false", "'vector'", "NULL"],
    "_vector_indexes": [DOCS_ID, f"'{FAKE}'"],
    "_vector_partition": [DOCS_ID],
    "_partition_writers": [DOCS_ID],
    "_vector_partition_name": [DOCS_ID],
    "_vector_ranking": [DOCS, Q, f"'{FAKE}'", "5", "'{}'", "'document'", "10"],
    "_queued_notice": [DOCS, f"'{FAKE}'"],
    "hnsw_rule": ["1000", "384", "'vector'"],
    "index_status": ["'docs'"],
    "migration_backfilled": ["'begun'"],
    "migration_cleanup": ["'calm'", "false"],
    "migration_complete": ["'full'"],
    "migration_enqueue_backfill": ["'begun'"],
    "migration_rollback": ["'docs'"],
    "migration_shift": ["'docs'", "50"],
    "migration_start": ["'calm'", f"'{TO}'", "'halfvec'"],
    "migration_validated": ["'docs'", "'{}'", "true", "true"],
    "rebuild_index": ["'calm'", "'halfvec'"],
    "register_model": ["'openai'", "'a-model'", "'1'", "8", "'cosine'", "true", "false", "128",
                       "8192", "NULL", "0.02", "'a model of our own'"],
    "rerankers": [],
    "set_index_settings": ["'calm'", "'{\"m\": 24}'"],
    "set_secret": ["'VOYAGE_API_KEY'", "'a key'"],
}


@pytest.fixture
def migrating(db: Database, owner: psycopg.Connection[Any], logins: dict[str, str]) -> None:
    """The walk's corpora as the owner finds them (OWNER_CALLS)."""
    owner.execute("SELECT pyembed.create_corpus('calm', %s)", (FAKE,))
    owner.execute("SELECT pyembed.add_document('calm', 'd1', 'refunds take five days')")
    for corpus, steps in (("begun", ""), ("full", "SELECT pyembed.migration_backfilled('full'); "
                          "SELECT pyembed.migration_validated('full', '{}', true, true); "
                          "SELECT pyembed.migration_shift('full', 100);")):
        owner.execute(f"SELECT pyembed.create_corpus('{corpus}', '{FAKE}'); "
                      f"SELECT pyembed.migration_start('{corpus}', '{TO}'); {steps}")
    import pyembed
    from pyembed import migration

    with pyembed.connect(db.owner_dsn) as client:
        migration.start(client, "docs", TO)
        migration.backfill(client, "docs")
        owner.execute("SELECT pyembed.migration_validated('docs', '{}', true, forced => true)")
        migration.shift(client, "docs", 10)


def test_hostile_values_in_every_argument_of_the_owners_functions(
        db: Database, owner: psycopg.Connection[Any], migrating: None) -> None:
    """Every function only the owner may execute (migrations, the model registry, index rebuilds
    and settings, secrets, and the helpers pyembed's functions call, which a DBA may call too),
    each argument in turn given each hostile value of its type, as the owner in psql: the same
    checks as the application role's walk. Before, these had only the NULL walk."""
    before = _snapshot(owner)
    began = time.monotonic()
    with psycopg.connect(db.owner_dsn, autocommit=True) as conn:
        conn.execute("SET statement_timeout = '10s'")
        functions = conn.execute(OWNER_ONLY).fetchall()
        assert {f[0] for f in functions} == set(OWNER_CALLS), \
            "a new function only the owner may execute: add its call to OWNER_CALLS"
        broken = []
        for name, _argnames, types, _defaults in functions:
            args = [f"({a})::{t}" for a, t in zip(OWNER_CALLS[name], types, strict=True)]
            try:
                with conn.transaction(force_rollback=True):
                    conn.execute(f"SELECT * FROM pyembed.{name}({', '.join(args)})").fetchall()
            except psycopg.Error as err:
                if name not in OWNER_RAISES:
                    broken.append(f"{name}: {err.sqlstate} {err.diag.message_primary}")
        assert broken == [], "the working calls:\n" + "\n".join(broken)
        walk = _walk(conn, functions, OWNER_CALLS, GIVEN_BY_PYEMBED)
    print(f"{walk.calls} calls in {time.monotonic() - began:.1f} s; slowest "
          f"{walk.slowest[0]:.2f} s: {walk.slowest[1]}")
    assert walk.calls > 1000
    assert walk.wrong == [], "\n".join(walk.wrong)
    assert _snapshot(owner) == before



@pytest.mark.parametrize("name", ["voyage_api_key", "VOYAGE API KEY", "A\u202eB"])
def test_a_secret_under_a_name_the_table_refuses_is_not_shown_in_the_error(
        owner: psycopg.Connection[Any], name: str) -> None:
    """Before, the secrets table's CHECK refused the name with PostgreSQL's DETAIL "Failing row
    contains (voyage_api_key, sk-live-..., ...)": the secret in the error the client got and the
    server logged. Now the table's error, its detail naming the secret by its name, quoted."""
    err = sql_error(owner, "SELECT pyembed.set_secret(%s, %s)", (name, "sk-live-0123456789"))
    assert err.sqlstate == "23514" and err.diag.constraint_name == "secrets_name_check", err
    assert "0123456789" not in str(err) and "0123456789" not in (err.diag.message_detail or "")
    quoted = owner.execute("SELECT pyembed._quoted(%s)", (name,)).fetchone()
    assert quoted is not None and err.diag.message_detail == f"secret {quoted[0]}"


@pytest.mark.parametrize(("call", "said"), [
    ("SELECT pyembed.migration_shift('docs', 3000000000)", "share must be 1..100, got 3000000000"),
    ("SELECT pyembed.migration_shift('docs', 2.5)", "share must be 1..100, got 2.5"),
    ("SELECT pyembed.register_model('openai', 'm', '1', 3000000000)",
     "dimensions must be 1..16000, got 3000000000"),
    ("SELECT pyembed.register_model('openai', 'm', '1', 384, max_batch => 1e30)",
     "max_batch must be 1..100000, got 1000000000000000000000000000000"),
    ("SELECT * FROM pyembed.hnsw_rule(1e20, 384)", "rows must be 0..9223372036854775807, got "
     "100000000000000000000"),
    ("SELECT * FROM pyembed.hnsw_rule(1000, 384.5)", "dimensions must be 1..16000, got 384.5"),
])
def test_a_count_a_dba_types_past_integer_reaches_its_check(
        owner: psycopg.Connection[Any], call: str, said: str) -> None:
    """The owner's counts as psql types them: a number past integer is a bigint, past bigint a
    numeric. Before, each failed as "function pyembed.migration_shift(unknown, bigint) does not
    exist" (the parameters were integer), as 2.5 (a numeric) did."""
    err = sql_error(owner, call)
    assert (err.sqlstate, err.diag.message_primary) == ("PE005", said)
