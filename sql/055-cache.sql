-- The embedding cache and its hit counts: read and written only through these functions (the
-- application role has no privilege on the tables, which would otherwise be a second, unguarded
-- vector table). Entries are the caller's tenant's; an entry is checked as a stored vector is.
-- No write waits for another session: a key stored twice at once keeps both rows (lookups take
-- the newest, the next store of the key removes the others), and counts are rows of their own.

CREATE OR REPLACE FUNCTION pyembed.cache_get(keys bytea[])
RETURNS TABLE (cache_key bytea, embedding vector)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF keys IS NULL THEN
    PERFORM pyembed._needs(true, 'keys', 'cache_get');
  END IF;
  RETURN QUERY
  SELECT DISTINCT ON (e.cache_key) e.cache_key, e.embedding FROM pyembed.embedding_cache e
   WHERE e.tenant_id = coalesce(pyembed.current_tenant(), 0) AND e.cache_key = ANY (keys)
     AND (e.expires_at IS NULL OR e.expires_at > now())
   ORDER BY e.cache_key, e.created_at DESC;
END
$$;

-- When an entry stored now with a TTL of `ttl_seconds` expires: NULL for none, or PE005 for a
-- TTL that is not a positive number of seconds below a hundred years (NaN, infinite, or one past
-- the timestamps' range failed with a raw interval error; zero or less stored entries already
-- expired).
CREATE OR REPLACE FUNCTION pyembed._expiry(ttl_seconds float8) RETURNS timestamptz
LANGUAGE plpgsql STABLE
AS $$
BEGIN
  IF ttl_seconds IS NULL THEN
    RETURN NULL;
  END IF;
  IF NOT (ttl_seconds > 0 AND ttl_seconds < 3.15e9) THEN  -- NaN sorts above every number
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('a cache TTL is a positive number of seconds below a hundred years '
                       '(or NULL: no expiry), not %s', ttl_seconds);
  END IF;
  RETURN now() + make_interval(secs => ttl_seconds);
END
$$;

-- Stores (or renews) entries; in a read-only transaction (a replica) it stores nothing.
CREATE OR REPLACE FUNCTION pyembed.cache_put(keys bytea[], p_model_key text, p_input_type text,
                                             embeddings vector[], ttl_seconds float8 DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  tid integer := coalesce(pyembed.current_tenant(), 0);
  m pyembed.models;
  bad record;
  stored integer;
  expires timestamptz := pyembed._expiry(ttl_seconds);  -- checked first
BEGIN
  IF num_nulls(keys, p_model_key, p_input_type, embeddings) > 0 THEN
    PERFORM pyembed._needs(keys IS NULL, 'keys', 'cache_put');
    PERFORM pyembed._needs(p_model_key IS NULL, 'p_model_key', 'cache_put');
    PERFORM pyembed._needs(p_input_type IS NULL, 'p_input_type', 'cache_put');
    PERFORM pyembed._needs(embeddings IS NULL, 'embeddings', 'cache_put');
  END IF;
  IF current_setting('transaction_read_only') = 'on' THEN
    RETURN 0;
  END IF;
  IF cardinality(keys) IS DISTINCT FROM cardinality(embeddings) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('cache_put needs one vector per key (%s keys, %s vectors)',
                       cardinality(keys), cardinality(embeddings));
  END IF;
  IF p_input_type IS NULL OR p_input_type NOT IN ('document', 'query') THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('input type must be document or query, not %s',
                       pyembed._quoted(p_input_type));
  END IF;
  SELECT * INTO m FROM pyembed.models WHERE model_key = p_model_key;
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'PE006',
      MESSAGE = format('unknown model key %s', pyembed._quoted(p_model_key)),
      HINT = '`pyembed models` lists the registered keys';
  END IF;
  SELECT t.i, t.k, t.e INTO bad FROM unnest(keys, embeddings) WITH ORDINALITY AS t(k, e, i)
   WHERE t.k IS NULL OR length(t.k) <> 32 OR t.e IS NULL OR vector_dims(t.e) <> m.dimensions
      OR NOT pyembed._norm_ok(vector_norm(t.e), m.normalized)
   LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION USING ERRCODE = CASE WHEN bad.k IS NULL OR length(bad.k) <> 32 THEN 'PE005'
                                         ELSE 'PE003' END,
      MESSAGE = format('cache entry %s refused: %s', bad.i, CASE
        WHEN bad.k IS NULL OR length(bad.k) <> 32 THEN 'a cache key is a 32-byte sha256'
        WHEN bad.e IS NULL THEN 'no vector'
        WHEN vector_dims(bad.e) <> m.dimensions THEN format(
          '%s has %s dimensions, the vector has %s', m.model_key, m.dimensions, vector_dims(bad.e))
        ELSE format('norm %s is out of range for %s', vector_norm(bad.e), m.model_key) END);
  END IF;
  -- Older rows of these keys (expired, or stored at the same time by another session), unless
  -- another session holds them.
  DELETE FROM pyembed.embedding_cache e
   WHERE e.ctid = ANY (ARRAY(SELECT o.ctid FROM pyembed.embedding_cache o
                              WHERE o.tenant_id = tid AND o.cache_key = ANY (keys)
                                FOR UPDATE SKIP LOCKED));
  INSERT INTO pyembed.embedding_cache (tenant_id, cache_key, model_key, input_type, embedding,
                                       expires_at)
  SELECT DISTINCT ON (t.k) tid, t.k, m.model_key, p_input_type, t.e,
         expires
    FROM unnest(keys, embeddings) AS t(k, e);
  GET DIAGNOSTICS stored = ROW_COUNT;
  RETURN stored;
END
$$;

-- Hit and miss counts: each call adds rows of its own (summed by readers), so counting never
-- waits for another session. False in a read-only transaction, which writes nothing: the
-- caller keeps its counts for later. Days are UTC's whatever the session's TimeZone
-- (current_date is the session's: a client at UTC+13 counted into tomorrow's row).
CREATE OR REPLACE FUNCTION pyembed.cache_count(models text[], hits bigint[], misses bigint[])
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF num_nulls(models, hits, misses) > 0 THEN
    PERFORM pyembed._needs(models IS NULL, 'models', 'cache_count');
    PERFORM pyembed._needs(hits IS NULL, 'hits', 'cache_count');
    PERFORM pyembed._needs(misses IS NULL, 'misses', 'cache_count');
  END IF;
  IF cardinality(hits) IS DISTINCT FROM cardinality(models)
     OR cardinality(misses) IS DISTINCT FROM cardinality(models) THEN
    PERFORM pyembed._one_each('cache_count', 'models, hits and misses',
                              ARRAY[cardinality(models), cardinality(hits), cardinality(misses)]);
  END IF;
  IF current_setting('transaction_read_only') = 'on' THEN
    RETURN false;
  END IF;
  -- What one call may count is the table's rule (cache_stats_counts_not_negative and
  -- _in_range: the reports add the rows up); a row of nothing is not written.
  INSERT INTO pyembed.cache_stats (tenant_id, day, model_key, hits, misses)
  SELECT coalesce(pyembed.current_tenant(), 0), (now() AT TIME ZONE 'UTC')::date, t.m, t.h, t.x
    FROM unnest(models, hits, misses) AS t(m, h, x)
   WHERE t.m IS NOT NULL AND (t.h <> 0 OR t.x <> 0);
  RETURN true;
END
$$;

-- Hits, misses and current entries per day and model (or reranker), the caller's tenant's.
CREATE OR REPLACE FUNCTION pyembed.cache_report(days numeric DEFAULT 30)
RETURNS TABLE (day date, model_key text, hits bigint, misses bigint, entries bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  tid integer := coalesce(pyembed.current_tenant(), 0);
BEGIN
  RETURN QUERY
  SELECT s.day, s.model_key, sum(s.hits)::bigint, sum(s.misses)::bigint,
         (SELECT count(DISTINCT e.cache_key) FROM pyembed.embedding_cache e
           WHERE e.tenant_id = tid AND e.model_key = s.model_key)
         + (SELECT count(DISTINCT r.cache_key) FROM pyembed.rerank_cache r
             WHERE r.tenant_id = tid AND r.reranker = s.model_key)
    FROM pyembed.cache_stats s
   WHERE s.tenant_id = tid
     AND s.day > ((now() AT TIME ZONE 'UTC')::date - pyembed._report_window(days, 'days'))::date
   GROUP BY s.day, s.model_key
   ORDER BY s.day DESC, s.model_key;
END
$$;

-- Deletes the caller's tenant's entries (of one model, or only expired ones); returns how many.
-- older_than_days: only entries made more than that many days ago (the cache has no size bound
-- of its own: this is the rule a scheduled purge keeps it to).
CREATE OR REPLACE FUNCTION pyembed.cache_purge(p_model_key text DEFAULT NULL,
                                               expired_only boolean DEFAULT false,
                                               older_than_days numeric DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  gone bigint;
  made_before timestamptz;
BEGIN
  IF older_than_days IS NOT NULL THEN  -- checked once, before any row
    made_before := now() - make_interval(
      days => pyembed._count_arg(older_than_days, 'older_than_days', 0, 36500));
  END IF;
  IF expired_only IS NULL THEN
    PERFORM pyembed._needs(true, 'expired_only', 'cache_purge');
  END IF;
  -- A key no model has would delete nothing, which read as done ("deleted 0").
  IF p_model_key IS NOT NULL
     AND NOT EXISTS (SELECT FROM pyembed.models m WHERE m.model_key = p_model_key) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE006',
      MESSAGE = format('unknown model key %s',
                       pyembed._quoted(p_model_key)),
      HINT = '`pyembed models` lists the registered keys';
  END IF;
  DELETE FROM pyembed.embedding_cache e
   WHERE e.tenant_id = coalesce(pyembed.current_tenant(), 0)
     AND (p_model_key IS NULL OR e.model_key = p_model_key)
     AND (NOT expired_only OR e.expires_at <= now())
     AND (made_before IS NULL OR e.created_at < made_before);
  GET DIAGNOSTICS gone = ROW_COUNT;
  RETURN gone;
END
$$;
