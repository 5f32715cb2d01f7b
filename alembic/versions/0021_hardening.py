"""Hardening: recording tables without a foreign key to the corpus.

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-04

A search that records a recall sample (and a measurement of recall) held the corpus's vectors
partition, then locked the corpus row FOR KEY SHARE through the sample's foreign key; a writer
locks the row first (its documents' foreign key), then the partition. pyembed.drop_corpus needs
both, and waited for one side while the other waited for it. recall_samples and
recall_measurements are records, as query_log and usage are (neither has the foreign key): the
drop deletes their rows itself (sql/020-corpora.sql), and no search locks the corpus row.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0021"
down_revision: str | Sequence[str] | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql("""
ALTER TABLE pyembed.recall_samples DROP CONSTRAINT recall_samples_corpus_id_fkey;
ALTER TABLE pyembed.recall_measurements DROP CONSTRAINT recall_measurements_corpus_id_fkey;
""")


def downgrade() -> None:
    run_sql("""
DELETE FROM pyembed.recall_samples s
 WHERE NOT EXISTS (SELECT FROM pyembed.corpora c WHERE c.corpus_id = s.corpus_id);
DELETE FROM pyembed.recall_measurements m
 WHERE NOT EXISTS (SELECT FROM pyembed.corpora c WHERE c.corpus_id = m.corpus_id);
ALTER TABLE pyembed.recall_samples ADD CONSTRAINT recall_samples_corpus_id_fkey
  FOREIGN KEY (corpus_id) REFERENCES pyembed.corpora (corpus_id) ON DELETE CASCADE;
ALTER TABLE pyembed.recall_measurements ADD CONSTRAINT recall_measurements_corpus_id_fkey
  FOREIGN KEY (corpus_id) REFERENCES pyembed.corpora (corpus_id) ON DELETE CASCADE;
""")
