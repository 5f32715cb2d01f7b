"""Keyword postings without a row-level foreign key: deleting chunks deletes their postings.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01

Postings are written only by the chunks' keyword-index trigger, from chunks written in the same
statement, so the foreign key from postings to chunks checked nothing the trigger does not
guarantee; its per-row check (one query and one row lock per posting, ~13 postings per chunk)
took about a third of a bulk chunk write. A statement trigger on chunks deletes their postings
instead (now pyembed._chunks_deleted in sql/010-guards.sql, which deletes their vectors too).
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql("ALTER TABLE pyembed.postings DROP CONSTRAINT postings_corpus_id_chunk_id_fkey;")


def downgrade() -> None:
    run_sql("""
DROP FUNCTION IF EXISTS pyembed._unindex_chunks() CASCADE;
DELETE FROM pyembed.postings p WHERE NOT EXISTS (
  SELECT FROM pyembed.chunks ch WHERE ch.corpus_id = p.corpus_id AND ch.chunk_id = p.chunk_id);
ALTER TABLE pyembed.postings ADD CONSTRAINT postings_corpus_id_chunk_id_fkey
  FOREIGN KEY (corpus_id, chunk_id) REFERENCES pyembed.chunks ON DELETE CASCADE;
""")
