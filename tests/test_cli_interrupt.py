"""`pyembed ingest` interrupted (Ctrl-C, SIGTERM) while its provider is slow to answer: one line
saying so and what was kept, the shell's exit code for the signal (130, 143), no document
half-written, and a rerun that resumes. (`pyembed worker` on SIGTERM and SIGINT finishes its
batch and exits 0: test_worker.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import REPO, Database
from tests.fakeapi.server import FakeAPI
from tests.helpers import assert_ingest_resumes, count


@pytest.mark.parametrize(("stop", "code", "said"), [
    (signal.SIGINT, 130, "interrupted (Ctrl-C)"), (signal.SIGTERM, 143, "stopped by SIGTERM")])
def test_an_interrupted_ingest_says_what_it_kept_and_a_rerun_resumes(
        tmp_path: Path, db: Database, app: psycopg.Connection[Any], owner: psycopg.Connection[Any],
        fake_api: FakeAPI, stop: signal.Signals, code: int, said: str) -> None:
    app.execute("SELECT pyembed.create_corpus('paid', 'voyage/voyage-3@1:1024')")
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": f"text number {i}"}) + "\n"
                            for i in range(10)))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYEMBED_") and not k.endswith("_API_KEY")}
    env.update(fake_api.env(), PYEMBED_DSN=db.app_dsn, VOYAGE_API_KEY="pa-interrupt")
    command = [sys.executable, "-m", "pyembed", "ingest", "paid", str(path), "--batch-size", "2",
               "--quiet"]
    fake_api.script("ok", "ok", "slow=20")  # the third batch's answer is 20 s away
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while len(fake_api.requests_to("voyage")) < 3 and proc.poll() is None:
            assert time.monotonic() < deadline, "the third batch was not sent"
            time.sleep(0.05)
        time.sleep(0.3)  # (in the call, not between)
        proc.send_signal(stop)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, (proc.returncode, err, out, fake_api.requests)
    assert "Traceback" not in err, err
    (line,) = err.strip().splitlines()
    assert line == (f"error: {said}; ingest stopped with 4 documents kept (added 4, updated 0, "
                    "unchanged 0); running it again resumes: the documents kept are skipped as "
                    "unchanged"), line
    assert out == ""
    # Nothing half-written: each document kept has its chunks, each chunk its vector.
    assert count(owner, "documents") == 4
    assert owner.execute("SELECT count(*) FROM pyembed.chunks c WHERE NOT EXISTS (SELECT FROM "
                         "pyembed.vectors v WHERE v.chunk_id = c.chunk_id)").fetchone() == (0,)
    assert owner.execute("SELECT count(*) FROM pyembed.documents d WHERE NOT EXISTS (SELECT FROM "
                         "pyembed.chunks c WHERE c.corpus_id = d.corpus_id AND "
                         "c.document_id = d.document_id)").fetchone() == (0,)
    assert_ingest_resumes(command, env, fake_api)
