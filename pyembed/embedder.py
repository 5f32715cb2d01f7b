"""Texts in, checked vectors out: validation, batching, retries, response checks, cache."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Protocol

import numpy as np
import numpy.typing as npt

from .cachekey import nfc
from .errors import ConfigError, InvalidInput, InvalidVector, ModelMismatch, ProviderError, shown
from .limits import embedding_batch, limits_for, text_tokens
from .models import InputType, ModelSpec
from .providers import Provider, Vectors, provider_for
from .retry import DEFAULT_MAX_RETRY_AFTER, DEFAULT_RETRIES, Retrier
from .text import check_text, estimate_tokens, text_list, truncate_to_tokens
from .vectors import float_array


class EmbeddingCache(Protocol):
    """Where embeddings are remembered, keyed by (stripped text, model key, input type).

    The embedder passes InputType.DOCUMENT for models without input types, so queries and
    documents share entries there.
    """

    def get_many(self, texts: list[str], spec: ModelSpec,
                 input_type: InputType) -> dict[int, npt.NDArray[np.float32]]:
        """The cached vectors among `texts`, by index into `texts`."""
        ...

    def put_many(self, texts: list[str], vectors: npt.NDArray[np.float32], spec: ModelSpec,
                 input_type: InputType) -> None:
        """Remember `vectors[i]` as the embedding of `texts[i]`."""
        ...


def plan_batches(token_counts: Sequence[int], max_batch: int,
                 max_batch_tokens: int) -> list[range]:
    """Consecutive index ranges covering every item in order, each of at most `max_batch`
    items and `max_batch_tokens` tokens (an item alone over the token budget goes alone)."""
    batches: list[range] = []
    start, tokens = 0, 0
    for index, count in enumerate(token_counts):
        if index > start and (index - start >= max_batch or tokens + count > max_batch_tokens):
            batches.append(range(start, index))
            start, tokens = index, 0
        tokens += count
    if start < len(token_counts):
        batches.append(range(start, len(token_counts)))
    return batches


class Embedder:
    """Embeds texts with one model: validates every text before any call, batches by count
    and estimated tokens, retries transient failures (honouring Retry-After up to
    `max_retry_after` seconds), checks and L2-normalises what comes back, and consults
    `cache` so that only texts it lacks are sent, each once.
    """

    def __init__(self, spec: ModelSpec, provider: Provider | None = None, *,
                 cache: EmbeddingCache | None = None, max_retries: int = DEFAULT_RETRIES,
                 max_retry_after: float = DEFAULT_MAX_RETRY_AFTER, truncate: bool = False,
                 max_batch_tokens: int | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 meter: Callable[[ModelSpec, int], None] | None = None,
                 on_error: Callable[[ModelSpec, ProviderError], None] | None = None,
                 truncate_hint: str | None = "embed with truncate=True",
                 around_call: Callable[[], AbstractContextManager[None]] = nullcontext) -> None:
        """`truncate_hint`: how the caller may truncate a text over the model's limit, for the
        error (None where it cannot: SQL's pyembed.embed)."""
        self.truncate_hint = truncate_hint
        if provider is None:
            provider = provider_for(spec)
        elif provider.spec.key != spec.key:
            raise ModelMismatch(f"the provider embeds with {provider.spec.key}, "
                                f"but the embedder is for {spec.key}")
        # The service's limits bound the model's own (a model registered in the database may
        # state more than its service takes).
        limits = limits_for(spec.provider, spec.model_id)
        self.max_text_tokens = text_tokens(spec)
        """The most tokens of one text sent (the model's and its service's limit)."""
        self.max_batch: int
        """The most texts in one call."""
        self.max_batch, default_tokens = embedding_batch(spec, provider.max_batch)
        if max_batch_tokens is None:
            max_batch_tokens = default_tokens
        elif limits.request_tokens is not None and max_batch_tokens > limits.request_tokens:
            raise ConfigError(f"max_batch_tokens ({max_batch_tokens}) is over {spec.provider}'s "
                              f"{limits.request_tokens}-token limit per request")
        if max_batch_tokens < self.max_text_tokens:
            raise ConfigError(f"max_batch_tokens ({max_batch_tokens}) is below the model's "
                              f"{self.max_text_tokens}-token limit per text")
        self.spec = spec
        self.provider = provider
        self.cache = cache
        self.max_retries = max_retries
        self.max_retry_after = max_retry_after
        self.truncate = truncate
        self.max_batch_tokens = max_batch_tokens
        self.meter = meter
        """Called with the model and the estimated tokens before every provider call: it
        records usage and may refuse the call (RateLimited), which is not retried."""
        self._retrier = Retrier(spec.key, max_retries=max_retries,
                                max_retry_after=max_retry_after, sleep=sleep,
                                on_error=partial(on_error, spec) if on_error else None)
        self.around_call = around_call
        """Entered around each provider call with its retries and waits: a Client's gives its
        turn on the connection to other threads meanwhile (Client.outside_turn)."""

    def embed(self, texts: Sequence[str],
              input_type: InputType = InputType.DOCUMENT) -> npt.NDArray[np.float32]:
        """float32 vectors of shape (len(texts), dimensions), in input order.

        Raises InvalidInput (before any call) for an empty, whitespace-only or NUL-containing
        text, or one over the model's token limit unless `truncate`; RateLimited when the
        service asks to wait longer than `max_retry_after`; ProviderError when it keeps
        failing or answers wrongly.
        """
        return self._embed_prepared_texts(self._prepare(texts), input_type)

    def _embed_prepared_texts(self, prepared: list[str],
                              input_type: InputType) -> npt.NDArray[np.float32]:
        try:
            input_type = InputType(input_type)
        except ValueError:
            raise InvalidInput(f"input type must be one of {[t.value for t in InputType]}, "
                               f"not {shown(input_type)}") from None
        if not self.spec.input_types:
            input_type = InputType.DOCUMENT
        out = np.empty((len(prepared), self.spec.dimensions), dtype=np.float32)
        if not prepared:
            return out
        hits = self.cache.get_many(prepared, self.spec, input_type) if self.cache else {}
        for index, vector in hits.items():
            out[index] = self._checked_hit(index, vector)
        slot: dict[str, int] = {}
        for index, text in enumerate(prepared):
            if index not in hits:
                slot.setdefault(text, len(slot))
        vectors = self._embed_unique(list(slot), input_type)
        for index, text in enumerate(prepared):
            if index not in hits:
                out[index] = vectors[slot[text]]
        return out

    def embed_query(self, text: str) -> npt.NDArray[np.float32]:
        """The 1-d query vector for `text`."""
        return self._embed_prepared_texts(self._prepare([text], query=True),
                                          InputType.QUERY).reshape(self.spec.dimensions)

    def prepare_query(self, text: str) -> tuple[str, InputType]:
        """The query as the cache keys it and the provider receives it (stripped, NFC, checked, cut
        if `truncate`), and the input type it is embedded as."""
        return (self._prepare([text], query=True)[0],
                InputType.QUERY if self.spec.input_types else InputType.DOCUMENT)

    def embed_prepared(self, text: str, input_type: InputType, *,
                       reserved: bool = False) -> npt.NDArray[np.float32]:
        """The 1-d vector of one text from `prepare_query`, from the provider (no cache);
        `reserved`: its first call is already accounted, so the meter sees only retries."""
        return self._embed_batch([text], input_type, reserved=reserved).reshape(
            self.spec.dimensions)

    def check(self, texts: Sequence[str]) -> None:
        """Raise InvalidInput for a text that `embed` would refuse, without any call."""
        self._prepare(texts)

    def _prepare(self, texts: Sequence[str], *, query: bool = False) -> list[str]:
        """The texts stripped, in NFC, checked against the token limit and, if `truncate`, cut. A
        `query` (one text, from a search) is named so: a search has no truncate option."""
        texts = text_list(texts)
        names = ["the query"] if query else [f"text {index}" for index in range(len(texts))]
        # NFC: the form the cache keys a text by (cachekey.nfc), so the provider embeds what
        # the key names whichever form came first.
        stripped = [nfc(check_text(text, name).strip())
                    for name, text in zip(names, texts, strict=True)]
        if not stripped:
            return stripped
        exact = self.provider.count_tokens(stripped)
        counts = exact or [estimate_tokens(text) for text in stripped]
        limit = self.max_text_tokens
        for index, count in enumerate(counts):
            if count <= limit:
                continue
            if not self.truncate:
                raise InvalidInput(
                    f"{names[index]} is {'' if exact else 'about '}{count} tokens, over the "
                    f"{limit}-token limit of {self.spec.key}: shorten it"
                    + ("" if query or not self.truncate_hint else f" or {self.truncate_hint}")
                )
            if not self.provider.truncates_input:
                stripped[index] = truncate_to_tokens(stripped[index], limit)
        return stripped

    def _checked_hit(self, index: int, vector: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        vector = np.asarray(vector, dtype=np.float32)
        if vector.shape != (self.spec.dimensions,):
            raise InvalidVector(f"the cache returned shape {vector.shape} for text {index}, "
                                f"expected ({self.spec.dimensions},) for {self.spec.key}")
        return vector

    def _embed_unique(self, texts: list[str],
                      input_type: InputType) -> npt.NDArray[np.float32]:
        """Vectors for distinct texts, in their order; whatever was embedded is cached even
        if a later batch fails. For a provider that `batches_by_length`, batches are made
        from the texts sorted by estimated length (less padding)."""
        done: list[npt.NDArray[np.float32]] = []
        tokens = [estimate_tokens(text) for text in texts]
        order = list(range(len(texts)))
        if self.provider.batches_by_length:
            order.sort(key=tokens.__getitem__)
        ordered = [texts[i] for i in order]
        try:
            for batch in plan_batches([tokens[i] for i in order], self.max_batch,
                                      self.max_batch_tokens):
                done.append(self._embed_batch(ordered[batch.start:batch.stop], input_type))
        finally:
            vectors = np.concatenate(done) if done else None  # (one copy, for both)
            done.clear()
            if self.cache is not None and vectors is not None:
                self.cache.put_many(ordered[:len(vectors)], vectors, self.spec, input_type)
        out = np.empty((len(texts), self.spec.dimensions), dtype=np.float32)
        if vectors is not None:
            out[order] = vectors
        return out

    def _embed_batch(self, texts: list[str], input_type: InputType, *,
                     reserved: bool = False) -> npt.NDArray[np.float32]:
        unmetered = [reserved]

        def meter() -> None:
            metered, unmetered[0] = not unmetered[0], False
            if self.meter is not None and metered:
                self.meter(self.spec, sum(estimate_tokens(t) for t in texts))

        with self.around_call():
            raw = self._retrier(lambda: self.provider.embed_batch(texts, input_type),
                                before=meter)
        try:
            return self._checked(raw, len(texts))
        except ProviderError as exc:
            self._retrier.report(exc)
            raise

    def _checked(self, raw: Vectors, count: int) -> npt.NDArray[np.float32]:
        key = self.spec.key
        try:  # read as a user's vectors are: text ("0.5") and booleans are not numbers
            vectors = float_array(raw, np.float64)
        except InvalidVector:
            raise ProviderError(f"{key}: the service returned vectors of unequal lengths "
                                f"or non-numbers") from None
        if vectors.ndim > 2:
            raise ProviderError(f"{key}: the service returned vectors of shape "
                                f"{vectors.shape[1:]}, not lists of numbers")
        got = vectors.shape[0] if vectors.ndim else 0
        if vectors.ndim != 2 or got != count:
            raise ProviderError(f"{key}: the service returned {got} vectors for {count} texts")
        if vectors.shape[1] != self.spec.dimensions:
            raise ProviderError(
                f"{key}: the service returned {vectors.shape[1]}-dimension vectors, expected "
                f"{self.spec.dimensions}; the model behind this key may have changed"
            )
        if not np.isfinite(vectors).all():
            raise ProviderError(f"{key}: the service returned a vector with NaN or infinity")
        # Scaled by the largest component first: squares of tiny components lose precision
        # (or vanish) even in float64.
        scale = np.abs(vectors).max(axis=1, keepdims=True)
        if not (scale > 0).all():
            raise ProviderError(f"{key}: the service returned a zero vector")
        if self.spec.normalized:
            vectors = vectors / scale
            vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        out = vectors.astype(np.float32)
        if not (np.isfinite(out).all() and (np.abs(out).max(axis=1) > 0).all()):
            raise ProviderError(f"{key}: the service returned a vector out of float32's range")
        return out
