"""Tenant isolation by forced row-level security, per-tenant cache, accounting and limits."""

from __future__ import annotations

import json
import time
import unicodedata
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pyembed
from pyembed import tenants
from pyembed.corpora import corpus_info, create_corpus
from pyembed.db import translate
from pyembed.dbcall import translated
from pyembed.errors import InvalidInput
from pyembed.vectors import copy_vectors
from pyembed.worker import Worker
from tests.conftest import Database
from tests.helpers import count, run_cli, sql_error, unit
from tests.test_cli import db_env

A_KEY = "fake/fake-hash@1:384"
B_KEY = "fake/fake-hash@2:1024"


@pytest.fixture
def two(db: Database, owner: psycopg.Connection[Any]) -> Iterator[dict[str, str]]:
    """Tenants a and b, each with its own login role; yields their DSNs."""
    suffix = uuid.uuid4().hex[:6]
    dsns: dict[str, str] = {}
    for name in ("a", "b"):
        role = f"t{name}_{suffix}"
        tenants.create_tenant(owner, name, requests_per_minute=None)
        tenants.add_member(owner, name, role, create_login="pw")
        dsns[name] = db.app_dsn.replace("pyembed_user:", f"{role}:").split("@")[0].rsplit(
            ":", 1)[0] + ":pw@" + db.app_dsn.split("@", 1)[1]
    yield dsns
    for name in ("a", "b"):
        owner.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(
            sql.Identifier(f"t{name}_{suffix}")))
        owner.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(f"t{name}_{suffix}")))


def cache_entries(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """The connection's tenant's cache entries per model (the table itself is not readable)."""
    return dict(conn.execute("SELECT model_key, max(entries) FROM pyembed.cache_report(1) "
                             "GROUP BY model_key").fetchall())


def fill(dsn: str, key: str, n: int, corpus: str = "docs") -> Any:
    client = pyembed.connect(dsn)
    c = client.create_corpus(corpus, key)
    c.add([pyembed.Document(f"{corpus}-{i}", f"shared words about topic {i % 7} item {i}",
                            {"n": i}) for i in range(n)])
    return client


def test_each_tenant_sees_only_its_own_rows(two: dict[str, str],
                                            owner: psycopg.Connection[Any]) -> None:
    a = fill(two["a"], A_KEY, 30)
    b = fill(two["b"], B_KEY, 40)  # same corpus name, another model key: no interference
    b.create_corpus("secret", B_KEY).add([("s", "shared words about topic 1")])
    assert [c.model_key for c in a.corpora()] == [A_KEY]
    assert {c.name for c in b.corpora()} == {"docs", "secret"}
    for table, expected in (("corpora", 1), ("documents", 30), ("chunks", 30)):
        assert count(a.conn, table) == expected, table
    assert cache_entries(a.conn) == {A_KEY: 30}
    assert a.conn.execute("SELECT count(*) FROM pyembed.vectors").fetchone() == (30,)
    with pytest.raises(pyembed.UnknownCorpus):
        a.corpus("secret")
    with pytest.raises(psycopg.Error) as err:  # even by name, straight to the SQL function
        a.conn.execute("SELECT * FROM pyembed.search_keyword('secret', 'shared', 5)")
    assert err.value.sqlstate == "PE002"

    # The owner role of the tables is bound by the policies too (FORCE ROW LEVEL SECURITY).
    with owner.transaction():
        owner.execute("SET LOCAL pyembed.act_as_tenant = 'a'")
        owner.execute("SET LOCAL ROLE pyembed_owner")
        assert owner.execute("SELECT count(*) FROM pyembed.documents").fetchone() == (30,)
        assert owner.execute("SELECT count(DISTINCT model_key) FROM pyembed.vectors"
                             ).fetchone() == (1,)
    a.close()
    b.close()


def test_searches_near_the_other_tenants_vectors_return_the_same(two: dict[str, str]) -> None:
    a = fill(two["a"], A_KEY, 25)
    docs = a.corpus("docs")
    query = "shared words about topic 3"
    before = [(h.document_id, round(h.score, 6)) for h in docs.search(query, k=50)]
    before_f = [h.document_id for h in docs.search(query, k=50, filter={"n": 3})]
    # b stores many vectors right next to a's query, in a corpus of the same name and width.
    b = pyembed.connect(two["b"])
    near = b.create_corpus("docs", A_KEY)
    near.add([pyembed.Document(f"b{i}", query, {"n": 3}) for i in range(60)])
    after = [(h.document_id, round(h.score, 6)) for h in docs.search(query, k=50)]
    assert after == before and len(before) == 25
    assert [h.document_id for h in docs.search(query, k=50, filter={"n": 3})] == before_f
    for mode in ("keyword", "hybrid"):
        assert all(h.document_id.startswith("docs-") for h in docs.search(query, k=50, mode=mode))
    a.close()
    b.close()


def test_a_tenant_cannot_copy_into_another_tenants_partition(two: dict[str, str]) -> None:
    a = fill(two["a"], A_KEY, 2)
    b = fill(two["b"], A_KEY, 2)
    b_id = corpus_info(b.conn, "docs").corpus_id
    b_chunks = [r[0] for r in b.conn.execute("SELECT chunk_id FROM pyembed.chunks")]
    # Only the corpus's tenant's logins may INSERT into its partition (pyembed._partition_writers;
    # the partition's statement trigger refuses another tenant's too).
    with pytest.raises(pyembed.UnknownCorpus, match=f"unknown corpus id {b_id}"), translated(), \
            a.conn.transaction(), a.conn.cursor() as cur:
        copy_vectors(cur, b_id, b_chunks, A_KEY, np.stack([unit(384, 1), unit(384, 2)]),
                           [None, None], replace=False)
    assert a.conn.execute("SELECT pyembed.vector_table('docs')").fetchone() != (
        f"pyembed.vectors_c{b_id}",)
    assert b.conn.execute("SELECT count(*) FROM pyembed.vectors").fetchone() == (2,)
    a.close()
    b.close()



def test_a_tenant_cannot_enqueue_retry_delete_or_fail_another_tenants_jobs(
        two: dict[str, str]) -> None:
    """The application role writes pyembed.queue (a chunk's write queues its work as the writer;
    the worker, which runs as a tenant's login, claims, retries and dequeues jobs), deletes
    failures (pyembed.delete_failures) and moves its jobs to queue_failed through
    pyembed.fail_job: row-level security keeps every statement of it to the tenant's corpora,
    new rows included, and a tenant's worker claims its own jobs only."""
    a, b = fill(two["a"], A_KEY, 2), fill(two["b"], A_KEY, 2)
    for client in (a, b):  # queued again: the texts changed
        client.conn.execute("UPDATE pyembed.chunks SET content = content || ' changed'")
        client.conn.commit()
    b_id = corpus_info(b.conn, "docs").corpus_id
    b_chunk = b.conn.execute("SELECT min(chunk_id) FROM pyembed.chunks").fetchone()[0]
    for client, reason in ((b, "real"), (a, "its own")):  # each fails one job of its own
        assert client.conn.execute(
            "SELECT pyembed.fail_job(corpus_id, chunk_id, model_key, content_hash, attempts, %s) "
            "FROM pyembed.queue ORDER BY chunk_id LIMIT 1", (reason,)).fetchone() == (True,)
        client.conn.commit()
    b_job = b.conn.execute("SELECT corpus_id, chunk_id, model_key, content_hash, attempts "
                           "FROM pyembed.queue LIMIT 1").fetchone()

    def b_rows() -> list[Any]:
        return b.conn.execute(
            "SELECT 'queue', chunk_id, model_key, attempts, not_before, content_hash "
            "FROM pyembed.queue UNION ALL SELECT 'failed', chunk_id, model_key, attempts, "
            "failed_at, content_hash FROM pyembed.queue_failed ORDER BY 1, 2").fetchall()

    before = b_rows()
    assert len(before) == 2
    with psycopg.connect(two["a"], autocommit=True) as conn:
        for table in ("queue", "queue_failed"):
            extra = ", attempts, reason" if table == "queue_failed" else ""
            values = ", 1, 'forged'" if table == "queue_failed" else ""
            err = sql_error(conn, sql.SQL(
                "INSERT INTO pyembed.{} (corpus_id, chunk_id, model_key, content_hash{}) "
                "VALUES (%s, %s, %s, '\\x00'{})").format(
                    sql.Identifier(table), sql.SQL(extra), sql.SQL(values)),
                (b_id, b_chunk, A_KEY))
            # a job is made by a chunk write, a failure by pyembed.fail_job (test_hardening)
            assert err.sqlstate == "42501" and "permission denied" in str(err), err
            delete = sql.SQL("DELETE FROM pyembed.{} WHERE corpus_id = %s").format(
                sql.Identifier(table))
            # no tenant deletes a job (test_hardening), nor a failure but through
            # pyembed.delete_failures (a table's DELETE would let it LOCK the table)
            err = sql_error(conn, delete, (b_id,))
            assert err.sqlstate == "42501" and "permission denied" in str(err), err
        assert conn.execute("SELECT pyembed.delete_failures('docs', %s)",
                            ([b_chunk],)).fetchone() == (0,)
        # no column of a job is the caller's to write: the claim's go through the functions
        for column in ("corpus_id", "attempts", "not_before", "last_error"):
            err = sql_error(conn, sql.SQL("UPDATE pyembed.queue SET {} = {}").format(
                sql.Identifier(column), sql.Identifier(column)))
            assert err.sqlstate == "42501" and "permission denied" in str(err), err
        # nor the other tenant's job claimed, renewed, retried, released or failed
        corpus, chunk, key, digest, tries = b_job
        jobs = ([corpus], [chunk], [key])
        for call, args in (
                ("SELECT pyembed.renew_jobs(30, %s, %s, %s, %s)", (*jobs, [tries])),
                ("SELECT pyembed.retry_jobs('forged', %s, %s, %s, %s, %s, '{0}')",
                 (*jobs, [digest], [tries])),
                ("SELECT pyembed.release_jobs(%s, %s, %s, %s)", (*jobs, [tries]))):
            assert conn.execute(call, args).fetchone() == (0,), call
        assert conn.execute("SELECT pyembed.fail_job(%s, %s, %s, %s, %s, 'forged')",
                            b_job).fetchone() == (False,)
    worker = Worker(two["a"], batch_size=10)
    try:
        assert {i.corpus_id for i in worker.claim()} == {corpus_info(a.conn, "docs").corpus_id}
    finally:
        worker.close()
    with psycopg.connect(two["a"], autocommit=True) as conn:  # every job of its own out of tries
        conn.execute("SELECT pyembed.expire_jobs(0)")
    assert b_rows() == before
    a.close()
    b.close()


KEYWORD_COUNTS = """
SELECT c.name, s.chunks, s.total_len, s.documents, s.document_len,
       (SELECT count(DISTINCT p.chunk_id) FROM pyembed.postings p WHERE p.corpus_id = c.corpus_id),
       (SELECT coalesce(sum(p.tf), 0) FROM pyembed.postings p WHERE p.corpus_id = c.corpus_id),
       (SELECT count(DISTINCT p.doc_no) FROM pyembed.document_postings p
         WHERE p.corpus_id = c.corpus_id),
       (SELECT coalesce(sum(p.tf), 0) FROM pyembed.document_postings p
         WHERE p.corpus_id = c.corpus_id),
       (SELECT count(*) FROM pyembed.lexeme_stats l WHERE l.corpus_id = c.corpus_id
           AND (l.df, l.document_df) IS DISTINCT FROM (
               (SELECT count(*) FROM pyembed.postings p WHERE p.corpus_id = l.corpus_id
                   AND p.lexeme = l.lexeme),
               (SELECT count(*) FROM pyembed.document_postings p WHERE p.corpus_id = l.corpus_id
                   AND p.lexeme = l.lexeme)))
  FROM pyembed.corpora c JOIN pyembed.keyword_stats s USING (corpus_id) ORDER BY c.tenant_id
"""


def test_a_tenant_can_neither_see_nor_change_what_anothers_writes_counted(
        two: dict[str, str], owner: psycopg.Connection[Any]) -> None:
    """pyembed.keyword_pending holds no tenant's policy: the postings triggers of every tenant's
    writes record their counts there until their commit. With the other tenant's counts pending
    (its transaction open, adding and deleting chunks with the same words), a tenant can read,
    write or clear none of them, its own writes and searches go on, and at the end each corpus's
    keyword statistics are what its own postings say."""
    a, b = fill(two["a"], A_KEY, 6), fill(two["b"], A_KEY, 6)
    b.corpus("docs").add([pyembed.Document("b-new", "shared words about topic 3 again")])
    b.conn.execute("SELECT pyembed.delete_documents('docs', '{docs-1}')")
    assert owner.execute("SELECT count(*) FROM pyembed.keyword_pending").fetchone() == (0,)
    with b.conn.transaction():
        b.conn.execute("SELECT pyembed.delete_documents('docs', '{docs-2}')")
        b.conn.execute("SELECT pyembed.add_document('docs', 'b-open', 'shared words topic 4')")
        with psycopg.connect(two["a"], autocommit=True) as conn:
            for statement in ("SELECT * FROM pyembed.keyword_pending",
                              "DELETE FROM pyembed.keyword_pending",
                              "UPDATE pyembed.keyword_pending SET chunks = 0",
                              "INSERT INTO pyembed.keyword_pending (corpus_id, lexemes, blocks, "
                              "dfs, chunks, total_len, documents) SELECT corpus_id, '{shared}', "
                              "'{0}', '{100}', 100, 100, false FROM pyembed.corpora",
                              "TRUNCATE pyembed.keyword_pending"):
                err = sql_error(conn, statement)
                assert err.sqlstate == "42501", (statement, err)
            with conn.transaction():
                conn.execute("SELECT pyembed.add_document('docs', 'a-new', 'shared words 5')")
                conn.execute("SELECT pyembed.delete_documents('docs', '{docs-3}')")
                found = conn.execute("SELECT document_id FROM pyembed.search_keyword('docs', "
                                     "'shared words', 20)").fetchall()
                assert {d for (d,) in found} == {f"docs-{i}" for i in (0, 1, 2, 4, 5)} | {"a-new"}
    rows = owner.execute(KEYWORD_COUNTS).fetchall()
    assert len(rows) == 2
    for name, chunks, total, docs, doc_len, p_chunks, p_total, p_docs, p_doc_len, wrong in rows:
        assert (chunks, total, docs, doc_len, wrong) == (p_chunks, p_total, p_docs, p_doc_len,
                                                         0), name
    assert [r[1] for r in rows] == [6, 6]  # a: 6 - 1 + 1; b: 6 + 1 - 2 + 1
    assert owner.execute("SELECT count(*) FROM pyembed.keyword_pending").fetchone() == (0,)
    a.close()
    b.close()


def test_tenant_checks_run_once_per_statement_whatever_the_number_of_corpora(
        owner: psycopg.Connection[Any], app: psycopg.Connection[Any]) -> None:
    for i in range(50):
        create_corpus(app, f"c{i}", A_KEY)
    with owner.transaction():
        owner.execute("SET LOCAL track_functions = 'all'")
        owner.execute("SET LOCAL ROLE pyembed_user")
        for query in ("SELECT count(*) FROM pyembed.chunks", "SELECT count(*) FROM pyembed.corpora",
                      "SELECT pyembed.visible_corpora()",
                      "SELECT * FROM pyembed.search_keyword('c7', 'words', 5)"):
            owner.execute(query).fetchall()
        owner.execute("RESET ROLE")
        calls = dict(owner.execute("SELECT funcname, calls FROM pg_stat_xact_user_functions "
                                   "WHERE schemaname = 'pyembed'").fetchall())
    # At most a few calls per statement, not one per corpus row.
    assert calls["current_tenant"] <= 8, calls
    assert calls["visible_corpora"] <= 4, calls


def test_cache_entries_are_not_shared(two: dict[str, str]) -> None:
    a, b = pyembed.connect(two["a"]), pyembed.connect(two["b"])
    a.embedder(A_KEY).embed_query("the same text")
    assert a.cache is not None and b.cache is not None
    b.embedder(A_KEY).embed_query("the same text")
    assert b.cache.last_lookup == (0, 1)  # a miss: a's entry is invisible to b
    a.embedder(A_KEY).embed_query("the same text")
    assert a.cache.last_lookup == (1, 0)
    assert cache_entries(a.conn) == cache_entries(b.conn) == {A_KEY: 1}
    a.close()
    b.close()


def test_rate_limit_refuses_a_burst_and_stores_nothing(
        db: Database, owner: psycopg.Connection[Any]) -> None:
    role = f"tl_{uuid.uuid4().hex[:6]}"
    tenants.create_tenant(owner, "limited", requests_per_minute=2)
    tenants.add_member(owner, "limited", role, create_login="pw")
    dsn = db.app_dsn.replace("pyembed_user:", f"{role}:").split("@")[0].rsplit(":", 1)[0] + \
        ":pw@" + db.app_dsn.split("@", 1)[1]
    try:
        with pyembed.connect(dsn) as c:
            kb = c.create_corpus("kb", A_KEY)
            kb.add([("a", "first text")])
            kb.add([("b", "second text")])
            with pytest.raises(pyembed.RateLimited, match="tenant limited is over its rate limit"):
                kb.add([("c", "third text")])
            assert count(c.conn, "documents") == 2 and count(c.conn, "chunks") == 2
            rows = tenants.usage(c.conn)
            assert [(r.tenant, r.corpus, r.model_key, r.requests) for r in rows] == [
                ("limited", "kb", A_KEY, 2)]
    finally:
        owner.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
        owner.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_a_tenant_member_is_a_role_that_exists(owner: psycopg.Connection[Any]) -> None:
    """A member that is no role (a typo) was stored, and `tenant add-member` said it acts for
    the tenant: the real login then acted for no tenant (the untenanted corpora, not its
    tenant's), and a role made later under that name joined the tenant unseen."""
    tenants.create_tenant(owner, "acme")
    with pytest.raises(InvalidInput, match="no role 'acme_ap'"):
        tenants.add_member(owner, "acme", "acme_ap")
    assert sql_error(owner, "INSERT INTO pyembed.tenant_members SELECT 'acme_ap', tenant_id "
                            "FROM pyembed.tenants").sqlstate == "PE005"
    assert owner.execute("SELECT count(*) FROM pyembed.tenant_members").fetchone() == (0,)


@pytest.mark.parametrize(("tenant", "role", "said"), [
    ("n" * 1_000_000, "someone", "unknown tenant 'nnnnnnnnnn"),
    ("acme", "\u202eabc", "no role '\\u202eabc' (hint: create the login first"),
    ("acme", "a\x01b\x1b[31m", "no role 'a\\u0001b\\u001b[31m' (hint: create the login first"),
    ("acme", "", "no role '' (hint: create the login first"),
])
def test_a_member_or_tenant_named_wrong_is_quoted(
        db: Database, owner: psycopg.Connection[Any], tenant: str, role: str, said: str) -> None:
    """A DBA's add-member with a tenant no one has or a role no one is, from Python and the CLI:
    the name quoted, cut and escaped (pyembed._quoted, errors.shown). Before, a 1 MB tenant name
    came back whole (1,000,017 characters) and a role's right-to-left mark or terminal escape as
    typed ("no role \u202eabc" reordering the line)."""
    tenants.create_tenant(owner, "acme")
    with pytest.raises(InvalidInput) as err:
        tenants.add_member(owner, tenant, role)
    message = str(err.value)
    assert message.startswith(said) and len(message) < 200, message[:300]
    assert not any(unicodedata.category(ch) in ("Cc", "Cf") for ch in message), message
    if len(tenant) < 100:  # (a process's arguments: not 1 MB)
        out = run_cli("tenant", "add-member", tenant, role, env=db_env(db))
        assert (out.returncode, out.stderr.strip()) == (1, f"error: {message}"), out
    assert owner.execute("SELECT count(*) FROM pyembed.tenant_members").fetchone() == (0,)


@pytest.mark.parametrize("login", [True, False])
def test_a_member_name_postgresql_would_cut_is_refused(
        db: Database, owner: psycopg.Connection[Any], login: bool) -> None:
    """A role name over 63 bytes: PostgreSQL cuts it (a notice no client showed), so `tenant
    add-member acme <70 r's> --password ...` (now --login) made and stored the 63-byte role while it said the
    70-byte one now acts for acme. Refused now, naming the limit, with nothing made."""
    tenants.create_tenant(owner, "acme")
    stem = f"m{uuid.uuid4().hex[:8]}"
    role = stem + "é" * 28  # 9 + 56 bytes: 37 characters
    cut = role.encode()[:63].decode("utf-8", "ignore")
    try:
        with pytest.raises(InvalidInput, match=r"is 65 bytes: PostgreSQL's names are at most 63"):
            tenants.add_member(owner, "acme", role, create_login="pw" if login else None)
        args = ("tenant", "add-member", "acme", role, *(("--login",) if login else ()))
        out = run_cli(*args, env=db_env(db), stdin="pw\n")
        assert out.returncode == 1 and "is 65 bytes" in out.stderr, out
        assert owner.execute("SELECT count(*) FROM pg_roles WHERE rolname LIKE %s",
                             (f"{stem}%",)).fetchone() == (0,)
        assert owner.execute("SELECT count(*) FROM pyembed.tenant_members").fetchone() == (0,)
        tenants.add_member(owner, "acme", cut, create_login="pw")  # 63 bytes: whole
        assert owner.execute("SELECT role_name::text FROM pyembed.tenant_members"
                             ).fetchone() == (cut,)
    finally:
        owner.execute("DELETE FROM pyembed.tenant_members")
        owner.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(cut)))


def test_a_tenant_member_is_a_login_and_not_the_owner(owner: psycopg.Connection[Any]) -> None:
    """A group (pyembed_app, or a NOLOGIN role of the tenant's logins) was stored as a member
    and `tenant add-member` said it acts for the tenant, but a session acts for its login's
    tenant: the group's logins went on reading the untenanted corpora. The schema's owner made
    a member would have seen one tenant's corpora only."""
    tenants.create_tenant(owner, "acme")
    group = f"acme_apps_{uuid.uuid4().hex[:8]}"
    owner.execute(sql.SQL("CREATE ROLE {} NOLOGIN IN ROLE pyembed_app").format(
        sql.Identifier(group)))
    try:
        for role in (group, "pyembed_app"):
            with pytest.raises(InvalidInput, match=f"role '{role}' cannot log in"):
                tenants.add_member(owner, "acme", role)
        [schema_owner] = owner.execute("SELECT nspowner::regrole::text FROM pg_namespace "
                                       "WHERE nspname = 'pyembed'").fetchone() or [None]
        with pytest.raises(InvalidInput, match="owns the pyembed schema"):
            tenants.add_member(owner, "acme", schema_owner)
        assert sql_error(owner, "INSERT INTO pyembed.tenant_members SELECT %s, tenant_id "
                                "FROM pyembed.tenants", (group,)).sqlstate == "PE005"
        assert owner.execute("SELECT count(*) FROM pyembed.tenant_members").fetchone() == (0,)
    finally:
        owner.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(group)))


def test_app_role_cannot_manage_or_impersonate_tenants(app: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        app.execute("SELECT * FROM pyembed.tenants")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        app.execute("INSERT INTO pyembed.tenant_members VALUES ('x', 1)")
    # The setting is honoured for superusers only: for anyone else it changes nothing.
    app.execute("SET pyembed.act_as_tenant = 'a'")
    assert app.execute("SELECT pyembed.current_tenant()").fetchone() == (None,)


def test_a_refused_reservation_stops_a_search_whose_query_was_embedded_beside_it(
        db: Database, owner: psycopg.Connection[Any]) -> None:
    """A client without a cache embeds a new query with the local model beside search_query
    (pyembed.query): the reservation search_query makes still decides, and over the tenant's
    limit the search fails with it, accounts nothing more and searches nothing. (The limit is
    per minute: the minutes after the first are used up too, so that a run crossing into the
    next minute is refused as well; before, it got that minute's request and failed.)"""
    role = f"tl_{uuid.uuid4().hex[:6]}"
    tenants.create_tenant(owner, "early", requests_per_minute=1)
    tenants.add_member(owner, "early", role, create_login="pw")
    dsn = db.app_dsn.replace("pyembed_user:", f"{role}:").split("@")[0].rsplit(":", 1)[0] + \
        ":pw@" + db.app_dsn.split("@", 1)[1]
    try:
        with pyembed.connect(dsn, use_cache=False) as c:
            kb = c.create_corpus("kb", pyembed.LOCAL_DEFAULT.key)
            kb.add([("a", "first text")])  # the minute's one request
            # And the next two minutes' (the test's clock may cross into one of them): the
            # limit refuses the searches whichever minute they run in.
            owner.execute("INSERT INTO pyembed.usage (tenant_id, corpus_id, model_key, minute, "
                          "requests) SELECT u.tenant_id, u.corpus_id, u.model_key, u.minute "
                          "+ make_interval(mins => n), 1 FROM pyembed.usage u JOIN "
                          "pyembed.tenants t USING (tenant_id), generate_series(1, 2) n "
                          "WHERE t.name = 'early'")
            for mode in ("vector", "hybrid"):
                with pytest.raises(pyembed.RateLimited, match="tenant early is over its rate"):
                    kb.search("first", k=1, mode=mode)
            assert kb.search("first", k=1, mode="keyword")  # no provider call: not limited
            rows = tenants.usage(c.conn)
            assert [(r.tenant, r.corpus, r.requests) for r in rows] == [("early", "kb", 3)]
        assert owner.execute("SELECT kind FROM pyembed.query_log q JOIN pyembed.corpora c "
                             "USING (corpus_id) JOIN pyembed.tenants t USING (tenant_id) "
                             "WHERE t.name = 'early'").fetchall() == [("keyword",)]
    finally:
        owner.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
        owner.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_a_role_made_again_under_a_dropped_members_name_is_refused(
        db: Database, owner: psycopg.Connection[Any]) -> None:
    """Membership belongs to the role, not to its name: a member role that is dropped leaves
    the tenant, and a role created later under the same name (by anyone who may create roles,
    or a restore into another cluster) is refused, naming the tenant, until it is added itself:
    it neither acts for the tenant nor sees the corpora of no tenant."""
    role = f"gone_{uuid.uuid4().hex[:6]}"
    tenants.create_tenant(owner, "acme")
    tenants.add_member(owner, "acme", role, create_login="pw")
    dsn = psycopg.conninfo.make_conninfo(db.app_dsn, user=role, password="pw")
    with psycopg.connect(dsn) as member:
        assert member.execute("SELECT pyembed.current_tenant()").fetchone() != (None,)
    owner.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    owner.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw' IN ROLE pyembed_app").format(
        sql.Identifier(role)))
    try:
        for statement in ("SELECT pyembed.current_tenant()", "SELECT pyembed.visible_corpora()",
                          "SELECT count(*) FROM pyembed.corpora",
                          "SELECT * FROM pyembed.search_keyword('docs', 'words')"):
            with psycopg.connect(dsn) as newcomer, pytest.raises(psycopg.Error) as refused:
                newcomer.execute(statement)
            assert refused.value.sqlstate == "PE014", statement
            assert "tenant 'acme'" in str(refused.value), statement
        # every entry point says so in pyembed's words: Python, the worker, the CLI
        with pyembed.connect(dsn) as client, pytest.raises(pyembed.NotAllowed, match="'acme'"):
            client.corpora()
        with Worker(dsn, recall_every=0) as worker, pytest.raises(pyembed.NotAllowed,
                                                                  match="'acme'"):
            worker.run_once()
        out = run_cli("search", "docs", "words", env={"PYEMBED_DSN": dsn})
        assert out.returncode == 1 and "'acme'" in out.stderr and "Traceback" not in out.stderr
        tenants.add_member(owner, "acme", role)  # on purpose: now it is one
        with psycopg.connect(dsn) as member:
            assert member.execute("SELECT pyembed.current_tenant()").fetchone() != (None,)
        assert owner.execute("SELECT count(*) FROM pyembed.tenant_members").fetchone() == (1,)
    finally:
        owner.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_a_tenant_can_neither_defer_nor_build_another_tenants_index(
        two: dict[str, str], owner: psycopg.Connection[Any]) -> None:
    """A bulk load's deferred index (pyembed.begin_bulk_load): every function of it runs as the
    owner, only on the caller's tenant's corpora, or is not the application's to call; the
    table of corpora to build is not the application's to read or write."""
    fill(two["a"], A_KEY, 3).close()
    row = owner.execute("SELECT corpus_id, pyembed._index_name(corpus_id, model_key) "
                        "FROM pyembed.corpora WHERE name = 'docs'").fetchone()
    assert row is not None
    owner.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier("pyembed", row[1])))
    owner.execute("INSERT INTO pyembed.indexes_to_build VALUES (%s)", (row[0],))
    missing = ("SELECT to_regclass(format('pyembed.%%I', %s::text)) IS NULL "
               "AND EXISTS (SELECT FROM pyembed.indexes_to_build WHERE corpus_id = %s)")
    with psycopg.connect(two["b"], autocommit=True) as b:
        assert b.execute("SELECT * FROM pyembed.unindexed_corpora()").fetchall() == []
        for call in ("begin_bulk_load", "end_bulk_load"):
            with pytest.raises(psycopg.Error, match="unknown corpus"):
                b.execute(sql.SQL("SELECT pyembed.{}('docs')").format(sql.Identifier(call)))
        for denied in ("SELECT pyembed._heal_vector_index(%s)",
                       "SELECT pyembed._bulk_loading(%s)",
                       "SELECT * FROM pyembed.indexes_to_build WHERE corpus_id = %s",
                       "INSERT INTO pyembed.indexes_to_build VALUES (%s)",
                       "DELETE FROM pyembed.indexes_to_build WHERE corpus_id = %s"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                b.execute(denied, (row[0],) if "%s" in denied else ())
    # b's own bulk load and writes (the trigger heals the corpora the statement wrote, of the
    # caller's tenant) leave a's index as it is.
    b_client = fill(two["b"], B_KEY, 0)
    with b_client.corpus("docs").bulk_load() as deferred:
        assert deferred
        b_client.corpus("docs").add([("x", "shared words from b")])
    b_client.corpus("docs").add([("y", "more shared words from b")])
    b_client.close()
    assert owner.execute(missing, (row[1], row[0])).fetchone() == (True,)
    assert owner.execute("SELECT count(*) FROM pyembed.corpora c WHERE to_regclass(format("
                         "'pyembed.%I', pyembed._index_name(c.corpus_id, c.model_key))) IS NULL"
                         ).fetchone() == (1,)  # b's was built at its load's end
    with psycopg.connect(two["a"], autocommit=True) as a:
        assert a.execute("SELECT * FROM pyembed.unindexed_corpora()").fetchall() == [
            ("docs", A_KEY, False)]
        assert a.execute("SELECT pyembed.end_bulk_load('docs')").fetchone() == (row[1],)


LOAD_LOCK = 1887003970  # the key a loader's lock had (pyembed._bulk_load_lock, then corpus id)


@pytest.mark.parametrize("holder", ["tenant", "plain"])
@pytest.mark.parametrize("lock", ["pg_advisory_lock_shared", "pg_advisory_lock"])
def test_no_other_roles_advisory_lock_decides_a_tenants_bulk_load(
        two: dict[str, str], plain: str, owner: psycopg.Connection[Any], holder: str,
        lock: str) -> None:
    """Every role may take any advisory lock, and corpus ids are small integers: another
    tenant's role, or a login with CONNECT only, holding the key a loader's lock had (shared:
    a load at work; exclusive: a builder) made a's corpus left without its index by a killed load
    look loading (status said ok, no write built it), and a's next load fail (Busy) or never
    build its index. Whether a load is at work and who builds is decided by rows only the
    owner's functions write and lock."""
    a_client = fill(two["a"], A_KEY, 3)
    row = owner.execute("SELECT corpus_id, pyembed._index_name(corpus_id, model_key) "
                        "FROM pyembed.corpora WHERE name = 'docs'").fetchone()
    assert row is not None
    # A killed load's state: the index dropped, the corpus recorded, no loader at work.
    owner.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier("pyembed", row[1])))
    owner.execute("INSERT INTO pyembed.indexes_to_build VALUES (%s)", (row[0],))
    fresh = a_client.create_corpus("fresh", A_KEY)
    fresh_id = owner.execute("SELECT corpus_id FROM pyembed.corpora WHERE name = 'fresh'"
                             ).fetchone()[0]  # type: ignore[index]
    built = "SELECT to_regclass(format('pyembed.%%I', pyembed._index_name(corpus_id, " \
            "model_key))) IS NOT NULL FROM pyembed.corpora WHERE name = %s"
    with psycopg.connect(two["b"] if holder == "tenant" else plain, autocommit=True) as other:
        for cid in (row[0], fresh_id):
            other.execute(sql.SQL("SELECT {}(%s, %s)").format(sql.Identifier(lock)),
                          (LOAD_LOCK, cid))
        with psycopg.connect(two["a"], autocommit=True) as a:
            assert a.execute("SELECT * FROM pyembed.unindexed_corpora()").fetchall() == [
                ("docs", A_KEY, False)]  # status warns: no load is at work
        a_client.corpus("docs").add([("next", "the next write builds the index")])
        assert owner.execute(built, ("docs",)).fetchone() == (True,)
        started = time.monotonic()
        with fresh.bulk_load() as deferred:
            assert deferred
            assert owner.execute(built, ("fresh",)).fetchone() == (False,)
            fresh.add([("f1", "a first load into an empty corpus")])
        assert time.monotonic() - started < 4
        assert owner.execute(built, ("fresh",)).fetchone() == (True,)
        assert owner.execute("SELECT count(*) FROM pyembed.bulk_loaders").fetchone() == (0,)
    a_client.close()


def test_a_vector_for_another_tenants_chunk_waits_for_nothing_of_it(
        two: dict[str, str], owner: psycopg.Connection[Any]) -> None:
    """pyembed._vector_document, a BEFORE ROW trigger of pyembed.vectors running as its owner,
    read and locked (FOR KEY SHARE) the chunk a vector names before row-level security refused
    the write: tenant b writing a vector for tenant a's chunk through the parent table waited
    for a's open transaction on that chunk (and learned it exists and is being changed). Now
    the corpus is checked first, as the caller: the policy's error at once, the same as for an
    id nobody has; and _dequeue_written reads no other tenant's jobs. (Since the parent takes no
    INSERT, b writes into a's partition: refused by its privileges, before any trigger.)"""
    key = "fake/fake-hash@1:384"
    with psycopg.connect(two["a"], autocommit=True) as a:
        (corpus_id,) = a.execute("SELECT pyembed.create_corpus('mine', %s)", (key,)).fetchone()
        a.execute("SELECT pyembed.add_document('mine', 'd', 'a text of tenant a')")
        (chunk,) = a.execute("SELECT chunk_id FROM pyembed.chunks").fetchone()
        with a.transaction(), psycopg.connect(two["b"], autocommit=True) as b:
            a.execute("SELECT FROM pyembed.chunks WHERE chunk_id = %s FOR UPDATE", (chunk,))
            # a wait for a's lock would end in 55P03 (lock not available), not the refusal
            b.execute("SET lock_timeout = '2s'")
            insert = ("INSERT INTO pyembed.vectors_c{} (corpus_id, chunk_id, model_key, "
                      "embedding) VALUES (%s, %s, %s, %s)")
            err = sql_error(b, insert.format(corpus_id),
                            (corpus_id, chunk, key, str(unit(384, 0).tolist())))
            nobody = sql_error(b, insert.format(corpus_id + 1000),
                               (corpus_id + 1000, chunk, key, str(unit(384, 0).tolist())))
            b.execute("SELECT pyembed._dequeue_written(%s, %s, %s, %s, %s)",
                      (corpus_id, key, chunk, chunk, [b"x"]))
        assert err.sqlstate == "42501", err
        # (An id nobody has has no partition: refused before any trigger, said the same.)
        assert type(translate(nobody)) is type(translate(err)) is pyembed.UnknownCorpus
        assert str(translate(err)).startswith(f"unknown corpus id {corpus_id}:"), translate(err)
        assert a.execute("SELECT count(*) FROM pyembed.queue").fetchone() == (1,)



def test_the_owner_acts_for_a_tenant_to_migrate_and_index_its_corpus(
        db: Database, two: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Row-level security hides a tenant's corpora from the owner's login too (it belongs to no
    tenant): its migrate start said unknown corpus. It acts for the tenant that
    pyembed.act_as_tenant names, set here through libpq's PGOPTIONS as README says, for every
    owner operation; a tenant's own login setting it still acts for its own tenant only."""
    from pyembed import migration

    a = fill(two["a"], A_KEY, 12)
    a.close()
    with pyembed.connect(db.owner_dsn) as dba, pytest.raises(pyembed.UnknownCorpus):
        migration.start(dba, "docs", B_KEY)
    monkeypatch.setenv("PGOPTIONS", "-c pyembed.act_as_tenant=a")
    with pyembed.connect(db.owner_dsn) as dba:
        migration.start(dba, "docs", B_KEY)
        migration.backfill(dba, "docs")
        st = migration.status(dba, "docs")
        assert (st.model_key, st.target_model_key, st.coverage) == (A_KEY, B_KEY, 1.0)
        assert {i.model_key for i in dba.index_status("docs")} == {A_KEY, B_KEY}
    with pyembed.connect(two["b"]) as b, pytest.raises(pyembed.UnknownCorpus):
        b.corpus("docs")  # b has no "docs": the setting is not its to use


def test_tenant_list_shows_each_tenant_its_limits_and_members(
        db: Database, owner: psycopg.Connection[Any]) -> None:
    """`pyembed tenant list` (and tenants.list_tenants): the tenants by name with their limits
    and member roles, as a table and as JSON. Before, the CLI could create tenants and add
    members but not show them (the mistyped-tenant error's hint named a SQL query)."""
    suffix = uuid.uuid4().hex[:6]
    role = f"acme_{suffix}"
    tenants.create_tenant(owner, "zeta")
    tenants.create_tenant(owner, "acme", requests_per_minute=300, tokens_per_minute=100_000)
    tenants.add_member(owner, "acme", role, create_login="pw")
    try:
        rows = tenants.list_tenants(owner)
        assert [(r.name, r.requests_per_minute, r.tokens_per_minute, r.members) for r in rows] \
            == [("acme", 300, 100_000, [role]), ("zeta", None, None, [])]
        out = run_cli("tenant", "list", "--json", env=db_env(db))
        assert out.returncode == 0, out.stderr
        listed = json.loads(out.stdout)["tenants"]
        assert [(t["name"], t["requests_per_minute"], t["members"]) for t in listed] == [
            ("acme", 300, [role]), ("zeta", None, [])]
        out = run_cli("tenant", "list", env={**db_env(db), "COLUMNS": "200"})
        assert out.returncode == 0, out.stderr
        acme = next(line for line in out.stdout.splitlines() if " acme " in f" {line} ")
        assert "300" in acme and "100,000" in acme and role in acme, out.stdout
        zeta = next(line for line in out.stdout.splitlines() if " zeta " in f" {line} ")
        assert zeta.count("unlimited") == 2 and "none" in zeta, out.stdout
    finally:
        owner.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
        owner.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


LOCK_MODES = ["ACCESS SHARE", "ROW SHARE", "ROW EXCLUSIVE", "SHARE UPDATE EXCLUSIVE", "SHARE",
              "SHARE ROW EXCLUSIVE", "EXCLUSIVE", "ACCESS EXCLUSIVE"]
# A table's reader may take ACCESS SHARE (SELECT) and its writer ROW EXCLUSIVE (INSERT): each
# conflicts only with modes that pyembed's own maintenance of a corpus takes, never with
# another tenant's search or write.
OWN_ROWS_MODES = {"ACCESS SHARE", "ROW EXCLUSIVE"}


def test_a_tenant_can_lock_no_table_more_than_its_own_rows_and_stalls_no_other_tenant(
        two: dict[str, str], owner: psycopg.Connection[Any]) -> None:
    """PostgreSQL lets a role with a table's UPDATE, DELETE or TRUNCATE LOCK it in any mode:
    with the application role's DELETE on documents (chunks, vectors, queue_failed, and
    UPDATE/DELETE on eval_queries), `LOCK pyembed.documents IN ACCESS EXCLUSIVE MODE` as one
    tenant stalled every other tenant's searches and writes until it ended. Walks every
    relation of the schema (every tenant's partitions included) in every mode: a tenant takes
    none stronger than its reads' and inserts'; then, while it holds every lock it can take and
    every row it can lock, another tenant searches (each mode), writes and deletes."""
    fill(two["a"], A_KEY, 3).close()
    b_client = fill(two["b"], A_KEY, 3)
    relations = [r[0] for r in owner.execute(
        "SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'pyembed'::regnamespace "
        "AND c.relkind IN ('r', 'p', 'v', 'm', 'f') ORDER BY 1")]
    assert "vectors" in relations and sum(r.startswith("vectors_c") for r in relations) == 2
    taken: dict[str, list[str]] = {}
    wrong = []
    with psycopg.connect(two["a"], autocommit=True) as a:
        for relation in relations:
            for mode in LOCK_MODES:
                statement = sql.SQL("LOCK TABLE {} IN {} MODE NOWAIT").format(
                    sql.Identifier("pyembed", relation), sql.SQL(mode))
                try:
                    with a.transaction():
                        a.execute(statement)
                except psycopg.errors.InsufficientPrivilege:
                    continue
                except psycopg.Error as exc:
                    wrong.append(f"{relation} {mode}: {exc.sqlstate} {exc}")
                    continue
                taken.setdefault(relation, []).append(mode)
                if mode not in OWN_ROWS_MODES:
                    wrong.append(f"{relation} {mode}: taken")
        assert wrong == [], "\n".join(wrong)
        assert set(taken["documents"]) == {"ACCESS SHARE"}, taken
        # Holding all it can: the strongest lock of each relation, and every row it may lock
        # (FOR UPDATE needs an UPDATE of a column: only tables whose rows are the tenant's own,
        # row-level security keeping it to them; not the registry, corpora or migrations).
        row_locked = set()
        with a.transaction():
            for relation in relations:
                if relation in taken:
                    a.execute(sql.SQL("LOCK TABLE {} IN {} MODE NOWAIT").format(
                        sql.Identifier("pyembed", relation), sql.SQL(taken[relation][-1])))
                try:
                    with a.transaction():
                        a.execute(sql.SQL("SELECT FROM {} FOR UPDATE").format(
                            sql.Identifier("pyembed", relation))).fetchall()
                    row_locked.add(relation)
                except (psycopg.errors.InsufficientPrivilege, psycopg.errors.FeatureNotSupported):
                    pass  # (no UPDATE of any column; a view that cannot be locked by row)
            assert row_locked == {"documents", "chunks", "eval_queries"}, row_locked
            with pyembed.connect(two["b"]) as b:
                b_conn = b.conn
                b_conn.execute("SET lock_timeout = '3s'")
                docs = b.corpus("docs")
                for mode in ("vector", "keyword", "hybrid"):
                    assert docs.search("shared words about topic 1", k=3, mode=mode), mode
                docs.add([pyembed.Document("docs-new", "a new text written meanwhile", {})])
                b_conn.execute("INSERT INTO pyembed.eval_queries (corpus_id, query_id, query, "
                               "relevant) SELECT corpus_id, 'q', 'a query', '{docs-new}' "
                               "FROM pyembed.corpora WHERE name = 'docs'")
                assert b_conn.execute("SELECT pyembed.delete_eval_queries('docs', '{q}'), "
                                      "pyembed.delete_documents('docs', '{docs-0}'), "
                                      "pyembed.delete_failures('docs')").fetchone() == (1, 1, 0)
    assert b_client.conn.execute("SELECT count(*) FROM pyembed.documents").fetchone() == (3,)
    b_client.close()


def _lockable(owner: psycopg.Connection[Any], a_dsn: str) -> tuple[list[str], dict[str, list[str]]]:
    """Every relation of the schema (every tenant's partitions included), and the lock modes
    tenant `a_dsn` may take on each (LOCK ... NOWAIT, one mode at a time)."""
    relations = [r[0] for r in owner.execute(
        "SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'pyembed'::regnamespace "
        "AND c.relkind IN ('r', 'p', 'v', 'm', 'f') ORDER BY 1")]
    taken: dict[str, list[str]] = {}
    with psycopg.connect(a_dsn, autocommit=True) as a:
        for relation in relations:
            for mode in LOCK_MODES:
                try:
                    with a.transaction():
                        a.execute(sql.SQL("LOCK TABLE {} IN {} MODE NOWAIT").format(
                            sql.Identifier("pyembed", relation), sql.SQL(mode)))
                except psycopg.errors.InsufficientPrivilege:
                    continue
                taken.setdefault(relation, []).append(mode)
    return relations, taken


def test_a_tenant_can_lock_nothing_another_tenants_dba_work_waits_for(
        db: Database, two: dict[str, str], owner: psycopg.Connection[Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The application role's INSERT on pyembed.vectors (the parent) and on every corpus's
    partition let any tenant `LOCK ... IN ROW EXCLUSIVE MODE` the parent (which locks every
    partition) or another tenant's partition: that tenant's index build at a bulk load's end,
    `corpus reindex`, migration step (the partition's constraint) and corpus drop then waited
    and failed busy. Now a tenant may take ROW EXCLUSIVE on its own corpora's partitions only
    (its writes COPY there) and ACCESS SHARE on what it reads; holding every lock it can take,
    and every row it can lock, tenant b's DBA work on its own corpora goes through."""
    from pyembed import migration

    fill(two["a"], A_KEY, 3).close()
    b_client = fill(two["b"], A_KEY, 3)
    b_client.create_corpus("gone", A_KEY)
    b_client.create_corpus("loaded", A_KEY)
    a_part = owner.execute("SELECT pyembed._vector_partition_name(c.corpus_id) FROM "
                           "pyembed.corpora c JOIN pyembed.tenants t USING (tenant_id) "
                           "WHERE t.name = 'a'").fetchone()
    assert a_part is not None
    relations, taken = _lockable(owner, two["a"])
    assert sum(r.startswith("vectors_c") for r in relations) == 4
    # (ROW EXCLUSIVE on a table of every tenant's rows, its inserts' lock, conflicts with no
    # corpus's maintenance; on a partition it does, and the parent's locks every partition.)
    wrong = {r: m for r, m in taken.items()
             if set(m) - ({"ROW EXCLUSIVE"} if r == a_part[0] else {"ACCESS SHARE"}
                          if r.startswith("vectors") else OWN_ROWS_MODES)}
    assert wrong == {}, wrong
    assert taken[a_part[0]] == ["ROW EXCLUSIVE"], taken
    monkeypatch.setenv("PGOPTIONS", "-c lock_timeout=3s")
    with psycopg.connect(two["a"], autocommit=True) as a, a.transaction():
        for relation, modes in taken.items():
            a.execute(sql.SQL("LOCK TABLE {} IN {} MODE NOWAIT").format(
                sql.Identifier("pyembed", relation), sql.SQL(modes[-1])))
        for relation in ("documents", "chunks", "eval_queries"):
            a.execute(sql.SQL("SELECT FROM {} FOR UPDATE").format(
                sql.Identifier("pyembed", relation))).fetchall()
        a.execute("SELECT pyembed.add_document('docs', 'held', 'a write left open')")
        with pyembed.connect(two["b"]) as b:
            loaded = b.corpus("loaded")
            with loaded.bulk_load() as deferred:
                assert deferred
                loaded.add([("l1", "a bulk load's text")])
            assert b.conn.execute("SELECT * FROM pyembed.unindexed_corpora()").fetchall() == []
            b.drop_corpus("gone")
        monkeypatch.setenv("PGOPTIONS", "-c lock_timeout=3s -c pyembed.act_as_tenant=b")
        with pyembed.connect(db.owner_dsn) as dba:
            dba.rebuild_index("docs")
            migration.start(dba, "docs", B_KEY)
            migration.backfill(dba, "docs")
            migration.rollback(dba, "docs")
            migration.cleanup(dba, "docs")
    assert [c.name for c in b_client.corpora()] == ["docs", "loaded"]
    b_client.close()


def test_a_partitions_writers_follow_its_tenants_members(
        db: Database, two: dict[str, str], owner: psycopg.Connection[Any]) -> None:
    """A corpus's partition takes INSERT from its tenant's logins only: a login added to the
    tenant after the corpus was made writes its vectors; moved to another tenant, or the corpus
    moved, it holds no privilege on it any more (granted again by pyembed._partition_writers,
    as every install does)."""
    fill(two["a"], A_KEY, 1).close()
    part = owner.execute("SELECT pyembed._vector_partition_name(corpus_id) FROM pyembed.corpora "
                         "WHERE name = 'docs'").fetchone()[0]  # type: ignore[index]
    role = f"late_{uuid.uuid4().hex[:6]}"
    may = "SELECT has_table_privilege(%s, format('pyembed.%%I', %s::text), 'INSERT')"
    try:
        tenants.add_member(owner, "a", role, create_login="pw")
        assert owner.execute(may, (role, part)).fetchone() == (True,)
        late = make_conninfo(two["a"], user=role)
        with pyembed.connect(late) as client:
            client.corpus("docs").add([("late", "a text its late login writes")])
        tenants.add_member(owner, "b", role)
        assert owner.execute(may, (role, part)).fetchone() == (False,)
        tenants.add_member(owner, "a", role)
        owner.execute("UPDATE pyembed.corpora SET tenant_id = (SELECT tenant_id FROM "
                      "pyembed.tenants WHERE name = 'b') WHERE name = 'docs'")
        assert owner.execute(may, (role, part)).fetchone() == (False,)
        b_login = conninfo_to_dict(two["b"])["user"]
        assert owner.execute(may, (b_login, part)).fetchone() == (True,)
    finally:
        owner.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
        owner.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.mark.parametrize("open_work", ["vector search", "hybrid search", "write"])
def test_another_tenants_open_work_holds_off_no_corpus_drop(
        two: dict[str, str], open_work: str) -> None:
    """pyembed.drop_corpus dropped the corpus's partition, which locks pyembed.vectors (the
    parent of every tenant's) ACCESS EXCLUSIVE: tenant a's transaction left open after a write
    (a COPY into its own partition locks the parent) made tenant b's drop fail busy after 5 s
    (PE012). Now the drop locks b's partition only, empties it and leaves it to the next
    install: a's open work holds off nothing. (A read of pyembed.vectors itself locks every
    partition, b's too, and still holds off b's drop while its transaction is open.)"""
    fill(two["a"], A_KEY, 3).close()
    b = fill(two["b"], A_KEY, 3)
    b.create_corpus("gone", A_KEY).add([("g", "a text to drop")])
    with pyembed.connect(two["a"]) as a:
        a.conn.autocommit = False
        if open_work.endswith("search"):
            a.corpus("docs").search("shared words", k=3, mode=open_work.split()[0])
        else:
            with a.conn.cursor() as cur:
                copy_vectors(cur, corpus_info(a.conn, "docs").corpus_id, [], A_KEY,
                             np.zeros((0, 384), dtype=np.float32), [])
            a.corpus("docs").add([("new", "a text written in a's open transaction")])
            a.conn.execute("SELECT 1")
        assert a.conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        b.drop_corpus("gone")
        assert [c.name for c in b.corpora()] == ["docs"]
    b.close()


def test_a_read_of_the_parent_naming_its_corpus_holds_off_no_other_tenants_drop(
        two: dict[str, str]) -> None:
    """README: a read of pyembed.vectors itself locks every tenant's partition, unless it names
    its corpus (a literal corpus_id, or a parameter planned for its value): the planner prunes
    the other partitions before it locks them, and b's drop waits for nothing of a's read."""
    fill(two["a"], A_KEY, 2).close()
    b = fill(two["b"], A_KEY, 2)
    b.create_corpus("gone", A_KEY).add([("g", "a text to drop")])
    with psycopg.connect(two["a"]) as a:
        docs = a.execute("SELECT corpus_id FROM pyembed.corpora WHERE name = 'docs'").fetchone()
        assert docs is not None
        a.execute("SELECT count(*) FROM pyembed.vectors WHERE corpus_id = %s", docs)
        locked = a.execute("SELECT relation::regclass::text FROM pg_locks "
                           "WHERE pid = pg_backend_pid() AND relation::regclass::text "
                           "~ '^pyembed.vectors_c[0-9]+$'").fetchall()
        assert locked == [(f"pyembed.vectors_c{docs[0]}",)]
        b.drop_corpus("gone")  # (a's transaction is still open)
        assert a.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    assert [c.name for c in b.corpora()] == ["docs"]
    b.close()


@pytest.mark.parametrize("read", ["no corpus condition", "a sub-query's corpus_id",
                                  "a generic plan"])
def test_the_reads_of_the_parent_the_readme_warns_of_lock_every_tenants_partition(
        two: dict[str, str], read: str) -> None:
    """README ("Reading pyembed.vectors yourself"): a read of pyembed.vectors that does not name
    its corpus by a constant (none, a sub-query, a prepared statement's generic plan) locks
    every tenant's partition, b's included, until a's transaction ends, and b's drop then fails
    busy (PE012) after its 5 s (the README's two-session figures); the query it gives instead
    (the test above) locks a's alone. Checked in pg_locks, not by a drop's wait."""
    fill(two["a"], A_KEY, 2).close()
    b = fill(two["b"], A_KEY, 2)
    b.create_corpus("gone", A_KEY).add([("g", "a text to drop")])
    gone = b.conn.execute("SELECT corpus_id FROM pyembed.corpora WHERE name = 'gone'").fetchone()
    assert gone is not None
    with psycopg.connect(two["a"]) as a:
        if read == "a generic plan":
            a.execute("SET plan_cache_mode = force_generic_plan")
            a.execute("SELECT count(*) FROM pyembed.vectors WHERE corpus_id = %s", (1,),
                      prepare=True)
        else:
            a.execute("SELECT count(*) FROM pyembed.vectors" + (
                "" if read == "no corpus condition" else " WHERE corpus_id = (SELECT corpus_id "
                "FROM pyembed.corpora WHERE name = 'docs')"))
        assert a.execute("SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() "
                         "AND relation = %s::regclass", (f"pyembed.vectors_c{gone[0]}",)
                         ).fetchone() == (1,)
    b.close()
