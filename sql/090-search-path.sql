-- Every pyembed function runs with a pinned search_path: pg_catalog, the schema that holds
-- pgvector (wherever the database has it), pg_temp. Resolved when applied, online or offline.
--
-- Except the invoker-rights helpers below, which every search calls and which neither the
-- application role nor PUBLIC may execute (tests/test_indb.py checks both): they run only inside
-- pyembed's own pinned functions (pyembed.search and lookup_corpus, search_hybrid,
-- search_embedded, recall, the index functions; or an owner's session), whose search_path they
-- inherit. A SET clause costs
-- each call a save and restore of the setting and, after it, a fresh resolution of the path for
-- the caller's kept plans and expressions, every search; and a SQL function with one is never
-- inlined. (Their files create them without one, so that re-applying the files unpins them in
-- an upgraded database too.)
DO $pin$
DECLARE
  vec_schema text := (SELECT extnamespace::regnamespace::text FROM pg_catalog.pg_extension
                       WHERE extname = 'vector');
  unpinned text[] := ARRAY['_session_tenant', '_corpus_named', '_vector_ranking',
                           '_hybrid_ranking', '_ranked_hits', '_hit_arrays', '_record_search',
                           '_nearest_in',
                           '_nearest_source', '_nearest_candidates', '_nearest_scans',
                           '_nearest_rules', '_nearest_settings', '_nearest_sql', '_nearest_text',
                           '_nearest_function_name', '_index_plan',
                           '_index_type', '_hnsw_per_page', '_hnsw_fitting_m', '_halfvec_m', '_halfvec_ef',
                           '_index_spec', '_index_params', 'hnsw_rule', '_vector_partition_name'];
  f regprocedure;
BEGIN
  FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
            WHERE p.pronamespace = 'pyembed'::regnamespace AND p.prokind = 'f'
              AND NOT (p.proname = ANY (unpinned) AND NOT p.prosecdef)
              -- a corpus's own vector leg (025-nearest.sql): made after this, unpinned
              AND p.proname !~ '^_nearest_c[0-9]+_[0-9a-f]{32}$'
              AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d
                               WHERE d.classid = 'pg_catalog.pg_proc'::regclass
                                 AND d.objid = p.oid AND d.deptype = 'e') LOOP
    EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, %s, pg_temp', f, vec_schema);
  END LOOP;
END
$pin$;
