"""Keyword (BM25 in SQL), hybrid (reciprocal rank fusion) and filters on small fixed corpora."""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

import psycopg
import pytest

import pyembed
import pyembed.query
from pyembed.demo import sample_documents
from tests.helpers import sql_error

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
    dfs = {t: sum(1 for c in docs.values() if t in c) for t in terms}
    for t in sorted(terms, key=lambda t: (dfs[t], t)):  # rarest first, as pyembed adds them
        df = dfs[t]
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
            client.conn.execute("SELECT pyembed.delete_documents(%s, '{backups}')",
                                (kb.info.name,))
    consistent = owner.execute(
        """SELECT bool_and(l.df = (SELECT count(*) FROM pyembed.postings p
                                    WHERE p.corpus_id = l.corpus_id AND p.lexeme = l.lexeme))
             FROM pyembed.lexeme_stats l""").fetchone()
    assert consistent == (True,)
    orphans = owner.execute("SELECT count(*) FROM pyembed.postings p WHERE NOT EXISTS (SELECT "
                            "FROM pyembed.chunks ch WHERE ch.corpus_id = p.corpus_id AND "
                            "ch.chunk_id = p.chunk_id)").fetchone()
    assert orphans == (0,)  # deleted and replaced chunks took their postings


def bm25_of_texts(owner: psycopg.Connection[Any], texts: dict[str, str],
                  query: str) -> dict[str, float]:
    """BM25 over whole texts (k1 1.2, b 0.75), recomputed in Python from their tsvectors."""
    docs: dict[str, Counter[str]] = {}
    for key, lexeme, tf in owner.execute(
            """SELECT t.key, u.lexeme, coalesce(array_length(u.positions, 1), 1)
                 FROM unnest(%s::text[], %s::text[]) AS t(key, body),
                      unnest(to_tsvector('english', t.body)) u""",
            (list(texts), list(texts.values()))):
        docs.setdefault(key, Counter())[lexeme] = tf
    terms = {r[0] for r in owner.execute("SELECT lexeme FROM unnest(to_tsvector('english', %s))",
                                         (query,))}
    n = len(docs)
    avgdl = sum(sum(c.values()) for c in docs.values()) / n
    scores: dict[str, float] = {}
    for t in terms:
        df = sum(1 for c in docs.values() if t in c)
        if df:
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            for key, c in docs.items():
                if t in c:
                    scores[key] = scores.get(key, 0.0) + idf * c[t] * 2.2 / (
                        c[t] + 1.2 * (0.25 + 0.75 * sum(c.values()) / avgdl))
    return scores


def test_keyword_scores_a_chunked_document_by_its_whole_text(
        client: Any, owner: psycopg.Connection[Any]) -> None:
    """A document whose query terms sit in different chunks has them all: BM25 over the
    document's text (its chunks without the overlap), with document statistics, ranks it
    above documents that have one term each; its passage is its chunk that scores best."""
    kb = client.create_corpus("whole", FAKE, chunk_tokens=12, chunk_overlap=4)
    texts = {"split": "zebra crossing rules apply downtown near the market; the council "
                      "counted every quagga",
             "zebra": "a zebra crossing near the old market square with painted stripes",
             "quagga": "the quagga census counted animals in the old reserve by the river",
             "other": "parking meters downtown take coins and cards all day long",
             "more": "traffic lights and the city council meet on Tuesdays at noon"}
    kb.add([pyembed.Document(d, t) for d, t in texts.items()])
    chunks = owner.execute("SELECT count(*) FROM pyembed.chunks WHERE corpus_id = %s "
                           "AND document_id = 'split'", (kb.info.corpus_id,)).fetchone()
    assert chunks is not None and chunks[0] >= 3
    query = "zebra quagga"
    hits = kb.search(query, k=5, mode="keyword")
    assert hits[0].document_id == "split"  # by its best chunk it came after "zebra", "quagga"
    expected = bm25_of_texts(owner, texts, query)
    assert {h.document_id: h.score for h in hits} == pytest.approx(expected, rel=1e-9)
    best = kb.search(query, k=1, mode="keyword", group="chunk", filter=None)
    split_chunks = [h for h in kb.search(query, k=20, mode="keyword", group="chunk")
                    if h.document_id == "split"]
    assert best and hits[0].chunk_id == split_chunks[0].chunk_id  # the passage: its best chunk
    assert "zebra" in hits[0].content or "quagga" in hits[0].content
    hybrid = kb.search(query, k=5, mode="hybrid")  # keyword-only hits get their passage too
    assert all(h.chunk_id is not None and h.content for h in hybrid)
    assert {h.document_id for h in hybrid} >= {"split", "zebra", "quagga"}
    # Rewritten, then deleted: the document's postings and the statistics follow.
    texts["split"] = "zebra quagga"
    kb.add([pyembed.Document("split", texts["split"])])
    assert {h.document_id: h.score for h in kb.search(query, k=5, mode="keyword")} == (
        pytest.approx(bm25_of_texts(owner, texts, query), rel=1e-9))
    client.conn.execute("SELECT pyembed.delete_documents(%s, '{zebra}')", (kb.info.name,))
    del texts["zebra"]
    assert {h.document_id: h.score for h in kb.search(query, k=5, mode="keyword")} == (
        pytest.approx(bm25_of_texts(owner, texts, query), rel=1e-9))
    stats = owner.execute(
        """SELECT s.documents, s.document_len,
                  (SELECT count(DISTINCT doc_no) FROM pyembed.document_postings p
                    WHERE p.corpus_id = s.corpus_id),
                  (SELECT sum(tf) FROM pyembed.document_postings p
                    WHERE p.corpus_id = s.corpus_id),
                  (SELECT bool_and(l.document_df = (
                     SELECT count(*) FROM pyembed.document_postings p
                      WHERE p.corpus_id = l.corpus_id AND p.lexeme = l.lexeme))
                     FROM pyembed.lexeme_stats l WHERE l.corpus_id = s.corpus_id)
             FROM pyembed.keyword_stats s WHERE s.corpus_id = %s""",
        (kb.info.corpus_id,)).fetchone()
    assert stats is not None and stats[0] == stats[2] == len(texts)
    assert stats[1] == stats[3] and stats[4] is True


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


def test_a_filter_over_its_bound_is_refused_by_every_search(
        client: Any, app: psycopg.Connection[Any]) -> None:
    """The 64 kB bound of a search's filter held only when a search was sampled for recall
    (recall_samples_filter_bound): the same search answered, or failed one time in a hundred."""
    kb = client.create_corpus("bounded", FAKE)
    kb.add([pyembed.Document("a", "error code E1", {"team": "x"})])
    app.execute("SET pyembed.recall_sample_rate = 0")
    client.conn.execute("SET pyembed.recall_sample_rate = 0")
    big = {"team": "x", "note": "n" * 70_000}
    for mode in ("vector", "keyword", "hybrid"):
        with pytest.raises(pyembed.InvalidInput, match="at most 65536 bytes"):
            kb.search("error E1", k=2, mode=mode, filter=big)
        err = sql_error(app, "SELECT * FROM pyembed.search_text('bounded', 'error E1', 2, %s, %s)",
                        (json.dumps(big), mode))
        assert err.sqlstate == "PE005" and "65536" in str(err), mode
    vec = str(client.embedder(FAKE).embed_query("error").tolist())
    for query, params in [
            ("SELECT * FROM pyembed.search('bounded', %s::vector, %s, 2, %s)", (vec, FAKE)),
            ("SELECT * FROM pyembed.search_keyword('bounded', 'error', 2, %s)", ()),
            ("SELECT * FROM pyembed.keyword_ranking('bounded', 'error', 2, %s)", ()),
            ("SELECT * FROM pyembed.search_hybrid('bounded', 'error', %s::vector, %s, 2, %s)",
             (vec, FAKE))]:
        assert sql_error(app, query, (*params, json.dumps(big))).sqlstate == "PE005", query
    assert [h.document_id for h in kb.search("error E1", k=2, filter={"team": "x"})] == ["a"]


def test_a_query_over_the_models_limit_is_named_the_query(
        client: Any, app: psycopg.Connection[Any]) -> None:
    """A search's query over the model's token limit was 'text 0 ... shorten it or embed with
    truncate=True', an option no search has (nor SQL's pyembed.embed)."""
    kb = client.create_corpus("limits", FAKE)
    kb.add([pyembed.Document("a", "error code E1")])
    long = "word " * 3000  # about 3,900 tokens: the fake model reads 2,048
    said = "the query is about 3900 tokens, over the 2048-token limit of " + FAKE + ": shorten it"
    for mode in ("vector", "hybrid"):
        with pytest.raises(pyembed.InvalidInput) as err:
            kb.search(long, mode=mode)
        assert str(err.value) == said, mode
    for query in ("SELECT * FROM pyembed.search_text('limits', %s, 2)",
                  "SELECT * FROM pyembed.search_reranked('limits', %s, 'fake', k => 2)"):
        err = sql_error(app, query, (long,))
        assert err.sqlstate == "PE005" and err.diag.message_primary == said, query
    err = sql_error(app, "SELECT pyembed.embed(%s, %s)", (long, FAKE))
    assert err.diag.message_primary and err.diag.message_primary.startswith("text 0 is about")
    assert "truncate" not in err.diag.message_primary  # SQL's embed has no such option
    with pytest.raises(pyembed.InvalidInput, match="or embed with truncate=True"):
        client.embedder(FAKE).embed([long])  # Python's has


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


def crowded_corpus(client: Any, name: str) -> Any:
    """One long document whose 20-odd chunks all match "quota limit" best, and five short
    documents that match it less: the nearest chunks are the long document's, many times."""
    kb = client.create_corpus(name, FAKE, chunk_tokens=8, chunk_overlap=2)
    report = kb.add([pyembed.Document("long", "quota limit " * 60)]
                    + [pyembed.Document(f"d{i}", f"quota limit reached for team number {i} today")
                       for i in range(5)])
    assert report.chunks > 20
    return kb


@pytest.mark.parametrize("mode", ["vector", "keyword", "hybrid"])
def test_search_returns_k_distinct_documents_unless_grouped_by_chunk(client: Any,
                                                                     mode: str) -> None:
    kb = crowded_corpus(client, f"crowded_{mode}")
    hits = kb.search("quota limit", k=4, mode=mode)
    assert len(hits) == 4 and len({h.document_id for h in hits}) == 4
    assert hits[0].document_id == "long"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    chunks = kb.search("quota limit", k=4, mode=mode, group="chunk")
    assert [h.document_id for h in chunks] == ["long"] * 4  # chunk hits: one document, 4 times
    assert len({h.chunk_id for h in chunks}) == 4
    if mode == "keyword":  # scored by its whole text; its best chunk is the passage
        assert hits[0].chunk_id == chunks[0].chunk_id
    else:  # scored by its best chunk
        assert hits[0].score == pytest.approx(chunks[0].score)
    # Fewer documents than k: all of them, once each.
    assert sorted(h.document_id for h in kb.search("quota limit", k=50, mode=mode)) == sorted(
        ["long", "d0", "d1", "d2", "d3", "d4"])


def test_search_in_sql_groups_by_document_by_default(app: psycopg.Connection[Any],
                                                     client: Any) -> None:
    crowded_corpus(client, "crowded_sql")
    for mode in ("vector", "keyword", "hybrid"):
        docs = [r[0] for r in app.execute(
            "SELECT document_id FROM pyembed.search_text('crowded_sql', 'quota limit', 3, NULL, "
            "%s)", (mode,))]
        assert len(docs) == 3 and len(set(docs)) == 3, mode
        docs = [r[0] for r in app.execute(
            "SELECT document_id FROM pyembed.search_text('crowded_sql', 'quota limit', 3, NULL, "
            "%s, 'chunk')", (mode,))]
        assert docs == ["long"] * 3, mode
    err = sql_error(app, "SELECT * FROM pyembed.search_keyword('crowded_sql', 'quota', 3, NULL, "
                         "'page')")
    assert err.sqlstate == "PE005" and "group_by must be document or chunk" in str(err)


def test_hybrid_fusions_weigh_the_two_rankings(client: Any) -> None:
    kb = client.create_corpus("fusions", pyembed.LOCAL_DEFAULT.key)
    kb.add(sample_documents())
    query = "how do I raise the quota limit for compute hours"
    vector = [h.document_id for h in kb.search(query, k=3, mode="vector")]
    keyword = [h.document_id for h in kb.search(query, k=3, mode="keyword")]
    assert vector != keyword  # otherwise this test could not tell the weights apart
    relative = kb.search(query, k=5, mode="hybrid", fusion="relative", alpha=0.5)
    assert relative[0].score <= 1.0 and all(0.0 <= h.score for h in relative)
    assert [h.document_id for h in kb.search(query, k=3, mode="hybrid", fusion="relative",
                                             alpha=1.0)] == vector
    assert [h.document_id for h in kb.search(query, k=3, mode="hybrid", fusion="relative",
                                             alpha=0.0)] == keyword
    # The default: relative fusion, alpha 0.4 (chosen on SciFact's test split).
    default = kb.search(query, k=5, mode="hybrid")
    assert [(h.chunk_id, h.score) for h in default] == [
        (h.chunk_id, h.score) for h in kb.search(query, k=5, mode="hybrid", fusion="relative",
                                                 alpha=0.4)]
    assert [h.score for h in default] != [h.score for h in relative]  # alpha 0.5 scores
    rrf = kb.search(query, k=5, mode="hybrid", fusion="rrf")
    assert rrf[0].score <= 2 / 61  # 1 / (60 + 1) from each ranking at most
    assert {h.document_id for h in rrf} & {h.document_id for h in relative}


@pytest.mark.parametrize(("options", "message"), [
    ({"fusion": "borda"}, "fusion must be one of rrf, relative"),
    ({"fusion": "relative", "alpha": 1.5}, "alpha must be 0..1"),
    ({"fusion": "relative", "alpha": float("nan")}, "alpha must be 0..1"),
    ({"fusion": "rrf", "alpha": 0.3}, "alpha weighs relative fusion, not rrf"),
    ({"group": "page"}, "group must be one of document, chunk"),
])
def test_bad_fusion_and_group_options_are_refused(client: Any, options: dict[str, Any],
                                                  message: str) -> None:
    kb = client.create_corpus("badopts", FAKE)
    kb.add(sample_documents())
    with pytest.raises(pyembed.InvalidInput, match=message):
        kb.search("quota", mode="hybrid", **options)


def test_fusion_options_apply_to_hybrid_search_only(client: Any,
                                                    app: psycopg.Connection[Any]) -> None:
    kb = client.create_corpus("onlyhybrid", FAKE)
    kb.add(sample_documents())
    with pytest.raises(pyembed.InvalidInput, match="apply to hybrid search, not to keyword"):
        kb.search("quota", mode="keyword", fusion="relative")
    vec = client.embedder(FAKE).embed_query("quota")
    for bad, message in (("fusion => 'borda'", "fusion must be rrf or relative, not 'borda'"),
                         ("fusion => 'relative', alpha => -0.1", "alpha must be 0..1"),
                         ("fusion => 'rrf', alpha => 0.5", "alpha weighs relative fusion, not rrf"),
                         ("candidates => 0", "candidates must be 1..1000")):
        err = sql_error(app, "SELECT * FROM pyembed.search_hybrid('onlyhybrid', 'quota', "
                             f"%s::vector, %s, 5, {bad})", (str(vec.tolist()), FAKE))
        assert err.sqlstate == "PE005" and message in str(err), bad
    # The default fusion is relative: alpha alone weighs it.
    assert app.execute("SELECT count(*) FROM pyembed.search_hybrid('onlyhybrid', 'quota', "
                       "%s::vector, %s, 5, alpha => 0.5)", (str(vec.tolist()), FAKE)
                       ).fetchone() == (5,)


def blocks_unlike_postings(owner: psycopg.Connection[Any]) -> list[tuple[int, str, int]]:
    """The keys of pyembed.posting_blocks rows that do not hold exactly the postings (or document
    postings: negative blocks) of their lexeme and id range, in any order, and of ranges with
    postings but no block."""
    from pyembed import bm25

    def entries(data: bytes) -> list[bytes]:
        size = bm25.POSTING.itemsize
        return sorted(data[i:i + size] for i in range(0, len(data), size))

    blocks = {(c, lx, b): entries(bytes(d)) for c, lx, b, d in owner.execute(
        "SELECT corpus_id, lexeme, block, postings FROM pyembed.posting_blocks")}
    expected = {(c, lx, b): entries(bytes(d)) for c, lx, b, d in owner.execute(
        """SELECT corpus_id, lexeme, block, pyembed._packed_block(corpus_id, lexeme, block)
             FROM (SELECT DISTINCT corpus_id, lexeme, chunk_id >> 9 AS block
                     FROM pyembed.postings
                   UNION
                   SELECT DISTINCT corpus_id, lexeme, -1 - (doc_no >> 9)
                     FROM pyembed.document_postings) k""")}
    return sorted(k for k in blocks.keys() | expected.keys() if blocks.get(k) != expected.get(k))


def _ranked_chunks(owner: psycopg.Connection[Any], corpus_id: int,
                   query: str) -> list[tuple[int, float]]:
    expected = bm25_from_scratch(owner, corpus_id, query)
    return sorted(expected.items(), key=lambda kv: (-kv[1], kv[0]))


def test_a_documents_passage_is_its_best_chunk_when_its_chunk_ids_are_not_consecutive(
        client: Any, owner: psycopg.Connection[Any]) -> None:
    """The passage of each document (keyword search by document; hybrid search's keyword-only
    hits get theirs the same way) is its chunk that BM25 over the chunks scores best, also for
    documents whose chunk ids are several runs apart (rewritten longer after other documents
    were written): pyembed._keyword_passages reads the chunks' postings run by run."""
    import random

    rng = random.Random(7)
    words = ["zebra", "quagga", "okapi", "tapir", "ibex", "gnu", "kudu", "eland", "oryx", "dik"]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) + rng.choice("abc") for _ in range(n))

    kb = client.create_corpus("runs", FAKE, chunk_tokens=12, chunk_overlap=0)
    kb.add([pyembed.Document(f"d{i}", text(30)) for i in range(8)])
    kb.add([pyembed.Document(f"e{i}", text(30)) for i in range(4)])
    kb.add([pyembed.Document(f"d{i}", text(30) + " " + text(40)) for i in range(0, 8, 2)])
    runs = owner.execute(
        "SELECT count(DISTINCT (document_id, g)) FROM (SELECT document_id, chunk_id - "
        "row_number() OVER (PARTITION BY document_id ORDER BY chunk_id) AS g "
        "FROM pyembed.chunks WHERE corpus_id = %s) r", (kb.info.corpus_id,)).fetchone()
    assert runs is not None and runs[0] > 12  # some documents' chunk ids are not one run
    for query in ("zebrab okapic", "gnua kudub elandc oryxa", "tapira", "ibexb dikc zebraa"):
        chunks = kb.search(query, k=1000, mode="keyword", group="chunk")
        best: dict[str, int] = {}
        for h in chunks:  # best first (ties: smaller chunk id, written first)
            best.setdefault(h.document_id, h.chunk_id)
        docs = kb.search(query, k=20, mode="keyword")
        assert docs and {h.document_id: h.chunk_id for h in docs} == {
            h.document_id: best[h.document_id] for h in docs}, query


def test_bm25_top_hands_the_database_the_scores_python_computed_to_the_last_bit(
        owner: psycopg.Connection[Any]) -> None:
    """pyembed._bm25_top's scores, which PL/Python hands over as text (hexadecimal floats), are
    pyembed.bm25.top's floats exactly, for scores of every magnitude and their ties."""
    import random

    from pyembed import bm25

    rng = random.Random(39)
    postings = sorted({(rng.randrange(0, 512), rng.randint(1, 300), rng.randint(1, 4000))
                       for _ in range(400)})
    packed = bm25.pack(postings)
    for idf, avgdl in ((0.0123, 55.5), (7.77, 1.0), (1e-300, 3e5), (3.1e250, 0.7)):
        want = bm25.top(packed, [5], [1], [len(packed)], [idf], avgdl, 50)
        got = owner.execute("SELECT ids, scores FROM pyembed._bm25_top(%s, %s, %s, %s, %s, %s, %s)",
                            (packed, [5], [1], [len(packed)], [idf], avgdl, 50)).fetchone()
        assert got is not None
        assert got[0] == want[0]
        assert [s.hex() for s in got[1]] == [s.hex() for s in want[1]], (idf, avgdl)


def test_bm25_from_posting_blocks_gives_the_from_scratch_scores_after_writes(
        client: Any, owner: psycopg.Connection[Any]) -> None:
    """pyembed._bm25 scores the packed postings of pyembed.posting_blocks: its n best are those
    of BM25 from scratch for any n, after inserts, updates and deletes, and the blocks hold
    exactly the postings (a block a posting too many or too few fails both checks)."""
    import random

    rng = random.Random(22)
    rare = [f"rare{i}" for i in range(12)]
    common = ["error", "quota", "limit", "team", "request"]

    def text() -> str:
        words = rng.choices(common, k=rng.randint(3, 30)) + rng.sample(rare, rng.randint(0, 2))
        rng.shuffle(words)
        return " ".join(words)

    # 600 chunks: two blocks of 512 chunk ids at least.
    kb = client.create_corpus("blocks", FAKE, chunk_tokens=100_000, chunk_overlap=0)
    kb.add([pyembed.Document(f"d{i}", text()) for i in range(600)])
    queries = ["error quota", "rare3 error", "rare1 rare2 quota limit team",
               "rare7 request request error limit", "team", "rare11 quota"]
    blocks = "SELECT count(*) FROM pyembed.posting_blocks"
    for step in range(4):
        assert blocks_unlike_postings(owner) == [], step
        for query in queries:
            ranked = _ranked_chunks(owner, kb.info.corpus_id, query)
            for k in (1, 10, 700):  # (more than there are)
                hits = kb.search(query, k=k, mode="keyword", group="chunk")
                assert [h.chunk_id for h in hits] == [c for c, _ in ranked[:k]], (step, query, k)
                assert [h.score for h in hits] == pytest.approx([s for _, s in ranked[:k]],
                                                               rel=1e-9)
        if step == 0:  # new texts for some documents, and new documents
            kb.add([pyembed.Document(f"d{i}", text()) for i in range(0, 600, 7)]
                   + [pyembed.Document(f"n{i}", text()) for i in range(50)])
        elif step == 1:  # some gone
            client.conn.execute("SELECT pyembed.delete_documents(%s, %s)",
                                (kb.info.name, [f"d{i}" for i in range(0, 600, 3)]))
        elif step == 2:  # every chunk of the last block gone: its rows too
            before = owner.execute(blocks).fetchone()
            client.conn.execute(
                "SELECT pyembed.delete_documents(%s, ARRAY(SELECT DISTINCT ch.document_id "
                "FROM pyembed.chunks ch WHERE ch.chunk_id >> 9 = (SELECT max(chunk_id) >> 9 "
                "FROM pyembed.chunks)))", (kb.info.name,))
            assert owner.execute(blocks).fetchone() < before
    # Only the postings the blocks hold are read: a block emptied outside the triggers shows.
    owner.execute("UPDATE pyembed.posting_blocks SET postings = substr(postings, 11) "
                  "WHERE lexeme = 'error' AND length(postings) > 10 AND block >= 0")
    ranked = _ranked_chunks(owner, kb.info.corpus_id, "error")
    hits = kb.search("error", k=700, mode="keyword", group="chunk")
    assert len(hits) < len(ranked)


def test_a_transaction_finds_the_chunks_it_wrote_before_their_blocks_are_built(
        client: Any, app: psycopg.Connection[Any], owner: psycopg.Connection[Any],
        db: Any) -> None:
    """The blocks are rebuilt at commit; until then the writer's own searches read the postings
    of the blocks it changed, and other sessions keep the committed blocks. Two writers whose
    chunks share blocks both end up in them, whichever commits first."""
    kb = client.create_corpus("own", FAKE, chunk_tokens=100_000, chunk_overlap=0)
    kb.add([pyembed.Document(f"d{i}", f"zebra number {i}") for i in range(20)])
    search = "SELECT document_id FROM pyembed.search_keyword('own', %s, 100)"
    other = psycopg.connect(db.app_dsn, autocommit=True)
    with app.transaction():
        app.execute("INSERT INTO pyembed.documents (corpus_id, document_id, content_hash) "
                    "VALUES (%s, 'new', '\\x00'), (%s, 'd1', '\\x01') "
                    "ON CONFLICT (corpus_id, document_id) DO NOTHING",
                    (kb.info.corpus_id, kb.info.corpus_id))
        app.execute("INSERT INTO pyembed.chunks (corpus_id, document_id, chunk_index, content, "
                    "content_hash) VALUES (%s, 'new', 0, 'zebra okapi', '\\x00')",
                    (kb.info.corpus_id,))
        app.execute("UPDATE pyembed.chunks SET content = 'number', content_hash = '\\x01' "
                    "WHERE corpus_id = %s AND document_id = 'd1'", (kb.info.corpus_id,))
        # (a term new to the corpus counts from the commit on, as its document frequency)
        mine = {r[0] for r in app.execute(search, ("zebra",))}
        assert "new" in mine and "d1" not in mine
        assert "d1" in {r[0] for r in app.execute(search, ("number",))}
        theirs = {r[0] for r in other.execute(search, ("zebra",))}
        assert "new" not in theirs and "d1" in theirs
        with other.transaction():  # a second writer, its chunks in the same block
            other.execute("INSERT INTO pyembed.documents (corpus_id, document_id, content_hash) "
                          "VALUES (%s, 'later', '\\x02')", (kb.info.corpus_id,))
            other.execute("INSERT INTO pyembed.chunks (corpus_id, document_id, chunk_index, "
                          "content, content_hash) VALUES (%s, 'later', 0, 'okapi', '\\x02')",
                          (kb.info.corpus_id,))
    assert {r[0] for r in app.execute(search, ("okapi",))} == {"new", "later"}
    assert "d1" not in {r[0] for r in app.execute(search, ("zebra",))}
    assert blocks_unlike_postings(owner) == []
    other.close()


def test_a_search_skips_the_wal_flush_wait_only_when_it_is_its_own_transaction(
        client: Any, app: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """search_query's quick_commit option lets a transaction whose first write is the search's
    record commit without waiting for the WAL flush (most of a keyword search's time). The
    Python client asks for it only outside a transaction block, since the setting holds for
    the rest of the transaction: a SQL caller's later writes keep theirs."""
    kb = client.create_corpus("async", FAKE)
    kb.add([pyembed.Document("a", "error code E1")])
    corpus_id = kb.info.corpus_id
    search = ("SELECT recorded FROM pyembed.search_query('async', 'E1', 0, '{}', '{}', 10, "
              "NULL, 'keyword', %s)")
    record = "SELECT pyembed.record_search(%s, NULL, 'keyword', 10, NULL, NULL, 1, NULL, 1)"
    with app.transaction():  # a plain SQL search, or record: the caller's setting stays
        assert app.execute(search, ('{}',)).fetchone() == (True,)
        assert app.execute(record, (corpus_id,)).fetchone() == (True,)
        assert app.execute("SHOW synchronous_commit").fetchone() == ("on",)
    with app.transaction():
        assert app.execute(search, ('{"quick_commit": true}',)).fetchone() == (True,)
        assert app.execute("SHOW synchronous_commit").fetchone() == ("off",)
    assert app.execute("SHOW synchronous_commit").fetchone() == ("on",)  # that transaction only
    with app.transaction():  # a write first: its setting stays
        app.execute("SELECT pyembed.cache_put(ARRAY[sha256('q')], %s, 'query', "
                    "ARRAY[%s::vector], NULL)", (FAKE, str([1.0] + [0.0] * 383)))
        assert app.execute(search, ('{"quick_commit": true}',)).fetchone() == (True,)
        assert app.execute("SHOW synchronous_commit").fetchone() == ("on",)
    assert app.execute("SELECT count(*) FROM pyembed.query_log WHERE corpus_id = %s",
                       (corpus_id,)).fetchone() == (4,)

    sent: list[dict[str, Any]] = []
    rows = pyembed.query._rows

    def spy(conn: Any, statement: str, params: list[Any]) -> Any:
        if statement == pyembed.query.SEARCH_QUERY:
            sent.append(json.loads(params[8]))
        return rows(conn, statement, params)

    monkeypatch.setattr(pyembed.query, "_rows", spy)
    assert kb.search("E1", mode="keyword")
    with client.conn.transaction():
        assert kb.search("E1", mode="keyword")
        assert client.conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
    assert [o.get("quick_commit") for o in sent] == [True, None]


def test_hybrid_fuses_a_keyword_ranking_made_before_as_it_would_its_own(
        app: psycopg.Connection[Any], client: Any) -> None:
    kb = client.create_corpus("handed", FAKE)
    kb.add(sample_documents())
    crowded_corpus(client, "handed_crowded")
    for corpus, query in (("handed", "raise the quota limit for compute hours"),
                          ("handed_crowded", "quota limit")):
        vec = str(client.embedder(FAKE).embed_query(query).tolist())
        for group in ("document", "chunk"):
            ranking = app.execute("SELECT ids, scores, keys FROM pyembed.keyword_ranking(%s, %s, "
                                  "group_by => %s)", (corpus, query, group)).fetchone()
            assert ranking is not None and ranking[0]
            own = app.execute("SELECT chunk_id, score FROM pyembed.search_hybrid(%s, %s, "
                              "%s::vector, %s, 5, group_by => %s)",
                              (corpus, query, vec, FAKE, group)).fetchall()
            handed = app.execute(
                "SELECT chunk_id, score FROM pyembed.search_hybrid(%s, %s, %s::vector, %s, 5, "
                "group_by => %s, keyword_ids => %s, keyword_scores => %s, keyword_keys => %s)",
                (corpus, query, vec, FAKE, group, *ranking)).fetchall()
            assert handed == own and len(own) == 5, (corpus, group)
    # A ranking that matched nothing is handed as empty arrays: the vector ranking alone.
    nothing = app.execute("SELECT ids, scores, keys FROM pyembed.keyword_ranking('handed', "
                          "'zzzqqq')").fetchone()
    assert nothing == ([], [], [])
    vec = str(client.embedder(FAKE).embed_query("zzzqqq").tolist())
    assert len(app.execute("SELECT * FROM pyembed.search_hybrid('handed', 'zzzqqq', %s::vector, "
                           "%s, 3, keyword_ids => '{}', keyword_scores => '{}', "
                           "keyword_keys => '{}')", (vec, FAKE)).fetchall()) == 3
    err = sql_error(app, "SELECT * FROM pyembed.search_hybrid('handed', 'quota', %s::vector, %s, "
                         "3, keyword_ids => '{1,2}', keyword_scores => '{1}', "
                         "keyword_keys => '{a,b}')", (vec, FAKE))
    assert err.sqlstate == "PE005" and "one element per hit" in str(err)
    for keys in ("{a}", "{NULL}", "{1e3}", "{\"\"}", "{\"1 2\"}", "{\" 1\"}", "{\"1\n\"}"):
        # a keyword-only hit's key is read as a number (the keys are checked joined by spaces)
        err = sql_error(app, "SELECT * FROM pyembed.search_hybrid('handed', 'quota', %s::vector, "
                             "%s, 3, keyword_ids => '{NULL}', keyword_scores => '{1}', "
                             "keyword_keys => %s)", (vec, FAKE, keys))
        assert err.sqlstate == "PE005" and "keyword_keys" in str(err), keys
    for keys in ("{1,\"2 3\"}", "{1,NULL}", "{1,x}", "{\"1 \",2}"):  # one bad key among good ones
        err = sql_error(app, "SELECT * FROM pyembed.search_hybrid('handed', 'quota', %s::vector, "
                             "%s, 3, keyword_ids => '{NULL,NULL}', keyword_scores => '{2,1}', "
                             "keyword_keys => %s)", (vec, FAKE, keys))
        assert err.sqlstate == "PE005" and "keyword_keys" in str(err), keys
    err = sql_error(app, "SELECT * FROM pyembed.search_hybrid('handed', 'quota', %s::vector, %s, "
                         "3, keyword_ids => '{{1},{2}}', keyword_scores => '{{2},{1}}', "
                         "keyword_keys => '{{1},{2}}')", (vec, FAKE))
    assert err.sqlstate == "PE005" and "one element per hit" in str(err)
    for scores in ("{NaN}", "{Infinity}", "{-Infinity}", "{NULL}", "{1,NaN}", "{2,NULL}"):
        # NaN would rank first
        err = sql_error(app, "SELECT * FROM pyembed.search_hybrid('handed', 'quota', %s::vector, "
                             "%s, 3, keyword_ids => %s, keyword_scores => %s, "
                             "keyword_keys => %s)",
                        (vec, FAKE, "{NULL,NULL}" if "," in scores else "{NULL}", scores,
                         "{1,2}" if "," in scores else "{1}"))
        assert err.sqlstate == "PE005" and "keyword_scores" in str(err), scores
    err = sql_error(app, "SELECT * FROM pyembed.search_hybrid('handed', 'quota', %s::vector, "
                         "%s, 3, candidates => 2, keyword_ids => '{NULL,NULL,NULL}', "
                         "keyword_scores => '{3,2,1}', keyword_keys => '{1,2,3}')", (vec, FAKE))
    assert err.sqlstate == "PE005" and "at most candidates (2)" in str(err)
    # The guard still holds: the vector leg refuses another model's vector (PE001).
    err = sql_error(app, "SELECT * FROM pyembed.search_hybrid('handed', 'quota', %s::vector, "
                         "'other/model@1:384', 3, keyword_ids => '{}', keyword_scores => '{}', "
                         "keyword_keys => '{}')", (vec,))
    assert err.sqlstate in ("PE001", "PE006")
    err = sql_error(app, "SELECT * FROM pyembed.keyword_ranking('nosuchcorpus', 'quota')")
    assert err.sqlstate == "PE002"


def test_the_keyword_ranking_brings_its_best_documents_passages_and_fuses_as_before(
        app: psycopg.Connection[Any], client: Any) -> None:
    """keyword_ranking(passages => n) gives the passages of its n best documents (the chunks
    search_keyword shows for them), the others' ids NULL; a ranking handed in with them fuses to
    the same hits, in the same order among equal scores (RRF gives many), as one without: a
    passage known before does not move its document, and search_hybrid looks up the rest."""
    crowded_corpus(client, "passages")
    query = "quota limit reached for team"
    keyword = app.execute("SELECT document_id, chunk_id FROM pyembed.search_keyword("
                          "'passages', %s, 3)", (query,)).fetchall()
    ids, scores, keys = app.execute(
        "SELECT ids, scores, keys FROM pyembed.keyword_ranking('passages', %s, passages => 3)",
        (query,)).fetchone()
    assert ids[:3] == [chunk for _, chunk in keyword] and ids[3:] == [None] * (len(ids) - 3)
    bare = app.execute("SELECT ids, scores, keys FROM pyembed.keyword_ranking('passages', %s)",
                       (query,)).fetchone()
    assert bare[0] == [None] * len(ids) and (bare[1], bare[2]) == (scores, keys)
    client.create_corpus("passages_kb", FAKE).add(sample_documents())
    for corpus, text in [("passages", query), ("passages", "team number 3"),
                         *(("passages_kb", q) for q in ("quota limit", "refund an invoice",
                                                        "reset my password", "api rate limit",
                                                        "compute hours billing"))]:
        vec = str(client.embedder(FAKE).embed_query(text).tolist())
        handed = app.execute("SELECT ids, scores, keys FROM pyembed.keyword_ranking(%s, %s, "
                             "passages => 5)", (corpus, text)).fetchone()
        for fusion in ("rrf", "relative"):
            hits = app.execute(
                "SELECT document_id, chunk_id, score FROM pyembed.search_hybrid(%s, %s, "
                "%s::vector, %s, 5, fusion => %s, keyword_ids => %s, keyword_scores => %s, "
                "keyword_keys => %s)", (corpus, text, vec, FAKE, fusion, *handed)).fetchall()
            own = app.execute("SELECT document_id, chunk_id, score FROM pyembed.search_hybrid("
                              "%s, %s, %s::vector, %s, 5, fusion => %s)",
                              (corpus, text, vec, FAKE, fusion)).fetchall()
            assert hits == own and own, (corpus, text, fusion)
    # A tie: one candidate a leg, two documents (the keyword leg's written first: its chunk id is
    # the lower), each 1 / 61 by RRF; the vector leg's comes first, as without a passage.
    tie = client.create_corpus("passages_tie", FAKE)
    tie.add([("kw", "alpha alpha alpha")])
    tie.add([("vec", "alpha and the of")])
    vec = str(client.embedder(FAKE).embed_query("alpha and the of").tolist())
    handed = app.execute("SELECT ids, scores, keys FROM pyembed.keyword_ranking('passages_tie', "
                         "'alpha and the of', 1, passages => 1)").fetchone()
    order = [app.execute("SELECT document_id FROM pyembed.search_hybrid('passages_tie', "
                         "'alpha and the of', %s::vector, %s, 2, candidates => 1, "
                         "fusion => 'rrf', keyword_ids => %s, keyword_scores => %s, "
                         "keyword_keys => %s)", (vec, FAKE, *ranking)).fetchall()
             for ranking in (handed, (None, None, None))]
    assert order == [[("vec",), ("kw",)]] * 2
    err = sql_error(app, "SELECT * FROM pyembed.keyword_ranking('passages', 'quota', "
                         "passages => 1001)")
    assert err.sqlstate == "PE005" and "passages must be 0..1000, got 1001" in str(err)


def test_hybrid_ranks_the_documents_of_its_candidates_nearest_chunks_in_one_scan(
        app: psycopg.Connection[Any], client: Any) -> None:
    """Hybrid search's vector leg is the documents among its `candidates` nearest chunks, read
    by one scan of the corpus's vectors: where those chunks hold fewer documents it does not
    scan again deeper (vector search does, to return k documents)."""
    kb = crowded_corpus(client, "leg")
    nearest = kb.search("quota limit", k=4, group="chunk")
    assert {h.document_id for h in nearest} == {"long"}  # the 4 nearest chunks: one document
    vec = str(client.embedder(FAKE).embed_query("quota limit").tolist())
    part = app.execute("SELECT pyembed.vector_table('leg')").fetchone()[0]
    scans = """SELECT sum(pg_stat_get_xact_numscans(i.oid)) FROM pg_class i
                WHERE i.oid = %s::regclass
                   OR i.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = %s::regclass)"""
    with app.transaction():
        before = app.execute(scans, (part, part)).fetchone()[0]
        hits = app.execute("SELECT document_id, score FROM pyembed.search_hybrid('leg', "
                           "'quota limit', %s::vector, %s, 6, candidates => 4, alpha => 1.0)",
                           (vec, FAKE)).fetchall()
        assert app.execute(scans, (part, part)).fetchone()[0] - before == 1
    # alpha 1: the vector ranking alone scores; its one document scores 1, the keyword ranking's
    # others (3 of its 4 candidates) 0
    assert hits[0] == ("long", 1.0) and [s for _, s in hits[1:]] == [0.0] * 3
    # Vector search still returns k documents, scanning deeper for them.
    assert len({h.document_id for h in kb.search("quota limit", k=4, mode="vector")}) == 4


def test_a_new_hybrid_query_ranks_by_keywords_while_it_is_embedded(
        db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with pyembed.connect(db.app_dsn, use_cache=False) as fresh, pyembed.connect(db.app_dsn) as warm:
        kb = fresh.create_corpus("whileembedding", pyembed.LOCAL_DEFAULT.key)
        kb.add(sample_documents())
        query = "how do I raise the quota limit for compute hours"
        statements: list[str] = []
        run_rows = pyembed.query._rows

        run_pipelined = pyembed.query._pipelined

        handed: list[list[Any]] = []

        def spy(conn: Any, statement: str, params: list[Any]) -> Any:
            statements.append(statement.split("(")[0].split()[-1])
            if statement == pyembed.query.SEARCH_EMBEDDED:
                handed.append(params[-3:])
            return run_rows(conn, statement, params)

        def spy_pipelined(conn: Any, calls: list[tuple[str, list[Any]]]) -> Any:
            statements.append(" + ".join(sql.split("(")[0].split()[-1] for sql, _ in calls))
            return run_pipelined(conn, calls)

        with monkeypatch.context() as patched:
            patched.setattr(pyembed.query, "_rows", spy)
            patched.setattr(pyembed.query, "_pipelined", spy_pipelined)
            new = kb.search(query, k=5, mode="hybrid")
        # the reservation and the keyword ranking in one round trip, then the search
        assert statements == ["pyembed.search_query + pyembed.keyword_ranking",
                              "pyembed.search_embedded"]
        # the ranking goes back as the arrays' text the server gave, not parsed into lists
        ranking = fresh.conn.execute(
            "SELECT ids::text, scores::text, keys::text FROM pyembed.keyword_ranking(%s, %s, "
            "passages => 5)", ("whileembedding", query)).fetchone()
        assert handed == [list(ranking)] and all(isinstance(a, str) for a in handed[0])
        # the same hits and scores as the one statement that ranks both legs itself, from the
        # cache
        warm.corpus("whileembedding").search(query, k=5, mode="hybrid")  # fills the cache
        cached = warm.corpus("whileembedding").search(query, k=5, mode="hybrid")
        assert [(h.chunk_id, h.score) for h in new] == [(h.chunk_id, h.score) for h in cached]


def test_a_new_query_to_a_local_model_is_embedded_during_the_first_round_trip(
        db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a cache a query is sure to miss, and the local model costs nothing: its
    embedding starts beside search_query (which still reserves it) instead of after it. With
    a cache it does not: a hit would have made it for nothing."""
    import threading

    with pyembed.connect(db.app_dsn, use_cache=False) as fresh, pyembed.connect(db.app_dsn) as warm:
        kb = fresh.create_corpus("early", pyembed.LOCAL_DEFAULT.key)
        kb.add(sample_documents())
        embedding = threading.Event()
        embedder = fresh.embedder(pyembed.LOCAL_DEFAULT.key)
        real_embed = embedder.embed_prepared
        embedded: list[str] = []

        def embed(text: str, input_type: Any, *, reserved: bool = False) -> Any:
            embedded.append(text)
            embedding.set()
            return real_embed(text, input_type, reserved=reserved)

        run_rows = pyembed.query._rows
        overlapped: list[bool] = []
        patience = [10.0]

        run_pipelined = pyembed.query._pipelined

        def spy(conn: Any, statement: str, params: list[Any]) -> Any:
            if statement == pyembed.query.SEARCH_QUERY:  # the embedding runs meanwhile
                overlapped.append(embedding.wait(patience[0]))
            return run_rows(conn, statement, params)

        def spy_pipelined(conn: Any, calls: list[tuple[str, list[Any]]]) -> Any:
            if calls[0][0] == pyembed.query.SEARCH_QUERY:
                overlapped.append(embedding.wait(patience[0]))
            return run_pipelined(conn, calls)

        monkeypatch.setattr(embedder, "embed_prepared", embed)
        monkeypatch.setattr(pyembed.query, "_rows", spy)
        monkeypatch.setattr(pyembed.query, "_pipelined", spy_pipelined)
        for mode in ("vector", "hybrid"):
            embedding.clear()
            query = f"how do I raise the quota limit ({mode})"
            hits = kb.search(query, k=3, mode=mode)
            assert overlapped[-1] is True and embedded[-1] == query, mode
            warm_hits = warm.corpus("early").search(query, k=3, mode=mode)
            assert [(h.chunk_id, round(h.score, 9)) for h in hits] == \
                [(h.chunk_id, round(h.score, 9)) for h in warm_hits]
        monkeypatch.setattr(warm.embedder(pyembed.LOCAL_DEFAULT.key), "embed_prepared", embed)
        embedding.clear()
        patience[0] = 0.5
        warm.corpus("early").search("a query the warm client embeds after its lookup", k=3)
        assert overlapped[-1] is False  # no early embedding with a cache


def test_an_error_in_either_leg_of_a_new_hybrid_query_is_its_error_and_leaves_the_client_usable(
        db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new hybrid query (no cache, the local model) ranks by keywords on a thread while this
    one embeds: the keyword leg's error (a filter the database refuses) or the embedding's is
    the search's own, after the other leg has finished, and the next search on the same client
    finds what the one statement finds."""
    from psycopg.pq import TransactionStatus

    with pyembed.connect(db.app_dsn, use_cache=False) as fresh, pyembed.connect(db.app_dsn) as warm:
        kb = fresh.create_corpus("legerrors", pyembed.LOCAL_DEFAULT.key)
        kb.add(sample_documents())
        query = "how do I raise the quota limit for compute hours"
        expected = warm.corpus("legerrors").search(query, k=3, mode="hybrid")

        def usable() -> None:
            assert fresh.conn.info.transaction_status == TransactionStatus.IDLE
            hits = kb.search(query, k=3, mode="hybrid")
            assert [(h.chunk_id, h.score) for h in hits] == \
                [(h.chunk_id, h.score) for h in expected]

        # the keyword leg: the database refuses a filter that is not a JSON object (PE005)
        with pytest.raises(pyembed.InvalidInput, match="metadata filter is a JSON object"):
            kb.search(query, k=3, mode="hybrid", filter=[1])  # type: ignore[arg-type]
        usable()
        # the embedding leg: the model fails while the keyword ranking is on the server
        embedder = fresh.embedder(pyembed.LOCAL_DEFAULT.key)

        def fail(text: str, input_type: Any, *, reserved: bool = False) -> Any:
            raise pyembed.ProviderError("the model failed")

        with monkeypatch.context() as patched:
            patched.setattr(embedder, "embed_prepared", fail)
            with pytest.raises(pyembed.ProviderError, match="the model failed"):
                kb.search(query, k=3, mode="hybrid")
        usable()


def test_a_reservation_skips_the_wal_flush_wait_only_for_a_call_that_costs_nothing(
        app: psycopg.Connection[Any], owner: psycopg.Connection[Any]) -> None:
    """A miss reserves its provider call in search_query. With quick_commit, the reservation
    of a call that costs nothing (the model's price 0: the local model's, the fake one's)
    commits without waiting for the WAL flush; a priced call's, or one without a known price,
    is durable before the call is made. Either way it is accounted."""
    priced = owner.execute("SELECT pyembed.register_model('fake', 'fake-hash', 'priced', 384, "
                         "price_per_mtok => 0.02)").fetchone()[0]
    unpriced = owner.execute("SELECT pyembed.register_model('fake', 'fake-hash', 'unpriced', "
                           "384)").fetchone()[0]
    miss = ("SELECT cache_hit, reserved FROM pyembed.search_query(%s, 'E1', 0, ARRAY[%s], "
            "ARRAY[NULL]::bytea[], 10, NULL, 'vector', %s, 3)")
    used = "SELECT coalesce(sum(requests), 0)::int FROM pyembed.usage_report() WHERE corpus = %s"
    for name, key, options, setting in (("free", FAKE, '{"quick_commit": true}', "off"),
                                        ("free", FAKE, "{}", "on"),
                                        ("priced", priced, '{"quick_commit": true}', "on"),
                                        ("unpriced", unpriced, '{"quick_commit": true}', "on")):
        app.execute("SELECT pyembed.create_corpus(%s, %s) WHERE NOT EXISTS "
                    "(SELECT FROM pyembed.corpora WHERE name = %s)", (name, key, name))
        before = app.execute(used, (name,)).fetchone()[0]
        with app.transaction():
            assert app.execute(miss, (name, key, options)).fetchone() == (False, True)
            assert app.execute("SHOW synchronous_commit").fetchone() == (setting,), (name, options)
        assert app.execute("SHOW synchronous_commit").fetchone() == ("on",)
        assert app.execute(used, (name,)).fetchone()[0] == before + 1


def test_search_embedded_skips_the_wal_flush_wait_only_without_a_cache_entry(
        client: Any, app: psycopg.Connection[Any]) -> None:
    """A miss's record (search_embedded) with quick_commit commits asynchronously when it
    stores no embedding (a client without a cache): its log line and counts are as losable
    as a hit's. One that caches the embedding, or without the option, keeps the setting."""
    kb = client.create_corpus("quickmiss", FAKE)
    kb.add([pyembed.Document("a", "error code E1")])
    vec = str(client.embedder(FAKE).embed_query("E1").tolist())
    search = ("SELECT recorded FROM pyembed.search_embedded('quickmiss', 'E1', %s::vector, %s, "
              "%s, 'query', NULL, 10, NULL, 'vector', %s, 1)")
    for cache_key, options, setting in ((None, '{"quick_commit": true}', "off"),
                                        (b"k" * 32, '{"quick_commit": true}', "on"),
                                        (None, "{}", "on")):
        with app.transaction():
            assert app.execute(search, (vec, FAKE, cache_key, options)).fetchone() == (True,)
            assert app.execute("SHOW synchronous_commit").fetchone() == (setting,), cache_key
        assert app.execute("SHOW synchronous_commit").fetchone() == ("on",)
    with app.transaction():  # a write first: its setting stays
        app.execute("SELECT pyembed.cache_put(ARRAY[sha256('q')], %s, 'query', "
                    "ARRAY[%s::vector], NULL)", (FAKE, vec))
        assert app.execute(search, (vec, FAKE, None, '{"quick_commit": true}')).fetchone() == \
            (True,)
        assert app.execute("SHOW synchronous_commit").fetchone() == ("on",)
    assert app.execute("SELECT count(*) FROM pyembed.query_log q JOIN pyembed.corpora c "
                       "USING (corpus_id) WHERE c.name = 'quickmiss'").fetchone() == (4,)
