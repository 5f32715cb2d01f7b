"""A corpus's HNSW index: its storage (vector, halfvec, binary), the parameters pyembed's rule
chooses from the corpus's size and dimensions (pyembed.hnsw_rule, docs/index-tuning.md), the
owner's overrides, and rebuilding it online: a new index built CONCURRENTLY beside the one
serving searches, then swapped for it in one short transaction (pyembed._swap_vector_index).
These are the owner's operations (the application role may not run them)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from .dbcall import translated
from .errors import Busy, InvalidInput, shown

STORAGES = ("vector", "halfvec", "binary")
BULK_LOAD_ROWS = 1_000
"""Corpus.add defers the index build (bulk_load) for a write of at least this many chunks."""
END_WAIT = 10.0
"""Seconds a bulk load's end tries again to build the index while other writers' transactions
are open (the build waits for none of them); after that the corpus's next write builds it."""
SETTINGS = ("m", "ef_construction", "ef_search", "oversample")


@dataclass(frozen=True)
class IndexStatus:
    """What serves one key of a corpus: `m`/`ef_construction` as built, `rule_*` what the rule
    chooses for `rows` now (a rebuild applies them), `ef_search`/`oversample` what searches use;
    `settings` the owner's overrides."""

    model_key: str
    storage: str
    index_name: str | None
    index_bytes: int | None
    rows: int
    m: int | None
    ef_construction: int | None
    rule_m: int
    rule_ef_construction: int
    ef_search: int
    oversample: int
    settings: dict[str, int]

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def check_storage(storage: str) -> str:
    if storage not in STORAGES:
        raise InvalidInput(f"unknown storage {shown(storage)}: use vector, halfvec or binary")
    return storage


def index_status(conn: psycopg.Connection[Any], corpus: str) -> list[IndexStatus]:
    with translated():
        rows = conn.execute("SELECT * FROM pyembed.index_status(%s)", (corpus,)).fetchall()
    return [IndexStatus(*r) for r in rows]


def set_index_settings(conn: psycopg.Connection[Any], corpus: str,
                       **settings: int | None) -> dict[str, int]:
    """Override the rule's m, ef_construction, ef_search or oversample for a corpus (None: back
    to the rule); returns the overrides in force. ef_search and oversample apply to the next
    search, m and ef_construction to the next rebuild. The database says what is wrong with
    them (PE005, InvalidInput), in the words of its table's CHECK."""
    from psycopg.types.json import Jsonb

    with translated(), conn.transaction():
        row = conn.execute("SELECT pyembed.set_index_settings(%s, %s)",
                           (corpus, Jsonb(settings))).fetchone()
    assert row is not None
    return dict(row[0])


def build_index_online(conn: psycopg.Connection[Any], corpus_id: int, key: str,
                       storage: str | None = None, name: str | None = None) -> str | None:
    """CREATE INDEX CONCURRENTLY the index of a corpus's key (in `storage`, under `name`;
    default: the key's own), with maintenance_work_mem and parallel maintenance workers set for
    the build (pyembed._index_build_settings) and restored after it; an invalid index left by
    an interrupted build under that name is dropped first. `conn` must be in autocommit mode.
    Returns the index name, or None when the storage has no index for the model's width."""
    if name is None:
        row = conn.execute("SELECT pyembed._index_name(%s, %s)", (corpus_id, key)).fetchone()
        assert row is not None
        name = str(row[0])
    _drop_if_left_invalid(conn, name)
    ddl = conn.execute("SELECT pyembed._vector_index_sql(%s, %s, true, %s, %s)",
                       (corpus_id, key, storage, name)).fetchone()
    if ddl is None or ddl[0] is None:
        return None
    before = conn.execute("SELECT current_setting('maintenance_work_mem'), "
                          "current_setting('max_parallel_maintenance_workers'), "
                          "current_setting('lock_timeout')").fetchone()
    assert before is not None
    lock_wait = before[2]
    conn.execute("SELECT pyembed._index_build_settings(%s, %s, false, %s)",
                 (corpus_id, key, storage))
    try:
        conn.execute(ddl[0])
    except BaseException:
        # A build stopped (Ctrl-C, SIGTERM, a cancel, a deadlock) leaves its index invalid, and
        # every write to the corpus still inserts into it: dropped now, not at the next build.
        if not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE:
            try:
                # At most DROP_WAIT for the sessions the drop waits on: a stopped command
                # stops, and a drop it gave up on is the next build's.
                conn.execute("SELECT set_config('lock_timeout', %s, false)", (DROP_WAIT,))
                _drop_if_left_invalid(conn, name)
            except psycopg.Error:
                pass  # (the build's error is the one to tell; the next build drops it)
            finally:
                if not conn.closed:
                    conn.execute("SELECT set_config('lock_timeout', %s, false)", (lock_wait,))
        raise
    finally:
        if not conn.closed:  # (a lost session's settings went with it; the loss is the error)
            conn.execute("SELECT set_config('maintenance_work_mem', %s, false), "
                         "set_config('max_parallel_maintenance_workers', %s, false)", before[:2])
    return name


DROP_WAIT = "3s"


LEFT_INVALID = """SELECT FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
 WHERE c.relnamespace = 'pyembed'::regnamespace AND c.relname = %s AND NOT i.indisvalid
   AND NOT EXISTS (SELECT FROM pg_catalog.pg_stat_progress_create_index p
                    WHERE p.index_relid = c.oid AND p.pid <> pg_backend_pid())"""
"""pyembed's index `name` if it is invalid and no other session is building it: what a build
that stopped left (one at work is invalid until it ends)."""


def _drop_if_left_invalid(conn: psycopg.Connection[Any], name: str) -> None:
    if conn.execute(LEFT_INVALID, (name,)).fetchone() is not None:
        conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
            sql.Identifier("pyembed", name)))


def drop_index_online(conn: psycopg.Connection[Any], name: str) -> None:
    """Drop pyembed's index `name` CONCURRENTLY if there is one (not DROP ... IF EXISTS, which
    sends the client a NOTICE when there is none)."""
    if conn.execute("SELECT to_regclass(format('pyembed.%%I', %s::text))", (name,)).fetchone() \
            != (None,):
        conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
            sql.Identifier("pyembed", name)))


@contextmanager
def one_build(conn: psycopg.Connection[Any], corpus_id: int, corpus: str) -> Iterator[None]:
    """Around a `corpus reindex` and a migration's backfill (which builds the target's index):
    one at a time per corpus, claimed for this session by the owner's function
    (pyembed._claim_backfill: a key no other role can hold beforehand), else Busy. Two
    CONCURRENTLY builds of one corpus deadlocked (the second dropped the first's half-built
    index, which waited for the second's snapshot)."""
    with translated(), conn.transaction():
        claimed = conn.execute("SELECT pyembed._claim_backfill(%s)", (corpus_id,)).fetchone()
    if not claimed or not claimed[0]:
        raise Busy(f"another index build of corpus {shown(corpus)} is already running (a "
                   "reindex, or a migration's backfill, which builds the target's index): retry "
                   "when it ends")
    try:
        yield
    finally:
        # A lost session's claim went with it (and the error to tell is the loss).
        if not conn.closed:
            with translated(), conn.transaction():
                conn.execute("SELECT pyembed._release_backfill(%s)", (corpus_id,))


def rebuild_index(conn: psycopg.Connection[Any], corpus: str,
                  storage: str | None = None) -> list[IndexStatus]:
    """Rebuild a corpus's index online with the parameters in force (the rule's for its rows
    now, or the owner's overrides), in `storage` (default: the corpus's own); a migration's
    target key is rebuilt in its own storage. Searches and writes go on; each key's new index
    replaces the old one in one short transaction. `conn` must be in autocommit mode."""
    if storage is not None:
        check_storage(storage)
    if not conn.autocommit:
        raise InvalidInput("rebuild_index builds CONCURRENTLY: pass an autocommit connection")
    with translated():
        c = conn.execute("SELECT corpus_id, model_key, target_model_key, storage, "
                         "coalesce(target_storage, storage) FROM pyembed.lookup_corpus(%s)",
                         (corpus,)).fetchone()
        assert c is not None
        corpus_id, active, target, active_storage, target_storage = c
    with one_build(conn, corpus_id, corpus), translated():
        for key, st in ((active, storage or active_storage), (target, target_storage)):
            if key is None:
                continue
            tmp = conn.execute("SELECT pyembed._rebuild_name(%s, %s)", (corpus_id, key)).fetchone()
            assert tmp is not None
            drop_index_online(conn, tmp[0])
            built = build_index_online(conn, corpus_id, key, st, tmp[0])
            with conn.transaction():
                conn.execute("SELECT pyembed._swap_vector_index(%s, %s, %s, %s)",
                             (corpus_id, key, built, st))
    return index_status(conn, corpus)


@contextmanager
def bulk_load(conn: psycopg.Connection[Any], corpus: str,
              turn: Callable[[], AbstractContextManager[Any]] = nullcontext) -> Iterator[bool]:
    """Around every bulk writer's load (`pyembed ingest`, Corpus.add of many chunks,
    bulk_load.load_vectors): a corpus whose key has no vectors yet gets its HNSW index built
    once, at the end, instead of each vector inserted into it (pyembed.begin_bulk_load; searches
    meanwhile scan exactly). Yields whether the build was deferred; the load's own writes may
    use other connections of the same role. `turn` is taken around each call on `conn`.

    Only on a connection outside a transaction block: the drop and the build then each commit
    on their own, so the build holds the corpus's other writers only while it runs (inside a
    caller's transaction it would hold them until that commits). The build happens at the end
    whether the load succeeded or not; a load that never gets there (killed) leaves the index
    to the corpus's next write or `pyembed corpus reindex`."""
    deferred = False
    if conn.info.transaction_status == TransactionStatus.IDLE:
        with turn(), translated(), conn.transaction():
            row = conn.execute("SELECT pyembed.begin_bulk_load(%s)", (corpus,)).fetchone()
        deferred = bool(row and row[0])
    try:
        yield deferred
    finally:
        # A lost connection's session is gone, and its loader record with it: the index is
        # the corpus's next write's (else the error would be this call's, not the loss).
        if deferred and not conn.closed:
            end_bulk_load(conn, corpus, turn)


def end_bulk_load(conn: psycopg.Connection[Any], corpus: str,
                  turn: Callable[[], AbstractContextManager[Any]] = nullcontext,
                  wait: float = END_WAIT) -> str | None:
    """End this session's bulk load of `corpus` (pyembed.end_bulk_load) and build its index,
    trying again for up to `wait` seconds while another writer's transaction is open (the build
    never waits for one: see pyembed._heal_vector_index). Returns the index built, or None:
    none was missing, another loader is still at work (it builds it) or the wait ran out."""
    deadline = time.monotonic() + wait
    while True:
        with turn(), translated(), conn.transaction():
            row = conn.execute("SELECT pyembed.end_bulk_load(%s)", (corpus,)).fetchone()
            if row and row[0]:
                return str(row[0])
            loading = conn.execute(
                "SELECT u.loading FROM pyembed.unindexed_corpora() u WHERE u.corpus = %s",
                (corpus,)).fetchone()
        if loading is None or loading[0] or time.monotonic() >= deadline:
            return None
        time.sleep(0.2)
