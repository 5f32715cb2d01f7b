"""The edges of the vector table, tried as a hostile tenant and as a busy database would:
ledgers the application role cannot touch, queued work the corpus would refuse, search input
that would give NaN or wrong scores, a PE004 no session setting switches off, and in-database
calls that never wait for each other."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from pyembed import tenants
from pyembed.cachekey import cache_key
from pyembed.corpora import ChunkRow, CorpusInfo, corpus_info, write_chunks
from pyembed.db import connect
from tests.conftest import Database
from tests.helpers import login_role, sql_error, stored_chunks, unit

KEY = "fake/fake-hash@1:384"
SAME_WIDTH = "fake/fake-hash@2:384"
RAW = "fake/fake-raw@1:4"  # not normalised, dot product: stored vectors keep their length


def vec(values: Any) -> str:
    return "[" + ",".join(repr(float(v)) for v in values) + "]"


@pytest.fixture
def docs(owner: psycopg.Connection[Any], app: psycopg.Connection[Any]) -> CorpusInfo:
    owner.execute("SELECT pyembed.register_model('fake', 'fake-hash', '2', 384)")
    app.execute("SELECT pyembed.create_corpus('docs', %s)", (KEY,))
    return corpus_info(app, "docs")


# -- the cache, usage and statistics: ledgers written only through their functions -----------

@pytest.mark.parametrize("table", ["embedding_cache", "cache_stats", "usage", "rerank_cache"])
def test_the_app_role_cannot_read_or_write_a_ledger(app: psycopg.Connection[Any],
                                                    table: str) -> None:
    for statement in (f"SELECT * FROM pyembed.{table}",
                      f"UPDATE pyembed.{table} SET tenant_id = tenant_id",
                      f"DELETE FROM pyembed.{table}",
                      f"INSERT INTO pyembed.{table} DEFAULT VALUES"):
        assert isinstance(sql_error(app, statement), psycopg.errors.InsufficientPrivilege), statement


def test_cache_vectors_cannot_rank_a_corpus(app: psycopg.Connection[Any], docs: Any) -> None:
    """The attack the table grant allowed: join cached document vectors to chunks by key."""
    app.execute("SELECT pyembed.add_document('docs', 'd1', 'a text about refunds')")
    app.execute("SELECT pyembed.embed('a text about refunds', %s)", (KEY,))  # cached now
    err = sql_error(app, "SELECT ch.document_id, e.embedding <=> %s::vector FROM pyembed.chunks ch "
                     "JOIN pyembed.embedding_cache e ON e.cache_key = sha256("
                     "convert_to(ch.content, 'UTF8') || '\\x00'::bytea || convert_to(%s, 'UTF8')"
                     " || '\\x00'::bytea || 'document'::bytea)",
                (vec(unit(384, 1)), KEY))
    assert isinstance(err, psycopg.errors.InsufficientPrivilege)


def test_cache_put_checks_what_it_stores(app: psycopg.Connection[Any], docs: Any) -> None:
    key = cache_key("planted", KEY, "document")
    put = "SELECT pyembed.cache_put(ARRAY[%s], %s, 'document', ARRAY[%s::vector])"
    assert sql_error(app, put, (key, KEY, vec(unit(8, 1)))).sqlstate == "PE003"  # dimensions
    assert sql_error(app, put, (key, KEY, vec(unit(384, 1) * 3))).sqlstate == "PE003"  # not unit
    assert sql_error(app, put, (b"short", KEY, vec(unit(384, 1)))).sqlstate == "PE005"
    assert sql_error(app, put, (key, "nobody/none@1:384", vec(unit(384, 1)))).sqlstate == "PE006"
    assert app.execute(put, (key, KEY, vec(unit(384, 1)))).fetchone() == (1,)


def test_an_expired_entry_is_renewed_through_sql(app: psycopg.Connection[Any],
                                                 owner: psycopg.Connection[Any],
                                                 docs: Any) -> None:
    app.execute("SELECT pyembed.embed('renew me', %s, 'query')", (KEY,))
    owner.execute("UPDATE pyembed.embedding_cache SET expires_at = now() - interval '1 minute'")
    app.execute("SELECT pyembed.embed('renew me', %s, 'query')", (KEY,))  # a miss: renewed
    before = requests(owner)
    for _ in range(3):
        app.execute("SELECT pyembed.embed('renew me', %s, 'query')", (KEY,))
    assert requests(owner) == before, "an expired entry was never renewed: every call paid"


def requests(owner: psycopg.Connection[Any]) -> int:
    row = owner.execute("SELECT coalesce(sum(requests), 0)::int FROM pyembed.usage").fetchone()
    assert row is not None
    return int(row[0])


def test_usage_cannot_be_falsified_through_its_function(app: psycopg.Connection[Any],
                                                        owner: psycopg.Connection[Any],
                                                        docs: CorpusInfo) -> None:
    reserve = "SELECT pyembed.reserve_usage(%s, %s, %s, %s)"
    assert sql_error(app, reserve, (KEY, docs.corpus_id, -100, 0)).sqlstate == "PE005"
    assert sql_error(app, reserve, (KEY, docs.corpus_id, 0, -10**9)).sqlstate == "PE005"
    assert sql_error(app, reserve, (KEY, docs.corpus_id + 1000, 1, 1)).sqlstate == "PE002"
    assert requests(owner) == 0
    assert sql_error(app, "SELECT pyembed.cache_count(ARRAY[%s], ARRAY[-5::bigint], "
                      "ARRAY[0::bigint])", (KEY,)).sqlstate == "PE005"


# -- the queue ------------------------------------------------------------------------------

def test_the_queue_refuses_a_key_the_corpus_would(app: psycopg.Connection[Any],
                                                  docs: CorpusInfo) -> None:
    (chunk,) = stored_chunks(app, docs, 1)
    insert = ("INSERT INTO pyembed.queue (corpus_id, chunk_id, model_key, content_hash) "
              "VALUES (%s, %s, %s, '\\x00') ON CONFLICT DO NOTHING")
    err = sql_error(app, insert, (docs.corpus_id, chunk, SAME_WIDTH))
    assert err.sqlstate == "PE001" and SAME_WIDTH in str(err) and KEY in str(err)
    err = sql_error(app, "UPDATE pyembed.queue SET model_key = %s", (SAME_WIDTH,))
    assert err.sqlstate == "PE001"
    assert app.execute("SELECT model_key FROM pyembed.queue").fetchall() == [(KEY,)]


# -- search input ----------------------------------------------------------------------------

@pytest.fixture
def searchable(app: psycopg.Connection[Any], docs: CorpusInfo) -> np.ndarray:
    vectors = np.stack([unit(384, i) for i in range(20)])
    write_chunks(app, docs, [ChunkRow(f"d{i}", 0, f"text {i}", vectors[i], {"n": i})
                                   for i in range(20)], KEY)
    return vectors


def scores(app: psycopg.Connection[Any], query: np.ndarray, **kw: Any) -> list[tuple[str, float]]:
    return [(r[0], r[1]) for r in app.execute(
        "SELECT document_id, score FROM pyembed.search('docs', %s::vector, %s, 5)",
        (vec(query), KEY)).fetchall()]


def test_a_null_query_vector_is_refused(app: psycopg.Connection[Any], searchable: Any) -> None:
    err = sql_error(app, "SELECT * FROM pyembed.search('docs', NULL::vector, %s, 5)", (KEY,))
    assert err.sqlstate == "PE005"


@pytest.mark.parametrize("scale", [3e38 / 4, 1e-30, 1e-44])
def test_extreme_query_components_give_the_scores_of_the_unit_query(
        app: psycopg.Connection[Any], searchable: np.ndarray, scale: float) -> None:
    q = unit(384, 3)
    direction = np.sign(q).astype(np.float32)  # every component at the same extreme magnitude
    want = scores(app, direction / np.linalg.norm(direction))
    got = scores(app, direction * np.float32(scale))
    assert all(np.isfinite(s) for _, s in got), got
    assert [d for d, _ in got] == [d for d, _ in want]
    assert np.allclose([s for _, s in got], [s for _, s in want], atol=1e-5), (got, want)


def test_a_model_that_keeps_lengths_refuses_vectors_whose_scores_overflow_or_vanish(
        owner: psycopg.Connection[Any], app: psycopg.Connection[Any]) -> None:
    owner.execute("SELECT pyembed.register_model('fake', 'fake-raw', '1', 4, 'dot', false)")
    app.execute("SELECT pyembed.create_corpus('raw', %s)", (RAW,))
    raw = corpus_info(app, "raw")
    (chunk,) = stored_chunks(app, raw, 1)
    insert = ("INSERT INTO pyembed.vectors (corpus_id, chunk_id, model_key, embedding) "
              "VALUES (%s, %s, %s, %s::vector)")
    for bad in ([3e38, 3e38, 1, 1], [1e-45, 0, 0, 0], [1e-30, 1e-30, 0, 0]):
        err = sql_error(app, insert, (raw.corpus_id, chunk, RAW, vec(bad)))
        assert err.sqlstate == "PE003", bad
    app.execute(insert, (raw.corpus_id, chunk, RAW, vec([3.0, 4.0, 0, 0])))
    search = "SELECT score FROM pyembed.search('raw', %s::vector, %s, 1)"
    assert app.execute(search, (vec([1, 0, 0, 0]), RAW)).fetchone() == (3.0,)
    assert sql_error(app, search, (vec([3e38, 3e38, 0, 0]), RAW)).sqlstate == "PE003"


@pytest.mark.parametrize("query", [
    "SELECT * FROM pyembed.search('docs', %(v)s::vector, %(k)s, 5, %(f)s::jsonb)",
    "SELECT * FROM pyembed.search_keyword('docs', 'text', 5, %(f)s::jsonb)",
    "SELECT * FROM pyembed.search_hybrid('docs', 'text', %(v)s::vector, %(k)s, 5, %(f)s::jsonb)",
    "SELECT * FROM pyembed.search_text('docs', 'text', 5, %(f)s::jsonb, 'hybrid')",
])
@pytest.mark.parametrize("bad_filter", ['[{"n": 1}]', '"n"', "1", "null"])
def test_a_filter_that_is_not_a_json_object_is_refused(
        app: psycopg.Connection[Any], searchable: Any, query: str, bad_filter: str) -> None:
    err = sql_error(app, query, {"v": vec(unit(384, 1)), "k": KEY, "f": bad_filter})
    assert err.sqlstate == "PE005", err


# -- PE004 -----------------------------------------------------------------------------------

def test_no_session_setting_lets_a_plain_update_change_a_key(owner: psycopg.Connection[Any],
                                                             docs: Any) -> None:
    for flag in ("pyembed.in_migration", "pyembed.migrating"):
        with pytest.raises(psycopg.Error) as err, owner.transaction():
            owner.execute("SELECT set_config(%s, 'on', true)", (flag,))
            owner.execute("UPDATE pyembed.corpora SET model_key = %s", (SAME_WIDTH,))
        assert err.value.sqlstate == "PE004"
    with pytest.raises(psycopg.Error) as err, owner.transaction():  # nor a DO block
        owner.execute(f"DO $$ BEGIN UPDATE pyembed.corpora SET target_model_key = "
                      f"'{SAME_WIDTH}'; END $$")
    assert err.value.sqlstate == "PE004"
    owner.execute("SELECT pyembed.migration_start('docs', %s)", (SAME_WIDTH,))  # the way
    assert owner.execute("SELECT target_model_key FROM pyembed.corpora").fetchone() == (
        SAME_WIDTH,)


# -- in-database calls never wait for each other ---------------------------------------------

@pytest.fixture
def tenant_dsn(db: Database, owner: psycopg.Connection[Any]) -> Iterator[str]:
    tenants.create_tenant(owner, "busy", requests_per_minute=1000)
    with login_role(owner, db.app_dsn, "busy", sql.SQL("IN ROLE pyembed_app")) as dsn:
        tenants.add_member(owner, "busy", conninfo_to_dict(dsn)["user"])
        yield dsn
        owner.execute("DELETE FROM pyembed.tenant_members")


@pytest.mark.parametrize("who", ["app", "tenant"])
def test_an_open_embed_holds_nothing_another_call_needs(db: Database, tenant_dsn: str,
                                                        who: str) -> None:
    """Session A embeds (paying the provider, storing, counting) and keeps its transaction
    open, as a hung provider call would; B's calls of every kind must not wait for it."""
    dsn = db.app_dsn if who == "app" else tenant_dsn
    with connect(dsn) as a, connect(dsn, autocommit=True) as b:
        b.execute("SET lock_timeout = '2s'")
        b.execute("SELECT pyembed.embed('cached before', %s)", (KEY,))
        a.execute("SELECT pyembed.embed('first text', %s)", (KEY,))
        a.execute("SELECT pyembed.embed_batch(ARRAY['t1', 't2', 'cached before'], %s)", (KEY,))
        for text in ("second text", "cached before", "first text"):
            b.execute("SELECT pyembed.embed(%s, %s)", (text, KEY))
        b.execute("SELECT pyembed.embed_batch(ARRAY['t1', 't3'], %s)", (KEY,))
        a.rollback()


def test_concurrent_embeds_in_transactions_never_deadlock(db: Database) -> None:
    """Each session alternates misses and hits inside one transaction, in opposite orders."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def session(n: int) -> None:
        try:
            with connect(db.app_dsn) as conn:
                conn.execute("SET lock_timeout = '5s'")
                barrier.wait()
                texts = [f"shared {i}" for i in range(30)]
                for text in (texts if n % 2 else reversed(texts)):
                    conn.execute("SELECT pyembed.embed(%s, %s)", (text, KEY))
                    conn.execute("SELECT pyembed.embed(%s, %s)", (f"own {n} {text}", KEY))
                conn.commit()
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=session, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
