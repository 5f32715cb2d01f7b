"""API keys for the in-database functions, readable only by the owner.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql("""
CREATE TABLE pyembed.secrets (
  name       text PRIMARY KEY CHECK (name ~ '^[A-Z][A-Z0-9_]{0,62}$'),
  value      text NOT NULL CHECK (value <> ''),
  updated_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON pyembed.secrets FROM PUBLIC;
""")


def downgrade() -> None:
    run_sql("DROP FUNCTION IF EXISTS pyembed.set_secret(text, text); DROP TABLE pyembed.secrets;")
