-- The work queue: a chunk whose text is new or changed is queued for every model key its corpus
-- serves (the active key, and the migration target during a migration). Triggers never call the
-- network; `pyembed worker` embeds. A fresh vector for the same text dequeues it.

-- A statement at a time (transition tables): a bulk insert queues its chunks in one pass. As its
-- owner: a job is the caller's own chunk write (the transition tables hold only rows row-level
-- security let it write), and the application role inserts no job, nor sets a job's text hash.
CREATE OR REPLACE FUNCTION pyembed._enqueue_chunks() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO pyembed.queue (corpus_id, chunk_id, model_key, content_hash)
    SELECT n.corpus_id, n.chunk_id, k.key, n.content_hash
      FROM new_rows n JOIN pyembed.corpora c ON c.corpus_id = n.corpus_id,
           LATERAL unnest(ARRAY[c.model_key, c.target_model_key]) AS k(key)
     WHERE k.key IS NOT NULL
    ON CONFLICT (corpus_id, chunk_id, model_key) DO UPDATE
      SET content_hash = EXCLUDED.content_hash, attempts = 0, last_error = NULL,
          not_before = now(), enqueued_at = now();
  ELSE
    INSERT INTO pyembed.queue (corpus_id, chunk_id, model_key, content_hash)
    SELECT n.corpus_id, n.chunk_id, k.key, n.content_hash
      FROM new_rows n
      JOIN old_rows o ON o.corpus_id = n.corpus_id AND o.chunk_id = n.chunk_id
                     AND o.content_hash IS DISTINCT FROM n.content_hash
      JOIN pyembed.corpora c ON c.corpus_id = n.corpus_id,
           LATERAL unnest(ARRAY[c.model_key, c.target_model_key]) AS k(key)
     WHERE k.key IS NOT NULL
    ON CONFLICT (corpus_id, chunk_id, model_key) DO UPDATE
      SET content_hash = EXCLUDED.content_hash, attempts = 0, last_error = NULL,
          not_before = now(), enqueued_at = now();
    DELETE FROM pyembed.queue_failed f USING new_rows n, old_rows o
     WHERE o.corpus_id = n.corpus_id AND o.chunk_id = n.chunk_id
       AND o.content_hash IS DISTINCT FROM n.content_hash
       AND f.corpus_id = n.corpus_id AND f.chunk_id = n.chunk_id;
  END IF;
  RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER chunks_queue_insert
  AFTER INSERT ON pyembed.chunks REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._enqueue_chunks();
CREATE OR REPLACE TRIGGER chunks_queue_update
  AFTER UPDATE ON pyembed.chunks REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._enqueue_chunks();

-- Moving jobs to pyembed.queue_failed, for `pyembed worker` (which logs in as a tenant's
-- application role): a failure row is a queued job of the caller's corpora (visible_corpora:
-- these run as their owner, whom a superuser installer's ownership exempts from row-level
-- security), moved with the attempts the queue counted; the application role has no INSERT or
-- UPDATE on queue_failed, so it cannot write a failure that did not happen.
-- Moving a job locks its chunk FOR KEY SHARE (the foreign key), and a writer deleting a chunk
-- holds the chunk and then deletes its jobs (the cascade): the chunk is taken first here too,
-- and a job whose chunk is being deleted is left to that delete (SKIP LOCKED: the moves never
-- wait, and could otherwise deadlock with the delete).

-- Jobs that used up their attempts without a recorded verdict (e.g. the worker died each time);
-- the number moved. A job no claim has tried (attempts 0) has used none, whatever max_attempts
-- a caller gives (numeric, compared as given: any count a client sends is taken).
CREATE OR REPLACE FUNCTION pyembed.expire_jobs(max_attempts numeric) RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  n integer;
BEGIN
  PERFORM pyembed._needs(max_attempts IS NULL, 'max_attempts', 'expire_jobs');
  WITH gone AS (
    DELETE FROM pyembed.queue q USING (
      SELECT q2.corpus_id, q2.chunk_id, q2.model_key FROM pyembed.queue q2
        JOIN pyembed.chunks ch ON ch.corpus_id = q2.corpus_id AND ch.chunk_id = q2.chunk_id
       WHERE q2.attempts >= expire_jobs.max_attempts AND q2.attempts > 0
         AND q2.not_before <= now()
         AND q2.corpus_id = ANY (pyembed.visible_corpora())
       FOR KEY SHARE OF ch SKIP LOCKED FOR UPDATE OF q2 SKIP LOCKED) p
     WHERE q.corpus_id = p.corpus_id AND q.chunk_id = p.chunk_id AND q.model_key = p.model_key
    RETURNING q.*
  ), moved AS (
    INSERT INTO pyembed.queue_failed (corpus_id, chunk_id, model_key, content_hash,
                                      attempts, reason)
    SELECT g.corpus_id, g.chunk_id, g.model_key, g.content_hash, g.attempts,
           coalesce(g.last_error, 'no result after ' || g.attempts
                                  || ' attempts (worker stopped or timed out)')
      FROM gone g
    ON CONFLICT (corpus_id, chunk_id, model_key) DO UPDATE
      SET reason = EXCLUDED.reason, attempts = EXCLUDED.attempts, failed_at = now()
    RETURNING 1)
  SELECT count(*)::integer INTO n FROM moved;
  RETURN n;
END
$$;

-- A failure's reason as the queue and queue_failed store it (queue.last_error and
-- queue_failed.reason, whose CHECKs <table>_<column>_bound hold the same length): cut to that
-- length, so that a worker's long error (a provider's whole answer) is recorded, not refused.
-- The one place a reason is cut: retry_jobs and fail_job take it whole (PE005 for NULL).
CREATE OR REPLACE FUNCTION pyembed._failure_reason(reason text, fn text) RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  PERFORM pyembed._needs(reason IS NULL, 'reason', fn);
  RETURN left(reason, 2000);
END
$$;

-- The job as a worker claimed it, with the worker's reason: not one re-queued with a new text,
-- nor one another worker claimed after this worker's lease ran out. Whether it was moved.
CREATE OR REPLACE FUNCTION pyembed.fail_job(p_corpus_id integer, p_chunk_id bigint,
                                            p_model_key text, p_content_hash bytea,
                                            p_attempts integer, reason text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  why text := pyembed._failure_reason(reason, 'fail_job');
  moved boolean;
BEGIN
  IF num_nulls(p_corpus_id, p_chunk_id, p_model_key, p_content_hash, p_attempts) > 0 THEN
    PERFORM pyembed._needs(p_corpus_id IS NULL, 'p_corpus_id', 'fail_job');
    PERFORM pyembed._needs(p_chunk_id IS NULL, 'p_chunk_id', 'fail_job');
    PERFORM pyembed._needs(p_model_key IS NULL, 'p_model_key', 'fail_job');
    PERFORM pyembed._needs(p_content_hash IS NULL, 'p_content_hash', 'fail_job');
    PERFORM pyembed._needs(p_attempts IS NULL, 'p_attempts', 'fail_job');
  END IF;
  WITH chunk AS MATERIALIZED (
    SELECT FROM pyembed.chunks WHERE corpus_id = p_corpus_id AND chunk_id = p_chunk_id
       AND p_corpus_id = ANY (pyembed.visible_corpora())
       FOR KEY SHARE SKIP LOCKED
  ), gone AS (
    DELETE FROM pyembed.queue q
     WHERE q.corpus_id = p_corpus_id AND q.chunk_id = p_chunk_id AND q.model_key = p_model_key
       AND q.content_hash = p_content_hash AND q.attempts = p_attempts
       AND EXISTS (SELECT FROM chunk)
    RETURNING q.*
  ), done AS (
    INSERT INTO pyembed.queue_failed (corpus_id, chunk_id, model_key, content_hash,
                                      attempts, reason)
    SELECT g.corpus_id, g.chunk_id, g.model_key, g.content_hash, g.attempts, why FROM gone g
    ON CONFLICT (corpus_id, chunk_id, model_key) DO UPDATE
      SET reason = EXCLUDED.reason, attempts = EXCLUDED.attempts, failed_at = now()
    RETURNING 1)
  SELECT EXISTS (SELECT FROM done) INTO moved;
  RETURN moved;
END
$$;

-- Vector writes dequeue what they satisfy (called by pyembed._vectors_written, 010-guards.sql,
-- for each corpus and key a statement writes): queued work is done when a vector has its chunk
-- id and text hash, the pair as one bytea looked up in the written pairs (a hashed `= ANY`,
-- cheaper than a join with unnest(ids, hashes); a join with the transition table was planned
-- as a nested loop over the queue, quadratic). As its owner, on the caller's corpora only: its
-- FOR UPDATE needs an UPDATE privilege on the queue, which the application role does not have
-- (a job's attempts, lease and last error are the worker functions' to write, above).
CREATE OR REPLACE FUNCTION pyembed._dequeue_written(p_corpus_id integer, p_model_key text,
                                                    lo bigint, hi bigint, done bytea[])
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_custom_plan
SET enable_seqscan = off
AS $$
BEGIN
  IF num_nulls(p_corpus_id, p_model_key, lo, hi, done) > 0 THEN
    PERFORM pyembed._needs(p_corpus_id IS NULL, 'p_corpus_id', '_dequeue_written');
    PERFORM pyembed._needs(p_model_key IS NULL, 'p_model_key', '_dequeue_written');
    PERFORM pyembed._needs(lo IS NULL, 'lo', '_dequeue_written');
    PERFORM pyembed._needs(hi IS NULL, 'hi', '_dequeue_written');
    PERFORM pyembed._needs(done IS NULL, 'done', '_dequeue_written');
  END IF;
  -- The caller's corpus first (nested: SQL does not promise the order of AND), so that
  -- another tenant's jobs are not even read.
  IF NOT (p_corpus_id = ANY (pyembed.visible_corpora())) THEN
    RETURN;
  END IF;
  IF EXISTS (SELECT FROM pyembed.queue q WHERE q.corpus_id = p_corpus_id
                AND q.chunk_id BETWEEN lo AND hi) THEN
    -- A job another transaction holds (a writer re-queuing its chunk) is left queued rather
    -- than waited for: waiting could deadlock with that writer; embedding it again is cheap.
    DELETE FROM pyembed.queue q
     WHERE q.ctid = ANY (ARRAY(
             SELECT d.ctid FROM pyembed.queue d
              WHERE d.corpus_id = p_corpus_id AND d.model_key = p_model_key
                AND d.chunk_id BETWEEN lo AND hi
                AND int8send(d.chunk_id) || d.content_hash = ANY (done)
                FOR UPDATE SKIP LOCKED));
  END IF;
END
$$;

-- A queued job carries a key its corpus accepts (the active key or the migration target), or
-- PE001: the worker would otherwise pay another model's provider for work it cannot store.
-- Checked once per statement, for the rows it inserts or whose corpus or key it changes (a
-- claim, renewal or retry of a job whose key a migration step withdrew changes neither).
CREATE OR REPLACE FUNCTION pyembed._queue_keys_accepted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  bad record;
BEGIN
  IF TG_OP = 'INSERT' THEN
    SELECT n.chunk_id, n.model_key, c.name, c.model_key AS active, c.target_model_key AS target
      INTO bad
      FROM new_rows n LEFT JOIN pyembed.corpora c ON c.corpus_id = n.corpus_id
     WHERE n.model_key IS DISTINCT FROM c.model_key AND n.model_key IS DISTINCT FROM c.target_model_key
     LIMIT 1;
  ELSE
    SELECT n.chunk_id, n.model_key, c.name, c.model_key AS active, c.target_model_key AS target
      INTO bad
      FROM new_rows n LEFT JOIN pyembed.corpora c ON c.corpus_id = n.corpus_id
     WHERE n.model_key IS DISTINCT FROM c.model_key AND n.model_key IS DISTINCT FROM c.target_model_key
       AND NOT EXISTS (SELECT FROM old_rows o WHERE o.corpus_id = n.corpus_id
                          AND o.chunk_id = n.chunk_id AND o.model_key = n.model_key)
     LIMIT 1;
  END IF;
  IF FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'PE001',
      MESSAGE = format('model key mismatch: corpus %s is pinned to %s, but chunk %s was queued '
                       'for %s', coalesce(bad.name, 'unknown'), coalesce(bad.active, 'nothing'),
                       bad.chunk_id, bad.model_key),
      DETAIL = CASE WHEN bad.target IS NULL THEN 'no model migration is in progress'
                    ELSE format('the migration target is %s', bad.target) END,
      HINT = 'queue a chunk for the key its corpus serves (or its migration''s target): a '
             'chunk''s write queues it itself';
  END IF;
  RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER queue_keys_accepted_insert
  AFTER INSERT ON pyembed.queue REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._queue_keys_accepted();
CREATE OR REPLACE TRIGGER queue_keys_accepted_update
  AFTER UPDATE ON pyembed.queue REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._queue_keys_accepted();

-- The worker's claim, lease renewal, retry and release, the only writes of a job's attempts,
-- lease (not_before) and last error: the application role has no UPDATE on pyembed.queue, as
-- attempts decide when a job expires and last_error is what expire_jobs records as its failure.
-- Each runs as its owner on the caller's corpora only (visible_corpora, as fail_job), and a
-- renewal, retry or release changes only a job as this worker's claim left it (its attempts): a
-- job re-queued with a new text (attempts 0) or claimed again by another worker is not its own.
-- A bound outside its range is PE005: batch_size 1..10000 jobs (pyembed._count_arg's words: numeric,
-- so that any count a client sends reaches the check), lease above 0 and at most a day. The batch
-- size as an integer, for LIMIT.
CREATE OR REPLACE FUNCTION pyembed._job_bounds(batch numeric, lease float8) RETURNS integer
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF lease IS NULL OR NOT (lease > 0 AND lease <= 86400) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('lease must be above 0 and at most 86400 seconds, got %s',
                       coalesce(lease::text, 'NULL'));
  END IF;
  RETURN pyembed._count_arg(batch, 'batch_size', 1, 10000);
END
$$;

-- Lease up to `batch` due jobs (attempts + 1, hidden for `lease` seconds) whose key their corpus
-- accepts, skipping keys in `skip`; jobs it does not accept are returned with the corpus's name
-- and keys (not leased, locked until the caller's transaction ends, for it to fail them).
-- The text and its hash come from the same row version: a vector is never stored under the hash
-- of a text it was not made from. FOR NO KEY UPDATE, as for every row a statement updates
-- without changing its key.
CREATE OR REPLACE FUNCTION pyembed.claim_jobs(max_attempts numeric, batch numeric,
                                              lease float8, skip text[] DEFAULT '{}')
RETURNS TABLE (corpus_id integer, chunk_id bigint, model_key text, content_hash bytea,
               attempts integer, content text, name text, active text, target text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
  most integer;
BEGIN
  IF num_nulls(max_attempts, batch, lease, skip) > 0 THEN
    PERFORM pyembed._needs(max_attempts IS NULL, 'max_attempts', 'claim_jobs');
    PERFORM pyembed._needs(batch IS NULL, 'batch', 'claim_jobs');
    PERFORM pyembed._needs(lease IS NULL, 'lease', 'claim_jobs');
    PERFORM pyembed._needs(skip IS NULL, 'skip', 'claim_jobs');
  END IF;
  most := pyembed._job_bounds(batch, lease);
  RETURN QUERY
  WITH picked AS (
    SELECT q.corpus_id, q.chunk_id, q.model_key, q.content_hash, q.attempts,
           c.corpus_id IS NULL OR q.model_key IN (c.model_key, c.target_model_key) IS TRUE
             AS accepted,
           c.name, c.model_key AS active, c.target_model_key AS target
      FROM pyembed.queue q LEFT JOIN pyembed.corpora c ON c.corpus_id = q.corpus_id
     WHERE q.not_before <= now() AND q.attempts < claim_jobs.max_attempts
       AND q.model_key <> ALL (coalesce(skip, '{}'))
       AND q.corpus_id = ANY (pyembed.visible_corpora())
     ORDER BY q.not_before, q.enqueued_at
     LIMIT most FOR NO KEY UPDATE OF q SKIP LOCKED
  ), claimed AS (
    UPDATE pyembed.queue q
       SET attempts = q.attempts + 1, not_before = now() + make_interval(secs => lease)
      FROM picked p
      LEFT JOIN pyembed.chunks ch ON ch.corpus_id = p.corpus_id AND ch.chunk_id = p.chunk_id
     WHERE q.corpus_id = p.corpus_id AND q.chunk_id = p.chunk_id AND q.model_key = p.model_key
       AND p.accepted
    RETURNING q.corpus_id, q.chunk_id, q.model_key,
              coalesce(ch.content_hash, q.content_hash) AS content_hash, q.attempts, ch.content)
  SELECT l.corpus_id, l.chunk_id, l.model_key, l.content_hash, l.attempts, l.content,
         NULL::text, NULL::text, NULL::text FROM claimed l
  UNION ALL
  SELECT p.corpus_id, p.chunk_id, p.model_key, p.content_hash, p.attempts, NULL, p.name,
         p.active, p.target
    FROM picked p WHERE NOT p.accepted;
END
$$;

-- Extend the leases of jobs in flight (each as its claim left it) whose key their corpus still
-- accepts (a job whose key a migration step withdrew is left to its lease, and failed after
-- the call); rows another session holds are skipped, so a renewal never waits. The number
-- renewed.
CREATE OR REPLACE FUNCTION pyembed.renew_jobs(lease float8, corpus_ids integer[],
                                              chunk_ids bigint[], keys text[],
                                              claimed integer[]) RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  n integer;
BEGIN
  IF num_nulls(lease, corpus_ids, chunk_ids, keys, claimed) > 0 THEN
    PERFORM pyembed._needs(lease IS NULL, 'lease', 'renew_jobs');
    PERFORM pyembed._needs(corpus_ids IS NULL, 'corpus_ids', 'renew_jobs');
    PERFORM pyembed._needs(chunk_ids IS NULL, 'chunk_ids', 'renew_jobs');
    PERFORM pyembed._needs(keys IS NULL, 'keys', 'renew_jobs');
    PERFORM pyembed._needs(claimed IS NULL, 'claimed', 'renew_jobs');
  END IF;
  IF cardinality(chunk_ids) IS DISTINCT FROM cardinality(corpus_ids)
     OR cardinality(keys) IS DISTINCT FROM cardinality(corpus_ids)
     OR cardinality(claimed) IS DISTINCT FROM cardinality(corpus_ids) THEN
    PERFORM pyembed._one_each('renew_jobs', 'corpus_ids, chunk_ids, keys and claimed',
                              ARRAY[cardinality(corpus_ids), cardinality(chunk_ids),
                                    cardinality(keys), cardinality(claimed)]);
  END IF;
  PERFORM pyembed._job_bounds(1, lease);
  UPDATE pyembed.queue q
     SET not_before = greatest(q.not_before, now() + make_interval(secs => lease))
    FROM (SELECT q2.corpus_id, q2.chunk_id, q2.model_key
            FROM unnest(corpus_ids, chunk_ids, keys, claimed)
                 AS t(corpus_id, chunk_id, model_key, attempts)
            JOIN pyembed.queue q2 ON q2.corpus_id = t.corpus_id AND q2.chunk_id = t.chunk_id
                                 AND q2.model_key = t.model_key AND q2.attempts = t.attempts
                                 AND q2.attempts > 0
            JOIN pyembed.corpora c ON c.corpus_id = q2.corpus_id
                                  AND q2.model_key IN (c.model_key, c.target_model_key)
           WHERE q2.corpus_id = ANY (pyembed.visible_corpora())
           FOR NO KEY UPDATE OF q2 SKIP LOCKED) p
   WHERE q.corpus_id = p.corpus_id AND q.chunk_id = p.chunk_id AND q.model_key = p.model_key;
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
$$;

-- Retry claimed jobs after their delays (seconds, 0 to a day, as a lease: a job delayed longer
-- is as good as lost), recording why the try failed (what expire_jobs records if the job runs
-- out of attempts). One statement for the batch, so that it shares one now() and is claimed
-- again as one batch. The number retried.
CREATE OR REPLACE FUNCTION pyembed.retry_jobs(reason text, corpus_ids integer[],
                                              chunk_ids bigint[], keys text[], hashes bytea[],
                                              claimed integer[], delays float8[])
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  n integer;
  why text := pyembed._failure_reason(reason, 'retry_jobs');
BEGIN
  IF num_nulls(corpus_ids, chunk_ids, keys, hashes, claimed, delays) > 0 THEN
    PERFORM pyembed._needs(corpus_ids IS NULL, 'corpus_ids', 'retry_jobs');
    PERFORM pyembed._needs(chunk_ids IS NULL, 'chunk_ids', 'retry_jobs');
    PERFORM pyembed._needs(keys IS NULL, 'keys', 'retry_jobs');
    PERFORM pyembed._needs(hashes IS NULL, 'hashes', 'retry_jobs');
    PERFORM pyembed._needs(claimed IS NULL, 'claimed', 'retry_jobs');
    PERFORM pyembed._needs(delays IS NULL, 'delays', 'retry_jobs');
  END IF;
  IF cardinality(chunk_ids) IS DISTINCT FROM cardinality(corpus_ids)
     OR cardinality(keys) IS DISTINCT FROM cardinality(corpus_ids)
     OR cardinality(hashes) IS DISTINCT FROM cardinality(corpus_ids)
     OR cardinality(claimed) IS DISTINCT FROM cardinality(corpus_ids)
     OR cardinality(delays) IS DISTINCT FROM cardinality(corpus_ids) THEN
    PERFORM pyembed._one_each(
      'retry_jobs', 'corpus_ids, chunk_ids, keys, hashes, claimed and delays',
      ARRAY[cardinality(corpus_ids), cardinality(chunk_ids), cardinality(keys),
            cardinality(hashes), cardinality(claimed), cardinality(delays)]);
  END IF;
  IF EXISTS (SELECT FROM unnest(delays) d WHERE d IS NULL OR NOT (d >= 0 AND d <= 86400)) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = 'retry_jobs() needs delays of 0 to 86400 seconds';
  END IF;
  UPDATE pyembed.queue q SET last_error = why,
         not_before = now() + make_interval(secs => t.delay)
    FROM unnest(corpus_ids, chunk_ids, keys, hashes, claimed, delays)
         AS t(corpus_id, chunk_id, model_key, content_hash, attempts, delay)
   WHERE q.corpus_id = t.corpus_id AND q.chunk_id = t.chunk_id AND q.model_key = t.model_key
     AND q.content_hash = t.content_hash AND q.attempts = t.attempts AND q.attempts > 0
     AND q.corpus_id = ANY (pyembed.visible_corpora());
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
$$;

-- The worker's write takes only the jobs its claim still holds: of one corpus's jobs for a key,
-- those still as this worker's claim left them (its attempts) whose chunk still has the text
-- it embedded, locked until the write's transaction ends (its vectors' trigger dequeues them).
-- A job another worker claimed after this one's lease ran out (attempts moved on), or already
-- embedded and dequeued, is not returned: its vector is that worker's to write, once, and to
-- count. Locked in chunk order, so two writers wait for each other rather than deadlock, and
-- each chunk before its job, as a chunk's deletion does (its job goes by the cascade); a claim
-- under way is waited for (a short transaction) and its outcome read.
CREATE OR REPLACE FUNCTION pyembed.hold_jobs(p_corpus_id integer, p_model_key text,
                                             chunk_ids bigint[], hashes bytea[],
                                             claimed integer[])
RETURNS SETOF bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF num_nulls(p_corpus_id, p_model_key, chunk_ids, hashes, claimed) > 0 THEN
    PERFORM pyembed._needs(p_corpus_id IS NULL, 'p_corpus_id', 'hold_jobs');
    PERFORM pyembed._needs(p_model_key IS NULL, 'p_model_key', 'hold_jobs');
    PERFORM pyembed._needs(chunk_ids IS NULL, 'chunk_ids', 'hold_jobs');
    PERFORM pyembed._needs(hashes IS NULL, 'hashes', 'hold_jobs');
    PERFORM pyembed._needs(claimed IS NULL, 'claimed', 'hold_jobs');
  END IF;
  IF cardinality(hashes) IS DISTINCT FROM cardinality(chunk_ids)
     OR cardinality(claimed) IS DISTINCT FROM cardinality(chunk_ids) THEN
    PERFORM pyembed._one_each('hold_jobs', 'chunk_ids, hashes and claimed',
                              ARRAY[cardinality(chunk_ids), cardinality(hashes),
                                    cardinality(claimed)]);
  END IF;
  IF NOT (p_corpus_id = ANY (pyembed.visible_corpora())) THEN
    RETURN;
  END IF;
  RETURN QUERY
  SELECT q.chunk_id
    FROM unnest(chunk_ids, hashes, claimed) AS t(chunk_id, content_hash, attempts)
    JOIN pyembed.queue q ON q.corpus_id = p_corpus_id AND q.chunk_id = t.chunk_id
                        AND q.model_key = p_model_key AND q.attempts = t.attempts
                        AND q.attempts > 0
    JOIN pyembed.chunks ch ON ch.corpus_id = p_corpus_id AND ch.chunk_id = t.chunk_id
                          AND ch.content_hash = t.content_hash
   ORDER BY q.chunk_id
     FOR KEY SHARE OF ch FOR NO KEY UPDATE OF q;
END
$$;

-- Each queue the session may work, one row per tenant that has jobs (pyembed.acting_tenants: for
-- a superuser or an operator's login every tenant's and none's, each read acting for that tenant,
-- so that row-level security decides what each count sees; for any other login its own tenant's,
-- tenant NULL): jobs queued, jobs a claim or expire_jobs acts on now (due, past their lease or
-- delay; keys in `skip` left out but for jobs out of attempts) and the oldest of those, and jobs due within `within` seconds
-- that a claim would take (attempts below max_attempts). The worker picks the next tenant to
-- claim for from it. Restores the caller's pyembed.act_as_tenant before it returns.
CREATE OR REPLACE FUNCTION pyembed.queue_by_tenant(max_attempts numeric, skip text[] DEFAULT '{}',
                                                   within float8 DEFAULT 0)
RETURNS TABLE (tenant text, label text, queued bigint, due bigint, soon bigint,
               oldest timestamptz)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
  t record;
  saved text := coalesce(current_setting('pyembed.act_as_tenant', true), '');
BEGIN
  IF num_nulls(max_attempts, skip, within) > 0 THEN
    PERFORM pyembed._needs(max_attempts IS NULL, 'max_attempts', 'queue_by_tenant');
    PERFORM pyembed._needs(skip IS NULL, 'skip', 'queue_by_tenant');
    PERFORM pyembed._needs(within IS NULL, 'within', 'queue_by_tenant');
  END IF;
  IF NOT (within >= 0 AND within <= 86400) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('within must be 0 to 86400 seconds, got %s', within);
  END IF;
  FOR t IN SELECT a.tenant, a.label FROM pyembed.acting_tenants() a LOOP
    IF t.tenant IS NOT NULL THEN
      PERFORM set_config('pyembed.act_as_tenant', t.tenant, true);
    END IF;
    tenant := t.tenant;
    label := t.label;
    SELECT count(*),
           count(*) FILTER (WHERE q.not_before <= now()
                              AND (q.model_key <> ALL (skip)
                                   OR q.attempts >= queue_by_tenant.max_attempts)),
           count(*) FILTER (WHERE q.attempts < queue_by_tenant.max_attempts
                              AND q.not_before <= now() + make_interval(secs => within)
                              AND q.model_key <> ALL (skip)),
           min(q.not_before) FILTER (WHERE q.not_before <= now()
                                       AND (q.model_key <> ALL (skip)
                                            OR q.attempts >= queue_by_tenant.max_attempts))
      INTO queued, due, soon, oldest
      FROM pyembed.queue q WHERE q.corpus_id = ANY (pyembed.visible_corpora());
    IF queued > 0 THEN
      RETURN NEXT;
    END IF;
  END LOOP;
  PERFORM set_config('pyembed.act_as_tenant', saved, true);
END
$$;

-- Give claimed jobs back untouched (their claim's attempt undone, due now): a worker that
-- cannot embed their key leaves them to one that can. The number released.
CREATE OR REPLACE FUNCTION pyembed.release_jobs(corpus_ids integer[], chunk_ids bigint[],
                                                keys text[], claimed integer[])
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  n integer;
BEGIN
  IF num_nulls(corpus_ids, chunk_ids, keys, claimed) > 0 THEN
    PERFORM pyembed._needs(corpus_ids IS NULL, 'corpus_ids', 'release_jobs');
    PERFORM pyembed._needs(chunk_ids IS NULL, 'chunk_ids', 'release_jobs');
    PERFORM pyembed._needs(keys IS NULL, 'keys', 'release_jobs');
    PERFORM pyembed._needs(claimed IS NULL, 'claimed', 'release_jobs');
  END IF;
  IF cardinality(chunk_ids) IS DISTINCT FROM cardinality(corpus_ids)
     OR cardinality(keys) IS DISTINCT FROM cardinality(corpus_ids)
     OR cardinality(claimed) IS DISTINCT FROM cardinality(corpus_ids) THEN
    PERFORM pyembed._one_each('release_jobs', 'corpus_ids, chunk_ids, keys and claimed',
                              ARRAY[cardinality(corpus_ids), cardinality(chunk_ids),
                                    cardinality(keys), cardinality(claimed)]);
  END IF;
  UPDATE pyembed.queue q SET attempts = q.attempts - 1, not_before = now()
    FROM unnest(corpus_ids, chunk_ids, keys, claimed) AS t(corpus_id, chunk_id, model_key, attempts)
   WHERE q.corpus_id = t.corpus_id AND q.chunk_id = t.chunk_id AND q.model_key = t.model_key
     AND q.attempts = t.attempts AND q.attempts > 0
     AND q.corpus_id = ANY (pyembed.visible_corpora());
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
$$;

-- Clears the corpus's failed jobs once the caller is done with them (these chunks' only; NULL:
-- all of them); returns how many. As its owner, the corpus looked up by name (PE002 for one the
-- caller's tenant does not have): a table-level DELETE would let the application role LOCK
-- pyembed.queue_failed, every tenant's, in any mode (015-chunks.sql says why).
CREATE OR REPLACE FUNCTION pyembed.delete_failures(corpus text, chunk_ids bigint[] DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora;
  n bigint;
BEGIN
  IF corpus IS NULL THEN
    PERFORM pyembed._needs(true, 'corpus', 'delete_failures');
  END IF;
  c := pyembed.lookup_corpus(corpus);
  DELETE FROM pyembed.queue_failed f
   WHERE f.corpus_id = c.corpus_id AND (chunk_ids IS NULL OR f.chunk_id = ANY (chunk_ids));
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
$$;
