"""Shared helpers for the benchmark scripts (not tests): a fresh database in a local benchmark
cluster, connections that plan every statement afresh, percentiles and spreads, clustered test
vectors with exact neighbours, and a printout of the environment.

    from tests.benchmarks.common import connect, local_database, print_environment

    with local_database(".pyembed-bench-mine") as target:   # a folder of its own per benchmark
        owner = connect(target.owner_dsn)
        app = connect(target.app_dsn, as_app_role=False)
        print_environment(owner)
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
from psycopg import sql

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: `tests.benchmarks...` and `pyembed` importable
    sys.path.insert(0, str(REPO))

FAKE_KEY = "fake/fake-hash@1:384"
DIMS = 384

F32 = npt.NDArray[np.float32]

# Packages whose versions the environment printout names (when installed).
PACKAGES = ("pyembed", "psycopg", "psycopg-binary", "pgvector", "numpy", "sqlalchemy")


# -- databases ---------------------------------------------------------------------------------

@dataclass
class Target:
    """Where a benchmark runs: owner and application DSNs of one database."""

    owner_dsn: str
    app_dsn: str | None  # None: the owner connection switches to the pyembed_app role
    description: str
    fresh: bool  # a throwaway database: no need to clean up inside it
    name: str = ""  # the database name (fresh databases)
    cluster_home: Path | None = None
    started_cluster: bool = False  # this run started the cluster (and will stop it)


def in_database(dsn: str, name: str) -> str:
    """The same URL-style DSN pointing at another database."""
    return dsn.rsplit("/", 1)[0] + "/" + name


@contextmanager
def local_database(folder: str | Path, *, prefix: str = "bench", keep: bool = False,
                   install: bool = True, name: str | None = None) -> Iterator[Target]:
    """A fresh database, installed to head, in the local cluster under `folder` (relative to
    the repository unless absolute; created on first use). The database is dropped afterwards
    and the cluster stopped if this call started it and no other client is connected (neither
    with `keep`). With `name`: that database, created if missing, brought to head and kept
    (`fresh` says whether it was created now)."""
    from pyembed.localdb import OWNER, LocalCluster
    from pyembed.schema import install as install_schema

    home = Path(folder)
    cluster = LocalCluster(home if home.is_absolute() else REPO / home)
    was_running = cluster.running()
    cluster.init()  # (a first init also starts the server)
    cluster.start()
    admin_dsn = cluster.dsn(owner=True)
    created = True
    if name is None:
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    else:
        keep = True
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            created = not scalar(admin, "SELECT EXISTS (SELECT FROM pg_database "
                                        "WHERE datname = %s)", (name,))
    if created:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name),
                                                                       sql.Identifier(OWNER)))
    try:
        if install:
            install_schema(in_database(admin_dsn, name))
        yield Target(in_database(admin_dsn, name), in_database(cluster.dsn(owner=False), name),
                     f"{'fresh' if created else 'kept'} database {name} in {cluster.home}",
                     fresh=created, name=name,
                     cluster_home=cluster.home, started_cluster=not was_running)
    finally:
        if not keep:
            drop_database(admin_dsn, name)
            if not was_running and not others_connected(admin_dsn):
                cluster.stop()


def drop_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(in_database(admin_dsn, "postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                      .format(sql.Identifier(name)))


def others_connected(admin_dsn: str) -> bool:
    """Whether another client is connected to the cluster: a run started after this one's
    start, whose work stopping the cluster would kill."""
    with psycopg.connect(in_database(admin_dsn, "postgres"), autocommit=True) as admin:
        row = admin.execute("SELECT EXISTS (SELECT FROM pg_stat_activity WHERE backend_type = "
                            "'client backend' AND pid <> pg_backend_pid())").fetchone()
    return bool(row and row[0])


@contextmanager
def given_database(owner_dsn: str, app_dsn: str | None) -> Iterator[Target]:
    """A database named by the user (--dsn), brought to head; the caller cleans up in it."""
    from pyembed.schema import install as install_schema

    install_schema(owner_dsn)
    yield Target(owner_dsn, app_dsn, "the database given by --dsn", fresh=False)


# -- connections -------------------------------------------------------------------------------

def connect(dsn: str, *, as_app_role: bool = False, ef_search: int | None = 100,
            autocommit: bool = True) -> psycopg.Connection[Any]:
    """A pgvector-registered connection that plans every statement afresh
    (prepare_threshold=None: a later planner setting always applies). Plain queries get the
    same hnsw.ef_search (100) as pyembed.search sets for itself, so both run at equal recall."""
    from pyembed.db import connect as pyembed_connect

    conn = pyembed_connect(dsn, autocommit=autocommit, prepare_threshold=None)
    if ef_search is not None:
        conn.execute("SELECT '[1]'::vector")  # loads pgvector, which defines hnsw.ef_search
        conn.execute(sql.SQL("SET hnsw.ef_search = {}").format(sql.Literal(ef_search)))
        if not autocommit:
            conn.commit()
    if as_app_role:
        conn.execute("SET ROLE pyembed_app")
        if not autocommit:
            conn.commit()
    return conn


def app_connection(target: Target, **kwargs: Any) -> psycopg.Connection[Any]:
    """The application-role connection of a target (its own login, else SET ROLE)."""
    if target.app_dsn:
        return connect(target.app_dsn, **kwargs)
    return connect(target.owner_dsn, as_app_role=True, **kwargs)


def scalar(conn: psycopg.Connection[Any], query: str | sql.SQL | sql.Composed,
           params: Sequence[Any] | None = None) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def _local_backend(conn: psycopg.Connection[Any]) -> int | None:
    """The pid of the connection's server process when it runs on this machine, else None."""
    host = conn.info.host
    if not (host.startswith("/") or host in ("localhost", "127.0.0.1", "::1")):
        return None
    pid = int(scalar(conn, "SELECT pg_backend_pid()"))
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return pid if b"postgres" in f.read() else None
    except OSError:
        return None


def backend_cpu_seconds(conn: psycopg.Connection[Any]) -> float | None:
    """The CPU time the connection's server process has run so far (/proc/PID/schedstat), or
    None when that process is not on this machine. The server's work alone: other processes on
    a shared machine lengthen wall times much more than they change it."""
    pid = _local_backend(conn)
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9 if pid else None
    except (OSError, ValueError, IndexError):
        return None


def backend_minor_faults(conn: psycopg.Connection[Any]) -> int | None:
    """The minor page faults the connection's server process has taken so far (/proc/PID/stat),
    or None when that process is not on this machine. A backend whose freed heap glibc's malloc
    gives back at each transaction's end faults it in again in the next: CPU time that neither
    its code nor its instruction count explains, and which backend it is depends on its heap."""
    pid = _local_backend(conn)
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7]) if pid else None
    except (OSError, ValueError, IndexError):
        return None


def checkpoint(owner: psycopg.Connection[Any]) -> None:
    """Start a timed load from a clean checkpoint when the role may ask for one."""
    try:
        owner.execute("CHECKPOINT")
    except psycopg.errors.InsufficientPrivilege:
        pass


def index_line(plan: Iterable[str]) -> str:
    """The index scan line of an EXPLAIN, or a loud note that there is none."""
    lines = list(plan)
    for line in lines:
        if "Index Scan" in line:
            return line.strip().lstrip("-> ").strip()
    return "NO INDEX SCAN: " + " / ".join(line.strip() for line in lines)


# -- statistics --------------------------------------------------------------------------------

def percentiles_ms(samples: Sequence[float], qs: Sequence[float] = (50, 95, 99)
                   ) -> tuple[float, ...]:
    """Percentiles of durations given in seconds, in milliseconds."""
    return tuple(float(v) for v in np.percentile(np.asarray(samples) * 1000.0, list(qs)))


def percentiles(samples: Sequence[float]) -> tuple[float, float, float]:
    """(p50, p95, p99) in ms of durations in seconds (bench_guarded_search's signature)."""
    p50, p95, p99 = percentiles_ms(samples)
    return p50, p95, p99


@dataclass(frozen=True)
class Spread:
    """The median of repeated measurements and their range."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no measurements")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def format(self, fmt: str = ",.0f") -> str:
        if self.n == 1:
            return f"{self.median:{fmt}} (1 run)"
        return (f"{self.median:{fmt}} (min {self.low:{fmt}}, max {self.high:{fmt}}, "
                f"{self.n} runs)")


# -- vectors -----------------------------------------------------------------------------------

def unit_centres(rng: np.random.Generator, count: int, dims: int = DIMS) -> F32:
    centres = rng.standard_normal((count, dims), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return centres


def clustered_unit_vectors(rng: np.random.Generator, centres: F32, n: int, noise: float) -> F32:
    """n unit vectors, each a random centre plus isotropic noise of norm about `noise` (so that
    neighbours are meaningful and HNSW recall is not trivially 1)."""
    dims = centres.shape[1]
    picks = rng.integers(0, len(centres), size=n)
    out = np.empty((n, dims), dtype=np.float32)
    for start in range(0, n, 20_000):  # bounded memory for large n
        stop = min(start + 20_000, n)
        block = centres[picks[start:stop]] + rng.standard_normal(
            (stop - start, dims), dtype=np.float32) * np.float32(noise / np.sqrt(dims))
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def exact_top_k(vectors: F32, queries: F32, k: int, block: int = 100_000) -> list[set[int]]:
    """Row numbers of each query's k nearest vectors by cosine (unit vectors: dot product),
    computed in blocks so that a million rows fit in memory."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.empty((len(queries), 0), dtype=np.int64)
    for start in range(0, len(vectors), block):
        scores = queries @ vectors[start:start + block].T
        ids = np.broadcast_to(np.arange(start, start + scores.shape[1]), scores.shape)
        all_scores = np.concatenate([best_scores, scores], axis=1)
        all_ids = np.concatenate([best_ids, ids], axis=1)
        top = np.argpartition(-all_scores, min(k, all_scores.shape[1] - 1), axis=1)[:, :k]
        best_scores = np.take_along_axis(all_scores, top, axis=1)
        best_ids = np.take_along_axis(all_ids, top, axis=1)
    return [set(map(int, row)) for row in best_ids]


def recall_at_k(truth: set[int], found: Iterable[int], k: int) -> float:
    return len(truth & set(found)) / k


# -- environment -------------------------------------------------------------------------------

def package_versions(names: Iterable[str] = PACKAGES) -> str:
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def load_average() -> str:
    """The machine's load now (other work on a shared machine skews every figure)."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average unknown"
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} (1, 5, 15 min)"


def cpu_times() -> list[int] | None:
    """The machine's CPU time counters from /proc/stat (user, nice, system, idle, iowait, irq,
    softirq, steal), or None where there is none."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None


def cpu_stolen(since: list[int] | None) -> str:
    """The share of CPU time the hypervisor gave to other machines since `since` (cpu_times):
    on a shared host it slows every path, and unevenly."""
    now = cpu_times()
    if since is None or now is None or len(now) < 8:
        return "CPU time stolen by the host unknown"
    spent = [b - a for a, b in zip(since, now, strict=True)]
    return (f"CPU time stolen by the host {100 * spent[7] / sum(spent):.0f}%"
            if sum(spent) else "CPU time stolen by the host unknown")


def code_version() -> str:
    """The repository's commit, and the files changed since (a run measures the working tree)."""
    import subprocess

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return out.stdout.rstrip() if out.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "(not a git checkout)"
    changed = [line[3:] for line in git("status", "--porcelain").splitlines() if line]
    if not changed:
        return f"git {commit}, clean"
    return f"git {commit} + {len(changed)} changed files ({', '.join(changed)})"


def environment_lines(owner: psycopg.Connection[Any],
                      packages: Iterable[str] = PACKAGES) -> list[str]:
    """PostgreSQL and pgvector versions, server settings, CPUs, memory, Python, packages."""
    owner.execute("SELECT '[1]'::vector")  # loads pgvector, which defines hnsw.ef_search
    settings = ", ".join(
        f"{name}={scalar(owner, 'SELECT current_setting(%s)', (name,))}"
        for name in ("shared_buffers", "maintenance_work_mem", "max_parallel_maintenance_workers",
                     "work_mem", "hnsw.ef_search", "synchronous_commit", "fsync"))
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    server = scalar(owner, "SHOW server_version")
    pgvector = scalar(owner, "SELECT extversion FROM pg_extension WHERE extname = 'vector'")
    plpython = scalar(owner, "SELECT extversion FROM pg_extension WHERE extname = 'plpython3u'")
    memory = ""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        memory = f"; RAM {pages * size / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return [
        f"code: {code_version()}",
        f"PostgreSQL {server}; pgvector {pgvector}; plpython3u {plpython}",
        f"server settings: {settings}",
        f"CPUs {os.cpu_count()} (usable {affinity}), {cpu}{memory}; "
        f"{platform.system()} {platform.release()}; {load_average()}",
        f"Python {platform.python_version()} ({sys.executable})",
        f"packages: {package_versions(packages)}",
    ]


def print_environment(owner: psycopg.Connection[Any],
                      packages: Iterable[str] = PACKAGES) -> None:
    for line in environment_lines(owner, packages):
        print(line)
