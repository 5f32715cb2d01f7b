"""One connection per attempt: pyembed.retry.Retrier is the only retry loop between pyembed and
a service, down to the transport. Before, the Voyage SDK's own session (a requests adapter with
max_retries=2, mounted for https only) tried a failed connection three times inside each of
pyembed's attempts, so a dead host cost three times the attempts "gave up after N attempts"
said (and three connect timeouts each). Counted at a fake endpoint that accepts and drops every
connection, and at a closed port, for every service pyembed calls, over https and http."""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import voyageai
from psycopg import sql
from voyageai.api_resources import Embedding, api_requestor

import pyembed
from pyembed import rag
from pyembed.client import Client
from pyembed.db import connect
from pyembed.embedder import Embedder
from pyembed.localdb import APP_USER
from pyembed.models import registry
from pyembed.providers import provider_for, voyage
from pyembed.providers.rerank import reranker_for, reranker_spec
from pyembed.rerank import Reranker
from tests.conftest import Database
from tests.fakeapi.proxy import forwarding_proxy
from tests.fakeapi.server import FakeAPI
from tests.helpers import sql_error

ATTEMPTS = 2
"""pyembed's attempts in every call below (max_retries=1)."""

_watched: dict[int, int] = {}
"""Connections made (socket.connect, as audited) to each watched port of 127.0.0.1."""
_watch_lock = threading.Lock()


def _count_connects(event: str, args: tuple[object, ...]) -> None:
    if event == "socket.connect" and _watched:
        address = args[1]
        if isinstance(address, tuple) and len(address) >= 2 and address[1] in _watched:
            with _watch_lock:
                _watched[address[1]] += 1


sys.addaudithook(_count_connects)  # an audit hook stays; it counts only while a port is watched


@contextmanager
def dropping_endpoint() -> Iterator[tuple[int, Callable[[], int]]]:
    """A port of 127.0.0.1 that accepts each connection, reads what the client sends first
    (an HTTP request, or a TLS ClientHello), and closes it without an answer; yields the port
    and a function giving the connections it accepted."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    accepted = [0]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted[0] += 1
            with conn:
                conn.settimeout(2.0)
                try:
                    conn.recv(65536)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], lambda: accepted[0]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


@contextmanager
def closed_port() -> Iterator[tuple[int, Callable[[], int]]]:
    """A port of 127.0.0.1 nothing listens on (connections are refused); yields it and a
    function giving the connections attempted to it, from the audit hook."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with _watch_lock:
        _watched[port] = 0
    try:
        yield port, lambda: _watched[port]
    finally:
        with _watch_lock:
            del _watched[port]


ENDPOINTS = {"dropped": dropping_endpoint, "refused": closed_port}

PATHS = {"voyage": "/v1", "openai": "/v1", "cohere": ""}
"""What follows host:port in each service's base URL."""


def _noop(seconds: float) -> None:
    pass


def embed(key: str) -> Callable[[str], None]:
    def call(url: str) -> None:
        spec = registry.get(key)
        provider = provider_for(spec, api_key="pa-transport", base_url=url + PATHS[spec.provider])
        Embedder(spec, provider, max_retries=ATTEMPTS - 1, sleep=_noop).embed(["dropped"])
    return call


def rerank(name: str) -> Callable[[str], None]:
    def call(url: str) -> None:
        spec = reranker_spec(name)
        provider = reranker_for(spec, api_key="pa-transport",
                                base_url=url + PATHS[spec.provider])
        Reranker(spec, provider, max_retries=ATTEMPTS - 1, sleep=_noop).scores("q", ["a", "b"])
    return call


CALLS = {
    "voyage-embed": embed("voyage/voyage-3@1:1024"),
    "openai-embed": embed("openai/text-embedding-3-small@1:1536"),
    "cohere-embed": embed(next(s.key for s in registry.all() if s.provider == "cohere")),
    "voyage-rerank": rerank("voyage/rerank-2.5"),
    "cohere-rerank": rerank("cohere/rerank-v3.5"),
}


@pytest.mark.parametrize("scheme", ["https", "http"])
@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
@pytest.mark.parametrize("service", list(CALLS))
def test_each_attempt_at_a_dead_endpoint_is_one_connection(service: str, endpoint: str,
                                                           scheme: str) -> None:
    with ENDPOINTS[endpoint]() as (port, connections):
        with pytest.raises(pyembed.ProviderError,
                           match=f"gave up after {ATTEMPTS} attempts") as info:
            CALLS[service](f"{scheme}://127.0.0.1:{port}")
        assert info.value.kind == "no_response"
        assert connections() == ATTEMPTS, (service, endpoint, scheme)


@pytest.mark.parametrize("scheme", ["https", "http"])
@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_claudes_attempts_are_one_connection_each(client: Client, endpoint: str, scheme: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """rag.answer's call to Claude (the Anthropic SDK's transport) at a dead endpoint."""
    corpus = client.create_corpus("kb", "fake/fake-hash@1:384")
    corpus.add([("e4012", "Error E4012 means the monthly quota is used up.")])
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-transport")
    with ENDPOINTS[endpoint]() as (port, connections):
        monkeypatch.setenv("ANTHROPIC_BASE_URL", f"{scheme}://127.0.0.1:{port}")
        with pytest.raises(pyembed.ProviderError) as info:
            rag.answer(corpus, "What does E4012 mean?", k=1, max_retries=ATTEMPTS - 1)
        assert info.value.kind == "no_response"
        assert connections() == ATTEMPTS, (endpoint, scheme)


def test_a_programs_own_voyage_calls_keep_the_sdks_session() -> None:
    """pyembed's session is its own: after pyembed's Voyage call in this thread, the SDK
    called directly still retries a dropped https connection as it always did (its session,
    two retries), so pyembed changes nothing global of the SDK."""
    with dropping_endpoint() as (port, connections):
        url = f"https://127.0.0.1:{port}/v1"
        with pytest.raises(pyembed.ProviderError):
            CALLS["voyage-embed"](f"https://127.0.0.1:{port}")
        assert connections() == ATTEMPTS
        with pytest.raises(Exception, match="VoyageAI"):
            Embedding.create(input=["own"], model="voyage-3",  # type: ignore[no-untyped-call]
                             api_key="pa-own", base_url=url, request_timeout=5)
        assert connections() == ATTEMPTS + 3


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_a_call_in_the_server_is_one_connection_an_attempt(db: Database, scheme: str) -> None:
    """pyembed.embed in a backend (PL/Python, pyembed.http_retries) at a dropping endpoint."""
    with dropping_endpoint() as (port, connections), \
            connect(db.owner_dsn, autocommit=True) as conn:
        conn.execute("SELECT pyembed.set_secret('VOYAGE_API_KEY', 'pa-transport')")
        conn.execute("SELECT pyembed.set_secret('PYEMBED_VOYAGE_BASE_URL', %s)",
                     (f"{scheme}://127.0.0.1:{port}/v1",))
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(APP_USER)))
        conn.execute(f"SET pyembed.http_retries = {ATTEMPTS - 1}")
        err = sql_error(conn, "SELECT pyembed.embed('dropped', 'voyage/voyage-3@1:1024')")
        assert err.sqlstate == "PE009" and f"gave up after {ATTEMPTS} attempts" in str(err)
        assert connections() == ATTEMPTS


def _voyage_embed(fake_api: FakeAPI, text: str) -> None:
    spec = registry.get("voyage/voyage-3@1:1024")
    provider = provider_for(spec, api_key="pa-proxy", base_url=fake_api.base_url("voyage"))
    Embedder(spec, provider, max_retries=0, sleep=_noop).embed([text])


def _in_a_new_thread(call: Callable[[], None]) -> None:
    """`call()` in a thread of its own (a session of its own), its error raised here."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    if failed:
        raise failed[0]


@pytest.fixture
def no_environment_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def test_the_sdks_proxy_setting_carries_pyembeds_voyage_calls(
        fake_api: FakeAPI, no_environment_proxy: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """voyageai.proxy, the SDK-wide setting a program sets for its Voyage calls, carries
    pyembed's too (embeddings and reranking), as it carries the SDK's own; a proxy in the
    environment does too when it is not set. Before, pyembed's own session (harden14) took the
    environment's proxies only: the call went straight to the service."""
    with forwarding_proxy() as (proxy, seen):
        monkeypatch.setattr(voyageai, "proxy", proxy)
        _in_a_new_thread(lambda: _voyage_embed(fake_api, "through the proxy"))
        assert seen == [fake_api.base_url("voyage") + "/embeddings"]
        assert [r.body["input"] for r in fake_api.requests_to("voyage")] == [
            ["through the proxy"]]
        _in_a_new_thread(lambda: CALLS["voyage-rerank"](fake_api.url + "/voyage"))
        assert seen[1:] == [fake_api.base_url("voyage") + "/rerank"]
        # Not set: the environment's proxy, as before.
        monkeypatch.setattr(voyageai, "proxy", None)
        monkeypatch.setenv("HTTP_PROXY", proxy)
        _in_a_new_thread(lambda: _voyage_embed(fake_api, "the environment's proxy"))
        assert seen[2:] == [fake_api.base_url("voyage") + "/embeddings"]
        monkeypatch.delenv("HTTP_PROXY")
        _in_a_new_thread(lambda: _voyage_embed(fake_api, "straight"))
        assert len(seen) == 3 and len(fake_api.requests_to("voyage")) == 4
        monkeypatch.setattr(voyageai, "proxy", 8080)
        with pytest.raises(pyembed.ConfigError, match=r"voyageai\.proxy"):
            _in_a_new_thread(lambda: _voyage_embed(fake_api, "a proxy of no type"))


def test_pyembeds_voyage_session_is_replaced_as_often_as_the_sdks(
        fake_api: FakeAPI, no_environment_proxy: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread's session is kept for the SDK's MAX_SESSION_LIFETIME_SECS, then closed and
    replaced, as the SDK's own is: a proxy set since (or a host's new address) reaches a
    long-running worker. Before, a thread kept its first session for good."""
    def calls() -> None:
        _voyage_embed(fake_api, "first")
        first = voyage._session()
        assert voyage._session() is first  # within the lifetime: kept
        assert len(first.adapters["http://"].poolmanager.pools) == 1  # (its connection)
        with forwarding_proxy() as (proxy, seen):
            monkeypatch.setattr(voyageai, "proxy", proxy)
            _voyage_embed(fake_api, "same session")
            assert seen == []  # (read when a session is made, as the SDK reads it)
            monkeypatch.setattr(api_requestor, "MAX_SESSION_LIFETIME_SECS", 0)
            _voyage_embed(fake_api, "a new session")
            assert seen == [fake_api.base_url("voyage") + "/embeddings"]
        assert voyage._session() is not first
        assert len(first.adapters["http://"].poolmanager.pools) == 0  # the old one closed

    _in_a_new_thread(calls)
    assert len(fake_api.requests_to("voyage")) == 3
