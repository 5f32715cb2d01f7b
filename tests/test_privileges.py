"""What each role may do with each table, view, column, sequence and the schema: recorded in
tests/golden/privileges.txt beside the function list, so that a grant changes only on purpose.
The application role gets the least its documented operations need."""

from __future__ import annotations

from typing import Any

import psycopg

from tests.helpers import assert_matches_golden

ROLES = ("pyembed_app", "public")

# has_*_privilege for each role and privilege; a column is listed where the role has a
# privilege on it that it lacks on its table.
INVENTORY = """
SELECT format('schema pyembed | %%s | %%s', r, coalesce(string_agg(p, ', ' ORDER BY p), '-'))
  FROM unnest(%(roles)s::text[]) r
  LEFT JOIN unnest(ARRAY['CREATE', 'USAGE']) p ON has_schema_privilege(r, 'pyembed', p)
 GROUP BY r
UNION ALL
SELECT format('%%s %%s | %%s | %%s', CASE c.relkind WHEN 'v' THEN 'view' WHEN 'S' THEN 'sequence'
              ELSE 'table' END, c.relname, r, coalesce(string_agg(p, ', ' ORDER BY p), '-'))
  FROM pg_class c CROSS JOIN unnest(%(roles)s::text[]) r
  LEFT JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES',
                         'TRIGGER', 'USAGE']) p
    ON CASE WHEN c.relkind = 'S' THEN p IN ('SELECT', 'UPDATE', 'USAGE')
                                      AND has_sequence_privilege(r, c.oid, p)
            ELSE p <> 'USAGE' AND has_table_privilege(r, c.oid, p) END
 WHERE c.relnamespace = 'pyembed'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'S')
   AND NOT c.relispartition
 GROUP BY c.relkind, c.relname, r
UNION ALL
SELECT format('column %%s.%%s | %%s | %%s', c.relname, a.attname, r, string_agg(p, ', ' ORDER BY p))
  FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
   AND NOT a.attisdropped
  CROSS JOIN unnest(%(roles)s::text[]) r
  JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'REFERENCES']) p
    ON has_column_privilege(r, c.oid, a.attnum, p) AND NOT has_table_privilege(r, c.oid, p)
 WHERE c.relnamespace = 'pyembed'::regnamespace AND c.relkind IN ('r', 'p', 'v')
   AND NOT c.relispartition
 GROUP BY c.relname, a.attname, r
"""


def privileges(conn: psycopg.Connection[Any]) -> list[str]:
    return sorted(r[0] for r in conn.execute(INVENTORY, {"roles": list(ROLES)}).fetchall())


def test_privileges_match_the_golden_file(owner: psycopg.Connection[Any]) -> None:
    lines = privileges(owner)
    # Rules that hold whatever the golden file says.
    assert not [line for line in lines if "| public |" in line and not line.endswith("| -")]
    for table in ("embedding_cache", "cache_stats", "usage", "rerank_cache", "secrets",
                  "tenants", "tenant_members"):
        assert f"table {table} | pyembed_app | -" in lines, table
    assert not [line for line in lines if line.startswith("column vectors.embedding | pyembed_app")
                and "SELECT" in line]
    assert "table vectors | pyembed_app | DELETE, INSERT" in lines  # and no SELECT of embeddings
    assert_matches_golden("privileges.txt", lines, "tests/test_privileges.py")


def test_the_app_role_writes_no_identity_column(owner: psycopg.Connection[Any]) -> None:
    """Numbers the database gives (identity columns) are never the writer's: with INSERT ...
    OVERRIDING SYSTEM VALUE or UPDATE ... SET col = DEFAULT the application role could take
    numbers the sequence hands out later (a primary key every tenant's writes need) or renumber
    rows that other tables' rows refer to."""
    writable = owner.execute(
        "SELECT c.relname || '.' || a.attname || ' ' || p FROM pg_class c "
        "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attidentity <> '' "
        "CROSS JOIN unnest(ARRAY['INSERT', 'UPDATE']) p "
        "WHERE c.relnamespace = 'pyembed'::regnamespace AND c.relkind IN ('r', 'p') "
        "AND has_column_privilege('pyembed_app', c.oid, a.attnum, p) ORDER BY 1").fetchall()
    assert writable == []


WRITTEN_BY_THE_APPLICATION = {"documents", "chunks", "eval_queries", "queue", "queue_failed",
                              "vectors"}
"""The tables the application role writes with its own statements (its documents and their
chunks, vectors and queued work; its evaluation queries). Every other table (the records of what
happened: query log, usage, caches and their counts, recall samples and measurements, migration
events; and the registry, corpora, tenants) is written only by the database's own functions."""


def test_no_other_table_is_writable_by_the_app_role(owner: psycopg.Connection[Any]) -> None:
    """Walks every table of the schema, a new one included: a recording table the application
    role could write would let a tenant write its own log lines, figures or numbers."""
    writable = owner.execute(
        "SELECT DISTINCT c.relname FROM pg_class c "
        "CROSS JOIN unnest(ARRAY['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) p "
        "WHERE c.relnamespace = 'pyembed'::regnamespace AND c.relkind IN ('r', 'p') "
        "AND NOT c.relispartition AND (has_table_privilege('pyembed_app', c.oid, p) "
        "OR (p IN ('INSERT', 'UPDATE') AND EXISTS (SELECT FROM pg_attribute a "
        "WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
        "AND has_column_privilege('pyembed_app', c.oid, a.attnum, p)))) ORDER BY 1").fetchall()
    assert {r[0] for r in writable} - WRITTEN_BY_THE_APPLICATION == set()
    sequences = owner.execute(
        "SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'pyembed'::regnamespace "
        "AND c.relkind = 'S' AND (has_sequence_privilege('pyembed_app', c.oid, 'USAGE') "
        "OR has_sequence_privilege('pyembed_app', c.oid, 'UPDATE')) ORDER BY 1").fetchall()
    assert [r[0] for r in sequences] == ["chunks_chunk_id_seq"]
