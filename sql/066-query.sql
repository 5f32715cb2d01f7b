-- A search by text in as few round trips as its work allows (pyembed/query.py): one call routes
-- the query, looks up its embedding in the cache and, on a hit, searches and records the query;
-- on a miss it reserves the provider call and returns what the client needs to embed; then one
-- call stores the embedding, searches and records. The searches are the rankings of the guarded
-- functions (pyembed.search's, search_keyword's, search_hybrid's, which make their checks and the
-- model-key guard), called here directly on the corpus looked up once (pyembed._ranked_hits).
-- Writes (usage, cache entries and counts, the query log, recall samples) happen only in a
-- read-write transaction: on a hot standby these functions search and write nothing, and the
-- client records on the primary with pyembed.record_search.

-- The texts of ranked hits (chunk ids of corpus `corpus_id`, best first, with their scores) as
-- arrays, one element per hit in rank order. A SQL function without a SET clause, so that it is
-- inlined into its caller's statement (no call).
CREATE OR REPLACE FUNCTION pyembed._hit_arrays(
  corpus_id integer, ids bigint[], ranked_scores float8[], query_model_key text,
  OUT document_ids text[], OUT chunk_ids bigint[], OUT chunk_indexes integer[],
  OUT contents text[], OUT metadatas jsonb[], OUT scores float8[], OUT model_keys text[])
RETURNS SETOF record
LANGUAGE sql STABLE
AS $$
  SELECT coalesce(array_agg(ch.document_id ORDER BY h.n), '{}'),
         coalesce(array_agg(ch.chunk_id ORDER BY h.n), '{}'),
         coalesce(array_agg(ch.chunk_index ORDER BY h.n), '{}'),
         coalesce(array_agg(ch.content ORDER BY h.n), '{}'),
         coalesce(array_agg(ch.metadata ORDER BY h.n), '{}'),
         coalesce(array_agg(ranked_scores[h.n] ORDER BY h.n), '{}'),
         coalesce(array_agg(query_model_key ORDER BY h.n), '{}')
    FROM unnest(ids) WITH ORDINALITY AS h(chunk_id, n)
    JOIN pyembed.chunks ch ON ch.corpus_id = _hit_arrays.corpus_id AND ch.chunk_id = h.chunk_id
$$;

-- The hits of one search of corpus `c` (its caller looked it up) by mode, with its options
-- (group_by, fusion, alpha: a JSON object, so that an option added to the search functions adds
-- no parameter here), as arrays: the ranking the mode's search function makes (pyembed.search's
-- _vector_ranking, search_keyword's _keyword_ranking, search_hybrid's _hybrid_ranking, which
-- check their arguments), then the texts. The rankings are called here directly, not through
-- the search functions: each of those is a SECURITY DEFINER call with a SET clause, and looks
-- the corpus up again (search_query and search_embedded call this once a search).
CREATE OR REPLACE FUNCTION pyembed._ranked_hits(
  c pyembed.corpora, mode text, query text, query_embedding vector, query_model_key text,
  k integer, filter jsonb, options jsonb, keyword_ids bigint[], keyword_scores float8[],
  keyword_keys text[],
  OUT document_ids text[], OUT chunk_ids bigint[], OUT chunk_indexes integer[],
  OUT contents text[], OUT metadatas jsonb[], OUT scores float8[], OUT model_keys text[])
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  g text := coalesce(options->>'group_by', 'document');
  r record;
BEGIN
  IF mode = 'vector' THEN
    r := pyembed._vector_ranking(c, query_embedding, query_model_key, k, filter, g, NULL);
  ELSIF mode = 'keyword' THEN
    r := pyembed._keyword_ranking(c, query, k, filter, g);
    query_model_key := NULL;  -- (a keyword hit has no model key)
  ELSIF mode = 'hybrid' THEN
    r := pyembed._hybrid_ranking(c, query, query_embedding, query_model_key, k, filter, 100, 60, g,
                                 options->>'fusion', (options->>'alpha')::float8, keyword_ids,
                                 keyword_scores, keyword_keys);
  ELSE
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('mode must be one of vector, keyword, hybrid, not %s',
                       pyembed._quoted(mode));
  END IF;
  SELECT * INTO document_ids, chunk_ids, chunk_indexes, contents, metadatas, scores, model_keys
    FROM pyembed._hit_arrays(c.corpus_id, r.ids, r.scores, query_model_key);
END
$$;

-- Records one search on a read-write server: its query-log line (kind NULL: none), a cache
-- entry for its embedding (cache_key NULL: none), cache hit and miss counts, and a recall
-- sample (sql/072-recall.sql) of its query vector; returns whether it wrote (false in a
-- read-only transaction, which writes nothing). The corpus must be one of the caller's tenant's.
CREATE OR REPLACE FUNCTION pyembed.record_search(
  p_corpus_id integer, p_model_key text, kind text, k integer, cache_hit boolean,
  embed_ms real, search_ms real, generate_ms real, total_ms real,
  cache_key bytea DEFAULT NULL, input_type text DEFAULT NULL, embedding vector DEFAULT NULL,
  ttl_seconds float8 DEFAULT NULL, filter jsonb DEFAULT NULL,
  count_models text[] DEFAULT NULL, count_hits bigint[] DEFAULT NULL,
  count_misses bigint[] DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF current_setting('transaction_read_only') = 'off'
     AND NOT (p_corpus_id = ANY (pyembed.visible_corpora())) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE002', MESSAGE = format('unknown corpus id %s', p_corpus_id),
      HINT = 'the corpus was dropped meanwhile, or is not one of your tenant''s: `pyembed corpus '
             'list` shows yours';
  END IF;
  RETURN pyembed._record_search(p_corpus_id, p_model_key, kind, k, cache_hit, embed_ms,
                                search_ms, generate_ms, total_ms, cache_key, input_type,
                                embedding, ttl_seconds, filter, count_models, count_hits,
                                count_misses, false);
END
$$;

-- pyembed.record_search's checks and writes, without its tenant check: search_query and
-- search_embedded call it for a corpus they looked up by lookup_corpus's rule (no SECURITY
-- DEFINER call, no second lookup). `quick`: the caller's transaction is its statement alone, so
-- that one whose first write is this record may commit without waiting for its WAL to be
-- flushed (search_query's options' quick_commit says why).
CREATE OR REPLACE FUNCTION pyembed._record_search(
  p_corpus_id integer, p_model_key text, kind text, k integer, cache_hit boolean,
  embed_ms real, search_ms real, generate_ms real, total_ms real, cache_key bytea,
  input_type text, embedding vector, ttl_seconds float8, filter jsonb, count_models text[],
  count_hits bigint[], count_misses bigint[], quick boolean)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  v vector := embedding;
BEGIN
  IF p_corpus_id IS NULL THEN
    PERFORM pyembed._needs(true, 'p_corpus_id', 'record_search');
  END IF;
  -- k is the log line's (kind NULL: no line); the model and input type, the cache entry's
  -- (cache_key and embedding given); the hits and misses, the counts' (count_models given).
  IF (kind IS NOT NULL AND k IS NULL) OR (cache_key IS NOT NULL AND embedding IS NOT NULL
      AND num_nulls(p_model_key, input_type) > 0)
     OR (count_models IS NOT NULL AND num_nulls(count_hits, count_misses) > 0) THEN
    PERFORM pyembed._needs(kind IS NOT NULL AND k IS NULL, 'k', 'record_search');
    PERFORM pyembed._needs(cache_key IS NOT NULL AND embedding IS NOT NULL
                           AND p_model_key IS NULL, 'p_model_key', 'record_search');
    PERFORM pyembed._needs(cache_key IS NOT NULL AND embedding IS NOT NULL
                           AND input_type IS NULL, 'input_type', 'record_search');
    PERFORM pyembed._needs(count_models IS NOT NULL AND count_hits IS NULL, 'count_hits',
                           'record_search');
    PERFORM pyembed._needs(count_models IS NOT NULL AND count_misses IS NULL, 'count_misses',
                           'record_search');
  END IF;
  IF count_models IS NOT NULL
     AND (cardinality(count_hits) IS DISTINCT FROM cardinality(count_models)
          OR cardinality(count_misses) IS DISTINCT FROM cardinality(count_models)) THEN
    PERFORM pyembed._one_each('record_search', 'count_models, count_hits and count_misses',
                              ARRAY[cardinality(count_models), cardinality(count_hits),
                                    cardinality(count_misses)]);
  END IF;
  IF current_setting('transaction_read_only') = 'on' THEN
    RETURN false;
  END IF;
  IF quick AND pg_current_xact_id_if_assigned() IS NULL THEN
    PERFORM set_config('synchronous_commit', 'off', true);
  END IF;
  IF cache_key IS NOT NULL AND embedding IS NOT NULL THEN
    PERFORM pyembed.cache_put(ARRAY[cache_key], p_model_key, input_type, ARRAY[embedding],
                              ttl_seconds);
  ELSIF cache_key IS NOT NULL THEN  -- a hit on a replica: the primary has the same entry
    SELECT g.embedding INTO v FROM pyembed.cache_get(ARRAY[cache_key]) g;
  END IF;
  IF count_models IS NOT NULL THEN
    PERFORM pyembed.cache_count(count_models, count_hits, count_misses);
  END IF;
  IF kind IS NOT NULL THEN
    INSERT INTO pyembed.query_log (corpus_id, model_key, kind, k, cache_hit, embed_ms, search_ms,
                                   generate_ms, total_ms)
    VALUES (p_corpus_id, coalesce(p_model_key, '-'), kind, k, cache_hit, embed_ms, search_ms,
            generate_ms, total_ms);
  END IF;
  IF v IS NOT NULL AND p_model_key IS NOT NULL THEN
    PERFORM pyembed._sample_recall(p_corpus_id, p_model_key, v, filter);
  END IF;
  RETURN true;
END
$$;

-- Route, cache lookup and, on a hit, the search and its record (`log`: write the query-log
-- line; count_*: cache counts the client kept, written with this call). `keys` and
-- `cache_keys` pair the model keys the client expects to serve the query with the query's
-- cache key for each; `bucket` is pyembed.search.bucket(query), the query's traffic-share slot.
-- The one row says where the query went: cache_hit NULL for keyword search or when the serving
-- key is not among `keys` (the client asks again with it), false on a miss (reserved: the
-- provider call of `tokens` is accounted, here or, on a replica, by the client on the primary).
CREATE OR REPLACE FUNCTION pyembed.search_query(
  corpus text, query text, bucket integer, keys text[], cache_keys bytea[], k integer,
  filter jsonb, mode text, options jsonb, tokens integer DEFAULT NULL, log boolean DEFAULT true,
  count_models text[] DEFAULT NULL, count_hits bigint[] DEFAULT NULL,
  count_misses bigint[] DEFAULT NULL,
  OUT corpus_id integer, OUT active_key text, OUT model_key text, OUT cache_hit boolean,
  OUT reserved boolean, OUT recorded boolean, OUT embed_ms real, OUT search_ms real,
  OUT document_ids text[], OUT chunk_ids bigint[], OUT chunk_indexes integer[],
  OUT contents text[], OUT metadatas jsonb[], OUT scores float8[], OUT model_keys text[])
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  started timestamptz := clock_timestamp();
  looked timestamptz;
  c pyembed.corpora;
  slot integer;
  v vector;
  writable boolean := current_setting('transaction_read_only') = 'off';
BEGIN
  -- (filter and options NULL: none; tokens NULL: not estimated)
  IF num_nulls(query, bucket, keys, cache_keys, mode, log) > 0 THEN
    PERFORM pyembed._needs(query IS NULL, 'query', 'search_query');
    PERFORM pyembed._needs(bucket IS NULL, 'bucket', 'search_query');
    PERFORM pyembed._needs(keys IS NULL, 'keys', 'search_query');
    PERFORM pyembed._needs(cache_keys IS NULL, 'cache_keys', 'search_query');
    PERFORM pyembed._needs(mode IS NULL, 'mode', 'search_query');
    PERFORM pyembed._needs(log IS NULL, 'log', 'search_query');
  END IF;
  IF cardinality(cache_keys) IS DISTINCT FROM cardinality(keys) THEN
    PERFORM pyembed._one_each('search_query', 'keys and cache_keys',
                              ARRAY[cardinality(keys), cardinality(cache_keys)]);
  END IF;
  -- the corpus by lookup_corpus's rule, inlined as in pyembed.search (no call), and its error
  SELECT * INTO c FROM pyembed._corpus_named(corpus);
  IF NOT FOUND THEN
    c := pyembed.lookup_corpus(corpus);
  END IF;
  corpus_id := c.corpus_id;
  active_key := c.model_key;
  model_key := CASE WHEN c.migration_step = 'shifting' AND c.target_model_key IS NOT NULL
                         AND c.traffic_share > 0 AND bucket < c.traffic_share
                    THEN c.target_model_key ELSE c.model_key END;
  reserved := false;
  recorded := false;
  IF mode IS DISTINCT FROM 'keyword' THEN
    slot := array_position(keys, model_key);
    IF slot IS NULL THEN
      RETURN;  -- cache_hit NULL: the client prepares the query for this key and asks again
    END IF;
    SELECT g.embedding INTO v FROM pyembed.cache_get(ARRAY[cache_keys[slot]]) g;
    cache_hit := v IS NOT NULL;
    IF NOT cache_hit THEN
      IF tokens IS NOT NULL AND writable THEN
        -- quick_commit (below) for the reservation of a call that costs nothing (the model's
        -- price 0, the local model's): its usage row is as losable as a log line, and the
        -- client, which embeds meanwhile, no longer waits for the WAL flush. A priced call's
        -- reservation is durable before the call is made.
        IF (options->>'quick_commit') = 'true' AND pg_current_xact_id_if_assigned() IS NULL
           AND (SELECT m.price_per_mtok FROM pyembed.models m
                 WHERE m.model_key = search_query.model_key) = 0 THEN
          PERFORM set_config('synchronous_commit', 'off', true);
        END IF;
        PERFORM pyembed.reserve_usage(model_key, corpus_id, 1, tokens);
        reserved := true;
      END IF;
      IF count_models IS NOT NULL AND writable THEN
        recorded := pyembed._record_search(corpus_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                                           NULL, NULL, NULL, NULL, NULL, NULL, count_models,
                                           count_hits, count_misses, false);
      END IF;
      RETURN;
    END IF;
  END IF;
  looked := clock_timestamp();
  SELECT * INTO document_ids, chunk_ids, chunk_indexes, contents, metadatas, scores, model_keys
    FROM pyembed._ranked_hits(c, mode, query, v, model_key, k, filter, options, NULL, NULL,
                              NULL);
  embed_ms := CASE WHEN mode <> 'keyword'
                   THEN extract(epoch FROM looked - started) * 1000 END;
  search_ms := extract(epoch FROM clock_timestamp() - looked) * 1000;
  IF writable AND (log OR count_models IS NOT NULL) THEN
    -- options' quick_commit: the caller's transaction is this statement alone (the Python
    -- client says so when it is not inside a transaction block), so one whose first write is
    -- this record may commit without waiting for its WAL to be flushed (the wait was most of
    -- a keyword search's time): a crash may lose the last log lines and counts, never half of
    -- one. Without it the caller's own later writes would commit that way too, so SQL callers
    -- keep their setting unless they ask; a transaction that wrote before keeps it always.
    recorded := pyembed._record_search(
      corpus_id, CASE WHEN mode <> 'keyword' THEN model_key END,
      CASE WHEN log THEN mode END, k, cache_hit, embed_ms, search_ms, NULL,
      (extract(epoch FROM clock_timestamp() - started) * 1000)::real, NULL, NULL, v, NULL,
      filter, count_models, count_hits, count_misses, (options->>'quick_commit') = 'true');
  END IF;
END
$$;

-- The second call of a cache miss: stores the query's embedding, searches with it and records
-- the search (embed_ms: the client's time from its first call to the embedding). keyword_*: a
-- hybrid search's keyword ranking, made by pyembed.keyword_ranking while the client embedded
-- (pyembed.search_hybrid). cache_key NULL: a client without a cache; ttl_seconds NULL: no
-- expiry; filter and options NULL: none; embed_ms NULL: not measured.
-- quick_commit as in search_query, for a record that caches no embedding (cache_key NULL): its
-- log line, counts and recall sample are as losable as a hit's. One that caches the embedding
-- commits synchronously (replicas get the entry at once). The record comes after the search: a
-- query the guard refused leaves no cache entry.
-- These comments stand outside the body, as pyembed.search's (sql/030-search.sql): a pg_proc row
-- over PostgreSQL's TOAST_TUPLE_TARGET has its argument types and modes compressed, and every
-- call decompressed them to describe its result row.
CREATE OR REPLACE FUNCTION pyembed.search_embedded(
  corpus text, query text, query_embedding vector, query_model_key text, cache_key bytea,
  input_type text, ttl_seconds float8, k integer, filter jsonb, mode text, options jsonb,
  embed_ms real,
  log boolean DEFAULT true, count_models text[] DEFAULT NULL, count_hits bigint[] DEFAULT NULL,
  count_misses bigint[] DEFAULT NULL, keyword_ids bigint[] DEFAULT NULL,
  keyword_scores float8[] DEFAULT NULL, keyword_keys text[] DEFAULT NULL,
  OUT corpus_id integer, OUT recorded boolean, OUT search_ms real,
  OUT document_ids text[], OUT chunk_ids bigint[], OUT chunk_indexes integer[],
  OUT contents text[], OUT metadatas jsonb[], OUT scores float8[], OUT model_keys text[])
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  started timestamptz := clock_timestamp();
  c pyembed.corpora;
BEGIN
  IF num_nulls(query, query_embedding, query_model_key, input_type, mode, log) > 0 THEN
    PERFORM pyembed._needs(query IS NULL, 'query', 'search_embedded');
    PERFORM pyembed._needs(query_embedding IS NULL, 'query_embedding', 'search_embedded');
    PERFORM pyembed._needs(query_model_key IS NULL, 'query_model_key', 'search_embedded');
    PERFORM pyembed._needs(input_type IS NULL, 'input_type', 'search_embedded');
    PERFORM pyembed._needs(mode IS NULL, 'mode', 'search_embedded');
    PERFORM pyembed._needs(log IS NULL, 'log', 'search_embedded');
  END IF;
  SELECT * INTO c FROM pyembed._corpus_named(corpus);
  IF NOT FOUND THEN
    c := pyembed.lookup_corpus(corpus);
  END IF;
  corpus_id := c.corpus_id;
  SELECT * INTO document_ids, chunk_ids, chunk_indexes, contents, metadatas, scores, model_keys
    FROM pyembed._ranked_hits(c, mode, query, query_embedding, query_model_key, k, filter, options,
                              keyword_ids, keyword_scores, keyword_keys);
  search_ms := extract(epoch FROM clock_timestamp() - started) * 1000;
  recorded := pyembed._record_search(
    corpus_id, query_model_key, CASE WHEN log THEN mode END, k, false, embed_ms, search_ms,
    NULL, (embed_ms + search_ms)::real, cache_key, input_type, query_embedding, ttl_seconds, filter,
    count_models, count_hits, count_misses,
    (options->>'quick_commit') = 'true' AND cache_key IS NULL);
END
$$;

-- A query that missed the cache on a replica, on the primary: its cached embedding if the
-- primary has it (stored by a search that the replica has not replayed yet), else NULL and the
-- provider call of `tokens` reserved.
CREATE OR REPLACE FUNCTION pyembed.reserve_query(p_corpus_id integer, p_model_key text,
                                                 p_cache_key bytea, tokens integer)
RETURNS vector
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  v vector;
BEGIN
  IF num_nulls(p_corpus_id, p_model_key, p_cache_key, tokens) > 0 THEN
    PERFORM pyembed._needs(p_corpus_id IS NULL, 'p_corpus_id', 'reserve_query');
    PERFORM pyembed._needs(p_model_key IS NULL, 'p_model_key', 'reserve_query');
    PERFORM pyembed._needs(p_cache_key IS NULL, 'p_cache_key', 'reserve_query');
    PERFORM pyembed._needs(tokens IS NULL, 'tokens', 'reserve_query');
  END IF;
  SELECT g.embedding INTO v FROM pyembed.cache_get(ARRAY[p_cache_key]) g;
  IF v IS NULL THEN
    PERFORM pyembed.reserve_usage(p_model_key, p_corpus_id, 1, tokens);
  END IF;
  RETURN v;
END
$$;
