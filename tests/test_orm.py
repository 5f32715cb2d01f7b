"""The SQLAlchemy mappings, as an application maps them, with the application role."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import pyembed
from pyembed import orm
from pyembed.schema import sqlalchemy_url
from tests.conftest import Database

KEY = "fake/fake-hash@1:384"


def test_map_read_and_search_through_sqlalchemy(db: Database) -> None:
    with pyembed.connect(db.app_dsn) as client:
        kb = client.create_corpus("kb", KEY)
        kb.add([pyembed.Document("e4012", "error E4012 quota exceeded", {"team": "ops"}),
                pyembed.Document("sso", "single sign on with SAML")])
        vec = client.embedder(KEY).embed_query("quota exceeded")
    engine = sa.create_engine(sqlalchemy_url(db.app_dsn))
    try:
        with Session(engine) as session:
            corpus = session.scalars(sa.select(orm.Corpus).where(orm.Corpus.name == "kb")).one()
            assert corpus.model_key == KEY
            docs = session.scalars(sa.select(orm.Document).order_by(orm.Document.document_id))
            assert [(d.document_id, d.metadata_) for d in docs] == [
                ("e4012", {"team": "ops"}), ("sso", {})]
            assert session.scalar(sa.select(sa.func.count()).select_from(orm.Chunk)) == 2
            rows = session.execute(orm.search("kb", vec, pyembed.registry.get(KEY), k=1)).all()
            assert rows[0].document_id == "e4012" and rows[0].model_key == KEY
            only_sso = session.execute(orm.search("kb", vec, KEY, k=5, filter={"team": "ops"}))
            assert [r.document_id for r in only_sso] == ["e4012"]
            # pyembed's error, as the package's own calls raise it (before: SQLAlchemy's
            # DBAPIError), with the driver's as its cause.
            with pytest.raises(pyembed.ModelMismatch) as err:
                session.execute(orm.search("kb", vec, "fake/fake-hash@2:1024", k=1)).all()
            cause = err.value.__cause__
            assert isinstance(cause, psycopg.Error) and cause.sqlstate == "PE001"
    finally:
        engine.dispose()


def test_a_mapped_document_is_deleted_through_pyembeds_function(db: Database) -> None:
    """The application role holds no DELETE (a table's DELETE would let a tenant LOCK it, every
    tenant's): session.delete is refused, and README's statement deletes the document."""
    from pyembed.db import translate

    with pyembed.connect(db.app_dsn) as client:
        client.create_corpus("docs", KEY).add([pyembed.Document("e4012", "error E4012 quota"),
                                               pyembed.Document("sso", "single sign on")])
    engine = sa.create_engine(sqlalchemy_url(db.app_dsn))
    try:
        with Session(engine) as session:
            doc = session.scalars(sa.select(orm.Document).where(
                orm.Document.document_id == "sso")).one()
            session.delete(doc)
            with pytest.raises(sa.exc.ProgrammingError) as err:
                session.commit()
            assert isinstance(err.value.orig, psycopg.Error)
            assert isinstance(translate(err.value.orig), pyembed.NotAllowed)
            assert "pyembed.delete_documents" in str(translate(err.value.orig))
            session.rollback()
            assert session.scalar(sa.select(sa.func.pyembed.delete_documents(
                "docs", ["e4012"]))) == 1
            session.commit()
            assert list(session.scalars(sa.select(orm.Document.document_id))) == ["sso"]
    finally:
        engine.dispose()


BAD_FILTERS = {"NUL in a key": {"a\x00b": 1}, "NUL in a value": {"x": ["a\x00b"]},
               "lone surrogate": {"x": "\ud800"}, "NaN": {"x": float("nan")},
               "NUL as JSON text": '{"x": "a\\u0000b"}',
               "surrogate as JSON text": '{"x": "\\udc00"}'}


@pytest.mark.parametrize("bad", BAD_FILTERS.values(), ids=list(BAD_FILTERS))
def test_orm_search_names_a_filter_jsonb_cannot_hold(db: Database, bad: object) -> None:
    """orm.search's filter is checked as Corpus.search's and a document's metadata are: a value
    jsonb cannot hold is pyembed.InvalidInput naming it, when the SELECT is built. Before, a NUL
    or a lone surrogate reached the server, and the session raised sqlalchemy's DataError
    (22P05 or 22P02), not a pyembed error."""
    with pyembed.connect(db.app_dsn) as client:
        client.create_corpus("kb", KEY).add([pyembed.Document("d1", "quota", {"x": "a"})])
        vec = client.embedder(KEY).embed_query("quota")
    with pytest.raises(pyembed.InvalidInput, match="a metadata filter"):
        orm.search("kb", vec, KEY, filter=bad)  # type: ignore[arg-type]
    engine = sa.create_engine(sqlalchemy_url(db.app_dsn))
    try:
        with Session(engine) as session:  # a good filter still selects
            hits = session.execute(orm.search("kb", vec, KEY, filter={"x": "a"})).all()
            assert [h.document_id for h in hits] == ["d1"]
    finally:
        engine.dispose()


def test_a_documents_metadata_written_through_the_orm_is_what_every_search_reads(
        db: Database) -> None:
    """The application role may write a document's metadata (Document.metadata_). Before, its
    chunks kept the old copy: vector searches (orm.search among them) filtered on and returned
    the old metadata while keyword searches read the new, and adding the document again with
    its old metadata was skipped as unchanged (its hash still said so), leaving the new one.
    Now the chunks' copy follows the document's, and the next add stores what it is given."""
    with pyembed.connect(db.app_dsn) as client:
        kb = client.create_corpus("kb", KEY)
        kb.add([pyembed.Document("d1", "quota exceeded again", {"team": "ops"}),
                pyembed.Document("d2", "single sign on", {"team": "ops"})])
        vec = client.embedder(KEY).embed_query("quota")
    engine = sa.create_engine(sqlalchemy_url(db.app_dsn))
    try:
        with Session(engine) as session:
            doc = session.get(orm.Document, (kb.info.corpus_id, "d1"))
            assert doc is not None
            doc.metadata_ = {"team": "sales"}
            session.commit()
            hits = session.execute(orm.search("kb", vec, KEY, k=5, filter={"team": "sales"})).all()
            assert [(h.document_id, h.metadata) for h in hits] == [("d1", {"team": "sales"})]
            chunks = session.execute(sa.select(orm.Chunk.document_id, orm.Chunk.metadata_)
                                     .order_by(orm.Chunk.document_id)).all()
            assert [tuple(c) for c in chunks] == [("d1", {"team": "sales"}), ("d2", {"team": "ops"})]
        with pyembed.connect(db.app_dsn) as client:
            kb = client.corpus("kb")
            for mode in ("vector", "keyword", "hybrid"):
                hits = kb.search("quota exceeded", mode=mode, filter={"team": "sales"})
                assert [h.document_id for h in hits] == ["d1"], mode
            report = kb.add([pyembed.Document("d1", "quota exceeded again", {"team": "ops"}),
                             pyembed.Document("d2", "single sign on", {"team": "ops"})])
            assert (report.updated, report.skipped) == (1, 1)
            assert [h.metadata for h in kb.search("quota exceeded", k=1)] == [{"team": "ops"}]
    finally:
        engine.dispose()


def test_a_document_and_its_chunk_are_written_through_the_orm(db: Database) -> None:
    """An application adds a document and its chunk as mapped objects (README: the ORM is one of
    the documents' writers). Before (found from outside by outside20), the INSERT named every
    mapped column, the ones the server fills as NULL: `permission denied for table documents`
    (updated_at, the server's) and the chunk's identity chunk_id likewise. Now they are left to
    the server: the document gets the server's time, the chunk its id and its text's hash,
    and its embedding is queued, while keyword search finds it at once. Both are added in one
    flush, which inserts the document first (the mapping has the schema's foreign key: without
    it the chunk came first, a ForeignKeyViolation)."""
    from pyembed.text import sha256

    with pyembed.connect(db.app_dsn) as client:
        kb = client.create_corpus("kb", KEY)
        corpus_id = kb.info.corpus_id
    engine = sa.create_engine(sqlalchemy_url(db.app_dsn))
    try:
        with Session(engine) as session:
            doc = orm.Document(corpus_id=corpus_id, document_id="e4012", content_hash=b"h")
            session.add(doc)
            chunk = orm.Chunk(corpus_id=corpus_id, document_id="e4012", chunk_index=0,
                              content="error E4012 quota exceeded")
            session.add(chunk)
            session.commit()
            assert doc.updated_at is not None and doc.metadata_ == {}
            assert chunk.chunk_id > 0 and chunk.metadata_ == {}
            assert chunk.content_hash == sha256("error E4012 quota exceeded")
            queued = session.scalar(sa.text("SELECT count(*) FROM pyembed.queue"))
            assert queued == 1
    finally:
        engine.dispose()
    with pyembed.connect(db.app_dsn) as client:
        hits = client.corpus("kb").search("E4012", mode="keyword")
        assert [h.document_id for h in hits] == ["e4012"]


def test_every_mapped_column_the_application_role_may_not_insert_is_left_to_the_server(
        db: Database, owner: psycopg.Connection[Any]) -> None:
    """The class of the test above, from the catalogue: on each mapped table the application
    role inserts into, a mapped column it holds no INSERT on is one the mapping leaves to the
    server (a server default or an identity), so that an INSERT of a mapped object never names
    it."""
    granted = {(t, c) for t, c in owner.execute(
        "SELECT table_name, column_name FROM information_schema.column_privileges "
        "WHERE grantee = 'pyembed_app' AND table_schema = 'pyembed' "
        "AND privilege_type = 'INSERT'").fetchall()}
    written = {t for t, _ in granted}
    sent = []
    for mapper in orm.Base.registry.mappers:
        table = mapper.local_table
        if table.name not in written:
            continue
        for column in table.columns:
            if (table.name, column.name) not in granted and column.server_default is None \
                    and column.identity is None:
                sent.append(f"{table.name}.{column.name}")
    assert not sent, sent
    assert written >= {"documents", "chunks"}, written
