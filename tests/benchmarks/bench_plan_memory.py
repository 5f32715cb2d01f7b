"""A backend's memory after it searched many corpora: each corpus's own vector leg keeps its plans
for the session (pyembed._nearest_c<id>_<md5 of key>, sql/025-nearest.sql), one per way of
reading it ran, which the dynamic statement before it did not.

Makes --corpora corpora of --rows 384-d vectors each (fake model key) in a fresh database of the
local cluster under .pyembed-bench-suite; then one session (the owner's, which may read its own
memory contexts) searches each corpus in the three ways a search reads by the index (by chunk,
by document, filtered), --rounds times, and prints the backend's memory: the total of its memory
contexts (pg_backend_memory_contexts; CacheMemoryContext and its children, which hold kept
plans, apart) and its RSS and private memory (/proc/<pid>/status and smaps_rollup: run as root
or as the cluster's OS user), after the first corpus and after all of them.
    .venv/bin/python tests/benchmarks/bench_plan_memory.py --corpora 50
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from common import connect, local_database
from pgvector import Vector

from pyembed.corpora import ChunkRow, create_corpus, write_chunks

KEY = "fake/fake-hash@1:384"


def memory(conn: psycopg.Connection[Any]) -> str:
    """The backend's memory: its contexts' total, CacheMemoryContext's subtree, RSS, private."""
    row = conn.execute(
        "SELECT pg_backend_pid(), sum(total_bytes), "
        "sum(total_bytes) FILTER (WHERE name = 'CacheMemoryContext' OR parent = "
        "'CacheMemoryContext') FROM pg_backend_memory_contexts").fetchone()
    assert row is not None
    pid, total, cache = row
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmRSS:"))
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    private = sum(int(ln.split()[1]) for ln in rollup if ln.startswith("Private_"))
    return (f"contexts {total / 1024:8.0f} kB (cache and plans {cache / 1024:7.0f} kB), "
            f"RSS {rss:7d} kB, private {private:7d} kB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpora", type=int, default=50)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(7)
    with local_database(".pyembed-bench-suite", prefix="planmem") as target:
        owner = connect(target.owner_dsn)
        for i in range(args.corpora):
            info = create_corpus(owner, f"c{i}", KEY)
            vectors = rng.standard_normal((args.rows, 384)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            write_chunks(owner, info, [ChunkRow(f"d{n}", 0, f"text {n}", vectors[n],
                                                {"parity": n % 2}) for n in range(args.rows)],
                         KEY)
        owner.execute("ANALYZE pyembed.vectors")
        app = connect(target.owner_dsn)  # the owner may read its memory contexts
        print(f"{args.corpora} corpora of {args.rows} chunks; {args.rounds} rounds of 3 searches "
              "each (by chunk, by document, filtered), one session of the owner")
        for i in range(args.corpora):
            for _ in range(args.rounds):
                q = Vector(rng.standard_normal(384).astype(np.float32))
                for extra in (", group_by => 'chunk'", "", ", filter => '{\"parity\": 1}'"):
                    app.execute(f"SELECT * FROM pyembed.search(%s, %s, %s, 10{extra})",
                                (f"c{i}", q, KEY)).fetchall()
            if i == 0:
                print(f"after 1 corpus:   {memory(app)}")
        print(f"after {args.corpora} corpora: {memory(app)}")
        app.close()
        owner.close()


if __name__ == "__main__":
    main()
