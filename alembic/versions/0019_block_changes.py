"""Keyword blocks change by the postings written, not rebuilt: a transaction's pending rows in order.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-04

At commit, each posting block a transaction had touched was rebuilt from pyembed.postings
unless one statement had inserted all of it: a delete spread over a corpus rebuilt nearly every
block of every common term, one index scan each. Deleted postings now come packed in the
pending rows as inserted ones do, and the commit applies each block's changes to the block as
stored (sql/060-keyword.sql, pyembed.bm25.merge): an id's last change wins, so the pending rows
of a transaction need an order, `seq`. One function counts chunk and document postings, for
inserts and deletes alike (its triggers name their transition table `changed`), so
pyembed._count_document_postings goes.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0019"
down_revision: str | Sequence[str] | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql("""
ALTER TABLE pyembed.keyword_pending ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY;
DROP FUNCTION IF EXISTS pyembed._count_document_postings() CASCADE;
""")


def downgrade() -> None:
    run_sql(f"""
DROP TRIGGER postings_count_insert ON pyembed.postings;
DROP TRIGGER postings_count_delete ON pyembed.postings;
DROP TRIGGER document_postings_count_insert ON pyembed.document_postings;
DROP TRIGGER document_postings_count_delete ON pyembed.document_postings;
DROP FUNCTION pyembed._merge_blocks(integer, integer[], bytea[], integer[], boolean[], bytea[]);
{BEFORE}
ALTER TABLE pyembed.keyword_pending DROP COLUMN seq;
""")


# As sql/060-keyword.sql had them before this revision.
BEFORE = r"""
CREATE OR REPLACE FUNCTION pyembed._count_postings() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET work_mem = '64MB'
AS $$
BEGIN
  -- Per lexeme and block of 512 ids (pyembed.posting_blocks): the counts add up by lexeme; new
  -- postings come packed as well (a block new at commit is stored as they are). The arrays of
  -- one aggregate have their elements in the same order (no order needed: a block's postings
  -- are scored in any order, and the commit sorts the blocks).
  IF TG_OP = 'INSERT' THEN
    INSERT INTO pyembed.keyword_pending (corpus_id, lexemes, blocks, dfs, postings, chunks,
                                         total_len, documents)
    SELECT l.corpus_id, l.lexemes, l.blocks, l.dfs, l.postings, t.chunks, t.total_len, false
      FROM (SELECT corpus_id, array_agg(lexeme) AS lexemes, array_agg(block) AS blocks,
                   array_agg(n) AS dfs, array_agg(postings) AS postings
              FROM (SELECT p.corpus_id, p.lexeme, p.chunk_id >> 9 AS block,
                           count(*)::integer AS n,
                           string_agg(int2send((p.chunk_id & 511)::smallint)
                                      || int4send(p.tf) || int4send(p.doc_len),
                                      ''::bytea) AS postings
                      FROM new_rows p GROUP BY 1, 2, 3) d GROUP BY corpus_id) l
      JOIN (SELECT corpus_id, count(DISTINCT chunk_id) AS chunks, sum(tf) AS total_len
              FROM new_rows GROUP BY corpus_id) t USING (corpus_id);
  ELSE
    INSERT INTO pyembed.keyword_pending (corpus_id, lexemes, blocks, dfs, chunks, total_len,
                                         documents)
    SELECT l.corpus_id, l.lexemes, l.blocks, l.dfs, -t.chunks, -t.total_len, false
      FROM (SELECT corpus_id, array_agg(lexeme) AS lexemes, array_agg(block) AS blocks,
                   array_agg(-n) AS dfs
              FROM (SELECT corpus_id, lexeme, chunk_id >> 9 AS block, count(*)::integer AS n
                      FROM old_rows GROUP BY 1, 2, 3) d GROUP BY corpus_id) l
      JOIN (SELECT corpus_id, count(DISTINCT chunk_id) AS chunks, sum(tf) AS total_len
              FROM old_rows GROUP BY corpus_id) t USING (corpus_id);
  END IF;
  RETURN NULL;
END
$$;

-- At commit (a deferred constraint trigger, once per pending row: the first folds them all).
-- Counts of a corpus dropped meanwhile are let go. Then the blocks the transaction touched
-- are rebuilt from the postings: first locked, all in one order (a new block is locked by its
-- insert), so that two committing writers never deadlock; then read by a statement of its
-- own, whose snapshot holds what every writer that held a block before committed (rebuilding
-- from an older one would drop their postings). A block inserted needs no second look: a
-- writer that inserts the same block later waits for this one and rebuilds it. Counters come
-- first, blocks second, each in one statement sorted by key (the arrays in between need no
-- order): every writer takes its locks in the same order.
CREATE OR REPLACE FUNCTION pyembed._apply_keyword_counts() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET work_mem = '64MB'
AS $$
DECLARE
  cs integer[];
  ls text[];
  bs bigint[];
  ps bytea[];  -- a block's new postings when one statement inserted them all, else NULL
  oc integer[];  -- the blocks this snapshot has
  ol text[];
  ob bigint[];
  raced boolean;
BEGIN
  WITH mine AS (
    DELETE FROM pyembed.keyword_pending p
     WHERE p.xact = pg_current_xact_id()
       AND EXISTS (SELECT FROM pyembed.corpora c WHERE c.corpus_id = p.corpus_id)
    RETURNING p.corpus_id, p.lexemes, p.blocks, p.dfs, p.postings, p.chunks, p.total_len,
              p.documents
  ), lexemes AS (
    INSERT INTO pyembed.lexeme_stats AS s (corpus_id, lexeme, df, document_df)
    SELECT m.corpus_id, u.lexeme, coalesce(sum(u.df) FILTER (WHERE NOT m.documents), 0),
           coalesce(sum(u.df) FILTER (WHERE m.documents), 0)
      FROM mine m, unnest(m.lexemes, m.dfs) AS u(lexeme, df)
     GROUP BY m.corpus_id, u.lexeme ORDER BY m.corpus_id, u.lexeme
    ON CONFLICT (corpus_id, lexeme) DO UPDATE
      SET df = s.df + EXCLUDED.df, document_df = s.document_df + EXCLUDED.document_df
  ), totals AS (
    INSERT INTO pyembed.keyword_stats AS s (corpus_id, chunks, total_len, documents,
                                            document_len)
    SELECT m.corpus_id, coalesce(sum(m.chunks) FILTER (WHERE NOT m.documents), 0),
           coalesce(sum(m.total_len) FILTER (WHERE NOT m.documents), 0),
           coalesce(sum(m.chunks) FILTER (WHERE m.documents), 0),
           coalesce(sum(m.total_len) FILTER (WHERE m.documents), 0)
      FROM mine m
     GROUP BY m.corpus_id ORDER BY m.corpus_id
    ON CONFLICT (corpus_id) DO UPDATE
      SET chunks = s.chunks + EXCLUDED.chunks, total_len = s.total_len + EXCLUDED.total_len,
          documents = s.documents + EXCLUDED.documents,
          document_len = s.document_len + EXCLUDED.document_len
  )
  SELECT array_agg(t.corpus_id), array_agg(t.lexeme), array_agg(t.block), array_agg(t.postings)
    INTO cs, ls, bs, ps
    FROM (SELECT m.corpus_id, u.lexeme, u.block,
                 CASE WHEN count(*) = 1 THEN (array_agg(u.postings))[1] END AS postings
            FROM mine m, unnest(m.lexemes, m.blocks, m.postings) AS u(lexeme, block, postings)
           GROUP BY 1, 2, 3) t;
  DELETE FROM pyembed.keyword_pending p WHERE p.xact = pg_current_xact_id();
  IF cs IS NULL THEN
    RETURN NULL;
  END IF;
  -- Blocks this snapshot has not got: built (from the statement's new postings when one
  -- statement of this transaction wrote all of the block's) and inserted at once. If a
  -- concurrent writer inserted one of them first (waited for, then left alone: ON CONFLICT),
  -- every block is rebuilt below; else only those this snapshot had.
  SELECT array_agg(t.corpus_id) FILTER (WHERE t.there),
         array_agg(t.lexeme) FILTER (WHERE t.there),
         array_agg(t.block) FILTER (WHERE t.there),
         array_agg(t.corpus_id) FILTER (WHERE NOT t.there),
         array_agg(t.lexeme) FILTER (WHERE NOT t.there),
         array_agg(t.block) FILTER (WHERE NOT t.there),
         array_agg(t.postings) FILTER (WHERE NOT t.there)
    INTO oc, ol, ob, cs, ls, bs, ps
    FROM (SELECT t.*, o.there IS NOT NULL AS there
            FROM unnest(cs, ls, bs, ps) AS t(corpus_id, lexeme, block, postings)
            LEFT JOIN LATERAL (SELECT true AS there FROM pyembed.posting_blocks o
                                WHERE o.corpus_id = t.corpus_id AND o.lexeme = t.lexeme
                                  AND o.block = t.block LIMIT 1) o ON true) t;
  IF cs IS NOT NULL THEN
    WITH built AS MATERIALIZED (
      SELECT t.corpus_id, t.lexeme, t.block, coalesce(t.postings, x.postings) AS postings
        FROM unnest(cs, ls, bs, ps) AS t(corpus_id, lexeme, block, postings)
        LEFT JOIN LATERAL (SELECT pyembed._packed_block(t.corpus_id, t.lexeme, t.block)
                                    AS postings
                            WHERE t.postings IS NULL) x ON true
    ), inserted AS (
      INSERT INTO pyembed.posting_blocks (corpus_id, lexeme, block, postings)
      SELECT * FROM built WHERE postings IS NOT NULL ORDER BY 1, 2, 3
      ON CONFLICT DO NOTHING
      RETURNING 1
    )
    SELECT (SELECT count(*) FROM built WHERE postings IS NOT NULL) > (SELECT count(*) FROM inserted)
      INTO raced;
    IF raced THEN  -- all of them
      SELECT array_agg(t.corpus_id), array_agg(t.lexeme), array_agg(t.block) INTO oc, ol, ob
        FROM (SELECT * FROM unnest(oc, ol, ob) UNION ALL SELECT * FROM unnest(cs, ls, bs))
          AS t(corpus_id, lexeme, block);
    END IF;
  END IF;
  cs := oc;
  ls := ol;
  bs := ob;
  IF cs IS NULL THEN
    RETURN NULL;
  END IF;
  -- The others: locked, then rebuilt by a statement of its own.
  PERFORM FROM pyembed.posting_blocks b
    JOIN unnest(cs, ls, bs) AS t(corpus_id, lexeme, block)
      ON b.corpus_id = t.corpus_id AND b.lexeme = t.lexeme AND b.block = t.block
   ORDER BY b.corpus_id, b.lexeme, b.block FOR UPDATE OF b;
  WITH built AS (
    SELECT t.corpus_id, t.lexeme, t.block, x.postings
      FROM unnest(cs, ls, bs) AS t(corpus_id, lexeme, block),
           LATERAL (SELECT pyembed._packed_block(t.corpus_id, t.lexeme, t.block) AS postings) x
  ), emptied AS (
    DELETE FROM pyembed.posting_blocks b USING built n
     WHERE n.postings IS NULL AND b.corpus_id = n.corpus_id AND b.lexeme = n.lexeme
       AND b.block = n.block
  )
  UPDATE pyembed.posting_blocks b SET postings = n.postings
    FROM built n
   WHERE n.postings IS NOT NULL AND b.corpus_id = n.corpus_id AND b.lexeme = n.lexeme
     AND b.block = n.block AND b.postings <> n.postings;
  RETURN NULL;
END
$$;

-- The same for document postings (pending rows with `documents`, counting documents).
CREATE OR REPLACE FUNCTION pyembed._count_document_postings() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET work_mem = '64MB'
AS $$
BEGIN
  -- As in pyembed._count_postings, by blocks of 512 doc_no (numbered -1 - doc_no >> 9).
  IF TG_OP = 'INSERT' THEN
    INSERT INTO pyembed.keyword_pending (corpus_id, lexemes, blocks, dfs, postings, chunks,
                                         total_len, documents)
    SELECT l.corpus_id, l.lexemes, l.blocks, l.dfs, l.postings, t.docs, t.total_len, true
      FROM (SELECT corpus_id, array_agg(lexeme) AS lexemes, array_agg(block) AS blocks,
                   array_agg(n) AS dfs, array_agg(postings) AS postings
              FROM (SELECT p.corpus_id, p.lexeme, -1 - (p.doc_no >> 9) AS block,
                           count(*)::integer AS n,
                           string_agg(int2send((p.doc_no & 511)::smallint)
                                      || int4send(p.tf) || int4send(p.doc_len),
                                      ''::bytea) AS postings
                      FROM new_rows p GROUP BY 1, 2, 3) d GROUP BY corpus_id) l
      JOIN (SELECT corpus_id, count(DISTINCT doc_no) AS docs, sum(tf) AS total_len
              FROM new_rows GROUP BY corpus_id) t USING (corpus_id);
  ELSE
    INSERT INTO pyembed.keyword_pending (corpus_id, lexemes, blocks, dfs, chunks, total_len,
                                         documents)
    SELECT l.corpus_id, l.lexemes, l.blocks, l.dfs, -t.docs, -t.total_len, true
      FROM (SELECT corpus_id, array_agg(lexeme) AS lexemes, array_agg(block) AS blocks,
                   array_agg(-n) AS dfs
              FROM (SELECT corpus_id, lexeme, -1 - (doc_no >> 9) AS block, count(*)::integer AS n
                      FROM old_rows GROUP BY 1, 2, 3) d GROUP BY corpus_id) l
      JOIN (SELECT corpus_id, count(DISTINCT doc_no) AS docs, sum(tf) AS total_len
              FROM old_rows GROUP BY corpus_id) t USING (corpus_id);
  END IF;
  RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER document_postings_count_insert
  AFTER INSERT ON pyembed.document_postings REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._count_document_postings();
CREATE OR REPLACE TRIGGER document_postings_count_delete
  AFTER DELETE ON pyembed.document_postings REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._count_document_postings();

CREATE OR REPLACE TRIGGER postings_count_insert
  AFTER INSERT ON pyembed.postings REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._count_postings();
CREATE OR REPLACE TRIGGER postings_count_delete
  AFTER DELETE ON pyembed.postings REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._count_postings();
"""
