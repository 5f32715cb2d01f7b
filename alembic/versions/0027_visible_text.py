"""Empty text is text of whitespace, control and format characters alone, in every table.

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-05

chunks.content and eval_queries.query were checked with `~ '\\S'`: a text of control characters
(ESC, BEL) or format characters (zero-width spaces) had one, and was stored, embedded and
searched as if it were text. Their CHECKs now need a character outside pyembed.text.INVISIBLE
(Unicode's whitespace, Cc and Cf), the ranges the package and the SQL functions check queries
with; the constraints keep their names.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0027"
down_revision: str | Sequence[str] | None = "0026"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VISIBLE = (r"'[^\x01-\x20\x7f-\xa0\xad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u1680"
           r"\u180e\u2000-\u200f\u2028-\u202f\u205f-\u2064\u2066-\u206f\u3000\ufeff"
           r"\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U00013438\U0001bca0-\U0001bca3"
           r"\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]'")
"""A character that is not in pyembed.text.INVISIBLE, as this revision wrote it (the constant
may change later; a revision's DDL may not)."""
CHECKS = (("chunks", "content"), ("eval_queries", "query"))


def upgrade() -> None:
    run_sql("\n".join(
        f"ALTER TABLE pyembed.{table} DROP CONSTRAINT {table}_{column}_check, "
        f"ADD CONSTRAINT {table}_{column}_check CHECK ({column} ~ {VISIBLE});"
        for table, column in CHECKS))


def downgrade() -> None:
    run_sql("\n".join(
        f"ALTER TABLE pyembed.{table} DROP CONSTRAINT {table}_{column}_check, "
        f"ADD CONSTRAINT {table}_{column}_check CHECK ({column} ~ '\\S');"
        for table, column in CHECKS))
