"""bulk_load.load_vectors: stored chunks' vectors in batches over several connections; a refused
batch stops the load with a note on what was written, and loading again finishes it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg import sql

from pyembed.bulk_load import load_vectors
from pyembed.corpora import create_corpus
from pyembed.errors import (
    DatabaseNotReady,
    InvalidInput,
    InvalidVector,
    ModelMismatch,
    UnknownCorpus,
)
from tests.conftest import Database
from tests.helpers import chunk_hashes, count, login_role, stored_chunks, unit

KEY = "fake/fake-hash@1:384"
OTHER = "local/all-minilm-l6-v2-int8@1:384"  # same width, another model
N = 300


@pytest.fixture
def chunks(app: psycopg.Connection[Any]) -> list[int]:
    corpus = create_corpus(app, "docs", KEY)
    return stored_chunks(app, corpus, N)


def _inputs() -> tuple[np.ndarray, list[bytes | None]]:
    vectors = np.stack([3 * unit(384, i) for i in range(N)])  # not unit length: normalised
    return vectors, chunk_hashes(N)


def _stored(owner: psycopg.Connection[Any]) -> dict[int, np.ndarray]:
    return {r[0]: r[1].to_numpy() for r in owner.execute(
        "SELECT chunk_id, embedding FROM pyembed.vectors WHERE model_key = %s", (KEY,))}


def test_a_load_writes_every_vector_once_in_its_own_transaction_per_batch(
        db: Database, owner: psycopg.Connection[Any], app: psycopg.Connection[Any],
        chunks: list[int]) -> None:
    vectors, hashes = _inputs()
    report = load_vectors("docs", chunks, KEY, vectors, hashes, dsn=db.app_dsn, batch_rows=40,
                          connections=2)
    assert (report.rows, report.batches) == (N, 8)
    stored = _stored(owner)
    assert sorted(stored) == chunks
    for chunk_id, vector in zip(chunks, vectors, strict=True):
        np.testing.assert_allclose(stored[chunk_id], vector / 3, rtol=1e-6, atol=1e-7)
    assert count(app, "queue") == 0  # every hash named its chunk's queued text
    transactions = owner.execute("SELECT count(DISTINCT xmin::text) FROM pyembed.vectors")
    assert transactions.fetchone() == (8,)


def test_a_refused_batch_stops_the_load_and_loading_again_finishes_it(
        db: Database, owner: psycopg.Connection[Any], app: psycopg.Connection[Any],
        chunks: list[int]) -> None:
    vectors, hashes = _inputs()
    bad = vectors.copy()
    bad[170, 5] = np.nan  # in the batch of rows 160-199
    with pytest.raises(InvalidVector, match="NaN") as err:
        load_vectors("docs", chunks, KEY, bad, hashes, dsn=db.app_dsn, batch_rows=40,
                     connections=2)
    stored = _stored(owner)
    note = "\n".join(err.value.__notes__)
    assert f"chunk ids {chunks[160]}..{chunks[199]} wrote nothing" in note
    assert f"{len(stored):,} of {N:,} rows were written" in note
    assert not set(chunks[160:200]) & set(stored)
    assert len(stored) % 40 == 0
    assert len(stored) < N - 40  # no batch started once one had failed
    assert count(app, "queue") == N - len(stored)  # what was written was dequeued
    load_vectors("docs", chunks, KEY, vectors, hashes, dsn=db.app_dsn, batch_rows=40)
    assert sorted(_stored(owner)) == chunks
    assert count(owner, "vectors") == N and count(app, "queue") == 0


def test_what_the_database_refuses_stops_the_load_with_its_own_error(
        db: Database, owner: psycopg.Connection[Any], chunks: list[int]) -> None:
    vectors, hashes = _inputs()
    with pytest.raises(ModelMismatch, match=OTHER) as err:
        load_vectors("docs", chunks, OTHER, vectors, hashes, dsn=db.app_dsn, batch_rows=100)
    assert f"0 of {N:,} rows were written" in "\n".join(err.value.__notes__)
    missing = [*chunks[:-1], chunks[-1] + 1000]  # the last batch names a chunk that isn't there
    with pytest.raises(psycopg.errors.ForeignKeyViolation, match="no chunk"):
        load_vectors("docs", missing, KEY, vectors, hashes, dsn=db.app_dsn, batch_rows=100,
                     connections=1)
    assert count(owner, "vectors") == 200  # the two batches before it


@pytest.fixture
def one_connection(db: Database, owner: psycopg.Connection[Any]) -> Iterator[str]:
    """The DSN of an application login role allowed one connection at a time."""
    options = sql.SQL("CONNECTION LIMIT 1 IN ROLE {}").format(sql.Identifier("pyembed_app"))
    with login_role(owner, db.app_dsn, "one", options) as dsn:
        yield dsn


def test_a_connection_that_does_not_open_stops_the_load_with_a_note(
        owner: psycopg.Connection[Any], chunks: list[int], one_connection: str) -> None:
    vectors, hashes = _inputs()
    with pytest.raises(DatabaseNotReady, match=r"cannot reach the database: .*too many "
                       r"connections") as err:
        load_vectors("docs", chunks, KEY, vectors, hashes, dsn=one_connection, batch_rows=1,
                     connections=2)
    stored = count(owner, "vectors")
    assert stored < N  # the connection that opened started no batch after the failure
    assert (f"a connection did not open; {stored:,} of {N:,} rows were written"
            in "\n".join(err.value.__notes__))


@pytest.mark.parametrize(("corpus", "vectors", "hashes", "batch_rows", "error", "words"), [
    ("nope", np.ones((N, 384)), [None] * N, 10, UnknownCorpus, "unknown corpus 'nope'"),
    ("docs", np.ones((N, 384)), [None] * 2, 10, InvalidInput, "300 vectors and 2 content hashes"),
    ("docs", np.ones((N, 1024)), [None] * N, 10, InvalidVector, "384 dimensions"),
    ("docs", np.ones((N, 384)), [None] * N, 0, InvalidInput, "at least 1"),
])
def test_inputs_that_cannot_load_are_refused_before_any_write(
        db: Database, owner: psycopg.Connection[Any], chunks: list[int], corpus: str,
        vectors: np.ndarray, hashes: list[bytes | None], batch_rows: int,
        error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        load_vectors(corpus, chunks, KEY, vectors, hashes, dsn=db.app_dsn, batch_rows=batch_rows)
    assert count(owner, "vectors") == 0
