"""The `pyembed` command's entry point (and `python -m pyembed`'s): Ctrl-C and SIGTERM are
answered from the process's start, in the words and exit codes of a running command, while the
command line's modules are imported (about a second: typer, rich, psycopg, numpy), when the
default answers were a KeyboardInterrupt traceback and an exit with no word."""

from __future__ import annotations

import os
import signal
from typing import Any

SAID = {signal.SIGINT: "interrupted (Ctrl-C)", signal.SIGTERM: "stopped by SIGTERM"}


def _stopped_early(signum: int, frame: Any) -> None:
    # Nothing has been done yet: nothing to roll back, so the process ends here (an exception
    # raised inside the import machinery would be a traceback again).
    os.write(2, f"error: {SAID[signal.Signals(signum)]}\n".encode())
    os._exit(128 + signum)


def main() -> Any:
    """Run `pyembed` with sys.argv, once its modules are imported (pyembed.cli.main)."""
    for signum in SAID:
        signal.signal(signum, _stopped_early)
    from .cli import main as cli_main  # (which sets its own handlers for the command's run)

    return cli_main()
