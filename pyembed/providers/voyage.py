"""Voyage AI embeddings and reranking through the `voyageai` SDK."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import requests
import voyageai
import voyageai.error
from requests.adapters import HTTPAdapter
from voyageai.api_resources import Embedding, Reranking, api_requestor
from voyageai.api_resources.api_requestor import APIRequestor
from voyageai.api_resources.response import convert_to_voyage_response
from voyageai.util import decode_base64_embedding

from ..errors import ConfigError
from ..models import InputType
from .base import Provider, ServiceClient, Vectors, parse_retry_after
from .rerank import RerankProvider


@contextmanager
def _translated(client: ServiceClient[Any]) -> Iterator[None]:
    """The SDK's failures as `client.failure` errors (transient or not), redacted."""
    try:
        yield
    except (voyageai.error.Timeout, voyageai.error.APIConnectionError) as exc:
        raise client.failure(None, str(exc.user_message)) from None
    except voyageai.error.VoyageError as exc:
        headers = dict(exc.headers) if exc.headers else None
        raise client.failure(exc.http_status, str(exc.user_message),
                             retry_after=parse_retry_after(headers)) from None


_sessions = threading.local()


def _session() -> requests.Session:
    """This thread's session for pyembed's Voyage calls (one per thread, as the SDK keeps
    its own): its adapters never retry, where the SDK's own session
    retries a failed https connection twice inside each of pyembed.retry's attempts. The
    SDK's session, and so a program's own calls of the SDK, are left as they are.

    Otherwise made as the SDK makes its own: with the SDK-wide `voyageai.proxy` (read when a
    session is made), and replaced by a new one after the SDK's MAX_SESSION_LIFETIME_SECS (a
    changed proxy, or a host's new address, reaches a long-running worker). A session a
    program gives the SDK (`voyageai.requestssession`) is not taken: its adapters may retry
    on their own, under pyembed.retry's attempts."""
    session: requests.Session | None = getattr(_sessions, "session", None)
    now = time.monotonic()
    if session is not None and now - _sessions.made >= api_requestor.MAX_SESSION_LIFETIME_SECS:
        session.close()
        session = None
    if session is None:
        session = requests.Session()
        for prefix in ("https://", "http://"):
            session.mount(prefix, HTTPAdapter(max_retries=0))
        try:
            proxies = api_requestor._requests_proxies_arg(voyageai.proxy)
        except ValueError as exc:  # (the SDK's own words for a proxy of another type)
            raise ConfigError(str(exc)) from None
        if proxies:
            session.proxies = proxies
        _sessions.session, _sessions.made = session, now
    return session


class _Requestor(APIRequestor):
    """The SDK's requestor (its headers, request body and reading of answers and errors),
    sending through `_session()` instead of the SDK's session."""

    def request_raw(self, method: str, url: str, *, params: Any = None,
                    supplied_headers: dict[str, str] | None = None, files: Any = None,
                    stream: bool = False, request_id: str | None = None,
                    request_timeout: float | tuple[float, float] | None = None
                    ) -> requests.Response:
        abs_url, headers, data = self._prepare_request_raw(url, supplied_headers, method, params,
                                                           files, request_id)
        try:
            session = _session()
            # The session's proxies given with the request, as the SDK gives them: over the
            # environment's (HTTPS_PROXY), which requests puts first otherwise.
            return session.request(method, abs_url, headers=headers, data=data, files=files,
                                   stream=stream, timeout=request_timeout,
                                   proxies=session.proxies)
        except requests.exceptions.Timeout as exc:  # as the SDK's request_raw translates them
            raise voyageai.error.Timeout(  # type: ignore[no-untyped-call]
                f"Request timed out: {exc}") from exc
        except requests.exceptions.RequestException as exc:
            raise voyageai.error.APIConnectionError(  # type: ignore[no-untyped-call]
                f"Error communicating with VoyageAI: {exc}") from exc


def _create(client: ServiceClient[Any], resource: type[Any], **params: Any) -> Any:
    """What `resource.create(**params)` answers (Embedding, Reranking), sent by `_Requestor`."""
    requestor = _Requestor(client.api_key, client.base_url)  # type: ignore[no-untyped-call]
    response = requestor.request("post", resource.class_url(), params=params,
                                 request_timeout=client.timeout)
    return convert_to_voyage_response(response)  # type: ignore[no-untyped-call]


class VoyageProvider(Provider):
    """Voyage models (`voyage/...`); key from VOYAGE_API_KEY, base URL from
    PYEMBED_VOYAGE_BASE_URL (e.g. http://127.0.0.1:8080/v1)."""

    name = "voyage"
    base_url_env = "PYEMBED_VOYAGE_BASE_URL"

    def embed_batch(self, texts: list[str], input_type: InputType) -> Vectors:
        """One request to the embeddings endpoint; the service must not truncate silently."""
        with self.reading_answer():
            with _translated(self):
                # The SDK's resource, not its Client: the Client's answer drops each index.
                response = _create(
                    self, Embedding, input=texts, model=self.spec.model_id,
                    input_type=input_type.value if self.spec.input_types else None,
                    truncation=False, encoding_format="base64",
                )
                for item in response.data:  # as Embedding.create reads the base64 it asks for
                    if isinstance(item["embedding"], str):
                        item["embedding"] = decode_base64_embedding(item["embedding"])
            data = response.get("data")
            if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
                raise self.bad_response("the answer has no list of embeddings")
            pairs: list[tuple[object, Any]] = [(item.get("index"), item.get("embedding"))
                                               for item in data]
            return self.in_input_order(pairs, len(texts))


class VoyageReranker(RerankProvider):
    """Voyage rerankers (`voyage/rerank-2.5`, `voyage/rerank-2.5-lite`); key from
    VOYAGE_API_KEY, base URL from PYEMBED_VOYAGE_BASE_URL, as for embeddings."""

    name = "voyage"
    base_url_env = VoyageProvider.base_url_env

    def score_batch(self, query: str, texts: list[str]) -> list[object]:
        """One request to the rerank endpoint for every text's score; the service cuts a
        candidate too long for the model's context (truncation), which a ranking tolerates."""
        with self.reading_answer():
            with _translated(self):
                # The SDK's resource, as for embeddings: the Client retries on its own.
                response = _create(self, Reranking, query=query, documents=texts,
                                   model=self.spec.model_id, top_k=None, truncation=True)
            data = response.get("data")
            if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
                raise self.bad_response("the answer has no list of scores")
            return self.in_input_order([(item.get("index"), item.get("relevance_score"))
                                        for item in data], len(texts))
