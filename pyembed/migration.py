"""Changing a corpus's embedding model as a guarded, observable migration.

plan -> start -> backfill -> validate -> shift 10/50/100 -> complete (-> cleanup), with rollback
at any step before complete. Searches keep answering throughout: until `shift`, every search is
served by the old key; during it, a stable share of queries (by query hash) by the new one.
The steps run as the owner (a DBA); each is recorded in pyembed.migration_events.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg

from .client import Client, in_client_turn
from .corpora import model_spec
from .dbcall import count, translated
from .errors import (
    DatabaseNotReady,
    InvalidInput,
    MigrationError,
    PyembedError,
    shown,
    stopped,
)
from .evaluation import HITS_PER_DOCUMENT, EvalQuery, KeyScore, eval_queries, evaluate, overlap
from .index import build_index_online, check_storage, drop_index_online, one_build
from .limits import embedding_batch, text_tokens
from .models import InputType
from .text import estimate_tokens, number
from .vectors import copy_vectors

# Typical published limits of each provider's first paid tier, for the time estimate only.
REQUESTS_PER_MINUTE = {"voyage": 300, "openai": 3000, "cohere": 2000}
TOKENS_PER_MINUTE = {"voyage": 1_000_000, "openai": 1_000_000, "cohere": 1_000_000}
HNSW_M = 16
PAGE = 8192
_HNSW_PAGE_SPACE = PAGE - 24 - 8  # a page's header and pgvector's HnswPageOpaqueData
_HNSW_ELEMENT_HEADER = 72  # HnswElementTupleData before its value: heap tids, neighbour tid
_LINE_POINTER, _ITEM_POINTER = 4, 6


def _maxalign(n: int) -> int:
    return (n + 7) & ~7


def _hnsw_index_bytes(vectors: int, dims: int, index_type: str, m: int = HNSW_M) -> int:
    """Bytes of an HNSW index of `vectors`, from the pages pgvector's build fills: its metapage,
    and each vector's element tuple (header and value) beside its neighbour tuple (2m slots on
    layer 0, m on each upper layer, m/(m-1) of them on average) on one page of PAGE bytes while both fit,
    so that a page holds whole pairs and the rest of it stays empty; a pair that fits no page
    takes two. `index_type`: vector (float32), halfvec (float16) or bit (the sign bits)."""
    value = {"vector": 4 * dims + 8, "halfvec": 2 * dims + 8, "bit": (dims + 7) // 8 + 8}[
        index_type]
    element = _maxalign(_HNSW_ELEMENT_HEADER + value)
    neighbours = _maxalign(4 + (2 * m + -(-m // (m - 1))) * _ITEM_POINTER)
    pair = element + neighbours + 2 * _LINE_POINTER
    room = _HNSW_PAGE_SPACE - _LINE_POINTER  # (a page keeps room for one more line pointer)
    pages = -(-vectors // (room // pair)) if pair <= room else 2 * vectors
    return PAGE * (1 + pages) if vectors else 0


def _index_type(dims: int, storage: str = "vector") -> str:
    """The type an HNSW index of `storage` holds its values as (pyembed._index_build_settings'
    rule): bit for binary, halfvec for halfvec and past pgvector's 2,000-dimension limit of
    vector, else vector."""
    return "bit" if storage == "binary" else (
        "halfvec" if storage == "halfvec" or dims > 2000 else "vector")


def storage_bytes(vectors: int, dims: int, storage: str = "vector") -> tuple[int, int]:
    """(raw, with HNSW) bytes for `vectors` of `dims` dimensions in `storage`: every storage
    keeps the float32 vectors (4 bytes a dimension plus an 8-byte header), and the HNSW index
    holds each as its storage's value (`_index_type`) in the pages `_hnsw_index_bytes` counts
    (m = 16)."""
    for value, what, low in ((vectors, "vectors", 0), (dims, "dims", 1)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
            raise InvalidInput(f"{what} must be a whole number of at least {low}, not {shown(value)}")
    check_storage(storage)
    raw = vectors * (4 * dims + 8)
    return raw, raw + _hnsw_index_bytes(vectors, dims, _index_type(dims, storage))


@dataclass(frozen=True)
class Plan:
    corpus: str
    from_key: str
    to_key: str
    documents: int
    chunks: int
    tokens: int
    api_calls: int
    hours: float
    cost_usd: float | None
    storage_before: tuple[int, int]
    storage_after: tuple[int, int]


@in_client_turn
def plan(client: Client, corpus: str, to_key: str, storage: str | None = None) -> Plan:
    """What a migration of `corpus` to `to_key` will take: calls, time, cost, storage (the
    target key's in `storage`, default the corpus's, beside the active key's during it).
    Refuses (MigrationError, UnknownModel, UnknownCorpus) a migration that `start` would
    refuse."""
    if storage is not None:
        check_storage(storage)
    with translated():  # read without locking the corpus (a plan writes nothing): a replica
        client._conn.execute("SELECT pyembed._need_target(c, pyembed._migration_of(c), %s) "
                             "FROM pyembed.lookup_corpus(%s) c", (to_key, corpus))
    info = client.corpus(corpus).info
    old, new = model_spec(client._conn, info.model_key), model_spec(client._conn, to_key)
    documents = client._conn.execute("SELECT count(*) FROM pyembed.documents WHERE corpus_id = %s",
                                    (info.corpus_id,)).fetchone()[0]  # type: ignore[index]
    tokens = chunks = 0
    # the embedder's bounds (pyembed.limits): what a backfill's requests will carry
    per_text, (batch_texts, batch_tokens) = text_tokens(new), embedding_batch(new)
    with client._conn.cursor(name="pyembed_plan") if not client._conn.autocommit else \
            client._conn.cursor() as cur:
        cur.execute("SELECT content FROM pyembed.chunks WHERE corpus_id = %s", (info.corpus_id,))
        for (content,) in cur:
            chunks += 1
            tokens += min(estimate_tokens(content), per_text)
    calls = max(math.ceil(chunks / batch_texts), math.ceil(tokens / batch_tokens)) if chunks else 0
    rpm = REQUESTS_PER_MINUTE.get(new.provider)
    tpm = TOKENS_PER_MINUTE.get(new.provider)
    minutes = max(calls / rpm if rpm else 0, tokens / tpm if tpm else 0)
    if new.provider in ("local", "fake") and chunks:
        # No service limit: the rate is this machine's; time a sample (no cache).
        from .embedder import Embedder

        sample = [r[0] for r in client._conn.execute(
            "SELECT content FROM pyembed.chunks WHERE corpus_id = %s LIMIT 32",
            (info.corpus_id,))]
        t0 = time.perf_counter()
        Embedder(new, truncate=True, around_call=client.outside_turn).embed(
            sample, InputType.DOCUMENT)
        minutes = chunks / (len(sample) / max(time.perf_counter() - t0, 1e-6)) / 60
    cost = tokens / 1e6 * new.price_per_mtok if new.price_per_mtok is not None else None
    before = storage_bytes(chunks, old.dimensions, info.storage)
    target = storage_bytes(chunks, new.dimensions, storage or info.storage)
    return Plan(corpus, old.key, new.key, int(documents), chunks, tokens, calls, minutes / 60, cost,
                before, (before[0] + target[0], before[1] + target[1]))


def _call(client: Client, fn: str, *args: Any) -> Any:
    with translated():
        row = client._conn.execute(f"SELECT pyembed.{fn}({', '.join(['%s'] * len(args))})",
                                  args).fetchone()
    return row[0] if row else None


@in_client_turn
def start(client: Client, corpus: str, to_key: str, storage: str | None = None) -> int:
    """Pin a target key next to the active one: new and changed chunks are embedded for both.
    `storage` is the target key's (default: the corpus's), the corpus's once complete."""
    return int(_call(client, "migration_start", corpus, to_key, storage))


@dataclass
class BackfillReport:
    """What a backfill did: texts `embedded` (what the provider was asked for), vectors
    `written`, `skipped`: embedded, but not written, their chunk changed or deleted since
    it was read (its new text is queued for both keys, the worker's to embed), and `resumed`."""

    embedded: int
    seconds: float
    remaining: int
    written: int = 0
    skipped: int = 0
    resumed: int = 0
    """Chunks that had their vector for the target key when it began: an earlier run's, stopped
    (this one resumed after them), or a write's since the migration started."""

    @property
    def rate(self) -> float:
        """Vectors written per second."""
        return self.written / self.seconds if self.seconds else 0.0


MISSING = """SELECT ch.chunk_id, ch.content, ch.content_hash FROM pyembed.chunks ch
 WHERE ch.corpus_id = %(corpus_id)s AND ch.chunk_id > %(after)s
   AND NOT EXISTS (SELECT FROM pyembed.vectors v WHERE v.corpus_id = ch.corpus_id
                     AND v.chunk_id = ch.chunk_id AND v.model_key = %(key)s)
 ORDER BY ch.chunk_id LIMIT %(limit)s"""


@in_client_turn
def backfill(client: Client, corpus: str, *, batch_size: int | None = None,
             rate: float | None = None, truncate: bool = True,
             progress: Callable[[int, int], None] | None = None) -> BackfillReport:
    """Embed every chunk that has no vector for the target key yet, a committed batch at a
    time (a crash loses at most one batch; a rerun resumes), at most `rate` texts/s; then
    build the shadow index and mark the step done. A batch_size outside the range of a model's
    batch (it stands for max_batch), or a rate that is not a number above 0, is InvalidInput
    (None: the model's batch, no limit). `progress` is told the chunks handled (written or
    skipped) of the total missing at the start."""
    if batch_size is not None:
        row = client._conn.execute("SELECT pyembed._setting_range('max_batch')").fetchone()
        low, high = (int(bound) for bound in str(row[0] if row else "").split(".."))
        count(batch_size, "batch_size", (low, high))
    if rate is not None and not (isinstance(rate, int | float) and not isinstance(rate, bool)
                                 and math.isfinite(rate) and rate > 0):
        raise InvalidInput(f"rate must be a number of texts per second above 0, got {rate}")
    info = client.corpus(corpus).info
    if info.target_model_key is None:
        raise MigrationError(f"corpus {corpus} has no migration in progress: "
                             "pyembed migrate start first")
    key = info.target_model_key
    embedder = client.embedder(key, truncate=truncate)
    size = batch_size or embedder.spec.max_batch
    total, resumed = client._conn.execute(
        "SELECT count(*) FILTER (WHERE NOT EXISTS (SELECT FROM pyembed.vectors v "
        "WHERE v.corpus_id = ch.corpus_id AND v.chunk_id = ch.chunk_id "
        "AND v.model_key = %(k)s)), count(*) FROM pyembed.chunks ch WHERE corpus_id = %(c)s",
        {"c": info.corpus_id, "k": key}).fetchone()  # type: ignore[misc]
    resumed -= total
    # One index build of the corpus at a time (the target's, at the end): index.one_build.
    started = time.perf_counter()
    done, written, after = 0, 0, 0
    with one_build(client._conn, info.corpus_id, corpus):
        try:
            while True:
                rows = client._conn.execute(MISSING, {"corpus_id": info.corpus_id, "after": after,
                                                     "key": key, "limit": size}).fetchall()
                if not rows:
                    break
                with client.billed_to(info.corpus_id):
                    vectors = embedder.embed([r[1] for r in rows], InputType.DOCUMENT)
                written += len(_write(client, info.corpus_id, key, rows, vectors))
                done += len(rows)
                after = rows[-1][0]
                if progress:
                    progress(done, total)
                if rate:
                    ahead = done / rate - (time.perf_counter() - started)
                    if ahead > 0:
                        time.sleep(ahead)
            _build_index(client, info.corpus_id, key)
            _call(client, "migration_backfilled", corpus)
        except BaseException as exc:  # the database gone, a provider's error, Ctrl-C
            ended = _ended(client, corpus, key) if isinstance(exc, PyembedError) else None
            if ended:  # a rerun could not resume: the step is another session's now
                raise MigrationError(f"{ended} while this backfill ran: it stopped, having "
                                     f"written {written} vectors for {key} (pyembed migrate "
                                     f"status {corpus} shows the step)") from None
            raise stopped(  # noqa: B904
                exc, corpus, "backfill",
                f"backfill stopped with {resumed + written} of {resumed + total} chunks "
                f"backfilled ({written} by this run); running it again resumes: the chunks "
                "backfilled are skipped")
    return BackfillReport(done, time.perf_counter() - started, 0, written, done - written,
                          resumed)


def _ended(client: Client, corpus: str, key: str) -> str | None:
    """How the migration of `corpus` to `key` ended, if it no longer targets `key`: another
    session rolled it back or completed it (the write of a rolled-back key's vectors is a key
    mismatch, the step's end 'no migration in progress'), or started another; else None."""
    try:
        info = client.corpus(corpus).info
    except (PyembedError, psycopg.Error):  # (the corpus dropped, the connection lost)
        return None
    if info.target_model_key == key:
        return None
    if info.model_key == key:
        return f"the migration of corpus {corpus} to {key} was completed by another session"
    if info.target_model_key is None:
        return f"the migration of corpus {corpus} to {key} was rolled back by another session"
    return (f"the migration of corpus {corpus} to {key} was rolled back and another, to "
            f"{info.target_model_key}, started by another session")


def _build_index(client: Client, corpus_id: int, key: str) -> None:
    """Build the shadow index CONCURRENTLY (writes to other corpora go on); an invalid one
    left by an interrupted build is dropped and built again. Its errors are pyembed's classes
    (UnknownCorpus for a corpus dropped meanwhile), as the batches' are."""
    with translated():
        build_index_online(client._conn, corpus_id, key)


def _write(client: Client, corpus_id: int, key: str, rows: Sequence[Any],
           vectors: np.ndarray) -> list[int]:
    """The chunk ids written: only rows whose text is unchanged are; a changed chunk is queued
    for both keys."""
    with translated(), client._conn.transaction(), client._conn.cursor() as cur:
        return copy_vectors(cur, corpus_id, [r[0] for r in rows], key, vectors, [r[2] for r in rows],
                     only_current=True)


@dataclass(frozen=True)
class Validation:
    """A validation's verdict and what it rests on: `queries` evaluation queries, fewer than
    `min_queries` only when `forced`."""

    queries: int
    old: KeyScore
    new: KeyScore
    overlap: float
    max_drop: float
    passed: bool
    min_queries: int = 0
    forced: bool = False

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _score(client: Client, corpus: str, key: str, evals: list[EvalQuery],
           k: int) -> tuple[KeyScore, list[list[str]]]:
    """Score `key` on `evals` with the search that serves the corpus."""
    from .search import search

    def rank(vectors: npt.NDArray[np.float32], hits: int) -> list[list[str]]:
        return [[h.document_id for h in search(client._conn, corpus, v, key, hits)]
                for v in vectors]

    return evaluate(client.embedder(key), evals, rank, k)


MAX_K = 1000 // HITS_PER_DOCUMENT
"""The largest k `validate` takes: a search returns at most 1,000 hits, and the evaluation asks
for k * HITS_PER_DOCUMENT of them."""


@in_client_turn
def validate(client: Client, corpus: str, *, k: int = 10, max_drop: float = 0.02,
             force: bool = False) -> Validation:
    """Run the corpus's evaluation queries on the old and new keys; refuse promotion when the
    new key's nDCG@k or Recall@k is more than `max_drop` (0..1, as the scores are) below the
    old key's. The arguments are checked before anything runs: a failed validation closes the
    gate and takes back the traffic already shifted, which a typo must not do. A corpus with
    fewer evaluation queries than `pyembed.min_eval_queries()` is refused before anything runs
    too, unless `force` (the report records it)."""
    k = count(k, "k", (1, MAX_K))
    max_drop = number(max_drop, "max_drop", 0.0, 1.0)
    if not isinstance(force, bool):
        raise InvalidInput(f"force must be True or False, got {force!r}")
    info = client.corpus(corpus).info
    if info.target_model_key is None:
        raise MigrationError(f"corpus {corpus} has no migration in progress")
    if info.migration_step not in ("backfilled", "validated", "shifting"):
        raise MigrationError(f"cannot validate corpus {corpus}: its migration is at step "
                             f"{info.migration_step} (needs backfilled): run pyembed migrate "
                             "backfill first")
    with translated():
        floor = client._conn.execute("SELECT pyembed._eval_queries_enough(%s, %s), "
                                     "pyembed.min_eval_queries()",
                                     (info.corpus_id, force)).fetchone()
    assert floor is not None
    evals = eval_queries(client._conn, info.corpus_id)
    if not evals:
        raise MigrationError(f"corpus {corpus} has no evaluation queries: add some with "
                             "`pyembed eval add` first")
    try:
        with client.billed_to(info.corpus_id):  # the evaluation queries' embeddings
            old, old_rank = _score(client, corpus, info.model_key, evals, k)
            new, new_rank = _score(client, corpus, info.target_model_key, evals, k)
        passed = new.ndcg >= old.ndcg - max_drop and new.recall >= old.recall - max_drop
        min_queries = int(floor[1])
        result = Validation(len(evals), old, new, overlap(old_rank, new_rank, k), max_drop,
                            passed, min_queries, force and len(evals) < min_queries)
        _call(client, "migration_validated", corpus, json.dumps(result.as_json()), passed,
              result.forced)
    except (KeyboardInterrupt, psycopg.OperationalError, DatabaseNotReady) as exc:
        # (One statement records the report: stopped before it, or in it, nothing is kept.)
        exc.add_note(f"validate stopped with no report recorded: corpus {corpus} is still at "
                     f"step {info.migration_step}; running it again validates from the start")
        raise
    return result


@in_client_turn
def shift(client: Client, corpus: str, share: int) -> int:
    """Serve `share` percent of searches (chosen by query hash) from the new key."""
    return int(_call(client, "migration_shift", corpus, count(share, "share")))


@in_client_turn
def complete(client: Client, corpus: str) -> int:
    """Promote the new key; the old vectors stay until `cleanup`."""
    return int(_call(client, "migration_complete", corpus))


@in_client_turn
def rollback(client: Client, corpus: str) -> int:
    """Return all searches and writes to the old key, at once."""
    return int(_call(client, "migration_rollback", corpus))


@in_client_turn
def cleanup(client: Client, corpus: str) -> int:
    """Delete the vectors and indexes of keys the corpus no longer serves; returns rows removed.
    Indexes are dropped CONCURRENTLY, so searches never queue behind the drop. Stopped (the
    database gone, Ctrl-C), the error says what was done and that running it again resumes."""
    kept = "cleanup stopped with no vector deleted (one transaction deletes them)"
    try:
        removed = int(_call(client, "migration_cleanup", corpus, True))
        info = client.corpus(corpus).info
        stale = client._conn.execute("SELECT pyembed._vector_indexes(%s, %s)",
                                    (info.corpus_id, info.model_key)).fetchall()
        for n, (name,) in enumerate(stale):
            kept = (f"cleanup stopped with the retired keys' vectors deleted ({removed} rows) and "
                    f"{n} of their {len(stale)} indexes dropped")
            drop_index_online(client._conn, name)
    except (psycopg.OperationalError, DatabaseNotReady, KeyboardInterrupt) as exc:
        exc.add_note(f"{kept}; running it again resumes: what is gone is not looked for again")
        raise
    return removed


_NEXT_SHARE = {0: 10, 10: 50, 50: 100}


def next_command(corpus: str, step: str, share: int, target: str | None,
                 retired: bool) -> str | None:
    """The command that takes a corpus's model change on from where it stands: the next step
    of a migration, or the cleanup of the vectors of keys it no longer serves (`retired`);
    None with neither."""
    if target is None:
        return f"pyembed migrate cleanup {corpus}" if retired else None
    if step == "started":
        return f"pyembed migrate backfill {corpus}"
    if step == "backfilled":
        return f"pyembed migrate validate {corpus}"
    if step == "validated" or share < 100:
        return f"pyembed migrate shift {corpus} {_NEXT_SHARE.get(share, 100)}"
    return f"pyembed migrate complete {corpus}"


def retired_keys(conn: psycopg.Connection[Any], corpus: str) -> list[tuple[str, int]]:
    """The keys `corpus` no longer serves that still have vectors, with their counts (what
    `cleanup` deletes), from pyembed.migration_report."""
    return [(k, int(n)) for k, n in conn.execute(
        "SELECT retired_key, retired_vectors FROM pyembed.migration_report "
        "WHERE corpus = %s AND retired_key IS NOT NULL ORDER BY retired_key",
        (corpus,)).fetchall()]


@dataclass(frozen=True)
class Status:
    corpus: str
    model_key: str
    target_model_key: str | None
    step: str
    traffic_share: int
    chunks: int
    target_vectors: int
    queued: int
    failed: int
    events: list[tuple[datetime.datetime, str, dict[str, Any]]]
    retired: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    """Keys the corpus no longer serves that still have vectors, with their counts."""

    @property
    def next(self) -> str | None:
        """The command that takes the change on (`next_command`)."""
        return next_command(self.corpus, self.step, self.traffic_share,
                            self.target_model_key, bool(self.retired))

    @property
    def coverage(self) -> float | None:
        """The target key's vectors per chunk; None with no target or no chunks (no figure,
        as `pyembed status` and the metrics give)."""
        return self.target_vectors / self.chunks if self.target_model_key and self.chunks else None


@in_client_turn
def status(client: Client, corpus: str) -> Status:
    info = client.corpus(corpus).info
    key = info.target_model_key
    one = client._conn.execute(
        """SELECT (SELECT count(*) FROM pyembed.chunks WHERE corpus_id = %(c)s),
                  (SELECT count(*) FROM pyembed.vectors WHERE corpus_id = %(c)s AND model_key = %(k)s),
                  (SELECT count(*) FROM pyembed.queue WHERE corpus_id = %(c)s AND model_key = %(k)s),
                  (SELECT count(*) FROM pyembed.queue_failed WHERE corpus_id = %(c)s
                      AND model_key = %(k)s)""", {"c": info.corpus_id, "k": key}).fetchone()
    assert one is not None
    events = client._conn.execute(
        """SELECT e.at, e.step, e.detail FROM pyembed.migration_events e
             JOIN pyembed.migrations m USING (migration_id)
            WHERE m.corpus_id = %s ORDER BY e.event_id DESC LIMIT 20""",
        (info.corpus_id,)).fetchall()
    return Status(corpus, info.model_key, key, info.migration_step, info.traffic_share,
                  int(one[0]), int(one[1]), int(one[2]), int(one[3]),
                  [(a, s, d) for a, s, d in events], retired_keys(client._conn, corpus))
