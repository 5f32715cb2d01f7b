"""The embedding cache in PostgreSQL, through its SQL functions (pyembed.cache_*): one round trip
to look up a batch, one to store it. The same class serves the package (a psycopg connection)
and the PL/Python functions (plpy), so both read, store and renew entries alike."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .cachekey import HitCounter, cache_key
from .dbcall import count, translated
from .models import InputType, ModelSpec
from .sqlexec import Executor, executor

if TYPE_CHECKING:
    import psycopg

LOOKUP = "SELECT cache_key, embedding FROM pyembed.cache_get($1::bytea[])"
STORE = "SELECT pyembed.cache_put($1::bytea[], $2::text, $3::text, $4::vector[], $5::float8)"
COUNT = "SELECT pyembed.cache_count($1::text[], $2::bigint[], $3::bigint[])"


def flush_counts(db: Executor, counter: HitCounter) -> None:
    """Write `counter`'s hits and misses (kept for later if the transaction is read-only)."""
    conn = getattr(db, "conn", None)
    if not counter.counts or (conn is not None and conn.closed):
        return
    models, hits, misses = counter.take()
    written = db.rows(COUNT, [models, hits, misses], ["text[]", "bigint[]", "bigint[]"])
    if not written[0][0]:
        counter.put_back(models, hits, misses)


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
    """EmbeddingCache backed by pyembed.embedding_cache, the caller's tenant's entries; hits and
    misses counted per day (written with each store, every 100 lookups or 10 s, and on `flush`;
    kept for later in a read-only transaction)."""

    def __init__(self, db: psycopg.Connection[Any] | Executor, ttl: timedelta | None = None,
                 counter: HitCounter | None = None) -> None:
        self.db = executor(db)
        self.ttl = ttl
        self.counter = counter if counter is not None else HitCounter()
        self.last_lookup: tuple[int, int] = (0, 0)
        """(hits, misses) of the latest lookup."""

    def get_many(self, texts: list[str], spec: ModelSpec,
                 input_type: InputType) -> dict[int, npt.NDArray[np.float32]]:
        keys = [cache_key(t, spec.key, input_type) for t in texts]
        found = {bytes(k): self.db.vector(v)
                 for k, v in self.db.rows(LOOKUP, [keys], ["bytea[]"], binary=True)}
        self.last_lookup = (len(found), len(set(keys)) - len(found))
        self.counter.add(spec.key, *self.last_lookup)
        if self.counter.due():
            self.flush()
        return {i: found[k] for i, k in enumerate(keys) if k in found}

    def flush(self) -> None:
        """Write the counted hits and misses."""
        flush_counts(self.db, self.counter)

    def put_many(self, texts: list[str], vectors: npt.NDArray[np.float32], spec: ModelSpec,
                 input_type: InputType) -> None:
        if not texts:
            return
        entries = dict(zip((cache_key(t, spec.key, input_type) for t in texts), vectors,
                           strict=True))
        self.db.rows(STORE, [list(entries), spec.key, str(input_type),
                             self.db.vectors(list(entries.values())),
                             self.ttl.total_seconds() if self.ttl else None],
                     ["bytea[]", "text", "text", "text[]", "float8"])
        self.flush()


def stats(conn: psycopg.Connection[Any], days: int = 30) -> list[CacheStatsRow]:
    """Hits, misses and current entries per day and model over the last `days` days (as far
    as running clients have written their counts)."""
    with translated():
        rows = conn.execute("SELECT * FROM pyembed.cache_report(%s)",
                            (count(days, "days"),)).fetchall()
    return [CacheStatsRow(*r) for r in rows]


def purge(conn: psycopg.Connection[Any], model_key: str | None = None,
          expired_only: bool = False, older_than_days: int | None = None) -> int:
    """Delete cache entries (of one model, only expired ones, only those made more than
    `older_than_days` days ago: 0..36500); returns how many. UnknownModel for a key no model
    has (the database's check)."""
    days = None if older_than_days is None else count(older_than_days, "older_than_days")
    with translated():
        row = conn.execute("SELECT pyembed.cache_purge(%s, %s, %s)",
                           (model_key, expired_only, days)).fetchone()
    return int(row[0]) if row else 0


def purge_rerank_scores(conn: psycopg.Connection[Any], reranker: str | None = None,
                        expired_only: bool = False, older_than_days: int | None = None) -> int:
    """Delete cached rerank scores (of one reranker, only expired ones, only those made more
    than `older_than_days` days ago); returns how many. UnknownModel for a name no reranker has
    (rerankers are pyembed's, not the database's)."""
    days = None if older_than_days is None else count(older_than_days, "older_than_days")
    if reranker is not None:
        from .providers.rerank import reranker_spec

        reranker = reranker_spec(reranker).key
    with translated():
        row = conn.execute("SELECT pyembed.rerank_cache_purge(%s, %s, %s)",
                           (reranker, expired_only, days)).fetchone()
    return int(row[0]) if row else 0
