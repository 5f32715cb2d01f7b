"""Invariants 1-4 at the SQL level: every refused write or search names the keys and stores nothing."""

from __future__ import annotations

from typing import Any

import numpy as np
import psycopg
import pytest
from pgvector import Vector
from psycopg import sql

import pyembed
from pyembed.corpora import ChunkRow, CorpusInfo, create_corpus, drop_corpus, write_chunks
from pyembed.db import connect
from pyembed.dbcall import translated
from pyembed.errors import InvalidInput, InvalidVector, ModelMismatch, UnknownCorpus
from pyembed.search import search
from pyembed.text import sha256
from pyembed.vectors import as_unit_vectors, copy_data, copy_vectors, vector_partition
from tests.conftest import Database
from tests.helpers import (
    chunk_hashes,
    count,
    in_background,
    rows,
    stored_chunks,
    unit,
    waits_for_lock,
)

KEY_A = "fake/fake-hash@1:1024"
KEY_B = "fake/fake-hash@2:1024"  # same width, different model: the "2 AM" mistake


@pytest.fixture
def corpus(app: psycopg.Connection[Any]) -> CorpusInfo:
    return create_corpus(app, "docs", KEY_A)


def _insert_raw(conn: psycopg.Connection[Any], corpus_id: int, key: str, vec: str) -> None:
    conn.execute("INSERT INTO pyembed.documents (corpus_id, document_id, content_hash) "
                 "VALUES (%s, 'raw', '\\x00') ON CONFLICT DO NOTHING", (corpus_id,))
    chunk = conn.execute("INSERT INTO pyembed.chunks (corpus_id, document_id, chunk_index, content) "
                         "VALUES (%s, 'raw', 0, 'raw text') ON CONFLICT (corpus_id, document_id, "
                         "chunk_index) DO UPDATE SET content = 'raw text' RETURNING chunk_id",
                         (corpus_id,)).fetchone()
    assert chunk is not None
    conn.execute(sql.SQL("INSERT INTO {} (corpus_id, chunk_id, model_key, embedding) "
                         "VALUES (%s, %s, %s, %s::vector)").format(vector_partition(corpus_id)),
                 (corpus_id, chunk[0], key, vec))


def test_two_am_same_width_other_model_is_refused_for_write_and_search(
        app: psycopg.Connection[Any], corpus: CorpusInfo) -> None:
    with pytest.raises(ModelMismatch) as err:
        write_chunks(app, corpus, rows(3, 1024), KEY_B)
    assert KEY_A in str(err.value) and KEY_B in str(err.value)
    assert count(app, "chunks") == 0 and count(app, "documents") == 0
    assert app.execute("SELECT count(*) FROM pyembed.vectors").fetchone() == (0,)

    with pytest.raises(ModelMismatch) as err:
        search(app, "docs", unit(1024, 0), KEY_B)
    assert KEY_A in str(err.value) and KEY_B in str(err.value)

    ids = write_chunks(app, corpus, rows(3, 1024), KEY_A)
    assert len(ids) == 3
    hits = search(app, "docs", rows(3, 1024)[1].embedding, KEY_A, k=2)
    assert hits[0].document_id == "doc1" and hits[0].model_key == KEY_A
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_raw_sql_insert_with_other_key_raises_pe001(app: psycopg.Connection[Any],
                                                    corpus: CorpusInfo) -> None:
    vec = str(list(map(float, unit(1024, 1))))
    with pytest.raises(psycopg.Error) as err, app.transaction():
        _insert_raw(app, corpus.corpus_id, KEY_B, vec)
    assert err.value.sqlstate == "PE001"
    assert KEY_A in str(err.value) and KEY_B in str(err.value)
    assert app.execute("SELECT count(*) FROM pyembed.vectors").fetchone() == (0,)


@pytest.mark.parametrize(("vec", "sqlstate", "words"), [
    ("[" + ",".join(["0.5"] * 4) + "]", "PE003", "wrong dimensions"),
    ("[" + ",".join(["0"] * 1024) + "]", "PE003", "zero vector"),
    ("[" + ",".join(["1"] * 1024) + "]", "PE003", "not unit-normalised"),
    # pgvector itself refuses NaN and Inf (data_exception) before any trigger runs.
    ("[" + ",".join(["NaN"] * 1024) + "]", "22000", "NaN not allowed"),
    ("[" + ",".join(["Infinity"] * 1024) + "]", "22000", "infinite value not allowed"),
    ("[" + ",".join(["3e38"] * 1024) + "]", "PE003", "not unit-normalised"),
])
def test_bad_vectors_are_refused_and_nothing_is_stored(
        app: psycopg.Connection[Any], corpus: CorpusInfo, vec: str, sqlstate: str,
        words: str) -> None:
    with pytest.raises(psycopg.Error) as err, app.transaction():
        _insert_raw(app, corpus.corpus_id, KEY_A, vec)
    assert err.value.sqlstate == sqlstate, str(err.value)
    assert words in str(err.value)
    assert app.execute("SELECT count(*) FROM pyembed.vectors").fetchone() == (0,)
    assert count(app, "chunks") == 0


def test_python_api_rejects_bad_vectors_before_the_database(
        app: psycopg.Connection[Any], corpus: CorpusInfo) -> None:
    bad = rows(2, 1024)
    bad[1].embedding = np.full(1024, np.nan, dtype=np.float32)
    with pytest.raises(InvalidVector, match="NaN or Inf"):
        write_chunks(app, corpus, bad, KEY_A)
    zero = rows(1, 1024)
    zero[0].embedding = np.zeros(1024, dtype=np.float32)
    with pytest.raises(InvalidVector, match="zero vector"):
        write_chunks(app, corpus, zero, KEY_A)
    with pytest.raises(InvalidVector, match="wrong dimensions"):
        write_chunks(app, corpus, rows(1, 384), KEY_A, normalized=True)
    with pytest.raises(InvalidInput, match="NUL"):
        write_chunks(app, corpus, [ChunkRow("d", 0, "a\x00b", unit(1024, 3))], KEY_A)
    with pytest.raises(InvalidInput, match="empty"):
        write_chunks(app, corpus, [ChunkRow("d", 0, "  \n", unit(1024, 3))], KEY_A)
    assert count(app, "chunks") == 0


def test_vectors_are_checked_and_scaled_in_float32_unless_its_sums_fail() -> None:
    rng = np.random.default_rng(7)
    raw = rng.standard_normal((50, 384)).astype(np.float32)
    unit_rows = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    # Already unit: returned as they are, not copied.
    assert np.shares_memory(as_unit_vectors(unit_rows, 384), unit_rows)
    # Rows whose float32 sums of squares underflow (1e-25) or overflow (1e30) are summed again
    # in float64, and scaled like any other row; float64 input comes back as float32.
    for rows_ in (raw, np.full((3, 384), 1e-25, np.float32), np.full((3, 384), 1e30, np.float32),
                  raw.astype(np.float64) * 7):
        out = as_unit_vectors(rows_, 384)
        assert out.dtype == np.float32
        norms = np.linalg.norm(out.astype(np.float64), axis=1)
        assert np.abs(norms - 1).max() < 1e-6
    assert as_unit_vectors([[3.0, 4.0]], 2, normalize=False).tolist() == [[3.0, 4.0]]
    for bad, words in ((np.full((2, 384), np.inf, np.float32), "NaN or Inf"),
                       (np.vstack([unit_rows[:2], np.zeros((1, 384))]), "zero vector at row 2")):
        with pytest.raises(InvalidVector, match=words):
            as_unit_vectors(bad, 384)


def test_search_rejects_wrong_dims_zero_unknown_corpus_and_bad_k(
        app: psycopg.Connection[Any], corpus: CorpusInfo) -> None:
    with pytest.raises(InvalidVector, match="wrong dimensions"):
        search(app, "docs", unit(384, 0), KEY_A)
    with pytest.raises(InvalidVector, match="zero query vector"):
        search(app, "docs", np.zeros(1024), KEY_A)
    with pytest.raises(UnknownCorpus, match="unknown corpus 'nope'"):
        search(app, "nope", unit(1024, 0), KEY_A)
    with pytest.raises(InvalidInput, match="k must be"):
        search(app, "docs", unit(1024, 0), KEY_A, k=0)


def test_app_role_cannot_read_vectors_or_change_the_model_key(
        app: psycopg.Connection[Any], owner: psycopg.Connection[Any],
        corpus: CorpusInfo) -> None:
    write_chunks(app, corpus, rows(2, 1024), KEY_A)
    for query in ("SELECT embedding FROM pyembed.vectors",
                  "SELECT * FROM pyembed.vectors",
                  "SELECT embedding <=> embedding FROM pyembed.vectors"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute(query)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        app.execute("UPDATE pyembed.corpora SET model_key = %s", (KEY_B,))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        app.execute("UPDATE pyembed.vectors SET model_key = %s", (KEY_B,))
    # Even the owner cannot change the key outside the migration functions.
    with pytest.raises(psycopg.Error) as err:
        owner.execute("UPDATE pyembed.corpora SET model_key = %s", (KEY_B,))
    assert err.value.sqlstate == "PE004" and KEY_A in str(err.value) and KEY_B in str(err.value)
    with pytest.raises(psycopg.Error) as err:
        owner.execute("UPDATE pyembed.corpora SET target_model_key = %s", (KEY_B,))
    assert err.value.sqlstate == "PE004"
    # ... nor move stored vectors to another key.
    with pytest.raises(psycopg.Error) as err:
        owner.execute("UPDATE pyembed.vectors SET model_key = %s", (KEY_B,))
    assert err.value.sqlstate == "PE001"
    assert owner.execute("SELECT DISTINCT model_key FROM pyembed.vectors").fetchall() == [(KEY_A,)]


def test_registered_model_cannot_change_its_space(owner: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.Error) as err:
        owner.execute("UPDATE pyembed.models SET normalized = false WHERE model_key = %s", (KEY_A,))
    assert err.value.sqlstate == "PE004"


@pytest.mark.parametrize("name", [
    "x'; DROP TABLE pyembed.models; --", 'a"b', "a;b", "a.b", "public.docs", "Docs", "",
    "a" * 64, "-lead", "tab\tname", "nul\x00name",
])
def test_hostile_corpus_names_are_rejected(app: psycopg.Connection[Any], name: str) -> None:
    if "\x00" in name:  # libpq cannot even send it
        with pytest.raises((InvalidInput, psycopg.DataError, ValueError)):
            create_corpus(app, name, KEY_A)
    else:
        with pytest.raises(InvalidInput, match="invalid corpus name"):
            create_corpus(app, name, KEY_A)
    assert count(app, "corpora") == 0
    assert app.execute("SELECT count(*) FROM pyembed.models").fetchone()[0] > 0  # type: ignore[index]


@pytest.mark.parametrize(("tokens", "overlap", "message"), [
    (0, 0, r"chunk_tokens must be 1\.\.100000, got 0"),
    (-5, 0, r"chunk_tokens must be 1\.\.100000, got -5"),
    (100_001, 0, r"chunk_tokens must be 1\.\.100000, got 100001"),
    (100, 100, r"chunk_overlap must be below chunk_tokens \(100\), got 100"),
    (100, 200, r"chunk_overlap must be below chunk_tokens \(100\), got 200"),
    (100, -1, r"chunk_overlap must be 0\.\.99999, got -1"),
])
def test_chunk_settings_are_refused_in_words(app: psycopg.Connection[Any], tokens: int,
                                             overlap: int, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        create_corpus(app, "docs", KEY_A, chunk_tokens=tokens, chunk_overlap=overlap)
    assert count(app, "corpora") == 0


def test_longest_valid_name_and_search_on_it(app: psycopg.Connection[Any]) -> None:
    name = "a" + "_-9" * 20 + "zz"
    info = create_corpus(app, name, KEY_A)
    write_chunks(app, info, rows(2, 1024), KEY_A)
    assert len(search(app, name, unit(1024, 0), KEY_A, k=5)) == 2
    drop_corpus(app, name)
    with pytest.raises(UnknownCorpus):
        search(app, name, unit(1024, 0), KEY_A)


def test_metadata_filter_returns_k_results_with_iterative_scan(
        app: psycopg.Connection[Any]) -> None:
    info = create_corpus(app, "filtered", "fake/fake-hash@1:384")
    data = rows(400, 384)
    write_chunks(app, info, data, info.model_key)
    hits = search(app, "filtered", data[0].embedding, info.model_key, k=10,
                        filter={"parity": "odd"})
    assert len(hits) == 10
    assert all(h.metadata["parity"] == "odd" for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_search_can_use_the_partial_hnsw_index(owner: psycopg.Connection[Any],
                                              app: psycopg.Connection[Any]) -> None:
    """The dynamic query matches the corpus's partial index predicate and expression.

    On a few hundred rows a sort is cheaper, so sorting is disabled here: the index is then
    the only way to order, and a predicate or expression mismatch would fail the test.
    The benchmark (tests/benchmarks/bench_guarded_search.py) shows it chosen at 100k rows.
    """
    info = create_corpus(app, "indexed", "fake/fake-hash@1:384")
    write_chunks(app, info, rows(300, 384), info.model_key)
    owner.execute("ANALYZE pyembed.vectors")
    owner.execute("SET enable_sort = off")
    owner.execute("LOAD 'auto_explain'")
    owner.execute("SET auto_explain.log_min_duration = 0")
    owner.execute("SET auto_explain.log_nested_statements = on")
    owner.execute("SET client_min_messages = log")
    owner.execute("SET auto_explain.log_level = notice")
    notices: list[str] = []
    owner.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
    owner.execute("SELECT * FROM pyembed.search('indexed', %s, %s, 5)",
                  (Vector(unit(384, 1)), info.model_key)).fetchall()
    plans = "\n".join(notices)
    assert f"Index Scan using vectors_hnsw_c{info.corpus_id}_" in plans, plans[-3000:]


# -- bulk loads: binary COPY into the corpus's partition ----------------------------------------

def _copy(app: psycopg.Connection[Any], corpus_id: int, ids: list[int], key: str,
          vectors: np.ndarray) -> None:
    """The vectors of the chunks made by stored_chunks, with the hashes of their texts."""
    hashes = chunk_hashes(len(ids))
    with translated(), app.transaction(), app.cursor() as cur:
        copy_vectors(cur, corpus_id, ids, key, vectors, hashes)


def test_copy_into_the_partition_is_guarded_row_by_row(
        app: psycopg.Connection[Any], corpus: CorpusInfo) -> None:
    ids = stored_chunks(app, corpus, 3)
    good = np.stack([unit(1024, i) for i in range(3)])
    assert app.execute("SELECT pyembed.vector_table('docs')").fetchone() == (
        f"pyembed.vectors_c{corpus.corpus_id}",)
    with pytest.raises(ModelMismatch) as err:
        _copy(app, corpus.corpus_id, ids, KEY_B, good)
    assert KEY_A in str(err.value) and KEY_B in str(err.value) and "corpus docs" in str(err.value)
    for bad, words in ((np.stack([unit(1024, 0), unit(1024, 1), 2 * unit(1024, 2)]),
                        "not unit-normalised"),
                       (np.vstack([good[:2], np.zeros((1, 1024))]), "zero vector"),
                       (np.stack([unit(512, i) for i in range(3)]), "wrong dimensions")):
        with pytest.raises(InvalidVector, match=words):
            _copy(app, corpus.corpus_id, ids, KEY_A, bad.astype(np.float32))
    with pytest.raises(psycopg.errors.ForeignKeyViolation, match="no chunk"):
        _copy(app, corpus.corpus_id, [*ids[:2], ids[2] + 1000], KEY_A, good)
    assert app.execute("SELECT count(*) FROM pyembed.vectors").fetchone() == (0,)
    assert count(app, "queue") == 3

    _copy(app, corpus.corpus_id, ids, KEY_A, good)
    assert app.execute("SELECT count(*) FROM pyembed.vectors").fetchone() == (3,)
    assert count(app, "queue") == 0  # the load did the queued work
    _copy(app, corpus.corpus_id, ids, KEY_A, good[::-1].copy())  # replaces, one per chunk and key
    assert app.execute("SELECT count(*) FROM pyembed.vectors").fetchone() == (3,)
    hits = search(app, "docs", good[2], KEY_A, k=1)
    assert hits[0].chunk_id == ids[0]


def test_a_missing_chunk_among_consecutive_ids_is_named(
        app: psycopg.Connection[Any], corpus: CorpusInfo) -> None:
    ids = stored_chunks(app, corpus, 4)
    app.execute("SELECT pyembed.delete_chunks(%s, '{d2}', '{0}')", (corpus.name,))  # ids[1]
    vectors = np.stack([unit(1024, i) for i in range(3)])
    # Consecutive ids are checked by counting their range: a gap inside it, or past its end.
    for batch, missing in (([ids[0], ids[1], ids[2]], ids[1]),
                           ([ids[2], ids[3], ids[3] + 1], ids[3] + 1)):
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match=f"no chunk {missing} "):
            _copy(app, corpus.corpus_id, batch, KEY_A, vectors)
    assert app.execute("SELECT count(*) FROM pyembed.vectors").fetchone() == (0,)


def test_a_vector_of_another_text_leaves_the_chunk_queued(
        app: psycopg.Connection[Any], corpus: CorpusInfo) -> None:
    ids = stored_chunks(app, corpus, 5)
    vectors = np.stack([unit(1024, i) for i in range(5)])
    # Chunks 4 and 5 each carry the other's text hash: a hash queued in the batch is not enough,
    # it must be its own chunk's.
    stale = [sha256("chunk 1"), sha256("an older text"), None,
             sha256("chunk 5"), sha256("chunk 4")]
    with translated(), app.transaction(), app.cursor() as cur:
        copy_vectors(cur, corpus.corpus_id, ids, KEY_A, vectors, stale)
    assert app.execute("SELECT count(*) FROM pyembed.vectors").fetchone() == (5,)
    queued = [r[0] for r in app.execute(
        "SELECT chunk_id FROM pyembed.queue WHERE model_key = %s ORDER BY chunk_id", (KEY_A,))]
    assert queued == ids[1:]  # only the vector made from the queued text did its work


def test_deleted_chunks_take_their_vectors_and_postings(
        owner: psycopg.Connection[Any], app: psycopg.Connection[Any],
        corpus: CorpusInfo) -> None:
    other = create_corpus(app, "other", KEY_A)
    write_chunks(app, corpus, rows(4, 1024), KEY_A)
    write_chunks(app, other, rows(2, 1024), KEY_A)
    app.execute("SELECT pyembed.delete_chunks(%s, '{doc1, doc2}', '{0, 0}')", (corpus.name,))
    for table in ("vectors", "postings"):
        left = owner.execute(sql.SQL(
            "SELECT corpus_id, count(DISTINCT chunk_id) FROM {} GROUP BY 1 ORDER BY 1").format(
            sql.Identifier("pyembed", table))).fetchall()
        assert left == [(corpus.corpus_id, 2), (other.corpus_id, 2)], table


def test_vectors_carry_their_chunks_document_number(
        owner: psycopg.Connection[Any], app: psycopg.Connection[Any],
        corpus: CorpusInfo) -> None:
    """Search by document groups chunks by the doc_no their vectors carry: set from the chunk as
    each vector is written (whatever the writer gives), and again when a chunk moves."""
    wrong = ("SELECT count(*) FROM pyembed.vectors v JOIN pyembed.chunks ch USING (corpus_id, "
             "chunk_id) JOIN pyembed.documents d USING (corpus_id, document_id) "
             "WHERE v.doc_no IS DISTINCT FROM d.doc_no")
    write_chunks(app, corpus, rows(3, 1024), KEY_A)  # COPY'd by the one writer
    _insert_raw(app, corpus.corpus_id, KEY_A, str(unit(1024, 7).tolist()))  # an INSERT
    assert owner.execute("SELECT count(*) FROM pyembed.vectors").fetchone() == (4,)
    assert owner.execute(wrong).fetchone() == (0,)
    # A number the writer makes up is replaced; a moved chunk's vector follows it.
    chunk = app.execute("SELECT chunk_id FROM pyembed.chunks WHERE document_id = 'doc1'"
                        ).fetchone()
    assert chunk is not None
    app.execute("SELECT pyembed._clear_vectors(%s, %s, %s, %s, NULL)",
                (corpus.corpus_id, KEY_A, chunk[0], chunk[0]))
    app.execute(sql.SQL("INSERT INTO {} (corpus_id, chunk_id, model_key, embedding, doc_no) "
                        "VALUES (%s, %s, %s, %s::vector, -5)").format(
                            vector_partition(corpus.corpus_id)),
                (corpus.corpus_id, chunk[0], KEY_A, str(unit(1024, 1).tolist())))
    app.execute("UPDATE pyembed.chunks SET document_id = 'doc2', chunk_index = 1 "
                "WHERE chunk_id = %s", chunk)
    assert owner.execute(wrong).fetchone() == (0,)
    hits = search(app, "docs", unit(1024, 1), KEY_A, k=3)
    assert [h.document_id for h in hits][:1] == ["doc2"] and len(hits) == 3
    assert len({h.document_id for h in hits}) == 3  # doc2's two chunks are one hit


def test_a_vector_written_while_its_chunk_moves_carries_the_new_document(
        db: Any, owner: psycopg.Connection[Any], app: psycopg.Connection[Any],
        corpus: CorpusInfo) -> None:
    """A writer's vector (an INSERT or COPY, as bulk_load and SQL clients write) and a move of
    its chunk to another document meanwhile: the move waits for the vector's transaction (its
    trigger holds the chunk), then renumbers it, and search by document returns each document
    once. Without the lock the vector kept the old document's number and search returned that
    document twice."""
    from pyembed.db import connect

    write_chunks(app, corpus, rows(3, 1024), KEY_A)
    chunk = app.execute("SELECT chunk_id FROM pyembed.chunks WHERE document_id = 'doc0'"
                        ).fetchone()
    assert chunk is not None
    app.execute("SELECT pyembed._clear_vectors(%s, %s, %s, %s, NULL)",
                (corpus.corpus_id, KEY_A, chunk[0], chunk[0]))
    with connect(db.app_dsn) as writer, connect(db.app_dsn, autocommit=True) as mover:
        writer.execute(sql.SQL("INSERT INTO {} (corpus_id, chunk_id, model_key, embedding) "
                               "VALUES (%s, %s, %s, %s::vector)").format(
                                   vector_partition(corpus.corpus_id)),
                       (corpus.corpus_id, chunk[0], KEY_A, str(unit(1024, 0).tolist())))
        mover.execute("SET lock_timeout = '20s'")
        thread, errors = in_background(lambda: mover.execute(
            "UPDATE pyembed.chunks SET document_id = 'doc1', chunk_index = 1 WHERE chunk_id = %s",
            chunk))
        thread.start()
        # the move waits for the writer's lock on the chunk
        assert waits_for_lock(owner, mover.info.backend_pid, thread), "the move did not wait"
        writer.commit()
        thread.join(30)
    assert not errors
    assert owner.execute("SELECT v.doc_no = d.doc_no FROM pyembed.vectors v JOIN pyembed.documents d "
                         "ON d.corpus_id = v.corpus_id AND d.document_id = 'doc1' "
                         "WHERE v.chunk_id = %s", chunk).fetchone() == (True,)
    hits = search(app, "docs", unit(1024, 0), KEY_A, k=3)
    assert len({h.document_id for h in hits}) == len(hits)


def test_app_role_may_only_copy_into_a_partition(
        app: psycopg.Connection[Any], corpus: CorpusInfo) -> None:
    write_chunks(app, corpus, rows(2, 1024), KEY_A)
    part = f"pyembed.vectors_c{corpus.corpus_id}"
    for query in (f"SELECT chunk_id FROM {part}", f"DELETE FROM {part}",
                  f"UPDATE {part} SET created_at = now()", f"TRUNCATE {part}"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute(query)
    with pytest.raises(UnknownCorpus), translated():
        app.execute("SELECT pyembed.vector_table('nope')")


def test_a_dropped_corpus_takes_its_partition_and_indexes(
        db: Database, app: psycopg.Connection[Any], owner: psycopg.Connection[Any],
        corpus: CorpusInfo) -> None:
    """A drop empties the corpus's partition and takes every grant on it; the next install
    drops it with its indexes (dropping it in the drop locked the parent, every tenant's)."""
    from pyembed import schema

    write_chunks(app, corpus, rows(2, 1024), KEY_A)
    part = f"pyembed.vectors_c{corpus.corpus_id}"
    assert owner.execute("SELECT count(*) FROM pg_indexes WHERE schemaname = 'pyembed' "
                         "AND tablename = %s AND indexname LIKE 'vectors_hnsw_%%'",
                         (part.split(".")[1],)).fetchone() == (1,)
    drop_corpus(app, "docs")
    assert owner.execute("SELECT count(*) FROM pyembed.vectors").fetchone() == (0,)
    left = part.replace("vectors_c", "dropped_vectors_c")
    assert owner.execute("SELECT to_regclass(%s)", (part,)).fetchone() == (None,)
    assert owner.execute("SELECT relacl::text[] <@ ARRAY[format('pyembed_owner=arwdDxt/%%s', "
                         "'pyembed_owner')] FROM pg_class WHERE oid = %s::regclass",
                         (left,)).fetchone() == (True,)
    schema.install(db.owner_dsn)
    assert owner.execute("SELECT to_regclass(%s)", (left,)).fetchone() == (None,)


def test_the_partition_guard_follows_the_corpus_keys_through_a_migration(
        app: psycopg.Connection[Any], owner: psycopg.Connection[Any],
        corpus: CorpusInfo) -> None:
    ids = stored_chunks(app, corpus, 2)
    vecs = np.stack([unit(1024, i) for i in range(2)])

    def guard() -> str:
        row = owner.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = "
                            "%s::regclass AND contype = 'c'",
                            (f"pyembed.vectors_c{corpus.corpus_id}",)).fetchone()
        assert row is not None
        return str(row[0])

    assert KEY_A in guard() and KEY_B not in guard()
    owner.execute("SELECT pyembed.migration_start('docs', %s)", (KEY_B,))
    assert KEY_A in guard() and KEY_B in guard()
    _copy(app, corpus.corpus_id, ids, KEY_B, vecs)  # the target key, during the migration
    owner.execute("SELECT pyembed.migration_rollback('docs')")
    assert KEY_B not in guard()
    with pytest.raises(ModelMismatch, match=f"pinned to {KEY_A}"):
        _copy(app, corpus.corpus_id, ids, KEY_B, vecs)
    # The CHECK's literals are a fast path only: a row they miss goes to _vector_check, which
    # accepts what the corpus accepts.
    assert owner.execute("SELECT pyembed._vector_check(%s, %s, %s, %s)",
                         (corpus.corpus_id, ids[0], KEY_A, Vector(vecs[0]))).fetchone() == (True,)


NOT_NUMBERS = [([], "one row of finite numbers"), (["a"] * 1024, "is numbers"),
               (["0.5"] * 1024, "is numbers"), ([[0.5] * 1024, [0.5]], "is numbers"),
               ([True] * 1024, "is numbers")]


@pytest.mark.parametrize(("vector", "words"), NOT_NUMBERS)
def test_a_query_vector_that_is_not_numbers_is_invalid_vector_at_every_entry(
        db: Database, corpus: CorpusInfo, vector: list[Any], words: str) -> None:
    """An empty query vector reached pgvector's parser (a DataException), text and rows of
    unequal lengths numpy's (ValueError), and text of digits was parsed as numbers."""
    with pyembed.connect(db.app_dsn) as client, pytest.raises(InvalidVector, match=words):
        client.corpus("docs").search(vector, model_key=KEY_A)
    with connect(db.app_dsn) as conn, pytest.raises(InvalidVector, match=words):
        search(conn, "docs", vector, KEY_A)


@pytest.mark.parametrize("vectors", [[["a"] * 4], [["0.5"] * 4], [[0.5] * 4, [0.5]]])
def test_vectors_to_write_that_are_not_numbers_are_invalid_vector(vectors: list[Any]) -> None:
    with pytest.raises(InvalidVector, match="is numbers"):
        as_unit_vectors(vectors, 4)
    with pytest.raises(InvalidVector, match="is numbers"):
        copy_data(1, list(range(len(vectors))), KEY_A, vectors, [None] * len(vectors))  # type: ignore[arg-type]
