"""The vector leg reads only the index rules it uses (pyembed._nearest_rules).

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-04

Every search assigned the whole of pyembed._index_plan's row (inlined), and PL/pgSQL sets a
simple expression up again in every transaction: the fields the search never reads (opclass, m,
ef_construction, with two of the row's six copies of the index type's rule) were set up each
search. The SQL function pyembed._nearest_rules (sql/025-nearest.sql) selects the fields the
vector leg reads, and the planner keeps only those of the inlined row; pyembed._vector_ranking and
_nearest_in read it. It returns pyembed._index_rules, which revision 0020's downgrade drops: this
downgrade drops the function and restores its two callers, and pyembed._nearest_sql (whose
statement now sorts its hits once), as they were (the upgrade has nothing to do: sql/ creates
them).
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0023"
down_revision: str | Sequence[str] | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Nothing: sql/025-nearest.sql and 030-search.sql create and replace the functions."""


def downgrade() -> None:
    run_sql(f"""
DROP FUNCTION IF EXISTS pyembed._nearest_rules(integer, text, text, jsonb, bigint);
{BEFORE}
""")


# As sql/025-nearest.sql and sql/030-search.sql had them before this revision.
BEFORE = r"""
CREATE OR REPLACE FUNCTION pyembed._nearest_sql(p_corpus_id integer, p_model_key text,
                                                k integer, filtered boolean, exact boolean,
                                                s pyembed._index_rules, p_distance text,
                                                counted real)
RETURNS text
LANGUAGE sql STABLE
AS $$
SELECT format(
  'SELECT array_agg(chunk_id ORDER BY distance, chunk_id), '
  'array_agg(distance ORDER BY distance, chunk_id), '
  'array_agg(%7$s ORDER BY distance, chunk_id), '
  'array_agg(doc_no ORDER BY distance, chunk_id) FROM ('
  || CASE
       WHEN pyembed._nearest_scans(k, exact, s, counted) THEN
         'SELECT v.chunk_id, v.doc_no, v.%1$s $1 AS distance FROM %2$s ORDER BY 3, 1 LIMIT %6$s'
       -- By the index (asked for a few percent of a small partition's rows, the planner chose a
       -- bitmap scan of all of them and a sort, slower than the index: enable_bitmapscan off).
       WHEN s.op = '<~>' THEN
         'SELECT c.chunk_id, c.doc_no, c.%1$s $1 AS distance FROM (SELECT v.chunk_id, '
         'v.doc_no, v.embedding FROM %2$s ORDER BY binary_quantize(v.embedding)::%3$s <~> '
         'binary_quantize($1)::%3$s LIMIT %5$s) c ORDER BY 3, 1 LIMIT %6$s'
       WHEN s.castto LIKE 'vector(%' THEN
         'SELECT v.chunk_id, v.doc_no, (v.embedding::%3$s) %4$s $1::%3$s AS distance '
         'FROM %2$s ORDER BY 3 LIMIT %6$s'
       ELSE
         'SELECT v.chunk_id, v.doc_no, v.%1$s $1 AS distance FROM %2$s ORDER BY '
         '(v.embedding::%3$s) %4$s $1::%3$s LIMIT %6$s'
     END
  || ') hit',
  s.exact, pyembed._nearest_source(p_corpus_id, p_model_key, filtered), s.castto, s.op,
  pyembed._nearest_candidates(k, s), k,
  CASE p_distance WHEN 'cosine' THEN '1 - distance' ELSE '-distance' END)
$$;

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
  s pyembed._index_rules;
  setting text;
BEGIN
  -- the index expression and ef_search's rule (pyembed._index_plan, inlined here: no call)
  s := pyembed._index_plan(p_dims, p_distance, p_storage, p_settings, greatest(counted, 0)::bigint);
  setting := pyembed._nearest_settings(k, filter IS NOT NULL, exact, s, counted);
  EXECUTE pyembed._nearest_sql(p_corpus_id, p_model_key, k, filter IS NOT NULL, exact, s,
                               p_distance, counted)
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
  storage text;
  s pyembed._index_rules;
  setting text;
  n integer;
  hit_ids bigint[];
  hit_distances float8[];
  hit_scores float8[];
  hit_docs bigint[];
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
  -- the key's storage (a migration's target key may have its own) and its index rules
  -- (pyembed._index_plan, inlined: no call)
  storage := CASE WHEN query_model_key = c.target_model_key
                  THEN coalesce(c.target_storage, c.storage) ELSE c.storage END;
  s := pyembed._index_plan(md.dimensions, md.distance, storage, c.index_settings,
                           greatest(md.counted, 0)::bigint);
  -- k chunks are k documents where every document has one chunk (as the committed counts say)
  n := CASE WHEN group_by = 'chunk' OR md.one_chunk_each THEN k ELSE 2 * k END;
  LOOP
    -- The nearest chunks: ids, distances, scores, docs, n of them at most, nearest first.
    setting := pyembed._nearest_settings(n, filter IS NOT NULL, false, s, md.counted);
    EXECUTE pyembed._nearest_sql(c.corpus_id, query_model_key, n, filter IS NOT NULL, false, s,
                                 md.distance, md.counted)
      INTO hit_ids, hit_distances, hit_scores, hit_docs USING query_embedding, filter;
    IF group_by = 'chunk' THEN  -- each chunk its own key: ranked as they came
      ids := hit_ids;
      scores := hit_scores;
      keys := hit_ids::text[];
      RETURN;
    END IF;
    -- Each document's nearest chunk, the k nearest documents, by the document numbers the
    -- vectors carry (no table read).
    SELECT array_agg(b.chunk_id ORDER BY b.distance, b.chunk_id),
           array_agg(b.score ORDER BY b.distance, b.chunk_id),
           array_agg(b.doc_no::text ORDER BY b.distance, b.chunk_id) INTO ids, scores, keys
      FROM (SELECT b.* FROM (
              SELECT DISTINCT ON (h.doc_no) h.doc_no, h.chunk_id, h.distance, h.score
                FROM unnest(hit_ids, hit_distances, hit_scores, hit_docs)
                       AS h(chunk_id, distance, score, doc_no)
               ORDER BY h.doc_no, h.distance, h.chunk_id) b
             ORDER BY b.distance, b.chunk_id LIMIT k) b;
    -- k documents, or all the corpus has (fewer chunks than asked for), or enough looking
    EXIT WHEN coalesce(cardinality(ids), 0) >= k OR coalesce(cardinality(hit_ids), 0) < n
              OR n >= 16 * k;
    n := 2 * n;
  END LOOP;
END
$$;
"""
