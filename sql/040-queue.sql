-- The work queue: a chunk whose text is new or changed is queued for every model key its corpus
-- serves (the active key, and the migration target during a migration). Triggers never call the
-- network; `pyembed worker` embeds. A fresh vector for the same text dequeues it.

CREATE OR REPLACE FUNCTION pyembed._enqueue_chunk() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  INSERT INTO pyembed.queue (corpus_id, chunk_id, model_key, content_hash)
  SELECT NEW.corpus_id, NEW.chunk_id, k.key, NEW.content_hash
    FROM pyembed.corpora c,
         LATERAL unnest(ARRAY[c.model_key, c.target_model_key]) AS k(key)
   WHERE c.corpus_id = NEW.corpus_id AND k.key IS NOT NULL
  ON CONFLICT (corpus_id, chunk_id, model_key) DO UPDATE
    SET content_hash = EXCLUDED.content_hash, attempts = 0, last_error = NULL,
        not_before = now(), enqueued_at = now();
  DELETE FROM pyembed.queue_failed WHERE corpus_id = NEW.corpus_id AND chunk_id = NEW.chunk_id;
  RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER chunks_enqueue_insert
  AFTER INSERT ON pyembed.chunks
  FOR EACH ROW EXECUTE FUNCTION pyembed._enqueue_chunk();
CREATE OR REPLACE TRIGGER chunks_enqueue_update
  AFTER UPDATE OF content ON pyembed.chunks
  FOR EACH ROW WHEN (OLD.content_hash IS DISTINCT FROM NEW.content_hash)
  EXECUTE FUNCTION pyembed._enqueue_chunk();

CREATE OR REPLACE FUNCTION pyembed._dequeue_written() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  DELETE FROM pyembed.queue q USING new_rows n
   WHERE q.corpus_id = n.corpus_id AND q.chunk_id = n.chunk_id AND q.model_key = n.model_key
     AND q.content_hash = n.content_hash;
  RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER vectors_written_dequeue
  AFTER INSERT ON pyembed.vectors REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._dequeue_written();
CREATE OR REPLACE TRIGGER vectors_written_dequeue_update
  AFTER UPDATE ON pyembed.vectors REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._dequeue_written();
