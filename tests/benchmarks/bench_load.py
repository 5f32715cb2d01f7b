"""Load test of the in-database calls (a script, and the harness tests/test_load.py runs briefly).

    .venv/bin/python tests/benchmarks/bench_load.py                     # 16 sessions, 30 s
    .venv/bin/python tests/benchmarks/bench_load.py --seconds 60 --sessions 32

Sessions run at once for a bounded time, each in its own thread with its own connection as the
application role: one runs the worker (`Worker.run_once` in a loop), the others a random mix of
SQL `pyembed.embed(text, key)` (new texts: cache misses; repeated texts: hits),
`pyembed.search_text(corpus, query, k, NULL, mode)` (new and repeated queries, vector and hybrid)
and `pyembed.add_document(...)` (new documents, and changed versions of the session's own).
Every third client session runs 2-6 calls inside one transaction, mixing both models in random
order (where row locks on shared usage, cache and count rows used to make calls wait and
deadlock). Two models: the in-process fake model (fake/fake-hash@1:384, no HTTP) and OpenAI's
text-embedding-3-small through the real openai SDK against the fake HTTP server of
tests/fakeapi (key and base URL set with pyembed.set_secret). Every session has lock_timeout 5 s
(in its connection options, so the worker's own connections have it too): a wait shows as an
error (55P03) instead of a hang.

Each backend loads pyembed, numpy and the openai SDK before the window opens (about a second
of CPU each). Printed: calls, calls/s (over the window, which lasts until the last client's
last call ends), p50/p95 latency and errors (by SQLSTATE) per kind; deadlocks (40P01) seen by
clients and counted by the server; lock waits sampled from pg_stat_activity, with the statement
that blocks them; the queue left once the worker drains it after the window; and the
accounting: for each model, the requests in pyembed.usage (read as the owner) against the
provider calls made, counted where they happen: the fake HTTP server's embedding requests for
OpenAI, and for the fake model the FakeProvider instances' own call counters (the worker's in
this process; each session's backend reports its own from PL/Python's GD through a probe
function installed in the scratch database; transaction sessions read it before every
transaction too, so that what a rollback takes away is known). Exits 1 on any error, deadlock
or accounting difference. `--calls embed,search_text` leaves add_document (and so the worker's
work) out of the mix.

It runs in a fresh database in the local cluster under --home (default .pyembed-bench-load in
the repository), dropped at the end.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: `tests.` and `pyembed` importable
    sys.path.insert(0, str(REPO))

from pyembed.cache import PostgresCache  # noqa: E402
from pyembed.db import connect  # noqa: E402
from pyembed.embedder import Embedder  # noqa: E402
from pyembed.models import ModelSpec  # noqa: E402
from pyembed.providers import provider_for  # noqa: E402
from pyembed.providers.fake import FakeProvider  # noqa: E402
from pyembed.tenants import meter  # noqa: E402
from pyembed.worker import Worker, WorkerStats  # noqa: E402
from tests.benchmarks.common import percentiles_ms  # noqa: E402
from tests.fakeapi import FakeAPI  # noqa: E402

FAKE = "fake/fake-hash@1:384"
HTTP = "openai/text-embedding-3-small@1:1536"
API_KEY = "sk-load-test"
CORPORA = {FAKE: "load_fake", HTTP: "load_http"}
KINDS = ("embed", "search_text", "add_document", "worker")
DEADLOCK, LOCK_TIMEOUT = "40P01", "55P03"

WORDS = ("invoice refund quota region backup bucket latency replica index vector tenant cache "
         "worker queue billing outage upgrade migration schema token password login audit "
         "export import archive policy storage network gateway timeout retry webhook cluster "
         "snapshot encryption certificate domain alert metric dashboard").split()

# Each backend's FakeProvider counts its calls; PL/Python keeps a session's embedders in GD
# (pyembed.indb), where this function, installed by the superuser owner in the scratch
# database only, reads them.
PROBE = """
CREATE SCHEMA IF NOT EXISTS load_probe;
CREATE OR REPLACE FUNCTION load_probe.provider_calls()
RETURNS TABLE (model_key text, calls bigint)
LANGUAGE plpython3u AS $probe$
out = []
for key, (_, emb) in GD.get("pyembed.embedders", {}).items():
    calls = getattr(emb.provider, "calls", None)
    if calls is not None:
        out.append((key, calls))
return out
$probe$;
GRANT USAGE ON SCHEMA load_probe TO pyembed_app;
GRANT EXECUTE ON FUNCTION load_probe.provider_calls() TO pyembed_app;
"""


@dataclass(frozen=True)
class LoadSettings:
    seconds: float = 30.0
    sessions: int = 16  # one of them runs the worker
    lock_timeout: str = "5s"
    seed: int = 0
    seed_documents: int = 12  # per corpus, embedded before the timed window
    shared_texts: int = 40  # repeated texts for embed (hits once stored)
    shared_queries: int = 20  # repeated queries for search_text
    worker_batch: int = 16
    transaction_every: int = 3  # every n-th client session runs its calls in transactions
    calls: tuple[str, ...] = ("embed", "search_text", "add_document")  # the clients' mix


@dataclass
class Tally:
    """Calls, latencies and errors per kind, from every thread."""

    calls: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    errors_where: Counter[str] = field(default_factory=Counter)  # by kind of session
    messages: list[str] = field(default_factory=list)
    chosen: Counter[str] = field(default_factory=Counter)  # new/repeated texts and queries
    rolled_back: Counter[str] = field(default_factory=Counter)  # transactions, calls in them
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, kind: str, seconds: float, count: int = 1) -> None:
        with self.lock:
            self.calls[kind] += count
            self.latencies.setdefault(kind, []).append(seconds)

    def error(self, kind: str, where: str, exc: BaseException | str) -> None:
        sqlstate, message = _describe(exc)
        with self.lock:
            self.errors[kind, sqlstate] += 1
            self.errors_where[where.split(" session")[0] + " sessions"
                              if " session " in where else where] += 1
            if self.errors[kind, sqlstate] <= 2:  # the first two of each kind and SQLSTATE
                self.messages.append(f"{kind} ({where}): {sqlstate}: {message}")

    def choose(self, what: str) -> None:
        with self.lock:
            self.chosen[what] += 1

    def roll_back(self, calls: int, fake_calls: int) -> None:
        with self.lock:
            self.rolled_back["transactions"] += 1
            self.rolled_back["calls"] += calls
            self.rolled_back["fake provider calls"] += fake_calls


def _describe(exc: BaseException | str) -> tuple[str, str]:
    """(SQLSTATE or a name, the message's first line and its DETAIL)."""
    if isinstance(exc, str):
        return "job", exc.strip().splitlines()[0] if exc.strip() else exc
    if isinstance(exc, psycopg.Error) and exc.sqlstate:
        diag = exc.diag
        message = (diag.message_primary or str(exc)).strip().splitlines()[0]
        if diag.message_detail:
            message += " (" + " / ".join(diag.message_detail.splitlines()) + ")"
        return exc.sqlstate, message
    state = getattr(exc, "sqlstate", None)
    return str(state) if state else type(exc).__name__, str(exc).strip().splitlines()[0]


@dataclass(frozen=True)
class Accounting:
    model_key: str
    usage_requests: int
    provider_calls: int
    counted_by: str

    @property
    def exact(self) -> bool:
        return self.usage_requests == self.provider_calls


@dataclass
class LoadResult:
    settings: LoadSettings
    window: float  # seconds from the start signal until the last client finished
    tally: Tally
    accounting: list[Accounting]
    transactions: int  # transactions of several calls committed
    server_deadlocks: int  # pg_stat_database.deadlocks during the run
    lock_waits: Counter[tuple[str, str, str]]  # (wait event, waiting, blocking) per sample
    worker_window: WorkerStats
    worker_drain: WorkerStats
    drain_seconds: float
    queue_left: int
    chunks_unembedded: int  # chunks without a vector of their current text after the drain

    @property
    def errors(self) -> int:
        return sum(self.tally.errors.values())

    @property
    def deadlocks(self) -> int:
        return sum(n for (_, state), n in self.tally.errors.items() if state == DEADLOCK)

    @property
    def ok(self) -> bool:
        return (self.errors == 0 and self.deadlocks == 0 and self.server_deadlocks == 0
                and all(a.exact for a in self.accounting) and self.queue_left == 0
                and self.chunks_unembedded == 0)

    def report(self) -> list[str]:
        s, t = self.settings, self.tally
        clients = s.sessions - 1
        in_tx = len([n for n in range(clients) if _in_transactions(n, s)])
        lines = [
            f"{s.sessions} sessions for {s.seconds:g} s: {clients} clients ({in_tx} of them "
            f"running 2-6 calls per transaction; calls: {', '.join(s.calls)}) and 1 worker; "
            f"lock_timeout {s.lock_timeout}; "
            f"models {FAKE} (in-process fake) and {HTTP} (openai SDK -> fake HTTP server)",
            f"{'kind':<14}{'calls':>8}{'calls/s':>10}{'p50 ms':>9}{'p95 ms':>9}{'errors':>8}",
        ]
        for kind in KINDS:
            lat = t.latencies.get(kind, [])
            p50, p95 = percentiles_ms(lat, (50, 95)) if lat else (0.0, 0.0)
            errs = sum(n for (k, _), n in t.errors.items() if k == kind)
            label = "worker batch" if kind == "worker" else kind
            lines.append(f"{label:<14}{t.calls[kind]:>8}{t.calls[kind] / self.window:>10.1f}"
                         f"{p50:>9.1f}{p95:>9.1f}{errs:>8}")
        total = sum(t.calls[k] for k in KINDS)
        lines.append(f"{'all':<14}{total:>8}{total / self.window:>10.1f}{'':>18}{self.errors:>8}"
                     f"   (window {self.window:.1f} s, {self.transactions} multi-call "
                     "transactions committed)")
        lines.append("chosen: " + ", ".join(f"{k} {v}" for k, v in sorted(t.chosen.items())))
        if t.errors:
            lines.append("errors: " + ", ".join(f"{k} {state} x{n}"
                                                for (k, state), n in sorted(t.errors.items())))
            lines.append("  in: " + ", ".join(f"{where} x{n}" for where, n
                                              in sorted(t.errors_where.items())))
            lines.extend(f"  {m}" for m in t.messages)
        else:
            lines.append("errors: none")
        if t.rolled_back:
            lines.append(f"rolled back after an error: {t.rolled_back['transactions']} "
                         f"transactions holding {t.rolled_back['calls']} calls that had "
                         f"succeeded, in which the fake model was called "
                         f"{t.rolled_back['fake provider calls']} times (usage rows are written "
                         "in the caller's transaction: they went with it)")
        lines.append(f"deadlocks: {self.deadlocks} seen by clients (40P01), "
                     f"{self.server_deadlocks} counted by the server; lock timeouts (55P03): "
                     f"{sum(n for (_, st), n in t.errors.items() if st == LOCK_TIMEOUT)}")
        events: Counter[str] = Counter()
        for (event, _, _), n in self.lock_waits.items():
            events[event] += n
        lines.append("lock waits sampled every 50 ms: " + (", ".join(
            f"{n} on {event}" for event, n in events.most_common()) or "none")
            + (" (extend: a page added to a table, not a row lock)" if "extend" in events else ""))
        shown = sorted(self.lock_waits.items(), key=lambda w: (w[0][0] == "extend", -w[1]))
        lines.extend(f"  {n} x [{event}] {waiting} <- {blocking}"
                     for (event, waiting, blocking), n in shown[:6])
        w, d = self.worker_window, self.worker_drain
        lines.append(f"worker: {w.embedded} chunks in {w.batches} batches during the window "
                     f"({w.failed} failed, {w.retried} retried), {d.embedded} after it "
                     f"({self.drain_seconds:.1f} s to drain); queue left {self.queue_left}, "
                     f"chunks without a current vector {self.chunks_unembedded}")
        lines.append("accounting, pyembed.usage requests vs provider calls:")
        for a in self.accounting:
            lines.append(f"  {a.model_key}: usage {a.usage_requests}, provider "
                         f"{a.provider_calls} ({a.counted_by}): "
                         f"{'exact' if a.exact else 'MISMATCH'}")
        lines.append("OK" if self.ok else "FAILED")
        return lines


# -- texts -------------------------------------------------------------------------------------

def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _document(rng: random.Random, label: str) -> str:
    return f"{label}. " + ". ".join(_sentence(rng, rng.randint(6, 14))
                                    for _ in range(rng.randint(2, 8))) + "."


class Texts:
    """The repeated texts and queries every session draws from, and new ones."""

    def __init__(self, settings: LoadSettings) -> None:
        rng = random.Random(settings.seed)
        self.shared = [f"shared note {i}: {_sentence(rng, 10)}"
                       for i in range(settings.shared_texts)]
        self.queries = [f"how do I handle {_sentence(rng, 3)}?"
                        for _ in range(settings.shared_queries)]


# -- sessions ----------------------------------------------------------------------------------

def _in_transactions(client: int, settings: LoadSettings) -> bool:
    return client % settings.transaction_every == settings.transaction_every - 1


class Client:
    """One application session: a random mix of calls until the deadline."""

    def __init__(self, n: int, dsn: str, settings: LoadSettings, texts: Texts, tally: Tally
                 ) -> None:
        self.n, self.dsn, self.settings, self.texts, self.tally = n, dsn, settings, texts, tally
        self.rng = random.Random(settings.seed * 1000 + n + 1)
        self.in_tx = _in_transactions(n, settings)
        self.made = 0
        self.documents: dict[str, list[str]] = {c: [] for c in CORPORA.values()}
        self.transactions = 0
        self.provider_calls: dict[str, int] | None = None  # from the probe, at the end

    def _new(self, what: str) -> str:
        self.made += 1
        self.tally.choose(what)
        return f"session {self.n} item {self.made}"

    def embed(self, conn: psycopg.Connection[Any]) -> None:
        key = self.rng.choice((FAKE, HTTP))
        if self.rng.random() < 0.5:
            self.tally.choose("embed repeated")
            text = self.rng.choice(self.texts.shared)
        else:
            text = f"{self._new('embed new')}: {_sentence(self.rng, 10)}"
        row = conn.execute("SELECT vector_dims(pyembed.embed(%s, %s))", (text, key)).fetchone()
        assert row is not None and row[0] == int(key.rsplit(":", 1)[1]), row

    def search(self, conn: psycopg.Connection[Any]) -> None:
        corpus = self.rng.choice(list(CORPORA.values()))
        mode = self.rng.choice(("vector", "hybrid"))
        if self.rng.random() < 0.5:
            self.tally.choose("query repeated")
            query = self.rng.choice(self.texts.queries)
        else:
            query = f"{self._new('query new')}: {_sentence(self.rng, 4)}?"
        conn.execute("SELECT count(*) FROM pyembed.search_text(%s, %s, 5, NULL, %s)",
                     (corpus, query, mode)).fetchone()

    def add_document(self, conn: psycopg.Connection[Any]) -> None:
        corpus = self.rng.choice(list(CORPORA.values()))
        own = self.documents[corpus]
        if own and self.rng.random() < 0.25:
            self.tally.choose("document changed")
            document_id = self.rng.choice(own)
        else:
            self.tally.choose("document new")
            document_id = f"s{self.n}-d{len(own)}"
            own.append(document_id)
        text = _document(self.rng, f"{document_id} version {self.made}")
        self.made += 1
        row = conn.execute("SELECT pyembed.add_document(%s, %s, %s)",
                           (corpus, document_id, text)).fetchone()
        assert row is not None and row[0] >= 1, row

    def _pick(self) -> tuple[str, Callable[[psycopg.Connection[Any]], None]]:
        weights = {"embed": 0.4, "search_text": 0.35, "add_document": 0.25}
        kinds = [k for k in weights if k in self.settings.calls]
        kind = self.rng.choices(kinds, [weights[k] for k in kinds])[0]
        return kind, {"embed": self.embed, "search_text": self.search,
                      "add_document": self.add_document}[kind]

    @property
    def where(self) -> str:
        return f"{'transaction' if self.in_tx else 'autocommit'} session {self.n}"

    def _timed(self, kind: str, call: Callable[[psycopg.Connection[Any]], None],
               conn: psycopg.Connection[Any]) -> None:
        start = time.perf_counter()
        try:
            call(conn)
        except psycopg.Error as exc:
            self.tally.error(kind, self.where, exc)
            raise
        self.tally.ok(kind, time.perf_counter() - start)

    def warm_up(self, conn: psycopg.Connection[Any]) -> None:
        """Load pyembed, numpy and the openai SDK in the backend before the window."""
        for key in (FAKE, HTTP):
            conn.execute("SELECT vector_dims(pyembed.embed(%s, %s))",
                         (f"warm-up {self.n} {key}", key)).fetchone()
        if self.in_tx:
            conn.commit()

    def run(self, start: threading.Barrier, deadline: list[float]) -> None:
        try:
            conn = connect(self.dsn, autocommit=not self.in_tx)
        except psycopg.Error as exc:
            self.tally.error("connect", self.where, exc)
            start.abort()
            return
        with conn:
            try:
                self.warm_up(conn)
            except psycopg.Error as exc:
                self.tally.error("warm-up", self.where, exc)
                conn.rollback()
            try:
                start.wait()
            except threading.BrokenBarrierError:
                self.tally.error("start", self.where, "a session did not start")
                return
            while time.monotonic() < deadline[0]:
                calls = [self._pick() for _ in range(self.rng.randint(2, 6) if self.in_tx else 1)]
                done = 0
                if self.in_tx:  # what a rollback will take away, in a transaction of its own
                    fake_before = self._fake_calls(conn)
                try:
                    for kind, call in calls:
                        self._timed(kind, call, conn)
                        done += 1
                    if self.in_tx:
                        try:
                            conn.commit()
                        except psycopg.Error as exc:
                            self.tally.error("commit", self.where, exc)
                            raise
                        self.transactions += 1
                except psycopg.Error:
                    if conn.broken:
                        return
                    conn.rollback()
                    if self.in_tx:  # calls that succeeded, undone with their usage rows
                        self.tally.roll_back(done, self._fake_calls(conn) - fake_before)
            try:
                self.provider_calls = self._probe(conn)
            except psycopg.Error as exc:
                self.tally.error("probe", self.where, exc)

    def _probe(self, conn: psycopg.Connection[Any]) -> dict[str, int]:
        """The FakeProvider calls made by this session's backend, per model key."""
        rows = conn.execute("SELECT model_key, calls FROM load_probe.provider_calls()").fetchall()
        conn.commit()  # (a no-op in autocommit)
        return {str(k): int(c) for k, c in rows}

    def _fake_calls(self, conn: psycopg.Connection[Any]) -> int:
        return self._probe(conn).get(FAKE, 0)


class LoadWorker:
    """The worker session: Worker.run_once in a loop; its providers are kept to count calls,
    and each provider call is metered to the corpus of its model (one corpus per model)."""

    def __init__(self, dsn: str, settings: LoadSettings, api: FakeAPI, corpus_ids: dict[str, int],
                 tally: Tally) -> None:
        self.tally = tally
        self.api, self.corpus_ids = api, corpus_ids
        self.providers: list[FakeProvider] = []
        self.meter_conn = connect(dsn, autocommit=True)
        self.worker = Worker(dsn, batch_size=settings.worker_batch, retry_base=0.05,
                             embedder_for=self._embedder)

    def _embedder(self, spec: ModelSpec, cache: PostgresCache) -> Embedder:
        provider = provider_for(spec, api_key=API_KEY if spec.api_key_env else None,
                                base_url=self.api.base_url("openai")
                                if spec.provider == "openai" else None)
        if isinstance(provider, FakeProvider):
            self.providers.append(provider)
        return Embedder(spec, provider, cache=cache,
                        meter=meter(self.meter_conn, self.corpus_ids[spec.key]))

    @property
    def fake_calls(self) -> int:
        return sum(p.calls for p in self.providers)

    def once(self, stats: WorkerStats, *, timed: bool) -> bool:
        """One batch; whether there was one."""
        batches, reported = stats.batches, len(stats.errors)
        start = time.perf_counter()
        try:
            self.worker.run_once(stats)
        except Exception as exc:  # whatever stops a batch is an error here
            self.tally.error("worker", "worker", exc)
            time.sleep(0.05)
            return True
        for message in stats.errors[reported:]:  # a job failed, or put back to retry
            self.tally.error("worker", "worker", message)
        claimed = stats.batches > batches
        if claimed and timed:
            self.tally.ok("worker", time.perf_counter() - start)
        return claimed

    def run(self, start: threading.Barrier, deadline: list[float], stats: WorkerStats) -> None:
        try:
            start.wait()
        except threading.BrokenBarrierError:
            return
        while time.monotonic() < deadline[0]:
            if not self.once(stats, timed=True):
                time.sleep(0.05)

    def drain(self, stats: WorkerStats, limit: float = 60.0) -> None:
        stop = time.monotonic() + limit
        idle = 0
        while time.monotonic() < stop and idle < 3:
            if self.once(stats, timed=False):
                idle = 0
            else:
                idle += 1
                time.sleep(0.1)

    def close(self) -> None:
        self.worker.close()
        self.meter_conn.close()


class LockWaits:
    """Samples pg_stat_activity for sessions waiting on a lock: (wait event, the waiting
    statement, the statement of the first session blocking it)."""

    QUERY = """
    SELECT a.wait_event, left(regexp_replace(a.query, '\\s+', ' ', 'g'), 70),
           coalesce((SELECT left(regexp_replace(b.query, '\\s+', ' ', 'g'), 70)
                       FROM pg_stat_activity b WHERE b.pid = (pg_blocking_pids(a.pid))[1]), '?')
      FROM pg_stat_activity a
     WHERE a.datname = current_database() AND a.wait_event_type = 'Lock'"""

    def __init__(self, owner_dsn: str) -> None:
        self.seen: Counter[tuple[str, str, str]] = Counter()
        self._stop = threading.Event()
        self._conn = connect(owner_dsn, autocommit=True)
        self._thread = threading.Thread(target=self._run, name="lock waits", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for event, waiting, blocking in self._conn.execute(self.QUERY).fetchall():
                self.seen[str(event), str(waiting), str(blocking)] += 1

    def stop(self) -> Counter[tuple[str, str, str]]:
        self._stop.set()
        self._thread.join(10)
        self._conn.close()
        return self.seen


# -- the run -----------------------------------------------------------------------------------

def _scalar(conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def _deadlocks(owner: psycopg.Connection[Any]) -> int:
    owner.execute("SELECT pg_stat_clear_snapshot()")
    return int(_scalar(owner, "SELECT deadlocks FROM pg_stat_database "
                              "WHERE datname = current_database()"))


def _with_lock_timeout(dsn: str, lock_timeout: str) -> str:
    return make_conninfo(dsn, options=f"-c lock_timeout={lock_timeout}")


def _prepare(owner: psycopg.Connection[Any], app_dsn: str, api: FakeAPI,
             settings: LoadSettings) -> dict[str, int]:
    """Secrets, the probe, the two corpora and their seed documents (queued); corpus ids."""
    owner.execute("SELECT pyembed.set_secret('OPENAI_API_KEY', %s)", (API_KEY,))
    owner.execute("SELECT pyembed.set_secret('PYEMBED_OPENAI_BASE_URL', %s)",
                  (api.base_url("openai"),))
    owner.execute(PROBE)
    rng = random.Random(settings.seed)
    corpus_ids = {}
    with connect(app_dsn, autocommit=True) as app:
        for key, corpus in CORPORA.items():
            corpus_ids[key] = int(_scalar(app, "SELECT pyembed.create_corpus(%s, %s, '', 40, 8)",
                                          (corpus, key)))
            for i in range(settings.seed_documents):
                app.execute("SELECT pyembed.add_document(%s, %s, %s)",
                            (corpus, f"seed-{i}", _document(rng, f"seed document {i}")))
    return corpus_ids


def run_load(owner_dsn: str, app_dsn: str, settings: LoadSettings | None = None,
             progress: Callable[[str], None] | None = None) -> LoadResult:
    """Run the load against a database at head (owner_dsn: a superuser, to install the probe;
    app_dsn: the application role) and check it; the database is left as the run made it."""
    settings = settings or LoadSettings()
    if settings.sessions < 2:
        raise ValueError("at least 2 sessions: one worker and one client")
    if not settings.calls or not set(settings.calls) <= set(KINDS[:3]):
        raise ValueError(f"calls: some of {', '.join(KINDS[:3])}")
    say = progress or (lambda text: None)
    dsn = _with_lock_timeout(app_dsn, settings.lock_timeout)
    texts, tally = Texts(settings), Tally()
    t0 = time.monotonic()
    with FakeAPI() as api, connect(owner_dsn, autocommit=True) as owner:
        corpus_ids = _prepare(owner, app_dsn, api, settings)
        worker = LoadWorker(dsn, settings, api, corpus_ids, tally)
        clients = [Client(n, dsn, settings, texts, tally) for n in range(settings.sessions - 1)]
        start = threading.Barrier(settings.sessions + 1)
        deadline = [float("inf")]
        in_window = WorkerStats()
        threads = [threading.Thread(target=c.run, args=(start, deadline), name=f"client {c.n}")
                   for c in clients]
        threads.append(threading.Thread(target=worker.run, args=(start, deadline, in_window),
                                        name="worker"))
        try:
            seeded = WorkerStats()
            worker.drain(seeded)
            say(f"seeded: {seeded.embedded} chunks embedded ({time.monotonic() - t0:.1f} s)")
            deadlocks_before = _deadlocks(owner)
            for t in threads:
                t.start()
            waits = LockWaits(owner_dsn)
            try:
                start.wait(timeout=120)  # every backend warmed up (imports done)
            except threading.BrokenBarrierError:
                tally.error("start", "main", "the sessions did not all start")
            began = time.monotonic()
            deadline[0] = began + settings.seconds
            say(f"warmed up ({time.monotonic() - t0:.1f} s); running {settings.sessions} "
                f"sessions for {settings.seconds:g} s")
            for t in threads[:-1]:
                t.join()
            window = time.monotonic() - began  # until the last client's last call ended
            threads[-1].join()
            lock_waits = waits.stop()
            drained, drain_start = WorkerStats(), time.monotonic()
            worker.drain(drained)
            drain_seconds = time.monotonic() - drain_start
            say(f"window and drain done ({time.monotonic() - t0:.1f} s)")
        finally:
            deadline[0] = float("-inf")  # (on the way out after a failure: stop the sessions)
            start.abort()
            for t in threads:
                if t.is_alive():
                    t.join(30)
            worker.close()
        time.sleep(0.5)  # ended sessions report their statistics
        server_deadlocks = _deadlocks(owner) - deadlocks_before
        queue_left = int(_scalar(owner, "SELECT count(*) FROM pyembed.queue"))
        unembedded = int(_scalar(owner, """
            SELECT count(*) FROM pyembed.chunks ch WHERE NOT EXISTS (
              SELECT FROM pyembed.vectors v WHERE v.corpus_id = ch.corpus_id
                 AND v.chunk_id = ch.chunk_id AND v.content_hash = ch.content_hash)"""))
        usage = dict(owner.execute("SELECT model_key, sum(requests)::bigint FROM pyembed.usage "
                                   "GROUP BY model_key").fetchall())
        in_db = sum((c.provider_calls or {}).get(FAKE, 0) for c in clients)
        missing = [c.n for c in clients if c.provider_calls is None]
        lost = tally.rolled_back["fake provider calls"]
        accounting = [
            Accounting(HTTP, int(usage.get(HTTP, 0)), len(api.requests_to("openai")),
                       "embedding requests the fake HTTP server received"),
            Accounting(FAKE, int(usage.get(FAKE, 0)), in_db + worker.fake_calls,
                       f"FakeProvider call counters: {in_db} in the sessions' backends, "
                       f"{worker.fake_calls} in the worker"
                       + (f"; {lost} in rolled-back transactions" if lost else "")
                       + (f"; no count from sessions {missing}" if missing else "")),
        ]
    return LoadResult(settings, window, tally, accounting, sum(c.transactions for c in clients),
                      server_deadlocks, lock_waits, in_window, drained, drain_seconds,
                      queue_left, unembedded)


# -- the script --------------------------------------------------------------------------------

@contextmanager
def _database(home: str) -> Iterator[tuple[str, str]]:
    from tests.benchmarks.common import local_database, print_environment

    with local_database(home, prefix="bench_load") as target:
        assert target.app_dsn is not None
        with connect(target.owner_dsn) as owner:
            print_environment(owner)
        yield target.owner_dsn, target.app_dsn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--sessions", type=int, default=16, help="including the worker")
    parser.add_argument("--lock-timeout", default="5s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calls", default=",".join(KINDS[:3]),
                        help="the clients' mix, comma-separated (default: all three)")
    parser.add_argument("--home", default=".pyembed-bench-load",
                        help="the local cluster's folder (relative to the repository)")
    args = parser.parse_args(argv)
    settings = LoadSettings(seconds=args.seconds, sessions=args.sessions,
                            lock_timeout=args.lock_timeout, seed=args.seed,
                            calls=tuple(args.calls.split(",")))
    with _database(args.home) as (owner_dsn, app_dsn):
        result = run_load(owner_dsn, app_dsn, settings, progress=lambda t: print(t, flush=True))
    print("\n".join(result.report()))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
