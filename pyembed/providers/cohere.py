"""Cohere embeddings and reranking through the `cohere` SDK (v2 API)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import cohere
import cohere.core.api_error
import httpx

from ..models import InputType, ModelSpec
from .base import Provider, ServiceClient, Vectors, parse_retry_after
from .rerank import RerankerSpec, RerankProvider

_INPUT_TYPES: dict[InputType, Literal["search_document", "search_query"]] = {
    InputType.DOCUMENT: "search_document",
    InputType.QUERY: "search_query",
}


@contextmanager
def _translated(client: ServiceClient[Any], timeout: float) -> Iterator[None]:
    """The SDK's failures as `client.failure` errors (transient or not), redacted."""
    try:
        yield
    except cohere.core.api_error.ApiError as exc:
        raise client.failure(exc.status_code, _detail(exc.body),
                             retry_after=parse_retry_after(exc.headers)) from None
    except httpx.TimeoutException:
        raise client.failure(None, f"timed out after {timeout} s") from None
    except httpx.TransportError as exc:
        raise client.failure(None, f"connection failed: {exc}") from None


def _detail(body: object) -> str:
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return str(body)



def _close(client: cohere.ClientV2) -> None:
    """Close the SDK client's connections: its context manager's exit is its only way."""
    client.__exit__(None, None, None)  # type: ignore[no-untyped-call]

class CohereProvider(Provider):
    """Cohere models (`cohere/...`); key from COHERE_API_KEY, base URL from
    PYEMBED_COHERE_BASE_URL (e.g. http://127.0.0.1:8080, without /v2)."""

    name = "cohere"
    base_url_env = "PYEMBED_COHERE_BASE_URL"

    def __init__(self, spec: ModelSpec, *, api_key: str | None = None,
                 base_url: str | None = None, timeout: float = 30.0) -> None:
        super().__init__(spec, api_key=api_key, base_url=base_url, timeout=timeout)
        self._client = cohere.ClientV2(api_key=self.api_key, base_url=self.base_url,
                                       timeout=self.timeout, max_retries=0)

    def close(self) -> None:
        _close(self._client)

    def embed_batch(self, texts: list[str], input_type: InputType) -> Vectors:
        """One request to the v2 embed endpoint for float embeddings, without truncation."""
        with self.reading_answer():
            with _translated(self, self.timeout):
                response = self._client.embed(
                    model=self.spec.model_id, texts=texts, input_type=_INPUT_TYPES[input_type],
                    embedding_types=["float"], truncate="NONE",
                )
            vectors = response.embeddings.float_
            if vectors is None:
                raise self.bad_response("the response has no float embeddings")
            # The v2 answer has no indexes: its embeddings are in input order.
            return self.in_input_order(enumerate(vectors), len(texts))


class CohereReranker(RerankProvider):
    """Cohere rerankers (`cohere/rerank-v3.5`); key from COHERE_API_KEY, base URL from
    PYEMBED_COHERE_BASE_URL, as for embeddings."""

    name = "cohere"
    base_url_env = CohereProvider.base_url_env

    def __init__(self, spec: RerankerSpec, *, api_key: str | None = None,
                 base_url: str | None = None, timeout: float = 30.0) -> None:
        super().__init__(spec, api_key=api_key, base_url=base_url, timeout=timeout)
        self._client = cohere.ClientV2(api_key=self.api_key, base_url=self.base_url,
                                       timeout=self.timeout, max_retries=0)

    def close(self) -> None:
        _close(self._client)

    def score_batch(self, query: str, texts: list[str]) -> list[object]:
        """One request to the v2 rerank endpoint for every text's score."""
        with self.reading_answer():
            with _translated(self, self.timeout):
                response = self._client.rerank(model=self.spec.model_id, query=query,
                                               documents=texts)
            return self.in_input_order([(r.index, r.relevance_score) for r in response.results],
                                       len(texts))
