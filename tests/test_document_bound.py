"""One document has a bound: its corpus's max_document_chunks (revision 0038, 10,000 unless the
owner sets another), refused by the chunks table's statement trigger at every write with PE005
naming the document, its size and the bound, with the fix in HINT; a client asks the same rule
(pyembed._document_size_problem) before it pays a provider, and an ingest of many files loses
none but the one too big. Before, nothing bounded a document: a 50 MB text became ~99k chunks
written by one statement that held its locks for ~99 s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pyembed
from pyembed.ingest import ingest
from tests.conftest import Database
from tests.test_document_ids import KEY, _provider_calls

LONG = " ".join(f"word{n}" for n in range(60))
CHUNKS = 30
"""LONG's chunks of 5 tokens, no overlap, with the fake model."""


def _bounded(owner: psycopg.Connection[Any], name: str, most: int) -> int:
    """The corpus's id, its bound set to `most` chunks, as the owner sets it."""
    row = owner.execute("UPDATE pyembed.corpora SET max_document_chunks = %s WHERE name = %s "
                        "RETURNING corpus_id", (most, name)).fetchone()
    assert row is not None
    return int(row[0])


def test_the_default_bound_is_documented_and_in_range(owner: psycopg.Connection[Any]) -> None:
    row = owner.execute("SELECT column_default, pyembed._setting_range('max_document_chunks') "
                        "FROM information_schema.columns WHERE table_schema = 'pyembed' "
                        "AND table_name = 'corpora' AND column_name = 'max_document_chunks'"
                        ).fetchone()
    assert row == ("10000", "1..10000000")
    assert "max_document_chunks" in Path("README.md").read_text(encoding="utf-8")


def test_a_write_past_the_bound_is_refused_in_sql_naming_the_document(
        db: Database, app: psycopg.Connection[Any], owner: psycopg.Connection[Any]) -> None:
    with pyembed.connect(db.app_dsn) as client:
        client.create_corpus("kb", KEY, chunk_tokens=5, chunk_overlap=0)
    corpus_id = _bounded(owner, "kb", 3)
    with pytest.raises(psycopg.Error) as err:
        app.execute("SELECT pyembed.add_document('kb', 'big', %s)", (LONG,))
    assert err.value.sqlstate == "PE005"
    assert err.value.diag.message_primary == (
        f'document "big" is too big for corpus kb: {CHUNKS} chunks, more than its '
        "max_document_chunks 3")
    assert err.value.diag.message_hint == (
        "split the document, give the corpus a larger chunk_tokens, or raise its bound as the "
        f"owner: set pyembed.corpora.max_document_chunks to {CHUNKS} for corpus_id {corpus_id} "
        "(at most 10000000)")
    # A writer's own INSERT meets the same rule, whatever it numbers in one statement.
    app.execute("INSERT INTO pyembed.documents (corpus_id, document_id, content_hash) "
                "VALUES (%s, 'own', '\\x00')", (corpus_id,))
    with pytest.raises(psycopg.Error, match='document "own" is too big for corpus kb: 4 chunks'):
        app.execute("INSERT INTO pyembed.chunks (corpus_id, document_id, chunk_index, content) "
                    "SELECT %s, 'own', i, 'text' FROM generate_series(0, 3) i", (corpus_id,))
    app.execute("SELECT pyembed.add_document('kb', 'small', 'a short text')")
    assert app.execute("SELECT count(*) FROM pyembed.chunks WHERE document_id = 'big'"
                       ).fetchone() == (0,)
    # Raised as the hint says, the document goes in.
    _bounded(owner, "kb", CHUNKS)
    assert app.execute("SELECT pyembed.add_document('kb', 'big', %s)", (LONG,)).fetchone() == (
        CHUNKS,)


def test_add_and_ingest_refuse_the_one_too_big_before_any_provider_call(
        tmp_path: Path, db: Database, app: psycopg.Connection[Any],
        owner: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    with pyembed.connect(db.app_dsn) as client:
        kb = client.create_corpus("kb", KEY, chunk_tokens=5, chunk_overlap=0)
        _bounded(owner, "kb", 3)
        calls = _provider_calls(monkeypatch, client)
        with pytest.raises(pyembed.InvalidInput) as err:
            kb.add([pyembed.Document("fine", "a good text"), pyembed.Document("big", LONG)])
        said = str(err.value)
        assert said.startswith(
            f'document "big" is too big for corpus kb: {CHUNKS} chunks ({len(LONG)} bytes of text), '
            "more than its max_document_chunks 3 (hint: split the document, "), said
        assert calls == []
        path = tmp_path / "docs.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in [
            {"id": "one", "text": "the first text"},
            {"id": "two", "text": LONG},
            {"id": "three", "text": "the third text"}]), encoding="utf-8")
        report = ingest(kb, path, progress=False)
        assert [(p.line, p.message.split(" is too big")[0]) for p in report.problems] == [
            (2, 'document "two"')]
        assert (report.added, report.failed) == (2, 1)
        assert calls and not any("word" in t for c in calls for t in c)
    assert sorted(r[0] for r in app.execute("SELECT document_id FROM pyembed.documents")) == [
        "one", "three"]


def test_a_keyword_query_past_the_bound_is_refused_in_words(
        db: Database, app: psycopg.Connection[Any]) -> None:
    """A keyword query is at most as long as an evaluation query (eval_queries_query_bound,
    10,000 characters). Before, a 1 MB query failed on PostgreSQL's tsvector limit (SQLSTATE
    54000, "string is too long for tsvector"), and a shorter long one read a posting list for
    each of its thousands of terms."""
    words = " ".join(f"term{n}" for n in range(200_000))[:1_000_000]
    with pyembed.connect(db.app_dsn) as client:
        kb = client.create_corpus("kb", KEY)
        kb.add([pyembed.Document("d", "term1 and term2")])
        for query in (words, words[:10_001]):
            with pytest.raises(pyembed.InvalidInput, match=(
                    rf"^a keyword query is at most 10000 characters, got {len(query)} "
                    r"\(hint: shorten it")):
                kb.search(query, mode="keyword")
        assert [h.document_id for h in kb.search(words[:10_000].rsplit(" ", 1)[0],
                                                  mode="keyword")] == ["d"]
    with pytest.raises(psycopg.Error) as err:
        app.execute("SELECT * FROM pyembed.search_keyword('kb', %s)", (words,))
    assert (err.value.sqlstate, err.value.diag.message_primary) == (
        "PE005", "a keyword query is at most 10000 characters, got 1000000")
