"""The rerank cache: a reranker's score for a (query, candidate text) pair, per tenant.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04

Keyed like the embedding cache (sha256 of the stripped query, the stripped candidate text and
the reranker's identity, with the tenant), append-only for the same reason (revision 0009: a
store never waits for another session's uncommitted row). Row-level security is forced and the
table belongs to pyembed_owner; the application role reaches it only through the functions in
sql/057-rerank.sql.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0014"
down_revision: str | Sequence[str] | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql("""
CREATE TABLE pyembed.rerank_cache (
  tenant_id  integer NOT NULL DEFAULT 0,
  cache_key  bytea NOT NULL CHECK (length(cache_key) = 32),
  reranker   text NOT NULL CHECK (reranker ~ '^[a-z0-9-]+/[A-Za-z0-9._-]+$'),
  score      double precision NOT NULL
             CHECK (score <> 'NaN' AND score > '-Infinity' AND score < 'Infinity'),
  created_at timestamptz NOT NULL DEFAULT now(),
  expires_at timestamptz
);
CREATE INDEX rerank_cache_key ON pyembed.rerank_cache (tenant_id, cache_key);
CREATE INDEX rerank_cache_reranker ON pyembed.rerank_cache (reranker);
ALTER TABLE pyembed.rerank_cache ENABLE ROW LEVEL SECURITY;
ALTER TABLE pyembed.rerank_cache FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant ON pyembed.rerank_cache
  USING (tenant_id = coalesce((SELECT pyembed.current_tenant()), 0))
  WITH CHECK (tenant_id = coalesce((SELECT pyembed.current_tenant()), 0));
ALTER TABLE pyembed.rerank_cache OWNER TO pyembed_owner;
REVOKE ALL ON pyembed.rerank_cache FROM PUBLIC;
""")


def downgrade() -> None:
    run_sql("""
DROP FUNCTION IF EXISTS
  pyembed.search_reranked(text, text, text, integer, jsonb, text, integer, text, text, float8),
  pyembed._search_reranked(text, text, text, integer, jsonb, text, integer, text, text, float8),
  pyembed.rerank_cache_get(bytea[]), pyembed.rerank_cache_put(bytea[], text, float8[], float8),
  pyembed.rerank_cache_purge(text, boolean);
DROP TABLE pyembed.rerank_cache;
""")
    run_sql(CACHE_REPORT)


# As sql/055-cache.sql had it before this revision (it counts rerank entries since).
CACHE_REPORT = """
CREATE OR REPLACE FUNCTION pyembed.cache_report(days integer DEFAULT 30)
RETURNS TABLE (day date, model_key text, hits bigint, misses bigint, entries bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  tid integer := coalesce(pyembed.current_tenant(), 0);
BEGIN
  RETURN QUERY
  SELECT s.day, s.model_key, sum(s.hits)::bigint, sum(s.misses)::bigint,
         (SELECT count(DISTINCT e.cache_key) FROM pyembed.embedding_cache e
           WHERE e.tenant_id = tid AND e.model_key = s.model_key)
    FROM pyembed.cache_stats s
   WHERE s.tenant_id = tid AND s.day > current_date - days
   GROUP BY s.day, s.model_key
   ORDER BY s.day DESC, s.model_key;
END
$$;
"""
