"""Usage, cache statistics and cache entries are written without waiting for another session.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04

Both tables were upserted on (tenant, corpus, model, minute) and (tenant, day, model): an
in-database embed() locked the usage row before its provider call and kept the lock until its
transaction ended, so a hung call blocked every other call of the same tenant, model and
minute, and two calls that locked the usage row and the statistics row in opposite orders
deadlocked. Each call now inserts rows of its own; readers sum them. Counts cannot be negative.
Cache entries lose their primary key for the same reason: a store of a key that another
session had stored but not committed waited for that session (its unique-index check); now
both rows stay, lookups take the newest, and a later store of the key removes older ones.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql("""
ALTER TABLE pyembed.embedding_cache DROP CONSTRAINT embedding_cache_pkey;
CREATE INDEX embedding_cache_key ON pyembed.embedding_cache (tenant_id, cache_key);
ALTER TABLE pyembed.usage DROP CONSTRAINT usage_pkey;
ALTER TABLE pyembed.usage
  ADD CONSTRAINT usage_counts_not_negative CHECK (requests >= 0 AND tokens >= 0 AND cost_usd >= 0);
CREATE INDEX usage_tenant_minute ON pyembed.usage (tenant_id, minute);
ALTER TABLE pyembed.cache_stats DROP CONSTRAINT cache_stats_pkey;
ALTER TABLE pyembed.cache_stats
  ADD CONSTRAINT cache_stats_counts_not_negative CHECK (hits >= 0 AND misses >= 0);
CREATE INDEX cache_stats_tenant_day ON pyembed.cache_stats (tenant_id, day);
""")


def downgrade() -> None:
    run_sql("""
DELETE FROM pyembed.embedding_cache e USING pyembed.embedding_cache newer
 WHERE newer.tenant_id = e.tenant_id AND newer.cache_key = e.cache_key
   AND (newer.created_at, newer.ctid) > (e.created_at, e.ctid);
DROP INDEX pyembed.embedding_cache_key;
ALTER TABLE pyembed.embedding_cache ADD PRIMARY KEY (tenant_id, cache_key);
DROP INDEX pyembed.cache_stats_tenant_day;
ALTER TABLE pyembed.cache_stats DROP CONSTRAINT cache_stats_counts_not_negative;
CREATE TEMPORARY TABLE cache_stats_sum ON COMMIT DROP AS
  SELECT tenant_id, day, model_key, sum(hits)::bigint AS hits, sum(misses)::bigint AS misses
    FROM pyembed.cache_stats GROUP BY 1, 2, 3;
DELETE FROM pyembed.cache_stats;
INSERT INTO pyembed.cache_stats (tenant_id, day, model_key, hits, misses)
  SELECT tenant_id, day, model_key, hits, misses FROM cache_stats_sum;
ALTER TABLE pyembed.cache_stats ADD PRIMARY KEY (tenant_id, day, model_key);
DROP INDEX pyembed.usage_tenant_minute;
ALTER TABLE pyembed.usage DROP CONSTRAINT usage_counts_not_negative;
CREATE TEMPORARY TABLE usage_sum ON COMMIT DROP AS
  SELECT tenant_id, corpus_id, model_key, minute, sum(requests)::integer AS requests,
         sum(tokens)::bigint AS tokens, sum(cost_usd) AS cost_usd
    FROM pyembed.usage GROUP BY 1, 2, 3, 4;
DELETE FROM pyembed.usage;
INSERT INTO pyembed.usage (tenant_id, corpus_id, model_key, minute, requests, tokens, cost_usd)
  SELECT tenant_id, corpus_id, model_key, minute, requests, tokens, cost_usd FROM usage_sum;
ALTER TABLE pyembed.usage ADD PRIMARY KEY (tenant_id, corpus_id, model_key, minute);
""")
