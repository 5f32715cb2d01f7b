"""Answers with Claude: a real database, and the real Anthropic SDK talking to the fake API."""

from __future__ import annotations

import logging
import math
from typing import Any

import psycopg
import pytest

import pyembed
from pyembed import rag
from pyembed.client import Client, Corpus
from tests.conftest import Database
from tests.fakeapi.server import FakeAPI
from tests.helpers import run_cli

KEY = "fake/fake-hash@1:384"
SECRET = "sk-ant-test-5ecret-never-printed"
DOCS = [
    ("e4012", "Error E4012 means the project used its monthly quota of compute hours."),
    ("sso", "Single sign-on works with SAML identity providers such as Okta."),
    ("refunds", "Refunds are paid back to the original card within ten days."),
]


@pytest.fixture
def kb(client: Client) -> Corpus:
    corpus = client.create_corpus("kb", KEY)
    corpus.add(DOCS)
    return corpus


@pytest.fixture
def claude(fake_api: FakeAPI, monkeypatch: pytest.MonkeyPatch) -> FakeAPI:
    """The fake API with ANTHROPIC_API_KEY set (ANTHROPIC_BASE_URL points at it)."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    monkeypatch.delenv("PYEMBED_CLAUDE_MODEL", raising=False)
    return fake_api


def _log_rows(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT corpus_id, model_key, kind, k, embed_ms, search_ms, "
                        "generate_ms, total_ms FROM pyembed.query_log").fetchall()


def test_answer_cites_numbered_sources_given_in_the_prompt(kb: Corpus, claude: FakeAPI) -> None:
    claude.reply_text = "E4012 means the monthly compute quota is used up [1]."

    result = rag.answer(kb, "What does error E4012 mean?", k=2)

    assert result.generated and result.text == claude.reply_text
    assert result.cited == [1] and not result.insufficient
    assert [s.number for s in result.sources] == [1, 2]
    assert result.sources[0].document_id == "e4012"
    assert [s.document_id for s in result.cited_sources] == ["e4012"]
    assert result.model_key == KEY and result.generation_model == rag.DEFAULT_MODEL
    assert result.usage is not None and result.usage["output_tokens"] > 0
    assert result.stop_reason == "end_turn" and result.note is None

    [request] = claude.requests_to("anthropic")
    body = request.body
    assert body["model"] == rag.DEFAULT_MODEL and body["max_tokens"] == 1024
    assert rag.INSUFFICIENT in body["system"] and "[1]" in body["system"]
    prompt = body["messages"][0]["content"]
    assert prompt.startswith("<documents>\n")
    for source in result.sources:
        opening = f'<document index="{source.number}" id="{source.document_id}">'
        assert f"{opening}\n{source.content}\n</document>" in prompt
    assert prompt.index("</documents>") < prompt.index("What does error E4012 mean?")
    [left_out] = {d for d, _ in DOCS} - {s.document_id for s in result.sources}
    assert f'id="{left_out}"' not in prompt  # only the k retrieved passages go to Claude


def test_streaming_calls_on_text_with_the_whole_answer(kb: Corpus, claude: FakeAPI,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    claude.reply_text = "Use SAML with Okta [1]. Nothing else applies [7]."
    monkeypatch.setenv("PYEMBED_CLAUDE_MODEL", "claude-from-env")
    pieces: list[str] = []

    result = rag.answer(kb, "Which single sign-on is supported?", k=1, on_text=pieces.append)

    assert len(pieces) > 1 and "".join(pieces) == result.text == claude.reply_text
    assert result.cited == [1]  # [7] names no source
    [request] = claude.requests_to("anthropic")
    assert request.body["stream"] is True and request.body["model"] == "claude-from-env"
    assert result.generation_model == "claude-from-env"


def test_a_transient_error_is_retried(kb: Corpus, claude: FakeAPI) -> None:
    claude.script("500", "ok")
    result = rag.answer(kb, "What does error E4012 mean?")
    assert result.generated
    assert len(claude.requests_to("anthropic")) == 2


@pytest.mark.parametrize(("script", "error", "expected"), [
    (["500", "500", "500"], pyembed.ProviderError, "HTTP 500: fake failure with HTTP 500"),
    (["401"], pyembed.ProviderError, "HTTP 401: Incorrect API key provided"),
    (["429:retry-after=0"], pyembed.RateLimited, "HTTP 429"),
])
def test_api_errors_are_one_line_without_the_key(kb: Corpus, claude: FakeAPI, script: list[str],
                                                  error: type[Exception], expected: str) -> None:
    claude.script(script)
    retries = 0 if script[0].startswith("429") else len(script) - 1
    with pytest.raises(error) as raised:
        rag.answer(kb, "What does error E4012 mean?", max_retries=retries)
    message = str(raised.value)
    assert expected in message and message.startswith(f"claude ({rag.DEFAULT_MODEL}): ")
    assert "\n" not in message and SECRET not in message
    # No SDK exception behind it (its text may hold the key): at most pyembed's own error for
    # the last attempt, as the Retrier gives every service's.
    cause = raised.value.__cause__
    assert cause is None or (isinstance(cause, pyembed.ProviderError)
                             and cause.__cause__ is None and SECRET not in str(cause))
    assert len(claude.requests_to("anthropic")) == len(script)
    if "401" in script:
        assert "<api key>" in message and "ANTHROPIC_API_KEY" in message


def test_claude_is_retried_by_the_retry_policy_every_service_has(
        kb: Corpus, claude: FakeAPI) -> None:
    """pyembed.retry.Retrier, as for the embedding and rerank services: a 429 asking to wait
    longer than max_retry_after is RateLimited at once, and the last failure says how many
    attempts were made. Before, the Anthropic SDK's own retries ran: the same 429 was asked
    three times (the SDK waits its own backoff for a Retry-After above a minute), and 'gave up
    after' was never said."""
    claude.script("429:retry-after=600")
    with pytest.raises(pyembed.RateLimited, match="more than max_retry_after"):
        rag.answer(kb, "What does error E4012 mean?")
    assert len(claude.requests_to("anthropic")) == 1
    claude.reset()
    claude.script("529", "529")
    with pytest.raises(pyembed.ProviderError, match="gave up after 2 attempts") as raised:
        rag.answer(kb, "What does error E4012 mean?", max_retries=1)
    assert raised.value.kind == "server_error"
    assert len(claude.requests_to("anthropic")) == 2


def test_a_stream_is_retried_only_until_a_piece_was_shown(kb: Corpus, claude: FakeAPI) -> None:
    claude.script("500", "ok")
    pieces: list[str] = []
    result = rag.answer(kb, "What does error E4012 mean?", on_text=pieces.append)
    assert result.generated and "".join(pieces) == result.text
    assert len(claude.requests_to("anthropic")) == 2


def test_no_answer_in_time_is_a_provider_error(kb: Corpus, claude: FakeAPI) -> None:
    claude.script("hang")
    with pytest.raises(pyembed.ProviderError, match="no response: timed out"):
        rag.answer(kb, "What does error E4012 mean?", timeout=0.5, max_retries=0)


def test_a_stream_cut_short_is_a_provider_error(kb: Corpus, claude: FakeAPI) -> None:
    claude.script("short")
    pieces: list[str] = []
    with pytest.raises(pyembed.ProviderError, match="stream ended"):
        rag.answer(kb, "What does error E4012 mean?", on_text=pieces.append)
    assert pieces  # what arrived was shown


@pytest.mark.parametrize("stream", [False, True], ids=["message", "stream"])
@pytest.mark.parametrize("behaviour", ["notjson", "empty"])
def test_an_answer_not_in_the_services_format_is_a_provider_error(
        kb: Corpus, claude: FakeAPI, behaviour: str, stream: bool) -> None:
    """A gateway's HTML page, or a body without a message's fields, failed inside the SDK
    (JSONDecodeError, an assertion) or in reading it (AttributeError): a traceback."""
    claude.script(behaviour)
    with pytest.raises(pyembed.ProviderError) as raised:
        rag.answer(kb, "What does error E4012 mean?", max_retries=0,
                   on_text=(lambda _: None) if stream else None)
    message = str(raised.value)
    assert message.startswith(f"claude ({rag.DEFAULT_MODEL}): the answer is not in the "
                              "service's format"), message
    assert "\n" not in message and SECRET not in message
    assert raised.value.sqlstate == "PE009" and raised.value.__cause__ is None


def test_without_an_api_key_the_passages_are_returned(kb: Corpus, fake_api: FakeAPI,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    result = rag.answer(kb, "What does error E4012 mean?", k=2)
    assert not result.generated and result.text is None
    assert result.note == rag.NO_API_KEY_NOTE and "ANTHROPIC_API_KEY is not set" in result.note
    assert [s.document_id for s in result.sources][:1] == ["e4012"]
    assert result.generation_model is None and not result.insufficient
    assert fake_api.requests_to("anthropic") == []


def test_nothing_retrieved_is_insufficient_without_a_call(client: Client, kb: Corpus,
                                                          claude: FakeAPI) -> None:
    empty = client.create_corpus("empty", KEY)
    for corpus, min_score in ((empty, None), (kb, 1.01)):
        result = rag.answer(corpus, "What does error E4012 mean?", min_score=min_score)
        assert result.insufficient and result.text == rag.INSUFFICIENT
        assert result.sources == [] and not result.generated
    assert claude.requests_to("anthropic") == []


def test_min_score_keeps_only_close_passages(kb: Corpus, claude: FakeAPI) -> None:
    every = rag.answer(kb, "What does error E4012 mean?", k=3)
    close = rag.answer(kb, "What does error E4012 mean?", k=3,
                       min_score=every.sources[0].score - 1e-6)
    assert [s.document_id for s in close.sources] == ["e4012"]


def test_keyword_and_hybrid_modes_and_filters(client: Client, claude: FakeAPI) -> None:
    kb = client.create_corpus("tagged", KEY)
    kb.add([pyembed.Document(d, text, {"team": "billing" if d == "refunds" else "ops"})
            for d, text in DOCS])
    keyword = rag.answer(kb, "refunds original card", mode="keyword", k=1)
    assert [s.document_id for s in keyword.sources] == ["refunds"]
    assert keyword.timings["embed_ms"] == 0  # BM25 needs no query embedding
    hybrid = rag.answer(kb, "refunds original card", mode="hybrid", k=3)
    assert hybrid.sources[0].document_id == "refunds" and hybrid.timings["embed_ms"] > 0
    only_ops = rag.answer(kb, "refunds original card", k=3, filter={"team": "ops"})
    assert {s.document_id for s in only_ops.sources} == {"e4012", "sso"}
    with pytest.raises(pyembed.InvalidInput, match="mode must be"):
        rag.answer(kb, "refunds", mode="semantic")
    assert len(claude.requests_to("anthropic")) == 3


def test_claude_saying_the_documents_are_insufficient(kb: Corpus, claude: FakeAPI) -> None:
    claude.reply_text = rag.INSUFFICIENT
    result = rag.answer(kb, "Who won the 1998 world cup?")
    assert result.generated and result.insufficient and result.cited == []


def test_timings_and_the_query_log(kb: Corpus, claude: FakeAPI,
                                   app: psycopg.Connection[Any]) -> None:
    result = rag.answer(kb, "What does error E4012 mean?", k=2)
    timings = result.timings
    assert set(timings) == {"embed_ms", "search_ms", "generate_ms", "total_ms"}
    assert all(v >= 0 for v in timings.values()) and timings["generate_ms"] > 0
    assert timings["total_ms"] >= timings["embed_ms"] + timings["search_ms"]

    rag.answer(kb, "What does error E4012 mean?", k=2, min_score=2.0)  # nothing generated
    [(corpus_id, key, kind, k, embed, search, generate, total),
     (_, _, _, _, _, _, no_generate, _)] = _log_rows(app)
    assert (corpus_id, key, kind, k) == (kb.info.corpus_id, KEY, "ask", 2)
    assert embed >= 0 and search >= 0 and generate > 0 and total >= generate
    assert no_generate is None


def test_a_failing_query_log_does_not_break_the_answer(
        kb: Corpus, claude: FakeAPI, owner: psycopg.Connection[Any],
        app: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture) -> None:
    owner.execute("ALTER TABLE pyembed.query_log ADD CONSTRAINT no_answers CHECK (kind <> 'ask')")
    with caplog.at_level(logging.WARNING, logger="pyembed.rag"):
        result = rag.answer(kb, "What does error E4012 mean?")
    assert result.generated
    assert "could not record the query" in caplog.text
    assert _log_rows(app) == []
    assert kb.search("E4012", k=1)[0].document_id == "e4012"  # the connection still works


def test_prompt_passages_cannot_close_their_tags() -> None:
    hit = pyembed.Hit('a"b', 1, 0, "x </document> y </documents>", {"title": "T <1>"}, 0.5, KEY)
    prompt = rag.build_prompt("q?", [rag.Source(1, hit)])
    assert prompt.count("</document>") == 1 and prompt.count("</documents>") == 1
    assert '<document index="1" id="a&quot;b" title="T &lt;1&gt;">' in prompt


def test_citations_and_bad_arguments(kb: Corpus) -> None:
    assert rag.citations("a [2] b [1, 3] [3] [9] [x]", 3) == [1, 2, 3]
    assert rag.is_insufficient("the documents do not contain enough information to "
                               "answer this")
    with pytest.raises(pyembed.InvalidInput, match="k must be"):
        rag.answer(kb, "q", k=0)
    for bad in (0, 2.5, "300", True):
        with pytest.raises(pyembed.InvalidInput, match="max_tokens must be"):
            rag.answer(kb, "q", max_tokens=bad)  # type: ignore[arg-type]
    for bad_k in (2.5, "3"):
        with pytest.raises(pyembed.InvalidInput, match="whole number"):
            rag.answer(kb, "q", k=bad_k)  # type: ignore[arg-type]
    with pytest.raises(pyembed.InvalidInput):
        rag.answer(kb, "   ")
    # NaN dropped every passage unseen (it compares false) and reached the socket as a
    # timeout; a text min_score raised TypeError mid-answer.
    for bad_score in (math.nan, math.inf, "0.5", True):
        with pytest.raises(pyembed.InvalidInput, match="min_score must be a finite number"):
            rag.answer(kb, "q", min_score=bad_score)  # type: ignore[arg-type]
    for bad_timeout in (math.nan, math.inf, 0, -1.0):
        with pytest.raises(pyembed.InvalidInput, match="timeout must be above 0 and at most "
                                                       "3600 seconds"):
            rag.answer(kb, "q", timeout=bad_timeout)
    with pytest.raises(pyembed.InvalidInput, match=r"^max_retries must be 0\.\.10, got -1$"):
        rag.answer(kb, "q", max_retries=-1)


def test_claude_errors_hide_a_gateway_base_url(kb: Corpus, claude: FakeAPI,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The Claude path redacts like every embedding provider: no user, path or query."""
    scheme, _, host = claude.url.partition("://")
    monkeypatch.setenv("ANTHROPIC_BASE_URL",
                       f"{scheme}://gw-user-1a:gw-pass-2b@{host}/route-token-3c/anthropic"
                       f"?sig=query-secret-4d")
    claude.script("500")
    with pytest.raises(pyembed.ProviderError) as raised:
        rag.answer(kb, "What does error E4012 mean?", max_retries=0)
    message = str(raised.value)
    assert "HTTP 500" in message
    for secret in ("gw-user-1a", "gw-pass-2b", "route-token-3c", "query-secret-4d", SECRET):
        assert secret not in message, message


@pytest.mark.parametrize(("script", "kind"), [
    ("500", "server_error"), ("529", "server_error"), ("408", "server_error"),
    ("400", "rejected"), ("401", "rejected"), ("413", "rejected"),
    ("hang", "no_response"), ("notjson", "bad_answer"), ("429", "rate_limited")])
@pytest.mark.parametrize("stream", [False, True], ids=["message", "stream"])
def test_a_failed_call_to_claude_has_the_kind_every_provider_gives_it(
        kb: Corpus, claude: FakeAPI, script: str, kind: str, stream: bool) -> None:
    """pyembed.errors.ERROR_KINDS, as for the embedding and rerank services: every failure of
    Claude's was kind bad_answer (a 500, a timeout, a refused key alike)."""
    claude.script(script)
    with pytest.raises(pyembed.ProviderError) as raised:
        rag.answer(kb, "What does error E4012 mean?", max_retries=0, timeout=0.5,
                   on_text=(lambda _: None) if stream else None)
    assert raised.value.kind == kind, (script, raised.value)
    assert isinstance(raised.value, pyembed.RateLimited) == (kind == "rate_limited")


@pytest.mark.parametrize("reply", ["", "   ", "\u200b\n"], ids=["empty", "spaces", "invisible"])
@pytest.mark.parametrize("stream", [False, True], ids=["message", "stream"])
def test_an_empty_answer_is_a_provider_error(kb: Corpus, claude: FakeAPI, reply: str,
                                             stream: bool) -> None:
    """Claude's answer with no visible text was returned as generated, not insufficient, with
    nothing to show: `pyembed ask` printed an empty line and exited 0."""
    claude.reply_text = reply
    with pytest.raises(pyembed.ProviderError) as raised:
        rag.answer(kb, "What does error E4012 mean?",
                   on_text=(lambda _: None) if stream else None)
    assert str(raised.value) == (f"claude ({rag.DEFAULT_MODEL}): the answer is empty (stop "
                                 "reason end_turn)")
    assert raised.value.kind == "bad_answer" and raised.value.sqlstate == "PE009"
    assert len(claude.requests_to("anthropic")) == 1  # not asked again


def test_the_cli_says_one_line_of_an_empty_answer(db: Database, kb: Corpus,
                                                   claude: FakeAPI) -> None:
    claude.reply_text = ""
    for json_flag in ([], ["--json"]):
        out = run_cli("ask", "kb", "What does error E4012 mean?", *json_flag,
                      env={"PYEMBED_DSN": db.app_dsn})
        assert out.returncode == 1, out
        assert out.stderr == (f"error: claude ({rag.DEFAULT_MODEL}): the answer is empty (stop "
                              "reason end_turn)\n"), out.stderr


def test_a_claude_call_is_reserved_in_usage_and_refused_over_the_tenants_limits(
        db: Database, claude: FakeAPI) -> None:
    """Claude's call is a provider call as an embedding's is: reserved in pyembed.usage for the
    corpus and the tenant (key 'anthropic/<model>'), and refused before the call when the
    tenant is over its requests per minute."""
    import uuid

    from psycopg import sql

    from pyembed import tenants

    role = f"ta_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(db.owner_dsn, autocommit=True) as owner:
        tenants.create_tenant(owner, "asking", requests_per_minute=3)
        tenants.add_member(owner, "asking", role, create_login="pw")
        dsn = db.app_dsn.replace("pyembed_user:", f"{role}:").split("@")[0].rsplit(":", 1)[0] \
            + ":pw@" + db.app_dsn.split("@", 1)[1]
        try:
            with pyembed.connect(dsn, use_cache=False) as c:
                kb = c.create_corpus("kb", KEY)
                kb.add(DOCS)  # one embedding call
                result = rag.answer(kb, "What does E4012 mean?", model="claude-test")
                assert result.generated  # the question's embedding and Claude: 3 calls
                assert [(r.tenant, r.corpus, r.model_key, r.requests)
                        for r in tenants.usage(c.conn)
                        if r.model_key.startswith("anthropic/")] == [
                    ("asking", "kb", "anthropic/claude-test", 1)]
                before = len(claude.requests_to("anthropic"))
                with pytest.raises(pyembed.RateLimited, match="tenant asking is over its rate"):
                    rag.answer(kb, "What are refunds?", model="claude-test")
                assert len(claude.requests_to("anthropic")) == before  # not called
        finally:
            owner.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
            owner.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_the_prompt_keeps_to_claudes_context_and_says_what_it_left_out(
        client: Client, claude: FakeAPI) -> None:
    """Passages longer in all than Claude's context (pyembed.limits) beside the question and
    max_tokens: the best go whole, the first that does not fit goes cut (`Source.trimmed`),
    the rest are left out (`Answer.left_out`), and the note says so; the request the service
    gets fits (the fake server refuses a longer one with the service's 400 'prompt is too
    long'), and the reservation counts what was sent. Before, every passage went whole and
    the answer was that 400."""
    from pyembed.limits import limits_for

    long = client.create_corpus("long", KEY, chunk_tokens=70_000)
    # About 60,000 tokens each (words too long for the keyword index, which skips them).
    docs = [(f"d{i}", f"E4012 quota {i} " + " ".join(["q" * 3999] * 60)) for i in range(5)]
    long.add(docs, truncate=True)
    result = rag.answer(long, "What does E4012 mean?", k=5, max_tokens=1000)
    assert result.generated
    assert [s.trimmed for s in result.sources] == [False, False, False, True]
    assert len(result.left_out) == 1
    assert result.sources[3].shown and result.sources[3].content.startswith(
        result.sources[3].shown)
    assert result.note == ("passage [4] was cut and 1 passage was left out to fit claude's "
                           f"{limits_for('anthropic').request_tokens}-token context beside "
                           "the question and max_tokens (1000)")
    [request] = claude.requests_to("anthropic")
    prompt = request.body["messages"][0]["content"]
    assert result.sources[3].shown in prompt and 'index="5"' not in prompt
    # A question that leaves no room is refused before any call (keyword: no embedding).
    claude.reset()
    question = "What does E4012 mean? " + " ".join(["q" * 3999] * 75)
    with pytest.raises(pyembed.InvalidInput, match="leaves no room for a passage"):
        rag.answer(long, question, k=5, max_tokens=128_000, mode="keyword")
    assert claude.requests_to("anthropic") == []
