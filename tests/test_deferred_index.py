"""A first bulk load into an empty corpus builds its HNSW graph once, after the load
(pyembed.begin_bulk_load / end_bulk_load, around `ingest`): not on a corpus that has vectors,
with the same rows as a load that inserts, and a load that never ends (killed) leaves a state
that heals at the corpus's next write or the owner's reindex."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg

import pyembed
from pyembed import doctor, health
from pyembed.client import Client
from pyembed.index import rebuild_index
from pyembed.ingest import _deferred_index, ingest
from tests.conftest import REPO, Database

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
        with _deferred_index(corpus) as deferred:
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
from pyembed.ingest import _deferred_index
with pyembed.connect(sys.argv[1]) as client:
    corpus = client.corpus("killed")
    with _deferred_index(corpus) as deferred:
        assert deferred
        corpus.add([("a", "written before the crash"), ("b", "another one")])
        os.kill(os.getpid(), 9)
"""


def _killed_load(db: Database, owner: psycopg.Connection[Any], client: Client) -> None:
    client.create_corpus("killed", KEY)
    proc = subprocess.run([sys.executable, "-c", KILLED, db.app_dsn], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
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


def test_a_killed_load_heals_at_the_owners_reindex(
        client: Client, db: Database, owner: psycopg.Connection[Any]) -> None:
    _killed_load(db, owner, client)
    rebuild_index(owner, "killed")
    assert _index_oid(owner, "killed") is not None
    assert _unindexed(owner) == []
