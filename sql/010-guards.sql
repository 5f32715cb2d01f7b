-- Guards: the triggers that make the model key an enforced part of the schema.
-- SQLSTATEs (class PE): PE001 model mismatch, PE002 unknown corpus, PE003 invalid vector,
-- PE004 model key change outside a migration, PE005 invalid input, PE006 unknown model,
-- PE007 migration step refused (PE008-PE010 come from the providers, PE011 from a replica).

-- Vectors are partitioned by corpus (pyembed.vectors_c<corpus_id>, made by
-- pyembed._vector_partition in 020-corpora.sql). Reads, updates and deletes go through the
-- parent, which row-level security restricts to the caller's tenant; bulk loads COPY into the
-- corpus's partition (PostgreSQL refuses COPY into a table with row-level security), where the
-- application role may only INSERT. Every write, through either, is checked:
--   row by row, by the partition's CHECK constraint: the model key is one the corpus accepts
--     (PE001), and the vector has that model's dimensions and a norm its scores can use:
--     unit length for a normalised model, 1e-10..1e10 for others (PE003). The constraint compares with literals of the corpus's
--     current keys; a row that fails them goes to pyembed._vector_check, which raises the
--     error naming both keys (or accepts the row, should the literals lag behind the keys);
--   once per statement, by the triggers below: the partition belongs to the caller's tenant
--     (PE002), every vector's chunk exists (23503), and queued work the vectors satisfy is
--     dequeued (pyembed._dequeue_written, 040-queue.sql).

-- Whether a vector's norm is one its model can store and search with finite scores: unit length
-- for a normalised model; otherwise within 1e-10..1e10, so that dot products and squared
-- distances, which pgvector sums in single precision, neither overflow nor vanish.
CREATE OR REPLACE FUNCTION pyembed._norm_ok(norm float8, normalized boolean) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT CASE WHEN normalized THEN abs(norm - 1) <= 1e-3 ELSE norm BETWEEN 1e-10 AND 1e10 END
$$;

-- The slow path of the per-partition CHECK constraint: raises the error for a refused vector.
-- Callable by the application role (a CHECK runs as the writer), so it answers only for the
-- caller's tenant's corpora; running as its owner, it can tell superusers only by session_user.
CREATE OR REPLACE FUNCTION pyembed._vector_check(p_corpus_id integer, p_chunk_id bigint,
                                                 p_model_key text, p_embedding vector)
RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora;
  m pyembed.models;
  norm float8 := vector_norm(p_embedding);
BEGIN
  IF num_nulls(p_corpus_id, p_chunk_id, p_model_key, p_embedding) > 0 THEN
    PERFORM pyembed._needs(p_corpus_id IS NULL, 'p_corpus_id', '_vector_check');
    PERFORM pyembed._needs(p_chunk_id IS NULL, 'p_chunk_id', '_vector_check');
    PERFORM pyembed._needs(p_model_key IS NULL, 'p_model_key', '_vector_check');
    PERFORM pyembed._needs(p_embedding IS NULL, 'p_embedding', '_vector_check');
  END IF;
  SELECT * INTO c FROM pyembed.corpora WHERE corpus_id = p_corpus_id
     AND (corpus_id = ANY (pyembed.visible_corpora())
          OR (SELECT rolsuper OR rolbypassrls FROM pg_catalog.pg_roles
               WHERE rolname = session_user));
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'PE002', MESSAGE = format('unknown corpus id %s', p_corpus_id),
      HINT = 'the corpus was dropped meanwhile, or is not one of your tenant''s: `pyembed corpus '
             'list` shows yours';
  END IF;
  IF p_model_key IS DISTINCT FROM c.model_key AND p_model_key IS DISTINCT FROM c.target_model_key THEN
    RAISE EXCEPTION USING ERRCODE = 'PE001',
      MESSAGE = format('model key mismatch: corpus %s is pinned to %s, but the vector for chunk %s '
                       'was made by %s', c.name, c.model_key, p_chunk_id, pyembed._quoted(p_model_key)),
      DETAIL = CASE WHEN c.target_model_key IS NULL THEN 'no model migration is in progress'
                    ELSE format('the migration target is %s', c.target_model_key) END,
      HINT = 'embed with the corpus''s model, or change models with `pyembed migrate`';
  END IF;
  SELECT * INTO STRICT m FROM pyembed.models WHERE model_key = p_model_key;
  IF vector_dims(p_embedding) <> m.dimensions THEN
    RAISE EXCEPTION USING ERRCODE = 'PE003',
      MESSAGE = format('wrong dimensions: %s has %s dimensions, the vector has %s',
                       p_model_key, m.dimensions, vector_dims(p_embedding)),
      HINT = 'embed the chunk with the model of that key: a key ends with the dimensions its '
             'model makes';
  ELSIF norm = 0 THEN
    RAISE EXCEPTION USING ERRCODE = 'PE003',
      MESSAGE = format('zero vector for chunk %s', p_chunk_id),
      HINT = 'embed the chunk''s text again: a zero vector has no direction to compare';
  ELSIF NOT m.normalized AND NOT pyembed._norm_ok(norm, false) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE003',
      MESSAGE = format('vector for chunk %s has norm %s, outside 1e-10..1e10: its scores would '
                       'overflow or vanish', p_chunk_id, norm),
      HINT = 'write the vector the model made for the chunk: one this far from norm 1 is not an '
             'embedding';
  ELSIF m.normalized AND abs(norm - 1) > 1e-3 THEN
    RAISE EXCEPTION USING ERRCODE = 'PE003',
      MESSAGE = format('vector for chunk %s is not unit-normalised (norm %s) but %s is a normalised '
                       'model', p_chunk_id, round(norm::numeric, 6), p_model_key),
      HINT = 'pyembed normalises vectors for you when you write through its Python API';
  END IF;
  RETURN true;
END
$$;

-- The per-partition CHECK expression for a corpus's current keys (see above).
CREATE OR REPLACE FUNCTION pyembed._vector_guard_expr(p_corpus_id integer) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT string_agg(format('(model_key = %L AND vector_dims(embedding) = %s AND %s)',
                           m.model_key, m.dimensions,
                           CASE WHEN m.normalized
                             THEN 'abs(vector_norm(embedding) - 1::float8) <= 0.001::float8'
                             ELSE 'vector_norm(embedding) BETWEEN 1e-10::float8 AND 1e10::float8' END),
                    ' OR ' ORDER BY m.model_key)
         || ' OR pyembed._vector_check(corpus_id, chunk_id, model_key, embedding)'
    FROM pyembed.corpora c JOIN pyembed.models m ON m.model_key IN (c.model_key, c.target_model_key)
   WHERE c.corpus_id = p_corpus_id
$$;

-- A direct write into a partition is the caller's tenant's (through the parent, row-level
-- security checks it). Superusers and BYPASSRLS roles pass, as they pass row-level security.
CREATE OR REPLACE FUNCTION pyembed._vectors_tenant() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF NOT (TG_ARGV[0]::integer = ANY (pyembed.visible_corpora()))
     AND NOT (SELECT rolsuper OR rolbypassrls FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE002', MESSAGE = format('unknown corpus id %s', TG_ARGV[0]),
      HINT = 'the corpus was dropped meanwhile, or is not one of your tenant''s: `pyembed corpus '
             'list` shows yours';
  END IF;
  RETURN NULL;
END
$$;

-- After a write: every vector's chunk exists, and the queued work it does is dequeued
-- (pyembed._dequeue_written, 040-queue.sql). One corpus and key at a time, and only over the
-- written chunk ids' range: the cost follows the batch, not the corpus. Consecutive ids (a bulk
-- load's) are checked by counting the chunks in their range, one index range scan; others by
-- probing the chunk index with the ids as an array (`= ANY(ids)` on a sequential scan would
-- read the whole corpus for every batch; a generic plan searches the array row by row).
CREATE OR REPLACE FUNCTION pyembed._vectors_written() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_custom_plan
SET enable_seqscan = off
AS $$
DECLARE
  r record;
  found_chunks bigint;
  missing bigint;
BEGIN
  FOR r IN SELECT corpus_id, model_key, array_agg(chunk_id) AS ids, count(*) AS n,
                  array_agg(int8send(chunk_id) || content_hash) AS done,
                  min(chunk_id) AS lo, max(chunk_id) AS hi
             FROM new_rows GROUP BY corpus_id, model_key LOOP
    -- A statement writes a chunk's vector for a key at most once (primary key), so n ids
    -- spanning n values are every id of their range.
    IF r.hi - r.lo + 1 = r.n THEN
      found_chunks := (SELECT count(*) FROM pyembed.chunks ch
                        WHERE ch.corpus_id = r.corpus_id AND ch.chunk_id BETWEEN r.lo AND r.hi);
    ELSE
      found_chunks := (SELECT count(*) FROM pyembed.chunks ch
                        WHERE ch.corpus_id = r.corpus_id AND ch.chunk_id = ANY (r.ids));
    END IF;
    IF found_chunks < r.n THEN
      SELECT t.id INTO missing FROM unnest(r.ids) AS t(id)
       WHERE NOT EXISTS (SELECT FROM pyembed.chunks ch
                          WHERE ch.corpus_id = r.corpus_id AND ch.chunk_id = t.id)
       LIMIT 1;
      RAISE EXCEPTION USING ERRCODE = '23503',
        MESSAGE = format('no chunk %s in corpus %s: vectors belong to stored chunks', missing,
                         coalesce((SELECT c.name FROM pyembed.corpora c
                                    WHERE c.corpus_id = r.corpus_id), r.corpus_id::text));
    END IF;
    PERFORM pyembed._dequeue_written(r.corpus_id, r.model_key, r.lo, r.hi, r.done);
  END LOOP;
  RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER vectors_written_insert
  AFTER INSERT ON pyembed.vectors REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._vectors_written();
CREATE OR REPLACE TRIGGER vectors_written_update
  AFTER UPDATE ON pyembed.vectors REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._vectors_written();

-- A vector written through the parent table is checked against row-level security only after
-- the BEFORE ROW triggers: pyembed._vector_document (below, as its owner) read and locked
-- (FOR KEY SHARE) another tenant's chunk before the write was refused, so a tenant writing a
-- vector for another's chunk waited for that tenant's transaction on it. This check runs first
-- (triggers fire in name order), as the caller, with the error the policy itself gives (as
-- pyembed._eval_query_checked does): another tenant's corpus reads as one nobody has.
-- Superusers and BYPASSRLS roles see every corpus, as for the write. (A direct write into a
-- partition is checked per statement first: _vectors_tenant.)
CREATE OR REPLACE FUNCTION pyembed._vector_corpus_visible() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF NOT EXISTS (SELECT FROM pyembed.corpora c WHERE c.corpus_id = NEW.corpus_id) THEN
    RAISE EXCEPTION USING ERRCODE = '42501',
      MESSAGE = 'new row violates row-level security policy for table "vectors"';
  END IF;
  RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER vectors_corpus_visible
  BEFORE INSERT ON pyembed.vectors
  FOR EACH ROW EXECUTE FUNCTION pyembed._vector_corpus_visible();

-- Each vector carries its chunk's document number (pyembed.documents.doc_no), so that a search
-- by document groups its nearest chunks without reading them: set here as each vector is
-- written (whatever the writer gave; a vector without a chunk is refused by the statement's
-- check above), and again when a chunk moves to another document (pyembed._chunk_moved). The
-- chunk is read FOR KEY SHARE, which a move (an update of document_id, a key column) waits for:
-- a move committed meanwhile is read here, a later one waits for the vector's commit and then
-- renumbers it; without the lock a vector written while its chunk moved kept the old number.
-- Two lookups, each by a whole primary key: as a join, a new corpus's empty statistics let the
-- planner read all the corpus's documents for every vector (and its plan is kept).
-- SECURITY DEFINER: its lookups skip row-level security, which cost two calls of
-- pyembed.visible_corpora() a row; the vector's own insert is checked by the policy on
-- pyembed.vectors.
-- A vector's created_at is the server's (when it was written), whatever the writer gave: a time
-- in the future kept a vector in its tenant's throughput figures. The application role cannot
-- UPDATE a vector (080-grants.sql): a vector is replaced by delete and insert, so its text hash
-- and its time always come with its embedding.
CREATE OR REPLACE FUNCTION pyembed._vector_document() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  doc text;
BEGIN
  SELECT ch.document_id INTO doc FROM pyembed.chunks ch
   WHERE ch.corpus_id = NEW.corpus_id AND ch.chunk_id = NEW.chunk_id FOR KEY SHARE;
  NEW.doc_no := (SELECT d.doc_no FROM pyembed.documents d
                  WHERE d.corpus_id = NEW.corpus_id AND d.document_id = doc);
  NEW.created_at := now();
  RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER vectors_document
  BEFORE INSERT ON pyembed.vectors
  FOR EACH ROW EXECUTE FUNCTION pyembed._vector_document();

-- SECURITY DEFINER: the application role may move a chunk, not write a vector's doc_no.
CREATE OR REPLACE FUNCTION pyembed._chunk_moved() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  UPDATE pyembed.vectors v SET doc_no = d.doc_no
    FROM pyembed.documents d
   WHERE v.corpus_id = NEW.corpus_id AND v.chunk_id = NEW.chunk_id
     AND d.corpus_id = NEW.corpus_id AND d.document_id = NEW.document_id;
  RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER chunks_moved
  AFTER UPDATE OF document_id ON pyembed.chunks
  FOR EACH ROW WHEN (OLD.document_id IS DISTINCT FROM NEW.document_id)
  EXECUTE FUNCTION pyembed._chunk_moved();

-- A corpus's model key changes only inside the migration functions (PE004): the trigger reads
-- the call stack, which no session setting can forge (a flag could be set by any session).
CREATE OR REPLACE FUNCTION pyembed._guard_corpus_key() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  stack text;
BEGIN
  IF (NEW.model_key, NEW.target_model_key) IS DISTINCT FROM (OLD.model_key, OLD.target_model_key) THEN
    GET DIAGNOSTICS stack = PG_CONTEXT;
    IF stack !~ (E'\\nSQL statement "UPDATE pyembed\\.corpora [^"]*"\\n'
                 'PL/pgSQL function pyembed\\.migration_(start|complete|rollback)\\([a-z,]*\\) ') THEN
      RAISE EXCEPTION USING ERRCODE = 'PE004',
        MESSAGE = format('the model key of corpus %s is %s and can only change through a '
                         'migration (refused: %s)', OLD.name, OLD.model_key,
                         coalesce(NULLIF(NEW.model_key, OLD.model_key), NEW.target_model_key)),
        HINT = 'use `pyembed migrate start CORPUS --to MODEL_KEY`';
    END IF;
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
      MESSAGE = format('model %s is registered and its vector space cannot change', OLD.model_key),
      HINT = 'register a new model version (pyembed.register_model) and migrate the corpora to it '
             '(`pyembed migrate start`)';
  END IF;
  RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER models_guard_immutable
  BEFORE UPDATE ON pyembed.models
  FOR EACH ROW EXECUTE FUNCTION pyembed._guard_model();


