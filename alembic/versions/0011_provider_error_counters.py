"""Failed provider calls are counted in sequences, which a rollback does not undo.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04

A provider call that fails inside the database (pyembed.embed, search_text) aborts its
transaction, and a row recording the failure would be rolled back with it: 429s and 5xx
storms were invisible. Each (provider, kind of failure) gets a sequence, advanced once per
failed call by pyembed.count_provider_error; nextval survives the rollback. The sequences
are made per provider by sql/065-tenants.sql (for every provider in pyembed.models, and for
each new provider by a trigger); this table says which sequence counts what.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql("""
CREATE TABLE pyembed.provider_error_counters (
  provider text NOT NULL,
  kind     text NOT NULL CHECK (kind IN ('rate_limited', 'server_error', 'no_response',
                                         'rejected', 'bad_answer')),
  counter  regclass NOT NULL UNIQUE,
  PRIMARY KEY (provider, kind)
);
ALTER TABLE pyembed.provider_error_counters OWNER TO pyembed_owner;
""")


def downgrade() -> None:
    run_sql("""
DROP TRIGGER IF EXISTS models_error_counters ON pyembed.models;
DROP FUNCTION IF EXISTS pyembed._models_error_counters();
DROP FUNCTION IF EXISTS pyembed._ensure_error_counters(text);
DROP FUNCTION IF EXISTS pyembed.count_provider_error(text, text);
DROP FUNCTION IF EXISTS pyembed.provider_errors();
DO $$
DECLARE
  s regclass;
BEGIN
  FOR s IN SELECT counter FROM pyembed.provider_error_counters LOOP
    EXECUTE format('DROP SEQUENCE %s', s);
  END LOOP;
END
$$;
DROP TABLE pyembed.provider_error_counters;
""")
