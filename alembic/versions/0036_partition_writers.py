"""A corpus's partition of pyembed.vectors is written by its tenant's logins only: the downgrade.

Revision ID: 0036
Revises: 0035
Create Date: 2026-12-06

The application role's INSERT on pyembed.vectors (the parent) and on every partition let any
tenant LOCK the parent (which locks every partition) or another tenant's partition in ROW
EXCLUSIVE mode, which that tenant's index builds, reindexes, migration steps and drops wait for.
sql/ now grants no INSERT on the parent and each partition's to the logins of its corpus's tenant
(pyembed._partition_writers, kept by triggers on tenant_members and corpora). Nothing here to
upgrade: sql/ grants. The downgrade drops the triggers and functions (the corpora trigger
depends on the tenant_id column that revision 0005's downgrade drops), drops the emptied
partitions of dropped corpora (drop_corpus renames them dropped_vectors_c<id> for the next
install to drop) and gives the grants back as they were: INSERT on the parent and on every
partition to pyembed_app, none to a login.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0036"
down_revision: str | Sequence[str] | None = "0035"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    run_sql(r"""
DROP TRIGGER IF EXISTS tenant_members_writers ON pyembed.tenant_members;
DROP TRIGGER IF EXISTS corpora_tenant_writers ON pyembed.corpora;
DROP FUNCTION IF EXISTS pyembed._writers_changed();
DROP FUNCTION IF EXISTS pyembed._partition_writers(integer);
DO $grants$
DECLARE
  part regclass;
  r name;
BEGIN
  -- The emptied partitions of dropped corpora, which this revision's drop_corpus leaves to
  -- the next install: an earlier revision's drop removes its partition itself.
  FOR part IN SELECT i.inhrelid::regclass FROM pg_catalog.pg_inherits i
                JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
               WHERE i.inhparent = 'pyembed.vectors'::regclass
                 AND c.relname ~ '^dropped_vectors_c[0-9]+$' LOOP
    EXECUTE format('DROP TABLE %s', part);
  END LOOP;
  FOR part IN SELECT i.inhrelid::regclass FROM pg_catalog.pg_inherits i
               WHERE i.inhparent = 'pyembed.vectors'::regclass LOOP
    FOR r IN SELECT DISTINCT g.rolname
               FROM pg_catalog.pg_class c, aclexplode(c.relacl) a
               JOIN pg_catalog.pg_roles g ON g.oid = a.grantee
              WHERE c.oid = part AND a.grantee <> c.relowner LOOP
      EXECUTE format('REVOKE ALL ON %s FROM %I', part, r);
    END LOOP;
    EXECUTE format('GRANT INSERT ON %s TO pyembed_app', part);
  END LOOP;
END
$grants$;
GRANT INSERT ON pyembed.vectors TO pyembed_app;
""")
