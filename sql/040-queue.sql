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
-- the number moved.
CREATE OR REPLACE FUNCTION pyembed.expire_jobs(max_attempts integer) RETURNS integer
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
WITH gone AS (
  DELETE FROM pyembed.queue q USING (
    SELECT q2.corpus_id, q2.chunk_id, q2.model_key FROM pyembed.queue q2
      JOIN pyembed.chunks ch ON ch.corpus_id = q2.corpus_id AND ch.chunk_id = q2.chunk_id
     WHERE q2.attempts >= max_attempts AND q2.not_before <= now()
       AND q2.corpus_id = ANY (pyembed.visible_corpora())
     FOR KEY SHARE OF ch SKIP LOCKED FOR UPDATE OF q2 SKIP LOCKED) p
   WHERE q.corpus_id = p.corpus_id AND q.chunk_id = p.chunk_id AND q.model_key = p.model_key
  RETURNING q.*
), moved AS (
  INSERT INTO pyembed.queue_failed (corpus_id, chunk_id, model_key, content_hash, attempts,
                                    reason)
  SELECT corpus_id, chunk_id, model_key, content_hash, attempts,
         coalesce(last_error, 'no result after ' || attempts
                              || ' attempts (worker stopped or timed out)')
    FROM gone
  ON CONFLICT (corpus_id, chunk_id, model_key) DO UPDATE
    SET reason = EXCLUDED.reason, attempts = EXCLUDED.attempts, failed_at = now()
  RETURNING 1)
SELECT count(*)::integer FROM moved
$$;

-- The job as a worker claimed it, with the worker's reason: not one re-queued with a new text,
-- nor one another worker claimed after this worker's lease ran out. Whether it was moved.
CREATE OR REPLACE FUNCTION pyembed.fail_job(p_corpus_id integer, p_chunk_id bigint,
                                            p_model_key text, p_content_hash bytea,
                                            p_attempts integer, reason text) RETURNS boolean
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
WITH chunk AS MATERIALIZED (
  SELECT FROM pyembed.chunks WHERE corpus_id = p_corpus_id AND chunk_id = p_chunk_id
     AND p_corpus_id = ANY (pyembed.visible_corpora())
     FOR KEY SHARE SKIP LOCKED
), gone AS (
  DELETE FROM pyembed.queue
   WHERE corpus_id = p_corpus_id AND chunk_id = p_chunk_id AND model_key = p_model_key
     AND content_hash = p_content_hash AND attempts = p_attempts AND EXISTS (SELECT FROM chunk)
  RETURNING *
), moved AS (
  INSERT INTO pyembed.queue_failed (corpus_id, chunk_id, model_key, content_hash, attempts,
                                    reason)
  SELECT corpus_id, chunk_id, model_key, content_hash, attempts, fail_job.reason FROM gone
  ON CONFLICT (corpus_id, chunk_id, model_key) DO UPDATE
    SET reason = EXCLUDED.reason, attempts = EXCLUDED.attempts, failed_at = now()
  RETURNING 1)
SELECT EXISTS (SELECT FROM moved)
$$;

-- Vector writes dequeue what they satisfy (called by pyembed._vectors_written, 010-guards.sql,
-- for each corpus and key a statement writes): queued work is done when a vector has its chunk
-- id and text hash, the pair as one bytea looked up in the written pairs (a hashed `= ANY`,
-- cheaper than a join with unnest(ids, hashes); a join with the transition table was planned
-- as a nested loop over the queue, quadratic).
CREATE OR REPLACE FUNCTION pyembed._dequeue_written(p_corpus_id integer, p_model_key text,
                                                    lo bigint, hi bigint, done bytea[])
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_custom_plan
SET enable_seqscan = off
AS $$
BEGIN
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
                    ELSE format('the migration target is %s', bad.target) END;
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
