-- Corpora and models: created and dropped through these functions only.

-- The indexed expression, operator class and distance operator for a model's vectors.
-- pgvector indexes vector up to 2,000 dimensions and halfvec up to 4,000; beyond that, exact scan.
CREATE OR REPLACE FUNCTION pyembed._index_spec(dims integer, distance text,
  OUT expr text, OUT opclass text, OUT op text, OUT castto text)
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT format('(embedding::%s(%s))', t, dims),
         t || CASE distance WHEN 'cosine' THEN '_cosine_ops' WHEN 'dot' THEN '_ip_ops' ELSE '_l2_ops' END,
         CASE distance WHEN 'cosine' THEN '<=>' WHEN 'dot' THEN '<#>' ELSE '<->' END,
         format('%s(%s)', t, dims)
    FROM (SELECT CASE WHEN dims <= 2000 THEN 'vector' ELSE 'halfvec' END AS t) s
$$;

CREATE OR REPLACE FUNCTION pyembed._index_name(corpus_id integer, model_key text) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT format('vectors_hnsw_c%s_%s', corpus_id, left(md5(model_key), 10)) $$;

-- A corpus's HNSW indexes, all of them or all but the one serving `keep_key`.
CREATE OR REPLACE FUNCTION pyembed._vector_indexes(p_corpus_id integer,
                                                   keep_key text DEFAULT NULL)
RETURNS SETOF text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT i.relname::text FROM pg_catalog.pg_class i
   WHERE i.relnamespace = 'pyembed'::regnamespace AND i.relkind = 'i'
     AND i.relname LIKE format('vectors\_hnsw\_c%s\_%%', p_corpus_id)
     AND (keep_key IS NULL OR i.relname <> pyembed._index_name(p_corpus_id, keep_key))
$$;

-- The statement that builds the HNSW index serving one corpus and one model key (a partial
-- index on the corpus's partition), or NULL when the model is too wide for HNSW (exact scans
-- then). CONCURRENTLY (online) cannot run inside a function: clients run that variant themselves.
CREATE OR REPLACE FUNCTION pyembed._vector_index_sql(p_corpus_id integer, p_model_key text,
                                                     online boolean DEFAULT false)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  m pyembed.models;
  s record;
BEGIN
  SELECT * INTO STRICT m FROM pyembed.models WHERE model_key = p_model_key;
  IF m.dimensions > 4000 THEN
    RETURN NULL;
  END IF;
  s := pyembed._index_spec(m.dimensions, m.distance);
  RETURN format('CREATE INDEX %s IF NOT EXISTS %I ON pyembed.%I USING hnsw (%s %s) '
                'WITH (m = 16, ef_construction = 64) WHERE model_key = %L',
                CASE WHEN online THEN 'CONCURRENTLY' ELSE '' END,
                pyembed._index_name(p_corpus_id, p_model_key),
                pyembed._vector_partition_name(p_corpus_id), s.expr, s.opclass, p_model_key);
END
$$;

-- A corpus's partition of pyembed.vectors (see 010-guards.sql).
CREATE OR REPLACE FUNCTION pyembed._vector_partition_name(p_corpus_id integer) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT 'vectors_c' || p_corpus_id $$;

-- Make a corpus's partition, or bring an existing one up to date: owner, privileges, triggers,
-- and the CHECK constraint for the corpus's current keys. The table is made on its own and then
-- attached, which locks the parent SHARE UPDATE EXCLUSIVE (searches and writes go on) where
-- CREATE TABLE ... PARTITION OF would lock it ACCESS EXCLUSIVE. Replacing the constraint locks
-- the partition ACCESS EXCLUSIVE for the rest of the transaction; waiting more than 5 s for
-- that (a long load into the corpus) fails the caller rather than queueing searches behind it.
-- The new constraint is NOT VALID: rows of a key the corpus no longer serves stay until
-- cleanup, and pg_dump restores such constraints after the data.
CREATE OR REPLACE FUNCTION pyembed._vector_partition(p_corpus_id integer) RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  part text := pyembed._vector_partition_name(p_corpus_id);
  expr text := pyembed._vector_guard_expr(p_corpus_id);
  guard text := format('%s_guard_%s', part, left(md5(expr), 8));
  old text;
  caller_timeout text := current_setting('lock_timeout');
BEGIN
  IF to_regclass(format('pyembed.%I', part)) IS NULL THEN
    EXECUTE format('CREATE TABLE pyembed.%I (LIKE pyembed.vectors INCLUDING DEFAULTS)', part);
    EXECUTE format('ALTER TABLE pyembed.%I OWNER TO pyembed_owner', part);
    EXECUTE format('ALTER TABLE pyembed.vectors ATTACH PARTITION pyembed.%I FOR VALUES IN (%s)',
                   part, p_corpus_id);
  END IF;
  EXECUTE format('REVOKE ALL ON pyembed.%I FROM PUBLIC, pyembed_app', part);
  EXECUTE format('GRANT INSERT ON pyembed.%I TO pyembed_app', part);
  EXECUTE format('CREATE OR REPLACE TRIGGER vectors_tenant BEFORE INSERT ON pyembed.%I '
                 'FOR EACH STATEMENT EXECUTE FUNCTION pyembed._vectors_tenant(%L)', part, p_corpus_id);
  EXECUTE format('CREATE OR REPLACE TRIGGER vectors_written AFTER INSERT ON pyembed.%I '
                 'REFERENCING NEW TABLE AS new_rows '
                 'FOR EACH STATEMENT EXECUTE FUNCTION pyembed._vectors_written()', part);
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_constraint
                  WHERE conrelid = format('pyembed.%I', part)::regclass AND conname = guard) THEN
    PERFORM set_config('lock_timeout', '5s', true);
    FOR old IN SELECT conname FROM pg_catalog.pg_constraint
                WHERE conrelid = format('pyembed.%I', part)::regclass AND contype = 'c' LOOP
      EXECUTE format('ALTER TABLE pyembed.%I DROP CONSTRAINT %I', part, old);
    END LOOP;
    EXECUTE format('ALTER TABLE pyembed.%I ADD CONSTRAINT %I CHECK (%s) NOT VALID',
                   part, guard, expr);
    PERFORM set_config('lock_timeout', caller_timeout, true);
  END IF;
  RETURN part;
END
$$;

-- The table a SQL client COPYs a corpus's vectors into (its partition of pyembed.vectors).
CREATE OR REPLACE FUNCTION pyembed.vector_table(corpus text) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  RETURN format('pyembed.%I',
                pyembed._vector_partition_name((pyembed.lookup_corpus(corpus)).corpus_id));
END
$$;

-- Delete a corpus's vectors for a key of these chunk ids (NULL: every id lo..hi), which
-- store.copy_vectors then writes again (COPY cannot update); returns how many. As the caller
-- (row-level security applies), by index range scans: as statements of the client's, planned
-- with the statistics of a fuller partition (analyzed, then emptied), both the check and the
-- DELETE were seen to read the whole partition, every batch of a load.
CREATE OR REPLACE FUNCTION pyembed._clear_vectors(p_corpus_id integer, p_model_key text,
                                                  lo bigint, hi bigint, ids bigint[])
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_custom_plan
SET enable_seqscan = off
AS $$
DECLARE
  n bigint;
BEGIN
  -- Most batches have nothing to replace, and planning `= ANY(ids)` costs per id.
  IF NOT EXISTS (SELECT FROM pyembed.vectors WHERE corpus_id = p_corpus_id
                    AND model_key = p_model_key AND chunk_id BETWEEN lo AND hi) THEN
    RETURN 0;
  END IF;
  DELETE FROM pyembed.vectors WHERE corpus_id = p_corpus_id AND model_key = p_model_key
     AND chunk_id BETWEEN lo AND hi AND (ids IS NULL OR chunk_id = ANY (ids));
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
$$;

-- A corpus's keys change only in a migration step: its partition's constraint follows.
CREATE OR REPLACE FUNCTION pyembed._corpus_keys_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  PERFORM pyembed._vector_partition(NEW.corpus_id);
  RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER corpora_keys_changed
  AFTER UPDATE OF model_key, target_model_key ON pyembed.corpora
  FOR EACH ROW WHEN ((NEW.model_key, NEW.target_model_key)
                     IS DISTINCT FROM (OLD.model_key, OLD.target_model_key))
  EXECUTE FUNCTION pyembed._corpus_keys_changed();

CREATE OR REPLACE FUNCTION pyembed._create_vector_index(p_corpus_id integer, p_model_key text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  ddl text := pyembed._vector_index_sql(p_corpus_id, p_model_key);
BEGIN
  IF ddl IS NULL THEN
    RETURN NULL;
  END IF;
  EXECUTE ddl;
  RETURN pyembed._index_name(p_corpus_id, p_model_key);
END
$$;

CREATE OR REPLACE FUNCTION pyembed._check_corpus_name(name text) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF name IS NULL OR name !~ '^[a-z0-9][a-z0-9_-]{0,62}$' THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('invalid corpus name %s: use 1-63 lowercase letters, digits, _ or -, '
                       'starting with a letter or digit', coalesce(quote_literal(left(name, 80)), 'NULL'));
  END IF;
END
$$;

CREATE OR REPLACE FUNCTION pyembed.create_corpus(
  name text, model_key text, description text DEFAULT '',
  chunk_tokens integer DEFAULT 200, chunk_overlap integer DEFAULT 40)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  new_id integer;
BEGIN
  PERFORM pyembed._check_corpus_name(create_corpus.name);
  IF NOT EXISTS (SELECT FROM pyembed.models m WHERE m.model_key = create_corpus.model_key) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE006',
      MESSAGE = format('unknown model key %s', coalesce(quote_literal(create_corpus.model_key), 'NULL')),
      HINT = '`pyembed models` lists the registered keys';
  END IF;
  IF EXISTS (SELECT FROM pyembed.corpora c WHERE c.name = create_corpus.name
               AND coalesce(c.tenant_id, 0) = coalesce((SELECT pyembed.current_tenant()), 0)) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('corpus %s already exists', create_corpus.name);
  END IF;
  INSERT INTO pyembed.corpora (name, model_key, description, chunk_tokens, chunk_overlap,
                               tenant_id)
  VALUES (create_corpus.name, create_corpus.model_key, coalesce(create_corpus.description, ''),
          create_corpus.chunk_tokens, create_corpus.chunk_overlap, pyembed.current_tenant())
  RETURNING corpus_id INTO new_id;
  PERFORM pyembed._vector_partition(new_id);
  PERFORM pyembed._create_vector_index(new_id, create_corpus.model_key);
  RETURN new_id;
END
$$;

CREATE OR REPLACE FUNCTION pyembed.drop_corpus(name text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '5s'
AS $$
DECLARE
  c pyembed.corpora;
BEGIN
  SELECT * INTO c FROM pyembed.corpora WHERE corpora.name = drop_corpus.name
     AND coalesce(corpora.tenant_id, 0) = coalesce((SELECT pyembed.current_tenant()), 0);
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  -- The vectors and their indexes in one step. Dropping a partition locks pyembed.vectors
  -- briefly; waiting more than 5 s for that (lock_timeout above) fails instead of queueing
  -- every search behind it.
  EXECUTE format('DROP TABLE IF EXISTS pyembed.%I', pyembed._vector_partition_name(c.corpus_id));
  DELETE FROM pyembed.corpora WHERE corpus_id = c.corpus_id;
  RETURN true;
END
$$;

-- Register a model of your own; a key already registered must come with the same settings.
CREATE OR REPLACE FUNCTION pyembed.register_model(
  provider text, model_id text, model_version text, dimensions integer,
  distance text DEFAULT 'cosine', normalized boolean DEFAULT true,
  input_types boolean DEFAULT false, max_batch integer DEFAULT 128,
  max_tokens integer DEFAULT 8192, request_dimensions integer DEFAULT NULL,
  price_per_mtok numeric DEFAULT NULL, description text DEFAULT '')
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  key text;
  old pyembed.models;
BEGIN
  IF concat(provider, model_id, model_version) ~ '[/@:[:space:]]' OR provider = ''
     OR model_id = '' OR model_version = '' THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = 'provider, model id and version must be non-empty, without "/", "@", ":" or blanks';
  END IF;
  key := provider || '/' || model_id || '@' || model_version || ':' || dimensions;
  SELECT * INTO old FROM pyembed.models m WHERE m.model_key = key;
  IF FOUND THEN
    IF (old.distance, old.normalized, old.input_types, old.request_dimensions)
       IS DISTINCT FROM (distance, normalized, input_types, request_dimensions) THEN
      RAISE EXCEPTION USING ERRCODE = 'PE005',
        MESSAGE = format('model %s is already registered with other settings', key);
    END IF;
    RETURN key;
  END IF;
  INSERT INTO pyembed.models (model_key, provider, model_id, model_version, dimensions, distance,
    normalized, input_types, max_batch, max_tokens, request_dimensions, price_per_mtok, description)
  VALUES (key, provider, model_id, model_version, dimensions, distance, normalized, input_types,
    max_batch, max_tokens, request_dimensions, price_per_mtok, coalesce(description, ''));
  RETURN key;
END
$$;
