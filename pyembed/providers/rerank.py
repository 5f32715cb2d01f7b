"""Rerankers: a service (or the offline fake) that scores candidate texts against a query.

A reranker is named `provider/model`, e.g. `voyage/rerank-2.5` or `cohere/rerank-v3.5`, or by
a short alias (`rerank-2.5`, `rerank-3.5`); its name is its identity in each hit, the usage
ledger and the rerank cache. Each provider module imports its SDK, so `reranker_for` imports
only the one it needs.
"""

from __future__ import annotations

import importlib
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import UnknownModel, shown
from ..limits import RequestLimits, limits_for
from ..models import API_KEY_ENV
from .base import ServiceClient


@dataclass(frozen=True)
class RerankerSpec:
    """One reranking model: its provider, model id and key variable."""

    provider: str
    model_id: str
    api_key_env: str | None
    description: str = ""

    @property
    def key(self) -> str:
        """The reranker's identity, `provider/model_id`."""
        return f"{self.provider}/{self.model_id}"

    @property
    def limits(self) -> RequestLimits:
        """What the service takes in one request (pyembed.limits)."""
        return limits_for(self.provider, self.model_id)


RERANKERS: dict[str, RerankerSpec] = {s.key: s for s in (
    RerankerSpec("voyage", "rerank-2.5", API_KEY_ENV["voyage"],
                 description="Voyage's reranker, 32k tokens of context"),
    RerankerSpec("voyage", "rerank-2.5-lite", API_KEY_ENV["voyage"],
                 description="Voyage's faster, cheaper reranker"),
    RerankerSpec("cohere", "rerank-v3.5", API_KEY_ENV["cohere"],
                 description="Cohere Rerank 3.5 (each candidate cut to 4,096 tokens)"),
    RerankerSpec("fake", "overlap", None,
                 description="offline and deterministic, for tests: shared words (fake_scores)"),
)}
"""The rerankers pyembed knows, by key."""

ALIASES = {"rerank-2.5": "voyage/rerank-2.5", "rerank-2.5-lite": "voyage/rerank-2.5-lite",
           "rerank-3.5": "cohere/rerank-v3.5", "rerank-v3.5": "cohere/rerank-v3.5",
           "fake": "fake/overlap"}
"""Short names users type, e.g. `--rerank rerank-2.5`."""


def reranker_spec(name: str) -> RerankerSpec:
    """The reranker called `name` (a key or an alias); UnknownModel if there is none."""
    key = ALIASES.get(name.strip(), name.strip()) if isinstance(name, str) else name
    try:
        return RERANKERS[key]
    except (KeyError, TypeError):
        raise UnknownModel(f"no reranker named {shown(name)}",
                           hint=f"known: {', '.join([*RERANKERS, *ALIASES])}") from None


class RerankProvider(ServiceClient[RerankerSpec], ABC):
    """One reranking service for one model; subclasses declare `name` and `score_batch`.

    Retries, the cache, usage and the checks of scores belong to `pyembed.rerank.Reranker`;
    a provider sends one request and returns one score per text in input order (refusing an
    answer whose indexes are not 0..N-1 once each, see `in_input_order`)."""

    items = "scores"
    serves = "rerankers"

    def missing_key_hint(self) -> str:
        return f"export it to rerank with {self.spec.key}, or search without rerank"

    @abstractmethod
    def score_batch(self, query: str, texts: list[str]) -> list[object]:
        """One relevance score per text (as the service gave it), in input order."""


_WORD = re.compile(r"\w+")


def fake_scores(query: str, texts: Sequence[str]) -> list[float]:
    """Deterministic relevance: the share of the query's distinct lowercased words each text
    contains, weighted by 1/sqrt of the text's distinct words (so a short text that has them
    wins), in 0..1."""
    wanted = set(_WORD.findall(query.lower()))
    scores = []
    for text in texts:
        words = set(_WORD.findall(text.lower()))
        shared = len(wanted & words)
        scores.append(shared / math.sqrt(len(wanted) * len(words)) if shared else 0.0)
    return scores


class FakeReranker(RerankProvider):
    """The `fake/overlap` reranker: `fake_scores`, offline. It records `calls` (texts of each
    request) for tests."""

    name = "fake"

    def __init__(self, spec: RerankerSpec, *, api_key: str | None = None,
                 base_url: str | None = None, timeout: float = 30.0) -> None:
        super().__init__(spec, api_key=api_key, base_url=base_url, timeout=timeout)
        self.calls: list[list[str]] = []

    def score_batch(self, query: str, texts: list[str]) -> list[object]:
        self.calls.append(list(texts))
        return list(fake_scores(query, texts))


_CLASSES: dict[str, tuple[str, str]] = {
    "voyage": ("pyembed.providers.voyage", "VoyageReranker"),
    "cohere": ("pyembed.providers.cohere", "CohereReranker"),
    "fake": ("pyembed.providers.rerank", "FakeReranker"),
}


def reranker_for(spec: RerankerSpec, *, api_key: str | None = None,
                 base_url: str | None = None, timeout: float = 30.0) -> RerankProvider:
    """A provider for `spec` (MissingAPIKey if it needs a key that is unset)."""
    module_name, class_name = _CLASSES[spec.provider]
    cls: type[RerankProvider] = getattr(importlib.import_module(module_name), class_name)
    return cls(spec, api_key=api_key, base_url=base_url, timeout=timeout)
