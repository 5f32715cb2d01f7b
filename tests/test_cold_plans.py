"""The write path's kept plans on a new database: a corpus's first documents are written while
pyembed's tables have no statistics yet, and PL/pgSQL keeps the plans it made then for the rest
of the session (a whole first ingest). The per-row and per-block lookups must use their whole
primary keys whatever the planner's estimates: with a join or a plain range instead, the planner
chose an index on (corpus_id, id) and read every document of the corpus for each vector, or
every term of 512 documents for each posting block.

The plans come from auto_explain, loaded for the test's database and sent to the client as
notices, for the application role's own session.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import sql

import pyembed

FAKE = "fake/fake-hash@1:384"

# statement text -> the index its plan must read, and the ones it must not
EXPECTED = {
    "SELECT string_agg(int2send((p.doc_no": ("document_postings_pkey", "document_postings_doc"),
    "SELECT string_agg(int2send((p.chunk_id": ("postings_pkey", "postings_chunk"),
    "NEW.doc_no :=": ("documents_pkey", "documents_doc_no"),
}


@pytest.fixture
def explained(db: Any, owner: psycopg.Connection[Any]) -> Any:
    """The test database with every statement's plan sent to its clients (nested ones too)."""
    for name, value in (("session_preload_libraries", "auto_explain"),
                        ("auto_explain.log_min_duration", "0"),
                        ("auto_explain.log_nested_statements", "on"),
                        ("auto_explain.log_level", "notice")):
        owner.execute(sql.SQL("ALTER DATABASE {} SET {} = {}").format(
            sql.Identifier(db.name), sql.Identifier(*name.split(".")), sql.Literal(value)))
    # No statistics for the whole test, as in a first ingest: on a slow machine autovacuum's
    # ANALYZE of a few rows came first, and a seq scan of three pages is then the right plan.
    for (table,) in owner.execute("SELECT relname FROM pg_catalog.pg_class WHERE relkind = 'r' "
                                  "AND relnamespace = 'pyembed'::regnamespace").fetchall():
        owner.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = false)").format(
            sql.Identifier("pyembed", table)))
    return db


def test_first_ingest_reads_by_primary_keys(explained: Any) -> None:
    plans: list[str] = []
    with pyembed.connect(explained.app_dsn) as client:
        kb = client.create_corpus("cold", FAKE, chunk_tokens=24, chunk_overlap=0)
        client.conn.add_notice_handler(lambda d: plans.append(d.message_primary or ""))
        for batch in range(3):  # several statements: PL/pgSQL's sixth call plans generically
            # new documents, then the same with other words: a block that a transaction deleted
            # postings from is rebuilt from the postings (new postings alone are appended)
            for words in (40, 30):
                kb.add([{"id": f"d{batch}-{i}",
                         "text": " ".join(f"term{(i * 7 + j) % 50} word{j % 13} common"
                                          for j in range(words))}
                        for i in range(30)])
    seen = dict.fromkeys(EXPECTED, 0)
    for plan in plans:
        for statement, (wanted, unwanted) in EXPECTED.items():
            text = plan.split("Query Text:", 1)[-1].lstrip(" (")
            if "Query Text:" in plan and text.startswith(statement):
                seen[statement] += 1
                assert wanted in plan and unwanted not in plan, plan
    assert all(n > 5 for n in seen.values()), seen  # each statement was planned and checked
