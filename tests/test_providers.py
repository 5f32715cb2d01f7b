"""The Voyage, OpenAI and Cohere providers, through their real SDKs, against the fake API
server: answers, retries, timeouts, bad answers and errors, and errors that keep a secret
base URL and the key to themselves (also as the application role, in the database). Also
the fake Anthropic API."""

from __future__ import annotations

import base64
import socket
import time
import traceback
from collections.abc import Iterator
from typing import Any

import anthropic
import numpy as np
import psycopg
import pytest
from psycopg import sql

from pyembed.db import connect
from pyembed.embedder import Embedder
from pyembed.errors import (
    ConfigError,
    InvalidInput,
    MissingAPIKey,
    ProviderError,
    RateLimited,
    redact,
)
from pyembed.localdb import APP_USER
from pyembed.models import LOCAL_DEFAULT, InputType, ModelSpec, registry
from pyembed.providers import TransientProviderError, provider_for
from tests.conftest import Database
from tests.fakeapi import Behaviour, FakeAPI, server_vectors

VOYAGE = registry.get("voyage/voyage-3-lite@1:512")
OPENAI = registry.get("openai/text-embedding-3-large@1:256")
COHERE = registry.get("cohere/embed-english-v3.0@3:1024")
SPECS = pytest.mark.parametrize("spec", [VOYAGE, OPENAI, COHERE],
                                ids=lambda s: s.provider)
KEYS = {"VOYAGE_API_KEY": "pa-voyage-secret-123", "OPENAI_API_KEY": "sk-openai-secret-456",
        "COHERE_API_KEY": "co-cohere-secret-789"}


@pytest.fixture(autouse=True)
def api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)


def make_embedder(spec: ModelSpec, sleeps: list[float], *, timeout: float = 5.0,
                  max_retries: int = 6, max_retry_after: float = 60.0) -> Embedder:
    return Embedder(spec, provider_for(spec, timeout=timeout), sleep=sleeps.append,
                    max_retries=max_retries, max_retry_after=max_retry_after)


def expected(spec: ModelSpec, texts: list[str]) -> np.ndarray:
    return server_vectors(spec.provider, spec.model_id, texts, spec.dimensions)


@SPECS
def test_embeds_through_the_sdk(spec: ModelSpec, fake_api: FakeAPI) -> None:
    sleeps: list[float] = []
    texts = ["the cat sat on the mat", " dogs chase cats ", "the cat sat on the mat"]

    vectors = make_embedder(spec, sleeps).embed(texts)

    assert vectors.dtype == np.float32 and vectors.shape == (3, spec.dimensions)
    unique = ["the cat sat on the mat", "dogs chase cats"]
    np.testing.assert_allclose(vectors, expected(spec, unique)[[0, 1, 0]], atol=1e-6)
    [request] = fake_api.requests
    assert request.headers["authorization"] == f"Bearer {KEYS[spec.api_key_env or '']}"
    body = request.body
    assert body["model"] == spec.model_id
    assert body.get("texts", body.get("input")) == unique
    if spec is VOYAGE:
        assert body["input_type"] == "document" and body["truncation"] is False
    if spec is COHERE:
        assert body["input_type"] == "search_document" and body["embedding_types"] == ["float"]
    if spec is OPENAI:
        assert body["dimensions"] == 256 and body["encoding_format"] == "float"
        assert "input_type" not in body
    assert sleeps == []


def test_openai_omits_dimensions_when_the_spec_does_not_request_them(fake_api: FakeAPI) -> None:
    spec = registry.get("openai/text-embedding-3-small@1:1536")
    make_embedder(spec, []).embed(["hello"])
    assert "dimensions" not in fake_api.requests[0].body


@pytest.mark.parametrize(("spec", "sent"), [(VOYAGE, "query"), (COHERE, "search_query")],
                         ids=["voyage", "cohere"])
def test_query_input_type(spec: ModelSpec, sent: str, fake_api: FakeAPI) -> None:
    vector = make_embedder(spec, []).embed_query("what do cats sit on?")
    assert vector.shape == (spec.dimensions,)
    assert fake_api.requests[0].body["input_type"] == sent


@SPECS
def test_429_waits_as_long_as_retry_after_says(spec: ModelSpec, fake_api: FakeAPI) -> None:
    fake_api.script(["429:retry-after=2", "ok"])
    sleeps: list[float] = []

    vectors = make_embedder(spec, sleeps).embed(["alpha", "beta"])

    assert sleeps == [2.0]
    assert len(fake_api.requests) == 2
    np.testing.assert_allclose(vectors, expected(spec, ["alpha", "beta"]), atol=1e-6)


@SPECS
def test_500_is_retried_with_backoff(spec: ModelSpec, fake_api: FakeAPI) -> None:
    fake_api.script("500", "ok")
    sleeps: list[float] = []

    make_embedder(spec, sleeps).embed(["alpha"])

    assert len(fake_api.requests) == 2
    assert len(sleeps) == 1 and 0.5 <= sleeps[0] <= 1.0


@SPECS
def test_gives_up_after_max_retries_naming_the_status(spec: ModelSpec,
                                                      fake_api: FakeAPI) -> None:
    fake_api.script("503", "503", "503")
    sleeps: list[float] = []

    with pytest.raises(ProviderError, match=r"gave up after 3 attempts.*HTTP 503") as info:
        make_embedder(spec, sleeps, max_retries=2).embed(["alpha"])

    assert not isinstance(info.value, TransientProviderError)
    assert len(fake_api.requests) == 3 and len(sleeps) == 2


@SPECS
def test_hang_past_the_timeout_is_retried(spec: ModelSpec, fake_api: FakeAPI) -> None:
    fake_api.script("hang", "ok")
    started = time.monotonic()

    vectors = make_embedder(spec, [], timeout=0.5).embed(["alpha"])

    assert time.monotonic() - started < 3.0
    assert len(fake_api.requests) == 2
    np.testing.assert_allclose(vectors, expected(spec, ["alpha"]), atol=1e-6)


@SPECS
def test_hanging_service_fails_in_bounded_time(spec: ModelSpec, fake_api: FakeAPI) -> None:
    fake_api.script("hang", "hang")
    started = time.monotonic()

    with pytest.raises(ProviderError, match=r"gave up after 2 attempts.*no response"):
        make_embedder(spec, [], timeout=0.5, max_retries=1).embed(["alpha"])

    assert time.monotonic() - started < 4.0
    assert len(fake_api.requests) == 2
    fake_api.reset()
    fake_api.script("hang")
    with pytest.raises(ProviderError, match=r"gave up after 1 attempt;"):
        make_embedder(spec, [], timeout=0.5, max_retries=0).embed(["alpha"])


@SPECS
def test_one_vector_too_few_is_an_error(spec: ModelSpec, fake_api: FakeAPI) -> None:
    fake_api.script("short")
    with pytest.raises(ProviderError, match="returned 1 vectors for 2 texts"):
        make_embedder(spec, []).embed(["alpha", "beta"])
    assert len(fake_api.requests) == 1


@SPECS
def test_wrong_dimensions_are_an_error(spec: ModelSpec, fake_api: FakeAPI) -> None:
    fake_api.script("wrongdims")
    with pytest.raises(ProviderError, match=f"{spec.dimensions // 2}-dimension vectors, "
                                            f"expected {spec.dimensions}"):
        make_embedder(spec, []).embed(["alpha"])


@SPECS
@pytest.mark.parametrize("status", [400, 401, 403])
def test_client_errors_are_not_retried_and_hide_the_key(spec: ModelSpec, status: int,
                                                         fake_api: FakeAPI) -> None:
    fake_api.script(str(status))
    sleeps: list[float] = []

    with pytest.raises(ProviderError, match=f"HTTP {status}") as info:
        make_embedder(spec, sleeps).embed(["alpha"])

    message = str(info.value)
    assert KEYS[spec.api_key_env or ""] not in "".join(traceback.format_exception(info.value))
    assert not isinstance(info.value, TransientProviderError)
    assert len(fake_api.requests) == 1 and sleeps == []
    if status == 401:  # the service echoes the key; we pass on what it said without it
        assert "Incorrect API key provided: <api key>" in message


@SPECS
def test_missing_key_names_the_variable(spec: ModelSpec, monkeypatch: pytest.MonkeyPatch,
                                        fake_api: FakeAPI) -> None:
    monkeypatch.delenv(spec.api_key_env or "")
    with pytest.raises(MissingAPIKey) as info:
        provider_for(spec)
    assert str(info.value) == (f"{spec.api_key_env} is not set (hint: export it where the call "
                               f"runs; a new corpus can use the local model "
                               f"{LOCAL_DEFAULT.key}, which needs no key)")
    assert fake_api.requests == []


@SPECS
def test_retry_after_beyond_the_cap_fails_without_sleeping(spec: ModelSpec,
                                                           fake_api: FakeAPI) -> None:
    fake_api.script("429:retry-after=120")
    sleeps: list[float] = []

    with pytest.raises(RateLimited, match="wait 120 s, more than max_retry_after"):
        make_embedder(spec, sleeps, max_retry_after=60.0).embed(["alpha"])

    assert sleeps == [] and len(fake_api.requests) == 1


@SPECS
@pytest.mark.parametrize("status", [408, 409, 429, 502, 503])
def test_transient_statuses_carry_status_and_retry_after(spec: ModelSpec, status: int,
                                                         fake_api: FakeAPI) -> None:
    fake_api.script(f"{status}:retry-after=3")
    with pytest.raises(TransientProviderError) as info:
        provider_for(spec).embed_batch(["alpha"], InputType.DOCUMENT)
    assert (info.value.status, info.value.retry_after) == (status, 3.0)


@SPECS
def test_connection_refused_is_transient(spec: ModelSpec) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = provider_for(spec, base_url=f"http://127.0.0.1:{port}/v1", timeout=2.0)
    with pytest.raises(TransientProviderError) as info:
        provider.embed_batch(["alpha"], InputType.DOCUMENT)
    assert info.value.status is None


@SPECS
def test_explicit_base_url_wins_over_the_environment(spec: ModelSpec, fake_api: FakeAPI,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    service = spec.provider
    monkeypatch.setenv(f"PYEMBED_{service.upper()}_BASE_URL", "http://127.0.0.1:9/nowhere")
    provider = provider_for(spec, base_url=fake_api.base_url(service))  # type: ignore[arg-type]
    assert len(provider.embed_batch(["alpha"], InputType.DOCUMENT)) == 1


def test_anthropic_message(fake_api: FakeAPI) -> None:
    fake_api.reply_text = "Cats sit on mats."
    client = anthropic.Anthropic(api_key="sk-ant-test", max_retries=0, timeout=5.0)

    message = client.messages.create(model="claude-test", max_tokens=100, system="Be brief.",
                                     messages=[{"role": "user", "content": "Where do cats sit?"}])

    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "Cats sit on mats."  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn" and message.usage.output_tokens == 4
    [request] = fake_api.requests_to("anthropic")
    assert "sk-ant-test" in request.headers.get("x-api-key", request.headers["authorization"])
    assert request.body["system"] == "Be brief."


def test_anthropic_stream(fake_api: FakeAPI) -> None:
    fake_api.reply_text = "Cats sit on mats."
    client = anthropic.Anthropic(api_key="sk-ant-test", max_retries=0, timeout=5.0)

    with client.messages.stream(model="claude-test", max_tokens=100,
                                messages=[{"role": "user", "content": "Where?"}]) as stream:
        chunks = list(stream.text_stream)
        final = stream.get_final_message()

    assert chunks == ["Cats", " sit", " on", " mats."]
    assert final.content[0].text == "Cats sit on mats."  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"

    events = client.messages.create(model="claude-test", max_tokens=100, stream=True,
                                    messages=[{"role": "user", "content": "Where?"}])
    kinds = [event.type for event in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert kinds.count("content_block_delta") == 4


def test_anthropic_errors(fake_api: FakeAPI) -> None:
    fake_api.script("429:retry-after=7", "529")
    client = anthropic.Anthropic(api_key="sk-ant-test", max_retries=0, timeout=5.0)
    messages: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Hi"}]

    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.create(model="claude-test", max_tokens=10, messages=messages)
    assert limited.value.response.headers["retry-after"] == "7"
    with pytest.raises(anthropic.APIStatusError) as overloaded:
        client.messages.create(model="claude-test", max_tokens=10, messages=messages)
    assert overloaded.value.status_code == 529


def test_fake_api_script_syntax() -> None:
    assert Behaviour.parse("429:retry-after=2") == Behaviour("status", 429, "2")
    assert Behaviour.parse("hang") == Behaviour("hang")
    for bad in ("teapot", "200", "429:wait=1", "500:retry-after="):
        with pytest.raises(ValueError, match="unknown behaviour"):
            Behaviour.parse(bad)
    assert Behaviour.parse("indexes=1,1,0,3") == Behaviour("indexes", indexes=(1, 1, 0, 3))
    for bad in ("indexes=", "indexes=1,,2", "indexes=-1"):
        with pytest.raises(ValueError, match="unknown behaviour"):
            Behaviour.parse(bad)


# -- secrets stay secret in errors -----------------------------------------------------------
GATEWAY_USER, GATEWAY_PASSWORD = "gw-user-7d1f", "gw-pass-9c4e"
SECRET_SEGMENT = "route-token-5e2a"
QUERY_SECRET = "query-secret-8b3c"


def secret_base_url(root: str, service: str, *, userinfo: bool) -> str:
    """A gateway base URL for `service` under `root` (http://host:port) with a secret path
    segment, a query string and, if `userinfo`, a user name and password."""
    scheme, _, host = root.partition("://")
    credentials = f"{GATEWAY_USER}:{GATEWAY_PASSWORD}@" if userinfo else ""
    suffix = "/v1" if service in ("voyage", "openai") else ""
    return f"{scheme}://{credentials}{host}/{SECRET_SEGMENT}/{service}{suffix}?sig={QUERY_SECRET}"


def secrets_of(spec: ModelSpec) -> list[str]:
    """Every secret a message must not show: the gateway's, and the key, as sent or echoed."""
    basic = base64.b64encode(f"{GATEWAY_USER}:{GATEWAY_PASSWORD}".encode()).decode()
    return [GATEWAY_USER, GATEWAY_PASSWORD, SECRET_SEGMENT, QUERY_SECRET, "sig=", basic,
            KEYS[spec.api_key_env or ""]]


def assert_redacted(error: BaseException, spec: ModelSpec) -> str:
    message = str(error)
    shown = "".join(traceback.format_exception(error))
    for secret in secrets_of(spec):
        assert secret not in message, f"{secret!r} in {message!r}"
        assert secret not in shown, f"{secret!r} in the traceback:\n{shown}"
    assert f"{spec.provider} ({spec.model_id})" in message
    return message


@SPECS
@pytest.mark.parametrize("status", [500, 401, 400])
@pytest.mark.parametrize("userinfo", [True, False], ids=["userinfo", "no-userinfo"])
def test_errors_hide_the_base_url_and_the_key(spec: ModelSpec, status: int, userinfo: bool,
                                               fake_api: FakeAPI) -> None:
    base_url = secret_base_url(fake_api.url, spec.provider, userinfo=userinfo)
    fake_api.script(str(status))
    embedder = Embedder(spec, provider_for(spec, base_url=base_url, timeout=5.0),
                        max_retries=0, sleep=lambda _: None)

    with pytest.raises(ProviderError) as info:
        embedder.embed(["alpha"])

    [request] = fake_api.requests
    assert SECRET_SEGMENT in request.target and QUERY_SECRET in request.target
    message = assert_redacted(info.value, spec)
    assert f"HTTP {status}" in message
    if status == 401 and not userinfo:  # the service echoed the key, and only that is hidden
        assert "Incorrect API key provided: <api key>" in message


@SPECS
@pytest.mark.parametrize("userinfo", [True, False], ids=["userinfo", "no-userinfo"])
def test_connection_failures_hide_the_base_url(spec: ModelSpec, userinfo: bool) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base_url = secret_base_url(f"http://127.0.0.1:{port}", spec.provider, userinfo=userinfo)
    provider = provider_for(spec, base_url=base_url, timeout=2.0)

    with pytest.raises(TransientProviderError) as info:
        provider.embed_batch(["alpha"], InputType.DOCUMENT)

    message = assert_redacted(info.value, spec)
    assert "no response" in message and info.value.status is None


@pytest.mark.parametrize(("message", "shown"), [
    ("see https://u:p@gw.internal:8443/a/b?key=abc#frag for more",
     "see https://gw.internal:8443 for more"),
    ("POST http://127.0.0.1:9/x/y failed", "POST http://127.0.0.1:9 failed"),
    ("Authorization: Bearer abc.def-123", "Authorization: Bearer <api key>"),
    ("header Basic dXNlcjpwdw== refused", "header Basic <api key> refused"),
    ("bad key sk-proj-AbCdEf123456 and pa-XyZ9876543210", "bad key <api key> and <api key>"),
    ("url: /v1/embeddings?api_key=abc123&x=1 (Caused by X)",
     "url: /v1/embeddings?<redacted> (Caused by X)"),
    ("nothing secret here: voyage (voyage-3): HTTP 400", "nothing secret here: voyage "
     "(voyage-3): HTTP 400"),
])
def test_redact_reduces_urls_and_removes_tokens(message: str, shown: str) -> None:
    assert redact(message) == shown


def test_redact_removes_the_configured_secrets_wherever_they_appear() -> None:
    base_url = "https://gw-user:gw-pass@gw.internal/tenant-secret/voyage/v1?sig=xyz123"
    message = ("url: /tenant-secret/voyage/v1?sig=xyz123/embeddings, user gw-user:gw-pass, "
               "key co-my-key-42 echoed")
    shown = redact(message, secrets=["co-my-key-42", None], base_url=base_url)
    for secret in ("tenant-secret", "xyz123", "gw-user", "gw-pass", "co-my-key-42"):
        assert secret not in shown
    assert shown.endswith("echoed") and shown.startswith("url: ")


# -- the same in the database, as the application role --------------------------------------
VOYAGE_IN_DB = "voyage/voyage-3@1:1024"


@pytest.fixture
def app_with_secret_gateway(db: Database, fake_api: FakeAPI
                            ) -> Iterator[tuple[psycopg.Connection[Any], str]]:
    """The owner stores the Voyage key and a secret gateway base URL (both owner-only), then
    the session switches to the application role; yields it and the base URL's root."""
    with connect(db.owner_dsn, autocommit=True) as conn:
        conn.execute("SELECT pyembed.set_secret('VOYAGE_API_KEY', %s)",
                     (KEYS["VOYAGE_API_KEY"],))
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(APP_USER)))
        conn.execute("SET pyembed.http_retries = 0")
        yield conn, fake_api.url


def set_gateway(db: Database, root: str) -> None:
    with connect(db.owner_dsn, autocommit=True) as owner:
        owner.execute("SELECT pyembed.set_secret('PYEMBED_VOYAGE_BASE_URL', %s)",
                      (secret_base_url(root, "voyage", userinfo=True),))


@pytest.mark.parametrize("status", [500, 401, 400])
def test_in_database_errors_hide_the_owners_base_url(
        db: Database, app_with_secret_gateway: tuple[psycopg.Connection[Any], str],
        fake_api: FakeAPI, status: int) -> None:
    conn, root = app_with_secret_gateway
    set_gateway(db, root)
    fake_api.script(str(status))
    with pytest.raises(psycopg.Error) as info:
        conn.execute("SELECT pyembed.embed('alpha', %s)", (VOYAGE_IN_DB,))
    assert info.value.sqlstate == "PE009", str(info.value)
    [request] = fake_api.requests
    assert SECRET_SEGMENT in request.target
    shown = " ".join(filter(None, (str(info.value), info.value.diag.context,
                                   info.value.diag.message_detail)))
    for secret in secrets_of(registry.get(VOYAGE_IN_DB)):
        assert secret not in shown, f"{secret!r} in {shown!r}"
    assert "voyage (voyage-3)" in shown and f"HTTP {status}" in shown


def test_in_database_connection_failure_hides_the_owners_base_url(
        db: Database, app_with_secret_gateway: tuple[psycopg.Connection[Any], str]) -> None:
    conn, _ = app_with_secret_gateway
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    set_gateway(db, f"http://127.0.0.1:{port}")
    with pytest.raises(psycopg.Error) as info:
        conn.execute("SELECT pyembed.embed('alpha', %s)", (VOYAGE_IN_DB,))
    assert info.value.sqlstate == "PE009", str(info.value)
    shown = " ".join(filter(None, (str(info.value), info.value.diag.context,
                                   info.value.diag.message_detail)))
    for secret in secrets_of(registry.get(VOYAGE_IN_DB)):
        assert secret not in shown, f"{secret!r} in {shown!r}"
    assert "voyage (voyage-3)" in shown and "no response" in shown


# -- a base URL that is not one ----------------------------------------------------------------
BAD_BASE_URLS = ["http://gw-user:gw-pass@[::1/v1", "http://127.0.0.1:99999/v1", "no url at all",
                 "ftp://127.0.0.1/v1"]


@pytest.mark.parametrize("url", BAD_BASE_URLS)
@pytest.mark.parametrize("name", [VOYAGE.key, OPENAI.key, COHERE.key, "voyage/rerank-2.5",
                                  "cohere/rerank-v3.5"])
def test_a_base_url_that_is_not_one_is_a_config_error_naming_its_variable(
        monkeypatch: pytest.MonkeyPatch, name: str, url: str) -> None:
    """httpx's InvalidURL came out raw from the OpenAI and Cohere SDKs (an unclosed bracket);
    a URL without http(s) or with port 99999 was a connection failure, retried and counted
    as the provider's. Nothing is sent; the message names the variable, not the URL."""
    from pyembed.errors import ConfigError
    from pyembed.rerank import Reranker, reranker_spec

    provider = name.split("/")[0]
    monkeypatch.setenv(f"PYEMBED_{provider.upper()}_BASE_URL", url)
    with pytest.raises(ConfigError) as info:
        if "rerank" in name:
            Reranker(reranker_spec(name), max_retries=0).scores("q", ["a"])
        else:
            Embedder(registry.get(name), max_retries=0).embed(["a"])
    assert str(info.value).startswith(f"PYEMBED_{provider.upper()}_BASE_URL is not an http or "
                                      "https URL with a host")
    assert "gw-pass" not in str(info.value) and "99999" not in str(info.value)


@pytest.mark.parametrize("url", BAD_BASE_URLS[:2])
def test_claudes_base_url_that_is_not_one_is_a_config_error(
        client: Any, monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    from pyembed import rag
    from pyembed.errors import ConfigError

    docs = client.create_corpus("docs", "fake/fake-hash@1:384")
    docs.add([("a", "error E4012 means the quota is used up")])
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-bad-url-1234")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", url)
    with pytest.raises(ConfigError, match=r"^ANTHROPIC_BASE_URL is not an http or https URL"):
        rag.answer(docs, "what is E4012?", max_retries=0)


# -- a configuration error inside SQL ------------------------------------------------------------
FAKE_IN_DB = "fake/fake-hash@1:384"
MISSERVED = {"local": ("local", "another-minilm", "1", 384),
             "local-e5": ("local", "multilingual-e5-small-q4", "2", 128)}
"""Models the owner can register that their provider does not serve (the models table's CHECK
allows only the providers pyembed has): ConfigError when the provider is made for them."""
CONFIG_CASES = {
    "voyage": (VOYAGE.key, None, "PYEMBED_VOYAGE_BASE_URL is not an http or https URL"),
    "openai": (OPENAI.key, None, "PYEMBED_OPENAI_BASE_URL is not an http or https URL"),
    "cohere": (COHERE.key, None, "PYEMBED_COHERE_BASE_URL is not an http or https URL"),
    "voyage-rerank": (FAKE_IN_DB, "voyage/rerank-2.5",
                      "PYEMBED_VOYAGE_BASE_URL is not an http or https URL"),
    "cohere-rerank": (FAKE_IN_DB, "cohere/rerank-v3.5",
                      "PYEMBED_COHERE_BASE_URL is not an http or https URL"),
    "local": ("local/another-minilm@1:384", None, "the local provider runs only"),
    "local-e5": ("local/multilingual-e5-small-q4@2:128", None, "this provider runs only"),
}
"""Each provider SQL can call (Anthropic is called only from Python, by rag.answer): the corpus's
model, the reranker, and the start of the ConfigError's message."""


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_in_database_a_configuration_error_is_pe013_and_config_error(db: Database,
                                                                    case: str) -> None:
    """The owner's bad base URL (given with a key, so the key is not what is missing) or a model
    no provider serves: every PL/Python entry that makes the provider (embed, embed_batch,
    search_text, search_reranked) says PE013, which db.translate makes ConfigError; it was
    PE009, the provider's failure, though nothing was sent. The message never shows the URL."""
    from pyembed.db import translate
    from pyembed.errors import ConfigError

    model_key, rerank, message = CONFIG_CASES[case]
    with connect(db.owner_dsn, autocommit=True) as owner:
        for name, value in KEYS.items():
            owner.execute("SELECT pyembed.set_secret(%s, %s)", (name, value))
            owner.execute("SELECT pyembed.set_secret(%s, %s)",
                          (f"PYEMBED_{name.split('_')[0]}_BASE_URL", BAD_BASE_URLS[0]))
        if case in MISSERVED:
            owner.execute("SELECT pyembed.register_model(%s, %s, %s, %s)", MISSERVED[case])
        owner.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(APP_USER)))
        owner.execute("SET pyembed.http_retries = 0")
        owner.execute("SELECT pyembed.create_corpus('docs', %s)", (model_key,))
        calls: list[tuple[str, tuple[Any, ...]]] = [
            ("SELECT * FROM pyembed.search_reranked('docs', 'alpha', %s)", (rerank,))
        ] if rerank else [
            ("SELECT pyembed.embed('alpha', %s)", (model_key,)),
            ("SELECT pyembed.embed_batch(ARRAY['alpha', 'beta'], %s)", (model_key,)),
            ("SELECT * FROM pyembed.search_text('docs', 'alpha', 3)", ()),
            ("SELECT * FROM pyembed.search_text('docs', 'alpha', 3, NULL, 'hybrid')", ()),
        ]
        for query, params in calls:
            with pytest.raises(psycopg.Error) as info:
                owner.execute(query, params)
            shown = f"{query}: {info.value.sqlstate} {info.value}"
            assert info.value.sqlstate == "PE013", shown
            assert message in str(info.value), shown
            assert "gw-pass" not in str(info.value) + (info.value.diag.context or ""), shown
            mapped = translate(info.value)
            assert type(mapped) is ConfigError and str(mapped).startswith(message), mapped


def test_closing_the_client_closes_the_sdks_connections(db: Database, fake_api: FakeAPI) -> None:
    """Client.close closed its database connections only: the OpenAI and Cohere SDK clients of
    its embedders and rerankers kept their HTTP connections until the garbage collector came.
    Now each provider closes its SDK's (Voyage's per-thread session is shared: not closed)."""
    import pyembed

    client = pyembed.connect(db.app_dsn)
    openai_, cohere_ = client.embedder(OPENAI.key), client.embedder(COHERE.key)
    rerank = client.reranker("cohere/rerank-v3.5")
    for embedder in (openai_, cohere_):
        embedder.embed(["a text"], InputType.DOCUMENT)  # a connection opened
    sdk_clients = [openai_.provider._client._client,  # type: ignore[attr-defined]
                   *(p._client._client_wrapper.httpx_client.httpx_client  # type: ignore[attr-defined]
                     for p in (cohere_.provider, rerank.provider))]
    assert not any(c.is_closed for c in sdk_clients)
    client.close()
    assert all(c.is_closed for c in sdk_clients)


# -- each service's documented limits, kept before the call (pyembed.limits) -----------------

WIDE = {  # a model registered with more than its service takes: per text, per request
    "voyage": ModelSpec("voyage", "voyage-code-3", "1", 1024, max_batch=2000,
                        max_tokens=64_000, input_types=True, api_key_env="VOYAGE_API_KEY"),
    "openai": ModelSpec("openai", "text-embedding-3-small", "1", 1536, max_batch=5000,
                        max_tokens=100_000, api_key_env="OPENAI_API_KEY"),
    "cohere": ModelSpec("cohere", "embed-english-v3.0", "3", 1024, max_batch=500,
                        max_tokens=4096, input_types=True, api_key_env="COHERE_API_KEY"),
}


@pytest.mark.parametrize("service", list(WIDE))
def test_each_request_keeps_to_the_services_limits_whatever_the_model_states(
        service: str, fake_api: FakeAPI) -> None:
    """A model registered with a larger batch or text limit than its service documents is
    held to the service's: the texts split into requests the service takes (the fake server
    refuses a request past them with a 400, as the service does), a text past the service's
    per-text limit refused before any call, a token budget past the per-request limit refused
    at construction. Before, every one of them reached the service and came back a 400."""
    from pyembed.limits import limits_for

    spec = WIDE[service]
    limits = limits_for(spec.provider, spec.model_id)
    assert limits.texts is not None and limits.text_tokens is not None
    embedder = Embedder(spec, provider_for(spec), sleep=lambda s: None)
    texts = [f"text number {i}" for i in range(limits.texts + 5)]
    assert len(embedder.embed(texts)) == len(texts)
    sizes = [len(r.body.get("texts") or r.body.get("input")) for r in fake_api.requests]
    assert max(sizes) <= limits.texts and sum(sizes) == len(texts)

    fake_api.reset()
    long = "word " * (limits.text_tokens * 4 // 5 + 10)  # about text_tokens + 13 tokens
    with pytest.raises(InvalidInput, match=f"over the {limits.text_tokens}-token limit"):
        embedder.embed([long])
    assert fake_api.requests == []
    if limits.request_tokens is not None:
        with pytest.raises(ConfigError, match=f"over {service}'s {limits.request_tokens}-token "
                                              "limit per request"):
            Embedder(spec, provider_for(spec), max_batch_tokens=limits.request_tokens + 1)
        # The default budget takes the service's limit when it is the lower one.
        assert Embedder(spec, provider_for(spec)).max_batch_tokens <= limits.request_tokens
