"""Vectors partitioned by corpus: one partition per corpus, written by binary COPY.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01

PostgreSQL refuses COPY FROM into a table with row-level security, which made every bulk
vector load stage its rows and move them with INSERT ... SELECT (0.23x the speed of a plain
binary COPY). pyembed.vectors is now partitioned by corpus_id: reads, updates and deletes go
through the parent, where row-level security stays forced; the application role may only
INSERT (COPY) into a corpus's partition, where statement triggers check the tenant, the chunks
and the queue, and a per-partition CHECK constraint checks key, dimensions and norm row by row
(sql/010-guards.sql). A corpus's HNSW indexes live on its partition, and dropping a corpus drops
its partition instead of deleting its rows.

Upgrading moves every vector and rebuilds the HNSW indexes of existing corpora (minutes for
millions of vectors); search is unavailable while the revision runs.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = """
  corpus_id    integer NOT NULL,
  chunk_id     bigint NOT NULL,
  model_key    text NOT NULL,
  embedding    vector NOT NULL,
  content_hash bytea,
  created_at   timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (corpus_id, chunk_id, model_key)"""

POLICY = """
ALTER TABLE pyembed.vectors ENABLE ROW LEVEL SECURITY;
ALTER TABLE pyembed.vectors FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant ON pyembed.vectors
  USING (corpus_id IN (SELECT unnest(pyembed.visible_corpora())));
ALTER TABLE pyembed.vectors OWNER TO pyembed_owner;
"""

# The HNSW indexes the corpora have (found by their names), kept in a temporary table while the
# old vectors table is dropped, then built again on the new one by rebuild_indexes: `table` is
# a format() pattern for the indexed table, `predicate` the index predicate with its arguments.
SAVE_INDEXES = """
CREATE TEMP TABLE pyembed_indexes ON COMMIT DROP AS
SELECT c.corpus_id, k.key, m.dimensions, m.distance,
       format('vectors_hnsw_c%s_%s', c.corpus_id, left(md5(k.key), 10)) AS name
  FROM pyembed.corpora c
  CROSS JOIN LATERAL unnest(ARRAY[c.model_key, c.target_model_key]) AS k(key)
  JOIN pyembed.models m ON m.model_key = k.key
 WHERE EXISTS (SELECT FROM pg_catalog.pg_class i
                WHERE i.relnamespace = 'pyembed'::regnamespace
                  AND i.relname = format('vectors_hnsw_c%s_%s', c.corpus_id, left(md5(k.key), 10)));
"""


def rebuild_indexes(table: str, predicate: str, predicate_args: str) -> str:
    return f"""
DO $rebuild$
DECLARE
  i record;
  t text;
BEGIN
  FOR i IN SELECT * FROM pg_temp.pyembed_indexes LOOP
    t := CASE WHEN i.dimensions <= 2000 THEN 'vector' ELSE 'halfvec' END;
    EXECUTE format('CREATE INDEX %I ON pyembed.%I USING hnsw ((embedding::%s(%s)) %s) '
                   'WITH (m = 16, ef_construction = 64) WHERE {predicate}',
                   i.name, format('{table}', i.corpus_id), t, i.dimensions,
                   t || CASE i.distance WHEN 'cosine' THEN '_cosine_ops'
                                        WHEN 'dot' THEN '_ip_ops' ELSE '_l2_ops' END,
                   {predicate_args});
  END LOOP;
END $rebuild$;
"""


def upgrade() -> None:
    run_sql(f"""
ALTER TABLE pyembed.vectors RENAME TO vectors_unpartitioned;
ALTER INDEX pyembed.vectors_pkey RENAME TO vectors_unpartitioned_pkey;
CREATE TABLE pyembed.vectors ({COLUMNS}
) PARTITION BY LIST (corpus_id);
{POLICY}
DO $partitions$
DECLARE
  c integer;
BEGIN
  FOR c IN SELECT corpus_id FROM pyembed.corpora ORDER BY corpus_id LOOP
    EXECUTE format('CREATE TABLE pyembed.%I PARTITION OF pyembed.vectors FOR VALUES IN (%s)',
                   'vectors_c' || c, c);
    EXECUTE format('ALTER TABLE pyembed.%I OWNER TO pyembed_owner', 'vectors_c' || c);
  END LOOP;
END $partitions$;
INSERT INTO pyembed.vectors (corpus_id, chunk_id, model_key, embedding, content_hash, created_at)
SELECT v.corpus_id, v.chunk_id, v.model_key, v.embedding, v.content_hash, v.created_at
  FROM pyembed.vectors_unpartitioned v
 WHERE v.corpus_id IN (SELECT corpus_id FROM pyembed.corpora);
{SAVE_INDEXES}
DROP TABLE pyembed.vectors_unpartitioned CASCADE;
DROP FUNCTION pyembed._dims_match(vector, text);
""")
    run_sql(rebuild_indexes("vectors_c%s", "model_key = %L", "i.key"))


def downgrade() -> None:
    run_sql(f"""
CREATE FUNCTION pyembed._dims_match(embedding vector, model_key text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
  IF vector_dims(embedding) = split_part(model_key, ':', -1)::integer THEN
    RETURN true;
  END IF;
  RAISE EXCEPTION USING ERRCODE = 'PE003',
    MESSAGE = format('wrong dimensions: %s has %s dimensions, the vector has %s',
                     model_key, split_part(model_key, ':', -1), vector_dims(embedding));
END
$$;
ALTER TABLE pyembed.vectors RENAME TO vectors_partitioned;
ALTER INDEX pyembed.vectors_pkey RENAME TO vectors_partitioned_pkey;
CREATE TABLE pyembed.vectors ({COLUMNS},
  CONSTRAINT vectors_dims_match_model
    CHECK (vector_dims(embedding) = split_part(model_key, ':', -1)::integer
           OR pyembed._dims_match(embedding, model_key))
);
{POLICY}
INSERT INTO pyembed.vectors (corpus_id, chunk_id, model_key, embedding, content_hash, created_at)
SELECT corpus_id, chunk_id, model_key, embedding, content_hash, created_at
  FROM pyembed.vectors_partitioned;
{SAVE_INDEXES}
DROP TABLE pyembed.vectors_partitioned CASCADE;
""")
    run_sql(rebuild_indexes("vectors", "corpus_id = %s AND model_key = %L", "i.corpus_id, i.key"))
