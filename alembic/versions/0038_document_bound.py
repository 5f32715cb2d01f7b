"""A bound on one document's size: corpora.max_document_chunks.

Revision ID: 0038
Revises: 0037
Create Date: 2026-12-06

Nothing bounded one document: a 50 MB text became ~99k chunks written by one statement, which
held its locks (the document's, its corpus's FOR KEY SHARE, the queue's and the keyword
index's rows) for ~99 s, and nothing told the writer before. Each corpus now holds the most
chunks one document may have (a setting with a range, as chunk_tokens: the CHECK
corpora_max_document_chunks_in_range, default 10,000); the chunks table's statement trigger
chunks_bound_insert (sql/015-chunks.sql) refuses a write that goes past it, for every writer,
naming the document. The downgrade drops the trigger, its function and the column.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0038"
down_revision: str | Sequence[str] | None = "0037"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql("""
ALTER TABLE pyembed.corpora ADD COLUMN max_document_chunks integer NOT NULL DEFAULT 10000
  CONSTRAINT corpora_max_document_chunks_in_range
  CHECK (max_document_chunks BETWEEN 1 AND 10000000);
""")


def downgrade() -> None:
    run_sql("""
DROP TRIGGER IF EXISTS chunks_bound_insert ON pyembed.chunks;
DROP TRIGGER IF EXISTS chunks_bound_update ON pyembed.chunks;
DROP FUNCTION IF EXISTS pyembed._chunks_bounded();
DROP FUNCTION IF EXISTS pyembed._document_size_problem(integer, text, bigint, bigint);
ALTER TABLE pyembed.corpora DROP COLUMN max_document_chunks;
""")
