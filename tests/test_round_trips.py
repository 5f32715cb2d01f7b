"""Round trips of a text search from Python, counted from libpq's trace: a cache hit is one, a
miss at most three on one connection; with a read replica the search runs there and what it
records (usage, the cache, its counts, the query log) still reaches the primary."""

from __future__ import annotations

from typing import Any

import psycopg

import pyembed
from pyembed.localdb import LocalCluster
from tests.conftest import Database, _dsn
from tests.roundtrips import counted
from tests.test_replica import requests, standby, wait_for

__all__ = ["standby"]  # the replica fixture, shared with test_replica

KEY = "fake/fake-hash@1:384"
DOCS = [(f"d{i}", f"error E40{i:02d} means the quota number {i} is used up") for i in range(20)]


def logged(owner: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return owner.execute("SELECT kind, cache_hit, embed_ms IS NOT NULL, search_ms IS NOT NULL, "
                         "total_ms IS NOT NULL FROM pyembed.query_log "
                         "ORDER BY query_log_id").fetchall()


def test_a_cache_hit_is_one_round_trip_and_a_miss_at_most_three(
        db: Database, owner: psycopg.Connection[Any]) -> None:
    with pyembed.connect(db.app_dsn) as client:
        docs = client.create_corpus("docs", KEY)
        docs.add(DOCS)
        docs.search("warm up the client")  # the model's spec is read once per client
        before = requests(owner)
        with counted(client.conn) as miss:
            first = docs.search("E4007 quota")
        assert requests(owner) == before + 1  # the provider call, reserved in the first trip
        with counted(client.conn) as hit:
            again = docs.search("E4007 quota")
        assert requests(owner) == before + 1
        assert again == first and first[0].document_id == "d7"
        print(f"round trips: miss {miss.total}, hit {hit.total}")
        assert hit.total == 1
        assert miss.total <= 3
    assert logged(owner)[-2:] == [("vector", False, True, True, True),
                                  ("vector", True, True, True, True)]
    # The cache's counts, kept by the client and written with a later call or on close.
    assert owner.execute("SELECT sum(hits)::int, sum(misses)::int FROM pyembed.cache_stats "
                         "WHERE model_key = %s", (KEY,)).fetchone() == (1, len(DOCS) + 2)


def test_with_a_replica_the_search_runs_there_and_its_record_reaches_the_primary(
        db: Database, standby: LocalCluster, owner: psycopg.Connection[Any]) -> None:
    wait_for(standby, db, "the database")
    with pyembed.connect(db.app_dsn, read_dsn=_dsn(standby, db.name, owner=False)) as client:
        docs = client.create_corpus("docs", KEY)
        docs.add(DOCS)
        docs.search("warm up the client")
        before = requests(owner)
        with counted(client.conn, client.read_conn) as miss:
            first = docs.search("E4007 quota")
        wait_for(standby, db, "the cache entry")
        with counted(client.conn, client.read_conn) as hit:
            again = docs.search("E4007 quota")
        assert again == first and first[0].document_id == "d7"
        print(f"round trips (primary, replica): miss {miss.counts}, hit {hit.counts}")
        # A miss: the replica's lookup, the primary's reservation, the replica's search and
        # the primary's record (cache entry, query log); a hit: the search and its record.
        assert miss.counts == [2, 2]
        assert hit.counts == [1, 1]
    assert logged(owner)[-2:] == [("vector", False, True, True, True),
                                  ("vector", True, True, True, True)]
    assert requests(owner) == before + 1  # the query that missed, reserved on the primary
