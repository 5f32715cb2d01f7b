"""Connections: which DSN to use, psycopg with pgvector registered, database errors mapped."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from pgvector.psycopg import register_vector

from . import errors
from .config import DSN_ENV, OWNER_DSN_ENV


def resolve_dsn(*, owner: bool = False) -> str:
    """$PYEMBED_DSN (or $PYEMBED_OWNER_DSN for the owner), else the local cluster's."""
    if owner and os.environ.get(OWNER_DSN_ENV):
        return os.environ[OWNER_DSN_ENV]
    if os.environ.get(DSN_ENV):
        return os.environ[DSN_ENV]
    from .localdb import LocalCluster

    return LocalCluster().dsn(owner=owner)


def connect(dsn: str | None = None, *, owner: bool = False, **kwargs: Any) -> psycopg.Connection[Any]:
    """A psycopg connection with the vector types registered (if the extension exists)."""
    conn = psycopg.connect(dsn or resolve_dsn(owner=owner), **kwargs)
    try:
        register_vector(conn)
    except psycopg.ProgrammingError:
        pass  # extension not installed yet: `pyembed install` creates it
    return conn


def translate(exc: psycopg.Error) -> Exception:
    """Our error class for a database error raised by pyembed's SQL, else the error itself."""
    diag = exc.diag
    message = diag.message_primary or str(exc)
    if diag.message_hint:
        message += f" (hint: {diag.message_hint})"
    return errors.from_sqlstate(exc.sqlstate, message) or exc


@contextmanager
def translated() -> Iterator[None]:
    """Re-raise database errors with a pyembed SQLSTATE as pyembed errors."""
    try:
        yield
    except psycopg.Error as exc:
        mapped = translate(exc)
        if mapped is exc:
            raise
        raise mapped from exc
