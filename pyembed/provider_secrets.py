"""The owner's provider keys and base URLs for the in-database functions (pyembed.secrets),
stored so that the value reaches no server log."""

from __future__ import annotations

from typing import Any

import psycopg

from .dbcall import translated

QUIET = ("log_statement", "none"), ("log_min_duration_statement", "-1"), \
    ("log_min_error_statement", "panic"), ("log_parameter_max_length", "0"), \
    ("log_parameter_max_length_on_error", "0")
"""The settings under which the statement that stores a secret is logged neither with its
parameters nor at all, for the transaction, where the session may set them (a superuser, or a
role granted SET on them: PostgreSQL 15's has_parameter_privilege)."""


def set_secret(conn: psycopg.Connection[Any], name: str, value: str) -> list[str]:
    """Store `value` as secret `name` (pyembed.set_secret, the owner's): sent as a bind
    parameter, never in the statement's text, in a transaction of its own that first sets QUIET
    where it may. Returns the QUIET settings it could not set (a non-superuser owner), whose
    server configuration then decides what is logged."""
    with translated(), conn.transaction():
        allowed = conn.execute(
            "SELECT s, pg_catalog.has_parameter_privilege(s, 'SET') FROM unnest(%s::text[]) s",
            ([s for s, _ in QUIET],)).fetchall()
        may = {s for s, ok in allowed if ok}
        for setting, quiet in QUIET:
            if setting in may:
                conn.execute("SELECT pg_catalog.set_config(%s, %s, true)", (setting, quiet))
        conn.execute("SELECT pyembed.set_secret(%s, %s)", (name, value))
    return [s for s, _ in QUIET if s not in may]
