"""Voyage AI embeddings and reranking through the `voyageai` SDK."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import voyageai.error
from voyageai.api_resources import Embedding, Reranking

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
                response = Embedding.create(  # type: ignore[no-untyped-call]
                    input=texts, model=self.spec.model_id,
                    input_type=input_type.value if self.spec.input_types else None,
                    truncation=False, api_key=self.api_key, base_url=self.base_url,
                    request_timeout=self.timeout,
                )
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
                response = Reranking.create(  # type: ignore[no-untyped-call]
                    query=query, documents=texts, model=self.spec.model_id, top_k=None,
                    truncation=True, api_key=self.api_key, base_url=self.base_url,
                    request_timeout=self.timeout,
                )
            data = response.get("data")
            if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
                raise self.bad_response("the answer has no list of scores")
            return self.in_input_order([(item.get("index"), item.get("relevance_score"))
                                        for item in data], len(texts))
