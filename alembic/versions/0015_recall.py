"""Recall measured from real searches: sampled query vectors waiting to be re-run exactly, and
the recall@10 each measurement found.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-04

A search records a sample of its query (pyembed._sample_recall, at the rate
pyembed.recall_sample_rate) on the primary, in the call that records the search; `pyembed
worker` (pyembed.recall_sampled) and `pyembed recall` (pyembed.measure_recall) re-run queries
through the guarded search and by exact distance order, and add one row per measurement:
measurements are never updated, so sessions never share a row. Both tables are the owner's:
the application role reads them through pyembed.recall_report and the health view.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0015"
down_revision: str | Sequence[str] | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql("""
CREATE TABLE pyembed.recall_samples (
  sample_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  corpus_id  integer NOT NULL REFERENCES pyembed.corpora ON DELETE CASCADE,
  model_key  text NOT NULL REFERENCES pyembed.models,
  embedding  vector NOT NULL,
  filter     jsonb,
  sampled_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX recall_samples_corpus ON pyembed.recall_samples (corpus_id);
CREATE TABLE pyembed.recall_measurements (
  measured_at  timestamptz NOT NULL DEFAULT now(),
  corpus_id    integer NOT NULL REFERENCES pyembed.corpora ON DELETE CASCADE,
  model_key    text NOT NULL REFERENCES pyembed.models,
  source       text NOT NULL CHECK (source IN ('sampled', 'on demand')),
  queries      integer NOT NULL CHECK (queries > 0),
  recall_at_10 float8 NOT NULL CHECK (recall_at_10 BETWEEN 0 AND 1)
);
CREATE INDEX recall_measurements_corpus
  ON pyembed.recall_measurements (corpus_id, model_key, measured_at);
""")
    for table in ("recall_samples", "recall_measurements"):
        run_sql(f"""
ALTER TABLE pyembed.{table} ENABLE ROW LEVEL SECURITY;
ALTER TABLE pyembed.{table} FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant ON pyembed.{table}
  USING (corpus_id IN (SELECT unnest(pyembed.visible_corpora())));
ALTER TABLE pyembed.{table} OWNER TO pyembed_owner;
""")


def downgrade() -> None:
    run_sql("""
DROP VIEW IF EXISTS pyembed.recall_health;
DROP FUNCTION IF EXISTS pyembed.recall_report(integer);
DROP FUNCTION IF EXISTS pyembed.recall_sampled(integer);
DROP FUNCTION IF EXISTS pyembed.measure_recall(text, integer);
DROP FUNCTION IF EXISTS pyembed._record_recall(integer, text, text, integer, float8);
DROP FUNCTION IF EXISTS pyembed._recall_at_10(text, integer, text, vector, jsonb);
DROP FUNCTION IF EXISTS pyembed._sample_recall(integer, text, vector, jsonb);
DROP TABLE pyembed.recall_measurements, pyembed.recall_samples;
""")
    # head's record_search samples recall through a function dropped above: the same function
    # without that statement keeps searches working until an older pyembed reinstalls its own.
    # (pyembed._record_search holds record_search's writes now; record_search itself did before.)
    run_sql(r"""
DO $unsample$
DECLARE
  def text := pg_catalog.pg_get_functiondef(coalesce(
    pg_catalog.to_regproc('pyembed._record_search'), 'pyembed.record_search'::regproc));
  sample text := '\n\s*IF v IS NOT NULL AND p_model_key IS NOT NULL THEN\s*'
                 'PERFORM pyembed._sample_recall\([^;]*\);\s*END IF;';
BEGIN
  IF def !~ sample THEN
    RAISE EXCEPTION 'record_search no longer samples recall as this downgrade expects';
  END IF;
  EXECUTE pg_catalog.regexp_replace(def, sample, '');
END
$unsample$;
""")
