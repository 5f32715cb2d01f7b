"""A document's and a chunk's metadata is a JSON object, in the tables.

Revision ID: 0029
Revises: 0028
Create Date: 2026-12-05

`Corpus.add`, `pyembed ingest` and `pyembed.add_document` refuse metadata that is not a JSON
object, but pyembed.documents and pyembed.chunks, which the application role INSERTs into
directly, took any jsonb: an array or a string was stored and came back from every search as
a hit's metadata, which Python's Hit, the CLI and `ask` read as a mapping. The rule is now each
table's CHECK, named for it (pyembed.db.ROW_CHECKS has its message).
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0029"
down_revision: str | Sequence[str] | None = "0028"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("documents", "chunks")


def upgrade() -> None:
    run_sql("\n".join(
        f"ALTER TABLE pyembed.{table} ADD CONSTRAINT {table}_metadata_object "
        f"CHECK (jsonb_typeof(metadata) = 'object');"
        for table in TABLES))


def downgrade() -> None:
    run_sql("\n".join(
        f"ALTER TABLE pyembed.{table} DROP CONSTRAINT {table}_metadata_object;"
        for table in TABLES))
