"""Model migrations (issue 6) on a real PostgreSQL: plan, start, backfill, validate, shift,
complete, rollback, cleanup, with search answering at every step and no vector ever stored
or served under a key other than the one that made it.

The corpus moves between two same-width fake models (fake-hash@1 and fake-hash@2, both 1024
dimensions, unrelated hash spaces), so every dimension check passes and only the model key
tells the vectors apart. Because the fake model is deterministic, each stored vector can be
recomputed from its chunk's text in its key's space and compared.

Several tests race a step with searches, writes and the worker, or check the validation gate
and cleanup's locks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
import pytest
from pgvector import Vector
from pgvector.psycopg import register_vector
from psycopg import sql

import pyembed
from pyembed import evaluation, migration, rag
from pyembed.client import Client, Corpus, Document
from pyembed.corpora import model_spec
from pyembed.embedder import Embedder
from pyembed.errors import InvalidInput, MigrationError, ModelMismatch
from pyembed.models import InputType
from pyembed.providers.fake import FakeProvider, fake_vectors
from pyembed.search import bucket
from pyembed.search import search as store_search
from pyembed.vectors import vector_partition
from pyembed.worker import Worker
from tests.conftest import REPO, Database
from tests.helpers import assert_nearest_functions_in_line, run_cli

OLD = "fake/fake-hash@1:1024"
NEW = "fake/fake-hash@2:1024"
OTHER = "fake/fake-hash@3:1024"  # registered by the tests; never served by the corpus
WORSE = "fake/fake-hash@tiny:4"  # a much worse model: 4 hashed dimensions
CORPUS = "docs"
N_DOCS = 200

F32 = npt.NDArray[np.float32]


# -- data --------------------------------------------------------------------------------------
def doc_texts(n: int = N_DOCS, seed: int = 7) -> list[str]:
    """Short single-chunk documents: a unique id word and 14 words of a 400-word vocabulary."""
    rng = np.random.default_rng(seed)
    return [f"item{i} " + " ".join(f"w{w}" for w in rng.choice(400, 14, replace=False))
            for i in range(n)]


def doc_id(i: int) -> str:
    return f"d{i:03d}"


def eval_query(text: str) -> str:
    """Five of a document's words, without its id word: the document should rank first."""
    return " ".join(text.split()[1:6])


def space(key: str) -> tuple[str, int]:
    """'fake/fake-hash@1:1024' -> ('fake-hash@1', 1024), the fake model's hash space."""
    rest, dims = key.split("/", 1)[1].rsplit(":", 1)
    return rest, int(dims)


def fake(key: str, texts: list[str]) -> F32:
    name, dims = space(key)
    return fake_vectors(texts, space=name, dimensions=dims)


# -- setup -------------------------------------------------------------------------------------
def one(conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def register(conn: psycopg.Connection[Any], key: str) -> None:
    name, dims = space(key)
    model_id, version = name.split("@")
    assert one(conn, "SELECT pyembed.register_model('fake', %s, %s, %s)",
               (model_id, version, dims)) == key


@contextmanager
def clients(db: Database, n: int = N_DOCS) -> Iterator[tuple[Client, Client, list[str]]]:
    """(app client, owner client, texts): corpus `docs` on OLD, created and filled by the
    application role, with an evaluation query for every fifth document, or more often so that
    there are the 10 a validation needs (from 10 documents up)."""
    app = pyembed.connect(db.app_dsn)
    owner = pyembed.connect(db.owner_dsn)
    try:
        register(owner.conn, OTHER)
        texts = doc_texts(n)
        corpus = app.create_corpus(CORPUS, OLD)
        report = corpus.add([Document(doc_id(i), t) for i, t in enumerate(texts)])
        assert report.chunks == n
        for i in range(0, n, 5 if n < 10 else min(5, n // 10)):
            evaluation.add_eval_query(app, CORPUS, f"q{i}", eval_query(texts[i]), [doc_id(i)])
        yield app, owner, texts
    finally:
        app.close()
        owner.close()


def corpus_id(conn: psycopg.Connection[Any]) -> int:
    return int(one(conn, "SELECT corpus_id FROM pyembed.corpora WHERE name = %s", (CORPUS,)))


def vector_counts(owner: psycopg.Connection[Any]) -> Counter[str]:
    return Counter(dict(owner.execute(
        "SELECT model_key, count(*) FROM pyembed.vectors GROUP BY model_key").fetchall()))


def index_exists(owner: psycopg.Connection[Any], key: str) -> bool:
    name = one(owner, "SELECT pyembed._index_name(%s, %s)", (corpus_id(owner), key))
    return bool(one(owner, "SELECT count(*) FROM pg_class WHERE relname = %s AND relkind = 'i' "
                           "AND relnamespace = 'pyembed'::regnamespace", (name,)))


def step_of(owner: psycopg.Connection[Any]) -> tuple[str, str | None, int]:
    row = owner.execute("SELECT migration_step, target_model_key, traffic_share "
                        "FROM pyembed.corpora WHERE name = %s", (CORPUS,)).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


# -- the invariants, checked at every step -----------------------------------------------------
def assert_no_vector_crosses_keys(owner: psycopg.Connection[Any]) -> Counter[str]:
    """Every stored vector equals the one its own key's model makes from its chunk's current
    text (and its content hash is that text's); returns the number of vectors per key."""
    rows = owner.execute(
        """SELECT v.model_key, ch.content, v.embedding, v.content_hash = ch.content_hash
             FROM pyembed.vectors v JOIN pyembed.chunks ch USING (corpus_id, chunk_id)"""
    ).fetchall()
    by_key: dict[str, list[tuple[str, F32]]] = {}
    for key, content, embedding, fresh in rows:
        assert fresh, f"a {key} vector was stored under another text's hash: {content[:40]!r}"
        vec = np.asarray(embedding.to_numpy() if isinstance(embedding, Vector) else embedding,
                         dtype=np.float32)
        by_key.setdefault(key, []).append((content, vec))
    for key, pairs in by_key.items():
        expected = fake(key, [c for c, _ in pairs])
        stored = np.stack([v for _, v in pairs])
        cosine = np.sum(expected * stored, axis=1)
        worst = int(np.argmin(cosine))
        assert cosine[worst] > 0.9999, (
            f"a vector stored as {key} was not made by {key}: chunk {pairs[worst][0][:40]!r} "
            f"has cosine {cosine[worst]:.3f} to {key}'s own vector")
    return Counter({k: len(v) for k, v in by_key.items()})


def assert_wrong_keys_refused(app: psycopg.Connection[Any], allowed: set[str]) -> None:
    """A raw vector write (as the application role) under any key the corpus does not accept
    now is refused with PE001, even for a chunk that already has one under that key."""
    row = app.execute("SELECT chunk_id, content, corpus_id FROM pyembed.chunks ORDER BY chunk_id "
                      "LIMIT 1").fetchone()
    assert row is not None
    chunk_id, content, corpus_id = int(row[0]), str(row[1]), int(row[2])
    for key in sorted({OLD, NEW, OTHER} - allowed):
        with pytest.raises(psycopg.Error) as err, app.transaction():
            app.execute("SELECT pyembed._clear_vectors(corpus_id, %s, %s, %s, NULL) "
                        "FROM pyembed.chunks WHERE chunk_id = %s",
                        (key, chunk_id, chunk_id, chunk_id))
            app.execute(sql.SQL("INSERT INTO {} (corpus_id, chunk_id, model_key, embedding) "
                                "SELECT corpus_id, chunk_id, %s, %s FROM pyembed.chunks "
                                "WHERE chunk_id = %s").format(vector_partition(corpus_id)),
                        (key, Vector(fake(key, [content])[0]), chunk_id))
        assert err.value.sqlstate == "PE001", (key, err.value)
        assert key in str(err.value)


def assert_query_key(app: Client, key: str, accepted: bool, texts: list[str]) -> None:
    """A query vector made by `key` is served (and scores like `key`'s own vectors) or
    refused with PE001."""
    text = texts[3]
    vec = fake(key, [text])[0]
    if not accepted:
        with pytest.raises(ModelMismatch, match="model key mismatch"):
            store_search(app.conn, CORPUS, vec, key, 3)
        return
    hits = store_search(app.conn, CORPUS, vec, key, 3)
    assert hits and hits[0].document_id == doc_id(3) and hits[0].score > 0.999
    assert {h.model_key for h in hits} == {key}


def assert_search_answers(app: Client, texts: list[str], keys: set[str],
                          queries: range = range(0, N_DOCS, 23)) -> Counter[str]:
    """Text searches from Python and from SQL answer, find the right document, agree on the
    serving key, and that key is one of `keys`; returns how many each key served."""
    corpus = app.corpus(CORPUS)
    served: Counter[str] = Counter()
    for i in queries:
        query = texts[i]
        hits = corpus.search(query, k=3)
        assert hits and hits[0].document_id == doc_id(i) and hits[0].score > 0.999, (i, hits[:1])
        (key,) = {h.model_key for h in hits}
        assert key in keys and key == corpus.serving_key(query)
        rows = app.conn.execute("SELECT document_id, model_key, score "
                                "FROM pyembed.search_text(%s, %s, 3)", (CORPUS, query)).fetchall()
        assert rows and rows[0][0] == doc_id(i) and rows[0][2] > 0.999
        assert {r[1] for r in rows} == {key}, "SQL and Python routed the query differently"
        served[key] += 1
    return served


def check_step(app: Client, owner: Client, texts: list[str], *, accepted: set[str],
               target_searchable: bool, serving: set[str]) -> tuple[Counter[str], Counter[str]]:
    """The invariants of one step; returns (vectors per key, searches served per key)."""
    counts = assert_no_vector_crosses_keys(owner.conn)
    assert_nearest_functions_in_line(owner.conn)
    assert_wrong_keys_refused(app.conn, accepted)
    assert_query_key(app, OLD, OLD in accepted, texts)
    assert_query_key(app, NEW, target_searchable, texts)
    assert_query_key(app, OTHER, False, texts)
    return counts, assert_search_answers(app, texts, serving)


class Searcher(threading.Thread):
    """Searches without pause on its own application-role connections (Python and SQL,
    alternately) for a document's own text, recording every failure and which step and key
    each answer came from."""

    def __init__(self, dsn: str, texts: list[str]) -> None:
        super().__init__(daemon=True)
        self.dsn, self.texts = dsn, texts
        self.step = "none"
        self.served: Counter[tuple[str, str]] = Counter()
        self.per_step: Counter[str] = Counter()
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        with pyembed.connect(self.dsn) as client:
            corpus = client.corpus(CORPUS)
            i = 0
            while not self.halt.is_set():
                step, n = self.step, (i * 37) % len(self.texts)
                key = error = None
                try:
                    if i % 2:
                        rows = [(h.document_id, h.model_key, h.score)
                                for h in corpus.search(self.texts[n], k=3)]
                    else:
                        rows = client.conn.execute(
                            "SELECT document_id, model_key, score FROM pyembed.search_text(%s, "
                            "%s, 3)", (CORPUS, self.texts[n])).fetchall()
                    assert rows, "no results"
                    assert rows[0][0] == doc_id(n) and rows[0][2] > 0.999, rows[0]
                    (key,) = {r[1] for r in rows}
                except Exception as exc:
                    error = exc
                # A search that began under one label and ended under another ran while the
                # test moved to the next step (it sets "moving" before it starts a change):
                # it counts as moving, whichever step its statement saw.
                label = step if self.step == step else "moving"
                if error is None:
                    self.served[label, key] += 1
                else:
                    self.errors.append(f"step {label}: {error!r}")
                self.per_step[label] += 1
                i += 1

    def enter(self, step: str, searches: int = 3, timeout: float = 20.0) -> None:
        """Label what follows `step`, after `searches` searches have answered under it."""
        self.step = step
        deadline = time.monotonic() + timeout
        while self.per_step[step] < searches:
            assert self.is_alive() and time.monotonic() < deadline, f"searcher stalled at {step}"
            time.sleep(0.01)


# -- the whole workflow ------------------------------------------------------------------------
def test_same_width_migration_keeps_search_up_and_never_crosses_keys(db: Database) -> None:
    with clients(db) as (app, owner, texts):
        searcher = Searcher(db.app_dsn, texts)
        searcher.start()
        try:
            searcher.enter("none")
            counts, _ = check_step(app, owner, texts, accepted={OLD}, target_searchable=False,
                                serving={OLD})
            assert counts == {OLD: N_DOCS}

            searcher.step = "moving"
            migration.start(owner, CORPUS, NEW)
            searcher.enter("started")
            assert step_of(owner.conn) == ("started", NEW, 0)
            assert not index_exists(owner.conn, NEW) and index_exists(owner.conn, OLD)
            check_step(app, owner, texts, accepted={OLD, NEW}, target_searchable=False,
                       serving={OLD})
            assert migration.status(owner, CORPUS).coverage == 0

            # Backfill in committed batches at a bounded rate, checking between batches.
            seen: list[tuple[int, int]] = []
            with psycopg.connect(db.owner_dsn, autocommit=True) as watcher:
                register_vector(watcher)

                def between_batches(done: int, total: int) -> None:
                    seen.append((done, total))
                    assert vector_counts(watcher)[NEW] == done
                    assert step_of(watcher) == ("started", NEW, 0)
                    if len(seen) % 3 == 1:
                        assert_no_vector_crosses_keys(watcher)
                        assert_wrong_keys_refused(app.conn, {OLD, NEW})
                        assert_query_key(app, NEW, False, texts)
                        assert_search_answers(app, texts, {OLD}, range(len(seen), N_DOCS, 50))

                searcher.enter("backfill")
                before = searcher.per_step["backfill"]
                report = migration.backfill(owner, CORPUS, batch_size=20, rate=800,
                                            progress=between_batches)
                during = searcher.per_step["backfill"] - before
            assert report.embedded == N_DOCS
            assert seen == [(d, N_DOCS) for d in range(20, N_DOCS + 1, 20)]
            assert during >= 5, f"only {during} searches ran during the backfill"
            searcher.enter("backfilled")  # (backfill ends by marking the step)
            assert step_of(owner.conn) == ("backfilled", NEW, 0)
            assert index_exists(owner.conn, NEW)
            counts, _ = check_step(app, owner, texts, accepted={OLD, NEW},
                                   target_searchable=True, serving={OLD})
            assert counts == {OLD: N_DOCS, NEW: N_DOCS}
            st = migration.status(owner, CORPUS)
            assert (st.step, st.coverage, st.queued, st.failed) == ("backfilled", 1.0, 0, 0)

            searcher.step = "moving"
            result = migration.validate(owner, CORPUS, max_drop=0.05)
            assert result.passed and result.queries == N_DOCS // 5
            assert (result.old.model_key, result.new.model_key) == (OLD, NEW)
            assert result.old.recall > 0.9 and result.new.recall > 0.9
            assert 0.1 <= result.overlap <= 1.0
            searcher.enter("validated")
            assert step_of(owner.conn) == ("validated", NEW, 0)
            check_step(app, owner, texts, accepted={OLD, NEW}, target_searchable=True,
                       serving={OLD})

            for share in (10, 50, 100):
                searcher.step = "moving"
                migration.shift(owner, CORPUS, share)
                searcher.enter(f"shift {share}")
                assert step_of(owner.conn) == ("shifting", NEW, share)
                _, served = check_step(app, owner, texts, accepted={OLD, NEW},
                                    target_searchable=True,
                                    serving={NEW} if share == 100 else {OLD, NEW})
                assert served[NEW] == sum(1 for i in range(0, N_DOCS, 23)
                                          if bucket(texts[i]) < share)

            searcher.step = "moving"
            migration.complete(owner, CORPUS)
            searcher.enter("completed")
            assert step_of(owner.conn) == ("none", None, 0)
            assert one(owner.conn, "SELECT model_key FROM pyembed.corpora") == NEW
            counts, _ = check_step(app, owner, texts, accepted={NEW}, target_searchable=True,
                                serving={NEW})
            assert counts == {OLD: N_DOCS, NEW: N_DOCS}  # the old vectors wait for cleanup
            assert index_exists(owner.conn, OLD)

            searcher.step = "moving"
            assert migration.cleanup(owner, CORPUS) == N_DOCS
            searcher.enter("cleaned")
            counts, _ = check_step(app, owner, texts, accepted={NEW}, target_searchable=True,
                                serving={NEW})
            assert counts == {NEW: N_DOCS}
            assert not index_exists(owner.conn, OLD) and index_exists(owner.conn, NEW)
        finally:
            searcher.halt.set()
            searcher.join(30)
        assert not searcher.errors, searcher.errors[:5]
        # Which key served the searcher: the old one until the shift, the new one after it.
        for step in ("none", "started", "backfill", "backfilled", "validated"):
            assert {k for s, k in searcher.served if s == step} == {OLD}, step
        for step in ("shift 100", "completed", "cleaned"):
            assert {k for s, k in searcher.served if s == step} == {NEW}, step

        steps = [r[0] for r in owner.conn.execute(
            "SELECT e.step FROM pyembed.migration_events e JOIN pyembed.migrations m "
            "USING (migration_id) ORDER BY e.event_id")]
        assert steps == ["start", "backfilled", "validated", "shift", "shift", "shift",
                         "complete"]
        assert one(owner.conn, "SELECT state FROM pyembed.migrations") == "cleaned"


# -- one at a time, in order -------------------------------------------------------------------
def test_one_migration_per_corpus_and_steps_in_order(db: Database) -> None:
    with clients(db, n=40) as (_app, owner, _texts):
        # Nothing to act on before a start.
        for step in (lambda: migration.shift(owner, CORPUS, 10),
                     lambda: migration.complete(owner, CORPUS),
                     lambda: migration.rollback(owner, CORPUS),
                     lambda: migration.backfill(owner, CORPUS),
                     lambda: migration.validate(owner, CORPUS)):
            with pytest.raises(MigrationError, match="no migration in progress"):
                step()
        with pytest.raises(MigrationError, match="already on"):
            migration.start(owner, CORPUS, OLD)
        with pytest.raises(pyembed.UnknownModel):
            migration.start(owner, CORPUS, "fake/nope@1:1024")
        with pytest.raises(pyembed.UnknownCorpus):
            migration.start(owner, "nope", NEW)

        first = migration.start(owner, CORPUS, NEW)
        for to in (NEW, OTHER):
            with pytest.raises(MigrationError, match="one at a time"):
                migration.start(owner, CORPUS, to)
        assert one(owner.conn, "SELECT count(*) FROM pyembed.migrations") == 1
        with pytest.raises(MigrationError, match="needs validated or shifting"):
            migration.shift(owner, CORPUS, 10)
        with pytest.raises(MigrationError, match="needs shifting"):
            migration.complete(owner, CORPUS)
        with pytest.raises(psycopg.Error, match="40 chunks still have no") as err:
            owner.conn.execute("SELECT pyembed.migration_backfilled(%s)", (CORPUS,))
        assert err.value.sqlstate == "PE007"
        with pytest.raises(MigrationError, match="in progress"):
            migration.cleanup(owner, CORPUS)

        migration.backfill(owner, CORPUS)
        with pytest.raises(MigrationError, match="at step backfilled"):
            migration.shift(owner, CORPUS, 10)
        migration.validate(owner, CORPUS, max_drop=0.5)
        with pytest.raises(MigrationError, match="at step validated"):
            migration.complete(owner, CORPUS)
        for bad in (0, 101, -5):
            with pytest.raises(InvalidInput, match=r"share must be 1\.\.100"):
                migration.shift(owner, CORPUS, bad)
        migration.shift(owner, CORPUS, 50)
        with pytest.raises(MigrationError, match="shift 100 first"):
            migration.complete(owner, CORPUS)
        with pytest.raises(MigrationError, match="one at a time"):
            migration.start(owner, CORPUS, OTHER)
        migration.shift(owner, CORPUS, 100)
        assert migration.complete(owner, CORPUS) == first
        for step in (lambda: migration.complete(owner, CORPUS),
                     lambda: migration.rollback(owner, CORPUS),
                     lambda: migration.shift(owner, CORPUS, 100)):
            with pytest.raises(MigrationError, match="no migration in progress"):
                step()
        # The next migration may start once the last one is complete.
        assert migration.start(owner, CORPUS, OTHER) > first


def test_plan_refuses_what_start_refuses(db: Database) -> None:
    with clients(db, n=5) as (_app, owner, _texts):
        with pytest.raises(MigrationError, match="already on"):
            migration.plan(owner, CORPUS, OLD)
        with pytest.raises(pyembed.UnknownModel):
            migration.plan(owner, CORPUS, "fake/nope@1:1024")
        with pytest.raises(pyembed.UnknownCorpus):
            migration.plan(owner, "nope", NEW)
        p = migration.plan(owner, CORPUS, NEW)
        assert p.chunks == 5
        # during the migration both keys' vectors and indexes, the target's in its storage
        assert p.storage_after == tuple(2 * b for b in p.storage_before)
        binary = migration.plan(owner, CORPUS, NEW, "binary")
        assert binary.storage_after == (2 * p.storage_before[0],
                                        p.storage_before[1] + migration.storage_bytes(
                                            5, 1024, "binary")[1])
        with pytest.raises(pyembed.InvalidInput, match="unknown storage"):
            migration.plan(owner, CORPUS, NEW, "bits")
        migration.start(owner, CORPUS, NEW)
        for to in (NEW, OTHER):
            with pytest.raises(MigrationError, match="one at a time"):
                migration.plan(owner, CORPUS, to)
        assert_one_line_error(cli(db, "migrate", "plan", CORPUS, "--to", OTHER), "one at a time")
        migration.rollback(owner, CORPUS)
        assert_one_line_error(cli(db, "migrate", "plan", CORPUS, "--to", OLD),
                              f"corpus {CORPUS} is already on {OLD}")
        assert migration.plan(owner, CORPUS, OTHER).chunks == 5


def test_validate_before_backfill_is_refused_as_a_step(db: Database) -> None:
    with clients(db, n=20) as (_app, owner, _texts):
        migration.start(owner, CORPUS, NEW)
        with pytest.raises(MigrationError):
            migration.validate(owner, CORPUS)


def test_concurrent_starts_let_exactly_one_through(db: Database) -> None:
    with clients(db, n=10) as (_app, owner, _texts):
        barrier = threading.Barrier(4)
        outcomes: list[str] = []

        def attempt(to: str) -> None:
            with pyembed.connect(db.owner_dsn) as client:
                barrier.wait()
                try:
                    migration.start(client, CORPUS, to)
                    outcomes.append("started")
                except MigrationError as exc:
                    outcomes.append(f"refused: {exc}")

        threads = [threading.Thread(target=attempt, args=(to,))
                   for to in (NEW, NEW, OTHER, OTHER)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert outcomes.count("started") == 1, outcomes
        assert sum("one at a time" in o for o in outcomes) == 3, outcomes
        assert one(owner.conn, "SELECT count(*) FROM pyembed.migrations") == 1


# -- crash and resume --------------------------------------------------------------------------
def cli_env(db: Database) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYEMBED_")}
    env.update(PYEMBED_DSN=db.app_dsn, PYEMBED_OWNER_DSN=db.owner_dsn, COLUMNS="200")
    return env


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def drain(db: Database) -> None:
    """Run `pyembed worker` (as the application role) until the queue is empty."""
    worker = Worker(db.app_dsn)
    try:
        stats = worker.run(drain=True, drain_wait=0)
    finally:
        worker.close()
    assert stats.failed == 0, stats.errors


class Recording(FakeProvider):
    @property
    def texts(self) -> list[str]:
        return [t for batch in self.batches for t in batch]


def test_killed_backfill_resumes_without_embedding_anything_twice(db: Database) -> None:
    with clients(db) as (_app, owner, _texts):
        migration.start(owner, CORPUS, NEW)
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyembed", "migrate", "backfill", CORPUS, "--batch-size",
             "10", "--rate", "25"], env=cli_env(db), cwd=REPO, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        try:
            wait_for(lambda: vector_counts(owner.conn)[NEW] >= 30 or proc.poll() is not None,
                     60, "three committed batches")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
        written = dict(owner.conn.execute(
            "SELECT chunk_id, created_at FROM pyembed.vectors WHERE model_key = %s", (NEW,)))
        assert 30 <= len(written) < N_DOCS
        assert len(written) % 10 == 0, "a batch was half written"
        assert step_of(owner.conn) == ("started", NEW, 0)
        assert migration.status(owner, CORPUS).coverage == len(written) / N_DOCS
        assert_no_vector_crosses_keys(owner.conn)

        # Resume with a recording provider and no cache: only what is missing is embedded.
        with pyembed.connect(db.owner_dsn, use_cache=False) as client:
            spec = model_spec(client.conn, NEW)
            provider = Recording(spec)
            client._embedders[NEW, True] = Embedder(spec, provider)
            report = migration.backfill(client, CORPUS, batch_size=64)
        missing = {c for (c,) in owner.conn.execute(
            "SELECT content FROM pyembed.chunks WHERE chunk_id <> ALL(%s)", (list(written),))}
        assert report.embedded == N_DOCS - len(written)
        assert sorted(provider.texts) == sorted(missing), "re-embedded a finished chunk"
        after = dict(owner.conn.execute(
            "SELECT chunk_id, created_at FROM pyembed.vectors WHERE model_key = %s", (NEW,)))
        assert len(after) == N_DOCS
        assert {c: after[c] for c in written} == written, "a finished vector was rewritten"
        assert step_of(owner.conn) == ("backfilled", NEW, 0)
        assert_no_vector_crosses_keys(owner.conn)
        # A third run has nothing to do and embeds nothing.
        with pyembed.connect(db.owner_dsn, use_cache=False) as client:
            provider = Recording(spec)
            client._embedders[NEW, True] = Embedder(spec, provider)
            assert migration.backfill(client, CORPUS).embedded == 0
            assert provider.calls == 0


class ChangingOnce(Recording):
    """Runs `change` before its first call: a writer that changes chunks while they are embedded."""

    def __init__(self, spec: Any, change: Callable[[], None]) -> None:
        super().__init__(spec)
        self.change: Callable[[], None] | None = change

    def embed_batch(self, texts: list[str], input_type: InputType) -> F32:
        if self.change is not None:
            change, self.change = self.change, None
            change()
        return super().embed_batch(texts, input_type)


def test_backfill_counts_what_it_wrote_and_what_it_skipped(db: Database) -> None:
    """A chunk changed while its batch is embedded is skipped at the write (its new text is
    queued for both keys): the report and the command's line say so. Before, it was counted
    as backfilled: 'backfilled 10 chunks' with nine vectors written."""
    with clients(db, 10) as (app, owner, texts):
        migration.start(owner, CORPUS, NEW)

        def change() -> None:  # d000's text changes: its chunk's hash with it
            app.corpus(CORPUS).add([Document(doc_id(0), "item0 a text written meanwhile")])

        with pyembed.connect(db.owner_dsn, use_cache=False) as client:
            spec = model_spec(client.conn, NEW)
            provider = ChangingOnce(spec, change)
            client._embedders[NEW, True] = Embedder(spec, provider)
            shown: list[tuple[int, int]] = []
            report = migration.backfill(client, CORPUS, batch_size=64,
                                        progress=lambda done, total: shown.append((done, total)))
        assert (report.embedded, report.written, report.skipped) == (10, 9, 1)
        assert shown == [(10, 10)]
        assert texts[0] in provider.texts  # the old text, embedded and then not written
        # The changed chunk has its new text's vector for both keys (the writer's dual write).
        assert vector_counts(owner.conn) == {OLD: 10, NEW: 10}
        assert_no_vector_crosses_keys(owner.conn)


# -- rollback ----------------------------------------------------------------------------------
def to_shift(owner: Client, share: int) -> None:
    migration.start(owner, CORPUS, NEW)
    migration.backfill(owner, CORPUS)
    assert migration.validate(owner, CORPUS, max_drop=0.05).passed
    migration.shift(owner, CORPUS, share)


def test_rollback_after_half_shift_serves_only_the_old_key(db: Database) -> None:
    with clients(db) as (app, owner, texts):
        to_shift(owner, 50)
        half = assert_search_answers(app, texts, {OLD, NEW}, range(N_DOCS))
        assert 0.3 * N_DOCS < half[NEW] < 0.7 * N_DOCS, half

        migration.rollback(owner, CORPUS)
        assert step_of(owner.conn) == ("none", None, 0)
        assert one(owner.conn, "SELECT state FROM pyembed.migrations") == "rolled_back"
        served = assert_search_answers(app, texts, {OLD}, range(N_DOCS))
        assert served == {OLD: N_DOCS}
        more = [f"w{i} w{i + 1} w{i * 7 % 400}" for i in range(100)]  # queries never seen
        assert {h.model_key for q in more for h in app.corpus(CORPUS).search(q, k=2)} == {OLD}
        assert {r[0] for q in more for r in app.conn.execute(
            "SELECT model_key FROM pyembed.search_text(%s, %s, 2)", (CORPUS, q))} == {OLD}
        assert_query_key(app, NEW, False, texts)
        assert_wrong_keys_refused(app.conn, {OLD})

        # The shadow vectors and index stay until cleanup; writes are single-key again.
        assert vector_counts(owner.conn) == {OLD: N_DOCS, NEW: N_DOCS}
        assert index_exists(owner.conn, NEW)
        app.corpus(CORPUS).add([Document("late", "item999 written after the rollback")])
        assert vector_counts(owner.conn) == {OLD: N_DOCS + 1, NEW: N_DOCS}
        assert_no_vector_crosses_keys(owner.conn)

        assert migration.cleanup(owner, CORPUS) == N_DOCS
        assert vector_counts(owner.conn) == {OLD: N_DOCS + 1}
        assert not index_exists(owner.conn, NEW) and index_exists(owner.conn, OLD)
        assert one(owner.conn, "SELECT state FROM pyembed.migrations") == "cleaned"
        assert [r[0] for r in owner.conn.execute(
            "SELECT step FROM pyembed.migration_events ORDER BY event_id")][-1] == "rollback"
        assert_search_answers(app, texts, {OLD})
        # A later attempt starts from scratch.
        migration.start(owner, CORPUS, NEW)
        assert migration.backfill(owner, CORPUS).embedded == N_DOCS + 1


def test_rollback_right_after_start_drops_the_target_from_writes_and_queue(
        db: Database) -> None:
    with clients(db, n=30) as (app, owner, texts):
        migration.start(owner, CORPUS, NEW)
        app.conn.execute("SELECT pyembed.add_document(%s, 'queued', 'item777 waits in the "
                         "queue')", (CORPUS,))
        queued = Counter(r[0] for r in app.conn.execute("SELECT model_key FROM pyembed.queue"))
        assert queued == {OLD: 1, NEW: 1}
        migration.rollback(owner, CORPUS)
        queued = Counter(r[0] for r in app.conn.execute("SELECT model_key FROM pyembed.queue"))
        assert queued == {OLD: 1}
        worker = Worker(db.app_dsn)
        try:
            stats = worker.run(drain=True, drain_wait=0)
        finally:
            worker.close()
        assert stats.embedded == 1 and stats.failed == 0
        assert vector_counts(owner.conn) == {OLD: 31}
        assert_search_answers(app, texts, {OLD}, range(0, 30, 7))


def routed_to_the_target_then_rolled_back(app: Client, owner: Client,
                                          texts: list[str]) -> tuple[Corpus, str]:
    """A corpus shifted 50% to the target, a query the target serves, and the target's
    embedder rigged to roll the migration back between the routing and the search."""
    to_shift(owner, 50)
    corpus = app.corpus(CORPUS)
    query = next(t for t in texts if corpus.serving_key(t) == NEW)
    embedder = app.embedder(NEW)
    real = embedder.embed_prepared

    def embed_then_rollback(text: str, input_type: InputType, *, reserved: bool = False) -> F32:
        vector = real(text, input_type, reserved=reserved)
        migration.rollback(owner, CORPUS)  # lands between the routing and the search
        return vector

    embedder.embed_prepared = embed_then_rollback  # type: ignore[method-assign]
    return corpus, query


def test_search_routed_to_the_target_just_before_a_rollback_still_answers(
        db: Database) -> None:
    """Corpus.search reads the routing (shift 50 -> target), embeds, then searches: a rollback
    committed in between must not turn that search into an error."""
    with clients(db, n=40) as (app, owner, texts):
        corpus, query = routed_to_the_target_then_rolled_back(app, owner, texts)
        hits = corpus.search(query, k=3)
        assert hits and {h.model_key for h in hits} == {OLD}


def test_ask_routed_to_the_target_just_before_a_rollback_still_answers(db: Database) -> None:
    """rag.answer retrieves as Corpus.search does: the same bounded re-route after a rollback."""
    with clients(db, n=40) as (app, owner, texts):
        corpus, query = routed_to_the_target_then_rolled_back(app, owner, texts)
        answer = rag.answer(corpus, query, k=3)
        assert answer.sources and answer.model_key == OLD
        assert {s.hit.model_key for s in answer.sources} == {OLD}


# -- routing -----------------------------------------------------------------------------------
def test_shift_routes_a_stable_hash_share_and_results_name_their_key(db: Database) -> None:
    with clients(db) as (app, owner, texts):
        to_shift(owner, 10)
        queries = [" ".join(t.split()[2:7]) for t in texts]  # 200 distinct partial queries
        assert len(set(queries)) == N_DOCS
        corpus = app.corpus(CORPUS)
        for share in (10, 50, 100):
            migration.shift(owner, CORPUS, share)
            served: Counter[str] = Counter()
            for i, query in enumerate(queries):
                first = corpus.search(query, k=3)
                (key,) = {h.model_key for h in first}
                served[key] += 1
                assert key == (NEW if bucket(query) < share else OLD)
                # The score is the served key's own cosine: the hit came from that key's index.
                want = float(fake(key, [query])[0] @ fake(key, [texts[i]])[0])
                top = next(h for h in first if h.document_id == doc_id(i))
                assert top.score == pytest.approx(want, abs=1e-4)
                if i % 10 == 0:  # the same query is served the same way every time
                    assert {h.model_key for h in corpus.search(query, k=3)} == {key}
                    assert {h.model_key for h in corpus.search("  " + query + " ")} == {key}
                    rows = app.conn.execute("SELECT model_key FROM pyembed.search_text(%s, %s)",
                                            (CORPUS, query)).fetchall()
                    assert {r[0] for r in rows} == {key}
            expected = sum(1 for q in queries if bucket(q) < share)
            assert served[NEW] == expected
            p = share / 100  # the hash spreads queries like a fair coin: within 3 sd
            assert abs(expected - p * N_DOCS) <= 3 * (N_DOCS * p * (1 - p)) ** 0.5 + 0.5
        assert served == {NEW: N_DOCS}


# -- dual write --------------------------------------------------------------------------------
def test_documents_written_during_a_migration_get_vectors_for_both_keys(db: Database) -> None:
    with clients(db, n=30) as (app, owner, texts):
        corpus = app.corpus(CORPUS)

        def add_both_ways(tag: str) -> None:
            corpus.add([Document(f"py-{tag}", f"item{tag}a added through python " * 3)])
            app.conn.execute("SELECT pyembed.add_document(%s, %s, %s)",
                             (CORPUS, f"sql-{tag}", f"item{tag}b added through sql"))
            drain(db)

        def keys_of(document: str) -> Counter[str]:
            return Counter(r[0] for r in owner.conn.execute(
                "SELECT v.model_key FROM pyembed.vectors v JOIN pyembed.chunks ch "
                "USING (corpus_id, chunk_id) WHERE ch.document_id = %s", (document,)))

        migration.start(owner, CORPUS, NEW)
        add_both_ways("started")
        migration.backfill(owner, CORPUS)
        add_both_ways("backfilled")
        migration.validate(owner, CORPUS, max_drop=0.5)
        migration.shift(owner, CORPUS, 50)
        add_both_ways("shifting")
        # A changed document is re-embedded for both keys; no vector of its old text stays.
        corpus.add([Document(doc_id(0), "item0 rewritten during the shift")])
        app.conn.execute("SELECT pyembed.add_document(%s, %s, %s)",
                         (CORPUS, doc_id(1), "item1 rewritten through sql during the shift"))
        drain(db)
        for tag in ("started", "backfilled", "shifting"):
            for way in ("py", "sql"):
                assert keys_of(f"{way}-{tag}") == {OLD: 1, NEW: 1}, (way, tag)
        assert keys_of(doc_id(0)) == {OLD: 1, NEW: 1}
        assert keys_of(doc_id(1)) == {OLD: 1, NEW: 1}
        assert one(owner.conn, "SELECT count(*) FROM pyembed.queue") == 0
        assert_no_vector_crosses_keys(owner.conn)
        # Still complete: every chunk searchable under both keys.
        migration.shift(owner, CORPUS, 100)
        migration.complete(owner, CORPUS)
        add_both_ways("completed")
        assert keys_of("py-completed") == {NEW: 1} and keys_of("sql-completed") == {NEW: 1}
        counts = assert_no_vector_crosses_keys(owner.conn)
        assert counts[NEW] == one(owner.conn, "SELECT count(*) FROM pyembed.chunks")
        assert_search_answers(app, texts, {NEW}, range(2, 30, 5))


# -- the validation gate -----------------------------------------------------------------------
def test_validation_refuses_a_clearly_worse_model_and_records_why(db: Database) -> None:
    with clients(db) as (app, owner, _texts):
        register(owner.conn, WORSE)
        migration.start(owner, CORPUS, WORSE)
        migration.backfill(owner, CORPUS)
        result = migration.validate(owner, CORPUS, max_drop=0.05)
        assert not result.passed
        assert result.old.recall > 0.9 and result.new.recall < 0.6, result
        assert result.new.ndcg < result.old.ndcg - 0.3
        assert step_of(owner.conn) == ("backfilled", WORSE, 0)
        with pytest.raises(MigrationError, match="at step backfilled"):
            migration.shift(owner, CORPUS, 10)

        stored = one(owner.conn, "SELECT validation FROM pyembed.migrations")
        assert stored["passed"] is False and stored["max_drop"] == 0.05
        assert stored["new"]["model_key"] == WORSE
        assert stored["new"]["recall"] == pytest.approx(result.new.recall)
        event = owner.conn.execute("SELECT step, detail FROM pyembed.migration_events "
                                   "ORDER BY event_id DESC LIMIT 1").fetchone()
        assert event is not None and event[0] == "validation failed"
        assert event[1]["old"]["ndcg"] == pytest.approx(result.old.ndcg)
        # The application role may read the history (not change it).
        assert one(app.conn, "SELECT count(*) FROM pyembed.migration_events "
                             "WHERE step = 'validation failed'") == 1

        # The CLI prints the comparison and fails with one line.
        out = cli(db, "migrate", "validate", CORPUS)
        assert out.returncode == 1
        assert WORSE in out.stdout and "Recall@10" in out.stdout and "nDCG@10" in out.stdout
        assert len(out.stderr.strip().splitlines()) == 1 and "validation failed" in out.stderr

        # A deliberately loose gate lets it through (the DBA's call), and that is recorded too.
        assert migration.validate(owner, CORPUS, max_drop=1.0).passed
        migration.shift(owner, CORPUS, 10)
        assert [r[0] for r in owner.conn.execute(
            "SELECT step FROM pyembed.migration_events ORDER BY event_id")] == [
            "start", "backfilled", "validation failed", "validation failed", "validated",
            "shift"]


def test_a_validation_passes_on_ten_evaluation_queries_or_when_forced(db: Database) -> None:
    """Before, a validation passed on a single evaluation query, from every entry point (the
    README's tour did so). Now a pass needs pyembed.min_eval_queries() of them: Python and the CLI
    refuse before scoring anything (the traffic already shifted stays), SQL refuses the verdict,
    and a forced pass says in its report, the event log and the printed figure that it was."""
    floor = "has 9 evaluation queries: a validation passes on at least 10"
    with clients(db, n=20) as (app, owner, texts):
        app.conn.execute("SELECT pyembed.delete_eval_queries(%s, '{q18}')", (CORPUS,))
        assert one(owner.conn, "SELECT count(*) FROM pyembed.eval_queries") == 9
        migration.start(owner, CORPUS, NEW)
        migration.backfill(owner, CORPUS)
        events = "SELECT count(*) FROM pyembed.migration_events"
        before = one(owner.conn, events)
        with pytest.raises(MigrationError, match=floor):
            migration.validate(owner, CORPUS, max_drop=1.0)
        assert one(owner.conn, "SELECT pyembed.min_eval_queries()") == 10
        with pytest.raises(InvalidInput, match="force must be True or False, got 'yes'"):
            migration.validate(owner, CORPUS, force="yes")  # type: ignore[arg-type]
        assert_one_line_error(cli(db, "migrate", "validate", CORPUS), floor, "--force")
        with pytest.raises(psycopg.Error, match=floor) as err:  # a verdict from SQL: the same
            owner.conn.execute("SELECT pyembed.migration_validated(%s, '{}', true)", (CORPUS,))
        assert err.value.sqlstate == "PE007"
        owner.conn.rollback()
        assert step_of(owner.conn) == ("backfilled", NEW, 0)
        assert one(owner.conn, events) == before
        # A failed verdict needs no floor: closing the gate is always safe.
        owner.conn.execute("SELECT pyembed.migration_validated(%s, '{}', false)", (CORPUS,))
        assert step_of(owner.conn) == ("backfilled", NEW, 0)

        forced = migration.validate(owner, CORPUS, max_drop=0.05, force=True)
        assert forced.passed and forced.forced and (forced.queries, forced.min_queries) == (9, 10)
        stored = one(owner.conn, "SELECT validation FROM pyembed.migrations")
        assert (stored["forced"], stored["queries"], stored["min_queries"]) == (True, 9, 10)
        assert one(owner.conn, "SELECT detail->'forced' FROM pyembed.migration_events "
                               "ORDER BY event_id DESC LIMIT 1") is True
        migration.shift(owner, CORPUS, 10)
        out = cli(db, "migrate", "validate", CORPUS, "--force", "--max-drop", "0.05")
        assert out.returncode == 0, out.stderr
        assert "9 evaluation queries (forced: fewer than the 10 a validation needs)" in \
            " ".join(out.stdout.split()), out.stdout
        got = json.loads(cli(db, "migrate", "validate", CORPUS, "--force", "--json").stdout)
        assert (got["queries"], got["min_queries"], got["forced"]) == (9, 10, True)
        # The CLI's help names the database's floor.
        assert "(pyembed.min_eval_queries(), 10)" in cli(db, "migrate", "validate", "--help").stdout
        # Refused without --force now, the shift stays: nothing ran.
        assert_one_line_error(cli(db, "migrate", "validate", CORPUS), floor)
        assert step_of(owner.conn) == ("shifting", NEW, 10)

        # A tenth query: the floor is met, nothing is forced (--force with enough is no force).
        evaluation.add_eval_query(app, CORPUS, "q-extra", eval_query(texts[1]), [doc_id(1)])
        for force in (False, True):
            met = migration.validate(owner, CORPUS, max_drop=0.05, force=force)
            assert met.passed and not met.forced and met.queries == 10
            assert one(owner.conn, "SELECT validation->'forced' FROM pyembed.migrations") is False
        owner.conn.execute("SELECT pyembed.migration_validated(%s, '{}', true)", (CORPUS,))
        assert step_of(owner.conn) == ("shifting", NEW, 10)


# -- privileges --------------------------------------------------------------------------------
def test_the_application_role_cannot_migrate_or_change_keys(db: Database) -> None:
    with clients(db, n=10) as (app, owner, _texts):
        calls = [("migration_start", (CORPUS, NEW)), ("migration_backfilled", (CORPUS,)),
                 ("migration_validated", (CORPUS, "{}", True)), ("migration_shift", (CORPUS, 50)),
                 ("migration_complete", (CORPUS,)), ("migration_rollback", (CORPUS,)),
                 ("migration_cleanup", (CORPUS,))]
        for fn, args in calls:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.conn.execute(f"SELECT pyembed.{fn}({', '.join(['%s'] * len(args))})", args)
        with pytest.raises(pyembed.OwnerOnly, match=r"function pyembed\.migration_start"):
            migration.start(app, CORPUS, NEW)
        for column, key in (("model_key", NEW), ("target_model_key", NEW)):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.conn.execute(f"UPDATE pyembed.corpora SET {column} = %s", (key,))
            with pytest.raises(psycopg.Error) as err:
                owner.conn.execute(f"UPDATE pyembed.corpora SET {column} = %s", (key,))
            assert err.value.sqlstate == "PE004"
        # Setting the migration flag does not give the application role a way round.
        with pytest.raises(psycopg.errors.InsufficientPrivilege), app.conn.transaction():
            app.conn.execute("SELECT set_config('pyembed.in_migration', 'on', true)")
            app.conn.execute("UPDATE pyembed.corpora SET model_key = %s", (NEW,))
        for statement in ("INSERT INTO pyembed.migrations (corpus_id, from_key, to_key, state) "
                          "SELECT corpus_id, model_key, 'x', 'started' FROM pyembed.corpora",
                          "UPDATE pyembed.migrations SET state = 'cleaned'",
                          "DELETE FROM pyembed.migration_events"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.conn.execute(statement)
        # During a migration the application role still cannot move the steps on.
        migration.start(owner, CORPUS, NEW)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.conn.execute("SELECT pyembed.migration_rollback(%s)", (CORPUS,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.conn.execute("UPDATE pyembed.corpora SET traffic_share = 100, "
                             "migration_step = 'shifting'")
        assert step_of(owner.conn) == ("started", NEW, 0)


# -- the command line --------------------------------------------------------------------------
def cli(db: Database, *args: str, owner_dsn: str | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env={"PYEMBED_DSN": db.app_dsn,
                               "PYEMBED_OWNER_DSN": owner_dsn or db.owner_dsn, "COLUMNS": "200"})


def assert_one_line_error(out: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert out.returncode != 0, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_cli_plan_status_steps_and_one_line_errors(db: Database) -> None:
    with clients(db, n=50) as (_app, owner, texts):
        plan = cli(db, "migrate", "plan", CORPUS, "--to", "voyage/voyage-3@1:1024")
        assert plan.returncode == 0, plan.stderr
        for needle in ("documents", "50", "API calls", "cost", "$", "storage now",
                       "during the migration"):
            assert needle in plan.stdout, (needle, plan.stdout)
        p = migration.plan(owner, CORPUS, "voyage/voyage-3@1:1024")
        assert (p.documents, p.chunks, p.api_calls) == (50, 50, 1)
        assert p.cost_usd is not None and p.cost_usd > 0 and p.tokens > 0
        assert p.storage_after[0] > 1.9 * p.storage_before[0]  # two 1024-wide keys
        storage = cli(db, "plan-storage", "--vectors", "1000000")
        assert storage.returncode == 0 and "1024" in storage.stdout and "HNSW" in storage.stdout

        assert cli(db, "migrate", "start", CORPUS, "--to", NEW).returncode == 0
        status = cli(db, "migrate", "status", CORPUS).stdout
        for needle in (f"{OLD} -> {NEW}", "step started", "traffic 0%", "coverage 0.0% (0/50)"):
            assert needle in status, (needle, status)

        assert_one_line_error(cli(db, "migrate", "shift", CORPUS, "50"), "at step started")
        assert_one_line_error(cli(db, "migrate", "status", "nope"), "unknown corpus")

        backfill = cli(db, "migrate", "backfill", CORPUS, "--batch-size", "16")
        assert backfill.returncode == 0 and "backfilled 50 chunks" in backfill.stdout
        added = cli(db, "eval", "add", CORPUS, "extra", eval_query(texts[7]), "--relevant",
                    doc_id(7))
        assert added.returncode == 0, added.stderr
        # A new key that misses q0's document (its vector replaced by doc 1's) fails a strict
        # gate (a --max-drop below 0 did before; it is refused now, as anything outside 0..1).
        move = ("UPDATE pyembed.vectors v SET embedding = %s FROM pyembed.chunks c "
                "WHERE (c.corpus_id, c.chunk_id) = (v.corpus_id, v.chunk_id) "
                "AND v.model_key = %s AND c.document_id = %s")
        find = ("SELECT v.embedding FROM pyembed.vectors v JOIN pyembed.chunks c "
                "USING (corpus_id, chunk_id) WHERE v.model_key = %s AND c.document_id = %s")
        kept = owner.conn.execute(find, (NEW, doc_id(0))).fetchone()[0]
        owner.conn.execute(move, (owner.conn.execute(find, (NEW, doc_id(1))).fetchone()[0],
                                  NEW, doc_id(0)))
        strict = cli(db, "migrate", "validate", CORPUS, "--max-drop", "0", "--json")
        assert strict.returncode == 1 and json.loads(strict.stdout)["passed"] is False
        assert "promotion refused" in strict.stderr
        owner.conn.execute(move, (kept, NEW, doc_id(0)))
        validate = cli(db, "migrate", "validate", CORPUS, "--max-drop", "0.1")
        assert validate.returncode == 0, validate.stderr
        assert "11 evaluation queries" in validate.stdout and NEW in validate.stdout
        got = json.loads(cli(db, "migrate", "validate", CORPUS, "--max-drop", "0.1",
                             "--json").stdout)
        assert (got["corpus"], got["queries"], got["passed"], got["new"]["model_key"]) == (
            CORPUS, 11, True, NEW)
        assert set(got["old"]) == {"model_key", "recall", "ndcg", "ms_per_query"}
        assert f"{got['new']['ndcg']:.4f}" in validate.stdout
        assert cli(db, "migrate", "shift", CORPUS, "50").returncode == 0
        status = cli(db, "migrate", "status", CORPUS).stdout
        for needle in ("step shifting", "traffic 50%", "coverage 100.0% (50/50)", "queued 0",
                       "failed 0", "shift", "validated", "start"):
            assert needle in status, (needle, status)
        assert_one_line_error(cli(db, "migrate", "complete", CORPUS), "shift 100 first")

        # The application role's DSN as the owner's: refused, one line.
        out = cli(db, "migrate", "rollback", CORPUS, owner_dsn=db.app_dsn)
        assert_one_line_error(out, "function pyembed.migration_rollback is pyembed's owner role's")

        assert cli(db, "migrate", "rollback", CORPUS).returncode == 0
        assert cli(db, "migrate", "cleanup", CORPUS).returncode == 0
        assert "no migration in progress" in cli(db, "migrate", "status", CORPUS).stdout
        assert vector_counts(owner.conn) == {OLD: 50}


def test_eval_queries_need_a_relevant_document(db: Database) -> None:
    with clients(db, n=5) as (app, _owner, _texts):
        with pytest.raises(InvalidInput):
            evaluation.add_eval_query(app, CORPUS, "empty", "a query", [])
        evaluation.add_eval_query(app, CORPUS, "q0", "first wording", [doc_id(0)])
        evaluation.add_eval_query(app, CORPUS, "q0", "second wording", [doc_id(1)])
        assert app.conn.execute("SELECT query, relevant FROM pyembed.eval_queries "
                                "WHERE query_id = 'q0'").fetchone() == ("second wording",
                                                                       [doc_id(1)])


def test_eval_queries_name_documents_the_corpus_has_and_have_text(db: Database) -> None:
    """Checked by eval_queries' trigger for every writer: an id that names no document of the
    corpus (stored before, counted as every model's miss) and an empty query (the table's check,
    a raw message before) are InvalidInput naming them, from Python, the CLI and SQL."""
    with clients(db, n=5) as (app, _owner, _texts):
        with pytest.raises(InvalidInput, match=r"corpus docs has no document 'nope', 'gone'"):
            evaluation.add_eval_query(app, CORPUS, "q9", "a question", ["nope", doc_id(1), "gone"])
        with pytest.raises(InvalidInput, match="evaluation query q9 is empty"):
            evaluation.add_eval_query(app, CORPUS, "q9", "  \n", [doc_id(1)])
        with pytest.raises(InvalidInput, match="not one string"):
            evaluation.add_eval_query(app, CORPUS, "q9", "a question", doc_id(1))
        with pytest.raises(InvalidInput, match=r"has no document 'x0', 'x1', .*'x9' \(and 2 more\)"):
            evaluation.add_eval_query(app, CORPUS, "q9", "a question",
                                      [f"x{i}" for i in range(12)])
        with pytest.raises(InvalidInput, match="has no document 'nope'"):  # an update too
            evaluation.add_eval_query(app, CORPUS, "q0", "a question", ["nope"])
        with pytest.raises(psycopg.Error) as err:
            app.conn.execute("UPDATE pyembed.eval_queries SET relevant = '{nope}'")
        assert err.value.sqlstate == "PE005"
        assert app.conn.execute("SELECT query_id, relevant FROM pyembed.eval_queries "
                                "ORDER BY 1").fetchall() == [("q0", [doc_id(0)])]
        assert_one_line_error(cli(db, "eval", "add", CORPUS, "q9", "a question", "--relevant",
                                  "nope"), "corpus docs has no document 'nope'")
        assert_one_line_error(cli(db, "eval", "add", CORPUS, "q9", " ", "--relevant",
                                  doc_id(1)), "evaluation query q9 is empty")
        # An empty id, as a document's (it was stored, and named "evaluation query  is empty").
        empty_id = "an evaluation query id is 1..512 characters, got 0 characters"
        with pytest.raises(InvalidInput, match=empty_id):
            evaluation.add_eval_query(app, CORPUS, "", "a question", [doc_id(1)])
        with pytest.raises(psycopg.Error) as err:
            app.conn.execute("UPDATE pyembed.eval_queries SET query_id = ''")
        assert err.value.sqlstate == "PE005" and empty_id in str(err.value)
        assert_one_line_error(cli(db, "eval", "add", CORPUS, "", "a question", "--relevant",
                                  doc_id(1)), empty_id)
        assert app.conn.execute("SELECT query_id FROM pyembed.eval_queries").fetchall() == [
            ("q0",)]


@pytest.mark.parametrize("dims", [384, 768, 1024, 1536, 3072])
def test_storage_estimate_matches_the_page_layout_model(dims: int) -> None:
    """migration.storage_bytes (plan-storage, migrate plan, status) counts the HNSW index as
    tests/benchmarks/capacity.py's page-layout model does (docs/scale-out.md: its figures match
    pgvector's measured sizes): never more than 3% under it, nor 8% over, at every storage
    (whole pairs a page: the model's random upper layers pack a few more). Before (7021ad5),
    4d + 8 + 32m bytes a vector: 44% low at 1024 dims, 19% low at 1536, for float32."""
    from tests.benchmarks.capacity import hnsw_bytes_per_row

    n = 100_000
    raw, _ = migration.storage_bytes(n, dims)
    assert raw == n * (4 * dims + 8)  # every storage keeps the float32 vectors
    for storage, layout in (("vector", "float32"), ("halfvec", "halfvec"), ("binary", "bit")):
        if storage == "vector" and dims > 2000:
            layout = "halfvec"  # (past pgvector's limit, the index holds float16)
        got_raw, with_index = migration.storage_bytes(n, dims, storage)
        assert got_raw == raw
        per_vector = (with_index - raw) / n
        assert -0.03 <= per_vector / hnsw_bytes_per_row(dims, layout) - 1 <= 0.08, storage
    assert migration.storage_bytes(0, dims) == (0, 0)


def test_storage_estimate_refuses_an_unknown_storage() -> None:
    with pytest.raises(pyembed.InvalidInput, match="unknown storage 'bits'"):
        migration.storage_bytes(1000, 1024, "bits")
    assert evaluation.metrics(["a", "b", "a", "c"], {"a", "c"}, k=10) == pytest.approx(
        (1.0, (1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3))))


# -- what the database cannot see, and races with the steps ------------------------------------
def test_the_cross_key_check_catches_a_mislabelled_vector(db: Database) -> None:
    """The guard checks labels; a vector made by the old model but labelled with the target
    key passes it (same width, unit norm). The content check of these tests catches it, so
    a real crossing in the workflow above would not go unnoticed."""
    with clients(db, n=10) as (_app, owner, texts):
        migration.start(owner, CORPUS, NEW)
        owner.conn.execute(
            "INSERT INTO pyembed.vectors (corpus_id, chunk_id, model_key, embedding, "
            "content_hash) SELECT corpus_id, chunk_id, %s, %s, content_hash FROM pyembed.chunks "
            "WHERE document_id = %s", (NEW, Vector(fake(OLD, [texts[0]])[0]), doc_id(0)))
        with pytest.raises(AssertionError, match="was not made by"):
            assert_no_vector_crosses_keys(owner.conn)


def test_worker_with_a_target_key_batch_in_flight_survives_a_rollback(db: Database) -> None:
    with clients(db, n=10) as (app, owner, _texts):
        migration.start(owner, CORPUS, NEW)
        app.conn.execute("SELECT pyembed.add_document(%s, 'fresh', 'item555 queued for both')",
                         (CORPUS,))

        class RollbackMidway(FakeProvider):
            def embed_batch(self, texts: list[str], input_type: InputType) -> F32:
                if self.spec.key == NEW and step_of(owner.conn)[0] != "none":
                    migration.rollback(owner, CORPUS)  # while the worker holds the item
                return super().embed_batch(texts, input_type)

        worker = Worker(db.app_dsn, embedder_for=lambda spec, cache: Embedder(
            spec, RollbackMidway(spec), cache=None))
        try:
            worker.run(drain=True, drain_wait=0)
        finally:
            worker.close()
        assert step_of(owner.conn) == ("none", None, 0)
        assert vector_counts(owner.conn) == {OLD: 11}
        assert one(owner.conn, "SELECT count(*) FROM pyembed.queue") == 0


def test_a_failed_revalidation_closes_the_gate_again(db: Database) -> None:
    with clients(db) as (_app, owner, _texts):
        register(owner.conn, WORSE)
        migration.start(owner, CORPUS, WORSE)
        migration.backfill(owner, CORPUS)
        assert migration.validate(owner, CORPUS, max_drop=1.0).passed
        assert not migration.validate(owner, CORPUS, max_drop=0.05).passed
        assert one(owner.conn, "SELECT validation->>'passed' FROM pyembed.migrations") == "false"
        with pytest.raises(MigrationError):
            migration.shift(owner, CORPUS, 10)


def test_cleanup_never_blocks_searches(db: Database) -> None:
    with clients(db, n=30) as (app, owner, texts):
        to_shift(owner, 100)
        migration.complete(owner, CORPUS)
        reader = psycopg.connect(db.app_dsn)  # a long read: holds ACCESS SHARE until it ends
        reader.execute("SELECT count(chunk_id) FROM pyembed.vectors")
        done = threading.Event()

        def clean() -> None:
            with pyembed.connect(db.owner_dsn) as client:
                migration.cleanup(client, CORPUS)
            done.set()

        cleaner = threading.Thread(target=clean, daemon=True)
        cleaner.start()
        try:
            wait_for(lambda: bool(one(owner.conn, "SELECT count(*) FROM pg_stat_activity "
                                                  "WHERE wait_event_type = 'Lock'")) or done.is_set(),
                     10, "cleanup to wait for its lock")
            app.conn.execute("SET statement_timeout = '2s'")
            hits = app.corpus(CORPUS).search(texts[0], k=3)
            assert hits and hits[0].model_key == NEW
        finally:
            app.conn.execute("RESET statement_timeout")
            reader.close()
            cleaner.join(30)


def test_a_write_racing_complete_still_lands(db: Database) -> None:
    with clients(db, n=20) as (app, owner, _texts):
        to_shift(owner, 100)
        target = app.embedder(NEW, truncate=True)
        real = target.embed

        def embed_then_complete(texts: Any, input_type: InputType = InputType.DOCUMENT) -> F32:
            vectors = real(texts, input_type)
            migration.complete(owner, CORPUS)  # lands between reading the keys and writing
            return vectors

        target.embed = embed_then_complete  # type: ignore[method-assign]
        app.corpus(CORPUS).add([Document("racer", "item888 written while completing")])
        assert vector_counts(owner.conn)[NEW] == 21
        assert_no_vector_crosses_keys(owner.conn)


def test_sql_only_backfill_through_the_queue_and_the_worker(db: Database) -> None:
    from pyembed.worker import Worker

    with pyembed.connect(db.app_dsn) as app:
        app.create_corpus("sqlonly", OLD).add([pyembed.Document(f"d{i}", f"text number {i}")
                                               for i in range(12)])
    with psycopg.connect(db.owner_dsn, autocommit=True) as owner:
        owner.execute("SELECT pyembed.migration_start('sqlonly', %s)", (NEW,))
        assert owner.execute("SELECT pyembed.migration_enqueue_backfill('sqlonly')"
                             ).fetchone() == (12,)
        worker = Worker(db.app_dsn)
        try:
            assert worker.run(drain=True, poll_interval=0.05, drain_wait=1).embedded == 12
        finally:
            worker.close()
        owner.execute("SELECT pyembed.migration_backfilled('sqlonly')")
        step = owner.execute("SELECT migration_step FROM pyembed.corpora WHERE name = 'sqlonly'"
                             ).fetchone()
        assert step == ("backfilled",)


@pytest.mark.parametrize("holder", ["app", "plain"])
def test_no_other_roles_advisory_lock_keeps_a_backfill_from_starting(
        db: Database, plain: str, holder: str) -> None:
    """The backfill's lock was pg_try_advisory_lock(hashtext('pyembed backfill'), corpus id),
    a key any role may hold: the application's role, or a login with CONNECT only, holding it
    made every backfill of the corpus refuse to start ("already running"). A backfill running is
    now one the owner's function recorded (pyembed._claim_backfill) and whose session is alive."""
    with clients(db, 20) as (_app, owner, _texts):
        migration.start(owner, CORPUS, NEW)
        cid = corpus_id(owner.conn)
        with psycopg.connect(db.app_dsn if holder == "app" else plain, autocommit=True) as other:
            other.execute("SELECT pg_advisory_lock(hashtext('pyembed backfill'), %s)", (cid,))
            other.execute("SELECT pg_advisory_lock_shared(1887003238, k) "
                          "FROM generate_series(0, 99) k")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                other.execute("SELECT pyembed._claim_backfill(%s)", (cid,))
            # A backfill running in another owner's session is still refused, until it ends.
            with psycopg.connect(db.owner_dsn, autocommit=True) as running:
                assert one(running, "SELECT pyembed._claim_backfill(%s)", (cid,)) is True
                with pytest.raises(pyembed.Busy, match="already running"):
                    migration.backfill(owner, CORPUS)
                pid = running.info.backend_pid
            # Its claim ends with its backend, which ends after the client has closed: wait.
            wait_for(lambda: one(other, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                                 (pid,)) == 0, 10, "its end")
            started = time.monotonic()
            report = migration.backfill(owner, CORPUS)
            assert time.monotonic() - started < 10
        assert report.embedded == 20
        assert step_of(owner.conn)[0] == "backfilled"
        assert one(owner.conn, "SELECT count(*) FROM pyembed.backfillers") == 0


def test_a_migrations_provider_calls_are_accounted_to_its_corpus(db: Database) -> None:
    """Every provider call of a migration's backfill and validation, and of `eval compare`, is
    reserved in pyembed.usage under the corpus it was made for, whatever the client did before.
    Before, the client kept the corpus of its last search or add and billed every later call to
    it: after a search of corpus `other`, the backfill of `docs` (20 texts), its validation and a
    comparison were all in `other`'s usage, for keys `other` does not serve."""
    from pyembed.compare import compare

    with clients(db, n=20) as (_app, owner, _texts):
        register(owner.conn, "fake/fake-hash@4:1024")
        other = owner.create_corpus("other", OLD)
        other.add([Document("o1", "a passage of another corpus")])
        other.search("a query never asked before", k=1)  # a provider call for `other`
        migration.start(owner, CORPUS, NEW)
        migration.backfill(owner, CORPUS)
        migration.validate(owner, CORPUS, max_drop=1.0)
        compare(owner, CORPUS, ["fake/fake-hash@4:1024"])
        billed = owner.conn.execute(
            "SELECT c.name, u.model_key, sum(u.requests)::int FROM pyembed.usage u "
            "LEFT JOIN pyembed.corpora c USING (corpus_id) GROUP BY 1, 2 ORDER BY 1, 2"
        ).fetchall()
    assert [(name, key) for name, key, _ in billed if name != CORPUS] == [("other", OLD)], billed
    assert {key for name, key, _ in billed if name == CORPUS} == {
        OLD, NEW, "fake/fake-hash@4:1024"}, billed


@pytest.mark.parametrize("when", ["first batch", "last batch"])
def test_a_backfill_whose_migration_another_dba_rolls_back_says_so(db: Database,
                                                                    when: str) -> None:
    """Two DBAs: one runs `migrate backfill`, the other `migrate rollback` meanwhile. The
    backfill stops with MigrationError saying the migration was rolled back by another session,
    and how many vectors it wrote. Before, it stopped with the next batch's ModelMismatch ('the
    vector for chunk N was made by fake/fake-hash@2:1024') or, after its last batch, 'has no
    migration in progress', each followed by 'running it again resumes', which it could not."""
    with clients(db, n=20) as (_app, owner, _texts):
        migration.start(owner, CORPUS, NEW)
        other = pyembed.connect(db.owner_dsn)

        def progress(done: int, total: int) -> None:
            if done == (5 if when == "first batch" else total):
                migration.rollback(other, CORPUS)

        try:
            with pytest.raises(MigrationError) as err:
                migration.backfill(owner, CORPUS, batch_size=5, progress=progress)
        finally:
            other.close()
        written = 5 if when == "first batch" else 20
        assert str(err.value) == (
            f"the migration of corpus {CORPUS} to {NEW} was rolled back by another session "
            f"while this backfill ran: it stopped, having written {written} vectors for {NEW} "
            f"(pyembed migrate status {CORPUS} shows the step)")
        assert not getattr(err.value, "__notes__", None)
        assert step_of(owner.conn) == ("none", None, 0)


def test_the_way_back_after_complete_reuses_the_old_keys_vectors(db: Database) -> None:
    """Completed to NEW, the DBA goes back (before cleanup): `migrate start --to OLD` keeps
    OLD's vectors whose chunk text is unchanged, so the backfill embeds only what changed since.
    Before, start deleted every OLD vector and the backfill embedded the whole corpus again
    (a paid provider's full price for the way back), though complete keeps the old vectors
    until cleanup."""
    with clients(db, n=20) as (app, owner, texts):
        to_shift(owner, 100)
        migration.complete(owner, CORPUS)
        changed = "item3 changed after the migration completed"
        app.corpus(CORPUS).add([Document(doc_id(3), changed)])  # embedded for NEW alone
        migration.start(owner, CORPUS, OLD)
        report = migration.backfill(owner, CORPUS)
        assert (report.embedded, report.resumed) == (1, 19), report
        assert vector_counts(owner.conn) == {OLD: 20, NEW: 20}
        assert_no_vector_crosses_keys(owner.conn)  # each kept vector is its text's, in OLD
        assert migration.validate(owner, CORPUS, max_drop=1.0).passed
        for share in (10, 100):
            migration.shift(owner, CORPUS, share)
        migration.complete(owner, CORPUS)
        assert_search_answers(app, [changed if i == 3 else t for i, t in enumerate(texts)],
                              {OLD}, range(0, 20, 3))


def test_status_says_where_every_migration_state_stands_and_the_next_command(
        db: Database) -> None:
    """`pyembed status` (and --json) and `migrate status` at every state a migration can be
    left in: started, backfilled, validated, shifted 10/50/100, completed, rolled back. Each
    names what is there and the command that takes it on; after a completion or a rollback,
    the vectors of the key no longer served (what cleanup deletes, with their count and size)
    until cleanup. Before, `pyembed status` said nothing of a migration, and nothing of the
    rolled-back key's vectors until `migrate cleanup`."""
    from pyembed import health

    def seen(app: Client, owner: Client) -> tuple[list[tuple[str, str, str]], str | None]:
        found = [(f.subject, f.value, f.note) for f in health.report(app.conn)
                 if f.area == "migration"]
        return found, migration.status(owner, CORPUS).next

    with clients(db, n=20) as (app, owner, _texts):
        assert seen(app, owner) == ([], None)
        migration.start(owner, CORPUS, NEW)
        steps = [("started", f"pyembed migrate backfill {CORPUS}")]
        found, then = seen(app, owner)
        assert [v for _, v, _ in found] == ["started"] and then == steps[0][1]
        assert found[0][0] == f"{CORPUS} -> {NEW}" and f"next: `{then}`" in found[0][2]
        migration.backfill(owner, CORPUS)
        assert seen(app, owner)[1] == f"pyembed migrate validate {CORPUS}"
        assert migration.validate(owner, CORPUS, max_drop=0.5).passed
        assert seen(app, owner)[1] == f"pyembed migrate shift {CORPUS} 10"
        for share, following in ((10, f"shift {CORPUS} 50"), (50, f"shift {CORPUS} 100"),
                                 (100, f"complete {CORPUS}")):
            migration.shift(owner, CORPUS, share)
            found, then = seen(app, owner)
            assert then == f"pyembed migrate {following}"
            assert found[0][1] == f"shifting, {share}% of searches on the new key"
        migration.complete(owner, CORPUS)
        found, then = seen(app, owner)
        assert then == f"pyembed migrate cleanup {CORPUS}"
        [(subject, value, note)] = found
        assert subject == f"{CORPUS} {OLD}" and value.startswith("20 vectors of a key not "
                                                                 "served, about ")
        # Their size: the float32 vectors the table keeps and the key's index as the catalogue
        # sizes it (before, an index of 4d + 8 + 32m bytes a vector: 170.3 kB for 248.2 kB).
        index = owner.conn.execute(
            "SELECT pg_relation_size(format('pyembed.%%I', pyembed._index_name(c.corpus_id, "
            "%s))::regclass) FROM pyembed.corpora c WHERE c.name = %s", (OLD, CORPUS)).fetchone()
        assert index is not None and index[0] > 20 * 8192
        assert value.endswith(f"about {health._size(20 * (4 * 1024 + 8) + index[0])}")
        assert f"`pyembed migrate cleanup {CORPUS}` deletes them" in note
        assert migration.status(owner, CORPUS).retired == [(OLD, 20)]
        migration.cleanup(owner, CORPUS)
        assert seen(app, owner) == ([], None)

        # Rolled back: the target's vectors, until cleanup; the CLI's JSON says the same.
        migration.start(owner, CORPUS, OLD)
        migration.backfill(owner, CORPUS)
        migration.rollback(owner, CORPUS)
        found, then = seen(app, owner)
        assert [s for s, _, _ in found] == [f"{CORPUS} {OLD}"]
        assert then == f"pyembed migrate cleanup {CORPUS}"
        out = cli(db, "status", "--json")
        assert out.returncode == 0, out.stderr
        [finding] = [f for f in json.loads(out.stdout)["findings"] if f["area"] == "migration"]
        assert finding["subject"] == f"{CORPUS} {OLD}" and finding["level"] == "warn"
        assert finding["number"] == 20.0
        got = json.loads(cli(db, "migrate", "status", CORPUS, "--json").stdout)
        assert got["retired"] == [{"model_key": OLD, "vectors": 20}]
        assert got["next"] == f"pyembed migrate cleanup {CORPUS}"
        text = cli(db, "migrate", "status", CORPUS).stdout
        assert f"next: pyembed migrate cleanup {CORPUS}" in text and f"20 vectors of {OLD}" in text


@pytest.mark.parametrize("when", ["first batch", "last batch"])
def test_a_backfill_whose_corpus_is_dropped_meanwhile_says_nothing_is_kept(db: Database,
                                                                            when: str) -> None:
    """A DBA runs `migrate backfill` while someone drops the corpus (`corpus drop`). The
    backfill stops with UnknownCorpus and a note saying the corpus was dropped while it ran, and
    nothing is left to resume. Before (found from outside by outside20), the note said 'backfill
    stopped with 5 of 20 chunks backfilled (5 by this run); running it again resumes: the chunks
    backfilled are skipped', of a corpus that is gone, and the error after the last batch was
    'no corpus has id N'. The error is ingest's, by the corpus's name: before (7021ad5), SQL's
    'no corpus has id 1' (after either batch)."""
    with clients(db, n=20) as (app, owner, _texts):
        migration.start(owner, CORPUS, NEW)

        def progress(done: int, total: int) -> None:
            if done == (5 if when == "first batch" else total):
                app.drop_corpus(CORPUS)

        with pytest.raises(pyembed.UnknownCorpus) as err:
            migration.backfill(owner, CORPUS, batch_size=5, progress=progress)
        assert str(err.value) == (f"unknown corpus {CORPUS!r} (hint: `pyembed corpus list` "
                                  "shows the corpora)")  # (as ingest's)
        assert err.value.__suppress_context__
        assert err.value.__notes__ == [
            f"backfill stopped: corpus {CORPUS!r} was dropped while it ran, and what it had "
            "written went with it (nothing to resume)"], err.value.__notes__
        assert not owner.conn.execute("SELECT FROM pyembed.corpora").fetchall()


def test_an_interrupted_validation_says_nothing_was_recorded_and_how_to_resume(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (or SIGTERM, raised as it is) while `migrate validate` scores its queries: the
    error carries what was kept and what to do, as backfill's and ingest's do (the command line
    prints it on the `interrupted (Ctrl-C)` line, which said nothing more), and the step is as
    it was: a rerun validates."""
    with clients(db, n=40) as (_app, owner, _texts):
        migration.start(owner, CORPUS, NEW)
        migration.backfill(owner, CORPUS)
        scored = migration._score

        def interrupted(client: Client, corpus: str, key: str, *args: Any) -> Any:
            if key == NEW:
                raise KeyboardInterrupt
            return scored(client, corpus, key, *args)

        monkeypatch.setattr(migration, "_score", interrupted)
        with pytest.raises(KeyboardInterrupt) as stop:
            migration.validate(owner, CORPUS, max_drop=0.5)
        assert stop.value.__notes__ == [
            f"validate stopped with no report recorded: corpus {CORPUS} is still at step "
            "backfilled; running it again validates from the start"]
        assert step_of(owner.conn)[0] == "backfilled"
        monkeypatch.setattr(migration, "_score", scored)
        assert migration.validate(owner, CORPUS, max_drop=0.5).passed
        assert step_of(owner.conn)[0] == "validated"
