"""Keyword (BM25 in SQL), hybrid (reciprocal rank fusion) and filters on small fixed corpora."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import psycopg
import pytest

import pyembed
from pyembed.demo import sample_documents

FAKE = "fake/fake-hash@1:384"


def bm25_from_scratch(owner: psycopg.Connection[Any], corpus_id: int,
                      query: str) -> dict[int, float]:
    """BM25 recomputed in Python from each chunk's tsvector, independent of the stats tables."""
    docs: dict[int, Counter[str]] = {}
    for chunk_id, lexeme, tf in owner.execute(
            """SELECT ch.chunk_id, u.lexeme, coalesce(array_length(u.positions, 1), 1)
                 FROM pyembed.chunks ch, unnest(to_tsvector('english', ch.content)) u
                WHERE ch.corpus_id = %s""", (corpus_id,)):
        docs.setdefault(chunk_id, Counter())[lexeme] = tf
    terms = {r[0] for r in owner.execute("SELECT lexeme FROM unnest(to_tsvector('english', %s))",
                                         (query,))}
    n = len(docs)
    avgdl = sum(sum(c.values()) for c in docs.values()) / n
    scores: dict[int, float] = {}
    for t in terms:
        df = sum(1 for c in docs.values() if t in c)
        if not df:
            continue
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        for chunk_id, c in docs.items():
            if t in c:
                dl = sum(c.values())
                scores[chunk_id] = scores.get(chunk_id, 0.0) + idf * c[t] * 2.2 / (
                    c[t] + 1.2 * (0.25 + 0.75 * dl / avgdl))
    return scores


def test_bm25_matches_a_from_scratch_computation_after_updates_and_deletes(
        client: Any, owner: psycopg.Connection[Any]) -> None:
    kb = client.create_corpus("kb", FAKE)
    kb.add(sample_documents())
    query = "quota exceeded: raise the quota limit for compute hours"
    for step in range(3):
        hits = kb.search(query, k=20, mode="keyword")
        expected = bm25_from_scratch(owner, kb.info.corpus_id, query)
        assert {h.chunk_id: h.score for h in hits} == pytest.approx(expected, rel=1e-9)
        assert hits[0].document_id == "error-e4012"
        assert all(h.model_key is None for h in hits)  # no model was involved
        if step == 0:
            kb.add([pyembed.Document("billing", "quota quota quota invoices")])  # update
        else:
            kb.add([pyembed.Document("gpu", "compute hours on GPUs")])
            client.conn.execute("DELETE FROM pyembed.documents WHERE document_id = 'backups'")
    consistent = owner.execute(
        """SELECT bool_and(l.df = (SELECT count(*) FROM pyembed.postings p
                                    WHERE p.corpus_id = l.corpus_id AND p.lexeme = l.lexeme))
             FROM pyembed.lexeme_stats l""").fetchone()
    assert consistent == (True,)
    orphans = owner.execute("SELECT count(*) FROM pyembed.postings p WHERE NOT EXISTS (SELECT "
                            "FROM pyembed.chunks ch WHERE ch.corpus_id = p.corpus_id AND "
                            "ch.chunk_id = p.chunk_id)").fetchone()
    assert orphans == (0,)  # deleted and replaced chunks took their postings


def test_keyword_finds_an_exact_error_code_and_hybrid_keeps_it_first(client: Any) -> None:
    kb = client.create_corpus("support", pyembed.LOCAL_DEFAULT.key)
    kb.add(sample_documents())
    assert kb.search("E5003", k=1, mode="keyword")[0].document_id == "error-e5003"
    hybrid = kb.search("what do I do about E5003", k=3, mode="hybrid")
    assert hybrid[0].document_id == "error-e5003"
    assert hybrid[0].model_key == pyembed.LOCAL_DEFAULT.key
    assert [h.score for h in hybrid] == sorted((h.score for h in hybrid), reverse=True)


def test_long_natural_query_matches_with_or_semantics(client: Any) -> None:
    kb = client.create_corpus("or", FAKE)
    kb.add(sample_documents())
    # Most of these words appear in no document: an AND query would match nothing.
    hits = kb.search("is single sign-on with SAML possible for our enterprise zebra team",
                     k=3, mode="keyword")
    assert hits and hits[0].document_id == "sso"


def test_keyword_and_hybrid_respect_filters_and_the_guard(client: Any) -> None:
    kb = client.create_corpus("filtered", FAKE)
    kb.add([pyembed.Document("a", "error code E1", {"team": "x"}),
            pyembed.Document("b", "error code E1 again", {"team": "y"})])
    hits = kb.search("error E1", k=5, mode="keyword", filter={"team": "y"})
    assert [h.document_id for h in hits] == ["b"]
    hits = kb.search("error E1", k=5, mode="hybrid", filter={"team": "x"})
    assert [h.document_id for h in hits] == ["a"]
    vec = client.embedder("fake/fake-hash@2:1024").embed_query("error")
    with pytest.raises(pyembed.ModelMismatch):
        pyembed.search.search(client.conn, "filtered", vec, "fake/fake-hash@2:1024",
                             mode="hybrid", text="error")
    with pytest.raises(pyembed.InvalidInput):
        kb.search("error", mode="fuzzy")


def test_keyword_search_in_sql_and_search_text_modes(app: psycopg.Connection[Any],
                                                     client: Any) -> None:
    kb = client.create_corpus("sqlmodes", pyembed.LOCAL_DEFAULT.key)
    kb.add(sample_documents())
    for mode in ("vector", "keyword", "hybrid"):
        row = app.execute("SELECT document_id FROM pyembed.search_text('sqlmodes', "
                          "'error E4012 quota', 1, NULL, %s)", (mode,)).fetchone()
        assert row == ("error-e4012",), mode
    with pytest.raises(psycopg.Error) as err:
        app.execute("SELECT * FROM pyembed.search_keyword('sqlmodes', '   ', 5)")
    assert err.value.sqlstate == "PE005"
