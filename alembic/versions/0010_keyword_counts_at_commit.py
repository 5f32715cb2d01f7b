"""Keyword counters change at commit, in one order: concurrent writers neither wait long nor deadlock.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04

The document frequencies (lexeme_stats) and corpus totals (keyword_stats) were updated by every
statement that wrote chunks, and their rows stayed locked until the writer's transaction ended:
writers of a corpus queued behind each other for whole transactions, and two transactions that
wrote several statements of chunks (or two corpora) in crossing orders deadlocked. Each
statement now records its counts in keyword_pending (no row shared with anyone); a deferred
trigger folds the transaction's counts into the counters at commit, sorted by corpus and lexeme.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql("""
CREATE TABLE pyembed.keyword_pending (
  xact      xid8 NOT NULL DEFAULT pg_current_xact_id(),
  corpus_id integer NOT NULL,
  lexemes   text[] NOT NULL,
  dfs       integer[] NOT NULL,
  chunks    bigint NOT NULL,
  total_len bigint NOT NULL
);
CREATE INDEX keyword_pending_xact ON pyembed.keyword_pending (xact);
ALTER TABLE pyembed.keyword_pending OWNER TO pyembed_owner;
-- The function is in sql/060-keyword.sql; a constraint trigger cannot be replaced in place.
CREATE FUNCTION pyembed._apply_keyword_counts() RETURNS trigger LANGUAGE plpgsql
  AS $$ BEGIN RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER keyword_pending_apply AFTER INSERT ON pyembed.keyword_pending
  DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW EXECUTE FUNCTION pyembed._apply_keyword_counts();
""")


# As sql/060-keyword.sql had it before this revision (the postings triggers call it).
COUNT_POSTINGS = """
CREATE OR REPLACE FUNCTION pyembed._count_postings() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO pyembed.lexeme_stats AS s (corpus_id, lexeme, df)
    SELECT corpus_id, lexeme, count(*) FROM new_rows
     GROUP BY corpus_id, lexeme ORDER BY corpus_id, lexeme
    ON CONFLICT (corpus_id, lexeme) DO UPDATE SET df = s.df + EXCLUDED.df;
    INSERT INTO pyembed.keyword_stats AS s (corpus_id, chunks, total_len)
    SELECT corpus_id, count(DISTINCT chunk_id), sum(tf) FROM new_rows GROUP BY corpus_id
    ON CONFLICT (corpus_id) DO UPDATE
      SET chunks = s.chunks + EXCLUDED.chunks, total_len = s.total_len + EXCLUDED.total_len;
  ELSE
    UPDATE pyembed.lexeme_stats s SET df = s.df - d.n
      FROM (SELECT corpus_id, lexeme, count(*) AS n FROM old_rows GROUP BY 1, 2
             ORDER BY 1, 2) d
     WHERE s.corpus_id = d.corpus_id AND s.lexeme = d.lexeme;
    UPDATE pyembed.keyword_stats s SET chunks = s.chunks - d.chunks,
           total_len = s.total_len - d.total_len
      FROM (SELECT corpus_id, count(DISTINCT chunk_id) AS chunks, sum(tf) AS total_len
              FROM old_rows GROUP BY corpus_id) d
     WHERE s.corpus_id = d.corpus_id;
  END IF;
  RETURN NULL;
END
$$;

"""


def downgrade() -> None:
    run_sql(COUNT_POSTINGS)
    run_sql("""
DROP TABLE pyembed.keyword_pending;
DROP FUNCTION pyembed._apply_keyword_counts();
""")
