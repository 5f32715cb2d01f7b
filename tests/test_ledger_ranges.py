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
    for _ in range(2):
        err = sql_error(app, "SELECT pyembed.reserve_usage(%s, NULL, 1, %s)", (FAKE, BIG))
        assert err.sqlstate == "PE005" and "0 to 2147483647" in str(err), err
        err = sql_error(app, "SELECT pyembed.cache_count(ARRAY[%s], ARRAY[%s::bigint], "
                             "ARRAY[0::bigint])", (FAKE, BIG))
        assert err.sqlstate == "PE005" and "0 to 2147483647" in str(err), err
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
                assert sql_error(acme, "SELECT pyembed.reserve_usage(%s, NULL, 1, %s)",
                                 (FAKE, BIG)).sqlstate == "PE005"
            reports(acme)
        reports(owner)
