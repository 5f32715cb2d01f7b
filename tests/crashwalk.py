"""The crash walk: every long-running writer stopped at a chosen point in three ways (its
process SIGKILLed, its server backends terminated, the server restarted with an immediate
stop), then the whole database checked (no half-written document, the keyword index in step
with the chunks, no lease held past its end, no invalid index, no claim held by a process gone)
and the same command run again: it finishes the job, redoes nothing stored and says what it
resumed. tests/test_crash_walk_{kill,terminate,restart}.py run it, one way to stop each.

The point is chosen deterministically: the Nth provider call of the writer's process waits
(HOOKED, the fake provider patched as in test_worker_leases), or its Nth call of a function, or
its write waits for a table the test holds locked (or, for an index built or dropped
CONCURRENTLY, for a snapshot the test holds open). The server restart is of this worker's own
test cluster: its other tests run one after the other, and each makes its connections anew.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from pyembed.localdb import LocalCluster
from tests.conftest import REPO, Database
from tests.test_keyword_writes import index_problems

FAKE = "fake/fake-hash@1:384"
TARGET = "fake/fake-hash@2:384"
LEASE = 2.0

HOOKED = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from pyembed.providers.fake import FakeProvider

    here, at = Path(os.environ["CRASH_DIR"]), int(os.environ.get("CRASH_AT") or 0)
    real, calls = FakeProvider.embed_batch, [0]

    def embed_batch(self, texts, input_type):
        calls[0] += 1
        with (here / os.environ["CRASH_LOG"]).open("a") as f:
            f.write("".join(t.replace("\\n", " ") + "\\n" for t in texts))
        if calls[0] == at:
            (here / "paused").write_text(str(os.getpid()))
            deadline = time.monotonic() + 120
            while not (here / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return real(self, texts, input_type)

    FakeProvider.embed_batch = embed_batch

    def pause_before(where, nth):
        import importlib, threading
        module, name = where.rsplit(".", 1)
        owner = importlib.import_module(module)
        real, entered, lock = getattr(owner, name), [0], threading.Lock()

        def paused(*args, **kwargs):
            with lock:
                entered[0] += 1
                pause = entered[0] >= nth
            if pause:
                (here / "paused").write_text(str(os.getpid()))
                deadline = time.monotonic() + 120
                while not (here / "go").exists() and time.monotonic() < deadline:
                    time.sleep(0.02)
            return real(*args, **kwargs)

        setattr(owner, name, paused)

    if os.environ.get("CRASH_ENTER"):
        where, _, nth = os.environ["CRASH_ENTER"].partition("#")
        pause_before(where, int(nth or 1))
    if sys.argv[1] == "cli":
        from pyembed.cli import main
        main(sys.argv[2:])
    else:
        exec(sys.argv[2])
""")

KILLS = ("sigkill", "terminate", "restart")


@dataclass
class Writer:
    """One long-running writer: how its data is made, how it is run (`pyembed` arguments, or
    Python code with DSN and OWNER_DSN set), where it is stopped (("call", n): its nth provider
    call; ("enter", "module.function#n"): its nth call of that function and every later one;
    ("lock", table): its write of `table`; ("open", ""): a transaction the test keeps open,
    which CREATE INDEX CONCURRENTLY waits for) and what the finished job looks like."""

    name: str
    setup: Callable[[psycopg.Connection[Any], psycopg.Connection[Any], Path], object]
    run: list[str] | str
    pause: tuple[str, str | int]
    done: Callable[[psycopg.Connection[Any]], None]
    resumed: str = ""
    """What the rerun's output says (a regular expression searched in stdout + stderr)."""
    stopped: str = ""
    """What the stopped run's one error line says besides (a regular expression)."""
    owner: bool = False
    env: dict[str, str] = field(default_factory=dict)


# -- setups ------------------------------------------------------------------------------------
def _texts(n: int, topic: str = "doc") -> list[str]:
    return [f"{topic} {i} speaks of river {i % 5} and stone {i * 7 % 11}" for i in range(n)]


def _corpus(app: psycopg.Connection[Any], name: str = "c") -> None:
    app.execute("SELECT pyembed.create_corpus(%s, %s, chunk_tokens => 1000, chunk_overlap => 0)",
                (name, FAKE))


def _jsonl(tmp: Path, n: int) -> Path:
    path = tmp / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n"
                            for i, t in enumerate(_texts(n))))
    return path


def _queued(app: psycopg.Connection[Any], n: int) -> None:
    _corpus(app)
    with app.cursor() as cur:
        cur.executemany("SELECT pyembed.add_document('c', %s, %s)",
                        [(f"d{i}", t) for i, t in enumerate(_texts(n))])


def _embedded(app: psycopg.Connection[Any], n: int) -> None:
    _queued(app, n)
    _drain(app)


def _drain(conn: psycopg.Connection[Any]) -> None:
    from pyembed.worker import Worker

    worker = Worker(conn.info.dsn + f" password={conn.info.password}", batch_size=64)
    try:
        worker.run(drain=True, drain_wait=0)
    finally:
        worker.close()


# -- what a finished job looks like -------------------------------------------------------------
def _scalar(conn: psycopg.Connection[Any], query: str, params: Any = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def _all_embedded(n: int, key: str = FAKE) -> Callable[[psycopg.Connection[Any]], None]:
    def check(owner: psycopg.Connection[Any]) -> None:
        assert _scalar(owner, "SELECT count(*) FROM pyembed.documents") == n
        assert _scalar(owner, "SELECT count(*) FROM pyembed.chunks") == n
        assert _scalar(owner, "SELECT count(*) FROM pyembed.vectors WHERE model_key = %s",
                       (key,)) == n
        assert _scalar(owner, "SELECT count(*) FROM pyembed.queue") == 0
    return check


def _backfilled(n: int) -> Callable[[psycopg.Connection[Any]], None]:
    def check(owner: psycopg.Connection[Any]) -> None:
        _all_embedded(n, TARGET)(owner)
        assert _scalar(owner, "SELECT state FROM pyembed.migrations") == "backfilled"
    return check


INGEST_STOPPED = r"ingest stopped with \d+ documents? kept .*running it again resumes"
BACKFILL_STOPPED = r"backfill stopped with \d+ of 12 chunks backfilled .*running it again resumes"
RECALL_STOPPED = r"recall stopped with no measurement recorded .*running it again measures again"
CLEANUP_STOPPED = (r"cleanup stopped with the retired keys' vectors deleted \(\d+ rows\) and 0 "
                   r"of their 1 indexes dropped; running it again resumes")

LOAD_VECTORS = (
    "from pyembed.bulk_load import load_vectors\n"
    "from pyembed.providers.fake import fake_vectors\n"
    "from pyembed.text import sha256\n"
    "import psycopg\n"
    "with psycopg.connect(os.environ['DSN']) as conn:\n"
    "    rows = conn.execute('SELECT chunk_id, content FROM pyembed.chunks '\n"
    "                        'ORDER BY chunk_id').fetchall()\n"
    "print(load_vectors('c', [r[0] for r in rows], KEY,\n"
    "                   fake_vectors([r[1] for r in rows], space='fake-hash@1',\n"
    "                                dimensions=384),\n"
    "                   [sha256(r[1]) for r in rows], dsn=os.environ['DSN'],\n"
    "                   batch_rows=3, connections=2))\n")
"""bulk_load.load_vectors of the corpus's 12 chunks, 3 rows a batch over 2 connections."""

RERANK = ("import pyembed\n"
          "client = pyembed.connect(os.environ['DSN'])\n"
          "hits = client.corpus('c').search('river 3 stone 5', k=5, rerank='fake',\n"
          "                                 rerank_candidates=12)\n"
          "print('reranked', len(hits))\n")
"""A search of the corpus's 12 chunks reranked by the offline reranker, its scores cached."""

WRITERS = [
    Writer("ingest", lambda app, owner, tmp: (_corpus(app), _jsonl(tmp, 12)),
           ["ingest", "c", "{tmp}/docs.jsonl", "--batch-size", "2", "-q"], ("call", 3),
           _all_embedded(12), r"unchanged [1-9]", INGEST_STOPPED),
    Writer("ingest-write", lambda app, owner, tmp: (_corpus(app), _jsonl(tmp, 12)),
           ["ingest", "c", "{tmp}/docs.jsonl", "--batch-size", "2", "-q"], ("lock", "chunks"),
           _all_embedded(12), r"added \d+", INGEST_STOPPED),
    Writer("ingest-end", lambda app, owner, tmp: (_corpus(app), _jsonl(tmp, 12)),
           ["ingest", "c", "{tmp}/docs.jsonl", "--batch-size", "2", "-q"],
           ("enter", "pyembed.index.end_bulk_load"), _all_embedded(12), r"unchanged 12",
           INGEST_STOPPED),
    Writer("corpus-add", lambda app, owner, tmp: _corpus(app),
           "import pyembed\n"
           "c = pyembed.connect(os.environ['DSN']).corpus('c')\n"
           "for i in range(0, 12, 4):\n"
           "    print(c.add([(f'd{j}', t) for j, t in enumerate(TEXTS) if i <= j < i + 4]))\n",
           ("call", 2), _all_embedded(12), r"unchanged=[1-9]|skipped=[1-9]"),
    Writer("worker", lambda app, owner, tmp: _queued(app, 12),
           ["worker", "--batch-size", "2", "--lease", str(LEASE), "--recall-every", "0"],
           ("call", 3), _all_embedded(12), r"embedded \d+"),
    Writer("worker-write", lambda app, owner, tmp: _queued(app, 12),
           ["worker", "--batch-size", "2", "--lease", str(LEASE), "--recall-every", "0"],
           ("lock", "vectors"), _all_embedded(12), r"embedded \d+"),
    Writer("backfill", lambda app, owner, tmp: (_embedded(app, 12), _start_migration(owner)),
           ["migrate", "backfill", "c", "--batch-size", "2"], ("call", 3), _backfilled(12),
           r"backfilled 8 chunks in .*; resumed: 4 chunks had their vector already",
           BACKFILL_STOPPED, owner=True),
    Writer("backfill-write", lambda app, owner, tmp: (_embedded(app, 12), _start_migration(owner)),
           ["migrate", "backfill", "c", "--batch-size", "2"], ("lock", "vectors"),
           _backfilled(12), r"backfilled \d+ chunks", BACKFILL_STOPPED, owner=True),
    Writer("backfill-index", lambda app, owner, tmp: (_embedded(app, 12), _start_migration(owner)),
           ["migrate", "backfill", "c", "--batch-size", "2"], ("open", ""), _backfilled(12),
           r"backfilled 0 chunks in .*; resumed: 12 chunks", BACKFILL_STOPPED, owner=True),
    Writer("backfill-end", lambda app, owner, tmp: (_embedded(app, 12), _start_migration(owner)),
           ["migrate", "backfill", "c", "--batch-size", "2"], ("enter", "pyembed.migration._call"),
           _backfilled(12), r"backfilled 0 chunks in .*; resumed: 12 chunks", BACKFILL_STOPPED,
           owner=True),
    Writer("load-vectors", lambda app, owner, tmp: _queued(app, 12),
           LOAD_VECTORS,
           ("lock", "vectors"), _all_embedded(12), r"LoadReport\(rows=12"),
    Writer("load-vectors-batch", lambda app, owner, tmp: _queued(app, 12),
           LOAD_VECTORS,
           ("enter", "pyembed.bulk_load.copy_vectors#3"), _all_embedded(12), r"LoadReport\(rows=12"),
    Writer("cache-store", lambda app, owner, tmp: _corpus(app),
           "import pyembed\n"
           "client = pyembed.connect(os.environ['DSN'])\n"
           "e = client.embedder(KEY)\n"
           "print('embedded', len(e.embed(TEXTS)))\n",
           ("lock", "embedding_cache"), lambda owner: _cached(owner, 12), r"embedded 12"),
    Writer("rerank-cache-store", lambda app, owner, tmp: _embedded(app, 12), RERANK,
           ("lock", "rerank_cache"), lambda owner: _rerank_cached(owner, 12), r"reranked 5"),
    Writer("rerank-cache-stored", lambda app, owner, tmp: _embedded(app, 12),
           RERANK, ("enter", "pyembed.rerank.flush_counts"),
           lambda owner: _rerank_cached(owner, 12), r"reranked 5"),
    Writer("recall", lambda app, owner, tmp: _embedded(app, 12),
           ["recall", "c"], ("lock", "recall_measurements"), lambda owner: _measured(owner),
           r"recall", RECALL_STOPPED),
    Writer("cleanup", lambda app, owner, tmp: _completed(app, owner),
           ["migrate", "cleanup", "c"], ("open", ""), lambda owner: _cleaned(owner), r"",
           CLEANUP_STOPPED,
           owner=True),
    Writer("recall-sampled", lambda app, owner, tmp: _sampled(app, owner),
           ["worker", "--recall-every", "60"], ("lock", "recall_measurements"),
           lambda owner: _measured(owner, samples_left=0), r"embedded 0"),
    Writer("reindex", lambda app, owner, tmp: _embedded(app, 12),
           ["corpus", "reindex", "c"], ("open", ""), lambda owner: _indexed(owner),
           r"", owner=True),
]


def _start_migration(owner: psycopg.Connection[Any]) -> None:
    owner.execute("SELECT pyembed.register_model('fake', 'fake-hash', '2', 384)")
    owner.execute("SELECT pyembed.migration_start('c', %s)", (TARGET,))


def _completed(app: psycopg.Connection[Any], owner: psycopg.Connection[Any]) -> None:
    import pyembed
    from pyembed import migration

    _embedded(app, 12)
    _start_migration(owner)
    with pyembed.connect(owner.info.dsn + f" password={owner.info.password}") as client:
        migration.backfill(client, "c")
        owner.execute("UPDATE pyembed.migrations SET state = 'validated'")  # (no eval queries)
        migration.shift(client, "c", 100)
        migration.complete(client, "c")


def _cleaned(owner: psycopg.Connection[Any]) -> None:
    assert _scalar(owner, "SELECT state FROM pyembed.migrations") == "cleaned"
    assert _scalar(owner, "SELECT count(DISTINCT model_key) FROM pyembed.vectors") == 1
    assert _scalar(owner, "SELECT count(*) FROM pg_catalog.pg_class WHERE relname LIKE "
                          "'vectors_hnsw%%' AND relkind = 'i'") == 1


def _cached(owner: psycopg.Connection[Any], n: int) -> None:
    assert _scalar(owner, "SELECT count(*) FROM pyembed.embedding_cache") == n


def _rerank_cached(owner: psycopg.Connection[Any], n: int) -> None:
    """The rerank's `n` candidates' scores cached, each once (the table has no unique key: a
    store the stopped run half made and the rerun's would both show)."""
    assert _scalar(owner, "SELECT count(*) FROM pyembed.rerank_cache") == n
    assert _scalar(owner, "SELECT count(DISTINCT cache_key) FROM pyembed.rerank_cache") == n


def _sampled(app: psycopg.Connection[Any], owner: psycopg.Connection[Any]) -> None:
    """Five searches sampled for the worker's recall measurement (as a search samples them)."""
    _embedded(app, 12)
    owner.execute("INSERT INTO pyembed.recall_samples (corpus_id, model_key, embedding) "
                  "SELECT corpus_id, model_key, embedding FROM pyembed.vectors LIMIT 5")


def _measured(owner: psycopg.Connection[Any], samples_left: int | None = None) -> None:
    assert _scalar(owner, "SELECT count(*) FROM pyembed.recall_measurements") >= 1
    if samples_left is not None:
        assert _scalar(owner, "SELECT count(*) FROM pyembed.recall_samples") == samples_left


def _indexed(owner: psycopg.Connection[Any]) -> None:
    assert _scalar(owner, "SELECT count(*) FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c "
                          "ON c.oid = i.indexrelid WHERE c.relnamespace = 'pyembed'::regnamespace "
                          "AND c.relname LIKE '%%hnsw%%'") >= 1


# -- the walk ------------------------------------------------------------------------------------
def _others(conn: psycopg.Connection[Any]) -> list[tuple[int, str | None, str | None]]:
    """(pid, wait_event_type, query) of the database's other client sessions."""
    return conn.execute("SELECT pid, wait_event_type, query FROM pg_catalog.pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                        "AND backend_type = 'client backend'").fetchall()


def _wait(what: str, condition: Callable[[], bool], proc: subprocess.Popen[str] | None = None,
          seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the writer ended before {what}: {proc.returncode}\n{out}\n{err}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.03)


def _stop_immediately(cluster: LocalCluster) -> None:
    st = cluster.state()
    out = cluster._as_server_user([f"{st.bindir}/pg_ctl", "stop", "-w", "-m", "immediate",
                                   "-D", str(cluster.data)], st)
    assert out.returncode == 0, out.stderr


@contextmanager
def _paused(writer: Writer, db: Database, tmp: Path) -> Iterator[psycopg.Connection[Any] | None]:
    """The test's side of the writer's stopping point: a table locked, or a transaction open,
    held (yielded, on its own connection) while the writer runs into it."""
    kind, what = writer.pause
    if kind in ("call", "enter"):
        yield None
        return
    holder = psycopg.connect(db.owner_dsn)
    try:
        if kind == "lock":
            holder.execute(f"LOCK TABLE pyembed.{what} IN EXCLUSIVE MODE")  # fixed names
        else:  # a snapshot kept: a CONCURRENTLY build's last phase waits for it to end
            holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            holder.execute("SELECT count(*) FROM pyembed.vectors")  # (DROP ... CONCURRENTLY's)
        yield holder
    finally:
        try:
            holder.close()
        except psycopg.Error:
            pass


def _problems(owner: psycopg.Connection[Any], lease: float) -> list[str]:
    """What a crash must never leave behind, as readable lines."""
    problems = list(index_problems(owner))
    checks = {
        "chunks with no vector of the pinned key and not queued for it": """
            SELECT count(*) FROM pyembed.chunks ch JOIN pyembed.corpora co USING (corpus_id)
             WHERE NOT EXISTS (SELECT FROM pyembed.vectors v WHERE v.corpus_id = ch.corpus_id
                                AND v.chunk_id = ch.chunk_id AND v.model_key = co.model_key)
               AND NOT EXISTS (SELECT FROM pyembed.queue q WHERE q.corpus_id = ch.corpus_id
                                AND q.chunk_id = ch.chunk_id AND q.model_key = co.model_key)""",
        "documents without chunks": """
            SELECT count(*) FROM pyembed.documents d WHERE NOT EXISTS (SELECT FROM
              pyembed.chunks ch WHERE ch.corpus_id = d.corpus_id
              AND ch.document_id = d.document_id)""",
        "vectors of a text their chunk no longer has": """
            SELECT count(*) FROM pyembed.vectors v JOIN pyembed.chunks ch USING (corpus_id, chunk_id)
             WHERE v.content_hash IS DISTINCT FROM ch.content_hash""",
        "jobs leased past their lease": f"""
            SELECT count(*) FROM pyembed.queue
             WHERE not_before > now() + interval '{lease + 5} seconds'""",
    }
    for what, query in checks.items():
        n = _scalar(owner, query)
        if n:
            problems.append(f"{n} {what}")
    return problems


def _invalid_indexes(owner: psycopg.Connection[Any]) -> list[str]:
    return [r[0] for r in owner.execute(
        "SELECT c.relname FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c "
        "ON c.oid = i.indexrelid WHERE c.relnamespace = 'pyembed'::regnamespace "
        "AND NOT i.indisvalid")]


def _start(writer: Writer, db: Database, tmp: Path, log: str, at: int = 0, enter: str = ""
           ) -> subprocess.Popen[str]:
    script = tmp / "hooked.py"
    script.write_text(HOOKED)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYEMBED_") and not k.endswith("_API_KEY")}
    env |= {"PYTHONPATH": str(REPO), "CRASH_DIR": str(tmp), "CRASH_LOG": log,
            "CRASH_AT": str(at), "CRASH_ENTER": enter,
            "PYEMBED_DSN": db.owner_dsn if writer.owner else db.app_dsn,
            "DSN": db.app_dsn, "OWNER_DSN": db.owner_dsn, **writer.env}
    if isinstance(writer.run, str):
        code = f"import os\nKEY = {FAKE!r}\nTEXTS = {_texts(12)!r}\n" + writer.run
        args = ["py", code]
    else:
        args = ["cli", *(a.replace("{tmp}", str(tmp)) for a in writer.run)]
    return subprocess.Popen([sys.executable, str(script), *args], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def walk(writer: Writer, kill: str, db: Database, cluster: LocalCluster, tmp_path: Path) -> None:
    """`writer` stopped at its point by `kill` (one of KILLS), then the database checked and the
    same command run again (the tests of test_crash_walk_*.py, one module per way to stop, so
    that the suite's workers share them)."""
    with psycopg.connect(db.app_dsn, autocommit=True) as app, \
            psycopg.connect(db.owner_dsn, autocommit=True) as owner:
        writer.setup(app, owner, tmp_path)
    kind, what = writer.pause
    with _paused(writer, db, tmp_path) as holder, \
            psycopg.connect(db.owner_dsn, autocommit=True) as watcher:
        proc = _start(writer, db, tmp_path, "first.log", int(what) if kind == "call" else 0,
                      str(what) if kind == "enter" else "")
        try:
            if kind in ("call", "enter"):
                _wait("its provider call", (tmp_path / "paused").exists, proc)
            else:
                _wait("its wait", lambda: any(
                    w == "Lock" for pid, w, _q in _others(watcher)
                    if holder is None or pid != holder.info.backend_pid), proc)
            if kill == "sigkill":
                proc.kill()
            elif kill == "terminate":
                watcher.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                                "AND pid <> %s", (holder.info.backend_pid if holder else 0,))
            else:
                _stop_immediately(cluster)
                cluster.start()
            (tmp_path / "go").touch()
            if holder is not None and kill != "restart":
                holder.close()
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    first = (proc.returncode, out, err)
    if kill != "sigkill" and proc.returncode != 0:  # what it says, as its user reads it
        lines = err.strip().splitlines()
        if isinstance(writer.run, list):
            assert len(lines) == 1 and lines[0].startswith("error: "), first
            assert re.search(writer.stopped, lines[0]), first
            assert "client.conn" not in lines[0], first  # (the CLI's own connection)
        else:
            assert lines and lines[-1].startswith("pyembed.errors."), first
    with psycopg.connect(db.owner_dsn, autocommit=True) as owner:
        _wait("the writer's sessions to end", lambda: not _others(owner), seconds=30)
        assert _problems(owner, LEASE) == [], first
        stored = {r[0] for r in owner.execute(
            "SELECT ch.content FROM pyembed.chunks ch JOIN pyembed.vectors v "
            "USING (corpus_id, chunk_id) WHERE v.model_key = %s",
            (TARGET if writer.name.startswith("backfill") else FAKE,))}
    (tmp_path / "paused").unlink(missing_ok=True)
    again = _start(writer, db, tmp_path, "again.log")
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, (first, again.returncode, out, err)
    assert re.search(writer.resumed, out + err), (out, err)
    with psycopg.connect(db.owner_dsn, autocommit=True) as owner:
        writer.done(owner)
        assert _problems(owner, LEASE) == []
        assert _invalid_indexes(owner) == []
        assert owner.execute("SELECT * FROM pyembed.unindexed_corpora()").fetchall() == []
    redone = stored & set((tmp_path / "again.log").read_text().splitlines()
                          if (tmp_path / "again.log").exists() else [])
    assert not redone, f"the rerun embedded again what was stored: {sorted(redone)}"

