-- Guarded search: the query vector comes with its model key, and a mismatch raises PE001.
-- One lookup (the corpus by lookup_corpus's rule, inlined; the model and the partition's counted
-- rows by one static query), checks, then the nearest chunks, ranked and scored, by the vector
-- leg's statement (index, storage, ef_search: pyembed._nearest_sql, 025-nearest.sql), grouped by
-- the document numbers the vectors carry; that is pyembed._vector_ranking (taking the corpus
-- row its caller looked up), which hybrid search fuses with the keyword ranking before reading
-- any text;
-- pyembed.search reads the texts of the k hits.
-- What the function does besides the index scan is what a search costs over pgvector's own
-- statement (tests/benchmarks/bench_suite.py section 2): each statement and function call
-- counts, every search.
-- The corpus is looked up among the caller's tenant's only (this function runs as its owner,
-- which row-level security does not restrict), so another tenant's corpus is "unknown".
-- group_by 'document' (the default) returns k distinct documents, each with its nearest chunk,
-- keyed by document number (pyembed.documents.doc_no, as text):
-- the nearest chunks are fetched 2k at a time deeper (pyembed._nearest_settings widens ef_search
-- with them, so that the index scan can return them) until k documents are among them or the
-- corpus has no more; k at first where every document has one chunk (keyword_stats counts as
-- many chunks as documents), at the corpus's own ef_search; 'chunk' returns the k nearest
-- chunks. Given `chunks` (hybrid search's vector leg), it ranks the documents among that many
-- nearest chunks, at most k, from one scan: fewer than k where those chunks repeat documents.

-- The nearest chunks come from the vector leg's settings (pyembed._nearest_settings, inlined: no
-- call) and statement: the corpus's own function for the key (pyembed._nearest_functions,
-- 025-nearest.sql), whose plans PL/pgSQL keeps for the session, called by name through a small
-- dynamic statement; where it is missing (the corpus dropped or the key migrated away since the
-- caller looked it up, or a function dropped by hand), the search starts again by the dynamic
-- statement (pyembed._nearest_sql, inlined, planned at each search), which meets a dropped
-- corpus as every search did (undefined_table: PE002) and a migrated key's rows as they are.
-- The SET clause keeps the settings local to this function: they end as it returns.
-- A search short of k hits says why when chunks of the corpus wait in the queue for the key:
-- no vector search finds them until the worker embeds them (`pyembed add_document` and a
-- write's trigger queue them; a corpus no worker ever ran for returned nothing, silently). A
-- NOTICE, SQLSTATE 01PE1 (Python: the warning pyembed.NotEmbeddedYet; the command line: a
-- warning line), that writes nothing (a replica answers it); asked only by a search short of
-- k, so a search that fills k pays nothing for it.
CREATE OR REPLACE FUNCTION pyembed._queued_notice(c pyembed.corpora, key text) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  waiting bigint := (SELECT count(*) FROM pyembed.queue q
                      WHERE q.corpus_id = c.corpus_id AND q.model_key = key);
BEGIN
  IF waiting > 0 THEN
    RAISE NOTICE USING ERRCODE = '01PE1',
      MESSAGE = format('corpus %s has %s chunks queued for embedding with %s, which vector '
                       'search finds only once they are embedded', c.name, waiting, key),
      HINT = 'run `pyembed worker` (it embeds queued chunks; `pyembed status` shows the queue)';
  END IF;
END
$$;

CREATE OR REPLACE FUNCTION pyembed._vector_ranking(
  c pyembed.corpora, query_embedding vector, query_model_key text, k integer, filter jsonb,
  group_by text, chunks integer, OUT ids bigint[], OUT scores float8[], OUT keys text[])
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
  leg text;
BEGIN
  -- the partition's counted rows and the corpus's counts as scalar subqueries (each at most one
  -- row by its unique index), not outer joins: the kept plan runs less
  SELECT mo.dimensions, mo.distance, mo.normalized,
         (SELECT cl.reltuples FROM pg_catalog.pg_class cl
           WHERE cl.relnamespace = 'pyembed'::regnamespace
             AND cl.relname = pyembed._vector_partition_name(c.corpus_id)) AS counted,
         (SELECT ks.chunks = ks.documents FROM pyembed.keyword_stats ks
           WHERE ks.corpus_id = c.corpus_id) AS one_chunk_each
    INTO md
    FROM pyembed.models mo
   WHERE mo.model_key = query_model_key;
  IF query_model_key IS DISTINCT FROM c.model_key
     AND NOT (query_model_key = c.target_model_key
              AND c.migration_step IN ('backfilled', 'validated', 'shifting')) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE001',
      MESSAGE = format('model key mismatch: corpus %s is pinned to %s, but the query vector was '
                       'made by %s', c.name, c.model_key, pyembed._quoted(query_model_key)),
      HINT = 'embed the query with the corpus''s model, or let pyembed.search_text embed it';
  END IF;
  IF k IS NULL OR k < 1 OR k > 1000 THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('k must be 1..1000, got %s', coalesce(k::text, 'NULL'));
  END IF;
  IF group_by IS NULL OR group_by NOT IN ('document', 'chunk') THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('group_by must be document or chunk, not %s', pyembed._quoted(group_by));
  END IF;
  IF query_embedding IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005', MESSAGE = 'no query vector (NULL)',
      HINT = 'pyembed.search_text embeds a query text for you';
  END IF;
  IF filter IS NOT NULL AND jsonb_typeof(filter) <> 'object' THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('a metadata filter is a JSON object, not %s', jsonb_typeof(filter));
  END IF;
  -- The bound of the filter a sampled search records (recall_samples_filter_bound), checked
  -- for every search: else one search in a sample rate's share failed on recording it.
  IF pg_column_size(filter) > 65536 THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('a metadata filter is at most 65536 bytes (as jsonb), got %s',
                       pg_column_size(filter));
  END IF;
  IF vector_dims(query_embedding) <> md.dimensions THEN
    RAISE EXCEPTION USING ERRCODE = 'PE003',
      MESSAGE = format('wrong dimensions: %s has %s dimensions, the query vector has %s',
                       query_model_key, md.dimensions, vector_dims(query_embedding)),
      HINT = 'embed the query with the corpus''s model (pyembed.embed, input type query), or let '
             'pyembed.search_text embed it';
  END IF;
  IF vector_norm(query_embedding) = 0 THEN
    RAISE EXCEPTION USING ERRCODE = 'PE003', MESSAGE = 'zero query vector',
      HINT = 'embed the query text again: a zero vector has no direction to compare';
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
                       'or vanish', vector_norm(query_embedding)),
      HINT = 'give the vector the model made for the query: one this far from norm 1 is not an '
             'embedding';
  END IF;
  -- the key's storage (a migration's target key may have its own) and its index rules
  -- (pyembed._nearest_rules, inlined: no call)
  storage := CASE WHEN query_model_key = c.target_model_key
                  THEN coalesce(c.target_storage, c.storage) ELSE c.storage END;
  s := pyembed._nearest_rules(md.dimensions, md.distance, storage, c.index_settings,
                              greatest(md.counted, 0)::bigint);
  -- The corpus's own statement for the key (pyembed._nearest_functions), called by name.
  leg := format('SELECT * FROM pyembed.%I($1, $2, $3, $4, $5)',
                pyembed._nearest_function_name(c.corpus_id, query_model_key));
  LOOP
    BEGIN
      -- k chunks are k documents where every document has one chunk (as the committed counts
      -- say); `chunks` given: the documents among that many nearest chunks, at most k, from one
      -- scan
      n := CASE WHEN chunks IS NOT NULL THEN chunks
                WHEN group_by = 'chunk' OR md.one_chunk_each THEN k ELSE 2 * k END;
      LOOP
        -- The nearest chunks: ids, distances, scores, docs, n of them at most, nearest first.
        setting := pyembed._nearest_settings(n, filter IS NOT NULL, false, s, md.counted);
        IF leg IS NULL THEN
          EXECUTE pyembed._nearest_sql(c.corpus_id, query_model_key, n, filter IS NOT NULL, false,
                                       s, md.distance, md.counted)
            INTO hit_ids, hit_distances, hit_scores, hit_docs USING query_embedding, filter;
        ELSE
          EXECUTE leg INTO hit_ids, hit_distances, hit_scores, hit_docs
            USING query_embedding, filter, n, pyembed._nearest_candidates(n, s),
                  pyembed._nearest_scans(n, false, s, md.counted);
        END IF;
        IF group_by = 'chunk' THEN  -- each chunk its own key: ranked as they came
          ids := hit_ids;
          scores := hit_scores;
          keys := hit_ids::text[];
          IF coalesce(cardinality(ids), 0) < k THEN
            PERFORM pyembed._queued_notice(c, query_model_key);
          END IF;
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
                  OR n >= 16 * k OR chunks IS NOT NULL;
        n := 2 * n;
      END LOOP;
      IF coalesce(cardinality(ids), 0) < k THEN
        PERFORM pyembed._queued_notice(c, query_model_key);
      END IF;
      RETURN;
    EXCEPTION
      WHEN undefined_table THEN  -- the corpus was dropped since its caller looked it up
        PERFORM pyembed._dropped_meanwhile(c.corpus_id);
        RAISE;
      -- No function for the key (a corpus dropped, or the key migrated away, since the caller
      -- looked it up; or dropped by hand), or dropped between the leg's parse and its run (its
      -- oid then "cache lookup failed"): the search again by the dynamic statement, which meets
      -- such a corpus as it meets every other.
      WHEN undefined_function OR internal_error THEN
        IF leg IS NULL OR (SQLSTATE = 'XX000'
                           AND SQLERRM NOT LIKE 'cache lookup failed for function %') THEN
          RAISE;
        END IF;
        leg := NULL;
    END;
  END LOOP;
END
$$;

-- The hits of the k best (pyembed._vector_ranking), with their texts, best first.
-- The corpus by lookup_corpus's rule (pyembed._corpus_named, inlined: no call), and
-- lookup_corpus's own error when there is none. An assignment and the texts' query written out,
-- not function scans: each call is part of the guard's fixed cost (bench_suite.py section 2).
-- The texts are read by a nested loop of index probes in the ranking's order (the plan knows the
-- ordinality is sorted: no sort, no hash table); the ids alone are unnested, each hit's score
-- taken by its position (unnesting both arrays scanned two functions, each into a tuplestore of
-- its own). The ranking's `chunks` is NULL: k documents (no default, so that a downgrade's own
-- six-argument version beside it is never ambiguous).
-- k is numeric (pyembed._count_arg says why), its default a numeric constant (10 is stored as
-- an integer's cast, which put this row over the limit below); _count_arg is called (for its
-- error) only for a k out of range: a call with a SET clause costs every search. No
-- plan_cache_mode SET either (the ranking has its own): its save and restore cost a search
-- more than the texts' statement's choice of plan.
-- These comments stand outside the body: a pg_proc row over PostgreSQL's TOAST_TUPLE_TARGET has
-- its argument defaults compressed, and every call's statement decompressed them to resolve the
-- call.
CREATE OR REPLACE FUNCTION pyembed.search(
  corpus text, query_embedding vector, query_model_key text,
  k numeric DEFAULT 10.0, filter jsonb DEFAULT NULL, group_by text DEFAULT 'document')
RETURNS TABLE (document_id text, chunk_id bigint, chunk_index integer, content text,
               metadata jsonb, score double precision, model_key text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora;
  r record;
BEGIN
  IF num_nulls(query_embedding, query_model_key) > 0 THEN
    PERFORM pyembed._needs(query_embedding IS NULL, 'query_embedding', 'search');
    PERFORM pyembed._needs(query_model_key IS NULL, 'query_model_key', 'search');
  END IF;
  SELECT * INTO c FROM pyembed._corpus_named(corpus);
  IF NOT FOUND THEN
    c := pyembed.lookup_corpus(corpus);
  END IF;
  r := pyembed._vector_ranking(c, query_embedding, query_model_key, CASE WHEN k BETWEEN 1 AND
    1000 AND k=trunc(k) THEN k::int ELSE pyembed._count_arg(k,'k',1,1000) END, filter, group_by,
    NULL);
  RETURN QUERY
  SELECT ch.document_id, ch.chunk_id, ch.chunk_index, ch.content, ch.metadata, r.scores[h.n],
         query_model_key
    FROM unnest(r.ids) WITH ORDINALITY h(chunk_id, n)
    JOIN pyembed.chunks ch ON ch.corpus_id = c.corpus_id AND ch.chunk_id = h.chunk_id
   ORDER BY h.n;
END
$$;
