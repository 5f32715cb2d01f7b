"""A process forked after connecting (an application server that loads the app, then forks its
workers) never uses its parent's connections: a Client's or a Worker's call in the child opens
connections of its own (or, where the client's connection was handed to your code, is
DatabaseNotReady naming the fork), and nothing the child does, its close included, touches the
parent's session. Before, the child sent its statements on the parent's socket: two processes
searching at once got each other's results or DuplicatePreparedStatement, and the child's
close ended the parent's session."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest

import pyembed
from pyembed.worker import Worker

KEY = "fake/fake-hash@1:384"
DOCS = [("quota", "Error E4012 means the monthly quota is used up."),
        ("bucket", "Error E5003: the bucket is read-only.")]


def in_child(work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """What `work` returns, run in a forked child (its exception's class and words, if any)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child's coverage is not collected)
        os.close(read)
        try:
            out = work()
        except BaseException as exc:  # the parent shows it
            out = {"error": type(exc).__name__, "message": str(exc)}
        with os.fdopen(write, "w") as f:
            json.dump(out, f)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return dict(json.loads(text))


def backend(conn: Any) -> int:
    return int(conn.info.backend_pid)


@pytest.fixture
def client(db: Any) -> Any:
    with pyembed.connect(db.app_dsn) as c:
        c.create_corpus("f", KEY).add(DOCS)
        yield c


def test_a_client_used_after_a_fork_opens_its_own_connection(client: pyembed.Client) -> None:
    docs = client.corpus("f")
    assert [h.document_id for h in docs.search("quota", k=1)] == ["quota"]
    parent = backend(client._conn)

    def work() -> dict[str, Any]:
        hits = [h.document_id for h in docs.search("bucket", k=1)]
        child = backend(client._conn)
        client.close()  # (before, it ended the parent's session)
        return {"hits": hits, "backend": child}

    out = in_child(work)
    assert out.get("hits") == ["bucket"], out
    assert out["backend"] != parent
    assert [h.document_id for h in docs.search("quota", k=1)] == ["quota"]
    assert backend(client._conn) == parent  # the same session: the child's close left it


def test_a_handed_out_connection_is_not_replaced_after_a_fork(client: pyembed.Client) -> None:
    assert client.conn is not None  # your code has it (it may have SET ROLE on it)
    parent = backend(client._conn)

    def work() -> dict[str, Any]:
        try:
            client.corpus("f").search("quota", k=1)
        except pyembed.DatabaseNotReady as exc:
            refused = str(exc)
        else:
            refused = ""
        client.reconnect()
        hits = [h.document_id for h in client.corpus("f").search("quota", k=1)]
        return {"refused": refused, "hits": hits, "backend": backend(client._conn)}

    out = in_child(work)
    assert "forked" in out.get("refused", ""), out
    assert "client.reconnect()" in out["refused"]
    assert out["hits"] == ["quota"] and out["backend"] != parent
    assert [h.document_id for h in client.corpus("f").search("bucket", k=1)] == ["bucket"]
    assert backend(client._conn) == parent


def test_a_worker_used_after_a_fork_opens_its_own_connection(db: Any,
                                                              client: pyembed.Client) -> None:
    with client._conn.cursor() as cur:  # queued for the worker
        cur.execute("SELECT pyembed.add_document('f', 'queued', 'Error E7001: disk full.')")
    with Worker(db.app_dsn) as worker:
        assert worker.pending() == 1
        parent = backend(worker._db())

        def work() -> dict[str, Any]:
            stats = worker.run_once()
            child = backend(worker._db())
            worker.close()
            return {"embedded": stats.embedded, "backend": child}

        out = in_child(work)
        assert out.get("embedded") == 1, out
        assert out["backend"] != parent
        assert worker.pending() == 0
        assert backend(worker._db()) == parent
