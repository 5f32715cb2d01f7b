"""Bring a database to the current schema: Alembic revisions, then the replaceable sql/ files.

Alembic and SQLAlchemy are imported when a function here needs them, not with pyembed: every
other command starts without their import time."""

from __future__ import annotations

import hashlib
import io
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .config import resource_dir
from .db import dsn_parts, resolve_dsn
from .errors import InstallError, InvalidInput, PyembedError
from .models import BUILTIN, ModelSpec

if TYPE_CHECKING:
    import sqlalchemy as sa
    from alembic.config import Config

SCHEMA = "pyembed"
VERSION_TABLE = "alembic_version"
INSTALL_LOCK_ID = 0x70796D62  # "pymb": serialises concurrent first installs
INSTALL_WAIT = 60
"""Seconds a first install waits for the install lock before it names who holds it."""
DDL_LOCK_WAIT = 3.0
"""Seconds a statement of an install or upgrade waits for a table's lock: every query on that
table queues behind the waiting DDL, so a longer wait is an outage for the tenants using it."""
DDL_TRIES = 4
"""An install whose DDL timed out on a lock is run again this many times in all, then fails
naming the sessions that held the locks."""
DDL_PAUSE = 2.0
"""Seconds between two tries, in which the queries queued behind the DDL run."""
SQL_FILE = re.compile(r"^(\d{3})-[a-z0-9-]+\.sql$")


def sqlalchemy_url(dsn: str | None = None) -> str:
    """A SQLAlchemy URL (psycopg 3 driver) for a libpq DSN or URL; default: the owner DSN."""
    dsn = dsn or resolve_dsn(owner=True)
    if "://" not in dsn:  # key=value DSN: hand it to psycopg as is
        return "postgresql+psycopg:///?" + _kv_to_query(dsn)
    return re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql+psycopg://", dsn)


def _kv_to_query(dsn: str) -> str:
    from urllib.parse import urlencode

    return urlencode({k: str(v) for k, v in dsn_parts(dsn).items()})


def sql_files() -> list[Path]:
    """The replaceable-object files in the order they are applied."""
    files = sorted(p for p in resource_dir("sql").iterdir() if p.suffix == ".sql")
    bad = [p.name for p in files if not SQL_FILE.match(p.name)]
    if bad:
        raise RuntimeError(f"sql/ files must be named NNN-name.sql: {bad}")
    return files


def raw_text(sql: str) -> sa.TextClause:
    """Raw SQL as a TextClause that SQLAlchemy will not scan for :bind parameters."""
    import sqlalchemy as sa

    return sa.text(sql.replace(":", r"\:"))


def run_sql(sql: str) -> None:
    """Execute raw SQL inside a revision, online or offline."""
    from alembic import op

    op.execute(raw_text(sql))


SHOWN_ROWS = 20
"""At most this many rows are named when a revision refuses to add a CHECK (refuse_rows)."""


def refuse_rows(revision: str, rows: Sequence[tuple[str, str, str]], fix: str) -> None:
    """Stop a revision, before it adds a CHECK, if a stored row would break it: one error
    naming the rows (up to SHOWN_ROWS) and what is wrong with each, and `fix`; the upgrade's
    transaction then rolls back, so the database is left as it was. Each of `rows` is a table,
    the SQL that names one of its rows (its key), and SQL giving the row's problem (NULL: none).
    A DO block, so that the offline script a DBA applies with psql stops the same way."""
    found = " UNION ALL ".join(
        f"SELECT '{table}' AS t, ({key})::text AS k, ({problem}) AS p FROM pyembed.{table}"
        for table, key, problem in rows)
    run_sql(f"""DO $refuse$
DECLARE
  n bigint;
  shown text;
BEGIN
  SELECT count(*), string_agg(format('pyembed.%s %s: %s', t, quote_literal(k), p), '; '
                              ORDER BY t, k) FILTER (WHERE rn <= {SHOWN_ROWS})
    INTO n, shown
    FROM (SELECT *, row_number() OVER (ORDER BY t, k) AS rn
            FROM ({found}) f WHERE p IS NOT NULL) bad;
  IF n > 0 THEN
    RAISE EXCEPTION USING ERRCODE = 'check_violation',
      MESSAGE = format('revision {revision} stopped: %s stored row(s) break the check it adds '
                       '(%s%s). %s, then upgrade again',
                       n, shown, CASE WHEN n > {SHOWN_ROWS} THEN '; ...' ELSE '' END,
                       {_literal(fix)});
  END IF;
END
$refuse$;""")


def _literal(v: object) -> str:
    """`v` as an SQL literal, for the scripts revisions run (offline too: no driver to bind)."""
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return "'" + str(v).replace("'", "''") + "'"


def _model_row(spec: ModelSpec) -> str:
    values = (spec.key, spec.provider, spec.model_id, spec.version, spec.dimensions,
              spec.distance, spec.normalized, spec.input_types, spec.max_batch, spec.max_tokens,
              spec.request_dimensions, spec.price_per_mtok, spec.description)
    return "(" + ", ".join(_literal(v) for v in values) + ")"


def _replaceable_body() -> str:
    parts = [f"-- {p.name}\n{p.read_text()}" for p in sql_files()]
    parts.append(
        "INSERT INTO pyembed.models (model_key, provider, model_id, model_version, dimensions, "
        "distance, normalized, input_types, max_batch, max_tokens, request_dimensions, "
        "price_per_mtok, description) VALUES\n  "
        + ",\n  ".join(_model_row(s) for s in BUILTIN)
        + "\nON CONFLICT (model_key) DO NOTHING;"
    )
    return "\n".join(parts)


def replaceable_digest(body: str | None = None) -> str:
    """sha256 of what replaceable_sql applies (the sql/ files and the built-in registry), or of
    `body`, that text already read."""
    return hashlib.sha256((_replaceable_body() if body is None else body).encode()).hexdigest()


def replaceable_sql() -> str:
    """Every sql/ file in order, then the built-in model registry: safe to run any number of
    times. First, pyembed.sql_digest(), which says what this applies: the revision alone does
    not tell a database given other sql/ files apart (a functions-only change needs none), and
    `pyembed doctor` compares it with its own (created first, so that 080 and 090 grant and pin
    it as every other function)."""
    body = _replaceable_body()
    digest = replaceable_digest(body)
    return "\n".join([
        "SET LOCAL check_function_bodies = off;",
        "CREATE OR REPLACE FUNCTION pyembed.sql_digest() RETURNS text LANGUAGE sql IMMUTABLE "
        f"AS $$ SELECT '{digest}'::text $$;",
        body])


def alembic_config(dsn: str | None = None, output_buffer: io.StringIO | None = None) -> Config:
    from alembic.config import Config

    cfg = Config(output_buffer=output_buffer)
    cfg.set_main_option("script_location", str(resource_dir("alembic")))
    if dsn:
        cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(dsn).replace("%", "%%"))
    return cfg


def install_lock_sql() -> str:
    """The statement an install or upgrade starts its transaction with: one installer at a time.

    Once the schema exists, installers take turns on the version table's row (FOR UPDATE): only
    a role that may update that table can lock it, so no other role can hold an install up. A
    first install has no table yet and takes an advisory key (which any role with CONNECT could
    hold), waiting at most INSTALL_WAIT seconds, then fails naming the sessions that hold it;
    once it has the key, it also locks the row if an installer ahead of it created the table."""
    table = f"{SCHEMA}.{VERSION_TABLE}"
    return f"""DO $install_lock$
DECLARE
  locked bigint := 0;
  was text := current_setting('lock_timeout');
  holders text;
BEGIN
  IF to_regclass('{table}') IS NOT NULL THEN
    EXECUTE 'SELECT FROM {table} FOR UPDATE';
    GET DIAGNOSTICS locked = ROW_COUNT;
  END IF;
  IF locked = 0 THEN
    BEGIN
      PERFORM set_config('lock_timeout', '{INSTALL_WAIT}s', true);
      PERFORM pg_advisory_xact_lock({INSTALL_LOCK_ID});
    EXCEPTION WHEN lock_not_available THEN
      SELECT string_agg(format('pid %s (role %s, application %L, %s since %s)', a.pid,
                               a.usename, a.application_name, a.state,
                               date_trunc('second', a.state_change)), '; ')
        INTO holders
        FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
       WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0
         AND l.objid = {INSTALL_LOCK_ID}::oid AND l.objsubid = 1
         AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d
                            WHERE d.datname = current_database());
      RAISE EXCEPTION USING ERRCODE = 'lock_not_available',
        MESSAGE = format('another session held pyembed''s install lock (advisory key %s) for '
                         '{INSTALL_WAIT} s: %s; end it (pg_terminate_backend) or retry',
                         {INSTALL_LOCK_ID}, coalesce(holders, 'gone since'));
    END;
    PERFORM set_config('lock_timeout', was, true);
    IF to_regclass('{table}') IS NOT NULL THEN
      EXECUTE 'SELECT FROM {table} FOR UPDATE';
    END IF;
  END IF;
END
$install_lock$"""


UTF8_DATABASE_SQL = """DO $utf8_database$
BEGIN
  IF current_setting('server_encoding') <> 'UTF8' THEN
    RAISE EXCEPTION USING ERRCODE = 'PE013',
      MESSAGE = format('pyembed needs a database whose encoding is UTF8, not %s: every write '
                       'checks its document ids in Unicode (NFC, which PostgreSQL computes in '
                       'UTF8 alone), and texts hold any language',
                       current_setting('server_encoding')),
      HINT = format('make one with CREATE DATABASE ... ENCODING ''UTF8'' TEMPLATE template0 '
                    '(its locale one of UTF-8 or C) and install there; database %s is left '
                    'as it was', current_database());
  END IF;
END
$utf8_database$"""
"""The statement an install or upgrade runs after its lock: it stops, changing nothing, in a
database whose encoding is not UTF8 (LATIN1, SQL_ASCII, ...). An install there succeeded, then
every document's write failed ("Unicode normalization can only be performed if server encoding
is UTF8")."""


def expected_revision_sql(start: str | None) -> str:
    """The statement an offline script runs after the install lock: it stops, changing nothing,
    unless the database is at `start`, the revision the script was printed from (None: no
    schema yet). The version table alone would not stop it: the script's first CREATE would
    fail on an installed schema, and a later revision's UPDATE of that table matches no row
    on a database at another revision, after running DDL written for `start`."""
    table = f"{SCHEMA}.{VERSION_TABLE}"
    want = "NULL" if start is None else "'" + start.replace("'", "''") + "'"
    return f"""DO $expected_revision$
DECLARE
  want text := {want};
  have text;
BEGIN
  IF to_regclass('{table}') IS NOT NULL THEN
    EXECUTE 'SELECT string_agg(version_num, '','') FROM {table}' INTO have;
  END IF;
  IF have IS DISTINCT FROM want THEN
    RAISE EXCEPTION USING ERRCODE = 'PE007',
      MESSAGE = format('this script changes pyembed''s schema from %s, but this database is at '
                       '%s: nothing was changed', coalesce('revision ' || want, 'no schema'),
                       coalesce('revision ' || have, 'no schema')),
      HINT = CASE WHEN have IS NULL THEN 'print it with: pyembed install --sql'
                  ELSE format('print it with: pyembed install --sql --from %s', have) END;
  END IF;
END
$expected_revision$"""


def ddl_lock_wait_sql(*, offline: bool = False) -> str:
    """The statement that bounds every later lock wait of an install's transaction (after the
    install lock, which waits for the installer ahead of it): DDL_LOCK_WAIT seconds. Online,
    pyembed.schema tries a timed-out install again; the offline script says, in a comment above
    it, what the DBA applying it does instead."""
    statement = f"SET LOCAL lock_timeout = '{round(DDL_LOCK_WAIT * 1000)}ms'"
    if not offline:
        return statement
    return (f"-- Each lock a statement below needs is waited for at most {DDL_LOCK_WAIT:g} s, "
            "since every query on its\n"
            "-- table queues behind the waiting statement. If the script stops with \"ERROR:  "
            "canceling statement\n"
            "-- due to lock timeout\", nothing was changed (the script is one transaction): "
            "run it again once\n"
            "-- the sessions holding that table are done (pg_stat_activity shows them), or "
            "raise the wait here.\n"
            f"{statement}")


BLOCKERS_SQL = """SELECT a.pid, format('pid %%s (role %%s, application %%L, %%s since %%s)', a.pid,
       a.usename, a.application_name, a.state, date_trunc('second', a.state_change))
  FROM pg_catalog.pg_stat_activity a
 WHERE a.pid = ANY (pg_catalog.pg_blocking_pids(%s)) ORDER BY a.pid"""
"""The sessions an install's backend waits for (pid, one line naming each); psycopg's
placeholder is the one unescaped %s."""


class _LockWatcher(threading.Thread):
    """Names the sessions an install's connection waits for, from a second connection: once the
    DDL's lock wait has timed out, the server no longer says whom it waited for. It connects
    only if the install is still running after half a lock wait (a wait that times out lasts
    longer than that)."""

    def __init__(self, conninfo: str, pid: int) -> None:
        super().__init__(daemon=True)  # never holds the process up
        self.conninfo, self.pid = conninfo, pid
        self.holders: dict[int, str] = {}
        self.done = threading.Event()

    def run(self) -> None:
        import psycopg

        if self.done.wait(DDL_LOCK_WAIT / 2):
            return
        try:
            with psycopg.connect(self.conninfo, autocommit=True,
                                 application_name="pyembed install (lock watcher)") as conn:
                while True:
                    for pid, line in conn.execute(BLOCKERS_SQL, (self.pid,)).fetchall():
                        self.holders[pid] = line
                    if self.done.wait(min(0.2, DDL_LOCK_WAIT / 10)):
                        return
        except psycopg.Error:
            return  # the install's own error says what happened; holders stay unnamed

    def stop(self) -> None:
        self.done.set()
        self.join(5)


def _lock_timed_out(exc: BaseException) -> bool:
    """Whether an install failed on its bounded DDL lock wait (the install lock names its own
    holders and is not tried again)."""
    statement = str(getattr(exc, "statement", "") or "")
    return (getattr(getattr(exc, "orig", None), "sqlstate", None) == "55P03"
            and "$install_lock$" not in statement)


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


_ALEMBIC = threading.Lock()
"""Alembic's migration context is one object per process: one command at a time."""


def _run(dsn: str | None, step: Callable[[Config], None], what: str = "install") -> None:
    """Run an Alembic command in one transaction; a failure rolls back and names the cause.
    A lock its DDL waited DDL_LOCK_WAIT for: tried again, DDL_TRIES in all, then a failure that
    names the sessions holding the locks."""
    import psycopg
    import sqlalchemy as sa

    from .db import conninfo

    engine = sa.create_engine(sqlalchemy_url(dsn), poolclass=sa.pool.NullPool,
                              hide_parameters=True)
    holders: dict[int, str] = {}
    try:
        for attempt in range(1, DDL_TRIES + 1):
            watcher: _LockWatcher | None = None
            try:
                with _ALEMBIC, engine.begin() as conn:
                    raw = conn.connection.dbapi_connection
                    watcher = _LockWatcher(conninfo(raw), raw.info.backend_pid)  # type: ignore[arg-type,union-attr]
                    watcher.start()
                    cfg = alembic_config()
                    cfg.attributes["connection"] = conn
                    step(cfg)
                return
            except PyembedError as exc:
                # A PExxx of the install's own SQL (this database's encoding, PE013), raised as
                # its pyembed class by pyembed.orm's handler once an application imported it:
                # the same one line as without it.
                if not isinstance(exc.__cause__, psycopg.Error):
                    raise
                raise InstallError(f"{what} failed, nothing was changed: "
                                   f"{said(exc.__cause__)}") from exc.__cause__
            except sa.exc.DBAPIError as exc:
                if watcher is not None:
                    watcher.stop()
                    holders = watcher.holders or holders  # the last try's, if it saw them
                if not _lock_timed_out(exc):
                    raise InstallError(f"{what} failed, nothing was changed: {said(exc)}") \
                        from exc.orig
                if attempt == DDL_TRIES:
                    raise InstallError(
                        f"{what} failed, nothing was changed: {DDL_TRIES} tries each waited "
                        f"{DDL_LOCK_WAIT:g} s for a lock on a table it alters, held by "
                        f"{'; '.join(holders.values()) or 'sessions gone since'}; end them "
                        "(pg_terminate_backend) or install again when they are done") from exc.orig
            finally:
                if watcher is not None:
                    watcher.stop()
            time.sleep(DDL_PAUSE)  # the queries queued behind the DDL run meanwhile
    finally:
        engine.dispose()


def said(exc: BaseException) -> str:
    """What the server said of a failed statement, in one line, without its CONTEXT (the
    revision's DO block)."""
    orig = getattr(exc, "orig", exc)
    diag = getattr(orig, "diag", None)
    said = [diag.message_primary, diag.message_detail,
            diag.message_hint and f"(hint: {diag.message_hint})"] if diag else []
    return " ".join(" ".join(filter(None, said)).split()) if said and said[0] \
        else " ".join(str(orig).split())


def install(dsn: str | None = None) -> str:
    """Bring the database to head (idempotent, safe to run concurrently); returns the revision."""
    from alembic import command

    _run(dsn, lambda cfg: command.upgrade(cfg, "head"))
    return current_revision(dsn) or ""


def downgrade(dsn: str | None, revision: str = "base") -> None:
    from alembic import command

    _run(dsn, lambda cfg: command.downgrade(cfg, revision), "downgrade")


def current_revision(dsn: str | None = None) -> str | None:
    import sqlalchemy as sa
    from alembic.runtime.migration import MigrationContext

    engine = sa.create_engine(sqlalchemy_url(dsn), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"version_table": VERSION_TABLE, "version_table_schema": SCHEMA})
            return ctx.get_current_revision()
    finally:
        engine.dispose()


def offline_sql(start: str | None = None) -> str:
    """The upgrade-to-head script a DBA can review and apply with psql (no database needed), for
    a database at revision `start` (None: one without pyembed's schema); applied to a database
    at another revision it stops before changing anything (expected_revision_sql)."""
    from alembic import command
    from alembic.script import ScriptDirectory

    out = io.StringIO()
    cfg = alembic_config(output_buffer=out)
    # Exactly a revision's id: alembic's lookup also takes symbols and prefixes ('head', 'base',
    # '0034@head'), and fails on '' and 'heads' with an assertion, not a CommandError.
    if start is not None and start not in {
            script.revision for script in ScriptDirectory.from_config(cfg).walk_revisions()}:
        raise InvalidInput(f"--from {start!r} is not a pyembed schema revision: "
                           f"one of 0001..{head_revision()}")
    command.upgrade(cfg, "head" if start is None else f"{start}:head", sql=True)
    return out.getvalue()
