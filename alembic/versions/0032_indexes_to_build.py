"""The corpora whose index a bulk load deferred, in a table of their own: the chunks' heal
trigger looks only there.

Revision ID: 0032
Revises: 0031
Create Date: 2026-12-05

pyembed.begin_bulk_load drops the index of an empty corpus for a load to build at its end; the
statement trigger on chunks (pyembed._chunks_written_index) builds it at a later write when the
load never ended. It looked up every written corpus's index by name on every chunk INSERT, and
for a corpus whose storage has no index for its model's width it called the heal on every
statement. begin_bulk_load now records the corpus in pyembed.indexes_to_build, which the heal
empties once the index is there (or cannot be): a write to any other corpus reads one empty
table. Only functions running as the owner read or write it (no grant), and row-level security
keeps them to the caller's tenant's corpora, as every table of corpus rows.

Whether a load is at work was a shared advisory lock keyed by the corpus id, and builders were
kept in turn by an exclusive one: every role may take any advisory lock, so another tenant (or any
login role) holding that key hid a killed load's missing index and kept every write from building
it, or made begin_bulk_load fail. A loader is now recorded in pyembed.bulk_loaders (its pid and a
random lock key only this table tells; at work while that pid holds that key), and builders lock
the corpus's indexes_to_build row, which only the owner's functions can. A migration's backfill
(pyembed.migration.backfill) is likewise recorded in pyembed.backfillers instead of holding
hashtext('pyembed backfill') with the corpus id, which any role could hold to keep every backfill
of the corpus from starting.

A corpus left without its index before this revision (a load killed under the previous code) is
recorded by sql/022-vector-index.sql, which runs after the revisions (the functions it needs are
its own).
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0032"
down_revision: str | Sequence[str] | None = "0031"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql("""
CREATE TABLE pyembed.indexes_to_build (
  corpus_id integer PRIMARY KEY REFERENCES pyembed.corpora (corpus_id) ON DELETE CASCADE
);
CREATE TABLE pyembed.bulk_loaders (
  corpus_id integer NOT NULL REFERENCES pyembed.corpora (corpus_id) ON DELETE CASCADE,
  pid integer NOT NULL,
  lock_id bigint NOT NULL,
  PRIMARY KEY (corpus_id, pid, lock_id)
);
CREATE TABLE pyembed.backfillers (
  corpus_id integer PRIMARY KEY REFERENCES pyembed.corpora (corpus_id) ON DELETE CASCADE,
  pid integer NOT NULL,
  lock_id bigint NOT NULL
);
""")
    for table in ("indexes_to_build", "bulk_loaders", "backfillers"):
        run_sql(f"""
ALTER TABLE pyembed.{table} OWNER TO pyembed_owner;
REVOKE ALL ON pyembed.{table} FROM PUBLIC;
ALTER TABLE pyembed.{table} ENABLE ROW LEVEL SECURITY;
ALTER TABLE pyembed.{table} FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant ON pyembed.{table}
  USING (corpus_id IN (SELECT unnest(pyembed.visible_corpora())));
""")


# The functions that use the table, as they were before it (sql/022-vector-index.sql at 0030):
# a database downgraded past this revision keeps loading and writing.
BEFORE = r"""
CREATE OR REPLACE FUNCTION pyembed.begin_bulk_load(corpus text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '5s'
AS $$
DECLARE
  c pyembed.corpora := pyembed.lookup_corpus(corpus);
  name text;
  has_rows boolean;
BEGIN
  -- The row before the partition (the lock order at the top of this file): a concurrent
  -- loader's first write waits here until this drop has committed, or comes first and is seen.
  c := pyembed._lock_corpus(c.corpus_id);
  IF c.target_model_key IS NOT NULL THEN
    RETURN false;  -- a migration's steps build and swap indexes of their own
  END IF;
  name := pyembed._index_name(c.corpus_id, c.model_key);
  IF to_regclass(format('pyembed.%I', name)) IS NOT NULL THEN
    EXECUTE format('SELECT EXISTS (SELECT FROM pyembed.%I WHERE model_key = $1)',
                   pyembed._vector_partition_name(c.corpus_id)) INTO has_rows USING c.model_key;
    IF has_rows THEN
      RETURN false;
    END IF;
    EXECUTE format('DROP INDEX pyembed.%I', name);
  ELSIF NOT pyembed._indexable(c) THEN
    RETURN false;  -- the storage has no index for this width: nothing to build
  END IF;
  -- No index (dropped now, or by a loader still at work or gone): this load builds it at its end.
  PERFORM pg_advisory_lock_shared(pyembed._bulk_load_lock(), c.corpus_id);
  RETURN true;
END
$$;

CREATE OR REPLACE FUNCTION pyembed._bulk_loading(p_corpus_id integer,
                                                 this_session boolean DEFAULT false)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT EXISTS (SELECT FROM pg_catalog.pg_locks l
                  WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.granted
                    AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d
                                       WHERE d.datname = pg_catalog.current_database())
                    AND l.mode = 'ShareLock' AND l.classid::bigint = pyembed._bulk_load_lock()
                    AND l.objid::bigint = p_corpus_id
                    AND (NOT this_session OR l.pid = pg_catalog.pg_backend_pid()))
$$;

CREATE OR REPLACE FUNCTION pyembed.end_bulk_load(corpus text) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora := pyembed.lookup_corpus(corpus);
BEGIN
  IF pyembed._bulk_loading(c.corpus_id, true) THEN
    PERFORM pg_advisory_unlock_shared(pyembed._bulk_load_lock(), c.corpus_id);
  END IF;
  RETURN pyembed._heal_vector_index(c.corpus_id);
END
$$;

CREATE OR REPLACE FUNCTION pyembed._heal_vector_index(p_corpus_id integer) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora;
  name text;
BEGIN
  SELECT * INTO c FROM pyembed.corpora co WHERE co.corpus_id = p_corpus_id;
  IF NOT FOUND OR c.target_model_key IS NOT NULL  -- a migration builds its own
     OR NOT p_corpus_id = ANY (pyembed.visible_corpora()) THEN
    RETURN NULL;
  END IF;
  name := pyembed._index_name(p_corpus_id, c.model_key);
  IF to_regclass(format('pyembed.%I', name)) IS NOT NULL
     OR NOT pyembed._indexable(c)
     -- A loader at work, this session's included (its refused batches are written here)
     OR pyembed._bulk_loading(p_corpus_id)
     OR NOT pg_try_advisory_xact_lock(pyembed._bulk_load_lock(), p_corpus_id) THEN
    RETURN NULL;
  END IF;
  IF to_regclass(format('pyembed.%I', name)) IS NOT NULL THEN
    RETURN NULL;  -- built by a transaction that committed while this one looked
  END IF;
  RETURN pyembed._create_vector_index(p_corpus_id, c.model_key);
END
$$;

CREATE OR REPLACE FUNCTION pyembed._chunks_written_index() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  r record;
BEGIN
  FOR r IN SELECT co.corpus_id FROM pyembed.corpora co
            WHERE co.corpus_id IN (SELECT DISTINCT n.corpus_id FROM new_rows n)
              AND to_regclass(format('pyembed.%I', pyembed._index_name(co.corpus_id,
                                                                        co.model_key))) IS NULL
  LOOP
    PERFORM pyembed._heal_vector_index(r.corpus_id);
  END LOOP;
  RETURN NULL;
END
$$;
"""


def downgrade() -> None:
    run_sql(BEFORE + """
DROP TABLE pyembed.backfillers;
DROP TABLE pyembed.bulk_loaders;
DROP TABLE pyembed.indexes_to_build;
""")
