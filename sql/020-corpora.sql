-- Corpora and models: created and dropped through these functions only.

-- Both rules of a corpus's vector index, in one expression (the vector leg reads it at every
-- search: pyembed._vector_ranking, _nearest_in; _index_spec, _index_params and hnsw_rule below
-- answer with parts of it):
--
-- The indexed expression, operator class, distance operator and query type for a model's
-- vectors in a storage (0013_vector_storage): `vector` indexes float32 up to 2,000 dimensions
-- (above, float16: pgvector's limit), `halfvec` float16 up to 4,000, `binary` the sign bits
-- (bit(n), Hamming distance) up to 64,000; beyond its limit a storage has no index (expr NULL:
-- exact scans). `exact` is the model's own distance on the float32 vectors, which no index
-- serves: binary searches rescore with it, exact searches order by it.
--
-- pyembed's rule for HNSW parameters, from the vectors a key has in a corpus (rows) and their
-- dimensions (documented in docs/index-tuning.md, measured by tests/benchmarks/bench_suite.py):
--   rows < 200,000        m 16, ef_construction  64, ef_search 100
--   rows < 2,000,000      m 24, ef_construction 128, ef_search 300
--   2,000,000 and more    m 32, ef_construction 200, ef_search 500
-- A graph's recall at a given ef_search falls as it grows (measured in docs/index-tuning.md),
-- and more links per node (m) and a wider build search (ef_construction) buy it back at the
-- cost of build time and index size. `oversample` is for binary storage: the Hamming index
-- returns k x oversample candidates, which are rescored exactly; fewer bits rank more coarsely,
-- so it falls as dimensions grow: 60 below 768 dimensions, 20 below 1,536, 10 from there
-- (docs/index-tuning.md has the recall each reached). The owner's overrides
-- (corpora.index_settings, set by pyembed.set_index_settings; `settings`) come over the rule.
--
-- One SQL expression (a row of pyembed._index_rules, revision 0020) that the planner inlines
-- into the statement calling it, the vector leg's assignment at every search: no function
-- call (a PL/pgSQL call is set up again in every transaction). Kept inlinable: no SET clause,
-- not STRICT, IMMUTABLE and only immutable operators (format() and text || integer are not), no
-- FROM; pyembed._index_type (the vector type a storage indexes) is inlined into it alike, and
-- so is halfvec's m (pyembed._halfvec_m), but not halfvec's ef (pyembed._halfvec_ef, below). The
-- functions below are PL/pgSQL: a SQL function that cannot be inlined is planned again on every
-- call. They run with their caller's pinned search_path (090-search-path.sql).
CREATE OR REPLACE FUNCTION pyembed._index_type(dims integer, storage text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
SELECT CASE storage WHEN 'binary' THEN 'bit' WHEN 'halfvec' THEN 'halfvec'
                    ELSE CASE WHEN dims <= 2000 THEN 'vector' ELSE 'halfvec' END END
$$;

-- halfvec's m: an HNSW index page holds whole elements, each an element tuple (header and
-- vector) and its layer-0 neighbour tuple (2m links), both MAXALIGNed, with a line pointer each
-- (pgvector 0.8's layout; docs/index-tuning.md spells out the sizes these functions use). The
-- vector takes a smaller part of an element in halfvec than in vector storage, so the links'
-- part weighs more: where a smaller m fits one more element a page, and is at least half the
-- rule's m, halfvec is built with the largest such m (halfvec's point is the index's size), and
-- its ef_construction and ef_search are raised by the rule's m over it (pyembed._halfvec_ef),
-- which buys the recall back. Other storages keep the rule's m. The first three are inlined,
-- like pyembed._index_plan below.
-- How many halfvec elements of `dims` dimensions fit a page at `m`.
CREATE OR REPLACE FUNCTION pyembed._hnsw_per_page(dims integer, m integer) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
SELECT 8160 / ((87 + 2 * dims) / 8 * 8 + (4 + 12 * m + 7) / 8 * 8 + 8)
$$;

-- The largest m at which `per_page` halfvec elements of `dims` dimensions fit a page (below 1:
-- none does).
CREATE OR REPLACE FUNCTION pyembed._hnsw_fitting_m(dims integer, per_page integer)
RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
SELECT greatest(0, ((8160 / per_page - (87 + 2 * dims) / 8 * 8 - 8) / 8 * 8 - 4) / 12)
$$;

CREATE OR REPLACE FUNCTION pyembed._halfvec_m(dims integer, storage text, m integer)
RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
SELECT CASE WHEN storage = 'halfvec'
             AND pyembed._hnsw_fitting_m(dims, pyembed._hnsw_per_page(dims, m) + 1) >= (m + 1) / 2
            THEN pyembed._hnsw_fitting_m(dims, pyembed._hnsw_per_page(dims, m) + 1)
            ELSE m END
$$;

-- The rule's `ef` (ef_construction or ef_search) for m `m`, raised by m over pyembed._halfvec_m
-- (rounded up, at most pgvector's 1,000). PL/pgSQL, not inlined: every search's index rules
-- (pyembed._nearest_rules) hold its call, and inlined, its page arithmetic (pyembed._halfvec_m
-- twice, each pyembed._hnsw_fitting_m twice) was the larger part of the expression a search sets
-- up again in every transaction, for every storage; called, it is one node, and only halfvec
-- evaluates the arithmetic.
CREATE OR REPLACE FUNCTION pyembed._halfvec_ef(dims integer, storage text, m integer, ef integer)
RETURNS integer
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
  hm integer;
BEGIN
  IF storage IS DISTINCT FROM 'halfvec' THEN
    RETURN ef;
  END IF;
  hm := pyembed._halfvec_m(dims, storage, m);
  RETURN least(1000, (ef * m + hm - 1) / hm);
END
$$;

CREATE OR REPLACE FUNCTION pyembed._index_plan(dims integer, distance text, storage text,
  settings jsonb, rows bigint)
RETURNS pyembed._index_rules
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
SELECT ROW(
  -- (binary is the one storage whose index type is bit: tested directly, each field one node of
  -- pyembed._index_type fewer to set up at every search)
  -- expr
  CASE WHEN storage = 'binary'
       THEN CASE WHEN dims <= 64000
                 THEN '(binary_quantize(embedding)::bit(' || dims::text || '))' END
       WHEN dims <= 4000
       THEN '(embedding::' || pyembed._index_type(dims, storage) || '(' || dims::text || '))' END,
  -- opclass
  CASE WHEN storage = 'binary' THEN 'bit_hamming_ops'
       ELSE pyembed._index_type(dims, storage)
            || CASE distance WHEN 'cosine' THEN '_cosine_ops' WHEN 'dot' THEN '_ip_ops'
                             ELSE '_l2_ops' END END,
  -- op
  CASE WHEN storage = 'binary' THEN '<~>'
       WHEN distance = 'cosine' THEN '<=>' WHEN distance = 'dot' THEN '<#>' ELSE '<->' END,
  -- castto
  pyembed._index_type(dims, storage) || '(' || dims::text || ')',
  -- exact
  'embedding ' || CASE distance WHEN 'cosine' THEN '<=>' WHEN 'dot' THEN '<#>' ELSE '<->' END,
  -- m, ef_construction, ef_search
  coalesce((settings ->> 'm')::integer,
           pyembed._halfvec_m(dims, storage,
                             CASE WHEN rows < 200000 THEN 16 WHEN rows < 2000000 THEN 24 ELSE 32 END)),
  coalesce((settings ->> 'ef_construction')::integer,
           pyembed._halfvec_ef(dims, storage,
                              CASE WHEN rows < 200000 THEN 16 WHEN rows < 2000000 THEN 24 ELSE 32 END,
                              CASE WHEN rows < 200000 THEN 64 WHEN rows < 2000000 THEN 128 ELSE 200 END)),
  coalesce((settings ->> 'ef_search')::integer,
           pyembed._halfvec_ef(dims, storage,
                              CASE WHEN rows < 200000 THEN 16 WHEN rows < 2000000 THEN 24 ELSE 32 END,
                              CASE WHEN rows < 200000 THEN 100 WHEN rows < 2000000 THEN 300 ELSE 500 END)),
  -- oversample
  coalesce((settings ->> 'oversample')::integer,
           CASE WHEN dims < 768 THEN 60 WHEN dims < 1536 THEN 20 ELSE 10 END)
)::pyembed._index_rules
$$;

-- The index expression and operators for a model's vectors in a storage (pyembed._index_plan).
CREATE OR REPLACE FUNCTION pyembed._index_spec(dims integer, distance text,
  storage text DEFAULT 'vector',
  OUT expr text, OUT opclass text, OUT op text, OUT castto text, OUT exact text)
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
  p record := pyembed._index_plan(dims, distance, storage, NULL, 0);
BEGIN
  expr := p.expr; opclass := p.opclass; op := p.op; castto := p.castto; exact := p.exact;
END
$$;

-- pyembed's rule for HNSW parameters (pyembed._index_plan), without an owner's overrides.
-- numeric, as the counts a SQL client types are: a number past integer (dims) or bigint (rows)
-- reaches its check, where it failed as "function ... does not exist".
CREATE OR REPLACE FUNCTION pyembed.hnsw_rule(rows numeric, dims numeric,
  storage text DEFAULT 'vector',
  OUT m integer, OUT ef_construction integer, OUT ef_search integer, OUT oversample integer)
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
  p record;
BEGIN
  IF NOT (rows >= 0 AND rows = trunc(rows) AND rows <= 9223372036854775807) THEN  -- NaN: above
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('rows must be 0..9223372036854775807, got %s', rows);
  END IF;
  PERFORM pyembed._check_setting('dimensions', dims);
  PERFORM pyembed._check_storage(storage);
  p := pyembed._index_plan(dims::integer, NULL, storage, NULL, rows::bigint);
  m := p.m; ef_construction := p.ef_construction; ef_search := p.ef_search;
  oversample := p.oversample;
END
$$;

-- The HNSW settings in force for a corpus of this many rows: the owner's overrides
-- (corpora.index_settings, set by pyembed.set_index_settings) over the rule (pyembed._index_plan).
CREATE OR REPLACE FUNCTION pyembed._index_params(settings jsonb, rows bigint, dims integer,
  storage text,
  OUT m integer, OUT ef_construction integer, OUT ef_search integer, OUT oversample integer)
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
  p record := pyembed._index_plan(dims, NULL, storage, settings, rows);
BEGIN
  m := p.m; ef_construction := p.ef_construction; ef_search := p.ef_search;
  oversample := p.oversample;
END
$$;

-- The storage a corpus gives a key: a migration's target key may have its own (target_storage).
CREATE OR REPLACE FUNCTION pyembed._key_storage(c pyembed.corpora, key text) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT CASE WHEN key IS NOT DISTINCT FROM c.target_model_key
              THEN coalesce(c.target_storage, c.storage) ELSE c.storage END
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
     AND i.relname LIKE format(E'vectors\\_hnsw\\_c%s\\_%%', p_corpus_id)
     AND (keep_key IS NULL OR i.relname <> pyembed._index_name(p_corpus_id, keep_key))
$$;

-- How many vectors a corpus has for a key (what its index will hold).
CREATE OR REPLACE FUNCTION pyembed._key_rows(p_corpus_id integer, p_model_key text)
RETURNS bigint
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  n bigint;
BEGIN
  EXECUTE format('SELECT count(*) FROM pyembed.%I WHERE model_key = $1',
                 pyembed._vector_partition_name(p_corpus_id)) INTO n USING p_model_key;
  RETURN n;
EXCEPTION WHEN undefined_table THEN
  PERFORM pyembed._dropped_meanwhile(p_corpus_id);
  RAISE;
END
$$;

-- The statement that builds the HNSW index serving one corpus and one model key (a partial
-- index on the corpus's partition), or NULL when the storage has no index for the model's
-- width (exact scans then). Its parameters follow pyembed._index_params for the key's rows now.
-- `storage` and `name` default to the key's storage and index name (a rebuild gives others,
-- then swaps: pyembed._swap_vector_index). CONCURRENTLY (online) cannot run inside a function:
-- clients run that variant themselves, after pyembed._index_build_settings.
CREATE OR REPLACE FUNCTION pyembed._vector_index_sql(p_corpus_id integer, p_model_key text,
                                                     online boolean DEFAULT false,
                                                     p_storage text DEFAULT NULL,
                                                     p_name text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora;
  m pyembed.models;
  t record;
  s record;
  p record;
  n bigint;
BEGIN
  t := pyembed._build_target(p_corpus_id, p_model_key);
  c := t.c;
  m := t.m;
  s := pyembed._index_spec(m.dimensions, m.distance,
                           coalesce(p_storage, pyembed._key_storage(c, p_model_key)));
  IF s.expr IS NULL THEN
    RETURN NULL;
  END IF;
  n := pyembed._key_rows(p_corpus_id, p_model_key);
  p := pyembed._index_params(c.index_settings, n, m.dimensions,
                             coalesce(p_storage, pyembed._key_storage(c, p_model_key)));
  RETURN format('CREATE INDEX %s IF NOT EXISTS %I ON pyembed.%I USING hnsw (%s %s) '
                'WITH (m = %s, ef_construction = %s) WHERE model_key = %L',
                CASE WHEN online THEN 'CONCURRENTLY' ELSE '' END,
                coalesce(p_name, pyembed._index_name(p_corpus_id, p_model_key)),
                pyembed._vector_partition_name(p_corpus_id), s.expr, s.opclass,
                p.m, p.ef_construction, p_model_key);
END
$$;

-- Session settings for building a corpus's index for a key (is_local: to the end of the
-- transaction, for builds inside a function; otherwise for the session, for CONCURRENTLY):
-- maintenance_work_mem large enough to hold the graph (pgvector builds it in memory, and much
-- more slowly on disk once it no longer fits; a parallel build shares it among its workers),
-- estimated as rows x (the indexed value + about 2m neighbours of 16 bytes on layer 0 and the
-- upper layers + 100 bytes of element header) x 1.3, never below the current setting, at most
-- 8 GB; and
-- max_parallel_maintenance_workers at least 2 (PostgreSQL's default, kept by a server set lower
-- only for other index types). Returns the maintenance_work_mem set.
CREATE OR REPLACE FUNCTION pyembed._index_build_settings(p_corpus_id integer, p_model_key text,
                                                         is_local boolean,
                                                         p_storage text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora;
  mo pyembed.models;
  t record;
  n bigint;
  p record;
  storage text;
  value_bytes bigint;
  kb bigint;
BEGIN
  t := pyembed._build_target(p_corpus_id, p_model_key);
  c := t.c;
  mo := t.m;
  storage := coalesce(p_storage, pyembed._key_storage(c, p_model_key));
  n := pyembed._key_rows(p_corpus_id, p_model_key);
  p := pyembed._index_params(c.index_settings, n, mo.dimensions, storage);
  value_bytes := CASE WHEN storage = 'binary' THEN (mo.dimensions + 7) / 8 + 8
                      WHEN storage = 'halfvec' OR mo.dimensions > 2000 THEN 2 * mo.dimensions + 8
                      ELSE 4 * mo.dimensions + 8 END;
  kb := (n * (value_bytes + 36 * p.m + 100) * 13 / 10) / 1024;
  kb := least(greatest(kb, pg_size_bytes(current_setting('maintenance_work_mem')) / 1024),
              8 * 1024 * 1024);
  PERFORM set_config('maintenance_work_mem', kb || 'kB', is_local);
  IF current_setting('max_parallel_maintenance_workers')::integer < 2 THEN
    PERFORM set_config('max_parallel_maintenance_workers', '2', is_local);
  END IF;
  RETURN current_setting('maintenance_work_mem');
END
$$;

-- A corpus's partition of pyembed.vectors (see 010-guards.sql). SQL without a pinned search_path
-- (090-search-path.sql), so that the planner inlines it into its callers' statements.
CREATE OR REPLACE FUNCTION pyembed._vector_partition_name(p_corpus_id integer) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT 'vectors_c' OPERATOR(pg_catalog.||) p_corpus_id::text $$;

-- A corpus dropped after the caller looked it up is unknown (PE002) where the call then touches
-- it: its partition is gone (a statement on it raised 42P01) or its row (a lock on it found
-- none). Returns when the partition is still there: the caller's error was another.
CREATE OR REPLACE FUNCTION pyembed._dropped_meanwhile(p_corpus_id integer) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF to_regclass(format('pyembed.%I', pyembed._vector_partition_name(p_corpus_id))) IS NULL
     OR NOT EXISTS (SELECT FROM pyembed.corpora co WHERE co.corpus_id = p_corpus_id) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE002',
      MESSAGE = format('unknown corpus %s', coalesce(
        pyembed._quoted((SELECT co.name FROM pyembed.corpora co WHERE co.corpus_id = p_corpus_id)),
        'id ' || p_corpus_id)),
      DETAIL = 'it was dropped while this call was using it',
      HINT = '`pyembed corpus list` shows the corpora';
  END IF;
END
$$;

-- The corpus row, locked FOR NO KEY UPDATE (the maintenance steps' lock order, 022 and 070), or
-- PE002 when a drop took it while the lock was awaited.
CREATE OR REPLACE FUNCTION pyembed._lock_corpus(p_corpus_id integer) RETURNS pyembed.corpora
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora;
BEGIN
  SELECT * INTO c FROM pyembed.corpora co WHERE co.corpus_id = p_corpus_id FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    PERFORM pyembed._dropped_meanwhile(p_corpus_id);
    RAISE EXCEPTION USING ERRCODE = 'PE002', MESSAGE = format('unknown corpus id %s', p_corpus_id),
      HINT = 'the corpus was dropped meanwhile, or is not one of your tenant''s: `pyembed corpus '
             'list` shows yours';
  END IF;
  RETURN c;
END
$$;

-- The corpus of id `p_corpus_id` and the model of key `p_model_key` (NULL: none asked for) that
-- the index and partition builders work on, or PE002 / PE006 naming what is not there: a DBA
-- calling a builder by hand with a wrong id or key got "query returned no rows" or a syntax
-- error of the DDL built for no corpus.
CREATE OR REPLACE FUNCTION pyembed._build_target(p_corpus_id integer, p_model_key text,
                                                 OUT c pyembed.corpora, OUT m pyembed.models)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  SELECT * INTO c FROM pyembed.corpora co WHERE co.corpus_id = p_corpus_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'PE002', MESSAGE = format('no corpus has id %s', p_corpus_id),
      HINT = 'the corpus was dropped meanwhile, or is not one of your tenant''s: `pyembed corpus '
             'list` shows yours';
  END IF;
  IF p_model_key IS NOT NULL THEN
    SELECT * INTO m FROM pyembed.models mo WHERE mo.model_key = p_model_key;
    IF NOT FOUND THEN
      RAISE EXCEPTION USING ERRCODE = 'PE006',
        MESSAGE = format('unknown model key %s', pyembed._quoted(p_model_key)),
        HINT = '`pyembed models` lists the registered keys';
    END IF;
  END IF;
END
$$;

-- Who may write a corpus's partition (INSERT, for COPY: its writers' one path, pyembed.vectors
-- .copy_vectors): the login roles of the corpus's tenant (tenant_members, each the role its OID
-- names), or pyembed_app for a corpus of no tenant, and each operator's login: a login in
-- pyembed_operator that is no tenant's member (the operator's worker, acting for the tenant of
-- the jobs it writes, which row-level security and pyembed._vectors_tenant hold it to). Each
-- such login, not the group: granted to pyembed_operator, the INSERT reached a tenant's login
-- granted pyembed_operator after it joined (which acts for its own tenant only, but could LOCK
-- every other tenant's partitions); a login granted pyembed_operator later writes once this runs
-- again (an install). Every other grant on it is revoked. INSERT
-- lets a role LOCK the table in ROW EXCLUSIVE mode, which the corpus's index build, reindex,
-- migration step and drop wait for: held by pyembed_app, whose members every tenant's logins
-- are, one tenant could hold off another's. Called again when a tenant's members change or a
-- corpus changes tenant, and by every install. Granting locks no table.
CREATE OR REPLACE FUNCTION pyembed._partition_writers(p_corpus_id integer) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  part regclass := to_regclass(format('pyembed.%I', pyembed._vector_partition_name(p_corpus_id)));
  r name;
BEGIN
  IF part IS NULL THEN
    RETURN;  -- (a corpus whose partition is not made yet, or dropped)
  END IF;
  FOR r IN SELECT DISTINCT g.rolname
             FROM pg_catalog.pg_class c, aclexplode(c.relacl) a
             JOIN pg_catalog.pg_roles g ON g.oid = a.grantee
            WHERE c.oid = part AND a.grantee <> c.relowner LOOP
    EXECUTE format('REVOKE ALL ON %s FROM %I', part, r);
  END LOOP;
  EXECUTE format('REVOKE ALL ON %s FROM PUBLIC', part);
  FOR r IN SELECT g.rolname
             FROM pyembed.corpora co
             JOIN pyembed.tenant_members m ON m.tenant_id = co.tenant_id
             JOIN pg_catalog.pg_roles g ON g.oid = m.role_oid AND g.rolname = m.role_name
            WHERE co.corpus_id = p_corpus_id
           UNION ALL
           SELECT 'pyembed_app' FROM pyembed.corpora co
            WHERE co.corpus_id = p_corpus_id AND co.tenant_id IS NULL
           UNION ALL
           SELECT g.rolname FROM pg_catalog.pg_roles g
            WHERE g.rolcanlogin AND NOT g.rolsuper
              AND pg_catalog.pg_has_role(g.oid, 'pyembed_operator', 'MEMBER')
              AND NOT EXISTS (SELECT FROM pyembed.tenant_members m
                               WHERE m.role_oid = g.oid AND m.role_name = g.rolname)
              AND EXISTS (SELECT FROM pyembed.corpora co WHERE co.corpus_id = p_corpus_id)
           ORDER BY 1 LOOP
    EXECUTE format('GRANT INSERT ON %s TO %I', part, r);
  END LOOP;
END
$$;

-- A tenant's members changed (a login added, moved or removed), or a corpus's tenant: the
-- writers of each corpus concerned granted again. As the caller (the owner's login, which reads
-- every tenant's corpora), since writing tenant_members or a corpus's tenant is the owner's.
CREATE OR REPLACE FUNCTION pyembed._writers_changed() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c integer;
BEGIN
  IF TG_TABLE_NAME = 'corpora' THEN
    PERFORM pyembed._partition_writers(NEW.corpus_id);
    RETURN NULL;
  END IF;
  FOR c IN SELECT co.corpus_id FROM pyembed.corpora co
            WHERE co.tenant_id IN (CASE WHEN TG_OP <> 'INSERT' THEN OLD.tenant_id END,
                                   CASE WHEN TG_OP <> 'DELETE' THEN NEW.tenant_id END)
            ORDER BY 1 LOOP
    PERFORM pyembed._partition_writers(c);
  END LOOP;
  RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER tenant_members_writers
  AFTER INSERT OR UPDATE OR DELETE ON pyembed.tenant_members
  FOR EACH ROW EXECUTE FUNCTION pyembed._writers_changed();
CREATE OR REPLACE TRIGGER corpora_tenant_writers
  AFTER UPDATE OF tenant_id ON pyembed.corpora
  FOR EACH ROW WHEN (NEW.tenant_id IS DISTINCT FROM OLD.tenant_id)
  EXECUTE FUNCTION pyembed._writers_changed();

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
  PERFORM pyembed._build_target(p_corpus_id, NULL);
  IF to_regclass(format('pyembed.%I', part)) IS NULL THEN
    EXECUTE format('CREATE TABLE pyembed.%I (LIKE pyembed.vectors INCLUDING DEFAULTS '
                   'INCLUDING CONSTRAINTS)', part);  -- the table's own (its bounds): ATTACH needs them
    EXECUTE format('ALTER TABLE pyembed.%I OWNER TO pyembed_owner', part);
    EXECUTE format('ALTER TABLE pyembed.vectors ATTACH PARTITION pyembed.%I FOR VALUES IN (%s)',
                   part, p_corpus_id);
  END IF;
  PERFORM pyembed._partition_writers(p_corpus_id);
  EXECUTE format('CREATE OR REPLACE TRIGGER vectors_tenant BEFORE INSERT ON pyembed.%I '
                 'FOR EACH STATEMENT EXECUTE FUNCTION pyembed._vectors_tenant(%L)', part, p_corpus_id);
  EXECUTE format('CREATE OR REPLACE TRIGGER vectors_written AFTER INSERT ON pyembed.%I '
                 'REFERENCING NEW TABLE AS new_rows '
                 'FOR EACH STATEMENT EXECUTE FUNCTION pyembed._vectors_written()', part);
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_constraint
                  WHERE conrelid = format('pyembed.%I', part)::regclass AND conname = guard) THEN
    PERFORM set_config('lock_timeout', '5s', true);
    FOR old IN SELECT conname FROM pg_catalog.pg_constraint
                WHERE conrelid = format('pyembed.%I', part)::regclass AND contype = 'c'
                  AND coninhcount = 0 LOOP
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
-- store.copy_vectors then writes again (COPY cannot update); returns how many. As its owner, on
-- the caller's corpora only (PE002 otherwise): a table-level DELETE would let the application
-- role LOCK pyembed.vectors, the parent of every tenant's partition, in any mode
-- (015-chunks.sql). By index range scans: as statements of the client's, planned with the
-- statistics of a fuller partition (analyzed, then emptied), both the check and the DELETE were
-- seen to read the whole partition, every batch of a load.
CREATE OR REPLACE FUNCTION pyembed._clear_vectors(p_corpus_id integer, p_model_key text,
                                                  lo bigint, hi bigint, ids bigint[])
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_custom_plan
SET enable_seqscan = off
AS $$
DECLARE
  n bigint;
BEGIN
  IF num_nulls(p_corpus_id, p_model_key, lo, hi) > 0 THEN
    PERFORM pyembed._needs(p_corpus_id IS NULL, 'p_corpus_id', '_clear_vectors');
    PERFORM pyembed._needs(p_model_key IS NULL, 'p_model_key', '_clear_vectors');
    PERFORM pyembed._needs(lo IS NULL, 'lo', '_clear_vectors');
    PERFORM pyembed._needs(hi IS NULL, 'hi', '_clear_vectors');
  END IF;
  IF NOT (p_corpus_id = ANY (pyembed.visible_corpora())) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE002', MESSAGE = format('unknown corpus id %s', p_corpus_id),
      HINT = 'the corpus was dropped meanwhile, or is not one of your tenant''s: `pyembed corpus '
             'list` shows yours';
  END IF;
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
  PERFORM pyembed._index_build_settings(p_corpus_id, p_model_key, true);
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
      MESSAGE = format('invalid corpus name %s', pyembed._quoted(name)),
      HINT = 'use 1-63 lowercase letters, digits, _ or -, starting with a letter or digit';
  END IF;
END
$$;

-- A storage pyembed knows (PE005 otherwise).
CREATE OR REPLACE FUNCTION pyembed._check_storage(storage text) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF storage IS NULL OR storage NOT IN ('vector', 'halfvec', 'binary') THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('unknown storage %s',
                       pyembed._quoted(storage)),
      HINT = 'use vector, halfvec or binary (docs/index-tuning.md)';
  END IF;
END
$$;

-- The range of an integer setting stored in a row (chunk_tokens, max_batch, a tenant's
-- requests_per_minute...) as 'lowest..highest', read from its table's CHECK
-- <table>_<setting>_in_range (revision 0028), the one place it is held; NULL for no such setting.
CREATE OR REPLACE FUNCTION pyembed._setting_range(setting text) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT m[1] || '..' || m[2]
    FROM pg_catalog.pg_constraint c,
         LATERAL regexp_match(pg_catalog.pg_get_constraintdef(c.oid),
                              E'>= (-?\\d+)\\).*<= (-?\\d+)\\)') m
   WHERE c.connamespace = 'pyembed'::regnamespace AND c.contype = 'c'
     AND c.conname LIKE E'%\\_' || setting || E'\\_in\\_range'
   LIMIT 1
$$;

-- PE005 naming the setting and its range, unless `value` is in it: the one place its words are
-- written (create_corpus and register_model here, pyembed.db.integer for Python and the CLI,
-- with a number past bigint too: numeric). True when it is; false for no such setting.
CREATE OR REPLACE FUNCTION pyembed._check_setting(setting text, value numeric) RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  bounds text[] := string_to_array(pyembed._setting_range(setting), '..');
BEGIN
  IF bounds IS NULL THEN
    RETURN false;
  END IF;
  IF value IS NULL OR value NOT BETWEEN bounds[1]::numeric AND bounds[2]::numeric
     OR value <> trunc(value) THEN  -- stored as integer: 2.5 was rounded
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('%s must be %s, got %s', setting, array_to_string(bounds, '..'),
                       coalesce(value::text, 'NULL'));
  END IF;
  RETURN true;
END
$$;

-- With exist_ok, the caller's corpus of that name is returned when it has the same model key
-- and chunking (what its stored chunks and vectors were made with), so a script that creates
-- its corpus can run again; another key is PE001, other chunking PE005. Its storage and
-- description are not compared: a reindex changes the one and neither changes a vector.
CREATE OR REPLACE FUNCTION pyembed.create_corpus(
  name text, model_key text, description text DEFAULT '',
  chunk_tokens numeric DEFAULT 200, chunk_overlap numeric DEFAULT 40,
  storage text DEFAULT 'vector', exist_ok boolean DEFAULT false)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  new_id integer;
  old pyembed.corpora;
BEGIN
  IF num_nulls(model_key, description, exist_ok) > 0 THEN
    PERFORM pyembed._needs(model_key IS NULL, 'model_key', 'create_corpus');
    PERFORM pyembed._needs(description IS NULL, 'description', 'create_corpus');
    PERFORM pyembed._needs(exist_ok IS NULL, 'exist_ok', 'create_corpus');
  END IF;
  PERFORM pyembed._check_corpus_name(create_corpus.name);
  IF NOT EXISTS (SELECT FROM pyembed.models m WHERE m.model_key = create_corpus.model_key) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE006',
      MESSAGE = format('unknown model key %s', pyembed._quoted(create_corpus.model_key)),
      HINT = '`pyembed models` lists the registered keys';
  END IF;
  PERFORM pyembed._check_storage(create_corpus.storage);
  -- the table's checks hold (their ranges: pyembed._setting_range); these say which setting
  -- is wrong in words
  PERFORM pyembed._check_setting('chunk_tokens', create_corpus.chunk_tokens);
  PERFORM pyembed._check_setting('chunk_overlap', create_corpus.chunk_overlap);
  IF create_corpus.chunk_overlap >= create_corpus.chunk_tokens THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('chunk_overlap must be below chunk_tokens (%s), got %s',
                       create_corpus.chunk_tokens, create_corpus.chunk_overlap);
  END IF;
  SELECT * INTO old FROM pyembed.corpora c WHERE c.name = create_corpus.name
     AND coalesce(c.tenant_id, 0) = coalesce((SELECT pyembed.current_tenant()), 0);
  IF FOUND THEN
    IF NOT coalesce(create_corpus.exist_ok, false) THEN
      RAISE EXCEPTION USING ERRCODE = 'PE005',
        MESSAGE = format('corpus %s already exists', create_corpus.name),
        HINT = 'pass exist_ok (--exist-ok on the command line, exist_ok => true in SQL) to use '
               'it when it has the same model key and chunking';
    END IF;
    IF old.model_key <> create_corpus.model_key THEN
      RAISE EXCEPTION USING ERRCODE = 'PE001',
        MESSAGE = format('model key mismatch: corpus %s exists, pinned to %s, not %s',
                         old.name, old.model_key, create_corpus.model_key);
    END IF;
    IF (old.chunk_tokens, old.chunk_overlap)
       <> (create_corpus.chunk_tokens, create_corpus.chunk_overlap) THEN
      RAISE EXCEPTION USING ERRCODE = 'PE005',
        MESSAGE = format('corpus %s exists with chunk_tokens %s and chunk_overlap %s, not %s '
                         'and %s', old.name, old.chunk_tokens, old.chunk_overlap,
                         create_corpus.chunk_tokens, create_corpus.chunk_overlap);
    END IF;
    RETURN old.corpus_id;
  END IF;
  INSERT INTO pyembed.corpora (name, model_key, description, chunk_tokens, chunk_overlap,
                               tenant_id, storage)
  VALUES (create_corpus.name, create_corpus.model_key, coalesce(create_corpus.description, ''),
          create_corpus.chunk_tokens, create_corpus.chunk_overlap, pyembed.current_tenant(),
          create_corpus.storage)
  RETURNING corpus_id INTO new_id;
  PERFORM pyembed._vector_partition(new_id);
  PERFORM pyembed._create_vector_index(new_id, create_corpus.model_key);
  RETURN new_id;
END
$$;

-- Dropping a corpus deletes its row and every row written for it (its vectors partition is
-- emptied and left to the next install, below), which clients take in both orders: a writer holds the corpus row (FOR KEY SHARE, its documents'
-- foreign key) or its chunks, then writes the partition; a search holds pyembed.vectors and the
-- partition, then records (the recording tables hold no foreign key to the corpus, so it takes
-- no row lock). No single order suits both, so the drop never waits holding what a client may
-- wait for (a waiting client looks for a cycle once, deadlock_timeout after it began to wait,
-- and a drop waiting for it then was one): each attempt takes, in a subtransaction, the corpus
-- row (waiting at most the function's lock_timeout, holding nothing yet), then without waiting
-- its documents, chunks and queued work (the rows the deletes' cascade locks) and the partition
-- (a search of the corpus holds it: not pyembed.vectors, which a COPY into any tenant's
-- partition locks too), deletes them, and last the corpus's recording rows (no search of it is left running); a lock
-- the deletes' triggers take waits only the shorter lock_timeout the attempt sets. An attempt
-- that cannot have a lock is rolled back, which releases all it took, and the drop retries after
-- a pause until its deadline, then fails with PE012 (retry later). A name the caller's tenant
-- has no corpus of is PE002, as in every other call by name (true only says it was dropped: the
-- result type stays for the callers that read it).
CREATE OR REPLACE FUNCTION pyembed.drop_corpus(name text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '100ms'
AS $$
DECLARE
  c pyembed.corpora;
  part text;
  deadline timestamptz := clock_timestamp() + interval '5 s';
  pause float8 := 0.01;
  tries integer := 0;
BEGIN
  IF name IS NULL THEN
    PERFORM pyembed._needs(true, 'name', 'drop_corpus');
  END IF;
  -- PE002 for a name the caller's tenant has no corpus of, as every other call by name.
  SELECT * INTO c FROM pyembed.lookup_corpus(drop_corpus.name);
  part := pyembed._vector_partition_name(c.corpus_id);
  LOOP
    tries := tries + 1;
    BEGIN
      PERFORM FROM pyembed.corpora WHERE corpus_id = c.corpus_id FOR UPDATE;
      IF NOT FOUND THEN  -- dropped by another session meanwhile: unknown now
        RAISE EXCEPTION USING ERRCODE = 'PE002',
          MESSAGE = format('unknown corpus %s (dropped meanwhile)', quote_literal(c.name)),
          HINT = '`pyembed corpus list` shows the corpora';
      END IF;
      -- Holding the row, the attempt waits for nothing more: a client waiting for the row
      -- checks for a deadlock once, and found one if this attempt was then waiting for it.
      -- The rows the deletes lock (a writer's or the worker's) and the partition are taken
      -- NOWAIT; whatever else they lock (their triggers' rows) waits the lock_timeout set here.
      PERFORM set_config('lock_timeout', '1ms', true);
      PERFORM FROM pyembed.documents WHERE corpus_id = c.corpus_id FOR UPDATE NOWAIT;
      PERFORM FROM pyembed.chunks WHERE corpus_id = c.corpus_id FOR UPDATE NOWAIT;
      PERFORM FROM pyembed.queue WHERE corpus_id = c.corpus_id FOR UPDATE NOWAIT;
      IF to_regclass(format('pyembed.%I', part)) IS NOT NULL THEN
        EXECUTE format('LOCK TABLE pyembed.%I IN ACCESS EXCLUSIVE MODE NOWAIT', part);
      END IF;
      DELETE FROM pyembed.documents WHERE corpus_id = c.corpus_id;
      DELETE FROM pyembed.corpora WHERE corpus_id = c.corpus_id;
      -- The partition, emptied by the deletes (its chunks' vectors go with them), stays until
      -- the next install drops it (095-vector-partitions.sql), writable by nobody: dropping
      -- (or detaching) it here locks pyembed.vectors ACCESS EXCLUSIVE, which waited for every
      -- tenant's open write (a COPY into a partition locks its parent). Renamed (a lock on it
      -- alone), so that a call that waited for it finds the corpus's partition gone (PE002).
      PERFORM pyembed._partition_writers(c.corpus_id);
      IF to_regclass(format('pyembed.%I', part)) IS NOT NULL THEN
        EXECUTE format('ALTER TABLE pyembed.%I RENAME TO %I', part, 'dropped_' || part);
      END IF;
      DELETE FROM pyembed.recall_samples WHERE corpus_id = c.corpus_id;
      DELETE FROM pyembed.recall_measurements WHERE corpus_id = c.corpus_id;
      RETURN true;
    EXCEPTION WHEN lock_not_available OR deadlock_detected THEN
      IF clock_timestamp() + make_interval(secs => pause) > deadline THEN
        RAISE EXCEPTION USING ERRCODE = 'PE012',
          MESSAGE = format('corpus %s is in use: its drop could not take it from the sessions '
                           'using it in 5 s (%s tries); retry', c.name, tries),
          HINT = 'a transaction left open on the corpus holds it: end it, then drop again';
      END IF;
    END;
    PERFORM pg_sleep(pause * (0.5 + random()));
    pause := least(pause * 2, 0.2);
  END LOOP;
END
$$;

-- Register a model of your own; a key already registered must come with the same settings.
CREATE OR REPLACE FUNCTION pyembed.register_model(
  provider text, model_id text, model_version text, dimensions numeric,
  distance text DEFAULT 'cosine', normalized boolean DEFAULT true,
  input_types boolean DEFAULT false, max_batch numeric DEFAULT 128,
  max_tokens numeric DEFAULT 8192, request_dimensions numeric DEFAULT NULL,
  price_per_mtok numeric DEFAULT NULL, description text DEFAULT '')
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  key text;
  old pyembed.models;
  msg text;
  con text;
BEGIN
  -- The counts are numeric, as a SQL client types them: each reaches its table's range
  -- (integer failed as "function ... does not exist" past integer).
  PERFORM pyembed._check_setting('dimensions', dimensions);
  PERFORM pyembed._check_setting('max_batch', max_batch);
  PERFORM pyembed._check_setting('max_tokens', max_tokens);
  IF request_dimensions IS NOT NULL THEN  -- (NULL: the model's own)
    PERFORM pyembed._check_setting('request_dimensions', request_dimensions);
  END IF;
  -- The key's separators and Unicode's White_Space characters, not the locale's [:space:]
  -- (which varies with the server's lc_ctype): pyembed.models.KEY_BREAKS, word for word.
  IF concat(provider, model_id, model_version)
       ~ E'[/@:\\u0009-\\u000D\\u0020\\u0085\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000]'
     OR provider = '' OR model_id = '' OR model_version = '' THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = 'provider, model id and version must be non-empty, without "/", "@", ":" or blanks';
  END IF;
  key := provider || '/' || model_id || '@' || model_version || ':' || dimensions::integer;
  SELECT * INTO old FROM pyembed.models m WHERE m.model_key = key;
  IF FOUND THEN
    IF (old.distance, old.normalized, old.input_types, old.request_dimensions)
       IS DISTINCT FROM (distance, normalized, input_types, request_dimensions) THEN
      RAISE EXCEPTION USING ERRCODE = 'PE005',
        MESSAGE = format('model %s is already registered with other settings', key),
        HINT = 'call it with the settings it was registered with (`pyembed models`), or register '
               'the new ones under another model_version';
    END IF;
    RETURN key;
  END IF;
  BEGIN
    INSERT INTO pyembed.models (model_key, provider, model_id, model_version, dimensions,
      distance, normalized, input_types, max_batch, max_tokens, request_dimensions,
      price_per_mtok, description)
    VALUES (key, provider, model_id, model_version, dimensions, distance, normalized,
      input_types, max_batch, max_tokens, request_dimensions, price_per_mtok,
      coalesce(description, ''));
  EXCEPTION WHEN check_violation THEN
    -- The table's error with the key quoted (pyembed._quoted) where PostgreSQL's DETAIL shows
    -- the whole row raw: a control character or a right-to-left mark a DBA typed, as typed.
    GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT, con = CONSTRAINT_NAME;
    RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE = msg, CONSTRAINT = con,
      TABLE = 'models', SCHEMA = 'pyembed', DETAIL = format('model key %s', pyembed._quoted(key));
  END;
  RETURN key;
END
$$;
