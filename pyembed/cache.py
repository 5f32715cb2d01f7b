"""The embedding cache in PostgreSQL: one round trip to look up a batch, one to store it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
from pgvector import Vector

from .cachekey import COUNT_SQL, HitCounter, cache_key
from .models import InputType, ModelSpec

# Entries are the tenant's own (row-level security also says so for application roles).
LOOKUP = """SELECT cache_key, embedding FROM pyembed.embedding_cache
 WHERE tenant_id = coalesce(pyembed.current_tenant(), 0) AND cache_key = ANY(%(keys)s)
   AND (expires_at IS NULL OR expires_at > now())"""

COUNT = COUNT_SQL.format(models="%(models)s", hits="%(hits)s", misses="%(misses)s")

STORE = """
INSERT INTO pyembed.embedding_cache (tenant_id, cache_key, model_key, input_type, embedding,
                                     expires_at)
SELECT coalesce(pyembed.current_tenant(), 0), k, %(model)s, %(input_type)s, e,
       CASE WHEN %(ttl)s::float8 IS NULL THEN NULL ELSE now() + make_interval(secs => %(ttl)s) END
  FROM unnest(%(keys)s::bytea[], %(vectors)s::vector[]) AS t(k, e)
ON CONFLICT (tenant_id, cache_key) DO UPDATE SET embedding = EXCLUDED.embedding,
  expires_at = EXCLUDED.expires_at, created_at = now()
"""


@dataclass(frozen=True)
class CacheStatsRow:
    day: date
    model_key: str
    hits: int
    misses: int
    entries: int

    @property
    def hit_rate(self) -> float | None:
        total = self.hits + self.misses
        return self.hits / total if total else None


class PostgresCache:
    """EmbeddingCache backed by pyembed.embedding_cache; hits and misses counted per day
    (written with each store, every 100 lookups or 10 s, and on `flush`)."""

    def __init__(self, conn: psycopg.Connection[Any], ttl: timedelta | None = None) -> None:
        self.conn = conn
        self.ttl = ttl
        self.counter = HitCounter()
        self.last_lookup: tuple[int, int] = (0, 0)
        """(hits, misses) of the latest lookup."""

    def get_many(self, texts: list[str], spec: ModelSpec,
                 input_type: InputType) -> dict[int, npt.NDArray[np.float32]]:
        keys = [cache_key(t, spec.key, input_type) for t in texts]
        rows = self.conn.execute(LOOKUP, {"keys": keys}).fetchall()
        found = {bytes(k): np.asarray(v.to_numpy() if isinstance(v, Vector) else v,
                                      dtype=np.float32) for k, v in rows}
        self.last_lookup = (len(found), len(set(keys)) - len(found))
        self.counter.add(spec.key, *self.last_lookup)
        if self.counter.due():
            self.flush()
        return {i: found[k] for i, k in enumerate(keys) if k in found}

    def flush(self) -> None:
        """Write the counted hits and misses (kept for later in a read-only transaction)."""
        if not self.counter.counts or self.conn.closed:
            return
        models, hits, misses = self.counter.take()
        row = self.conn.execute("SELECT current_setting('transaction_read_only')").fetchone()
        if row and row[0] == "on":
            self.counter.put_back(models, hits, misses)
            return
        self.conn.execute(COUNT, {"models": models, "hits": hits, "misses": misses})

    def put_many(self, texts: list[str], vectors: npt.NDArray[np.float32], spec: ModelSpec,
                 input_type: InputType) -> None:
        if not texts:
            return
        entries = {cache_key(t, spec.key, input_type): Vector(v) for t, v in zip(texts, vectors,
                                                                               strict=True)}
        self.conn.execute(STORE, {"keys": list(entries), "vectors": list(entries.values()),
                                  "model": spec.key, "input_type": str(input_type),
                                  "ttl": self.ttl.total_seconds() if self.ttl else None})
        self.flush()


def stats(conn: psycopg.Connection[Any], days: int = 30) -> list[CacheStatsRow]:
    """Hits, misses and current entries per day and model over the last `days` days (as far
    as running clients have written their counts)."""
    rows = conn.execute(
        """SELECT s.day, s.model_key, s.hits, s.misses,
                  (SELECT count(*) FROM pyembed.embedding_cache c WHERE c.model_key = s.model_key)
             FROM pyembed.cache_stats s WHERE s.day > current_date - %s
            ORDER BY s.day DESC, s.model_key""", (days,)).fetchall()
    return [CacheStatsRow(*r) for r in rows]


def purge(conn: psycopg.Connection[Any], model_key: str | None = None,
          expired_only: bool = False) -> int:
    """Delete cache entries (of one model, or only expired ones); returns how many."""
    cur = conn.execute(
        """DELETE FROM pyembed.embedding_cache
            WHERE (%(model)s::text IS NULL OR model_key = %(model)s)
              AND (NOT %(expired)s OR expires_at <= now())""",
        {"model": model_key, "expired": expired_only})
    return cur.rowcount
