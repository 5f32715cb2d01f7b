"""What `pyembed status` and `pyembed metrics serve` report: coverage, queue, throughput, cache,
latency and recall, each with the alert it raises (from the health views in sql/075-health.sql)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg.rows import dict_row

from .migration import next_command, storage_bytes
from .recall import RECALL_ALERT
from .tenants import acting_for, acting_tenants
from .text import number

Level = Literal["ok", "warn", "alert"]

COVERAGE_ALERT = 0.999
THROUGHPUT_ALERT = 0.5  # of the 24-hour baseline, while work is queued
CACHE_HEALTHY = (0.40, 0.80)
CACHE_WARN = (0.20, 0.95)
LATENCY_MIN_QUERIES = 20
"""Queries of a kind in the last hour before its p95 over the target alerts: with 20 or more,
one slow call (a cold model's first embedding) weighs a twentieth of the p95 at most; with
fewer, it is a warning."""


@dataclass(frozen=True)
class Finding:
    """One figure of one area, its level, and why."""

    area: str
    subject: str
    value: str
    level: Level
    note: str = ""
    number: float | None = None
    tenant: str = ""
    """The tenant the figure is of, when the login acts for several (the operator's: '-' for
    none); empty for a tenant's own login, whose figures are all its tenant's."""


def _rows(conn: psycopg.Connection[Any], view: str) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(f"SELECT * FROM pyembed.{view}").fetchall()  # fixed view names


def coverage(conn: psycopg.Connection[Any]) -> list[Finding]:
    out = []
    for r in _rows(conn, "coverage"):
        subject = f"{r['corpus']} [{r['role']}] {r['model_key']}"
        if not r["chunks"]:
            # Nothing to cover: no figure (as `migrate status` and the metrics give), no alert.
            out.append(Finding("coverage", subject, "- (0/0)", "ok", "no chunks yet"))
        else:
            ratio = r["vectors"] / r["chunks"]
            level: Level = "ok" if ratio >= COVERAGE_ALERT or r["role"] == "target" else "alert"
            out.append(Finding("coverage", subject,
                               f"{ratio:.2%} ({r['vectors']}/{r['chunks']})",
                               level, "below 99.9%" if level == "alert" else "", ratio))
        out.append(_queue(subject, r))
    return out


def _queue(subject: str, r: dict[str, Any]) -> Finding:
    value = f"{r['queued']} queued, {r['failed']} failed"
    notes = ["failed items: see pyembed.queue_failed"] if r["failed"] else []
    if r["leased"]:
        # Workers hold these: a dead worker's until its lease ends.
        value += f", {r['leased']} leased"
        first, last = _clock(r["first_lease_end"]), _clock(r["last_lease_end"])
        notes.append(f"leases end {first}" + (f" to {last}" if last != first else ""))
    return Finding("queue", subject, value, "alert" if r["failed"] else "ok", "; ".join(notes),
                   float(r["queued"]))


def _clock(moment: datetime) -> str:
    return f"{moment.astimezone():%H:%M:%S}"  # the local time


def throughput(conn: psycopg.Connection[Any]) -> list[Finding]:
    out = []
    for r in _rows(conn, "throughput"):
        now, base = float(r["per_s_5m"]), float(r["per_s_24h"])
        slow = r["queued"] > 0 and base > 0 and now < THROUGHPUT_ALERT * base
        out.append(Finding("throughput", r["model_key"],
                           f"{now:.2f}/s (5 min), {float(r['per_s_1h']):.2f}/s (1 h), "
                           f"{base:.3f}/s (24 h)", "alert" if slow else "ok",
                           "below 50% of the 24-hour baseline with work queued" if slow else "",
                           now))
    return out


def cache(conn: psycopg.Connection[Any]) -> list[Finding]:
    out = []
    for r in _rows(conn, "cache_health"):
        rate = r["hit_rate_7d"]
        level: Level = "ok"
        note = ""
        if rate is None:
            note = "no lookups yet"
        elif not CACHE_WARN[0] <= rate <= CACHE_WARN[1]:
            level, note = "warn", ("low: repeated texts are rare, or keys change" if
                                   rate < CACHE_WARN[0] else "very high: check the TTL")
        elif not CACHE_HEALTHY[0] <= rate <= CACHE_HEALTHY[1]:
            note = "outside 40-80%"
        out.append(Finding("cache", r["model_key"],
                           f"{rate:.0%} hit rate (7 days), {r['entries']} entries"
                           if rate is not None else f"{r['entries']} entries", level, note,
                           rate))
    return out


def latency(conn: psycopg.Connection[Any]) -> list[Finding]:
    out = []
    for r in _rows(conn, "latency"):
        over = r["p95_ms"] > r["target_p95_ms"]
        enough = r["queries"] >= LATENCY_MIN_QUERIES
        level: Level = "ok" if not over else "alert" if enough else "warn"
        note = "" if not over else f"p95 over the {r['target_p95_ms']:.0f} ms target" + (
            "" if enough else f" in {r['queries']} queries, too few to alert on "
                              f"({LATENCY_MIN_QUERIES} needed)")
        out.append(Finding("latency", f"{r['kind']}: {r['phase']}",
                           f"p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms "
                           f"({r['queries']} queries, last hour)", level, note,
                           float(r["p95_ms"])))
    return out


def recall(conn: psycopg.Connection[Any], alert: float = RECALL_ALERT) -> list[Finding]:
    """recall@10 of the guarded search against exact search, per corpus and key, over the
    last 24 hours (pyembed.recall_health); below `alert` alerts."""
    out = []
    for r in _rows(conn, "recall_health"):
        low = r["recall_at_10"] < alert
        out.append(Finding("recall", f"{r['corpus']} {r['model_key']}",
                           f"recall@10 {r['recall_at_10']:.3f} ({r['queries']} queries, last "
                           f"measured {_clock(r['measured_at'])})", "alert" if low else "ok",
                           f"below {alert:g}: raise ef_search or rebuild the index"
                           if low else "", float(r["recall_at_10"])))
    return out


def indexes(conn: psycopg.Connection[Any]) -> list[Finding]:
    """Corpora whose active key has no vector index (pyembed.unindexed_corpora): a bulk load at
    work builds it at its end; one that did not end (killed) left it to the corpus's next write,
    to pyembed.end_bulk_load, which the session reading this may call, or to the owner's
    `pyembed corpus reindex` (a corpus of no tenant: the owner finds a tenant's corpus by name
    only acting for it). Searches meanwhile scan every vector."""
    out = []
    rows = conn.execute("SELECT u.corpus, u.model_key, u.loading, "
                        "pyembed.current_tenant() IS NOT NULL "
                        "FROM pyembed.unindexed_corpora() u").fetchall()
    for corpus, key, loading, tenant in rows:
        owner = "" if tenant else f", or `pyembed corpus reindex {corpus}` as the owner"
        out.append(Finding("index", f"{corpus} {key}",
                           "no index: a bulk load is at work, it builds it at its end"
                           if loading else "no index: searches scan every vector",
                           "ok" if loading else "warn",
                           "" if loading else "a bulk load did not end: the corpus's next write "
                           f"builds it, or now SELECT pyembed.end_bulk_load('{corpus}'){owner}"))
    return out


REPLICA_WARN_BYTES = 64 << 20
"""WAL a replica may be behind before it is a warning."""


def replicas(conn: psycopg.Connection[Any]) -> list[Finding]:
    """Each streaming replica of this server and how far behind it is (pyembed.replica_lag();
    a replica that has replayed nothing yet is listed without figures)."""
    out = []
    for r in conn.execute("SELECT * FROM pyembed.replica_lag()").fetchall():
        name, state, behind, lag = r
        if behind is None:
            out.append(Finding("replica", name or "?", state or "connected", "ok",
                               "no WAL replayed yet"))
            continue
        level: Level = "warn" if state != "streaming" or behind > REPLICA_WARN_BYTES else "ok"
        out.append(Finding("replica", name or "?",
                           f"{behind:,} bytes behind" + (f", replay lag {lag:.2f} s" if lag else ""),
                           level, "" if level == "ok" else f"{state}; over 64 MB behind"
                           if behind > REPLICA_WARN_BYTES else f"{state}", float(behind)))
    return out


def migrations(conn: psycopg.Connection[Any]) -> list[Finding]:
    """Each corpus's model change where it stands (pyembed.migration_report), with the command
    that takes it on (migration.next_command): a migration at any step, and the vectors of keys
    a corpus no longer serves (a completed migration's old key, a rolled-back target), which
    `pyembed migrate cleanup` deletes, with their count and estimated size."""
    out: list[Finding] = []
    rows = _rows(conn, "migration_report")  # a row per retired key: a corpus may have several
    retiring = {r["corpus"] for r in rows if r["retired_key"] is not None}
    shown: set[str] = set()
    for r in rows:
        corpus, target, step, share = (r["corpus"], r["target_model_key"], r["migration_step"],
                                       r["traffic_share"])
        then = next_command(corpus, step, share, target, corpus in retiring)
        if target is not None and corpus not in shown:
            shown.add(corpus)
            value = step + (f", {share}% of searches on the new key" if step == "shifting"
                            else "")
            out.append(Finding("migration", f"{corpus} -> {target}", value, "ok",
                               f"next: `{then}` (or `pyembed migrate rollback {corpus}` back to "
                               f"{r['model_key']})"))
        if r["retired_key"] is not None:
            key, vectors = r["retired_key"], int(r["retired_vectors"])
            # The table keeps every key's vectors as float32; the key's index, until cleanup
            # drops it, is as large as the catalogue says (its storage's type, its pages).
            raw, _ = storage_bytes(vectors, int(key.rsplit(":", 1)[1]))
            size = raw + int(r["retired_index_bytes"] or 0)
            out.append(Finding(
                "migration", f"{corpus} {key}",
                f"{vectors} vectors of a key not served, about {_size(size)}", "warn",
                "left by a completed or rolled-back migration: "
                + (f"`pyembed migrate cleanup {corpus}` deletes them" if target is None else
                   f"`pyembed migrate cleanup {corpus}` deletes them once the migration ends"),
                float(vectors)))
    return out


def _size(size: int) -> str:
    """Bytes as people read them (bytes, kB, MB, GB)."""
    if size < 1024:
        return f"{size} bytes"
    scaled = float(size)
    for unit in ("kB", "MB", "GB"):
        scaled /= 1024
        if scaled < 1024 or unit == "GB":
            break
    return f"{scaled:.1f} {unit}"


def report(conn: psycopg.Connection[Any], *, recall_alert: float = RECALL_ALERT) -> list[Finding]:
    """Every finding, area by area; `recall_alert` is a recall@10, 0..1. The login's tenant's,
    or, for a login that acts for tenants (the operator's, a superuser), each tenant's in turn,
    read acting for it (pyembed.acting_tenants), each finding naming its tenant."""
    recall_alert = number(recall_alert, "recall_alert", 0.0, 1.0)
    out: list[Finding] = []
    for tenant, label in acting_tenants(conn):
        with acting_for(conn, tenant):
            found = (coverage(conn) + throughput(conn) + cache(conn) + latency(conn)
                     + recall(conn, recall_alert) + indexes(conn) + migrations(conn))
        out += found if tenant is None else [replace(f, tenant=label) for f in found]
    return out + replicas(conn)
