"""Tenants: corpora owned by a tenant, isolation by forced row-level security, usage accounting.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25

A session acts for the tenant its login role is a member of (pyembed.tenant_members; a
superuser may act for one with SET pyembed.act_as_tenant). Row-level security is enabled and
forced on every table with tenant data, so it holds for the tables' owner role too; the
tables move to the NOLOGIN role pyembed_owner for that reason (superusers bypass row-level
security in PostgreSQL, so the SECURITY DEFINER functions check the tenant themselves).
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BY_CORPUS = ("documents", "chunks", "vectors", "queue", "queue_failed", "eval_queries",
             "query_log", "postings", "lexeme_stats", "keyword_stats", "migrations")
BY_TENANT = ("embedding_cache", "cache_stats", "usage")
ALL = ("corpora", *BY_CORPUS, *BY_TENANT, "migration_events")
OWNED = (*ALL, "models", "secrets", "tenants", "tenant_members")


def upgrade() -> None:
    run_sql("""
DO $roles$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'pyembed_owner') THEN
    CREATE ROLE pyembed_owner NOLOGIN;
  END IF;
END $roles$;

CREATE TABLE pyembed.tenants (
  tenant_id           integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  name                text NOT NULL UNIQUE CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
  requests_per_minute integer CHECK (requests_per_minute > 0),
  tokens_per_minute   integer CHECK (tokens_per_minute > 0),
  created_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE pyembed.tenant_members (
  role_name name PRIMARY KEY,
  tenant_id integer NOT NULL REFERENCES pyembed.tenants ON DELETE CASCADE
);

ALTER TABLE pyembed.corpora ADD COLUMN tenant_id integer REFERENCES pyembed.tenants;
ALTER TABLE pyembed.corpora DROP CONSTRAINT corpora_name_key;
CREATE UNIQUE INDEX corpora_tenant_name ON pyembed.corpora (coalesce(tenant_id, 0), name);

-- 0 is "no tenant" where a tenant id is part of a key.
ALTER TABLE pyembed.embedding_cache ADD COLUMN tenant_id integer NOT NULL DEFAULT 0;
ALTER TABLE pyembed.embedding_cache DROP CONSTRAINT embedding_cache_pkey;
ALTER TABLE pyembed.embedding_cache ADD PRIMARY KEY (tenant_id, cache_key);
ALTER TABLE pyembed.cache_stats ADD COLUMN tenant_id integer NOT NULL DEFAULT 0;
ALTER TABLE pyembed.cache_stats DROP CONSTRAINT cache_stats_pkey;
ALTER TABLE pyembed.cache_stats ADD PRIMARY KEY (tenant_id, day, model_key);

CREATE TABLE pyembed.usage (
  tenant_id integer NOT NULL DEFAULT 0,
  corpus_id integer NOT NULL DEFAULT 0,
  model_key text NOT NULL,
  minute    timestamptz NOT NULL,
  requests  integer NOT NULL DEFAULT 0,
  tokens    bigint NOT NULL DEFAULT 0,
  cost_usd  numeric NOT NULL DEFAULT 0,
  PRIMARY KEY (tenant_id, corpus_id, model_key, minute)
);

-- The tenant this session acts for (NULL: none).
CREATE FUNCTION pyembed.current_tenant() RETURNS integer
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

-- The corpora this session may see, evaluated once per query by the policies below.
CREATE FUNCTION pyembed.visible_corpora() RETURNS integer[]
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT coalesce(array_agg(corpus_id), '{}') FROM pyembed.corpora
   WHERE tenant_id IS NOT DISTINCT FROM pyembed.current_tenant()
$$;
""")
    for table in ALL:
        run_sql(f"ALTER TABLE pyembed.{table} ENABLE ROW LEVEL SECURITY; "
                f"ALTER TABLE pyembed.{table} FORCE ROW LEVEL SECURITY;")
    run_sql("""CREATE POLICY tenant ON pyembed.corpora
  USING (tenant_id IS NOT DISTINCT FROM pyembed.current_tenant())
  WITH CHECK (tenant_id IS NOT DISTINCT FROM pyembed.current_tenant());""")
    for table in BY_CORPUS:
        run_sql(f"CREATE POLICY tenant ON pyembed.{table} "
                f"USING (corpus_id IN (SELECT unnest(pyembed.visible_corpora())));")
    for table in BY_TENANT:
        run_sql(f"CREATE POLICY tenant ON pyembed.{table} "
                f"USING (tenant_id = coalesce((SELECT pyembed.current_tenant()), 0)) "
                f"WITH CHECK (tenant_id = coalesce((SELECT pyembed.current_tenant()), 0));")
    run_sql("CREATE POLICY tenant ON pyembed.migration_events "
            "USING (migration_id IN (SELECT migration_id FROM pyembed.migrations));")
    for table in OWNED:
        run_sql(f"ALTER TABLE pyembed.{table} OWNER TO pyembed_owner;")
    # The tables' new owner reaches their schema from here on, not only once sql/080-grants.sql
    # runs after the last revision: a foreign key's check runs as the referenced table's owner,
    # and a later revision that copies stored rows into a table referencing corpora (0017's
    # posting blocks) failed on a database upgraded from before this one.
    run_sql("GRANT USAGE ON SCHEMA pyembed TO pyembed_owner;")


def downgrade() -> None:
    # Below this revision a corpus name is the database's (UNIQUE (name)): corpora of several
    # tenants under one name stop the downgrade before it changes anything, named, with the fix
    # (the unique index's raw error reached the DBA as a traceback). The superuser running it
    # sees every tenant's corpora.
    run_sql("""DO $shared_names$
DECLARE
  clash text;
BEGIN
  SELECT string_agg(format('%s (%s corpora)', quote_literal(name), n), ', ' ORDER BY name)
    INTO clash
    FROM (SELECT name, count(*) AS n FROM pyembed.corpora GROUP BY name HAVING count(*) > 1) c;
  IF clash IS NOT NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'unique_violation',
      MESSAGE = format('revision 0005''s downgrade stopped: below it a corpus name is the '
                       'database''s, and tenants hold corpora of one name: %s. Drop or rename '
                       'all but one of each (pyembed.drop_corpus, acting for its tenant), '
                       'then downgrade again', clash);
  END IF;
END
$shared_names$;""")
    for table in OWNED:
        run_sql(f"ALTER TABLE pyembed.{table} OWNER TO CURRENT_USER;")
    for table in ALL:
        run_sql(f"DROP POLICY IF EXISTS tenant ON pyembed.{table}; "
                f"ALTER TABLE pyembed.{table} NO FORCE ROW LEVEL SECURITY; "
                f"ALTER TABLE pyembed.{table} DISABLE ROW LEVEL SECURITY;")
    run_sql("""
REVOKE ALL ON SCHEMA pyembed FROM pyembed_owner;
DROP FUNCTION IF EXISTS pyembed.load_vectors();
DROP FUNCTION pyembed.visible_corpora(), pyembed.current_tenant();
DROP TABLE pyembed.usage;
ALTER TABLE pyembed.cache_stats DROP CONSTRAINT cache_stats_pkey;
ALTER TABLE pyembed.cache_stats DROP COLUMN tenant_id;
ALTER TABLE pyembed.cache_stats ADD PRIMARY KEY (day, model_key);
DELETE FROM pyembed.embedding_cache WHERE tenant_id <> 0;
ALTER TABLE pyembed.embedding_cache DROP CONSTRAINT embedding_cache_pkey;
ALTER TABLE pyembed.embedding_cache DROP COLUMN tenant_id;
ALTER TABLE pyembed.embedding_cache ADD PRIMARY KEY (cache_key);
DROP INDEX pyembed.corpora_tenant_name;
ALTER TABLE pyembed.corpora DROP COLUMN tenant_id;
ALTER TABLE pyembed.corpora ADD CONSTRAINT corpora_name_key UNIQUE (name);
DROP TABLE pyembed.tenant_members, pyembed.tenants;
""")
