"""The local cluster works from a folder its OS user cannot traverse (issue 23 item 7): as root,
in a home folder of mode 0700, the data goes to a private folder of the `postgres` OS user and
the user's folder keeps its mode."""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import pyembed as pyembed_pkg
from pyembed.localdb import LocalCluster
from tests.test_cli import pyembed

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="the server runs as another OS user "
                                 "only when pyembed runs as root"),
              pytest.mark.usefixtures("own_clusters")]  # it makes clusters (conftest)


@pytest.fixture
def private_home() -> Iterator[Path]:
    top = Path("/tmp") / f"pyembed-home-{uuid.uuid4().hex[:8]}"
    top.mkdir(mode=0o700)
    top.chmod(0o700)
    home = top / "home"
    home.mkdir(mode=0o700)
    home.chmod(0o700)
    cluster = home / ".pyembed"
    yield cluster
    c = LocalCluster(cluster)
    place = c.server_dir
    try:
        c.stop()
    finally:
        if c.relocated:
            shutil.rmtree(place, ignore_errors=True)
        shutil.rmtree(top, ignore_errors=True)


def test_a_cluster_in_a_0700_folder_lives_where_postgres_can_reach_it(
        private_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    top = private_home.parent.parent
    # The checkout is in the private folder too: PL/Python gets a copy of the package.
    source = top / "home" / "clone" / "pyembed"
    shutil.copytree(Path(pyembed_pkg.__file__).parent, source,
                    ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr("pyembed.localdb.package_dir", lambda: source)
    c = LocalCluster(private_home)
    assert c.init() is True  # the old code: "the OS user postgres cannot reach .../data"
    assert c.relocated and not str(c.data).startswith(str(top))
    place = c.server_dir
    assert stat.S_IMODE(place.stat().st_mode) == 0o700
    with psycopg.connect(c.dsn(), connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)

    # Every later command finds the data through cluster.json in $PYEMBED_HOME.
    env = {"PYEMBED_HOME": str(private_home)}
    status = pyembed("db", "status", env=env)
    assert status.returncode == 0, status.stderr
    assert f"data: {place / 'data'}" in status.stdout and "running: True" in status.stdout
    assert pyembed("db", "stop", env=env).stdout.strip() == "stopped"
    again = LocalCluster(private_home)
    assert again.data == c.data and not again.running()
    assert again.start() is True
    installed = pyembed("install", env=env)  # PL/Python functions and all
    assert installed.returncode == 0, installed.stderr
    with psycopg.connect(again.dsn(), connect_timeout=10) as conn:  # PL/Python imports pyembed
        row = conn.execute("SELECT vector_dims(pyembed.embed('x', 'fake/fake-hash@1:384'))"
                           ).fetchone()
        assert row == (384,)
    copy = again.pylib / "pyembed"
    assert not copy.is_symlink() and (copy / "indb.py").read_text() == (source / "indb.py").read_text()
    assert again.stop() is True

    # The user's folders are as they were.
    assert stat.S_IMODE(top.stat().st_mode) == 0o700
    assert stat.S_IMODE(private_home.parent.stat().st_mode) == 0o700


def test_a_reachable_folder_keeps_its_data_in_place(tmp_path: Path) -> None:
    # Without a cluster, only where it would go is checked: a folder postgres can traverse.
    home = Path("/tmp") / f"pyembed-open-{uuid.uuid4().hex[:8]}"
    try:
        home.mkdir(mode=0o755)
        home.chmod(0o755)
        c = LocalCluster(home)
        assert c._choose_place(c._os_user()) == home
        assert c.data == home / "data" and not c.relocated
    finally:
        shutil.rmtree(home, ignore_errors=True)
