"""pyembed._index_plan is one SQL expression the planner inlines into its caller's statement.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-04

Every search called pyembed._index_plan (PL/pgSQL) from pyembed._nearest_in, and on
PostgreSQL 15 each nested PL/pgSQL call is set up again in every transaction. As a SQL function
whose body is one row expression it is inlined instead (sql/020-corpora.sql), which a function
returning `record` (OUT parameters) never is: it returns the composite type
pyembed._index_rules, the same columns. The old function goes here; sql/ creates the new one.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0019"
down_revision: str | Sequence[str] | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql("""
DROP FUNCTION IF EXISTS pyembed._index_plan(integer, text, text, jsonb, bigint);
CREATE TYPE pyembed._index_rules AS (
  expr text, opclass text, op text, castto text, exact text,
  m integer, ef_construction integer, ef_search integer, oversample integer);
""")


def downgrade() -> None:
    run_sql(f"""
DROP FUNCTION pyembed._index_plan(integer, text, text, jsonb, bigint);
DROP FUNCTION pyembed._index_type(integer, text);
DROP TYPE pyembed._index_rules;
{BEFORE}
""")


# As sql/020-corpora.sql had it before this revision.
BEFORE = r"""
CREATE OR REPLACE FUNCTION pyembed._index_plan(dims integer, distance text, storage text,
  settings jsonb, rows bigint,
  OUT expr text, OUT opclass text, OUT op text, OUT castto text, OUT exact text,
  OUT m integer, OUT ef_construction integer, OUT ef_search integer, OUT oversample integer)
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
  t text := CASE storage WHEN 'binary' THEN 'bit' WHEN 'halfvec' THEN 'halfvec'
                         ELSE CASE WHEN dims <= 2000 THEN 'vector' ELSE 'halfvec' END END;
BEGIN
  op := CASE distance WHEN 'cosine' THEN '<=>' WHEN 'dot' THEN '<#>' ELSE '<->' END;
  exact := 'embedding ' || op;
  castto := format('%s(%s)', t, dims);
  IF t = 'bit' THEN
    expr := CASE WHEN dims <= 64000 THEN format('(binary_quantize(embedding)::bit(%s))', dims) END;
    opclass := 'bit_hamming_ops';
    op := '<~>';
  ELSE
    expr := CASE WHEN dims <= 4000 THEN format('(embedding::%s(%s))', t, dims) END;
    opclass := t || CASE distance WHEN 'cosine' THEN '_cosine_ops' WHEN 'dot' THEN '_ip_ops'
                                  ELSE '_l2_ops' END;
  END IF;
  IF rows < 200000 THEN
    m := 16; ef_construction := 64; ef_search := 100;
  ELSIF rows < 2000000 THEN
    m := 24; ef_construction := 128; ef_search := 300;
  ELSE
    m := 32; ef_construction := 200; ef_search := 500;
  END IF;
  oversample := CASE WHEN dims < 768 THEN 60 WHEN dims < 1536 THEN 20 ELSE 10 END;
  m := coalesce((settings ->> 'm')::integer, m);
  ef_construction := coalesce((settings ->> 'ef_construction')::integer, ef_construction);
  ef_search := coalesce((settings ->> 'ef_search')::integer, ef_search);
  oversample := coalesce((settings ->> 'oversample')::integer, oversample);
END
$$;
"""
