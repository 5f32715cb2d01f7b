"""Tenants: who owns which corpora, their rate limits, and what they used.

Isolation itself is in the database (row-level security, forced; revision 0005): a session
acts for the tenant its login role belongs to. Creating tenants and members is the owner's.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .dbcall import count, integer, translated
from .errors import InvalidInput, ProviderError, shown
from .sqlexec import Executor, executor
from .text import check_text

if TYPE_CHECKING:
    import psycopg

ACT_AS = "SELECT set_config('pyembed.act_as_tenant', %s, %s)"
"""Act for a tenant (by name; '': none), for the transaction (true) or the session: honoured for
a superuser and an operator's login (pyembed_operator, no tenant's member) only."""


def acting_tenants(conn: psycopg.Connection[Any]) -> list[tuple[str | None, str]]:
    """The tenants `conn`'s login may act for, each (name to act as, label): every tenant and
    none ('', labelled '-') for the operator's login or a superuser; its own tenant alone
    (None: its login's, labelled with the tenant's name) for any other (pyembed.acting_tenants)."""
    with translated():
        return [(r[0], r[1]) for r in conn.execute(
            "SELECT tenant, label FROM pyembed.acting_tenants()").fetchall()]


@contextmanager
def acting_for(conn: psycopg.Connection[Any], tenant: str | None
               ) -> Iterator[psycopg.Connection[Any]]:
    """A transaction of `conn` acting for `tenant` (None: as its login); the caller's setting is
    set back after one nested in the caller's own transaction (a savepoint keeps it)."""
    from psycopg.pq import TransactionStatus

    nested = conn.info.transaction_status != TransactionStatus.IDLE
    with conn.transaction():
        before = None
        if tenant is not None:
            if nested:
                row = conn.execute("SELECT coalesce(current_setting('pyembed.act_as_tenant', "
                                   "true), '')").fetchone()
                before = row[0] if row else ""
            conn.execute(ACT_AS, (tenant, True))
        yield conn
        if before is not None:
            conn.execute(ACT_AS, (before, True))


def create_tenant(conn: psycopg.Connection[Any], name: str, *,
                  requests_per_minute: int | None = None,
                  tokens_per_minute: int | None = None) -> int:
    """A new tenant (owner only); limits None mean unlimited."""
    import psycopg  # the owner's client: PL/Python imports this module only to meter calls

    _name(name, "a tenant name")
    with translated():
        try:
            row = conn.execute(
                "INSERT INTO pyembed.tenants (name, requests_per_minute, tokens_per_minute) "
                "VALUES (%s, %s, %s) RETURNING tenant_id",
                (name, *(None if limit is None else integer(limit, what, conn) for limit, what in (
                    (requests_per_minute, "requests_per_minute"),
                    (tokens_per_minute, "tokens_per_minute"))))).fetchone()
        except psycopg.errors.CheckViolation as exc:
            # Name the value the table refused: a limit of 0 is no fault of the name.
            if exc.diag.constraint_name == "tenants_name_check":
                raise InvalidInput(f"invalid tenant name {shown(name)}: use 1-63 lowercase letters, "
                                   "digits, _ or -, the first a letter or digit") from None
            raise  # (the limits were checked against their ranges above)
        except psycopg.errors.UniqueViolation:
            raise InvalidInput(f"tenant {name!r} already exists") from None
    assert row is not None
    return int(row[0])


ROLE_NAME_BYTES = 63
"""The longest name PostgreSQL keeps whole (NAMEDATALEN - 1)."""


def add_member(conn: psycopg.Connection[Any], tenant: str, role: str, *,
               create_login: str | None = None) -> None:
    """Let the login role `role` act for `tenant` (owner only). With `create_login` (a
    password), the role is created as a member of pyembed_app first."""
    import psycopg  # the owner's client, as create_tenant
    from psycopg import sql

    from .passwords import password_clause

    _name(tenant, "a tenant name")
    _name(role, "a role name")
    if create_login is not None:  # (an int went into the statement as PASSWORD 5)
        check_text(create_login, "create_login (the new login's password)")
    size = len(role.encode("utf-8", "surrogatepass"))
    if size > ROLE_NAME_BYTES:
        # PostgreSQL cuts a longer name, with a notice no client shows: the login made, or the
        # member stored, would be another name than the one given and said.
        raise InvalidInput(f"role name {shown(role)} is {size} bytes: PostgreSQL's names are at "
                           f"most {ROLE_NAME_BYTES} bytes of UTF-8")
    with translated(), conn.transaction():
        if create_login is not None:
            try:
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN {} IN ROLE pyembed_app").format(
                    sql.Identifier(role), password_clause(conn, role, create_login)))
            except psycopg.errors.DuplicateObject:
                raise InvalidInput(f"role {shown(role)} already exists: add it without "
                                   "create_login") from None
        cur = conn.execute(
            "INSERT INTO pyembed.tenant_members (role_name, tenant_id) "
            "SELECT %s, tenant_id FROM pyembed.tenants WHERE name = %s "
            "ON CONFLICT (role_name) DO UPDATE SET tenant_id = EXCLUDED.tenant_id",
            (role, tenant))
        if cur.rowcount == 0:
            raise InvalidInput(f"unknown tenant {shown(tenant)}")


def _name(value: object, what: str) -> None:
    """InvalidInput for a name that is not a text (psycopg sent an int as a number: no such
    operator, or a tenant named "5")."""
    if not isinstance(value, str):
        raise InvalidInput(f"{what} is a text, not {type(value).__name__} {shown(value)}")


@dataclass(frozen=True)
class TenantRow:
    """A tenant, its limits (None: unlimited) and the login roles that act for it."""

    name: str
    requests_per_minute: int | None
    tokens_per_minute: int | None
    members: list[str]
    created_at: datetime.datetime
    stale_members: list[str]
    """Members whose role is not the one added (stale_members): the database refuses their logins
    (PE014)."""


def list_tenants(conn: psycopg.Connection[Any]) -> list[TenantRow]:
    """Every tenant by name, with its limits and members (owner only, as the tenants are)."""
    with translated():
        rows = conn.execute(
            "SELECT t.name, t.requests_per_minute, t.tokens_per_minute, "
            "coalesce(array_agg(m.role_name::text ORDER BY m.role_name) "
            "FILTER (WHERE m.role_name IS NOT NULL), '{}'), t.created_at "
            "FROM pyembed.tenants t LEFT JOIN pyembed.tenant_members m USING (tenant_id) "
            "GROUP BY t.tenant_id ORDER BY t.name").fetchall()
    stale = stale_members(conn)
    return [TenantRow(name, rpm, tpm, members, created,
                      [m.role for m in stale if m.tenant == name])
            for name, rpm, tpm, members, created in rows]


@dataclass(frozen=True)
class StaleMember:
    """A tenant's member whose login role is not the role added: `dropped` (no role of that
    name), or another role made under its name."""

    tenant: str
    role: str
    dropped: bool


def stale_members(conn: psycopg.Connection[Any]) -> list[StaleMember]:
    """The tenants' members whose role is not the one added (owner only, as the tenants are).
    Membership is the role's own, by OID: a role of the name made again, by hand or by restoring
    a dump into another cluster (whose roles are made anew, with new OIDs), is refused (PE014,
    pyembed._stale_member) until `add_member` adds it again."""
    with translated():
        rows = conn.execute(
            "SELECT t.name, m.role_name::text, r.oid IS NULL "
            "FROM pyembed.tenant_members m JOIN pyembed.tenants t USING (tenant_id) "
            "LEFT JOIN pg_catalog.pg_roles r ON r.rolname = m.role_name "
            "WHERE r.oid IS DISTINCT FROM m.role_oid ORDER BY 1, 2").fetchall()
    return [StaleMember(*r) for r in rows]


@dataclass(frozen=True)
class CrossedLogin:
    """A login whose roles reach past its place (crossed_logins): `role`, the tenant it is a
    member of (None: none), what is wrong, and the statement or command that mends it. `fatal`
    False: an operator's login that may not yet write every partition (it writes nothing of
    another party's meanwhile)."""

    role: str
    tenant: str | None
    problem: str
    fix: str
    fatal: bool = True


_CROSSED = """
WITH owner AS (SELECT n.nspowner AS oid FROM pg_catalog.pg_namespace n
                WHERE n.nspname = 'pyembed'),
members AS (SELECT r.oid, t.tenant_id, t.name FROM pyembed.tenant_members m
              JOIN pyembed.tenants t USING (tenant_id)
              JOIN pg_catalog.pg_roles r ON r.oid = m.role_oid AND r.rolname = m.role_name),
parts AS (SELECT co.tenant_id, t.name, pg_catalog.to_regclass(pg_catalog.format(
                   'pyembed.%I', pyembed._vector_partition_name(co.corpus_id))) AS part
            FROM pyembed.corpora co LEFT JOIN pyembed.tenants t USING (tenant_id)),
logins AS (SELECT r.oid, r.rolname, mem.tenant_id, mem.name AS tenant,
                  pg_catalog.pg_has_role(r.oid, 'pyembed_operator', 'MEMBER') AS operator,
                  pg_catalog.pg_has_role(r.oid, (SELECT oid FROM owner), 'MEMBER') AS owner
             FROM pg_catalog.pg_roles r LEFT JOIN members mem ON mem.oid = r.oid
            WHERE r.rolcanlogin AND NOT r.rolsuper)
SELECT l.rolname::text, l.tenant, 'operator', (
         SELECT pg_catalog.string_agg(g.rolname::text, ', ' ORDER BY g.rolname::text)
           FROM pg_catalog.pg_auth_members a JOIN pg_catalog.pg_roles g ON g.oid = a.roleid
          WHERE a.member = l.oid AND pg_catalog.pg_has_role(g.oid, 'pyembed_operator', 'MEMBER')),
       NULL FROM logins l
 WHERE l.tenant IS NOT NULL AND l.operator
UNION ALL
SELECT l.rolname::text, l.tenant, 'owner', (
         SELECT pg_catalog.string_agg(g.rolname::text, ', ' ORDER BY g.rolname::text)
           FROM pg_catalog.pg_auth_members a JOIN pg_catalog.pg_roles g ON g.oid = a.roleid
          WHERE a.member = l.oid AND pg_catalog.pg_has_role(g.oid, (SELECT oid FROM owner),
                                                            'MEMBER')),
       (SELECT oid FROM owner)::regrole::text
  FROM logins l WHERE l.tenant IS NOT NULL AND l.owner
UNION ALL
SELECT l.rolname::text, l.tenant, 'partitions',
       pg_catalog.string_agg(DISTINCT g.rolname::text, ', ' ORDER BY g.rolname::text),
       pg_catalog.string_agg(DISTINCT p.name, ', ' ORDER BY p.name)
  FROM logins l
  JOIN parts p ON p.part IS NOT NULL AND p.tenant_id IS NOT NULL
              AND p.tenant_id IS DISTINCT FROM l.tenant_id
  JOIN pg_catalog.pg_class c ON c.oid = p.part
  CROSS JOIN LATERAL pg_catalog.aclexplode(c.relacl) a
  JOIN pg_catalog.pg_roles g ON g.oid = a.grantee
 WHERE NOT l.owner AND NOT (l.tenant IS NULL AND l.operator) AND a.grantee <> c.relowner
   AND pg_catalog.pg_has_role(l.oid, a.grantee, 'MEMBER')
 GROUP BY l.rolname, l.tenant
UNION ALL
SELECT l.rolname::text, NULL, 'unwritten', NULL, pg_catalog.count(*)::text
  FROM logins l JOIN parts p ON p.part IS NOT NULL
 WHERE l.tenant IS NULL AND l.operator AND NOT l.owner
   AND NOT pg_catalog.has_table_privilege(l.oid, p.part, 'INSERT')
 GROUP BY l.rolname
ORDER BY 1, 3
"""


def crossed_logins(conn: psycopg.Connection[Any]) -> list[CrossedLogin]:
    """Logins (but superusers) whose roles meet where pyembed's must not (owner only, as the
    tenants are): a tenant's member in pyembed_operator (granted after it joined) or in the
    schema's owner role; any login but an operator's or the owner's that holds a privilege on a
    partition of another tenant's corpus through a role it is in (another tenant's login, a
    group granted one), with which it could LOCK that partition and hold off that tenant's
    drop, reindex or load. And, not fatal, an operator's login (in pyembed_operator, no
    tenant's member) made after the last install, which may not yet write every partition."""
    with translated():
        rows = conn.execute(_CROSSED).fetchall()
    found = []
    for role, tenant, kind, via, what in rows:
        whose = f"{role} (tenant {tenant}'s login)" if tenant else f"{role} (no tenant's login)"
        revoke = "; ".join(f"REVOKE {v} FROM {role}" for v in (via or "").split(", ")
                           if v and v != role)
        if kind == "operator":
            found.append(CrossedLogin(role, tenant, f"{whose} is in pyembed_operator"
                                      + ("" if via == "pyembed_operator" else f" through {via}")
                                      + ": it acts for its own tenant only, but an operator's "
                                      "login must be no tenant's", revoke))
        elif kind == "owner":
            found.append(CrossedLogin(role, tenant, f"{whose} may act as the schema's owner "
                                      f"{what} through {via}, who sees and may change every "
                                      "tenant's rows", revoke))
        elif kind == "partitions":
            fix = revoke
            if role in via.split(", "):  # (a grant of its own: _partition_writers takes it back)
                fix = "; ".join(f for f in (fix, "pyembed install") if f)
            found.append(CrossedLogin(role, tenant, f"{whose} holds privileges on tenant "
                                      f"{what}'s vector partitions through {via}, with which it "
                                      "could LOCK them and hold off that tenant's drops, "
                                      "reindexes and loads", fix))
        else:
            found.append(CrossedLogin(role, tenant, f"{role} (an operator's login) may not yet write "
                                      f"{what} of the corpora's partitions: it was granted "
                                      "pyembed_operator after the last install",
                                      "pyembed install", fatal=False))
    return found


@dataclass(frozen=True)
class UsageRow:
    tenant: str
    corpus: str
    model_key: str
    requests: int
    tokens: int
    cost_usd: float


def usage(conn: psycopg.Connection[Any], days: int = 30) -> list[UsageRow]:
    """Provider calls, tokens and estimated cost per tenant, corpus and model key (the
    session's own tenant for an application role; every tenant for a superuser)."""
    with translated():
        rows = conn.execute("SELECT * FROM pyembed.usage_report(%s)",
                            (count(days, "days"),)).fetchall()
    return [UsageRow(str(a), str(b), str(k), int(r), int(t), float(c))
            for a, b, k, r, t, c in rows]


class Keyed(Protocol):
    """What a meter or an error counter needs of a model (an embedding model or a
    reranker): its key (a model key, or a reranker's identity) and its provider."""

    @property
    def key(self) -> str: ...

    @property
    def provider(self) -> str: ...


def meter(db: psycopg.Connection[Any] | Executor,
          corpus_id: int | None = None) -> Callable[[Keyed, int], None]:
    """An Embedder (or Reranker) meter that reserves each provider call in pyembed.usage (and
    is refused, RateLimited, over the tenant's limits)."""
    run = executor(db)

    def reserve(spec: Keyed, tokens: int) -> None:
        run.rows("SELECT pyembed.reserve_usage($1::text, $2::integer, 1, $3::bigint)",
                 [spec.key, corpus_id, tokens], ["text", "integer", "bigint"])
    return reserve


COUNTS_ERRORS = ("SELECT has_function_privilege("
                 "'pyembed.count_provider_error(text, text)', 'EXECUTE')")
"""Whether the session may count failed calls: pyembed's own functions (running as their owner)
and a worker whose login is in pyembed_worker may; an application role's own calls (with its own
API keys) are not counted, so that no tenant can add to the counters every tenant reads."""


def error_counter(db: psycopg.Connection[Any] | Executor
                  ) -> Callable[[Keyed, ProviderError], None]:
    """An Embedder (or Reranker) on_error that counts each failed provider call by provider and
    kind (in sequences, so that a failure which aborts its transaction is still counted), where
    the session may (COUNTS_ERRORS; asked at each failure: the role may change meanwhile)."""
    run = executor(db)

    def count(spec: Keyed, error: ProviderError) -> None:
        if run.rows(COUNTS_ERRORS, [], []) == [(True,)]:
            run.rows("SELECT pyembed.count_provider_error($1::text, $2::text)",
                     [spec.provider, error.kind], ["text", "text"])
    return count


@dataclass(frozen=True)
class ProviderErrors:
    provider: str
    kind: str
    errors: int


def provider_errors(conn: psycopg.Connection[Any]) -> list[ProviderErrors]:
    """Failed provider calls per provider and kind (pyembed.errors.ERROR_KINDS), ever."""
    rows = conn.execute("SELECT * FROM pyembed.provider_errors()").fetchall()
    return [ProviderErrors(str(p), str(k), int(n)) for p, k, n in rows]
