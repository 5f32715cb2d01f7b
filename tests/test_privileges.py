"""What each role may do with each table, view, column, sequence and the schema: recorded in
tests/golden/privileges.txt beside the function list, so that a grant changes only on purpose.
The application role gets the least its documented operations need."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql

import pyembed
from pyembed import doctor, index, migration, tenants
from pyembed.client import Client
from pyembed.db import GRANTED_TO, translate
from pyembed.localdb import WORKER_USER
from tests.conftest import Database
from tests.helpers import (
    assert_matches_golden,
    called_functions,
    function_bodies,
    login_role,
    sql_error,
)
from tests.test_cli import pyembed as pyembed_cli
from tests.test_hardening import SERVER_OWNED
from tests.test_migration import NEW, OLD
from tests.test_tenants import two  # noqa: F401  (the fixture: two tenants' DSNs)

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
    # Vectors are written into each corpus's partition (pyembed._partition_writers), the
    # parent takes none: its INSERT let a tenant LOCK every partition ROW EXCLUSIVE.
    assert "table vectors | pyembed_app | -" in lines
    assert_matches_golden("privileges.txt", lines, "tests/test_privileges.py")


def test_no_role_but_the_tables_owner_may_lock_a_table_in_every_mode(
        owner: psycopg.Connection[Any]) -> None:
    """Walks every relation of the schema (partitions included) and every role but superusers,
    the tables' owner role and the predefined roles (whose members are walked: the application
    and worker groups, every tenant's and worker's login, PUBLIC, a new one included): none
    holds a table-level UPDATE, DELETE or TRUNCATE, with which PostgreSQL lets a role LOCK the
    table in any mode, and every table is every tenant's. Before, pyembed_app held DELETE on
    documents, chunks, vectors and queue_failed and UPDATE and DELETE on eval_queries
    (test_tenants' lock test shows what that did)."""
    rows = owner.execute(
        "SELECT r.rolname, c.relname, p FROM pg_roles r CROSS JOIN pg_class c "
        "CROSS JOIN unnest(ARRAY['UPDATE', 'DELETE', 'TRUNCATE']) p "
        "WHERE c.relnamespace = 'pyembed'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'f') "
        "AND NOT r.rolsuper AND r.rolname <> 'pyembed_owner' AND r.rolname !~ '^pg_' "
        "AND has_table_privilege(r.oid, c.oid, p) "
        "UNION ALL SELECT 'public', c.relname, p FROM pg_class c "
        "CROSS JOIN unnest(ARRAY['UPDATE', 'DELETE', 'TRUNCATE']) p "
        "WHERE c.relnamespace = 'pyembed'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'f') "
        "AND has_table_privilege('public', c.oid, p) ORDER BY 1, 2, 3").fetchall()
    assert rows == []


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
chunks, vectors and queued work; its evaluation queries). The queue's: a chunk's write queues
its work (pyembed._enqueue_chunks, as its owner: the application role inserts no job), a
vector's write dequeues it (_dequeue_written), and `pyembed worker` runs as a tenant's login,
which claims, renews, retries and releases jobs (pyembed.claim_jobs, renew_jobs, retry_jobs,
release_jobs: no UPDATE on queue), dequeues and fails them (pyembed.fail_job, expire_jobs: no
INSERT or UPDATE on queue_failed); row-level security
keeps each of these to the tenant's corpora
(test_every_table_the_app_role_writes_keeps_each_tenant_to_its_own_rows below).
Every other table (the records of what happened: query log, usage, caches and their counts,
recall samples and measurements, migration events; and the registry, corpora, tenants) is
written only by the database's own functions."""


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
    assert [r[0] for r in sequences] == []  # identities need no USAGE to insert


APP_COLUMN_WRITES = {
    # Every column the application role may write with its own INSERT or UPDATE (by its
    # table's grant or its own; a partition's under its parent's name), and why: the caller's
    # own value (row-level security keeps it to its tenant's rows; no invariant depends on it),
    # or "server's:" a value a trigger sets whatever the writer gives (checked, column by column,
    # by test_hardening's test_a_column_the_server_owns_keeps_the_servers_value).
    "documents.corpus_id INSERT": "checked by the tenant's policy (its own corpora)",
    "documents.document_id INSERT": "the caller's own name for its document",
    "documents.document_id UPDATE": "as INSERT",
    "documents.content_hash INSERT": "whether the caller's next add skips the document: its own",
    "documents.content_hash UPDATE": "as INSERT",
    "documents.title INSERT": "the caller's text",
    "documents.title UPDATE": "as INSERT",
    "documents.metadata INSERT": "the caller's metadata (filters match its own rows)",
    "documents.metadata UPDATE": "as INSERT",
    "chunks.corpus_id INSERT": "checked by the tenant's policy (its own corpora)",
    "chunks.document_id INSERT": "a document of the same corpus (foreign key)",
    "chunks.document_id UPDATE": "as INSERT",
    "chunks.chunk_index INSERT": "the caller's order of its chunks",
    "chunks.chunk_index UPDATE": "as INSERT",
    "chunks.content INSERT": "the caller's text; postings and the queue follow it (triggers)",
    "chunks.content UPDATE": "as INSERT",
    "chunks.content_hash INSERT": "server's: computed again from the text (pyembed._chunk_hash)",
    "chunks.content_hash UPDATE": "server's: as INSERT",
    "chunks.metadata INSERT": "the caller's metadata",
    "chunks.metadata UPDATE": "as INSERT",
    "eval_queries.corpus_id INSERT": "checked by the tenant's policy (its own corpora)",
    "eval_queries.query_id INSERT": "the caller's own evaluation queries, read only by its "
                                    "evaluations",
    "eval_queries.query_id UPDATE": "as INSERT",
    "eval_queries.query INSERT": "as query_id",
    "eval_queries.query UPDATE": "as INSERT",
    "eval_queries.relevant INSERT": "as query_id",
    "eval_queries.relevant UPDATE": "as INSERT",
    "vectors.corpus_id INSERT": "checked by the tenant's policy and the partition's trigger",
    "vectors.chunk_id INSERT": "a chunk of the corpus (pyembed._vectors_written)",
    "vectors.model_key INSERT": "checked by the guard triggers (key, dimensions, norm)",
    "vectors.embedding INSERT": "as model_key",
    "vectors.content_hash INSERT": "the text the writer embedded, written with its embedding "
                                   "(no UPDATE: a vector is replaced whole)",
    "vectors.created_at INSERT": "server's: pyembed._vector_document sets it",
    "vectors.doc_no INSERT": "server's: pyembed._vector_document sets it from the chunk",
}
"""Not here, on purpose: queue.attempts, not_before and last_error (the worker's claim, renewal,
retry and release go through pyembed.claim_jobs etc.: attempts decide expiry, last_error is the
failure recorded); documents.updated_at (pyembed._document_stamped); any UPDATE of a vector (its
text hash and time came apart from its embedding); identity columns
(test_the_app_role_writes_no_identity_column)."""

APP_DELETES: dict[str, str] = {
    # Every table the application role may DELETE from, and why: none. A table-level DELETE (as
    # UPDATE or TRUNCATE) lets a role LOCK the table in any mode, and every table is every
    # tenant's (test_tenants' test_a_tenant_can_lock_no_table_more_than_its_own_rows_...): rows
    # are deleted through pyembed.delete_documents, delete_chunks, delete_failures,
    # delete_eval_queries and _clear_vectors (APP_WRITERS).
}
"""Not here, on purpose: queue (a job ends with its vector's write or its chunk's deletion, as
pyembed's own functions run them: a job the caller deleted was work dropped)."""

# Every (table, column, privilege) the application role holds on the tables and partitions of
# the schema, a partition under its parent's name.
APP_WRITES = """
SELECT coalesce(parent.relname, c.relname), a.attname, p
  FROM pg_class c
  LEFT JOIN pg_inherits i ON c.relispartition AND i.inhrelid = c.oid
  LEFT JOIN pg_class parent ON parent.oid = i.inhparent
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  CROSS JOIN unnest(ARRAY['INSERT', 'UPDATE']) p
 WHERE c.relnamespace = 'pyembed'::regnamespace AND c.relkind IN ('r', 'p')
   AND has_column_privilege('pyembed_app', c.oid, a.attnum, p)
UNION
SELECT coalesce(parent.relname, c.relname), NULL, 'DELETE'
  FROM pg_class c
  LEFT JOIN pg_inherits i ON c.relispartition AND i.inhrelid = c.oid
  LEFT JOIN pg_class parent ON parent.oid = i.inhparent
 WHERE c.relnamespace = 'pyembed'::regnamespace AND c.relkind IN ('r', 'p')
   AND (has_table_privilege('pyembed_app', c.oid, 'DELETE')
        OR has_table_privilege('pyembed_app', c.oid, 'TRUNCATE'))
"""


def test_every_column_the_app_role_writes_is_accounted_for(
        owner: psycopg.Connection[Any], app: psycopg.Connection[Any]) -> None:
    """Walks every column of every table and partition the application role may INSERT or
    UPDATE (by its table's grant or its own, a new column of a table it writes included) and
    every table it may DELETE from: each is in APP_COLUMN_WRITES or APP_DELETES with why. Before,
    it could UPDATE its jobs' attempts and last_error directly; and until stop 36 a vector's
    created_at and content_hash and a document's updated_at, and DELETE queued jobs."""
    owner.execute("SELECT pyembed.register_model('fake', 'fake-hash', '2', 384)")
    app.execute("SELECT pyembed.create_corpus('docs', 'fake/fake-hash@1:384')")
    rows = owner.execute(APP_WRITES).fetchall()
    written = {f"{table}.{column} {p}" for table, column, p in rows if p != "DELETE"}
    assert written == set(APP_COLUMN_WRITES)
    assert {table for table, _, p in rows if p == "DELETE"} == set(APP_DELETES)
    servers = {k.split()[0] for k, why in APP_COLUMN_WRITES.items() if why.startswith("server's")}
    assert servers <= set(SERVER_OWNED), servers - set(SERVER_OWNED)


def test_every_table_the_app_role_writes_keeps_each_tenant_to_its_own_rows(
        owner: psycopg.Connection[Any]) -> None:
    """Walks the tables the application role writes (the list above, checked against the
    catalogue there): each forces row-level security (its owner role is bound too) and has a
    policy for every command by tenant or by the tenant's corpora, which with no WITH CHECK of its
    own checks new rows by the same rule (test_tenants: a tenant cannot enqueue, retry, delete or
    fail another tenant's jobs)."""
    rows = owner.execute(
        "SELECT c.relname, c.relrowsecurity AND c.relforcerowsecurity, "
        "array_agg(p.polcmd::text || ':' || pg_get_expr(p.polqual, p.polrelid) || ':' || "
        "coalesce(pg_get_expr(p.polwithcheck, p.polrelid), '')) FILTER (WHERE p.oid IS NOT NULL) "
        "FROM pg_class c LEFT JOIN pg_policy p ON p.polrelid = c.oid "
        "WHERE c.relnamespace = 'pyembed'::regnamespace AND c.relname = ANY(%s) "
        "GROUP BY c.relname, c.relrowsecurity, c.relforcerowsecurity ORDER BY 1",
        (sorted(WRITTEN_BY_THE_APPLICATION),)).fetchall()
    assert {r[0] for r in rows} == WRITTEN_BY_THE_APPLICATION
    for table, forced, policies in rows:
        assert forced, table
        assert policies and len(policies) == 1, (table, policies)
        cmd, qual, check = policies[0].split(":", 2)
        assert cmd == "*", (table, cmd)  # ALL: SELECT, INSERT, UPDATE and DELETE
        assert "visible_corpora()" in qual or "current_tenant()" in qual, (table, qual)
        assert check in ("", qual), (table, check)


APP_WRITERS = {
    # A function that runs as its owner and writes, which the application role may call with
    # any arguments: what it writes, and what keeps a tenant to its own rows.
    "create_corpus": "a corpus of the caller's tenant",
    "drop_corpus": "a corpus of the caller's tenant (looked up by it), its rows and records",
    "add_document": "a document of a corpus of the caller's tenant (pyembed.lookup_corpus, by "
                    "its session user), its chunks and their jobs",
    "embed": "usage, cache and its counts of the caller's tenant; a failed provider call made "
             "with the operator's keys is counted (real, not the caller's figure)",
    "embed_batch": "as embed",
    "search_text": "as embed, and the search's record for a corpus of the caller's tenant",
    "search_reranked": "as search_text, and the tenant's rerank cache",
    "search_query": "as search_text",
    "search_embedded": "as search_text",
    "cache_put": "the embedding cache, the caller's tenant's rows, checked like a vector",
    "cache_count": "cache counts of the caller's tenant, never negative",
    "cache_purge": "the caller's tenant's cache entries",
    "rerank_cache_put": "the rerank cache, the caller's tenant's rows",
    "rerank_cache_purge": "the caller's tenant's rerank cache entries",
    "reserve_usage": "usage of the caller's tenant, for its own corpus, never negative",
    "reserve_query": "as reserve_usage",
    "fail_job": "queue_failed: a queued job of the caller's corpora, moved (the one way a "
                "failure row is written)",
    "expire_jobs": "as fail_job, for the caller's jobs out of attempts",
    "_dequeue_written": "the caller's corpora's jobs a vector write of its own satisfied "
                        "(called by the vectors' trigger)",
    "claim_jobs": "the lease and attempts of due jobs of the caller's corpora, one more each",
    "renew_jobs": "the lease of the caller's corpora's jobs as its claim left them",
    "retry_jobs": "the lease and last error of the caller's corpora's jobs as its claim left "
                  "them (the reason expire_jobs records)",
    "release_jobs": "the caller's corpora's jobs as its claim left them, that claim undone",
    "queue_by_tenant": "no row: reads the queue of each tenant acting_tenants() lets the caller "
                       "act for (its own but for an operator's login), acting for it, and sets "
                       "back the caller's pyembed.act_as_tenant",
    "hold_jobs": "no write: locks the caller's corpora's jobs as its claim left them, until "
                 "its vectors' write commits",
    "record_search": "the query log, for a corpus of the caller's tenant",
    "measure_recall": "recall measurements of a corpus of the caller's tenant, measured here",
    "recall_sampled": "the caller's tenant's recall samples, measured here",
    "begin_bulk_load": "the index of a corpus of the caller's tenant with no vectors for its "
                       "key, dropped (built again by the load's end or the next write)",
    "end_bulk_load": "the missing index of a corpus of the caller's tenant, built",
    "_clear_vectors": "the vectors of a corpus of the caller's tenant that copy_vectors writes "
                      "again (the application role holds no DELETE: it would LOCK the table)",
    "delete_documents": "documents of a corpus of the caller's tenant (pyembed.lookup_corpus), "
                        "their chunks, vectors, postings and jobs with them",
    "delete_chunks": "as delete_documents, chunks from an index on",
    "delete_failures": "failures of a corpus of the caller's tenant",
    "delete_eval_queries": "evaluation queries of a corpus of the caller's tenant",
}
"""Not here: pyembed.count_provider_error, whose counters every tenant and the metrics endpoint
read (any tenant could add any count): pyembed's own functions and pyembed_worker call it. Nor
pyembed.register_model: the registry's rows bind every tenant (below)."""


def test_no_function_of_the_app_roles_writes_a_row_every_tenant_shares(
        owner: psycopg.Connection[Any]) -> None:
    """Walks every table without a tenant's policy (rows every tenant reads or is bound by: the
    model registry, tenants, counters, a new one included) and every function the application
    role may execute: none writes such a table in its own statements (pyembed's own triggers and
    PL/Python calls excepted, which write what the caller's own rows make true). Before,
    pyembed.register_model let a tenant register a key (its price, batch and token bounds)
    before the operator did, for every tenant."""
    shared = {r[0] for r in owner.execute(
        "SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'pyembed'::regnamespace "
        "AND c.relkind IN ('r', 'p') AND NOT c.relispartition "
        "AND NOT EXISTS (SELECT FROM pg_policy p WHERE p.polrelid = c.oid)")}
    assert {"models", "tenants", "tenant_members", "secrets", "provider_error_counters"} <= shared
    functions = owner.execute(
        "SELECT p.proname, p.prosrc FROM pg_proc p WHERE p.pronamespace = 'pyembed'::regnamespace "
        "AND has_function_privilege('pyembed_app', p.oid, 'EXECUTE')").fetchall()
    written = re.compile(r"\b(?:INSERT\s+INTO|UPDATE|DELETE\s+FROM|TRUNCATE)\s+pyembed\.(\w+)",
                         re.IGNORECASE)
    writes = sorted((name, table) for name, src in functions
                    for table in written.findall(src) if table in shared)
    assert writes == []


WRITES = re.compile(r"\b(?:INSERT\s+INTO|UPDATE|DELETE\s+FROM|TRUNCATE)\s+pyembed\.(\w+)",
                    re.IGNORECASE)

SHARED_BY_TRIGGERS = {
    # A table without a tenant's policy that a trigger writes when a tenant writes, and what keeps
    # one tenant from another's rows there.
    "keyword_pending": "each writing transaction's posting counts, a row per statement keyed by "
                       "its own transaction id (xact): folded into the counters and deleted by "
                       "that transaction's commit (pyembed._apply_keyword_counts), read only by "
                       "its own searches; the application role has no privilege on it",
}


def _trigger_writes(owner: psycopg.Connection[Any]) -> dict[str, set[str]]:
    """The tables written, on a tenant's write, by the triggers it fires: from each table the
    application role writes (by its privileges, or through the functions it may execute), the
    triggers on it, the functions they call, the tables those write and their triggers in turn.
    Each table written, with the trigger functions that write it."""
    sources = function_bodies(owner)
    triggers: dict[str, set[str]] = {}
    for table, function in owner.execute(
            "SELECT c.relname, p.proname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "JOIN pg_proc p ON p.oid = t.tgfoid WHERE c.relnamespace = 'pyembed'::regnamespace "
            "AND NOT t.tgisinternal AND NOT c.relispartition").fetchall():
        triggers.setdefault(table, set()).add(function)

    app_functions = [r[0] for r in owner.execute(
        "SELECT p.proname FROM pg_proc p WHERE p.pronamespace = 'pyembed'::regnamespace "
        "AND has_function_privilege('pyembed_app', p.oid, 'EXECUTE')").fetchall()]
    todo = sorted(WRITTEN_BY_THE_APPLICATION | {t for f in app_functions for g in called_functions(sources, f)
                                                for t in WRITES.findall(sources[g])})
    written: dict[str, set[str]] = {}
    seen: set[str] = set()
    while todo:
        table = todo.pop()
        if table in seen:
            continue
        seen.add(table)
        for trigger in triggers.get(table, ()):
            for function in called_functions(sources, trigger):
                for target in WRITES.findall(sources[function]):
                    written.setdefault(target, set()).add(trigger)
                    todo.append(target)
    return written


def _shared_trigger_tables_open_to_the_app_role(owner: psycopg.Connection[Any]) -> list[str]:
    shared = {r[0] for r in owner.execute(
        "SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'pyembed'::regnamespace "
        "AND c.relkind IN ('r', 'p') AND NOT c.relispartition "
        "AND NOT EXISTS (SELECT FROM pg_policy p WHERE p.polrelid = c.oid)")}
    tables = sorted(set(_trigger_writes(owner)) & shared)
    assert tables == sorted(SHARED_BY_TRIGGERS)  # a new one must say what keeps tenants apart
    return [r[0] for r in owner.execute(
        "SELECT c.relname || ' ' || p FROM pg_class c CROSS JOIN unnest(ARRAY['SELECT', "
        "'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES', 'TRIGGER']) p "
        "WHERE c.oid = ANY (%s::regclass[]) AND CASE WHEN p IN ('SELECT', 'INSERT', 'UPDATE', "
        "'REFERENCES') THEN has_any_column_privilege('pyembed_app', c.oid, p) "
        "ELSE has_table_privilege('pyembed_app', c.oid, p) END ORDER BY 1",
        ([f"pyembed.{t}" for t in tables],)).fetchall()]


def test_every_shared_table_a_tenants_write_makes_a_trigger_write_is_closed_to_it(
        owner: psycopg.Connection[Any]) -> None:
    """Walks the triggers a tenant's writes fire (transitively, from the catalogue: pg_trigger,
    the functions they call, the tables those write): every table they write without a tenant's
    policy (keyword_pending, a new one included) is accounted for in SHARED_BY_TRIGGERS, and the
    application role has no privilege on it. The walk above covered only the functions the
    application role may execute, not the triggers its writes fire."""
    written = _trigger_writes(owner)
    assert {"postings", "keyword_pending", "queue"} <= set(written), written
    assert _shared_trigger_tables_open_to_the_app_role(owner) == []
    with owner.transaction(force_rollback=True):  # the walk sees a grant there
        owner.execute("GRANT SELECT ON pyembed.keyword_pending TO pyembed_app")
        assert _shared_trigger_tables_open_to_the_app_role(owner) == ["keyword_pending SELECT"]


def test_every_function_that_writes_as_its_owner_for_the_app_role_is_accounted_for(
        owner: psycopg.Connection[Any]) -> None:
    """Walks every SECURITY DEFINER function the application role may execute that may write
    (volatile), a new one included: each must say whose rows it writes and what keeps a tenant
    to its own. One that writes rows every tenant shares with the caller's arguments (the
    provider error counters) is no application role's."""
    writers = owner.execute(
        "SELECT p.proname FROM pg_proc p WHERE p.pronamespace = 'pyembed'::regnamespace "
        "AND p.prosecdef AND p.provolatile = 'v' "
        "AND has_function_privilege('pyembed_app', p.oid, 'EXECUTE') ORDER BY 1").fetchall()
    assert {r[0] for r in writers} == set(APP_WRITERS)


def test_the_worker_role_may_count_failed_calls_and_nothing_more(
        owner: psycopg.Connection[Any]) -> None:
    """pyembed_worker is what a worker's login adds to the application role's privileges."""
    extra = owner.execute(
        "SELECT p.oid::regprocedure::text FROM pg_proc p "
        "WHERE p.pronamespace = 'pyembed'::regnamespace "
        "AND has_function_privilege('pyembed_worker', p.oid, 'EXECUTE') "
        "AND NOT has_function_privilege('pyembed_app', p.oid, 'EXECUTE')").fetchall()
    assert [r[0] for r in extra] == ["pyembed.count_provider_error(text,text)"]
    tables = owner.execute(
        "SELECT c.relname FROM pg_class c CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', "
        "'DELETE']) p WHERE c.relnamespace = 'pyembed'::regnamespace "
        "AND c.relkind IN ('r', 'p', 'v', 'S') AND has_table_privilege('pyembed_worker', c.oid, p) "
        "AND NOT has_table_privilege('pyembed_app', c.oid, p)").fetchall()
    assert tables == []


def test_the_operators_logins_write_every_partition_and_nothing_more(
        owner: psycopg.Connection[Any], app: psycopg.Connection[Any], db: Database) -> None:
    """Each operator's login (a login in pyembed_operator, revision 0037, of no tenant) holds
    INSERT on each corpus's partition, every tenant's, where its worker writes acting for the
    job's tenant, and no other privilege; the group itself holds none (granted to the group, it
    reached a tenant's login granted pyembed_operator later); no login of the application's or
    a tenant's is in it (the local cluster's worker login alone). One made after the install
    writes once `pyembed install` runs again."""
    tenants.create_tenant(owner, "acme")
    with login_role(owner, app.info.dsn, "acme", sql.SQL("IN ROLE pyembed_app")) as dsn:
        tenants.add_member(owner, "acme", str(psycopg.conninfo.conninfo_to_dict(dsn)["user"]))
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pyembed.create_corpus('docs', 'fake/fake-hash@1:384')")
        row = app.execute("SELECT pyembed.create_corpus('docs', 'fake/fake-hash@1:384')"
                          ).fetchone()
        assert row is not None
        app_corpus = row[0]
        partitions = {f"r {r[0]} INSERT" for r in owner.execute(
            "SELECT pyembed._vector_partition_name(corpus_id) FROM pyembed.corpora").fetchall()}
        assert len(partitions) == 2
        assert {line for line in held(owner, "pyembed_operator")
                if not line.startswith("type ")} == set()
        def own(role: str) -> set[str]:  # (the partitions', and beside the groups' others)
            groups = held(owner, "pyembed_app") | held(owner, "pyembed_worker")
            return {line for line in held(owner, role) if not line.startswith("type ") and (
                line not in groups or line.split()[1].split(".")[0].startswith("vectors_c"))}

        ops = own(WORKER_USER)
        assert partitions <= ops  # (the types' USAGE is PUBLIC's; columns follow the table's)
        assert {(line.split()[1].split(".")[0], line.split()[-1]) for line in ops} == {
            (p.split()[1], "INSERT") for p in partitions}
        with login_role(owner, app.info.dsn, "late", sql.SQL(
                "IN ROLE pyembed_app, pyembed_operator")) as late:
            name = str(psycopg.conninfo.conninfo_to_dict(late)["user"])
            assert own(name) < ops  # (no tenant's partition: a corpus of none is pyembed_app's)
            assert tenants.crossed_logins(owner) == [tenants.CrossedLogin(
                name, None, f"{name} (an operator's login) may not yet write 1 of the corpora's "
                "partitions: it was granted pyembed_operator after the last install", "pyembed install",
                fatal=False)]
            pyembed_schema_install(db)
            assert own(name) == ops and tenants.crossed_logins(owner) == []
        # A dropped corpus's emptied partition (left to the next install) is nobody's to write.
        app.execute("SELECT pyembed.drop_corpus('docs')")
        ops = own(WORKER_USER)
        assert {line.split()[1].split(".")[0] for line in ops} == {
            p.split()[1] for p in partitions} - {f"vectors_c{app_corpus}"}
    members = owner.execute(
        "SELECT m.member::regrole::text FROM pg_auth_members m "
        "WHERE m.roleid = 'pyembed_operator'::regrole ORDER BY 1").fetchall()
    assert members == [(WORKER_USER,)]


def pyembed_schema_install(db: Database) -> None:
    from pyembed import schema

    schema.install(db.owner_dsn)


def test_a_tenants_login_granted_the_operator_role_later_may_lock_no_other_partition(
        owner: psycopg.Connection[Any], db: Database,
        two: dict[str, str]) -> None:  # noqa: F811
    """Tenant a's login granted pyembed_operator after it joined acts for a alone (membership
    wins: test_operator_worker), but held INSERT on every tenant's partition through the
    group's grant, with which it could LOCK tenant b's partition ROW EXCLUSIVE and hold off b's
    drop, reindex and bulk load. Now the partitions grant each operator's login, never the
    group: a's login holds nothing on b's partition and its LOCK is refused; doctor FAILs naming
    it with the REVOKE that mends it."""
    with psycopg.connect(two["b"], autocommit=True) as b:
        b.execute("SELECT pyembed.create_corpus('docs', 'fake/fake-hash@1:384')")
        part = b.execute("SELECT pyembed.vector_table('docs')").fetchone()[0]  # type: ignore[index]
    role_a = str(psycopg.conninfo.conninfo_to_dict(two["a"])["user"])
    owner.execute(sql.SQL("GRANT pyembed_operator TO {}").format(sql.Identifier(role_a)))
    try:
        assert owner.execute("SELECT has_table_privilege(%s, %s::regclass, 'INSERT')",
                             (role_a, part)).fetchone() == (False,)
        with psycopg.connect(two["a"]) as a, pytest.raises(
                psycopg.errors.InsufficientPrivilege):
            a.execute(f"LOCK TABLE {part} IN ROW EXCLUSIVE MODE")
        line = next(c for c in doctor.run(two["a"], db.owner_dsn) if c.name == "logins' roles")
        assert line.status == "fail", line
        assert line.detail.startswith(f"{role_a} (tenant a's login) is in pyembed_operator"), line
        assert line.fix == f"as the owner: REVOKE pyembed_operator FROM {role_a}", line
    finally:
        owner.execute(sql.SQL("REVOKE pyembed_operator FROM {}").format(sql.Identifier(role_a)))
    assert tenants.crossed_logins(owner) == []


def test_every_pair_of_roles_that_must_not_meet_on_a_login_is_named(
        owner: psycopg.Connection[Any], app: psycopg.Connection[Any],
        two: dict[str, str]) -> None:  # noqa: F811
    """pyembed's roles on one login, each pair in turn: a tenant's login with pyembed_operator,
    with the schema's owner role, or with another tenant's login (GRANT b TO a: a then holds
    b's partitions' INSERT); a login of no tenant granted a tenant's login; and the reverse, an
    operator's login made a tenant's member by hand (refused by the table) or granted a
    tenant's login (it reaches every tenant already). Each that must not meet is named with its
    fix; the pairs that may (an operator's login in pyembed_app and pyembed_worker, a tenant's
    login in pyembed_worker) are not."""
    with psycopg.connect(two["b"], autocommit=True) as b:
        b.execute("SELECT pyembed.create_corpus('docs', 'fake/fake-hash@1:384')")
    role_a, role_b = (str(psycopg.conninfo.conninfo_to_dict(two[t])["user"]) for t in "ab")
    schema_owner = owner.execute("SELECT nspowner::regrole::text FROM pg_namespace "
                                 "WHERE nspname = 'pyembed'").fetchone()[0]  # type: ignore[index]
    ident = sql.Identifier

    def crossed() -> list[tuple[str, str | None, str]]:
        return [(c.role, c.tenant, c.fix) for c in tenants.crossed_logins(owner) if c.fatal]

    with login_role(owner, app.info.dsn, "plain", sql.SQL("IN ROLE pyembed_app")) as plain, \
            login_role(owner, app.info.dsn, "op", sql.SQL(
                "IN ROLE pyembed_app, pyembed_worker, pyembed_operator")) as op:
        role_p, role_op = (str(psycopg.conninfo.conninfo_to_dict(d)["user"]) for d in (plain, op))
        allowed = [f"GRANT pyembed_worker TO {role_a}", f"GRANT {role_a} TO {role_op}"]
        for statement in allowed:
            owner.execute(statement)
        assert crossed() == []
        with pytest.raises(pyembed.InvalidInput, match="is in pyembed_operator"):
            tenants.add_member(owner, "a", role_op)
        cases = [
            (sql.SQL("GRANT pyembed_operator TO {}").format(ident(role_a)),
             (role_a, "a", f"REVOKE pyembed_operator FROM {role_a}")),
            (sql.SQL("GRANT {} TO {}").format(ident(schema_owner), ident(role_a)),
             (role_a, "a", f"REVOKE {schema_owner} FROM {role_a}")),
            (sql.SQL("GRANT {} TO {}").format(ident(role_b), ident(role_a)),
             (role_a, "a", f"REVOKE {role_b} FROM {role_a}")),
            (sql.SQL("GRANT {} TO {}").format(ident(role_b), ident(role_p)),
             (role_p, None, f"REVOKE {role_b} FROM {role_p}")),
        ]
        for grant, expected in cases:
            owner.execute(grant)
            try:
                assert crossed() == [expected], grant.as_string(owner)
            finally:
                owner.execute(grant.as_string(owner).replace("GRANT", "REVOKE", 1)
                              .replace(" TO ", " FROM ", 1))
        owner.execute(f"REVOKE {role_a} FROM {role_op}")
        # An operator's login granted to a tenant's: the group and its by-name grants with it.
        grant_op = sql.SQL("GRANT {} TO {}").format(ident(role_op), ident(role_a))
        owner.execute(grant_op)
        try:
            # (in pyembed_operator through it; and, were it granted by name, b's partition too)
            assert set(crossed()) == {(role_a, "a", f"REVOKE {role_op} FROM {role_a}")}
        finally:
            owner.execute(sql.SQL("REVOKE {} FROM {}").format(ident(role_op), ident(role_a)))
        assert crossed() == []


# -- what the application role may not run: one clear error ------------------------------------
def test_every_function_of_the_owners_is_refused_to_the_app_role_as_owner_only(
        owner: psycopg.Connection[Any], app: psycopg.Connection[Any]) -> None:
    """Walks every function of the schema the application role may not execute, a new one
    included: its call is refused with 42501, which pyembed's one mapping (db.translate) turns
    into OwnerOnly naming the function (a raw InsufficientPrivilege traceback before)."""
    calls = owner.execute(
        "SELECT p.proname, format('SELECT %s(%s)', p.oid::regproc, coalesce(string_agg("
        "'NULL::' || format_type(t.oid, NULL), ', ' ORDER BY a.n), '')) "
        "FROM pg_proc p LEFT JOIN LATERAL unnest(p.proargtypes::oid[]) WITH ORDINALITY "
        "AS a(t, n) ON true LEFT JOIN pg_type t ON t.oid = a.t "
        "WHERE p.pronamespace = 'pyembed'::regnamespace AND p.prokind = 'f' "
        "AND NOT has_function_privilege('pyembed_app', p.oid, 'EXECUTE') "
        "GROUP BY p.oid, p.proname ORDER BY 1").fetchall()
    assert {"set_index_settings", "rebuild_index", "index_status", "migration_start",
            "set_secret"} <= {name for name, _ in calls}
    # A function granted to a role of its own besides the owner (pyembed_worker's) names that
    # role: "the owner's" alone sent a worker's operator to the owner's DSN.
    granted = dict(owner.execute(
        "SELECT p.oid::regproc::text, string_agg(a.grantee::regrole::text, ', ') "
        "FROM pg_proc p CROSS JOIN LATERAL aclexplode(p.proacl) a "
        "WHERE p.pronamespace = 'pyembed'::regnamespace AND a.grantee <> 0 "
        "AND a.grantee <> p.proowner AND a.privilege_type = 'EXECUTE' "
        "AND NOT has_function_privilege('pyembed_app', p.oid, 'EXECUTE') "
        "AND NOT pg_has_role(a.grantee, 'pyembed_owner', 'MEMBER') "
        "GROUP BY p.oid").fetchall())
    assert granted == GRANTED_TO
    for name, call in calls:
        error = translate(sql_error(app, call))
        assert isinstance(error, pyembed.OwnerOnly), (call, error)
        role = granted.get(f"pyembed.{name}")
        if role:
            assert f"function pyembed.{name} is for the owner and members of {role}" in str(error)
        else:
            assert f"function pyembed.{name} is pyembed's owner role's" in str(error)


def _tenant(conn: psycopg.Connection[Any]) -> Any:
    return tenants.create_tenant(conn, "acme")


def _member(conn: psycopg.Connection[Any]) -> Any:
    return tenants.add_member(conn, "acme", "pyembed_user")


OWNERS_ENTRY_POINTS: dict[str, tuple[Callable[[Client], Any], str]] = {
    # entry point: (the call as the application role, what the error names)
    "index.set_index_settings": (lambda c: index.set_index_settings(c.conn, "docs", ef_search=50),
                                 "function pyembed.set_index_settings"),
    "Client.index_status": (lambda c: c.index_status("docs"), "function pyembed.index_status"),
    "migration.start": (lambda c: migration.start(c, "docs", NEW), "function pyembed.migration_start"),
    "migration.shift": (lambda c: migration.shift(c, "docs", 50), "function pyembed.migration_shift"),
    "migration.complete": (lambda c: migration.complete(c, "docs"),
                           "function pyembed.migration_complete"),
    "migration.rollback": (lambda c: migration.rollback(c, "docs"),
                           "function pyembed.migration_rollback"),
    "migration.cleanup": (lambda c: migration.cleanup(c, "docs"),
                          "function pyembed.migration_cleanup"),
    "tenants.create_tenant": (lambda c: _tenant(c.conn), "table pyembed.tenants"),
    "tenants.add_member": (lambda c: _member(c.conn), "table pyembed.tenant_members"),
    "Client.register_model": (lambda c: c.register_model(pyembed.ModelSpec("fake", "m", "1", 4)),
                              "function pyembed.register_model"),
}


@pytest.mark.parametrize("entry", OWNERS_ENTRY_POINTS)
def test_an_owners_python_entry_point_called_by_the_app_role_says_so(
        db: Database, client: Client, entry: str) -> None:
    client.create_corpus("docs", OLD)
    call, named = OWNERS_ENTRY_POINTS[entry]
    with pytest.raises(pyembed.OwnerOnly, match=f"{named} is pyembed's owner role's"):
        call(client)


def test_rebuild_index_by_the_app_role_says_so(db: Database, client: Client) -> None:
    """The online rebuild's builds run as the caller (CREATE INDEX CONCURRENTLY, which a
    function cannot run): the application role does not own the partition."""
    client.create_corpus("docs", OLD)
    with psycopg.connect(db.app_dsn, autocommit=True) as conn, \
            pytest.raises(pyembed.OwnerOnly, match="is pyembed's owner role's"):
        index.rebuild_index(conn, "docs")


@pytest.mark.parametrize("command", [
    ["corpus", "index", "docs", "--ef-search", "50"], ["corpus", "index", "docs"],
    ["corpus", "reindex", "docs"], ["migrate", "start", "docs", "--to", NEW],
    ["migrate", "shift", "docs", "50"], ["migrate", "complete", "docs"],
    ["migrate", "rollback", "docs"], ["migrate", "cleanup", "docs"],
    ["tenant", "create", "acme"], ["tenant", "add-member", "acme", "pyembed_user"]],
    ids=" ".join)
def test_an_owners_command_run_with_the_app_roles_dsn_says_so_in_one_line(
        db: Database, client: Client, command: list[str]) -> None:
    client.create_corpus("docs", OLD)
    client.conn.commit()
    done = pyembed_cli(*command, env={"PYEMBED_OWNER_DSN": db.app_dsn})
    assert done.returncode == 1, done
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert "is pyembed's owner role's: run this with the owner's DSN" in done.stderr


# -- what the application role may cause in SQL on pyembed's tables: one right error each -----
RELATIONS_WITH_APP_PRIVILEGES = """
SELECT DISTINCT c.relname::text FROM pg_class c
 WHERE c.relnamespace = 'pyembed'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
   AND NOT c.relispartition
   AND (EXISTS (SELECT FROM unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE']) p
                 WHERE has_table_privilege('pyembed_app', c.oid, p))
        OR EXISTS (SELECT FROM pg_attribute a, unnest(ARRAY['SELECT', 'INSERT', 'UPDATE']) p
                    WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                      AND has_column_privilege('pyembed_app', c.oid, a.attnum, p)))
"""

REFUSED_WRITES = """
SELECT c.relname::text, p, a.attname::text, format_type(a.atttypid, a.atttypmod)
  FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
       AND NOT a.attisdropped, unnest(ARRAY['INSERT', 'UPDATE']) p
 WHERE c.relnamespace = 'pyembed'::regnamespace AND c.relkind IN ('r', 'p')
   AND NOT c.relispartition
   AND NOT has_column_privilege('pyembed_app', c.oid, a.attnum, p)
 UNION ALL
SELECT c.relname::text, 'DELETE', NULL, NULL FROM pg_class c
 WHERE c.relnamespace = 'pyembed'::regnamespace AND c.relkind IN ('r', 'p')
   AND NOT c.relispartition AND NOT has_table_privilege('pyembed_app', c.oid, 'DELETE')
 ORDER BY 1, 2, 3
"""


def test_every_write_the_app_role_may_not_make_is_not_allowed_or_owner_only(
        owner: psycopg.Connection[Any], app: psycopg.Connection[Any]) -> None:
    """Walks every column of every table of pyembed (a new one included) the application role
    may not INSERT or UPDATE, and every table it may not DELETE from: on a table it is granted
    other columns or commands of (db.APP_RELATIONS, which the catalogue must match) the error is
    NotAllowed naming the table and the functions that write it; on any other, OwnerOnly.
    Before, an UPDATE of documents.corpus_id was OwnerOnly, 'the owner's': the owner does not
    move a document either (pyembed keeps each to its corpus); an INSERT of doc_no reached
    Python as psycopg's GeneratedAlways."""
    from pyembed.db import APP_RELATIONS

    assert {r[0] for r in owner.execute(RELATIONS_WITH_APP_PRIVILEGES)} == APP_RELATIONS
    wrong = []
    for table, command, column, kind in owner.execute(REFUSED_WRITES).fetchall():
        statement = {
            "INSERT": f"INSERT INTO pyembed.{table} ({column}) SELECT NULL::{kind} WHERE false",
            "UPDATE": f"UPDATE pyembed.{table} SET {column} = DEFAULT WHERE false",
            "DELETE": f"DELETE FROM pyembed.{table} WHERE false"}[command]
        error = translate(sql_error(app, statement))
        want = pyembed.OwnerOnly if table not in APP_RELATIONS else pyembed.NotAllowed
        named = f"table pyembed.{table}"
        if isinstance(error, pyembed.NotAllowed) and "GENERATED ALWAYS" in str(error):
            want, named = pyembed.NotAllowed, f'into column "{column}": the database numbers it'
        if type(error) is not want or named not in str(error):
            wrong.append(f"{statement}: {type(error).__name__} {error}")
    assert wrong == [], "\n".join(wrong)
    error = translate(sql_error(app, "UPDATE pyembed.documents SET corpus_id = 5"))
    assert str(error).startswith("this role may not do this to table pyembed.documents: "), error
    assert "pyembed.add_document or Corpus.add" in str(error) and "owner" not in str(error)


def test_a_row_a_table_refuses_is_one_clear_error_of_its_class(
        db: Database, app: psycopg.Connection[Any], two: dict[str, str]) -> None:  # noqa: F811
    """Rows written directly in SQL (or through the ORM, whose errors carry psycopg's) that
    row-level security, a foreign key or a unique key refuses: UnknownCorpus for a corpus the
    role's tenant does not see (as pyembed's functions say), InvalidInput naming the table for
    the rest. Before, each reached Python as psycopg's own error (42501, 23503, 23505)."""
    with pyembed.connect(two["b"]) as b:
        theirs = b.create_corpus("theirs", OLD).info.corpus_id
    with psycopg.connect(two["a"], autocommit=True) as a:
        mine = pyembed.Client(a).create_corpus("mine", OLD).info.corpus_id
        a.execute("SELECT pyembed.add_document('mine', 'd1', 'a text about refunds')")
        for statement, params in (
                ("INSERT INTO pyembed.documents (corpus_id, document_id, content_hash) "
                 "VALUES (%s, 'd9', '\\x00')", (theirs,)),
                ("INSERT INTO pyembed.chunks (corpus_id, document_id, chunk_index, content, "
                 "content_hash) VALUES (%s, 'd1', 0, 'text', '\\x00')", (theirs,))):
            error = translate(sql_error(a, statement, params))
            assert isinstance(error, pyembed.UnknownCorpus), (statement, error)
            assert "row-level security refused it" in str(error), error
        cases = {
            "INSERT INTO pyembed.chunks (corpus_id, document_id, chunk_index, content, "
            "content_hash) VALUES (%s, 'nope', 0, 'text', '\\x00')":
                "pyembed.chunks refers to a row that does not exist: Key ",
            "INSERT INTO pyembed.documents (corpus_id, document_id, content_hash) "
            "VALUES (%s, 'd1', '\\x00')":
                "pyembed.documents: that document_id is taken in that corpus (a row with the "
                "same corpus_id, document_id exists: unique index documents_pkey)",
            "INSERT INTO pyembed.eval_queries (corpus_id, query_id, query, relevant) "
            "VALUES (%s, 'q1', 'a query', '{d1}')":
                "pyembed.eval_queries: that query_id is taken in that corpus (a row with the "
                "same corpus_id, query_id exists: unique index eval_queries_pkey)",
            "UPDATE pyembed.eval_queries SET query_id = 'q1' WHERE corpus_id = %s "
            "AND query_id = 'q2'":
                "pyembed.eval_queries: that query_id is taken in that corpus",
            "INSERT INTO pyembed.chunks (corpus_id, document_id, chunk_index, content, "
            "content_hash) VALUES (%s, 'd1', 0, 'text', '\\x00')":
                "pyembed.chunks: that document_id, chunk_index are taken in that corpus (a row "
                "with the same corpus_id, document_id, chunk_index exists: unique index "
                "chunks_corpus_id_document_id_chunk_index_key)",
        }
        for query_id in ("q1", "q2"):
            a.execute("INSERT INTO pyembed.eval_queries (corpus_id, query_id, query, relevant) "
                      "VALUES (%s, %s, 'a query', '{d1}')", (mine, query_id))
        with pyembed.connect(two["a"]) as also_a:  # its vectors
            also_a.corpus("mine").add([("d2", "a text about returns")])
        partition = a.execute("SELECT pyembed.vector_table('mine')").fetchone()[0]
        cases[f"INSERT INTO {partition} (corpus_id, chunk_id, model_key, embedding, "
              "content_hash) SELECT corpus_id, chunk_id, model_key, (array_fill(0::real, "
              "ARRAY[dimensions - 1]) || 1::real)::vector, content_hash FROM pyembed.vectors "
              "JOIN pyembed.models USING (model_key) WHERE corpus_id = %s"] = (
                  "pyembed.vectors: that chunk_id, model_key are taken in that corpus (a row "
                  "with the same corpus_id, chunk_id, model_key exists: unique index vectors_c")
        for statement, message in cases.items():
            error = translate(sql_error(a, statement, (mine,)))
            assert isinstance(error, pyembed.InvalidInput), (statement, error)
            assert str(error).startswith(message), (statement, error)


WRITES_INTO_A_CORPUS = {
    "documents": ["INSERT INTO pyembed.documents (corpus_id, document_id, content_hash) "
                  "VALUES (%s, 'd1', '\\x00')"],
    "chunks": ["INSERT INTO pyembed.chunks (corpus_id, document_id, chunk_index, content, "
               "content_hash) VALUES (%s, 'd1', 5, 'text', '\\x00')",
               "INSERT INTO pyembed.chunks (corpus_id, document_id, chunk_index, content, "
               "content_hash) VALUES (%s, 'd1', 5, ' ', '\\x00')"],
    "eval_queries": [
        # each check of its trigger (pyembed._eval_query_checked) in turn
        "INSERT INTO pyembed.eval_queries (corpus_id, query_id, query, relevant) "
        "VALUES (%s, 'q1', 'a query', '{d1}')",
        "INSERT INTO pyembed.eval_queries (corpus_id, query_id, query, relevant) "
        "VALUES (%s, '', 'a query', '{d1}')",
        "INSERT INTO pyembed.eval_queries (corpus_id, query_id, query, relevant) "
        "VALUES (%s, 'q1', ' ', '{d1}')",
        "INSERT INTO pyembed.eval_queries (corpus_id, query_id, query, relevant) "
        "VALUES (%s, 'q1', 'a query', '{}')"],
}
"""A row for a corpus, written directly, per table the application role may write rows of a
corpus into: each statement trips a check of the table's triggers, if it has any. (Vectors are
written into the corpus's own partition, which only its tenant's logins may write: another
tenant's is UnknownCorpus too, test_tenants.py.)"""

TABLES_THE_APP_ROLE_WRITES_CORPUS_ROWS_INTO = """
SELECT c.relname::text FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
 WHERE c.relnamespace = 'pyembed'::regnamespace AND c.relkind IN ('r', 'p')
   AND NOT c.relispartition AND a.attname = 'corpus_id'
   AND (has_any_column_privilege('pyembed_app', c.oid, 'INSERT')
        OR has_any_column_privilege('pyembed_app', c.oid, 'UPDATE'))
"""


def test_another_tenants_corpus_id_is_refused_as_one_that_does_not_exist(
        owner: psycopg.Connection[Any], two: dict[str, str]) -> None:  # noqa: F811
    """A row written directly for another tenant's corpus and for a corpus id that no corpus
    has: the same error (the id aside), UnknownCorpus, for every table the application role
    writes (from the catalogue) and every check of its triggers. Before, the eval_queries
    trigger, which runs before row-level security, answered about the corpus for both (PE005:
    "corpus 1 has no document 'd1'", an empty query, no relevant ids), and a vector for an id
    without a partition was psycopg's raw CheckViolation "no partition of relation" where
    another tenant's was UnknownCorpus."""
    assert {r[0] for r in owner.execute(TABLES_THE_APP_ROLE_WRITES_CORPUS_ROWS_INTO)} == set(
        WRITES_INTO_A_CORPUS)
    with pyembed.connect(two["b"]) as b:
        theirs = b.create_corpus("theirs", OLD)
        theirs.add([("d1", "a text about refunds")])
        theirs_id = theirs.info.corpus_id
    nobodys = theirs_id + 1000
    with pyembed.connect(two["a"]) as a_client:
        mine = a_client.create_corpus("mine", OLD)
        mine.add([("d1", "a text about returns")])
        a_client.conn.execute("INSERT INTO pyembed.eval_queries (corpus_id, query_id, query, "
                              "relevant) VALUES (%s, 'mine', 'a query', '{d1}')",
                              (mine.info.corpus_id,))
    wrong = []
    with psycopg.connect(two["a"], autocommit=True) as a:
        for table, statements in WRITES_INTO_A_CORPUS.items():
            for statement in statements:
                said = []
                for corpus_id in (theirs_id, nobodys):
                    error = translate(sql_error(a, statement, (corpus_id,)))
                    said.append((type(error).__name__,
                                 re.sub(rf"\b{corpus_id}\b", "<id>", str(error))))
                if said[0] != said[1] or said[0][0] != "UnknownCorpus":
                    wrong.append(f"{table}: {statement}\n  theirs: {said[0]}\n  none: {said[1]}")
    assert wrong == [], "\n".join(wrong)
    with pyembed.connect(two["b"]) as b:  # nothing of theirs changed
        assert [h.document_id for h in b.corpus("theirs").search("refunds", mode="keyword")] \
            == ["d1"]


UNIQUE_INDEXES_OF_APP_TABLES = """
SELECT i.relname::text, array_agg(a.attname::text ORDER BY k.n)
  FROM pg_class c JOIN pg_index x ON x.indrelid = c.oid AND x.indisunique
       JOIN pg_class i ON i.oid = x.indexrelid,
       unnest(x.indkey) WITH ORDINALITY k(attnum, n)
       JOIN pg_attribute a ON a.attnum = k.attnum
 WHERE a.attrelid = c.oid AND c.relnamespace = 'pyembed'::regnamespace
   AND c.relkind IN ('r', 'p')
   AND (has_any_column_privilege('pyembed_app', c.oid, 'INSERT')
        OR has_any_column_privilege('pyembed_app', c.oid, 'UPDATE'))
 GROUP BY i.relname
"""


def test_every_unique_key_of_a_table_the_app_role_writes_has_its_columns_named(
        owner: psycopg.Connection[Any], client: Client) -> None:
    """db.UNIQUE_KEYS, which a unique-key violation's message reads its columns from, is every
    unique index of a table (or vectors partition) the application role may write, from the
    catalogue: a new one fails here until it is added. Before, the message named only the
    index ("already holds a row with that key (its unique index eval_queries_pkey)")."""
    from pyembed.db import _PARTITION_IN, UNIQUE_KEYS

    client.create_corpus("docs", OLD)  # its vectors partition, and that partition's indexes
    found = {_PARTITION_IN.sub("", name): tuple(columns)
             for name, columns in owner.execute(UNIQUE_INDEXES_OF_APP_TABLES)}
    assert any(name != _PARTITION_IN.sub("", name) for name, _ in
               owner.execute(UNIQUE_INDEXES_OF_APP_TABLES)), "no partition was walked"
    assert found == UNIQUE_KEYS


# -- every object, every role: the catalogue's walk ---------------------------------------------
# One line for each privilege `role` holds on an object of the schema: the schema, every relation
# (partitions included), column, sequence, function and type, a new one included.
HELD = """
SELECT 'schema pyembed ' || p FROM unnest(ARRAY['CREATE', 'USAGE']) p
 WHERE has_schema_privilege(%(role)s, 'pyembed', p)
UNION ALL
SELECT format('%%s %%s %%s', c.relkind, c.relname, p) FROM pg_class c
 CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES',
                         'TRIGGER', 'USAGE']) p
 WHERE c.relnamespace = 'pyembed'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
   AND CASE WHEN c.relkind = 'S' THEN p IN ('SELECT', 'UPDATE', 'USAGE')
                                      AND has_sequence_privilege(%(role)s, c.oid, p)
            ELSE p <> 'USAGE' AND has_table_privilege(%(role)s, c.oid, p) END
UNION ALL
SELECT format('column %%s.%%s %%s', c.relname, a.attname, p) FROM pg_class c
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
 CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'REFERENCES']) p
 WHERE c.relnamespace = 'pyembed'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
   AND has_column_privilege(%(role)s, c.oid, a.attnum, p)
UNION ALL
SELECT 'function ' || p.oid::regprocedure::text FROM pg_proc p
 WHERE p.pronamespace = 'pyembed'::regnamespace
   AND has_function_privilege(%(role)s, p.oid, 'EXECUTE')
UNION ALL
SELECT 'type ' || t.oid::regtype::text FROM pg_type t
 WHERE t.typnamespace = 'pyembed'::regnamespace AND has_type_privilege(%(role)s, t.oid, 'USAGE')
"""


def held(conn: psycopg.Connection[Any], role: str) -> set[str]:
    return {r[0] for r in conn.execute(HELD, {"role": role}).fetchall()}


GROUP_ROLES = {
    # Every role a grant in the schema may name besides an object's owner, and why.
    "pyembed_app": "the application's and every tenant's logins (members): APP_COLUMN_WRITES, "
                   "APP_DELETES, APP_WRITERS and tests/golden/privileges.txt",
    "pyembed_worker": "a worker's login beside pyembed_app: counts failed provider calls "
                      "(test_the_worker_role_may_count_failed_calls_and_nothing_more)",
    "pyembed_owner": "owns the tables; runs the foreign-key checks and the tenant policies' "
                     "functions (current_tenant, visible_corpora)",
    "pyembed_operator": "the operator's worker and exporter logins (no tenant's), each of which "
                        "holds INSERT on every corpus's partition, for the worker acting for "
                        "each job's tenant; the group itself holds none "
                        "(test_the_operators_logins_write_every_partition_and_nothing_more)",
}


def _grants(owner: psycopg.Connection[Any]) -> list[tuple[str, str, str]]:
    """(object, grantee, privilege) for every grant in the schema's ACLs (the schema, relations
    and their partitions, columns, functions, types) and its default privileges, but for the
    object's owner's own."""
    return owner.execute("""
        SELECT 'schema pyembed', a.grantee::regrole::text, a.privilege_type
          FROM pg_namespace n CROSS JOIN LATERAL aclexplode(n.nspacl) a
         WHERE n.nspname = 'pyembed' AND a.grantee <> n.nspowner
        UNION ALL
        SELECT c.relname, coalesce(nullif(a.grantee, 0)::regrole::text, 'PUBLIC'), a.privilege_type
          FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a
         WHERE c.relnamespace = 'pyembed'::regnamespace AND a.grantee <> c.relowner
        UNION ALL
        SELECT c.relname || '.' || t.attname,
               coalesce(nullif(a.grantee, 0)::regrole::text, 'PUBLIC'), a.privilege_type
          FROM pg_class c JOIN pg_attribute t ON t.attrelid = c.oid
         CROSS JOIN LATERAL aclexplode(t.attacl) a
         WHERE c.relnamespace = 'pyembed'::regnamespace AND a.grantee <> c.relowner
        UNION ALL
        SELECT p.oid::regprocedure::text, coalesce(nullif(a.grantee, 0)::regrole::text, 'PUBLIC'),
               a.privilege_type
          FROM pg_proc p CROSS JOIN LATERAL aclexplode(p.proacl) a
         WHERE p.pronamespace = 'pyembed'::regnamespace AND a.grantee <> p.proowner
        UNION ALL
        SELECT t.oid::regtype::text, coalesce(nullif(a.grantee, 0)::regrole::text, 'PUBLIC'),
               a.privilege_type
          FROM pg_type t CROSS JOIN LATERAL aclexplode(t.typacl) a
         WHERE t.typnamespace = 'pyembed'::regnamespace AND a.grantee <> t.typowner
        UNION ALL
        SELECT 'default ' || d.defaclobjtype::text,
               coalesce(nullif(a.grantee, 0)::regrole::text, 'PUBLIC'), a.privilege_type
          FROM pg_default_acl d CROSS JOIN LATERAL aclexplode(d.defaclacl) a
         WHERE d.defaclnamespace IN (0, 'pyembed'::regnamespace)
        ORDER BY 1, 2, 3""").fetchall()


def test_every_grant_in_the_schema_is_to_a_role_accounted_for(
        owner: psycopg.Connection[Any], app: psycopg.Connection[Any]) -> None:
    """Walks every ACL of the schema (a corpus's vector partition and the default privileges
    included): each grantee is a group role of GROUP_ROLES, never a tenant's login, PUBLIC or
    another role, whose privileges no list here would account for; but an operator's login
    (WORKER_USER here), which each vector partition grants INSERT by name."""
    owner.execute("SELECT pyembed.register_model('fake', 'fake-hash', '2', 384)")
    app.execute("SELECT pyembed.create_corpus('docs', 'fake/fake-hash@1:384')")
    grants = _grants(owner)
    assert any(name.startswith("vectors_") for name, _, _ in grants)  # the partition is walked
    assert {(name, grantee) for name, grantee, privilege in grants if grantee not in GROUP_ROLES
            and not (grantee == WORKER_USER and re.fullmatch(r"vectors_c\d+(\.\w+)?", name)
                     and privilege == "INSERT")} == set()
    with owner.transaction(force_rollback=True):  # the walk sees a grant to a login
        owner.execute("GRANT SELECT (title) ON pyembed.documents TO pyembed_user")
        assert ("documents.title", "pyembed_user", "SELECT") in _grants(owner)


def test_a_tenants_login_may_do_what_the_app_role_may_and_nothing_more(
        owner: psycopg.Connection[Any], two: dict[str, str]) -> None:  # noqa: F811
    """Every privilege of a tenant's login on every object of the schema (partitions, columns,
    sequences, functions and types included) is the application role's, but the INSERT on its
    own tenant's corpora's partitions (pyembed._partition_writers): a tenant's login is a member
    of pyembed_app and holds nothing else of its own. PUBLIC holds nothing but the types'
    USAGE (PUBLIC_TYPES)."""
    with pyembed.connect(two["a"]) as client:
        client.create_corpus("docs", "fake/fake-hash@1:384")
    with pyembed.connect(two["b"]) as client:
        client.create_corpus("docs", "fake/fake-hash@1:384")
    owner.execute("SELECT pyembed.create_corpus('nobodys', 'fake/fake-hash@1:384')")
    partitions = dict(owner.execute(
        "SELECT coalesce(m.role_name::text, 'pyembed_app'), pyembed._vector_partition_name("
        "c.corpus_id) FROM pyembed.corpora c "
        "LEFT JOIN pyembed.tenant_members m USING (tenant_id)").fetchall())
    assert len(partitions) == 3

    def own(lines: set[str], role: str) -> set[str]:
        """The lines of the role's own corpora's partition: its INSERT and its columns'."""
        mine = {line for line in lines if line.split()[1].split(".")[0] == partitions.get(role)}
        assert role not in partitions or f"r {partitions[role]} INSERT" in mine, (role, mine)
        assert {line.split()[-1] for line in mine} <= {"INSERT"}, mine
        return mine
    logins = [r[0] for r in owner.execute(
        "SELECT m.member::regrole::text FROM pg_auth_members m JOIN pg_roles r "
        "ON r.oid = m.member WHERE m.roleid = 'pyembed_app'::regrole AND r.rolcanlogin "
        "AND NOT pg_has_role(m.member, 'pyembed_worker', 'MEMBER')").fetchall()]
    assert len(logins) >= 3  # the application's login and the two tenants'
    app_held = held(owner, "pyembed_app")
    assert {line for line in app_held if line.split()[1].startswith("vectors_c")} == own(
        app_held, "pyembed_app")  # of a corpus of no tenant only
    for login in logins:
        login_held = held(owner, login)
        assert login_held - own(login_held, login) == app_held, login
    before = held(owner, logins[0])  # (a tenant's login's own partition's INSERT among them)
    with owner.transaction(force_rollback=True):  # the walk sees a login's own grant
        owner.execute(sql.SQL("GRANT SELECT (tokens) ON pyembed.usage TO {}").format(
            sql.Identifier(logins[0])))
        assert held(owner, logins[0]) - before == {"column usage.tokens SELECT"}
    public = held(owner, "public")
    assert {line for line in public if not line.startswith("type ")} == set()
    assert {line.removeprefix("type ") for line in public} == set(_public_types(owner))


def _public_types(owner: psycopg.Connection[Any]) -> dict[str, str]:
    """Every type of the schema, and why PUBLIC may use it."""
    why = {}
    for name, relkind in owner.execute(
            "SELECT t.oid::regtype::text, c.relkind FROM pg_type t "
            "LEFT JOIN pg_class c ON c.oid = coalesce(nullif(t.typrelid, 0), "
            "(SELECT e.typrelid FROM pg_type e WHERE e.oid = t.typelem)) "
            "WHERE t.typnamespace = 'pyembed'::regnamespace").fetchall():
        if relkind and relkind != "c":
            why[name] = ("a relation's row type (or its array): PostgreSQL sets no privileges "
                         "on one, and a type carries no rows")
        else:
            why[name] = PUBLIC_TYPES[name.removesuffix("[]")]
    return why


PUBLIC_TYPES = {
    # A type of the schema of its own (not a relation's row type), and why PUBLIC may use it.
    "pyembed._index_rules": "the vector index's rules as the nearest-neighbour functions pass "
                            "them; a type carries no rows, and the functions are the owner's",
}


SHARED_READS = {
    # A relation the application role may read that no tenant's policy filters, and why.
    "models": "the operator's registry of model keys, which every tenant's corpora use (its "
              "dimensions, prices and bounds): no tenant's rows",
}
NO_POLICY = {
    # A table without row-level security, and why: none of them a tenant may read.
    "alembic_version": "the schema's revision",
    "keyword_pending": "SHARED_BY_TRIGGERS",
    "models": "SHARED_READS",
    "provider_error_counters": "every tenant's failed provider calls, read through "
                               "pyembed.provider_errors() (the counts only)",
    "secrets": "the operator's provider keys, the owner's alone",
    "tenants": "the tenants, the owner's (pyembed.current_tenant() reads them as its owner)",
    "tenant_members": "as tenants",
}


def _unfiltered(owner: psycopg.Connection[Any]) -> tuple[set[str], list[str]]:
    """The tables without row-level security, and the relations the application role may read
    (any column) that no tenant's policy filters and SHARED_READS does not list."""
    rows = owner.execute(
        "SELECT c.relname, c.relkind, c.relrowsecurity, c.relforcerowsecurity, "
        "coalesce('security_invoker=true' = ANY (c.reloptions), false), "
        "has_any_column_privilege('pyembed_app', c.oid, 'SELECT'), "
        "(SELECT string_agg(pg_get_expr(p.polqual, p.polrelid), ' ') FROM pg_policy p "
        " WHERE p.polrelid = c.oid) "
        "FROM pg_class c WHERE c.relnamespace = 'pyembed'::regnamespace "
        "AND c.relkind IN ('r', 'p', 'v', 'm', 'f') AND NOT c.relispartition").fetchall()
    # A policy filters by the tenant, or by the rows of a table whose own policy does
    # (migration_events: its migrations').
    filtered = {name for name, kind, rls, forced, _, _, policy in rows
                if kind != "v" and rls and forced and policy is not None
                and ("visible_corpora()" in policy or "current_tenant()" in policy)}
    filtered |= {name for name, kind, rls, forced, _, _, policy in rows
                 if kind != "v" and rls and forced and policy is not None
                 and set(re.findall(r"\bpyembed\.(\w+)", policy)) & filtered}
    assert {name for name, *_, readable, _ in rows if readable} >= set(SHARED_READS)
    return ({name for name, kind, rls, *_ in rows if kind != "v" and not rls},
            [name for name, kind, _, _, invoker, readable, _ in rows
             if readable and name not in SHARED_READS
             and not (invoker if kind == "v" else name in filtered)])


def test_every_relation_a_tenant_reads_is_kept_to_its_rows_or_said_to_be_shared(
        owner: psycopg.Connection[Any]) -> None:
    """Walks every relation of the schema the application role may read (any column), a new
    one included: a table forces row-level security (its owner's functions are bound too) with a
    policy by tenant or by the tenant's corpora, a view runs as its caller (security_invoker:
    the tables' policies apply), or it is in SHARED_READS with why. Every table without
    row-level security is in NO_POLICY."""
    assert _unfiltered(owner) == (set(NO_POLICY), [])
    with owner.transaction(force_rollback=True):  # the walk sees a policy the owner escapes
        owner.execute("ALTER TABLE pyembed.queue NO FORCE ROW LEVEL SECURITY")
        owner.execute("ALTER VIEW pyembed.coverage RESET (security_invoker)")
        assert sorted(_unfiltered(owner)[1]) == ["coverage", "queue"]


PARTITION_GRANTS = {
    # A partitioned table whose partitions the application role may write directly, what it may
    # do there, and what keeps a tenant to its own rows (a partition has no policy of its own:
    # the parent's apply only to statements on the parent).
    "vectors": ({"INSERT"}, "vectors_tenant"),  # COPY into a corpus's own partition: the
    # statement trigger checks the corpus is the caller's (pyembed._vectors_tenant)
}


def test_a_partition_the_app_role_writes_directly_checks_the_tenant_itself(
        owner: psycopg.Connection[Any], app: psycopg.Connection[Any]) -> None:
    """Walks every partition of the schema (a corpus's vector partition made for the test):
    what the application role may do on it is its parent's entry in PARTITION_GRANTS, and the
    partition has the trigger that checks the tenant there."""
    app.execute("SELECT pyembed.create_corpus('docs', 'fake/fake-hash@1:384')")
    rows = owner.execute(
        "SELECT parent.relname, c.relname, ARRAY(SELECT p FROM unnest(ARRAY['SELECT', 'INSERT', "
        "'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES', 'TRIGGER']) p "
        "WHERE has_table_privilege('pyembed_app', c.oid, p) OR (p IN ('SELECT', 'INSERT', "
        "'UPDATE', 'REFERENCES') AND has_any_column_privilege('pyembed_app', c.oid, p))), "
        "ARRAY(SELECT t.tgname::text FROM pg_trigger t WHERE t.tgrelid = c.oid) "
        "FROM pg_class c JOIN pg_inherits i ON i.inhrelid = c.oid "
        "JOIN pg_class parent ON parent.oid = i.inhparent "
        "WHERE c.relnamespace = 'pyembed'::regnamespace AND c.relispartition").fetchall()
    assert rows
    for parent, partition, privileges, triggers in rows:
        allowed, trigger = PARTITION_GRANTS.get(parent, (set(), ""))
        assert set(privileges) <= allowed, (partition, privileges)
        if privileges:
            assert trigger in triggers, (partition, triggers)
