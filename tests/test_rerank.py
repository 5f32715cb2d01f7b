"""The rerank stage: Voyage and Cohere rerankers through their SDKs against the fake server,
the offline fake, the cache, usage and limits, in Python, SQL and the command line."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

import pyembed
from pyembed import tenants
from pyembed.db import connect
from pyembed.errors import (
    InvalidInput,
    MissingAPIKey,
    ProviderError,
    RateLimited,
    UnknownModel,
)
from pyembed.localdb import APP_USER
from pyembed.providers.rerank import reranker_for
from pyembed.rerank import Reranker, fake_scores, reranker_spec
from tests.conftest import Database
from tests.fakeapi import FakeAPI
from tests.helpers import run_cli, sql_error
from tests.test_cli import db_env

FAKE = "fake/fake-hash@1:384"
KEYS = {"voyage": ("VOYAGE_API_KEY", "pa-rerank-voyage-1234"),
        "cohere": ("COHERE_API_KEY", "co-rerank-cohere-5678")}
MODELS = {"voyage": "voyage/rerank-2.5", "cohere": "cohere/rerank-v3.5"}
DOCS = [
    ("refunds", "Refunds: a refund is paid within 14 days of a returned order. Refunds of "
                "refunds, refund policy, refund refund refund."),
    ("late", "A late delivery gives a refund"),
    ("shipping", "Shipping and delivery times: standard delivery takes 3 to 5 days; express "
                 "delivery arrives the next day for orders placed before noon."),
    ("passwords", "Reset a password from the account page; the reset link expires in 1 hour."),
    ("quota", "Error E4012 means the quota is exceeded: raise the quota limit."),
]
QUERY = "refund for a late delivery"


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch, fake_api: FakeAPI) -> FakeAPI:
    """Both rerankers' keys set; their base URLs point at the fake server."""
    for env, value in KEYS.values():
        monkeypatch.setenv(env, value)
    return fake_api


def rerank_requests(api: FakeAPI) -> list[Any]:
    return [r for r in api.requests if r.path.endswith("/rerank")]


# -- the providers: real SDKs, fake server ----------------------------------------------------

@pytest.mark.parametrize("service", ["voyage", "cohere"])
def test_each_sdk_scores_every_text_in_input_order(service: str, keys: FakeAPI) -> None:
    texts = [text for _, text in DOCS]
    provider = reranker_for(reranker_spec(MODELS[service]))
    assert provider.score_batch(QUERY, texts) == pytest.approx(fake_scores(QUERY, texts))
    [request] = keys.requests
    assert request.path == f"/{service}/v{1 if service == 'voyage' else 2}/rerank"
    assert request.body["model"] == MODELS[service].split("/")[1]
    assert request.body["documents"] == texts and request.body["query"] == QUERY


def test_names_aliases_and_unknown_rerankers() -> None:
    assert reranker_spec("rerank-2.5").key == "voyage/rerank-2.5"
    assert reranker_spec("rerank-2.5-lite").key == "voyage/rerank-2.5-lite"
    assert reranker_spec("rerank-3.5").key == "cohere/rerank-v3.5"
    assert reranker_spec(" fake ").key == "fake/overlap"
    with pytest.raises(UnknownModel, match="no reranker named 'rerank-9'"):
        reranker_spec("rerank-9")


def test_one_string_is_not_a_list_of_candidates() -> None:
    """A str was iterated as its characters, each scored as a candidate of its own."""
    with pytest.raises(InvalidInput, match="candidates is a list of strings, not one str"):
        Reranker(reranker_spec("fake")).scores("query", "one candidate")


def test_fake_scores_are_deterministic_and_favour_shared_words() -> None:
    scores = fake_scores(QUERY, [text for _, text in DOCS])
    assert scores == fake_scores(QUERY, [text for _, text in DOCS])
    assert max(range(len(DOCS)), key=scores.__getitem__) == 1  # "late": short, all words
    assert scores[4] == 0.0 and all(0.0 <= s <= 1.0 for s in scores)


@pytest.mark.parametrize("service", ["voyage", "cohere"])
def test_a_missing_key_is_one_clear_error(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = KEYS[service][0]
    monkeypatch.delenv(env, raising=False)
    with pytest.raises(MissingAPIKey, match=rf"^{env} is not set \(hint: export it to rerank "
                                            rf"with {MODELS[service]}, or search without "
                                            r"rerank\)$"):
        reranker_for(reranker_spec(MODELS[service]))


@pytest.mark.parametrize("service", ["voyage", "cohere"])
def test_429_with_retry_after_and_500_are_retried(service: str, keys: FakeAPI) -> None:
    keys.script("429:retry-after=2", "500", "ok")
    sleeps: list[float] = []
    reranker = Reranker(reranker_spec(MODELS[service]), sleep=sleeps.append)
    assert reranker.scores(QUERY, ["late delivery", "passwords"]) == pytest.approx(
        fake_scores(QUERY, ["late delivery", "passwords"]))
    assert len(rerank_requests(keys)) == 3
    assert sleeps[0] == 2.0 and 0 < sleeps[1] <= 1.5


@pytest.mark.parametrize("service", ["voyage", "cohere"])
def test_retries_end_and_long_waits_are_refused(service: str, keys: FakeAPI) -> None:
    keys.script(["500"] * 3)
    with pytest.raises(ProviderError, match="gave up after 3 attempts") as info:
        Reranker(reranker_spec(MODELS[service]), max_retries=2, sleep=lambda s: None).scores(
            QUERY, ["a text"])
    assert KEYS[service][1] not in str(info.value)
    assert f"/{service}/v" not in str(info.value)  # the base URL's path is redacted
    keys.script("429:retry-after=120")
    with pytest.raises(RateLimited, match="wait 120 s, more than max_retry_after"):
        Reranker(reranker_spec(MODELS[service]), sleep=lambda s: None).scores(QUERY, ["a"])


@pytest.mark.parametrize("service", ["voyage", "cohere"])
@pytest.mark.parametrize(("behaviour", "message"), [
    ("short", "returned 2 scores for 3 texts"),
    ("indexes=0,0,2", "returned index 0 twice"),
    ("indexes=0,1,5", "returned index 5 for 3 texts"),
    ("nan", "nan as the score of text 0, not a finite number"),
])
def test_malformed_answers_are_refused_unretried(service: str, behaviour: str, message: str,
                                                 keys: FakeAPI) -> None:
    keys.script(behaviour)
    with pytest.raises(ProviderError, match=message) as info:
        Reranker(reranker_spec(MODELS[service]), sleep=lambda s: None).scores(
            "late delivery", ["late delivery refund", "a password", "late"])
    assert info.value.sqlstate == "PE009"
    assert len(rerank_requests(keys)) == 1


def test_401_is_not_retried_and_its_message_hides_the_key(keys: FakeAPI) -> None:
    keys.script("401")
    with pytest.raises(ProviderError, match=r"voyage \(rerank-2.5\): HTTP 401") as info:
        Reranker(reranker_spec("voyage/rerank-2.5"), sleep=lambda s: None).scores(QUERY, ["a"])
    assert KEYS["voyage"][1] not in str(info.value)
    assert len(rerank_requests(keys)) == 1


# -- Python: Corpus.search(rerank=...) -------------------------------------------------------

@pytest.fixture
def shop(client: pyembed.Client) -> pyembed.Corpus:
    corpus = client.create_corpus("shop", FAKE)
    corpus.add(DOCS)
    return corpus


def usage_of(conn: psycopg.Connection[Any], key: str) -> tuple[int, int]:
    rows = [r for r in tenants.usage(conn) if r.model_key == key]
    return sum(r.requests for r in rows), sum(r.tokens for r in rows)


@pytest.mark.parametrize("service", ["voyage", "cohere"])
@pytest.mark.parametrize("mode", ["vector", "keyword", "hybrid"])
def test_search_reranks_candidates_of_every_mode(service: str, mode: str, keys: FakeAPI,
                                                 shop: pyembed.Corpus) -> None:
    plain = shop.search(QUERY, k=5, mode=mode)
    hits = shop.search(QUERY, k=3, mode=mode, rerank=MODELS[service])
    expected = fake_scores(QUERY, [h.content for h in plain])
    best = sorted(range(len(plain)), key=lambda i: -expected[i])[:3]
    assert [h.chunk_id for h in hits] == [plain[i].chunk_id for i in best]
    assert [h.rerank_score for h in hits] == pytest.approx([expected[i] for i in best])
    assert [h.score for h in hits] == [plain[i].score for i in best]  # the retrieval's score
    assert {h.reranker for h in hits} == {MODELS[service]}
    assert all(h.rerank_score is None and h.reranker is None for h in plain)
    assert hits[0].document_id == "late"
    [request] = rerank_requests(keys)
    assert len(request.body["documents"]) == len(plain)  # every candidate, 50 by default


def test_rerank_changes_the_order_and_takes_the_candidates_asked_for(
        keys: FakeAPI, shop: pyembed.Corpus) -> None:
    # BM25 favours the long text that says "refund" six times, the fake reranker the short one.
    plain = [h.document_id for h in shop.search("refund", k=5, mode="keyword")]
    reranked = [h.document_id for h in shop.search("refund", k=5, mode="keyword",
                                                   rerank="rerank-2.5")]
    assert plain == ["refunds", "late"] and reranked == ["late", "refunds"]
    keys.reset()
    two = shop.search("shipping delivery days", k=1, mode="keyword", rerank="rerank-2.5",
                      rerank_candidates=2)
    [request] = rerank_requests(keys)
    assert len(request.body["documents"]) == 2 and len(two) == 1
    with pytest.raises(InvalidInput, match=r"rerank candidates must be 1\.\.1000, got 0"):
        shop.search(QUERY, rerank="rerank-2.5", rerank_candidates=0)
    with pytest.raises(InvalidInput, match="rerank needs the query text"):
        shop.search([0.1] * 384, model_key=FAKE, rerank="rerank-2.5")


def test_a_cached_rerank_makes_no_call_and_usage_is_recorded(
        keys: FakeAPI, shop: pyembed.Corpus, client: pyembed.Client) -> None:
    first = shop.search(QUERY, k=3, mode="keyword", rerank="voyage/rerank-2.5")
    assert len(rerank_requests(keys)) == 1
    requests, tokens = usage_of(client.conn, "voyage/rerank-2.5")
    assert requests == 1 and tokens > 0
    again = shop.search(QUERY, k=3, mode="keyword", rerank="voyage/rerank-2.5")
    assert again == first
    assert len(rerank_requests(keys)) == 1, "a cached rerank called the service again"
    assert usage_of(client.conn, "voyage/rerank-2.5") == (requests, tokens)
    # Another reranker, or another query, is another key.
    shop.search(QUERY, k=3, mode="keyword", rerank="voyage/rerank-2.5-lite")
    shop.search(QUERY + " please", k=3, mode="keyword", rerank="voyage/rerank-2.5")
    assert len(rerank_requests(keys)) == 3
    client.cache.flush()  # type: ignore[union-attr]
    report = {r.model_key: r for r in pyembed.cache.stats(client.conn)}
    # Three candidates match the query's words (keyword search): 3 misses, 3 hits, 3 misses.
    row = report["voyage/rerank-2.5"]
    assert (row.hits, row.misses, row.entries) == (3, 6, 6)


def test_without_a_key_search_works_and_rerank_is_missing_key(
        monkeypatch: pytest.MonkeyPatch, shop: pyembed.Corpus, fake_api: FakeAPI) -> None:
    monkeypatch.delenv("VOYAGE_API_KEY", raising=False)
    assert shop.search(QUERY, k=2, mode="hybrid")
    with pytest.raises(MissingAPIKey, match="VOYAGE_API_KEY is not set"):
        shop.search(QUERY, k=2, mode="hybrid", rerank="voyage/rerank-2.5")
    assert fake_api.requests == []


def test_the_offline_fake_reranker_needs_no_key_or_server(shop: pyembed.Corpus) -> None:
    hits = shop.search(QUERY, k=2, mode="hybrid", rerank="fake")
    assert hits[0].document_id == "late" and hits[0].reranker == "fake/overlap"


def test_ask_reranks_its_passages(keys: FakeAPI, shop: pyembed.Corpus,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from pyembed.rag import answer

    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    result = answer(shop, QUERY, k=2, mode="keyword", rerank="cohere/rerank-v3.5",
                    min_score=0.01)
    assert result.sources[0].document_id == "late"
    assert all(s.hit.reranker == "cohere/rerank-v3.5" for s in result.sources)
    assert "rerank_ms" in result.timings


# -- tenants: the cache is per tenant, the limits apply -------------------------------------

@pytest.fixture
def tenant_dsns(db: Database, owner: psycopg.Connection[Any]) -> Iterator[dict[str, str]]:
    """Tenants ra and rb, each with a login role; their DSNs."""
    from psycopg.conninfo import make_conninfo

    dsns = {}
    for name in ("ra", "rb"):
        tenants.create_tenant(owner, name)
        tenants.add_member(owner, name, f"role_{name}", create_login="pw")
        dsns[name] = make_conninfo(db.app_dsn, user=f"role_{name}", password="pw")
    yield dsns
    for name in ("ra", "rb"):
        owner.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(f"role_{name}")))
        owner.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(f"role_{name}")))


def test_the_rerank_cache_is_per_tenant_and_limits_apply(
        keys: FakeAPI, tenant_dsns: dict[str, str], owner: psycopg.Connection[Any]) -> None:
    clients = {name: pyembed.connect(dsn) for name, dsn in tenant_dsns.items()}
    try:
        corpora = {}
        for name, c in clients.items():
            corpora[name] = c.create_corpus("shop", FAKE)
            corpora[name].add(DOCS)
        # ra may make 1 request a minute from now on; its embedding calls are an hour old.
        owner.execute("UPDATE pyembed.tenants SET requests_per_minute = 1 WHERE name = 'ra'")
        owner.execute("UPDATE pyembed.usage SET minute = minute - interval '1 hour'")
        a = corpora["ra"].search(QUERY, k=3, mode="keyword", rerank="rerank-2.5")
        b = corpora["rb"].search(QUERY, k=3, mode="keyword", rerank="rerank-2.5")
        assert [h.document_id for h in a] == [h.document_id for h in b]
        assert len(rerank_requests(keys)) == 2, "tenant rb was served tenant ra's cache"
        assert usage_of(clients["rb"].conn, "voyage/rerank-2.5")[0] == 1
        # ra's cache still serves it; a new query is over its 1 request a minute.
        corpora["ra"].search(QUERY, k=3, mode="keyword", rerank="rerank-2.5")
        with pytest.raises(RateLimited, match="tenant ra is over its rate limit"):
            corpora["ra"].search("express shipping", k=3, mode="keyword", rerank="rerank-2.5")
        assert len(rerank_requests(keys)) == 2
    finally:
        for c in clients.values():
            c.close()


# -- SQL: pyembed.search_reranked -----------------------------------------------------------

@pytest.fixture
def sql_app(db: Database, fake_api: FakeAPI, client: pyembed.Client
            ) -> Iterator[psycopg.Connection[Any]]:
    """The application role in SQL; the owner stored the rerankers' keys and base URLs."""
    client.create_corpus("shop", FAKE).add(DOCS)
    with connect(db.owner_dsn, autocommit=True) as conn:
        for service, (env, value) in KEYS.items():
            conn.execute("SELECT pyembed.set_secret(%s, %s)", (env, value))
            conn.execute("SELECT pyembed.set_secret(%s, %s)",
                         (f"PYEMBED_{service.upper()}_BASE_URL", fake_api.base_url(service)))
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(APP_USER)))
        conn.execute("SET pyembed.http_retries = 0")
        yield conn


RERANKED = ("SELECT document_id, score, rerank_score, reranker FROM pyembed.search_reranked("
            "'shop', %s, %s, k => 3, mode => %s)")


@pytest.mark.parametrize("service", ["voyage", "cohere"])
def test_sql_reranks_caches_and_accounts(service: str, sql_app: psycopg.Connection[Any],
                                         fake_api: FakeAPI) -> None:
    rows = sql_app.execute(RERANKED, (QUERY, MODELS[service], "hybrid")).fetchall()
    plain = sql_app.execute("SELECT content, score FROM pyembed.search_text('shop', %s, 50, "
                            "NULL, 'hybrid')", (QUERY,)).fetchall()
    expected = sorted(fake_scores(QUERY, [c for c, _ in plain]), reverse=True)[:3]
    assert [r[2] for r in rows] == pytest.approx(expected)
    assert rows[0][0] == "late" and {r[3] for r in rows} == {MODELS[service]}
    assert len(rerank_requests(fake_api)) == 1
    assert sql_app.execute(RERANKED, (QUERY, MODELS[service], "hybrid")).fetchall() == rows
    assert len(rerank_requests(fake_api)) == 1, "the SQL path did not use the rerank cache"
    used = sql_app.execute("SELECT corpus, requests FROM pyembed.usage_report(1) "
                           "WHERE model_key = %s", (MODELS[service],)).fetchall()
    assert used == [("shop", 1)]


def test_sql_errors_are_pyembed_errors(sql_app: psycopg.Connection[Any], fake_api: FakeAPI,
                                       db: Database) -> None:
    fake_api.script("indexes=0,0,1")  # keyword search finds 3 candidates
    err = sql_error(sql_app, RERANKED, (QUERY, "voyage/rerank-2.5", "keyword"))
    assert err.sqlstate == "PE009" and "returned index 0 twice" in str(err)
    fake_api.script("500")
    err = sql_error(sql_app, RERANKED, (QUERY, "cohere/rerank-v3.5", "keyword"))
    assert err.sqlstate == "PE009" and KEYS["cohere"][1] not in str(err)
    assert "/cohere/v2" not in str(err)
    assert sql_error(sql_app, RERANKED, (QUERY, "rerank-9", "keyword")).sqlstate == "PE006"
    err = sql_error(sql_app, "SELECT * FROM pyembed.search_reranked('shop', 'q', 'fake', "
                             "candidates => 5000)")
    assert err.sqlstate == "PE005"
    with connect(db.owner_dsn, autocommit=True) as owner:
        owner.execute("DELETE FROM pyembed.secrets WHERE name = 'VOYAGE_API_KEY'")
    err = sql_error(sql_app, RERANKED, (QUERY, "voyage/rerank-2.5", "keyword"))
    assert err.sqlstate == "PE008" and "pyembed.set_secret('VOYAGE_API_KEY'" in str(err)
    # Without rerank nothing changed.
    assert sql_app.execute("SELECT count(*) FROM pyembed.search_text('shop', %s, 3, NULL, "
                           "'keyword')", (QUERY,)).fetchone() == (3,)


def test_rerank_cache_put_checks_what_it_stores(app: psycopg.Connection[Any]) -> None:
    """The table itself is out of the application role's reach (tests/test_hardening.py)."""
    put = "SELECT pyembed.rerank_cache_put(ARRAY[%s], %s, ARRAY[%s::float8])"
    key = b"k" * 32
    assert sql_error(app, put, (key, "voyage/rerank-2.5", "NaN")).sqlstate == "PE005"
    assert sql_error(app, put, (key, "voyage/rerank-2.5", "Infinity")).sqlstate == "PE005"
    assert sql_error(app, put, (b"short", "voyage/rerank-2.5", 0.5)).sqlstate == "PE005"
    assert sql_error(app, put, (key, "no slash", 0.5)).sqlstate == "PE005"
    assert app.execute(put, (key, "voyage/rerank-2.5", 0.5)).fetchone() == (1,)
    assert app.execute("SELECT score FROM pyembed.rerank_cache_get(ARRAY[%s])",
                       (key,)).fetchall() == [(0.5,)]
    assert app.execute("SELECT pyembed.rerank_cache_purge('voyage/rerank-2.5')"
                       ).fetchone() == (1,)


# -- the command line -----------------------------------------------------------------------

def test_cli_search_and_ask_rerank(db: Database, fake_api: FakeAPI,
                                   client: pyembed.Client) -> None:
    client.create_corpus("shop", FAKE).add(DOCS)
    env = {**db_env(db), **fake_api.env(), "COLUMNS": "200", "VOYAGE_API_KEY": "",
           "ANTHROPIC_API_KEY": ""}
    missing = run_cli("search", "shop", QUERY, "--rerank", "voyage/rerank-2.5", env=env)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        "error: VOYAGE_API_KEY is not set (hint: export it to rerank with voyage/rerank-2.5, or "
        "search without rerank)"]
    env["VOYAGE_API_KEY"] = KEYS["voyage"][1]
    out = run_cli("search", "shop", QUERY, "-k", "2", "--mode", "keyword", "--rerank",
                  "rerank-2.5", env=env)
    assert out.returncode == 0, out.stderr
    assert "reranked by voyage/rerank-2.5" in out.stdout
    first = next(line for line in out.stdout.splitlines() if "│ 1 " in line)
    assert "late" in first
    lines = run_cli("search", "shop", QUERY, "-k", "2", "--rerank", "rerank-2.5",
                    "--rerank-candidates", "4", "--json", env=env).stdout.splitlines()
    hits = [json.loads(line) for line in lines]
    assert [h["reranker"] for h in hits] == ["voyage/rerank-2.5"] * 2
    assert hits[0]["rerank_score"] >= hits[1]["rerank_score"]
    asked = run_cli("ask", "shop", QUERY, "-k", "2", "--rerank", "rerank-2.5", "--json",
                    env=env)
    assert asked.returncode == 0, asked.stderr
    sources = json.loads(asked.stdout)["sources"]
    assert sources[0]["document_id"] == "late" and sources[0]["reranker"] == "voyage/rerank-2.5"
    assert "--rerank voyage/rerank-2.5" in run_cli("search", "--help", env=env).stdout
    # The rerank scores cached above go with `cache purge`, by reranker or all at once.
    purged = run_cli("cache", "purge", "--model", "voyage/rerank-2.5", env=env)
    assert purged.returncode == 0, purged.stderr
    assert re.fullmatch(r"deleted 0 cache entries and [1-9]\d* rerank scores",
                        purged.stdout.strip()), purged.stdout
    assert run_cli("cache", "purge", env=env).stdout.strip().endswith("cache entries")


def test_candidates_below_k_are_the_same_error_from_sql_python_and_the_cli(
        sql_app: psycopg.Connection[Any], db: Database, fake_api: FakeAPI,
        client: pyembed.Client) -> None:
    """search_reranked took `candidates` 3 for k 5 as 5 without a word (and so did Python and
    --rerank-candidates): fewer candidates than k is named, from every entry point; left out,
    it is 50, or k if larger (k 60 reranks 60)."""
    named = "rerank candidates (3) must be at least k (5)"
    err = sql_error(sql_app, "SELECT * FROM pyembed.search_reranked('shop', %s, "
                             "'voyage/rerank-2.5', k => 5, mode => 'keyword', candidates => 3)",
                    (QUERY,))
    assert err.sqlstate == "PE005" and named in str(err), err
    with pytest.raises(InvalidInput, match=re.escape(named)):
        client.corpus("shop").search(QUERY, k=5, mode="keyword", rerank="voyage/rerank-2.5",
                                     rerank_candidates=3)
    env = {**db_env(db), **fake_api.env(), "VOYAGE_API_KEY": KEYS["voyage"][1]}
    out = run_cli("search", "shop", QUERY, "-k", "5", "--mode", "keyword", "--rerank",
                  "rerank-2.5", "--rerank-candidates", "3", env=env)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [f"error: {named}: the "
                                                                      "reranker returns the best "
                                                                      "k of them"], out.stderr
    fake_api.reset()
    rows = sql_app.execute("SELECT count(*) FROM pyembed.search_reranked('shop', %s, "
                           "'voyage/rerank-2.5', k => 60, mode => 'keyword')",
                           (QUERY,)).fetchone()
    assert rows is not None and rows[0] == 3  # the shop has 3 documents with the query's words


@pytest.mark.parametrize("service", ["voyage", "cohere"])
def test_a_429_after_the_retries_is_rate_limited_as_for_every_service(
        service: str, keys: FakeAPI, sql_app: psycopg.Connection[Any]) -> None:
    """A rerank service still answering 429 when the retries were used up was ProviderError
    (PE009), while Claude's 429 and a tenant's limit were RateLimited (PE010)."""
    keys.script(["429:retry-after=0"] * 2)
    with pytest.raises(RateLimited, match="gave up after 2 attempts") as info:
        Reranker(reranker_spec(MODELS[service]), max_retries=1, sleep=lambda s: None).scores(
            QUERY, ["a text"])
    assert info.value.kind == "rate_limited" and info.value.sqlstate == "PE010"
    keys.script("429:retry-after=0")
    err = sql_error(sql_app, RERANKED, (QUERY, MODELS[service], "keyword"))
    assert err.sqlstate == "PE010" and "HTTP 429" in str(err), str(err)


def test_a_rerank_depth_without_a_reranker_is_refused(client: pyembed.Client) -> None:
    """`search --rerank-candidates -1` without --rerank was ignored (exit 0), from Python too."""
    corpus = client.create_corpus("depth", FAKE)
    for call in (corpus.search, corpus.retrieve):
        with pytest.raises(InvalidInput, match=r"rerank_candidates \(-1\) needs rerank"):
            call("q", rerank_candidates=-1)


@pytest.mark.parametrize("service", ["voyage", "cohere"])
def test_each_request_keeps_to_the_rerankers_limits(service: str, keys: FakeAPI) -> None:
    """The reranker's documented limits (pyembed.limits) hold before the call, in the one
    class every entry point uses: a query past the query limit is InvalidInput with no
    request (the fake server refuses it with a 400, as the service does); a candidate longer
    than the service reads beside the query is sent cut to what it reads, and metered as
    sent, its score cached under the whole text. Before, the query went out and came back a
    400, and a 40,000-token candidate was sent and metered whole."""
    from pyembed.limits import limits_for
    from pyembed.text import estimate_tokens

    spec = reranker_spec(MODELS[service])
    limits = limits_for(spec.provider, spec.model_id)
    assert limits.query_tokens is not None and limits.text_tokens is not None
    metered: list[int] = []
    reranker = Reranker(spec, sleep=lambda s: None, meter=lambda _, tokens: metered.append(tokens))
    with pytest.raises(InvalidInput, match=f"over {spec.key}'s {limits.query_tokens}-token "
                                           "limit for a rerank query"):
        reranker.scores("refund " * limits.query_tokens, ["a text"])
    assert rerank_requests(keys) == [] and metered == []

    long = "refund delivery " * (limits.text_tokens + 5000)
    scores = reranker.scores(QUERY, [long, "passwords"])
    [request] = rerank_requests(keys)
    sent = request.body["documents"]
    assert long.startswith(sent[0]) and len(sent[0]) < len(long)
    assert estimate_tokens(QUERY) + estimate_tokens(sent[0]) <= limits.text_tokens
    assert metered == [sum(estimate_tokens(QUERY) + estimate_tokens(d) for d in sent)]
    assert scores == pytest.approx(fake_scores(QUERY, sent))
