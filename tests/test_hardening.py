"""The edges of the vector table, tried as a hostile tenant and as a busy database would:
ledgers the application role cannot touch, queued work the corpus would refuse, search input
that would give NaN or wrong scores, a PE004 no session setting switches off, and in-database
calls that never wait for each other."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

import pyembed
from pyembed import tenants
from pyembed.cachekey import cache_key
from pyembed.corpora import ChunkRow, CorpusInfo, corpus_info, write_chunks
from pyembed.db import connect, translate
from pyembed.errors import InvalidInput
from pyembed.vectors import vector_partition
from tests.conftest import Database
from tests.helpers import login_role, run_cli, sql_error, stored_chunks, unit

KEY = "fake/fake-hash@1:384"
SAME_WIDTH = "fake/fake-hash@2:384"
RAW = "fake/fake-raw@1:4"  # not normalised, dot product: stored vectors keep their length


def vec(values: Any) -> str:
    return "[" + ",".join(repr(float(v)) for v in values) + "]"


@pytest.fixture
def docs(owner: psycopg.Connection[Any], app: psycopg.Connection[Any]) -> CorpusInfo:
    owner.execute("SELECT pyembed.register_model('fake', 'fake-hash', '2', 384)")
    app.execute("SELECT pyembed.create_corpus('docs', %s)", (KEY,))
    return corpus_info(app, "docs")


# -- the cache, usage and statistics: ledgers written only through their functions -----------

@pytest.mark.parametrize("table", ["embedding_cache", "cache_stats", "usage", "rerank_cache"])
def test_the_app_role_cannot_read_or_write_a_ledger(app: psycopg.Connection[Any],
                                                    table: str) -> None:
    for statement in (f"SELECT * FROM pyembed.{table}",
                      f"UPDATE pyembed.{table} SET tenant_id = tenant_id",
                      f"DELETE FROM pyembed.{table}",
                      f"INSERT INTO pyembed.{table} DEFAULT VALUES"):
        assert isinstance(sql_error(app, statement), psycopg.errors.InsufficientPrivilege), statement


def test_a_failure_row_is_only_a_queued_job_moved(app: psycopg.Connection[Any],
                                                   docs: CorpusInfo) -> None:
    """Before, the application role inserted and updated pyembed.queue_failed itself: a tenant
    wrote failures of chunks nobody queued, with any attempts and reason. Now pyembed.fail_job
    (and expire_jobs) move a queued job, with the attempts the queue counted, or nothing."""
    app.execute("SELECT pyembed.add_document('docs', 'd1', 'a text about refunds')")
    chunk, digest, attempts = app.execute(
        "SELECT chunk_id, content_hash, attempts FROM pyembed.queue").fetchone()
    for statement in ("INSERT INTO pyembed.queue_failed (corpus_id, chunk_id, model_key, "
                      "content_hash, attempts, reason) VALUES (%s, %s, %s, %s, 1, 'forged')",
                      "UPDATE pyembed.queue_failed SET reason = 'forged' WHERE corpus_id = %s"):
        params = (docs.corpus_id, chunk, KEY, digest)[:statement.count("%s")]
        assert isinstance(sql_error(app, statement, params),
                          psycopg.errors.InsufficientPrivilege), statement
    fail = "SELECT pyembed.fail_job(%s, %s, %s, %s, %s, 'refused')"
    assert app.execute(fail, (docs.corpus_id, chunk, KEY, digest, attempts + 5)).fetchone() \
        == (False,)  # not the job as queued
    assert app.execute(fail, (docs.corpus_id, chunk, KEY, digest, attempts)).fetchone() == (True,)
    assert app.execute("SELECT chunk_id, attempts, reason FROM pyembed.queue_failed").fetchall() \
        == [(chunk, attempts, "refused")]
    assert app.execute("SELECT count(*) FROM pyembed.queue").fetchone() == (0,)
    assert app.execute(fail, (docs.corpus_id, chunk, KEY, digest, attempts)).fetchone() \
        == (False,)  # moved once


def test_a_failure_reason_is_cut_to_its_columns_bound_by_every_function_that_records_one(
        owner: psycopg.Connection[Any], app: psycopg.Connection[Any], docs: CorpusInfo) -> None:
    """One rule, pyembed._failure_reason: retry_jobs and fail_job store a reason cut to the
    bound of queue.last_error and queue_failed.reason (their CHECKs), and name a NULL one.
    Before, retry_jobs cut it and fail_job gave a direct caller the CHECK's error (the worker
    cut it before either)."""
    bounds = {row[0]: int(row[1]) for row in owner.execute(
        "SELECT conname, substring(pg_get_constraintdef(oid) from '<= (\\d+)') "
        "FROM pg_constraint WHERE conname IN ('queue_last_error_bound', "
        "'queue_failed_reason_bound')")}
    assert len(bounds) == 2 and len(set(bounds.values())) == 1, bounds
    bound = bounds["queue_last_error_bound"]
    long = "x" * (bound + 500)
    app.execute("SELECT pyembed.add_document('docs', 'd1', 'a text about refunds')")
    chunk, digest, attempts = app.execute(
        "SELECT chunk_id, content_hash, attempts FROM pyembed.claim_jobs(5, 10, 30)").fetchone()
    job = ([docs.corpus_id], [chunk], [KEY], [digest], [attempts])
    err = sql_error(app, "SELECT pyembed.retry_jobs(NULL, %s, %s, %s, %s, %s, '{0}')", job)
    assert err.sqlstate == "PE005" and "reason is NULL: pyembed.retry_jobs()" in str(err), err
    assert app.execute("SELECT pyembed.retry_jobs(%s, %s, %s, %s, %s, %s, '{0}')",
                       (long, *job)).fetchone() == (1,)
    assert app.execute("SELECT last_error FROM pyembed.queue").fetchone() == (long[:bound],)
    fail = "SELECT pyembed.fail_job(%s, %s, %s, %s, %s, %s)"
    err = sql_error(app, fail, (docs.corpus_id, chunk, KEY, digest, attempts, None))
    assert err.sqlstate == "PE005" and "reason is NULL: pyembed.fail_job()" in str(err), err
    assert app.execute(fail, (docs.corpus_id, chunk, KEY, digest, attempts, long)).fetchone() \
        == (True,)
    assert app.execute("SELECT reason FROM pyembed.queue_failed").fetchone() == (long[:bound],)


def test_a_job_is_only_a_chunk_write_queued(app: psycopg.Connection[Any],
                                            docs: CorpusInfo) -> None:
    """Before, the application role inserted queue rows itself (any text hash, attempts, last
    error: a failure expire_jobs then recorded as the queue's) and updated a job's text hash and
    age. Now a job is made by its chunk's write (pyembed._enqueue_chunks, as its owner), and
    the worker changes only what a claim, retry or release does, through pyembed.claim_jobs,
    retry_jobs and release_jobs: it set its jobs' attempts (which decide when a job expires)
    and last error (the failure expire_jobs records) with UPDATE before."""
    app.execute("SELECT pyembed.add_document('docs', 'd1', 'a text about refunds')")
    chunk, digest = app.execute("SELECT chunk_id, content_hash FROM pyembed.queue").fetchone()
    for statement in ("UPDATE pyembed.queue SET content_hash = '\\x00'",
                      "UPDATE pyembed.queue SET enqueued_at = now() - interval '1 year'",
                      "UPDATE pyembed.queue SET attempts = 0",
                      "UPDATE pyembed.queue SET not_before = now()",
                      "UPDATE pyembed.queue SET last_error = 'forged'"):
        assert isinstance(sql_error(app, statement), psycopg.errors.InsufficientPrivilege), \
            statement
    claimed = app.execute("SELECT chunk_id, content_hash, attempts FROM pyembed.claim_jobs("
                          "5, 10, 30)").fetchall()
    assert claimed == [(chunk, digest, 1)]
    job = ([docs.corpus_id], [chunk], [KEY])
    # Only the job as this claim left it (attempts 1): not a claim it never made.
    assert app.execute("SELECT pyembed.release_jobs(%s, %s, %s, '{2}')", job).fetchone() == (0,)
    assert app.execute("SELECT pyembed.retry_jobs('try again', %s, %s, %s, %s, '{0}', '{0}')",
                       (*job, [digest])).fetchone() == (0,)
    assert app.execute("SELECT pyembed.retry_jobs('try again', %s, %s, %s, %s, '{1}', '{0}')",
                       (*job, [digest])).fetchone() == (1,)
    assert app.execute("SELECT attempts, last_error FROM pyembed.queue").fetchall() \
        == [(1, "try again")]
    err = sql_error(app, "SELECT * FROM pyembed.claim_jobs(5, 0, 30)")
    assert err.sqlstate == "PE005" and "batch_size must be 1..10000, got 0" in str(err), err
    assert isinstance(sql_error(app, "DELETE FROM pyembed.queue"),  # a vector's write dequeues
                      psycopg.errors.InsufficientPrivilege)
    err = sql_error(app, "INSERT INTO pyembed.queue (corpus_id, chunk_id, model_key, "
                         "content_hash, attempts, last_error) VALUES (%s, %s, %s, %s, 99, "
                         "'forged')", (docs.corpus_id, chunk, KEY, digest))
    assert isinstance(err, psycopg.errors.InsufficientPrivilege), err


def test_cache_vectors_cannot_rank_a_corpus(app: psycopg.Connection[Any], docs: Any) -> None:
    """The attack the table grant allowed: join cached document vectors to chunks by key."""
    app.execute("SELECT pyembed.add_document('docs', 'd1', 'a text about refunds')")
    app.execute("SELECT pyembed.embed('a text about refunds', %s)", (KEY,))  # cached now
    err = sql_error(app, "SELECT ch.document_id, e.embedding <=> %s::vector FROM pyembed.chunks ch "
                     "JOIN pyembed.embedding_cache e ON e.cache_key = sha256("
                     "convert_to(ch.content, 'UTF8') || '\\x00'::bytea || convert_to(%s, 'UTF8')"
                     " || '\\x00'::bytea || 'document'::bytea)",
                (vec(unit(384, 1)), KEY))
    assert isinstance(err, psycopg.errors.InsufficientPrivilege)


def test_cache_put_checks_what_it_stores(app: psycopg.Connection[Any], docs: Any) -> None:
    key = cache_key("planted", KEY, "document")
    put = "SELECT pyembed.cache_put(ARRAY[%s], %s, 'document', ARRAY[%s::vector])"
    assert sql_error(app, put, (key, KEY, vec(unit(8, 1)))).sqlstate == "PE003"  # dimensions
    assert sql_error(app, put, (key, KEY, vec(unit(384, 1) * 3))).sqlstate == "PE003"  # not unit
    assert sql_error(app, put, (b"short", KEY, vec(unit(384, 1)))).sqlstate == "PE005"
    assert sql_error(app, put, (key, "nobody/none@1:384", vec(unit(384, 1)))).sqlstate == "PE006"
    assert app.execute(put, (key, KEY, vec(unit(384, 1)))).fetchone() == (1,)


def test_an_expired_entry_is_renewed_through_sql(app: psycopg.Connection[Any],
                                                 owner: psycopg.Connection[Any],
                                                 docs: Any) -> None:
    app.execute("SELECT pyembed.embed('renew me', %s, 'query')", (KEY,))
    owner.execute("UPDATE pyembed.embedding_cache SET expires_at = now() - interval '1 minute'")
    app.execute("SELECT pyembed.embed('renew me', %s, 'query')", (KEY,))  # a miss: renewed
    before = requests(owner)
    for _ in range(3):
        app.execute("SELECT pyembed.embed('renew me', %s, 'query')", (KEY,))
    assert requests(owner) == before, "an expired entry was never renewed: every call paid"


def requests(owner: psycopg.Connection[Any]) -> int:
    row = owner.execute("SELECT coalesce(sum(requests), 0)::int FROM pyembed.usage").fetchone()
    assert row is not None
    return int(row[0])


def test_usage_cannot_be_falsified_through_its_function(app: psycopg.Connection[Any],
                                                        owner: psycopg.Connection[Any],
                                                        docs: CorpusInfo) -> None:
    reserve = "SELECT pyembed.reserve_usage(%s, %s, %s, %s)"
    for counts in ((-100, 0), (0, -10**9)):  # the table's rule, one InvalidInput in Python
        err = sql_error(app, reserve, (KEY, docs.corpus_id, *counts))
        assert "usage_counts_not_negative" in str(err), err
        assert isinstance(translate(err), InvalidInput)
    assert isinstance(translate(sql_error(app, reserve, (KEY, docs.corpus_id, None, 1))),
                      InvalidInput)  # NOT NULL
    assert sql_error(app, reserve, (KEY, docs.corpus_id + 1000, 1, 1)).sqlstate == "PE002"
    assert requests(owner) == 0
    for hits, misses in ((-5, 0), (0, -5), (-5, 5)):
        err = sql_error(app, "SELECT pyembed.cache_count(ARRAY[%s], ARRAY[%s::bigint], "
                             "ARRAY[%s::bigint])", (KEY, hits, misses))
        assert "cache_stats_counts_not_negative" in str(err), err


@pytest.mark.parametrize("price", ["-1", "NaN", "Infinity"])
def test_a_model_registered_by_a_tenant_cannot_carry_a_price_that_falsifies_costs(
        app: psycopg.Connection[Any], owner: psycopg.Connection[Any], price: str) -> None:
    """Usage costs are tokens times the model's price: a model the application role registers
    with a negative, NaN or infinite price made its calls' costs negative or NaN in the usage
    ledger (and `pyembed usage --json` wrote NaN, which is not JSON)."""
    err = sql_error(owner, "SELECT pyembed.register_model('fake', 'fake-hash', 'priced', 384, "
                         "price_per_mtok => %s::numeric)", (price,))
    assert isinstance(err, psycopg.errors.CheckViolation), err
    for bad in ("-1", "NaN", "Infinity"):  # nor as the owner, directly
        assert isinstance(sql_error(owner, "UPDATE pyembed.models SET price_per_mtok = %s::numeric",
                                    (bad,)), psycopg.errors.CheckViolation)


# -- the queue ------------------------------------------------------------------------------

def test_the_queue_refuses_a_key_the_corpus_would(app: psycopg.Connection[Any],
                                                  owner: psycopg.Connection[Any],
                                                  docs: CorpusInfo) -> None:
    """The application role makes no job itself (test_a_job_is_only_a_chunk_write_queued); the
    key check binds every writer, the owner's functions included."""
    (chunk,) = stored_chunks(app, docs, 1)
    insert = ("INSERT INTO pyembed.queue (corpus_id, chunk_id, model_key, content_hash) "
              "VALUES (%s, %s, %s, '\\x00') ON CONFLICT DO NOTHING")
    err = sql_error(owner, insert, (docs.corpus_id, chunk, SAME_WIDTH))
    assert err.sqlstate == "PE001" and SAME_WIDTH in str(err) and KEY in str(err)
    err = sql_error(owner, "UPDATE pyembed.queue SET model_key = %s", (SAME_WIDTH,))
    assert err.sqlstate == "PE001"
    assert app.execute("SELECT model_key FROM pyembed.queue").fetchall() == [(KEY,)]


# -- what the database derives: numbers, keys and hashes other tables hang on -----------------

# Rows that disagree with what they are derived from (each count must be 0): a chunk's hash and
# its text, a vector and its chunk (exists; carries its document's number), a chunk's and a
# document's postings and their rows. Read as the owner.
DERIVED = {
    "chunk hash": "SELECT count(*) FROM pyembed.chunks "
                  "WHERE content_hash <> sha256(convert_to(content, 'UTF8'))",
    "vector without chunk": "SELECT count(*) FROM pyembed.vectors v WHERE NOT EXISTS (SELECT "
                            "FROM pyembed.chunks ch WHERE ch.corpus_id = v.corpus_id "
                            "AND ch.chunk_id = v.chunk_id)",
    "vector doc_no": "SELECT count(*) FROM pyembed.vectors v JOIN pyembed.chunks ch USING "
                     "(corpus_id, chunk_id) JOIN pyembed.documents d USING (corpus_id, "
                     "document_id) WHERE v.doc_no IS DISTINCT FROM d.doc_no",
    "posting without chunk": "SELECT count(*) FROM pyembed.postings p WHERE NOT EXISTS (SELECT "
                             "FROM pyembed.chunks ch WHERE ch.corpus_id = p.corpus_id "
                             "AND ch.chunk_id = p.chunk_id)",
    "document posting without document": "SELECT count(*) FROM pyembed.document_postings p "
                                         "WHERE NOT EXISTS (SELECT FROM pyembed.documents d "
                                         "WHERE d.corpus_id = p.corpus_id AND d.doc_no = p.doc_no)",
    "document number": "SELECT count(*) FROM pyembed.documents WHERE doc_no < 1",
    "chunk number": "SELECT count(*) FROM pyembed.chunks WHERE chunk_id < 1",
}


def disagreements(owner: psycopg.Connection[Any]) -> dict[str, int]:
    found = {name: owner.execute(query).fetchone() for name, query in DERIVED.items()}
    return {name: row[0] for name, row in found.items() if row and row[0]}


@pytest.mark.parametrize("statement", [
    "UPDATE pyembed.documents SET doc_no = DEFAULT",
    "INSERT INTO pyembed.documents (corpus_id, document_id, content_hash, doc_no) "
    "OVERRIDING SYSTEM VALUE VALUES (%(corpus)s, 'forged', '\\x00', -7)",
    "UPDATE pyembed.chunks SET chunk_id = DEFAULT",
    "INSERT INTO pyembed.chunks (corpus_id, chunk_id, document_id, chunk_index, content) "
    "OVERRIDING SYSTEM VALUE VALUES (%(corpus)s, -7, 'd0', 1, 'a forged chunk')",
    "UPDATE pyembed.chunks SET content_hash = '\\x00'",
    "UPDATE pyembed.chunks SET corpus_id = %(other)s",
])
def test_the_app_role_cannot_rewrite_what_the_database_derives(
        app: psycopg.Connection[Any], owner: psycopg.Connection[Any], docs: CorpusInfo,
        statement: str) -> None:
    """Document and chunk numbers (identities, positive: the keyword index's blocks, the
    vectors' doc_no, postings and the queue hang on them), a chunk's corpus and its text's hash
    are the database's: the application role writes documents and chunks, never those (refused,
    or the hash computed again)."""
    write_chunks(app, docs, [ChunkRow(f"d{i}", 0, f"refund policy {i}", unit(384, i), {})
                             for i in range(3)], KEY)
    app.execute("SELECT pyembed.create_corpus('other', %s)", (KEY,))
    other = corpus_info(app, "other")
    app.execute("INSERT INTO pyembed.documents (corpus_id, document_id, content_hash) "
                "SELECT %s, 'd' || i, '\\x00' FROM generate_series(0, 2) i", (other.corpus_id,))
    assert disagreements(owner) == {}
    try:
        app.execute(statement, {"corpus": docs.corpus_id, "other": other.corpus_id})
    except psycopg.errors.InsufficientPrivilege:
        pass
    assert disagreements(owner) == {}


SERVER_OWNED = {
    # Columns of the tables the application role writes whose values are the server's: set by a
    # trigger whatever the writer gives, or not granted (test_privileges' APP_COLUMN_WRITES
    # names each "server's").
    "documents.updated_at": "not granted; pyembed._document_stamped sets it",
    "chunks.content_hash": "pyembed._chunk_hash computes it from the text",
    "vectors.created_at": "pyembed._vector_document sets it (no UPDATE of vectors at all)",
    "vectors.doc_no": "pyembed._vector_document sets it from the chunk's document",
}


def test_a_column_the_server_owns_keeps_the_servers_value(
        app: psycopg.Connection[Any], owner: psycopg.Connection[Any], docs: CorpusInfo) -> None:
    """Before, the application role could UPDATE a vector's created_at (and content_hash) and
    write a document's updated_at: 'infinity' kept a vector in its tenant's throughput figures
    for ever, and a stale vector could be marked as made from its chunk's new text. It could
    also DELETE queued jobs, dropping work and leaving a chunk without a vector. Now each such
    write is refused or its value is the server's, through every path that writes the row (the
    partition a COPY writes, an update; the parent takes no INSERT)."""
    for i in range(3):
        app.execute("SELECT pyembed.add_document('docs', %s, %s)", (f"d{i}", f"refund text {i}"))
    chunks = [r[0] for r in app.execute("SELECT chunk_id FROM pyembed.chunks "
                                        "ORDER BY chunk_id").fetchall()]
    (partition,) = app.execute("SELECT pyembed.vector_table('docs')").fetchone()
    forged = sql.SQL("INSERT INTO {} (corpus_id, chunk_id, model_key, embedding, created_at, "
                     "doc_no) VALUES (%(corpus)s, %(chunk)s, %(key)s, %(vector)s, 'infinity', 999)")
    app.execute(forged.format(sql.SQL(partition)), {
        "corpus": docs.corpus_id, "chunk": chunks[1], "key": KEY, "vector": vec(unit(384, 0))})
    refused = [forged.format(sql.SQL("pyembed.vectors")),"UPDATE pyembed.vectors SET created_at = 'infinity'",
               "UPDATE pyembed.vectors SET content_hash = '\\x00'",
               "UPDATE pyembed.vectors SET embedding = embedding",
               "UPDATE pyembed.documents SET updated_at = 'infinity'",
               "INSERT INTO pyembed.documents (corpus_id, document_id, content_hash, updated_at) "
               "VALUES (%(corpus)s, 'forged', '\\x00', 'infinity')",
               "DELETE FROM pyembed.queue"]
    for statement in refused:
        err = sql_error(app, statement, {"corpus": docs.corpus_id, "chunk": chunks[0], "key": KEY,
                                         "vector": vec(unit(384, 0))}
                        if "%(" in str(statement) else ())
        assert isinstance(err, psycopg.errors.InsufficientPrivilege), (statement, err)
    assert owner.execute("SELECT count(*) FROM pyembed.vectors WHERE created_at > now() "
                         "OR created_at < now() - interval '1 hour'").fetchone() == (0,)
    assert disagreements(owner) == {}
    assert app.execute("SELECT count(*) FROM pyembed.queue").fetchone() == (3,)  # none dropped
    # Even the owner's write gives the server's time; a row rewritten unchanged keeps its own.
    owner.execute("UPDATE pyembed.documents SET updated_at = '2001-01-01'")
    before = owner.execute("SELECT document_id, updated_at FROM pyembed.documents "
                           "ORDER BY 1").fetchall()
    assert all(t.year > 2001 for _, t in before), before
    owner.execute("UPDATE pyembed.documents SET title = 'new' WHERE document_id = 'd0'")
    after = dict(owner.execute("SELECT document_id, updated_at FROM pyembed.documents").fetchall())
    assert after["d0"] > dict(before)["d0"] and after["d1"] == dict(before)["d1"]


def test_a_tenant_cannot_take_the_query_logs_next_numbers(
        db: Database, app: psycopg.Connection[Any], owner: psycopg.Connection[Any],
        docs: CorpusInfo) -> None:
    """The query log's numbers are one sequence for every tenant: a tenant that could write
    them ahead of it made every later search's record (anyone's) fail on the primary key."""
    write_chunks(app, docs, [ChunkRow("d0", 0, "refund policy", unit(384, 0), {})], KEY)
    try:
        app.execute("INSERT INTO pyembed.query_log (query_log_id, corpus_id, model_key, kind, k) "
                    "OVERRIDING SYSTEM VALUE SELECT i, %s, %s, 'vector', 1 "
                    "FROM generate_series(1, 1000) i", (docs.corpus_id, KEY))
    except psycopg.errors.InsufficientPrivilege:
        pass
    with pyembed.connect(db.app_dsn) as client:
        assert [h.document_id for h in client.corpus("docs").search("refund policy", k=1)] == ["d0"]
    assert owner.execute("SELECT count(*) FROM pyembed.query_log").fetchone() == (1,)


# -- search input ----------------------------------------------------------------------------

@pytest.fixture
def searchable(app: psycopg.Connection[Any], docs: CorpusInfo) -> np.ndarray:
    vectors = np.stack([unit(384, i) for i in range(20)])
    write_chunks(app, docs, [ChunkRow(f"d{i}", 0, f"text {i}", vectors[i], {"n": i})
                                   for i in range(20)], KEY)
    return vectors


def scores(app: psycopg.Connection[Any], query: np.ndarray, **kw: Any) -> list[tuple[str, float]]:
    return [(r[0], r[1]) for r in app.execute(
        "SELECT document_id, score FROM pyembed.search('docs', %s::vector, %s, 5)",
        (vec(query), KEY)).fetchall()]


def test_a_null_query_vector_is_refused(app: psycopg.Connection[Any], searchable: Any) -> None:
    err = sql_error(app, "SELECT * FROM pyembed.search('docs', NULL::vector, %s, 5)", (KEY,))
    assert err.sqlstate == "PE005"


@pytest.mark.parametrize("scale", [3e38 / 4, 1e-30, 1e-44])
def test_extreme_query_components_give_the_scores_of_the_unit_query(
        app: psycopg.Connection[Any], searchable: np.ndarray, scale: float) -> None:
    q = unit(384, 3)
    direction = np.sign(q).astype(np.float32)  # every component at the same extreme magnitude
    want = scores(app, direction / np.linalg.norm(direction))
    got = scores(app, direction * np.float32(scale))
    assert all(np.isfinite(s) for _, s in got), got
    assert [d for d, _ in got] == [d for d, _ in want]
    assert np.allclose([s for _, s in got], [s for _, s in want], atol=1e-5), (got, want)


def test_a_model_that_keeps_lengths_refuses_vectors_whose_scores_overflow_or_vanish(
        owner: psycopg.Connection[Any], app: psycopg.Connection[Any]) -> None:
    owner.execute("SELECT pyembed.register_model('fake', 'fake-raw', '1', 4, 'dot', false)")
    app.execute("SELECT pyembed.create_corpus('raw', %s)", (RAW,))
    raw = corpus_info(app, "raw")
    (chunk,) = stored_chunks(app, raw, 1)
    insert = sql.SQL("INSERT INTO {} (corpus_id, chunk_id, model_key, embedding) "
                     "VALUES (%s, %s, %s, %s::vector)").format(vector_partition(raw.corpus_id))
    for bad in ([3e38, 3e38, 1, 1], [1e-45, 0, 0, 0], [1e-30, 1e-30, 0, 0]):
        err = sql_error(app, insert, (raw.corpus_id, chunk, RAW, vec(bad)))
        assert err.sqlstate == "PE003", bad
    app.execute(insert, (raw.corpus_id, chunk, RAW, vec([3.0, 4.0, 0, 0])))
    search = "SELECT score FROM pyembed.search('raw', %s::vector, %s, 1)"
    assert app.execute(search, (vec([1, 0, 0, 0]), RAW)).fetchone() == (3.0,)
    assert sql_error(app, search, (vec([3e38, 3e38, 0, 0]), RAW)).sqlstate == "PE003"


@pytest.mark.parametrize("query", [
    "SELECT * FROM pyembed.search('docs', %(v)s::vector, %(k)s, 5, %(f)s::jsonb)",
    "SELECT * FROM pyembed.search_keyword('docs', 'text', 5, %(f)s::jsonb)",
    "SELECT * FROM pyembed.search_hybrid('docs', 'text', %(v)s::vector, %(k)s, 5, %(f)s::jsonb)",
    "SELECT * FROM pyembed.search_text('docs', 'text', 5, %(f)s::jsonb, 'hybrid')",
])
@pytest.mark.parametrize("bad_filter", ['[{"n": 1}]', '"n"', "1", "null"])
def test_a_filter_that_is_not_a_json_object_is_refused(
        app: psycopg.Connection[Any], searchable: Any, query: str, bad_filter: str) -> None:
    err = sql_error(app, query, {"v": vec(unit(384, 1)), "k": KEY, "f": bad_filter})
    assert err.sqlstate == "PE005", err


def test_json_nested_too_deep_is_invalid_input_at_every_entry(
        db: Database, app: psycopg.Connection[Any], searchable: Any, tmp_path: Any) -> None:
    """Metadata or a filter nested a few thousand levels deep raised RecursionError: from
    Python, as a traceback from the CLI (ingest stopped at the line), and as an internal error
    from SQL's add_document and search_text."""
    from pyembed.ingest import FileProblem, read_documents
    from pyembed.text import MAX_JSON_DEPTH

    def nested(levels: int) -> dict[str, Any]:
        value: dict[str, Any] = {}
        for _ in range(levels):
            value = {"a": value}
        return value

    deep, text = nested(3000), '{"a": ' * 3000 + "1" + "}" * 3000
    for statement in ("SELECT pyembed.add_document('docs', 'deep', 'text', %(j)s::jsonb)",
                      "SELECT * FROM pyembed.search_text('docs', 'text', 3, %(j)s::jsonb)",
                      "SELECT * FROM pyembed.search_text('docs', 'text', 3, %(j)s::jsonb, "
                      "'keyword')"):
        err = sql_error(app, statement, {"j": text})
        assert err.sqlstate == "PE005" and "levels deep" in str(err), (statement, err)
    with pyembed.connect(db.app_dsn) as client:
        kb = client.corpus("docs")
        for call in (lambda: kb.add([("deep", "text", deep)]),
                     lambda: kb.search("text", filter=deep),
                     lambda: kb.search("text", filter=text, mode="keyword")):
            with pytest.raises(InvalidInput, match="levels deep"):
                call()
        kb.add([("deep", "text", nested(MAX_JSON_DEPTH - 1))])  # as deep as may be
    path = tmp_path / "deep.jsonl"
    path.write_text('{"id": "d", "text": "t", "metadata": ' + text + "}\n")
    problems: list[FileProblem] = []
    assert list(read_documents(path, problems=problems)) == []
    assert ["levels deep" in p.message for p in problems] == [True]


def test_a_whole_number_past_pythons_digits_is_invalid_input_at_every_entry(
        db: Database, app: psycopg.Connection[Any], searchable: Any, tmp_path: Any) -> None:
    """Python converts an int of more than sys.get_int_max_str_digits() digits neither way:
    metadata or a document id holding one was a raw ValueError from Python, SQL's add_document
    an internal error (XX000), the CLI's --filter a traceback. jsonb stores such a number."""
    from pyembed.ingest import FileProblem, read_documents

    digits = "1" * 5000
    err = sql_error(app, "SELECT pyembed.add_document('docs', 'big', 'text', %(j)s::jsonb)",
                    {"j": '{"n": ' + digits + "}"})
    assert err.sqlstate == "PE005" and "5000 digits" in str(err), err
    with pyembed.connect(db.app_dsn) as client:
        kb = client.corpus("docs")
        for call in (lambda: kb.add([("big", "text", {"n": 10**5000})]),
                     lambda: kb.add([(10**5000, "text")]),
                     lambda: kb.search("text", filter='{"n": ' + digits + "}",
                                       mode="keyword")):
            with pytest.raises(InvalidInput, match="digits"):
                call()
        kb.add([("big", "text", {"n": 10**4000})])  # as long as may be
    result = run_cli("search", "docs", "text", "--filter", '{"n": ' + digits + "}",
                     env={"PYEMBED_DSN": db.app_dsn})
    assert result.returncode == 1 and result.stderr == (
        "error: --filter holds a whole number of 5000 digits, more than the 4300 Python "
        "converts\n"), result
    path = tmp_path / "big.jsonl"
    path.write_text('{"id": "d", "text": "t", "metadata": {"n": ' + digits + "}}\n")
    problems: list[FileProblem] = []
    assert list(read_documents(path, problems=problems)) == []
    assert ["5000 digits" in p.message for p in problems] == [True]


@pytest.mark.parametrize("metadata", ['[{"n": 1}]', '"n"', "1", "null"])
def test_stored_metadata_that_is_not_a_json_object_is_refused_by_its_table(
        app: psycopg.Connection[Any], docs: CorpusInfo, metadata: str) -> None:
    """The application role writes documents and chunks itself: a search hands their metadata
    back as a hit's mapping, so each table refuses another JSON value, on INSERT and UPDATE."""
    (chunk,) = stored_chunks(app, docs, 1)
    writes = [
        ("INSERT INTO pyembed.documents (corpus_id, document_id, content_hash, metadata) "
         "VALUES (%(c)s, 'other', '\\x00', %(m)s::jsonb)", "documents"),
        ("UPDATE pyembed.documents SET metadata = %(m)s::jsonb WHERE corpus_id = %(c)s",
         "documents"),
        ("UPDATE pyembed.chunks SET metadata = %(m)s::jsonb WHERE chunk_id = %(chunk)s",
         "chunks"),
    ]
    for statement, table in writes:
        err = sql_error(app, statement, {"c": docs.corpus_id, "m": metadata, "chunk": chunk})
        assert err.sqlstate == "23514", (statement, err)
        assert err.diag.constraint_name == f"{table}_metadata_object"
        mapped = translate(err)
        assert isinstance(mapped, InvalidInput), mapped
        assert "metadata is a JSON object" in str(mapped)
    app.execute("UPDATE pyembed.chunks SET metadata = '{\"n\": [1]}' WHERE chunk_id = %s",
                (chunk,))


@pytest.mark.parametrize("bad_filter", [[{"n": 1}], "n", 1, {"n": float("nan")}, {"n": object()},
                                        '{"n": NaN}'])
def test_a_python_filter_that_is_not_a_json_object_is_refused(
        db: Database, searchable: Any, bad_filter: Any) -> None:
    """Every search mode, by text and by vector: InvalidInput, never a TypeError or a cast error
    (a list or a number reaches the database, which refuses it with PE005)."""
    with pyembed.connect(db.app_dsn) as client:
        kb = client.corpus("docs")
        for mode in ("vector", "keyword", "hybrid"):
            with pytest.raises(InvalidInput):
                kb.search("text", 3, filter=bad_filter, mode=mode)
        with pytest.raises(InvalidInput):
            kb.search(unit(384, 1), 3, filter=bad_filter, model_key=KEY)


@pytest.mark.parametrize("bad_k", [2.5, "3", True])
def test_a_k_that_is_not_a_whole_number_is_refused(db: Database, searchable: Any,
                                                   bad_k: Any) -> None:
    """Every Python entry point: InvalidInput, where the driver cast "3" and rounded 2.5."""
    from pyembed import orm

    with pyembed.connect(db.app_dsn) as client:
        kb = client.corpus("docs")
        for mode in ("vector", "keyword", "hybrid"):
            with pytest.raises(InvalidInput, match="whole number"):
                kb.search("text", bad_k, mode=mode)
        with pytest.raises(InvalidInput, match="whole number"):
            kb.search(unit(384, 1), bad_k, model_key=KEY)
        with pytest.raises(InvalidInput, match="whole number"):
            orm.search("docs", unit(384, 1), KEY, bad_k)
        assert len(kb.search("text", np.int64(2), mode="keyword")) <= 2  # numpy ints are whole


@pytest.mark.parametrize("report", ["usage_report", "cache_report", "recall_report"])
@pytest.mark.parametrize("window", [0, -1, None, 2_000_000_000])
def test_a_report_window_out_of_range_is_refused(app: psycopg.Connection[Any], report: str,
                                                 window: int | None) -> None:
    """PE005, where a huge window failed with 'timestamp out of range' and one below 1 quietly
    reported nothing."""
    query = sql.SQL("SELECT * FROM pyembed.{}(%s::integer)").format(sql.Identifier(report))
    err = sql_error(app, query, (window,))
    assert err.sqlstate == "PE005" and "a report covers" in str(err), err
    app.execute(query, (1,)).fetchall()


@pytest.mark.parametrize("ttl", ["NaN", "Infinity", "0", "-5", "1e12"])
def test_a_cache_ttl_is_a_positive_number_of_seconds(app: psycopg.Connection[Any],
                                                     ttl: str) -> None:
    key = bytes(32)
    calls = [("SELECT pyembed.rerank_cache_put(ARRAY[%s::bytea], 'fake/overlap', ARRAY[0.5], "
              "%s::float8)", (key, ttl)),
             ("SELECT pyembed.cache_put(ARRAY[%s::bytea], %s, 'query', ARRAY[%s::vector], "
              "%s::float8)", (key, KEY, vec(unit(384, 1)), ttl))]
    for query, params in calls:
        err = sql_error(app, query, params)
        assert err.sqlstate == "PE005" and "TTL" in str(err), err
        good = (*params[:-1], "60")
        assert app.execute(query, good).fetchone() == (1,)


# -- PE004 -----------------------------------------------------------------------------------

def test_no_session_setting_lets_a_plain_update_change_a_key(owner: psycopg.Connection[Any],
                                                             docs: Any) -> None:
    for flag in ("pyembed.in_migration", "pyembed.migrating"):
        with pytest.raises(psycopg.Error) as err, owner.transaction():
            owner.execute("SELECT set_config(%s, 'on', true)", (flag,))
            owner.execute("UPDATE pyembed.corpora SET model_key = %s", (SAME_WIDTH,))
        assert err.value.sqlstate == "PE004"
    with pytest.raises(psycopg.Error) as err, owner.transaction():  # nor a DO block
        owner.execute(f"DO $$ BEGIN UPDATE pyembed.corpora SET target_model_key = "
                      f"'{SAME_WIDTH}'; END $$")
    assert err.value.sqlstate == "PE004"
    owner.execute("SELECT pyembed.migration_start('docs', %s)", (SAME_WIDTH,))  # the way
    assert owner.execute("SELECT target_model_key FROM pyembed.corpora").fetchone() == (
        SAME_WIDTH,)


# -- in-database calls never wait for each other ---------------------------------------------

@pytest.fixture
def tenant_dsn(db: Database, owner: psycopg.Connection[Any]) -> Iterator[str]:
    tenants.create_tenant(owner, "busy", requests_per_minute=1000)
    with login_role(owner, db.app_dsn, "busy", sql.SQL("IN ROLE pyembed_app")) as dsn:
        tenants.add_member(owner, "busy", conninfo_to_dict(dsn)["user"])
        yield dsn
        owner.execute("DELETE FROM pyembed.tenant_members")


@pytest.mark.parametrize("who", ["app", "tenant"])
def test_an_open_embed_holds_nothing_another_call_needs(db: Database, tenant_dsn: str,
                                                        who: str) -> None:
    """Session A embeds (paying the provider, storing, counting) and keeps its transaction
    open, as a hung provider call would; B's calls of every kind must not wait for it."""
    dsn = db.app_dsn if who == "app" else tenant_dsn
    with connect(dsn) as a, connect(dsn, autocommit=True) as b:
        b.execute("SET lock_timeout = '2s'")
        b.execute("SELECT pyembed.embed('cached before', %s)", (KEY,))
        a.execute("SELECT pyembed.embed('first text', %s)", (KEY,))
        a.execute("SELECT pyembed.embed_batch(ARRAY['t1', 't2', 'cached before'], %s)", (KEY,))
        for text in ("second text", "cached before", "first text"):
            b.execute("SELECT pyembed.embed(%s, %s)", (text, KEY))
        b.execute("SELECT pyembed.embed_batch(ARRAY['t1', 't3'], %s)", (KEY,))
        a.rollback()


def test_concurrent_embeds_in_transactions_never_deadlock(db: Database) -> None:
    """Each session alternates misses and hits inside one transaction, in opposite orders."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def session(n: int) -> None:
        try:
            with connect(db.app_dsn) as conn:
                conn.execute("SET lock_timeout = '5s'")
                barrier.wait()
                texts = [f"shared {i}" for i in range(30)]
                for text in (texts if n % 2 else reversed(texts)):
                    conn.execute("SELECT pyembed.embed(%s, %s)", (text, KEY))
                    conn.execute("SELECT pyembed.embed(%s, %s)", (f"own {n} {text}", KEY))
                conn.commit()
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=session, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


# -- every text the application writes has a bound, the table's own ----------------------------

UNBOUNDED = """
SELECT c.relname || '.' || a.attname
  FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
   AND NOT a.attisdropped
  JOIN pg_type t ON t.oid = a.atttypid
 WHERE c.relnamespace = 'pyembed'::regnamespace AND c.relkind IN ('r', 'p')
   AND NOT c.relispartition
   -- a type of any length: text, jsonb, bytea, a varchar without a length, arrays of them
   AND (a.atttypid IN ('text'::regtype, 'jsonb'::regtype, 'json'::regtype, 'bytea'::regtype)
        OR (a.atttypid IN ('varchar'::regtype, 'bpchar'::regtype) AND a.atttypmod < 0)
        OR t.typelem IN ('text'::regtype, 'jsonb'::regtype, 'bytea'::regtype))
   -- bounded by a CHECK of its own: a length, one of some values, a pattern of bounded length
   AND NOT EXISTS (
         SELECT FROM pg_constraint k
          WHERE k.conrelid = c.oid AND k.contype = 'c' AND a.attnum = ANY (k.conkey)
            AND pg_get_constraintdef(k.oid) ~ format(
                  '(length|octet_length|pg_column_size)\\(+%1$s\\)+ <?= \\d|'
                  '\\(%1$s = ANY \\(ARRAY\\[|\\(%1$s ~ ''\\^[^'']*\\{\\d+,\\d+\\}\\$''',
                  quote_ident(a.attname)))
   -- or a foreign key's: it equals a bounded value of another table
   AND NOT EXISTS (SELECT FROM pg_constraint k
                    WHERE k.conrelid = c.oid AND k.contype = 'f' AND a.attnum = ANY (k.conkey))
 ORDER BY 1
"""

KEYWORD_INDEX = {
    "document_postings.lexeme", "postings.lexeme", "lexeme_stats.lexeme",
    "posting_blocks.lexeme", "keyword_pending.lexemes", "keyword_pending.postings",
}
"""Columns no role writes: the keyword index's lexemes and pending postings, which pyembed's own
triggers take from a chunk's text (bounded) through to_tsvector (a lexeme is at most 2,046
bytes)."""


def test_every_text_column_has_a_bound_of_its_table(owner: psycopg.Connection[Any]) -> None:
    """Walks the catalogue, a column added later included: a text, JSON or binary column any
    role could fill with megabytes has a CHECK of its own (or is a foreign key to one)."""
    unbounded = {r[0] for r in owner.execute(UNBOUNDED).fetchall()}
    assert unbounded - KEYWORD_INDEX == set()


NOT_OBJECTS = """
SELECT c.relname || '.' || a.attname
  FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
   AND NOT a.attisdropped
 WHERE c.relnamespace = 'pyembed'::regnamespace AND c.relkind IN ('r', 'p')
   AND NOT c.relispartition AND a.atttypid IN ('jsonb'::regtype, 'json'::regtype)
   AND NOT EXISTS (
         SELECT FROM pg_constraint k
          WHERE k.conrelid = c.oid AND k.contype = 'c' AND k.conkey = ARRAY[a.attnum]
            AND pg_get_constraintdef(k.oid) = format(
                  'CHECK ((jsonb_typeof(%s) = ''object''::text))', quote_ident(a.attname)))
 ORDER BY 1
"""


def test_every_json_column_is_an_object_by_a_check_of_its_table(
        owner: psycopg.Connection[Any]) -> None:
    """Walks the catalogue, a column added later included: a JSON column (bounded in size by
    the walk above) holds an object, by its table's CHECK. Before, migrations.validation and
    migration_events.detail took an array, a string or a number (revision 0031)."""
    assert [r[0] for r in owner.execute(NOT_OBJECTS).fetchall()] == []


def test_a_text_over_its_bound_is_invalid_input(owner: psycopg.Connection[Any],
                                                app: psycopg.Connection[Any]) -> None:
    """The 10,000-character provider name and the 2 MB description register_model took: refused
    by the table, one line in Python (InvalidInput) naming the column."""
    from pyembed.models import ModelSpec, register

    # the key made of it is checked first (the table checks in the order of their names)
    with pytest.raises(InvalidInput, match=r"models\.(provider|model_key) is longer"):
        register(owner, ModelSpec("p" * 10_000, "m", "1", 4))
    with pytest.raises(InvalidInput, match=r"models\.description"):
        register(owner, ModelSpec("p", "m", "1", 4, description="d" * 2_000_000))
    err = sql_error(owner, "SELECT pyembed.register_model('p', 'm', '1', 4, description => %s)",
                    ("d" * 2_000_000,))
    assert isinstance(err, psycopg.errors.CheckViolation), err
    assert owner.execute("SELECT count(*) FROM pyembed.models WHERE provider LIKE 'p%%'"
                         ).fetchone() == (0,)


# -- every CHECK of the schema is one clear error ----------------------------------------------
def test_every_check_of_the_schema_says_what_it_requires(owner: psycopg.Connection[Any]) -> None:
    """Walks every CHECK constraint of the schema, a new one included: its name follows the
    convention db.translate reads (<table>_<column><suffix>, the column one of the table's, or a
    row rule of ROW_CHECKS), so breaking it is InvalidInput naming the column or the rule.
    Before, only the *_bound ones were: the rest reached Python as a raw CheckViolation."""
    from pyembed.db import ROW_CHECKS, check_message

    checks = owner.execute(
        "SELECT c.relname, k.conname, array_agg(a.attname) FROM pg_constraint k "
        "JOIN pg_class c ON c.oid = k.conrelid JOIN pg_attribute a ON a.attrelid = c.oid "
        "AND a.attnum > 0 AND NOT a.attisdropped WHERE k.contype = 'c' "
        "AND k.connamespace = 'pyembed'::regnamespace AND NOT c.relispartition "
        "GROUP BY c.relname, k.conname ORDER BY 1, 2").fetchall()
    assert len(checks) > 50
    names = set()
    for table, check, columns in checks:
        names.add(check)
        means = check_message(table, check)
        assert means, f"CHECK {check} of {table}: name it <table>_<column>_check/_bound/" \
                      "_in_range, or give its rule a message in pyembed.db.ROW_CHECKS"
        if check not in ROW_CHECKS:
            assert means.split(" ", 1)[0].split(".", 1)[1] in columns, (check, means)
    assert set(ROW_CHECKS) <= names  # no message for a CHECK that is gone


@pytest.mark.parametrize(("spec", "named"), [
    ({"max_batch": 0}, r"max_batch must be 1\.\.100000, got 0"),
    ({"max_tokens": -1}, r"max_tokens must be 1\.\.10000000, got -1"),
    ({"request_dimensions": 0}, r"request_dimensions must be 1\.\.16000, got 0"),
    ({"price_per_mtok": 10**7}, "a model's price is 0 to 1000000"),
])
def test_a_model_the_registry_refuses_is_invalid_input(owner: psycopg.Connection[Any],
                                                      spec: dict[str, Any], named: str) -> None:
    from pyembed.models import ModelSpec, register

    with pytest.raises(InvalidInput, match=named):
        register(owner, ModelSpec("fake", "m", "1", 4, **spec))
