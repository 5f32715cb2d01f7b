"""`pyembed worker` against a real PostgreSQL: draining, poison items, failures, rate limits,
hung services, races with text updates, killed workers and backends, SIGTERM, privileges.

Embedders are injected through Worker(embedder_for=...) so that each test can see (and
script) what reaches the provider; the SDK paths go through the real openai SDK to the
fake API server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
import pytest
from pgvector import Vector
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pyembed import worker as worker_module
from pyembed.cache import PostgresCache
from pyembed.db import connect, resolve_dsn
from pyembed.embedder import Embedder
from pyembed.errors import ProviderError
from pyembed.localdb import APP_USER, WORKER_USER, LocalCluster
from pyembed.models import InputType, ModelSpec
from pyembed.providers import provider_for
from pyembed.providers.fake import FakeProvider, fake_vectors
from pyembed.text import estimate_tokens, sha256
from pyembed.worker import Worker, WorkerStats
from tests.conftest import REPO, Database
from tests.fakeapi import FakeAPI, server_vectors
from tests.helpers import login_role

FAKE = "fake/fake-hash@1:384"
LOCAL = "local/all-minilm-l6-v2-int8@1:384"
VOYAGE = "voyage/voyage-3@1:1024"
OPENAI = "openai/text-embedding-3-small@1:1536"
OPENAI_KEY = "sk-openai-worker-test"

EmbedderFor = Callable[[ModelSpec, PostgresCache], Embedder]

SQLQuery = str | sql.SQL | sql.Composed


# -- helpers ---------------------------------------------------------------------------------
def one(conn: psycopg.Connection[Any], query: SQLQuery, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def make_corpus(app: psycopg.Connection[Any], name: str, key: str) -> int:
    return int(one(app, "SELECT pyembed.create_corpus(%s, %s)", (name, key)))


def add_docs(app: psycopg.Connection[Any], corpus: str, texts: list[str],
             prefix: str = "doc") -> None:
    """One single-chunk document per text, through pyembed.add_document (which queues)."""
    with app.cursor() as cur:
        cur.executemany("SELECT pyembed.add_document(%s, %s, %s)",
                        [(corpus, f"{prefix}{i:03d}", t) for i, t in enumerate(texts)])


def texts_for(n: int, topic: str = "item") -> list[str]:
    return [f"{topic} {i} talks about subject {i % 7} and detail {i * 31 % 101}" for i in range(n)]


def chunk_id_of(app: psycopg.Connection[Any], text: str) -> int:
    return int(one(app, "SELECT chunk_id FROM pyembed.chunks WHERE content = %s", (text,)))


def count(conn: psycopg.Connection[Any], table: str) -> int:
    return int(one(conn, sql.SQL("SELECT count(*) FROM pyembed.{}").format(
        sql.Identifier(table))))


def fresh_vectors(app: psycopg.Connection[Any]) -> int:
    """Vectors whose content hash is their chunk's current one."""
    return int(one(app, "SELECT count(*) FROM pyembed.vectors v JOIN pyembed.chunks ch "
                        "USING (corpus_id, chunk_id) WHERE v.content_hash = ch.content_hash"))


def stored_embeddings(owner: psycopg.Connection[Any]) -> dict[str, npt.NDArray[np.float32]]:
    """chunk text -> stored embedding (the owner may read vectors; the app role may not)."""
    rows = owner.execute("SELECT ch.content, v.embedding FROM pyembed.vectors v "
                         "JOIN pyembed.chunks ch USING (corpus_id, chunk_id)").fetchall()
    return {c: np.asarray(e.to_numpy() if isinstance(e, Vector) else e, dtype=np.float32)
            for c, e in rows}


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def held_beside(worker: Worker, other: Worker, providers: list[RecordingProvider],
                who: str) -> WorkerStats:
    """`worker.run_once()` on a thread of its own, whose batch's slow provider call (in
    `providers`) lasts several leases, while `other` (`who`) tries to claim every 0.1 s: it
    takes no batch in flight. Both workers are closed; returns `worker`'s stats."""
    result: dict[str, WorkerStats] = {}
    thread = threading.Thread(target=lambda: result.update(stats=worker.run_once()))
    thread.start()
    try:
        wait_for(lambda: bool(providers) and providers[0].calls == 1, 10, "the slow call")
        tries = []
        while thread.is_alive():
            tries.append(other.run_once().batches)
            time.sleep(0.1)
        assert len(tries) > 5 and not any(tries), f"{who} took a batch in flight"
    finally:
        thread.join(timeout=10)
        other.close()
        worker.close()
    return result["stats"]


class RecordingProvider(FakeProvider):
    """The fake model; `hook(self, texts)` runs inside each call, before the vectors return."""

    def __init__(self, spec: ModelSpec,
                 hook: Callable[[RecordingProvider, list[str]], None] | None = None) -> None:
        super().__init__(spec)
        self.hook = hook

    def embed_batch(self, texts: list[str], input_type: InputType) -> npt.NDArray[np.float32]:
        vectors = super().embed_batch(texts, input_type)
        if self.hook is not None:
            self.hook(self, texts)
        return vectors

    @property
    def texts(self) -> list[str]:
        return [t for batch in self.batches for t in batch]


def fake_embedder(providers: list[RecordingProvider],
                  hook: Callable[[RecordingProvider, list[str]], None] | None = None
                  ) -> EmbedderFor:
    def build(spec: ModelSpec, cache: PostgresCache) -> Embedder:
        provider = RecordingProvider(spec, hook)
        providers.append(provider)
        return Embedder(spec, provider, cache=cache)
    return build


def refuse_poison(provider: RecordingProvider, batch: list[str]) -> None:
    """A provider hook that refuses, as a service would (HTTP 400), any batch with POISON."""
    if any("POISON" in t for t in batch):
        raise ProviderError("fake (fake-hash): HTTP 400: input contains POISON")


def run(worker: Worker, drain_wait: float = 5.0) -> WorkerStats:
    return worker.run(drain=True, poll_interval=0.05, drain_wait=drain_wait)


def cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items()
            if not k.startswith("PYEMBED_") and not k.endswith("_API_KEY")}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "pyembed", *args], capture_output=True,
                          text=True, env=full, timeout=timeout, cwd=REPO)


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYEMBED_") and not k.endswith("_API_KEY")}
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.fixture(scope="module")
def api_server() -> Iterator[FakeAPI]:
    with FakeAPI(hang_seconds=3.0) as server:
        yield server


@pytest.fixture
def fake_api(api_server: FakeAPI, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAPI]:
    """The fake API server, reset, with the providers' base URLs and an OpenAI key exported."""
    api_server.reset()
    for name, value in api_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    yield api_server
    api_server.reset()


def sdk_embedder(sleeps: list[float], *, timeout: float = 30.0, max_retries: int = 3
                 ) -> EmbedderFor:
    """The real SDK provider with small retry settings; sleeps are recorded, not slept. The
    timeout is the provider's default unless a test times out on purpose: with 2 s, the storm
    test twice saw one request more than scripted on a loaded host, most likely a reply held
    up past the timeout and the batch sent again."""
    def build(spec: ModelSpec, cache: PostgresCache) -> Embedder:
        return Embedder(spec, provider_for(spec, timeout=timeout), cache=cache,
                        max_retries=max_retries, sleep=sleeps.append)
    return build


# -- draining --------------------------------------------------------------------------------
def test_worker_drains_the_queue_and_a_second_run_does_nothing(
        db: Database, app: psycopg.Connection[Any], owner: psycopg.Connection[Any]) -> None:
    make_corpus(app, "basic", FAKE)
    texts = texts_for(50)
    add_docs(app, "basic", texts)
    assert count(app, "queue") == 50 and count(app, "vectors") == 0

    providers: list[RecordingProvider] = []
    worker = Worker(db.app_dsn, batch_size=16, embedder_for=fake_embedder(providers))
    try:
        stats = run(worker)
        assert (stats.embedded, stats.failed, stats.retried, stats.stale) == (50, 0, 0, 0)
        assert stats.batches == 4 and not stats.all_failed and stats.rate > 0
        assert count(app, "queue") == 0 and count(app, "queue_failed") == 0
        assert fresh_vectors(app) == 50
        assert sorted(providers[0].texts) == sorted(texts)

        # Each chunk got its own text's vector (no mix-up inside a batch).
        stored = stored_embeddings(owner)
        expected = fake_vectors(texts, space="fake-hash@1", dimensions=384)
        for text, vec in zip(texts, expected, strict=True):
            np.testing.assert_allclose(stored[text], vec, atol=1e-6)

        again = run(worker)
        assert (again.embedded, again.batches) == (0, 0)
        assert providers[0].calls == 4
    finally:
        worker.close()


def test_a_worker_is_a_context_manager_that_closes_its_connections(
        db: Database, app: psycopg.Connection[Any]) -> None:
    """`with Worker(...) as worker:`, as `with pyembed.connect() as client:`, closes what the
    worker opened (its connection, its cache's, its lease renewal's) at the block's end.
    Before, Worker had close() but no __enter__: the with statement was a TypeError."""
    make_corpus(app, "managed", FAKE)
    add_docs(app, "managed", texts_for(3))
    with Worker(db.app_dsn, embedder_for=fake_embedder([])) as worker:
        assert run(worker).embedded == 3
        opened = [c for c in (worker._conn, worker._cache_conn) if c is not None]
        assert opened and not any(c.closed for c in opened)
    assert all(c.closed for c in opened)
    assert worker._leases._conn is None


def test_a_poison_text_is_failed_and_the_others_are_stored(
        db: Database, app: psycopg.Connection[Any]) -> None:
    corpus_id = make_corpus(app, "poison", FAKE)
    texts = texts_for(48)
    texts.insert(20, "this one is POISON for the provider")
    add_docs(app, "poison", texts)
    # A chunk over the fake model's 2,048-token limit (add_document would have split it).
    app.execute("INSERT INTO pyembed.documents (corpus_id, document_id, content_hash) "
                "VALUES (%s, 'huge', '\\x00')", (corpus_id,))
    app.execute("INSERT INTO pyembed.chunks (corpus_id, document_id, chunk_index, content) "
                "VALUES (%s, 'huge', 0, repeat('word ', 3000))", (corpus_id,))
    assert count(app, "queue") == 50

    providers: list[RecordingProvider] = []
    worker = Worker(db.app_dsn, batch_size=64, max_attempts=3, retry_base=0.02,
                    retry_max=0.1, embedder_for=fake_embedder(providers, refuse_poison))
    try:
        stats = run(worker)
    finally:
        worker.close()
    assert stats.embedded == 48 and stats.failed == 2 and not stats.all_failed
    assert count(app, "queue") == 0
    assert fresh_vectors(app) == 48
    failed = {d: (a, r) for d, a, r in app.execute(
        "SELECT ch.document_id, f.attempts, f.reason FROM pyembed.queue_failed f "
        "JOIN pyembed.chunks ch USING (corpus_id, chunk_id)")}
    assert set(failed) == {"doc020", "huge"}
    attempts, reason = failed["doc020"]
    assert attempts == 3 and "gave up after 3 attempts" in reason and "POISON" in reason
    attempts, reason = failed["huge"]
    assert attempts == 1 and reason.startswith("invalid text") and "2048-token limit" in reason
    # The too-long text never reached the provider.
    assert not any(t.startswith("word word") for p in providers for t in p.texts)


@pytest.mark.parametrize("setup", ["no API key", "unknown local model"])
def test_a_corpus_the_worker_cannot_embed_for_stops_no_other_corpus(
        db: Database, app: psycopg.Connection[Any], owner: psycopg.Connection[Any],
        setup: str) -> None:
    """Any tenant may create a corpus on a model whose API key the worker lacks, or on a local
    model the owner registered that pyembed does not have: its jobs are given back, and every
    other corpus's are still embedded. Before, the first such job stopped the worker for everyone."""
    if setup == "no API key":
        key, expected = VOYAGE, "VOYAGE_API_KEY"
    else:
        key = one(owner, "SELECT pyembed.register_model('local', 'nosuchmodel', '1', 384, "
                       "'cosine', true, false, 64, 512, NULL, NULL, NULL)")
        expected = "the local provider runs only"
    make_corpus(app, "blocked", key)
    add_docs(app, "blocked", texts_for(3, "blocked"), prefix="b")  # queued first
    make_corpus(app, "other", FAKE)
    add_docs(app, "other", texts_for(5, "other"))

    result = cli("worker", env={"PYEMBED_DSN": db.app_dsn})

    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert fresh_vectors(app) == 5  # the other corpus was embedded
    assert one(app, "SELECT array_agg(DISTINCT model_key) FROM pyembed.queue") == [key]
    assert one(app, "SELECT max(attempts) FROM pyembed.queue") == 0  # given back untouched
    assert count(app, "queue") == 3 and count(app, "queue_failed") == 0


def test_when_everything_fails_the_cli_exits_non_zero_with_one_line(
        db: Database, app: psycopg.Connection[Any], owner: psycopg.Connection[Any]) -> None:
    make_corpus(app, "nokey", VOYAGE)
    add_docs(app, "nokey", texts_for(3))
    result = cli("worker", "--max-attempts", "1", env={"PYEMBED_DSN": db.app_dsn})
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "VOYAGE_API_KEY" in lines[0] and "Traceback" not in result.stderr
    # A setup error loses nothing: the items are given back, ready for when the key is set.
    assert count(app, "queue_failed") == 0 and count(app, "queue") == 3
    assert one(app, "SELECT max(attempts) FROM pyembed.queue") == 0

    # A run where every item fails on its own is reported as a failure too.
    make_corpus(app, "allbad", FAKE)
    add_docs(app, "allbad", ["POISON one", "POISON two"], prefix="bad")
    owner.execute("DELETE FROM pyembed.queue WHERE model_key = %s", (VOYAGE,))
    worker = Worker(db.app_dsn, max_attempts=1, embedder_for=fake_embedder([], refuse_poison))
    try:
        stats = run(worker)
    finally:
        worker.close()
    assert stats.all_failed and stats.embedded == 0 and stats.failed == 2


# -- the real SDK against the fake API ------------------------------------------------------
def test_a_429_storm_is_ridden_out_through_the_openai_sdk(
        db: Database, app: psycopg.Connection[Any], owner: psycopg.Connection[Any],
        fake_api: FakeAPI) -> None:
    make_corpus(app, "storm", OPENAI)
    texts = texts_for(20, "storm")
    add_docs(app, "storm", texts)
    sleeps: list[float] = []
    worker = Worker(db.app_dsn, batch_size=64, retry_base=0.05, retry_max=0.2,
                    embedder_for=sdk_embedder(sleeps, max_retries=3))
    try:
        # Three 429s, then the answer: the embedder retries inside one claim.
        fake_api.script(["429:retry-after=0"] * 3)
        stats = run(worker)
        assert (stats.embedded, stats.retried, stats.failed) == (20, 0, 0)
        requests = fake_api.requests_to("openai")
        assert len(requests) == 4
        assert all(r.body["input"] == requests[0].body["input"] for r in requests)
        assert sorted(requests[0].body["input"]) == sorted(texts)
        assert requests[-1].headers["authorization"] == f"Bearer {OPENAI_KEY}"
        assert sleeps == [0.0, 0.0, 0.0]

        # A storm longer than the embedder's retries: the worker reschedules the batch,
        # then embeds it; the 20 texts already cached are not sent again.
        more = texts_for(5, "later")
        add_docs(app, "storm", more, prefix="later")
        fake_api.reset()
        fake_api.script(["429:retry-after=0"] * 4)
        first = worker.run_once()
        assert (first.embedded, first.retried, first.failed) == (0, 5, 0)
        # The service asked for no wait (Retry-After: 0): the worker's own backoff, not the
        # minute a tenant's limit waits for.
        assert one(owner, "SELECT max(not_before - now()) < interval '5 seconds' "
                          "FROM pyembed.queue") is True
        # rescheduled together, so the batch is claimed again whole
        assert owner.execute("SELECT count(DISTINCT not_before) FROM pyembed.queue"
                             ).fetchone() == (1,)
        stats = run(worker)
        assert (stats.embedded, stats.retried, stats.failed) == (5, 0, 0)
        assert len(fake_api.requests) == 5
        assert sorted(fake_api.requests[-1].body["input"]) == sorted(more)
    finally:
        worker.close()
    assert count(app, "queue") == 0 and fresh_vectors(app) == 25
    stored = stored_embeddings(owner)
    expected = server_vectors("openai", "text-embedding-3-small", texts + more, 1536)
    for text, vec in zip(texts + more, expected, strict=True):
        np.testing.assert_allclose(stored[text], vec, atol=1e-6)


def test_a_hung_api_is_bounded_by_the_timeout_and_holds_no_transaction(
        db: Database, app: psycopg.Connection[Any], owner: psycopg.Connection[Any],
        fake_api: FakeAPI) -> None:
    make_corpus(app, "hung", OPENAI)
    add_docs(app, "hung", texts_for(6, "hung"))
    sleeps: list[float] = []
    worker = Worker(db.app_dsn, batch_size=64, retry_base=0.05, retry_max=0.2,
                    embedder_for=sdk_embedder(sleeps, timeout=1.0, max_retries=0))
    fake_api.script("hang")
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["stats"] = worker.run_once()
        except BaseException as exc:  # reported by the main thread
            result["error"] = exc

    thread = threading.Thread(target=work, name="worker")
    thread.start()
    try:
        wait_for(lambda: len(fake_api.requests) == 1, 10, "the hanging request")
        seen = time.monotonic()
        states: list[tuple[int, str | None]] = []
        while not states or (thread.is_alive() and time.monotonic() - seen < 0.6):
            states += owner.execute(
                "SELECT pid, state FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND backend_type = 'client backend'").fetchall()
            time.sleep(0.05)
        thread.join(timeout=10)
        assert not thread.is_alive()
        elapsed = time.monotonic() - seen  # the worker's start (connect, claim) not counted
    finally:
        thread.join(timeout=10)
    assert "error" not in result, result.get("error")
    assert states, "no sample of the worker's connections was taken during the hang"
    assert {s for _, s in states} <= {"idle", "active"}, states
    assert not [s for s in states if s[1] == "idle in transaction"]
    # Unbounded, the call would end with the hang, seen at most a poll after it began.
    assert elapsed < fake_api.hang_seconds - 0.5, f"the timeout did not bound the call: {elapsed:.1f}s"

    stats: WorkerStats = result["stats"]
    assert (stats.embedded, stats.retried) == (0, 6)
    errors = [r[0] for r in app.execute("SELECT last_error FROM pyembed.queue")]
    assert len(errors) == 6 and all("no response" in (e or "") for e in errors), errors
    try:
        stats = run(worker)  # the server answers now
    finally:
        worker.close()
    assert stats.embedded == 6 and count(app, "queue") == 0


# -- races -----------------------------------------------------------------------------------
def test_text_updated_while_its_embedding_is_in_flight(
        db: Database, app: psycopg.Connection[Any], owner: psycopg.Connection[Any]) -> None:
    make_corpus(app, "race", FAKE)
    texts = texts_for(10, "race")
    add_docs(app, "race", texts)
    victim = chunk_id_of(app, texts[3])
    new_text = "a completely rewritten paragraph about something else"

    def rewrite(provider: RecordingProvider, batch: list[str]) -> None:
        if provider.calls == 1:
            with connect(db.app_dsn, autocommit=True) as other:
                other.execute("UPDATE pyembed.chunks SET content = %s WHERE chunk_id = %s",
                              (new_text, victim))

    providers: list[RecordingProvider] = []
    worker = Worker(db.app_dsn, batch_size=64, embedder_for=fake_embedder(providers, rewrite))
    try:
        stats = worker.run_once()
        assert (stats.embedded, stats.stale) == (9, 1)
        hashes = [bytes(r[0]) for r in app.execute(
            "SELECT content_hash FROM pyembed.vectors WHERE chunk_id = %s", (victim,))]
        assert hashes in ([], [sha256(new_text)]), "a vector of the old text was stored"
        assert app.execute("SELECT content_hash, attempts FROM pyembed.queue").fetchall() == [
            (sha256(new_text), 0)]

        stats = worker.run_once()
        assert stats.embedded == 1
    finally:
        worker.close()
    assert count(app, "queue") == 0 and fresh_vectors(app) == 10
    np.testing.assert_allclose(stored_embeddings(owner)[new_text],
                               fake_vectors([new_text], space="fake-hash@1", dimensions=384)[0],
                               atol=1e-6)


def test_a_stale_write_never_removes_a_newer_vector(
        db: Database, app: psycopg.Connection[Any]) -> None:
    make_corpus(app, "race2", FAKE)
    texts = texts_for(4, "race2")
    add_docs(app, "race2", texts)
    victim = chunk_id_of(app, texts[1])
    new_text = "the rewritten text, embedded by a second worker first"
    other_worker = Worker(db.app_dsn, batch_size=64, embedder_for=fake_embedder([]))
    seen: list[WorkerStats] = []

    def rewrite_and_let_another_worker_finish(provider: RecordingProvider,
                                              batch: list[str]) -> None:
        if provider.calls == 1:
            with connect(db.app_dsn, autocommit=True) as other:
                other.execute("UPDATE pyembed.chunks SET content = %s WHERE chunk_id = %s",
                              (new_text, victim))
            seen.append(other_worker.run_once())

    worker = Worker(db.app_dsn, batch_size=64,
                    embedder_for=fake_embedder([], rewrite_and_let_another_worker_finish))
    try:
        worker.run_once()
    finally:
        worker.close()
        other_worker.close()
    assert seen[0].embedded == 1  # the second worker stored the new text's vector
    # Either the new text's vector is still there, or the chunk is queued again.
    has_vector = one(app, "SELECT count(*) FROM pyembed.vectors WHERE chunk_id = %s "
                          "AND content_hash = %s", (victim, sha256(new_text)))
    queued = one(app, "SELECT count(*) FROM pyembed.queue WHERE chunk_id = %s", (victim,))
    assert has_vector == 1 or queued == 1, "the chunk has no vector and is not queued: lost"


# -- jobs that can never be stored ------------------------------------------------------------
FAKE_1024 = "fake/fake-hash@1:1024"


def test_a_job_for_a_key_its_corpus_does_not_accept_is_failed_before_any_call(
        db: Database, app: psycopg.Connection[Any], owner: psycopg.Connection[Any]) -> None:
    make_corpus(app, "keyed", FAKE)
    texts = texts_for(3, "keyed")
    add_docs(app, "keyed", texts)
    victim = chunk_id_of(app, texts[0])
    # As the owner, past the trigger that refuses such a row at INSERT (if it is installed).
    with owner.transaction():
        owner.execute("ALTER TABLE pyembed.queue DISABLE TRIGGER USER")
        owner.execute("INSERT INTO pyembed.queue (corpus_id, chunk_id, model_key, content_hash) "
                      "SELECT corpus_id, chunk_id, %s, content_hash FROM pyembed.chunks "
                      "WHERE chunk_id = %s", (FAKE_1024, victim))
        owner.execute("ALTER TABLE pyembed.queue ENABLE TRIGGER USER")

    providers: list[RecordingProvider] = []
    worker = Worker(db.app_dsn, batch_size=64, embedder_for=fake_embedder(providers))
    try:
        stats = run(worker)
    finally:
        worker.close()
    assert (stats.embedded, stats.failed, stats.stale) == (3, 1, 0)
    assert [p.spec.key for p in providers] == [FAKE]  # no provider for the refused key
    assert count(app, "queue") == 0 and fresh_vectors(app) == 3
    failed = app.execute("SELECT chunk_id, model_key, attempts, reason "
                         "FROM pyembed.queue_failed").fetchall()
    assert failed == [(victim, FAKE_1024, 0, f"model key {FAKE_1024} is not accepted by corpus "
                                             f"keyed (active key {FAKE})")]


def test_a_key_withdrawn_mid_batch_fails_its_jobs_and_spares_the_other_corpus(
        db: Database, app: psycopg.Connection[Any], owner: psycopg.Connection[Any]) -> None:
    make_corpus(app, "left", FAKE)
    make_corpus(app, "right", FAKE)
    add_docs(app, "left", texts_for(3, "left"))
    add_docs(app, "right", texts_for(3, "right"))

    def withdraw_the_key(provider: RecordingProvider, batch: list[str]) -> None:
        # The owner re-pins `left` while its batch is being embedded, past the guard (the
        # migration steps would also dequeue its jobs).
        if provider.calls == 1:
            with connect(db.owner_dsn) as other, other.transaction():
                other.execute("ALTER TABLE pyembed.corpora "
                              "DISABLE TRIGGER corpora_guard_model_key")
                other.execute("UPDATE pyembed.corpora SET model_key = %s WHERE name = 'left'",
                              (FAKE_1024,))
                other.execute("ALTER TABLE pyembed.corpora "
                              "ENABLE TRIGGER corpora_guard_model_key")

    providers: list[RecordingProvider] = []
    worker = Worker(db.app_dsn, batch_size=64,
                    embedder_for=fake_embedder(providers, withdraw_the_key))
    try:
        stats = worker.run_once()
    finally:
        worker.close()
    assert stats.batches == 1 and (stats.embedded, stats.failed) == (3, 3)
    written = owner.execute("SELECT c.name, count(*) FROM pyembed.vectors v "
                            "JOIN pyembed.corpora c USING (corpus_id) GROUP BY 1").fetchall()
    assert written == [("right", 3)]
    assert count(app, "queue") == 0
    reasons = [r[0] for r in app.execute("SELECT reason FROM pyembed.queue_failed")]
    assert reasons == [f"model key {FAKE} is not accepted by corpus left "
                       f"(active key {FAKE_1024})"] * 3


# -- usage -----------------------------------------------------------------------------------
def test_a_batch_spanning_two_corpora_bills_each_its_share(
        db: Database, app: psycopg.Connection[Any], owner: psycopg.Connection[Any]) -> None:
    texts = {"alpha": texts_for(3, "alpha"), "beta": texts_for(2, "beta")}
    for name, corpus_texts in texts.items():
        make_corpus(app, name, FAKE)
        add_docs(app, name, corpus_texts)
    worker = Worker(db.app_dsn, batch_size=64)  # the default embedder, metered
    try:
        stats = worker.run_once()
    finally:
        worker.close()
    assert stats.batches == 1 and stats.embedded == 5
    billed = dict((name, (int(r), int(t))) for name, r, t in owner.execute(
        "SELECT c.name, sum(u.requests), sum(u.tokens) FROM pyembed.usage u "
        "JOIN pyembed.corpora c USING (corpus_id) GROUP BY 1"))
    assert billed == {name: (1, sum(estimate_tokens(t) for t in corpus_texts))
                      for name, corpus_texts in texts.items()}


# -- crashes ---------------------------------------------------------------------------------
KILLED_WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pyembed.embedder import Embedder
    from pyembed.text import estimate_tokens
    from pyembed.providers.fake import FakeProvider
    from pyembed.worker import Worker

    dsn, log, marker = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

    class LoggingProvider(FakeProvider):
        def embed_batch(self, texts, input_type):
            with log.open("a") as f:
                f.writelines(t + "\\n" for t in texts)
            return super().embed_batch(texts, input_type)

    class StallAfterSecondPut:
        # The embedder caches a batch before the worker writes it: stall right there.
        def __init__(self, inner):
            self.inner, self.puts = inner, 0
        def get_many(self, *args):
            return self.inner.get_many(*args)
        def put_many(self, *args):
            self.inner.put_many(*args)
            self.puts += 1
            if self.puts == 2:
                marker.write_text("cached, not written")
                time.sleep(120)

    worker = Worker(dsn, batch_size=10, lease_seconds=1.0, embedder_for=lambda spec, cache:
                    Embedder(spec, LoggingProvider(spec), cache=StallAfterSecondPut(cache)))
    worker.run(drain=True, poll_interval=0.05)
""")


def test_a_worker_killed_mid_batch_loses_nothing_and_repeats_no_call(
        db: Database, app: psycopg.Connection[Any], tmp_path: Path) -> None:
    make_corpus(app, "killed", FAKE)
    texts = texts_for(50, "killed")
    add_docs(app, "killed", texts)
    script, log, marker = tmp_path / "worker.py", tmp_path / "calls.log", tmp_path / "stalled"
    script.write_text(KILLED_WORKER)
    proc = subprocess.Popen([sys.executable, str(script), db.app_dsn, str(log), str(marker)],
                            env=clean_env(), cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: marker.exists() or proc.poll() is not None, 30, "the second batch")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    first_run = log.read_text().splitlines()
    assert len(first_run) == 20  # two batches reached the provider
    assert fresh_vectors(app) == 10  # only the first was written
    assert one(app, "SELECT count(*) FROM pyembed.queue WHERE attempts = 1") == 10  # leased

    providers: list[RecordingProvider] = []
    worker = Worker(db.app_dsn, batch_size=10, lease_seconds=1.0,
                    embedder_for=fake_embedder(providers))
    try:
        stats = run(worker)
    finally:
        worker.close()
    assert stats.embedded == 40 and stats.failed == 0
    assert count(app, "queue") == 0 and count(app, "queue_failed") == 0
    assert fresh_vectors(app) == 50
    second_run = [t for p in providers for t in p.texts]
    assert not set(second_run) & set(first_run), "texts embedded before the kill were resent"
    assert sorted(first_run + second_run) == sorted(texts)  # each text embedded exactly once


def test_a_backend_killed_mid_batch_loses_nothing_and_duplicates_nothing(
        db: Database, app: psycopg.Connection[Any], owner: psycopg.Connection[Any]) -> None:
    make_corpus(app, "server", FAKE)
    texts = texts_for(50, "server")
    add_docs(app, "server", texts)
    providers: list[RecordingProvider] = []
    killed: list[int] = []

    def kill_backend(provider: RecordingProvider, batch: list[str]) -> None:
        # Once, during the second batch: the server ends the worker's session.
        if not killed and sum(p.calls for p in providers) == 2:
            killed.append(worker._db().info.backend_pid)
            assert one(owner, "SELECT pg_terminate_backend(%s, 5000)", (killed[0],))

    worker = Worker(db.app_dsn, batch_size=10, lease_seconds=1.0,
                    embedder_for=fake_embedder(providers, kill_backend))
    try:
        stats = run(worker)  # reconnects, and re-claims the killed batch when its lease ends
    finally:
        worker.close()
    assert killed and worker._db().info.backend_pid != killed[0]
    assert stats.embedded == 50 and stats.failed == 0
    sent = [t for p in providers for t in p.texts]
    assert sorted(sent) == sorted(texts)  # the killed batch came back from the cache
    assert count(app, "queue") == 0 and count(app, "queue_failed") == 0
    assert one(app, "SELECT count(*) FROM (SELECT DISTINCT corpus_id, chunk_id, model_key "
                    "FROM pyembed.vectors) d") == count(app, "vectors") == 50
    assert fresh_vectors(app) == 50


def test_sigterm_finishes_the_batch_and_exits_zero(
        db: Database, app: psycopg.Connection[Any]) -> None:
    corpus_id = make_corpus(app, "term", LOCAL)
    total, batch = 192, 32
    app.execute("INSERT INTO pyembed.documents (corpus_id, document_id, content_hash) "
                "SELECT %s, 'd' || i, '\\x00' FROM generate_series(1, %s) i", (corpus_id, total))
    app.execute("INSERT INTO pyembed.chunks (corpus_id, document_id, chunk_index, content) "
                "SELECT %s, 'd' || i, 0, format('note %%s on the weather of day %%s', i, i %% 30) "
                "FROM generate_series(1, %s) i", (corpus_id, total))
    env = clean_env() | {"PYEMBED_DSN": db.app_dsn}
    proc = subprocess.Popen([sys.executable, "-m", "pyembed", "worker", "--forever",
                             "--batch-size", str(batch)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: count(app, "vectors") > 0 or proc.poll() is not None, 60,
                 "the first batch")
        assert proc.poll() is None
        wait_for(lambda: one(app, "SELECT count(*) FROM pyembed.queue WHERE attempts > 0") > 0,
                 10, "a batch in flight")
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=15)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert took < 10, f"took {took:.1f} s to stop"
    assert "embedded" in out
    vectors, queued = count(app, "vectors"), count(app, "queue")
    assert vectors + queued == total
    assert vectors % batch == 0 and vectors < total, vectors  # whole batches only
    # The batch in flight was finished, not abandoned under its lease.
    assert one(app, "SELECT count(*) FROM pyembed.queue WHERE attempts > 0") == 0
    assert fresh_vectors(app) == vectors


# -- privileges ------------------------------------------------------------------------------
@pytest.fixture
def stranger(db: Database, owner: psycopg.Connection[Any]) -> Iterator[str]:
    """The DSN of a login role that is not a member of pyembed_app."""
    with login_role(owner, db.app_dsn, "stranger") as dsn:
        yield dsn


def test_a_role_without_grants_cannot_use_the_queue_or_embed(
        db: Database, app: psycopg.Connection[Any], stranger: str) -> None:
    make_corpus(app, "private", FAKE)
    add_docs(app, "private", texts_for(3))
    worker = Worker(stranger)
    try:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            worker.run_once()
    finally:
        worker.close()
    with connect(stranger, autocommit=True) as conn:
        for query in ("SELECT pyembed.embed('x', 'fake/fake-hash@1:384')",
                      "SELECT count(*) FROM pyembed.queue",
                      "SELECT pyembed.add_document('private', 'x', 'text')"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                conn.execute(query)
    assert count(app, "queue") == 3 and count(app, "vectors") == 0


def test_the_cli_reports_missing_grants_in_one_line(db: Database, stranger: str) -> None:
    result = cli("worker", env={"PYEMBED_DSN": stranger})
    assert result.returncode != 0
    assert "permission denied" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]


def test_pyembed_worker_logs_in_as_a_member_of_pyembed_worker_and_counts_failures(
        cluster: LocalCluster, db: Database, app: psycopg.Connection[Any], fake_api: FakeAPI,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Only members of pyembed_worker count failed provider calls (revision 0026). The local
    cluster has a worker login that is one (its application login is not: every app session
    could count), `pyembed worker` uses it by default there ($PYEMBED_WORKER_DSN before
    $PYEMBED_DSN elsewhere), and a failure of its call is counted. Before, the worker ran as
    the application login and counted nothing."""
    for name in ("PYEMBED_DSN", "PYEMBED_WORKER_DSN", "PYEMBED_OWNER_DSN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYEMBED_HOME", str(cluster.home))
    worker_login = conninfo_to_dict(resolve_dsn(worker=True))
    assert worker_login["user"] == WORKER_USER
    assert conninfo_to_dict(resolve_dsn())["user"] == APP_USER
    member = "SELECT pg_has_role(%s, 'pyembed_worker', 'MEMBER')"
    assert one(app, member, (WORKER_USER,)) is True
    assert one(app, member, (APP_USER,)) is False

    worker_dsn = make_conninfo(db.app_dsn, user=WORKER_USER, password=worker_login["password"])
    make_corpus(app, "counted", OPENAI)
    add_docs(app, "counted", ["a text the service fails once"])
    before = app.execute("SELECT errors FROM pyembed.provider_errors() "
                         "WHERE provider = 'openai' AND kind = 'server_error'").fetchone()
    fake_api.script("503")
    result = cli("worker", env={"PYEMBED_DSN": db.app_dsn, "PYEMBED_WORKER_DSN": worker_dsn,
                                "OPENAI_API_KEY": OPENAI_KEY, **fake_api.env()})
    assert result.returncode == 0, result.stderr
    after = app.execute("SELECT errors FROM pyembed.provider_errors() "
                        "WHERE provider = 'openai' AND kind = 'server_error'").fetchone()
    assert before is not None and after is not None and after[0] == before[0] + 1
    assert fresh_vectors(app) == 1


def test_a_cluster_made_before_the_worker_login_gets_one_at_its_first_use(
        cluster: LocalCluster) -> None:
    """cluster.json of an older cluster has no worker password: the login is made (or given a
    new password) then, and its DSN logs in."""
    state = json.loads(cluster.state_file.read_text())
    cluster.state_file.write_text(json.dumps({**state, "worker_password": None}))
    dsn = cluster.dsn(worker=True)
    assert json.loads(cluster.state_file.read_text())["worker_password"]
    with connect(dsn, autocommit=True) as conn:
        assert one(conn, "SELECT current_user") == WORKER_USER


def test_a_batch_error_is_recorded_when_its_items_then_succeed_one_by_one(
        db: Database, app: psycopg.Connection[Any]) -> None:
    """A batch refused as a whole (not transiently) is sent again one item at a time; when
    every item then succeeded, the batch's error was in no count nor in WorkerStats.errors."""
    make_corpus(app, "split", FAKE)
    add_docs(app, "split", texts_for(4, "split"))

    def refuse_batches(provider: RecordingProvider, batch: list[str]) -> None:
        if len(batch) > 1:
            raise ProviderError("fake (fake-hash): HTTP 400: too many inputs")

    providers: list[RecordingProvider] = []
    worker = Worker(db.app_dsn, batch_size=64,
                    embedder_for=fake_embedder(providers, refuse_batches))
    try:
        stats = run(worker)
    finally:
        worker.close()
    assert (stats.embedded, stats.failed, stats.retried) == (4, 0, 0)
    assert stats.errors == ["fake (fake-hash): HTTP 400: too many inputs (a batch of 4, sent "
                            "again one by one)"], stats.errors
    assert fresh_vectors(app) == 4


def test_a_worker_opens_a_new_session_after_writing_to_session_corpora_corpora(
        db: Database, app: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend keeps what each corpus's write compiled in it (a trigger function per
    partition, its plans) for the rest of its session: a `pyembed worker --forever` on a
    database of many corpora grew without bound. Its session ends once it has written to
    SESSION_CORPORA corpora (between batches; everything embedded, nothing twice)."""
    monkeypatch.setattr(worker_module, "SESSION_CORPORA", 2, raising=False)
    for i in range(5):
        app.execute("SELECT pyembed.create_corpus(%s, %s)", (f"k{i}", FAKE))
        add_docs(app, f"k{i}", texts_for(2, f"topic{i}"))
    opened: list[int] = []
    real = worker_module.reopen

    def counted(*args: Any, **kwargs: Any) -> Any:
        conn, acted = real(*args, **kwargs)
        if kwargs.get("application_name") == "pyembed worker":  # (not its leases' or cache's)
            opened.append(conn.info.backend_pid)
        return conn, acted

    monkeypatch.setattr(worker_module, "reopen", counted)
    with Worker(db.app_dsn, batch_size=2, embedder_for=fake_embedder([])) as worker:
        stats = run(worker)
    assert (stats.embedded, stats.failed, stats.stale) == (10, 0, 0)
    assert count(app, "queue") == 0 and fresh_vectors(app) == 10
    assert len(set(opened)) == 3, opened  # 5 corpora, a new session after each 2
