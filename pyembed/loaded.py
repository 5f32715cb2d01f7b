"""Which pyembed code a server backend loaded, for `pyembed doctor`: a backend keeps the modules
it imported until it ends, so one that imported pyembed before another install runs the older
code, which a fresh backend's probe (pyembed.version(), code_digest()) cannot see. At its first
import of pyembed (the package's __init__, whichever module a PL/Python body imports) a backend
takes a shared advisory lock (LOCK_CLASS, config.code_stamp()), which nobody waits for and which
ends with the session; pg_locks then shows each backend's stamp beside its pid. The lock is
taken through SPI, which a parallel operation refuses: no PL/Python function is parallel safe."""

from __future__ import annotations

import sys
from typing import Any

from .config import code_stamp

LOCK_CLASS = 1887004003
"""The lock keys' first half: 'pyec' read as an integer (the second is the code's stamp)."""

__all__ = ["LOCK_CLASS", "announce"]


def announce() -> None:
    """Take this backend's lock for the code it loaded, once, when run inside PL/Python (plpy
    is a module of the server's interpreter there); never waits, never fails the import."""
    plpy: Any = sys.modules.get("plpy")
    if not hasattr(plpy, "prepare"):  # a client process (or a test's stand-in for plpy)
        return
    try:
        plan = plpy.prepare("SELECT pg_catalog.pg_try_advisory_lock_shared($1, $2)",
                            ["integer", "integer"])
        plpy.execute(plan, [LOCK_CLASS, code_stamp()])
    except Exception:  # the report is doctor's: the import goes on
        return
