"""Maintenance never deadlocks with, nor stalls, the searches, writes and measurements that run
beside it: every maintenance entry point locks the corpus row FOR NO KEY UPDATE (which the
foreign-key checks of rows written for the corpus, FOR KEY SHARE, do not wait for) before any
relation lock, and the queue rows before the vectors partition, as writers do; the worker takes
a chunk before its jobs, as a chunk's delete does.

Each race is made deterministic with the locks themselves: the client's transaction takes a
search's relation locks first and stays open, the maintenance call runs in another session
until it waits for them while holding the corpus row, and only then does the client record
(a recall sample, a measurement, a document: rows whose foreign key locks the corpus row). With
the corpus row locked FOR UPDATE the two waited for each other (a deadlock, one of them failed).
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from pgvector import Vector
from psycopg import sql
from psycopg.types.json import Jsonb

import pyembed
from pyembed import index, migration
from pyembed.client import Client, Document
from pyembed.dbcall import translated
from pyembed.text import sha256
from pyembed.vectors import copy_vectors
from tests.conftest import Database
from tests.helpers import in_background, waits_for_lock
from tests.test_migration import CORPUS, NEW, OLD, clients, fake, one, to_shift

LOCK_WAIT = "5s"
"""How long the client's statements may wait for a lock: a stall fails the test instead of
hanging it (a deadlock is detected after deadlock_timeout, 1 s)."""


# -- the race ----------------------------------------------------------------------------------
@dataclass
class Outcome:
    waited: bool = False
    """The maintenance call waited for a lock of the client's before the client recorded."""
    maintenance: list[BaseException] = field(default_factory=list)
    client: list[BaseException] = field(default_factory=list)

    def assert_clean(self) -> None:
        assert not self.client, f"the client failed: {self.client}"
        assert not self.maintenance, f"the maintenance call failed: {self.maintenance}"


# drop_corpus takes no lock by waiting but its first: it pauses between tries instead
held_up = functools.partial(waits_for_lock, or_pause=True)


def lock_wait_or_tries(watcher: psycopg.Connection[Any], pid: int,
                       thread: threading.Thread) -> bool:
    """A lock wait of the session's within 1 s (the moment a waiting client's deadlock check
    finds a cycle, if the session holds what the client then waits for), else `held_up`."""
    for _ in range(40):
        if not thread.is_alive():
            return False
        if watcher.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity "
                           "WHERE pid = %s", (pid,)).fetchone() == (True,):
            return True
        time.sleep(0.025)
    return held_up(watcher, pid, thread)


def race(db: Database, client: Client, hold: Callable[[Client], Any],
         maintenance: Callable[[Client], Any], record: Callable[[Client], Any], *,
         gate: tuple[threading.Event, threading.Event] | None = None,
         blocked: Callable[..., bool] = waits_for_lock) -> Outcome:
    """`hold(client)` in a transaction of the client's (the application role), left open;
    `maintenance(owner)` meanwhile in an owner session, until it waits for a lock or ends; then
    `record(client)` in the same transaction, which commits. `gate`: (reached, go), events
    `maintenance` sets and waits for where the client's transaction is to begin (default: it
    begins before the maintenance call starts)."""
    out = Outcome()
    owner = pyembed.connect(db.owner_dsn)
    watcher = psycopg.connect(db.owner_dsn, autocommit=True)
    pid = owner.conn.info.backend_pid

    thread, _ = in_background(lambda: maintenance(owner), out.maintenance)
    try:
        client.conn.execute("SELECT set_config('lock_timeout', %s, false)", (LOCK_WAIT,))
        if gate:
            thread.start()
            assert gate[0].wait(60), "the maintenance call never reached its gate"
        try:
            with client.conn.transaction():
                hold(client)
                if gate:
                    gate[1].set()
                else:
                    thread.start()
                out.waited = blocked(watcher, pid, thread)
                record(client)
        except psycopg.Error as e:
            out.client.append(e)
        thread.join(60)
        assert not thread.is_alive(), "the maintenance call never ended"
    finally:
        client.conn.execute("RESET lock_timeout")
        owner.close()
        watcher.close()
    return out


def sampling(client: Client, rate: float) -> None:
    client.conn.execute("SELECT set_config('pyembed.recall_sample_rate', %s, false)", (str(rate),))


def count(conn: psycopg.Connection[Any], table: str) -> int:
    return int(one(conn, f"SELECT count(*) FROM pyembed.{table}"))  # test-only, fixed names


def searching(key: str, text: str) -> Callable[[Client], Any]:
    """A search's relation locks (the vectors partition and its indexes), nothing recorded."""
    def hold(client: Client) -> Any:
        return client.conn.execute("SELECT count(*) FROM pyembed.search(%s, %s, %s, 3)",
                                   (CORPUS, Vector(fake(key, [text])[0]), key)).fetchone()
    return hold


def sampled_search(text: str) -> Callable[[Client], Any]:
    """A search by text as clients run it, which records a recall sample (a row whose foreign
    key locks the corpus row FOR KEY SHARE)."""
    def record(client: Client) -> Any:
        sampling(client, 1.0)
        try:
            return client.corpus(CORPUS).search(text, k=3)
        finally:
            sampling(client, 0.0)
    return record


@pytest.fixture
def corpus(db: Database) -> Iterator[tuple[Client, Client, list[str]]]:
    """(app, owner, texts): `docs` on OLD, 20 documents, its migration to NEW not started."""
    with clients(db, n=20) as made:
        sampling(made[0], 0.0)
        yield made


# -- the corpus row against a search's record: every maintenance step that locks relations ----
def _start(owner: Client) -> None:
    migration.start(owner, CORPUS, NEW)


def _complete(owner: Client) -> None:
    migration.complete(owner, CORPUS)


def _rollback(owner: Client) -> None:
    migration.rollback(owner, CORPUS)


def _cleanup(owner: Client) -> None:
    one(owner.conn, "SELECT pyembed.migration_cleanup(%s)", (CORPUS,))


def _completed(owner: Client) -> None:
    to_shift(owner, 100)
    _complete(owner)


def _rebuild(owner: Client) -> None:
    one(owner.conn, "SELECT pyembed.rebuild_index(%s, 'halfvec')", (CORPUS,))


STEPS: dict[str, tuple[Callable[[Client], None], Callable[[Client], None]]] = {
    # step: (how the corpus gets to it, the step)
    "migration start": (lambda owner: None, _start),
    "migration complete": (lambda owner: to_shift(owner, 100), _complete),
    "migration rollback": (lambda owner: to_shift(owner, 50), _rollback),
    "migration cleanup": (_completed, _cleanup),
    "rebuild_index (SQL)": (lambda owner: None, _rebuild),
}


@pytest.mark.parametrize("step", STEPS)
def test_a_step_that_locks_the_partition_lets_a_waiting_search_record(
        db: Database, corpus: tuple[Client, Client, list[str]], step: str) -> None:
    app, owner, texts = corpus
    prepare, run = STEPS[step]
    prepare(owner)
    key = one(owner.conn, "SELECT model_key FROM pyembed.corpora")
    samples = count(owner.conn, "recall_samples")
    out = race(db, app, searching(key, texts[0]), run, sampled_search(texts[1]))
    out.assert_clean()
    assert out.waited  # the step waited for the search's locks, holding the corpus row
    assert count(owner.conn, "recall_samples") == samples + 1


def test_the_online_rebuild_swap_lets_a_waiting_search_record(
        db: Database, corpus: tuple[Client, Client, list[str]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`pyembed corpus reindex`: the index is built CONCURRENTLY, then swapped in a short
    transaction; the search begins between the two (the build waits for older snapshots)."""
    app, owner, texts = corpus
    reached, go = threading.Event(), threading.Event()
    build = index.build_index_online

    def build_then_pause(*args: Any, **kwargs: Any) -> str | None:
        name = build(*args, **kwargs)
        reached.set()
        go.wait(60)
        return name

    monkeypatch.setattr(index, "build_index_online", build_then_pause)
    out = race(db, app, searching(OLD, texts[0]),
               lambda owner: index.rebuild_index(owner.conn, CORPUS, "halfvec"),
               sampled_search(texts[1]), gate=(reached, go))
    out.assert_clean()
    assert out.waited
    assert count(owner.conn, "recall_samples") == 1
    assert one(owner.conn, "SELECT storage FROM pyembed.corpora") == "halfvec"


# -- recall measurement: searches that then record a measurement -------------------------------
def _swap(owner: Client) -> None:
    """The swap of an online rebuild, of an index built beforehand."""
    cid = one(owner.conn, "SELECT corpus_id FROM pyembed.corpora")
    with owner.conn.transaction():
        one(owner.conn, "SELECT pyembed._swap_vector_index(%s, %s, %s, 'vector')",
            (cid, OLD, f"vectors_hnsw_c{cid}_rebuilt"))


def _build_beside(owner: Client) -> None:
    cid = one(owner.conn, "SELECT corpus_id FROM pyembed.corpora")
    index.build_index_online(owner.conn, cid, OLD, "vector", f"vectors_hnsw_c{cid}_rebuilt")


@pytest.mark.parametrize("measure", ["measure_recall('docs', 3)", "recall_sampled(5)"])
def test_recall_measurements_record_while_an_index_swap_waits(
        db: Database, corpus: tuple[Client, Client, list[str]], measure: str) -> None:
    app, owner, texts = corpus
    sampling(app, 1.0)
    for text in texts[:3]:  # samples waiting for the worker
        app.corpus(CORPUS).search(text, k=3)
    sampling(app, 0.0)
    _build_beside(owner)
    out = race(db, app, searching(OLD, texts[0]), _swap,
               lambda client: client.conn.execute(f"SELECT * FROM pyembed.{measure}").fetchall())
    out.assert_clean()
    assert out.waited
    assert count(owner.conn, "recall_measurements") == 1


# -- steps that lock only the corpus row: their open transaction stalls no client ---------------
def _open(sql: str, *args: Any) -> Callable[[psycopg.Connection[Any]], None]:
    def run(conn: psycopg.Connection[Any]) -> None:
        conn.execute(sql, args)
    return run


@pytest.mark.parametrize("step", ["backfilled", "validated", "shift", "index settings"])
def test_a_step_left_open_stalls_no_search_record_nor_document_write(
        db: Database, corpus: tuple[Client, Client, list[str]], step: str) -> None:
    app, owner, texts = corpus
    if step != "index settings":
        migration.start(owner, CORPUS, NEW)
        migration.backfill(owner, CORPUS)  # backfilled already: the step may be repeated
    if step in ("shift",):
        assert migration.validate(owner, CORPUS, max_drop=0.05).passed
    call = {"backfilled": _open("SELECT pyembed.migration_backfilled(%s)", CORPUS),
            "validated": _open("SELECT pyembed.migration_validated(%s, %s, true)", CORPUS,
                               json.dumps({"by": "test"})),
            "shift": _open("SELECT pyembed.migration_shift(%s, 10)", CORPUS),
            "index settings": _open("SELECT pyembed.set_index_settings(%s, %s)", CORPUS,
                                    Jsonb({"ef_search": 50}))}[step]
    with psycopg.connect(db.owner_dsn) as maintenance:  # its transaction stays open meanwhile
        call(maintenance)
        app.conn.execute("SELECT set_config('lock_timeout', %s, false)", (LOCK_WAIT,))
        try:
            assert sampled_search(texts[1])(app)
            app.corpus(CORPUS).add([Document("written", "item999 written meanwhile")])
        finally:
            app.conn.execute("RESET lock_timeout")
        maintenance.commit()
    assert count(owner.conn, "recall_samples") == 1
    assert one(owner.conn, "SELECT count(*) FROM pyembed.documents WHERE document_id = 'written'")


# -- maintenance against maintenance, and against writers ------------------------------------
def test_index_settings_merged_by_two_sessions_at_once_keep_both(
        db: Database, corpus: tuple[Client, Client, list[str]]) -> None:
    """Each call merges its settings into those in force: the second waits for the first's
    transaction and merges into what it committed."""
    _app, owner, _texts = corpus
    first = psycopg.connect(db.owner_dsn)
    try:
        first.execute("SELECT pyembed.set_index_settings(%s, %s)", (CORPUS, Jsonb({"m": 24})))
        out = race_call(db, "SELECT pyembed.set_index_settings(%s, %s)",
                        (CORPUS, Jsonb({"ef_search": 50})), first)
    finally:
        first.close()
    assert out.waited and not out.maintenance, out.maintenance
    assert one(owner.conn, "SELECT index_settings FROM pyembed.corpora") == {
        "m": 24, "ef_search": 50}


def race_call(db: Database, sql: str, args: tuple[Any, ...],
              first: psycopg.Connection[Any]) -> Outcome:
    """`sql` in an owner session of its own while `first`'s transaction is open: waits until it
    waits for a lock (or ends), then commits `first`."""
    out = Outcome()
    second = pyembed.connect(db.owner_dsn)
    watcher = psycopg.connect(db.owner_dsn, autocommit=True)

    thread, _ = in_background(lambda: second.conn.execute(sql, args), out.maintenance)
    try:
        thread.start()
        out.waited = waits_for_lock(watcher, second.conn.info.backend_pid, thread)
        first.commit()
        thread.join(60)
        assert not thread.is_alive()
    finally:
        second.close()
        watcher.close()
    return out


def test_rebuild_index_waits_for_a_migration_transaction_before_locking_the_partition(
        db: Database, corpus: tuple[Client, Client, list[str]]) -> None:
    """A DBA's transaction of several steps (shift, then complete) beside pyembed.rebuild_index:
    the rebuild takes the corpus row before it builds (the build locks the partition against
    writes), as every step does, so it waits instead of holding the partition the next step
    needs."""
    _app, owner, _texts = corpus
    to_shift(owner, 50)
    dba = psycopg.connect(db.owner_dsn)
    try:
        dba.execute("SELECT pyembed.migration_shift(%s, 100)", (CORPUS,))
        out = Outcome()
        rebuilt: list[Any] = []

        rebuilder = pyembed.connect(db.owner_dsn)

        def rebuild() -> None:
            rebuilt.extend(rebuilder.conn.execute("SELECT pyembed.rebuild_index(%s)",
                                                  (CORPUS,)).fetchall())

        watcher = psycopg.connect(db.owner_dsn, autocommit=True)
        thread, _ = in_background(rebuild, out.maintenance)
        try:
            thread.start()
            out.waited = waits_for_lock(watcher, rebuilder.conn.info.backend_pid, thread)
            try:
                dba.execute("SELECT set_config('lock_timeout', %s, true)", (LOCK_WAIT,))
                dba.execute("SELECT pyembed.migration_complete(%s)", (CORPUS,))
                dba.commit()
            except psycopg.Error as e:
                out.client.append(e)
                dba.rollback()
            thread.join(60)
            assert not thread.is_alive()
        finally:
            watcher.close()
            rebuilder.close()
    finally:
        dba.close()
    out.assert_clean()
    assert out.waited
    # The rebuild saw the completed migration: one key, the new one.
    assert one(owner.conn, "SELECT model_key FROM pyembed.corpora") == NEW
    assert len(rebuilt) == 1 and rebuilt[0][0] == one(
        owner.conn, "SELECT pyembed._index_name(corpus_id, %s) FROM pyembed.corpora", (NEW,))


@pytest.mark.parametrize("step", ["complete", "rollback"])
def test_a_key_change_waits_for_a_writer_holding_queued_jobs_before_locking_the_partition(
        db: Database, corpus: tuple[Client, Client, list[str]], step: str) -> None:
    """A writer changes a chunk whose jobs are queued (its queue rows locked by the trigger that
    re-queues it), then writes its vectors (the partition); complete and rollback remove the
    jobs of the key they drop before their key change locks the partition, so they wait for
    the writer instead of each waiting for the other."""
    app, owner, _texts = corpus
    to_shift(owner, 100 if step == "complete" else 50)
    cid = one(owner.conn, "SELECT corpus_id FROM pyembed.corpora")
    with app.conn.transaction():  # a chunk without vectors: queued for both keys
        app.conn.execute("INSERT INTO pyembed.documents (corpus_id, document_id, content_hash) "
                         "VALUES (%s, 'queued', '\\x00')", (cid,))
        chunk = one(app.conn, "INSERT INTO pyembed.chunks (corpus_id, document_id, chunk_index, "
                              "content) VALUES (%s, 'queued', 0, 'item777 queued') "
                              "RETURNING chunk_id", (cid,))
    assert count(owner.conn, "queue") == 2
    text = "item777 changed"

    def change(client: Client) -> None:
        client.conn.execute("UPDATE pyembed.chunks SET content = %s WHERE chunk_id = %s",
                            (text, chunk))

    def write(client: Client) -> None:
        with client.conn.cursor() as cur:
            copy_vectors(cur, cid, [chunk], OLD, fake(OLD, [text]), [sha256(text)])

    out = race(db, app, change, _complete if step == "complete" else _rollback, write)
    out.assert_clean()
    assert out.waited
    # The writer's vector took the old key's job; the step removed the job of the key it
    # dropped; a new key it kept waits for the worker.
    assert one(owner.conn, "SELECT model_key FROM pyembed.corpora") == (
        NEW if step == "complete" else OLD)
    assert owner.conn.execute("SELECT model_key FROM pyembed.queue").fetchall() == (
        [(NEW,)] if step == "complete" else [])


# -- the worker against a writer deleting chunks ----------------------------------------------
def _deleting(dsn: str, chunk: int) -> psycopg.Connection[Any]:
    """A writer's transaction deleting `chunk`, at the point where the DELETE holds the chunk's
    row and its cascade has yet to reach the chunk's queue rows (held here with the lock the
    DELETE takes first)."""
    writer = psycopg.connect(dsn)
    writer.execute("SELECT FROM pyembed.chunks WHERE chunk_id = %s FOR UPDATE", (chunk,))
    return writer


@pytest.mark.parametrize("how", ["fail", "expire"])
def test_the_worker_moving_a_job_to_failed_never_deadlocks_with_its_chunks_delete(
        db: Database, how: str) -> None:
    """Moving a job to pyembed.queue_failed (a refused text; a job out of attempts, at each
    claim) inserts a row whose foreign key locks the chunk FOR KEY SHARE, after deleting the
    queue row; a writer deleting the chunk holds the chunk, then its cascade deletes the queue
    row. The worker takes the chunk first, and leaves a job whose chunk is being deleted to that
    delete (the cascade removes it)."""
    from pyembed.worker import Worker, WorkerStats

    with pyembed.connect(db.app_dsn) as app:
        cid = app.create_corpus(CORPUS, OLD).info.corpus_id
        with app.conn.transaction():  # a chunk without vectors: queued
            app.conn.execute("INSERT INTO pyembed.documents (corpus_id, document_id, "
                             "content_hash) VALUES (%s, 'd', '\\x00')", (cid,))
            chunk = one(app.conn, "INSERT INTO pyembed.chunks (corpus_id, document_id, "
                                  "chunk_index, content) VALUES (%s, 'd', 0, 'item1 text') "
                                  "RETURNING chunk_id", (cid,))
        worker = Worker(db.app_dsn, max_attempts=2)
        stats = WorkerStats()
        errors: list[BaseException] = []
        try:
            [item] = worker.claim(stats)
            worker.conn.commit()
            if how == "expire":  # out of attempts, its lease over: the next claim fails it
                with psycopg.connect(db.owner_dsn, autocommit=True) as owner:
                    owner.execute("UPDATE pyembed.queue SET attempts = 2, not_before = now()")
            writer = _deleting(db.app_dsn, chunk)
            watcher = psycopg.connect(db.owner_dsn, autocommit=True)

            def move() -> None:
                if how == "fail":
                    worker._fail(item, "invalid text: test", stats)
                else:
                    assert worker.claim(stats) == []

            thread, _ = in_background(move, errors)
            thread.start()
            waited = waits_for_lock(watcher, worker.conn.info.backend_pid, thread)
            try:
                writer.execute("SELECT set_config('lock_timeout', %s, false)", (LOCK_WAIT,))
                writer.execute("SELECT pyembed.delete_chunks(%s, '{d}', '{0}')",  # chunk
                               (CORPUS,))
                writer.commit()
            except psycopg.Error as e:
                errors.append(e)
            finally:
                writer.close()
            thread.join(60)
            watcher.close()
        finally:
            worker.close()
        assert not errors, errors
        assert not waited
        with psycopg.connect(db.owner_dsn) as owner:
            assert count(owner, "queue") == count(owner, "queue_failed") == 0
        assert stats.failed == 0


# -- dropping a corpus: its row and its partition, against every kind of client ---------------
def _dropping(result: list[Any]) -> Callable[[Client], None]:
    def run(owner: Client) -> None:
        result.append(one(owner.conn, "SELECT pyembed.drop_corpus(%s)", (CORPUS,)))
    return run


def _new_chunk(client: Client) -> int:
    """A document and its chunk written by the client: the document's foreign key locks the
    corpus row FOR KEY SHARE until the client's transaction ends."""
    cid = one(client.conn, "SELECT corpus_id FROM pyembed.corpora")
    client.conn.execute("INSERT INTO pyembed.documents (corpus_id, document_id, content_hash) "
                        "VALUES (%s, 'written', '\\x00')", (cid,))
    return int(one(client.conn, "INSERT INTO pyembed.chunks (corpus_id, document_id, "
                                "chunk_index, content) VALUES (%s, 'written', 0, %s) "
                                "RETURNING chunk_id", (cid, "item999 written")))


def _vectors_of(chunks: list[int], text: str) -> Callable[[Client], None]:
    def write(client: Client) -> None:
        cid = one(client.conn, "SELECT corpus_id FROM pyembed.corpora")
        with client.conn.cursor() as cur:
            copy_vectors(cur, cid, chunks, OLD, fake(OLD, [text] * len(chunks)),
                         [sha256(text)] * len(chunks))
    return write


def _assert_dropped(owner: Client, result: list[Any]) -> None:
    assert result == [True]
    for table in ("corpora", "documents", "chunks", "queue", "vectors", "recall_samples",
                  "eval_queries"):
        assert count(owner.conn, table) == 0, table


def test_a_drop_lets_a_writer_that_wrote_a_document_write_its_vectors(
        db: Database, corpus: tuple[Client, Client, list[str]]) -> None:
    """The writer holds the corpus row (FOR KEY SHARE, its document's foreign key), then needs
    the partition; the drop needs both. Taking the partition first, the drop waited for the row
    while the writer waited for the partition (a deadlock: one of them failed with 40P01)."""
    app, owner, _texts = corpus
    chunks: list[int] = []
    result: list[Any] = []
    out = race(db, app, lambda client: chunks.append(_new_chunk(client)), _dropping(result),
               lambda client: _vectors_of(chunks, "item999 written")(client), blocked=held_up)
    out.assert_clean()
    assert out.waited
    _assert_dropped(owner, result)


def test_a_drop_lets_a_writer_holding_a_chunk_write_its_vectors(
        db: Database, corpus: tuple[Client, Client, list[str]]) -> None:
    """The worker (and copy_vectors) holds its chunks FOR KEY SHARE, then writes the partition;
    the drop deletes the chunks (the cascade) and drops the partition."""
    app, owner, _texts = corpus
    chunk = int(one(owner.conn, "SELECT min(chunk_id) FROM pyembed.chunks"))
    text = one(owner.conn, "SELECT content FROM pyembed.chunks WHERE chunk_id = %s", (chunk,))
    result: list[Any] = []
    out = race(db, app, lambda client: client.conn.execute(
        "SELECT FROM pyembed.chunks WHERE chunk_id = %s FOR KEY SHARE", (chunk,)),
        _dropping(result), _vectors_of([chunk], text), blocked=held_up)
    out.assert_clean()
    assert out.waited
    _assert_dropped(owner, result)


def test_a_drop_lets_a_search_record_its_sample(
        db: Database, corpus: tuple[Client, Client, list[str]]) -> None:
    """The search holds the partition, then records a recall sample (the corpus row FOR KEY
    SHARE): the order of the writer above, reversed."""
    app, owner, texts = corpus
    result: list[Any] = []
    out = race(db, app, searching(OLD, texts[0]), _dropping(result), sampled_search(texts[1]),
               blocked=held_up)
    out.assert_clean()
    assert out.waited
    _assert_dropped(owner, result)


def test_a_drop_that_cannot_have_the_corpus_says_so_and_changes_nothing(
        db: Database, corpus: tuple[Client, Client, list[str]]) -> None:
    """A client transaction that keeps the partition past the drop's 5 s: the drop fails with
    its own error (PE012, retry) and drops nothing."""
    app, owner, texts = corpus
    with app.conn.transaction():
        searching(OLD, texts[0])(app)
        with psycopg.connect(db.owner_dsn) as other:
            with pytest.raises(psycopg.Error) as err:
                other.execute("SELECT pyembed.drop_corpus(%s)", (CORPUS,))
    assert err.value.sqlstate == "PE012", err.value
    assert "retry" in str(err.value)
    assert count(owner.conn, "corpora") == 1 and count(owner.conn, "documents") == 20


# -- a call that looked the corpus up before a drop committed ----------------------------------
def _query(key: str) -> Vector:
    return Vector(fake(key, ["item3 w1 w2"])[0])


def _copy(client: Client) -> Any:
    corpus_id = client.corpus(CORPUS).info.corpus_id
    chunk = one(client.conn, "SELECT chunk_id FROM pyembed.chunks LIMIT 1")
    with translated(), client.conn.transaction(), client.conn.cursor() as cur:
        return copy_vectors(cur, corpus_id, [chunk], OLD, fake(OLD, ["x"]), [None])


DROP_RACES: dict[str, tuple[bool, Callable[[Client], Any]]] = {
    # entry point: (an owner's call, the call)
    "search (SQL)": (False, lambda c: c.conn.execute(
        "SELECT count(*) FROM pyembed.search(%s, %s, %s, 3)", (CORPUS, _query(OLD), OLD))),
    "search by chunk (SQL)": (False, lambda c: c.conn.execute(
        "SELECT count(*) FROM pyembed.search(%s, %s, %s, 3, NULL, 'chunk')",
        (CORPUS, _query(OLD), OLD))),
    "search_text (SQL, PL/Python)": (False, lambda c: c.conn.execute(
        "SELECT count(*) FROM pyembed.search_text(%s, 'item3 w1', 3)", (CORPUS,))),
    "Corpus.search": (False, lambda c: c.corpus(CORPUS).search("item3 w1", k=3)),
    "Corpus.search hybrid": (False, lambda c: c.corpus(CORPUS).search("item3 w1", k=3,
                                                                      mode="hybrid")),
    "add_document (SQL, PL/Python)": (False, lambda c: c.conn.execute(
        "SELECT pyembed.add_document(%s, 'new', 'item new words')", (CORPUS,))),
    "Corpus.add": (False, lambda c: c.corpus(CORPUS).add([Document("new", "item new words")])),
    "drop_corpus": (False, lambda c: c.drop_corpus(CORPUS)),  # it returned False
    "copy_vectors": (False, _copy),
    "set_index_settings": (True, lambda c: index.set_index_settings(c.conn, CORPUS, ef_search=50)),
    "rebuild_index (SQL)": (True, _rebuild),
    "migration start": (True, _start),
}


@pytest.mark.parametrize("entry", DROP_RACES)
def test_a_call_racing_a_drop_finds_the_corpus_unknown(
        db: Database, corpus: tuple[Client, Client, list[str]], entry: str) -> None:
    """The drop has taken the corpus (uncommitted) when the call starts: the call still sees the
    corpus row, then waits for what the drop holds (the partition, the row) and, once the drop
    commits, finds it gone. That is PE002 (UnknownCorpus), as for a corpus never made; it was
    a raw 42P01 (the partition's "relation does not exist"), a foreign-key violation, "query
    returned no rows" or a NULL corpus id."""
    app, owner, _texts = corpus
    by_owner, call = DROP_RACES[entry]
    caller = owner if by_owner else app
    if entry in ("Corpus.add", "copy_vectors"):
        caller.corpus(CORPUS)  # the corpus's info, looked up before the drop
    dropper = psycopg.connect(db.app_dsn)
    watcher = psycopg.connect(db.owner_dsn, autocommit=True)
    thread, failed = in_background(lambda: call(caller))
    try:
        assert one(dropper, "SELECT pyembed.drop_corpus(%s)", (CORPUS,)) is True
        thread.start()
        assert waits_for_lock(watcher, caller.conn.info.backend_pid, thread)
        dropper.commit()
        thread.join(60)
        assert not thread.is_alive()
    finally:
        dropper.close()
        watcher.close()
    assert len(failed) == 1, f"{entry} did not fail"
    error = failed[0]
    if isinstance(error, psycopg.Error):
        assert error.sqlstate == "PE002", error
    else:
        assert isinstance(error, pyembed.UnknownCorpus), repr(error)
    assert "unknown corpus" in str(error)


def test_a_drop_never_waits_while_holding_what_a_waiting_client_needs(
        db: Database, corpus: tuple[Client, Client, list[str]]) -> None:
    """A client's deadlock check runs once, deadlock_timeout after it began to wait: a drop
    that waited for one of the client's locks (here the search's partition) while holding one
    the client then waited for (the corpus row, its document's foreign key), at that moment,
    made the client fail with 40P01 (the drop's own 40P01s are caught and retried).
    deadlock_timeout is lowered here to fall inside the drop's 100 ms wait; at 1 s the window
    was the same for a client that had waited on an earlier step of the drop's attempt. Three
    rounds: the race depends on the client's timing (one round caught it 2 times in 3)."""
    _app, owner, texts = corpus
    with psycopg.connect(db.owner_dsn, autocommit=True) as su:
        su.execute(sql.SQL("ALTER DATABASE {} SET deadlock_timeout = '5ms'").format(
            sql.Identifier(db.name)))
    client = pyembed.connect(db.app_dsn)  # a session of its own, with the setting
    try:
        sampling(client, 0.0)
        assert one(client.conn, "SHOW deadlock_timeout") == "5ms"
        for round_ in range(3):
            if round_:
                client.create_corpus(CORPUS, OLD).add(
                    [Document(f"r{i}", t) for i, t in enumerate(texts[:5])])
            result: list[Any] = []
            out = race(db, client, searching(OLD, texts[0]), _dropping(result), _new_chunk,
                       blocked=lock_wait_or_tries)
            out.assert_clean()
            assert result == [True] and count(owner.conn, "corpora") == 0
    finally:
        client.close()


@pytest.mark.parametrize("second", ["reindex", "backfill"])
def test_a_second_index_build_of_a_corpus_says_another_is_running(
        db: Database, corpus: tuple[Client, Client, list[str]], second: str) -> None:
    """Two DBAs' `pyembed corpus reindex` of one corpus at once (or a reindex and a migration's
    backfill, which builds the target's index): each builds CONCURRENTLY, and the second dropped
    the first's half-built index (DROP INDEX CONCURRENTLY, waiting for the first, which waited
    for the second's snapshot): a deadlock, exit 1. Now one index build of a corpus runs at a
    time (pyembed._claim_backfill, the claim a backfill takes): the second is Busy (PE012) at
    once, naming the other, and the first completes. The first is held mid-build by a
    transaction whose snapshot its build waits for."""
    _app, owner, _texts = corpus
    if second == "backfill":
        migration.start(owner, CORPUS, NEW)
    holder = psycopg.connect(db.owner_dsn)
    first = pyembed.connect(db.owner_dsn)
    watcher = psycopg.connect(db.owner_dsn, autocommit=True)
    other = pyembed.connect(db.owner_dsn)
    try:
        holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT count(*) FROM pyembed.models").fetchone()  # a snapshot held
        other.conn.execute("SET statement_timeout = '10s'")  # (before: it waited for ever)
        thread, errors = in_background(lambda: first.rebuild_index(CORPUS))
        thread.start()
        assert waits_for_lock(watcher, first.conn.info.backend_pid, thread)
        with pytest.raises(pyembed.Busy,
                           match="another index build of corpus 'docs' is already running"):
            if second == "reindex":
                other.rebuild_index(CORPUS)
            else:
                migration.backfill(other, CORPUS)
        holder.rollback()
        thread.join(60)
        assert not thread.is_alive() and errors == []
    finally:
        holder.close()
        first.close()
        watcher.close()
        other.close()
    # The first rebuild swapped its index in; nothing half-built is left.
    assert one(owner.conn, "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
               "WHERE c.relnamespace = 'pyembed'::regnamespace AND NOT i.indisvalid") == 0
