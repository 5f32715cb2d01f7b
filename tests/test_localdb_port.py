"""The local cluster keeps its port across restarts, and says so when it must move.

A private cluster in /tmp (the `postgres` OS user must reach it), shared by these tests.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pyembed import localdb
from pyembed.errors import ConfigError
from pyembed.localdb import LocalCluster
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("own_clusters")  # it makes clusters (conftest)

LISTEN = 0x0A  # the TCP state number in /proc/net/tcp


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    home = Path(tempfile.mkdtemp(prefix="pyembed-port-", dir="/tmp"))
    home.chmod(0o755)  # the server's OS user must traverse it
    c = LocalCluster(home)
    c.init()
    yield c
    c.stop()
    shutil.rmtree(home, ignore_errors=True)


def closing_sockets(port: int) -> int:
    """TCP sockets on 127.0.0.1:port that are not listening (TIME_WAIT, FIN_WAIT, ...)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], int(line.split()[3], 16)
        if local == f"0100007F:{port:04X}" and state != LISTEN:
            count += 1
    return count


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def answers(c: LocalCluster) -> bool:
    with psycopg.connect(c.dsn(), connect_timeout=5) as conn:
        row = conn.execute("SELECT 1").fetchone()
    return row == (1,)


def connected(c: LocalCluster) -> psycopg.Connection[Any]:
    conn = psycopg.connect(c.dsn(), autocommit=True)
    conn.execute("SELECT 1")
    return conn


@contextmanager
def listening(port: int) -> Iterator[None]:
    """Another program listening on 127.0.0.1:port."""
    with socket.socket() as s:
        # The cluster's closing connections must not keep this program off the port either.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
        yield


def test_stop_then_start_keeps_the_port_while_old_connections_close(cluster: LocalCluster) -> None:
    cluster.start()
    port = cluster.state().port
    conn = connected(cluster)
    try:
        # The server closes this open connection first: its end lingers on the port.
        assert cluster.stop()
        assert closing_sockets(port) > 0
        assert cluster.start()
    finally:
        conn.close()
    assert cluster.state().port == port and cluster.port_move is None
    assert answers(cluster)


def test_start_after_kill_9_keeps_the_port(cluster: LocalCluster) -> None:
    cluster.start()
    port = cluster.state().port
    pid = int((cluster.data / "postmaster.pid").read_text().split()[0])
    conn = connected(cluster)
    try:
        os.kill(pid, signal.SIGKILL)
        # The backend of this connection exits once it notices, leaving its end on the port;
        # pg_ctl sees the server until the OS has reaped the killed process.
        wait_for(lambda: closing_sockets(port) > 0, "the orphaned backend to close")
        wait_for(lambda: not cluster.running(), "the killed postmaster to be reaped")
        assert (cluster.data / "postmaster.pid").exists()  # stale: the server replaces it
        assert cluster.start()
    finally:
        conn.close()
    assert cluster.state().port == port and cluster.port_move is None
    assert answers(cluster)


def test_a_listener_on_the_port_moves_the_cluster_and_says_so(
        cluster: LocalCluster, caplog: pytest.LogCaptureFixture) -> None:
    cluster.start()
    old_dsn = cluster.dsn()
    old = cluster.state().port
    cluster.stop()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYEMBED_")}
    env["PYEMBED_HOME"] = str(cluster.home)
    with listening(old):
        out = subprocess.run([sys.executable, "-m", "pyembed", "db", "start"], capture_output=True,
                             text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "started"
    new = cluster.state().port
    assert new != old
    assert (f"port {old} is taken by another program; the local cluster moved to {new}: "
            "DSNs handed out before must be renewed (pyembed db url)") in out.stderr.splitlines()
    assert cluster.dsn() == old_dsn.replace(f":{old}/", f":{new}/")
    assert answers(cluster)

    # The library says so too, and the configuration keeps one port line.
    cluster.stop()
    with listening(new), caplog.at_level(logging.WARNING, "pyembed.localdb"):
        assert cluster.start()
    assert cluster.port_move is not None and cluster.port_move.old == new
    assert cluster.state().port == cluster.port_move.new != new
    assert caplog.messages == [str(cluster.port_move)]
    conf = (cluster.data / "postgresql.auto.conf").read_text().splitlines()
    assert [line for line in conf if line.startswith("port")] == [f"port = {cluster.port_move.new}"]
    assert answers(cluster)


@pytest.fixture
def new_home() -> Iterator[Path]:
    home = Path(tempfile.mkdtemp(prefix="pyembed-init-", dir="/tmp"))
    home.chmod(0o755)  # the server's OS user must traverse it
    yield home
    LocalCluster(home)._discard()
    shutil.rmtree(home, ignore_errors=True)


def made_whole(c: LocalCluster) -> bool:
    """The cluster answers as the application's login, in pyembed's database."""
    with psycopg.connect(c.dsn(), connect_timeout=5) as conn:
        row = conn.execute("SELECT current_database(), current_user").fetchone()
    return row == (localdb.DATABASE, localdb.APP_USER)


def test_an_init_whose_port_is_taken_before_its_server_starts_is_made_on_the_next_port(
        new_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another program takes the port init chose before init's server starts on it: the server
    moves, and the database and roles are made on the port it moved to (they were sought on the
    other program's port, and init failed with a cluster half made)."""
    real = localdb._free_port
    taken = real()
    calls: list[int] = []

    def chosen_then_taken(start: int = 54330) -> int:
        calls.append(start)
        return taken if len(calls) == 1 else real(start)

    monkeypatch.setattr(localdb, "_free_port", chosen_then_taken)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", taken))
        s.listen()
        s.settimeout(0.2)
        stop = threading.Event()

        def hang_up() -> None:  # a program that is not PostgreSQL: it closes what it accepts
            while not stop.is_set():
                try:
                    s.accept()[0].close()
                except OSError:
                    pass

        t = threading.Thread(target=hang_up)
        t.start()
        try:
            c = LocalCluster(new_home)
            assert c.init()
        finally:
            stop.set()
            t.join()
    assert c.port_move is not None and c.port_move.old == taken
    assert c.state().port == c.port_move.new != taken
    assert made_whole(c)


def test_an_init_that_fails_part_way_leaves_nothing_and_the_next_makes_it_whole(
        new_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(self: LocalCluster, st: Any) -> None:
        raise ConfigError("the roles could not be made")

    with monkeypatch.context() as m:
        m.setattr(LocalCluster, "_create_roles", fails)
        with pytest.raises(ConfigError, match="roles could not be made"):
            LocalCluster(new_home).init()
    c = LocalCluster(new_home)
    assert not c.initialised and not c.running()
    assert c.init()  # before: "already exists", with no database and no roles
    assert made_whole(c)


def test_a_project_folder_copied_elsewhere_starts_with_its_socket_there(
        cluster: LocalCluster) -> None:
    """The socket's folder is written into the server's settings at initdb: a project folder
    moved or copied started with the old folder's socket (where that folder was gone, the start
    failed: 'could not create lock file ...'). Each start now puts it in the folder's own."""
    cluster.stop()
    copy = Path(tempfile.mkdtemp(prefix="pyembed-moved-", dir="/tmp")) / "project"
    copy.parent.chmod(0o755)  # the server's OS user must traverse it
    subprocess.run(["cp", "-a", str(cluster.home), str(copy)], check=True)
    moved = LocalCluster(copy)
    try:
        shutil.rmtree(cluster.socket_dir)  # the old folder's socket folder gone, as after a move
        assert moved.start()
        with psycopg.connect(moved.dsn(owner=True), autocommit=True) as conn:
            row = conn.execute("SHOW unix_socket_directories").fetchone()
        assert row == (str(moved.socket_dir),)
        assert (moved.socket_dir / f".s.PGSQL.{moved.state().port}").exists()
    finally:
        moved.stop()
        shutil.rmtree(copy.parent)
    assert cluster.start() and answers(cluster)
