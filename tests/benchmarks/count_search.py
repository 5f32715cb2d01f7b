"""Instructions per search, counted by callgrind: the guard's cost without the machine's noise.

Run (as root, with valgrind installed), on the database bench_suite.py --search-only keeps:
    .venv/bin/python tests/benchmarks/count_search.py                  # pyembed.search, unguarded
    .venv/bin/python tests/benchmarks/count_search.py --annotate 40    # and where they go

The kept cluster (--home, default .pyembed-bench-suite) is started as usual and brought to this
checkout's head (so that its functions are the ones counted), stopped, then started again under
`valgrind --tool=callgrind` (a backend is a fork of the postmaster, so callgrind follows it with
one output file per process), with autovacuum off. Each path runs in two fresh backends of its
own, in turn: one runs `--warm` searches, the other the same `--warm` and then `--searches` more;
the difference of the two processes' totals over `--searches` is the instructions of one warm
search (connection set-up, warm-up and exit cancel out). The queries are the first stored
vectors of the corpus's partition, the same every run; the paths are bench_suite.py section 2's:
  pyembed     pyembed.search(corpus, q, key, 10, group_by => 'chunk') as the application role;
  unguarded   the same search as one plain statement on the partition, as the owner;
  unguarded:prepared   the same statement prepared (psycopg's prepare_threshold 0: the server
              keeps its plan, generic once it is no dearer than a custom one), what a kept plan
              of the vector leg is measured against;
  hybrid      (--hybrid) pyembed.search_hybrid of a fixed keyword query with a keyword ranking
              handed in (the new query's second call), as the application role;
  first       a new hybrid query's first round trip as pyembed/query.py sends it (a client
              without a cache): search_query (route, reservation) and keyword_ranking (with the
              passages of its best 10 documents), pipelined;
  second      its second call: search_embedded with the keyword ranking handed back as text,
              which searches and records the query-log line;
  first:route, first:keywords, second:unlogged   the parts: search_query alone, keyword_ranking
              alone, the second call without its query-log line.
With --corpus NAME (e.g. --home .pyembed-bench-scifact --database scifact --corpus scifact_cli
--hybrid-query "..."), that corpus and its model key instead of bench_suite's fake-model one.
With --embed-query the first and second paths search with the hybrid query's own embedding (the
corpus's model, made here), as a real new query does: the stored chunk vectors, unrelated to the
query's words, make nearly every fused hit a keyword-only one that needs its passage looked up.
The difference pyembed - unguarded is what the guard costs a search. The cluster is left stopped.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from pgvector import Vector
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, connect, in_database

KEY = "fake/fake-hash@1:384"


def totals(path: Path) -> int:
    """The Ir total of one callgrind output file."""
    for line in path.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(dsn: str, server: subprocess.Popen[bytes], own_socket: Path,
               seconds: float = 300) -> None:
    """Wait for the server this script started: its socket in its own directory, not the port
    alone (another worktree's server under callgrind on the same port answered in its place)."""
    deadline = time.monotonic() + seconds
    while True:
        if server.poll() is not None:
            said = (own_socket.parent / "postgres.log").read_text(errors="replace").strip()
            raise RuntimeError(f"the server under callgrind exited ({server.returncode}) before it "
                               f"was ready; it said: {said[-600:]}")
        if own_socket.exists():
            try:
                with psycopg.connect(dsn, connect_timeout=5):
                    return
            except psycopg.OperationalError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server under callgrind was not ready in {seconds:.0f} s")
        time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=".pyembed-bench-suite")
    parser.add_argument("--database", default="guard")
    parser.add_argument("--searches", type=int, default=200)
    parser.add_argument("--warm", type=int, default=20)
    parser.add_argument("--port", type=int, default=0,
                        help="the TCP port of the server under callgrind (default: a free one)")
    parser.add_argument("--paths", default="pyembed,unguarded",
                        help="pyembed, unguarded, hybrid, or fn:SCHEMA.NAME (a variant of "
                             "pyembed.search with its arguments, made in the database by hand)")
    parser.add_argument("--setup", default=None,
                        help="an SQL file run as the owner before counting (variants to count)")
    parser.add_argument("--hybrid-query", default="invoice latency")  # bench_suite's words
    parser.add_argument("--embed-query", action="store_true",
                        help="the first and second paths search with the hybrid query's own "
                             "embedding (its corpus's model, in this process), as a real new "
                             "query does, instead of stored chunk vectors unrelated to its words")
    parser.add_argument("--corpus", default=None,
                        help="the corpus to search (default: bench_suite's first search-* one)")
    parser.add_argument("--no-install", action="store_true",
                        help="count the functions the database has (no upgrade first)")
    parser.add_argument("--annotate", type=int, default=0,
                        help="print callgrind_annotate's N top inclusive functions of each path")
    parser.add_argument("--keep-files", default=None, help="copy the callgrind files here")
    args = parser.parse_args()

    from pyembed.localdb import LocalCluster
    from pyembed.schema import install as install_schema

    home = Path(args.home)
    cluster = LocalCluster(home if home.is_absolute() else REPO / home)
    st = cluster.state()
    cluster.start()
    owner_dsn = in_database(cluster.dsn(owner=True), args.database)
    app_dsn = in_database(cluster.dsn(owner=False), args.database)
    if not args.no_install:
        install_schema(owner_dsn)
    cluster.stop()

    port = args.port or free_port()
    out = Path(tempfile.mkdtemp(prefix="count-search-"))
    os.chmod(out, 0o777)
    os_user = st.os_user
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/callgrind.%p",
           "--log-file=" + str(out / "valgrind.%p.log"),
           f"{st.bindir}/postgres", "-D", str(cluster.data), "-p", str(port),
           "-c", "autovacuum=off", "-c", f"unix_socket_directories={out}",
           "-c", "listen_addresses=127.0.0.1", "-c", "jit=off"]
    if os_user:
        cmd = ["runuser", "-u", os_user, "--", "env", "LANG=C.UTF-8",
               f"PYTHONPATH={cluster.pylib}", *cmd]
    log = (out / "postgres.log").open("wb")
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, cwd="/")

    def moved(dsn: str) -> str:
        return re.sub(r":\d+/", f":{port}/", dsn, count=1)

    owner_dsn, app_dsn = moved(owner_dsn), moved(app_dsn)
    results: dict[str, float] = {}
    try:
        wait_ready(owner_dsn, server, out / f".s.PGSQL.{port}")
        if args.setup:
            with psycopg.connect(owner_dsn, autocommit=True) as owner:
                owner.execute(Path(args.setup).read_text().encode())
        with psycopg.connect(owner_dsn) as owner:
            corpus_id, name, key = owner.execute(
                "SELECT corpus_id, name, model_key FROM pyembed.corpora WHERE "
                "name = %s OR (%s::text IS NULL AND model_key = %s AND name LIKE 'search-%%') "
                "ORDER BY corpus_id LIMIT 1", (args.corpus, args.corpus, KEY)).fetchone() or (
                    None, None, None)
            assert corpus_id is not None, "no such corpus (bench_suite's) in this database"
            part = sql.Identifier("pyembed", f"vectors_c{corpus_id}")
            from pgvector.psycopg import register_vector
            register_vector(owner)
            queries = [r[0] if isinstance(r[0], Vector) else Vector(r[0]) for r in owner.execute(
                sql.SQL("SELECT embedding FROM {} ORDER BY chunk_id LIMIT %s").format(part),
                (args.warm + args.searches,))]
            own: Vector | None = None
            if args.embed_query:
                from pyembed.corpora import model_spec
                from pyembed.embedder import Embedder
                own = Vector(Embedder(model_spec(owner, key)).embed_query(args.hybrid_query))
        unguarded_sql = sql.SQL(
            "SELECT hit.chunk_id, ch.content, 1 - hit.distance FROM (SELECT v.chunk_id, "
            "(v.embedding::vector(384)) <=> %(q)s::vector(384) AS distance FROM {} v "
            "WHERE v.model_key = {} ORDER BY 2 LIMIT 10) hit JOIN pyembed.chunks ch "
            "ON ch.corpus_id = {} AND ch.chunk_id = hit.chunk_id ORDER BY hit.distance"
        ).format(part, sql.Literal(key), sql.Literal(corpus_id))
        guarded_sql = ("SELECT chunk_id, content, score FROM pyembed.search(%(c)s, %(q)s, "
                       "%(k)s, 10, group_by => 'chunk')")
        hybrid_sql = ("SELECT chunk_id, content, score FROM pyembed.search_hybrid(%(c)s, %(t)s, "
                      "%(q)s, %(k)s, 10, keyword_ids => %(ki)s, keyword_scores => %(ks)s, "
                      "keyword_keys => %(kk)s)")

        from pyembed import query as new_query
        from pyembed.search import bucket
        options = '{"group_by": "document", "fusion": null, "alpha": null, "quick_commit": true}'
        text = args.hybrid_query
        first_calls = [
            (new_query.SEARCH_QUERY, [name, text, bucket(text), [key], [None], 10, None,
                                      "hybrid", options, 20, True, None, None, None]),
            (new_query.KEYWORD_RANKING, [name, text, None, "document", 10])]

        def run(path: str, n: int) -> int:
            """A fresh backend running n searches of the path; returns its pid."""
            conn = connect(owner_dsn if path.startswith("unguarded") else app_dsn)
            if path == "unguarded:prepared":
                conn.prepare_threshold = 0
            if path.startswith(("first", "second")):
                conn.prepare_threshold = 5  # as the client's connection: prepared statements
            try:
                pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
                ranking: Any = None
                if path.startswith("second"):
                    ranking = new_query._pipelined(conn, first_calls)[1][0]
                if path == "hybrid":
                    ranking = conn.execute(
                        "SELECT ids, scores, keys FROM pyembed.keyword_ranking(%s, %s, 100)",
                        (name, args.hybrid_query)).fetchone()
                    assert ranking is not None and ranking[0], "the keyword ranking found nothing"
                    if n > args.warm:
                        print(f"hybrid: a keyword ranking of {len(ranking[0])} hits handed in")
                step: Callable[[Vector], object]
                if path.startswith("unguarded"):
                    def step(q: Vector) -> object:
                        return conn.execute(unguarded_sql, {"q": q}).fetchall()
                elif path == "pyembed":
                    def step(q: Vector) -> object:
                        return conn.execute(guarded_sql, {"c": name, "q": q, "k": key}).fetchall()
                elif path.startswith("fn:"):  # a variant of pyembed.search made by hand
                    variant = sql.SQL("SELECT chunk_id, content, score FROM {}(%(c)s, %(q)s, "
                                      "%(k)s, 10, group_by => 'chunk')").format(
                                          sql.Identifier(*path[3:].split(".")))

                    def step(q: Vector) -> object:
                        return conn.execute(variant, {"c": name, "q": q, "k": key}).fetchall()
                elif path in ("first", "first:route", "first:keywords"):
                    calls = {"first": first_calls, "first:route": first_calls[:1],
                             "first:keywords": first_calls[1:]}[path]

                    def step(q: Vector) -> object:
                        return new_query._pipelined(conn, calls)
                elif path in ("second", "second:unlogged"):
                    log = path == "second"

                    def step(q: Vector) -> object:
                        return new_query._rows(conn, new_query.SEARCH_EMBEDDED, [
                            name, text, q, key, None, "query", None, 10, None, "hybrid",
                            options, 5.0, log, None, None, None, *ranking])
                else:
                    def step(q: Vector) -> object:
                        return conn.execute(hybrid_sql, {
                            "c": name, "q": q, "k": key, "t": args.hybrid_query,
                            "ki": ranking[0], "ks": ranking[1], "kk": ranking[2]}).fetchall()
                for q in queries[:n]:
                    step(own if own is not None and path.startswith(("first", "second")) else q)
                return int(pid)
            finally:
                conn.close()

        for path in args.paths.split(","):
            base = run(path, args.warm)
            full = run(path, args.warm + args.searches)
            time.sleep(1)
            files = {p: out / f"callgrind.{p}" for p in (base, full)}
            for _ in range(60):
                if all(f.exists() and f.stat().st_size for f in files.values()):
                    break
                time.sleep(1)
            per = (totals(files[full]) - totals(files[base])) / args.searches
            results[path] = per
            print(f"{path:<10} {per / 1000:9.1f}k instructions a search "
                  f"({args.searches} searches after {args.warm}; files {files[full].name} "
                  f"- {files[base].name})", flush=True)
            if args.annotate:
                ann = subprocess.run(["callgrind_annotate", "--inclusive=yes",
                                      "--threshold=100", str(files[full])],
                                     capture_output=True, text=True).stdout
                lines = [ln for ln in ann.splitlines() if re.match(r"\s*[\d,]+ \(", ln)]
                print("\n".join(lines[:args.annotate]))
            if args.keep_files:
                Path(args.keep_files).mkdir(parents=True, exist_ok=True)
                for tag, f in (("base", files[base]), ("full", files[full])):
                    shutil.copy(f, Path(args.keep_files) / f"{path}.{tag}.callgrind")
        if "pyembed" in results and "unguarded" in results:
            print(f"guard: {(results['pyembed'] - results['unguarded']) / 1000:.1f}k "
                  "instructions a search over the unguarded statement")
    finally:
        subprocess.run(["runuser", "-u", os_user, "--", f"{st.bindir}/pg_ctl", "stop", "-w",
                        "-m", "fast", "-D", str(cluster.data)] if os_user else
                       [f"{st.bindir}/pg_ctl", "stop", "-w", "-m", "fast", "-D",
                        str(cluster.data)], capture_output=True, cwd="/")
        server.wait(timeout=120)
        log.close()
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
