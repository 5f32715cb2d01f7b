"""Where pyembed keeps its state and which database it talks to."""

from __future__ import annotations

import os
from pathlib import Path

DSN_ENV = "PYEMBED_DSN"
OWNER_DSN_ENV = "PYEMBED_OWNER_DSN"
READ_DSN_ENV = "PYEMBED_READ_DSN"
HOME_ENV = "PYEMBED_HOME"


def home() -> Path:
    """The project folder of the embedded default: $PYEMBED_HOME, else ./.pyembed."""
    value = os.environ.get(HOME_ENV)
    return Path(value).expanduser().resolve() if value else Path.cwd().resolve() / ".pyembed"


def package_dir() -> Path:
    return Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """sql/ or alembic/: beside the package in a checkout, inside it when installed."""
    installed = package_dir() / f"_{name}"
    return installed if installed.is_dir() else package_dir().parent / name
