"""A model's price is a price: 0 or more and finite.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-04

Usage costs are tokens times pyembed.models.price_per_mtok (pyembed.reserve_usage), and any role
that may register a model (the application role among them, through pyembed.register_model)
could give a new key a negative, NaN or infinite price: its calls then cost less than nothing
or NaN in the usage ledger, and `pyembed usage --json` wrote NaN. `price < 'Infinity'` also
refuses NaN (PostgreSQL orders NaN above every number). A price already stored that is not one
becomes NULL (no price known), as a model registered without one has.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0019"
down_revision: str | Sequence[str] | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql("""
UPDATE pyembed.models SET price_per_mtok = NULL
 WHERE NOT (price_per_mtok >= 0 AND price_per_mtok < 'Infinity');
ALTER TABLE pyembed.models ADD CONSTRAINT models_price_per_mtok_check
  CHECK (price_per_mtok >= 0 AND price_per_mtok < 'Infinity');
""")


def downgrade() -> None:
    run_sql("ALTER TABLE pyembed.models DROP CONSTRAINT IF EXISTS models_price_per_mtok_check;")
