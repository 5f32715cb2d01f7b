"""Rerank through the real SDKs against the fake server, for benchmarks and scripts.

    from tests.fakeapi.rerank import fake_reranker

    with fake_reranker("voyage") as name:           # "voyage/rerank-2.5"
        hits = corpus.search(query, k=10, mode="hybrid", rerank=name)

The fake server scores by shared words (pyembed.providers.rerank.fake_scores): its ranking
exercises the plumbing (SDK, cache, usage, order change), its quality means nothing. For no
HTTP at all, `rerank="fake"` (fake/overlap) scores the same way in process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from .server import FakeAPI

MODELS = {"voyage": "voyage/rerank-2.5", "cohere": "cohere/rerank-v3.5"}
KEY_ENV = {"voyage": "VOYAGE_API_KEY", "cohere": "COHERE_API_KEY"}


@contextmanager
def fake_reranker(service: Literal["voyage", "cohere"] = "voyage") -> Iterator[str]:
    """Start a fake API server and point `service`'s key and base URL at it for the duration
    (restored after); yields the reranker's name to pass as `rerank=`."""
    with FakeAPI() as server:
        wanted = {KEY_ENV[service]: "fake-rerank-key",
                  f"PYEMBED_{service.upper()}_BASE_URL": server.base_url(service)}
        saved = {name: os.environ.get(name) for name in wanted}
        os.environ.update(wanted)
        try:
            yield MODELS[service]
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
