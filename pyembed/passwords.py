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


def set_password(conn: psycopg.Connection[Any], role: str, password: str) -> None:
    """Give login `role` the password `password`, sent as its verifier (password_clause)."""
    conn.execute(sql.SQL("ALTER ROLE {} {}").format(sql.Identifier(role),
                                                     password_clause(conn, role, password)))


def main(argv: list[str] | None = None) -> int:
    """`python -m pyembed.passwords ROLE`: set login ROLE's password, read as
    pyembed.secret_input reads every secret (a prompt that does not echo it, or standard input's
    first line), connecting with libpq's environment (PGHOST, PGUSER, PGDATABASE, ...) as a role
    that may alter ROLE. docker/initdb-docker.sh sets the stack's logins so: neither the password
    nor a statement holding it is in any process's arguments or any server log."""
    import sys

    from .errors import PyembedError
    from .secret_input import read_secret

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0] or args[0].startswith("-"):
        print("usage: python -m pyembed.passwords ROLE   (the password on standard input)",
              file=sys.stderr)
        return 2
    role = args[0]
    try:
        password = read_secret(f"{role}'s password")
        with psycopg.connect(autocommit=True) as conn:
            set_password(conn, role, password)
    except (psycopg.Error, PyembedError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"error: {role}'s password was not set: {first}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
