"""A migration's validation report and a migration event's detail are JSON objects, in the tables.

Revision ID: 0031
Revises: 0030
Create Date: 2026-12-05

pyembed.migrations.validation (the report pyembed.migration_validated stores) and
pyembed.migration_events.detail (what each step logs) had a size bound (0022) but took any jsonb,
where every other JSON column is an object by its table's CHECK (0029, 0030): a report given to
pyembed.migration_validated as an array, a string or a number was stored as the validation and
logged as the step's detail. Now each is an object (validation may stay NULL: no validation
yet), and a value that is not one is refused (InvalidInput in Python, naming the rule). A
database holding a row either CHECK refuses stops the upgrade before any change, naming the
rows (pyembed.schema.refuse_rows).
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import refuse_rows, run_sql

revision: str = "0031"
down_revision: str | Sequence[str] | None = "0030"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OBJECTS = [("migrations", "validation", "migration_id"),
           ("migration_events", "detail", "event_id")]
"""(table, JSON column, the key refuse_rows names a row by)."""


def upgrade() -> None:
    refuse_rows(revision, [
        (table, key, f"CASE WHEN jsonb_typeof({column}) <> 'object' THEN '{column} is a JSON ' "
                     f"|| jsonb_typeof({column}) || ', not an object' END")
        for table, column, key in OBJECTS],
        "Make each a JSON object (UPDATE ... SET validation = jsonb_build_object('report', "
        "validation), and alike for detail)")
    run_sql("\n".join(
        f"ALTER TABLE pyembed.{table} ADD CONSTRAINT {table}_{column}_object "
        f"CHECK (jsonb_typeof({column}) = 'object');"
        for table, column, _ in OBJECTS))


def downgrade() -> None:
    run_sql("\n".join(
        f"ALTER TABLE pyembed.{table} DROP CONSTRAINT {table}_{column}_object;"
        for table, column, _ in OBJECTS))
