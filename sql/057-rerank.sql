-- The rerank stage from SQL, and its cache.
--
-- The rerank cache is read and written only through these functions, like the embedding cache
-- (sql/055-cache.sql): the application role has no privilege on pyembed.rerank_cache. Entries
-- are the caller's tenant's; no write waits for another session (a key stored twice at once
-- keeps both rows, lookups take the newest, the next store of the key removes the others).

-- The rerankers pyembed can call (pyembed.providers.rerank.RERANKERS, compared by a test): the
-- keys a ledger row may name beside the registry's models (pyembed._ledger_key_known).
CREATE OR REPLACE FUNCTION pyembed.rerankers() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT ARRAY['voyage/rerank-2.5', 'voyage/rerank-2.5-lite', 'cohere/rerank-v3.5',
               'fake/overlap']
$$;

-- A rerank cache row is a known reranker's (PE006): its function takes any name of the form.
CREATE OR REPLACE FUNCTION pyembed._reranker_known() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF NEW.reranker = ANY (pyembed.rerankers()) THEN
    RETURN NEW;
  END IF;
  RAISE EXCEPTION USING ERRCODE = 'PE006',
    MESSAGE = format('unknown reranker %s', pyembed._quoted(NEW.reranker)),
    HINT = format('known: %s', array_to_string(pyembed.rerankers(), ', '));
END
$$;

CREATE OR REPLACE TRIGGER rerank_cache_reranker_known
  BEFORE INSERT OR UPDATE OF reranker ON pyembed.rerank_cache
  FOR EACH ROW EXECUTE FUNCTION pyembed._reranker_known();

CREATE OR REPLACE FUNCTION pyembed.rerank_cache_get(keys bytea[])
RETURNS TABLE (cache_key bytea, score double precision)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF keys IS NULL THEN
    PERFORM pyembed._needs(true, 'keys', 'rerank_cache_get');
  END IF;
  RETURN QUERY
  SELECT DISTINCT ON (e.cache_key) e.cache_key, e.score FROM pyembed.rerank_cache e
   WHERE e.tenant_id = coalesce(pyembed.current_tenant(), 0) AND e.cache_key = ANY (keys)
     AND (e.expires_at IS NULL OR e.expires_at > now())
   ORDER BY e.cache_key, e.created_at DESC;
END
$$;

-- Stores (or renews) scores; in a read-only transaction (a replica) it stores nothing.
CREATE OR REPLACE FUNCTION pyembed.rerank_cache_put(keys bytea[], p_reranker text,
                                                    scores float8[],
                                                    ttl_seconds float8 DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  tid integer := coalesce(pyembed.current_tenant(), 0);
  bad record;
  stored integer;
  expires timestamptz := pyembed._expiry(ttl_seconds);  -- checked first
BEGIN
  IF num_nulls(keys, p_reranker, scores) > 0 THEN
    PERFORM pyembed._needs(keys IS NULL, 'keys', 'rerank_cache_put');
    PERFORM pyembed._needs(p_reranker IS NULL, 'p_reranker', 'rerank_cache_put');
    PERFORM pyembed._needs(scores IS NULL, 'scores', 'rerank_cache_put');
  END IF;
  IF current_setting('transaction_read_only') = 'on' THEN
    RETURN 0;
  END IF;
  IF cardinality(keys) IS DISTINCT FROM cardinality(scores) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('rerank_cache_put needs one score per key (%s keys, %s scores)',
                       cardinality(keys), cardinality(scores));
  END IF;
  IF p_reranker IS NULL OR p_reranker !~ '^[a-z0-9-]+/[A-Za-z0-9._-]+$' THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('a reranker is named provider/model, not %s',
                       pyembed._quoted(p_reranker));
  END IF;
  SELECT t.i, t.k, t.s INTO bad FROM unnest(keys, scores) WITH ORDINALITY AS t(k, s, i)
   WHERE t.k IS NULL OR length(t.k) <> 32 OR t.s IS NULL OR t.s = 'NaN'
      OR t.s IN ('Infinity', '-Infinity')
   LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('rerank cache entry %s refused: %s', bad.i, CASE
        WHEN bad.k IS NULL OR length(bad.k) <> 32 THEN 'a cache key is a 32-byte sha256'
        ELSE format('a score is a finite number, not %s', coalesce(bad.s::text, 'NULL')) END);
  END IF;
  -- Older rows of these keys (expired, or stored at the same time by another session), unless
  -- another session holds them.
  DELETE FROM pyembed.rerank_cache e
   WHERE e.ctid = ANY (ARRAY(SELECT o.ctid FROM pyembed.rerank_cache o
                              WHERE o.tenant_id = tid AND o.cache_key = ANY (keys)
                                FOR UPDATE SKIP LOCKED));
  INSERT INTO pyembed.rerank_cache (tenant_id, cache_key, reranker, score, expires_at)
  SELECT DISTINCT ON (t.k) tid, t.k, p_reranker, t.s, expires
    FROM unnest(keys, scores) AS t(k, s);
  GET DIAGNOSTICS stored = ROW_COUNT;
  RETURN stored;
END
$$;

-- Deletes the caller's tenant's rerank scores (of one reranker, or only expired ones).
CREATE OR REPLACE FUNCTION pyembed.rerank_cache_purge(p_reranker text DEFAULT NULL,
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
    PERFORM pyembed._needs(true, 'expired_only', 'rerank_cache_purge');
  END IF;
  DELETE FROM pyembed.rerank_cache e
   WHERE e.tenant_id = coalesce(pyembed.current_tenant(), 0)
     AND (p_reranker IS NULL OR e.reranker = p_reranker)
     AND (NOT expired_only OR e.expires_at <= now())
     AND (made_before IS NULL OR e.created_at < made_before);
  GET DIAGNOSTICS gone = ROW_COUNT;
  RETURN gone;
END
$$;

-- Search by text, then rerank: the `candidates` best hits of `mode` search (as search_text
-- finds them, with its group_by, fusion and alpha) reordered by `rerank` (e.g. 'voyage/rerank-2.5', 'cohere/rerank-v3.5'), the
-- best k returned with the reranker's score and identity beside the search's. The reranker's
-- key is the owner's secret (VOYAGE_API_KEY / COHERE_API_KEY, pyembed.set_secret); its request
-- is bounded by pyembed.http_timeout and pyembed.http_retries, accounted in pyembed.usage and
-- cached, like an embedding's. `candidates` NULL is 50, or k if larger; one given below k is
-- PE005, as from Python and the CLI (pyembed.rerank.candidates).
CREATE OR REPLACE FUNCTION pyembed._search_reranked(corpus text, query text, rerank text,
                                                    k integer, filter jsonb, mode text,
                                                    candidates integer, group_by text,
                                                    fusion text, alpha double precision)
RETURNS TABLE (document_id text, chunk_id bigint, chunk_index integer, content text,
               metadata jsonb, score double precision, model_key text,
               rerank_score double precision, reranker text)
LANGUAGE plpython3u VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
try:
    from pyembed import indb
except Exception as exc:  # pyembed._cannot_import: PE013 with the fix, not 38000 and a class
    plpy.execute(plpy.prepare("SELECT pyembed._cannot_import($1)", ["text"]), [repr(exc)])
return indb.call(plpy, indb.search_reranked, GD, corpus, query, rerank, k, filter, mode,
                 candidates, group_by, fusion, alpha)
$$;

CREATE OR REPLACE FUNCTION pyembed.search_reranked(corpus text, query text, rerank text,
                                                   k numeric DEFAULT 10,
                                                   filter jsonb DEFAULT NULL,
                                                   mode text DEFAULT 'vector',
                                                   candidates numeric DEFAULT NULL,
                                                   group_by text DEFAULT 'document',
                                                   fusion text DEFAULT NULL,
                                                   alpha double precision DEFAULT NULL)
RETURNS TABLE (document_id text, chunk_id bigint, chunk_index integer, content text,
               metadata jsonb, score double precision, model_key text,
               rerank_score double precision, reranker text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  e_state text; e_message text; e_detail text; e_hint text;
BEGIN
  RETURN QUERY SELECT * FROM pyembed._search_reranked(
    corpus, query, rerank, pyembed._count_arg(k, 'k', 1, 1000), filter, mode,
    pyembed._count_arg(candidates, 'rerank candidates', 1, 1000), group_by, fusion, alpha);
EXCEPTION WHEN OTHERS OR query_canceled THEN
  GET STACKED DIAGNOSTICS e_state = RETURNED_SQLSTATE, e_message = MESSAGE_TEXT,
                          e_detail = PG_EXCEPTION_DETAIL, e_hint = PG_EXCEPTION_HINT;
  PERFORM pyembed._raise_again(e_state, e_message, e_detail, e_hint);
END
$$;
