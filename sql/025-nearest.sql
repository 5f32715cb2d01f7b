-- The vector leg of every search: a corpus's nearest chunk ids for a key, by its HNSW index in
-- the corpus's storage (0013_vector_storage), or exactly (`exact`: the model's distance on the
-- float32 vectors, a sequential scan: what recall is measured against; also when a search asks
-- for as many candidates as the partition has rows, which a scan reads about as fast, and
-- exactly). The caller has checked the query (key, dimensions, norm; pyembed.search) and may
-- read the corpus.
--
-- One dynamic statement on the corpus's partition whose key, dimensions and LIMIT are literals,
-- so that the planner matches the partial HNSW index expression and predicate (with a parameter
-- LIMIT it would guess 10% of rows and skip it); joining the texts is left to the caller's static
-- query, whose plan PL/pgSQL keeps (planning the join in the dynamic statement would cost every
-- search). `distances` are the model's distances from the float32 vectors for every storage, in
-- the order of `ids`, nearest first (ties by chunk id), and `scores` the hits' scores (higher is
-- better: 1 - distance for cosine, else -distance) in the same order (halfvec and binary rank by
-- their index, then the top candidates are rescored from the float32 vectors), and `docs` the
-- hits' document numbers (pyembed.vectors.doc_no: grouping by document reads no chunk):
--   vector   ORDER BY the indexed expression LIMIT k;
--   halfvec  the same on float16, the k hits' distances taken again in float32;
--   binary   the Hamming index's k x oversample nearest sign-bit codes, reordered by their exact
--            distances, LIMIT k.
-- hnsw.ef_search follows pyembed._index_plan for the rows the partition's statistics count
-- (pg_class.reltuples: ANALYZE, autovacuum and index builds keep it), at least the candidates
-- asked for (an HNSW scan returns at most ef_search rows), at most pgvector's 1,000; a filter
-- may reject most of the nearest chunks, and more than 1,000 candidates are past any
-- ef_search: the index scan then goes on until it has them (hnsw.iterative_scan; an
-- unfiltered search is faster without it).
-- enable_seqscan off: vectors of 1,024 dimensions and more are stored out of line, which makes a
-- sequential scan of the partition look cheap to the planner, and it chose one over the index
-- (seconds instead of milliseconds; docs/scale-out.md); enable_bitmapscan off when the index
-- serves (below). The settings are pyembed._nearest_in's own (SET below): they last until it
-- returns.
-- _nearest looks up what the vector leg needs (storage, settings, model, counted rows) and hands
-- it to pyembed._nearest_in, which does the work; pyembed.search, which has looked the corpus
-- up already, calls _nearest_in itself: each search looks its corpus up once.
CREATE OR REPLACE FUNCTION pyembed._nearest(p_corpus_id integer, p_model_key text,
  query vector, k integer, filter jsonb DEFAULT NULL, exact boolean DEFAULT false,
  OUT ids bigint[], OUT distances float8[])
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c record;
  r record;
BEGIN
  SELECT CASE WHEN p_model_key = co.target_model_key THEN coalesce(co.target_storage, co.storage)
              ELSE co.storage END AS storage,
         co.index_settings, m.dimensions, m.distance, cl.reltuples AS counted
    INTO c
    FROM pyembed.corpora co
    JOIN pyembed.models m ON m.model_key = p_model_key
    LEFT JOIN pg_catalog.pg_class cl ON cl.relnamespace = 'pyembed'::regnamespace
     AND cl.relname = pyembed._vector_partition_name(co.corpus_id)
   WHERE co.corpus_id = p_corpus_id;
  r := pyembed._nearest_in(p_corpus_id, p_model_key, query, k, filter, exact, c.storage,
                           c.index_settings, c.dimensions, c.distance, c.counted);
  ids := r.ids;
  distances := r.distances;
END
$$;

-- The vector leg (above), given the key's storage, the corpus's index settings, the model's
-- dimensions and distance, and the rows the partition's statistics count (pg_class.reltuples:
-- -1 before the first ANALYZE or index build, NULL without a partition).
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
  -- the index expression and ef_search's rule (pyembed._index_plan, inlined here: no call)
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
