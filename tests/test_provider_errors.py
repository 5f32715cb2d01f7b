"""Failed provider calls are counted by provider and kind, through the real SDKs against the
fake API server: inside the database, where the failure aborts the transaction that made the
call, and from Python; retried failures count one each."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

import pyembed
from pyembed.db import connect
from pyembed.embedder import Embedder
from pyembed.errors import ERROR_KINDS
from pyembed.localdb import APP_USER
from pyembed.models import API_KEY_ENV, registry
from pyembed.providers import provider_for
from pyembed.tenants import provider_errors
from pyembed.worker import Worker
from tests.conftest import Database
from tests.fakeapi import FakeAPI
from tests.helpers import login_role, sql_error
from tests.test_cli_json import cli

VOYAGE = registry.get("voyage/voyage-3@1:1024")
OPENAI = registry.get("openai/text-embedding-3-small@1:1536")
COHERE = next(s for s in registry.all() if s.provider == "cohere")


def counts(db: Database) -> dict[tuple[str, str], int]:
    with connect(db.app_dsn, autocommit=True) as conn:
        return {(e.provider, e.kind): e.errors for e in provider_errors(conn)}


def added(before: dict[tuple[str, str], int], after: dict[tuple[str, str], int]
          ) -> dict[tuple[str, str], int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


@pytest.fixture
def app_via_fake_voyage(db: Database, fake_api: FakeAPI) -> Iterator[psycopg.Connection[Any]]:
    """An application-role session whose database reaches Voyage at the fake API server."""
    with connect(db.owner_dsn, autocommit=True) as conn:
        conn.execute("SELECT pyembed.set_secret('VOYAGE_API_KEY', 'pa-errors-1')")
        conn.execute("SELECT pyembed.set_secret('PYEMBED_VOYAGE_BASE_URL', %s)",
                     (fake_api.base_url("voyage"),))
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(APP_USER)))
        yield conn


def test_every_provider_has_a_counter_for_every_kind(db: Database) -> None:
    have = counts(db)
    providers = {p for p, _ in have}
    assert {"voyage", "openai", "cohere", "local", "fake"} <= providers
    assert set(have) == {(p, k) for p in providers for k in ERROR_KINDS}


def test_failures_inside_the_database_are_counted_though_their_transaction_rolls_back(
        db: Database, app_via_fake_voyage: psycopg.Connection[Any], fake_api: FakeAPI) -> None:
    conn = app_via_fake_voyage
    conn.execute("SET pyembed.http_retries = 2")
    before = counts(db)
    # Three 429s: the call and both retries fail, and the statement with them.
    fake_api.script("429:retry-after=0", "429:retry-after=0", "429:retry-after=0")
    err = sql_error(conn, "SELECT pyembed.embed('throttled', %s)", (VOYAGE.key,))
    assert err.sqlstate == "PE010" and "429" in str(err), str(err)
    assert added(before, counts(db)) == {("voyage", "rate_limited"): 3}

    # Inside a transaction that rolls back, a retried 500 and the answer after it.
    before = counts(db)
    with conn.transaction(force_rollback=True):
        fake_api.script("500")
        conn.execute("SELECT pyembed.embed('flaky', %s)", (VOYAGE.key,))
    assert added(before, counts(db)) == {("voyage", "server_error"): 1}

    before = counts(db)
    fake_api.script("401")
    assert sql_error(conn, "SELECT pyembed.embed('refused', %s)", (VOYAGE.key,)).sqlstate == "PE009"
    fake_api.script("short")
    assert sql_error(conn, "SELECT pyembed.embed_batch(ARRAY['a', 'b'], %s)",
                     (VOYAGE.key,)).sqlstate == "PE009"
    assert added(before, counts(db)) == {("voyage", "rejected"): 1, ("voyage", "bad_answer"): 1}


@pytest.mark.parametrize("key", [VOYAGE.key, OPENAI.key, COHERE.key])
def test_a_429_after_the_retries_is_rate_limited_for_every_embedding_service(
        key: str, fake_api: FakeAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    """An embedding service still answering 429 when the retries were used up was
    ProviderError (PE009), while Claude's 429 was RateLimited (PE010): one class now, with
    kind rate_limited (test_rerank and test_rag check the rerank services and Claude's)."""
    spec = registry.get(key)
    monkeypatch.setenv(API_KEY_ENV[spec.provider], "pa-errors-429")
    fake_api.script(["429:retry-after=0"] * 2)
    embedder = Embedder(spec, provider_for(spec), max_retries=1, sleep=lambda s: None)
    with pytest.raises(pyembed.RateLimited, match="gave up after 2 attempts") as info:
        embedder.embed(["throttled"])
    assert info.value.kind == "rate_limited" and info.value.sqlstate == "PE010"
    fake_api.script("500", "500")
    with pytest.raises(pyembed.ProviderError) as other:
        embedder.embed(["failing"])
    assert not isinstance(other.value, pyembed.RateLimited) and other.value.kind == "server_error"


def test_a_timeout_is_counted_as_no_response(
        db: Database, app_via_fake_voyage: psycopg.Connection[Any], fake_api: FakeAPI) -> None:
    conn = app_via_fake_voyage
    conn.execute("SET pyembed.http_timeout = 1")
    conn.execute("SET pyembed.http_retries = 0")
    before = counts(db)
    fake_api.script("hang")
    assert sql_error(conn, "SELECT pyembed.embed('hangs', %s)", (VOYAGE.key,)).sqlstate == "PE009"
    assert added(before, counts(db)) == {("voyage", "no_response"): 1}


@pytest.fixture
def worker_dsn(db: Database, owner: psycopg.Connection[Any]) -> Iterator[str]:
    """A login as `pyembed worker` runs: an application role that is in pyembed_worker too."""
    with login_role(owner, db.app_dsn, "worker",
                    sql.SQL("IN ROLE pyembed_app, pyembed_worker")) as dsn:
        yield dsn


def test_failures_of_a_workers_calls_are_counted(db: Database, fake_api: FakeAPI,
                                                 worker_dsn: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-errors-2")
    before = counts(db)
    with pyembed.connect(worker_dsn) as client:
        fake_api.script("503", "429:retry-after=0")
        embedder = client.embedder(OPENAI.key)
        embedder._sleep = lambda seconds: None
        assert embedder.embed(["recovers"]).shape == (1, OPENAI.dimensions)
        fake_api.script("400")
        with pytest.raises(pyembed.ProviderError) as info:
            embedder.embed(["refused"])
        assert info.value.kind == "rejected"
    assert added(before, counts(db)) == {("openai", "server_error"): 1,
                                         ("openai", "rate_limited"): 1,
                                         ("openai", "rejected"): 1}


def test_an_application_roles_own_failed_calls_are_not_counted(
        db: Database, fake_api: FakeAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client's calls use its own API keys: a tenant's failures are its own, and the counters
    every tenant and the metrics endpoint read are not its to add to. Its provider error is
    raised as before, and its transaction goes on."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-errors-4")
    before = counts(db)
    with pyembed.connect(db.app_dsn) as client, client.conn.transaction():
        embedder = client.embedder(OPENAI.key)
        embedder._sleep = lambda seconds: None
        fake_api.script("503", "400")
        with pytest.raises(pyembed.ProviderError) as info:
            embedder.embed(["refused"])
        assert info.value.kind == "rejected"
        assert client.conn.execute("SELECT 1").fetchone() == (1,)
    assert counts(db) == before


def test_the_app_role_reaches_the_counters_only_through_their_functions(
        db: Database, app: psycopg.Connection[Any], worker_dsn: str) -> None:
    counter = one_counter(db)
    for statement in (sql.SQL("SELECT nextval({})").format(sql.Literal(counter)),
                      sql.SQL("SELECT * FROM {}").format(sql.Identifier(*counter.split(".")))):
        assert sql_error(app, statement).sqlstate == "42501"
    # Nor the counting function: any tenant could have added any count to every tenant's.
    before = counts(db)
    for _ in range(3):
        err = sql_error(app, "SELECT pyembed.count_provider_error('voyage', 'rate_limited')")
        assert isinstance(err, psycopg.errors.InsufficientPrivilege), err
    assert counts(db) == before
    # The worker's counting takes known kinds only, and ignores others (never raises).
    with connect(worker_dsn, autocommit=True) as worker:
        worker.execute("SELECT pyembed.count_provider_error('voyage', 'no such kind')")
        worker.execute("SELECT pyembed.count_provider_error('no such provider', 'rate_limited')")
        assert counts(db) == before
        worker.execute("SELECT pyembed.count_provider_error('voyage', 'rate_limited')")
    assert added(before, counts(db)) == {("voyage", "rate_limited"): 1}


def one_counter(db: Database) -> str:
    with connect(db.owner_dsn, autocommit=True) as owner:
        row = owner.execute("SELECT counter::text FROM pyembed.provider_error_counters "
                            "LIMIT 1").fetchone()
    assert row is not None
    return str(row[0])


def test_pyembed_usage_lists_the_failed_calls(db: Database, fake_api: FakeAPI, worker_dsn: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-errors-3")
    with pyembed.connect(worker_dsn) as client:
        embedder = client.embedder(OPENAI.key)
        embedder._sleep = lambda seconds: None
        fake_api.script("429:retry-after=0")
        embedder.embed(["throttled once"])
    listed = json.loads(cli(db, "usage", "--json").stdout)["provider_errors"]
    assert {"provider": "openai", "kind": "rate_limited",
            "errors": counts(db)["openai", "rate_limited"]} in listed
    assert all(e["errors"] > 0 for e in listed)
    table = cli(db, "usage", width="60").stdout
    assert "failed provider calls since install" in table and "rate_limited" in table


# -- a Retry-After no wait can be taken from ---------------------------------------------------
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_retry_after_that_is_not_a_finite_number_is_not_a_wait(
        fake_api: FakeAPI, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """"nan" and "inf" read as floats: a NaN wait reached time.sleep (ValueError), and an
    infinite one a worker's retry_jobs (SQLSTATE 22008). They are unreadable, as a word is:
    the backoff's wait is taken."""
    monkeypatch.setenv("VOYAGE_API_KEY", "pa-errors-5")
    waits: list[float] = []
    embedder = Embedder(VOYAGE, sleep=waits.append)
    fake_api.script(f"429:retry-after={value}")
    assert embedder.embed(["recovers"]).shape == (1, VOYAGE.dimensions)
    assert len(waits) == 1 and 0 <= waits[0] <= 30.5, waits


def test_a_workers_retry_waits_at_most_a_day_whatever_the_service_asks(
        db: Database, app: psycopg.Connection[Any], owner: psycopg.Connection[Any],
        fake_api: FakeAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 429 asking for 10^12 seconds (or an HTTP date in year 9999) hid its jobs for
    31,700 years: lost. The worker waits at most a day, the most retry_jobs takes."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-errors-6")
    app.execute("SELECT pyembed.create_corpus('later', %s)", (OPENAI.key,))
    app.execute("SELECT pyembed.add_document('later', 'd1', 'a text to embed')")
    fake_api.script("429:retry-after=1000000000000")
    worker = Worker(db.app_dsn, embedder_for=lambda spec, cache: Embedder(
        spec, cache=cache, max_retries=0))
    try:
        stats = worker.run(drain=True, poll_interval=0.05, drain_wait=0.5)
    finally:
        worker.close()
    assert stats.retried == 1 and stats.failed == 0, stats
    wait = owner.execute("SELECT extract(epoch FROM not_before - now()), last_error "
                         "FROM pyembed.queue").fetchone()
    assert wait is not None and 86000 < wait[0] <= 86400 and "HTTP 429" in wait[1], wait


def test_retry_jobs_takes_delays_of_0_to_a_day_and_only_claimed_jobs(
        app: psycopg.Connection[Any]) -> None:
    """A delay of NaN, Infinity or 1e300 was SQLSTATE 22008 and one of 10^12 seconds hid the
    job for ever; a job no claim touched (attempts 0) could be retried or renewed, and so
    hidden for a day by a worker that never claimed it, or expired by expire_jobs(0)."""
    app.execute("SELECT pyembed.create_corpus('later', %s)", (OPENAI.key,))
    app.execute("SELECT pyembed.add_document('later', 'd1', 'a text to embed')")
    corpus, chunk, digest = app.execute(
        "SELECT corpus_id, chunk_id, content_hash FROM pyembed.queue").fetchone()
    job = ([corpus], [chunk], [OPENAI.key])
    retry = "SELECT pyembed.retry_jobs('later', %s, %s, %s, %s, %s, %s::float8[])"
    assert app.execute(retry, (*job, [digest], [0], [60])).fetchone() == (0,)
    assert app.execute("SELECT pyembed.renew_jobs(3600, %s, %s, %s, '{0}')",
                       job).fetchone() == (0,)
    for max_attempts in (0, -5):  # it failed the job 'no result after 0 attempts'
        assert app.execute("SELECT pyembed.expire_jobs(%s)", (max_attempts,)).fetchone() == (0,)
    assert app.execute("SELECT count(*) FROM pyembed.queue_failed").fetchone() == (0,)
    assert app.execute("SELECT attempts, last_error, not_before <= now() "
                       "FROM pyembed.queue").fetchone() == (0, None, True)
    app.execute("SELECT * FROM pyembed.claim_jobs(5, 10, 30)")
    for delay in ("NaN", "Infinity", "-Infinity", "1e300", "1e12", "86401", "-1"):
        err = sql_error(app, retry, (*job, [digest], [1], [delay]))
        assert err.sqlstate == "PE005" and "delays of 0 to 86400 seconds" in str(err), \
            (delay, err)
    assert app.execute(retry, (*job, [digest], [1], [86400])).fetchone() == (1,)
