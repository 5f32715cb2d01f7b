-- The vector leg of every search: a corpus's nearest chunk ids for a key, by its HNSW index in
-- the corpus's storage (0013_vector_storage), or exactly (`exact`: the model's distance on the
-- float32 vectors, a sequential scan: what recall is measured against; also when a search asks
-- for as many candidates as the partition has rows, which a scan reads about as fast, and
-- exactly). The caller has checked the query (key, dimensions, norm; pyembed.search) and may
-- read the corpus.
--
-- One dynamic statement on the corpus's partition whose key, dimensions and LIMIT are literals,
-- so that the planner matches the partial HNSW index expression and predicate (with a parameter
-- LIMIT it would guess 10% of rows and skip it); joining the texts is left to the caller's static
-- query, whose plan PL/pgSQL keeps (planning the join in the dynamic statement would cost every
-- search). `distances` are the model's distances from the float32 vectors for every storage, in
-- the order of `ids`, nearest first (ties by chunk id), and `scores` the hits' scores (higher is
-- better: 1 - distance for cosine, else -distance) in the same order (halfvec and binary rank by
-- their index, then the top candidates are rescored from the float32 vectors), and `docs` the
-- hits' document numbers (pyembed.vectors.doc_no: grouping by document reads no chunk):
--   vector   ORDER BY the indexed expression LIMIT k;
--   halfvec  the same on float16, the k hits' distances taken again in float32;
--   binary   the Hamming index's k x oversample nearest sign-bit codes, reordered by their exact
--            distances, LIMIT k.
-- hnsw.ef_search follows pyembed._index_plan for the rows the partition's statistics count
-- (pg_class.reltuples: ANALYZE, autovacuum and index builds keep it), at least the candidates
-- asked for (an HNSW scan returns at most ef_search rows), at most pgvector's 1,000; a filter
-- may reject most of the nearest chunks, and more than 1,000 candidates are past any
-- ef_search: the index scan then goes on until it has them (hnsw.iterative_scan; an
-- unfiltered search is faster without it).
-- enable_seqscan off: vectors of 1,024 dimensions and more are stored out of line, which makes a
-- sequential scan of the partition look cheap to the planner, and it chose one over the index
-- (seconds instead of milliseconds; docs/scale-out.md); enable_bitmapscan off when the index
-- serves (below).
-- The statement and the settings have one home each, SQL functions the planner inlines into the
-- PL/pgSQL assignment or EXECUTE that reads them (no call: every nested PL/pgSQL call is set up
-- again in every transaction, and it cost a search more than the work it did):
-- pyembed._nearest_sql (the statement) and pyembed._nearest_settings (sets the four settings
-- with set_config, local to the calling function's own settings: a function with a SET clause
-- restores them as it returns, so that they never outlast it). Two functions run them:
-- pyembed._nearest_in (below; recall's pyembed._nearest) and pyembed._vector_ranking (every
-- search, 030-search.sql), which then makes no call for its nearest chunks.
-- _nearest looks up what the vector leg needs (storage, settings, model, counted rows) and hands
-- it to pyembed._nearest_in, which does the work; pyembed.search, which has looked the corpus
-- up already, ranks through pyembed._vector_ranking: each search looks its corpus up once.
CREATE OR REPLACE FUNCTION pyembed._nearest(p_corpus_id integer, p_model_key text,
  query vector, k integer, filter jsonb DEFAULT NULL, exact boolean DEFAULT false,
  OUT ids bigint[], OUT distances float8[])
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c record;
  r record;
BEGIN
  SELECT CASE WHEN p_model_key = co.target_model_key THEN coalesce(co.target_storage, co.storage)
              ELSE co.storage END AS storage,
         co.index_settings, m.dimensions, m.distance, cl.reltuples AS counted
    INTO c
    FROM pyembed.corpora co
    JOIN pyembed.models m ON m.model_key = p_model_key
    LEFT JOIN pg_catalog.pg_class cl ON cl.relnamespace = 'pyembed'::regnamespace
     AND cl.relname = pyembed._vector_partition_name(co.corpus_id)
   WHERE co.corpus_id = p_corpus_id;
  r := pyembed._nearest_in(p_corpus_id, p_model_key, query, k, filter, exact, c.storage,
                           c.index_settings, c.dimensions, c.distance, c.counted);
  ids := r.ids;
  distances := r.distances;
END
$$;

-- The partition's rows of the key, joined to their chunks when a metadata filter ($2) applies.
CREATE OR REPLACE FUNCTION pyembed._nearest_source(p_corpus_id integer, p_model_key text,
                                                   filtered boolean)
RETURNS text
LANGUAGE sql STABLE
AS $$
SELECT format('pyembed.%I v %s WHERE v.model_key = %L %s',
  pyembed._vector_partition_name(p_corpus_id),
  CASE WHEN filtered THEN format(
    'JOIN pyembed.chunks f ON f.corpus_id = %s AND f.chunk_id = v.chunk_id', p_corpus_id)
    ELSE '' END,
  p_model_key,
  CASE WHEN filtered THEN 'AND f.metadata @> $2' ELSE '' END)
$$;

-- The candidates the index is asked for: k, or k x oversample Hamming candidates (binary).
CREATE OR REPLACE FUNCTION pyembed._nearest_candidates(k integer, s pyembed._index_rules)
RETURNS integer
LANGUAGE sql IMMUTABLE
AS $$ SELECT CASE WHEN s.op = '<~>' THEN k * s.oversample ELSE k END $$;

-- Whether the k nearest are read by a scan ordered by the exact distance: asked to (`exact`), past
-- the storage's index limit (no index), or asked for as many candidates as the partition's
-- statistics count. NULL (no partition yet) reads the index, as false does.
CREATE OR REPLACE FUNCTION pyembed._nearest_scans(k integer, exact boolean,
                                                  s pyembed._index_rules, counted real)
RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
SELECT exact OR s.expr IS NULL
       OR (counted >= 0 AND pyembed._nearest_candidates(k, s) >= counted)
$$;

-- The index rules the vector leg reads (pyembed._index_plan's expr, op, castto, exact, ef_search
-- and oversample; opclass, m and ef_construction NULL): inlined, the planner keeps only these
-- fields of the inlined rules, and a search sets up less expression every transaction.
CREATE OR REPLACE FUNCTION pyembed._nearest_rules(dims integer, distance text, storage text,
                                                  settings jsonb, rows bigint)
RETURNS pyembed._index_rules
LANGUAGE sql IMMUTABLE
AS $$
SELECT ROW((pyembed._index_plan(dims, distance, storage, settings, rows)).expr, NULL,
           (pyembed._index_plan(dims, distance, storage, settings, rows)).op,
           (pyembed._index_plan(dims, distance, storage, settings, rows)).castto,
           (pyembed._index_plan(dims, distance, storage, settings, rows)).exact, NULL, NULL,
           (pyembed._index_plan(dims, distance, storage, settings, rows)).ef_search,
           (pyembed._index_plan(dims, distance, storage, settings, rows)).oversample
       )::pyembed._index_rules
$$;

-- The vector leg's settings (above) for k nearest by the rules `s` (pyembed._index_plan),
-- set local to the calling function's settings (its SET clause restores them as it returns).
-- Returns the ef_search set.
CREATE OR REPLACE FUNCTION pyembed._nearest_settings(k integer, filtered boolean,
                                                     exact boolean, s pyembed._index_rules,
                                                     counted real)
RETURNS text
LANGUAGE sql VOLATILE
AS $$
SELECT set_config('enable_seqscan', 'off', true)
       || set_config('enable_bitmapscan',
                     CASE WHEN pyembed._nearest_scans(k, exact, s, counted) THEN 'on'
                          ELSE 'off' END, true)
       || set_config('hnsw.iterative_scan',
                     CASE WHEN filtered OR pyembed._nearest_candidates(k, s) > 1000
                          THEN 'relaxed_order' ELSE 'off' END, true)
       || set_config('hnsw.ef_search',
                     least(greatest(s.ef_search, pyembed._nearest_candidates(k, s)),
                           1000)::text, true)
$$;

-- The vector leg's statement (above) for k nearest by the rules `s`: parameters $1 the query
-- vector, $2 the metadata filter (when `filtered`); one row of (ids, distances, scores, docs).
-- pyembed._nearest_text's template with the corpus's rows of the key, the way of reading and
-- the LIMITs as literals.
CREATE OR REPLACE FUNCTION pyembed._nearest_sql(p_corpus_id integer, p_model_key text,
                                                k integer, filtered boolean, exact boolean,
                                                s pyembed._index_rules, p_distance text,
                                                counted real)
RETURNS text
LANGUAGE sql STABLE
AS $$
SELECT pyembed._nearest_text(pyembed._nearest_source(p_corpus_id, p_model_key, filtered),
                             pyembed._nearest_scans(k, exact, s, counted), s.exact, s.castto,
                             s.op, pyembed._nearest_candidates(k, s)::text, k::text, p_distance)
$$;

-- The template of the vector leg's statement, its one home: `source` the rows
-- (pyembed._nearest_source), `scans` the way of reading (pyembed._nearest_scans), `exact`,
-- `castto` and `op` the index rules' (pyembed._index_rules' fields: not the type, which revision
-- 0020's downgrade drops under the functions of sql/ that are newer than it), `candidates`
-- and `k` the two LIMITs' text (literals in pyembed._nearest_sql's dynamic statement, parameters
-- in a corpus's own function: pyembed._nearest_functions). The hits subquery returns
-- (hit.chunk_id, hit.doc_no, hit.distance) of the k nearest in any order; the statement sorts
-- them once, and the four arrays aggregate that order (a plain aggregate over a sorted subquery,
-- with no join or grouping between them, reads its rows in that order: one sort where an ORDER
-- BY in each aggregate made four). One format() over one template per way of reading
-- (arguments: 1 the exact distance operator, 2 the rows, 3 the indexed type, 4 its operator, 5
-- the candidates, 6 k, 7 the score). Each argument but the rules' fields is read once: the
-- planner inlines it into pyembed._nearest_sql, and so into the search's EXECUTE, which it does
-- not for an argument read twice unless it is as cheap as a field of a variable.
CREATE OR REPLACE FUNCTION pyembed._nearest_text(source text, scans boolean, exact text,
                                                 castto text, op text, candidates text,
                                                 k text, p_distance text)
RETURNS text
LANGUAGE sql STABLE
AS $$
SELECT format(
  'SELECT array_agg(chunk_id), array_agg(distance), array_agg(%7$s), array_agg(doc_no) '
  'FROM (SELECT * FROM ('
  || CASE
       WHEN scans THEN
         'SELECT v.chunk_id, v.doc_no, v.%1$s $1 AS distance FROM %2$s ORDER BY 3, 1 LIMIT %6$s'
       -- By the index (asked for a few percent of a small partition's rows, the planner chose a
       -- bitmap scan of all of them and a sort, slower than the index: enable_bitmapscan off).
       WHEN op = '<~>' THEN
         'SELECT c.chunk_id, c.doc_no, c.%1$s $1 AS distance FROM (SELECT v.chunk_id, '
         'v.doc_no, v.embedding FROM %2$s ORDER BY binary_quantize(v.embedding)::%3$s <~> '
         'binary_quantize($1)::%3$s LIMIT %5$s) c ORDER BY 3, 1 LIMIT %6$s'
       WHEN castto LIKE 'vector(%' THEN
         'SELECT v.chunk_id, v.doc_no, (v.embedding::%3$s) %4$s $1::%3$s AS distance '
         'FROM %2$s ORDER BY 3 LIMIT %6$s'
       ELSE
         'SELECT v.chunk_id, v.doc_no, v.%1$s $1 AS distance FROM %2$s ORDER BY '
         '(v.embedding::%3$s) %4$s $1::%3$s LIMIT %6$s'
     END
  || ') hit ORDER BY distance, chunk_id) hit',
  exact, source, castto, op, candidates, k,
  CASE p_distance WHEN 'cosine' THEN '1 - distance' ELSE '-distance' END)
$$;

-- The vector leg (above), given the key's storage, the corpus's index settings, the model's
-- dimensions and distance, and the rows the partition's statistics count (pg_class.reltuples:
-- -1 before the first ANALYZE or index build, NULL without a partition). Its SET clauses keep
-- the settings it makes its own: they last until it returns.
CREATE OR REPLACE FUNCTION pyembed._nearest_in(p_corpus_id integer, p_model_key text,
  query vector, k integer, filter jsonb, exact boolean, p_storage text, p_settings jsonb,
  p_dims integer, p_distance text, counted real,
  OUT ids bigint[], OUT distances float8[], OUT scores float8[], OUT docs bigint[])
LANGUAGE plpgsql STABLE
SET hnsw.iterative_scan = 'off'
SET hnsw.ef_search = 100
SET enable_seqscan = off
SET enable_bitmapscan = on
AS $$
DECLARE
  s pyembed._index_rules;
  setting text;
BEGIN
  -- A DBA's k and row count, in pyembed's words (LIMIT's and bigint's were raw).
  IF k < 1 THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005', MESSAGE = format('k must be 1 or more, got %s', k);
  END IF;
  IF NOT counted BETWEEN -1 AND 9.2e18 THEN  -- (NaN is above every number)
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('counted is a row count (pg_class.reltuples), not %s', counted);
  END IF;
  -- the index expression and ef_search's rule (pyembed._nearest_rules, inlined here: no call)
  s := pyembed._nearest_rules(p_dims, p_distance, p_storage, p_settings,
                              greatest(counted, 0)::bigint);
  setting := pyembed._nearest_settings(k, filter IS NOT NULL, exact, s, counted);
  EXECUTE pyembed._nearest_sql(p_corpus_id, p_model_key, k, filter IS NOT NULL, exact, s,
                               p_distance, counted)
    INTO ids, distances, scores, docs USING query, filter;
EXCEPTION WHEN undefined_table THEN  -- the corpus was dropped since its caller looked it up
  PERFORM pyembed._dropped_meanwhile(p_corpus_id);
  RAISE;
END
$$;

-- A corpus's own vector leg for a key: the search's (pyembed._vector_ranking) nearest chunks by
-- pyembed._nearest_text's template, its rows (partition and key), index expression and score as
-- literals, and the query vector ($1), filter ($2), k ($3), candidates ($4) and way of reading
-- ($5, pyembed._nearest_scans) as parameters, so that PL/pgSQL keeps each statement's generic
-- plan for the session where the dynamic statement was planned at every search (with the vector
-- leg's settings, the generic plan with a parameter LIMIT reads the HNSW index). One static
-- statement per way of reading: the index or a scan, with or without a filter; a session keeps
-- the plans of those it ran. What the statement depends on (partition, key, storage, the model's
-- dimensions and distance) changes only with the corpus's row: the trigger below makes, replaces
-- and drops these functions with it, and every install and upgrade makes them again
-- (095-vector-partitions.sql). Named by ids alone: the corpus's id and the md5 of the key.
-- Owned by the schema's owner, no role but it may execute them (080-grants.sql revokes PUBLIC's
-- and they are made after it): they run inside the SECURITY DEFINER search. No SET clause (its
-- save and restore would cost every search): they run with the search's pinned search_path.
CREATE OR REPLACE FUNCTION pyembed._nearest_function_name(p_corpus_id integer, p_model_key text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
SELECT '_nearest_c' OPERATOR(pg_catalog.||) p_corpus_id::text OPERATOR(pg_catalog.||) '_'
       OPERATOR(pg_catalog.||) pg_catalog.md5(p_model_key)
$$;

-- The body of a corpus's function for a key (above) whose storage is `storage`.
CREATE OR REPLACE FUNCTION pyembed._nearest_function_body(p_corpus_id integer,
                                                          p_model_key text, storage text)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  m pyembed.models;
  s pyembed._index_rules;
  into_ text := E'\n        INTO ids, distances, scores, docs;';
  legs text[];
BEGIN
  SELECT * INTO m FROM pyembed.models WHERE model_key = p_model_key;
  -- the rules' expression, operator and type: the index settings and rows set only ef_search and
  -- oversample, which reach the statement as settings and parameters
  s := pyembed._nearest_rules(m.dimensions, m.distance, storage, NULL, 0);
  -- scan, scan filtered, index, index filtered
  SELECT array_agg(pyembed._nearest_text(pyembed._nearest_source(p_corpus_id, p_model_key, f),
                                         w, s.exact, s.castto, s.op, '$4', '$3', m.distance)
                || into_ ORDER BY o)
    INTO legs
    FROM (VALUES (1, true, false), (2, true, true), (3, false, false), (4, false, true))
         AS l(o, w, f);
  IF s.expr IS NULL THEN  -- no index: every search scans (pyembed._nearest_scans)
    RETURN format(E'BEGIN\n  IF $2 IS NULL THEN\n    %s\n  ELSE\n    %s\n  END IF;\nEND',
                  legs[1], legs[2]);
  END IF;
  RETURN format(E'BEGIN\n  IF $5 THEN\n    IF $2 IS NULL THEN\n      %s\n    ELSE\n      %s\n'
                || E'    END IF;\n  ELSIF $2 IS NULL THEN\n    %s\n  ELSE\n    %s\n  END IF;\nEND',
                legs[1], legs[2], legs[3], legs[4]);
END
$$;

-- Whether the function `name` is as pyembed._nearest_functions makes it with `body`: that text,
-- its signature, STABLE, invoker's rights, no SET clause, executable by its owner alone.
CREATE OR REPLACE FUNCTION pyembed._nearest_function_ok(name text, body text)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
SELECT coalesce((SELECT count(*) = 1
                        AND bool_and(p.prosrc = body AND p.proconfig IS NULL AND NOT p.prosecdef
                        AND p.provolatile = 's' AND p.proretset IS FALSE
                        AND p.pronargs = 5 AND p.proargtypes[0] = 'vector'::regtype
                        AND p.proargtypes[1] = 'jsonb'::regtype
                        AND p.proargtypes[2] = 'integer'::regtype
                        AND p.proargtypes[3] = 'integer'::regtype
                        AND p.proargtypes[4] = 'boolean'::regtype
                        AND p.proacl IS NOT NULL
                        AND NOT EXISTS (SELECT FROM aclexplode(p.proacl) a
                                         WHERE a.grantee <> p.proowner))
                   FROM pg_proc p
                  WHERE p.pronamespace = 'pyembed'::regnamespace AND p.proname = name
                    AND p.prokind = 'f'), false)
$$;

-- Drops every function of schema pyembed named `name` (whatever its arguments), a name of a
-- corpus's vector leg (above) only.
CREATE OR REPLACE FUNCTION pyembed._drop_nearest_function(name text)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  f regprocedure;
BEGIN
  FOR f IN SELECT p.oid FROM pg_catalog.pg_proc p
            WHERE p.pronamespace = 'pyembed'::regnamespace AND p.proname = name
              AND p.proname ~ '^_nearest_c[0-9]+_[0-9a-f]{32}$' LOOP
    EXECUTE format('DROP FUNCTION %s', f);
  END LOOP;
END
$$;

-- Brings a corpus's functions (above) in line with its row: one for each key it serves (its own,
-- a migration's target) made or replaced where its text differs, every other one of the corpus's
-- dropped (all of them once the corpus is). Returns the names of the functions it made or
-- dropped.
CREATE OR REPLACE FUNCTION pyembed._nearest_functions(p_corpus_id integer)
RETURNS text[]
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora;
  key text;
  name text;
  body text;
  kept text[] := '{}';
  changed text[] := '{}';
BEGIN
  SELECT * INTO c FROM pyembed.corpora WHERE corpus_id = p_corpus_id;
  FOREACH key IN ARRAY ARRAY_REMOVE(ARRAY[c.model_key, c.target_model_key], NULL) LOOP
    name := pyembed._nearest_function_name(p_corpus_id, key);
    body := pyembed._nearest_function_body(p_corpus_id, key, pyembed._key_storage(c, key));
    kept := kept || name;
    IF NOT pyembed._nearest_function_ok(name, body) THEN
      -- Replaced where all but its text is as made (its text: its own), so that it keeps its
      -- oid: a search that has resolved the name runs it still (a dropped function's oid is
      -- "cache lookup failed" to it). Else dropped first: a replaced function keeps its grants
      -- (one given by hand would stay) and another signature under the name would stay beside it.
      IF NOT pyembed._nearest_function_ok(name, (SELECT p.prosrc FROM pg_catalog.pg_proc p
                                                   WHERE p.pronamespace = 'pyembed'::regnamespace
                                                     AND p.proname = name LIMIT 1)) THEN
        PERFORM pyembed._drop_nearest_function(name);
      END IF;
      EXECUTE format('CREATE OR REPLACE FUNCTION pyembed.%I(vector, jsonb, integer, integer, '
                     'boolean, OUT ids bigint[], OUT distances float8[], OUT scores float8[], '
                     'OUT docs bigint[]) LANGUAGE plpgsql STABLE AS %L', name, body);
      EXECUTE format('REVOKE ALL ON FUNCTION pyembed.%I FROM PUBLIC', name);
      changed := changed || name;
    END IF;
  END LOOP;
  FOR name IN SELECT p.proname FROM pg_catalog.pg_proc p
               WHERE p.pronamespace = 'pyembed'::regnamespace
                 AND p.proname ~ ('^_nearest_c' || p_corpus_id || '_[0-9a-f]{32}$')
                 AND NOT p.proname = ANY (kept) LOOP
    PERFORM pyembed._drop_nearest_function(name);
    changed := changed || name;
  END LOOP;
  RETURN changed;
END
$$;

-- Each key of a corpus whose function (above) is missing or not as pyembed._nearest_functions
-- makes it (changed by hand): `pyembed doctor` names them, `pyembed install` makes them again.
CREATE OR REPLACE FUNCTION pyembed._nearest_functions_problems()
RETURNS TABLE (corpus text, model_key text, problem text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
SELECT c.name, k,
       CASE WHEN NOT EXISTS (SELECT FROM pg_catalog.pg_proc p
                              WHERE p.pronamespace = 'pyembed'::regnamespace
                                AND p.proname = pyembed._nearest_function_name(c.corpus_id, k))
            THEN 'missing' ELSE 'changed by hand' END
  FROM pyembed.corpora c, unnest(ARRAY[c.model_key, c.target_model_key]) k
 WHERE k IS NOT NULL
   AND NOT pyembed._nearest_function_ok(
         pyembed._nearest_function_name(c.corpus_id, k),
         pyembed._nearest_function_body(c.corpus_id, k, pyembed._key_storage(c, k)))
 ORDER BY 1, 2
$$;

-- The corpus's functions (above) follow its row: made with it, changed with its keys and
-- storages (a migration's start, completion and rollback, a storage change), dropped with it.
CREATE OR REPLACE FUNCTION pyembed._corpus_nearest_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    PERFORM pyembed._nearest_functions(OLD.corpus_id);
  ELSIF TG_OP = 'INSERT' OR (NEW.model_key, NEW.target_model_key, NEW.storage, NEW.target_storage)
                            IS DISTINCT FROM
                            (OLD.model_key, OLD.target_model_key, OLD.storage, OLD.target_storage)
  THEN
    PERFORM pyembed._nearest_functions(NEW.corpus_id);
  END IF;
  RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER corpora_nearest_functions
  AFTER INSERT OR DELETE OR UPDATE OF model_key, target_model_key, storage, target_storage
  ON pyembed.corpora
  FOR EACH ROW EXECUTE FUNCTION pyembed._corpus_nearest_changed();
