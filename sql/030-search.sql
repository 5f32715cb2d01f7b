-- Guarded search: the query vector comes with its model key, and a mismatch raises PE001.

-- Which corpus and which index serve a query made by query_model_key; raises on mismatch.
CREATE OR REPLACE FUNCTION pyembed._search_target(corpus text, query_model_key text,
  OUT corpus_id integer, OUT model_key text, OUT dimensions integer, OUT distance text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora;
BEGIN
  SELECT * INTO c FROM pyembed.corpora WHERE name = corpus;
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'PE002',
      MESSAGE = format('unknown corpus %s', coalesce(quote_literal(left(corpus, 80)), 'NULL')),
      HINT = '`pyembed corpus list` shows the corpora';
  END IF;
  IF query_model_key IS DISTINCT FROM c.model_key
     AND NOT (query_model_key = c.target_model_key
              AND c.migration_step IN ('backfilled', 'validated', 'shifting')) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE001',
      MESSAGE = format('model key mismatch: corpus %s is pinned to %s, but the query vector was '
                       'made by %s', c.name, c.model_key, coalesce(query_model_key, 'NULL')),
      HINT = 'embed the query with the corpus''s model, or let pyembed.search_text embed it';
  END IF;
  SELECT c.corpus_id, m.model_key, m.dimensions, m.distance
    INTO corpus_id, model_key, dimensions, distance
    FROM pyembed.models m WHERE m.model_key = query_model_key;
END
$$;

CREATE OR REPLACE FUNCTION pyembed.search(
  corpus text, query_embedding vector, query_model_key text,
  k integer DEFAULT 10, filter jsonb DEFAULT NULL)
RETURNS TABLE (document_id text, chunk_id bigint, chunk_index integer, content text,
               metadata jsonb, score double precision, model_key text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET hnsw.iterative_scan = 'relaxed_order'
AS $$
DECLARE
  t record;
  s record;
  dims integer;
BEGIN
  t := pyembed._search_target(corpus, query_model_key);
  IF k IS NULL OR k < 1 OR k > 1000 THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005', MESSAGE = format('k must be 1..1000, got %s', k);
  END IF;
  dims := vector_dims(query_embedding);
  IF dims <> t.dimensions THEN
    RAISE EXCEPTION USING ERRCODE = 'PE003',
      MESSAGE = format('wrong dimensions: %s has %s dimensions, the query vector has %s',
                       t.model_key, t.dimensions, dims);
  END IF;
  IF vector_norm(query_embedding) = 0 THEN
    RAISE EXCEPTION USING ERRCODE = 'PE003', MESSAGE = 'zero query vector';
  END IF;
  s := pyembed._index_spec(t.dimensions, t.distance);
  RETURN QUERY EXECUTE format(
    'SELECT ch.document_id, ch.chunk_id, ch.chunk_index, ch.content, ch.metadata, '
    '       %5$s, %2$L::text '
    '  FROM (SELECT v.chunk_id, %3$s %4$s $1::%6$s AS distance '
    '          FROM pyembed.vectors v %7$s '
    '         WHERE v.corpus_id = %1$s AND v.model_key = %2$L %8$s '
    '         ORDER BY %3$s %4$s $1::%6$s LIMIT %9$s) hit '
    '  JOIN pyembed.chunks ch ON ch.corpus_id = %1$s AND ch.chunk_id = hit.chunk_id '
    ' ORDER BY hit.distance',
    t.corpus_id, t.model_key, replace(s.expr, 'embedding', 'v.embedding'), s.op,
    CASE t.distance WHEN 'cosine' THEN '1 - hit.distance' ELSE '-hit.distance' END,
    s.castto,
    CASE WHEN filter IS NULL THEN '' ELSE
      'JOIN pyembed.chunks f ON f.corpus_id = v.corpus_id AND f.chunk_id = v.chunk_id' END,
    CASE WHEN filter IS NULL THEN '' ELSE 'AND f.metadata @> $2' END,
    k)  -- a literal LIMIT: with a parameter the planner would guess 10% of rows and skip the index
  USING query_embedding, filter;
END
$$;
