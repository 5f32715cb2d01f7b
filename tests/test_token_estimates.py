"""One token estimate (pyembed.text.estimate_tokens) for every provider limit, which never
counts a script under what the services count: Chinese, Japanese, Korean, emoji and other
non-Latin text against the fake servers, which count such text like the services' tokenizers
(tests/fakeapi/tokens.py) and refuse a request past a limit with the service's 400.

Before, the estimate took 4 characters a token for every script: a CJK character, about a
token at the services, counted a quarter, so a prompt, a rerank query or an embedding batch of
such text passed pyembed's check and came back a 400."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyembed import rag
from pyembed.chunking import chunk_text
from pyembed.client import Client
from pyembed.embedder import Embedder
from pyembed.errors import InvalidInput
from pyembed.limits import limits_for, text_tokens
from pyembed.models import ModelSpec
from pyembed.providers import provider_for
from pyembed.rerank import Reranker, reranker_spec
from pyembed.text import estimate_tokens, truncate_to_tokens
from tests.fakeapi import FakeAPI
from tests.fakeapi.tokens import service_tokens

SAMPLES = {
    "english": "The quick brown fox jumps over the lazy dog; refunds take 3 to 5 days.",
    "chinese": "检索增强生成是一种结合信息检索与文本生成的技术\uff0c退款需要三到五天。",
    "japanese": "日本語のテキストはトークンが多い。カタカナとひらがなと漢字。",
    "korean": "한국어 텍스트는 영어보다 토큰이 많습니다. 환불은 삼일에서 오일 걸립니다.",
    "emoji": "😀🦙👨‍👩‍👧🎉🇫🇷 ok 👍🏽",
    "russian": "Привет, как дела? Возврат денег занимает от трёх до пяти дней.",
    "greek": "Καλημέρα κόσμε, η επιστροφή χρημάτων διαρκεί τρεις ημέρες.",
    "hindi": "नमस्ते दुनिया, धनवापसी में तीन से पांच दिन लगते हैं।",
    "mixed": "Error E4012: 配额已超出 (quota exceeded) 🚫 — повторите позже.",
}
CHINESE = "退款需要三到五天检索增强生成是一种结合信息检索与文本生成的技术"  # 30 characters


@pytest.mark.parametrize("script", list(SAMPLES))
def test_the_estimate_counts_no_script_under_the_services(script: str) -> None:
    text = SAMPLES[script]
    assert estimate_tokens(text) >= service_tokens(text)
    assert estimate_tokens(text * 50) >= service_tokens(text * 50)


def test_english_is_estimated_as_before() -> None:
    """The ASCII rate and the word term are unchanged: 4 characters or 1.3 words a token."""
    assert estimate_tokens("x" * 400) == 100
    assert estimate_tokens(" ".join(["ab"] * 100)) == 130
    assert estimate_tokens(SAMPLES["english"]) == max(-(-len(SAMPLES["english"]) // 4),
                                                      (len(SAMPLES["english"].split()) * 13 + 9)
                                                      // 10)


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=300), st.integers(min_value=2, max_value=200))
def test_estimate_cut_and_chunks_hold_for_any_text(text: str, limit: int) -> None:
    """For any text: the estimate is at least the services' count; a text cut to a limit, and
    each chunk of a window, is estimated within it."""
    assert estimate_tokens(text) >= service_tokens(text)
    assert estimate_tokens(truncate_to_tokens(text, limit)) <= limit
    if limit > 4:
        for chunk in chunk_text(text, limit, limit // 4):
            assert estimate_tokens(chunk) <= limit


def test_a_run_of_cjk_without_spaces_is_chunked_within_the_window() -> None:
    """A CJK document has no spaces to split at: its pieces are cut by the estimate, not at
    4 characters a token (before: 800-character pieces for a 200-token window, 800 tokens at
    the service)."""
    text = CHINESE * 100
    chunks = chunk_text(text, 200, 40)
    assert "".join(chunks) == text and len(chunks) > 1
    assert max(service_tokens(c) for c in chunks) <= max(estimate_tokens(c) for c in chunks) <= 200


OPENAI = ModelSpec("openai", "text-embedding-3-small", "1", 1536, max_batch=2048,
                   max_tokens=8191, api_key_env="OPENAI_API_KEY")


def test_an_embedding_batch_of_chinese_keeps_to_the_services_limits(
        fake_api: FakeAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenAI's 300,000 tokens a request and 8,191 a text, counted as the service counts:
    Chinese texts go in requests the fake server takes, and a text past the per-text limit is
    refused before any call. Before: 200 texts of 2,000 characters in one request (400,000
    tokens at the service: its 400), and a 9,000-character text sent (9,000 tokens: its 400)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-secret-456")
    limits = limits_for("openai")
    assert limits.request_tokens is not None and limits.text_tokens is not None
    embedder = Embedder(OPENAI, provider_for(OPENAI), sleep=lambda s: None)
    texts = [f"{i} " + CHINESE * 66 for i in range(200)]  # 1,980 characters each
    assert len(embedder.embed(texts)) == len(texts)
    sizes = [service_tokens("".join(r.body["input"])) for r in fake_api.requests]
    assert len(sizes) > 1 and max(sizes) <= limits.request_tokens

    fake_api.reset()
    long = CHINESE * 300  # 9,000 characters: 9,000 tokens at the service
    assert service_tokens(long) > text_tokens(OPENAI)
    with pytest.raises(InvalidInput, match=f"over the {limits.text_tokens}-token limit"):
        embedder.embed([long])
    assert fake_api.requests == []


@pytest.mark.parametrize("service", ["voyage", "cohere"])
def test_a_rerank_query_in_chinese_keeps_to_the_rerankers_limit(
        service: str, fake_api: FakeAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Chinese query past the reranker's query limit as the service counts it is
    InvalidInput with no request; one within it is scored. Before: sent, and the fake
    server's 400 came back."""
    model = {"voyage": "voyage/rerank-2.5", "cohere": "cohere/rerank-v3.5"}[service]
    monkeypatch.setenv(f"{service.upper()}_API_KEY", "pa-rerank-1234")
    spec = reranker_spec(model)
    limits = limits_for(spec.provider, spec.model_id)
    assert limits.query_tokens is not None
    reranker = Reranker(spec, sleep=lambda s: None)
    query = CHINESE * (limits.query_tokens // 30 + 1)
    assert service_tokens(query) > limits.query_tokens
    with pytest.raises(InvalidInput, match="limit for a rerank query"):
        reranker.scores(query, ["退款需要三到五天"])
    assert fake_api.requests == []
    assert len(reranker.scores(CHINESE, ["退款需要三到五天", "配额已超出"])) == 2


def test_a_prompt_of_chinese_passages_keeps_to_claudes_context(
        client: Client, fake_api: FakeAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chinese passages longer in all than Claude's context as the service counts them: the
    prompt sent fits (the fake server refuses a longer one with 'prompt is too long'), the
    rest cut or left out and said. Before: each 31,000-character passage estimated at 7,750
    tokens, all eight sent, about 250,000 tokens at the service: its 400."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-secret-1234")
    monkeypatch.delenv("PYEMBED_CLAUDE_MODEL", raising=False)
    corpus = client.create_corpus("zh", "fake/fake-hash@1:384", chunk_tokens=70_000)
    docs = [(f"d{i}", f"E4012 配额 {i} " + " ".join([CHINESE] * 1000)) for i in range(8)]
    corpus.add(docs, truncate=True)
    result = rag.answer(corpus, "E4012 配额是什么意思?", k=8, max_tokens=1000, mode="keyword")
    assert result.generated
    assert result.left_out and result.note and "left out" in result.note
    [request] = fake_api.requests_to("anthropic")
    context = limits_for("anthropic").request_tokens or 0
    sent = service_tokens(str(request.body["messages"][0]["content"]))
    assert sent + 1000 <= context
