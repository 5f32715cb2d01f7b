"""Keyword postings read from their index alone: the primary key carries tf and doc_len.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04

BM25 reads every posting of each query lexeme. With tf and doc_len only in the heap, each
posting cost a heap visit (SciFact: ~3,200 postings a query, ~4,200 buffer reads); with them
in the primary key's leaf tuples (INCLUDE), an index-only scan reads them (heap fetches only
for pages written since the last vacuum). One index still: no extra write per posting.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql("""
ALTER TABLE pyembed.postings DROP CONSTRAINT postings_pkey,
  ADD CONSTRAINT postings_pkey PRIMARY KEY (corpus_id, lexeme, chunk_id) INCLUDE (tf, doc_len);
""")


def downgrade() -> None:
    run_sql("""
ALTER TABLE pyembed.postings DROP CONSTRAINT postings_pkey,
  ADD CONSTRAINT postings_pkey PRIMARY KEY (corpus_id, lexeme, chunk_id);
""")
