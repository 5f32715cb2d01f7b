-- A corpus's HNSW settings and storage, and rebuilding its index with new ones. Searches keep
-- being served throughout: the new index is built beside the old one under another name, then
-- swapped for it in one short transaction (pyembed._swap_vector_index). `pyembed corpus
-- reindex` (pyembed.index.rebuild_index) builds CONCURRENTLY, so writes go on too;
-- pyembed.rebuild_index, callable from SQL, builds inside its transaction, which holds writes
-- to the corpus (not searches) until it commits.
--
-- Lock order, here and in every maintenance step (070-migrations.sql): the corpus row first,
-- FOR NO KEY UPDATE, then relations (the partition, its indexes). FOR NO KEY UPDATE keeps
-- maintenance steps of one corpus in turn, and no key of the row changes (the corpus is never
-- deleted here); FOR UPDATE would also hold every row written for the corpus meanwhile, whose
-- foreign key locks the corpus row FOR KEY SHARE (a search's recall sample, a measurement, a
-- document), and those are written by transactions that hold the partition already (a search
-- records after it searched): the step then waited for the partition, the search for the row.

-- The owner's overrides of pyembed.hnsw_rule for a corpus, merged into those it has (a key set
-- to null goes back to the rule); returns the overrides now in force. ef_search and oversample
-- apply to the next search; m and ef_construction to the next build (rebuild_index).
CREATE OR REPLACE FUNCTION pyembed.set_index_settings(corpus text, settings jsonb)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora := pyembed.lookup_corpus(corpus);
  merged jsonb;
  problem text;
BEGIN
  -- Merged into the overrides in force: read under the row's lock, so that a call made
  -- meanwhile is merged into (not overwritten by) this one.
  c := pyembed._lock_corpus(c.corpus_id);
  IF settings IS NULL OR jsonb_typeof(settings) <> 'object' THEN
    problem := pyembed._index_settings_problem(coalesce(settings, 'null'));
  ELSE
    merged := jsonb_strip_nulls(c.index_settings || settings);
    -- The table's rule (its CHECK corpora_index_settings_known, revision 0030), said first.
    problem := pyembed._index_settings_problem(merged);
  END IF;
  IF problem IS NOT NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005', MESSAGE = problem;
  END IF;
  -- pgvector's own rule, checked against what the build will use (an override or the rule's).
  IF (SELECT p.ef_construction < 2 * p.m FROM pyembed.models mo,
             pyembed._index_params(merged, pyembed._key_rows(c.corpus_id, c.model_key),
                                   mo.dimensions, c.storage) p
       WHERE mo.model_key = c.model_key) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = 'ef_construction must be at least twice m';
  END IF;
  UPDATE pyembed.corpora SET index_settings = merged WHERE corpus_id = c.corpus_id;
  RETURN merged;
END
$$;

-- Put a freshly built index (new_name) in place of the one serving a corpus's key, and record
-- the storage it was built for, in one transaction: searches see the old index and storage or
-- the new ones, never a mix. Dropping the old index locks the partition for a moment; waiting
-- more than 5 s for that fails instead of queueing every search behind the swap.
CREATE OR REPLACE FUNCTION pyembed._swap_vector_index(p_corpus_id integer, p_model_key text,
                                                      new_name text, p_storage text)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '5s'
AS $$
DECLARE
  c pyembed.corpora;
  name text := pyembed._index_name(p_corpus_id, p_model_key);
BEGIN
  PERFORM pyembed._check_storage(p_storage);
  c := pyembed._lock_corpus(p_corpus_id);
  IF p_model_key = c.model_key THEN
    UPDATE pyembed.corpora SET storage = p_storage WHERE corpus_id = p_corpus_id;
  ELSIF p_model_key = c.target_model_key THEN
    UPDATE pyembed.corpora SET target_storage = p_storage WHERE corpus_id = p_corpus_id;
  ELSE
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('corpus %s does not serve %s', c.name, pyembed._quoted(p_model_key)),
      HINT = 'name the key the corpus serves (its model_key, or during a migration its target): '
             '`pyembed migrate status CORPUS`';
  END IF;
  -- Not DROP INDEX IF EXISTS: that sends the client a NOTICE when there is none.
  IF to_regclass(format('pyembed.%I', name)) IS NOT NULL THEN
    EXECUTE format('DROP INDEX pyembed.%I', name);
  END IF;
  IF new_name IS NOT NULL AND to_regclass(format('pyembed.%I', new_name)) IS NOT NULL THEN
    EXECUTE format('ALTER INDEX pyembed.%I RENAME TO %I', new_name, name);
    RETURN name;
  END IF;
  RETURN NULL;  -- the storage has no index for this width: exact scans
END
$$;

-- The name a rebuild gives its new index until the swap.
CREATE OR REPLACE FUNCTION pyembed._rebuild_name(p_corpus_id integer, p_model_key text)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT pyembed._index_name(p_corpus_id, p_model_key) || '_new' $$;

-- Rebuild the index of a corpus's active key (and of a migration's target key, in its own
-- storage) with the settings in force, in `storage` (default: the corpus's), from SQL: the
-- build runs in the caller's transaction, which holds writes to the corpus until it commits;
-- searches go on, on the old index. Returns the indexes in place.
CREATE OR REPLACE FUNCTION pyembed.rebuild_index(corpus text, storage text DEFAULT NULL)
RETURNS SETOF text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora := pyembed.lookup_corpus(corpus);
  key text;
  st text;
  ddl text;
BEGIN
  IF storage IS NOT NULL THEN
    PERFORM pyembed._check_storage(storage);
  END IF;
  -- The row before the build locks the partition (see the top of this file), and the keys and
  -- storage as they are once a step holding it has committed.
  c := pyembed._lock_corpus(c.corpus_id);
  FOREACH key IN ARRAY array_remove(ARRAY[c.model_key, c.target_model_key], NULL) LOOP
    st := CASE WHEN key = c.model_key THEN coalesce(storage, c.storage)
               ELSE pyembed._key_storage(c, key) END;
    IF to_regclass(format('pyembed.%I', pyembed._rebuild_name(c.corpus_id, key))) IS NOT NULL THEN
      EXECUTE format('DROP INDEX pyembed.%I', pyembed._rebuild_name(c.corpus_id, key));
    END IF;
    ddl := pyembed._vector_index_sql(c.corpus_id, key, false, st,
                                     pyembed._rebuild_name(c.corpus_id, key));
    IF ddl IS NOT NULL THEN
      PERFORM pyembed._index_build_settings(c.corpus_id, key, true, st);
      EXECUTE ddl;
    END IF;
    RETURN NEXT pyembed._swap_vector_index(c.corpus_id, key,
                                           pyembed._rebuild_name(c.corpus_id, key), st);
  END LOOP;
END
$$;

-- What serves a corpus's searches, per key: storage, the index and the parameters it was built
-- with, those pyembed's rule would choose for the rows it has now, and the ef_search and
-- oversampling searches use.
CREATE OR REPLACE FUNCTION pyembed.index_status(corpus text)
RETURNS TABLE (model_key text, storage text, index_name text, index_bytes bigint, rows bigint,
               m integer, ef_construction integer, rule_m integer, rule_ef_construction integer,
               ef_search integer, oversample integer, settings jsonb)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora := pyembed.lookup_corpus(corpus);
BEGIN
  RETURN QUERY
  SELECT k.key, pyembed._key_storage(c, k.key), i.relname::text,
         CASE WHEN i.oid IS NULL THEN NULL ELSE pg_catalog.pg_relation_size(i.oid) END, n.rows,
         (SELECT o.option_value::integer FROM pg_catalog.pg_options_to_table(i.reloptions) o
           WHERE o.option_name = 'm'),
         (SELECT o.option_value::integer FROM pg_catalog.pg_options_to_table(i.reloptions) o
           WHERE o.option_name = 'ef_construction'),
         r.m, r.ef_construction, p.ef_search, p.oversample, c.index_settings
    FROM unnest(array_remove(ARRAY[c.model_key, c.target_model_key], NULL)) AS k(key)
    JOIN pyembed.models mo ON mo.model_key = k.key
    CROSS JOIN LATERAL (SELECT pyembed._key_rows(c.corpus_id, k.key) AS rows) n
    CROSS JOIN LATERAL pyembed.hnsw_rule(n.rows, mo.dimensions, pyembed._key_storage(c, k.key)) r
    CROSS JOIN LATERAL pyembed._index_params(c.index_settings, n.rows, mo.dimensions,
                                             pyembed._key_storage(c, k.key)) p
    LEFT JOIN pg_catalog.pg_class i ON i.relnamespace = 'pyembed'::regnamespace
     AND i.relname = pyembed._index_name(c.corpus_id, k.key);
END
$$;

-- A first bulk load into an empty corpus builds its graph once, after the load, instead of
-- inserting every vector into it (pgvector builds a graph faster than it inserts, with parallel
-- workers, and with the parameters the rule gives the rows then). `pyembed ingest` calls
-- begin_bulk_load before it writes and end_bulk_load after (pyembed.ingest); searches meanwhile
-- scan exactly, which is as correct. Each loader is recorded in pyembed.bulk_loaders (its
-- session's pid and a session-level advisory lock of a random key that only that table, the
-- owner's, tells) until end_bulk_load or its session ends, a crash included: a loader is at
-- work while its pid holds its key (_bulk_loading). Every role may take any advisory lock, so
-- no lock key another role can name decides whether a load is at work or who builds: builders
-- are kept in turn by the corpus's row of indexes_to_build, FOR UPDATE, which only the owner's
-- functions can lock. The missing index is built by whoever next finds no loader at work and
-- no other writer's transaction open (_heal_vector_index): end_bulk_load (pyembed.index.bulk_load
-- calls it again for a while), any write to the corpus's documents (_chunks_written_index) or
-- the owner's `pyembed corpus reindex`.

-- The loaders' advisory lock keys' first half: 'pyeb' read as an integer (the second is the
-- random key recorded in bulk_loaders).
CREATE OR REPLACE FUNCTION pyembed._bulk_load_lock() RETURNS integer
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT 1887003970 $$;

-- Whether a corpus's storage has an HNSW index for its active model's width (pyembed._index_spec;
-- false: its searches scan exactly, there is nothing to build).
CREATE OR REPLACE FUNCTION pyembed._indexable(c pyembed.corpora) RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT coalesce((SELECT s.expr IS NOT NULL
                     FROM pyembed.models mo,
                          pyembed._index_spec(mo.dimensions, mo.distance, c.storage) s
                    WHERE mo.model_key = c.model_key), false)
$$;

-- Whether session p_pid of this database holds the advisory lock (k1, k2) in p_mode (pg_locks
-- shows every database's). Only a key recorded by the owner's functions is looked up this way:
-- any role may hold any key, but not in another session.
CREATE OR REPLACE FUNCTION pyembed._advisory_held(k1 integer, k2 bigint, p_pid integer,
                                                  p_mode text)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT EXISTS (SELECT FROM pg_catalog.pg_locks l
                  WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.granted
                    AND l.mode = p_mode AND l.pid = p_pid
                    AND l.classid::bigint = k1 AND l.objid::bigint = k2
                    AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d
                                       WHERE d.datname = pg_catalog.current_database()))
$$;

-- A session-level advisory lock of this session on (k1, a random key), shared or exclusive;
-- returns the key, for the caller to record in a table only the owner's functions write. Random:
-- no other role can hold it beforehand (a key taken meanwhile is passed over, not waited for).
CREATE OR REPLACE FUNCTION pyembed._random_advisory_lock(k1 integer, shared boolean)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  k integer;
  taken boolean;
BEGIN
  LOOP
    k := ('x' || substr(gen_random_uuid()::text, 1, 8))::bit(32)::integer & 2147483647;
    IF shared THEN  -- (an IF, not AND/OR: SQL does not promise which side it evaluates first)
      taken := pg_try_advisory_lock_shared(k1, k);
    ELSE
      taken := pg_try_advisory_lock(k1, k);
    END IF;
    IF taken THEN
      RETURN k;
    END IF;
  END LOOP;
END
$$;

-- Whether a recorded loader of a corpus is at work (begin_bulk_load): any session's, or this
-- one's only. At work: its pid holds its key, in this database (pg_locks shows every
-- database's); a loader gone (its session ended, killed) holds nothing, whatever its row says.
CREATE OR REPLACE FUNCTION pyembed._bulk_loading(p_corpus_id integer,
                                                 this_session boolean DEFAULT false)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT EXISTS (SELECT FROM pyembed.bulk_loaders b
                  WHERE b.corpus_id = p_corpus_id
                    AND (NOT this_session OR b.pid = pg_catalog.pg_backend_pid())
                    AND pyembed._advisory_held(pyembed._bulk_load_lock(), b.lock_id, b.pid,
                                               'ShareLock'))
$$;

-- Begin a bulk load of the caller's corpus: if its active key has no vectors yet (and no
-- migration is under way), its index is dropped, to be built by end_bulk_load; returns whether
-- the build is deferred (false: the load inserts into the index as any write does). As the
-- owner (the application role may not drop the index), for the caller's tenant's corpus only.
CREATE OR REPLACE FUNCTION pyembed.begin_bulk_load(corpus text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '5s'
AS $$
DECLARE
  c pyembed.corpora := pyembed.lookup_corpus(corpus);
  name text;
  has_rows boolean;
  lock_id integer;
BEGIN
  -- The row before the partition (the lock order at the top of this file): a concurrent
  -- loader's first write waits here until this drop has committed, or comes first and is seen.
  c := pyembed._lock_corpus(c.corpus_id);
  -- A builder of the corpus's index (_heal_vector_index) first: this load sees its index.
  PERFORM FROM pyembed.indexes_to_build t WHERE t.corpus_id = c.corpus_id FOR SHARE;
  IF c.target_model_key IS NOT NULL THEN
    RETURN false;  -- a migration's steps build and swap indexes of their own
  END IF;
  name := pyembed._index_name(c.corpus_id, c.model_key);
  IF to_regclass(format('pyembed.%I', name)) IS NOT NULL THEN
    EXECUTE format('SELECT EXISTS (SELECT FROM pyembed.%I WHERE model_key = $1)',
                   pyembed._vector_partition_name(c.corpus_id)) INTO has_rows USING c.model_key;
    IF has_rows THEN
      RETURN false;
    END IF;
    EXECUTE format('DROP INDEX pyembed.%I', name);
  ELSIF NOT pyembed._indexable(c) THEN
    RETURN false;  -- the storage has no index for this width: nothing to build
  END IF;
  -- No index (dropped now, or by a loader still at work or gone): this load builds it at its
  -- end, or a later write does (the chunks' trigger looks for corpora recorded here only).
  INSERT INTO pyembed.indexes_to_build (corpus_id) VALUES (c.corpus_id) ON CONFLICT DO NOTHING;
  lock_id := pyembed._random_advisory_lock(pyembed._bulk_load_lock(), true);
  INSERT INTO pyembed.bulk_loaders (corpus_id, pid, lock_id)
  VALUES (c.corpus_id, pg_backend_pid(), lock_id);
  RETURN true;
END
$$;

-- End the caller's bulk load of a corpus (begin_bulk_load): forget its loaders of this session
-- and let go of their locks, then build the index if it is missing and no other loader is at
-- work (the last one builds it). Returns the index built, or NULL.
CREATE OR REPLACE FUNCTION pyembed.end_bulk_load(corpus text) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora := pyembed.lookup_corpus(corpus);
  k bigint;
BEGIN
  -- Only the keys this session holds (pg_advisory_unlock_shared warns about any other: a row
  -- of a loader gone whose pid this session has now).
  FOR k IN DELETE FROM pyembed.bulk_loaders b
            WHERE b.corpus_id = c.corpus_id AND b.pid = pg_backend_pid()
              AND pyembed._advisory_held(pyembed._bulk_load_lock(), b.lock_id, b.pid,
                                         'ShareLock')
           RETURNING b.lock_id LOOP
    PERFORM pg_advisory_unlock_shared(pyembed._bulk_load_lock(), k::integer);
  END LOOP;
  RETURN pyembed._heal_vector_index(c.corpus_id);
END
$$;

-- Build the missing index of a corpus's active key (a bulk load's, begin_bulk_load) when no
-- loader is at work and no other transaction is writing its vectors; returns its name, or NULL
-- when there was nothing to build, a loader holds the lock (it builds it at its end) or another
-- writer's transaction is open (a later write builds it). It never waits for another writer: a
-- writer waiting for this one (a document both write) would deadlock with it, and every writer
-- arriving meanwhile would queue behind the build. The build runs in the caller's transaction,
-- which holds writes to the corpus (not searches) until it commits; its lock of the corpus's
-- indexes_to_build row keeps a second builder away and a new loader waiting meanwhile. As the
-- owner, for a corpus of the caller's tenant only.
CREATE OR REPLACE FUNCTION pyembed._heal_vector_index(p_corpus_id integer) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora;
  name text;
BEGIN
  SELECT * INTO c FROM pyembed.corpora co WHERE co.corpus_id = p_corpus_id;
  -- (the active key's index: a migration builds its target's, but not this one)
  IF NOT FOUND OR NOT p_corpus_id = ANY (pyembed.visible_corpora()) THEN
    RETURN NULL;
  END IF;
  name := pyembed._index_name(p_corpus_id, c.model_key);
  IF to_regclass(format('pyembed.%I', name)) IS NULL AND pyembed._indexable(c) THEN
    IF pyembed._bulk_loading(p_corpus_id) THEN  -- a loader at work, this session's included
      RETURN NULL;                               -- (its refused batches are written here)
    END IF;
    -- One builder at a time, and none while a loader begins: the corpus's row, which only the
    -- owner's functions can lock (another builder's: no build). An index missing that no load
    -- recorded (dropped by hand: end_bulk_load, as status advises) is recorded first; not when
    -- the row is there, whose delete by a builder meanwhile such an insert would wait for.
    IF NOT EXISTS (SELECT FROM pyembed.indexes_to_build t WHERE t.corpus_id = p_corpus_id) THEN
      INSERT INTO pyembed.indexes_to_build (corpus_id) VALUES (p_corpus_id)
      ON CONFLICT DO NOTHING;
    END IF;
    PERFORM FROM pyembed.indexes_to_build t WHERE t.corpus_id = p_corpus_id
       FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
      RETURN NULL;
    END IF;
    -- Not built by a transaction that committed while this one looked?
    IF to_regclass(format('pyembed.%I', name)) IS NULL THEN
      BEGIN
        EXECUTE format('LOCK TABLE pyembed.%I IN SHARE MODE NOWAIT',
                       pyembed._vector_partition_name(p_corpus_id));
      EXCEPTION WHEN lock_not_available THEN
        RETURN NULL;  -- another writer's transaction is open: a later write builds it
      END;
      name := pyembed._create_vector_index(p_corpus_id, c.model_key);
    ELSE
      name := NULL;
    END IF;
  ELSE
    name := NULL;
  END IF;
  -- Built, or nothing to build: no write need look again. Never waiting for the row (a writer
  -- whose transaction forgets it first keeps it locked until it commits).
  DELETE FROM pyembed.indexes_to_build t
   WHERE t.corpus_id IN (SELECT b.corpus_id FROM pyembed.indexes_to_build b
                          WHERE b.corpus_id = p_corpus_id FOR UPDATE SKIP LOCKED);
  -- Loaders gone (killed) are forgotten; one at work keeps its row for its end_bulk_load, which
  -- lets go of its key's lock.
  DELETE FROM pyembed.bulk_loaders b
   WHERE b.corpus_id = p_corpus_id
     AND NOT pyembed._advisory_held(pyembed._bulk_load_lock(), b.lock_id, b.pid, 'ShareLock');
  RETURN name;
END
$$;

-- After chunks are written: a corpus left without its index by a bulk load that did not end (a
-- crash: begin_bulk_load) gets it back at its next write once no loader is at work. On the
-- chunks, which every document write stores first, not the vectors: an index cannot be built on
-- a table the statement is writing (its own trigger's). Only a corpus begin_bulk_load recorded
-- in indexes_to_build can need it, so a write to any other reads one table, empty but during a
-- load. As the owner, so that the application role needs no grant on the functions it calls
-- (the corpora are those its statement wrote).
CREATE OR REPLACE FUNCTION pyembed._chunks_written_index() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  r record;
BEGIN
  IF NOT EXISTS (SELECT FROM pyembed.indexes_to_build) THEN
    RETURN NULL;
  END IF;
  FOR r IN SELECT t.corpus_id FROM pyembed.indexes_to_build t
            WHERE t.corpus_id IN (SELECT n.corpus_id FROM new_rows n) LOOP
    PERFORM pyembed._heal_vector_index(r.corpus_id);
  END LOOP;
  RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER chunks_written_index
  AFTER INSERT ON pyembed.chunks REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._chunks_written_index();

-- And after chunks are updated: a write that inserts none (a document rewritten with as many
-- chunks, add_document's ON CONFLICT DO UPDATE) fires only the UPDATE triggers.
CREATE OR REPLACE TRIGGER chunks_updated_index
  AFTER UPDATE ON pyembed.chunks REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._chunks_written_index();

-- Corpora of the caller's tenant whose active key has no index although its storage has one
-- for the model's width, and whether a bulk load is at work on each (its index follows at the
-- load's end); for `pyembed status` and `pyembed doctor`.
CREATE OR REPLACE FUNCTION pyembed.unindexed_corpora()
RETURNS TABLE (corpus text, model_key text, loading boolean)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT co.name, co.model_key, pyembed._bulk_loading(co.corpus_id)
    FROM pyembed.corpora co
   WHERE co.corpus_id = ANY (pyembed.visible_corpora()) AND pyembed._indexable(co)
     AND to_regclass(format('pyembed.%I', pyembed._index_name(co.corpus_id, co.model_key)))
         IS NULL
   ORDER BY co.name
$$;

-- A corpus left without its index before indexes_to_build existed (a load killed under the
-- previous release), recorded for its next write. Run at every install: a corpus it records
-- that needs nothing (an index the owner dropped on purpose is built again, as before) is
-- forgotten by the next write's heal.
INSERT INTO pyembed.indexes_to_build (corpus_id)
SELECT co.corpus_id FROM pyembed.corpora co
 WHERE to_regclass(format('pyembed.%I', pyembed._index_name(co.corpus_id, co.model_key))) IS NULL
   AND pyembed._indexable(co)
ON CONFLICT DO NOTHING;
