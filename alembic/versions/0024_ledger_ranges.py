"""A ledger row counts what one call can: reports over the ledgers add rows up without overflow.

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-05

The application role writes pyembed.usage (pyembed.reserve_usage: tokens a bigint) and
pyembed.cache_stats (pyembed.cache_count: hits and misses bigints), and registers models with a
price (pyembed.register_model: any finite numeric). Two usage rows of 9,223,372,036,854,775,807
tokens, two cache counts of as many hits, or one token of a model priced 1e400 a million made
pyembed.usage_report and cache_report fail with "bigint out of range" (or float overflow) for
the tenant and for the owner, whose report adds up every tenant's rows: `pyembed usage`,
`pyembed cache stats`, `pyembed status` and the metrics exporter failed for everyone. Each row
now counts at most 2,147,483,647 tokens, hits or misses (a sum overflows only past 2^32 rows)
and a price is at most 1,000,000 USD a million tokens. Rows already stored outside these
ranges are no call's and are deleted; such a price is cleared (NULL: not priced), as revision
0019 does for a price that is not a finite number.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0024"
down_revision: str | Sequence[str] | None = "0023"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MOST = 2147483647
MOST_PRICE = 1000000


def upgrade() -> None:
    run_sql(f"""
DELETE FROM pyembed.usage WHERE tokens > {MOST};
ALTER TABLE pyembed.usage ADD CONSTRAINT usage_tokens_in_range CHECK (tokens <= {MOST});
DELETE FROM pyembed.cache_stats WHERE hits > {MOST} OR misses > {MOST};
ALTER TABLE pyembed.cache_stats
  ADD CONSTRAINT cache_stats_counts_in_range CHECK (hits <= {MOST} AND misses <= {MOST});
UPDATE pyembed.models SET price_per_mtok = NULL WHERE price_per_mtok > {MOST_PRICE};
ALTER TABLE pyembed.models
  ADD CONSTRAINT models_price_in_range CHECK (price_per_mtok <= {MOST_PRICE});
""")


def downgrade() -> None:
    run_sql("""
ALTER TABLE pyembed.usage DROP CONSTRAINT IF EXISTS usage_tokens_in_range;
ALTER TABLE pyembed.cache_stats DROP CONSTRAINT IF EXISTS cache_stats_counts_in_range;
ALTER TABLE pyembed.models DROP CONSTRAINT IF EXISTS models_price_in_range;
""")
