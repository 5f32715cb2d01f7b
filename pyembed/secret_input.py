"""A secret (a provider key, a login's password) read from a prompt that does not echo it, or
from standard input: never from the command line, whose arguments `ps` shows every user of the
machine and the shell's history keeps."""

from __future__ import annotations

import getpass
import sys

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
