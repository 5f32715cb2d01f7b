"""Provider answers are checked whole, through the real SDKs against the fake API server:
an answer whose indexes repeat or skip, or that has too few or too many embeddings, is a
provider failure (PE009) and nothing of it is cached or stored, by the embedder, the
in-database functions or the worker."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from pgvector import Vector
from psycopg import sql

from pyembed.cache import PostgresCache
from pyembed.cachekey import cache_key
from pyembed.db import connect
from pyembed.embedder import Embedder
from pyembed.errors import ProviderError
from pyembed.localdb import APP_USER
from pyembed.models import InputType, ModelSpec, registry
from pyembed.providers import TransientProviderError, provider_for
from pyembed.rerank import Reranker, reranker_spec
from pyembed.worker import Worker, WorkerStats
from tests.conftest import Database
from tests.fakeapi import FakeAPI, server_vectors
from tests.helpers import run_cli
from tests.test_embedder import DictCache

VOYAGE = registry.get("voyage/voyage-3-lite@1:512")
OPENAI = registry.get("openai/text-embedding-3-large@1:256")
COHERE = registry.get("cohere/embed-english-v3.0@3:1024")
KEYS = {"VOYAGE_API_KEY": "pa-voyage-answers-123", "OPENAI_API_KEY": "sk-openai-answers-456",
        "COHERE_API_KEY": "co-cohere-answers-789"}
TEXTS = ["the cat sat on the mat", "dogs chase cats", "a bird sings at dawn",
         "fish swim in the sea"]


@pytest.fixture(autouse=True)
def api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)


def expected(spec: ModelSpec, texts: list[str]) -> np.ndarray:
    return server_vectors(spec.provider, spec.model_id, texts, spec.dimensions)


BROKEN = [
    (OPENAI, "indexes=1,1,0,3", 4, "returned index 1 twice"),
    (OPENAI, "indexes=0,1,3", 3, "returned index 3 for 3 texts"),
    (OPENAI, "indexes=0,2", 3, "returned 2 vectors for 3 texts"),
    (OPENAI, "short", 3, "returned 2 vectors for 3 texts"),
    (VOYAGE, "indexes=1,1,0,3", 4, "returned index 1 twice"),
    (VOYAGE, "indexes=0,1,3", 3, "returned index 3 for 3 texts"),
    (VOYAGE, "short", 3, "returned 2 vectors for 3 texts"),
    (COHERE, "short", 3, "returned 2 vectors for 3 texts"),
    (COHERE, "indexes=0,1,2,2", 3, "returned 4 vectors for 3 texts"),
]


@pytest.mark.parametrize(("spec", "behaviour", "count", "what"), BROKEN,
                         ids=[f"{s.provider}-{b}" for s, b, _, _ in BROKEN])
def test_a_broken_answer_is_pe009_and_nothing_is_cached(spec: ModelSpec, behaviour: str,
                                                         count: int, what: str,
                                                         fake_api: FakeAPI) -> None:
    cache = DictCache()
    fake_api.script(behaviour)
    embedder = Embedder(spec, provider_for(spec, timeout=5.0), cache=cache,
                        sleep=lambda _: None)

    with pytest.raises(ProviderError) as info:
        embedder.embed(TEXTS[:count])

    assert info.value.sqlstate == "PE009" and not isinstance(info.value,
                                                            TransientProviderError)
    assert what in str(info.value) and f"{spec.provider} ({spec.model_id})" in str(info.value)
    assert cache.puts == [] and cache.store == {}
    assert len(fake_api.requests) == 1  # a wrong answer is not asked again


@pytest.mark.parametrize("spec", [OPENAI, VOYAGE], ids=lambda s: s.provider)
def test_indexes_in_another_order_put_each_vector_on_its_text(spec: ModelSpec,
                                                              fake_api: FakeAPI) -> None:
    cache = DictCache()
    fake_api.script("indexes=3,0,2,1")

    vectors = Embedder(spec, provider_for(spec, timeout=5.0), cache=cache).embed(TEXTS)

    np.testing.assert_allclose(vectors, expected(spec, TEXTS), atol=1e-6)
    stored = DictCache()
    stored.put_many(TEXTS, expected(spec, TEXTS), spec, InputType.DOCUMENT)
    assert cache.store.keys() == stored.store.keys()
    for key, vector in stored.store.items():
        np.testing.assert_allclose(cache.store[key], vector, atol=1e-6)


# -- in the database: pyembed.embed_batch and its cache --------------------------------------
VOYAGE_IN_DB = registry.get("voyage/voyage-3@1:1024")


@pytest.fixture
def app_via_fake_voyage(db: Database, fake_api: FakeAPI) -> Iterator[psycopg.Connection[Any]]:
    """An application-role session whose database reaches Voyage at the fake API server
    (key and base URL stored by the owner)."""
    with connect(db.owner_dsn, autocommit=True) as conn:
        conn.execute("SELECT pyembed.set_secret('VOYAGE_API_KEY', %s)",
                     (KEYS["VOYAGE_API_KEY"],))
        conn.execute("SELECT pyembed.set_secret('PYEMBED_VOYAGE_BASE_URL', %s)",
                     (fake_api.base_url("voyage"),))
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(APP_USER)))
        conn.execute("SET pyembed.http_retries = 0")
        yield conn


def as_arrays(values: list[Any]) -> np.ndarray:
    """Vectors from psycopg (pgvector's Vector, or lists) as one float32 array."""
    return np.stack([np.asarray(v.to_numpy() if isinstance(v, Vector) else v, dtype=np.float32)
                     for v in values])


def cached_count(db: Database, spec: ModelSpec, texts: list[str]) -> int:
    keys = [cache_key(t, spec.key, InputType.DOCUMENT) for t in texts]
    with connect(db.owner_dsn, autocommit=True) as owner:
        row = owner.execute("SELECT count(*) FROM pyembed.embedding_cache "
                            "WHERE cache_key = ANY(%s)", (keys,)).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize(("behaviour", "count", "what"), [
    ("indexes=1,1,0,3", 4, "returned index 1 twice"),
    ("indexes=0,1,3", 3, "returned index 3 for 3 texts"),
    ("short", 3, "returned 2 vectors for 3 texts"),
])
def test_in_database_embed_batch_refuses_a_broken_answer_and_caches_nothing(
        db: Database, app_via_fake_voyage: psycopg.Connection[Any], fake_api: FakeAPI,
        behaviour: str, count: int, what: str) -> None:
    conn, texts = app_via_fake_voyage, TEXTS[:count]
    fake_api.script(behaviour)
    with pytest.raises(psycopg.Error) as info:
        conn.execute("SELECT pyembed.embed_batch(%s, %s)", (texts, VOYAGE_IN_DB.key))
    assert info.value.sqlstate == "PE009" and what in str(info.value), str(info.value)
    assert cached_count(db, VOYAGE_IN_DB, texts) == 0

    # The next, whole answer is returned and cached, each vector on its own text.
    row = conn.execute("SELECT pyembed.embed_batch(%s, %s)",
                       (texts, VOYAGE_IN_DB.key)).fetchone()
    assert row is not None
    np.testing.assert_allclose(as_arrays(row[0]), expected(VOYAGE_IN_DB, texts), atol=1e-6)
    assert cached_count(db, VOYAGE_IN_DB, texts) == count


# -- the worker --------------------------------------------------------------------------------
OPENAI_SMALL = registry.get("openai/text-embedding-3-small@1:1536")


def _drain(db: Database, app: psycopg.Connection[Any], fake_api: FakeAPI, corpus: str,
           behaviours: list[str], max_attempts: int) -> WorkerStats:
    """TEXTS queued in a new OpenAI corpus, the fake service answering with `behaviours` first,
    then one Worker run until the queue is empty (retries at once, no SDK retries)."""
    app.execute("SELECT pyembed.create_corpus(%s, %s)", (corpus, OPENAI_SMALL.key))
    with app.cursor() as cur:
        cur.executemany("SELECT pyembed.add_document(%s, %s, %s)",
                        [(corpus, f"doc{i}", text) for i, text in enumerate(TEXTS)])
    fake_api.script(*behaviours)
    worker = Worker(db.app_dsn, batch_size=64, max_attempts=max_attempts, retry_base=0.02,
                    retry_max=0.1, embedder_for=lambda spec, cache: Embedder(
                        spec, provider_for(spec, timeout=5.0), cache=cache, max_retries=0))
    try:
        return worker.run(drain=True, poll_interval=0.05, drain_wait=5.0)
    finally:
        worker.close()


def test_the_worker_stores_no_vector_from_an_answer_with_repeated_indexes(
        db: Database, app: psycopg.Connection[Any], owner: psycopg.Connection[Any],
        fake_api: FakeAPI) -> None:
    stats = _drain(db, app, fake_api, "answers", ["indexes=1,1,0,3"], max_attempts=3)

    # The broken answer was refused whole; the texts, sent again, got their own vectors.
    assert stats.embedded == 4 and stats.failed == 0
    first, *again = fake_api.requests_to("openai")
    assert sorted(first.body["input"]) == sorted(TEXTS) and first.behaviour.kind == "indexes"
    assert sorted(text for request in again for text in request.body["input"]) == sorted(TEXTS)
    rows = owner.execute("SELECT ch.content, v.embedding FROM pyembed.vectors v "
                         "JOIN pyembed.chunks ch USING (corpus_id, chunk_id)").fetchall()
    stored = dict(zip([text for text, _ in rows], as_arrays([v for _, v in rows]), strict=True))
    assert sorted(stored) == sorted(TEXTS)
    cached = PostgresCache(app).get_many(TEXTS, OPENAI_SMALL, InputType.DOCUMENT)
    for index, (text, vector) in enumerate(zip(TEXTS, expected(OPENAI_SMALL, TEXTS),
                                               strict=True)):
        np.testing.assert_allclose(stored[text], vector, atol=1e-6)
        np.testing.assert_allclose(cached[index], vector, atol=1e-6)


# -- answers not in the service's format -------------------------------------------------------
# A gateway's HTML page or a body without the fields an SDK reads failed inside the SDK or in
# the reading of its result (AttributeError, TypeError, JSONDecodeError, an SDK's assertion),
# and numbers given as text were read as numbers: a traceback at the command line, a dead
# worker, XX000 in SQL. Each is the service's bad answer (PE009), from every provider.
MALFORMED = ["notjson", "empty", "strings"]


@pytest.mark.parametrize(("spec", "behaviour"), [
    (spec, behaviour) for spec in (VOYAGE, OPENAI, COHERE) for behaviour in MALFORMED
    if (spec, behaviour) != (VOYAGE, "strings")  # Voyage's SDK asks for base64, not numbers
], ids=lambda v: v.provider if isinstance(v, ModelSpec) else v)
def test_an_answer_not_in_the_services_format_is_pe009_and_nothing_is_cached(
        spec: ModelSpec, behaviour: str, fake_api: FakeAPI) -> None:
    cache = DictCache()
    fake_api.script(behaviour)
    embedder = Embedder(spec, provider_for(spec, timeout=5.0), cache=cache,
                        sleep=lambda _: None)

    with pytest.raises(ProviderError) as info:
        embedder.embed(TEXTS[:2])

    message = str(info.value)
    assert info.value.sqlstate == "PE009" and info.value.kind == "bad_answer"
    assert not isinstance(info.value, TransientProviderError)
    assert ("not in the service's format" in message or "non-numbers" in message), message
    assert spec.provider in message and "\n" not in message
    assert cache.puts == [] and len(fake_api.requests) == 1
    np.testing.assert_allclose(embedder.embed(TEXTS[:2]), expected(spec, TEXTS[:2]), atol=1e-6)


@pytest.mark.parametrize("behaviour", ["notjson", "empty"])
@pytest.mark.parametrize("name", ["voyage/rerank-2.5", "cohere/rerank-v3.5"])
def test_a_rerank_answer_not_in_the_services_format_is_pe009(name: str, behaviour: str,
                                                              fake_api: FakeAPI) -> None:
    fake_api.script(behaviour)
    reranker = Reranker(reranker_spec(name), sleep=lambda _: None)
    with pytest.raises(ProviderError) as info:
        reranker.scores("cats", ["a cat", "a dog"])
    assert info.value.sqlstate == "PE009" and info.value.kind == "bad_answer"
    assert str(info.value).startswith(f"{name.replace('/', ' (', 1)}): the answer ")
    assert "\n" not in str(info.value)
    assert len(reranker.scores("cats", ["a cat", "a dog"])) == 2


def test_in_database_embed_refuses_an_answer_not_in_the_services_format(
        db: Database, app_via_fake_voyage: psycopg.Connection[Any], fake_api: FakeAPI) -> None:
    for behaviour in ("notjson", "empty"):
        fake_api.script(behaviour)
        with pytest.raises(psycopg.Error) as info:
            app_via_fake_voyage.execute("SELECT pyembed.embed_batch(%s, %s)",
                                        (TEXTS[:2], VOYAGE_IN_DB.key))
        assert info.value.sqlstate == "PE009", (behaviour, str(info.value))
    assert cached_count(db, VOYAGE_IN_DB, TEXTS[:2]) == 0


def test_the_cli_says_one_line_of_an_answer_not_in_the_services_format(
        db: Database, client: Any, fake_api: FakeAPI) -> None:
    client.create_corpus("gateway", OPENAI.key)
    env = {"PYEMBED_DSN": db.app_dsn, **fake_api.env()}
    fake_api.script("notjson")
    result = run_cli("search", "gateway", "what is E4012?", env=env)
    assert result.returncode == 1, result
    assert result.stderr.startswith("error: openai (text-embedding-3-large): the answer is not "
                                    "in the service's format"), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_the_worker_outlives_an_answer_not_in_the_services_format(
        db: Database, app: psycopg.Connection[Any], owner: psycopg.Connection[Any],
        fake_api: FakeAPI) -> None:
    stats = _drain(db, app, fake_api, "gateway", ["notjson", "empty", "strings"], max_attempts=5)

    assert stats.embedded == 4 and stats.failed == 0
    assert any("not in the service's format" in e for e in stats.errors), stats.errors
    assert owner.execute("SELECT count(*) FROM pyembed.vectors").fetchone() == (4,)
    assert owner.execute("SELECT count(*) FROM pyembed.queue").fetchone() == (0,)


# -- a NaN in a returned vector (the fake server's "nan": JSON's NaN token, or in base64) -------
@pytest.mark.parametrize("spec", [VOYAGE, OPENAI, COHERE], ids=lambda s: s.provider)
def test_a_returned_vector_with_nan_is_pe009_and_nothing_is_cached(spec: ModelSpec,
                                                                   fake_api: FakeAPI) -> None:
    cache = DictCache()
    fake_api.script("nan")
    embedder = Embedder(spec, provider_for(spec, timeout=5.0), cache=cache,
                        sleep=lambda _: None)
    with pytest.raises(ProviderError, match="returned a vector with NaN or infinity") as info:
        embedder.embed(TEXTS[:2])
    assert info.value.sqlstate == "PE009" and info.value.kind == "bad_answer"
    assert cache.puts == [] and len(fake_api.requests) == 1  # not asked again


def test_in_database_embed_and_the_worker_refuse_a_returned_vector_with_nan(
        db: Database, app_via_fake_voyage: psycopg.Connection[Any], app: psycopg.Connection[Any],
        owner: psycopg.Connection[Any], fake_api: FakeAPI) -> None:
    fake_api.script("nan")
    with pytest.raises(psycopg.Error) as info:
        app_via_fake_voyage.execute("SELECT pyembed.embed_batch(%s, %s)",
                                    (TEXTS[:2], VOYAGE_IN_DB.key))
    assert info.value.sqlstate == "PE009" and "NaN" in str(info.value)
    assert cached_count(db, VOYAGE_IN_DB, TEXTS[:2]) == 0

    stats = _drain(db, app, fake_api, "nan", ["nan"], max_attempts=3)
    # The answer was refused whole; the texts, sent again, got their own vectors.
    assert stats.embedded == 4 and stats.failed == 0
    first, *again = fake_api.requests_to("openai")
    assert first.behaviour.kind == "nan" and len(first.body["input"]) == 4 and again
    rows = owner.execute("SELECT ch.content, v.embedding FROM pyembed.vectors v "
                         "JOIN pyembed.chunks ch USING (corpus_id, chunk_id)").fetchall()
    stored = dict(zip([text for text, _ in rows], as_arrays([v for _, v in rows]), strict=True))
    for text, vector in zip(TEXTS, expected(OPENAI_SMALL, TEXTS), strict=True):
        np.testing.assert_allclose(stored[text], vector, atol=1e-6)
