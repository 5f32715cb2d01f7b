"""Voyage AI embeddings through the `voyageai` SDK."""

from __future__ import annotations

import voyageai.error
from voyageai.client import Client

from ..models import InputType, ModelSpec
from .base import Provider, Vectors, parse_retry_after


class VoyageProvider(Provider):
    """Voyage models (`voyage/...`); key from VOYAGE_API_KEY, base URL from
    PYEMBED_VOYAGE_BASE_URL (e.g. http://127.0.0.1:8080/v1)."""

    name = "voyage"
    base_url_env = "PYEMBED_VOYAGE_BASE_URL"

    def __init__(self, spec: ModelSpec, *, api_key: str | None = None,
                 base_url: str | None = None, timeout: float = 30.0) -> None:
        super().__init__(spec, api_key=api_key, base_url=base_url, timeout=timeout)
        self._client = Client(api_key=self.api_key, max_retries=0, timeout=self.timeout,
                              base_url=self.base_url)

    def embed_batch(self, texts: list[str], input_type: InputType) -> Vectors:
        """One request to the embeddings endpoint; the service must not truncate silently."""
        try:
            result = self._client.embed(
                texts, model=self.spec.model_id,
                input_type=input_type.value if self.spec.input_types else None,
                truncation=False,
            )
        except (voyageai.error.Timeout, voyageai.error.APIConnectionError) as exc:
            raise self.failure(None, str(exc.user_message)) from exc
        except voyageai.error.VoyageError as exc:
            headers = dict(exc.headers) if exc.headers else None
            raise self.failure(exc.http_status, str(exc.user_message),
                               retry_after=parse_retry_after(headers)) from None
        return result.embeddings
