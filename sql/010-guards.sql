-- Guards: the triggers that make the model key an enforced part of the schema.
-- SQLSTATEs (class PE): PE001 model mismatch, PE002 unknown corpus, PE003 invalid vector,
-- PE004 model key change outside a migration, PE005 invalid input, PE006 unknown model,
-- PE007 migration step refused.

-- Rows of a vector write that break a rule: model key (PE001) or the vector itself (PE003).
CREATE OR REPLACE FUNCTION pyembed._guard_vectors() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  bad record;
BEGIN
  -- One pass over the written rows finds the first that breaks any rule; the dimensions are
  -- checked per row, earlier, by the vectors_dims_match_model constraint.
  SELECT n.chunk_id, n.corpus_id, n.model_key AS got, c.name, c.model_key AS active,
         c.target_model_key AS target, ch.chunk_id IS NULL AS orphan,
         n.model_key <> c.model_key AND n.model_key IS DISTINCT FROM c.target_model_key
           AS mismatch,
         vector_norm(n.embedding) AS norm
    INTO bad
    FROM new_rows n
    JOIN pyembed.corpora c ON c.corpus_id = n.corpus_id
    JOIN pyembed.models m ON m.model_key = n.model_key
    LEFT JOIN pyembed.chunks ch ON ch.corpus_id = n.corpus_id AND ch.chunk_id = n.chunk_id
   WHERE (n.model_key <> c.model_key AND n.model_key IS DISTINCT FROM c.target_model_key)
      OR ch.chunk_id IS NULL
      OR vector_norm(n.embedding) = 0
      OR (m.normalized AND abs(vector_norm(n.embedding) - 1) > 1e-3)
   ORDER BY 8 DESC, 7 DESC
   LIMIT 1;
  IF NOT FOUND THEN
    RETURN NULL;
  ELSIF bad.mismatch THEN
    RAISE EXCEPTION USING ERRCODE = 'PE001',
      MESSAGE = format('model key mismatch: corpus %s is pinned to %s, but the vector for chunk %s '
                       'was made by %s', bad.name, bad.active, bad.chunk_id, bad.got),
      DETAIL = CASE WHEN bad.target IS NULL THEN 'no model migration is in progress'
                    ELSE format('the migration target is %s', bad.target) END,
      HINT = 'embed with the corpus''s model, or change models with `pyembed migrate`';
  ELSIF bad.orphan THEN
    RAISE EXCEPTION USING ERRCODE = '23503',
      MESSAGE = format('no chunk %s in corpus %s: vectors belong to stored chunks',
                       bad.chunk_id, bad.name);
  ELSE
    RAISE EXCEPTION USING ERRCODE = 'PE003',
      MESSAGE = CASE WHEN bad.norm = 0 THEN format('zero vector for chunk %s', bad.chunk_id)
        ELSE format('vector for chunk %s is not unit-normalised (norm %s) but %s is a normalised '
                    'model', bad.chunk_id, round(bad.norm::numeric, 6), bad.got) END,
      HINT = 'pyembed normalises vectors for you when you write through its Python API';
  END IF;
END
$$;

CREATE OR REPLACE TRIGGER vectors_guard_insert
  AFTER INSERT ON pyembed.vectors REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._guard_vectors();
CREATE OR REPLACE TRIGGER vectors_guard_update
  AFTER UPDATE ON pyembed.vectors REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._guard_vectors();

-- A corpus's model key changes only inside the migration functions (PE004).
CREATE OR REPLACE FUNCTION pyembed._guard_corpus_key() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF (NEW.model_key, NEW.target_model_key) IS DISTINCT FROM (OLD.model_key, OLD.target_model_key)
     AND current_setting('pyembed.in_migration', true) IS DISTINCT FROM 'on' THEN
    RAISE EXCEPTION USING ERRCODE = 'PE004',
      MESSAGE = format('the model key of corpus %s is %s and can only change through a migration '
                       '(refused: %s)', OLD.name, OLD.model_key,
                       coalesce(NULLIF(NEW.model_key, OLD.model_key), NEW.target_model_key)),
      HINT = 'use `pyembed migrate start CORPUS --to MODEL_KEY`';
  END IF;
  RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER corpora_guard_model_key
  BEFORE UPDATE ON pyembed.corpora
  FOR EACH ROW EXECUTE FUNCTION pyembed._guard_corpus_key();

-- A registered model never changes what its vectors mean (PE004).
CREATE OR REPLACE FUNCTION pyembed._guard_model() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF (NEW.model_key, NEW.distance, NEW.normalized, NEW.request_dimensions, NEW.input_types)
     IS DISTINCT FROM
     (OLD.model_key, OLD.distance, OLD.normalized, OLD.request_dimensions, OLD.input_types) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE004',
      MESSAGE = format('model %s is registered and its vector space cannot change; '
                       'register a new model version instead', OLD.model_key);
  END IF;
  RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER models_guard_immutable
  BEFORE UPDATE ON pyembed.models
  FOR EACH ROW EXECUTE FUNCTION pyembed._guard_model();

-- Chunks carry the sha256 of their text, computed here so it cannot disagree with the text.
CREATE OR REPLACE FUNCTION pyembed._chunk_hash() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  NEW.content_hash := sha256(convert_to(NEW.content, 'UTF8'));
  RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER chunks_hash
  BEFORE INSERT OR UPDATE OF content ON pyembed.chunks
  FOR EACH ROW EXECUTE FUNCTION pyembed._chunk_hash();

-- Deleting chunks deletes their vectors (one statement, instead of a row-level foreign key).
CREATE OR REPLACE FUNCTION pyembed._drop_chunk_vectors() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  DELETE FROM pyembed.vectors v USING old_rows o
   WHERE v.corpus_id = o.corpus_id AND v.chunk_id = o.chunk_id;
  RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER chunks_drop_vectors
  AFTER DELETE ON pyembed.chunks REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._drop_chunk_vectors();

-- Bulk vector loads. PostgreSQL refuses COPY into a table with row-level security, so a
-- client COPYs into its session's temporary staging table (pyembed_vectors_in) and this
-- function moves the rows, after checking that they belong to the caller's tenant's corpora;
-- the guard triggers above then check keys, norms and chunks as for any write.
CREATE OR REPLACE FUNCTION pyembed.load_vectors() RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  n bigint;
  foreign_corpus integer;
  visible integer[] := pyembed.visible_corpora();
BEGIN
  SELECT s.corpus_id INTO foreign_corpus FROM pg_temp.pyembed_vectors_in s
   WHERE s.corpus_id <> ALL (visible) LIMIT 1;
  IF FOUND THEN
    DELETE FROM pg_temp.pyembed_vectors_in;
    RAISE EXCEPTION USING ERRCODE = 'PE002',
      MESSAGE = format('unknown corpus id %s', foreign_corpus);
  END IF;
  INSERT INTO pyembed.vectors (corpus_id, chunk_id, model_key, embedding, content_hash)
  SELECT corpus_id, chunk_id, model_key, embedding, content_hash FROM pg_temp.pyembed_vectors_in
  ON CONFLICT (corpus_id, chunk_id, model_key) DO UPDATE
    SET embedding = EXCLUDED.embedding, content_hash = EXCLUDED.content_hash, created_at = now();
  GET DIAGNOSTICS n = ROW_COUNT;
  DELETE FROM pg_temp.pyembed_vectors_in;
  RETURN n;
END
$$;
