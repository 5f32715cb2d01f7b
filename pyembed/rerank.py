"""The rerank stage: a reranker reorders a search's candidates by its own relevance score.

`Reranker` does for reranking what `pyembed.embedder.Embedder` does for embeddings: it asks the
rerank cache first (pyembed.rerank_cache, through its SQL functions, keyed by query, candidate
text and reranker), reserves each request in the usage ledger (the tenant's rate limits apply),
retries transient failures, and refuses an answer that is not one finite score per candidate
(PE009). The same class serves the package and the PL/Python functions.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from functools import partial
from typing import Any

import psycopg

from .cache import flush_counts
from .cachekey import HitCounter, rerank_cache_key
from .embedder import plan_batches
from .errors import InvalidInput, ProviderError
from .providers.rerank import (
    ALIASES,
    RERANKERS,
    RerankerSpec,
    RerankProvider,
    fake_scores,
    reranker_for,
    reranker_spec,
)
from .retry import DEFAULT_MAX_RETRY_AFTER, DEFAULT_RETRIES, Retrier
from .search import Hit
from .sqlexec import Executor, executor
from .text import check_text, estimate_tokens, text_list, truncate_to_tokens

DEFAULT_CANDIDATES = 50
"""How many hits of the search a reranker reorders, unless told otherwise."""
MAX_CANDIDATES = 1000

LOOKUP = "SELECT cache_key, score FROM pyembed.rerank_cache_get($1::bytea[])"
STORE = "SELECT pyembed.rerank_cache_put($1::bytea[], $2::text, $3::float8[], $4::float8)"


__all__ = ["ALIASES", "DEFAULT_CANDIDATES", "RERANKERS", "RerankCache", "Reranker",
           "RerankerSpec", "candidates", "fake_scores", "reranker_spec"]


def candidates(k: int, depth: int | None) -> int:
    """How many hits to fetch for a rerank to `k`: `depth`, or by default DEFAULT_CANDIDATES
    (k if larger). InvalidInput outside 1..MAX_CANDIDATES, or below k: a reranker returns the
    best k of its candidates, so fewer asked for is a mistake to name, not to mend silently."""
    if depth is None:
        return max(k, DEFAULT_CANDIDATES)
    if not 1 <= depth <= MAX_CANDIDATES:
        raise InvalidInput(f"rerank candidates must be 1..{MAX_CANDIDATES}, got {depth}")
    if depth < k:
        raise InvalidInput(f"rerank candidates ({depth}) must be at least k ({k}): the "
                           f"reranker returns the best k of them")
    return depth


class RerankCache:
    """Scores in pyembed.rerank_cache, the caller's tenant's; hits and misses counted with the
    embedding cache's (pyembed.cache_stats, under the reranker's key)."""

    def __init__(self, db: psycopg.Connection[Any] | Executor, ttl: timedelta | None = None,
                 counter: HitCounter | None = None) -> None:
        self.db = executor(db)
        self.ttl = ttl
        self.counter = counter if counter is not None else HitCounter()
        self.last_lookup: tuple[int, int] = (0, 0)
        """(hits, misses) of the latest lookup."""

    def get_many(self, query: str, texts: list[str], spec: RerankerSpec) -> dict[int, float]:
        """The cached scores among `texts`, by index into `texts`."""
        keys = [rerank_cache_key(query, t, spec.key) for t in texts]
        found = {bytes(k): float(s) for k, s in self.db.rows(LOOKUP, [keys], ["bytea[]"])}
        self.last_lookup = (len(found), len(set(keys)) - len(found))
        self.counter.add(spec.key, *self.last_lookup)
        if self.counter.due():
            flush_counts(self.db, self.counter)
        return {i: found[k] for i, k in enumerate(keys) if k in found}

    def put_many(self, query: str, texts: list[str], scores: list[float],
                 spec: RerankerSpec) -> None:
        """Remember `scores[i]` as `spec`'s score of `texts[i]` for `query`."""
        if texts:
            entries = dict(zip((rerank_cache_key(query, t, spec.key) for t in texts), scores,
                               strict=True))
            self.db.rows(STORE, [list(entries), spec.key, list(entries.values()),
                                 self.ttl.total_seconds() if self.ttl else None],
                         ["bytea[]", "text", "float8[]", "float8"])
        flush_counts(self.db, self.counter)


class Reranker:
    """Scores candidates against a query with one reranker: the cache first, then as few
    requests as the reranker's limits allow for the rest, each metered and retried."""

    def __init__(self, spec: RerankerSpec, provider: RerankProvider | None = None, *,
                 cache: RerankCache | None = None, max_retries: int = DEFAULT_RETRIES,
                 max_retry_after: float = DEFAULT_MAX_RETRY_AFTER,
                 sleep: Callable[[float], None] = time.sleep,
                 meter: Callable[[RerankerSpec, int], None] | None = None,
                 on_error: Callable[[RerankerSpec, ProviderError], None] | None = None,
                 around_call: Callable[[], AbstractContextManager[None]] = nullcontext) -> None:
        self.spec = spec
        self.provider = provider if provider is not None else reranker_for(spec)
        self.cache = cache
        self.meter = meter
        """Called with the reranker and the estimated tokens before every request: it records
        usage and may refuse the request (RateLimited), which is not retried."""
        self._retrier = Retrier(spec.key, max_retries=max_retries,
                                max_retry_after=max_retry_after, sleep=sleep,
                                on_error=partial(on_error, spec) if on_error else None)
        self.around_call = around_call
        """As Embedder.around_call: entered around each request with its retries."""

    def scores(self, query: str, texts: Sequence[str]) -> list[float]:
        """One relevance score per text, in input order (higher is more relevant)."""
        query = check_text(query, "query").strip()
        most = self.spec.limits.query_tokens
        if most is not None and (tokens := estimate_tokens(query)) > most:
            raise InvalidInput(f"the query is about {tokens} tokens, over {self.spec.key}'s "
                               f"{most}-token limit for a rerank query: shorten it")
        prepared = [check_text(t, f"candidate {i}").strip()
                    for i, t in enumerate(text_list(texts, "candidates"))]
        out: dict[int, float] = {}
        if self.cache is not None and prepared:
            out.update(self.cache.get_many(query, prepared, self.spec))
        missing = list(dict.fromkeys(t for i, t in enumerate(prepared) if i not in out))
        scored = self._score_unique(query, missing)
        return [out[i] if i in out else scored[t] for i, t in enumerate(prepared)]

    def rerank(self, query: str, hits: Sequence[Hit], k: int) -> list[Hit]:
        """The `k` best of `hits` by this reranker's score (ties keep the search's order), each
        with its `rerank_score` and `reranker` set."""
        scores = self.scores(query, [h.content for h in hits])
        order = sorted(range(len(hits)), key=lambda i: -scores[i])
        return [dataclasses.replace(hits[i], rerank_score=scores[i], reranker=self.spec.key)
                for i in order[:k]]

    def _score_unique(self, query: str, texts: list[str]) -> dict[str, float]:
        """Scores of distinct texts; whatever was scored is cached even if a later request
        fails. Each request keeps to the reranker's limits (pyembed.limits): a candidate longer
        than the service reads beside the query is sent cut to what it reads, so the tokens
        counted are those sent."""
        done: dict[str, float] = {}
        limits = self.spec.limits
        query_tokens = estimate_tokens(query)
        if limits.text_tokens is not None:
            sent = [truncate_to_tokens(t, limits.text_tokens - query_tokens) for t in texts]
        else:
            sent = texts
        per_text = [query_tokens + estimate_tokens(t) for t in sent]
        try:
            for batch in plan_batches(per_text, limits.texts or MAX_CANDIDATES,
                                      limits.request_tokens or sum(per_text)):
                tokens = sum(per_text[batch.start:batch.stop])
                done.update(zip(texts[batch.start:batch.stop],
                                self._request(query, sent[batch.start:batch.stop], tokens),
                                strict=True))
        finally:
            if self.cache is not None and done:
                self.cache.put_many(query, list(done), list(done.values()), self.spec)
        return done

    def _request(self, query: str, texts: list[str], tokens: int) -> list[float]:
        def meter() -> None:
            if self.meter is not None:
                self.meter(self.spec, tokens)

        with self.around_call():
            raw = self._retrier(lambda: self.provider.score_batch(query, texts), before=meter)
        try:
            return self._checked(raw, len(texts))
        except ProviderError as exc:
            self._retrier.report(exc)
            raise

    def _checked(self, raw: list[object], count: int) -> list[float]:
        if len(raw) != count:
            raise self.provider.bad_response(
                f"the service returned {len(raw)} score{'s' if len(raw) != 1 else ''} for "
                f"{count} text{'s' if count != 1 else ''}")
        for index, score in enumerate(raw):
            if (not isinstance(score, int | float) or isinstance(score, bool)
                    or not math.isfinite(score)):
                raise self.provider.bad_response(f"the service returned {score!r} as the "
                                                 f"score of text {index}, not a finite number")
        return [float(s) for s in raw]  # type: ignore[arg-type]
