"""The PL/Python functions on a real PostgreSQL: pyembed.embed, embed_batch, search_text,
add_document and the owner-only secrets, called as the application role unless stated.

The in-database provider reads its base URL from the server's environment only (fixed at
cluster start). To reach the fake API server anyway, the owner (a superuser) sets
os.environ inside its own backend with a DO block, then `SET ROLE`s to the application user:
a test-only device, not something an application can do.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from pgvector import Vector
from psycopg import sql

from pyembed.cachekey import cache_key
from pyembed.chunking import chunk_text
from pyembed.db import connect
from pyembed.embedder import Embedder
from pyembed.localdb import APP_USER
from pyembed.models import LOCAL_DEFAULT
from pyembed.providers.fake import fake_vectors
from pyembed.worker import Worker, WorkerStats
from tests.conftest import Database
from tests.fakeapi import FakeAPI, server_vectors
from tests.helpers import assert_matches_golden, sql_error

LOCAL = LOCAL_DEFAULT.key
FAKE = "fake/fake-hash@1:384"
FAKE_WIDE = "fake/fake-hash@1:1024"
VOYAGE = "voyage/voyage-3@1:1024"
SECRET = "sk-test-SECRET123"
SAMPLE = Path(__file__).resolve().parent.parent / "pyembed" / "data" / "sample"

SQLQuery = str | sql.SQL | sql.Composed


# -- helpers ---------------------------------------------------------------------------------
def one(conn: psycopg.Connection[Any], query: SQLQuery, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def as_array(value: Any) -> np.ndarray:
    """A vector value from psycopg (pgvector's Vector, or a list) as a float32 array."""
    if isinstance(value, Vector):
        return np.asarray(value.to_numpy(), dtype=np.float32)
    return np.asarray(value, dtype=np.float32)


def cache_state(conn: psycopg.Connection[Any]) -> tuple[int, int, int]:
    """(cache entries, hits, misses) over every model, the connection's tenant's."""
    row = conn.execute("SELECT coalesce(sum(entries), 0)::int, coalesce(sum(hits), 0)::int, "
                       "coalesce(sum(misses), 0)::int FROM (SELECT model_key, max(entries) AS "
                       "entries, sum(hits) AS hits, sum(misses) AS misses "
                       "FROM pyembed.cache_report(1) GROUP BY model_key) r").fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def cached(conn: psycopg.Connection[Any], text: str, model_key: str, input_type: str) -> bool:
    return bool(one(conn, "SELECT EXISTS (SELECT FROM pyembed.cache_get(ARRAY[%s]))",
                    (cache_key(text, model_key, input_type),)))


def drain(db: Database) -> WorkerStats:
    worker = Worker(db.app_dsn, batch_size=64, retry_base=0.05)
    try:
        return worker.run(drain=True, poll_interval=0.05, drain_wait=2.0)
    finally:
        worker.close()


def queued(conn: psycopg.Connection[Any], corpus: str) -> dict[int, bytes]:
    """chunk_index -> queued content hash, for one corpus."""
    rows = conn.execute(
        "SELECT ch.chunk_index, q.content_hash FROM pyembed.queue q "
        "JOIN pyembed.chunks ch USING (corpus_id, chunk_id) "
        "JOIN pyembed.corpora c USING (corpus_id) WHERE c.name = %s", (corpus,)).fetchall()
    return {int(i): bytes(h) for i, h in rows}


# -- pyembed.embed ---------------------------------------------------------------------------
TEXT = "PostgreSQL stores the vectors next to the rows they describe."


def test_embed_local_returns_a_unit_vector_and_the_second_call_hits_the_cache(
        app: psycopg.Connection[Any]) -> None:
    first = as_array(one(app, "SELECT pyembed.embed(%s, %s)", (TEXT, LOCAL)))
    assert first.shape == (384,)
    assert np.linalg.norm(first) == pytest.approx(1.0, abs=1e-5)
    assert cache_state(app) == (1, 0, 1)

    second = as_array(one(app, "SELECT pyembed.embed(%s, %s)", (TEXT, LOCAL)))
    # A hit writes nothing at once (no entry, no miss); hits are written every 100 lookups.
    assert cache_state(app) == (1, 0, 1), "the second call must be a cache hit"
    np.testing.assert_array_equal(second, first)
    one(app, "SELECT count(pyembed.embed(%s, %s)) FROM generate_series(1, 99)", (TEXT, LOCAL))
    assert cache_state(app) == (1, 100, 1)

    # The same model outside the database (what the worker uses) gives the same vector.
    outside = Embedder(LOCAL_DEFAULT).embed([TEXT])[0]
    np.testing.assert_allclose(first, outside, atol=1e-5)


def test_input_type_and_model_are_part_of_the_cache_key(app: psycopg.Connection[Any]) -> None:
    app.execute("SELECT pyembed.embed(%s, %s, 'document')", (TEXT, FAKE))
    app.execute("SELECT pyembed.embed(%s, %s, 'query')", (TEXT, FAKE))
    app.execute("SELECT pyembed.embed(%s, %s, 'query')", (TEXT, FAKE_WIDE))
    assert cache_state(app) == (3, 0, 3)
    assert cached(app, TEXT, FAKE, "document") and cached(app, TEXT, FAKE, "query")
    assert cached(app, TEXT, FAKE_WIDE, "query")
    assert not cached(app, TEXT, FAKE_WIDE, "document")
    # Surrounding whitespace is not part of the key: a hit (no entry, no miss; the hit is
    # counted in the backend and written with the next store).
    app.execute("SELECT pyembed.embed(%s, %s, 'query')", (f"  {TEXT}\n", FAKE))
    assert cache_state(app) == (3, 0, 3)

    # The local model has no input types: queries and documents share one entry (by design).
    app.execute("SELECT pyembed.embed(%s, %s, 'document')", (TEXT, LOCAL))
    app.execute("SELECT pyembed.embed(%s, %s, 'query')", (TEXT, LOCAL))
    assert cache_state(app) == (4, 1, 4)  # the store wrote the earlier hit; this one waits
    assert not cached(app, TEXT, LOCAL, "query")


def test_embed_batch_matches_single_calls(app: psycopg.Connection[Any]) -> None:
    texts = ["alpha beta", "gamma delta", "alpha beta"]
    batch = one(app, "SELECT pyembed.embed_batch(%s, %s)", (texts, FAKE))
    assert len(batch) == 3
    expected = fake_vectors(texts, space="fake-hash@1", dimensions=384)
    np.testing.assert_allclose(np.stack([as_array(v) for v in batch]), expected, atol=1e-6)
    single = as_array(one(app, "SELECT pyembed.embed(%s, %s)", ("gamma delta", FAKE)))
    np.testing.assert_allclose(single, expected[1], atol=1e-6)


@pytest.mark.parametrize(("query", "params", "sqlstate", "words"), [
    ("SELECT pyembed.embed(%s, %s)", ("", LOCAL), "PE005", "empty"),
    ("SELECT pyembed.embed(%s, %s)", (" \t\n ", FAKE), "PE005", "whitespace"),
    ("SELECT pyembed.embed(%s, %s)", ("word " * 400, LOCAL), "PE005", "256-token limit"),
    ("SELECT pyembed.embed(NULL, %s)", (LOCAL,), "PE005", "NULL"),
    ("SELECT pyembed.embed(%s, NULL)", (TEXT,), "PE005", "NULL"),
    ("SELECT pyembed.embed(%s, %s)", (TEXT, "nope/none@1:3"), "PE006", "nope/none@1:3"),
    ("SELECT pyembed.embed(%s, %s, 'passage')", (TEXT, FAKE), "PE005", "'passage'"),
    ("SELECT pyembed.embed(%s, %s)", (TEXT, VOYAGE), "PE008", "VOYAGE_API_KEY"),
    ("SELECT pyembed.embed_batch(ARRAY['ok', NULL], %s)", (FAKE,), "PE005", "NULL"),
    ("SELECT pyembed.embed_batch(ARRAY['ok', ''], %s)", (FAKE,), "PE005", "empty"),
    ("SELECT pyembed.embed_batch(array_fill('ok'::text, ARRAY[1001]), %s)", (FAKE,), "PE005",
     "at most 1000 texts"),
], ids=["empty", "whitespace", "too-long", "null-text", "null-model", "unknown-model",
        "bad-input-type", "voyage-no-key", "batch-null", "batch-empty", "batch-too-many"])
def test_bad_input_raises_its_sqlstate_and_caches_nothing(
        app: psycopg.Connection[Any], query: str, params: tuple[Any, ...], sqlstate: str,
        words: str) -> None:
    before = cache_state(app)
    err = sql_error(app, query, params)
    assert err.sqlstate == sqlstate, str(err)
    assert words in (err.diag.message_primary or ""), str(err)
    assert cache_state(app) == before
    # The session is still usable.
    assert one(app, "SELECT 1") == 1


def test_embed_works_in_a_read_only_transaction(app: psycopg.Connection[Any]) -> None:
    app.execute("SELECT pyembed.embed(%s, %s)", (TEXT, FAKE))  # now cached
    app.execute("SET default_transaction_read_only = on")  # what a hot standby enforces
    vec = as_array(one(app, "SELECT pyembed.embed(%s, %s)", (TEXT, FAKE)))
    assert vec.shape == (384,)


# -- search_text and add_document ------------------------------------------------------------
def test_search_text_embeds_the_query_with_the_corpus_model(
        db: Database, app: psycopg.Connection[Any]) -> None:
    app.execute("SELECT pyembed.create_corpus('support', %s)", (LOCAL,))
    docs = {p.stem: p.read_text() for p in sorted(SAMPLE.glob("*.md"))}
    assert len(docs) >= 5
    for doc_id, text in docs.items():
        assert one(app, "SELECT pyembed.add_document('support', %s, %s, %s)",
                   (doc_id, text, '{"source": "sample"}')) == 1
    # add_document only queues: nothing is embedded yet.
    assert one(app, "SELECT count(*) FROM pyembed.vectors") == 0
    assert one(app, "SELECT count(*) FROM pyembed.queue") == len(docs)

    stats = drain(db)
    assert (stats.embedded, stats.failed, stats.retried) == (len(docs), 0, 0)
    assert one(app, "SELECT count(*) FROM pyembed.queue") == 0

    for query, expected in [("Can I get my money back after an outage?", "refunds"),
                            ("How do we enforce SAML sign-in for all members?", "sso")]:
        hits = app.execute("SELECT document_id, model_key, score, metadata "
                           "FROM pyembed.search_text('support', %s, 3)", (query,)).fetchall()
        assert len(hits) == 3
        assert hits[0][0] == expected, hits
        assert {h[1] for h in hits} == {LOCAL}
        assert hits[0][3] == {"source": "sample"}
        assert hits[0][2] >= hits[1][2] >= hits[2][2]

    # The query is embedded in the database with the model the worker used: the exact text of a
    # chunk scores 1.
    content = one(app, "SELECT content FROM pyembed.chunks WHERE document_id = 'gpu'")
    top = app.execute("SELECT document_id, score FROM pyembed.search_text('support', %s, 1)",
                      (content,)).fetchone()
    assert top is not None and top[0] == "gpu" and top[1] == pytest.approx(1.0, abs=1e-4)

    err = sql_error(app, "SELECT * FROM pyembed.search_text('nope', 'x', 3)")
    assert err.sqlstate == "PE002"
    err = sql_error(app, "SELECT * FROM pyembed.search_text('support', '  ', 3)")
    assert err.sqlstate == "PE005"


def test_what_search_sees_between_a_changed_add_document_and_the_worker(
        db: Database, app: psycopg.Connection[Any]) -> None:
    """As README says: until the worker embeds the new text, vector search scores a changed
    chunk by its old vector and shows its new text, keyword search sees the new text, and a
    chunk the document did not have before is found by keywords only."""
    app.execute("SELECT pyembed.create_corpus('stale', %s, '', 20, 5)", (FAKE,))
    app.execute("SELECT pyembed.add_document('stale', 'a', 'apples and pears')")
    assert drain(db).embedded == 1
    longer = "zebra stripes " + " ".join(f"w{i:03d}" for i in range(40))
    n = one(app, "SELECT pyembed.add_document('stale', 'a', %s)", (longer,))
    assert n > 1

    def hits(query: str, mode: str) -> list[tuple[str, int, str]]:
        return [(r[0], r[1], r[2][:13]) for r in app.execute(
            "SELECT document_id, chunk_index, content FROM pyembed.search_text("
            "'stale', %s, 5, NULL, %s, 'chunk')", (query, mode))]

    old_vector = one(app, "SELECT pyembed.embed('apples and pears', %s, 'query')", (FAKE,))
    assert [r[:2] for r in app.execute(
        "SELECT document_id, chunk_index, score FROM pyembed.search('stale', %s, %s, 5)",
        (old_vector, FAKE))] == [("a", 0)]  # the old text's vector, scored as it was
    assert hits("apples and pears", "vector") == [("a", 0, "zebra stripes")]  # the new text
    assert hits("apples", "keyword") == []
    assert [h[:2] for h in hits("w039", "keyword")] == [("a", n - 1)]  # not embedded yet
    assert n - 1 not in [h[1] for h in hits("w039", "vector")]
    assert drain(db).embedded == n
    assert [h[1] for h in hits("w039", "vector")][:1] == [n - 1]


def test_add_document_chunks_and_requeues_only_changed_chunks(
        db: Database, app: psycopg.Connection[Any]) -> None:
    app.execute("SELECT pyembed.create_corpus('chunky', %s, '', 20, 5)", (FAKE,))
    words = [f"w{i:03d}" for i in range(90)]
    text = " ".join(words)
    expected = chunk_text(text, 20, 5)
    assert len(expected) >= 5

    n = one(app, "SELECT pyembed.add_document('chunky', 'doc', %s)", (text,))
    assert n == len(expected)
    stored = [r[0] for r in app.execute("SELECT content FROM pyembed.chunks "
                                        "WHERE document_id = 'doc' ORDER BY chunk_index")]
    assert stored == expected
    assert sorted(queued(app, "chunky")) == list(range(n))
    assert drain(db).embedded == n
    assert queued(app, "chunky") == {}

    # The same text again: nothing new is queued and the vectors stay.
    vectors_before = app.execute("SELECT chunk_id, created_at FROM pyembed.vectors "
                                 "ORDER BY chunk_id").fetchall()
    assert one(app, "SELECT pyembed.add_document('chunky', 'doc', %s)", (text,)) == n
    assert queued(app, "chunky") == {}
    assert app.execute("SELECT chunk_id, created_at FROM pyembed.vectors "
                       "ORDER BY chunk_id").fetchall() == vectors_before

    # One word changed near the end: only the chunks holding it are queued, with new hashes.
    changed_text = " ".join([*words[:85], "CHANGED", *words[86:]])
    changed = chunk_text(changed_text, 20, 5)
    assert len(changed) == n
    differ = {i for i in range(n) if changed[i] != expected[i]}
    assert 0 < len(differ) < n
    assert one(app, "SELECT pyembed.add_document('chunky', 'doc', %s)", (changed_text,)) == n
    now_queued = queued(app, "chunky")
    assert set(now_queued) == differ
    hashes = dict(app.execute("SELECT chunk_index, content_hash FROM pyembed.chunks "
                              "WHERE document_id = 'doc'").fetchall())
    assert all(now_queued[i] == bytes(hashes[i]) for i in differ)
    assert drain(db).embedded == len(differ)

    # Shrinking deletes the extra chunks (and their vectors and queue entries).
    short_text = " ".join(words[:25])
    short = chunk_text(short_text, 20, 5)
    assert 1 < len(short) < n
    assert one(app, "SELECT pyembed.add_document('chunky', 'doc', %s)", (short_text,)) == len(short)
    assert [r[0] for r in app.execute("SELECT content FROM pyembed.chunks WHERE document_id = "
                                      "'doc' ORDER BY chunk_index")] == short
    assert one(app, "SELECT max(chunk_index) FROM pyembed.vectors JOIN pyembed.chunks "
                    "USING (corpus_id, chunk_id)") == len(short) - 1
    assert set(queued(app, "chunky")) <= set(range(len(short)))
    drain(db)
    assert one(app, "SELECT count(*) FROM pyembed.vectors v JOIN pyembed.chunks ch "
                    "USING (corpus_id, chunk_id) WHERE v.content_hash = ch.content_hash") \
        == len(short)

    err = sql_error(app, "SELECT pyembed.add_document('chunky', 'doc', '   ')")
    assert err.sqlstate == "PE005"
    err = sql_error(app, "SELECT pyembed.add_document('nope', 'doc', 'text')")
    assert err.sqlstate == "PE002"
    err = sql_error(app, "SELECT pyembed.add_document('chunky', 'doc', 'text', '[1]')")
    assert err.sqlstate == "PE005"


# -- secrets ---------------------------------------------------------------------------------
def test_secrets_are_the_owners_only(owner: psycopg.Connection[Any],
                                     app: psycopg.Connection[Any]) -> None:
    err = sql_error(app, "SELECT * FROM pyembed.secrets")
    assert err.sqlstate == "42501"
    err = sql_error(app, "SELECT pyembed.set_secret('VOYAGE_API_KEY', 'sk-app-tries')")
    assert err.sqlstate == "42501"
    err = sql_error(app, "INSERT INTO pyembed.secrets (name, value) VALUES ('X', 'y')")
    assert err.sqlstate == "42501"

    owner.execute("SELECT pyembed.set_secret('VOYAGE_API_KEY', %s)", (SECRET,))
    assert one(owner, "SELECT value FROM pyembed.secrets WHERE name = 'VOYAGE_API_KEY'") == SECRET
    assert sql_error(app, "SELECT value FROM pyembed.secrets").sqlstate == "42501"
    # Not a setting: neither SHOW nor current_setting nor pg_settings reveals it.
    for conn in (app, owner):
        assert one(conn, "SELECT count(*) FROM pg_settings WHERE setting LIKE %s",
                   (f"%{SECRET}%",)) == 0
        assert one(conn, "SELECT current_setting('pyembed.voyage_api_key', true)") is None
        assert one(conn, "SELECT current_setting('pyembed.VOYAGE_API_KEY', true)") is None
    assert not one(app, "SELECT has_table_privilege('pyembed_app', 'pyembed.secrets', 'SELECT')")


@pytest.fixture(scope="module")
def api_server() -> Iterator[FakeAPI]:
    with FakeAPI(hang_seconds=4.0) as server:
        yield server


@pytest.fixture
def as_app_via_fake_api(db: Database, api_server: FakeAPI) -> Iterator[psycopg.Connection[Any]]:
    """An owner session whose backend's environment points the Voyage provider at the fake
    API server, then switched to the application role with SET ROLE."""
    api_server.reset()
    with connect(db.owner_dsn, autocommit=True) as conn:
        conn.execute("SELECT pyembed.set_secret('VOYAGE_API_KEY', %s)", (SECRET,))
        code = ("import os\n"
                f"os.environ['PYEMBED_VOYAGE_BASE_URL'] = {api_server.base_url('voyage')!r}\n")
        conn.execute(sql.SQL("DO {} LANGUAGE plpython3u").format(sql.Literal(code)))
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(APP_USER)))
        assert one(conn, "SELECT current_user") == APP_USER
        yield conn
    api_server.reset()


def test_in_database_provider_uses_the_secret_and_never_echoes_it(
        as_app_via_fake_api: psycopg.Connection[Any], api_server: FakeAPI) -> None:
    conn = as_app_via_fake_api
    vec = as_array(one(conn, "SELECT pyembed.embed('find the invoice', %s, 'query')",
                         (VOYAGE,)))
    np.testing.assert_allclose(
        vec, server_vectors("voyage", "voyage-3", ["find the invoice"], 1024)[0], atol=1e-6)
    [request] = api_server.requests
    assert request.headers["authorization"] == f"Bearer {SECRET}"
    assert request.body["input_type"] == "query"

    # The fake server echoes the key in its 401 message, as some services do.
    api_server.script("401")
    err = sql_error(conn, "SELECT pyembed.embed('another text', %s)", (VOYAGE,))
    assert err.sqlstate == "PE009", str(err)
    assert "401" in str(err) and "<api key>" in str(err)
    assert SECRET not in str(err) and "SECRET123" not in str(err)
    assert SECRET not in (err.diag.context or "") + (err.diag.message_detail or "")


def test_in_database_http_timeout_and_retries_bound_the_call(
        as_app_via_fake_api: psycopg.Connection[Any], api_server: FakeAPI) -> None:
    conn = as_app_via_fake_api
    # A first call imports the SDK into the backend (seconds on a busy machine): not timed.
    conn.execute("SELECT pyembed.embed('a first call', %s)", (VOYAGE,))
    api_server.reset()
    conn.execute("SET pyembed.http_timeout = 1")
    conn.execute("SET pyembed.http_retries = 0")
    api_server.script("hang")
    start = time.monotonic()
    err = sql_error(conn, "SELECT pyembed.embed('a hanging call', %s)", (VOYAGE,))
    elapsed = time.monotonic() - start
    assert err.sqlstate == "PE009", str(err)
    assert elapsed < api_server.hang_seconds - 1, f"timeout not applied: {elapsed:.1f} s"
    assert len(api_server.requests) == 1

    # A Retry-After longer than the timeout is refused at once (PE010), not slept on.
    api_server.script("429:retry-after=30")
    err = sql_error(conn, "SELECT pyembed.embed('rate limited', %s)", (VOYAGE,))
    assert err.sqlstate == "PE010", str(err)

    # http_retries = 2: two 429s with Retry-After 0, then the answer.
    conn.execute("SET pyembed.http_retries = 2")
    api_server.reset()
    api_server.script("429:retry-after=0", "429:retry-after=0")
    assert one(conn, "SELECT vector_dims(pyembed.embed('retried text', %s))", (VOYAGE,)) == 1024
    assert len(api_server.requests) == 3

    conn.execute("SET pyembed.http_timeout = 'soon'")
    err = sql_error(conn, "SELECT pyembed.embed('bad setting', %s)", (VOYAGE,))
    assert err.sqlstate == "PE005" and "http_timeout" in str(err)


@pytest.mark.parametrize(("setting", "value"), [
    *[("http_timeout", v) for v in ("NaN", "inf", "1e308", "-1", "0", "3601")],
    *[("http_retries", v) for v in ("NaN", "inf", "1e30", "-1", "2.7", "11")],
])
def test_in_database_http_settings_out_of_range_are_pe005_before_any_call(
        as_app_via_fake_api: psycopg.Connection[Any], api_server: FakeAPI, setting: str,
        value: str) -> None:
    """NaN or infinite timeouts and retries were XX000 (OverflowError, ValueError) or a PE009
    that blamed the provider; 1e30 retries kept a statement no one can cancel retrying for as
    long as the service failed, and 2.7 retries were 2."""
    conn = as_app_via_fake_api
    conn.execute(f"SET pyembed.{setting} = '{value}'")
    err = sql_error(conn, "SELECT pyembed.embed('bad setting', %s)", (VOYAGE,))
    rule = ("a number of seconds above 0 and at most 3600" if setting == "http_timeout"
            else "a whole number 0..10")
    assert err.sqlstate == "PE005", str(err)
    assert str(err).startswith(f"pyembed.{setting} must be {rule}, got '{value}'"), str(err)
    assert api_server.requests == []


# -- the function inventory (golden file) ----------------------------------------------------
INVENTORY = """
SELECT format('%s | %s | %s | %s | %s | app %s | public %s',
  p.oid::regprocedure,
  l.lanname,
  CASE p.provolatile WHEN 'i' THEN 'immutable' WHEN 's' THEN 'stable' ELSE 'volatile' END,
  CASE WHEN p.prosecdef THEN 'security definer' ELSE 'security invoker' END,
  coalesce((SELECT c FROM unnest(p.proconfig) AS c WHERE c LIKE 'search_path=%%'),
           'search_path not set'),
  CASE WHEN has_function_privilege('pyembed_app', p.oid, 'EXECUTE') THEN 'yes' ELSE 'no' END,
  CASE WHEN has_function_privilege('public', p.oid, 'EXECUTE') THEN 'yes' ELSE 'no' END)
  FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
 WHERE p.pronamespace = 'pyembed'::regnamespace
"""


def function_inventory(conn: psycopg.Connection[Any]) -> list[str]:
    """One line per function in schema pyembed, sorted (types printed schema-qualified)."""
    with conn.transaction():
        conn.execute("SET LOCAL search_path = pg_catalog, pg_temp")
        lines = [r[0] for r in conn.execute(INVENTORY).fetchall()]
    return sorted(lines)


def test_function_inventory_matches_the_golden_file(owner: psycopg.Connection[Any]) -> None:
    lines = function_inventory(owner)
    # Rules that hold whatever the golden file says.
    assert not [line for line in lines if line.endswith("public yes")], "PUBLIC executes these"
    assert not [line for line in lines if "security definer" in line
                and "search_path not set" in line], "SECURITY DEFINER without a search_path"
    # Unpinned only on purpose (090-search-path.sql): the search's invoker-rights helpers, which
    # run inside pyembed's pinned functions and nothing else may call.
    unpinned = {line.split("(")[0] for line in lines if "search_path not set" in line}
    assert unpinned == {f"pyembed.{name}" for name in (
        "_vector_ranking", "_hybrid_ranking", "_ranked_hits", "_hit_arrays", "_record_search",
        "_nearest_in", "_nearest_source", "_nearest_candidates",
        "_nearest_scans", "_nearest_rules", "_nearest_settings", "_nearest_sql", "_nearest_text",
        "_nearest_function_name", "_index_plan",
        "_index_type", "_hnsw_per_page", "_hnsw_fitting_m", "_halfvec_m", "_halfvec_ef",
        "_index_spec", "_index_params",
        "hnsw_rule", "_vector_partition_name", "_session_tenant",
        "_corpus_named")}
    assert all(line.endswith("app no | public no") for line in lines
               if "search_path not set" in line), "an unpinned function the app role may call"
    assert next(line for line in lines if line.startswith("pyembed.set_secret(")).endswith(
        "app no | public no")

    assert_matches_golden("functions.txt", lines, "tests/test_indb.py -k golden")


def test_the_search_functions_catalog_row_is_stored_uncompressed(
        owner: psycopg.Connection[Any]) -> None:
    """pyembed.search's pg_proc row stays under PostgreSQL's 2 kB TOAST target (its comments stand
    outside its body): over it, its argument defaults, types and modes were stored compressed, and
    every statement that calls it decompressed them to resolve the call, at every search."""
    row = owner.execute(
        "SELECT pg_column_compression(proargdefaults), pg_column_compression(proallargtypes), "
        "pg_column_compression(proargmodes), pg_column_compression(proargnames), "
        "pg_column_compression(prosrc) FROM pg_catalog.pg_proc "
        "WHERE oid = 'pyembed.search(text, vector, text, numeric, jsonb, text)'::regprocedure"
    ).fetchone()
    assert row == (None, None, None, None, None)



ROW_TOO_LONG = {"pyembed.search_query"}
"""App-callable functions whose argument types and modes stay compressed: besides its body,
search_query's 29 arguments' names, types and defaults fill most of the TOAST target; a function
of its own for its body would give its OUT arguments another row to describe the result from,
and cost every search one call more. (search_hybrid's ranking is pyembed._hybrid_ranking, which
search_embedded calls too: its own row is short now.)"""


def test_app_functions_describe_their_results_from_uncompressed_catalog_rows(
        owner: psycopg.Connection[Any]) -> None:
    """Every function the app role may call has its argument types, modes and names (and its
    settings) stored uncompressed in pg_proc: a call of one with OUT parameters builds its
    result's row description from them, so that a compressed row was decompressed at every
    call (search_embedded was, on every search of a new query, until its comments went outside
    its body)."""
    rows = owner.execute(
        "SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc p "
        "WHERE p.pronamespace = 'pyembed'::regnamespace "
        "AND has_function_privilege('pyembed_app', p.oid, 'EXECUTE') "
        "AND (pg_column_compression(p.proallargtypes) IS NOT NULL "
        "OR pg_column_compression(p.proargmodes) IS NOT NULL "
        "OR pg_column_compression(p.proargnames) IS NOT NULL "
        "OR pg_column_compression(p.proconfig) IS NOT NULL)").fetchall()
    assert {r[0].split("(")[0] for r in rows} == ROW_TOO_LONG
    walked = owner.execute(
        "SELECT count(*) FROM pg_catalog.pg_proc p WHERE p.pronamespace = 'pyembed'::regnamespace "
        "AND has_function_privilege('pyembed_app', p.oid, 'EXECUTE') "
        "AND p.proallargtypes IS NOT NULL").fetchone()
    assert walked is not None and walked[0] > 10  # the walk sees the functions with OUT arguments

def test_keyword_scoring_imports_neither_the_client_nor_sqlalchemy() -> None:
    """PL/Python imports pyembed.bm25 for a session's first keyword search: the package's
    names are imported on first use, so that costs numpy, not the client and SQLAlchemy."""
    import subprocess
    import sys

    import pyembed

    assert sorted(pyembed.__all__) == sorted(["__version__", *pyembed._WHERE])
    check = ("import sys, pyembed.bm25; "
             "print(sorted(m for m in ('pyembed.client', 'sqlalchemy', 'alembic', 'psycopg') "
             "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
    assert pyembed.Client.__module__ == "pyembed.client" and pyembed.connect is not None
