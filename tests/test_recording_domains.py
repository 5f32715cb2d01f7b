"""A recording table holds only values its readers can use: the application role records its
searches (pyembed.record_search, Corpus.log_query), and a query-log line with a NaN, infinite or
negative timing, or k below 1, made `pyembed status` (and its latency view) fail for everyone.
The table refuses such a line itself, whichever path writes it."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from pyembed import health
from pyembed.client import Client

KEY = "fake/fake-hash@1:384"
RECORD = ("SELECT pyembed.record_search(%s, %s, %s, %s, false, "
          "%s::real, %s::real, %s::real, %s::real)")
TIMINGS = ("embed_ms", "search_ms", "generate_ms", "total_ms")


def _record(app: psycopg.Connection[Any], corpus_id: int, k: int = 5,
            **timings: str | None) -> None:
    values = [timings.get(name, "1.5") for name in TIMINGS]
    app.execute(RECORD, (corpus_id, KEY, "vector", k, *values))


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "-1"])
@pytest.mark.parametrize("column", TIMINGS)
def test_a_query_log_timing_is_a_finite_duration(client: Client, app: psycopg.Connection[Any],
                                                 owner: psycopg.Connection[Any], column: str,
                                                 value: str) -> None:
    corpus = client.create_corpus("logged", KEY)
    with pytest.raises(psycopg.errors.CheckViolation):
        _record(app, corpus.info.corpus_id, **{column: value})
    with pytest.raises(psycopg.errors.CheckViolation):
        owner.execute(  # the table's own check, not record_search's (the app role may not insert)
            f"INSERT INTO pyembed.query_log (corpus_id, model_key, kind, k, {column}) "
            "VALUES (%s, %s, 'vector', 5, %s::real)", (corpus.info.corpus_id, KEY, value))
    assert not corpus.log_query("vector", 5, {column: float(value)}, generated=True)


@pytest.mark.parametrize("k", [0, -5])
def test_a_query_log_line_asked_for_at_least_one_hit(client: Client,
                                                     app: psycopg.Connection[Any], k: int) -> None:
    corpus = client.create_corpus("logged", KEY)
    with pytest.raises(psycopg.errors.CheckViolation):
        _record(app, corpus.info.corpus_id, k=k)


def test_status_reads_whatever_the_application_role_could_record(
        client: Client, app: psycopg.Connection[Any], owner: psycopg.Connection[Any]) -> None:
    corpus = client.create_corpus("logged", KEY)
    _record(app, corpus.info.corpus_id, embed_ms="0", search_ms=None, total_ms="3.25")
    for value in ("NaN", "Infinity", "-1"):
        try:
            _record(app, corpus.info.corpus_id, embed_ms=value)
        except psycopg.errors.CheckViolation:
            pass
    found = {(f.area, f.subject): f for f in health.report(owner) if f.area == "latency"}
    assert found[("latency", "vector: total")].value.startswith("p50 3.2 ms")
