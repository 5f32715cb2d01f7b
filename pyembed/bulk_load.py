"""Bulk loads of precomputed vectors for stored chunks: `vectors.copy_vectors` batch by batch,
each batch its own transaction, over several connections at once.

One COPY keeps one server process busy; the checks pyembed adds (key, dimensions and norm row
by row; tenant, chunks and the queue per batch) are server work, while the client's share is
small. So a second connection nearly doubles the rows a second on a machine with a core to
spare: `tests/benchmarks/bench_suite.py` measures it beside
a plain pgvector COPY.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from .corpora import CorpusInfo, corpus_info, model_spec
from .db import connect, connection_lost, lost_during, unreachable
from .dbcall import translated
from .errors import InvalidInput, InvalidVector, stopped
from .index import bulk_load
from .models import ModelSpec
from .vectors import as_unit_vectors, copy_vectors, float_array


@dataclass(frozen=True)
class LoadReport:
    """What a load wrote: rows, in how many batches (transactions), in how long."""

    rows: int
    batches: int
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def load_vectors(corpus: str, chunk_ids: Sequence[int], model_key: str, vectors: np.ndarray,
                 content_hashes: Sequence[bytes | None], *, dsn: str | None = None,
                 batch_rows: int = 5_000, connections: int = 2,
                 progress: bool = False) -> LoadReport:
    """Write these stored chunks' vectors, made by `model_key`, into `corpus`.

    `content_hashes[i]` is `sha256` of the text chunk i's vector was made from: a vector
    whose hash matches the chunk's queued text takes it off the queue (None: it does not).
    Vectors are checked (dimensions, NaN/Inf, zero) and, for a normalised model, unit-normalised
    here; the database checks them again, and the key, tenant and chunks.

    Batches of `batch_rows` rows are each one transaction, on `connections` connections opened
    from `dsn` ($PYEMBED_DSN, else the local cluster) as the same role. Each batch is written
    whole or not at all, but the load is not one transaction: when a batch is refused (or a
    connection does not open), no new batch starts, and its error is raised with a note saying
    how many rows the other batches wrote. Loading again is safe: a chunk's vector for the key
    is replaced, not doubled.
    """
    try:
        return _checked_load(corpus, chunk_ids, model_key, vectors, content_hashes, dsn,
                             batch_rows, connections, progress)
    except psycopg.OperationalError as exc:
        if not connection_lost(exc):
            raise
        # As a Client's call says it (DatabaseNotReady), with what the batches wrote.
        lost = lost_during("during load_vectors", exc)
        for note in getattr(exc, "__notes__", ()):
            lost.add_note(note)
        raise lost from exc


def _open(dsn: str | None) -> psycopg.Connection[Any]:
    """A connection for the load, or DatabaseNotReady as pyembed.connect says it."""
    try:
        return connect(dsn, autocommit=True)
    except psycopg.OperationalError as exc:
        raise unreachable(exc) from exc


def _checked_load(corpus: str, chunk_ids: Sequence[int], model_key: str, vectors: np.ndarray,
                  content_hashes: Sequence[bytes | None], dsn: str | None, batch_rows: int,
                  connections: int, progress: bool) -> LoadReport:
    n = len(chunk_ids)
    if not len(content_hashes) == len(vectors) == n:
        raise InvalidInput(f"{n} chunk ids, {len(vectors)} vectors and {len(content_hashes)} "
                           "content hashes: give one of each per chunk")
    if batch_rows < 1 or connections < 1:
        raise InvalidInput(f"batch_rows and connections must be at least 1, got {batch_rows} "
                           f"and {connections}")
    with _open(dsn) as conn:
        with translated():
            info = corpus_info(conn, corpus)
            spec = model_spec(conn, model_key)
        if not isinstance(vectors, np.ndarray):
            vectors = float_array(vectors, np.float64)
        if np.ndim(vectors) != 2 or np.shape(vectors)[1] != spec.dimensions:
            raise InvalidVector(f"wrong dimensions: {model_key} has {spec.dimensions} dimensions, "
                                f"the vectors have shape {np.shape(vectors)}")
        if n == 0:
            return LoadReport(0, 0, 0.0)
        # This connection holds the load's lock while the others write: a corpus with no
        # vectors for its key gets its index built once, at the end (index.bulk_load).
        with bulk_load(conn, info.name):
            return _load(info, spec, chunk_ids, model_key, vectors, content_hashes, dsn,
                         batch_rows, connections, progress)


def _load(info: CorpusInfo, spec: ModelSpec, chunk_ids: Sequence[int], model_key: str,
          vectors: np.ndarray, content_hashes: Sequence[bytes | None], dsn: str | None,
          batch_rows: int, connections: int, progress: bool) -> LoadReport:
    n = len(chunk_ids)
    started = time.perf_counter()
    starts = list(range(0, n, batch_rows))
    pending = iter(starts)
    lock = threading.Lock()
    stop = threading.Event()  # a batch failed, or the caller interrupted: start no new batch
    written = 0
    failed: dict[int, Exception] = {}  # by the failed batch's first row; -1: a connection

    def fail(start: int, exc: Exception) -> None:
        stop.set()
        with lock:
            failed[start] = exc

    def run(bar: Progress, task: TaskID) -> None:
        nonlocal written
        try:
            conn = _open(dsn)
        except Exception as exc:
            fail(-1, exc)
            return
        with conn:
            while not stop.is_set():
                with lock:
                    start = next(pending, None)
                if start is None:
                    return
                end = min(start + batch_rows, n)
                try:
                    rows = as_unit_vectors(vectors[start:end], spec.dimensions,
                                           normalize=spec.normalized)
                    with translated(), conn.transaction(), conn.cursor() as cur:
                        stored = copy_vectors(cur, info.corpus_id, chunk_ids[start:end],
                                              model_key, rows, content_hashes[start:end])
                except Exception as exc:
                    fail(start, exc)
                    return
                with lock:
                    written += len(stored)  # (what the write says it stored)
                bar.update(task, advance=end - start)

    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn())
    workers = min(connections, len(starts))
    with Progress(*columns, disable=not progress, transient=True) as bar, \
            ThreadPoolExecutor(workers) as pool:
        task = bar.add_task(f"loading vectors into {info.name}", total=n)
        futures = [pool.submit(run, bar, task) for _ in range(workers)]
        try:
            for future in futures:
                future.result()
        except BaseException:  # Ctrl-C: the batches under way finish (or roll back) alone
            stop.set()
            raise
    if failed:
        first = min(failed)
        exc = failed[first]
        what = ("a connection did not open" if first < 0 else
                f"the batch of chunk ids {chunk_ids[first]}.."
                f"{chunk_ids[min(first + batch_rows, n) - 1]} wrote nothing")
        raise stopped(
            exc, info.name, "load_vectors",
            f"load_vectors: {what}; {written:,} of {n:,} rows were written in other batches, "
            "and no new batch started once it failed. Loading again is safe: vectors are "
            "replaced, not doubled.")
    return LoadReport(n, len(starts), time.perf_counter() - started)
