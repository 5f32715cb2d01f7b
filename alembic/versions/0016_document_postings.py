"""Keyword search scores documents by their whole text: BM25 postings per document.

Revision ID: 0016
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

revision: str = "0016"
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
    # The functions that read what this downgrade drops go back to what they were before it
    # (head's would fail every keyword search and every chunk write until an older pyembed
    # reinstalls its own).
    run_sql("""
DROP FUNCTION IF EXISTS pyembed._index_documents() CASCADE;
DROP FUNCTION IF EXISTS pyembed._documents_deleted() CASCADE;
DROP FUNCTION IF EXISTS pyembed._count_document_postings() CASCADE;
DROP FUNCTION IF EXISTS pyembed._document_terms(integer[], text[]);
DROP FUNCTION IF EXISTS pyembed._keyword_passages(pyembed.corpora, text, text[]);
DROP FUNCTION IF EXISTS pyembed._keyword_ranking(pyembed.corpora, text, integer, jsonb, text,
                                                 boolean);
DROP FUNCTION IF EXISTS pyembed._bm25(pyembed.corpora, text, integer, jsonb, bigint, boolean);
""")
    run_sql(BEFORE)
    run_sql("""
DROP TABLE pyembed.document_postings;
ALTER TABLE pyembed.keyword_pending DROP COLUMN documents;
ALTER TABLE pyembed.keyword_stats DROP COLUMN documents, DROP COLUMN document_len;
ALTER TABLE pyembed.lexeme_stats DROP COLUMN document_df;
ALTER TABLE pyembed.documents DROP COLUMN doc_no;
""")


# As sql/060-keyword.sql had them before this revision.
BEFORE = r"""
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
    RETURNING p.corpus_id, p.lexemes, p.dfs, p.chunks, p.total_len
  ), lexemes AS (
    INSERT INTO pyembed.lexeme_stats AS s (corpus_id, lexeme, df)
    SELECT m.corpus_id, u.lexeme, sum(u.df)
      FROM mine m, unnest(m.lexemes, m.dfs) AS u(lexeme, df)
     GROUP BY m.corpus_id, u.lexeme ORDER BY m.corpus_id, u.lexeme
    ON CONFLICT (corpus_id, lexeme) DO UPDATE SET df = s.df + EXCLUDED.df
  )
  INSERT INTO pyembed.keyword_stats AS s (corpus_id, chunks, total_len)
  SELECT m.corpus_id, sum(m.chunks), sum(m.total_len) FROM mine m
   GROUP BY m.corpus_id ORDER BY m.corpus_id
  ON CONFLICT (corpus_id) DO UPDATE
    SET chunks = s.chunks + EXCLUDED.chunks, total_len = s.total_len + EXCLUDED.total_len;
  DELETE FROM pyembed.keyword_pending p WHERE p.xact = pg_current_xact_id();
  RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION pyembed._keyword_ranking(c pyembed.corpora, query text, k integer,
                                                    filter jsonb, group_by text,
                                                    OUT ids bigint[], OUT scores float8[],
                                                    OUT keys text[])
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  n integer;
  found integer;
BEGIN
  IF k IS NULL OR k < 1 OR k > 1000 THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005', MESSAGE = format('k must be 1..1000, got %s', k);
  END IF;
  IF query IS NULL OR query !~ '\S' THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005', MESSAGE = 'the query is empty';
  END IF;
  IF filter IS NOT NULL AND jsonb_typeof(filter) <> 'object' THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('a metadata filter is a JSON object, not %s', jsonb_typeof(filter));
  END IF;
  IF group_by IS NULL OR group_by NOT IN ('document', 'chunk') THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('group_by must be document or chunk, not %s', coalesce(group_by, 'NULL'));
  END IF;
  n := CASE group_by WHEN 'chunk' THEN k ELSE 3 * k END;
  LOOP
    SELECT b.ids, b.scores INTO ids, scores FROM pyembed._bm25(c, query, n, filter) b;
    EXIT WHEN group_by = 'chunk' OR coalesce(cardinality(ids), 0) < n;
    SELECT count(DISTINCT ch.document_id) INTO found
      FROM pyembed.chunks ch WHERE ch.corpus_id = c.corpus_id AND ch.chunk_id = ANY (ids);
    EXIT WHEN found >= k;
    n := 4 * n;
  END LOOP;
  SELECT array_agg(b.chunk_id ORDER BY b.score DESC, b.chunk_id),
         array_agg(b.score ORDER BY b.score DESC, b.chunk_id),
         array_agg(b.key ORDER BY b.score DESC, b.chunk_id) INTO ids, scores, keys
    FROM (SELECT b.* FROM (
            SELECT DISTINCT ON (1) CASE WHEN group_by = 'chunk' THEN ch.chunk_id::text
                                        ELSE ch.document_id END AS key, ch.chunk_id, h.score
              FROM pyembed.chunks ch
              JOIN unnest(ids, scores) AS h(chunk_id, score) ON h.chunk_id = ch.chunk_id
             WHERE ch.corpus_id = c.corpus_id AND ch.chunk_id = ANY (ids)
             ORDER BY 1, h.score DESC, h.chunk_id) b
           ORDER BY b.score DESC, b.chunk_id LIMIT k) b;
END
$$;

CREATE OR REPLACE FUNCTION pyembed._bm25(c pyembed.corpora, query text, n integer, filter jsonb,
                                         every_posting_upto bigint DEFAULT 30000,
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
  SELECT s.chunks::float8, s.total_len::float8 / greatest(s.chunks, 1) INTO total, avgdl
    FROM pyembed.keyword_stats s WHERE s.corpus_id = c.corpus_id;
  SELECT array_agg(t.lexeme ORDER BY t.df, t.lexeme), array_agg(t.idf ORDER BY t.df, t.lexeme),
         count(*) FILTER (WHERE t.df <= total / 20), sum(t.df)
    INTO lx, w, e, postings
    FROM (SELECT l.lexeme, l.df, ln(1 + (total - l.df + 0.5) / (l.df + 0.5::float8)) AS idf
            FROM (SELECT DISTINCT u.lexeme FROM unnest(to_tsvector(c.text_config, query)) u) q
            JOIN pyembed.lexeme_stats l ON l.corpus_id = c.corpus_id AND l.lexeme = q.lexeme
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
                                     WHERE pp.corpus_id = c.corpus_id AND pp.lexeme = r.lexeme
                                    OFFSET 0) p
                     GROUP BY p.chunk_id) x
             WHERE filter IS NULL OR EXISTS (
                     SELECT FROM pyembed.chunks ch WHERE ch.corpus_id = c.corpus_id
                        AND ch.chunk_id = x.chunk_id AND ch.metadata @> filter)
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
                                     WHERE pp.corpus_id = c.corpus_id AND pp.lexeme = r.lexeme
                                    OFFSET 0) p) y
             GROUP BY y.chunk_id) x
     WHERE filter IS NULL OR EXISTS (
             SELECT FROM pyembed.chunks ch WHERE ch.corpus_id = c.corpus_id
                AND ch.chunk_id = x.chunk_id AND ch.metadata @> filter);
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
              LEFT JOIN pyembed.postings p ON p.corpus_id = c.corpus_id AND p.lexeme = r.lexeme
                    AND p.chunk_id = o.chunk_id
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
              LEFT JOIN pyembed.postings p ON p.corpus_id = c.corpus_id AND p.lexeme = r.lexeme
                    AND p.chunk_id = o.chunk_id
             GROUP BY o.chunk_id, o.s
             ORDER BY 2 DESC, 1 LIMIT n) f;
    done := done + batch;
    IF cardinality(ids) >= n THEN
      theta := greatest(theta, scores[n]);
    END IF;
  END LOOP;
END
$$;

-- The keyword ranking of hybrid search (pyembed._keyword_ranking, `candidates` as search_hybrid's
-- default) for a client to hand back to search_hybrid with the query vector: (ids, scores, keys),
-- empty arrays when nothing matches.
CREATE OR REPLACE FUNCTION pyembed.keyword_ranking(
  corpus text, query text, candidates integer DEFAULT 100, filter jsonb DEFAULT NULL,
  group_by text DEFAULT 'document', OUT ids bigint[], OUT scores float8[], OUT keys text[])
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  r record := pyembed._keyword_ranking(pyembed.lookup_corpus(corpus), query, candidates, filter,
                                       group_by);
BEGIN
  ids := coalesce(r.ids, '{}');
  scores := coalesce(r.scores, '{}');
  keys := coalesce(r.keys, '{}');
END
$$;

CREATE OR REPLACE FUNCTION pyembed.search_hybrid(
  corpus text, query text, query_embedding vector, query_model_key text,
  k integer DEFAULT 10, filter jsonb DEFAULT NULL, candidates integer DEFAULT 100,
  rrf_k integer DEFAULT 60, group_by text DEFAULT 'document', fusion text DEFAULT NULL,
  alpha double precision DEFAULT NULL, keyword_ids bigint[] DEFAULT NULL,
  keyword_scores float8[] DEFAULT NULL, keyword_keys text[] DEFAULT NULL)
RETURNS TABLE (document_id text, chunk_id bigint, chunk_index integer, content text,
               metadata jsonb, score double precision, model_key text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora;
  d record;
  s record;
  ids bigint[];
  scores float8[];
BEGIN
  fusion := coalesce(fusion, 'relative');  -- the default
  IF fusion NOT IN ('rrf', 'relative') THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('fusion must be rrf or relative, not %s', fusion);
  END IF;
  IF alpha IS NOT NULL AND fusion <> 'relative' THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('alpha weighs relative fusion, not %s', fusion),
      HINT = 'pass fusion => ''relative'' with alpha, or leave alpha out';
  END IF;
  IF alpha IS NOT NULL AND NOT alpha BETWEEN 0 AND 1 THEN  -- NaN is above 1 in PostgreSQL
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('alpha must be 0..1 (the vector search''s weight), got %s', alpha);
  END IF;
  IF candidates IS NULL OR candidates < 1 OR candidates > 1000 THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('candidates must be 1..1000, got %s', candidates);
  END IF;
  IF rrf_k IS NULL OR rrf_k < 0 THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005', MESSAGE = format('rrf_k must be 0 or more, got %s', rrf_k);
  END IF;
  IF k IS NULL OR k < 1 OR k > 1000 THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005', MESSAGE = format('k must be 1..1000, got %s', k);
  END IF;
  alpha := coalesce(alpha, 0.5);
  -- Both rankings without their texts (the guarded vector one first: PE001 before anything);
  -- the texts of the k fused hits alone are read.
  IF keyword_ids IS NOT NULL AND (cardinality(keyword_ids) IS DISTINCT FROM
                                   cardinality(keyword_scores)
                                   OR cardinality(keyword_ids) IS DISTINCT FROM
                                      cardinality(keyword_keys)) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = 'keyword_ids, keyword_scores and keyword_keys must have one element per hit';
  END IF;
  c := pyembed.lookup_corpus(corpus);
  d := pyembed._vector_ranking(c, query_embedding, query_model_key, candidates, filter, group_by);
  IF keyword_ids IS NULL THEN
    s := pyembed._keyword_ranking(c, query, candidates, filter, group_by);
  ELSE
    SELECT keyword_ids AS ids, keyword_scores AS scores, keyword_keys AS keys INTO s;
  END IF;
  WITH dense AS (
    SELECT h.*, min(h.score) OVER () AS lo, max(h.score) OVER () AS hi
      FROM unnest(d.ids, d.scores, d.keys) WITH ORDINALITY AS h(chunk_id, score, key, r)
  ), sparse AS (
    SELECT h.*, min(h.score) OVER () AS lo, max(h.score) OVER () AS hi
      FROM unnest(s.ids, s.scores, s.keys) WITH ORDINALITY AS h(chunk_id, score, key, r)
  ), fused AS (
    SELECT coalesce(x.chunk_id, y.chunk_id) AS chunk_id,
           CASE fusion
             WHEN 'rrf' THEN coalesce(1.0 / (rrf_k + x.r), 0) + coalesce(1.0 / (rrf_k + y.r), 0)
             ELSE alpha * CASE WHEN x.r IS NULL THEN 0 WHEN x.hi > x.lo
                               THEN (x.score - x.lo) / (x.hi - x.lo) ELSE 1 END
                  + (1 - alpha) * CASE WHEN y.r IS NULL THEN 0 WHEN y.hi > y.lo
                                       THEN (y.score - y.lo) / (y.hi - y.lo) ELSE 1 END
           END::float8 AS score
      FROM dense x FULL JOIN sparse y ON y.key = x.key
  )
  SELECT array_agg(f.chunk_id ORDER BY f.score DESC, f.chunk_id),
         array_agg(f.score ORDER BY f.score DESC, f.chunk_id) INTO ids, scores
    FROM (SELECT fu.* FROM fused fu ORDER BY fu.score DESC, fu.chunk_id LIMIT k) f;
  RETURN QUERY
  SELECT ch.document_id, ch.chunk_id, ch.chunk_index, ch.content, ch.metadata, h.score,
         query_model_key
    FROM unnest(ids, scores) WITH ORDINALITY AS h(chunk_id, score, n)
    JOIN pyembed.chunks ch ON ch.chunk_id = h.chunk_id
   WHERE ch.corpus_id = c.corpus_id AND ch.chunk_id = ANY (ids)
   ORDER BY h.n;
END
$$;
"""
