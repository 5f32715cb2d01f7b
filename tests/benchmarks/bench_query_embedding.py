"""The local model's query embedding in a loop of embeddings alone, after an idle pause and
between searches (a script, not a test): why a new query's embedding runs slower than the loop
of bench_scifact.py says.

    .venv/bin/python tests/benchmarks/bench_query_embedding.py --variants base,one-thread

Each variant runs in a process of its own (mallopt and onnxruntime's sessions are per process),
the variants taking turns, `--runs` times each. In each process, over the SciFact test queries
(the benchmark database of bench_scifact.py, its CLI-default corpus): the query embedding timed
in a loop of embeddings alone, after 50 ms asleep (nothing else of this process running), and
between searches as a user calls them (hybrid and keyword, the embedding from the cache, as
bench_scifact.py's round robin runs them), then a new hybrid and a new vector query (a client
without a cache), and a new hybrid query made the other way round ("one call": the embedding
alone first, then the reservation, both legs, the fusion and the record in one round trip, as
pyembed/query.py's statements run them). Printed per variant: medians over the runs of each
p50, of the CPU time of the process per call, and the means of its minor page faults and
context switches per call (getrusage). Variants (what a process changes before the model
loads): base (the code as it is), one-thread (PYEMBED_LOCAL_THREADS=1: a query on one thread),
spinning (the query session's threads spin between operations), spin-stop (they spin during a
run and stop when it returns: session.force_spinning_stop), dynamic-block (an operator's work
cut in shrinking blocks that either thread takes: session.dynamic_block_base 4), no-mmap (no
mallopt: glibc's own mmap threshold).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VARIANTS = ("base", "one-thread", "spinning", "spin-stop", "dynamic-block", "no-mmap")


def apply_variant(variant: str) -> None:
    """Change this process before the model loads."""
    from pyembed.providers import local

    if variant == "one-thread":
        os.environ["PYEMBED_LOCAL_THREADS"] = "1"
    elif variant in ("spinning", "spin-stop"):
        plain = local.session_options

        def spinning(threads: int = 1) -> Any:
            options = plain(threads)
            if threads > 1:
                options.add_session_config_entry("session.intra_op.allow_spinning", "1")
                if variant == "spin-stop":
                    options.add_session_config_entry("session.force_spinning_stop", "1")
            return options

        local.session_options = spinning  # type: ignore[assignment]
    elif variant == "dynamic-block":
        plain_options = local.session_options

        def dynamic(threads: int = 1) -> Any:
            options = plain_options(threads)
            if threads > 1:
                options.add_session_config_entry("session.dynamic_block_base", "4")
            return options

        local.session_options = dynamic  # type: ignore[assignment]
    elif variant == "no-mmap":
        local.map_large_allocations = lambda: None  # type: ignore[assignment]
    elif variant != "base":
        raise SystemExit(f"unknown variant {variant!r}")


class Meter:
    """Wall time, CPU time, minor faults and context switches of a block, appended to lists."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.minflt: list[int] = []
        self.switches: list[int] = []

    def __enter__(self) -> Meter:
        self._r = resource.getrusage(resource.RUSAGE_SELF)
        self._c = time.process_time()
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        t = time.perf_counter()
        c = time.process_time()
        r = resource.getrusage(resource.RUSAGE_SELF)
        self.wall.append((t - self._t) * 1000)
        self.cpu.append((c - self._c) * 1000)
        self.minflt.append(r.ru_minflt - self._r.ru_minflt)
        self.switches.append(r.ru_nvcsw - self._r.ru_nvcsw + r.ru_nivcsw - self._r.ru_nivcsw)

    def summary(self) -> dict[str, float]:
        return {"p50": statistics.median(self.wall), "cpu": statistics.median(self.cpu),
                "minflt": statistics.mean(self.minflt), "switches": statistics.mean(self.switches)}


def one_process(variant: str, queries: int) -> dict[str, dict[str, float]]:
    apply_variant(variant)
    from pgvector import Vector

    import pyembed
    from pyembed.embedder import Embedder
    from pyembed.query import SEARCH_EMBEDDED, _pipelined
    from pyembed.text import estimate_tokens
    from tests.benchmarks.bench_local_model import load_queries
    from tests.benchmarks.scifact_data import CORPORA, DATA, persistent_database

    _, app_dsn = persistent_database()
    texts = load_queries(DATA / "queries.jsonl")
    ids = sorted({line.split("\t")[0] for line in
                  (DATA / "qrels" / "test.tsv").read_text().splitlines()[1:]}, key=int)
    ordered = [texts[i] for i in ids][:queries]
    embedder = Embedder(pyembed.LOCAL_DEFAULT)
    meters = {name: Meter() for name in ("loop", "idle 50 ms", "between", "new hybrid",
                                          "new vector", "one call")}
    with pyembed.connect(app_dsn) as user, pyembed.connect(app_dsn, use_cache=False) as new:
        user.log_queries = False
        corpus, new_corpus = user.corpus(CORPORA["cli"]), new.corpus(CORPORA["cli"])
        info = new_corpus.info
        opts = json.dumps({"group_by": "document", "fusion": None, "alpha": None,
                           "quick_commit": True})

        def one_call(text: str) -> None:
            """A new hybrid query the other way round: the embedding alone first, then the
            reservation, both legs, the fusion and the record in one round trip."""
            vector = embedder.embed_query(text)
            _pipelined(new._conn, [
                ("SELECT pyembed.reserve_usage($1::text, $2::integer, 1, $3::integer)",
                 [info.model_key, info.corpus_id, estimate_tokens(text)]),
                (SEARCH_EMBEDDED, [info.name, text, Vector(vector), info.model_key, None, "query",
                                   None, 10, None, "hybrid", opts, 1.0, True, None, None, None,
                                   None, None, None])])
        for text in ordered[:20]:  # warm: the model, the cache's entries, the backends
            embedder.embed_query(text)
            corpus.search(text, 10, mode="hybrid")
            new_corpus.search(text, 10, mode="hybrid")
            one_call(text)
        for text in ordered:
            with meters["loop"]:
                embedder.embed_query(text)
        for text in ordered:
            time.sleep(0.05)
            with meters["idle 50 ms"]:
                embedder.embed_query(text)
        for text in ordered:
            corpus.search(text, 10, mode="hybrid")
            corpus.search(text, 10, mode="keyword")
            with meters["between"]:
                embedder.embed_query(text)
            with meters["new hybrid"]:
                new_corpus.search(text, 10, mode="hybrid")
            with meters["new vector"]:
                new_corpus.search(text, 10, mode="vector")
            with meters["one call"]:
                one_call(text)
    return {name: m.summary() for name, m in meters.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="base,one-thread")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--queries", type=int, default=150)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_process(args.child, args.queries)))
        return
    variants = args.variants.split(",")
    results: dict[str, list[dict[str, dict[str, float]]]] = {v: [] for v in variants}
    for run in range(args.runs):
        for v in variants:
            out = subprocess.run([sys.executable, __file__, "--child", v, "--queries",
                                  str(args.queries)], check=True, capture_output=True,
                                 text=True).stdout
            results[v].append(json.loads(out.strip().splitlines()[-1]))
            load = os.getloadavg()[0]
            cells = "  ".join(f"{k} {m['p50']:.2f}" for k, m in results[v][-1].items())
            print(f"run {run + 1} {v:<11} load {load:.2f}: {cells} (p50 ms)", flush=True)
    print("\nmedians over the runs (p50 ms; cpu ms, minor faults, context switches per call)")
    for v in variants:
        for phase in results[v][0]:
            vals = {k: statistics.median(r[phase][k] for r in results[v])
                    for k in ("p50", "cpu", "minflt", "switches")}
            print(f"{v:<11} {phase:<12} p50 {vals['p50']:6.2f}  cpu {vals['cpu']:6.2f}  "
                  f"minflt {vals['minflt']:7.1f}  switches {vals['switches']:6.1f}")


if __name__ == "__main__":
    main()
