-- Model migration without downtime: start -> backfill -> validate -> shift 10/50/100 -> complete,
-- with rollback (instant: traffic and writes return to the old key) at any step before complete.
-- Only these functions may change a corpus's model keys (PE004 otherwise: see pyembed._guard_corpus_key).
-- Each step locks the corpus row (pyembed._migration) before any relation, FOR NO KEY UPDATE:
-- steps take turns, and rows written for the corpus meanwhile (documents, recall samples and
-- measurements: their foreign keys lock it FOR KEY SHARE) do not wait for a step, which may
-- itself wait for their transactions' locks on the partition (022-vector-index.sql says more).

-- The migration in progress of corpus `c`, or NULL: read without a lock, so that what only
-- reads it (`pyembed migrate plan`) answers on a replica and waits for no step.
CREATE OR REPLACE FUNCTION pyembed._migration_of(c pyembed.corpora) RETURNS pyembed.migrations
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT * FROM pyembed.migrations m
   WHERE m.corpus_id = c.corpus_id AND m.state NOT IN ('completed', 'rolled_back', 'cleaned')
$$;

CREATE OR REPLACE FUNCTION pyembed._migration(corpus text, OUT c pyembed.corpora,
                                              OUT m pyembed.migrations)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  c := pyembed._lock_corpus((pyembed.lookup_corpus(corpus)).corpus_id);
  m := pyembed._migration_of(c);
END
$$;

-- (A DBA giving it a row of no migration: PE007 naming it, where the events' foreign key was
-- raw.)
CREATE OR REPLACE FUNCTION pyembed._migration_step(m pyembed.migrations, step text,
                                                   detail jsonb DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF NOT EXISTS (SELECT FROM pyembed.migrations x WHERE x.migration_id = m.migration_id) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE007',
      MESSAGE = format('no migration has id %s', coalesce(m.migration_id::text, 'NULL')),
      HINT = '`pyembed migrate status CORPUS` shows the corpus''s migration';
  END IF;
  INSERT INTO pyembed.migration_events (migration_id, step, detail)
  VALUES (m.migration_id, step, detail);
END
$$;

CREATE OR REPLACE FUNCTION pyembed._need(m pyembed.migrations, corpus text, allowed text[],
                                         action text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF m.migration_id IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'PE007',
      MESSAGE = format('corpus %s has no migration in progress: cannot %s', corpus, action),
      HINT = 'pyembed migrate start CORPUS --to MODEL_KEY';
  END IF;
  IF NOT m.state = ANY(allowed) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE007',
      MESSAGE = format('cannot %s corpus %s: its migration to %s is at step %s (needs %s)',
                       action, corpus, m.to_key, m.state, array_to_string(allowed, ' or '));
  END IF;
END
$$;

-- Why corpus `c` (its migration in progress `m`) cannot start migrating to `to_key`, raised, or
-- nothing: migration_start's refusals, which `pyembed migrate plan` raises before any estimate.
CREATE OR REPLACE FUNCTION pyembed._need_target(c pyembed.corpora, m pyembed.migrations,
                                                to_key text)
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF m.migration_id IS NOT NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'PE007',
      MESSAGE = format('corpus %s already has a migration in progress (%s -> %s, step %s): '
                       'one at a time', c.name, m.from_key, m.to_key, m.state),
      HINT = 'finish it (pyembed migrate complete) or roll it back (pyembed migrate rollback)';
  END IF;
  IF NOT EXISTS (SELECT FROM pyembed.models WHERE model_key = to_key) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE006',
      MESSAGE = format('unknown model key %s', pyembed._quoted(to_key)),
      HINT = '`pyembed models` lists the registered keys; register one of your own with '
             'pyembed.register_model';
  END IF;
  IF to_key = c.model_key THEN
    RAISE EXCEPTION USING ERRCODE = 'PE007',
      MESSAGE = format('corpus %s is already on %s', c.name, to_key),
      HINT = 'nothing to migrate: name another key (`pyembed models`)';
  END IF;
END
$$;

-- `storage` is the target key's (target_storage; default: the corpus's own), which becomes the
-- corpus's when the migration completes.
CREATE OR REPLACE FUNCTION pyembed.migration_start(corpus text, to_key text,
                                                  storage text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  r record;
  new_id bigint;
  queued bigint;
BEGIN
  PERFORM pyembed._needs(to_key IS NULL, 'to_key', 'migration_start');
  r := pyembed._migration(corpus);
  PERFORM pyembed._need_target(r.c, r.m, to_key);
  IF storage IS NOT NULL THEN
    PERFORM pyembed._check_storage(storage);
  END IF;
  UPDATE pyembed.corpora SET target_model_key = to_key, migration_step = 'started',
         traffic_share = 0, target_storage = migration_start.storage
   WHERE corpus_id = (r.c).corpus_id;
  INSERT INTO pyembed.migrations (corpus_id, from_key, to_key, state)
  VALUES ((r.c).corpus_id, (r.c).model_key, to_key, 'started') RETURNING migration_id INTO new_id;
  -- This key's vectors left by an earlier attempt (rolled back) or an earlier pin (completed
  -- away from, before cleanup) are kept where their chunk's text is still the one they embed,
  -- so that a way back costs no provider call for them; the others are stale.
  DELETE FROM pyembed.vectors v WHERE v.corpus_id = (r.c).corpus_id AND v.model_key = to_key
     AND NOT EXISTS (SELECT FROM pyembed.chunks ch WHERE ch.corpus_id = v.corpus_id
                       AND ch.chunk_id = v.chunk_id AND ch.content_hash = v.content_hash);
  INSERT INTO pyembed.migration_events (migration_id, step, detail)
  VALUES (new_id, 'start', jsonb_build_object('from', (r.c).model_key, 'to', to_key));
  RETURN new_id;
END
$$;

-- Called by the backfill when every chunk has a vector for the target key: builds the shadow
-- HNSW index (building after loading is several times faster than inserting into one).
CREATE OR REPLACE FUNCTION pyembed.migration_backfilled(corpus text) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  r record;
  missing bigint;
BEGIN
  r := pyembed._migration(corpus);
  PERFORM pyembed._need(r.m, corpus, ARRAY['started', 'backfilled'], 'mark backfilled');
  SELECT count(*) INTO missing FROM pyembed.chunks ch
   WHERE ch.corpus_id = (r.c).corpus_id
     AND NOT EXISTS (SELECT FROM pyembed.vectors v WHERE v.corpus_id = ch.corpus_id
                       AND v.chunk_id = ch.chunk_id AND v.model_key = (r.m).to_key);
  IF missing > 0 THEN
    RAISE EXCEPTION USING ERRCODE = 'PE007',
      MESSAGE = format('corpus %s: %s chunks still have no %s vector', corpus, missing,
                       (r.m).to_key),
      HINT = 'run pyembed migrate backfill again';
  END IF;
  -- `pyembed migrate backfill` has built it CONCURRENTLY already; a SQL caller gets it here
  -- (the build locks the partition against writes: not taken when there is nothing to build).
  IF to_regclass(format('pyembed.%I', pyembed._index_name((r.c).corpus_id, (r.m).to_key)))
     IS NULL THEN
    PERFORM pyembed._create_vector_index((r.c).corpus_id, (r.m).to_key);
  END IF;
  UPDATE pyembed.migrations SET state = 'backfilled' WHERE migration_id = (r.m).migration_id;
  UPDATE pyembed.corpora SET migration_step = 'backfilled' WHERE corpus_id = (r.c).corpus_id;
  PERFORM pyembed._migration_step(r.m, 'backfilled');
  RETURN (r.m).migration_id;
END
$$;

-- The fewest evaluation queries a validation may pass on unless it is forced: the gate compares
-- means over the queries, and on fewer a single query is more than a tenth of each mean, so it
-- would measure the queries chosen more than the model.
CREATE OR REPLACE FUNCTION pyembed.min_eval_queries() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT 10 $$;

-- The number of evaluation queries of corpus `corpus_id`, or, when they are fewer than
-- pyembed.min_eval_queries() and the validation is not `forced`, why it may not pass, raised.
-- `pyembed migrate validate` asks before scoring anything; migration_validated asks again, for
-- a verdict from any caller. Run as its caller: the application role counts its own rows.
CREATE OR REPLACE FUNCTION pyembed._eval_queries_enough(corpus_id integer, forced boolean)
RETURNS integer
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  n integer;
BEGIN
  -- (Not pyembed._needs: the application role, which may call this, may not call that.)
  IF corpus_id IS NULL OR forced IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('%s is NULL: pyembed._eval_queries_enough() needs a value for it',
                       CASE WHEN corpus_id IS NULL THEN 'corpus_id' ELSE 'forced' END);
  END IF;
  SELECT count(*) INTO n FROM pyembed.eval_queries e
   WHERE e.corpus_id = _eval_queries_enough.corpus_id;
  IF n < pyembed.min_eval_queries() AND NOT forced THEN
    RAISE EXCEPTION USING ERRCODE = 'PE007',
      MESSAGE = format('corpus %s has %s evaluation quer%s: a validation passes on at least %s',
                       (SELECT c.name FROM pyembed.corpora c
                         WHERE c.corpus_id = _eval_queries_enough.corpus_id),
                       n, CASE WHEN n = 1 THEN 'y' ELSE 'ies' END, pyembed.min_eval_queries()),
      HINT = 'add more with pyembed eval add, or force it (pyembed migrate validate --force; '
             'forced => true in SQL), which the report records';
  END IF;
  RETURN n;
END
$$;

-- `forced` lets a verdict pass on fewer evaluation queries than pyembed.min_eval_queries(); the
-- stored report says so (its `forced`), as does the event log.
CREATE OR REPLACE FUNCTION pyembed.migration_validated(corpus text, report jsonb, passed boolean,
                                                      forced boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  r record;
BEGIN
  -- The arguments first, named: a NULL verdict read as a failure closed the gate and took back
  -- the traffic already shifted, and a NULL report failed on the event log's NOT NULL.
  PERFORM pyembed._needs(report IS NULL, 'report', 'migration_validated');
  PERFORM pyembed._needs(passed IS NULL, 'passed', 'migration_validated');
  PERFORM pyembed._needs(forced IS NULL, 'forced', 'migration_validated');
  r := pyembed._migration(corpus);
  PERFORM pyembed._need(r.m, corpus, ARRAY['backfilled', 'validated', 'shifting'], 'validate');
  -- Only a pass needs enough queries: a failure closes the gate, which is always safe.
  IF passed THEN
    PERFORM pyembed._eval_queries_enough((r.c).corpus_id, forced);
  END IF;
  IF jsonb_typeof(report) = 'object' THEN  -- anything else is the table's check's to refuse
    report := report || jsonb_build_object('forced', forced);
  END IF;
  -- Passing opens the gate (backfilled -> validated); failing closes it again, and takes back
  -- any traffic already shifted.
  UPDATE pyembed.migrations SET validation = report,
         state = CASE WHEN passed AND state = 'backfilled' THEN 'validated'
                      WHEN NOT passed THEN 'backfilled' ELSE state END
   WHERE migration_id = (r.m).migration_id;
  UPDATE pyembed.corpora
     SET migration_step = CASE WHEN passed AND migration_step = 'backfilled' THEN 'validated'
                               WHEN NOT passed THEN 'backfilled' ELSE migration_step END,
         traffic_share = CASE WHEN passed THEN traffic_share ELSE 0 END
   WHERE corpus_id = (r.c).corpus_id;
  PERFORM pyembed._migration_step(r.m, CASE WHEN passed THEN 'validated' ELSE 'validation failed' END,
                                  report);
  RETURN (r.m).migration_id;
END
$$;

-- `share` is numeric, as the counts a SQL client types are: a number past integer reaches the
-- range check (as integer it failed as "function ... does not exist").
CREATE OR REPLACE FUNCTION pyembed.migration_shift(corpus text, share numeric) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  r record;
  percent integer;
BEGIN
  -- The argument first: a share out of range is refused as such at any step.
  PERFORM pyembed._needs(share IS NULL, 'share', 'migration_shift');
  percent := pyembed._count_arg(share, 'share', 1, 100);
  r := pyembed._migration(corpus);
  PERFORM pyembed._need(r.m, corpus, ARRAY['validated', 'shifting'], 'shift traffic on');
  UPDATE pyembed.migrations SET state = 'shifting' WHERE migration_id = (r.m).migration_id;
  UPDATE pyembed.corpora SET migration_step = 'shifting', traffic_share = percent
   WHERE corpus_id = (r.c).corpus_id;
  PERFORM pyembed._migration_step(r.m, 'shift', jsonb_build_object('share', percent));
  RETURN (r.m).migration_id;
END
$$;

CREATE OR REPLACE FUNCTION pyembed.migration_complete(corpus text) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  r record;
BEGIN
  r := pyembed._migration(corpus);
  PERFORM pyembed._need(r.m, corpus, ARRAY['shifting'], 'complete');
  IF (r.c).traffic_share < 100 THEN
    RAISE EXCEPTION USING ERRCODE = 'PE007',
      MESSAGE = format('corpus %s serves only %s%% of searches from %s',
                       corpus, (r.c).traffic_share, (r.m).to_key),
      HINT = 'shift 100 first (`pyembed migrate shift CORPUS 100`)';
  END IF;
  -- Chunks queued for the old key are no longer needed. Removed before the key changes, which
  -- locks the partition (the partition's constraint follows the keys): a writer holds the queue
  -- rows of a chunk it changed and then writes its vectors, so the jobs come first here too.
  DELETE FROM pyembed.queue WHERE corpus_id = (r.c).corpus_id AND model_key = (r.m).from_key;
  UPDATE pyembed.corpora SET model_key = (r.m).to_key, target_model_key = NULL,
         migration_step = 'none', traffic_share = 0,
         storage = coalesce(target_storage, storage), target_storage = NULL
   WHERE corpus_id = (r.c).corpus_id;
  UPDATE pyembed.migrations SET state = 'completed', finished_at = now()
   WHERE migration_id = (r.m).migration_id;
  PERFORM pyembed._migration_step(r.m, 'complete');
  RETURN (r.m).migration_id;
END
$$;

-- Instant: searches and writes return to the old key; the shadow vectors stay until cleanup.
CREATE OR REPLACE FUNCTION pyembed.migration_rollback(corpus text) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  r record;
BEGIN
  r := pyembed._migration(corpus);
  PERFORM pyembed._need(r.m, corpus, ARRAY['started', 'backfilled', 'validated', 'shifting'],
                        'roll back');
  -- The target's jobs before the key change, as in migration_complete.
  DELETE FROM pyembed.queue WHERE corpus_id = (r.c).corpus_id AND model_key = (r.m).to_key;
  UPDATE pyembed.corpora SET target_model_key = NULL, migration_step = 'none', traffic_share = 0,
         target_storage = NULL
   WHERE corpus_id = (r.c).corpus_id;
  UPDATE pyembed.migrations SET state = 'rolled_back', finished_at = now()
   WHERE migration_id = (r.m).migration_id;
  PERFORM pyembed._migration_step(r.m, 'rollback');
  RETURN (r.m).migration_id;
END
$$;

-- Remove the vectors of every key the corpus no longer serves, and (unless the caller will drop
-- them CONCURRENTLY itself, as `pyembed migrate cleanup` does) their indexes, waiting at most
-- 5 s for the lock so that searches never queue long behind the drop.
CREATE OR REPLACE FUNCTION pyembed.migration_cleanup(corpus text,
                                                     keep_indexes boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  r record;
  removed bigint;
  idx text;
BEGIN
  PERFORM pyembed._needs(keep_indexes IS NULL, 'keep_indexes', 'migration_cleanup');
  r := pyembed._migration(corpus);
  IF (r.m).migration_id IS NOT NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'PE007',
      MESSAGE = format('corpus %s has a migration in progress (step %s)', corpus, (r.m).state),
      HINT = 'complete it or roll it back before cleanup (`pyembed migrate complete CORPUS` or '
             '`pyembed migrate rollback CORPUS`)';
  END IF;
  DELETE FROM pyembed.vectors WHERE corpus_id = (r.c).corpus_id AND model_key <> (r.c).model_key;
  GET DIAGNOSTICS removed = ROW_COUNT;
  IF NOT keep_indexes THEN
    PERFORM set_config('lock_timeout', '5s', true);
    FOR idx IN SELECT pyembed._vector_indexes((r.c).corpus_id, (r.c).model_key) LOOP
      EXECUTE format('DROP INDEX pyembed.%I', idx);
    END LOOP;
  END IF;
  UPDATE pyembed.migrations SET state = 'cleaned'
   WHERE corpus_id = (r.c).corpus_id AND state IN ('completed', 'rolled_back');
  RETURN removed;
END
$$;

-- The backfill for SQL-only users: queue every chunk that has no vector for the target key;
-- `pyembed worker` embeds them, then SELECT pyembed.migration_backfilled(corpus).
CREATE OR REPLACE FUNCTION pyembed.migration_enqueue_backfill(corpus text) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  r record;
  queued bigint;
BEGIN
  r := pyembed._migration(corpus);
  PERFORM pyembed._need(r.m, corpus, ARRAY['started'], 'queue the backfill of');
  INSERT INTO pyembed.queue (corpus_id, chunk_id, model_key, content_hash)
  SELECT ch.corpus_id, ch.chunk_id, (r.m).to_key, ch.content_hash FROM pyembed.chunks ch
   WHERE ch.corpus_id = (r.c).corpus_id
     AND NOT EXISTS (SELECT FROM pyembed.vectors v WHERE v.corpus_id = ch.corpus_id
                       AND v.chunk_id = ch.chunk_id AND v.model_key = (r.m).to_key)
  ON CONFLICT (corpus_id, chunk_id, model_key) DO NOTHING;
  GET DIAGNOSTICS queued = ROW_COUNT;
  PERFORM pyembed._migration_step(r.m, 'backfill queued', jsonb_build_object('chunks', queued));
  RETURN queued;
END
$$;

-- An evaluation query (the migration gate's and `eval compare`'s) has an id, text and names
-- documents its corpus has, or PE005 naming what is wrong: an id that names no document would
-- count as a miss of every model, and an empty query failed on the table's check with its raw
-- message.
-- Checked before the row's checks, for every writer (the package, the CLI, SQL). A row-level
-- trigger runs before the table's row-level security policy: a row for a corpus the writer does
-- not see gets first the error that policy gives (the same for another tenant's corpus as for
-- one that does not exist), not an answer about that corpus.
CREATE OR REPLACE FUNCTION pyembed._eval_query_checked() RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  missing text[];
  problem text;
BEGIN
  IF NOT (NEW.corpus_id = ANY (pyembed.visible_corpora()))
     AND NOT (SELECT rolsuper OR rolbypassrls FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
    RAISE EXCEPTION USING ERRCODE = '42501',
      MESSAGE = 'new row violates row-level security policy for table "eval_queries"';
  END IF;
  -- The id names the query in every message and report, as a document's id does its
  -- document, so it follows a document id's rule (pyembed._document_id_problem: not empty or
  -- blank, no control character, no whitespace at its ends, NFC; at most 512 characters is the
  -- table's eval_queries_query_id_bound); checked when the id is written, as a document's is.
  IF NEW.query_id IS NOT NULL AND (TG_OP = 'INSERT' OR NEW.query_id <> OLD.query_id) THEN
    problem := pyembed._document_id_problem(NEW.query_id);
    IF problem IS NOT NULL THEN
      RAISE EXCEPTION USING ERRCODE = 'PE005',
        MESSAGE = replace(replace(problem, 'a document id', 'an evaluation query id'),
                          'document id', 'evaluation query id'),
        HINT = 'give the evaluation query an id the rule for document ids accepts (README: '
               'document ids)';
    END IF;
  END IF;
  -- Only whitespace, control and format characters is empty too (pyembed.text.INVISIBLE).
  IF NEW.query IS NULL OR NEW.query !~ E'[^\\x01-\\x20\\x7f-\\xa0\\xad\\u0600-\\u0605\\u061c\\u06dd\\u070f\\u0890-\\u0891\\u08e2\\u1680\\u180e\\u2000-\\u200f\\u2028-\\u202f\\u205f-\\u2064\\u2066-\\u206f\\u3000\\ufeff\\ufff9-\\ufffb\\U000110bd\\U000110cd\\U00013430-\\U00013438\\U0001bca0-\\U0001bca3\\U0001d173-\\U0001d17a\\U000e0001\\U000e0020-\\U000e007f]' THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('evaluation query %s is empty',
                       NEW.query_id),
      HINT = 'give the text of a question';
  END IF;
  IF coalesce(cardinality(NEW.relevant), 0) = 0 OR array_position(NEW.relevant, NULL) IS NOT NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('evaluation query %s needs at least one relevant document id, and no '
                       'NULL', NEW.query_id);
  END IF;
  SELECT array_agg(r.id ORDER BY r.n) INTO missing
    FROM unnest(NEW.relevant) WITH ORDINALITY AS r(id, n)
   WHERE NOT EXISTS (SELECT FROM pyembed.documents d
                      WHERE d.corpus_id = NEW.corpus_id AND d.document_id = r.id);
  IF missing IS NOT NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('evaluation query %s: corpus %s has no document %s', NEW.query_id,
                       coalesce((SELECT c.name FROM pyembed.corpora c
                                  WHERE c.corpus_id = NEW.corpus_id), NEW.corpus_id::text),
                       array_to_string((SELECT array_agg(quote_literal(m))
                                          FROM unnest(missing[1:10]) m), ', ')
                       || CASE WHEN cardinality(missing) > 10
                               THEN format(' (and %s more)', cardinality(missing) - 10)
                               ELSE '' END),
      HINT = 'add the documents first, or name the ids the corpus has';
  END IF;
  RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER eval_queries_checked
  BEFORE INSERT OR UPDATE ON pyembed.eval_queries
  FOR EACH ROW EXECUTE FUNCTION pyembed._eval_query_checked();

-- One backfill of a corpus at a time (pyembed.migration.backfill, the owner's, across many
-- transactions): its session is recorded in pyembed.backfillers with a random key it holds a
-- session-level advisory lock on, and counts while that pid holds that key (a backfill killed
-- counts no more). Not a key every role can name: another role holding it made every backfill
-- of the corpus refuse to start.
CREATE OR REPLACE FUNCTION pyembed._backfill_lock() RETURNS integer
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT 1887003238 $$;  -- 'pybf' read as an integer

-- Claim the backfill of a corpus for this session: false when another session's backfill of it
-- is running.
CREATE OR REPLACE FUNCTION pyembed._claim_backfill(p_corpus_id integer) RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  lock_id integer;
BEGIN
  PERFORM pyembed._build_target(p_corpus_id, NULL);  -- PE002 for an id no corpus has
  DELETE FROM pyembed.backfillers b
   WHERE b.corpus_id = p_corpus_id
     AND NOT pyembed._advisory_held(pyembed._backfill_lock(), b.lock_id, b.pid, 'ExclusiveLock');
  lock_id := pyembed._random_advisory_lock(pyembed._backfill_lock(), false);
  INSERT INTO pyembed.backfillers (corpus_id, pid, lock_id)
  VALUES (p_corpus_id, pg_backend_pid(), lock_id) ON CONFLICT (corpus_id) DO NOTHING;
  IF FOUND THEN
    RETURN true;
  END IF;
  PERFORM pg_advisory_unlock(pyembed._backfill_lock(), lock_id);
  RETURN false;
END
$$;

-- Let go of this session's claim (_claim_backfill) on a corpus's backfill.
CREATE OR REPLACE FUNCTION pyembed._release_backfill(p_corpus_id integer) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  k bigint;
BEGIN
  FOR k IN DELETE FROM pyembed.backfillers b
            WHERE b.corpus_id = p_corpus_id AND b.pid = pg_backend_pid()
              AND pyembed._advisory_held(pyembed._backfill_lock(), b.lock_id, b.pid,
                                         'ExclusiveLock')
           RETURNING b.lock_id LOOP
    PERFORM pg_advisory_unlock(pyembed._backfill_lock(), k::integer);
  END LOOP;
END
$$;

-- Deletes these evaluation queries of the corpus; returns how many. As its owner, the corpus
-- looked up by name (PE002 for one the caller's tenant does not have): a table-level DELETE or
-- UPDATE would let the application role LOCK pyembed.eval_queries, every tenant's, in any mode
-- (015-chunks.sql says why). A query is changed by storing it again under its id.
CREATE OR REPLACE FUNCTION pyembed.delete_eval_queries(corpus text, query_ids text[])
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora;
  n bigint;
BEGIN
  IF num_nulls(corpus, query_ids) > 0 THEN
    PERFORM pyembed._needs(corpus IS NULL, 'corpus', 'delete_eval_queries');
    PERFORM pyembed._needs(query_ids IS NULL, 'query_ids', 'delete_eval_queries');
  END IF;
  c := pyembed.lookup_corpus(corpus);
  DELETE FROM pyembed.eval_queries e
   WHERE e.corpus_id = c.corpus_id AND e.query_id = ANY (query_ids);
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
$$;
