"""The read paths write nothing, checked by catalogue so that a new function is covered: every
function of the schema declared STABLE or IMMUTABLE writes no table, itself or through what it
calls; and every function the application role may execute is either a writer (WRITERS, with
why) or is run, and answers, in a `default_transaction_read_only = on` session (what a hot
standby enforces) by the read entry points: the SQL searches, Client.search in each mode,
recall, status's health views, usage, cache and recall reports, doctor's probe. What a read
records (the query log, usage, cache entries and counts, recall samples) is skipped there, as
README's "Read replicas" says."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import psycopg
import pytest

import pyembed
from pyembed import cache, health, recall, tenants
from tests.conftest import Database
from tests.helpers import called_functions, function_bodies

KEY = "fake/fake-hash@1:384"
DOCS = [("a", "refunds are paid within five days"), ("b", "a late delivery is refunded"),
        ("c", "error E4007 means the quota is used up")]

WRITES = re.compile(r"\b(?:INSERT\s+INTO|UPDATE|DELETE\s+FROM|TRUNCATE)\s+pyembed\.(\w+)|"
                    r"\b(nextval|setval)\s*\(", re.IGNORECASE)

VOLATILE_READS = {
    # A VOLATILE function a STABLE one may call, and why it writes nothing.
    "_nearest_settings": "sets the search's planner settings for the calling function "
                         "(set_config, local): no row",
}


def _stable_writes(owner: psycopg.Connection[Any]) -> list[str]:
    sources = function_bodies(owner)
    volatile = {name for (name,) in owner.execute(
        "SELECT p.proname FROM pg_proc p WHERE p.pronamespace = 'pyembed'::regnamespace "
        "AND p.provolatile = 'v'").fetchall()}
    reads = {name for name in sources if name not in volatile}
    assert {"search", "search_keyword", "search_hybrid", "cache_get", "usage_report"} <= reads
    found = []
    for name in sorted(reads):
        seen = called_functions(sources, name)
        found += [f"{name} -> {f} writes" for f in sorted(seen) if WRITES.search(sources[f])]
        found += [f"{name} -> {f} volatile" for f in sorted(seen & volatile - set(VOLATILE_READS))]
    return found


def test_no_stable_or_immutable_function_writes(owner: psycopg.Connection[Any]) -> None:
    """Walks every STABLE or IMMUTABLE function of the schema, a new one included, and the
    functions it calls in turn (from their bodies): none writes a table or takes a number of a
    sequence, and the only VOLATILE ones it reaches are in VOLATILE_READS. (PostgreSQL refuses
    a write in a non-volatile function's own statements, but not in a volatile one it calls.)"""
    assert _stable_writes(owner) == []
    with owner.transaction(force_rollback=True):  # the walk sees a read that records
        owner.execute("CREATE FUNCTION pyembed._a_read() RETURNS void LANGUAGE sql STABLE "
                      "AS $$ SELECT pyembed.cache_count(NULL, NULL, NULL) $$")
        assert _stable_writes(owner) == ["_a_read -> cache_count writes",
                                         "_a_read -> cache_count volatile"]


WRITERS = {
    # A function the application role may execute that writes, so a read-only session refuses
    # it (PE011, or SQL's 25006: ReadOnlyReplica in Python); no read path calls it.
    "create_corpus": "a corpus", "drop_corpus": "a corpus's removal",
    "add_document": "a document",
    "begin_bulk_load": "a corpus's index dropped", "end_bulk_load": "an index built",
    "_clear_vectors": "a vector write's old vectors deleted",
    "delete_documents": "documents deleted", "delete_chunks": "chunks deleted",
    "delete_failures": "failures cleared", "delete_eval_queries": "evaluation queries deleted",
    "_dequeue_written": "a vector write's jobs dequeued",
    "claim_jobs": "the worker's jobs", "renew_jobs": "as claim_jobs",
    "hold_jobs": "as claim_jobs: locks the jobs a worker's write still holds", "retry_jobs": "as claim_jobs",
    "release_jobs": "as claim_jobs", "fail_job": "as claim_jobs", "expire_jobs": "as claim_jobs",
    "cache_purge": "the cache's entries deleted", "rerank_cache_purge": "as cache_purge",
    "reserve_usage": "a provider call accounted: PE011 on a replica (embed on the primary)",
    "reserve_query": "as reserve_usage", "rerank_cache_put": "a rerank's scores, after its "
    "provider call (which a replica refuses first)",
    "search_reranked": "a rerank is a provider call",
}


def _sessions_ended(conn: psycopg.Connection[Any]) -> None:
    """Wait for the database's other sessions to end: a session's function counts reach the
    statistics as it ends."""
    for _ in range(200):
        if conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid()").fetchone() == (0,):
            return
        time.sleep(0.05)
    raise AssertionError("the sessions did not end")


@pytest.fixture
def read_only(db: Database) -> Any:
    """A corpus with documents, its queries searched once in every mode on the primary (their
    embeddings cached) and a recall sample, and a client whose sessions are read-only; the
    database counts every function call (track_functions)."""
    with psycopg.connect(db.owner_dsn, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{db.name}" SET track_functions = \'all\'')
    with pyembed.connect(db.app_dsn) as client:
        docs = client.create_corpus("docs", KEY)
        docs.add(DOCS)
        for mode in ("vector", "keyword", "hybrid"):
            docs.search("a late refund", k=2, mode=mode)
        client.conn.execute("SELECT pyembed.embed('a late refund', %s, 'query')", (KEY,))
    with psycopg.connect(db.owner_dsn, autocommit=True) as conn:
        _sessions_ended(conn)
        for _ in range(200):  # the ended sessions' counts have arrived
            conn.execute("SELECT pg_stat_clear_snapshot()")
            if conn.execute("SELECT count(*) FROM pg_stat_user_functions "
                            "WHERE funcname = 'create_corpus'").fetchone() == (1,):
                break
            time.sleep(0.05)
        before = _calls(conn)
        before_writes = _writes(conn)
    dsn = db.app_dsn + "?options=-c%20default_transaction_read_only%3Don"
    with pyembed.connect(dsn) as client:
        yield client, before, before_writes


RECORDS = ("query_log", "usage", "cache_stats", "embedding_cache", "recall_samples",
           "recall_measurements")


def _writes(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Rows written to each table that records a read, as the statistics count them."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return {name: int(n) for name, n in conn.execute(
        "SELECT relname, n_tup_ins + n_tup_upd + n_tup_del FROM pg_stat_user_tables "
        "WHERE schemaname = 'pyembed' AND relname = ANY (%s)", (list(RECORDS),)).fetchall()}


def _calls(conn: psycopg.Connection[Any]) -> dict[str, int]:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return {name: int(n) for name, n in conn.execute(
        "SELECT funcname, sum(calls) FROM pg_stat_user_functions WHERE schemaname = 'pyembed' "
        "GROUP BY funcname").fetchall()}


READ_SQL = [
    "SELECT pyembed.version()",
    "SELECT pyembed.current_tenant(), pyembed.visible_corpora()",
    "SELECT (pyembed.lookup_corpus('docs')).corpus_id, pyembed.vector_table('docs')",
    "SELECT * FROM pyembed.unindexed_corpora()",
    # (volatile for its set_config: what the worker, status and doctor read the queues by)
    "SELECT * FROM pyembed.queue_by_tenant(5, '{}', 0)",
    "SELECT pyembed._setting_range('ef_search'), pyembed._check_setting('ef_search', 40)",
    "SELECT count(*) FROM pyembed.search('docs', pyembed.embed('a late refund', "
    "'fake/fake-hash@1:384', 'query'), 'fake/fake-hash@1:384', 2)",
    "SELECT count(*) FROM pyembed.search_text('docs', 'a late refund', 2)",
    "SELECT count(*) FROM pyembed.embed_batch(ARRAY['a late refund'], 'fake/fake-hash@1:384', "
    "'query')",
    "SELECT count(*) FROM pyembed.search_keyword('docs', 'refund', 2)",
    "SELECT count(*) FROM pyembed.keyword_ranking('docs', 'refund', 10, NULL, 'document')",
    "SELECT count(*) FROM pyembed.search_hybrid('docs', 'a late refund', pyembed.embed("
    "'a late refund', 'fake/fake-hash@1:384', 'query'), 'fake/fake-hash@1:384', 2)",
    "SELECT count(*) FROM pyembed.cache_get(ARRAY['\\x00'::bytea])",
    "SELECT count(*) FROM pyembed.rerank_cache_get(ARRAY['\\x00'::bytea])",
    "SELECT pyembed.cache_put(ARRAY['\\x01'::bytea], 'fake/fake-hash@1:384', 'query', "
    "ARRAY[pyembed.embed('a late refund', 'fake/fake-hash@1:384', 'query')], NULL)",
    "SELECT pyembed.cache_count(ARRAY['fake/fake-hash@1:384'], ARRAY[1::bigint], "
    "ARRAY[0::bigint])",
    "SELECT pyembed._vector_check((pyembed.lookup_corpus('docs')).corpus_id, (SELECT min("
    "chunk_id) FROM pyembed.chunks), 'fake/fake-hash@1:384', pyembed.embed('a late refund', "
    "'fake/fake-hash@1:384', 'query'))",
    "SELECT count(*) FROM pyembed.provider_errors()",
    "SELECT pyembed._document_id_problem('doc'), pyembed._write_bounds(), (SELECT count(*) "
    "FROM pyembed._document_problems(ARRAY['doc'], ARRAY['{}'::jsonb], ARRAY[1::bigint])), "
    "(pyembed._document_size_problem((pyembed.lookup_corpus('docs')).corpus_id, 'doc', 1, 1)).problem, "
    "pyembed.min_eval_queries(), "
    "pyembed._eval_queries_enough((pyembed.lookup_corpus('docs')).corpus_id, true)",
    "SELECT pyembed.code_digest(), pyembed.sql_digest()",
]


def test_every_read_answers_in_a_read_only_session_and_every_function_is_a_read_or_a_writer(
        db: Database, read_only: tuple[pyembed.Client, dict[str, int], dict[str, int]],
        owner: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture) -> None:
    """Every function the application role may execute (the catalogue's, a new one included)
    is in WRITERS or is called, and answers, in a read-only session by the read entry points
    (counted by track_functions); and those entry points wrote nothing there."""
    client, before, before_writes = read_only
    caplog.set_level(logging.INFO, logger="pyembed")
    dsn = db.app_dsn + "?options=-c%20default_transaction_read_only%3Don"
    assert client.conn.execute("SHOW transaction_read_only").fetchone() == ("on",)
    docs = client.corpus("docs")
    for mode in ("vector", "keyword", "hybrid"):
        assert docs.search("a late refund", k=2, mode=mode), mode
    assert docs.search(client.embedder(KEY).embed_query("a late refund").tolist(), k=2,
                       model_key=KEY)
    for statement in READ_SQL:
        client.conn.execute(statement).fetchall()
    assert recall.measure(client.conn, "docs", 3)
    recall.measure_sampled(client.conn, 5)
    recall.report(client.conn)
    health.report(client.conn)
    tenants.usage(client.conn)
    cache.stats(client.conn)
    client.close()
    _sessions_ended(owner)
    # The skip is the documented behaviour, not a fault: no warning for each search (a search by
    # vector logged one before, a search by text none).
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    after: dict[str, int] = {}
    for _ in range(200):  # the session's counts have arrived
        after = _calls(owner)
        if after.get("search_query", 0) > before.get("search_query", 0):
            break
        time.sleep(0.05)
    called = {name for name, n in after.items() if n > before.get(name, 0)}
    executable = {r[0] for r in owner.execute(
        "SELECT p.proname FROM pg_proc p WHERE p.pronamespace = 'pyembed'::regnamespace "
        "AND has_function_privilege('pyembed_app', p.oid, 'EXECUTE')").fetchall()}
    assert set(WRITERS) <= executable
    # Nothing a read records was written: no query log line, usage, cache entry or count, sample.
    assert _writes(owner) == before_writes
    assert sorted(called & set(WRITERS)) == []
    # A query the read-only session's cache lacks is embedded by a client that has a primary
    # (reserved and recorded there) and searched on the read DSN: search_embedded.
    assert sorted(executable - set(WRITERS) - called) == ["search_embedded"]
    with pyembed.connect(db.app_dsn, read_dsn=dsn) as split:
        assert split.read_conn.execute("SHOW transaction_read_only").fetchone() == ("on",)
        assert split.corpus("docs").search("a question never asked", k=2)
    for _ in range(200):
        if _calls(owner).get("search_embedded", 0):
            break
        time.sleep(0.05)
    assert _calls(owner).get("search_embedded", 0) == 1


CLI_READS = {
    # Every command that only reads, and its arguments: run with a read-only DSN, it answers.
    ("models",): [],
    ("search",): ["docs", "a late refund", "-k", "2"],
    ("ask",): ["docs", "a late refund", "-k", "2"],  # no ANTHROPIC_API_KEY: the passages
    ("status",): [],
    ("recall",): ["docs", "--queries", "3"],
    ("doctor",): [],
    ("usage",): [],
    ("corpus", "list"): [],
    ("corpus", "show"): ["docs"],
    ("migrate", "plan"): ["docs", "--to", "fake/fake-hash@2:384"],
    ("migrate", "status"): ["docs"],
    ("cache", "stats"): [],
    ("tenant", "list"): [],
    ("eval", "list"): ["docs"],
}
CLI_OTHERS = {
    # Every other command, and why it is not run here.
    ("install",): "writes the schema", ("ingest",): "writes documents", ("worker",): "writes "
    "vectors", ("demo",): "makes a cluster and a corpus", ("eval", "add"): "writes a query",
    ("eval", "import"): "writes queries",
    ("eval", "compare"): "embeds samples with other keys: provider calls, accounted on the "
    "primary", ("cache", "purge"): "deletes cache entries", ("metrics", "serve"): "a server "
    "(its registry answers on a standby: test_replica)", ("plan-storage",): "no database",
    ("corpus", "create"): "writes", ("corpus", "index"): "builds an index",
    ("corpus", "reindex"): "builds an index", ("corpus", "drop"): "writes",
    ("corpus", "delete-documents"): "writes", ("eval", "remove"): "writes",
    ("tenant", "create"): "writes", ("tenant", "add-member"): "writes", ("secret", "set"): "writes",
    **{("migrate", step): "a migration's step writes" for step in (
        "start", "backfill", "validate", "shift", "complete", "rollback", "cleanup")},
    **{("db", *sub): "the local cluster's files and processes, not a database session" for sub in (
        ("init",), ("start",), ("stop",), ("status",), ("url",), ("replica", "add"),
        ("replica", "list"), ("replica", "remove"))},
}


def _commands() -> set[tuple[str, ...]]:
    import typer

    from pyembed.cli import app

    def walk(command: Any, prefix: tuple[str, ...]) -> Any:
        subs = getattr(command, "commands", None)
        if not subs:
            yield prefix
            return
        for name, sub in subs.items():
            yield from walk(sub, (*prefix, name))

    return set(walk(typer.main.get_command(app), ()))


def test_every_cli_command_is_a_read_that_answers_read_only_or_says_why_not(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """Walks every command of the CLI (a new one included): each read in CLI_READS exits 0
    with a read-only DSN (owner's and application's), writing none of what a read records;
    every other command is in CLI_OTHERS with why."""
    from tests.helpers import run_cli

    assert _commands() == set(CLI_READS) | set(CLI_OTHERS)
    with psycopg.connect(db.owner_dsn, autocommit=True) as owner:
        owner.execute("SELECT pyembed.register_model('fake', 'fake-hash', '2', 384)")
    with pyembed.connect(db.app_dsn) as client:
        docs = client.create_corpus("docs", KEY)
        docs.add(DOCS)
        docs.search("a late refund", k=2)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    read_only = "?options=-c%20default_transaction_read_only%3Don"
    env = {"PYEMBED_DSN": db.app_dsn + read_only, "PYEMBED_OWNER_DSN": db.owner_dsn + read_only,
           "COLUMNS": "200"}
    with psycopg.connect(db.owner_dsn, autocommit=True) as owner:
        before = _writes(owner)
        for command, args in CLI_READS.items():
            out = run_cli(*command, *args, env=env)
            assert out.returncode == 0, (command, out.stdout, out.stderr)
        _sessions_ended(owner)
        time.sleep(0.5)  # the ended sessions' counts arrive
        assert _writes(owner) == before


def test_an_answer_and_the_metrics_write_nothing_in_a_read_only_session(
        db: Database, fake_api: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Client.ask's path (rag.answer, Claude at the fake API) and the metrics endpoint's
    collector with read-only DSNs record nothing and warn of nothing: Claude's call is a
    provider call, which a read-only session cannot account (ReadOnlyReplica, PE011, before any
    request, as an embedding's), and with the primary beside the read DSN the answer's search
    runs on the read DSN and its call is accounted on the primary (the answer's log line is
    skipped, as a search's)."""
    from prometheus_client import generate_latest

    from pyembed import metrics, rag

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-read-only-1")
    monkeypatch.delenv("PYEMBED_CLAUDE_MODEL", raising=False)
    with pyembed.connect(db.app_dsn) as client:
        docs = client.create_corpus("docs", KEY)
        docs.add(DOCS)
        docs.search("a late refund", k=2)
    dsn = db.app_dsn + "?options=-c%20default_transaction_read_only%3Don"
    with psycopg.connect(db.owner_dsn, autocommit=True) as owner:
        _sessions_ended(owner)
        time.sleep(0.5)  # the ended sessions' counts arrive
        before = _writes(owner)
        caplog.set_level(logging.INFO, logger="pyembed")
        with pyembed.connect(dsn) as client:
            with pytest.raises(pyembed.ReadOnlyReplica, match="read-only"):
                rag.answer(client.corpus("docs"), "a late refund", k=2)
        assert fake_api.requests_to("anthropic") == []
        text = generate_latest(metrics.registry(dsn)).decode()
        assert "pyembed_up 1.0" in text, text
        _sessions_ended(owner)
        time.sleep(0.5)
        assert _writes(owner) == before
        with pyembed.connect(db.app_dsn, read_dsn=dsn) as client:
            result = rag.answer(client.corpus("docs"), "a late refund", k=2)
            assert result.generated and result.sources
        assert [r.model_key for r in tenants.usage(owner)
                if r.model_key.startswith("anthropic/")] == [f"anthropic/{rag.DEFAULT_MODEL}"]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
