-- Recall you can see: a share of real searches leaves its query vector in pyembed.recall_samples
-- (on the primary, by the call that records the search); the worker re-runs samples and
-- `pyembed recall` re-runs stored vectors, each through the guarded search as clients run it
-- and exactly (pyembed._nearest), and adds one measurement row.
-- Sampling rate: the setting pyembed.recall_sample_rate (0..1, default 0.01), e.g.
-- ALTER DATABASE ... SET pyembed.recall_sample_rate = 0.05; at most 1,000 samples wait per
-- corpus (more are dropped until the worker catches up).

CREATE OR REPLACE FUNCTION pyembed._sample_recall(p_corpus_id integer, p_model_key text,
                                                  q vector, filter jsonb)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  rate float8 := coalesce(nullif(current_setting('pyembed.recall_sample_rate', true), '')::float8,
                          0.01);
BEGIN
  IF current_setting('transaction_read_only') = 'on' OR q IS NULL OR random() >= rate
     OR (SELECT count(*) FROM (SELECT FROM pyembed.recall_samples s
                                WHERE s.corpus_id = p_corpus_id LIMIT 1000) waiting) >= 1000 THEN
    RETURN false;
  END IF;
  INSERT INTO pyembed.recall_samples (corpus_id, model_key, embedding, filter)
  VALUES (p_corpus_id, p_model_key, q, filter);
  RETURN true;
END
$$;

-- recall@10 of one query: the share of its 10 exact nearest vectors of the key (pyembed._nearest
-- with `exact`: the model's distance on the float32 vectors, every vector compared) that the
-- guarded search found; a found chunk as close as the 10th exact neighbour counts (ties). NULL
-- when the key has no vector to find.
CREATE OR REPLACE FUNCTION pyembed._recall_at_10(corpus text, p_corpus_id integer,
                                                 p_model_key text, q vector, filter jsonb)
RETURNS float8
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  how text := (SELECT m.distance FROM pyembed.models m WHERE m.model_key = p_model_key);
  got bigint[];
  want record;
  wanted integer;
  hits integer;
BEGIN
  got := ARRAY(SELECT s.chunk_id FROM pyembed.search(corpus, q, p_model_key, 10, filter, 'chunk') s);
  want := pyembed._nearest(p_corpus_id, p_model_key, q, 10, filter, exact => true);
  wanted := coalesce(cardinality(want.ids), 0);
  IF wanted = 0 THEN
    RETURN NULL;
  END IF;
  -- The found chunks' distances, as pyembed._index_spec's `exact` computes them.
  SELECT count(*) INTO hits FROM pyembed.vectors v
   WHERE v.corpus_id = p_corpus_id AND v.model_key = p_model_key AND v.chunk_id = ANY (got)
     AND CASE how WHEN 'cosine' THEN v.embedding <=> q WHEN 'dot' THEN v.embedding <#> q
                  ELSE v.embedding <-> q END <= want.distances[wanted] + 1e-6;
  RETURN least(hits, wanted)::float8 / wanted;
END
$$;

-- One measurement row (nothing in a read-only transaction: a replica measures, the primary
-- records).
CREATE OR REPLACE FUNCTION pyembed._record_recall(p_corpus_id integer, p_model_key text,
                                                  p_source text, p_queries integer,
                                                  p_recall float8)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  -- What the table's keys and checks would refuse, said in pyembed's words first (a DBA
  -- recording one by hand got the foreign key's or CHECK's raw error).
  PERFORM pyembed._build_target(p_corpus_id, p_model_key);
  IF p_source IS DISTINCT FROM 'sampled' AND p_source IS DISTINCT FROM 'on demand' THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('a recall measurement''s source is sampled or on demand, not %s',
                       pyembed._quoted(p_source));
  END IF;
  IF NOT p_recall BETWEEN 0 AND 1 OR p_recall IS NULL THEN  -- (NaN is above 1)
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('recall_at_10 must be 0..1, got %s', coalesce(p_recall::text, 'NULL'));
  END IF;
  IF current_setting('transaction_read_only') = 'off' AND p_queries > 0 THEN
    INSERT INTO pyembed.recall_measurements (corpus_id, model_key, source, queries, recall_at_10)
    VALUES (p_corpus_id, p_model_key, p_source, p_queries, p_recall);
  END IF;
END
$$;

-- On demand: recall@10 of `queries` stored vectors of the corpus's serving keys, used as
-- queries (a random sample), recorded as a measurement.
CREATE OR REPLACE FUNCTION pyembed.measure_recall(corpus text, queries numeric DEFAULT 50)
RETURNS TABLE (model_key text, queries_run integer, recall_at_10 float8)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora := pyembed.lookup_corpus(corpus);
  key text;
BEGIN
  -- queries numeric (pyembed._count_arg says why): a whole number
  IF queries IS NULL OR queries < 1 OR queries > 1000 OR queries <> trunc(queries) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('queries must be 1..1000, got %s', queries);
  END IF;
  FOREACH key IN ARRAY ARRAY[c.model_key] || CASE
      WHEN c.migration_step IN ('backfilled', 'validated', 'shifting') THEN ARRAY[c.target_model_key]
      ELSE '{}'::text[] END LOOP
    SELECT count(r), avg(r) INTO queries_run, recall_at_10
      FROM (SELECT pyembed._recall_at_10(c.name, c.corpus_id, key, v.embedding, NULL) AS r
              FROM pyembed.vectors v
             WHERE v.corpus_id = c.corpus_id AND v.model_key = key
             ORDER BY random() LIMIT queries::integer) m;
    model_key := key;
    IF queries_run > 0 THEN
      PERFORM pyembed._record_recall(c.corpus_id, key, 'on demand', queries_run, recall_at_10);
      RETURN NEXT;
    END IF;
  END LOOP;
END
$$;

-- In the background (`pyembed worker`): up to `max_samples` waiting samples of the caller's
-- tenant are re-run and removed, one measurement per corpus and key. A sample whose key no
-- longer serves its corpus (a migration ended) is removed unmeasured.
CREATE OR REPLACE FUNCTION pyembed.recall_sampled(max_samples numeric DEFAULT 20)
RETURNS TABLE (corpus text, model_key text, queries integer, recall_at_10 float8)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF max_samples IS NULL THEN
    PERFORM pyembed._needs(true, 'max_samples', 'recall_sampled');
  END IF;
  -- before the replica's return, so that a bad count is named there too (a negative one was
  -- taken as 0)
  PERFORM pyembed._count_arg(max_samples, 'max_samples', 0, 2147483647);
  IF current_setting('transaction_read_only') = 'on' THEN
    RETURN;
  END IF;
  RETURN QUERY
  WITH taken AS (
    DELETE FROM pyembed.recall_samples s
     WHERE s.sample_id = ANY (ARRAY(
             SELECT w.sample_id FROM pyembed.recall_samples w
              WHERE w.corpus_id = ANY (pyembed.visible_corpora())
              ORDER BY w.sample_id
              LIMIT max_samples::integer
                FOR UPDATE SKIP LOCKED))
    RETURNING s.corpus_id, s.model_key, s.embedding, s.filter
  ), measured AS (
    SELECT c.corpus_id, c.name, t.model_key,
           pyembed._recall_at_10(c.name, c.corpus_id, t.model_key, t.embedding, t.filter) AS r
      FROM taken t JOIN pyembed.corpora c ON c.corpus_id = t.corpus_id
     WHERE t.model_key = c.model_key
        OR (t.model_key = c.target_model_key
            AND c.migration_step IN ('backfilled', 'validated', 'shifting'))
  ), summed AS (
    SELECT m.corpus_id, m.name, m.model_key, count(m.r)::integer AS n, avg(m.r) AS recall
      FROM measured m GROUP BY m.corpus_id, m.name, m.model_key HAVING count(m.r) > 0
  ), recorded AS (
    SELECT s.*, pyembed._record_recall(s.corpus_id, s.model_key, 'sampled', s.n, s.recall)
      FROM summed s
  )
  SELECT r.name, r.model_key, r.n, r.recall FROM recorded r ORDER BY r.name, r.model_key;
END
$$;

-- recall@10 per corpus and key over the last `hours`: the mean over every query measured
-- (weighted by each measurement's queries), how many, and when last measured.
CREATE OR REPLACE FUNCTION pyembed.recall_report(hours numeric DEFAULT 24)
RETURNS TABLE (corpus text, model_key text, recall_at_10 float8, queries bigint,
               measured_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT c.name, m.model_key, sum(m.recall_at_10 * m.queries) / sum(m.queries),
         sum(m.queries)::bigint, max(m.measured_at)
    FROM pyembed.recall_measurements m JOIN pyembed.corpora c ON c.corpus_id = m.corpus_id
   WHERE m.corpus_id = ANY (pyembed.visible_corpora())
     AND m.measured_at > now() - (SELECT pyembed._report_window(hours, 'hours'))
   GROUP BY c.name, m.model_key
   ORDER BY c.name, m.model_key
$$;
