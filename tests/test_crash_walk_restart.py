"""The crash walk (tests/crashwalk.py) with each long-running writer stopped mid-batch by the
server restarted (an immediate stop, then a start): nothing is left half-written and the same
command run again finishes the job."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyembed.localdb import LocalCluster
from tests.conftest import Database
from tests.crashwalk import WRITERS, Writer, walk


@pytest.mark.parametrize("writer", WRITERS, ids=[w.name for w in WRITERS])
def test_a_writer_restarted_mid_batch_leaves_nothing_half_done_and_its_rerun_finishes(
        writer: Writer, db: Database, cluster: LocalCluster, tmp_path: Path) -> None:
    walk(writer, "restart", db, cluster, tmp_path)
