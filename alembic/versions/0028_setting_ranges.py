"""Every integer setting stored in a row has a range its table checks.

Revision ID: 0028
Revises: 0027
Create Date: 2026-12-05

corpora.chunk_tokens had no upper bound (3000000000 was refused only as past PostgreSQL's
integer), nor had a model's batch and token bounds, its requested dimensions or a tenant's
limits. Each now has a CHECK named <table>_<column>_in_range, which replaces the lower bound
alone (<table>_<column>_check); pyembed._setting_range reads the range from it, so that the
SQL functions, Python and the CLI name the same rule. A database holding a value out of its
range stops the upgrade before any change, naming the rows (pyembed.schema.refuse_rows).
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import refuse_rows, run_sql

revision: str = "0028"
down_revision: str | Sequence[str] | None = "0027"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RANGES = (
    # table, column, lowest, highest, the CHECK this replaces (its condition)
    ("corpora", "chunk_tokens", 1, 100_000, "chunk_tokens > 0"),
    ("corpora", "chunk_overlap", 0, 99_999, "chunk_overlap >= 0"),
    ("models", "max_batch", 1, 100_000, "max_batch > 0"),
    ("models", "max_tokens", 1, 10_000_000, "max_tokens > 0"),
    ("models", "request_dimensions", 1, 16_000, "request_dimensions > 0"),
    ("tenants", "requests_per_minute", 1, 100_000_000, "requests_per_minute > 0"),
    ("tenants", "tokens_per_minute", 1, 2_000_000_000, "tokens_per_minute > 0"),
)


KEYS = {"corpora": "name", "models": "model_key", "tenants": "name"}
"""What names a row of each table in the message of a refused upgrade."""


def upgrade() -> None:
    refuse_rows(revision, [
        (table, KEYS[table], f"CASE WHEN {column} NOT BETWEEN {low} AND {high} THEN "
                             f"'{column} ' || {column} || ' is not in {low}..{high}' END")
        for table, column, low, high, _ in RANGES],
        "Set each to a value in its range (UPDATE pyembed.<table> SET <column> = ... WHERE ...)")
    run_sql("\n".join(
        f"ALTER TABLE pyembed.{table} DROP CONSTRAINT {table}_{column}_check, "
        f"ADD CONSTRAINT {table}_{column}_in_range CHECK ({column} BETWEEN {low} AND {high});"
        for table, column, low, high, _ in RANGES))


def downgrade() -> None:
    run_sql("\n".join(
        f"ALTER TABLE pyembed.{table} DROP CONSTRAINT {table}_{column}_in_range, "
        f"ADD CONSTRAINT {table}_{column}_check CHECK ({before});"
        for table, column, _, _, before in RANGES))
