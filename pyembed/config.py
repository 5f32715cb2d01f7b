"""Where pyembed keeps its state and which database it talks to."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

DSN_ENV = "PYEMBED_DSN"
OWNER_DSN_ENV = "PYEMBED_OWNER_DSN"
WORKER_DSN_ENV = "PYEMBED_WORKER_DSN"
READ_DSN_ENV = "PYEMBED_READ_DSN"
HOME_ENV = "PYEMBED_HOME"
SERVER_ROOT_ENV = "PYEMBED_SERVER_ROOT"


def home() -> Path:
    """The project folder of the embedded default: $PYEMBED_HOME, else ./.pyembed."""
    value = os.environ.get(HOME_ENV)
    return Path(value).expanduser().resolve() if value else Path.cwd().resolve() / ".pyembed"


def server_root() -> Path:
    """Where a local cluster's data goes when the server's OS user cannot traverse
    $PYEMBED_HOME (a home folder of mode 0700, root's home): $PYEMBED_SERVER_ROOT, else
    /var/lib/pyembed, one private folder per project under it."""
    return Path(os.environ.get(SERVER_ROOT_ENV) or "/var/lib/pyembed")


def package_dir() -> Path:
    return Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """sql/ or alembic/: beside the package in a checkout, inside it when installed."""
    installed = package_dir() / f"_{name}"
    return installed if installed.is_dir() else package_dir().parent / name


@functools.cache
def code_digest() -> str:
    """sha256 of the package: each file's path in the package and its bytes, its Python code
    and the data its code reads (pyembed/data: the local model's tokenizer, whose counts cut
    chunks in the server too). `pyembed doctor` compares the client's with the server's, which
    a version string alone does not tell apart; computed when asked (a doctor run), not at
    import. Left out: Python's compiled copies (__pycache__) and the resource folders an
    install puts inside the package (_sql, _alembic: beside it in a checkout), which the
    schema's own digest covers."""
    root = package_dir()
    digest = hashlib.sha256()
    for path in package_files():
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            digest.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def package_files() -> list[Path]:
    """The files of the package that code_digest covers, sorted (see there what is left out)."""
    files = []
    for folder, dirs, names in os.walk(package_dir()):
        dirs[:] = [d for d in dirs if not d.startswith("_")]  # not walked at all: code_stamp's cost
        files += [Path(folder, name) for name in names]
    return sorted(files)


def code_stamp() -> int:
    """The package's files as they are now, by path, size and modification time, as a signed
    32-bit number (an advisory lock key: pyembed.loaded). Cheap enough for a backend's first
    import, unlike code_digest, which reads every byte; another install changes it."""
    root = package_dir()
    digest = hashlib.sha256()
    for path in package_files():
        st = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\0"
                      .encode())
    return int.from_bytes(digest.digest()[:4], "big", signed=True)
