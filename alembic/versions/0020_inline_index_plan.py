"""pyembed._index_plan is one SQL expression the planner inlines into its caller's statement.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-04

Every search called pyembed._index_plan (PL/pgSQL) from pyembed._nearest_in, and on
PostgreSQL 15 each nested PL/pgSQL call is set up again in every transaction. As a SQL function
whose body is one row expression it is inlined instead (sql/020-corpora.sql), which a function
returning `record` (OUT parameters) never is: it returns the composite type
pyembed._index_rules, the same columns. The old function goes here; sql/ creates the new one.
The vector leg's statement and settings (sql/025-nearest.sql) are SQL functions of that type
too, which pyembed._vector_ranking and _nearest_in read inlined: the downgrade drops them and
restores both functions as they were.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0020"
down_revision: str | Sequence[str] | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql("""
DROP FUNCTION IF EXISTS pyembed._index_plan(integer, text, text, jsonb, bigint);
CREATE TYPE pyembed._index_rules AS (
  expr text, opclass text, op text, castto text, exact text,
  m integer, ef_construction integer, ef_search integer, oversample integer);
""")


def downgrade() -> None:
    run_sql(f"""
DROP FUNCTION IF EXISTS pyembed._nearest_sql(integer, text, integer, boolean, boolean,
                                             pyembed._index_rules, text, real);
DROP FUNCTION IF EXISTS pyembed._nearest_settings(integer, boolean, boolean, pyembed._index_rules,
                                                  real);
DROP FUNCTION IF EXISTS pyembed._nearest_scans(integer, boolean, pyembed._index_rules, real);
DROP FUNCTION IF EXISTS pyembed._nearest_candidates(integer, pyembed._index_rules);
DROP FUNCTION IF EXISTS pyembed._nearest_source(integer, text, boolean);
DROP FUNCTION pyembed._index_plan(integer, text, text, jsonb, bigint);
DROP FUNCTION pyembed._index_type(integer, text);
DROP TYPE pyembed._index_rules;
{BEFORE}
{NEAREST_BEFORE}
""")


# As sql/020-corpora.sql had it before this revision.
BEFORE = r"""
CREATE OR REPLACE FUNCTION pyembed._index_plan(dims integer, distance text, storage text,
  settings jsonb, rows bigint,
  OUT expr text, OUT opclass text, OUT op text, OUT castto text, OUT exact text,
  OUT m integer, OUT ef_construction integer, OUT ef_search integer, OUT oversample integer)
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
  t text := CASE storage WHEN 'binary' THEN 'bit' WHEN 'halfvec' THEN 'halfvec'
                         ELSE CASE WHEN dims <= 2000 THEN 'vector' ELSE 'halfvec' END END;
BEGIN
  op := CASE distance WHEN 'cosine' THEN '<=>' WHEN 'dot' THEN '<#>' ELSE '<->' END;
  exact := 'embedding ' || op;
  castto := format('%s(%s)', t, dims);
  IF t = 'bit' THEN
    expr := CASE WHEN dims <= 64000 THEN format('(binary_quantize(embedding)::bit(%s))', dims) END;
    opclass := 'bit_hamming_ops';
    op := '<~>';
  ELSE
    expr := CASE WHEN dims <= 4000 THEN format('(embedding::%s(%s))', t, dims) END;
    opclass := t || CASE distance WHEN 'cosine' THEN '_cosine_ops' WHEN 'dot' THEN '_ip_ops'
                                  ELSE '_l2_ops' END;
  END IF;
  IF rows < 200000 THEN
    m := 16; ef_construction := 64; ef_search := 100;
  ELSIF rows < 2000000 THEN
    m := 24; ef_construction := 128; ef_search := 300;
  ELSE
    m := 32; ef_construction := 200; ef_search := 500;
  END IF;
  oversample := CASE WHEN dims < 768 THEN 60 WHEN dims < 1536 THEN 20 ELSE 10 END;
  m := coalesce((settings ->> 'm')::integer, m);
  ef_construction := coalesce((settings ->> 'ef_construction')::integer, ef_construction);
  ef_search := coalesce((settings ->> 'ef_search')::integer, ef_search);
  oversample := coalesce((settings ->> 'oversample')::integer, oversample);
END
$$;
"""


# As sql/025-nearest.sql and 030-search.sql had them before this revision (unpinned, as there).
NEAREST_BEFORE = r"""
CREATE OR REPLACE FUNCTION pyembed._nearest_in(p_corpus_id integer, p_model_key text,
  query vector, k integer, filter jsonb, exact boolean, p_storage text, p_settings jsonb,
  p_dims integer, p_distance text, counted real,
  OUT ids bigint[], OUT distances float8[], OUT scores float8[], OUT docs bigint[])
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
  -- (hit.chunk_id, hit.doc_no, hit.distance) of the k nearest, in any order: the statement
  -- below sorts them
  IF exact OR s.expr IS NULL OR (counted >= 0 AND candidates >= counted) THEN
    hits := format('SELECT v.chunk_id, v.doc_no, v.%s $1 AS distance FROM %s ORDER BY 3, 1 '
                   'LIMIT %s', s.exact, source, k);
  ELSE
    -- By the index: asked for a few percent of a small partition's rows, the planner chose a
    -- bitmap scan of all of them and a sort, slower than the index.
    setting := set_config('enable_bitmapscan', 'off', true);
    IF s.op = '<~>' THEN
      hits := format('SELECT c.chunk_id, c.doc_no, c.%1$s $1 AS distance FROM (SELECT '
                     'v.chunk_id, v.doc_no, v.embedding FROM %2$s ORDER BY '
                     'binary_quantize(v.embedding)::%3$s <~> binary_quantize($1)::%3$s '
                     'LIMIT %4$s) c ORDER BY 3, 1 LIMIT %5$s',
                     s.exact, source, s.castto, candidates, k);
    ELSIF s.castto LIKE 'vector(%' THEN
      hits := format('SELECT v.chunk_id, v.doc_no, (v.embedding::%1$s) %2$s $1::%1$s AS distance '
                     'FROM %3$s ORDER BY 3 LIMIT %4$s', s.castto, s.op, source, k);
    ELSE
      hits := format('SELECT v.chunk_id, v.doc_no, v.%1$s $1 AS distance FROM %2$s ORDER BY '
                     '(v.embedding::%3$s) %4$s $1::%3$s LIMIT %5$s', s.exact, source, s.castto,
                     s.op, k);
    END IF;
  END IF;
  EXECUTE format('SELECT array_agg(chunk_id ORDER BY distance, chunk_id), '
                 'array_agg(distance ORDER BY distance, chunk_id), '
                 'array_agg(%s ORDER BY distance, chunk_id), '
                 'array_agg(doc_no ORDER BY distance, chunk_id) FROM (%s) hit',
                 CASE p_distance WHEN 'cosine' THEN '1 - distance' ELSE '-distance' END, hits)
    INTO ids, distances, scores, docs USING query, filter;
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
  SELECT mo.dimensions, mo.distance, mo.normalized, cl.reltuples AS counted,
         ks.chunks = ks.documents AS one_chunk_each
    INTO md
    FROM pyembed.models mo
    LEFT JOIN pg_catalog.pg_class cl ON cl.relnamespace = 'pyembed'::regnamespace
     AND cl.relname = pyembed._vector_partition_name(c.corpus_id)
    LEFT JOIN pyembed.keyword_stats ks ON ks.corpus_id = c.corpus_id
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
  -- k chunks are k documents where every document has one chunk (as the committed counts say)
  n := CASE WHEN group_by = 'chunk' OR md.one_chunk_each THEN k ELSE 2 * k END;
  LOOP
    -- The nearest chunks: (ids, distances, scores, docs), n of them at most, nearest first.
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
    -- Each document's nearest chunk, the k nearest documents, by the document numbers the
    -- vectors carry (no table read).
    SELECT array_agg(b.chunk_id ORDER BY b.distance, b.chunk_id),
           array_agg(b.score ORDER BY b.distance, b.chunk_id),
           array_agg(b.doc_no::text ORDER BY b.distance, b.chunk_id) INTO ids, scores, keys
      FROM (SELECT b.* FROM (
              SELECT DISTINCT ON (h.doc_no) h.doc_no, h.chunk_id, h.distance, h.score
                FROM unnest(r.ids, r.distances, r.scores, r.docs)
                       AS h(chunk_id, distance, score, doc_no)
               ORDER BY h.doc_no, h.distance, h.chunk_id) b
             ORDER BY b.distance, b.chunk_id LIMIT k) b;
    -- k documents, or all the corpus has (fewer chunks than asked for), or enough looking
    EXIT WHEN coalesce(cardinality(ids), 0) >= k OR coalesce(cardinality(r.ids), 0) < n
              OR n >= 16 * k;
    n := 2 * n;
  END LOOP;
END
$$;
"""
