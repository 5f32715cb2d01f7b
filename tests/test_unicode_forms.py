"""One text in its two Unicode normal forms (NFC, "é" composed; NFD, "e" + U+0301, as some macOS
and PDF tools write it) is one text to pyembed's keys and keyword terms: the embedding cache
and the rerank cache key it in NFC (pyembed.cachekey.nfc, which is also what the provider
embeds), and the database tokenises chunks, documents and queries in NFC (sql/060-keyword.sql);
the stored text stays as given. An upgrade through revision 0038 makes the postings of chunks
stored before it again. Before, the two forms were two cache entries, and a query typed in NFC
did not find a document stored in NFD (nor the reverse)."""

from __future__ import annotations

import unicodedata
from typing import Any

import psycopg
import pytest

import pyembed
from pyembed import schema
from pyembed.cachekey import cache_key, rerank_cache_key
from tests.conftest import Database
from tests.test_document_ids import KEY, _provider_calls

NFC = "Crème brûlée at the café in Zürich"
NFD = unicodedata.normalize("NFD", NFC)


def test_the_two_forms_differ() -> None:
    assert NFC != NFD and unicodedata.normalize("NFC", NFD) == NFC


@pytest.mark.parametrize("group", ["document", "chunk"])
def test_keyword_search_finds_either_form_with_either(db: Database, group: str) -> None:
    with pyembed.connect(db.app_dsn) as client:
        kb = client.create_corpus("kb", KEY)
        kb.add([pyembed.Document("nfd", NFD), pyembed.Document("other", "a plain text")])
        for query in ("café", unicodedata.normalize("NFD", "café"), "brûlée Zürich"):
            hits = kb.search(query, mode="keyword", group=group)
            assert [h.document_id for h in hits] == ["nfd"], query
            assert hits[0].content == NFD  # stored as given
        kb.add([pyembed.Document("nfc", "Zürich " * 3)])
        hits = kb.search(unicodedata.normalize("NFD", "Zürich"), mode="keyword", group=group)
        assert [h.document_id for h in hits] == ["nfc", "nfd"]


def test_the_two_forms_are_one_cache_entry(db: Database, owner: psycopg.Connection[Any],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache_key(NFC, KEY, "document") == cache_key(NFD, KEY, "document")
    assert rerank_cache_key(NFD, NFD, "cohere/rerank-v3.5") == rerank_cache_key(
        NFC, NFC, "cohere/rerank-v3.5")
    with pyembed.connect(db.app_dsn) as client:
        calls = _provider_calls(monkeypatch, client)
        embedder = client.embedder(KEY)
        first = embedder.embed([NFD])
        second = embedder.embed([NFC])
        assert (first == second).all()
        assert calls == [[NFC]]  # embedded once, in NFC
    assert owner.execute("SELECT count(*) FROM pyembed.embedding_cache").fetchone() == (1,)


def test_an_upgrade_makes_the_postings_of_stored_nfd_text_again(empty_db: Database) -> None:
    schema.install(empty_db.owner_dsn)
    with pyembed.connect(empty_db.app_dsn) as client:
        client.create_corpus("kb", KEY).add([pyembed.Document("nfd", NFD),
                                             pyembed.Document("other", "a plain text")])
    with psycopg.connect(empty_db.owner_dsn, autocommit=True) as owner:
        # The postings as f808621 made them: the text tokenised as stored.
        owner.execute("""
            DELETE FROM pyembed.postings p USING pyembed.chunks ch
             WHERE p.corpus_id = ch.corpus_id AND p.chunk_id = ch.chunk_id
               AND ch.document_id = 'nfd';
            INSERT INTO pyembed.postings (corpus_id, lexeme, chunk_id, tf, doc_len)
            SELECT ch.corpus_id, u.lexeme, ch.chunk_id, coalesce(array_length(u.positions, 1), 1),
                   sum(coalesce(array_length(u.positions, 1), 1)) OVER ()
              FROM pyembed.chunks ch, unnest(to_tsvector('english', ch.content)) u
             WHERE ch.document_id = 'nfd';
            DELETE FROM pyembed.document_postings p USING pyembed.documents d
             WHERE p.corpus_id = d.corpus_id AND p.doc_no = d.doc_no AND d.document_id = 'nfd';
            INSERT INTO pyembed.document_postings (corpus_id, lexeme, doc_no, tf, doc_len)
            SELECT d.corpus_id, u.lexeme, d.doc_no, coalesce(array_length(u.positions, 1), 1),
                   sum(coalesce(array_length(u.positions, 1), 1)) OVER ()
              FROM pyembed.documents d JOIN pyembed.chunks ch USING (corpus_id, document_id),
                   unnest(to_tsvector('english', ch.content)) u
             WHERE d.document_id = 'nfd'""")
    with pyembed.connect(empty_db.app_dsn) as client:
        kb = client.corpus("kb")
        assert kb.search("café", mode="keyword") == []  # as before this change
        assert kb.search("café", mode="keyword", group="chunk") == []
    schema.downgrade(empty_db.owner_dsn, "0037")
    schema.install(empty_db.owner_dsn)
    with pyembed.connect(empty_db.app_dsn) as client:
        kb = client.corpus("kb")
        for group in ("document", "chunk"):
            assert [h.document_id for h in kb.search("café", mode="keyword", group=group)] == [
                "nfd"]
