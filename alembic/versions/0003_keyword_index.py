"""Keyword search: per-chunk postings with term frequencies, document frequencies, corpus stats.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql("""
ALTER TABLE pyembed.corpora ADD COLUMN text_config regconfig NOT NULL DEFAULT 'english';

-- One row per (lexeme, chunk): BM25 reads term frequency and chunk length from here.
CREATE TABLE pyembed.postings (
  corpus_id integer NOT NULL,
  lexeme    text NOT NULL,
  chunk_id  bigint NOT NULL,
  tf        integer NOT NULL CHECK (tf > 0),
  doc_len   integer NOT NULL CHECK (doc_len > 0),
  PRIMARY KEY (corpus_id, lexeme, chunk_id),
  FOREIGN KEY (corpus_id, chunk_id) REFERENCES pyembed.chunks ON DELETE CASCADE
);
CREATE INDEX postings_chunk ON pyembed.postings (corpus_id, chunk_id);

CREATE TABLE pyembed.lexeme_stats (
  corpus_id integer NOT NULL,
  lexeme    text NOT NULL,
  df        integer NOT NULL,
  PRIMARY KEY (corpus_id, lexeme)
);

CREATE TABLE pyembed.keyword_stats (
  corpus_id integer PRIMARY KEY REFERENCES pyembed.corpora ON DELETE CASCADE,
  chunks    bigint NOT NULL DEFAULT 0,
  total_len bigint NOT NULL DEFAULT 0
);

-- The chunks stored before this revision, indexed as the trigger indexes a new one
-- (pyembed._index_chunks, pyembed._count_postings): else a database upgraded with chunks in it
-- found none of them by keyword, and its frequencies counted only the chunks written since.
INSERT INTO pyembed.postings (corpus_id, lexeme, chunk_id, tf, doc_len)
SELECT ch.corpus_id, t.lexeme, ch.chunk_id, t.tf,
       sum(t.tf) OVER (PARTITION BY ch.corpus_id, ch.chunk_id)
  FROM pyembed.chunks ch
  JOIN pyembed.corpora c ON c.corpus_id = ch.corpus_id
 CROSS JOIN LATERAL (
   SELECT u.lexeme, coalesce(array_length(u.positions, 1), 1) AS tf
     FROM unnest(to_tsvector(c.text_config, ch.content)) u) t;
INSERT INTO pyembed.lexeme_stats (corpus_id, lexeme, df)
SELECT corpus_id, lexeme, count(*) FROM pyembed.postings GROUP BY corpus_id, lexeme;
INSERT INTO pyembed.keyword_stats (corpus_id, chunks, total_len)
SELECT corpus_id, count(DISTINCT chunk_id), sum(tf) FROM pyembed.postings GROUP BY corpus_id;
""")


def downgrade() -> None:
    run_sql("""
-- The sql/ objects built on these tables go with them (their triggers too).
DROP FUNCTION IF EXISTS pyembed.search_hybrid(text, text, vector, text, integer, jsonb, integer,
  integer), pyembed.search_keyword(text, text, integer, jsonb), pyembed._index_chunks(),
  pyembed._count_postings() CASCADE;
DROP TABLE pyembed.keyword_stats, pyembed.lexeme_stats, pyembed.postings;
ALTER TABLE pyembed.corpora DROP COLUMN text_config;
""")
