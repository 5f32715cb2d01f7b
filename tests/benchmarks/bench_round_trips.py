"""Round trips and latency of a text search from Python, cache hit and cache miss, for pyembed
at an earlier commit and now (a script, not a test): each side runs in its own process with
its own pyembed (the earlier one exported by `git archive`) against a fresh database of one
local cluster, installed by that pyembed; the sides alternate for `--rounds` rounds.

A miss searches a text not seen before (the fake model embeds it: no network), a hit repeats
one already cached; the client is warmed first (its model spec read once). Round trips are
counted from libpq's trace (tests/roundtrips.py) over every search of a run.

    .venv/bin/python tests/benchmarks/bench_round_trips.py [--before 975b361] [--searches 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
KEY = "fake/fake-hash@1:384"


def measure(owner_dsn: str, app_dsn: str, searches: int, docs: int, mode: str) -> dict[str, Any]:
    """In the child: install this process's pyembed, load `docs` documents, and time
    `searches` misses and hits."""
    sys.path.append(str(REPO))  # tests.roundtrips; pyembed comes first from PYTHONPATH
    import pyembed
    from pyembed.schema import install
    from tests.roundtrips import counted

    install(owner_dsn)
    out: dict[str, Any] = {"pyembed": str(Path(pyembed.__file__).parent.parent)}
    with pyembed.connect(app_dsn) as client:
        corpus = client.create_corpus("bench", KEY)
        corpus.add([(f"d{i}", f"document {i} about topic {i % 97} and error E{i:05d}")
                    for i in range(docs)])
        corpus.search("warm up the client", mode=mode)
        for kind, texts in (("miss", [f"question {i} about topic {i % 89}"
                                      for i in range(searches)]),
                            ("hit", [f"question {i} about topic {i % 89}"
                                     for i in range(searches)])):
            times = []
            with counted(client.conn) as trips:
                for text in texts:
                    t0 = time.perf_counter()
                    hits = corpus.search(text, k=10, mode=mode)
                    times.append((time.perf_counter() - t0) * 1000)
                    assert hits
            out[kind] = {"round_trips": trips.total / len(texts),
                         "p50_ms": statistics.median(times),
                         "p95_ms": statistics.quantiles(times, n=20)[-1]}
        logged = client.conn.execute(
            "SELECT count(*) FROM pyembed.query_log").fetchone()
        out["query_log_rows"] = logged[0] if logged else 0
    return out


def export(ref: str, into: Path) -> Path:
    """The tree of `ref` in a folder of its own."""
    archive = subprocess.run(["git", "archive", ref], cwd=REPO, check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def run_side(tree: Path, owner_dsn: str, app_dsn: str, args: argparse.Namespace
             ) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", owner_dsn, app_dsn,
         "--searches", str(args.searches), "--docs", str(args.docs), "--mode", args.mode],
        cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"the run with {tree} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="975b361", help="the earlier commit")
    parser.add_argument("--searches", type=int, default=200, help="searches of each kind")
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--mode", default="vector", choices=("vector", "hybrid", "keyword"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("OWNER_DSN", "APP_DSN"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        owner_dsn, app_dsn = args.child
        print(json.dumps(measure(owner_dsn, app_dsn, args.searches, args.docs, args.mode)))
        return

    sys.path.insert(0, str(REPO))
    from tests.benchmarks.common import connect, local_database, print_environment

    results: dict[str, list[dict[str, Any]]] = {"before": [], "now": []}
    with tempfile.TemporaryDirectory(prefix="pyembed-before-") as tmp, \
            local_database(".pyembed-bench-roundtrips", install=False):  # keeps it up
        trees = {"before": export(args.before, Path(tmp)), "now": REPO}
        print(f"{args.mode} search, k=10, {args.docs} documents, fake model "
              f"({KEY}), {args.searches} misses then the same {args.searches} texts again "
              f"(hits), {args.rounds} rounds alternating; before = {args.before}, now = "
              f"the working tree")
        for _ in range(args.rounds):
            for side in ("before", "now"):
                with local_database(".pyembed-bench-roundtrips", install=False,
                                    prefix=f"rt_{side}") as target:
                    assert target.app_dsn is not None
                    results[side].append(run_side(trees[side], target.owner_dsn,
                                                  target.app_dsn, args))
                    if side == "now" and len(results[side]) == 1:
                        with connect(target.owner_dsn) as owner:
                            print_environment(owner)
    print(f"{'':8}{'kind':6}{'round trips':>12}{'p50 ms':>9}{'p95 ms':>9}   (medians of rounds)")
    med: dict[tuple[str, str], dict[str, float]] = {}
    for side in ("before", "now"):
        for kind in ("miss", "hit"):
            runs = [r[kind] for r in results[side]]
            med[side, kind] = {f: statistics.median(r[f] for r in runs)
                               for f in ("round_trips", "p50_ms", "p95_ms")}
            m = med[side, kind]
            print(f"{side:8}{kind:6}{m['round_trips']:>12.2f}{m['p50_ms']:>9.2f}"
                  f"{m['p95_ms']:>9.2f}")
    for kind in ("miss", "hit"):
        ratios = [n[kind]["p50_ms"] / b[kind]["p50_ms"]
                  for b, n in zip(results["before"], results["now"], strict=True)]
        print(f"p50 now / before, {kind}: {statistics.median(ratios):.2f} "
              f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
    print("query log rows written per run: before "
          f"{[r['query_log_rows'] for r in results['before']]}, now "
          f"{[r['query_log_rows'] for r in results['now']]}")


if __name__ == "__main__":
    main()
