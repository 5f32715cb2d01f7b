"""The keyword index's write path against concurrent writers: postings, document postings, their
counters and packed blocks stay exactly what the chunks say, whoever writes a document when.

Each test runs two sessions at once (the second blocked until the first ends, as it is when
they touch the same document) and then checks the whole index against the chunks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from pyembed import bm25
from tests.helpers import in_background, waits_for_lock

FAKE = "fake/fake-hash@1:384"


def index_problems(owner: psycopg.Connection[Any]) -> list[str]:
    """What differs between the keyword index and the chunks (in corpora without chunk
    overlap, where a document's text is its chunks'), as readable lines: postings, document
    postings, document frequencies, corpus totals and packed blocks."""
    problems: list[str] = []
    chunk_terms = {(c, lx, ch): tf for c, lx, ch, tf in owner.execute(
        """SELECT ch.corpus_id, u.lexeme, ch.chunk_id, coalesce(array_length(u.positions, 1), 1)
             FROM pyembed.chunks ch JOIN pyembed.corpora co USING (corpus_id),
                  unnest(to_tsvector(co.text_config, ch.content)) u""")}
    chunk_len = Counter[tuple[int, int]]()
    for (c, _, ch), tf in chunk_terms.items():
        chunk_len[c, ch] += tf
    postings = {(c, lx, ch): (tf, dl) for c, lx, ch, tf, dl in owner.execute(
        "SELECT corpus_id, lexeme, chunk_id, tf, doc_len FROM pyembed.postings")}
    expected = {k: (tf, chunk_len[k[0], k[2]]) for k, tf in chunk_terms.items()}
    if postings != expected:
        problems.append(f"postings: {sorted(set(postings.items()) ^ set(expected.items()))}")
    doc_of = {(c, ch): d for c, ch, d in owner.execute(
        """SELECT ch.corpus_id, ch.chunk_id, d.doc_no FROM pyembed.chunks ch
             JOIN pyembed.documents d USING (corpus_id, document_id)""")}
    doc_terms = Counter[tuple[int, str, int]]()
    for (c, lx, ch), tf in chunk_terms.items():
        doc_terms[c, lx, doc_of[c, ch]] += tf
    doc_len = Counter[tuple[int, int]]()
    for (c, _, d), tf in doc_terms.items():
        doc_len[c, d] += tf
    expected = {k: (tf, doc_len[k[0], k[2]]) for k, tf in doc_terms.items()}
    document_postings = {(c, lx, d): (tf, dl) for c, lx, d, tf, dl in owner.execute(
        "SELECT corpus_id, lexeme, doc_no, tf, doc_len FROM pyembed.document_postings")}
    if document_postings != expected:
        problems.append("document postings: "
                        f"{sorted(set(document_postings.items()) ^ set(expected.items()))}")
    dfs = Counter[tuple[int, str]](k[:2] for k in postings)
    document_dfs = Counter[tuple[int, str]](k[:2] for k in document_postings)
    stats = {(c, lx): (df, ddf) for c, lx, df, ddf in owner.execute(
        "SELECT corpus_id, lexeme, df, document_df FROM pyembed.lexeme_stats "
        "WHERE df <> 0 OR document_df <> 0")}
    expected_stats = {k: (dfs[k], document_dfs[k]) for k in dfs.keys() | document_dfs.keys()}
    if stats != expected_stats:
        problems.append(f"lexeme_stats: {sorted(set(stats.items()) ^ set(expected_stats.items()))}")
    totals = {c: tuple(r) for c, *r in owner.execute(
        "SELECT corpus_id, chunks, total_len, documents, document_len FROM pyembed.keyword_stats "
        "WHERE (chunks, total_len, documents, document_len) <> (0, 0, 0, 0)")}
    expected_totals = {c: (len({ch for (cc, ch) in chunk_len if cc == c}),
                           sum(n for (cc, _), n in chunk_len.items() if cc == c),
                           len({d for (cc, d) in doc_len if cc == c}),
                           sum(n for (cc, _), n in doc_len.items() if cc == c))
                       for c in {c for c, _ in chunk_len}}
    if totals != expected_totals:
        problems.append(f"keyword_stats: {totals} instead of {expected_totals}")
    blocks: dict[tuple[int, str, int], list[tuple[int, int, int]]] = {}
    for (c, lx, ch), (tf, dl) in postings.items():
        blocks.setdefault((c, lx, ch >> 9), []).append((ch, tf, dl))
    for (c, lx, d), (tf, dl) in document_postings.items():
        blocks.setdefault((c, lx, -1 - (d >> 9)), []).append((d, tf, dl))
    size = bm25.POSTING.itemsize
    packed = {(c, lx, k): sorted(bytes(b)[i:i + size] for i in range(0, len(b), size))
              for c, lx, k, b in owner.execute(
                  "SELECT corpus_id, lexeme, block, postings FROM pyembed.posting_blocks")}
    wanted = {k: sorted(bm25.pack([p]) for p in v) for k, v in blocks.items()}
    wrong = sorted(k for k in packed.keys() | wanted.keys() if packed.get(k) != wanted.get(k))
    if wrong:
        problems.append(f"posting_blocks: {wrong}")
    if owner.execute("SELECT count(*) FROM pyembed.keyword_pending").fetchone() != (0,):
        problems.append("keyword_pending rows left")
    return problems


@pytest.fixture
def corpus(client: Any) -> int:
    kb = client.create_corpus("w", FAKE, chunk_tokens=100_000, chunk_overlap=0)
    client.conn.execute(
        "INSERT INTO pyembed.documents (corpus_id, document_id, content_hash) "
        "SELECT %s, d, '\\x00' FROM unnest(ARRAY['a', 'b', 'c']) d", (kb.info.corpus_id,))
    client.conn.execute(
        "INSERT INTO pyembed.chunks (corpus_id, document_id, chunk_index, content) "
        "VALUES (%(c)s, 'a', 0, 'zebra crossing near the market'), "
        "       (%(c)s, 'b', 0, 'quagga census by the river'), "
        "       (%(c)s, 'b', 1, 'zebra and quagga stripes'), "
        "       (%(c)s, 'c', 0, 'parking meters downtown')", {"c": kb.info.corpus_id})
    return int(kb.info.corpus_id)


def _sessions(db: Any) -> tuple[psycopg.Connection[Any], psycopg.Connection[Any],
                                 psycopg.Connection[Any]]:
    return (psycopg.connect(db.app_dsn), psycopg.connect(db.app_dsn),
            psycopg.connect(db.app_dsn, autocommit=True))


INSERT = ("INSERT INTO pyembed.chunks (corpus_id, document_id, chunk_index, content) "
          "VALUES (%s, %s, %s, %s)")


def race(db: Any, first: Callable[[psycopg.Connection[Any]], Any],
         second: Callable[[psycopg.Connection[Any]], Any]) -> tuple[bool, list[BaseException]]:
    """`first` in one transaction, left open; `second` in another, started meanwhile; then the
    first commits and the second, once done, too. (whether the second waited, its errors)"""
    one, two, watcher = _sessions(db)
    try:
        first(one)
        def then_commit() -> None:
            second(two)
            two.commit()

        thread, errors = in_background(then_commit)
        thread.start()
        waited = waits_for_lock(watcher, two.info.backend_pid, thread, tries=400)
        one.commit()
        thread.join(30)
        assert not thread.is_alive()
        return waited, errors
    finally:
        for c in (one, two, watcher):
            c.close()


def test_two_writers_adding_chunks_to_one_document_at_once(
        db: Any, corpus: int, owner: psycopg.Connection[Any]) -> None:
    """Each writer indexes the document from the chunks it sees; the second, blocked by the
    first, indexes it again from both writers' chunks (it failed on a duplicate document posting,
    or would have counted the document's terms from its own chunks only)."""
    waited, errors = race(db, lambda c: c.execute(INSERT, (corpus, "a", 1, "zebra okapi")),
                          lambda c: c.execute(INSERT, (corpus, "a", 2, "zebra lion crossing")))
    assert errors == [] and waited
    assert index_problems(owner) == []
    row = owner.execute("SELECT tf FROM pyembed.document_postings p JOIN pyembed.documents d "
                        "USING (corpus_id, doc_no) WHERE d.document_id = 'a' "
                        "AND p.lexeme = 'zebra'").fetchone()
    assert row == (3,)
    owner.execute("UPDATE pyembed.lexeme_stats SET document_df = document_df + 1 "
                  "WHERE lexeme = 'okapi'")  # (the check sees a count off by one)
    assert [p.split(":")[0] for p in index_problems(owner)] == ["lexeme_stats"]


# Deletes go through pyembed's functions (the application role holds no DELETE), by name.
_NAME = "(SELECT name FROM pyembed.corpora WHERE corpus_id = %s)"
DELETE_CHUNK = f"SELECT pyembed.delete_chunks({_NAME}, ARRAY[%s], ARRAY[%s])"  # and later ones
UPDATE_CHUNK = ("UPDATE pyembed.chunks SET content = %s WHERE corpus_id = %s "
                "AND document_id = %s AND chunk_index = %s")
DELETE_DOCUMENT = f"SELECT pyembed.delete_documents({_NAME}, ARRAY[%s])"


@pytest.mark.parametrize(("first", "second", "refused"), [
    # one writer deletes a chunk of b, the other adds one
    (lambda c, k: c.execute(DELETE_CHUNK, (k, "b", 1)),
     lambda c, k: c.execute(INSERT, (k, "b", 2, "okapi quagga zebra")), None),
    # one rewrites a chunk of b, the other adds one
    (lambda c, k: c.execute(UPDATE_CHUNK, ("lion quagga quagga", k, "b", 0)),
     lambda c, k: c.execute(INSERT, (k, "b", 2, "okapi quagga")), None),
    # both rewrite b's chunks (the same one), each also writing another document
    (lambda c, k: (c.execute(UPDATE_CHUNK, ("lion quagga", k, "b", 1)),
                   c.execute(INSERT, (k, "a", 1, "zebra zebra"))),
     lambda c, k: (c.execute(INSERT, (k, "c", 1, "market quagga")),
                   c.execute(UPDATE_CHUNK, ("okapi census", k, "b", 1))), None),
    # one adds a chunk to b, the other deletes b
    (lambda c, k: c.execute(INSERT, (k, "b", 2, "okapi quagga")),
     lambda c, k: c.execute(DELETE_DOCUMENT, (k, "b")), None),
    # one deletes b, the other adds a chunk to it: refused (b is gone)
    (lambda c, k: c.execute(DELETE_DOCUMENT, (k, "b")),
     lambda c, k: c.execute(INSERT, (k, "b", 2, "okapi quagga")), psycopg.errors.ForeignKeyViolation),
    # deletes and inserts in each transaction, of the same documents
    (lambda c, k: (c.execute(DELETE_CHUNK, (k, "a", 0)),
                   c.execute(INSERT, (k, "a", 3, "zebra okapi")),
                   c.execute(DELETE_DOCUMENT, (k, "c"))),
     lambda c, k: (c.execute(INSERT, (k, "a", 4, "zebra lion")),
                   c.execute(DELETE_CHUNK, (k, "b", 0)),
                   c.execute(INSERT, (k, "b", 5, "quagga quagga okapi"))), None),
], ids=["delete-insert", "update-insert", "update-same-chunk", "insert-then-delete-document",
        "delete-document-then-insert", "deletes-and-inserts"])
def test_concurrent_writes_of_one_document_keep_the_index_exact(
        db: Any, corpus: int, owner: psycopg.Connection[Any], first: Any, second: Any,
        refused: type[psycopg.Error] | None) -> None:
    waited, errors = race(db, lambda c: first(c, corpus), lambda c: second(c, corpus))
    assert waited
    assert [type(e) for e in errors] == ([refused] if refused else [])
    assert index_problems(owner) == []


def test_a_second_writer_under_repeatable_read_is_refused_as_a_serialization_failure(
        db: Any, corpus: int, owner: psycopg.Connection[Any]) -> None:
    """Its snapshot cannot see the first writer's chunks of the document: it fails as any
    REPEATABLE READ transaction that lost a race does (to be retried), not with a duplicate."""
    def second(c: psycopg.Connection[Any]) -> None:
        c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        c.execute("SELECT 1")  # (its snapshot: before the first commits)
        c.execute(INSERT, (corpus, "a", 2, "zebra lion crossing"))

    waited, errors = race(db, lambda c: c.execute(INSERT, (corpus, "a", 1, "zebra okapi")),
                          second)
    assert waited and [type(e) for e in errors] == [psycopg.errors.SerializationFailure]
    assert index_problems(owner) == []


def test_a_rolled_back_write_changes_no_count_and_no_block(
        app: psycopg.Connection[Any], corpus: int, owner: psycopg.Connection[Any]) -> None:
    tables = ("postings", "document_postings", "lexeme_stats", "keyword_stats", "posting_blocks")

    def contents() -> list[list[Any]]:
        return [sorted(map(tuple, owner.execute(f"SELECT * FROM pyembed.{t}")))  # fixed names
                for t in tables]

    before = contents()
    with pytest.raises(ZeroDivisionError), app.transaction():
        app.execute(INSERT, (corpus, "a", 1, "zebra okapi"))
        app.execute(UPDATE_CHUNK, ("lion", corpus, "b", 0))
        app.execute(DELETE_DOCUMENT, (corpus, "c"))
        assert app.execute("SELECT count(*) FROM pyembed.search_keyword('w', 'zebra', 5)"
                           ).fetchone() == (2,)  # (its own search reads what it wrote)
        raise ZeroDivisionError
    assert contents() == before
    assert index_problems(owner) == []


@pytest.mark.parametrize("table", ["chunks", "documents", "postings", "document_postings"])
def test_a_write_commits_when_a_table_it_analyzes_is_past_512_mb(
        owner: psycopg.Connection[Any], client: Any, table: str) -> None:
    """pyembed._analyze_grown, at every writer's commit, compared a table's size with four
    times its pages in bytes as an integer: past 65,535 pages (512 MB) every write failed at
    commit with "integer out of range". The pages are set here as ANALYZE would record them."""
    owner.execute("UPDATE pg_catalog.pg_class SET relpages = 100000 WHERE oid = %s::regclass",
                  (f"pyembed.{table}",))
    docs = client.create_corpus("big", FAKE)
    assert docs.add([("d1", "refund policy for large orders")]).added == 1
