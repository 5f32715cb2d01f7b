"""Hardening: recording tables without a foreign key to the corpus; tenant members by role.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-04

A search that records a recall sample (and a measurement of recall) held the corpus's vectors
partition, then locked the corpus row FOR KEY SHARE through the sample's foreign key; a writer
locks the row first (its documents' foreign key), then the partition. pyembed.drop_corpus needs
both, and waited for one side while the other waited for it. recall_samples and
recall_measurements are records, as query_log and usage are (neither has the foreign key): the
drop deletes their rows itself (sql/020-corpora.sql), and no search locks the corpus row.

A tenant member was stored by role name alone: a member role that was dropped stayed a member,
and a role created again under that name (by anyone allowed to create roles) acted for the
tenant. tenant_members.role_oid ties the row to the role itself (pyembed._member_is_a_role sets
it; pyembed._session_tenant matches name and OID). A member whose role no longer exists is
removed here: it was no member of anything a session could be.

Unbounded text: pyembed.register_model took a 10,000-character provider name and a 2 MB
description, and so on for every text, JSON or binary column a role may fill. Each has a CHECK
named <table>_<column>_bound (BOUNDS below; pyembed.db.translate makes its violation an
InvalidInput naming the column). A row already over a bound stops the upgrade: shorten it first.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0022"
down_revision: str | Sequence[str] | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql("""
ALTER TABLE pyembed.recall_samples DROP CONSTRAINT recall_samples_corpus_id_fkey;
ALTER TABLE pyembed.recall_measurements DROP CONSTRAINT recall_measurements_corpus_id_fkey;
ALTER TABLE pyembed.tenant_members ADD COLUMN role_oid oid;
UPDATE pyembed.tenant_members m SET role_oid = r.oid
  FROM pg_catalog.pg_roles r WHERE r.rolname = m.role_name;
DELETE FROM pyembed.tenant_members WHERE role_oid IS NULL;
ALTER TABLE pyembed.tenant_members ALTER COLUMN role_oid SET NOT NULL;
""")
    run_sql(_bounds_sql(add=True))


def downgrade() -> None:
    run_sql(_bounds_sql(add=False))
    run_sql(f"""
DELETE FROM pyembed.recall_samples s
 WHERE NOT EXISTS (SELECT FROM pyembed.corpora c WHERE c.corpus_id = s.corpus_id);
DELETE FROM pyembed.recall_measurements m
 WHERE NOT EXISTS (SELECT FROM pyembed.corpora c WHERE c.corpus_id = m.corpus_id);
ALTER TABLE pyembed.recall_samples ADD CONSTRAINT recall_samples_corpus_id_fkey
  FOREIGN KEY (corpus_id) REFERENCES pyembed.corpora (corpus_id) ON DELETE CASCADE;
ALTER TABLE pyembed.recall_measurements ADD CONSTRAINT recall_measurements_corpus_id_fkey
  FOREIGN KEY (corpus_id) REFERENCES pyembed.corpora (corpus_id) ON DELETE CASCADE;
DROP TRIGGER tenant_members_role ON pyembed.tenant_members;
{MEMBERS_BEFORE}
ALTER TABLE pyembed.tenant_members DROP COLUMN role_oid;
""")


# (table, column, measure, most): every text, JSON or binary column a role may fill (through a
# grant or a function), bounded by its table. Characters for names, keys and messages; bytes
# (octet_length; pg_column_size, the stored form, for JSON and arrays) for chunk text and
# documents' data.
BOUNDS = [
    ("models", "provider", "length", 64),
    ("models", "model_id", "length", 200),
    ("models", "model_version", "length", 64),
    ("models", "model_key", "length", 400),
    ("models", "description", "length", 1000),
    ("corpora", "description", "length", 1000),
    ("corpora", "index_settings", "pg_column_size", 1024),
    ("documents", "title", "length", 1000),
    ("documents", "metadata", "pg_column_size", 65536),
    ("documents", "content_hash", "length", 64),
    ("chunks", "content", "octet_length", 1048576),
    ("chunks", "metadata", "pg_column_size", 65536),
    ("chunks", "content_hash", "length", 64),
    ("eval_queries", "query_id", "length", 512),
    ("eval_queries", "query", "length", 10000),
    ("eval_queries", "relevant", "pg_column_size", 65536),
    ("query_log", "kind", "length", 32),
    ("query_log", "model_key", "length", 400),
    ("queue", "model_key", "length", 400),
    ("queue", "content_hash", "length", 64),
    ("queue", "last_error", "length", 2000),
    ("queue_failed", "model_key", "length", 400),
    ("queue_failed", "content_hash", "length", 64),
    ("queue_failed", "reason", "length", 2000),
    ("vectors", "model_key", "length", 400),
    ("vectors", "content_hash", "length", 64),
    ("embedding_cache", "model_key", "length", 400),
    ("cache_stats", "model_key", "length", 400),
    ("usage", "model_key", "length", 400),
    ("rerank_cache", "reranker", "length", 200),
    ("recall_samples", "filter", "pg_column_size", 65536),
    ("migrations", "validation", "pg_column_size", 1048576),
    ("migration_events", "step", "length", 64),
    ("migration_events", "detail", "pg_column_size", 1048576),
    ("provider_error_counters", "provider", "length", 64),
    ("secrets", "value", "length", 4096),
]


def _bounds_sql(add: bool) -> str:
    return "\n".join(
        f"ALTER TABLE pyembed.{t} ADD CONSTRAINT {t}_{c}_bound CHECK ({f}({c}) <= {n});" if add
        else f"ALTER TABLE pyembed.{t} DROP CONSTRAINT IF EXISTS {t}_{c}_bound;"
        for t, c, f, n in BOUNDS)


# As sql/008-tenancy.sql and sql/065-tenants.sql had them before this revision.
MEMBERS_BEFORE = r"""
CREATE OR REPLACE FUNCTION pyembed._session_tenant() RETURNS TABLE (tenant_id integer)
LANGUAGE sql STABLE
AS $$
  SELECT CASE WHEN coalesce(current_setting('pyembed.act_as_tenant', true), '') <> ''
               AND pyembed._session_is_superuser()
              THEN (SELECT t.tenant_id FROM pyembed.tenants t
                     WHERE t.name = current_setting('pyembed.act_as_tenant', true))
              ELSE (SELECT m.tenant_id FROM pyembed.tenant_members m
                     WHERE m.role_name = session_user) END
$$;

CREATE OR REPLACE FUNCTION pyembed._member_is_a_role() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname = NEW.role_name) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('no role %s: create the login first (pyembed tenant add-member TENANT ROLE '
                       '--password ...)', NEW.role_name);
  END IF;
  RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER tenant_members_role
  BEFORE INSERT OR UPDATE OF role_name ON pyembed.tenant_members
  FOR EACH ROW EXECUTE FUNCTION pyembed._member_is_a_role();
"""
