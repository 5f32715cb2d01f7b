"""The keyword tables' lexemes compare byte by byte (COLLATE "C").

Revision ID: 0034
Revises: 0033
Create Date: 2026-12-06

A lexeme column took the database's collation, and under any locale but C or POSIX (C.UTF-8
included, on PostgreSQL 15) every comparison of two lexemes went through strcoll: the postings'
and the statistics' index scans, the joins of a query's lexemes to them, the sorts that group
them. Lexemes are matched by equality and ordered only to be grouped (and to fix the order of
a query's terms, whose ties go by lexeme): byte order serves both, and for UTF-8 it is code
point order, which C.UTF-8's strcoll gives too (the same rows, order and scores there; under
another locale, ties now go by code point, the same in every database). The indexes on these
columns are built again (no table is rewritten); each table is locked while its indexes are.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0034"
down_revision: str | Sequence[str] | None = "0033"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql("""
ALTER TABLE pyembed.postings ALTER COLUMN lexeme TYPE text COLLATE "C";
ALTER TABLE pyembed.document_postings ALTER COLUMN lexeme TYPE text COLLATE "C";
ALTER TABLE pyembed.posting_blocks ALTER COLUMN lexeme TYPE text COLLATE "C";
ALTER TABLE pyembed.lexeme_stats ALTER COLUMN lexeme TYPE text COLLATE "C";
ALTER TABLE pyembed.keyword_pending ALTER COLUMN lexemes TYPE text[] COLLATE "C";
""")


def downgrade() -> None:
    run_sql("""
ALTER TABLE pyembed.postings ALTER COLUMN lexeme TYPE text COLLATE "default";
ALTER TABLE pyembed.document_postings ALTER COLUMN lexeme TYPE text COLLATE "default";
ALTER TABLE pyembed.posting_blocks ALTER COLUMN lexeme TYPE text COLLATE "default";
ALTER TABLE pyembed.lexeme_stats ALTER COLUMN lexeme TYPE text COLLATE "default";
ALTER TABLE pyembed.keyword_pending ALTER COLUMN lexemes TYPE text[] COLLATE "default";
""")
