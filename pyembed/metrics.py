"""Prometheus metrics: the health figures, read from the database at each scrape."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from psycopg.rows import dict_row

from . import errors
from .db import connection_lost, lost, reopen, server_error
from .tenants import acting_for, acting_tenants

log = logging.getLogger(__name__)


class PyembedCollector(Collector):
    """Collects from the pyembed health views over one connection, opened again if the server
    closed it, never as another role or tenant than the first acted as (db.reopen)."""

    def __init__(self, dsn: str | None) -> None:
        self.dsn = dsn
        self._conn: psycopg.Connection[Any] | None = None
        self._acted_as: tuple[str, ...] | None = None
        self._lock = threading.Lock()

    def reconnect(self) -> None:
        """Forget who the first connection acted as: the next scrape goes on as the login."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._conn, self._acted_as = None, None

    def _db(self) -> psycopg.Connection[Any]:
        if self._conn is None or lost(self._conn):  # (closed by a restart: open it again)
            self._conn, self._acted_as = reopen(self.dsn, self._acted_as, "metrics collector",
                                                autocommit=True,
                                                application_name="pyembed metrics")
        return self._conn

    def _rows(self, sql: str) -> list[dict[str, Any]]:
        with self._db().cursor(row_factory=dict_row) as cur:
            return cur.execute(sql).fetchall()

    def collect(self) -> Iterator[Any]:
        with self._lock:
            try:
                yield from self._collect()
            except (psycopg.OperationalError, errors.DatabaseNotReady) as exc:
                if isinstance(exc, errors.DatabaseNotReady):
                    log.warning("%s", exc)  # (the scrape's answer has no room for why)
                    self._conn = None
                elif connection_lost(exc):
                    self._conn = None
                else:
                    # The server answered with an error (a statement timeout, a lock): the
                    # connection stays; the scrape has no figures, and the log says why.
                    log.warning("a scrape's statement failed: %s", server_error(exc))
                up = GaugeMetricFamily("pyembed_up", "1 if the database answered the scrape")
                up.add_metric([], 0)
                yield up

    def _acting(self, tenant: str | None, views: list[str]) -> list[list[dict[str, Any]]]:
        """Each view's rows, read in one transaction acting for `tenant` (None: the login's own
        tenant): row-level security decides what each tenant's figures hold."""
        with acting_for(self._db(), tenant) as conn, conn.cursor(row_factory=dict_row) as cur:
            return [cur.execute(view).fetchall() for view in views]

    def _collect(self) -> Iterator[Any]:
        # Every tenant the login may act for (the operator's: each tenant and none; a tenant's
        # login: its own), each figure labelled with its tenant's name ('-': none).
        labels = ["tenant", "corpus", "model_key", "role"]
        chunks = GaugeMetricFamily("pyembed_chunks", "Chunks stored", labels=["tenant", "corpus"])
        vectors = GaugeMetricFamily("pyembed_vectors", "Chunks with a vector for the key",
                                    labels=labels)
        ratio = GaugeMetricFamily("pyembed_coverage_ratio", "vectors / chunks", labels=labels)
        queued = GaugeMetricFamily("pyembed_queue_depth", "Chunks waiting to be embedded",
                                   labels=labels)
        failed = GaugeMetricFamily("pyembed_queue_failed", "Chunks that failed embedding",
                                   labels=labels)
        rate = GaugeMetricFamily("pyembed_embeddings_per_second",
                                 "Vectors written per second over a window",
                                 labels=["tenant", "model_key", "window"])
        hits = CounterMetricFamily("pyembed_cache_hits", "Cache hits (last 7 days)",
                                   labels=["tenant", "model_key"])
        misses = CounterMetricFamily("pyembed_cache_misses", "Cache misses (last 7 days)",
                                     labels=["tenant", "model_key"])
        entries = GaugeMetricFamily("pyembed_cache_entries", "Cached embeddings",
                                    labels=["tenant", "model_key"])
        usage_labels = ["tenant", "corpus", "model_key"]
        calls = GaugeMetricFamily("pyembed_provider_calls_30d",
                                  "Provider calls reserved over the last 30 days",
                                  labels=usage_labels)
        cost = GaugeMetricFamily("pyembed_cost_usd_30d",
                                 "Estimated provider cost over the last 30 days (USD)",
                                 labels=usage_labels)
        lat = GaugeMetricFamily("pyembed_latency_seconds", "Query latency over the last hour",
                                labels=["tenant", "kind", "phase", "quantile"])
        recall = GaugeMetricFamily("pyembed_recall_at_10",
                                   "recall@10 of the guarded search against exact search "
                                   "(last 24 hours of measurements)",
                                   labels=["tenant", "corpus", "model_key"])
        used: set[tuple[str, str, str]] = set()
        for acting, tenant in acting_tenants(self._db()):
            cov, thr, cache, usage, latency, rec = self._acting(acting, [
                "SELECT * FROM pyembed.coverage", "SELECT * FROM pyembed.throughput",
                "SELECT * FROM pyembed.cache_health", "SELECT * FROM pyembed.usage_report(30)",
                "SELECT * FROM pyembed.latency", "SELECT * FROM pyembed.recall_health"])
            seen: set[str] = set()
            for r in cov:
                key = [tenant, r["corpus"], r["model_key"], r["role"]]
                if r["corpus"] not in seen:
                    chunks.add_metric([tenant, r["corpus"]], r["chunks"])
                    seen.add(r["corpus"])
                vectors.add_metric(key, r["vectors"])
                if r["chunks"]:  # no chunks: no coverage figure (pyembed.health's rule)
                    ratio.add_metric(key, r["vectors"] / r["chunks"])
                queued.add_metric(key, r["queued"])
                failed.add_metric(key, r["failed"])
            for r in thr:
                for window, col in (("5m", "per_s_5m"), ("1h", "per_s_1h"),
                                    ("24h", "per_s_24h")):
                    rate.add_metric([tenant, r["model_key"], window], float(r[col]))
            for r in cache:
                hits.add_metric([tenant, r["model_key"]], float(r["hits_7d"] or 0))
                misses.add_metric([tenant, r["model_key"]], float(r["misses_7d"] or 0))
                entries.add_metric([tenant, r["model_key"]], r["entries"])
            for r in usage:  # (labelled by the report: a superuser's names every tenant)
                ukey = (r["tenant"], r["corpus"], r["model_key"])
                if ukey not in used:
                    used.add(ukey)
                    calls.add_metric(list(ukey), r["requests"])
                    cost.add_metric(list(ukey), r["cost_usd"] or 0.0)
            for r in latency:
                lat.add_metric([tenant, r["kind"], r["phase"], "0.5"], r["p50_ms"] / 1000)
                lat.add_metric([tenant, r["kind"], r["phase"], "0.95"], r["p95_ms"] / 1000)
            for r in rec:
                recall.add_metric([tenant, r["corpus"], r["model_key"]],
                                  float(r["recall_at_10"]))
        yield from (chunks, vectors, ratio, queued, failed, rate, hits, misses, entries,
                    calls, cost)

        errors = CounterMetricFamily("pyembed_provider_errors",
                                     "Failed provider calls, retried or not, by kind",
                                     labels=["provider", "kind"])
        for r in self._rows("SELECT * FROM pyembed.provider_errors()"):
            errors.add_metric([r["provider"], r["kind"]], r["errors"])
        yield errors
        yield from (lat, recall)
        up = GaugeMetricFamily("pyembed_up", "1 if the database answered the scrape")
        up.add_metric([], 1)
        yield up


def registry(dsn: str | None) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(PyembedCollector(dsn))
    return reg


NOT_FOUND = b"not found: pyembed serves its metrics at /metrics\n"


def wsgi_app(reg: CollectorRegistry) -> Callable[..., Any]:
    """prometheus_client's exposition at /metrics, 404 on any other path: its own app answers
    every path with the metrics, so a mistyped path looked like a working one."""
    from prometheus_client import make_wsgi_app

    metrics = make_wsgi_app(reg)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") == "/metrics":
            return metrics(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8"),
                                         ("Content-Length", str(len(NOT_FOUND)))])
        return [NOT_FOUND]

    return app


def serve(dsn: str | None, *, port: int, address: str = "127.0.0.1",
          ready: Callable[[], None] | None = None,
          stopped: Callable[[], bool] | None = None) -> None:
    """Serve /metrics until interrupted, or until `stopped()` says a stop came (asked between
    requests); `ready` is called once the port is bound (ConfigError naming the address and port
    when it cannot be: one in use, an address this host does not have or cannot resolve)."""
    import socket
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client.exposition import ThreadingWSGIServer

    where = f"{address}:{port}"
    try:
        # An IPv6 address (--address ::) binds as one, as prometheus_client's server does.
        family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]
    except OSError as exc:
        raise errors.ConfigError(f"cannot serve on {where}: {exc.strerror or exc}") from None

    class Server(ThreadingWSGIServer):
        address_family = family

        def service_actions(self) -> None:
            # A signal handler's exception raised inside a __del__ or a weakref callback is
            # printed and dropped by Python: the stop it recorded still ends the loop.
            if stopped is not None and stopped():
                raise KeyboardInterrupt

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass  # a scrape every few seconds is not news

    try:
        server = make_server(address, port, wsgi_app(registry(dsn)), Server, handler_class=Quiet)
    except OSError as exc:  # the port taken, or an address this host does not have
        raise errors.ConfigError(f"cannot serve on {where}: {exc.strerror or exc}") from None
    if ready is not None:
        ready()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
