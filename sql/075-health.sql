-- Health views (security_invoker: each role sees its own tenant's rows) for `pyembed status` and `pyembed metrics serve`. Thresholds, from the design's
-- operating targets: coverage below 99.9% alerts; embedding throughput in the last 5 minutes
-- below half the 24-hour baseline while work is queued alerts; a cache hit rate of 40-80% is
-- healthy, below 20% or above 95% warns; latency p95 over its phase's target alerts.

-- The vectors of each key of each corpus the caller may read (its own rights and row-level
-- security: SECURITY INVOKER), counted partition by partition: a count in the views below by a
-- subquery on pyembed.vectors correlated to the corpus rescanned an append of every corpus's
-- partition for each corpus (the corpus id a parameter: pruned at each rescan, but every
-- partition visited), time growing with the square of the corpora. Here each count is planned
-- with its corpus id (force_custom_plan), which prunes to that corpus's partition.
CREATE OR REPLACE FUNCTION pyembed._vector_counts()
RETURNS TABLE (corpus_id integer, model_key text, vectors bigint)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
  id integer;
BEGIN
  FOR id IN SELECT c.corpus_id FROM pyembed.corpora c ORDER BY c.corpus_id LOOP
    RETURN QUERY SELECT id, v.model_key, count(*) FROM pyembed.vectors v
                  WHERE v.corpus_id = id GROUP BY v.model_key;
  END LOOP;
END
$$;

CREATE OR REPLACE VIEW pyembed.coverage WITH (security_invoker = true) AS
SELECT c.name AS corpus, k.model_key, k.role,
       (SELECT count(*) FROM pyembed.chunks ch WHERE ch.corpus_id = c.corpus_id) AS chunks,
       coalesce(n.vectors, 0) AS vectors,
       (SELECT count(*) FROM pyembed.queue q
         WHERE q.corpus_id = c.corpus_id AND q.model_key = k.model_key) AS queued,
       (SELECT count(*) FROM pyembed.queue_failed f
         WHERE f.corpus_id = c.corpus_id AND f.model_key = k.model_key) AS failed,
       l.leased, l.first_lease_end, l.last_lease_end
  FROM pyembed.corpora c
       CROSS JOIN LATERAL (VALUES (c.model_key, 'active'), (c.target_model_key, 'target'))
         AS k(model_key, role)
       -- Claimed and not yet done: hidden from other workers until the lease ends (a job
       -- waiting out a retry delay has its error recorded).
       CROSS JOIN LATERAL (SELECT count(*) AS leased, min(q.not_before) AS first_lease_end,
                       max(q.not_before) AS last_lease_end
                  FROM pyembed.queue q
                 WHERE q.corpus_id = c.corpus_id AND q.model_key = k.model_key
                   AND q.not_before > now() AND q.last_error IS NULL) AS l
  LEFT JOIN pyembed._vector_counts() n
    ON n.corpus_id = c.corpus_id AND n.model_key = k.model_key
 WHERE k.model_key IS NOT NULL;

-- Where each corpus's model change stands: its migration's step and share, and the vectors of
-- keys it no longer serves (a completed migration's old key, a rolled-back target), which
-- pyembed.migration_cleanup would delete, with the size of the HNSW index each keeps (from the
-- catalogue: whatever type it holds its values as; NULL without one). One row a retired key, or
-- one for a migration alone.
CREATE OR REPLACE VIEW pyembed.migration_report WITH (security_invoker = true) AS
SELECT c.name AS corpus, c.model_key, c.target_model_key, c.migration_step, c.traffic_share,
       r.model_key AS retired_key, r.vectors AS retired_vectors,
       pg_catalog.pg_relation_size(pg_catalog.to_regclass(pg_catalog.format(
         'pyembed.%I', pyembed._index_name(c.corpus_id, r.model_key)))) AS retired_index_bytes
  FROM pyembed.corpora c
  LEFT JOIN pyembed._vector_counts() r
    ON r.corpus_id = c.corpus_id AND r.model_key <> c.model_key
   AND r.model_key IS DISTINCT FROM c.target_model_key
 WHERE c.target_model_key IS NOT NULL OR r.model_key IS NOT NULL;

CREATE OR REPLACE VIEW pyembed.throughput WITH (security_invoker = true) AS
SELECT v.model_key,
       count(*) FILTER (WHERE v.created_at > now() - interval '5 minutes') / 300.0 AS per_s_5m,
       count(*) FILTER (WHERE v.created_at > now() - interval '1 hour') / 3600.0 AS per_s_1h,
       count(*) / 86400.0 AS per_s_24h,
       (SELECT count(*) FROM pyembed.queue q WHERE q.model_key = v.model_key) AS queued
  FROM pyembed.vectors v
 WHERE v.created_at > now() - interval '24 hours'
 GROUP BY v.model_key;

CREATE OR REPLACE VIEW pyembed.cache_health WITH (security_invoker = true) AS
SELECT s.model_key,
       sum(s.hits) FILTER (WHERE s.day = (now() AT TIME ZONE 'UTC')::date) AS hits_today,
       sum(s.misses) FILTER (WHERE s.day = (now() AT TIME ZONE 'UTC')::date) AS misses_today,
       sum(s.hits) AS hits_7d, sum(s.misses) AS misses_7d,
       sum(s.hits)::float8 / nullif(sum(s.hits) + sum(s.misses), 0) AS hit_rate_7d,
       max(s.entries) AS entries
  FROM pyembed.cache_report(7) s
 GROUP BY s.model_key;

CREATE OR REPLACE VIEW pyembed.latency WITH (security_invoker = true) AS
SELECT l.kind, p.phase, count(*) AS queries,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY p.ms) AS p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY p.ms) AS p95_ms,
       max(t.target_ms) AS target_p95_ms
  FROM pyembed.query_log l,
       LATERAL (VALUES
         (CASE WHEN l.cache_hit THEN 'embed (cache hit)' WHEN NOT l.cache_hit
               THEN 'embed (cache miss)' ELSE 'embed' END, l.embed_ms),
         ('search', l.search_ms), ('generation', l.generate_ms), ('total', l.total_ms)) AS p(phase, ms)
  JOIN (VALUES ('embed (cache hit)', 5.0), ('embed (cache miss)', 500.0), ('embed', 500.0),
               ('search', 50.0), ('generation', 5000.0), ('total', 6000.0)) AS t(phase, target_ms)
    ON t.phase = p.phase
 WHERE l.at > now() - interval '1 hour' AND p.ms IS NOT NULL
 GROUP BY l.kind, p.phase;

-- recall@10 per corpus and key over the last 24 hours (sql/072-recall.sql); below 0.95 alerts.
CREATE OR REPLACE VIEW pyembed.recall_health WITH (security_invoker = true) AS
SELECT r.corpus, r.model_key, r.recall_at_10, r.queries, r.measured_at
  FROM pyembed.recall_report(24) r;

-- Each streaming replica of this server and how far behind it is, for `pyembed status`. As its
-- owner: pg_stat_replication shows the lag only to pg_read_all_stats, which the application
-- role must not hold (it also shows every session's statement, other tenants' texts included).
CREATE OR REPLACE FUNCTION pyembed.replica_lag()
RETURNS TABLE (replica text, state text, bytes_behind bigint, seconds_behind float8)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT r.application_name::text, r.state::text,
         pg_wal_lsn_diff(pg_current_wal_lsn(), r.replay_lsn)::bigint,
         extract(epoch FROM r.replay_lag)::float8
    FROM pg_catalog.pg_stat_replication r ORDER BY 1
$$;
