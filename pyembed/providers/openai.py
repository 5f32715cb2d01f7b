"""OpenAI embeddings through the `openai` SDK."""

from __future__ import annotations

import openai

from ..models import InputType, ModelSpec
from .base import Provider, Vectors, parse_retry_after


def _detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
    return exc.message


class OpenAIProvider(Provider):
    """OpenAI models (`openai/...`); key from OPENAI_API_KEY, base URL from
    PYEMBED_OPENAI_BASE_URL (e.g. http://127.0.0.1:8080/v1)."""

    name = "openai"
    base_url_env = "PYEMBED_OPENAI_BASE_URL"

    def __init__(self, spec: ModelSpec, *, api_key: str | None = None,
                 base_url: str | None = None, timeout: float = 30.0) -> None:
        super().__init__(spec, api_key=api_key, base_url=base_url, timeout=timeout)
        self._client = openai.OpenAI(api_key=self.api_key, base_url=self.base_url,
                                     timeout=self.timeout, max_retries=0)

    def close(self) -> None:
        self._client.close()

    def embed_batch(self, texts: list[str], input_type: InputType) -> Vectors:
        """One request to the embeddings endpoint, asking for the spec's output dimensions
        when it sets them."""
        dimensions = self.spec.request_dimensions
        with self.reading_answer():
            try:
                response = self._client.embeddings.create(
                    model=self.spec.model_id, input=texts, encoding_format="float",
                    dimensions=dimensions if dimensions is not None else openai.omit,
                )
            except openai.APIStatusError as exc:
                raise self.failure(exc.status_code, _detail(exc),
                                   retry_after=parse_retry_after(exc.response.headers)) from None
            except openai.APIConnectionError as exc:  # includes APITimeoutError
                raise self.failure(None, exc.message) from None
            except openai.OpenAIError as exc:
                raise self.bad_response(str(exc)) from None
            return self.in_input_order(((item.index, item.embedding) for item in response.data),
                                       len(texts))
