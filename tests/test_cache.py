"""The PostgreSQL embedding cache behind the embedder: keys, counts, TTL, purge."""

from __future__ import annotations

import math
import time
from datetime import timedelta
from typing import Any

import numpy as np
import psycopg

from pyembed import cache
from pyembed.cache import PostgresCache
from pyembed.embedder import Embedder
from pyembed.models import InputType, registry
from pyembed.providers.fake import FakeProvider

SPEC = registry.get("fake/fake-hash@1:384")
OTHER_VERSION = registry.get("fake/fake-hash@2:1024")


def embedder(conn: psycopg.Connection[Any], spec: Any = SPEC, **kw: Any) -> Embedder:
    return Embedder(spec, FakeProvider(spec), cache=PostgresCache(conn, **kw))


def test_half_cached_batch_calls_the_provider_only_for_misses(app: psycopg.Connection[Any]) -> None:
    texts = [f"document number {i}" for i in range(1000)]
    e = embedder(app)
    first = e.embed(texts[:500])
    assert e.provider.calls == math.ceil(500 / SPEC.max_batch)  # type: ignore[attr-defined]
    e2 = embedder(app)
    both = e2.embed(texts)
    assert e2.provider.calls == math.ceil(500 / SPEC.max_batch)  # type: ignore[attr-defined]
    assert sum(len(b) for b in e2.provider.batches) == 500  # type: ignore[attr-defined]
    np.testing.assert_allclose(both[:500], first, atol=1e-6)
    stats = {r.model_key: r for r in cache.stats(app)}[SPEC.key]
    assert (stats.hits, stats.misses, stats.entries) == (500, 1000, 1000)
    assert stats.hit_rate == 500 / 1500


def test_whitespace_does_not_matter_but_model_and_input_type_do(
        app: psycopg.Connection[Any]) -> None:
    e = embedder(app)
    e.embed(["  the same text \n"], InputType.QUERY)
    again = embedder(app)
    again.embed(["the same text"], InputType.QUERY)
    assert again.provider.calls == 0  # type: ignore[attr-defined]
    doc = embedder(app)
    doc.embed(["the same text"], InputType.DOCUMENT)  # another input type: a miss
    assert doc.provider.calls == 1  # type: ignore[attr-defined]
    other = embedder(app, OTHER_VERSION)  # another model key: a miss, and its own vector
    vec = other.embed(["the same text"], InputType.QUERY)
    assert other.provider.calls == 1  # type: ignore[attr-defined]
    assert vec.shape == (1, 1024)


def test_expired_entries_miss_and_purge_removes_them(app: psycopg.Connection[Any]) -> None:
    embedder(app, ttl=timedelta(seconds=0.2)).embed(["short lived"])
    time.sleep(0.3)
    e = embedder(app)
    e.embed(["short lived"])
    assert e.provider.calls == 1  # type: ignore[attr-defined]
    embedder(app, ttl=timedelta(seconds=0.01)).embed(["gone soon"])
    time.sleep(0.05)
    assert cache.purge(app, expired_only=True) == 1
    assert cache.purge(app, model_key=OTHER_VERSION.key) == 0
    assert cache.purge(app, model_key=SPEC.key) == 1


def test_purge_by_age_keeps_both_caches_to_an_age(app: psycopg.Connection[Any],
                                                  owner: psycopg.Connection[Any]) -> None:
    """The caches have no size bound: `older_than_days` (`cache purge --older-than DAYS`)
    deletes the entries made more than that many days ago, of the embedding cache and the
    rerank cache alike, and a bad age is refused before anything is deleted."""
    import pytest

    from pyembed.errors import InvalidInput

    embedder(app).embed(["kept for a while", "made long ago", "made long ago too"])
    for i in range(3):
        app.execute("SELECT pyembed.rerank_cache_put(ARRAY[%s], 'fake/overlap', ARRAY[0.5])",
                    (bytes([i]) * 32,))
    # made 40 days ago: two embeddings and one rerank score (the owner sets the clock back)
    owner.execute("UPDATE pyembed.embedding_cache SET created_at = now() - interval '40 days' "
                  "WHERE cache_key = ANY(%s)", ([cache.cache_key(t, SPEC.key, InputType.DOCUMENT)
                                                 for t in ("made long ago", "made long ago too")],))
    owner.execute("UPDATE pyembed.rerank_cache SET created_at = now() - interval '40 days' "
                  "WHERE cache_key = %s", (bytes([0]) * 32,))
    for bad in (-1, 36501, 1.5):
        with pytest.raises(InvalidInput, match="older_than_days"):
            cache.purge(app, older_than_days=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="older_than_days"):
            cache.purge_rerank_scores(app, older_than_days=bad)  # type: ignore[arg-type]
    assert cache.purge(app, older_than_days=41) == 0
    assert cache.purge(app, older_than_days=30) == 2
    assert cache.purge_rerank_scores(app, older_than_days=30) == 1
    assert cache.purge(app, older_than_days=0) == 1 and cache.purge_rerank_scores(
        app, older_than_days=0) == 2


def test_cache_hit_returns_the_stored_vector_not_a_new_one(app: psycopg.Connection[Any]) -> None:
    e = embedder(app)
    v1 = e.embed_query("a question")
    v2 = embedder(app).embed_query("a question")
    assert v1.dtype == np.float32 and np.array_equal(v1, v2)


def _binds(conn: psycopg.Connection[Any], path: Any, action: Any) -> list[tuple[list[int], int]]:
    """The (parameter formats, result format) of each Bind message `action` sends on `conn`,
    from libpq's trace of the wire (0 text, 1 binary)."""
    with open(path, "w") as trace:
        conn.pgconn.trace(trace.fileno())
        try:
            action()
        finally:
            conn.pgconn.untrace()
    binds = []
    for line in path.read_text(errors="replace").splitlines():
        words = line.split("\t")
        if len(words) < 5 or words[3] != "Bind":
            continue
        fields = words[4].split()
        n = int(fields[2])  # after the portal and statement names
        binds.append(([int(f) for f in fields[3:3 + n]], int(fields[-1])))
    return binds


def test_vectors_cross_the_wire_in_binary(app: psycopg.Connection[Any], tmp_path: Any) -> None:
    """cache_put's vector[] goes in pgvector's binary form and cache_get's vectors come back in
    it (both were text: every float printed and parsed, the slower part of a store)."""
    c = PostgresCache(app)
    texts = [f"binary {i}" for i in range(3)]
    vectors = np.asarray(FakeProvider(SPEC).embed_batch(texts, InputType.DOCUMENT), np.float32)
    (put, *_) = _binds(app, tmp_path / "put.trace",
                       lambda: c.put_many(texts, vectors, SPEC, InputType.DOCUMENT))
    assert put[0][3] == 1  # keys, model key, input type, vectors, ttl
    found: dict[int, Any] = {}
    (get, *_) = _binds(app, tmp_path / "get.trace",
                       lambda: found.update(c.get_many(texts, SPEC, InputType.DOCUMENT)))
    assert get[1] == 1
    assert all(np.array_equal(found[i], vectors[i]) for i in range(3))
