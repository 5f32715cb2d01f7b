-- Every pyembed function runs with a pinned search_path: pg_catalog, the schema that holds
-- pgvector (wherever the database has it), pg_temp. Resolved when applied, online or offline.
DO $pin$
DECLARE
  vec_schema text := (SELECT extnamespace::regnamespace::text FROM pg_catalog.pg_extension
                       WHERE extname = 'vector');
  f regprocedure;
BEGIN
  FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
            WHERE p.pronamespace = 'pyembed'::regnamespace AND p.prokind = 'f'
              AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d
                               WHERE d.classid = 'pg_catalog.pg_proc'::regclass
                                 AND d.objid = p.oid AND d.deptype = 'e') LOOP
    EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, %s, pg_temp', f, vec_schema);
  END LOOP;
END
$pin$;
