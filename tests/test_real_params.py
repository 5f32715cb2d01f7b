"""A real-number parameter (a wait, a bound, a gate) is checked whole before anything runs:
NaN, infinity and a value out of its range are refused naming the parameter. Before, checks
written as `value < low` let NaN through (every comparison with it is false), and some numbers
were not checked at all: `migrate validate --max-drop nan` embedded every evaluation query and
then failed with "a value PostgreSQL cannot store", and `--max-drop -1` recorded a failed
validation, which took back the traffic the migration had already shifted."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import pyembed
from pyembed import health, migration
from pyembed.db import connect
from pyembed.embedder import Embedder
from pyembed.errors import ConfigError, InvalidInput
from pyembed.evaluation import add_eval_query
from pyembed.ingest import ingest
from pyembed.models import registry
from pyembed.rerank import Reranker, reranker_spec
from pyembed.worker import Worker
from tests.conftest import Database
from tests.helpers import run_cli
from tests.test_cli import db_env

FAKE = "fake/fake-hash@1:384"
TARGET = "fake/fake-hash@2:1024"
NAN, INF = math.nan, math.inf


@pytest.fixture
def shifting(db: Database) -> Database:
    """Corpus docs migrating to TARGET, validated and serving 10% from it."""
    with pyembed.connect(db.app_dsn) as app, pyembed.connect(db.owner_dsn) as owner:
        app.create_corpus("docs", FAKE).add([("a", "alpha text"), ("b", "beta words")])
        add_eval_query(owner, "docs", "q1", "alpha", ["a"])
        migration.start(owner, "docs", TARGET)
        migration.backfill(owner, "docs")
        assert migration.validate(owner, "docs", force=True).passed  # on one query
        migration.shift(owner, "docs", 10)
    return db


def step_and_share(db: Database) -> tuple[Any, ...]:
    with connect(db.owner_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT migration_step, traffic_share FROM pyembed.corpora "
                           "WHERE name = 'docs'").fetchone()
        events = conn.execute("SELECT count(*) FROM pyembed.migration_events").fetchone()
    assert row is not None and events is not None
    return (*row, events[0])


@pytest.mark.parametrize("max_drop", [NAN, INF, -INF, -1.0, -0.01, 1.5, "0.1", True])
def test_a_bad_max_drop_is_refused_before_validation_and_changes_nothing(
        shifting: Database, max_drop: Any) -> None:
    before = step_and_share(shifting)
    with pyembed.connect(shifting.owner_dsn) as owner, \
            pytest.raises(InvalidInput, match=r"^max_drop must be 0\.\.1, got "):
        migration.validate(owner, "docs", max_drop=max_drop)
    assert step_and_share(shifting) == before == ("shifting", 10, before[2])


@pytest.mark.parametrize(("k", "message"), [
    (0, "k must be 1..333, got 0"), (334, "k must be 1..333, got 334"),
    (2.5, "k must be a whole number, not 2.5")])
def test_validates_k_is_checked_in_its_own_words(shifting: Database, k: Any,
                                                 message: str) -> None:
    """k * 3 hits are searched: k=2.5 was reported as "not 7.5", k=334 as "got 1002"."""
    before = step_and_share(shifting)
    with pyembed.connect(shifting.owner_dsn) as owner, pytest.raises(InvalidInput) as info:
        migration.validate(owner, "docs", k=k)
    assert str(info.value) == message
    assert step_and_share(shifting) == before


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "2"])
def test_the_cli_says_one_line_of_a_bad_max_drop_and_keeps_the_shift(shifting: Database,
                                                                      value: str) -> None:
    before = step_and_share(shifting)
    out = run_cli("migrate", "validate", "docs", "--max-drop", value, env=db_env(shifting))
    assert out.returncode == 1 and out.stdout == "", out
    assert out.stderr.startswith("error: max_drop must be 0..1, got ") and \
        out.stderr.count("\n") == 1, out.stderr
    assert step_and_share(shifting) == before


BAD = [NAN, INF, -INF, -1.0]


def entry_points(db: Database, tmp_path: Path) -> dict[str, Callable[[float], object]]:
    """Each Python entry point that takes a real number, by the name its error gives."""
    spec = registry.get(FAKE)
    (tmp_path / "a.txt").write_text("alpha text\n")

    def ingest_with(seconds: float) -> object:
        with pyembed.connect(db.app_dsn) as app:
            corpus = app.create_corpus("docs", FAKE, exist_ok=True)
            return ingest(corpus, tmp_path, progress=False, progress_every=seconds)

    def report(alert: float) -> object:
        with connect(db.app_dsn, autocommit=True) as conn:
            return health.report(conn, recall_alert=alert)

    return {
        "progress_every": ingest_with,
        "lease_seconds": lambda s: Worker(db.app_dsn, lease_seconds=s).close(),
        "retry_base": lambda s: Worker(db.app_dsn, retry_base=s).close(),
        "retry_max": lambda s: Worker(db.app_dsn, retry_max=s).close(),
        "recall_every": lambda s: Worker(db.app_dsn, recall_every=s).close(),
        "max_retry_after": lambda s: Embedder(spec, max_retry_after=s),
        "max_retry_after ": lambda s: Reranker(reranker_spec("fake"), max_retry_after=s),
        "recall_alert": report,
    }


@pytest.mark.parametrize("value", [*BAD, 2.0], ids=repr)
@pytest.mark.parametrize("name", ["progress_every", "lease_seconds", "retry_base", "retry_max",
                                  "recall_every", "max_retry_after", "max_retry_after ",
                                  "recall_alert"])
def test_nan_infinity_and_out_of_range_are_refused_naming_the_parameter(
        db: Database, tmp_path: Path, name: str, value: float) -> None:
    call = entry_points(db, tmp_path)[name]
    bounded = name == "recall_alert"  # 0..1; the others have no upper bound but infinity
    if value == 2.0 and not bounded:
        call(value)  # in range
        return
    error = ConfigError if name.startswith("max_retry_after") else InvalidInput
    with pytest.raises(error) as info:
        call(value)
    assert str(info.value).startswith(f"{name.strip()} must be "), str(info.value)
    assert type(info.value) is error
