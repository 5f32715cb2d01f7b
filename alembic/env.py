"""Alembic environment for pyembed: online (a connection passed in or a DSN) and offline (--sql)."""

from __future__ import annotations

from alembic import context
from alembic.util import CommandError
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from pyembed.schema import (
    SCHEMA,
    UTF8_DATABASE_SQL,
    VERSION_TABLE,
    ddl_lock_wait_sql,
    expected_revision_sql,
    head_revision,
    install_lock_sql,
    raw_text,
    replaceable_sql,
    said,
    sqlalchemy_url,
)

config = context.config


def _destination() -> object:
    """The revision the command moves to; none for one that only reads (`alembic current`)."""
    try:
        return context.get_revision_argument()
    except KeyError:
        return None


def _migrate() -> None:
    with context.begin_transaction():
        # One installer at a time: a second concurrent run waits, then finds the schema at head;
        # no lock another role can take makes it wait for ever (pyembed.schema.install_lock_sql).
        context.execute(raw_text(install_lock_sql()))
        # The revisions and sql/ write backslashes as standard SQL reads them; a role's or a
        # database's standard_conforming_strings off made '\u00a0' an invalid byte here.
        context.execute(raw_text("SET LOCAL standard_conforming_strings = on"))
        context.execute(raw_text(UTF8_DATABASE_SQL))
        offline = context.is_offline_mode()
        if offline:
            # A script printed for one revision, applied to a database at another, stops here.
            context.execute(raw_text(expected_revision_sql(context.get_starting_revision_argument())))
        # Every query on a table queues behind DDL waiting for its lock: a bounded wait, which
        # pyembed.schema tries again online, and the DBA applying the offline script reruns.
        context.execute(raw_text(ddl_lock_wait_sql(offline=offline)))
        context.execute(raw_text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
        context.run_migrations()
        if _destination() in ("head", "heads", head_revision()):
            # Replaceable objects (functions, triggers, views, grants, built-in models).
            context.execute(raw_text(replaceable_sql()))


def run_offline() -> None:
    """Print the SQL script a DBA can review and apply with psql."""
    context.configure(
        url="postgresql+psycopg://",
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        version_table=VERSION_TABLE,
        version_table_schema=SCHEMA,
    )
    _migrate()


def _run_on(connection: Connection) -> None:
    context.configure(connection=connection, version_table=VERSION_TABLE,
                      version_table_schema=SCHEMA)
    _migrate()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    # Run from the repo (`alembic upgrade head`), the config is pyproject.toml's, with no ini
    # section to read a URL from: the owner's DSN as every pyembed command finds it.
    ini = config.config_ini_section
    url = (config.file_config.get(ini, "sqlalchemy.url")
           if config.file_config.has_option(ini, "sqlalchemy.url") else None)
    engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            _run_on(conn)
    except DBAPIError as exc:
        # Alembic's command line prints a CommandError as one FAILED line, anything else as a
        # traceback; the transaction has rolled back.
        raise CommandError(f"{_destination() or 'the command'}: failed, nothing was changed: "
                           f"{said(exc)}") from None


if context.is_offline_mode():
    run_offline()
else:
    run_online()
