"""copy_vectors's COPY data (pyembed.vector_copy): the server's own binary COPY output of
the stored rows, byte for byte; NULL and mixed hashes; bad inputs refused before any write; the
transition tables of a batch of vectors, and of ~1 kB chunks (write_chunks), kept in memory."""

from __future__ import annotations

from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg import sql

from pyembed.corpora import ChunkRow, CorpusInfo, create_corpus, write_chunks
from pyembed.dbcall import translated
from pyembed.errors import InvalidInput, InvalidVector
from pyembed.text import sha256
from pyembed.vectors import COLUMNS, copy_data, copy_vectors, vector_partition
from tests.helpers import chunk_hashes, count, stored_chunks, unit

KEY = "fake/fake-hash@1:1024"


@pytest.fixture
def corpus(app: psycopg.Connection[Any]) -> CorpusInfo:
    return create_corpus(app, "docs", KEY)


def _stored(owner: psycopg.Connection[Any], corpus_id: int) -> bytes:
    """The partition's rows as the server writes them in binary COPY, in chunk order (read as
    the owner: the application role may only INSERT into a partition)."""
    query = sql.SQL("COPY (SELECT {} FROM {} ORDER BY chunk_id) TO STDOUT WITH (FORMAT BINARY)"
                    ).format(sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
                             vector_partition(corpus_id))
    with owner.cursor() as cur, cur.copy(query) as copy:
        return b"".join(bytes(block) for block in copy)


def test_the_copy_data_is_what_the_server_writes_for_the_stored_rows(
        owner: psycopg.Connection[Any], app: psycopg.Connection[Any],
        corpus: CorpusInfo) -> None:
    ids = stored_chunks(app, corpus, 5)
    vectors = np.stack([unit(1024, i) for i in range(5)])
    hashes = chunk_hashes(5)
    with translated(), app.transaction(), app.cursor() as cur:
        assert copy_vectors(cur, corpus.corpus_id, ids, KEY, vectors, hashes) == ids
    assert count(app, "queue") == 0  # the hashes matched the queued texts
    # Blocks of 2 rows (three blocks and the signature and trailer) make the same bytes.
    data = b"".join(copy_data(corpus.corpus_id, ids, KEY, vectors, hashes, block_rows=2))
    assert data == _stored(owner, corpus.corpus_id)


def test_rows_without_a_hash_and_float64_vectors_are_stored_as_given(
        owner: psycopg.Connection[Any], app: psycopg.Connection[Any],
        corpus: CorpusInfo) -> None:
    ids = stored_chunks(app, corpus, 4)
    vectors = np.stack([unit(1024, 10 + i) for i in range(4)]).astype(np.float64)
    hashes = [None, sha256("chunk 2"), None, b"short"]
    with translated(), app.transaction(), app.cursor() as cur:
        copy_vectors(cur, corpus.corpus_id, ids, KEY, vectors, hashes)
    stored = {r[0]: r[1:] for r in owner.execute(
        "SELECT chunk_id, embedding, content_hash FROM pyembed.vectors")}
    assert sorted(stored) == ids
    for chunk_id, vector, content_hash in zip(ids, vectors, hashes, strict=True):
        np.testing.assert_array_equal(stored[chunk_id][0].to_numpy(), vector.astype(np.float32))
        assert stored[chunk_id][1] == content_hash
    assert count(app, "queue") == 3  # only chunk 2's vector was made from its queued text


@pytest.mark.parametrize(("vectors", "hashes", "error", "words"), [
    (np.ones((3, 1024), np.float32), [None] * 2, InvalidInput, "3 chunk ids, 3 vectors and 2"),
    (np.ones(1024, np.float32), [None] * 3, InvalidVector, "2-D"),
    (np.ones((3, 16_001), np.float32), [None] * 3, InvalidVector, "at most 16,000"),
])
def test_inputs_that_do_not_make_rows_are_refused_before_the_copy(
        app: psycopg.Connection[Any], corpus: CorpusInfo, vectors: np.ndarray,
        hashes: list[bytes | None], error: type[Exception], words: str) -> None:
    ids = stored_chunks(app, corpus, 3)
    with app.transaction(), app.cursor() as cur:
        with pytest.raises(error, match=words):
            copy_vectors(cur, corpus.corpus_id, ids, KEY, vectors, hashes)
        # Nothing reached the server: the transaction goes on.
        assert cur.execute("SELECT count(*) FROM pyembed.vectors").fetchone() == (0,)


def temporary_files(notices: list[str]) -> list[str]:
    return [n for n in notices if n.startswith("temporary file")]


def server_messages(owner: psycopg.Connection[Any]) -> list[str]:
    """The server's messages to this session from now on, at work_mem 64kB, with a report of
    each temporary file written (log_temp_files; a sort that spills shows that they arrive)."""
    notices: list[str] = []
    owner.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    owner.execute("SET log_temp_files = 0")
    owner.execute("SET client_min_messages = log")
    owner.execute("SET work_mem = '64kB'")
    owner.execute("SELECT count(*) FROM (SELECT g FROM generate_series(1, 20000) g "
                  "ORDER BY g DESC OFFSET 0) s")
    assert temporary_files(notices)
    notices.clear()
    return notices


def drop_vector_index(owner: psycopg.Connection[Any], corpus: CorpusInfo, key: str) -> None:
    """The corpus's HNSW index for `key` dropped: what these tests count is the triggers'
    transition tables, and adding each of thousands of rows to the graph was nearly all their
    time."""
    owner.execute(sql.SQL("DROP INDEX pyembed.{}").format(sql.Identifier(one_value(
        owner, "SELECT pyembed._index_name(%s, %s)", (corpus.corpus_id, key)))))


def one_value(conn: psycopg.Connection[Any], query: str, params: Any) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


# The statement triggers read the written rows from transition tables, which PostgreSQL writes
# to a temporary file once they outgrow work_mem: the whole write over again.
@pytest.mark.parametrize("dims", [384, 1024])
def test_a_batch_is_checked_without_writing_it_to_a_temporary_file(
        owner: psycopg.Connection[Any], app: psycopg.Connection[Any], dims: int) -> None:
    key = f"fake/fake-hash@1:{dims}"
    corpus = create_corpus(app, f"docs{dims}", key)
    drop_vector_index(owner, corpus, key)
    ids = stored_chunks(app, corpus, 3000)
    vectors = np.stack([unit(dims, i) for i in range(3000)])
    notices = server_messages(owner)
    with translated(), owner.transaction(), owner.cursor() as cur:
        copy_vectors(cur, corpus.corpus_id, ids, key, vectors, [None] * 3000)
        assert cur.execute("SHOW work_mem").fetchone() == ("64kB",)  # restored after the COPY
    assert count(owner, "vectors") == 3000
    assert temporary_files(notices) == []


def test_chunks_of_a_kilobyte_are_written_without_a_temporary_file(
        owner: psycopg.Connection[Any], app: psycopg.Connection[Any]) -> None:
    corpus = create_corpus(app, "long", "fake/fake-hash@1:384")
    notices = server_messages(owner)
    for version in ("first", "second"):  # inserted, then updated (old and new rows)
        text = f"{version} text of chunk {{}}: " + "word " * 200  # ~1 kB
        rows = [ChunkRow(f"d{i // 10}", i % 10, text.format(i), unit(384, i))
                for i in range(1000)]
        write_chunks(owner, corpus, rows, "fake/fake-hash@1:384")
    assert owner.execute("SHOW work_mem").fetchone() == ("64kB",)
    assert count(owner, "chunks") == count(owner, "vectors") == 1000
    assert temporary_files(notices) == []


def test_a_batch_reads_only_its_own_range_of_the_partition(
        owner: psycopg.Connection[Any], app: psycopg.Connection[Any],
        corpus: CorpusInfo) -> None:
    """Before its COPY, copy_vectors deletes the vectors it replaces. Asked by statements of its
    own, with statistics of a fuller partition (analyzed, then emptied), the planner read the
    whole partition: each batch of a load read those before it."""
    ids = stored_chunks(app, corpus, 400)
    vectors = np.stack([unit(1024, i) for i in range(400)])
    hashes = chunk_hashes(400)
    partition = vector_partition(corpus.corpus_id)
    with translated(), app.transaction(), app.cursor() as cur:
        copy_vectors(cur, corpus.corpus_id, ids, KEY, vectors, hashes)
    owner.execute(sql.SQL("ANALYZE {}").format(partition))
    owner.execute(sql.SQL("TRUNCATE {}").format(partition))
    scans = (sql.SQL("SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relid = {}::regclass")
             .format(sql.Literal(partition.as_string(app))))
    # New rows, then replaced: a range of ids, and every other id (the odd ones are kept).
    for batch in (slice(0, 100), slice(100, 200), slice(200, 400), slice(200, 400),
                  slice(0, 400, 2)):
        with translated(), app.transaction(), app.cursor() as cur:
            before = cur.execute(scans).fetchone()  # (counts not yet flushed included)
            copy_vectors(cur, corpus.corpus_id, ids[batch], KEY, vectors[batch],
                               hashes[batch])
            assert cur.execute(scans).fetchone() == before
    assert count(owner, "vectors") == 400
