"""The crash walk (tests/crashwalk.py) with each long-running writer stopped mid-batch by its
server backends ended by pg_terminate_backend: nothing is left half-written and the same command
run again finishes the job."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyembed.localdb import LocalCluster
from tests.conftest import Database
from tests.crashwalk import WRITERS, Writer, walk


@pytest.mark.parametrize("writer", WRITERS, ids=[w.name for w in WRITERS])
def test_a_writer_cut_off_mid_batch_leaves_nothing_half_done_and_its_rerun_finishes(
        writer: Writer, db: Database, cluster: LocalCluster, tmp_path: Path) -> None:
    walk(writer, "terminate", db, cluster, tmp_path)
