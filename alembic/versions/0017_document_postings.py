"""Keyword search scores documents by their whole text: BM25 postings per document.

Revision ID: 0017
Revises: 0015
Create Date: 2026-12-04

Chunked corpora scored a document by its best chunk: a document whose query terms sit in
different chunks lost to one that has them in one, and chunk statistics (chunk lengths, chunk
frequencies) stood in for the document's. Documents get a number (doc_no) and postings of
their own, from their text without the overlap chunking adds (sql/060-keyword.sql,
pyembed._document_terms), with document frequencies (lexeme_stats.document_df) and totals
(keyword_stats.documents, document_len) kept at commit as the chunks' are (keyword_pending rows
with `documents`). Like postings, the table belongs to pyembed_owner with forced row-level
security: the application role reaches it only through the search functions. Existing
corpora are indexed here, from their chunks (no embedding involved).
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0017"
down_revision: str | Sequence[str] | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql("""
ALTER TABLE pyembed.documents ADD COLUMN doc_no bigint GENERATED ALWAYS AS IDENTITY;
CREATE UNIQUE INDEX documents_doc_no ON pyembed.documents (corpus_id, doc_no);

-- One row per (lexeme, document): as pyembed.postings, per document.
CREATE TABLE pyembed.document_postings (
  corpus_id integer NOT NULL,
  lexeme    text NOT NULL,
  doc_no    bigint NOT NULL,
  tf        integer NOT NULL CHECK (tf > 0),
  doc_len   integer NOT NULL CHECK (doc_len > 0),
  PRIMARY KEY (corpus_id, lexeme, doc_no) INCLUDE (tf, doc_len)
);
CREATE INDEX document_postings_doc ON pyembed.document_postings (corpus_id, doc_no);
ALTER TABLE pyembed.document_postings ENABLE ROW LEVEL SECURITY;
ALTER TABLE pyembed.document_postings FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant ON pyembed.document_postings
  USING (corpus_id IN (SELECT unnest(pyembed.visible_corpora())));
ALTER TABLE pyembed.document_postings OWNER TO pyembed_owner;

ALTER TABLE pyembed.lexeme_stats ADD COLUMN document_df integer NOT NULL DEFAULT 0;
ALTER TABLE pyembed.keyword_stats ADD COLUMN documents bigint NOT NULL DEFAULT 0,
  ADD COLUMN document_len bigint NOT NULL DEFAULT 0;
-- A pending row counts document postings (documents) or chunk postings.
ALTER TABLE pyembed.keyword_pending ADD COLUMN documents boolean NOT NULL DEFAULT false;
""")
    # The documents already stored, as pyembed._document_terms indexes them.
    run_sql("""
INSERT INTO pyembed.document_postings (corpus_id, doc_no, lexeme, tf, doc_len)
  WITH words AS (
    SELECT ch.corpus_id, d.doc_no, c.text_config, c.chunk_overlap, x.w,
           lag(x.w) OVER (PARTITION BY ch.corpus_id, ch.document_id ORDER BY ch.chunk_index)
             AS prev
      FROM pyembed.chunks ch
      JOIN pyembed.corpora c ON c.corpus_id = ch.corpus_id
      JOIN pyembed.documents d ON d.corpus_id = ch.corpus_id AND d.document_id = ch.document_id
      CROSS JOIN LATERAL (SELECT array_remove(regexp_split_to_array(ch.content, '\\s+'), '')
                                   AS w) x
  ), segments AS (  -- the overlap starts where the previous chunk has this one's first word
    SELECT w.corpus_id, w.doc_no, w.text_config,
           w.w[1 + coalesce((SELECT max(cardinality(w.prev) - j + 1)
                               FROM generate_series(greatest(1, cardinality(w.prev)
                                                                - w.chunk_overlap + 1),
                                                    cardinality(w.prev)) j
                              WHERE w.prev[j] = w.w[1]
                                AND w.prev[j:] = w.w[:cardinality(w.prev) - j + 1]), 0):] AS w
      FROM words w
  ), terms AS (
    SELECT s.corpus_id, s.doc_no, u.lexeme,
           sum(coalesce(array_length(u.positions, 1), 1))::integer AS tf
      FROM segments s
      CROSS JOIN LATERAL unnest(to_tsvector(s.text_config, array_to_string(s.w, ' '))) u
     GROUP BY s.corpus_id, s.doc_no, u.lexeme
  )
  SELECT t.corpus_id, t.doc_no, t.lexeme, t.tf,
         (sum(t.tf) OVER (PARTITION BY t.corpus_id, t.doc_no))::integer
    FROM terms t;
UPDATE pyembed.lexeme_stats l SET document_df = n.df
  FROM (SELECT corpus_id, lexeme, count(*)::integer AS df FROM pyembed.document_postings
         GROUP BY corpus_id, lexeme) n
 WHERE l.corpus_id = n.corpus_id AND l.lexeme = n.lexeme;
INSERT INTO pyembed.lexeme_stats (corpus_id, lexeme, df, document_df)
SELECT corpus_id, lexeme, 0, count(*) FROM pyembed.document_postings p
 WHERE NOT EXISTS (SELECT FROM pyembed.lexeme_stats l
                    WHERE l.corpus_id = p.corpus_id AND l.lexeme = p.lexeme)
 GROUP BY corpus_id, lexeme;
INSERT INTO pyembed.keyword_stats AS s (corpus_id, documents, document_len)
SELECT corpus_id, count(DISTINCT doc_no), sum(tf) FROM pyembed.document_postings
 GROUP BY corpus_id
ON CONFLICT (corpus_id) DO UPDATE
  SET documents = EXCLUDED.documents, document_len = EXCLUDED.document_len;
""")


def downgrade() -> None:
    run_sql("""
-- The sql/ objects built on these (their triggers too) go with them; the next install
-- re-creates the functions the older revision knows.
DROP FUNCTION IF EXISTS pyembed._index_documents() CASCADE;
DROP FUNCTION IF EXISTS pyembed._documents_deleted() CASCADE;
DROP FUNCTION IF EXISTS pyembed._count_document_postings() CASCADE;
DROP FUNCTION IF EXISTS pyembed._document_terms(integer[], text[]);
DROP FUNCTION IF EXISTS pyembed._keyword_passages(pyembed.corpora, text, text[]);
DROP TABLE pyembed.document_postings;
ALTER TABLE pyembed.keyword_pending DROP COLUMN documents;
ALTER TABLE pyembed.keyword_stats DROP COLUMN documents, DROP COLUMN document_len;
ALTER TABLE pyembed.lexeme_stats DROP COLUMN document_df;
ALTER TABLE pyembed.documents DROP COLUMN doc_no;
""")
