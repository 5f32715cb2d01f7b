"""SQLAlchemy 2 mappings of pyembed's tables, for applications that map them in their own models.

Read them with the application role like any table (row-level security keeps each tenant to
its own rows); write vectors through pyembed (the guards check every write), and search
through `search()` below, which calls the guarded SQL function: the application role cannot
read `pyembed.vectors` itself.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import BYTEA, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from .models import ModelSpec

SCHEMA = "pyembed"


class ModelKey(sa.types.TypeDecorator[str]):
    """A model key column (`provider/model_id@version:dims`); accepts a ModelSpec too."""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> str | None:
        return value.key if isinstance(value, ModelSpec) else value


# A column the database fills (a default, the server's time, a hash its trigger computes): an
# INSERT leaves it out unless the object sets it. Sent as NULL, the server's columns were refused
# (the application role may not write them) and the others broke their NOT NULL.
_SERVER = sa.FetchedValue()


class Base(DeclarativeBase):
    metadata = sa.MetaData(schema=SCHEMA)


class Model(Base):
    __tablename__ = "models"
    model_key: Mapped[str] = mapped_column(ModelKey, primary_key=True)
    provider: Mapped[str]
    model_id: Mapped[str]
    model_version: Mapped[str]
    dimensions: Mapped[int]
    distance: Mapped[str]
    normalized: Mapped[bool]


class Corpus(Base):
    __tablename__ = "corpora"
    corpus_id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    model_key: Mapped[str] = mapped_column(ModelKey, sa.ForeignKey(f"{SCHEMA}.models.model_key"))
    target_model_key: Mapped[str | None] = mapped_column(ModelKey)
    migration_step: Mapped[str]
    traffic_share: Mapped[int]
    description: Mapped[str]


class Document(Base):
    __tablename__ = "documents"
    corpus_id: Mapped[int] = mapped_column(sa.ForeignKey(f"{SCHEMA}.corpora.corpus_id"),
                                           primary_key=True)
    document_id: Mapped[str] = mapped_column(primary_key=True)
    content_hash: Mapped[bytes] = mapped_column(BYTEA)
    title: Mapped[str | None]
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB, server_default=_SERVER)
    updated_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), server_default=_SERVER)


class Chunk(Base):
    __tablename__ = "chunks"
    # The schema's foreign key and a relationship on it, so that a flush inserts a document
    # before its chunks (the unit of work orders mappers by their relationships).
    __table_args__ = (sa.ForeignKeyConstraint(
        ["corpus_id", "document_id"],
        [f"{SCHEMA}.documents.corpus_id", f"{SCHEMA}.documents.document_id"]),)
    corpus_id: Mapped[int] = mapped_column(primary_key=True)
    chunk_id: Mapped[int] = mapped_column(sa.Identity(always=True), primary_key=True)
    document_id: Mapped[str]
    chunk_index: Mapped[int]
    content: Mapped[str]
    content_hash: Mapped[bytes] = mapped_column(BYTEA, server_default=_SERVER)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB, server_default=_SERVER)
    document: Mapped[Document] = relationship(Document)


def search(corpus: str, query_embedding: Any, model_key: str | ModelSpec | None = None,
           k: int = 10, filter: dict[str, Any] | None = None) -> sa.Select[Any]:
    """A SELECT over pyembed.search(...): the guarded search, usable in any SQLAlchemy query
    (document_id, chunk_id, chunk_index, content, metadata, score, model_key). `model_key` is
    the key of the model that made `query_embedding` (InvalidInput without one, as for
    Corpus.search)."""
    from pgvector.sqlalchemy import Vector

    from .search import check_k, filter_json, query_vector, vector_key

    key = vector_key(model_key.key if isinstance(model_key, ModelSpec) else model_key)
    fn = sa.func.pyembed.search(
        sa.literal(corpus), sa.bindparam("q", query_vector(query_embedding).tolist(),
                                         type_=Vector()),
        sa.literal(key), sa.literal(check_k(k)),
        sa.cast(sa.literal(filter_json(filter)), JSONB) if filter is not None else sa.null())
    cols = fn.table_valued("document_id", "chunk_id", "chunk_index", "content",
                           sa.column("metadata", JSONB), sa.column("score", sa.Float),
                           "model_key")
    return sa.select(cols)


@sa.event.listens_for(sa.engine.Engine, "handle_error")
def _pyembed_errors(context: sa.engine.ExceptionContext) -> None:
    """An error pyembed's SQL raises on purpose (SQLSTATE PExxx: a model key mismatch from
    search(), a vector a guard refuses on a mapped table) raised as its pyembed class, as the
    package's own calls raise it, from any statement SQLAlchemy runs once this module is
    imported: SQLAlchemy's wrapper of the driver's error is all a caller saw otherwise. Any
    other error stays SQLAlchemy's."""
    import psycopg

    from .db import translate

    exc = context.original_exception
    if isinstance(exc, psycopg.Error) and (exc.sqlstate or "").startswith("PE"):
        mapped = translate(exc)
        if mapped is not exc:  # (the driver's error is its cause)
            raise mapped from exc
