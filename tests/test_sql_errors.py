"""Errors from the PL/Python functions (pyembed.embed, embed_batch, search_text, add_document)
read like PostgreSQL's own: the message without a Python class or traceback, the SQLSTATE of
the error (PE001..PE010 for pyembed's, the database's own code for an error from a statement
the function ran), and its DETAIL and HINT. Called as the application role unless stated.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import psycopg
import pytest

import pyembed
from pyembed import errors, indb, migration, tenants
from pyembed.db import connect, translate
from pyembed.errors import ConfigError, InvalidInput, UnknownCorpus
from pyembed.models import LOCAL_DEFAULT
from tests.conftest import Database
from tests.helpers import sql_error

FAKE = "fake/fake-hash@1:384"
NO_SUCH_CORPUS_HINT = "`pyembed corpus list` shows the corpora"
PYTHON_LABELS = ("plpy.", "spiexceptions.", "Traceback", "PL/Python")


def assert_reads_like_postgres(err: psycopg.Error, sqlstate: str, message: str, *,
                               detail: str | None = None, hint: str | None = None) -> None:
    """`err` has `sqlstate`, a message that starts with `message` and no Python in it, and
    DETAIL and HINT that start with `detail` and `hint` (absent where those are None)."""
    diag = err.diag
    primary = diag.message_primary or ""
    assert err.sqlstate == sqlstate, (err.sqlstate, primary)
    assert primary.startswith(message), primary
    for label in PYTHON_LABELS:
        assert label not in primary, primary
        assert label not in (diag.message_detail or ""), diag.message_detail
    assert "Traceback" not in (diag.context or ""), diag.context
    if detail is None:
        assert diag.message_detail is None, diag.message_detail
    else:
        assert (diag.message_detail or "").startswith(detail), diag.message_detail
    if hint is None:
        assert diag.message_hint is None, diag.message_hint
    else:
        assert (diag.message_hint or "").startswith(hint), diag.message_hint


@pytest.fixture
def docs(app: psycopg.Connection[Any]) -> str:
    app.execute("SELECT pyembed.create_corpus('docs', %s)", (FAKE,))
    app.execute("SELECT pyembed.add_document('docs', 'd1', 'PostgreSQL keeps the vectors.')")
    return "docs"


@pytest.fixture
def cache_refuses_new_entries(owner: psycopg.Connection[Any]) -> None:
    """Any new cache entry violates a check constraint: an error of the database's own, raised
    inside the in-database functions when they store an embedding (a test-only device)."""
    owner.execute("ALTER TABLE pyembed.embedding_cache ADD CONSTRAINT sqlerr_no_entries "
                  "CHECK (false) NOT VALID")


# -- pyembed's own errors, raised in Python or by the SQL the functions run ------------------

@pytest.mark.parametrize(("query", "params", "sqlstate", "message", "hint"), [
    ("SELECT pyembed.embed('', %s)", (FAKE,), "PE005", "text 0 is empty or only whitespace",
     None),
    ("SELECT pyembed.embed('a text', 'nobody/none@1:3')", (), "PE006",
     "unknown model key 'nobody/none@1:3'", "`pyembed models` lists the known keys"),
    ("SELECT pyembed.embed('a text', %s, 'question')", (FAKE,), "PE005",
     "input_type must be 'document' or 'query'", None),
    ("SELECT pyembed.embed_batch(ARRAY['a', NULL], %s)", (FAKE,), "PE005",
     "inputs has a NULL: pyembed.embed_batch() needs a text in each", None),
    ("SELECT pyembed.embed_batch(ARRAY['a'], 'nobody/none@1:3')", (), "PE006",
     "unknown model key 'nobody/none@1:3'", "`pyembed models` lists the known keys"),
    ("SELECT * FROM pyembed.search_text('nope', 'a query')", (), "PE002",
     "unknown corpus 'nope'", NO_SUCH_CORPUS_HINT),
    ("SELECT * FROM pyembed.search_text('docs', 'a query', 0)", (), "PE005",
     "k must be 1..1000, got 0", None),
    ("SELECT * FROM pyembed.search_text('docs', 'a query', 5, '[1]')", (), "PE005",
     "a metadata filter is a JSON object, not array", None),
    ("SELECT * FROM pyembed.search_text('docs', 'a query', 5, NULL, 'fuzzy')", (), "PE005",
     "mode must be one of vector, keyword, hybrid, not 'fuzzy'", None),
    ("SELECT * FROM pyembed.search_text('docs', NULL)", (), "PE005",
     "query is NULL: pyembed.search_text() needs a value for it", None),
    ("SELECT pyembed.add_document('nope', 'd2', 'some text')", (), "PE002",
     "unknown corpus 'nope'", NO_SUCH_CORPUS_HINT),
    ("SELECT pyembed.add_document('docs', '', 'some text')", (), "PE005",
     "a document id is 1..512 characters, got 0 characters", None),
    ("SELECT pyembed.add_document('docs', repeat('x', 600), 'some text')", (), "PE005",
     "a document id is 1..512 characters, got 600 characters", None),
    ("SELECT pyembed.add_document('docs', NULL, 'some text')", (), "PE005",
     "document_id is NULL: pyembed.add_document() needs a value for it", None),
    ("SELECT pyembed.add_document('docs', 'd2', 'some text', '[1]')", (), "PE005",
     "metadata must be a JSON object", None),
    ("SELECT pyembed.add_document('docs', 'd2', '   ')", (), "PE005",
     "document 'd2' is empty or only whitespace", None),
])
def test_a_pyembed_error_keeps_its_sqlstate_and_hint_without_python(
        app: psycopg.Connection[Any], docs: str, query: str, params: tuple[Any, ...],
        sqlstate: str, message: str, hint: str | None) -> None:
    assert_reads_like_postgres(sql_error(app, query, params), sqlstate, message, hint=hint)


def test_the_python_api_reads_the_same_error_without_a_prefix_to_strip(
        app: psycopg.Connection[Any]) -> None:
    err = sql_error(app, "SELECT * FROM pyembed.search_text('nope', 'a query')")
    assert str(translate(err)) == f"unknown corpus 'nope' (hint: {NO_SUCH_CORPUS_HINT})"


# -- the database's own errors from statements the functions run -----------------------------

@pytest.mark.parametrize("query", [
    "SELECT pyembed.embed('a text to store', %s)",
    "SELECT pyembed.embed_batch(ARRAY['one text', 'another'], %s)",
    "SELECT * FROM pyembed.search_text('docs', 'a query to embed')",
])
def test_a_check_violation_keeps_its_sqlstate_and_detail(
        app: psycopg.Connection[Any], docs: str, cache_refuses_new_entries: None,
        query: str) -> None:
    err = sql_error(app, query, (FAKE,) if "%s" in query else ())
    assert_reads_like_postgres(err, "23514", 'new row for relation "embedding_cache" violates '
                               'check constraint "sqlerr_no_entries"',
                               detail="Failing row contains")


def test_add_document_reports_a_lock_timeout(db: Database, app: psycopg.Connection[Any],
                                             docs: str) -> None:
    with connect(db.owner_dsn) as holder:
        holder.execute("SELECT FROM pyembed.documents WHERE document_id = 'd1' FOR UPDATE")
        app.execute("SET lock_timeout = '200ms'")
        err = sql_error(app, "SELECT pyembed.add_document('docs', 'd1', 'new text')")
        holder.rollback()
    assert_reads_like_postgres(err, "55P03", "canceling statement due to lock timeout")


def test_add_document_reports_a_deadlock_with_its_detail_and_hint(db: Database,
                                                                 docs: str) -> None:
    add = "SELECT pyembed.add_document('docs', %s, 'some text')"
    errors: list[psycopg.Error] = []
    with connect(db.app_dsn) as first, connect(db.app_dsn) as second:
        first.execute(add, ("a",))
        second.execute(add, ("b",))

        def cross(conn: psycopg.Connection[Any], document_id: str) -> None:
            try:
                conn.execute(add, (document_id,))
            except psycopg.Error as exc:
                errors.append(exc)
            finally:
                conn.rollback()

        waiting = threading.Thread(target=cross, args=(first, "b"))
        waiting.start()
        try:
            cross(second, "a")
        finally:
            waiting.join(30)
    assert len(errors) == 1, errors
    assert_reads_like_postgres(errors[0], "40P01", "deadlock detected",
                               detail="Process ", hint="See server log for query details.")


# -- statements and bugs, provoked by the owner replacing a function in its own backend -------

def replace_embed(owner: psycopg.Connection[Any], body: str) -> None:
    """pyembed.indb.embed replaced in the owner's backend (a superuser's DO block)."""
    code = f"import pyembed.indb as indb\ndef embed(plpy, GD, *args):\n    {body}\nindb.embed = embed"
    owner.execute(f"DO $py${code}$py$ LANGUAGE plpython3u")


def test_a_statement_timeout_inside_the_function_keeps_its_sqlstate(
        owner: psycopg.Connection[Any]) -> None:
    replace_embed(owner, "plpy.execute('SELECT pg_sleep(5)')")
    owner.execute("SET statement_timeout = '200ms'")
    err = sql_error(owner, "SELECT pyembed.embed('a text', %s)", (FAKE,))
    assert_reads_like_postgres(err, "57014", "canceling statement due to statement timeout")


def test_a_bug_is_an_internal_error_without_its_traceback(owner: psycopg.Connection[Any]) -> None:
    replace_embed(owner, "raise TypeError(\"unsupported operand type(s) for +: 'int' and 'str'\")")
    err = sql_error(owner, "SELECT pyembed.embed('a text', %s)", (FAKE,))
    assert_reads_like_postgres(err, "XX000", "internal error in pyembed.embed: TypeError: "
                               "unsupported operand type(s) for +: 'int' and 'str'",
                               hint="a bug in pyembed")


# -- indb.sql_error, with stand-ins for PL/Python's exception classes ------------------------

class FakePlpy:
    """PL/Python's plpy as far as indb.sql_error uses it."""

    class Error(Exception):
        sqlstate = detail = hint = None

    class SPIError(Exception):
        spidata: tuple[Any, ...] | None = None

    def __init__(self) -> None:
        self.logged: list[str] = []

    def log(self, message: str) -> None:
        self.logged.append(message)


def pack_sqlstate(code: str) -> int:
    """PostgreSQL's MAKE_SQLSTATE."""
    return sum(((ord(ch) - ord("0")) & 0x3F) << (6 * i) for i, ch in enumerate(code))


def spi_error(plpy: FakePlpy, message: str, sqlstate: str, detail: str | None = None,
              hint: str | None = None) -> Exception:
    exc = plpy.SPIError(message)
    exc.spidata = (pack_sqlstate(sqlstate), detail, hint, None, 0, "pyembed", "documents", None,
                   None, "documents_document_id_check")
    return exc


@pytest.mark.parametrize("code", ["PE002", "23514", "55P03", "40P01", "XX000", "57014"])
def test_a_packed_sqlstate_unpacks(code: str) -> None:
    assert indb.unpack_sqlstate(pack_sqlstate(code)) == code


def test_sql_error_keeps_what_the_database_error_said() -> None:
    plpy = FakePlpy()
    exc = spi_error(plpy, "deadlock detected", "40P01", "Process 1 waits", "See server log")
    assert indb.sql_error(plpy, exc, "pyembed.add_document") == ("deadlock detected", {
        "sqlstate": "40P01", "detail": "Process 1 waits", "hint": "See server log",
        "schema_name": "pyembed", "table_name": "documents",
        "constraint_name": "documents_document_id_check"})


def test_sql_error_gives_a_pyembed_error_the_hint_of_the_error_it_stands_for() -> None:
    plpy = FakePlpy()
    try:  # as sqlexec.PlpyExecutor maps a database error with a pyembed SQLSTATE
        try:
            raise spi_error(plpy, "unknown corpus 'nope'", "PE002", hint=NO_SUCH_CORPUS_HINT)
        except plpy.SPIError:
            raise UnknownCorpus("unknown corpus 'nope'") from None
    except UnknownCorpus as exc:
        message, fields = indb.sql_error(plpy, exc, "pyembed.search_text")
    assert message == "unknown corpus 'nope'"
    assert fields["sqlstate"] == "PE002" and fields["hint"] == NO_SUCH_CORPUS_HINT
    # Raised while another database error was being handled: none of that error's fields.
    try:
        try:
            raise spi_error(plpy, "deadlock detected", "40P01", "Process 1 waits")
        except plpy.SPIError:
            raise InvalidInput("bad input") from None
    except InvalidInput as exc:
        assert indb.sql_error(plpy, exc, "pyembed.embed") == ("bad input", {"sqlstate": "PE005"})
    # A configuration error is its own (PE013), not the provider's failure (PE009).
    assert indb.sql_error(plpy, ConfigError("no provider"), "pyembed.embed") == (
        "no provider", {"sqlstate": "PE013"})


def test_sql_error_reports_a_bug_without_its_traceback_or_secrets() -> None:
    plpy = FakePlpy()
    try:
        raise KeyError("Bearer sk-live-0123456789abcdef")
    except KeyError as exc:
        message, fields = indb.sql_error(plpy, exc, "pyembed.embed")
    assert message.startswith("internal error in pyembed.embed: KeyError: ")
    assert "0123456789abcdef" not in message and "Traceback" not in message
    assert fields == {"sqlstate": "XX000",
                      "hint": "a bug in pyembed: the server log has the Python traceback"}
    assert "Traceback (most recent call last)" in plpy.logged[0]


# -- NULL in each argument of every function the application role may call ------------------
APP_FUNCTIONS = """
SELECT p.proname, p.proargnames, ARRAY(SELECT format_type(t, NULL)
                                        FROM unnest(p.proargtypes::oid[]) t),
       ARRAY(SELECT trim(split_part(a, ' DEFAULT ', 2))
               FROM unnest(string_to_array(pg_get_function_arguments(p.oid), ', ')) a
              WHERE a NOT LIKE 'OUT %%')
  FROM pg_proc p
 WHERE p.pronamespace = 'pyembed'::regnamespace
   AND has_function_privilege(%s, p.oid, 'EXECUTE')
 ORDER BY 1
"""

CORPUS_ID = "(SELECT corpus_id FROM pyembed.corpora WHERE name = 'docs')"
JOB = "(SELECT {} FROM pyembed.queue LIMIT 1)"
Q = f"pyembed.embed('refunds', '{FAKE}', 'query')"
CALLS_THAT_WORK = {
    # A call of each function the application role may make, which works: NULL is then put in
    # each of its arguments in turn.
    "_clear_vectors": [CORPUS_ID, f"'{FAKE}'", "0", "0", "ARRAY[1]::bigint[]"],
    "_dequeue_written": [CORPUS_ID, f"'{FAKE}'", "0", "0", "ARRAY[]::bytea[]"],
    "_setting_range": ["'chunk_tokens'"],
    "_vector_counts": [],
    "_index_name": [CORPUS_ID, f"'{FAKE}'"],
    "_check_setting": ["'chunk_tokens'", "200"],
    "_document_id_problem": ["'doc'"],
    "_write_bounds": [],
    "_document_problems": ["ARRAY['doc']", "ARRAY['{}'::jsonb]", "ARRAY[1::bigint]"],
    "_document_size_problem": [CORPUS_ID, "'doc'", "1", "1"],
    "_vector_check": [CORPUS_ID, JOB.format("chunk_id"), f"'{FAKE}'", Q],
    "add_document": ["'docs'", "'d2'", "'a text about refunds'", "'{}'"],
    "delete_documents": ["'docs'", "ARRAY['nope']"],
    "delete_chunks": ["'docs'", "ARRAY['nope']", "ARRAY[0]"],
    "delete_failures": ["'docs'", "ARRAY[1]::bigint[]"],
    "delete_eval_queries": ["'docs'", "ARRAY['nope']"],
    "cache_count": [f"ARRAY['{FAKE}']", "ARRAY[1]::bigint[]", "ARRAY[0]::bigint[]"],
    "cache_get": ["ARRAY[sha256('q')]"],
    "cache_purge": [f"'{FAKE}'", "true", "30"],
    "cache_put": ["ARRAY[sha256('q')]", f"'{FAKE}'", "'query'", f"ARRAY[{Q}]", "60"],
    "cache_report": ["30"],
    "code_digest": [],
    "sql_digest": [],
    "min_eval_queries": [],
    "_eval_queries_enough": [CORPUS_ID, "true"],
    "claim_jobs": ["5", "10", "30", "'{}'"],
    "queue_by_tenant": ["5", "'{}'", "0"],
    "acting_tenants": [],
    "create_corpus": ["'c2'", f"'{FAKE}'", "''", "200", "40", "'vector'", "false"],
    "current_tenant": [],
    "drop_corpus": ["'docs'"],
    "begin_bulk_load": ["'docs'"],
    "end_bulk_load": ["'docs'"],
    "unindexed_corpora": [],
    "embed": ["'a text'", f"'{FAKE}'", "'query'"],
    "embed_batch": ["ARRAY['a text']", f"'{FAKE}'", "'query'"],
    "expire_jobs": ["5"],
    "fail_job": [CORPUS_ID, JOB.format("chunk_id"), f"'{FAKE}'", JOB.format("content_hash"),
                 JOB.format("attempts"), "'refused'"],
    "keyword_ranking": ["'docs'", "'refunds'", "100", "'{}'", "'document'", "10"],
    "lookup_corpus": ["'docs'"],
    "measure_recall": ["'docs'", "1"],
    "provider_errors": [],
    "recall_report": ["24"],
    "replica_lag": [],
    "recall_sampled": ["20"],
    "record_search": [CORPUS_ID, f"'{FAKE}'", "'vector'", "5", "false", "1", "2", "0", "3",
                      "sha256('q')", "'query'", Q, "60", "'{}'", f"ARRAY['{FAKE}']",
                      "ARRAY[1]::bigint[]", "ARRAY[0]::bigint[]"],
    "hold_jobs": [CORPUS_ID, f"'{FAKE}'", f"ARRAY[{JOB.format('chunk_id')}]",
                  f"ARRAY[{JOB.format('content_hash')}]", "ARRAY[1]"],
    "release_jobs": [f"ARRAY[{CORPUS_ID}]", f"ARRAY[{JOB.format('chunk_id')}]",
                     f"ARRAY['{FAKE}']", "ARRAY[1]"],
    "renew_jobs": ["30", f"ARRAY[{CORPUS_ID}]", f"ARRAY[{JOB.format('chunk_id')}]",
                   f"ARRAY['{FAKE}']", "ARRAY[1]"],
    "rerank_cache_get": ["ARRAY[sha256('q')]"],
    "rerank_cache_purge": ["'fake/overlap'", "true", "30"],
    "rerank_cache_put": ["ARRAY[sha256('q')]", "'fake/overlap'", "ARRAY[0.5]", "60"],
    "reserve_query": [CORPUS_ID, f"'{FAKE}'", "sha256('q')", "3"],
    "reserve_usage": [f"'{FAKE}'", CORPUS_ID, "1", "3"],
    "retry_jobs": ["'try again'", f"ARRAY[{CORPUS_ID}]", f"ARRAY[{JOB.format('chunk_id')}]",
                   f"ARRAY['{FAKE}']", f"ARRAY[{JOB.format('content_hash')}]", "ARRAY[1]",
                   "ARRAY[0]::float8[]"],
    "search": ["'docs'", Q, f"'{FAKE}'", "5", "'{}'", "'document'"],
    "search_embedded": ["'docs'", "'refunds'", Q, f"'{FAKE}'", "sha256('q')", "'query'", "3600",
                        "5", "'{}'", "'vector'", "'{}'", "1", "false", "NULL", "NULL", "NULL",
                        "NULL", "NULL", "NULL"],
    "search_hybrid": ["'docs'", "'refunds'", Q, f"'{FAKE}'", "5", "'{}'", "100", "60",
                      "'document'", "'relative'", "0.5", "NULL", "NULL", "NULL"],
    "search_keyword": ["'docs'", "'refunds'", "5", "'{}'", "'document'"],
    "search_query": ["'docs'", "'refunds'", "0", f"ARRAY['{FAKE}']", "ARRAY[sha256('q')]", "5",
                     "'{}'", "'keyword'", "'{}'", "3", "false", "NULL", "NULL", "NULL"],
    "search_reranked": ["'docs'", "'refunds'", "'fake/overlap'", "5", "'{}'", "'hybrid'", "10",
                        "'document'", "'relative'", "0.5"],
    "search_text": ["'docs'", "'refunds'", "5", "'{}'", "'hybrid'", "'document'", "'relative'",
                    "0.5"],
    "usage_report": ["30"],
    "vector_table": ["'docs'"],
    "version": [],
    "visible_corpora": [],
}

RAISES = {
    # A function whose work is to raise an error: its call "works" by raising it.
    "_raise_again": "add_document's error, raised again as the caller: each argument is the "
                    "error's (a NULL SQLSTATE is P0001, a NULL message, detail or hint none)",
}

NAMED_AS = {
    # An argument a NULL of which the error names otherwise: what it names.
    "_check_setting.value": "chunk_tokens",  # the setting: 'chunk_tokens must be ..., got NULL'
}

NULL_MEANS = {
    # An argument whose NULL is a result, not an error, besides those whose DEFAULT is NULL
    # (the signature documents those): what it means, and why it is one.
    "add_document.metadata": "no metadata, as '{}' (sql/050-plpython.sql)",
    "_document_problems.metadata": "no metadata given (its ids are asked, and chunk_bytes)",
    "_document_problems.chunk_bytes": "no chunks' bytes given (the lookup before chunking)",
    "_document_size_problem.p_corpus_id": "no corpus: no bound to pass",
    "_document_size_problem.id": "a document of no id: the problem names it null",
    "_document_size_problem.chunks": "no chunks counted: nothing to refuse",
    "_document_size_problem.bytes": "its text's bytes unknown (the chunks trigger's call)",
    "_clear_vectors.ids": "every vector of the key between lo and hi (vectors.copy_vectors)",
    "_setting_range.setting": "NULL: no such setting, as for an unknown name",
    "_index_name.corpus_id": "a name no index has, which to_regclass finds nowhere",
    "_index_name.model_key": "as corpus_id",
    "_check_setting.setting": "false: no such setting, as for an unknown name",
    "reserve_usage.p_corpus_id": "a call accounted to no corpus (pyembed.embed's)",
    "record_search.kind": "no query-log line: the call writes the cache entry and counts only",
    "record_search.cache_hit": "not a cache question (a keyword search), as search_query says",
    "record_search.embed_ms": "not measured: the log's column stays NULL (pyembed.latency "
                              "leaves it out)",
    "record_search.search_ms": "as embed_ms",
    "record_search.generate_ms": "as embed_ms (no answer generated)",
    "record_search.total_ms": "as embed_ms",
    "search_embedded.cache_key": "a client without a cache: nothing cached",
    "search_embedded.ttl_seconds": "no expiry (pyembed._expiry)",
    "search_embedded.filter": "no filter",
    "search_embedded.options": "no options",
    "search_embedded.embed_ms": "not measured",
    "search_query.filter": "no filter",
    "search_query.options": "no options",
}


def test_every_function_of_the_application_role_is_executable_by_a_tenants_role(
        owner: psycopg.Connection[Any]) -> None:
    """A tenant's role is a member of pyembed_app: what the walk below calls is what it may."""
    tenants.create_tenant(owner, "acme", requests_per_minute=None)
    tenants.add_member(owner, "acme", "acme_login", create_login="pw")
    try:
        assert owner.execute(APP_FUNCTIONS, ("acme_login",)).fetchall() \
            == owner.execute(APP_FUNCTIONS, ("pyembed_app",)).fetchall()
    finally:
        owner.execute("DROP OWNED BY acme_login CASCADE")
        owner.execute("DROP ROLE acme_login")


def test_null_in_each_argument_of_every_function_of_the_application_role_is_named(
        app: psycopg.Connection[Any]) -> None:
    """Walks every function the application role (and so a tenant's role) may EXECUTE, from the
    catalogue, a new one included, with NULL in each argument: the result is a PE error naming
    the argument, or the NULL is documented (a DEFAULT NULL, or NULL_MEANS). Before, only the
    16 that reach PL/Python were walked: fail_job's NULL reason gave the table's NOT NULL,
    cache_count's NULL models nothing, record_search's NULL k a CHECK's error."""
    app.execute("SELECT pyembed.create_corpus('docs', %s)", (FAKE,))
    app.execute("SELECT pyembed.add_document('docs', 'd1', 'refunds take five days')")
    functions = app.execute(APP_FUNCTIONS, ("pyembed_app",)).fetchall()
    assert {"add_document", "embed", "fail_job", "cache_count"} <= {f[0] for f in functions}
    assert {f[0] for f in functions} <= set(CALLS_THAT_WORK) | set(RAISES), \
        "a new function: add its call"
    wrong = []
    for name, argnames, types, defaults in functions:
        works = CALLS_THAT_WORK.get(name, ["'PE005'", "'m'", "'d'", "'h'"])
        args = [f"({a})::{t}" for a, t in zip(works, types, strict=True)]
        if name not in RAISES:
            with app.transaction(force_rollback=True):
                app.execute(f"SELECT * FROM pyembed.{name}({', '.join(args)})")  # it works
            for i, (arg, kind) in enumerate(zip(argnames or [], types, strict=False)):
                call = ", ".join(f"NULL::{kind}" if j == i else a for j, a in enumerate(args))
                try:
                    with app.transaction(force_rollback=True):
                        app.execute(f"SELECT * FROM pyembed.{name}({call})")
                except psycopg.Error as err:
                    text = err.diag.message_primary or ""
                    said = NAMED_AS.get(f"{name}.{arg}", arg)
                    named = err.sqlstate == "PE005" and said in text \
                        and not any(w in text for w in ("NoneType", "None", "NULL)"))
                    if not named:
                        wrong.append(f"{name}({arg} NULL): {err.sqlstate} {text}")
                    continue
                if not (i < len(defaults) and defaults[i].startswith("NULL")) \
                        and f"{name}.{arg}" not in NULL_MEANS:
                    wrong.append(f"{name}({arg} NULL): a result, not documented")
    assert wrong == [], "\n".join(wrong)


# -- every error class raised in SQL has its own SQLSTATE, and comes back as itself ------------

RAISED_IN_SQL = [c for c in errors._classes(errors.PyembedError)
                 if c is not errors.PyembedError and c not in errors.CLIENT_ONLY]


def test_every_error_class_raised_in_sql_has_a_sqlstate_of_its_own() -> None:
    """Walks errors.py's classes (a new one included): each has its own PE code, which
    sql_error gives it and from_sqlstate reads back as the same class; a client-side error
    (errors.CLIENT_ONLY) raised in SQL is a bug, XX000. Before, NotAllowed and OwnerOnly had no
    code: raised in SQL they came out as PE009, a provider's failure."""
    codes = [c.sqlstate for c in RAISED_IN_SQL]
    assert all(code and re.fullmatch(r"PE\d{3}", code) for code in codes), codes
    assert len(set(codes)) == len(codes), codes
    plpy = FakePlpy()
    for cls in RAISED_IN_SQL:
        message, fields = indb.sql_error(plpy, cls("what happened"), "pyembed.embed")
        assert (message, fields) == ("what happened", {"sqlstate": cls.sqlstate}), cls
        assert type(errors.from_sqlstate(fields["sqlstate"], message)) is cls
    for cls in (errors.PyembedError, *errors.CLIENT_ONLY):
        assert indb.sql_error(plpy, cls("x"), "pyembed.embed")[1]["sqlstate"] == "XX000", cls


@pytest.mark.parametrize("cls", RAISED_IN_SQL, ids=lambda c: c.__name__)
def test_each_error_class_raised_in_sql_comes_back_as_itself(
        owner: psycopg.Connection[Any], cls: type[errors.PyembedError]) -> None:
    """Raised inside a PL/Python function through indb.call (as pyembed's functions are), read
    by psycopg and pyembed.db.translate: the same class, with its message."""
    owner.execute("""CREATE FUNCTION pg_temp.raise_pyembed(name text) RETURNS void
                     LANGUAGE plpython3u AS $$
from pyembed import errors, indb
def fail(plpy, GD, name):
    raise getattr(errors, name)("raised in SQL")
return indb.call(plpy, fail, GD, name)
$$""")
    err = sql_error(owner, "SELECT pg_temp.raise_pyembed(%s)", (cls.__name__,))
    assert err.sqlstate == cls.sqlstate, err
    back = translate(err)
    assert type(back) is cls and "raised in SQL" in str(back), back


def test_local_threads_the_server_cannot_use_are_a_configuration_error(
        owner: psycopg.Connection[Any], app: psycopg.Connection[Any]) -> None:
    """PYEMBED_LOCAL_THREADS set in the server's environment to a count it cannot use: every
    in-database call of a local model is PE013 (ConfigError), not a provider's failure."""
    owner.execute("CREATE FUNCTION pg_temp.set_threads(v text) RETURNS void "
                  "LANGUAGE plpython3u AS $$\nimport os\nos.environ['PYEMBED_LOCAL_THREADS'] = v\n$$")
    owner.execute("SELECT pg_temp.set_threads('none')")
    err = sql_error(owner, "SELECT pyembed.embed('a text', %s)", (LOCAL_DEFAULT.key,))
    assert err.sqlstate == "PE013", err
    assert isinstance(translate(err), ConfigError)
    assert "PYEMBED_LOCAL_THREADS must be a whole number 1..256, got 'none'" in str(err)


MIGRATION_STEPS = """
SELECT p.proname, p.proargnames, ARRAY(SELECT format_type(t, NULL)
                                        FROM unnest(p.proargtypes::oid[]) t)
  FROM pg_proc p
 WHERE p.pronamespace = 'pyembed'::regnamespace AND p.proname LIKE 'migration\\_%'
 ORDER BY 1
"""
STEP_ARGUMENTS = {"corpus": "'docs'", "to_key": "'fake/fake-hash@2:1024'", "storage": "'vector'",
                  "report": "'{}'", "passed": "true", "forced": "true", "share": "10",
                  "keep_indexes": "false"}
"""A value for each argument of the migration steps (a new argument: add its value)."""


def test_null_in_each_argument_of_the_migration_steps_is_named_and_changes_nothing(
        db: Database, owner: psycopg.Connection[Any]) -> None:
    """The owner's steps, from the catalogue, in SQL as a DBA calls them, with NULL in each
    argument, on a corpus whose migration serves 10% from its target: PE005 naming the
    argument and the step, and the migration as it was. Before, migration_validated's NULL
    verdict recorded a failed validation (closing the gate and taking the 10% back), its NULL
    report failed on migration_events' NOT NULL, migration_shift's NULL share said "share must be
    1..100, got ", migration_cleanup's NULL keep_indexes was taken as false and
    migration_start's NULL key was "unknown model key NULL"."""
    owner.execute("SELECT pyembed.create_corpus('docs', %s)", (FAKE,))
    owner.execute("SELECT pyembed.add_document('docs', 'd1', 'refunds take five days')")
    with pyembed.connect(db.owner_dsn) as client:
        migration.start(client, "docs", "fake/fake-hash@2:1024")
        migration.backfill(client, "docs")
        owner.execute("SELECT pyembed.migration_validated('docs', '{}', true, forced => true)")
        migration.shift(client, "docs", 10)
    state = "SELECT migration_step, traffic_share, (SELECT count(*) FROM " \
            "pyembed.migration_events) FROM pyembed.corpora WHERE name = 'docs'"
    before = owner.execute(state).fetchone()
    steps = owner.execute(MIGRATION_STEPS).fetchall()
    assert {"migration_start", "migration_validated", "migration_shift"} <= {s[0] for s in steps}
    wrong = []
    for name, argnames, types in steps:
        assert set(argnames) <= set(STEP_ARGUMENTS), f"{name}: a new argument, add its value"
        for i, arg in enumerate(argnames):
            if name == "migration_start" and arg == "storage":
                continue  # DEFAULT NULL: the corpus's storage
            call = ", ".join(f"NULL::{t}" if j == i else f"({STEP_ARGUMENTS[a]})::{t}"
                             for j, (a, t) in enumerate(zip(argnames, types, strict=True)))
            try:
                with owner.transaction(force_rollback=True):
                    owner.execute(f"SELECT pyembed.{name}({call})")
                wrong.append(f"{name}({arg} NULL): no error")
            except psycopg.Error as err:
                said = f"{arg} is NULL: pyembed.{name}() needs a value for it"
                if err.sqlstate != "PE005" or err.diag.message_primary != said:
                    wrong.append(f"{name}({arg} NULL): {err.sqlstate} {err.diag.message_primary}")
    assert wrong == [], "\n".join(wrong)
    assert owner.execute(state).fetchone() == before == ("shifting", 10, before[2])
