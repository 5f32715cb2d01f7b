"""The operator role: one worker and one exporter for every tenant.

Revision ID: 0037
Revises: 0036
Create Date: 2026-12-06

A session acted for its login's tenant only, so the local cluster's and the Docker stack's worker
login (pyembed_worker_user, of no tenant) left every tenant's queued documents queued, and an
operator with 50 tenants ran 50 workers and 50 exporters. The NOLOGIN role pyembed_operator (made
here if the cluster has none; roles are the cluster's, so the downgrade leaves it) is the
operator's reach: a login in it that is no tenant's member acts for the tenant its
pyembed.act_as_tenant names, as a superuser's does (sql/008-tenancy.sql), with row-level security
still forced, and each corpus's partition grants it INSERT (pyembed._partition_writers). The
worker sets the setting per transaction, for the tenant of the jobs it works. The worker login
that pyembed's local cluster and Docker stack make, pyembed_worker_user, is granted it where it
exists and is no tenant's member. The downgrade takes the partitions' grants back (the install of
the revision below grants them again without it) and makes again the function that earlier
revisions' downgrades call (0022's pyembed._session_tenant), which sql/005-retired.sql drops.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0037"
down_revision: str | Sequence[str] | None = "0036"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql("""
DO $roles$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'pyembed_operator') THEN
    CREATE ROLE pyembed_operator NOLOGIN;
  END IF;
  IF EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname = 'pyembed_worker_user'
                AND NOT EXISTS (SELECT FROM pyembed.tenant_members m WHERE m.role_oid = r.oid))
  THEN
    GRANT pyembed_operator TO pyembed_worker_user;
  END IF;
END $roles$;
""")


def downgrade() -> None:
    run_sql(r"""
DO $grants$
DECLARE
  part regclass;
BEGIN
  FOR part IN SELECT i.inhrelid::regclass FROM pg_catalog.pg_inherits i
               WHERE i.inhparent = 'pyembed.vectors'::regclass LOOP
    EXECUTE format('REVOKE ALL ON %s FROM pyembed_operator', part);
  END LOOP;
END
$grants$;
-- As sql/008-tenancy.sql had it before this revision.
CREATE OR REPLACE FUNCTION pyembed._session_is_superuser() RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = session_user $$;
REVOKE ALL ON FUNCTION pyembed._session_is_superuser() FROM PUBLIC;
""")
