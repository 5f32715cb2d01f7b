-- The group roles the schema's owners and grants name, made where the cluster lacks them. Roles
-- are the cluster's, not the database's: revisions 0001, 0005, 0026 and 0037 made them once, and a
-- dump of this database restored into another cluster comes without them (pg_dump leaves roles
-- out), where `pyembed install` runs no revision and every later file failed on the first
-- grant ("role pyembed_owner does not exist").
DO $roles$
DECLARE
  r text;
BEGIN
  FOREACH r IN ARRAY ARRAY['pyembed_app', 'pyembed_owner', 'pyembed_worker', 'pyembed_operator'] LOOP
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = r) THEN
      EXECUTE format('CREATE ROLE %I NOLOGIN', r);
    END IF;
  END LOOP;
END
$roles$;
