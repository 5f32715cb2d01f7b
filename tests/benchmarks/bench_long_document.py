"""A long document's keyword index write (a script, not a test): the seconds one document of
SIZE characters takes to be written as chunks (chunk_tokens 200, overlap 40, as a corpus's
default) and committed, which is when its postings, document postings, counts and posting
blocks are made; and where that time goes, from the server's per-function counters.

    .venv/bin/python tests/benchmarks/bench_long_document.py --sizes 500000,2000000
    .venv/bin/python tests/benchmarks/bench_long_document.py --before-sql /tmp/060-old.sql

The chunks are written as the owner straight into pyembed.documents and pyembed.chunks (no
vectors: the keyword index needs none), in one statement, as a corpus's write does. With
--before-sql FILE (an earlier sql/060-keyword.sql, e.g. `git show REV:sql/060-keyword.sql`), a
second database of the same cluster gets that file's functions over the current install, and
the two are timed in turns, each size `--rounds` times; medians are printed with the load.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import time
from pathlib import Path
from typing import Any

import psycopg

from pyembed.chunking import iter_spans
from tests.benchmarks.common import load_average, local_database

FAKE_KEY = "fake/fake-hash@1:384"


def document(size: int, seed: int = 7) -> str:
    """`size` characters of words drawn from a 20,000-word vocabulary."""
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(20000)}" for _ in range(size // 6 + 1))[:size]


def write(owner: psycopg.Connection[Any], corpus_id: int, name: str, text: str) -> float:
    """Seconds to write `text` as document `name`'s chunks and commit."""
    spans = list(iter_spans(text, 200, 40))
    chunks = [text[a:b] for a, b in spans]
    hashes = [hashlib.sha256(c.encode()).digest() for c in chunks]
    started = time.perf_counter()
    with owner.transaction():
        owner.execute("INSERT INTO pyembed.documents (corpus_id, document_id, content_hash) "
                      "VALUES (%s, %s, %s)",
                      (corpus_id, name, hashlib.sha256(text.encode()).digest()))
        owner.execute("INSERT INTO pyembed.chunks (corpus_id, document_id, chunk_index, "
                      "content, content_hash) SELECT %s, %s, i - 1, t, h FROM "
                      "unnest(%s::text[], %s::bytea[]) WITH ORDINALITY AS u(t, h, i)",
                      (corpus_id, name, chunks, hashes))
    return time.perf_counter() - started


def functions(owner: psycopg.Connection[Any]) -> list[tuple[str, int, float]]:
    return [(n, c, float(t)) for n, c, t in owner.execute(
        "SELECT funcname, calls, self_time FROM pg_stat_user_functions "
        "WHERE schemaname = 'pyembed' ORDER BY self_time DESC LIMIT 6")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="500000,2000000",
                        help="document sizes in characters, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before-sql", type=Path, metavar="FILE")
    parser.add_argument("--cluster", default=".pyembed-bench-long-document",
                        help="the local cluster's folder")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with local_database(args.cluster, prefix="longdoc") as now, \
            local_database(args.cluster, prefix="longdoc_before") as before:
        targets = {"now": now}
        if args.before_sql:
            with psycopg.connect(before.owner_dsn, autocommit=True) as owner:
                owner.execute(args.before_sql.read_text())  # type: ignore[arg-type]
            targets["before"] = before
        conns = {k: psycopg.connect(t.owner_dsn, autocommit=True) for k, t in targets.items()}
        try:
            for conn in conns.values():
                conn.execute("SET track_functions = 'all'")
            times: dict[tuple[str, int], list[float]] = {}
            for round_no in range(args.rounds):
                for size in sizes:
                    text = document(size, seed=round_no)
                    for label, conn in conns.items():
                        corpus_id = conn.execute(
                            "SELECT pyembed.create_corpus(%s, %s)",
                            (f"c{round_no}_{size}", FAKE_KEY)).fetchone()[0]
                        took = write(conn, corpus_id, "long", text)
                        times.setdefault((label, size), []).append(took)
                        print(f"round {round_no + 1} {label:>6} {size:>9,} chars: {took:6.2f} s"
                              f"  ({load_average()})", flush=True)
            print("\nmedians:")
            for size in sizes:
                line = "  ".join(f"{label} {statistics.median(times[label, size]):.2f} s"
                                 for label in conns)
                print(f"  {size:>9,} chars: {line}")
            for label, conn in conns.items():
                time.sleep(0.6)  # (the counters reach the view after the session reports them)
                print(f"\n{label}: most time in (self ms, all rounds): " + ", ".join(
                    f"{n} {t:.0f}" for n, _, t in functions(conn)))
        finally:
            for conn in conns.values():
                conn.close()


if __name__ == "__main__":
    main()
