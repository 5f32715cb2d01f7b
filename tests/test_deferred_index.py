"""A first bulk load into an empty corpus builds its HNSW graph once, after the load
(pyembed.begin_bulk_load / end_bulk_load, around `ingest`): not on a corpus that has vectors,
with the same rows as a load that inserts, and a load that never ends (killed) leaves a state
that heals at the corpus's next write or the owner's reindex."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

import pyembed
from pyembed import bulk_load, doctor, health, index, migration
from pyembed.client import Client
from pyembed.corpora import create_corpus
from pyembed.index import rebuild_index
from pyembed.ingest import ingest
from tests.conftest import REPO, Database
from tests.helpers import chunk_hashes, stored_chunks, unit

KEY = "fake/fake-hash@1:384"


def _docs(n: int, prefix: str = "d") -> list[dict[str, str]]:
    return [{"id": f"{prefix}{i}", "text": f"apple banana {prefix} number {i} " + "cherry " * (i % 7)}
            for i in range(n)]


def _jsonl(tmp_path: Path, docs: list[dict[str, str]], name: str = "docs.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


def _index_oid(owner: psycopg.Connection[Any], corpus: str) -> int | None:
    row = owner.execute(
        "SELECT to_regclass(format('pyembed.%%I', pyembed._index_name(corpus_id, model_key)))"
        "::oid FROM pyembed.corpora WHERE name = %s", (corpus,)).fetchone()
    assert row is not None
    return row[0]


def _unindexed(conn: psycopg.Connection[Any]) -> list[tuple[str, str, bool]]:
    return [tuple(r) for r in conn.execute("SELECT * FROM pyembed.unindexed_corpora()")]


def _rows(owner: psycopg.Connection[Any], corpus: str) -> dict[str, Any]:
    """Everything a load stores for a corpus, keyed by what does not depend on ids."""
    cid = owner.execute("SELECT corpus_id FROM pyembed.corpora WHERE name = %s",
                        (corpus,)).fetchone()[0]  # type: ignore[index]
    chunks = owner.execute(
        "SELECT ch.document_id, ch.chunk_index, ch.content, v.embedding::text "
        "FROM pyembed.chunks ch JOIN pyembed.vectors v USING (corpus_id, chunk_id) "
        "WHERE ch.corpus_id = %s ORDER BY 1, 2", (cid,)).fetchall()
    postings = owner.execute(
        "SELECT ch.document_id, ch.chunk_index, p.lexeme, p.tf, p.doc_len "
        "FROM pyembed.postings p JOIN pyembed.chunks ch USING (corpus_id, chunk_id) "
        "WHERE p.corpus_id = %s ORDER BY 1, 2, 3", (cid,)).fetchall()
    doc_postings = owner.execute(
        "SELECT d.document_id, p.lexeme, p.tf, p.doc_len FROM pyembed.document_postings p "
        "JOIN pyembed.documents d USING (corpus_id, doc_no) WHERE p.corpus_id = %s "
        "ORDER BY 1, 2", (cid,)).fetchall()
    return {"chunks": chunks, "postings": postings, "document_postings": doc_postings}


def test_an_empty_corpus_gets_its_index_built_after_the_load(
        client: Client, owner: psycopg.Connection[Any], tmp_path: Path) -> None:
    corpus = client.create_corpus("empty", KEY)
    before = _index_oid(owner, "empty")
    assert before is not None
    seen: list[tuple[int | None, list[Any]]] = []
    writes = corpus.write

    def write(*args: Any, **kwargs: Any) -> Any:  # what the database shows while it loads
        done = writes(*args, **kwargs)
        seen.append((_index_oid(owner, "empty"), _unindexed(owner)))
        return done

    corpus.write = write  # type: ignore[method-assign]
    report = ingest(corpus, _jsonl(tmp_path, _docs(50)), batch_size=10, progress=False)
    assert report.added == 50
    assert len(seen) == 5
    assert all(oid is None and found == [("empty", KEY, True)] for oid, found in seen)
    after = _index_oid(owner, "empty")
    assert after is not None and after != before  # dropped, then built once at the end
    assert _unindexed(owner) == []
    hits = corpus.search("apple banana d number 7", k=3)
    assert hits and hits[0].document_id == "d7"


def test_a_corpus_with_vectors_keeps_its_index(
        client: Client, owner: psycopg.Connection[Any], tmp_path: Path) -> None:
    corpus = client.create_corpus("full", KEY)
    corpus.add([("first", "one document already there")])
    before = _index_oid(owner, "full")
    with client._conn.transaction():
        deferred = client._conn.execute("SELECT pyembed.begin_bulk_load('full')").fetchone()
    assert deferred == (False,)
    ingest(corpus, _jsonl(tmp_path, _docs(20)), batch_size=10, progress=False)
    assert _index_oid(owner, "full") == before


def test_results_equal_those_of_a_load_into_the_index(
        client: Client, owner: psycopg.Connection[Any], tmp_path: Path) -> None:
    docs = _docs(40)
    deferred = client.create_corpus("deferred", KEY)
    ingest(deferred, _jsonl(tmp_path, docs), batch_size=7, progress=False)
    inserted = client.create_corpus("inserted", KEY)
    for i in range(0, len(docs), 7):
        inserted.add([(d["id"], d["text"]) for d in docs[i:i + 7]])
    assert _rows(owner, "deferred") == _rows(owner, "inserted")
    assert _rows(owner, "deferred")["postings"]
    def ranked(corpus: Any, q: str, mode: str) -> list[tuple[float, str]]:
        # Every document, ties (the fake model's) in id order.
        return sorted((-round(h.score, 5), h.document_id)
                      for h in corpus.search(q, len(docs), mode=mode))

    for q in ("apple banana d number 3", "cherry cherry"):
        for mode in ("vector", "keyword", "hybrid"):
            assert ranked(deferred, q, mode) == ranked(inserted, q, mode)
            assert ranked(deferred, q, mode)


def test_writes_during_a_load_leave_the_build_to_its_end(
        client: Client, db: Database, owner: psycopg.Connection[Any]) -> None:
    corpus = client.create_corpus("shared", KEY)
    with pyembed.connect(db.app_dsn) as other:
        with corpus.bulk_load() as deferred:
            assert deferred
            # Another writer, and this session's own writes (a refused batch's), find a loader
            # at work and leave the index to it.
            other.corpus("shared").add([("x", "written by another client")])
            corpus.add([("y", "written by the loader's own session")])
            assert _index_oid(owner, "shared") is None
            with psycopg.connect(db.app_dsn, autocommit=True) as app:
                assert [f.level for f in health.indexes(app)] == ["ok"]  # a load at work
                assert doctor.check_indexes(app).status == "ok"
            assert other.corpus("shared").search("another client", 1)[0].document_id == "x"
        assert _index_oid(owner, "shared") is not None


KILLED = """
import os, sys
import pyembed

with pyembed.connect(sys.argv[1]) as client:
    corpus = client.corpus("killed")
    with corpus.bulk_load() as deferred:
        assert deferred
        corpus.add([("a", "written before the crash"), ("b", "another one")])
        os.kill(os.getpid(), 9)
"""


def wait_for_killed_loader(owner: psycopg.Connection[Any]) -> None:
    """A killed loader's backend ends only when it reads its client's closed socket, which a
    loaded machine delays: wait for it before reading what its end leaves."""
    for _ in range(400):
        if owner.execute("SELECT NOT EXISTS (SELECT FROM pg_stat_activity a "
                         "JOIN pyembed.bulk_loaders b USING (pid))").fetchone() == (True,):
            return
        time.sleep(0.05)
    raise AssertionError("the killed loader's backend did not end")


def _killed_load(db: Database, owner: psycopg.Connection[Any], client: Client) -> None:
    client.create_corpus("killed", KEY)
    proc = subprocess.run([sys.executable, "-c", KILLED, db.app_dsn], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    wait_for_killed_loader(owner)
    assert _index_oid(owner, "killed") is None
    # Seen as missing, with no loader at work any more: `pyembed status` and doctor warn.
    assert _unindexed(owner) == [("killed", KEY, False)]
    with psycopg.connect(db.app_dsn, autocommit=True) as app:
        found = health.indexes(app)
        check = doctor.check_indexes(app)
    assert [(f.subject, f.level) for f in found] == [(f"killed {KEY}", "warn")]
    assert "pyembed corpus reindex killed" in found[0].note
    assert check.status == "warn" and "killed" in check.detail
    assert "pyembed corpus reindex killed" in check.fix


def test_a_killed_load_heals_at_the_next_write(
        client: Client, db: Database, owner: psycopg.Connection[Any]) -> None:
    _killed_load(db, owner, client)
    client.corpus("killed").add([("c", "the next write builds the index")])
    assert _index_oid(owner, "killed") is not None
    assert _unindexed(owner) == []
    n = owner.execute("SELECT count(*) FROM pyembed.vectors v JOIN pyembed.corpora c "
                      "USING (corpus_id) WHERE c.name = 'killed'").fetchone()
    assert n == (3,)


def test_a_killed_load_heals_at_a_write_that_only_updates_chunks(
        client: Client, db: Database, owner: psycopg.Connection[Any],
        app: psycopg.Connection[Any]) -> None:
    """A write that inserts no chunk (a document rewritten with as many chunks: add_document's
    ON CONFLICT DO UPDATE) heals too. Before, only an INSERT's trigger healed: a corpus whose
    writes were all such updates stayed without its index until an insert or a reindex."""
    _killed_load(db, owner, client)
    chunks = owner.execute("SELECT count(*) FROM pyembed.chunks").fetchone()
    app.execute("SELECT pyembed.add_document('killed', 'a', 'written again after the crash')")
    assert owner.execute("SELECT count(*) FROM pyembed.chunks").fetchone() == chunks  # none new
    assert _index_oid(owner, "killed") is not None
    assert _unindexed(owner) == []


def test_a_lock_of_another_database_is_no_load_of_this_one(
        client: Client, db: Database, owner: psycopg.Connection[Any]) -> None:
    """The loaders' lock is looked up in this database only: another database's session holding
    the same key (its corpus of the same id loading) neither hides the missing index nor keeps
    the next write from building it."""
    _killed_load(db, owner, client)
    cid = owner.execute("SELECT corpus_id FROM pyembed.corpora WHERE name = 'killed'").fetchone()
    other = psycopg.conninfo.make_conninfo(db.owner_dsn, dbname="postgres")
    with psycopg.connect(other, autocommit=True) as elsewhere:
        elsewhere.execute("SELECT pg_advisory_lock_shared(1887003970, %s)", cid)
        assert _unindexed(owner) == [("killed", KEY, False)]
        client.corpus("killed").add([("c", "the next write builds the index")])
        assert _index_oid(owner, "killed") is not None


def test_a_killed_load_heals_during_a_migration(
        client: Client, db: Database, owner: psycopg.Connection[Any]) -> None:
    """A migration started after a killed load builds its target's index, not the active key's:
    that one is still listed (status and doctor warn) and built by the next write."""
    _killed_load(db, owner, client)
    target = owner.execute("SELECT pyembed.register_model('fake', 'fake-hash', '2', 384)"
                           ).fetchone()[0]  # type: ignore[index]
    with pyembed.connect(db.owner_dsn) as dba:
        migration.start(dba, "killed", target)
    assert _unindexed(owner) == [("killed", KEY, False)]
    client.corpus("killed").add([("c", "the next write builds the index")])
    assert _index_oid(owner, "killed") is not None
    assert _unindexed(owner) == []


def test_a_killed_load_heals_at_the_owners_reindex(
        client: Client, db: Database, owner: psycopg.Connection[Any]) -> None:
    _killed_load(db, owner, client)
    rebuild_index(owner, "killed")
    assert _index_oid(owner, "killed") is not None
    assert _unindexed(owner) == []


def _in_thread(call: Any) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def test_a_heal_waits_for_no_other_writer(
        client: Client, db: Database, owner: psycopg.Connection[Any]) -> None:
    """Two writers and a heal: writer b wrote while a loader was at work and has not committed;
    the loader is gone. Writer a's write finds the index missing: its heal must not wait for b
    (it waited, and b then writing a's document deadlocked)."""
    client.create_corpus("raced", KEY)
    with psycopg.connect(db.app_dsn, autocommit=True) as loader:
        assert loader.execute("SELECT pyembed.begin_bulk_load('raced')").fetchone() == (True,)
        with pyembed.connect(db.app_dsn) as b, pyembed.connect(db.app_dsn) as a:
            tx = b._conn.transaction()
            tx.__enter__()
            try:
                b.corpus("raced").add([("b1", "written by b while a loader was at work")])
                loader.close()  # the loader is gone; b's transaction is still open
                thread, errors = _in_thread(
                    lambda: a.corpus("raced").add([("a1", "written by a meanwhile")]))
                thread.join(20)
                assert not thread.is_alive(), "a's write waited for b's transaction"
                assert not errors, errors
                b.corpus("raced").add([("a1", "b writes a's document too"),
                                       ("b2", "and one of its own")])
                tx.__exit__(None, None, None)
            except BaseException as exc:
                tx.__exit__(type(exc), exc, exc.__traceback__)  # lets a's write go on
                raise
            finally:
                thread.join(60)
    # b's second write, alone at last, built the index in its transaction.
    assert _index_oid(owner, "raced") is not None
    assert _unindexed(owner) == []
    hits = client.corpus("raced").search("b writes a's document too", 1)
    assert hits[0].document_id == "a1"


def test_a_loader_ending_while_another_writes_holds_no_writer(
        client: Client, db: Database, owner: psycopg.Connection[Any]) -> None:
    """A loader ends while writer w's transaction is open: the build may not queue the
    corpus's other writers behind w (they waited for w's commit and the build)."""
    corpus = client.create_corpus("ending", KEY)
    with pyembed.connect(db.app_dsn) as w, pyembed.connect(db.app_dsn) as x:
        ending = corpus.bulk_load()
        assert ending.__enter__()
        corpus.add([("l1", "written by the loader")])
        tx = w._conn.transaction()
        tx.__enter__()
        loader: threading.Thread | None = None
        try:
            w.corpus("ending").add([("w1", "written by w, not committed yet")])
            loader, loader_errors = _in_thread(lambda: ending.__exit__(None, None, None))
            time.sleep(1)  # the loader is at its end now
            writer, errors = _in_thread(
                lambda: x.corpus("ending").add([("x1", "written by x meanwhile")]))
            writer.join(20)
            assert not writer.is_alive(), "x's write waited behind the loader's build"
            assert not errors, errors
            tx.__exit__(None, None, None)
        except BaseException as exc:
            tx.__exit__(type(exc), exc, exc.__traceback__)
            raise
        finally:
            if loader is not None:
                loader.join(120)
        assert not loader_errors, loader_errors
    # Built once w committed: by the loader's end, or by the next write.
    if _index_oid(owner, "ending") is None:
        corpus.add([("n1", "the next write")])
    assert _index_oid(owner, "ending") is not None
    assert _unindexed(owner) == []


def test_every_bulk_writer_defers_through_the_one_path(
        client: Client, db: Database, owner: psycopg.Connection[Any],
        app: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """index.bulk_load, shared: bulk_load.load_vectors (its lock held by a connection of its
    own while the others write) and Corpus.add of index.BULK_LOAD_ROWS chunks or more drop the
    index of an empty corpus and build it once at the end; a smaller add, a corpus with
    vectors and a write inside the caller's transaction block insert into the graph."""
    monkeypatch.setattr(index, "BULK_LOAD_ROWS", 12)
    # load_vectors: stored chunks, their vectors loaded over two connections.
    ids = stored_chunks(app, create_corpus(app, "loaded", KEY), 60)
    before = _index_oid(owner, "loaded")
    seen: list[int | None] = []
    copies = bulk_load.copy_vectors

    def copy(*args: Any, **kwargs: Any) -> Any:
        seen.append(_index_oid(owner, "loaded"))
        return copies(*args, **kwargs)

    monkeypatch.setattr(bulk_load, "copy_vectors", copy)
    bulk_load.load_vectors("loaded", ids, KEY, np.stack([unit(384, i) for i in range(60)]),
                           chunk_hashes(60), dsn=db.app_dsn, batch_rows=20, connections=2)
    assert seen == [None, None, None]  # every batch written with no graph to insert into
    after = _index_oid(owner, "loaded")
    assert after is not None and after != before
    assert _unindexed(owner) == []
    # Corpus.add: of enough chunks into an empty corpus, deferred.
    many = client.create_corpus("many", KEY)
    before = _index_oid(owner, "many")
    many.add([(d["id"], d["text"]) for d in _docs(12)])
    assert _index_oid(owner, "many") not in (None, before)
    # ... and not: fewer chunks, a corpus that has vectors, inside a transaction block.
    few = client.create_corpus("few", KEY)
    before = _index_oid(owner, "few")
    few.add([(d["id"], d["text"]) for d in _docs(11)])
    assert _index_oid(owner, "few") == before
    before = _index_oid(owner, "many")
    many.add([(d["id"], d["text"]) for d in _docs(12, "e")])
    assert _index_oid(owner, "many") == before
    block = client.create_corpus("block", KEY)
    before = _index_oid(owner, "block")
    with client._conn.transaction():
        block.add([(d["id"], d["text"]) for d in _docs(12)])
    assert _index_oid(owner, "block") == before
    # The deferred build stores what inserting does.
    assert [r for r in _rows(owner, "many")["chunks"] if r[0].startswith("d")] == \
        _rows(owner, "block")["chunks"]


def test_an_index_dropped_by_hand_is_built_by_end_bulk_load(
        client: Client, owner: psycopg.Connection[Any], app: psycopg.Connection[Any]) -> None:
    """No load recorded it (indexes_to_build): status still lists it and advises
    end_bulk_load, which builds it (builders take turns on the row it records first)."""
    client.create_corpus("byhand", KEY).add([("a", "one document")])
    name = owner.execute("SELECT pyembed._index_name(corpus_id, model_key) FROM pyembed.corpora "
                         "WHERE name = 'byhand'").fetchone()[0]  # type: ignore[index]
    owner.execute(f'DROP INDEX pyembed."{name}"')
    assert _unindexed(app) == [("byhand", KEY, False)]
    assert app.execute("SELECT pyembed.end_bulk_load('byhand')").fetchone() == (name,)
    assert _unindexed(app) == []
    assert owner.execute("SELECT count(*) FROM pyembed.indexes_to_build").fetchone() == (0,)


def test_a_load_whose_index_was_built_meanwhile_lets_go_of_its_lock(
        client: Client, db: Database, owner: psycopg.Connection[Any]) -> None:
    """The owner's reindex during a load builds the index and a write forgets the corpus; the
    loader's row stays for its end, which lets go of its lock (a connection kept for many loads
    would hold one more lock for each)."""
    client.create_corpus("rebuilt", KEY)
    with psycopg.connect(db.app_dsn, autocommit=True) as loader:
        assert loader.execute("SELECT pyembed.begin_bulk_load('rebuilt')").fetchone() == (True,)
        rebuild_index(owner, "rebuilt")
        client.corpus("rebuilt").add([("w", "a write once the index is back")])
        loader.execute("SELECT pyembed.end_bulk_load('rebuilt')")
        assert loader.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                              "AND pid = pg_backend_pid()").fetchone() == (0,)
    assert owner.execute("SELECT count(*) FROM pyembed.bulk_loaders").fetchone() == (0,)
