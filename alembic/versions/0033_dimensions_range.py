"""A model's dimensions are a setting with a range, as max_batch and max_tokens are.

Revision ID: 0033
Revises: 0032
Create Date: 2026-12-06

models.dimensions' CHECK (1..16000) was named models_dimensions_check, so pyembed._check_setting
could not read its range: pyembed.register_model and pyembed.hnsw_rule took dimensions as
integer, and a number past integer typed in psql failed as "function ... does not exist". The
CHECK is now models_dimensions_in_range (the name pyembed._setting_range reads), the one place
the range is written; both functions take numeric and ask _check_setting.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0033"
down_revision: str | Sequence[str] | None = "0032"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql("ALTER TABLE pyembed.models RENAME CONSTRAINT models_dimensions_check "
            "TO models_dimensions_in_range;")


def downgrade() -> None:
    run_sql("ALTER TABLE pyembed.models RENAME CONSTRAINT models_dimensions_in_range "
            "TO models_dimensions_check;")
