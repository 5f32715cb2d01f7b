"""Count the round trips a connection makes (tests and benchmarks), from libpq's own trace of the
protocol: each simple Query and each Sync of the extended protocol is one wait for the server."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import pq


@dataclass
class RoundTrips:
    """Round trips per traced connection, by the order the connections were given."""

    counts: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts)


@contextmanager
def counted(*conns: psycopg.Connection[Any]) -> Iterator[RoundTrips]:
    """Trace `conns` (the same connection given twice is traced once) while the block runs."""
    trips = RoundTrips([0] * len(conns))
    unique = list({id(c): c for c in conns}.values())
    files = [tempfile.TemporaryFile() for _ in unique]
    try:
        for conn, f in zip(unique, files, strict=True):
            conn.pgconn.trace(f.fileno())
            conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            yield trips
        finally:
            for conn in unique:
                conn.pgconn.untrace()
        for conn, f in zip(unique, files, strict=True):
            f.seek(0)
            trips.counts[conns.index(conn)] = _trips(f.read().decode("utf-8", "replace"))
    finally:
        for f in files:
            f.close()


def _trips(trace: str) -> int:
    sent = (line.split("\t") for line in trace.splitlines())
    return sum(1 for parts in sent if len(parts) > 2 and parts[0] == "F"
               and parts[2].split(" ")[0] in ("Query", "Sync"))


__all__ = ["RoundTrips", "counted"]
