"""`pyembed worker`: embeds queued chunks in batches claimed with SKIP LOCKED.

A batch is leased (attempts + 1, hidden until the lease ends) in a short transaction, embedded
with no transaction open, then written and dequeued in one transaction. Leases are short and
renewed from a thread of their own while the batch is in flight, so a worker killed mid-batch
strands nothing for long: its lease runs out and the batch is claimed again, and what was
already embedded comes back from the cache instead of the provider. A write whose chunk text
changed meanwhile is discarded (the new text is queued already); a job for a key its corpus
does not accept is moved to pyembed.queue_failed with the reason, before any provider call
when the claim can tell. Each corpus's texts are embedded in calls of their own, so that each
corpus is billed for its own.

A login that may act for tenants (the operator's, in pyembed_operator) works every tenant's
queue: each batch is one tenant's jobs, claimed, embedded (its cache entries, its usage and rate
limits) and written acting for that tenant (pyembed.act_as_tenant, set in each transaction), and
the tenants with due jobs take turns, one batch each (pyembed.queue_by_tenant lists them). Any
other login works its own tenant's queue, as before.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import psycopg

from . import recall
from .cache import PostgresCache
from .corpora import model_spec
from .db import (
    connection_lost,
    dsn_parts,
    inherited,
    lost_during,
    release,
    reopen,
    resolve_dsn,
    server_error,
    translate,
)
from .db import lost as gone
from .dbcall import INTEGER_RANGE, count
from .embedder import Embedder
from .errors import (
    ConfigError,
    InvalidInput,
    MissingAPIKey,
    ModelMismatch,
    ProviderError,
    PyembedError,
    RateLimited,
    UnknownModel,
)
from .models import InputType, ModelSpec
from .tenants import ACT_AS, acting_for, acting_tenants, error_counter, meter
from .text import number
from .vectors import copy_vectors

_log = logging.getLogger(__name__)

# A job's attempts, lease and last error are written only by pyembed.claim_jobs, renew_jobs,
# retry_jobs and release_jobs (sql/040-queue.sql), on the caller's corpora: the attempts decide
# when a job expires, and its last error is the failure recorded then.
CLAIM = ("SELECT corpus_id, chunk_id, model_key, content_hash, attempts, content, name, active, "
         "target FROM pyembed.claim_jobs(%(max_attempts)s::numeric, %(limit)s::numeric, "
         "%(lease)s::float8, %(skip)s::text[])")

RENEW = ("SELECT pyembed.renew_jobs(%(lease)s::float8, %(corpus_ids)s::integer[], "
         "%(chunk_ids)s::bigint[], %(keys)s::text[], %(attempts)s::integer[])")

RELEASE = ("SELECT pyembed.release_jobs(%(corpus_ids)s::integer[], %(chunk_ids)s::bigint[], "
           "%(keys)s::text[], %(attempts)s::integer[])")

# Jobs out of attempts, and a job given up, are moved to pyembed.queue_failed by the database's
# pyembed.expire_jobs and pyembed.fail_job (sql/040-queue.sql): a failure row is only ever a
# queued job of the caller's corpora, moved; the application role cannot write one itself.
EXPIRE = "SELECT pyembed.expire_jobs(%(max_attempts)s::numeric)"

FAIL = ("SELECT pyembed.fail_job(%(corpus_id)s::integer, %(chunk_id)s::bigint, %(model)s::text, "
        "%(hash)s::bytea, %(attempts)s::integer, %(reason)s::text)")

# The queues this worker may work, one row per tenant with jobs (sql/040-queue.sql).
QUEUES = ("SELECT tenant, label, queued, due, soon, oldest FROM pyembed.queue_by_tenant("
          "%(max_attempts)s::numeric, %(skip)s::text[], %(within)s::float8)")

# What a drain leaves behind: jobs held by other workers' leases (or dead workers'), and jobs
# waiting out a retry delay after an error.
NOT_DUE = """
SELECT count(*) FILTER (WHERE last_error IS NULL),
       max(not_before) FILTER (WHERE last_error IS NULL),
       count(*) FILTER (WHERE last_error IS NOT NULL),
       max(not_before) FILTER (WHERE last_error IS NOT NULL)
  FROM pyembed.queue WHERE not_before > now()
"""

RETRY = ("SELECT pyembed.retry_jobs(%(reason)s::text, %(corpus_ids)s::integer[], "
         "%(chunk_ids)s::bigint[], %(keys)s::text[], %(hashes)s::bytea[], "
         "%(attempts)s::integer[], %(delays)s::float8[])")


DEFAULT_LEASE = 30.0
"""Seconds a claimed batch stays hidden from other workers; renewed while it is in flight."""
RECALL_RETRY = 5.0
"""Seconds before a failed recall measurement is tried again, doubled at each failure in a row
up to the period (Worker.recall_every): one failure waited a whole period."""
MAX_RETRY_DELAY = 86400.0
"""The longest wait before a job is tried again that pyembed.retry_jobs takes (a day): a
service's Retry-After beyond it is cut to it."""


SESSION_CORPORA = 256
"""The corpora a worker's session writes to before the worker opens a new one, between two
batches: a backend keeps what each corpus's write made it compile (PL/pgSQL compiles a trigger
function again for each partition it fires on, with its plans) until its session ends, which
DISCARD ALL does not hasten (docs/scale-out.md, Many corpora)."""


@dataclass
class Item:
    corpus_id: int
    chunk_id: int
    model_key: str
    content_hash: bytes
    attempts: int
    content: str | None
    tenant: str | None = None
    """The tenant the worker acted for when it claimed the job (None: its login's own)."""

    @property
    def job(self) -> tuple[int, int, str]:
        return self.corpus_id, self.chunk_id, self.model_key


@dataclass
class WorkerStats:
    """What a run did. `embedded`: vectors written (a vector embedded but not written is not
    counted); `stale`: jobs skipped, their chunk changed or deleted meanwhile (its new text is
    queued) or taken over by another worker."""

    embedded: int = 0
    failed: int = 0
    retried: int = 0
    stale: int = 0
    batches: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    leased: int = 0
    """At the end of a drain: jobs leased by other workers (or dead ones), not embedded."""
    leased_until: datetime | None = None
    waiting: int = 0
    """At the end of a drain: jobs waiting out a retry delay past the drain's wait."""
    waiting_until: datetime | None = None

    @property
    def all_failed(self) -> bool:
        return self.embedded == 0 and (self.failed > 0 or self.retried > 0)

    @property
    def rate(self) -> float:
        return self.embedded / self.seconds if self.seconds else 0.0


class Leases:
    """Renews the leases of the jobs in flight every third of the lease, from a thread and
    connection of its own: the embedding call runs with no transaction open, and may outlast
    any lease short enough to free a dead worker's batch soon."""

    def __init__(self, dsn: str | None, seconds: float) -> None:
        self.dsn = dsn
        self.seconds = seconds
        self._held: dict[tuple[int, int, str], tuple[int, str | None]] = {}
        self._lock = threading.Lock()  # held while renewing: a dropped job is never renewed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self.acted_as: tuple[str, ...] | None = None
        """Who the worker's connections act as (Worker sets it): a new one must too."""

    def hold(self, items: list[Item]) -> None:
        with self._lock:
            self._held.update((i.job, (i.attempts, i.tenant)) for i in items)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pyembed lease renewal",
                                            daemon=True)
            self._thread.start()

    def drop(self, items: list[Item]) -> None:
        """Stop renewing these jobs (before their outcome is written, which may set their
        not_before itself)."""
        with self._lock:
            for item in items:
                self._held.pop(item.job, None)

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread, self._stop = None, threading.Event()
        with self._lock:
            self._held.clear()
            if self._conn is not None:
                release(self._conn)
                self._conn = None

    def _run(self) -> None:
        stop = self._stop
        while not stop.wait(self.seconds / 3):
            try:
                self._renew()
            except (psycopg.Error, PyembedError) as exc:
                if isinstance(exc, psycopg.Error) and not connection_lost(exc):
                    # The server refused the renewal (a timeout, a lock): the connection stays.
                    _log.warning("could not renew the leases of the batch in flight (%s)",
                                 server_error(exc))
                    continue
                _log.warning("could not renew the leases of the batch in flight (%s)", exc)
                with self._lock:
                    if self._conn is not None:
                        release(self._conn)
                        self._conn = None

    def _renew(self) -> None:
        if not self._held:
            return
        if self._conn is None or gone(self._conn):
            conn, self.acted_as = reopen(self.dsn, self.acted_as, "worker",
                                         autocommit=True,
                                         application_name="pyembed worker leases")
            with self._lock:
                if self._conn is not None:
                    release(self._conn)
                self._conn = conn
        with self._lock:
            if not self._held or self._conn is None:
                return
            by_tenant: dict[str | None, list[tuple[tuple[int, int, str], int]]] = defaultdict(list)
            for job, (attempts, tenant) in self._held.items():
                by_tenant[tenant].append((job, attempts))
            for tenant, jobs in by_tenant.items():
                with acting_for(self._conn, tenant):
                    self._conn.execute(RENEW, {
                        "lease": self.seconds, "corpus_ids": [j[0] for j, _ in jobs],
                        "chunk_ids": [j[1] for j, _ in jobs], "keys": [j[2] for j, _ in jobs],
                        "attempts": [a for _, a in jobs]})


class Worker:
    """Drains pyembed.queue; several workers may run at once."""

    def __init__(self, dsn: str | None = None, *, batch_size: int = 64, max_attempts: int = 5,
                 lease_seconds: float = DEFAULT_LEASE, retry_base: float = 2.0,
                 retry_max: float = 300.0,
                 embedder_for: Callable[[ModelSpec, PostgresCache], Embedder] | None = None,
                 recall_every: float = 60.0, recall_samples: int = 20) -> None:
        # The batch size's range is pyembed.claim_jobs's, said by its check at the first claim.
        batch_size = count(batch_size, "batch_size")
        max_attempts = count(max_attempts, "max_attempts")
        if max_attempts < 1:
            raise InvalidInput(f"max_attempts must be at least 1, got {max_attempts}")
        # pyembed.recall_sampled's bounds, said here: out of them, every run of the background
        # recall would fail where only the log would say so.
        recall_samples = count(recall_samples, "recall_samples", (0, INTEGER_RANGE[1]))
        lease_seconds = number(lease_seconds, "lease_seconds", 0.0, above=True, unit="seconds")
        retry_base = number(retry_base, "retry_base", 0.0, unit="seconds")
        retry_max = number(retry_max, "retry_max", 0.0, unit="seconds")
        recall_every = number(recall_every, "recall_every", 0.0, unit="seconds")
        # The worker's login by default ($PYEMBED_WORKER_DSN, the local cluster's), which
        # counts failed provider calls. Parsed here, so that a DSN given wrong is said where it is
        # given, not at the first claim.
        self.dsn = dsn or resolve_dsn(worker=True)
        dsn_parts(self.dsn)
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.lease_seconds = lease_seconds
        self.retry_base = retry_base
        self.retry_max = retry_max
        self._embedder_for = embedder_for or (lambda spec, cache: Embedder(
            spec, cache=cache, meter=self._meter, on_error=self._count_error))
        self._corpus_id: int | None = None
        self._embedders: dict[str, Embedder] = {}
        self.stop_requested = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._handed_out: str | None = None  # worker.conn, once your code had it
        self._written_in: set[int] = set()  # the corpora the session of _conn wrote to
        self._cache_conn: psycopg.Connection[Any] | None = None
        self._cache_tenant: str | None = None  # what the cache connection acts for
        self._tenant: str | None = None
        """The tenant the batch in hand is worked for (None: the login's own)."""
        self._turns = 0
        self._claimed = False
        self._served: dict[str | None, int] = {}  # each tenant's last turn
        self._leases = Leases(self.dsn, lease_seconds)
        self.recall_every = recall_every
        """Seconds between two re-runs of sampled searches (pyembed.recall_sampled); 0: never."""
        self.recall_samples = recall_samples
        """Sampled searches re-run at most each time: the rate limit of the exact scans."""
        self._recall_due = 0.0
        self._recall_failures = 0
        self._draining = False
        self.cannot_embed: dict[str, PyembedError] = {}
        """Keys this worker cannot embed for (no API key, an unknown model or provider), with
        why: their jobs stay queued for a worker that can, and the other keys' are embedded."""

    # -- connections -----------------------------------------------------------------------
    @property
    def conn(self) -> psycopg.Connection[Any]:
        """The worker's connection, for your own statements. Once your code has it, one the
        server closes is not opened again silently (whatever you SET on it, a role, would be
        lost): the next batch is DatabaseNotReady, see reconnect()."""
        self._handed_out = self._handed_out or "worker.conn"
        return self._db()

    def _db(self) -> psycopg.Connection[Any]:
        """The worker's own connection, opened again after a loss as the first one acted (its
        login role, current role and tenant: db.reopen), unless it was handed out."""
        if self._conn is None or self._conn.closed or inherited(self._conn):
            self._written_in.clear()
            handed_out = self._handed_out if self._conn is not None else None
            self._conn, self._leases.acted_as = reopen(
                self.dsn, self._leases.acted_as, "worker", handed_out=handed_out,
                old=self._conn, application_name="pyembed worker")
        return self._conn

    def reconnect(self) -> None:
        """Close the worker's connections; the next batch opens new ones from its DSN, acting
        as its login: after DatabaseNotReady for a connection that was handed out."""
        self.close()
        self._conn = None
        self._handed_out = None
        self._leases.acted_as = None

    @contextmanager
    def _tx(self, tenant: str | None = None, *, acting: bool = True
            ) -> Iterator[psycopg.Connection[Any]]:
        """A transaction of the worker's connection acting for `tenant` (default: the batch's,
        when `acting`; None: the login's own)."""
        with acting_for(self._db(), tenant if tenant is not None or not acting
                        else self._tenant) as conn:
            yield conn

    def _reopen_lost(self) -> None:
        """Between batches, close the connections their server closed (a restart), so that
        the next batch opens new ones instead of failing once and waiting to retry; and the
        worker's own connection once its session wrote to SESSION_CORPORA corpora."""
        if self._conn is not None and (gone(self._conn) or (
                len(self._written_in) >= SESSION_CORPORA and self._handed_out is None)):
            release(self._conn)
        if self._cache_conn is not None and gone(self._cache_conn):
            release(self._cache_conn)
            self._cache_conn = None
            self._cache_tenant = None
            self._embedders.clear()  # their caches hold the closed connection

    def _embedder(self, key: str) -> Embedder:
        if self._cache_conn is not None and inherited(self._cache_conn):
            self._cache_conn = None
            self._embedders.clear()  # their caches hold the parent process's connection
        if key not in self._embedders:
            if self._cache_conn is None or self._cache_conn.closed:
                # Its own autocommit connection: what was embedded survives a failed batch.
                self._cache_conn, self._leases.acted_as = reopen(
                    self.dsn, self._leases.acted_as, "worker", autocommit=True,
                    application_name="pyembed worker cache")
                self._cache_tenant = None
            spec = model_spec(self._db(), key)
            self._db().rollback()
            self._embedders[key] = self._embedder_for(spec, PostgresCache(self._cache_conn))
        self._cache_acts_for(self._tenant)
        return self._embedders[key]

    def _cache_acts_for(self, tenant: str | None) -> None:
        """The cache connection (cache, usage and rate limits) acts for the batch's tenant, for
        the session (it is autocommit); the counts of the tenant it acted for written first."""
        if tenant == self._cache_tenant or self._cache_conn is None:
            return
        for embedder in self._embedders.values():
            if isinstance(embedder.cache, PostgresCache):
                embedder.cache.flush()
        self._cache_conn.execute(ACT_AS, (tenant or "", False))
        self._cache_tenant = tenant

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Write the cache counts, stop renewing leases and close the connections (a later
        batch opens new ones)."""
        self._leases.close()
        for embedder in self._embedders.values():
            if isinstance(embedder.cache, PostgresCache):
                try:
                    embedder.cache.flush()
                except psycopg.Error:
                    pass  # counts only: the connection may be gone
        self._embedders.clear()
        for c in (self._conn, self._cache_conn):
            if c is not None:
                release(c)
        self._cache_tenant = None

    # -- one batch -------------------------------------------------------------------------
    def pending(self) -> int:
        return sum(q[2] for q in self._queues())

    def _queues(self, within: float = 0.0) -> list[tuple[Any, ...]]:
        """QUEUES: the queues this worker may work, each tenant's that has jobs."""
        try:
            with self._tx(acting=False) as conn:
                return conn.execute(QUEUES, {"max_attempts": self.max_attempts,
                                             "skip": list(self.cannot_embed),
                                             "within": within}).fetchall()
        except psycopg.Error as exc:
            # pyembed's own refusals in its words (a session naming no tenant: PE005); the run
            # loop handles the server's other errors as they are
            if (exc.sqlstate or "").startswith("PE"):
                raise translate(exc) from exc
            raise

    def _next_tenant(self) -> bool:
        """Choose the tenant of the next batch: of those with due jobs, the one whose turn came
        longest ago (never: first; then the oldest due job), so that every tenant with due jobs
        gets a batch before any gets a second. False when no job is due."""
        due = [q for q in self._queues() if q[3] > 0]
        if not due:
            return False
        tenant = min(due, key=lambda q: (self._served.get(q[0], -1), q[5]))[0]
        self._turns += 1
        self._served[tenant] = self._turns
        self._tenant = tenant
        return True

    def claim(self, stats: WorkerStats | None = None) -> list[Item]:
        """Lease a batch, of one tenant's jobs (the next tenant's turn); jobs for a key their
        corpus does not accept are failed instead."""
        stats = stats or WorkerStats()
        if not self._next_tenant() and self._claimed:
            return []
        self._claimed = True  # (the first claim runs whatever is due: its bounds' check)
        with self._tx():
            try:
                self._db().execute(EXPIRE, {"max_attempts": self.max_attempts})
                rows = self._db().execute(CLAIM, {"limit": self.batch_size,
                                                  "lease": self.lease_seconds,
                                                  "max_attempts": self.max_attempts,
                                                  "skip": list(self.cannot_embed)}).fetchall()
            except psycopg.Error as exc:
                # the claim's own checks (batch size, lease), and a standby or read-only
                # session (ReadOnlyReplica), in pyembed's words; the run loop handles the
                # server's other errors as they are
                if (exc.sqlstate or "").startswith("PE") or isinstance(
                        exc, psycopg.errors.ReadOnlySqlTransaction):
                    raise translate(exc) from exc
                raise
            items = []
            for *fields, corpus, active, target in rows:
                item = Item(*fields)
                item.tenant = self._tenant
                if active is None:
                    items.append(item)
                else:
                    self._fail(item, _refusal(item.model_key, corpus, active, target), stats)
        return items

    def run_once(self, stats: WorkerStats | None = None) -> WorkerStats:
        """Claim, embed and write one batch; returns the counts (added to `stats` if given)."""
        stats = stats or WorkerStats()
        items = self.claim(stats)
        if not items:
            return stats
        stats.batches += 1
        groups: dict[tuple[str, int], list[Item]] = defaultdict(list)
        for item in items:
            groups[item.model_key, item.corpus_id].append(item)
        self._leases.hold(items)
        pending = list(groups.items())
        try:
            while pending:
                (key, _), group = pending[0]
                self._process(key, group, stats)
                pending.pop(0)
        except psycopg.Error as exc:
            if not connection_lost(exc):
                # The server refused a statement (a timeout, a deadlock): the jobs not done are
                # given back, for the next claim; over a lost connection their leases run out.
                self._give_back([item for _, group in pending for item in group])
            raise
        finally:
            self._leases.drop(items)
        return stats

    def _give_back(self, items: list[Item]) -> None:
        try:
            self._release(items)
        except psycopg.Error as exc:
            _log.warning("could not give back the batch's jobs (%s): they are claimed again "
                         "when their leases end", server_error(exc))

    def _meter(self, spec: ModelSpec, tokens: int) -> None:
        """Account each provider call to the tenant and corpus (refused over the limits)."""
        if self._cache_conn is not None:
            meter(self._cache_conn, self._corpus_id)(spec, tokens)

    def _count_error(self, spec: ModelSpec, error: ProviderError) -> None:
        """Count a failed provider call (pyembed.provider_errors)."""
        if self._cache_conn is not None:
            error_counter(self._cache_conn)(spec, error)

    def _process(self, key: str, items: list[Item], stats: WorkerStats) -> None:
        """Embed and store one corpus's jobs for one key (its provider calls billed to it)."""
        self._corpus_id = items[0].corpus_id if items else None
        try:
            embedder = self._embedder(key)
        except (MissingAPIKey, UnknownModel, ConfigError) as exc:
            # Nothing of this key can be embedded here until someone fixes the setup: give its
            # items back untouched and claim no more of them; the other keys' (other corpora,
            # other tenants) go on, and a drain ends with this error.
            self._release(items)
            if key not in self.cannot_embed and not self._draining:  # (a drain ends with it)
                _log.warning("leaving the jobs of %s queued: %s", key, exc)
            self.cannot_embed[key] = exc
            return
        good: list[Item] = []
        for item in items:
            if item.content is None:  # chunk deleted meanwhile
                stats.stale += 1
                continue
            try:
                embedder.check([item.content])
                good.append(item)
            except InvalidInput as exc:
                self._fail(item, f"invalid text: {exc}", stats)
        if not good:
            return
        try:
            vectors = embedder.embed([i.content or "" for i in good], InputType.DOCUMENT)
        except RateLimited as exc:
            # Don't split. The service's 429: the wait it asked for (none: the worker's
            # backoff; a Retry-After of 0 is no reason to wait longer); the tenant's own
            # limit: the next minute.
            wait = _retry_after(exc) if _transient(exc) else 60.0
            self._retry_all(good, str(exc), stats, wait)
            return
        except ProviderError as exc:
            if len(good) > 1 and not _transient(exc):
                # One bad input can sink a whole request: embed one by one to find it. The
                # batch's error is the run's to report, though each item may then succeed.
                stats.errors.append(f"{exc} (a batch of {len(good)}, sent again one by one)")
                for item in good:
                    self._process(key, [item], stats)
                return
            self._retry_all(good, str(exc), stats, _retry_after(exc))
            return
        self._write(key, good, vectors, stats)

    def _write(self, key: str, items: list[Item], vectors: np.ndarray, stats: WorkerStats) -> None:
        corpus_id = items[0].corpus_id
        self._leases.drop(items)
        try:
            with self._tx(), self._db().cursor() as cur:
                written = copy_vectors(cur, corpus_id, [i.chunk_id for i in items], key, vectors,
                                       [i.content_hash for i in items],
                                       claimed=[i.attempts for i in items])
        except psycopg.Error as exc:
            if exc.sqlstate != ModelMismatch.sqlstate:
                raise
            self._refused(key, corpus_id, items, stats)
            return
        self._written_in.add(corpus_id)
        stats.embedded += len(written)
        # Their text changed (the new one is queued), or another worker took them over after
        # this one's lease ran out (they are its to write and count).
        stats.stale += len(items) - len(written)

    def _refused(self, key: str, corpus_id: int, items: list[Item], stats: WorkerStats) -> None:
        """The corpus stopped accepting the key while the batch was embedded: its jobs can never
        be stored (those a migration step withdrew are gone from the queue already)."""
        with self._tx():
            row = self._db().execute("SELECT name, model_key, target_model_key "
                                     "FROM pyembed.corpora WHERE corpus_id = %s",
                                     (corpus_id,)).fetchone()
        if row is None or key in (row[1], row[2]):
            stats.stale += len(items)  # the corpus is gone, or takes the key again
            return
        reason = _refusal(key, *row)
        for item in items:
            self._fail(item, reason, stats)

    def _release(self, items: list[Item]) -> None:
        self._leases.drop(items)
        with self._tx():
            self._db().execute(RELEASE, {
                "corpus_ids": [i.corpus_id for i in items],
                "chunk_ids": [i.chunk_id for i in items], "keys": [i.model_key for i in items],
                "attempts": [i.attempts for i in items]})

    def _fail(self, item: Item, reason: str, stats: WorkerStats) -> None:
        """Move the job to pyembed.queue_failed; one re-queued or re-claimed meanwhile is
        counted stale and left alone."""
        self._leases.drop([item])
        with self._tx():
            row = self._db().execute(FAIL, {
                "corpus_id": item.corpus_id, "chunk_id": item.chunk_id, "model": item.model_key,
                "hash": item.content_hash, "attempts": item.attempts,
                "reason": reason}).fetchone()
        if not (row and row[0]):
            stats.stale += 1
            return
        stats.failed += 1
        stats.errors.append(reason)

    def _retry_all(self, items: list[Item], reason: str, stats: WorkerStats,
                   retry_after: float | None = None) -> None:
        self._leases.drop(items)
        due: list[Item] = []
        for item in items:
            if item.attempts >= self.max_attempts:
                self._fail(item, f"gave up after {item.attempts} attempts: {reason}", stats)
            else:
                due.append(item)
        if due:
            delays = [min(max(min(self.retry_base * 2 ** (item.attempts - 1), self.retry_max),
                              retry_after or 0.0), MAX_RETRY_DELAY) for item in due]
            with self._tx():
                self._db().execute(RETRY, {
                    "reason": reason, "delays": delays,
                    "corpus_ids": [i.corpus_id for i in due],
                    "chunk_ids": [i.chunk_id for i in due],
                    "keys": [i.model_key for i in due],
                    "hashes": [i.content_hash for i in due],
                    "attempts": [i.attempts for i in due]})
            stats.retried += len(due)
        stats.errors.append(reason)

    # -- the loop --------------------------------------------------------------------------
    def run(self, *, drain: bool = True, poll_interval: float = 1.0, drain_wait: float = 60.0,
            progress: Callable[[WorkerStats, int], None] | None = None) -> WorkerStats:
        """Work until stopped, or with `drain` until nothing is claimable within `drain_wait`
        seconds (retries in backoff and other workers' leases that end by then are waited
        for; what is left then is counted in `leased` and `waiting`).
        SIGTERM and SIGINT finish the current batch, then stop."""
        stats = WorkerStats()
        start = time.perf_counter()
        self._draining = drain
        with _stop_on_signals(self.stop_requested):
            troubles = 0
            while not self.stop_requested.is_set():
                before = (stats.embedded, stats.failed, stats.retried, stats.stale)
                try:
                    self._reopen_lost()
                    self.run_once(stats)
                    self._measure_recall()
                    troubles = 0
                except psycopg.OperationalError as exc:
                    troubles += 1
                    if drain and troubles > 3:
                        raise
                    if connection_lost(exc):
                        # The server went away: nothing is lost (leases run out), so reconnect.
                        _log.warning("database connection lost (%s); reconnecting", exc)
                        self.close()
                    else:
                        # The server refused a statement and rolled its transaction back (a
                        # statement or lock timeout, a deadlock, a serialization failure): the
                        # connection is fine, the batch's jobs were given back (run_once).
                        _log.warning("the database refused a statement of the batch (%s); "
                                     "its jobs are claimed again", server_error(exc))
                    self.stop_requested.wait(min(poll_interval * 2 ** troubles, 30.0))
                    continue
                stats.seconds = time.perf_counter() - start
                if progress:
                    progress(stats, self.pending())
                if (stats.embedded, stats.failed, stats.retried, stats.stale) == before:
                    if drain and self._nothing_due(drain_wait):
                        self._count_left(stats)
                        break
                    self.stop_requested.wait(poll_interval)
        stats.seconds = time.perf_counter() - start
        if drain and self.cannot_embed:
            raise next(iter(self.cannot_embed.values()))  # the rest is done: now the setup
        return stats

    def measure_recall(self, *, now: bool = False) -> list[recall.Measurement]:
        """Re-run sampled searches when `recall_every` seconds have passed (or `now`); a
        failure is logged, and tried again sooner than a period (RECALL_RETRY). A connection
        lost, or a database not reached, is DatabaseNotReady, as from a client's call: nothing
        of the measurement was recorded, and the next call opens a new connection."""
        try:
            return self._measure_recall(now=now)
        except psycopg.Error as exc:  # (only a lost connection's leaves it)
            self.close()
            raise lost_during("while measuring recall", exc, ": nothing of this measurement was "
                              "recorded; the next call opens a new connection") from exc

    def _measure_recall(self, *, now: bool = False) -> list[recall.Measurement]:
        """measure_recall, raising a lost connection's error for the run loop, which
        reconnects."""
        if not now and (self.recall_every <= 0 or time.monotonic() < self._recall_due):
            return []
        self._recall_due = time.monotonic() + self.recall_every
        try:
            measured = []
            with self._tx(acting=False) as conn:
                tenants = [t for t, _ in acting_tenants(conn)]
            for tenant in tenants:  # each tenant's sampled searches, acting for it
                with self._tx(tenant, acting=False) as conn:
                    measured += recall.measure_sampled(conn, self.recall_samples)
        except (psycopg.Error, PyembedError) as exc:
            self._recall_failures += 1
            self._recall_due = time.monotonic() + self._recall_retry()
            if isinstance(exc, psycopg.Error) and connection_lost(exc):
                raise  # the run loop reconnects
            _log.warning("recall measurement failed (tried again in %.0f s): %s",
                         self._recall_due - time.monotonic(),
                         exc if isinstance(exc, PyembedError) else server_error(exc))
            return []
        self._recall_failures = 0
        return measured

    def _recall_retry(self) -> float:
        """Seconds to the next try after the `_recall_failures`th failure in a row: RECALL_RETRY
        doubled at each, at most a period (a measurement that keeps failing is tried once a
        period, as one that works)."""
        return min(RECALL_RETRY * 2.0 ** (self._recall_failures - 1), self.recall_every)

    def _nothing_due(self, within: float) -> bool:
        return not any(q[4] for q in self._queues(within))

    def _count_left(self, stats: WorkerStats) -> None:
        stats.leased, stats.leased_until, stats.waiting, stats.waiting_until = 0, None, 0, None
        for tenant, *_ in self._queues():
            with self._tx(tenant, acting=False) as conn:
                row = conn.execute(NOT_DUE).fetchone()
            if row:
                stats.leased += row[0]
                stats.waiting += row[2]
                stats.leased_until = _latest(stats.leased_until, row[1])
                stats.waiting_until = _latest(stats.waiting_until, row[3])


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else max(a, b)


def _refusal(key: str, corpus: str, active: str, target: str | None) -> str:
    also = f", migration target {target}" if target else ""
    return f"model key {key} is not accepted by corpus {corpus} (active key {active}{also})"


def _transient(exc: ProviderError) -> bool:
    from .providers import TransientProviderError

    return isinstance(exc.__cause__, TransientProviderError)


def _retry_after(exc: ProviderError) -> float | None:
    """The wait the service asked for, if the failure carried one."""
    return getattr(exc.__cause__, "retry_after", None)


@contextmanager
def _stop_on_signals(event: threading.Event) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum: int, frame: object) -> None:
        _log.info("signal %d: finishing the current batch, then stopping", signum)
        event.set()

    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
