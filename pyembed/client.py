"""The Python API: connect, create a corpus, add documents, search them."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import numpy as np
import psycopg
from psycopg.pq import TransactionStatus

from . import index, models
from .cache import PostgresCache
from .chunking import Span, fit_spans, iter_spans
from .config import READ_DSN_ENV
from .corpora import (
    CorpusInfo,
    DocumentChunks,
    Spans,
    chunks_refused,
    corpus_info,
    create_corpus,
    delete_documents,
    document_hashes,
    drop_corpus,
    list_corpora,
    model_spec,
    too_big,
    write_prepared,
)
from .db import (
    PsycopgExecutor,
    conninfo,
    inherited,
    lost,
    lost_during,
    opened_here,
    release,
    reopen,
    unreachable,
)
from .db import connect as db_connect
from .db import identity as _identity
from .embedder import Embedder
from .errors import (
    DatabaseNotReady,
    InvalidInput,
    ModelMismatch,
    ReadOnlyReplica,
    UnknownCorpus,
)
from .models import LOCAL_DEFAULT, InputType, ModelSpec
from .query import search_text as query_search
from .rerank import RerankCache, Reranker, candidates, reranker_spec
from .search import Hit, Options, check_k, route, search, vector_key
from .tenants import Keyed, error_counter, meter
from .text import check_document_id, check_metadata, check_text, check_whole_number, document_hash

_log = logging.getLogger(__name__)

_F = TypeVar("_F", bound=Callable[..., Any])


def _in_turn(method: _F) -> _F:
    """Run `method` as one call of its client (Client.call): one call at a time on the
    client's connection, so threads sharing a Client never nest their transactions on it, and
    a connection its server closed since the last call is opened again first."""
    @functools.wraps(method)
    def in_turn(self: Client | Corpus, *args: Any, **kwargs: Any) -> Any:
        with self.call():
            return method(self, *args, **kwargs)
    return cast(_F, in_turn)


def in_client_turn(function: _F) -> _F:
    """Run a function whose first argument is a Client (migration steps, compare, evaluation
    queries) as one call of that client, as the Client's own methods run."""
    @functools.wraps(function)
    def in_turn(client: Client, *args: Any, **kwargs: Any) -> Any:
        with client.call():
            return function(client, *args, **kwargs)
    return cast(_F, in_turn)


class _InTurn:
    """The client's connection as an Executor whose each statement is a call of the client
    (Client.call): what the Client hands out (embedders, rerankers, their caches and meters)
    runs its statements between the client's calls, never inside another thread's
    transaction, holds no turn across a provider call, and uses the connection the client has
    now (opened again after a restart)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    @property
    def conn(self) -> psycopg.Connection[Any]:
        return self.client._conn  # (flush_counts reads whether it is closed)

    def rows(self, sql: str, params: Sequence[Any], types: Sequence[str] = (), *,
             binary: bool = False) -> list[tuple[Any, ...]]:
        with self.client.call():
            return PsycopgExecutor(self.client._conn).rows(sql, params, types, binary=binary)

    def vectors(self, vectors: Sequence[np.ndarray]) -> list[Any]:
        return PsycopgExecutor(self.client._conn).vectors(vectors)

    def vector(self, value: Any) -> np.ndarray:
        return PsycopgExecutor(self.client._conn).vector(value)


@dataclass(frozen=True)
class Document:
    """A document to add: its id, its text, and metadata that search filters can match."""

    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Retrieval:
    """What a search found: the hits, the model key that served them (None for keyword
    search), whether the query's embedding came from the cache, and phase timings in ms."""

    hits: list[Hit]
    model_key: str | None
    cache_hit: bool | None
    timings: dict[str, float | None]


@dataclass(frozen=True)
class AddReport:
    """What `Corpus.add` did: documents added, updated (text or metadata changed) and skipped
    (unchanged, or stored by another writer meanwhile), and the chunks written."""

    added: int
    updated: int
    skipped: int
    chunks: int


@dataclass(frozen=True)
class PreparedAdd:
    """Documents chunked and embedded by `Corpus.prepare`, for `Corpus.write`: the corpus as it
    was read, the documents that changed with their chunks (as `Spans` of their texts), the
    active key's vectors of those chunks in order (blocks of rows, as they were embedded), the
    migration target's (`also`), and the counts `write` reports."""

    info: CorpusInfo
    documents: list[DocumentChunks]
    vectors: list[np.ndarray]
    also: dict[str, list[np.ndarray]] | None
    added: int
    updated: int
    skipped: int

    @property
    def chunks(self) -> int:
        """The chunks to write."""
        return sum(len(d.chunks) for d in self.documents)


EMBED_CHUNKS = 1024
"""Chunks `Corpus.prepare` chunks, then embeds, at a time: the texts of a group, never of a
whole document, are held at once (then only where they lie in their documents, and their
vectors)."""
EMBED_CHARACTERS = 4 << 20
"""The characters of a group's chunks, at most (beyond the first chunk)."""


class Client:
    """A connection to a pyembed database with an embedder per model key (sharing the cache).

    Threads may share a Client: its methods, its corpora's, the statements of the embedders,
    rerankers and caches it hands out, and the functions that take it (migration steps,
    compare, evaluation queries) take turns on its connection (for searches in parallel, open
    a client per thread). A connection the server closed between two calls (a restart) is
    opened again by the next call (Client.call), unless the session may act otherwise than a new
    one would (its connection handed to your code, or a role or tenant set on it): then the
    loss is DatabaseNotReady until Client.reconnect()."""

    def __init__(self, conn: psycopg.Connection[Any], *, use_cache: bool = True,
                 log_queries: bool = True, read_conn: psycopg.Connection[Any] | None = None,
                 max_replica_wait: float = 5.0) -> None:
        self._conn = conn
        self._read_conn = read_conn or conn
        for given in (self._conn, self._read_conn):
            opened_here(given)  # (a fork after this: the child's calls open their own, db.inherited)
        # Who each session acts as, which a new connection must act as too; and whether your
        # code holds a connection (it may SET ROLE on it, which no new one would carry): the
        # connections given here are yours, `connect` makes its own.
        self._identity = _identity(conn)
        self._read_identity = _identity(read_conn) if read_conn is not None else None
        self._handed_out: str | None = "the connection given to Client()"
        self._closed = False
        self.max_replica_wait = max_replica_wait
        self._written_lsn: str | None = None
        self.turn = threading.RLock()
        """Held by each call that uses `conn` (or `read_conn`): one call at a time."""
        self._calls = 0  # nested calls of the thread holding the turn
        self._holder: int | None = None  # that thread
        self._keeping = threading.local()  # (_keep_turn)
        self._conninfo = conninfo(conn)
        self._read_conninfo = conninfo(read_conn) if read_conn is not None else None
        self._autocommit = conn.autocommit
        self._in_turn = _InTurn(self)
        self.cache = PostgresCache(self._in_turn) if use_cache else None
        self.rerank_cache = (RerankCache(self._in_turn, counter=self.cache.counter)
                             if self.cache is not None else None)
        self._rerankers: dict[str, Reranker] = {}
        self.log_queries = log_queries
        self._billed = threading.local()  # (billed_to)
        self._embedders: dict[tuple[str, bool], Embedder] = {}

    @contextmanager
    def call(self) -> Iterator[None]:
        """Hold this client's turn for one call on its connection. The outermost call first
        opens again a connection that its server closed since the last call (a restart):
        nothing is replayed, as nothing was sent. Inside a transaction opened on `conn`, that
        is DatabaseNotReady instead (the server rolled it back). A connection lost during a
        call is DatabaseNotReady too (what the call wrote may or may not be stored), and the
        next call opens a new one."""
        with self.turn:
            if self._closed:  # its connections are not a server's to lose: none is reopened
                raise DatabaseNotReady("this client is closed: pyembed.connect() opens a new one "
                                       "(or client.reconnect() this one)")
            self._calls += 1
            self._holder = threading.get_ident()
            try:
                if self._calls == 1:
                    self._reopen_lost()
                yield
            except psycopg.OperationalError as exc:
                if self._calls == 1 and (self._conn.closed or self._read_conn.closed):
                    raise lost_during("during the call", exc, ": what it wrote may or may not "
                                      "be stored; the next call opens a new connection") from exc
                raise
            finally:
                self._calls -= 1
                if not self._calls:
                    self._holder = None

    @property
    def conn(self) -> psycopg.Connection[Any]:
        """The client's connection, for your own statements and transactions. Once your code
        has it, a connection the server closes is not opened again silently (whatever you SET
        on it, a role, would be lost): that call is DatabaseNotReady, see reconnect()."""
        self._handed_out = self._handed_out or "client.conn"
        return self._conn

    @property
    def read_conn(self) -> psycopg.Connection[Any]:
        """Where searches run: a replica's connection, or `conn` (the primary); as `conn`."""
        self._handed_out = self._handed_out or "client.read_conn"
        return self._read_conn

    def reconnect(self) -> None:
        """Open new connections from the client's DSNs, acting as their login roles: after
        DatabaseNotReady for a connection that could not be opened again silently."""
        with self.turn:
            for conn in {id(c): c for c in (self._conn, self._read_conn)}.values():
                release(conn)
            shared = self._read_conn is self._conn
            self._conn = self._open(self._conninfo)
            self._identity = _identity(self._conn)
            if shared:
                self._read_conn = self._conn
            elif self._read_conninfo:
                self._read_conn = self._open(self._read_conninfo)
                self._read_identity = _identity(self._read_conn)
            self._handed_out = None
            self._closed = False

    @contextmanager
    def outside_turn(self) -> Iterator[None]:
        """For a provider call (a wait on HTTP, or on a local model) made inside a call of
        this client: the turn is given to other threads' calls meanwhile and taken back after,
        so that their searches do not wait on it. Kept when a transaction is open on the
        connection: another thread's statements would run inside it."""
        held = self._calls if self._holder == threading.get_ident() else 0
        busy = any(not c.closed and c.info.transaction_status != TransactionStatus.IDLE
                   for c in (self._conn, self._read_conn))
        if not held or busy or getattr(self._keeping, "turn", False):
            yield
            return
        self._calls, self._holder = 0, None
        for _ in range(held):
            self.turn.release()
        try:
            yield
        finally:
            for _ in range(held):
                self.turn.acquire()
            self._calls, self._holder = held, threading.get_ident()

    @contextmanager
    def _keep_turn(self) -> Iterator[None]:
        """Keep the turn across this thread's provider calls: a statement of the call runs on
        the connection beside them (a search's keyword ranking), which another thread's
        transaction must not take in."""
        before = getattr(self._keeping, "turn", False)
        self._keeping.turn = True
        try:
            yield
        finally:
            self._keeping.turn = before

    def _reopen_lost(self) -> None:
        shared = self._read_conn is self._conn
        if self._closed_by_server(self._conn):
            self._conn = self._reopen(self._conn, self._conninfo, self._identity)
            if shared:
                self._read_conn = self._conn
        if not shared and self._read_conninfo and self._closed_by_server(self._read_conn):
            self._read_conn = self._reopen(self._read_conn, self._read_conninfo,
                                           self._read_identity)

    def _reopen(self, old: psycopg.Connection[Any], info: str,
                identity: tuple[str, ...] | None) -> psycopg.Connection[Any]:
        """A new connection for one the server closed (or a parent process's, db.inherited), if
        it acts as the old one did: never silently as another role or tenant (DatabaseNotReady
        saying why, db.reopen)."""
        try:
            conn, _ = reopen(info, identity, "client", handed_out=self._handed_out, old=old,
                             autocommit=self._autocommit)
        except psycopg.OperationalError as exc:
            raise DatabaseNotReady("the database closed the connection and could not be "
                                   "reached again: " + " ".join(str(exc).split())[:300]
                                   ) from None
        _log.info("opened a new connection to the database: %s",
                  "the last one is the process's this one forked from" if inherited(old)
                  else "the server closed the last one")
        return conn

    @staticmethod
    def _closed_by_server(conn: psycopg.Connection[Any]) -> bool:
        """Whether `conn` is gone; DatabaseNotReady if a transaction was open on it (in this
        process: one a parent process opened is that process's, db.inherited)."""
        if inherited(conn) is not None:
            return True
        opened = not conn.closed and conn.info.transaction_status in (
            TransactionStatus.INTRANS, TransactionStatus.INERROR)
        if not lost(conn):
            return False
        if opened:
            raise DatabaseNotReady(
                "the connection to the database was lost inside a transaction opened on the "
                "client's connection, which the server rolled back: end that transaction, and "
                "the next call opens a new connection")
        return True

    def _open(self, info: str) -> psycopg.Connection[Any]:
        try:
            conn = db_connect(info, autocommit=self._autocommit)
        except psycopg.OperationalError as exc:
            raise DatabaseNotReady("the database closed the connection and could not be "
                                   "reached again: " + " ".join(str(exc).split())[:300]
                                   ) from None
        _log.info("opened a new connection to the database: the server closed the last one")
        return conn

    @_in_turn
    def embedder(self, model_key: str, *, truncate: bool = False) -> Embedder:
        """The embedder for a model key (built once, sharing this client's cache)."""
        if (model_key, truncate) not in self._embedders:
            spec = model_spec(self._conn, model_key)
            self._embedders[model_key, truncate] = Embedder(
                spec, cache=self.cache, truncate=truncate, meter=self._meter,
                on_error=error_counter(self._in_turn), around_call=self.outside_turn)
        return self._embedders[model_key, truncate]

    @_in_turn
    def reranker(self, name: str) -> Reranker:
        """The reranker called `name` (e.g. "voyage/rerank-2.5", "rerank-3.5"), built once,
        sharing this client's cache and meter; MissingAPIKey if its key is not set."""
        spec = reranker_spec(name)
        if spec.key not in self._rerankers:
            self._rerankers[spec.key] = Reranker(spec, cache=self.rerank_cache, meter=self._meter,
                                                 on_error=error_counter(self._in_turn),
                                                 around_call=self.outside_turn)
        return self._rerankers[spec.key]

    @property
    def current_corpus_id(self) -> int | None:
        """The corpus that this thread's provider calls are accounted to now (`billed_to`)."""
        return getattr(self._billed, "corpus_id", None)

    @contextmanager
    def billed_to(self, corpus_id: int | None) -> Iterator[None]:
        """Account the provider calls this thread makes inside to corpus `corpus_id`, and
        after it to what they were before. Scoped and per thread: a value left set after a
        call billed the next call for another corpus (a migration's backfill after a search)
        to the corpus searched, and one thread's to another thread's corpus."""
        before = self.current_corpus_id
        self._billed.corpus_id = corpus_id
        try:
            yield
        finally:
            self._billed.corpus_id = before

    def _meter(self, spec: Keyed, tokens: int) -> None:
        """Reserve a provider call for this session's tenant (refused over its limits)."""
        meter(self._in_turn, self.current_corpus_id)(spec, tokens)

    @_in_turn
    def models(self) -> list[ModelSpec]:
        """The models this database knows (pyembed.models): the built-in ones the schema seeds
        and every one registered, from SQL or Python."""
        return models.registered(self._conn)

    @_in_turn
    def register_model(self, spec: ModelSpec) -> str:
        """Register a model of your own (its provider must be one pyembed knows) in the
        database, for every client, `pyembed models` and SQL; returns its key. Registering the
        same key again with other settings is refused. The owner's (OwnerOnly otherwise): a
        key's row binds every tenant's corpora on it."""
        return models.register(self._conn, spec)

    @_in_turn
    def create_corpus(self, name: str, model_key: str = LOCAL_DEFAULT.key, description: str = "",
                      chunk_tokens: int = 200, chunk_overlap: int = 40,
                      storage: str = "vector", *, exist_ok: bool = False) -> Corpus:
        """A new corpus pinned to `model_key`; `storage` is vector (default), halfvec or binary
        (docs/index-tuning.md). With `exist_ok`, the corpus of that name when it has the same
        model key (else ModelMismatch) and chunking (else InvalidInput), so that a script
        creating its corpus can run again."""
        create_corpus(self._conn, name, model_key, description, chunk_tokens, chunk_overlap,
                      storage, exist_ok=exist_ok)
        self.wrote()
        return self.corpus(name)

    @_in_turn
    def index_status(self, corpus: str) -> list[index.IndexStatus]:
        """What serves the corpus's searches, per key: storage, HNSW parameters as built and as
        pyembed's rule would choose them now, ef_search, oversampling, index size."""
        return index.index_status(self._conn, corpus)

    @_in_turn
    def set_index_settings(self, corpus: str, **settings: int | None) -> dict[str, int]:
        """Override pyembed's rule for the corpus (m, ef_construction, ef_search, oversample;
        None: back to the rule). m and ef_construction apply at the next rebuild_index."""
        return index.set_index_settings(self._conn, corpus, **settings)

    @_in_turn
    def rebuild_index(self, corpus: str, storage: str | None = None) -> list[index.IndexStatus]:
        """Rebuild the corpus's HNSW index online (CONCURRENTLY, then swapped) with the
        parameters in force, optionally in another storage (vector, halfvec, binary)."""
        return index.rebuild_index(self._conn, corpus, storage)

    @_in_turn
    def corpus(self, name: str) -> Corpus:
        return Corpus(self, corpus_info(self._conn, name))

    @_in_turn
    def corpora(self) -> list[CorpusInfo]:
        return list_corpora(self._conn)

    @_in_turn
    def drop_corpus(self, name: str) -> None:
        """Drop the corpus with its documents and vectors (UnknownCorpus if there is none)."""
        drop_corpus(self._conn, name)

    @_in_turn
    def wrote(self) -> None:
        """Note that this client has written: its next search on a replica waits until the
        replica has replayed it (read your own writes)."""
        if self._read_conn is not self._conn:
            row = self._conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            self._written_lsn = row[0] if row else None

    def reader(self) -> psycopg.Connection[Any]:
        """The connection searches run on (handed to your code, as `read_conn`), once it has
        what this client wrote."""
        self._handed_out = self._handed_out or "client.reader()"
        return self._reader()

    @_in_turn
    def _reader(self) -> psycopg.Connection[Any]:
        """The connection searches run on, once it has what this client wrote (a replica that
        has not replayed it within `max_replica_wait` seconds is ReadOnlyReplica)."""
        if self._read_conn is self._conn or self._written_lsn is None:
            return self._read_conn
        deadline = time.monotonic() + self.max_replica_wait
        while True:
            row = self._read_conn.execute(
                "SELECT coalesce(pg_last_wal_replay_lsn() >= %s::pg_lsn, true), "
                "pg_wal_lsn_diff(%s::pg_lsn, pg_last_wal_replay_lsn())",
                (self._written_lsn, self._written_lsn)).fetchone()
            if row is None or row[0]:
                self._written_lsn = None
                return self._read_conn
            if time.monotonic() >= deadline:
                raise ReadOnlyReplica(
                    f"the read replica has not replayed this client's last write after "
                    f"{self.max_replica_wait:g} s ({int(row[1] or 0):,} bytes of WAL behind): "
                    f"search the primary, or retry when the replica has caught up")
            time.sleep(0.02)

    def close(self) -> None:
        """Write the cache counts and close the connections (none is opened again for it)."""
        with self.turn:
            if self.cache is not None and not lost(self._conn):
                try:
                    self.cache.flush()
                except psycopg.OperationalError:
                    pass  # counts only: lost with the connection
            release(self._conn)
            release(self._read_conn)
            # the SDKs' HTTP connections, else kept until the client is collected
            for embedder in self._embedders.values():
                embedder.provider.close()
            for reranker in self._rerankers.values():
                reranker.provider.close()
            self._closed = True

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Corpus:
    """One corpus, pinned to its model key."""

    def __init__(self, client: Client, info: CorpusInfo) -> None:
        self.client = client
        self.info = info

    def _reserve(self, spec: Keyed, tokens: int) -> None:
        """Reserve one provider call made for this corpus outside an Embedder or Reranker
        (rag.answer's Claude call): accounted in pyembed.usage, RateLimited over the tenant's
        limits."""
        with self.client.billed_to(self.info.corpus_id):
            self.client._meter(spec, tokens)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def model_key(self) -> str:
        return self.info.model_key

    @property
    def turn(self) -> threading.RLock:
        """The client's turn (Client.turn): its corpora's calls take turns with its own."""
        return self.client.turn

    def call(self) -> Any:
        """One call of the client (Client.call)."""
        return self.client.call()

    @_in_turn
    def serving_key(self, query: str) -> str:
        """The model key that serves this query now: during a migration's traffic shift, the
        target key for a stable share of queries (by hash), else the active key."""
        return route(PsycopgExecutor(self.client._conn), self.name, query).key

    @_in_turn
    def add(self, documents: Iterable[Document | tuple[str, str] | Mapping[str, Any]], *,
            truncate: bool = False,
            translate: Callable[[str], str] | None = None) -> AddReport:
        """Chunk, embed (with the corpus's own model) and store documents (`Document`s,
        (id, text[, metadata]) tuples or mappings with id, text[, metadata]; each id once);
        unchanged ones (same text and metadata) are skipped, changed ones replaced.

        With `truncate`, each document stays one chunk up to `chunk_tokens` and its embedding
        reads only the model's first `max_tokens` tokens; otherwise chunks are split to fit.
        With `translate`, each chunk is embedded as `translate(chunk)` and stored as written.
        """
        docs = [_as_document(d) for d in documents]
        prepared = self.prepare(docs, truncate=truncate, translate=translate)
        with (self.bulk_load() if prepared.chunks >= index.BULK_LOAD_ROWS
              else nullcontext()):
            for attempt in (1, 2):
                # The keys served are read, then embedded for: a migration step committed in
                # between (complete, rollback) makes the write fail; read the keys again, and
                # embed (from the cache, mostly) for the keys now served.
                if attempt == 2:
                    prepared = self.prepare(docs, truncate=truncate, translate=translate)
                try:
                    report = self.write(prepared)
                    break
                except ModelMismatch:
                    if attempt == 2:
                        raise
        if report.chunks:
            self.client.wrote()
        return report

    @_in_turn
    def delete(self, document_ids: Sequence[str]) -> int:
        """Delete these documents (their chunks, vectors, keyword postings and queued work with
        them); returns how many were deleted (an id the corpus has no document of is skipped).
        The one way to delete (pyembed.delete_documents from SQL): the application role holds no
        DELETE on pyembed's tables."""
        deleted = delete_documents(self.client._conn, self.name, document_ids)
        if deleted:
            self.client.wrote()
        return deleted

    def bulk_load(self) -> AbstractContextManager[bool]:
        """Around a load of many documents (several `add` calls, `pyembed ingest`): if the
        corpus's key has no vectors yet, its HNSW index is built once, when the block ends,
        instead of each vector inserted into it (index.bulk_load; searches meanwhile scan
        exactly). Yields whether the build was deferred. `add` does it alone for a write of
        index.BULK_LOAD_ROWS chunks or more."""
        return index.bulk_load(self.client._conn, self.name, self.call)

    @_in_turn
    def prepare(self, documents: Iterable[Document | tuple[str, str] | Mapping[str, Any]], *,
                truncate: bool = False,
                translate: Callable[[str], str] | None = None,
                embedded: Callable[[int], None] | None = None) -> PreparedAdd:
        """The first half of `add`, on the client's connection: which documents changed, their
        chunks and their vectors for the keys the corpus serves now. `write` stores them (on
        this connection or another of the same role), while the next batch is prepared.
        `embedded`, if given, is told the number of chunks embedded so far after each group of
        them but the last (a long document's progress, before its write)."""
        self.info = corpus_info(self.client._conn, self.name)  # a migration may have begun
        docs: dict[str, Document] = {}
        for d in map(_as_document, documents):
            check_document_id(d.id)
            if d.id in docs:  # one would be dropped unseen: which is meant?
                raise InvalidInput(f"document id {d.id!r} is given twice")
            docs[d.id] = d
        for d in docs.values():
            check_text(d.text, f"document {d.id!r}")
            check_metadata(d.metadata, f"document {d.id!r}: metadata")
        hashes = {i: document_hash(d.text, d.metadata) for i, d in docs.items()}
        metadata = {i: json.dumps(d.metadata, default=str) for i, d in docs.items()}
        old, most_bytes, most_chunks = document_hashes(self.client._conn, self.info.corpus_id,
                                                       metadata)
        todo = [d for i, d in docs.items() if old.get(i) != hashes[i]]
        embedder = self.client.embedder(self.model_key, truncate=truncate)
        target = self.info.target_model_key
        changed = [DocumentChunks(d.id, hashes[d.id], d.metadata, Spans(d.text),
                                  metadata_json=metadata[d.id]) for d in todo]
        vectors: list[np.ndarray] = []
        also: dict[str, list[np.ndarray]] | None = {target: []} if target else None

        # The chunks of every changed document, in order, in groups of EMBED_CHUNKS (a group may
        # hold several documents' chunks, or part of one's), cut to the model's tokens; all of
        # them before any is embedded: a chunk the chunks table refuses for its bytes refuses
        # its document before a provider is paid (chunks_refused).
        groups: list[list[Span]] = []
        group: list[Span] = []
        characters = 0
        for n, d in enumerate(todo):
            for start, end in iter_spans(d.text, self.info.chunk_tokens, self.info.chunk_overlap):
                if group and (len(group) >= EMBED_CHUNKS
                              or characters + end - start > EMBED_CHARACTERS):
                    groups.append(group)
                    group, characters = [], 0
                group.append((n, d.text, start, end))
                characters += end - start
        groups.append(group)
        if not truncate:
            groups = [fit_spans(g, embedder.max_text_tokens, embedder.provider.count_tokens)
                      for g in groups if g]
        longest: dict[str, int] = {}
        for n, text, start, end in (span for g in groups for span in g):
            # (at most 4 bytes a character: only a chunk that long is encoded to count them)
            if 4 * (end - start) > most_bytes and (
                    size := len(text[start:end].encode("utf-8", "surrogatepass"))) > most_bytes:
                longest[todo[n].id] = max(size, longest.get(todo[n].id, 0))
        if longest:
            chunks_refused(self.client._conn, longest)
        # One document's bound (its corpus's max_document_chunks), asked before any embedding.
        counts = Counter(span[0] for g in groups for span in g)
        if any(c > most_chunks for c in counts.values()):
            too_big(self.client._conn, self.info.corpus_id,
                    {todo[n].id: (c, len(todo[n].text.encode("utf-8", "surrogatepass")))
                     for n, c in counts.items() if c > most_chunks})

        done = 0
        groups = [g for g in groups if g]
        with self.client.billed_to(self.info.corpus_id):
            for number, group in enumerate(groups, 1):
                texts = [text[start:end] for _, text, start, end in group]
                for n, _, start, end in group:
                    cast(Spans, changed[n].chunks).append(start, end)
                if translate:
                    texts = [translate(t) for t in texts]
                vectors.append(embedder.embed(texts, InputType.DOCUMENT))
                if target and also is not None:
                    also[target].append(self.client.embedder(target, truncate=True).embed(texts))
                done += len(texts)
                if embedded is not None and number < len(groups):
                    embedded(done)
        updated = sum(1 for d in todo if d.id in old)
        return PreparedAdd(self.info, changed, vectors, also, len(todo) - updated, updated,
                           len(docs) - len(todo))

    def write(self, prepared: PreparedAdd,
              conn: psycopg.Connection[Any] | None = None) -> AddReport:
        """The second half of `add`: store what `prepare` made, in one transaction on `conn`
        (default: the client's). ModelMismatch if the keys the corpus serves changed since
        (prepare again); InvalidInput if the database refuses a document (nothing stored)."""
        own = conn is None or conn is self.client._conn  # another connection needs no turn
        if not prepared.chunks:
            return AddReport(prepared.added, prepared.updated, prepared.skipped, 0)
        with self.call() if own else nullcontext():
            # What the database found when it wrote, not what prepare read: a concurrent add
            # of the same documents stored them meanwhile, and this one leaves them alone.
            written = write_prepared(conn or self.client._conn, prepared.info,
                                     prepared.documents, prepared.info.model_key,
                                     prepared.vectors, also=prepared.also, only_changed=True)
        return AddReport(written.added, written.updated, prepared.skipped + written.unchanged,
                         len(written.ids))

    @_in_turn
    def search(self, query: str | Sequence[float] | np.ndarray, k: int = 10,
               filter: Mapping[str, Any] | None = None, model_key: str | None = None, *,
               mode: str = "vector", translate: Callable[[str], str] | None = None,
               group: str = "document", fusion: str | None = None, alpha: float | None = None,
               rerank: str | None = None, rerank_candidates: int | None = None
               ) -> list[Hit]:
        """The k documents nearest the query, each with its best chunk as the passage
        (group='chunk': the k nearest chunks, several of a document may come). Text is embedded
        with the corpus's model; a vector must say its key. mode: 'vector', 'keyword' (BM25,
        text only) or 'hybrid' (text only), fused by `fusion`: 'rrf' (reciprocal rank) or
        'relative' (min-max normalised scores, alpha * vector + (1 - alpha) * keyword, alpha
        0.5 unless given); None is the database's default. With `rerank` (a reranker such as
        "voyage/rerank-2.5" or "cohere/rerank-v3.5"), the best `rerank_candidates` hits (at
        least k: fewer is InvalidInput; default 50, or k if larger) are reordered by it and
        the best k returned, each with its `rerank_score` and `reranker`. Each search is
        recorded in pyembed.query_log (phase timings) unless the client has log_queries off."""
        check_k(k)
        log = self.client.log_queries
        options = Options(group, fusion, alpha)
        _reranks(rerank, rerank_candidates)
        if rerank is not None:
            found = self._reranked(query, k, filter, model_key, mode=mode, translate=translate,
                                   options=options, rerank=rerank,
                                   rerank_candidates=rerank_candidates)
        else:
            found = self._retrieved(query, k, filter, model_key, mode=mode,
                                    translate=translate, options=options, log=log)
        # A text search records itself, unless reranked: then the record is the whole search.
        if log and (rerank is not None or not isinstance(query, str)):
            self.log_query(mode, k, found.timings, cache_hit=found.cache_hit,
                           model_key=found.model_key)
        return found.hits

    @_in_turn
    def retrieve(self, query: str | Sequence[float] | np.ndarray, k: int = 10,
                 filter: Mapping[str, Any] | None = None, model_key: str | None = None, *,
                 mode: str = "vector", translate: Callable[[str], str] | None = None,
                 group: str = "document", fusion: str | None = None, alpha: float | None = None,
                 rerank: str | None = None, rerank_candidates: int | None = None
                 ) -> Retrieval:
        """`search` without the query log: the hits, the key that served them and timings
        (with `rerank`, rerank_ms too)."""
        check_k(k)
        options = Options(group, fusion, alpha)
        _reranks(rerank, rerank_candidates)
        if rerank is not None:
            return self._reranked(query, k, filter, model_key, mode=mode, translate=translate,
                                  options=options, rerank=rerank,
                                  rerank_candidates=rerank_candidates)
        return self._retrieved(query, k, filter, model_key, mode=mode, translate=translate,
                               options=options, log=False)

    def _retrieved(self, query: str | Sequence[float] | np.ndarray, k: int,
                   filter: Mapping[str, Any] | None, model_key: str | None, *, mode: str,
                   translate: Callable[[str], str] | None, options: Options,
                   log: bool) -> Retrieval:
        try:
            return self._retrieve(query, k, filter, model_key, mode=mode, translate=translate,
                                  options=options, log=log)
        except UnknownCorpus:
            if self.client._read_conn is self.client._conn:
                raise
            corpus_info(self.client._conn, self.name)  # UnknownCorpus if the primary has none
            raise ReadOnlyReplica(f"corpus {self.name!r} is not on the read replica yet (it "
                                  f"lags behind the primary): search the primary, or retry "
                                  f"when the replica has caught up") from None

    def _reranked(self, query: str | Sequence[float] | np.ndarray, k: int,
                  filter: Mapping[str, Any] | None, model_key: str | None, *, mode: str,
                  translate: Callable[[str], str] | None, options: Options, rerank: str,
                  rerank_candidates: int | None) -> Retrieval:
        """The search's best candidates, reordered by the reranker `rerank`."""
        if not isinstance(query, str):
            raise InvalidInput("rerank needs the query text, not a vector")
        depth = candidates(k, rerank_candidates)  # as in SQL: before the reranker's key
        reranker = self.client.reranker(rerank)  # a missing key fails before any search
        found = self._retrieved(query, depth, filter, model_key,
                                mode=mode, translate=translate, options=options, log=False)
        started = time.perf_counter()
        with self.client.billed_to(self.info.corpus_id):
            hits = reranker.rerank(query, found.hits, k)
        took = _ms(started, time.perf_counter())
        total = found.timings.get("total_ms")
        return dataclasses.replace(found, hits=hits, timings={
            **found.timings, "rerank_ms": took,
            "total_ms": None if total is None else round(total + took, 3)})

    def _retrieve(self, query: str | Sequence[float] | np.ndarray, k: int,
                  filter: Mapping[str, Any] | None, model_key: str | None, *, mode: str,
                  translate: Callable[[str], str] | None, options: Options,
                  log: bool) -> Retrieval:
        started = time.perf_counter()
        options.check(mode)
        if isinstance(query, str) and model_key is not None and (
                vector_key(model_key) not in (self.info.model_key, self.info.target_model_key)):
            # A key the text is not embedded with was ignored: the caller believed it searched
            # with that model.
            raise ModelMismatch(f"corpus {self.name} embeds a text query with its own model "
                                f"{self.info.model_key}, not {model_key}: leave model_key out, "
                                "or pass a vector made by that model")
        if not isinstance(query, str):
            model_key = vector_key(model_key)
            if mode != "vector":
                raise InvalidInput(f"{mode} search needs the query text, not a vector")
            found = search(self.client._reader(), self.name, query,
                           model_key, k, filter, group=options.group or "document")
            done = time.perf_counter()
            return Retrieval(found, model_key, None, {"embed_ms": None,
                                                     "search_ms": _ms(started, done),
                                                     "total_ms": _ms(started, done)})
        by_text = query_search(self, query, k, filter, mode, translate=translate,
                               options=options, log=log)
        return Retrieval(by_text.hits, by_text.model_key, by_text.cache_hit, by_text.timings)

    @_in_turn
    def log_query(self, kind: str, k: int, timings: Mapping[str, float | None], *,
                  generated: bool = False, cache_hit: bool | None = None,
                  model_key: str | None = None) -> bool:
        """Record one query in pyembed.query_log; False if it was not: a warning if that
        failed, none in a read-only transaction (a replica), where the record is skipped as
        search_query's is (README, Read replicas). A search never fails for its log line."""
        conn = self.client._conn
        try:
            with conn.transaction():
                row = conn.execute(
                    "SELECT pyembed.record_search(%s::integer, %s::text, %s::text, %s::integer, "
                    "%s::boolean, %s::real, %s::real, %s::real, %s::real)",
                    (self.info.corpus_id, model_key or "-", kind, k, cache_hit,
                     timings.get("embed_ms"), timings.get("search_ms"),
                     timings.get("generate_ms") if generated else None,
                     timings.get("total_ms"))).fetchone()
        except psycopg.Error as exc:
            _log.warning("could not record the query in pyembed.query_log: %s",
                         " ".join(str(exc).split()) or type(exc).__name__)
            return False
        if not (row and row[0]):
            _log.debug("query not recorded in pyembed.query_log: a read-only transaction")
            return False
        return True


def _reranks(rerank: str | None, rerank_candidates: int | None) -> None:
    """A rerank depth without a reranker was ignored, -1 too: InvalidInput naming it."""
    if rerank is None and rerank_candidates is not None:
        raise InvalidInput(f"rerank_candidates ({rerank_candidates}) needs rerank, the "
                           "reranker that reorders them")


def _ms(a: float, b: float) -> float:
    return round(max(b - a, 0.0) * 1000.0, 3)


def _as_document(d: Document | tuple[str, str] | Mapping[str, Any]) -> Document:
    """A Document, an (id, text) or (id, text, metadata) tuple, or a mapping with "id",
    "text" and optionally "metadata"; anything else is InvalidInput, never a guess (a
    metadata element dropped, an id of None stored as 'None'). Checked in prepare."""
    if isinstance(d, Document):
        return d
    if isinstance(d, tuple | list) and len(d) in (2, 3):
        return Document(_document_id(d[0]), d[1], _metadata(d[2] if len(d) == 3 else None))
    if isinstance(d, Mapping) and "id" in d and "text" in d and set(d) <= _DOCUMENT_KEYS:
        return Document(_document_id(d["id"]), d["text"], _metadata(d.get("metadata")))
    shape = (f"a {type(d).__name__} of {len(d)}" if isinstance(d, tuple | list)
             else f"a mapping with keys {sorted(map(str, d))[:5]}" if isinstance(d, Mapping)
             else f"a {type(d).__name__}")
    raise InvalidInput("a document is a pyembed.Document, an (id, text[, metadata]) tuple or a "
                       f"mapping with 'id', 'text' and optionally 'metadata', not {shape}")


_DOCUMENT_KEYS = {"id", "text", "metadata"}
"""A mapping's keys: another ("title", "meta") would be dropped unseen, or taken for metadata."""


def _metadata(value: Any) -> Any:
    """No metadata (None) as an empty object; anything else as given, for check_metadata to
    accept or refuse (an empty list or string is not an object)."""
    return {} if value is None else value


def _document_id(value: Any) -> Any:
    """An integer id as its digits (as `pyembed ingest` reads one); anything else as given,
    for check_document_id to accept or refuse."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(check_whole_number(value, "a document id"))
    return value


def connect(dsn: str | None = None, *, read_dsn: str | None = None, use_cache: bool = True,
            log_queries: bool = True) -> Client:
    """A client for the database at `dsn` ($PYEMBED_DSN, else the local cluster). Searches run
    on `read_dsn` ($PYEMBED_READ_DSN) when given: a replica, or a libpq multi-host DSN such as
    `host=a,b target_session_attrs=prefer-standby load_balance_hosts=random`; everything
    that writes (documents, usage, the cache, the query log) goes to `dsn`."""
    read_dsn = read_dsn or os.environ.get(READ_DSN_ENV) or None
    try:
        conn = db_connect(dsn, autocommit=True)
    except psycopg.OperationalError as exc:
        raise unreachable(exc) from None
    try:
        read_conn = db_connect(read_dsn, autocommit=True) if read_dsn else None
    except psycopg.OperationalError as exc:
        conn.close()
        raise DatabaseNotReady("no server of the read DSN answered (every replica down?): "
                               + " ".join(str(exc).split())[:300]) from None
    except BaseException:
        conn.close()
        raise
    try:
        client = Client(conn, read_conn=read_conn, use_cache=use_cache, log_queries=log_queries)
    except BaseException:
        conn.close()
        if read_conn is not None:
            read_conn.close()
        raise
    client._handed_out = None  # its connections are its own
    return client


