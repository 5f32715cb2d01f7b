"""A secret (a provider key, a login's password) read from a prompt that does not echo it, or
from standard input: never from the command line, whose arguments `ps` shows every user of the
machine and the shell's history keeps; and the warning for a --dsn there that holds one."""

from __future__ import annotations

import getpass
import sys

import psycopg
import typer
from psycopg.conninfo import conninfo_to_dict

from .errors import InvalidInput


def read_secret(what: str) -> str:
    """`what`'s value: typed at a prompt that does not echo it when standard input is a
    terminal, else standard input's first line (its line end dropped). InvalidInput when it is
    empty: nothing is stored."""
    if sys.stdin is not None and sys.stdin.isatty():
        value = getpass.getpass(f"{what}: ")
    else:
        value = (sys.stdin.readline() if sys.stdin is not None else "").rstrip("\r\n")
    if not value:
        raise InvalidInput(f"no value for {what} on standard input: nothing stored")
    return value


def warn_of_password_in_argv(ctx: typer.Context, param: typer.CallbackParam,
                             value: str | None) -> str | None:
    """A --dsn option's callback: a warning on stderr when the DSN given on the command line
    (not from its environment variable) holds a password, naming where it belongs; the value
    as given. A warning, not a refusal: a DSN is libpq's, and a script may hold one on purpose."""
    source = ctx.get_parameter_source(param.name) if param.name else None
    if not value or source is None or source.name != "COMMANDLINE":  # (typer's own click's)
        return value
    try:
        has_password = bool(conninfo_to_dict(value).get("password"))
    except psycopg.Error:  # (not a DSN: connecting says so, in its own words)
        return value
    if has_password:
        names = param.envvar if isinstance(param.envvar, list | tuple) else [param.envvar]
        where = " or ".join(str(n) for n in names if n)
        print(f"warning: the --dsn given holds a password, which ps shows every user of this "
              f"machine and the shell's history keeps: set {where or 'the DSN'} instead, or "
              "keep the password in ~/.pgpass (libpq reads it)", file=sys.stderr, flush=True)
    return value
