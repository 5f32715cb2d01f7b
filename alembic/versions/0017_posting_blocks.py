"""Keyword postings also packed in blocks, so that BM25 reads a term's postings in bulk.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-04

BM25 scores every posting of the query's terms. Read one index tuple at a time from
pyembed.postings, that cost grows with the postings, and a large corpus's query has many.
pyembed.posting_blocks holds the same postings packed, one row per corpus, lexeme and block of
512 chunk ids (block = chunk_id >> 9; the document postings of revision 0016 in blocks of 512
doc_no, numbered -1 - doc_no >> 9): 10 bytes a posting (the id's place in its block int2, tf
int4, doc_len int4, big-endian), at most 5 KiB a row, kept in line and uncompressed (STORAGE
PLAIN). A search reads a few hundred rows a term and scores them with
numpy (pyembed.bm25).

The blocks follow the postings at commit: each statement that writes postings records the
blocks it touched in keyword_pending (the new column `blocks`, beside `lexemes`; `postings`: the
new postings, packed), and the commit trigger that folds the counts stores a new block as one
statement packed it, or rebuilds the block from pyembed.postings, locking it first in one order
(no deadlock), then reading with a fresh snapshot (no lost update). pyembed.postings
stays the source the blocks are built from (and what a transaction's own searches read for the
blocks it has changed but not committed).
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0017"
down_revision: str | Sequence[str] | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql("""
CREATE TABLE pyembed.posting_blocks (
  corpus_id integer NOT NULL REFERENCES pyembed.corpora ON DELETE CASCADE,
  lexeme    text NOT NULL,
  block     bigint NOT NULL,
  postings  bytea NOT NULL CHECK (length(postings) BETWEEN 10 AND 5120
                                  AND length(postings) % 10 = 0),
  PRIMARY KEY (corpus_id, lexeme, block)
);
ALTER TABLE pyembed.posting_blocks ALTER COLUMN postings SET STORAGE PLAIN;
ALTER TABLE pyembed.posting_blocks ENABLE ROW LEVEL SECURITY;
ALTER TABLE pyembed.posting_blocks FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant ON pyembed.posting_blocks
  USING (corpus_id IN (SELECT unnest(pyembed.visible_corpora())));
ALTER TABLE pyembed.posting_blocks OWNER TO pyembed_owner;
ALTER TABLE pyembed.keyword_pending ADD COLUMN blocks bigint[] NOT NULL DEFAULT '{}',
  ADD COLUMN postings bytea[];

INSERT INTO pyembed.posting_blocks (corpus_id, lexeme, block, postings)
SELECT p.corpus_id, p.lexeme, p.chunk_id >> 9,
       string_agg(int2send((p.chunk_id & 511)::smallint) || int4send(p.tf)
                  || int4send(p.doc_len), ''::bytea ORDER BY p.chunk_id)
  FROM pyembed.postings p
 GROUP BY p.corpus_id, p.lexeme, p.chunk_id >> 9;
INSERT INTO pyembed.posting_blocks (corpus_id, lexeme, block, postings)
SELECT p.corpus_id, p.lexeme, -1 - (p.doc_no >> 9),
       string_agg(int2send((p.doc_no & 511)::smallint) || int4send(p.tf)
                  || int4send(p.doc_len), ''::bytea ORDER BY p.doc_no)
  FROM pyembed.document_postings p
 GROUP BY p.corpus_id, p.lexeme, -1 - (p.doc_no >> 9);
""")


def downgrade() -> None:
    run_sql(f"""
DROP FUNCTION IF EXISTS pyembed._bm25_top(bytea, bigint[], integer[], integer[], float8[], float8,
                                          integer);
{BEFORE}
DROP TABLE pyembed.posting_blocks;
ALTER TABLE pyembed.keyword_pending DROP COLUMN blocks, DROP COLUMN postings;
""")


# What sql/060-keyword.sql had before this revision (writes must not reach for the blocks).
BEFORE = r"""
DROP FUNCTION IF EXISTS pyembed._bm25(pyembed.corpora, text, integer, jsonb, boolean);
DROP FUNCTION IF EXISTS pyembed._packed_block(integer, text, bigint);
CREATE OR REPLACE FUNCTION pyembed._count_postings() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO pyembed.keyword_pending (corpus_id, lexemes, dfs, chunks, total_len)
    SELECT l.corpus_id, l.lexemes, l.dfs, t.chunks, t.total_len
      FROM (SELECT corpus_id, array_agg(lexeme ORDER BY lexeme) AS lexemes,
                   array_agg(n ORDER BY lexeme) AS dfs
              FROM (SELECT corpus_id, lexeme, count(*)::integer AS n FROM new_rows
                     GROUP BY corpus_id, lexeme) d GROUP BY corpus_id) l
      JOIN (SELECT corpus_id, count(DISTINCT chunk_id) AS chunks, sum(tf) AS total_len
              FROM new_rows GROUP BY corpus_id) t USING (corpus_id);
  ELSE
    INSERT INTO pyembed.keyword_pending (corpus_id, lexemes, dfs, chunks, total_len)
    SELECT l.corpus_id, l.lexemes, l.dfs, -t.chunks, -t.total_len
      FROM (SELECT corpus_id, array_agg(lexeme ORDER BY lexeme) AS lexemes,
                   array_agg(-n ORDER BY lexeme) AS dfs
              FROM (SELECT corpus_id, lexeme, count(*)::integer AS n FROM old_rows
                     GROUP BY corpus_id, lexeme) d GROUP BY corpus_id) l
      JOIN (SELECT corpus_id, count(DISTINCT chunk_id) AS chunks, sum(tf) AS total_len
              FROM old_rows GROUP BY corpus_id) t USING (corpus_id);
  END IF;
  RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION pyembed._apply_keyword_counts() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET work_mem = '64MB'
AS $$
BEGIN
  WITH mine AS (
    DELETE FROM pyembed.keyword_pending p
     WHERE p.xact = pg_current_xact_id()
       AND EXISTS (SELECT FROM pyembed.corpora c WHERE c.corpus_id = p.corpus_id)
    RETURNING p.corpus_id, p.lexemes, p.dfs, p.chunks, p.total_len, p.documents
  ), lexemes AS (
    INSERT INTO pyembed.lexeme_stats AS s (corpus_id, lexeme, df, document_df)
    SELECT m.corpus_id, u.lexeme, coalesce(sum(u.df) FILTER (WHERE NOT m.documents), 0),
           coalesce(sum(u.df) FILTER (WHERE m.documents), 0)
      FROM mine m, unnest(m.lexemes, m.dfs) AS u(lexeme, df)
     GROUP BY m.corpus_id, u.lexeme ORDER BY m.corpus_id, u.lexeme
    ON CONFLICT (corpus_id, lexeme) DO UPDATE
      SET df = s.df + EXCLUDED.df, document_df = s.document_df + EXCLUDED.document_df
  )
  INSERT INTO pyembed.keyword_stats AS s (corpus_id, chunks, total_len, documents, document_len)
  SELECT m.corpus_id, coalesce(sum(m.chunks) FILTER (WHERE NOT m.documents), 0),
         coalesce(sum(m.total_len) FILTER (WHERE NOT m.documents), 0),
         coalesce(sum(m.chunks) FILTER (WHERE m.documents), 0),
         coalesce(sum(m.total_len) FILTER (WHERE m.documents), 0)
    FROM mine m
   GROUP BY m.corpus_id ORDER BY m.corpus_id
  ON CONFLICT (corpus_id) DO UPDATE
    SET chunks = s.chunks + EXCLUDED.chunks, total_len = s.total_len + EXCLUDED.total_len,
        documents = s.documents + EXCLUDED.documents,
        document_len = s.document_len + EXCLUDED.document_len;
  DELETE FROM pyembed.keyword_pending p WHERE p.xact = pg_current_xact_id();
  RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION pyembed._count_document_postings() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO pyembed.keyword_pending (corpus_id, lexemes, dfs, chunks, total_len, documents)
    SELECT l.corpus_id, l.lexemes, l.dfs, t.docs, t.total_len, true
      FROM (SELECT corpus_id, array_agg(lexeme ORDER BY lexeme) AS lexemes,
                   array_agg(n ORDER BY lexeme) AS dfs
              FROM (SELECT corpus_id, lexeme, count(*)::integer AS n FROM new_rows
                     GROUP BY corpus_id, lexeme) d GROUP BY corpus_id) l
      JOIN (SELECT corpus_id, count(DISTINCT doc_no) AS docs, sum(tf) AS total_len
              FROM new_rows GROUP BY corpus_id) t USING (corpus_id);
  ELSE
    INSERT INTO pyembed.keyword_pending (corpus_id, lexemes, dfs, chunks, total_len, documents)
    SELECT l.corpus_id, l.lexemes, l.dfs, -t.docs, -t.total_len, true
      FROM (SELECT corpus_id, array_agg(lexeme ORDER BY lexeme) AS lexemes,
                   array_agg(-n ORDER BY lexeme) AS dfs
              FROM (SELECT corpus_id, lexeme, count(*)::integer AS n FROM old_rows
                     GROUP BY corpus_id, lexeme) d GROUP BY corpus_id) l
      JOIN (SELECT corpus_id, count(DISTINCT doc_no) AS docs, sum(tf) AS total_len
              FROM old_rows GROUP BY corpus_id) t USING (corpus_id);
  END IF;
  RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION pyembed._bm25(c pyembed.corpora, query text, n integer, filter jsonb,
                                         every_posting_upto bigint DEFAULT 30000,
                                         by_document boolean DEFAULT false,
                                         OUT ids bigint[], OUT scores float8[])
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $$
DECLARE
  total float8;
  avgdl float8;
  lx text[];        -- the query's terms that occur in the corpus, rarest first
  w float8[];       -- their idf
  m integer;        -- how many
  postings bigint;  -- how many postings they have
  t integer;        -- terms t..e are read next
  e integer;
  tail integer;     -- terms tail..m stay unread
  rest float8;      -- what the unread terms could add to a score, at most
  theta float8;     -- a lower bound of the n-th best score (NULL: fewer than n candidates)
  cids bigint[];    -- candidates: chunks a read term matches
  cps float8[];     -- their partial scores
  done integer;     -- candidates looked up so far
  batch integer := greatest(4 * n, 100);
BEGIN
  SELECT CASE WHEN by_document THEN s.documents ELSE s.chunks END::float8,
         CASE WHEN by_document THEN s.document_len::float8 / greatest(s.documents, 1)
              ELSE s.total_len::float8 / greatest(s.chunks, 1) END INTO total, avgdl
    FROM pyembed.keyword_stats s WHERE s.corpus_id = c.corpus_id;
  SELECT array_agg(t.lexeme ORDER BY t.df, t.lexeme), array_agg(t.idf ORDER BY t.df, t.lexeme),
         count(*) FILTER (WHERE t.df <= total / 20), sum(t.df)
    INTO lx, w, e, postings
    FROM (SELECT l.lexeme, l.df, ln(1 + (total - l.df + 0.5) / (l.df + 0.5::float8)) AS idf
            FROM (SELECT DISTINCT u.lexeme FROM unnest(to_tsvector(c.text_config, query)) u) q
            JOIN (SELECT ls.lexeme, CASE WHEN by_document THEN ls.document_df ELSE ls.df END AS df
                    FROM pyembed.lexeme_stats ls WHERE ls.corpus_id = c.corpus_id) l
              ON l.lexeme = q.lexeme
           WHERE l.df > 0) t;
  m := coalesce(cardinality(lx), 0);
  IF m = 0 THEN
    RETURN;
  END IF;
  IF postings <= every_posting_upto THEN
    SELECT array_agg(f.chunk_id ORDER BY f.s DESC, f.chunk_id),
           array_agg(f.s ORDER BY f.s DESC, f.chunk_id) INTO ids, scores
      FROM (SELECT x.chunk_id, x.s
              FROM (SELECT p.chunk_id,
                           sum(r.idf * p.tf * 2.2 / (p.tf + 1.2 * (0.25 + 0.75::float8 * p.doc_len
                                                                   / avgdl))) AS s
                      FROM unnest(lx, w) AS r(lexeme, idf),
                           LATERAL (SELECT pp.chunk_id, pp.tf, pp.doc_len FROM pyembed.postings pp
                                     WHERE NOT by_document AND pp.corpus_id = c.corpus_id
                                       AND pp.lexeme = r.lexeme
                                    UNION ALL
                                    SELECT dp.doc_no, dp.tf, dp.doc_len
                                      FROM pyembed.document_postings dp
                                     WHERE by_document AND dp.corpus_id = c.corpus_id
                                       AND dp.lexeme = r.lexeme
                                    OFFSET 0) p
                     GROUP BY p.chunk_id) x
             WHERE filter IS NULL OR (NOT by_document AND EXISTS (
                     SELECT FROM pyembed.chunks ch WHERE ch.corpus_id = c.corpus_id
                        AND ch.chunk_id = x.chunk_id AND ch.metadata @> filter))
                OR (by_document AND EXISTS (
                     SELECT FROM pyembed.documents d WHERE d.corpus_id = c.corpus_id
                        AND d.doc_no = x.chunk_id AND d.metadata @> filter))
             ORDER BY 2 DESC, 1 LIMIT n) f;
    RETURN;
  END IF;
  t := 1;
  e := greatest(e, 1);
  LOOP
    -- Terms t..e read in full (each term's postings in a sub-query of their own: OFFSET 0 keeps
    -- the planner from flattening it), their parts added to the candidates' partial scores.
    SELECT array_agg(x.chunk_id), array_agg(x.s) INTO cids, cps
      FROM (SELECT y.chunk_id, sum(y.s) AS s
              FROM (SELECT o.chunk_id, o.s FROM unnest(cids, cps) AS o(chunk_id, s)
                    UNION ALL
                    SELECT p.chunk_id,
                           r.idf * p.tf * 2.2 / (p.tf + 1.2 * (0.25 + 0.75::float8 * p.doc_len
                                                               / avgdl))
                      FROM unnest(lx[t:e], w[t:e]) AS r(lexeme, idf),
                           LATERAL (SELECT pp.chunk_id, pp.tf, pp.doc_len FROM pyembed.postings pp
                                     WHERE NOT by_document AND pp.corpus_id = c.corpus_id
                                       AND pp.lexeme = r.lexeme
                                    UNION ALL
                                    SELECT dp.doc_no, dp.tf, dp.doc_len
                                      FROM pyembed.document_postings dp
                                     WHERE by_document AND dp.corpus_id = c.corpus_id
                                       AND dp.lexeme = r.lexeme
                                    OFFSET 0) p) y
             GROUP BY y.chunk_id) x
     WHERE filter IS NULL OR (NOT by_document AND EXISTS (
             SELECT FROM pyembed.chunks ch WHERE ch.corpus_id = c.corpus_id
                AND ch.chunk_id = x.chunk_id AND ch.metadata @> filter))
        OR (by_document AND EXISTS (
             SELECT FROM pyembed.documents d WHERE d.corpus_id = c.corpus_id
                AND d.doc_no = x.chunk_id AND d.metadata @> filter));
    IF e >= m THEN  -- every term read: the partial scores are the scores
      SELECT array_agg(f.chunk_id ORDER BY f.s DESC, f.chunk_id),
             array_agg(f.s ORDER BY f.s DESC, f.chunk_id) INTO ids, scores
        FROM (SELECT o.chunk_id, o.s FROM unnest(cids, cps) AS o(chunk_id, s)
               ORDER BY 2 DESC, 1 LIMIT n) f;
      RETURN;
    END IF;
    SELECT f.s INTO theta
      FROM (SELECT o.chunk_id, o.s + coalesce(sum(r.idf * p.tf * 2.2
                     / (p.tf + 1.2 * (0.25 + 0.75::float8 * p.doc_len / avgdl))), 0) AS s
              FROM (SELECT o.chunk_id, o.s FROM unnest(cids, cps) AS o(chunk_id, s)
                     ORDER BY 2 DESC, 1 LIMIT 2 * n) o
              CROSS JOIN unnest(lx[e + 1:m], w[e + 1:m]) AS r(lexeme, idf)
              LEFT JOIN LATERAL (
                    SELECT pp.tf, pp.doc_len FROM pyembed.postings pp
                     WHERE NOT by_document AND pp.corpus_id = c.corpus_id AND pp.lexeme = r.lexeme
                       AND pp.chunk_id = o.chunk_id
                    UNION ALL
                    SELECT dp.tf, dp.doc_len FROM pyembed.document_postings dp
                     WHERE by_document AND dp.corpus_id = c.corpus_id AND dp.lexeme = r.lexeme
                       AND dp.doc_no = o.chunk_id) p ON true
             GROUP BY o.chunk_id, o.s) f
     ORDER BY f.s DESC OFFSET n - 1 LIMIT 1;
    IF NOT FOUND THEN
      theta := NULL;
    END IF;
    -- The longest tail whose parts add up to less than 0.8 theta (theta NULL: read one more term).
    SELECT coalesce(min(z.i), CASE WHEN theta IS NULL THEN e + 2 ELSE m + 1 END) INTO tail
      FROM (SELECT u.i, sum(u.idf) OVER (ORDER BY u.i DESC) * 2.2 AS part
              FROM unnest(w) WITH ORDINALITY AS u(idf, i) WHERE u.i > e) z
     WHERE z.part < 0.8 * theta;
    EXIT WHEN tail = e + 1;
    t := e + 1;
    e := least(tail - 1, m);
  END LOOP;
  SELECT sum(u.idf) * 2.2 INTO rest FROM unnest(w[e + 1:m]) AS u(idf);
  SELECT array_agg(o.chunk_id ORDER BY o.s DESC, o.chunk_id),
         array_agg(o.s ORDER BY o.s DESC, o.chunk_id) INTO cids, cps
    FROM unnest(cids, cps) AS o(chunk_id, s) WHERE o.s + rest >= theta - 1e-9;
  done := 0;
  LOOP
    EXIT WHEN done >= coalesce(cardinality(cids), 0) OR cps[done + 1] + rest < theta - 1e-9;
    SELECT array_agg(f.chunk_id ORDER BY f.s DESC, f.chunk_id),
           array_agg(f.s ORDER BY f.s DESC, f.chunk_id) INTO ids, scores
      FROM (SELECT h.chunk_id, h.s FROM unnest(ids, scores) AS h(chunk_id, s)
            UNION ALL
            SELECT o.chunk_id, o.s + coalesce(sum(r.idf * p.tf * 2.2
                     / (p.tf + 1.2 * (0.25 + 0.75::float8 * p.doc_len / avgdl))), 0) AS s
              FROM unnest(cids[done + 1:done + batch], cps[done + 1:done + batch])
                     AS o(chunk_id, s)
              CROSS JOIN unnest(lx[e + 1:m], w[e + 1:m]) AS r(lexeme, idf)
              LEFT JOIN LATERAL (
                    SELECT pp.tf, pp.doc_len FROM pyembed.postings pp
                     WHERE NOT by_document AND pp.corpus_id = c.corpus_id AND pp.lexeme = r.lexeme
                       AND pp.chunk_id = o.chunk_id
                    UNION ALL
                    SELECT dp.tf, dp.doc_len FROM pyembed.document_postings dp
                     WHERE by_document AND dp.corpus_id = c.corpus_id AND dp.lexeme = r.lexeme
                       AND dp.doc_no = o.chunk_id) p ON true
             GROUP BY o.chunk_id, o.s
             ORDER BY 2 DESC, 1 LIMIT n) f;
    done := done + batch;
    IF cardinality(ids) >= n THEN
      theta := greatest(theta, scores[n]);
    END IF;
  END LOOP;
END
$$;
"""
