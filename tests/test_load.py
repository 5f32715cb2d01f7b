"""A short load test: 16 sessions at once for a few seconds (SQL embed with cache misses and
hits, search_text with new and repeated queries in vector and hybrid mode, add_document, the
worker; some sessions several calls per transaction, both models in random order) against the
in-process fake model and the OpenAI SDK talking to the fake HTTP server. No call may fail or
deadlock, and every provider call must be in pyembed.usage exactly once. The harness and its
longer run are tests/benchmarks/bench_load.py."""

from __future__ import annotations

from tests.benchmarks.bench_load import FAKE, HTTP, LoadSettings, run_load
from tests.conftest import Database


def test_sixteen_sessions_never_fail_deadlock_or_miss_a_usage_row(db: Database) -> None:
    result = run_load(db.owner_dsn, db.app_dsn,
                      LoadSettings(seconds=4.0, sessions=16, seed_documents=4))
    report = "\n".join(result.report())
    print(report)
    assert result.errors == 0, report
    assert result.deadlocks == 0 and result.server_deadlocks == 0, report
    assert all(result.tally.calls[kind] > 0 for kind in
               ("embed", "search_text", "add_document", "worker")), report
    assert result.transactions > 0, report
    accounting = {a.model_key: a for a in result.accounting}
    for key in (FAKE, HTTP):
        assert accounting[key].provider_calls > 0, report
        assert accounting[key].usage_requests == accounting[key].provider_calls, report
    assert (result.queue_left, result.chunks_unembedded) == (0, 0), report
