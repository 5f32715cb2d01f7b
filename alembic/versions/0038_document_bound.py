"""A bound on one document's size: corpora.max_document_chunks; keyword postings in NFC.

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

Keyword search tokenises texts in Unicode normal form NFC (sql/060-keyword.sql): a query typed
in NFC did not find a document stored in NFD. The postings of every chunk whose text is not in
NFC, and of its document, are made again here as 060 now makes them, for each tenant in turn (an
installer that may act for tenants, a superuser or an operator, reaches them all; another
reaches the rows it sees). The downgrade keeps them: a query in NFC still finds them.
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
    run_sql(DOCUMENT_TERMS)
    run_sql(REINDEX_NFC)


# As sql/060-keyword.sql has it from this revision (its words tokenised in NFC).
DOCUMENT_TERMS = r"""
CREATE OR REPLACE FUNCTION pyembed._document_terms(corpus_ids integer[], document_ids text[])
RETURNS TABLE (corpus_id integer, doc_no bigint, lexeme text, tf integer, doc_len integer)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
  WITH words AS (
    SELECT ch.corpus_id, d.doc_no, c.text_config, c.chunk_overlap, x.w,
           lag(x.w) OVER (PARTITION BY ch.corpus_id, ch.document_id ORDER BY ch.chunk_index)
             AS prev
      FROM unnest(corpus_ids, document_ids) AS a(corpus_id, document_id)
      JOIN pyembed.documents d ON d.corpus_id = a.corpus_id AND d.document_id = a.document_id
      JOIN pyembed.corpora c ON c.corpus_id = a.corpus_id
      JOIN pyembed.chunks ch ON ch.corpus_id = a.corpus_id AND ch.document_id = a.document_id
      -- split at pyembed.text.SPACES, the chunker's (the locale's \s is not Python's)
      CROSS JOIN LATERAL (SELECT array_remove(regexp_split_to_array(ch.content,
               '[\u0009-\u000D\u001C-\u0020\u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]+'), '')
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
      CROSS JOIN LATERAL unnest(to_tsvector(s.text_config,
                                          normalize(array_to_string(s.w, ' '), NFC))) u
     GROUP BY s.corpus_id, s.doc_no, u.lexeme
  )
  SELECT t.corpus_id, t.doc_no, t.lexeme, t.tf,
         (sum(t.tf) OVER (PARTITION BY t.corpus_id, t.doc_no))::integer
    FROM terms t
$$;
"""  # noqa: E501 (the file's line, as it is)

REINDEX_NFC = """
DO $nfc$
DECLARE
  tenant text;
  cids integer[];
  dids text[];
BEGIN
  FOR tenant IN SELECT '' UNION ALL SELECT t.name FROM pyembed.tenants t LOOP
    PERFORM set_config('pyembed.act_as_tenant', tenant, true);
    CREATE TEMP TABLE pyembed_not_nfc ON COMMIT DROP AS
      SELECT ch.corpus_id, ch.chunk_id, ch.document_id, ch.content FROM pyembed.chunks ch
       WHERE NOT ch.content IS NFC NORMALIZED;
    DELETE FROM pyembed.postings p USING pyembed_not_nfc x
     WHERE p.corpus_id = x.corpus_id AND p.chunk_id = x.chunk_id;
    INSERT INTO pyembed.postings (corpus_id, lexeme, chunk_id, tf, doc_len)
    SELECT x.corpus_id, t.lexeme, x.chunk_id, t.tf, sum(t.tf) OVER (PARTITION BY x.chunk_id)
      FROM pyembed_not_nfc x
      JOIN pyembed.corpora c ON c.corpus_id = x.corpus_id
      CROSS JOIN LATERAL (
        SELECT u.lexeme, coalesce(array_length(u.positions, 1), 1) AS tf
          FROM unnest(to_tsvector(c.text_config, normalize(x.content, NFC))) u) t;
    SELECT array_agg(d.corpus_id), array_agg(d.document_id) INTO cids, dids
      FROM (SELECT DISTINCT x.corpus_id, x.document_id FROM pyembed_not_nfc x) d;
    IF cids IS NOT NULL THEN
      DELETE FROM pyembed.document_postings p
       USING unnest(cids, dids) AS a(corpus_id, document_id), pyembed.documents d
       WHERE d.corpus_id = a.corpus_id AND d.document_id = a.document_id
         AND p.corpus_id = d.corpus_id AND p.doc_no = d.doc_no;
      INSERT INTO pyembed.document_postings (corpus_id, lexeme, doc_no, tf, doc_len)
      SELECT t.corpus_id, t.lexeme, t.doc_no, t.tf, t.doc_len
        FROM pyembed._document_terms(cids, dids) t;
    END IF;
    DROP TABLE pyembed_not_nfc;
  END LOOP;
  PERFORM set_config('pyembed.act_as_tenant', '', true);
END
$nfc$;
"""


def downgrade() -> None:
    run_sql("""
DROP TRIGGER IF EXISTS chunks_bound_insert ON pyembed.chunks;
DROP TRIGGER IF EXISTS chunks_bound_update ON pyembed.chunks;
DROP FUNCTION IF EXISTS pyembed._chunks_bounded();
DROP FUNCTION IF EXISTS pyembed._document_size_problem(integer, text, bigint, bigint);
ALTER TABLE pyembed.corpora DROP COLUMN max_document_chunks;
""")
