"""Tenant checks cost the same with 10 corpora or 10,000: evaluated once per statement.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01

`tenant_id IS NOT DISTINCT FROM pyembed.current_tenant()` calls the function once per corpus
row it filters, and nothing can use an index for it: pyembed.visible_corpora(), which every
tenant policy calls, cost ~15 us per corpus in the database (15 ms on every query of a
tenant's chunks, vectors or queue with 1,000 corpora). The same test written as
`coalesce(tenant_id, 0) = coalesce((SELECT pyembed.current_tenant()), 0)` evaluates the
function once (an InitPlan) and reads the unique index corpora_tenant_name. Tenant ids start at
1, so 0 stands for "no tenant" as it does in the cache and usage keys. The sql/ functions that
look up a corpus by name use the same form.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# PL/pgSQL, not SQL: PL/pgSQL keeps its plans for the session, where a SQL function that
# cannot be inlined (SECURITY DEFINER) is planned again at every call (0.2-0.4 ms each).
UPGRADE = """
CREATE OR REPLACE FUNCTION pyembed.current_tenant() RETURNS integer
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF coalesce(current_setting('pyembed.act_as_tenant', true), '') <> ''
     AND (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = session_user) THEN
    RETURN (SELECT t.tenant_id FROM pyembed.tenants t
             WHERE t.name = current_setting('pyembed.act_as_tenant', true));
  END IF;
  RETURN (SELECT m.tenant_id FROM pyembed.tenant_members m WHERE m.role_name = session_user);
END
$$;

CREATE OR REPLACE FUNCTION pyembed.visible_corpora() RETURNS integer[]
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  RETURN (SELECT coalesce(array_agg(corpus_id), '{}') FROM pyembed.corpora
           WHERE coalesce(tenant_id, 0) = coalesce(pyembed.current_tenant(), 0));
END
$$;

DROP POLICY tenant ON pyembed.corpora;
CREATE POLICY tenant ON pyembed.corpora
  USING (coalesce(tenant_id, 0) = coalesce((SELECT pyembed.current_tenant()), 0))
  WITH CHECK (coalesce(tenant_id, 0) = coalesce((SELECT pyembed.current_tenant()), 0));
"""

# As revision 0005 made them.
DOWNGRADE = """
CREATE OR REPLACE FUNCTION pyembed.current_tenant() RETURNS integer
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT CASE
    WHEN coalesce(current_setting('pyembed.act_as_tenant', true), '') <> ''
         AND (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = session_user)
      THEN (SELECT t.tenant_id FROM pyembed.tenants t
             WHERE t.name = current_setting('pyembed.act_as_tenant', true))
    ELSE (SELECT m.tenant_id FROM pyembed.tenant_members m WHERE m.role_name = session_user)
  END
$$;

CREATE OR REPLACE FUNCTION pyembed.visible_corpora() RETURNS integer[]
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT coalesce(array_agg(corpus_id), '{}') FROM pyembed.corpora
   WHERE tenant_id IS NOT DISTINCT FROM pyembed.current_tenant()
$$;

DROP POLICY tenant ON pyembed.corpora;
CREATE POLICY tenant ON pyembed.corpora
  USING (tenant_id IS NOT DISTINCT FROM pyembed.current_tenant())
  WITH CHECK (tenant_id IS NOT DISTINCT FROM pyembed.current_tenant());
"""


def upgrade() -> None:
    run_sql(UPGRADE)


def downgrade() -> None:
    run_sql(DOWNGRADE)
