"""What the application role writes to the usage and cache-count ledgers, and the prices it
registers, stay within what one call can count (revision 0024), so the reports that add the rows
up never overflow: before, two reservations of 2^63 - 1 tokens, two cache counts of as many
hits, or one token of a model priced 1e400 made usage_report / cache_report fail for the
tenant and for the owner, whose report adds every tenant's rows.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from pyembed.db import translate
from pyembed.errors import InvalidInput
from tests.conftest import Database
from tests.helpers import login_role, sql_error

FAKE = "fake/fake-hash@1:384"
BIG = 2**63 - 1
MOST = 2**31 - 1


def reports(conn: psycopg.Connection[Any]) -> None:
    """Every report over the ledgers runs."""
    for report in ("usage_report(30)", "cache_report(30)"):
        conn.execute(f"SELECT * FROM pyembed.{report}").fetchall()


def test_counts_past_one_calls_range_are_refused_and_reports_still_run(
        app: psycopg.Connection[Any], owner: psycopg.Connection[Any]) -> None:
    for _ in range(2):  # the tables' one rule (their CHECKs), in Python one InvalidInput
        err = sql_error(app, "SELECT pyembed.reserve_usage(%s, NULL, 1, %s)", (FAKE, BIG))
        assert "usage_tokens_in_range" in str(err), err
        assert "usage.tokens is out of the range" in str(translate(err))
        err = sql_error(app, "SELECT pyembed.cache_count(ARRAY[%s], ARRAY[%s::bigint], "
                             "ARRAY[0::bigint])", (FAKE, BIG))
        assert "cache_stats_counts_in_range" in str(err), err
        assert isinstance(translate(err), InvalidInput), err
    err = sql_error(owner, "SELECT pyembed.register_model('fake', 'pricey', '1', 4, "
                         "price_per_mtok => 1e400)")
    assert isinstance(err, psycopg.errors.CheckViolation) and "models_price_in_range" in str(err)
    # The most one call counts is taken, and many such rows still add up.
    for _ in range(3):
        app.execute("SELECT pyembed.reserve_usage(%s, NULL, 1, %s)", (FAKE, MOST))
        app.execute("SELECT pyembed.cache_count(ARRAY[%s], ARRAY[%s::bigint], ARRAY[%s::bigint])",
                    (FAKE, MOST, MOST))
    owner.execute("SELECT pyembed.register_model('fake', 'pricey', '1', 4, "
                "price_per_mtok => 1000000)")
    app.execute("SELECT pyembed.reserve_usage('fake/pricey@1:4', NULL, 1, %s)", (MOST,))
    for conn in (app, owner):
        reports(conn)
    row = app.execute("SELECT sum(tokens) FROM pyembed.usage_report(30)").fetchone()
    assert row == (4 * MOST,)


def test_the_table_checks_hold_for_the_owner_too(owner: psycopg.Connection[Any]) -> None:
    for statement in (
            "INSERT INTO pyembed.usage (tenant_id, corpus_id, model_key, minute, requests, "
            f"tokens, cost_usd) VALUES (0, 0, '{FAKE}', now(), 1, {MOST + 1}, 0)",
            "INSERT INTO pyembed.cache_stats (tenant_id, day, model_key, hits, misses) "
            f"VALUES (0, current_date, '{FAKE}', {MOST + 1}, 0)",
            "UPDATE pyembed.models SET price_per_mtok = 1000001 WHERE model_key = "
            f"'{FAKE}'"):
        with pytest.raises(psycopg.errors.CheckViolation, match="_in_range"):
            owner.execute(statement)


def test_another_tenants_rows_cannot_break_the_owners_report(db: Database,
                                                             owner: psycopg.Connection[Any]
                                                             ) -> None:
    owner.execute("INSERT INTO pyembed.tenants (name) VALUES ('acme')")
    with login_role(owner, db.app_dsn, "acme_app", sql.SQL("IN ROLE pyembed_app")) as dsn:
        owner.execute("INSERT INTO pyembed.tenant_members (role_name, tenant_id) "
                      "SELECT %s, tenant_id FROM pyembed.tenants WHERE name = 'acme'",
                      (conninfo_to_dict(dsn)["user"],))
        with psycopg.connect(dsn, autocommit=True) as acme:
            assert acme.execute("SELECT pyembed.current_tenant()").fetchone() != (None,)
            for _ in range(2):
                assert isinstance(sql_error(acme, "SELECT pyembed.reserve_usage(%s, NULL, 1, %s)",
                                            (FAKE, BIG)), psycopg.errors.CheckViolation)
            reports(acme)
        reports(owner)


# -- what a ledger row names: a model the registry has, or a reranker pyembed knows ------------
MODEL_KEY_COLUMNS_CHECKED_ELSEWHERE = {
    ("vectors", "model_key"): "the guard trigger: the corpus's active or target key (PE001)",
    ("queue", "model_key"): "pyembed._queue_keys_accepted: a key its corpus serves (PE001)",
    ("queue_failed", "model_key"): "a job moved from the queue (pyembed.fail_job, expire_jobs)",
}


def test_every_column_naming_a_model_is_checked_against_the_registry(
        owner: psycopg.Connection[Any]) -> None:
    """Walks every column of the schema that names a model or reranker, a new one included: it
    references pyembed.models, or a row trigger checks it (pyembed._ledger_key_known, or
    _reranker_known for the rerank cache), or it is listed above with what checks it."""
    columns = owner.execute(
        "SELECT c.relname, a.attname, "
        "EXISTS (SELECT FROM pg_constraint f WHERE f.conrelid = c.oid AND f.contype = 'f' "
        "        AND f.confrelid = 'pyembed.models'::regclass AND f.conkey = ARRAY[a.attnum]), "
        "(SELECT array_agg(t.tgfoid::regproc::text) FROM pg_trigger t WHERE t.tgrelid = c.oid "
        "  AND NOT t.tgisinternal AND t.tgtype & 1 = 1 AND t.tgtype & 2 = 2 "  # ROW, BEFORE
        "  AND t.tgtype & 4 = 4) "  # INSERT
        "FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 "
        "AND NOT a.attisdropped WHERE c.relnamespace = 'pyembed'::regnamespace "
        "AND c.relkind IN ('r', 'p') AND NOT c.relispartition AND c.relname <> 'models' "
        "AND (a.attname ~ '(model_key|_key)$' OR a.attname ~ 'reranker') "
        "AND a.attname <> 'cache_key' ORDER BY 1, 2").fetchall()
    assert {("usage", "model_key"), ("cache_stats", "model_key"),
            ("rerank_cache", "reranker")} <= {(t, c) for t, c, _, _ in columns}
    for table, column, referenced, triggers in columns:
        known = {"pyembed._reranker_known"} if column == "reranker" \
            else {"pyembed._ledger_key_known"}
        assert (referenced or known & set(triggers or ())
                or (table, column) in MODEL_KEY_COLUMNS_CHECKED_ELSEWHERE), (table, column)


@pytest.mark.parametrize("call", [
    "SELECT pyembed.reserve_usage('fake/nobody@1:4', NULL, 1, 1)",
    "SELECT pyembed.cache_count(ARRAY['fake/nobody@1:4'], ARRAY[1::bigint], ARRAY[0::bigint])",
    "SELECT pyembed.cache_count(ARRAY['nobody/rerank'], ARRAY[1::bigint], ARRAY[0::bigint])",
    "SELECT pyembed.rerank_cache_put(ARRAY[sha256('q')], 'nobody/rerank', ARRAY[0.5], 60)",
])
def test_a_recording_function_refuses_a_key_nobody_registered(
        app: psycopg.Connection[Any], owner: psycopg.Connection[Any], call: str) -> None:
    """Before, reserve_usage and cache_count wrote ledger rows for any key (usage and hit counts
    of nothing in the tenant's reports), and rerank_cache_put took any provider/model name."""
    err = sql_error(app, call)
    assert err.sqlstate == "PE006", err
    for ledger in ("usage", "cache_stats", "rerank_cache"):
        assert owner.execute(f"SELECT count(*) FROM pyembed.{ledger}").fetchone() == (0,)
    # a registered model's and a known reranker's rows are taken
    app.execute("SELECT pyembed.reserve_usage(%s, NULL, 1, 1)", (FAKE,))
    app.execute("SELECT pyembed.cache_count(ARRAY[%s, 'fake/overlap'], ARRAY[1::bigint, 1], "
                "ARRAY[0::bigint, 0])", (FAKE,))
    assert owner.execute("SELECT count(*) FROM pyembed.cache_stats").fetchone() == (2,)


def test_the_databases_rerankers_are_pyembeds(owner: psycopg.Connection[Any]) -> None:
    from pyembed.rerank import RERANKERS

    assert owner.execute("SELECT pyembed.rerankers()").fetchone() == (list(RERANKERS),)
