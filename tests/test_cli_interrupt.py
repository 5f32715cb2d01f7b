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
import textwrap
import time
import tomllib
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


@pytest.mark.parametrize(("stop", "code", "said"), [
    (signal.SIGINT, 130, "interrupted (Ctrl-C)"), (signal.SIGTERM, 143, "stopped by SIGTERM")])
def test_a_command_stopped_while_it_starts_says_so_in_one_line(
        tmp_path: Path, stop: signal.Signals, code: int, said: str) -> None:
    """Ctrl-C or SIGTERM while the command's modules are still being imported (about a second
    at each start; held here by a finder that waits on pyembed.cli): the same one line and exit
    code as a running command's. Before, the `pyembed` script's entry point was pyembed.cli's
    main, whose import came first: Ctrl-C then was a KeyboardInterrupt traceback, SIGTERM an
    exit with no word (found from outside, outside19: `pyembed corpus list` stopped 0.8 s in)."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["pyembed"].partition(":")
    program = textwrap.dedent(f"""
        import importlib, importlib.abc, sys, time

        class Slow(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "pyembed.cli":
                    print("importing", flush=True)
                    time.sleep(60)
                return None

        sys.meta_path.insert(0, Slow())
        sys.argv = ["pyembed", "corpus", "list"]
        sys.exit(getattr(importlib.import_module({module!r}), {function!r})())
        """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYEMBED_")}
    env["PYEMBED_HOME"] = str(tmp_path / "home")
    proc = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "importing\n"
        proc.send_signal(stop)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert (proc.returncode, err, out) == (code, f"error: {said}\n", "")
