"""What each service accepts in one request, as its documentation states it: the one place
pyembed reads a service's limits from, for every call it makes (the embedder's batches, the
reranker's candidates and query, an answer's prompt), before the call.

Token counts are pyembed's estimate (`pyembed.text.estimate_tokens`) unless a provider counts
exactly. A model registered in the database keeps its own `max_batch` and `max_tokens`; the
service's limits here bound them too (the smaller wins)."""

from __future__ import annotations

from dataclasses import dataclass

from .models import ModelSpec


@dataclass(frozen=True)
class RequestLimits:
    """One service model's limits on a request; None where the service states none."""

    texts: int | None = None
    """Texts (embedding inputs, rerank candidates) one request may carry."""
    text_tokens: int | None = None
    """Tokens of one text; for a reranker, the query and one candidate together (the service
    cuts a longer pair, and pyembed sends the candidate cut to fit)."""
    query_tokens: int | None = None
    """Tokens of a rerank query."""
    request_tokens: int | None = None
    """Tokens one request may carry: an embedding request's texts; a rerank request's query
    once per candidate plus each candidate; Claude's context window (the prompt, the system
    prompt and max_tokens together)."""


_VOYAGE_RERANK = RequestLimits(texts=1000, text_tokens=32_000, query_tokens=8_000,
                               request_tokens=600_000)

LIMITS: dict[str, RequestLimits] = {
    # Embeddings (the per-text limits are the models' max_tokens, in pyembed.models too).
    "openai": RequestLimits(texts=2048, text_tokens=8191, request_tokens=300_000),
    "voyage": RequestLimits(texts=1000, text_tokens=32_000, request_tokens=120_000),
    "voyage/voyage-3": RequestLimits(texts=1000, text_tokens=32_000, request_tokens=320_000),
    "voyage/voyage-3-lite": RequestLimits(texts=1000, text_tokens=32_000,
                                          request_tokens=1_000_000),
    "cohere": RequestLimits(texts=96, text_tokens=512),
    # Rerankers.
    "voyage/rerank-2.5": _VOYAGE_RERANK,
    "voyage/rerank-2.5-lite": _VOYAGE_RERANK,
    # Cohere takes up to 10,000 documents and advises at most 1,000 a request.
    "cohere/rerank-v3.5": RequestLimits(texts=1000, text_tokens=4096, query_tokens=2048),
    # Claude: every model's context window (the 1M-token window needs a beta header pyembed
    # does not send).
    "anthropic": RequestLimits(request_tokens=200_000),
}
"""By `provider/model_id`, else by provider: the limits the services document."""


def limits_for(provider: str, model_id: str | None = None) -> RequestLimits:
    """The limits of `provider`'s `model_id` (its provider's if the model has none of its own;
    none at all for a model run here or the fake services' models)."""
    return LIMITS.get(f"{provider}/{model_id}") or LIMITS.get(provider) or RequestLimits()


DEFAULT_MAX_BATCH_TOKENS = 100_000
"""Estimated tokens per embedding request, unless the service's limit is lower."""


def embedding_batch(spec: ModelSpec, texts: int | None = None) -> tuple[int, int]:
    """(texts, estimated tokens) of one embedding request for `spec`'s model by default:
    `texts` (a provider's own batch) or the spec's max_batch, and DEFAULT_MAX_BATCH_TOKENS, each
    bounded by the service's limits: what the embedder sends and a migration's plan counts."""
    limits = limits_for(spec.provider, spec.model_id)
    return (smallest(texts or spec.max_batch, limits.texts) or 1,
            smallest(DEFAULT_MAX_BATCH_TOKENS, limits.request_tokens) or 0)


def smallest(*bounds: int | None) -> int | None:
    """The smallest of the bounds that are set, or None."""
    given = [b for b in bounds if b is not None]
    return min(given) if given else None


def text_tokens(spec: ModelSpec) -> int:
    """The most tokens of one text `spec`'s model is sent: its own limit, or its service's if
    that is lower."""
    return min(spec.max_tokens, limits_for(spec.provider, spec.model_id).text_tokens
               or spec.max_tokens)


__all__ = ["DEFAULT_MAX_BATCH_TOKENS", "LIMITS", "RequestLimits", "embedding_batch", "limits_for",
           "smallest", "text_tokens"]
