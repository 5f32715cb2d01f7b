"""A document the write would refuse is refused before any provider call, by the database's own
rules asked in the lookup that comes before the embedding (pyembed._document_problems): its id
(pyembed._document_id_problem) and its metadata's bound (the CHECKs documents_metadata_bound and
chunks_metadata_bound, read from the catalogue). Before, metadata past 64 kB as jsonb was
refused at the write, after its batch had been embedded: the provider was paid for chunks that
were then lost. What stays checked in Python before the lookup is what cannot reach the
database at all (a NUL or lone surrogate the driver cannot send, a value that is not JSON, an
empty text: pyembed.text)."""

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

BIG = {"notes": "x" * 70_000}  # 70,000 bytes and more as jsonb, past the tables' 65,536


def test_metadata_past_the_tables_bound_is_refused_before_any_provider_call(
        tmp_path: Path, db: Database, app: psycopg.Connection[Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    with pyembed.connect(db.app_dsn) as client:
        kb = client.create_corpus("kb", KEY)
        calls = _provider_calls(monkeypatch, client)
        with pytest.raises(pyembed.InvalidInput) as err:
            kb.add([pyembed.Document("fine", "a good text"),
                    pyembed.Document("big", "a text with too much metadata", BIG)])
        said = str(err.value)
        assert said.startswith('document "big": metadata is at most 65536 bytes as jsonb, got ')
        assert said.endswith("(the table's check documents_metadata_bound)"), said
        assert calls == []
        path = tmp_path / "docs.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in [
            {"id": "one", "text": "the first text"},
            {"id": "two", "text": "the second text", "metadata": BIG},
            {"id": "three", "text": "the third text"}]), encoding="utf-8")
        report = ingest(kb, path, progress=False)
        assert [(p.line, p.message.split(":")[0]) for p in report.problems] == [
            (2, 'document "two"')]
        assert (report.added, report.failed) == (2, 1)
        assert sorted(t for c in calls for t in c) == ["the first text", "the third text"]
    assert sorted(r[0] for r in app.execute("SELECT document_id FROM pyembed.documents")) == [
        "one", "three"]


def test_the_bound_asked_is_the_tables_own(db: Database, owner: psycopg.Connection[Any],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The lookup reads the bound from the table's CHECK: one made tighter is the one a client
    meets, before any provider call (a copy of 65536 in the code would let the document through
    to its write)."""
    owner.execute("ALTER TABLE pyembed.documents DROP CONSTRAINT documents_metadata_bound, "
                  "ADD CONSTRAINT documents_metadata_bound CHECK "
                  "(pg_column_size(metadata) <= 100)")
    with pyembed.connect(db.app_dsn) as client:
        kb = client.create_corpus("kb", KEY)
        calls = _provider_calls(monkeypatch, client)
        with pytest.raises(pyembed.InvalidInput, match=r'^document "d": metadata is at most 100 '
                           r"bytes as jsonb, got \d+ \(the table's check "
                           r"documents_metadata_bound\)$"):
            kb.add([pyembed.Document("d", "some text", {"k": "y" * 200})])
        assert calls == []
        kb.add([pyembed.Document("d", "some text", {"k": "y"})])
        assert len(calls) == 1


def test_the_rules_answers(app: psycopg.Connection[Any]) -> None:
    rows = app.execute(
        "SELECT * FROM pyembed._document_problems(ARRAY['ok', 'ok', ' x', 'ok'], "
        "ARRAY['{}', NULL, '{}', %s]::jsonb[], NULL)", (json.dumps(BIG),)).fetchall()
    assert rows[0] == (" x", 'document id " x" starts with whitespace (U+0020)')
    assert rows[1][0] == "ok" and rows[1][1].startswith(
        'document "ok": metadata is at most 65536 bytes as jsonb')
    assert len(rows) == 2


def test_a_chunk_past_the_tables_bound_is_refused_before_any_provider_call(
        db: Database, app: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk's text is at most 1 MB as UTF-8 (the CHECK chunks_content_bound): a corpus of long
    chunks cut from a text of 4-byte characters, embedded with truncate=True (the model reads
    its first tokens, the chunk is stored whole), makes chunks past it. Refused before any
    provider call, in the database's words, with the other documents of the call; before, the
    chunks were embedded (the provider paid) and the write refused them (23514). The token
    estimate counts a 4-byte character at 3 tokens now, so that a chunk of at most 100,000
    tokens is at most about 400 kB: the test gives it an estimate that reads them at 1/6 of a
    token (as one at 4 characters a token did, 79b59f5), which makes such chunks again."""
    import pyembed.text

    monkeypatch.setattr(pyembed.text, "_SIXTHS_OF_A_TOKEN", (1, 1, 1))
    text = " ".join(["\U0001f600" * 8] * 40_000)  # 320,000 characters, 1,319,999 bytes
    with pyembed.connect(db.app_dsn) as client:
        kb = client.create_corpus("kb", KEY, chunk_tokens=100_000, chunk_overlap=0)
        calls = _provider_calls(monkeypatch, client)
        with pytest.raises(pyembed.InvalidInput) as err:
            kb.add([pyembed.Document("fine", "a good text"), pyembed.Document("long", text)],
                   truncate=True)
        said = str(err.value)
        assert said.startswith('document "long": a chunk is at most 1048576 bytes as UTF-8, '
                               "got "), said
        assert said.endswith("(the table's check chunks_content_bound): give it a smaller "
                             "chunk_tokens"), said
        assert calls == []
        kb.add([pyembed.Document("fine", "a good text")])
        assert len(calls) == 1
    assert [r[0] for r in app.execute("SELECT document_id FROM pyembed.documents")] == ["fine"]
    rows = app.execute("SELECT * FROM pyembed._document_problems(ARRAY['a', ' b', 'c'], "
                       "NULL, ARRAY[1048576, 5, 1048577])").fetchall()
    assert [r[0] for r in rows] == [" b", "c"]  # (the id rule first: ' b' is not asked for bytes)
