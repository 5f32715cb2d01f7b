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
from psycopg import sql
from voyageai.api_resources import Embedding

import pyembed
from pyembed import rag
from pyembed.client import Client
from pyembed.db import connect
from pyembed.embedder import Embedder
from pyembed.localdb import APP_USER
from pyembed.models import registry
from pyembed.providers import provider_for
from pyembed.providers.rerank import reranker_for, reranker_spec
from pyembed.rerank import Reranker
from tests.conftest import Database
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
