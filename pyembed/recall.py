"""Recall you can see (sql/072-recall.sql): recall@10 of the guarded search against exact
search, measured on demand over stored vectors and in the background over sampled real queries
(searches sample their query at the rate pyembed.recall_sample_rate; `pyembed worker` re-runs
the samples), and reported per corpus and model key."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from .dbcall import count, translated

RECALL_ALERT = 0.95
"""recall@10 below which `pyembed status` alerts (its --recall-alert changes it)."""


@dataclass(frozen=True)
class Measurement:
    """recall@10 of one corpus and key over `queries` queries."""

    corpus: str
    model_key: str
    queries: int
    recall_at_10: float


@dataclass(frozen=True)
class RecallRow:
    """recall@10 over the measurements of the last hours, and when it was last measured."""

    corpus: str
    model_key: str
    recall_at_10: float
    queries: int
    measured_at: datetime


def measure(conn: psycopg.Connection[Any], corpus: str, queries: int = 50) -> list[Measurement]:
    """recall@10 now, for each key serving `corpus`, over `queries` of its stored vectors taken
    as queries (recorded as a measurement on a primary; a replica measures only). Stopped (the
    connection lost, Ctrl-C), the error says that nothing was recorded and a rerun measures."""
    queries = count(queries, "queries")
    try:
        with translated():
            rows = conn.execute("SELECT * FROM pyembed.measure_recall(%s, %s)",
                                (corpus, queries)).fetchall()
    except (psycopg.OperationalError, KeyboardInterrupt) as exc:
        exc.add_note("recall stopped with no measurement recorded (one statement records it "
                     "whole); running it again measures again")
        raise
    return [Measurement(corpus, key, int(n), float(r)) for key, n, r in rows]


def measure_sampled(conn: psycopg.Connection[Any], max_samples: int = 20) -> list[Measurement]:
    """Re-run up to `max_samples` sampled searches of the session's tenant (each sample once,
    whichever worker takes it) and record what they measure."""
    with translated():
        rows = conn.execute("SELECT * FROM pyembed.recall_sampled(%s)",
                            (count(max_samples, "max_samples"),)).fetchall()
    return [Measurement(c, key, int(n), float(r)) for c, key, n, r in rows]


def report(conn: psycopg.Connection[Any], hours: int = 24) -> list[RecallRow]:
    """recall@10 per corpus and key over the last `hours` (the session's tenant's corpora)."""
    with translated():
        rows = conn.execute("SELECT * FROM pyembed.recall_report(%s)",
                            (count(hours, "hours"),)).fetchall()
    return [RecallRow(c, k, float(r), int(n), at) for c, k, r, n, at in rows]
