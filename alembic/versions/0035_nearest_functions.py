"""A corpus's own vector leg per key: its downgrade (the upgrade is sql/'s).

Revision ID: 0035
Revises: 0034
Create Date: 2026-12-06

Each corpus has a function of its own for each key it serves (pyembed._nearest_c<id>_<md5 of
key>: the search's statement with the corpus's partition, key and index expression as literals,
whose plans PL/pgSQL keeps for the session), made from sql/025-nearest.sql's template by a
trigger on pyembed.corpora and by every install (sql/095-vector-partitions.sql). Nothing here to
upgrade: sql/ makes them. The downgrade drops the trigger, the functions made from the corpora
and the functions that make them, which read columns earlier revisions drop (storage,
target_storage: revision 0013); the search then finds no function of the corpus's and reads it
by its dynamic statement, as before this revision.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0035"
down_revision: str | Sequence[str] | None = "0034"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    run_sql(r"""
DROP TRIGGER IF EXISTS corpora_nearest_functions ON pyembed.corpora;
DROP FUNCTION IF EXISTS pyembed._corpus_nearest_changed();
DO $drop$
DECLARE
  f regprocedure;
BEGIN
  FOR f IN SELECT p.oid FROM pg_catalog.pg_proc p
            WHERE p.pronamespace = 'pyembed'::regnamespace
              AND p.proname ~ '^_nearest_c[0-9]+_[0-9a-f]{32}$' LOOP
    EXECUTE format('DROP FUNCTION %s', f);
  END LOOP;
END
$drop$;
DROP FUNCTION IF EXISTS pyembed._nearest_functions_problems();
DROP FUNCTION IF EXISTS pyembed._nearest_functions(integer);
DROP FUNCTION IF EXISTS pyembed._nearest_function_ok(text, text);
DROP FUNCTION IF EXISTS pyembed._nearest_function_body(integer, text, text);
DROP FUNCTION IF EXISTS pyembed._drop_nearest_function(text);
""")
