"""Vectors carry their chunk's document number, so that search by document reads no chunk.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-04

Search by document (the default) groups the nearest chunks into documents: it read each
chunk's row for its document (hybrid search: 200 and more index probes into pyembed.chunks
every search), and hybrid search looked its keyword hits' document ids up by doc_no to fuse the
two rankings. pyembed.vectors gets `doc_no` (pyembed.documents.doc_no of the vector's chunk),
set by a trigger as each vector is written and when a chunk moves to another document
(sql/010-guards.sql), so that the vector leg returns each hit's document number with it and
both rankings key documents by number. Existing vectors get theirs here, from their chunks (no
embedding involved); each partition's HNSW indexes are dropped for that update and built again
from their own definitions (an update of every row would otherwise insert each row into the
graphs again).
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0018"
down_revision: str | Sequence[str] | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql("""
ALTER TABLE pyembed.vectors ADD COLUMN doc_no bigint;
DO $fill$
DECLARE
  part regclass;
  defs text[];
  def text;
BEGIN
  FOR part IN SELECT i.inhrelid::regclass FROM pg_catalog.pg_inherits i
               WHERE i.inhparent = 'pyembed.vectors'::regclass ORDER BY 1 LOOP
    SELECT array_agg(pg_catalog.pg_get_indexdef(x.indexrelid) ORDER BY x.indexrelid) INTO defs
      FROM pg_catalog.pg_index x WHERE x.indrelid = part AND NOT x.indisprimary;
    FOR def IN SELECT x.indexrelid::regclass::text FROM pg_catalog.pg_index x
                WHERE x.indrelid = part AND NOT x.indisprimary LOOP
      EXECUTE format('DROP INDEX %s', def);
    END LOOP;
    EXECUTE format('UPDATE %s v SET doc_no = d.doc_no FROM pyembed.chunks ch '
                   'JOIN pyembed.documents d ON d.corpus_id = ch.corpus_id '
                   'AND d.document_id = ch.document_id '
                   'WHERE ch.corpus_id = v.corpus_id AND ch.chunk_id = v.chunk_id', part);
    FOREACH def IN ARRAY coalesce(defs, '{}') LOOP
      EXECUTE def;
    END LOOP;
  END LOOP;
END
$fill$;
""")


def downgrade() -> None:
    run_sql(f"""
DROP TRIGGER IF EXISTS vectors_document ON pyembed.vectors;
DROP FUNCTION IF EXISTS pyembed._vector_document();
DROP TRIGGER IF EXISTS chunks_moved ON pyembed.chunks;
DROP FUNCTION IF EXISTS pyembed._chunk_moved();
DROP FUNCTION IF EXISTS pyembed._nearest_in(integer, text, vector, integer, jsonb, boolean, text,
                                            jsonb, integer, text, real);
DROP FUNCTION IF EXISTS pyembed._keyword_passages(pyembed.corpora, text, bigint[]);
{BEFORE}
ALTER TABLE pyembed.vectors DROP COLUMN doc_no;
""")
    run_sql(PIN_SEARCH_PATH)


# What sql/025-nearest.sql, 030-search.sql and 060-keyword.sql had before this revision: the
# vector leg without document numbers, and both rankings keyed by document id.
BEFORE = r"""
CREATE OR REPLACE FUNCTION pyembed._nearest_in(p_corpus_id integer, p_model_key text,
  query vector, k integer, filter jsonb, exact boolean, p_storage text, p_settings jsonb,
  p_dims integer, p_distance text, counted real,
  OUT ids bigint[], OUT distances float8[], OUT scores float8[])
LANGUAGE plpgsql STABLE
SET hnsw.iterative_scan = 'off'
SET hnsw.ef_search = 100
SET enable_seqscan = off
SET enable_bitmapscan = on
AS $$
DECLARE
  s record;
  candidates integer;
  source text;
  hits text;
  setting text;
BEGIN
  -- the index expression and ef_search's rule in one call (each call costs every search)
  s := pyembed._index_plan(p_dims, p_distance, p_storage, p_settings, greatest(counted, 0)::bigint);
  candidates := CASE WHEN s.op = '<~>' THEN k * s.oversample ELSE k END;
  -- assignments, not PERFORM: an expression, where PERFORM runs a query (every search)
  setting := set_config('hnsw.ef_search', least(greatest(s.ef_search, candidates), 1000)::text,
                        true);
  IF filter IS NOT NULL OR candidates > 1000 THEN
    setting := set_config('hnsw.iterative_scan', 'relaxed_order', true);
  END IF;
  source := format('pyembed.%I v %s WHERE v.model_key = %L %s',
    pyembed._vector_partition_name(p_corpus_id),
    CASE WHEN filter IS NULL THEN '' ELSE format(
      'JOIN pyembed.chunks f ON f.corpus_id = %s AND f.chunk_id = v.chunk_id', p_corpus_id) END,
    p_model_key,
    CASE WHEN filter IS NULL THEN '' ELSE 'AND f.metadata @> $2' END);
  -- (hit.chunk_id, hit.distance) of the k nearest, in any order: the statement below sorts them
  IF exact OR s.expr IS NULL OR (counted >= 0 AND candidates >= counted) THEN
    hits := format('SELECT v.chunk_id, v.%s $1 AS distance FROM %s ORDER BY 2, 1 LIMIT %s',
                   s.exact, source, k);
  ELSE
    -- By the index: asked for a few percent of a small partition's rows, the planner chose a
    -- bitmap scan of all of them and a sort, slower than the index.
    setting := set_config('enable_bitmapscan', 'off', true);
    IF s.op = '<~>' THEN
      hits := format('SELECT c.chunk_id, c.%1$s $1 AS distance FROM (SELECT v.chunk_id, '
                     'v.embedding FROM %2$s ORDER BY binary_quantize(v.embedding)::%3$s <~> '
                     'binary_quantize($1)::%3$s LIMIT %4$s) c ORDER BY 2, 1 LIMIT %5$s',
                     s.exact, source, s.castto, candidates, k);
    ELSIF s.castto LIKE 'vector(%' THEN
      hits := format('SELECT v.chunk_id, (v.embedding::%1$s) %2$s $1::%1$s AS distance FROM %3$s '
                     'ORDER BY 2 LIMIT %4$s', s.castto, s.op, source, k);
    ELSE
      hits := format('SELECT v.chunk_id, v.%1$s $1 AS distance FROM %2$s ORDER BY '
                     '(v.embedding::%3$s) %4$s $1::%3$s LIMIT %5$s', s.exact, source, s.castto,
                     s.op, k);
    END IF;
  END IF;
  EXECUTE format('SELECT array_agg(chunk_id ORDER BY distance, chunk_id), '
                 'array_agg(distance ORDER BY distance, chunk_id), '
                 'array_agg(%s ORDER BY distance, chunk_id) FROM (%s) hit',
                 CASE p_distance WHEN 'cosine' THEN '1 - distance' ELSE '-distance' END, hits)
    INTO ids, distances, scores USING query, filter;
END
$$;

CREATE OR REPLACE FUNCTION pyembed._vector_ranking(
  c pyembed.corpora, query_embedding vector, query_model_key text, k integer, filter jsonb,
  group_by text, OUT ids bigint[], OUT scores float8[], OUT keys text[])
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
  md record;
  r record;
  n integer;
BEGIN
  SELECT mo.dimensions, mo.distance, mo.normalized, cl.reltuples AS counted
    INTO md
    FROM pyembed.models mo
    LEFT JOIN pg_catalog.pg_class cl ON cl.relnamespace = 'pyembed'::regnamespace
     AND cl.relname = pyembed._vector_partition_name(c.corpus_id)
   WHERE mo.model_key = query_model_key;
  IF query_model_key IS DISTINCT FROM c.model_key
     AND NOT (query_model_key = c.target_model_key
              AND c.migration_step IN ('backfilled', 'validated', 'shifting')) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE001',
      MESSAGE = format('model key mismatch: corpus %s is pinned to %s, but the query vector was '
                       'made by %s', c.name, c.model_key, coalesce(query_model_key, 'NULL')),
      HINT = 'embed the query with the corpus''s model, or let pyembed.search_text embed it';
  END IF;
  IF k IS NULL OR k < 1 OR k > 1000 THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005', MESSAGE = format('k must be 1..1000, got %s', k);
  END IF;
  IF group_by IS NULL OR group_by NOT IN ('document', 'chunk') THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('group_by must be document or chunk, not %s', coalesce(group_by, 'NULL'));
  END IF;
  IF query_embedding IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005', MESSAGE = 'no query vector (NULL)',
      HINT = 'pyembed.search_text embeds a query text for you';
  END IF;
  IF filter IS NOT NULL AND jsonb_typeof(filter) <> 'object' THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('a metadata filter is a JSON object, not %s', jsonb_typeof(filter));
  END IF;
  IF vector_dims(query_embedding) <> md.dimensions THEN
    RAISE EXCEPTION USING ERRCODE = 'PE003',
      MESSAGE = format('wrong dimensions: %s has %s dimensions, the query vector has %s',
                       query_model_key, md.dimensions, vector_dims(query_embedding));
  END IF;
  IF vector_norm(query_embedding) = 0 THEN
    RAISE EXCEPTION USING ERRCODE = 'PE003', MESSAGE = 'zero query vector';
  END IF;
  -- pgvector sums distances in single precision: a cosine or normalised model's query is scaled
  -- to unit length here (its norm is taken in double precision), which changes no ranking and
  -- keeps huge or tiny components from giving NaN or wrong scores; other queries must be in
  -- the range stored vectors are (pyembed._norm_ok).
  IF md.distance = 'cosine' OR md.normalized THEN
    query_embedding := l2_normalize(query_embedding);
  ELSIF NOT pyembed._norm_ok(vector_norm(query_embedding), false) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE003',
      MESSAGE = format('query vector norm %s is outside 1e-10..1e10: its scores would overflow '
                       'or vanish', vector_norm(query_embedding));
  END IF;
  n := CASE group_by WHEN 'chunk' THEN k ELSE 2 * k END;
  LOOP
    -- The nearest chunks: (ids, distances, scores), n of them at most, nearest first.
    r := pyembed._nearest_in(c.corpus_id, query_model_key, query_embedding, n, filter, false,
                             CASE WHEN query_model_key = c.target_model_key
                                  THEN coalesce(c.target_storage, c.storage) ELSE c.storage END,
                             c.index_settings, md.dimensions, md.distance, md.counted);
    IF group_by = 'chunk' THEN  -- each chunk its own key: ranked as they came
      ids := r.ids;
      scores := r.scores;
      keys := r.ids::text[];
      RETURN;
    END IF;
    -- Each document's nearest chunk, the k nearest documents. `= ANY (r.ids)`: n index probes
    -- into chunks, whatever the statistics say (joined with the array alone, the kept plan was
    -- a hash join over all the corpus's chunks).
    SELECT array_agg(b.chunk_id ORDER BY b.distance, b.chunk_id),
           array_agg(b.score ORDER BY b.distance, b.chunk_id),
           array_agg(b.key ORDER BY b.distance, b.chunk_id) INTO ids, scores, keys
      FROM (SELECT b.* FROM (
              SELECT DISTINCT ON (1) ch.document_id AS key, ch.chunk_id, h.distance, h.score
                FROM pyembed.chunks ch
                JOIN unnest(r.ids, r.distances, r.scores) AS h(chunk_id, distance, score)
                  ON h.chunk_id = ch.chunk_id
               WHERE ch.corpus_id = c.corpus_id AND ch.chunk_id = ANY (r.ids)
               ORDER BY 1, h.distance, h.chunk_id) b
             ORDER BY b.distance, b.chunk_id LIMIT k) b;
    -- k documents, or all the corpus has (fewer chunks than asked for), or enough looking
    EXIT WHEN coalesce(cardinality(ids), 0) >= k OR coalesce(cardinality(r.ids), 0) < n
              OR n >= 16 * k;
    n := 2 * n;
  END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION pyembed._keyword_ranking(c pyembed.corpora, query text, k integer,
                                                    filter jsonb, group_by text,
                                                    passages boolean DEFAULT true,
                                                    OUT ids bigint[], OUT scores float8[],
                                                    OUT keys text[])
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
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
  IF group_by = 'chunk' THEN
    SELECT b.ids, b.scores, b.ids::text[] INTO ids, scores, keys
      FROM pyembed._bm25(c, query, k, filter) b;
    RETURN;
  END IF;
  SELECT b.ids, b.scores INTO ids, scores
    FROM pyembed._bm25(c, query, k, filter, by_document => true) b;
  SELECT array_agg(d.document_id ORDER BY h.i) INTO keys
    FROM unnest(ids) WITH ORDINALITY AS h(doc_no, i)
    JOIN pyembed.documents d ON d.corpus_id = c.corpus_id AND d.doc_no = h.doc_no;
  IF keys IS NOT NULL THEN
    ids := CASE WHEN passages THEN pyembed._keyword_passages(c, query, keys)
                ELSE array_fill(NULL::bigint, ARRAY[cardinality(keys)]) END;
  END IF;
END
$$;

CREATE OR REPLACE FUNCTION pyembed._keyword_passages(c pyembed.corpora, query text,
                                                     document_ids text[])
RETURNS bigint[]
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
  RETURN (WITH q AS MATERIALIZED (
    SELECT l.lexeme, ln(1 + (s.chunks - l.df + 0.5) / (l.df + 0.5::float8)) AS idf,
           s.total_len::float8 / greatest(s.chunks, 1) AS avgdl
      FROM (SELECT DISTINCT u.lexeme FROM unnest(to_tsvector(c.text_config, query)) u) x
      JOIN pyembed.lexeme_stats l ON l.corpus_id = c.corpus_id AND l.lexeme = x.lexeme
      JOIN pyembed.keyword_stats s ON s.corpus_id = c.corpus_id
     WHERE l.df > 0
  ), chunks AS (
    SELECT d.i, ch.chunk_id, ch.chunk_index, count(*) OVER (PARTITION BY d.i) AS n
      FROM unnest(document_ids) WITH ORDINALITY AS d(document_id, i)
      JOIN pyembed.chunks ch ON ch.corpus_id = c.corpus_id AND ch.document_id = d.document_id
  )
  SELECT array_agg(b.chunk_id ORDER BY b.i)
    FROM (SELECT DISTINCT ON (x.i) x.i, x.chunk_id
            FROM (SELECT ch.i, ch.chunk_id, ch.chunk_index,
                         CASE WHEN ch.n > 1 THEN (  -- an index probe per query term
                           SELECT sum(q.idf * p.tf * 2.2 / (p.tf + 1.2 * (0.25 + 0.75::float8
                                                            * p.doc_len / q.avgdl)))
                             FROM q JOIN pyembed.postings p ON p.corpus_id = c.corpus_id
                                     AND p.lexeme = q.lexeme AND p.chunk_id = ch.chunk_id)
                         END AS s
                    FROM chunks ch) x
           ORDER BY x.i, x.s DESC NULLS LAST, x.chunk_index) b);
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
  keys text[];
  missing text[];
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
  alpha := coalesce(alpha, 0.4);  -- the default weight
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
    s := pyembed._keyword_ranking(c, query, candidates, filter, group_by, passages => false);
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
    SELECT coalesce(x.chunk_id, y.chunk_id) AS chunk_id, coalesce(x.key, y.key) AS key,
           CASE fusion
             WHEN 'rrf' THEN coalesce(1.0 / (rrf_k + x.r), 0) + coalesce(1.0 / (rrf_k + y.r), 0)
             ELSE alpha * CASE WHEN x.r IS NULL THEN 0 WHEN x.hi > x.lo
                               THEN (x.score - x.lo) / (x.hi - x.lo) ELSE 1 END
                  + (1 - alpha) * CASE WHEN y.r IS NULL THEN 0 WHEN y.hi > y.lo
                                       THEN (y.score - y.lo) / (y.hi - y.lo) ELSE 1 END
           END::float8 AS score
      FROM dense x FULL JOIN sparse y ON y.key = x.key
  )
  SELECT array_agg(f.chunk_id ORDER BY f.score DESC, f.chunk_id, f.key),
         array_agg(f.score ORDER BY f.score DESC, f.chunk_id, f.key),
         array_agg(f.key ORDER BY f.score DESC, f.chunk_id, f.key) INTO ids, scores, keys
    FROM (SELECT fu.* FROM fused fu ORDER BY fu.score DESC, fu.chunk_id, fu.key LIMIT k) f;
  -- The documents only the keyword ranking found have no passage yet (NULL chunk id).
  IF array_position(ids, NULL) IS NOT NULL THEN
    missing := array(SELECT h.key FROM unnest(ids, keys) AS h(chunk_id, key)
                      WHERE h.chunk_id IS NULL);
    SELECT array_agg(coalesce(h.chunk_id, m.chunk_id) ORDER BY h.i) INTO ids
      FROM unnest(ids, keys) WITH ORDINALITY AS h(chunk_id, key, i)
      LEFT JOIN unnest(missing, pyembed._keyword_passages(c, query, missing))
             AS m(key, chunk_id) ON m.key = h.key;
  END IF;
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

# The functions above that sql/090-search-path.sql pins run with pgvector's schema in their
# search_path (_nearest_in and _vector_ranking run with their caller's).
PIN_SEARCH_PATH = r"""
DO $pin$
DECLARE
  vec_schema text := (SELECT extnamespace::regnamespace::text FROM pg_catalog.pg_extension
                       WHERE extname = 'vector');
  f regprocedure;
BEGIN
  FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
            WHERE p.pronamespace = 'pyembed'::regnamespace AND p.prokind = 'f'
              AND p.proname IN ('_keyword_ranking', '_keyword_passages', 'search_hybrid') LOOP
    EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, %s, pg_temp', f, vec_schema);
  END LOOP;
END
$pin$;
"""
