"""`pyembed doctor`: the things a user gets wrong first, one line per check with the fix.

Each check returns a Check (name, ok/warn/fail, detail, fix). The server check comes first:
when it fails, the others are reported as skipped.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal, TypeVar

import psycopg
import typer

import pyembed

from . import health, schema, tenants
from .config import DSN_ENV, OWNER_DSN_ENV, code_digest
from .db import resolve_dsn
from .loaded import LOCK_CLASS
from .models import API_KEY_ENV
from .secret_input import warn_of_password_in_argv

Status = Literal["ok", "warn", "fail", "skip"]

EXTENSIONS = ("vector", "plpython3u")
WORKER_STALE_MINUTES = 10
"""Queued work older than this, with nothing written in the last 5 minutes: no worker runs."""
GROUP_ROLES = ("pyembed_app", "pyembed_owner", "pyembed_worker", "pyembed_operator")
"""The roles the schema's owners and grants name (sql/001-roles.sql makes them)."""
PROBE_KEY = "fake/fake-hash@1:384"
"""A built-in model that needs no network: embedding with it runs pyembed inside PL/Python."""


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""

    def line(self) -> str:
        label = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}[self.status]
        text = f"{label} {self.name}: {self.detail}"
        if self.fix and self.status != "ok":  # (a skip's: how to run the check)
            text += f" — fix: {self.fix}"
        return text


Conn = psycopg.Connection[Any]


def check_server(dsn: str) -> tuple[Check, Conn | None]:
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return Check("server reachable", "fail", first,
                     "start the server (`pyembed db start` for the local cluster) or check "
                     "--dsn / PYEMBED_DSN"), None
    row = conn.execute("SHOW server_version").fetchone()
    version = str(row[0]).split()[0] if row else "?"
    where = f"{conn.info.host}:{conn.info.port}"
    role = " (a standby: read-only, it serves searches)" if _standby(conn) else ""
    return Check("server reachable", "ok", f"PostgreSQL {version} at {where}{role}"), conn


def _standby(conn: Conn) -> bool:
    """Whether `conn`'s server is a hot standby (in recovery): it writes nothing."""
    row = conn.execute("SELECT pg_catalog.pg_is_in_recovery()").fetchone()
    return bool(row and row[0])


def check_schema(conn: Conn, owner_dsn: str | None = None) -> Check:
    """The application role cannot read pyembed.alembic_version: read it as the owner
    (PYEMBED_OWNER_DSN, or the local cluster's owner) when that DSN is known."""
    name = "schema at head"
    head = schema.head_revision()
    if owner_dsn:
        try:
            with psycopg.connect(owner_dsn, autocommit=True, connect_timeout=5) as owner:
                return check_schema(owner)
        except psycopg.OperationalError:
            pass  # the owner cannot log in from here: try with the command's role
    try:
        if conn.execute("SELECT to_regclass('pyembed.alembic_version')").fetchone() in (None, (None,)):
            return Check(name, "fail", f"no pyembed schema, head is {head}", "pyembed install")
        row = conn.execute("SELECT version_num FROM pyembed.alembic_version").fetchone()
    except psycopg.Error as exc:
        return Check(name, "warn", f"cannot read the schema revision ({_first(exc)})", OWNER_FIX)
    current = row[0] if row else None
    if current != head:
        return Check(name, "fail", f"at {current or 'nothing'}, head is {head}", "pyembed install")
    # The revision does not change with the replaceable objects (functions, grants): their
    # digest tells a database given other sql/ files apart.
    ours = schema.replaceable_digest()
    try:
        with conn.transaction(force_rollback=True):
            got = conn.execute("SELECT pyembed.sql_digest()").fetchone()
    except psycopg.errors.UndefinedFunction:
        got = None
    theirs = str(got[0]) if got else None
    if theirs != ours:
        return Check(name, "fail", f"at {head}, but its functions are not this client's sql/ "
                     f"files (installed {theirs[:12] if theirs else 'before digests'}, "
                     f"here {ours[:12]})", "pyembed install")
    # Roles are the cluster's: a dump restored into another cluster comes without them, and
    # its grants to them are lost with them (the application then reaches nothing).
    missing = [r for (r,) in conn.execute(
        "SELECT r FROM unnest(%s::text[]) r WHERE pg_catalog.to_regrole(r) IS NULL",
        (list(GROUP_ROLES),)).fetchall()]
    if missing or conn.execute("SELECT pg_catalog.has_schema_privilege('pyembed_app', "
                               "'pyembed', 'USAGE')").fetchone() != (True,):
        return Check(name, "fail", f"at {head}, but "
                     + (f"the cluster has no role {', '.join(missing)} (a dump restored into "
                        "another cluster comes without its roles), and " if missing else "")
                     + "the application role pyembed_app may not use the schema",
                     "pyembed install")
    return Check(name, "ok", f"at {head}")


def check_extensions(conn: Conn) -> Check:
    name = "extensions vector and plpython3u"
    rows = dict(conn.execute("SELECT extname, extversion FROM pg_catalog.pg_extension "
                             "WHERE extname = ANY(%s)", (list(EXTENSIONS),)).fetchall())
    missing = [e for e in EXTENSIONS if e not in rows]
    found = ", ".join(f"{e} {rows[e]}" for e in EXTENSIONS if e in rows)
    if not missing:
        return Check(name, "ok", found)
    available = {r[0] for r in conn.execute(
        "SELECT name FROM pg_catalog.pg_available_extensions WHERE name = ANY(%s)",
        (missing,)).fetchall()}
    absent = [e for e in missing if e not in available]
    fix = ("install the server packages (docker/install-host.sh: postgresql-NN-pgvector, "
           "postgresql-plpython3-NN), then pyembed install" if absent else "pyembed install")
    detail = f"missing {', '.join(missing)}" + (f" (have {found})" if found else "")
    if absent:
        detail += f"; not available on the server: {', '.join(absent)}"
    return Check(name, "fail", detail, fix)


def check_plpython(conn: Conn) -> Check:
    """Import pyembed and pyembed.indb in PL/Python (pyembed.version()) and compare the
    server's pyembed version and code (pyembed.code_digest()) with this one's. The probe writes
    nothing: doctor runs on a replica and in a read-only transaction too."""
    name = "PL/Python imports pyembed"
    try:
        with conn.transaction(force_rollback=True):
            row = conn.execute("SELECT pyembed.version(), pyembed.code_digest()").fetchone()
    except (psycopg.errors.UndefinedFunction, psycopg.errors.InvalidSchemaName) as exc:
        return Check(name, "fail", _first(exc), "pyembed install")
    except psycopg.Error as exc:  # the server cannot import pyembed: PE013 with the fix as hint
        return Check(name, "fail", _first(exc), exc.diag.message_hint or "pyembed install")
    server, code = (str(row[0]), str(row[1])) if row else ("?", "?")
    fix = ("install the same pyembed for the server's python3 (docker/install-host.sh; a "
           "local cluster runs the pyembed of the `pyembed db start` that started it), then "
           "restart the server")
    if server != pyembed.__version__:
        return Check(name, "fail", f"the server runs pyembed {server}, this client "
                                   f"{pyembed.__version__}", fix)
    ours = code_digest()
    if code != ours:
        return Check(name, "fail", f"the server runs other pyembed {server} code than this "
                     f"client (code {code[:12]}, here {ours[:12]})", fix)
    return Check(name, "ok", f"yes, pyembed {server} on both sides, the same code")


def check_loaded_code(conn: Conn) -> Check:
    """Backends whose pyembed code, loaded when they first ran a PL/Python function, is not
    what the server has installed now (pyembed.loaded: each one's stamp in pg_locks): this
    session's, which check_plpython's probe has just made import the installed code, is the
    reference. A fresh backend's probe alone does not see them. The key is one any role may
    take: a session holding one of them exclusively (a backend's is always shared) keeps every
    backend that loads that code from showing it, and is named."""
    name = "backends run the installed pyembed"
    held = conn.execute(
        "SELECT l.pid, l.objid, l.pid = pg_backend_pid(), a.usename, a.datname, "
        "a.application_name, a.backend_start, l.mode = 'ShareLock' FROM pg_locks l "
        "LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.classid = %s::oid AND l.objsubid = 2 "
        "AND l.granted ORDER BY a.backend_start, l.pid", (LOCK_CLASS,)).fetchall()
    rows = [r[:7] for r in held if r[7]]
    blocking = [r[:7] for r in held if not r[7]]
    if blocking:
        return Check(name, "fail", f"{len(blocking)} session(s) hold pyembed's code-stamp key "
                     f"exclusively, which no pyembed backend does: backends that load that code "
                     f"cannot show it while they do: {_sessions(blocking)}",
                     "end them: SELECT pg_terminate_backend(pid) for each pid listed")
    installed = {stamp for _, stamp, mine, *_ in rows if mine}
    if not installed:
        return Check(name, "skip", "this session did not import pyembed in PL/Python")
    stale = [r for r in rows if r[1] not in installed]
    if not stale:
        return Check(name, "ok", f"yes, the {len(rows)} that loaded it")
    return Check(name, "fail", f"{len(stale)} backend(s) run pyembed code loaded before the "
                 f"installed one: {_sessions(stale)}",
                 "reconnect those sessions (a new session imports the installed code), or end "
                 "them: SELECT pg_terminate_backend(pid) for each pid listed")


def _sessions(rows: list[Any]) -> str:
    """Sessions of pg_locks joined to pg_stat_activity (pid, stamp, mine, user, database,
    application, start), one clause each."""
    return "; ".join(
        f"pid {pid} ({user or '?'} on {db or '?'}, {app or 'no application_name'}, since "
        f"{f'{start:%Y-%m-%d %H:%M:%S %Z}' if start else '?'})"
        for pid, _, _, user, db, app, start in rows)


def check_api_keys(conn: Conn) -> Check:
    name = "API keys for the corpora's providers"
    rows = conn.execute(
        "SELECT DISTINCT m.provider FROM pyembed.corpora c JOIN pyembed.models m "
        "ON m.model_key IN (c.model_key, c.target_model_key) ORDER BY 1").fetchall()
    providers = [r[0] for r in rows]
    needed = {p: API_KEY_ENV[p] for p in providers if p in API_KEY_ENV}
    if not needed:
        return Check(name, "ok", "no corpus needs one" if not providers
                     else f"none needed ({', '.join(providers)})")
    missing = sorted(env for env in needed.values() if not os.environ.get(env, "").strip())
    if not missing:
        return Check(name, "ok", ", ".join(f"{v} set" for v in sorted(needed.values())))
    return Check(name, "warn", f"{', '.join(missing)} not set (needed by "
                 f"{', '.join(p for p, v in needed.items() if v in missing)} corpora)",
                 f"export {missing[0]}=... for client-side embedding (and "
                 f"`pyembed secret set {missing[0]}` as the owner for in-database embedding)")


def check_worker(conn: Conn) -> Check:
    """The queue of the login's tenant, or of each tenant for a login that acts for tenants (the
    operator's worker login), each read acting for it: the first that waits with nothing
    written warns, naming its tenant."""
    name = "worker alive"
    if _standby(conn):  # no worker runs here: the queue is its primary's, as replayed
        row = conn.execute("SELECT count(*) FROM pyembed.queue").fetchone()
        return Check(name, "skip", f"a standby ({row[0] if row else 0} queued on its primary, as "
                     "replayed here): run doctor on the primary, where the worker writes")
    queued = leased = 0
    oldest, written = 0.0, 0
    stale: str | None = None  # (whose queue waits: "" for the login's own)
    for tenant, label in tenants.acting_tenants(conn):
        with tenants.acting_for(conn, tenant):
            row = conn.execute(
                "SELECT count(*), "
                "count(*) FILTER (WHERE not_before > now() AND last_error IS NULL), "
                "extract(epoch FROM now() - min(enqueued_at))::float8 FROM pyembed.queue"
            ).fetchone()
            assert row is not None
            if not row[0]:
                continue
            recent = conn.execute("SELECT coalesce(sum(per_s_5m), 0) * 300 "
                                  "FROM pyembed.throughput").fetchone()
        n, held, age = int(row[0]), int(row[1]), float(row[2] or 0.0)
        done = round(float(recent[0])) if recent else 0
        queued, leased, oldest, written = queued + n, leased + held, max(oldest, age), written + done
        if not held and age > WORKER_STALE_MINUTES * 60 and not done and stale is None:
            stale = "" if tenant is None else f" (tenant {label}'s)"
    if not queued:
        return Check(name, "ok", "nothing queued")
    if leased and stale is None:
        return Check(name, "ok", f"{queued} queued, {leased} leased by a worker")
    detail = f"{queued} queued, the oldest {_ago(oldest)} ago"
    if stale is not None:
        return Check(name, "warn", detail + f", nothing written in the last 5 minutes{stale}",
                     "run `pyembed worker` (it embeds what SQL queued)")
    return Check(name, "ok", detail + (f", {written} vectors written in 5 minutes"
                                       if written else ""))


def check_indexes(conn: Conn) -> Check:
    name = "vector indexes"
    missing = [f for f in health.indexes(conn) if f.level != "ok"]
    if not missing:
        return Check(name, "ok", "every corpus's active key has its index (or a load at work "
                                 "builds it at its end)")
    return Check(name, "warn", f"no index on {', '.join(f.subject for f in missing)}: searches "
                 "scan every vector", missing[0].note)


T = TypeVar("T")


OWNER_SKIPPED = ("only the owner may read them, and this login is not the schema's owner nor "
                 "a member of it")
OWNER_FIX = ("run doctor as the owner: `pyembed doctor --dsn <the owner's DSN>`, or with "
             "PYEMBED_OWNER_DSN set beside this DSN")


def _as_owner(name: str, owner_dsn: str | None, read: Callable[[Conn], T]) -> T | Check:
    """What `read` finds on a connection as the owner (`owner_dsn`), or check `name`'s skip,
    saying how to run it, where there is none: the owner-only checks' one way in."""
    if not owner_dsn:
        return Check(name, "skip", OWNER_SKIPPED, OWNER_FIX)
    try:
        with psycopg.connect(owner_dsn, autocommit=True, connect_timeout=5) as owner:
            return read(owner)
    except psycopg.OperationalError as exc:
        return Check(name, "skip", f"the owner cannot log in from here ({_first(exc)})")


def check_vector_legs(conn: Conn, owner_dsn: str | None = None) -> Check:
    """Each corpus's own vector leg for each of its keys (sql/025-nearest.sql): present and as
    made. Only the owner may read them: as the owner (PYEMBED_OWNER_DSN, or the local cluster's
    owner) when that DSN is known."""
    name = "corpora's vector legs"
    found = _as_owner(name, owner_dsn, lambda owner: owner.execute(
        "SELECT corpus, model_key, problem FROM pyembed._nearest_functions_problems()"
    ).fetchall())
    if isinstance(found, Check):
        return found
    if not found:
        return Check(name, "ok", "each corpus's key has its own, as made")
    return Check(name, "warn", ", ".join(f"{c} ({k}): {p}" for c, k, p in found)
                 + " (a missing one's searches plan their statement every time; one changed by "
                 "hand runs as changed)", "pyembed install")


def check_tenant_members(conn: Conn, owner_dsn: str | None = None) -> Check:
    """Each tenant's members are the login roles added (tenants.stale_members). Only the owner
    may read them: as the owner (PYEMBED_OWNER_DSN, or the local cluster's owner) when that DSN
    is known."""
    name = "tenants' members"
    stale = _as_owner(name, owner_dsn, tenants.stale_members)
    if isinstance(stale, Check):
        return stale
    if not stale:
        return Check(name, "ok", "each is the login role added")
    again = [m for m in stale if not m.dropped]
    dropped = [m for m in stale if m.dropped]
    parts = []
    if again:
        parts.append(", ".join(f"{m.tenant}'s {m.role}" for m in again)
                     + " another role than the one added (made again under its name, or the "
                     "database restored into another cluster, whose roles have new OIDs): its "
                     "login is refused (PE014)")
    if dropped:
        parts.append(", ".join(f"{m.tenant}'s {m.role}" for m in dropped) + " no longer a role")
    fix = "as the owner, add each again: " + "; ".join(
        f"pyembed tenant add-member {m.tenant} {m.role}" for m in (again or dropped))
    if not again:
        fix += " (once its login exists again)"
    return Check(name, "fail" if again else "warn", "; ".join(parts), fix)


def check_logins(conn: Conn, owner_dsn: str | None = None) -> Check:
    """No login's roles reach past its place (tenants.crossed_logins): a tenant's login in
    pyembed_operator or the owner's role, or one holding privileges on another tenant's
    partitions. Only the owner may read the members: as the owner, as check_tenant_members."""
    name = "logins' roles"
    crossed = _as_owner(name, owner_dsn, tenants.crossed_logins)
    if isinstance(crossed, Check):
        return crossed
    if not crossed:
        return Check(name, "ok", "no tenant's login reaches another tenant's or the operator's")
    return Check(name, "fail" if any(c.fatal for c in crossed) else "warn",
                 "; ".join(c.problem for c in crossed),
                 "as the owner: " + "; ".join(dict.fromkeys(c.fix for c in crossed)))


def check_replicas(conn: Conn) -> Check:
    name = "replicas' lag"
    if _standby(conn):
        row = conn.execute(
            "SELECT extract(epoch FROM now() - pg_catalog.pg_last_xact_replay_timestamp())::float8"
            ", pg_catalog.pg_is_wal_replay_paused()").fetchone()
        behind, paused = (row[0], row[1]) if row else (None, False)
        detail = ("this server is a standby: its replicas are its primary's (run doctor there)"
                  + ("" if behind is None else
                     f"; its last replayed transaction committed {_ago(max(behind, 0.0))} ago")
                  + ("; replay is paused" if paused else ""))
        return Check(name, "warn" if paused else "ok", detail,
                     "SELECT pg_wal_replay_resume() on the standby, as a superuser")
    findings = health.replicas(conn)
    if not findings:
        return Check(name, "ok", "no streaming replicas")
    detail = "; ".join(f"{f.subject} {f.value}" + (f" ({f.note})" if f.note else "")
                       for f in findings)
    if any(f.level != "ok" for f in findings):
        return Check(name, "warn", detail, "check the standby's log and its network; "
                     "`pyembed db replica list` shows the local ones")
    return Check(name, "ok", detail)


CHECKS: list[tuple[str, Callable[..., Check]]] = [
    ("schema at head", check_schema),
    ("extensions vector and plpython3u", check_extensions),
    ("PL/Python imports pyembed", check_plpython),
    ("backends run the installed pyembed", check_loaded_code),
    ("API keys for the corpora's providers", check_api_keys),
    ("worker alive", check_worker),
    ("vector indexes", check_indexes),
    ("corpora's vector legs", check_vector_legs),
    ("tenants' members", check_tenant_members),
    ("logins' roles", check_logins),
    ("replicas' lag", check_replicas),
]
OWNER_CHECKS = {check_schema, check_vector_legs, check_tenant_members, check_logins}
"""The checks that read what only the owner may: each is given the owner's DSN (or None)."""


def _owner_reach(conn: Conn, dsn: str) -> str | None:
    """A DSN as the pyembed schema's owner when `dsn`'s login may act as it, so that `doctor
    --dsn <the owner's DSN>` runs the owner-only checks without PYEMBED_OWNER_DSN: `dsn` itself
    for the owner, a superuser or a member inheriting its privileges; for a member that does not
    inherit them (NOINHERIT), `dsn` with the session's role set to the owner (SET ROLE, as
    libpq's options give it). Else None."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    row = conn.execute(
        "SELECT pg_catalog.pg_has_role(session_user, n.nspowner, 'USAGE'), "
        "pg_catalog.pg_has_role(session_user, n.nspowner, 'MEMBER'), "
        "pg_catalog.pg_get_userbyid(n.nspowner) "
        "FROM pg_catalog.pg_namespace n WHERE n.nspname = 'pyembed'").fetchone()
    if not row or not row[1]:
        return None
    if row[0]:
        return dsn
    role = str(row[2]).replace("\\", "\\\\").replace(" ", "\\ ")  # (options' escapes)
    options = str(conninfo_to_dict(dsn).get("options") or "")
    return make_conninfo(dsn, options=f"{options} -c role={role}".strip())


def owner_dsn_for(dsn: str) -> str | None:
    """The owner's DSN for the same database: $PYEMBED_OWNER_DSN, or the local cluster's
    owner when `dsn` is the local cluster's."""
    if os.environ.get(OWNER_DSN_ENV):
        return os.environ[OWNER_DSN_ENV]
    from .localdb import LocalCluster

    local = LocalCluster()
    try:
        return local.dsn(owner=True) if local.initialised and local.dsn() == dsn else None
    except Exception:  # an unreadable cluster.json: no owner DSN
        return None


def run(dsn: str, owner_dsn: str | None = None) -> list[Check]:
    """Every check, in order; after an unreachable server the rest are skipped."""
    owner_dsn = owner_dsn or owner_dsn_for(dsn)
    first, conn = check_server(dsn)
    results = [first]
    if conn is None:
        return results + [Check(name, "skip", "the server is not reachable")
                          for name, _ in CHECKS]
    with conn:
        owner_dsn = owner_dsn or _owner_reach(conn, dsn)
        for name, check in CHECKS:
            try:
                results.append(check(conn, owner_dsn) if check in OWNER_CHECKS
                               else check(conn))
            except psycopg.Error as exc:
                fix = "pyembed install" if isinstance(
                    exc, psycopg.errors.UndefinedTable | psycopg.errors.UndefinedFunction
                    | psycopg.errors.InvalidSchemaName) else ""
                results.append(Check(name, "fail", _first(exc), fix))
    return results


def _first(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def doctor_cmd(
    dsn: Annotated[str | None, typer.Option(
        "--dsn", envvar=DSN_ENV, callback=warn_of_password_in_argv,
        help="libpq DSN; default: the local cluster")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="print one JSON document instead of lines (README: Command line)")]
    = False,
) -> None:
    """Check what goes wrong first, one line each with the fix; exit 1 on a failure.

    Example: pyembed doctor
    """
    checks = run(dsn or resolve_dsn())
    failures = sum(c.status == "fail" for c in checks)
    if as_json:
        print(json.dumps({"checks": [asdict(c) for c in checks], "failures": failures}),
              flush=True)
    else:
        for c in checks:
            print(c.line(), flush=True)
    if failures:
        sys.exit(1)


__all__ = ["CHECKS", "Check", "doctor_cmd", "run"]
