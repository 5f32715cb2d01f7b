"""What one worker for every tenant costs (a script, not a test): the operator's worker (a login
in pyembed_operator) lists the queues by tenant before each batch (pyembed.queue_by_tenant, one
loop over the tenants inside the database) and acts for the batch's tenant in each transaction
(one set_config more per transaction). Printed, with the load average:

- queue_by_tenant's time per call at each number of tenants (every tenant with queued jobs);
- a claim (expire_jobs + claim_jobs, rolled back) as the operator acting for a tenant, against
  the same claim by the tenant's own login (no setting);
- a drain of the same jobs (the fake model: the database's share) by the operator's worker over
  TENANTS tenants, against the tenants' own workers one after the other.

    .venv/bin/python tests/benchmarks/bench_tenant_queues.py --tenants 1,10,50 --jobs 20
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pyembed import tenants
from pyembed.worker import Worker
from tests.benchmarks.common import load_average, local_database

KEY = "fake/fake-hash@1:384"


def median_ms(fn: Any, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def setup(owner: psycopg.Connection[Any], app_dsn: str, n: int, jobs: int) -> tuple[str, list[str]]:
    """`n` tenants, each with one member login and a corpus of `jobs` queued documents; and an
    operator login. Their DSNs."""
    # The operator login first: each corpus's partition then grants it INSERT as it is made
    # (pyembed._partition_writers grants operators' logins by name; a later one needs an install).
    op = f"op_{uuid.uuid4().hex[:6]}"
    owner.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw' IN ROLE pyembed_app, "
                          "pyembed_worker, pyembed_operator").format(sql.Identifier(op)))
    members = []
    for i in range(n):
        name, role = f"t{i}", f"m{i}_{uuid.uuid4().hex[:6]}"
        tenants.create_tenant(owner, name)
        tenants.add_member(owner, name, role, create_login="pw")
        dsn = make_conninfo(app_dsn, user=role, password="pw")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pyembed.create_corpus('docs', %s)", (KEY,))
            with conn.cursor() as cur:
                cur.executemany("SELECT pyembed.add_document('docs', %s, %s)",
                                [(f"d{j}", f"text {j} of tenant {i}") for j in range(jobs)])
        members.append(dsn)
    return make_conninfo(app_dsn, user=op, password="pw"), members


def claim(conn: psycopg.Connection[Any], tenant: str | None) -> None:
    with conn.transaction(force_rollback=True):
        if tenant is not None:
            conn.execute("SELECT set_config('pyembed.act_as_tenant', %s, true)", (tenant,))
        conn.execute("SELECT pyembed.expire_jobs(5)")
        conn.execute("SELECT count(*) FROM pyembed.claim_jobs(5, 64, 30)").fetchone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", default="1,10,50")
    parser.add_argument("--jobs", type=int, default=20, help="queued documents per tenant")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--folder", default=".pyembed-bench")
    args = parser.parse_args()
    for n in [int(x) for x in args.tenants.split(",")]:
        with local_database(args.folder, prefix="tenantq") as target:
            assert target.app_dsn is not None
            with psycopg.connect(target.owner_dsn, autocommit=True) as owner:
                op, members = setup(owner, target.app_dsn, n, args.jobs)
                try:
                    with psycopg.connect(op, autocommit=True) as conn, \
                            psycopg.connect(members[0], autocommit=True) as own:
                        queues = median_ms(lambda: conn.execute(
                            "SELECT count(*) FROM pyembed.queue_by_tenant(5, '{}', 0)"
                        ).fetchone(), args.runs)
                        acting, plain = [], []
                        for _ in range(5):  # in turns
                            acting.append(median_ms(lambda: claim(conn, "t0"), args.runs // 5))
                            plain.append(median_ms(lambda: claim(own, None), args.runs // 5))
                    print(f"{n} tenants ({args.jobs} jobs each), {load_average()}: "
                          f"queue_by_tenant {queues:.2f} ms; claim acting for a tenant "
                          f"{statistics.median(acting):.2f} ms, by its own login "
                          f"{statistics.median(plain):.2f} ms", flush=True)
                    started = time.perf_counter()
                    with Worker(members[0], batch_size=64, recall_every=0) as w:
                        w.run(drain=True, drain_wait=0)
                    for dsn in members[1:]:
                        with Worker(dsn, batch_size=64, recall_every=0) as w:
                            w.run(drain=True, drain_wait=0)
                    own_s = time.perf_counter() - started
                    owner.execute("UPDATE pyembed.chunks SET content = content || ' again'")
                    started = time.perf_counter()
                    with Worker(op, batch_size=64, recall_every=0) as w:
                        stats = w.run(drain=True, drain_wait=0)
                    op_s = time.perf_counter() - started
                    print(f"  drain of {n * args.jobs} jobs: the operator's one worker {op_s:.2f} s "
                          f"({stats.embedded} embedded, {stats.batches} batches), the tenants' "
                          f"own workers in turn {own_s:.2f} s; {load_average()}", flush=True)
                finally:
                    owner.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE datname = current_database() AND pid <> pg_backend_pid()")
                    for dsn in [op, *members]:  # (roles are the cluster's)
                        role = sql.Identifier(str(psycopg.conninfo.conninfo_to_dict(dsn)["user"]))
                        owner.execute(sql.SQL("DROP OWNED BY {}").format(role))
                        owner.execute(sql.SQL("DROP ROLE {}").format(role))


if __name__ == "__main__":
    main()
