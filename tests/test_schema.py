"""The schema as a whole: upgrade equals install, online equals offline, sql/ is replaceable,
installs are safe to run concurrently, and privileges are granted on purpose."""

from __future__ import annotations

import difflib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from alembic.script import ScriptDirectory

import pyembed
from pyembed import schema
from pyembed.chunking import chunk_text
from pyembed.config import resource_dir
from pyembed.corpora import ChunkRow, corpus_info, create_corpus, write_chunks
from pyembed.db import connect
from pyembed.errors import InstallError, InvalidInput, PyembedError
from pyembed.localdb import APP_GROUP, APP_USER, LocalCluster, find_bindir
from pyembed.search import search
from tests.conftest import REPO, Database, create_database, drop_database
from tests.helpers import rows, run_cli, sql_error, unit

KEY = "fake/fake-hash@1:384"

# Every function in schema pyembed and whether the application role may EXECUTE it.
# A new function must be added here on purpose: the default is no access.
# What the application role may execute; every other pyembed function (triggers, internals,
# migrations, secrets) it may not. tests/golden/functions.txt lists them all.
APP_EXECUTE = {
    "_vector_check(integer, bigint, text, vector)",  # called by the partitions' guard CHECK
    "current_tenant()",  # called by the row-level security policies
    "visible_corpora()",
    "lookup_corpus(text)",  # the one lookup of a corpus by name (PE002)
    "_setting_range(text)",  # a stored setting's range, its CHECK's
    "_index_name(integer, text)",  # a key's index, which migration_report sizes for `status`
    "_vector_counts()",  # each corpus's vectors by key, which coverage and migration_report read
    "_check_setting(text, numeric)",  # its check, in the words SQL, Python and the CLI give
    "version()",  # the server's pyembed, for `pyembed doctor`
    "code_digest()",  # its code, for `pyembed doctor`
    "sql_digest()",  # the replaceable objects the database was given, for `pyembed doctor`
    "min_eval_queries()",  # the validation floor, read-only, for `migrate validate`'s report
    "_eval_queries_enough(integer, boolean)",  # its check, on the caller's own rows
    "vector_table(text)",
    "begin_bulk_load(text)",  # a first load's index built at its end (ingest)
    "end_bulk_load(text)",
    "unindexed_corpora()",  # for `pyembed status` and doctor
    "cache_get(bytea[])",  # the embedding cache: through these functions only
    "cache_put(bytea[], text, text, vector[], double precision)",
    "cache_count(text[], bigint[], bigint[])",
    "cache_report(numeric)",
    "cache_purge(text, boolean, numeric)",
    "rerank_cache_get(bytea[])",  # the rerank cache: through these functions only
    "rerank_cache_put(bytea[], text, double precision[], double precision)",
    "rerank_cache_purge(text, boolean, numeric)",  # the partition a SQL client COPYs a corpus's vectors into
    "_clear_vectors(integer, text, bigint, bigint, bigint[])",  # before vectors.copy_vectors's COPY
    # Deletes of the caller's rows (no table-level DELETE: it would let a tenant LOCK the table)
    "delete_documents(text, text[])", "delete_chunks(text, text[], integer[])",
    "delete_failures(text, bigint[])", "delete_eval_queries(text, text[])",
    "_dequeue_written(integer, text, bigint, bigint, bytea[])",  # by the vector write trigger
    # the worker's moves to queue_failed, the one way a failure row is written
    "expire_jobs(numeric)",
    "fail_job(integer, bigint, text, bytea, integer, text)",
    # the worker's claim, renewal, retry and release: no UPDATE on the queue itself
    "claim_jobs(numeric, numeric, double precision, text[])",
    "renew_jobs(double precision, integer[], bigint[], text[], integer[])",
    "retry_jobs(text, integer[], bigint[], text[], bytea[], integer[], double precision[])",
    "release_jobs(integer[], bigint[], text[], integer[])",
    "queue_by_tenant(numeric, text[], double precision)",  # the queues by tenant (the worker)
    "acting_tenants()",  # the tenants a session may act for (worker, status, metrics)
    # the worker's write: the jobs its claim still holds, locked until the write commits
    "hold_jobs(integer, text, bigint[], bytea[], integer[])",
    "_document_id_problem(text)",  # the documents' id rule, which their write trigger asks
    # what a write of a document would be refused for, asked before its embedding
    "_write_bounds()",
    "_document_problems(text[], jsonb[], bigint[])",
    "_document_size_problem(integer, text, bigint, bigint)",  # one document's bound, asked too
    "reserve_usage(text, integer, integer, bigint)",  # accounting and rate limits
    "usage_report(numeric)",
    "provider_errors()",
    "add_document(text, text, text, jsonb)",
    "create_corpus(text, text, text, numeric, numeric, text, boolean)",
    "drop_corpus(text)",
    "embed(text, text, text)",
    "embed_batch(text[], text, text)",
    "search(text, vector, text, numeric, jsonb, text)",
    "search_hybrid(text, text, vector, text, numeric, jsonb, numeric, numeric, text, text, "
    "double precision, bigint[], double precision[], text[])",
    # hybrid search's keyword ranking, made while the client embeds the query
    "keyword_ranking(text, text, numeric, jsonb, text, numeric)",
    "search_keyword(text, text, numeric, jsonb, text)",
    "search_text(text, text, numeric, jsonb, text, text, text, double precision)",
    # a search by text in one or two round trips (pyembed/query.py), and its record
    "search_query(text, text, integer, text[], bytea[], integer, jsonb, text, jsonb, integer, "
    "boolean, text[], bigint[], bigint[])",
    "search_embedded(text, text, vector, text, bytea, text, double precision, integer, jsonb, "
    "text, jsonb, real, boolean, text[], bigint[], bigint[], bigint[], double precision[], "
    "text[])",
    "reserve_query(integer, text, bytea, integer)",
    "measure_recall(text, numeric)",  # recall you can see (sql/072-recall.sql)
    "recall_sampled(numeric)",
    "recall_report(numeric)",
    "replica_lag()",
    "record_search(integer, text, text, integer, boolean, real, real, real, real, bytea, text, "
    "vector, double precision, jsonb, text[], bigint[], bigint[])",
    "search_reranked(text, text, text, numeric, jsonb, text, numeric, text, text, "
    "double precision)",
}

# Functions named by their argument types, with `vector` unqualified (pgvector lives in public);
# EXECUTE for the group role, and for the login role the application connects as.
PRIVILEGES_SQL = """
SELECT p.proname || '(' || oidvectortypes(p.proargtypes) || ')',
       has_function_privilege(%s, p.oid, 'EXECUTE'), has_function_privilege(p.oid, 'EXECUTE')
  FROM pg_catalog.pg_proc p
 WHERE p.pronamespace = 'pyembed'::regnamespace
"""

# Every revision below head, oldest first: each is a downgrade target.
REVISIONS = [r.revision for r in reversed(list(
    ScriptDirectory.from_config(schema.alembic_config()).walk_revisions()))]


def _pg_tool(name: str) -> str:
    """A client program of the server's own version (pg_dump refuses older servers' peers)."""
    path = Path(find_bindir()) / name
    return str(path) if path.exists() else shutil.which(name) or name


def schema_dump(dsn: str) -> str:
    """`pg_dump --schema-only --schema=pyembed`, without comments, SET lines and blank lines."""
    out = subprocess.run([_pg_tool("pg_dump"), "--schema-only", "--schema=pyembed", "-d", dsn],
                         capture_output=True, text=True, check=True).stdout
    skip = ("--", "SET ", "SELECT pg_catalog.set_config(", "\\restrict ", "\\unrestrict ")
    return "\n".join(line for line in out.splitlines()
                     if line.strip() and not line.startswith(skip))


def _assert_same(actual: str, expected: str) -> None:
    if actual != expected:
        diff = "\n".join(difflib.unified_diff(expected.splitlines(), actual.splitlines(),
                                              "fresh install", "this database", lineterm=""))
        pytest.fail(f"schema differs from a fresh install:\n{diff[:6000]}")


@pytest.fixture(scope="module")
def fresh_dump(cluster: LocalCluster) -> Iterator[str]:
    """The schema dump of a database brought to head by one online install."""
    db = create_database(cluster, f"t_fresh_{uuid.uuid4().hex[:8]}")
    try:
        schema.install(db.owner_dsn)
        yield schema_dump(db.owner_dsn)
    finally:
        drop_database(cluster, db.name)


def _version_rows(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute("SELECT version_num FROM pyembed.alembic_version")]


# -- upgrade, downgrade, upgrade ----------------------------------------------------------------

def test_downgrade_to_base_leaves_only_the_version_table_and_upgrade_equals_install(
        empty_db: Database, fresh_dump: str) -> None:
    assert schema.install(empty_db.owner_dsn) == schema.head_revision()
    with connect(empty_db.app_dsn, autocommit=True) as app:  # with data: a corpus and its index
        corpus = create_corpus(app, "docs", KEY)
        write_chunks(app, corpus, rows(3, 384), KEY)

    schema.downgrade(empty_db.owner_dsn, "base")

    assert schema.current_revision(empty_db.owner_dsn) is None
    with psycopg.connect(empty_db.owner_dsn) as conn:
        relations = conn.execute("SELECT relname, relkind::text FROM pg_catalog.pg_class "
                                 "WHERE relnamespace = 'pyembed'::regnamespace "
                                 "ORDER BY 1").fetchall()
        functions = conn.execute("SELECT proname FROM pg_catalog.pg_proc "
                                 "WHERE pronamespace = 'pyembed'::regnamespace").fetchall()
        types = conn.execute("SELECT typname FROM pg_catalog.pg_type "
                             "WHERE typnamespace = 'pyembed'::regnamespace ORDER BY 1").fetchall()
        versions = conn.execute("SELECT count(*) FROM pyembed.alembic_version").fetchone()
    assert relations == [("alembic_version", "r"), ("alembic_version_pkc", "i")]
    assert functions == []
    assert types == [("_alembic_version",), ("alembic_version",)]
    assert versions == (0,)

    assert schema.install(empty_db.owner_dsn) == schema.head_revision()
    _assert_same(schema_dump(empty_db.owner_dsn), fresh_dump)
    assert _version_rows(empty_db.owner_dsn) == [schema.head_revision()]


@pytest.mark.parametrize("revision", REVISIONS[:-1])
def test_downgrade_to_each_revision_and_back_equals_install(
        revision: str, empty_db: Database, fresh_dump: str) -> None:
    schema.install(empty_db.owner_dsn)
    schema.downgrade(empty_db.owner_dsn, revision)
    assert schema.current_revision(empty_db.owner_dsn) == revision
    assert schema.install(empty_db.owner_dsn) == schema.head_revision()
    _assert_same(schema_dump(empty_db.owner_dsn), fresh_dump)


def test_vectors_and_indexes_survive_the_partitioning_revision_both_ways(
        empty_db: Database) -> None:
    """0006 moves the vectors into per-corpus partitions and their HNSW indexes with them;
    its downgrade moves them back into one table."""
    schema.install(empty_db.owner_dsn)
    with connect(empty_db.app_dsn, autocommit=True) as app:
        for name in ("docs", "more"):
            corpus = create_corpus(app, name, KEY)
            write_chunks(app, corpus, rows(5, 384, prefix=name), KEY)
    query = ("SELECT (SELECT count(*) FROM pyembed.vectors), "
             "(SELECT array_agg(tablename || ':' || indexname ORDER BY 1) FROM pg_indexes "
             "WHERE schemaname = 'pyembed' AND indexname LIKE 'vectors_hnsw_%%')")
    with psycopg.connect(empty_db.owner_dsn) as conn:
        count, indexes = conn.execute(query).fetchone()  # type: ignore[misc]
    assert count == 10 and [i.split(":")[0] for i in indexes] == ["vectors_c1", "vectors_c2"]

    schema.downgrade(empty_db.owner_dsn, "0005")
    with psycopg.connect(empty_db.owner_dsn) as conn:
        assert conn.execute("SELECT relkind::text FROM pg_class "
                            "WHERE oid = 'pyembed.vectors'::regclass").fetchone() == ("r",)
        count, old = conn.execute(query).fetchone()  # type: ignore[misc]
    assert count == 10 and [i.split(":")[0] for i in old] == ["vectors", "vectors"]
    assert [i.split(":")[1] for i in old] == [i.split(":")[1] for i in indexes]

    schema.install(empty_db.owner_dsn)
    with psycopg.connect(empty_db.owner_dsn) as conn:
        assert conn.execute(query).fetchone() == (10, indexes)
    with connect(empty_db.app_dsn, autocommit=True) as app:
        hits = search(app, "more", rows(5, 384, prefix="more")[3].embedding, KEY, k=1)
        assert hits[0].document_id == "more3"
        write_chunks(app, corpus_info(app, "docs"), rows(1, 384, prefix="new"), KEY)


def test_the_document_postings_revision_indexes_stored_documents_as_the_triggers_do(
        empty_db: Database) -> None:
    """0016 builds the postings of the documents already stored (their chunks without the
    overlap) and their statistics: the same rows and counts the triggers write."""
    schema.install(empty_db.owner_dsn)
    texts = {f"d{i}": " ".join(f"word{(i * 7 + j) % 23} term{j % 5}" for j in range(40 + i))
             for i in range(6)}
    with connect(empty_db.app_dsn, autocommit=True) as app:
        corpus = create_corpus(app, "docs", KEY, chunk_tokens=30, chunk_overlap=8)
        chunk_rows = [ChunkRow(d, n, c, unit(384, n), {}) for d, t in texts.items()
                      for n, c in enumerate(chunk_text(t, 30, 8))]
        assert len(chunk_rows) > 3 * len(texts)
        write_chunks(app, corpus, chunk_rows, KEY)
    index = ("SELECT (SELECT array_agg((d.document_id, p.lexeme, p.tf, p.doc_len)::text "
             "ORDER BY d.document_id, p.lexeme) FROM pyembed.document_postings p "
             "JOIN pyembed.documents d USING (corpus_id, doc_no)), "
             "(SELECT array_agg((lexeme, df, document_df)::text ORDER BY lexeme) "
             "FROM pyembed.lexeme_stats), "
             "(SELECT array_agg((chunks, total_len, documents, document_len)::text) "
             "FROM pyembed.keyword_stats)")
    with psycopg.connect(empty_db.owner_dsn) as conn:
        written = conn.execute(index).fetchone()
        whole = conn.execute("SELECT sum(tf), count(DISTINCT doc_no) "
                             "FROM pyembed.document_postings").fetchone()
    assert whole == (sum(len(t.split()) for t in texts.values()), len(texts))  # no overlap
    schema.downgrade(empty_db.owner_dsn, "0015")
    with connect(empty_db.app_dsn, autocommit=True) as app:  # the functions before 0016 work
        write_chunks(app, corpus_info(app, "docs"), [ChunkRow("d6", 0, "word1 term1",
                                                              unit(384, 9), {})], KEY)
        hits = search(app, "docs", None, None, 3, mode="keyword", text="word1 term1")
        assert hits[0].document_id == "d6"
        app.execute("SELECT pyembed.delete_documents('docs', '{d6}')")
    schema.install(empty_db.owner_dsn)
    with psycopg.connect(empty_db.owner_dsn) as conn:
        assert conn.execute(index).fetchone() == written


KEPT = {t: f"SELECT (to_jsonb(x) - 'doc_no')::text FROM pyembed.{t} x ORDER BY 1" for t in (
    "corpora", "documents", "chunks", "vectors", "postings", "lexeme_stats", "keyword_stats")}
"""Rows an upgrade from any earlier revision keeps or rebuilds as they were (a document's
doc_no, a surrogate key that revision 0016 numbers again, left out)."""
KEPT["document_postings"] = """SELECT (d.document_id, p.lexeme, p.tf, p.doc_len)::text
  FROM pyembed.document_postings p JOIN pyembed.documents d USING (corpus_id, doc_no) ORDER BY 1"""
KEPT["posting_blocks"] = """SELECT (to_jsonb(b) - 'postings' - 'block'
        || jsonb_build_object('chunks', CASE WHEN block >= 0 THEN b.postings END))::text
  FROM pyembed.posting_blocks b ORDER BY 1"""


@pytest.mark.parametrize("revision", ["0002", "0004"])
def test_an_upgrade_from_an_early_revision_with_chunks_keeps_every_row_and_keyword_hit(
        db: Database, revision: str) -> None:
    """A database of an early release, with documents in it, brought to head: every row of
    KEPT is as an install at head wrote it, and a chunk keyword search finds the old chunk.
    Before, from 0004 (before tenants) the upgrade failed at 0017 with 'permission denied for
    schema pyembed' (0005 gave the tables to pyembed_owner, which reached their schema only
    once sql/080 ran; 0017's copy into a table referencing corpora checks the key as it); and
    from 0002 (before keyword search) it succeeded but indexed none of the stored chunks: a
    chunk keyword search found nothing, and the frequencies counted no old chunk."""
    with pyembed.connect(db.app_dsn) as client:
        client.create_corpus("docs", KEY).add([
            pyembed.Document("z", "the zebra runs across the plain", {"n": 1}),
            pyembed.Document("o", "other words entirely, written down")])

    def kept() -> dict[str, list[Any]]:
        with psycopg.connect(db.owner_dsn) as conn:
            return {t: [r[0] for r in conn.execute(q)] for t, q in KEPT.items()}

    before = kept()
    assert before["postings"] and before["posting_blocks"]
    schema.downgrade(db.owner_dsn, revision)
    schema.install(db.owner_dsn)
    assert kept() == before
    with pyembed.connect(db.app_dsn) as client:
        hits = client.corpus("docs").search("zebra", mode="keyword", group="chunk")
        assert [h.document_id for h in hits] == ["z"]


def test_step_by_step_upgrade_equals_install(empty_db: Database, fresh_dump: str) -> None:
    for revision in REVISIONS:
        command.upgrade(schema.alembic_config(empty_db.owner_dsn), revision)
        assert schema.current_revision(empty_db.owner_dsn) == revision
    _assert_same(schema_dump(empty_db.owner_dsn), fresh_dump)
    assert _version_rows(empty_db.owner_dsn) == [schema.head_revision()]


# -- offline (--sql) ----------------------------------------------------------------------------

def test_offline_script_applied_with_psql_equals_online_install(
        empty_db: Database, fresh_dump: str, tmp_path: Path) -> None:
    script = schema.offline_sql()
    path = tmp_path / "pyembed-upgrade.sql"
    path.write_text(script)

    out = subprocess.run([_pg_tool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                          "-d", empty_db.owner_dsn, "-f", str(path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr

    _assert_same(schema_dump(empty_db.owner_dsn), fresh_dump)
    assert _version_rows(empty_db.owner_dsn) == [schema.head_revision()]
    assert schema.current_revision(empty_db.owner_dsn) == schema.head_revision()


@pytest.mark.parametrize("start", ["", "heads", "head", "base", "0034@head", "003", "0030 "])
def test_from_is_exactly_a_revision_id_in_one_line(start: str) -> None:
    """`pyembed install --sql --from VALUE` with anything but a revision id: one line naming
    --from and the revisions, exit 1, nothing on stdout. Before, '' and 'heads' reached
    alembic's lookup, which failed with a traceback (AssertionError, AttributeError), and
    'head', 'base' and '0034@head' printed a script though the error says 0001..head."""
    out = run_cli("install", "--sql", "--from", start)
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == (f"error: --from {start!r} is not a pyembed schema revision: one of "
                          f"0001..{schema.head_revision()}\n")


def _psql_file(dsn: str, script: str, tmp_path: Path,
               timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    path = tmp_path / f"pyembed-{uuid.uuid4().hex[:8]}.sql"
    path.write_text(script)
    return subprocess.run([_pg_tool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn,
                           "-f", str(path)], capture_output=True, text=True, timeout=timeout)


def _named_rows(conn: psycopg.Connection[Any], query: str) -> list[dict[str, Any]]:
    cur = conn.execute(query)
    names = [d.name for d in cur.description or ()]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def test_a_dba_upgrades_an_earlier_revision_offline_with_its_rows_kept(
        empty_db: Database, tmp_path: Path) -> None:
    """A DBA's database at an earlier revision, with a corpus in it: `pyembed install --sql`
    (printed for an empty database) and a script printed from another revision each stop at
    their first statement after the lock, in one PE007 line naming the database's revision and
    the command that prints its script; that script brings it to head keeping every row. Before,
    the first failed on `relation "alembic_version" already exists`, and a script from an older
    revision ran its DDL on the newer schema (its version UPDATEs matching no row)."""
    start = REVISIONS[-3]
    schema.install(empty_db.owner_dsn)
    with pyembed.connect(empty_db.app_dsn) as client:
        client.create_corpus("docs", KEY).add([pyembed.Document("d1", "quota exceeded", {"a": 1})])
    at_head = schema_dump(empty_db.owner_dsn)  # with the corpus's partition
    schema.downgrade(empty_db.owner_dsn, start)
    rows = "SELECT c.*, d.* FROM pyembed.corpora c JOIN pyembed.documents d USING (corpus_id)"
    with psycopg.connect(empty_db.owner_dsn) as conn:
        corpora = _named_rows(conn, rows)
    assert len(corpora) == 1

    for script, expected in ((schema.offline_sql(), "from no schema"),
                             (schema.offline_sql(REVISIONS[-4]), f"from revision {REVISIONS[-4]}")):
        out = _psql_file(empty_db.owner_dsn, script, tmp_path)
        assert out.returncode != 0
        error = next(line for line in out.stderr.splitlines() if "ERROR:" in line)
        assert error.endswith(f"ERROR:  this script changes pyembed's schema {expected}, but this "
                              f"database is at revision {start}: nothing was changed"), out.stderr
        assert f"HINT:  print it with: pyembed install --sql --from {start}" in out.stderr
        assert _version_rows(empty_db.owner_dsn) == [start]

    out = _psql_file(empty_db.owner_dsn, schema.offline_sql(start), tmp_path)
    assert out.returncode == 0, out.stderr
    assert _version_rows(empty_db.owner_dsn) == [schema.head_revision()]
    _assert_same(schema_dump(empty_db.owner_dsn), at_head)
    with psycopg.connect(empty_db.owner_dsn) as conn:  # (a column added since: its default)
        assert [{k: r[k] for k in corpora[0]} for r in _named_rows(conn, rows)] == corpora
    # At head, the script from head refreshes the functions and changes no table.
    out = _psql_file(empty_db.owner_dsn, schema.offline_sql(schema.head_revision()), tmp_path)
    assert out.returncode == 0, out.stderr
    _assert_same(schema_dump(empty_db.owner_dsn), at_head)


def test_the_offline_script_waits_a_bounded_time_for_a_tables_lock(
        empty_db: Database, tmp_path: Path) -> None:
    """A tenant's session idle in a transaction that read pyembed.migrations held the offline
    script's ALTER TABLE (revision 0031's CHECK) for ever, with every query on that table queued
    behind it (psql was still waiting after 20 s). Now the script waits DDL_LOCK_WAIT for each
    lock, as an online install does, then stops having changed nothing; run again once the
    session is done, it upgrades."""
    start = "0030"  # 0031 alters pyembed.migrations
    schema.install(empty_db.owner_dsn)
    schema.downgrade(empty_db.owner_dsn, start)
    before = schema_dump(empty_db.owner_dsn)
    script = schema.offline_sql(start)
    with psycopg.connect(empty_db.app_dsn) as reader:
        reader.execute("SELECT count(*) FROM pyembed.migrations")  # and stays in its transaction
        started = time.monotonic()
        try:
            out = _psql_file(empty_db.owner_dsn, script, tmp_path, timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("the offline script waited for ever on a tenant's lock")
        took = time.monotonic() - started
        assert out.returncode != 0
        error = next(line for line in out.stderr.splitlines() if "ERROR:" in line)
        assert error.endswith("ERROR:  canceling statement due to lock timeout"), out.stderr
        assert schema.DDL_LOCK_WAIT <= took < schema.DDL_LOCK_WAIT + 5, took
        assert _version_rows(empty_db.owner_dsn) == [start]
    _assert_same(schema_dump(empty_db.owner_dsn), before)

    out = _psql_file(empty_db.owner_dsn, script, tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    assert _version_rows(empty_db.owner_dsn) == [schema.head_revision()]


def test_an_offline_script_from_an_unknown_revision_is_one_line() -> None:
    with pytest.raises(InvalidInput, match=r"--from '0999' is not a pyembed schema revision"):
        schema.offline_sql("0999")


def test_offline_script_is_the_source_sql_verbatim_under_the_install_lock() -> None:
    script = schema.offline_sql()
    # SQL text reaches the script unchanged: no %% doubling, no \: escapes, nothing dropped.
    for f in schema.sql_files():
        assert f.read_text() in script, f"{f.name} is not in the offline script verbatim"
    assert script.count("%%") == schema.replaceable_sql().count("%%")
    assert "\\:" not in script

    lock = schema.install_lock_sql() + ";"
    statements = [s.strip() for s in script.split("\n\n") if s.strip() and not s.startswith("--")]
    assert statements[:2] == ["BEGIN;", lock], statements[:3]
    # Standard strings whatever the DBA's session says, the database's encoding checked (UTF8),
    # then the revision check, then the bound on every later lock wait, said to the DBA.
    assert script.split("\n\n")[2:6] == ["SET LOCAL standard_conforming_strings = on;",
                                         schema.UTF8_DATABASE_SQL + ";",
                                         schema.expected_revision_sql(None) + ";",
                                         schema.ddl_lock_wait_sql(offline=True) + ";"]
    assert statements[-1] == "COMMIT;"
    assert script.count("COMMIT;") == 1  # one transaction: a failure leaves nothing behind


# -- sql/: replaceable objects --------------------------------------------------------------------

def test_sql_files_are_named_and_ordered() -> None:
    files = schema.sql_files()
    names = [f.name for f in files]
    assert names, "no sql/ files"
    assert all(re.fullmatch(r"\d{3}-[a-z0-9]+(-[a-z0-9]+)*\.sql", n) for n in names), names
    numbers = [int(n[:3]) for n in names]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers), names
    # Nothing in sql/ is silently skipped (a "040_x.SQL" would never be applied).
    on_disk = sorted(p.name for p in resource_dir("sql").iterdir() if not p.name.startswith("."))
    assert on_disk == names


def test_every_lexeme_column_compares_bytes(db: Database) -> None:
    """The keyword tables' lexemes are COLLATE "C" (revision 0034): under the database's own
    collation (C.UTF-8 here, which PostgreSQL 15 compares through strcoll) every posting scan,
    join and grouping of lexemes paid for a locale's comparison that byte order does alike."""
    with psycopg.connect(db.owner_dsn) as conn:
        found = conn.execute("""
        SELECT c.relname || '.' || a.attname, coalesce(l.collname, '?')
          FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
          LEFT JOIN pg_collation l ON l.oid = a.attcollation
         WHERE n.nspname = 'pyembed' AND c.relkind IN ('r', 'p') AND a.attnum > 0
           AND NOT a.attisdropped AND a.attname IN ('lexeme', 'lexemes')
         ORDER BY 1""").fetchall()
    assert found == [("document_postings.lexeme", "C"), ("keyword_pending.lexemes", "C"),
                     ("lexeme_stats.lexeme", "C"), ("posting_blocks.lexeme", "C"),
                     ("postings.lexeme", "C")]


def test_replaceable_sql_and_install_are_idempotent(db: Database) -> None:
    before = schema_dump(db.owner_dsn)
    with psycopg.connect(db.owner_dsn) as conn, conn.transaction():
        conn.execute(schema.replaceable_sql())
    _assert_same(schema_dump(db.owner_dsn), before)

    assert schema.install(db.owner_dsn) == schema.head_revision()
    _assert_same(schema_dump(db.owner_dsn), before)
    assert _version_rows(db.owner_dsn) == [schema.head_revision()]


# -- concurrency and failures ---------------------------------------------------------------------

class _ThreadInstaller(threading.Thread):
    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)  # a deadlocked installer must not hang the test run
        self.dsn = dsn
        self.outcome: str | BaseException | None = None

    def run(self) -> None:
        try:
            self.outcome = schema.install(self.dsn)
        except BaseException as exc:
            self.outcome = exc


Installers = tuple[Callable[[], bool], Callable[[float], list[str]]]


def _start_installers(how: str, dsn: str) -> Installers:
    """Two installers started in threads or processes: (both still running?, their outcomes)."""
    if how == "threads":
        threads = [_ThreadInstaller(dsn) for _ in range(2)]
        for t in threads:
            t.start()

        def thread_outcomes(deadline: float) -> list[str]:
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            return ["still running (stuck)" if t.is_alive() else
                    t.outcome if isinstance(t.outcome, str) else repr(t.outcome) for t in threads]
        return lambda: all(t.is_alive() for t in threads), thread_outcomes

    env = {**os.environ, "PYEMBED_OWNER_DSN": dsn}
    procs = [subprocess.Popen([sys.executable, "-c",
                               "from pyembed import schema; print(schema.install())"],
                              env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]

    def process_outcomes(deadline: float) -> list[str]:
        outs = []
        for p in procs:
            try:
                out, _ = p.communicate(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
            outs.append(out.strip() if p.returncode == 0 else f"exit {p.returncode}: {out}")
        return outs
    return lambda: all(p.poll() is None for p in procs), process_outcomes


@pytest.mark.parametrize("how", ["threads", "processes"])
def test_concurrent_installs_both_succeed(how: str, empty_db: Database) -> None:
    lock_id = schema.INSTALL_LOCK_ID
    with psycopg.connect(empty_db.owner_dsn, autocommit=True) as holder:
        # Hold the install lock so that both installers provably wait at the same time.
        holder.execute("SELECT pg_advisory_lock(%s)", (lock_id,))
        running, outcomes = _start_installers(how, empty_db.owner_dsn)
        # Threads of one process take turns on a process-wide lock (Alembic's context is
        # global), so only one of them reaches the database lock; processes both do.
        expected = 2 if how == "processes" else 1
        deadline = time.monotonic() + 20
        waiting = 0
        while waiting < expected and running() and time.monotonic() < deadline:
            row = holder.execute(
                "SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' "
                "AND NOT granted AND objid::bigint = %s AND database = "
                "(SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())",
                (lock_id,)).fetchone()
            waiting = row[0] if row else 0
        holder.execute("SELECT pg_advisory_unlock(%s)", (lock_id,))
        # An install takes well under a second; a stuck one is a deadlock, not slowness.
        results = outcomes(time.monotonic() + 15)
        sessions = holder.execute(
            "SELECT state, wait_event_type, wait_event, left(query, 60) "
            "FROM pg_catalog.pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()").fetchall()
    assert waiting == expected, f"the installers never waited on the install lock: {results}"
    assert results == [schema.head_revision()] * 2, f"{results}; sessions: {sessions}"
    assert _version_rows(empty_db.owner_dsn) == [schema.head_revision()]


@pytest.mark.parametrize("installed", [True, False])
def test_no_other_roles_lock_holds_an_install_for_ever(
        installed: bool, empty_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """The application role (any login with CONNECT) holding the install's advisory key made
    `pyembed install` and every upgrade wait with no end. Now an install over an existing schema
    takes turns on the version table's row, which only the installing role may lock, and does
    not wait for it at all; a first install waits at most INSTALL_WAIT and then fails in one
    line naming the session that holds the key."""
    monkeypatch.setattr(schema, "INSTALL_WAIT", 2)
    if installed:
        schema.install(empty_db.owner_dsn)
    with psycopg.connect(empty_db.app_dsn, autocommit=True) as hostile:
        hostile.execute("SET application_name = 'hostile'")
        hostile.execute("SELECT pg_advisory_lock(%s)", (schema.INSTALL_LOCK_ID,))
        (pid,) = hostile.execute("SELECT pg_backend_pid()").fetchone()  # type: ignore[misc]
        installer = _ThreadInstaller(empty_db.owner_dsn)
        started = time.monotonic()
        installer.start()
        installer.join(20)
        took = time.monotonic() - started
        stuck = installer.is_alive()
        hostile.execute("SELECT pg_advisory_unlock_all()")
        installer.join(20)
    assert not stuck, "the install waited on another role's lock"
    if installed:
        assert installer.outcome == schema.head_revision(), installer.outcome
        assert took < 2, took
        return
    err = installer.outcome
    assert isinstance(err, InstallError), err
    message = str(err)
    assert f"pid {pid} (role {APP_USER}, application 'hostile'" in message, message
    assert len(message.splitlines()) == 1 and 2 <= took < 10, (took, message)
    assert schema.install(empty_db.owner_dsn) == schema.head_revision()


@pytest.mark.parametrize("case", ["unreachable", "not_owner"])
def test_failed_install_is_one_clear_line(case: str, empty_db: Database) -> None:
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        dsn = (f"postgresql://pyembed:x@127.0.0.1:{port}/pyembed?connect_timeout=5"
               if case == "unreachable" else empty_db.app_dsn)
        with pytest.raises(PyembedError) as err:
            schema.install(dsn)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and "\t" not in message, repr(message)
    assert not re.search(r"\b(SELECT|CREATE|ALTER|INSERT|pg_advisory)\b|\[SQL", message), message
    if case == "unreachable":
        assert str(port) in message, message
    else:
        assert "permission denied" in message, message
        with psycopg.connect(empty_db.owner_dsn) as conn:
            namespace = conn.execute("SELECT to_regnamespace('pyembed')").fetchone()
        assert namespace == (None,), "a refused install left a pyembed schema behind"


# -- privileges ---------------------------------------------------------------------------------

def test_execute_privileges_are_granted_on_purpose(app: psycopg.Connection[Any]) -> None:
    with app.transaction():
        app.execute("SET LOCAL search_path = pg_catalog, public")
        granted = app.execute(PRIVILEGES_SQL, (APP_GROUP,)).fetchall()
        public = app.execute(
            "SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc p, "
            "LATERAL aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a "
            "WHERE p.pronamespace = 'pyembed'::regnamespace AND a.grantee = 0 "
            "AND a.privilege_type = 'EXECUTE'").fetchall()
    assert {sig for sig, group, _ in granted if group} == APP_EXECUTE
    assert {sig for sig, _, login in granted if login} == APP_EXECUTE
    assert {"set_secret(text, text)", "migration_start(text, text, text)"} <= {s for s, _, _ in granted}
    assert public == [], f"PUBLIC may execute: {public}"


@pytest.mark.parametrize("call", [
    "SELECT pyembed._create_vector_index(1, 'fake/fake-hash@1:384')",
    "SELECT * FROM pyembed._index_spec(384, 'cosine')",
    "SELECT * FROM pyembed._nearest(1, 'fake/fake-hash@1:384', array_fill(0.1, ARRAY[384])::vector, 10)",
    "SELECT * FROM pyembed._nearest_in(1, 'fake/fake-hash@1:384', "
    "array_fill(0.1, ARRAY[384])::vector, 10, NULL, false, 'vector', '{}', 384, 'cosine', 0)",
    "SELECT pyembed.set_index_settings('docs', '{\"m\": 32}')",
])
def test_app_cannot_call_internal_functions(app: psycopg.Connection[Any], call: str) -> None:
    create_corpus(app, "docs", KEY)
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
        app.execute(call)


def test_after_a_downgrade_of_one_revision_the_previous_release_still_searches(
        empty_db: Database) -> None:
    """Rolling back one release's schema leaves head's replaceable functions in place until the
    older package reinstalls its own: they must not call what the downgrade dropped."""
    import pyembed

    schema.install(empty_db.owner_dsn)
    with pyembed.connect(empty_db.app_dsn) as client:
        client.create_corpus("docs", KEY).add(
            [{"id": f"d{i}", "text": f"quota error E40{i} in region {i}"} for i in range(5)])
    schema.downgrade(empty_db.owner_dsn, REVISIONS[-2])
    with pyembed.connect(empty_db.app_dsn) as client:
        docs = client.corpus("docs")
        for mode in ("vector", "keyword", "hybrid"):
            assert docs.search("quota error E402", mode=mode, k=3), mode
        assert client.conn.execute("SELECT count(*) FROM pyembed.query_log").fetchone() == (3,)


def test_the_hardening_revision_ties_members_to_their_roles(empty_db: Database) -> None:
    """0022 gives each tenant member its role's OID, and removes a member whose role is gone
    (under 0021 a role created later under its name would have joined the tenant)."""
    schema.install(empty_db.owner_dsn)
    schema.downgrade(empty_db.owner_dsn, "0021")
    with psycopg.connect(empty_db.owner_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO pyembed.tenants (name) VALUES ('acme')")
        conn.execute("ALTER TABLE pyembed.tenant_members DISABLE TRIGGER tenant_members_role")
        conn.execute("INSERT INTO pyembed.tenant_members SELECT r, tenant_id FROM "
                     "pyembed.tenants, unnest(ARRAY['pyembed_app', 'no_such_role']) r")
        conn.execute("ALTER TABLE pyembed.tenant_members ENABLE TRIGGER tenant_members_role")
    schema.install(empty_db.owner_dsn)
    with psycopg.connect(empty_db.owner_dsn) as conn:
        assert conn.execute("SELECT role_name::text, role_oid = 'pyembed_app'::regrole "
                            "FROM pyembed.tenant_members").fetchall() == [("pyembed_app", True)]


def _refused_upgrade(dsn: str, revision: str, expected: list[str]) -> str:
    """schema.install on a database at `revision`: InstallError naming each of `expected`, and
    the database still at `revision`."""
    with pytest.raises(PyembedError) as err:
        schema.install(dsn)
    message = str(err.value)
    assert len(message.splitlines()) == 1, repr(message)
    for part in expected:
        assert part in message, (part, message)
    assert schema.current_revision(dsn) == revision
    return message


def test_an_upgrade_over_rows_a_new_check_refuses_stops_naming_them(db: Database) -> None:
    """A database at 0027 holding a chunk_tokens of 200000 and a max_batch of 500000 (within the
    checks it had), and one at 0029 holding index settings and a recall sample's filter that
    0030's checks refuse: the upgrade stops before any change, naming each row, what is wrong
    with it and the fix; once they are mended it succeeds. Before, 0028 failed with the raw
    CHECK error ('check constraint ... is violated by some row'), naming no row."""
    with connect(db.owner_dsn, autocommit=True) as conn:
        conn.execute("SELECT pyembed.create_corpus('docs', %s)", (KEY,))
        conn.execute("SELECT pyembed.create_corpus('wiki', %s)", (KEY,))
    schema.downgrade(db.owner_dsn, "0027")
    with connect(db.owner_dsn, autocommit=True) as conn:
        conn.execute("UPDATE pyembed.corpora SET chunk_tokens = 200000 WHERE name = 'docs'")
        conn.execute("UPDATE pyembed.models SET max_batch = 500000 WHERE model_key = %s", (KEY,))
    message = _refused_upgrade(db.owner_dsn, "0027", [
        "revision 0028 stopped: 2 stored row(s) break the check it adds",
        "pyembed.corpora 'docs': chunk_tokens 200000 is not in 1..100000",
        f"pyembed.models '{KEY}': max_batch 500000 is not in 1..100000",
        "Set each to a value in its range", "then upgrade again"])
    assert "CONTEXT" not in message and "wiki" not in message
    with connect(db.owner_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT chunk_tokens FROM pyembed.corpora WHERE name = 'docs'"
                            ).fetchone() == (200000,)
        conn.execute("UPDATE pyembed.corpora SET chunk_tokens = 100000 WHERE name = 'docs'")
        conn.execute("UPDATE pyembed.models SET max_batch = 100 WHERE model_key = %s", (KEY,))
    schema.install(db.owner_dsn)
    schema.downgrade(db.owner_dsn, "0029")
    with connect(db.owner_dsn, autocommit=True) as conn:
        conn.execute("""UPDATE pyembed.corpora SET index_settings = '{"m": 1000}'
                         WHERE name = 'docs'""")
        conn.execute("""UPDATE pyembed.corpora SET index_settings = '{"ef": 10}'
                         WHERE name = 'wiki'""")
        conn.execute("INSERT INTO pyembed.recall_samples (corpus_id, model_key, embedding, "
                     "filter) SELECT corpus_id, model_key, array_fill(0.05, ARRAY[384])::vector, "
                     "'[1]' FROM pyembed.corpora WHERE name = 'docs'")
    _refused_upgrade(db.owner_dsn, "0029", [
        "revision 0030 stopped: 3 stored row(s) break the check it adds",
        "pyembed.corpora 'docs': index setting m must be an integer 2..100, got 1000",
        "pyembed.corpora 'wiki': unknown index setting 'ef'",
        "pyembed.recall_samples '1': filter is a JSON array, not an object"])
    with connect(db.owner_dsn, autocommit=True) as conn:
        conn.execute("""SELECT pyembed.set_index_settings(name, '{"m": null, "ef": null}')
                          FROM pyembed.corpora""")
        conn.execute("DELETE FROM pyembed.recall_samples")
    assert schema.install(db.owner_dsn) == schema.head_revision()


def test_an_upgrade_over_logs_that_are_not_objects_stops_naming_them(db: Database) -> None:
    """A database at 0030 holding a migration whose validation report is a JSON array and an
    event whose detail is a string (both within the size bounds it had): 0031's checks refuse
    them, the upgrade stops before any change naming each row, and succeeds once they are
    objects. A direct write that is not an object is then InvalidInput naming the rule."""
    from pyembed.db import translate
    from pyembed.errors import InvalidInput

    with connect(db.owner_dsn, autocommit=True) as conn:
        conn.execute("SELECT pyembed.create_corpus('docs', %s)", (KEY,))
        conn.execute("SELECT pyembed.migration_start('docs', 'fake/fake-hash@1:1024')")
    schema.downgrade(db.owner_dsn, "0030")
    with connect(db.owner_dsn, autocommit=True) as conn:
        conn.execute("UPDATE pyembed.migrations SET validation = '[0.5, 0.4]'")
        conn.execute("INSERT INTO pyembed.migration_events (migration_id, step, detail) "
                     "SELECT migration_id, 'note', '\"by hand\"' FROM pyembed.migrations")
        event = conn.execute("SELECT max(event_id) FROM pyembed.migration_events").fetchone()
    _refused_upgrade(db.owner_dsn, "0030", [
        "revision 0031 stopped: 2 stored row(s) break the check it adds",
        "pyembed.migrations '1': validation is a JSON array, not an object",
        f"pyembed.migration_events '{event[0]}': detail is a JSON string, not an object",
        "Make each a JSON object"])
    with connect(db.owner_dsn, autocommit=True) as conn:
        conn.execute("UPDATE pyembed.migrations SET validation = "
                     "jsonb_build_object('report', validation)")
        conn.execute("UPDATE pyembed.migration_events SET detail = '{}' WHERE step = 'note'")
    assert schema.install(db.owner_dsn) == schema.head_revision()
    with connect(db.owner_dsn, autocommit=True) as conn:
        for statement, rule in (
                ("UPDATE pyembed.migrations SET validation = '\"passed\"'",
                 "a migration's validation report is a JSON object"),
                ("UPDATE pyembed.migration_events SET detail = '[]'",
                 "a migration event's detail is a JSON object")):
            error = translate(sql_error(conn, statement))
            assert isinstance(error, InvalidInput) and str(error).startswith(rule), error


LAST_RELEASE = (REPO / "tests" / "golden" / "last_release.txt").read_text().split()[0]
"""The commit the last release was made from (main as the last stop landed it): a database its
package installed is what an operator upgrades. Bumped when a stop lands."""

OLD_RELEASE_WRITES = """
import sys
sys.path.insert(0, sys.argv[1])
import pyembed
from pyembed.schema import install
assert pyembed.__file__.startswith(sys.argv[1]), pyembed.__file__
install(sys.argv[2])
with pyembed.connect(sys.argv[3]) as client:
    client.create_corpus("docs", sys.argv[4]).add(
        [{"id": f"d{i}", "text": f"quota error E40{i} in region {i}"} for i in range(5)])
"""


def test_a_database_the_last_release_installed_upgrades_to_install(
        empty_db: Database, fresh_dump: str, tmp_path: Path) -> None:
    """The replaceable SQL replaces the last release's own: a function whose parameters were
    renamed or whose result changed cannot be replaced by CREATE OR REPLACE, and must be
    dropped in sql/005-retired.sql (a database installed between two releases is not
    checked: only what an operator can have)."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", LAST_RELEASE, "--", "sql", "alembic", "pyembed",
         ":!pyembed/data"], capture_output=True, check=False)
    assert archive.returncode == 0, (
        f"the last release's commit {LAST_RELEASE} is not in this checkout's history (a "
        f"shallow clone?): {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive.stdout, check=True)
    # The old package's own install and writes, in a process of its own (its modules, not
    # these): a corpus with documents, chunks, vectors and postings.
    subprocess.run([sys.executable, "-c", OLD_RELEASE_WRITES, str(tmp_path), empty_db.owner_dsn,
                    empty_db.app_dsn, KEY], check=True, timeout=120)

    assert schema.install(empty_db.owner_dsn) == schema.head_revision()

    import pyembed

    with pyembed.connect(empty_db.app_dsn) as client:
        docs = client.corpus("docs")
        for mode in ("vector", "keyword", "hybrid"):
            assert [h.document_id for h in docs.search("quota error E402", mode=mode, k=1)] \
                == ["d2"], mode
        client.drop_corpus("docs")  # its partition is no part of a fresh install's dump
    # (a drop leaves the emptied partition to the next install, which drops it)
    assert schema.install(empty_db.owner_dsn) == schema.head_revision()
    _assert_same(schema_dump(empty_db.owner_dsn), fresh_dump)


def test_install_ddl_waits_a_bounded_time_for_a_tables_lock(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tenant's session idle in a transaction that wrote to pyembed.documents made an install
    wait for ever on the replaceable SQL's CREATE OR REPLACE TRIGGER on that table, and every
    write to it queued behind the install (an outage). Now each DDL lock wait is bounded,
    tried again DDL_TRIES times with a pause in which the queued writes run, and the install
    then fails in one line naming the session, having changed nothing."""
    monkeypatch.setattr(schema, "DDL_LOCK_WAIT", 1.0)
    monkeypatch.setattr(schema, "DDL_TRIES", 2)
    monkeypatch.setattr(schema, "DDL_PAUSE", 0.5)
    with psycopg.connect(db.app_dsn) as hostile, psycopg.connect(db.app_dsn) as traffic:
        hostile.execute("SET application_name = 'idle writer'")
        hostile.execute("SELECT pyembed.create_corpus('idle', %s)", (KEY,))
        hostile.commit()
        write = ("INSERT INTO pyembed.documents (corpus_id, document_id, content_hash) "
                 "SELECT corpus_id, %s, '\\x00' FROM pyembed.corpora WHERE name = 'idle'")
        hostile.execute(write, ("held",))  # (a write's ROW EXCLUSIVE lock, left open)
        (pid,) = hostile.execute("SELECT pg_backend_pid()").fetchone()  # type: ignore[misc]
        traffic.execute("SET lock_timeout = '10s'")  # a write stuck behind the install fails
        traffic.commit()
        installer = _ThreadInstaller(db.owner_dsn)
        started = time.monotonic()
        installer.start()
        waits = []
        while installer.is_alive() and time.monotonic() - started < 15:
            began = time.monotonic()
            try:
                traffic.execute(write, ("passing",))
            except psycopg.errors.LockNotAvailable:
                waits.append(float("inf"))
                break
            finally:
                traffic.rollback()
            waits.append(time.monotonic() - began)
            time.sleep(0.05)
        installer.join(10)
        took = time.monotonic() - started
        stuck = installer.is_alive()
        hostile.rollback()
        installer.join(20)
    assert not stuck, f"the install waited for ever on a tenant's lock; writes waited {waits}"
    err = installer.outcome
    assert isinstance(err, InstallError), err
    message = str(err)
    assert len(message.splitlines()) == 1, message
    assert f"pid {pid} (role {APP_USER}, application 'idle writer', idle in transaction" \
        in message, message
    assert "2 tries" in message and 2.5 <= took < 10, (took, message)
    assert max(waits) < 2, f"writes queued behind the install: {waits}"
    assert schema.install(db.owner_dsn) == schema.head_revision()


@pytest.mark.parametrize("names", ["same", "distinct"])
def test_a_downgrade_with_two_tenants_data_works_or_says_why_in_one_line(
        empty_db: Database, names: str) -> None:
    """`alembic downgrade base` with two tenants' corpora failed in revision 0005 with a raw
    traceback (its UNIQUE (name) of the corpora, which tenants share names under). Below 0005
    a corpus name is the database's: two tenants' corpora of one name stop the downgrade
    before it changes anything, naming them and the fix; with distinct names it goes through
    every revision. From the repo's `alembic` command a database error is one FAILED line."""
    from pyembed import tenants

    assert schema.install(empty_db.owner_dsn) == schema.head_revision()
    roles = []
    with psycopg.connect(empty_db.owner_dsn, autocommit=True) as owner:
        for name in ("a", "b"):
            role = f"down_{name}_{uuid.uuid4().hex[:6]}"
            tenants.create_tenant(owner, name)
            tenants.add_member(owner, name, role, create_login="pw")
            roles.append(role)
            dsn = psycopg.conninfo.make_conninfo(empty_db.app_dsn, user=role, password="pw")
            with connect(dsn, autocommit=True) as app:
                corpus = create_corpus(app, "docs" if names == "same" else f"docs-{name}", KEY)
                write_chunks(app, corpus, rows(3, 384), KEY)
    try:
        if names == "same":
            out = subprocess.run([str(Path(sys.executable).parent / "alembic"), "downgrade",
                                  "base"], cwd=REPO, capture_output=True, text=True,
                                 env={**os.environ, "PYEMBED_OWNER_DSN": empty_db.owner_dsn},
                                 timeout=120)
            printed = out.stdout + out.stderr
            assert out.returncode != 0 and "Traceback" not in printed, printed
            said = [line for line in printed.splitlines() if line.startswith("FAILED:")]
            assert len(said) == 1 and "revision 0005" in said[0] and "'docs'" in said[0], \
                printed
            with pytest.raises(InstallError, match="revision 0005"):
                schema.downgrade(empty_db.owner_dsn, "base")
            assert schema.current_revision(empty_db.owner_dsn) == schema.head_revision()
        else:
            # (b's corpus dropped: its emptied partition, left for the next install, goes with
            # revision 0036's downgrade)
            dsn = psycopg.conninfo.make_conninfo(empty_db.app_dsn, user=roles[1], password="pw")
            with pyembed.connect(dsn) as b:
                b.drop_corpus("docs-b")
            schema.downgrade(empty_db.owner_dsn, "base")
            assert schema.current_revision(empty_db.owner_dsn) is None
    finally:
        with psycopg.connect(empty_db.owner_dsn, autocommit=True) as owner:
            for role in roles:
                owner.execute(f'DROP OWNED BY "{role}"')
                owner.execute(f'DROP ROLE "{role}"')
