"""A corpus's index settings (m, ef_construction, ef_search, oversample) are checked by its table;
a recall sample's filter is a JSON object, as a search's.

Revision ID: 0030
Revises: 0029
Create Date: 2026-12-05

corpora.index_settings was checked only in pyembed.set_index_settings: the owner (or a DBA)
writing the column directly stored an unknown key or an m of 1000, which the next rebuild or
search then used. The rule is now pyembed._index_settings_problem, an IMMUTABLE function whose
answer a CHECK of the table (corpora_index_settings_known, through _index_settings_valid) and
set_index_settings both give as the error (PE005), so SQL, Python and the CLI say the same.
Both functions are defined here, not in sql/: replacing one would change what the CHECK holds
without checking the stored rows again; a new rule is a new revision. recall_samples.filter,
a search's filter recorded for a recall measurement, took any jsonb: it is now NULL or an
object (recall_samples_filter_object). A database holding a row either CHECK refuses stops the
upgrade before any change, naming the rows (pyembed.schema.refuse_rows).
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import refuse_rows, run_sql

revision: str = "0030"
down_revision: str | Sequence[str] | None = "0029"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FUNCTIONS = r"""
-- What is wrong with a corpus's index settings (the owner's overrides of pyembed.hnsw_rule), in
-- the words pyembed gives for it; NULL when nothing is. Each key is one of the rule's settings
-- with an integer in its range, and an ef_construction given with m is at least twice it
-- (pgvector's rule; set_index_settings checks it against the rule's values too).
CREATE OR REPLACE FUNCTION pyembed._index_settings_problem(settings jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  kv record;
  lo integer;
  hi integer;
BEGIN
  IF settings IS NULL THEN
    RETURN NULL;  -- (the column's NOT NULL says so)
  END IF;
  IF jsonb_typeof(settings) <> 'object' THEN
    RETURN 'index settings are a JSON object: {"m": 16, "ef_construction": 64, '
           '"ef_search": 100, "oversample": 10}';
  END IF;
  FOR kv IN SELECT * FROM jsonb_each(settings) ORDER BY key LOOP
    SELECT b[1], b[2] INTO lo, hi FROM (SELECT CASE kv.key
      WHEN 'm' THEN ARRAY[2, 100] WHEN 'ef_construction' THEN ARRAY[4, 1000]
      WHEN 'ef_search' THEN ARRAY[1, 1000] WHEN 'oversample' THEN ARRAY[1, 100] END AS b) s;
    IF lo IS NULL THEN
      RETURN format('unknown index setting %s: use m, ef_construction, ef_search or oversample',
                    quote_literal(left(kv.key, 40)));
    END IF;
    IF jsonb_typeof(kv.value) <> 'number' THEN
      RETURN format('index setting %s must be an integer %s..%s, got %s', kv.key, lo, hi,
                    left(kv.value::text, 40));
    END IF;
    IF kv.value::numeric <> trunc(kv.value::numeric)
       OR kv.value::numeric NOT BETWEEN lo AND hi THEN
      RETURN format('index setting %s must be an integer %s..%s, got %s', kv.key, lo, hi,
                    left(kv.value::text, 40));
    END IF;
  END LOOP;
  IF (settings->>'ef_construction')::numeric < 2 * (settings->>'m')::numeric THEN
    RETURN 'ef_construction must be at least twice m';
  END IF;
  RETURN NULL;
END
$$;

-- True, or PE005 saying what is wrong with the settings (_index_settings_problem): the CHECK
-- corpora_index_settings_known, so that a direct write is refused in the words
-- set_index_settings uses.
CREATE OR REPLACE FUNCTION pyembed._index_settings_valid(settings jsonb) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  problem text := pyembed._index_settings_problem(settings);
BEGIN
  IF problem IS NOT NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005', MESSAGE = problem;
  END IF;
  RETURN true;
END
$$;
"""


def upgrade() -> None:
    run_sql(FUNCTIONS)
    refuse_rows(revision, [
        ("corpora", "name", "pyembed._index_settings_problem(index_settings)"),
        ("recall_samples", "sample_id",
         "CASE WHEN jsonb_typeof(filter) <> 'object' THEN 'filter is a JSON ' "
         "|| jsonb_typeof(filter) || ', not an object' END")],
        "Correct each (pyembed.set_index_settings(corpus, settings) with a JSON null for a "
        "key sets it back to the rule; a recall sample may be deleted)")
    run_sql("""
ALTER TABLE pyembed.corpora ADD CONSTRAINT corpora_index_settings_known
  CHECK (pyembed._index_settings_valid(index_settings));
ALTER TABLE pyembed.recall_samples ADD CONSTRAINT recall_samples_filter_object
  CHECK (jsonb_typeof(filter) = 'object');""")


def downgrade() -> None:
    run_sql("""
ALTER TABLE pyembed.recall_samples DROP CONSTRAINT recall_samples_filter_object;
ALTER TABLE pyembed.corpora DROP CONSTRAINT corpora_index_settings_known;""")
    # The functions stay: pyembed.set_index_settings, as sql/ installed it, calls them.
