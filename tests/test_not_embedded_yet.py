"""A vector or hybrid search that finds fewer hits than asked for while chunks of its corpus wait
in the queue says so: a NOTICE from SQL (SQLSTATE 01PE1, its fix in HINT), the warning
pyembed.NotEmbeddedYet in Python, a `warning:` line from the command line, writing nothing (the
read path stays read-only: test_read_paths). Before, a corpus whose documents were added with
pyembed.add_document and no worker ever ran returned nothing, silently."""

from __future__ import annotations

import warnings
from typing import Any

import psycopg
import pytest

import pyembed
from pyembed.worker import Worker
from tests.conftest import Database
from tests.helpers import run_cli
from tests.test_quiet_sql import notices

KEY = "fake/fake-hash@1:384"
SAID = (f"01PE1 corpus docs has 2 chunks queued for embedding with {KEY}, which vector search "
        "finds only once they are embedded")


def test_a_search_short_of_k_names_the_queued_chunks_until_the_worker_runs(
        db: Database, app: psycopg.Connection[Any]) -> None:
    app.execute("SELECT pyembed.create_corpus('docs', %s)", (KEY,))
    app.execute("SELECT pyembed.add_document('docs', 'a', 'a late refund')")
    app.execute("SELECT pyembed.add_document('docs', 'b', 'an early refund')")
    heard = notices(app)
    hints: list[str | None] = []
    app.add_notice_handler(lambda d: hints.append(d.message_hint))
    for mode in ("vector", "hybrid", "keyword"):
        app.execute("SELECT * FROM pyembed.search_text('docs', 'refund', 5, NULL, %s)", (mode,))
    vector = app.execute("SELECT pyembed.embed('refund', %s, 'query')", (KEY,)).fetchone()
    assert vector is not None
    app.execute("SELECT * FROM pyembed.search('docs', %s, %s, 5, group_by => 'chunk')",
                (vector[0], KEY))
    # vector, hybrid (its vector leg) and pyembed.search; keyword search finds queued chunks
    assert heard == [SAID] * 3
    assert hints[0] == ("run `pyembed worker` (it embeds queued chunks; `pyembed status` shows "
                        "the queue)")
    with pyembed.connect(db.app_dsn) as client:
        docs = client.corpus("docs")
        with pytest.warns(pyembed.NotEmbeddedYet, match=r"^corpus docs has 2 chunks queued .* "
                          r"\(hint: run `pyembed worker`") as heard_here:
            assert docs.search("refund", k=5, mode="vector") == []
    # the warning names the line that searched, not psycopg's notice callback
    assert heard_here[0].filename == __file__
    out = run_cli("search", "docs", "refund", "--mode", "vector", env={"PYEMBED_DSN": db.app_dsn})
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines()[0] == "warning: " + SAID[6:] + (
        " (hint: run `pyembed worker` (it embeds queued chunks; `pyembed status` shows the "
        "queue))")
    assert "Traceback" not in out.stderr

    with Worker(db.app_dsn) as worker:
        worker.run_once()
    heard.clear()
    app.execute("SELECT * FROM pyembed.search_text('docs', 'refund', 5, NULL, 'vector')")
    assert heard == []  # short of k, but nothing waits
    with pyembed.connect(db.app_dsn) as client, warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(client.corpus("docs").search("refund", k=5, mode="vector")) == 2
