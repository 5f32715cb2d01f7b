"""A login's password as PostgreSQL stores it, computed by the client."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql


def password_clause(conn: psycopg.Connection[Any], role: str, password: str) -> sql.Composed:
    """`PASSWORD '<verifier>'` for CREATE or ALTER ROLE `role`: libpq's hash of `password` in
    the server's password_encryption (SCRAM-SHA-256 by default), as psql's \\password sends it.
    A role statement takes no bind parameter, and a failing one is logged with its text
    (log_min_error_statement) or whenever log_statement covers DDL: the password itself never
    reaches the server."""
    verifier = conn.pgconn.encrypt_password(password.encode("utf-8"), role.encode("utf-8"))
    return sql.SQL("PASSWORD {}").format(sql.Literal(verifier.decode("ascii")))
