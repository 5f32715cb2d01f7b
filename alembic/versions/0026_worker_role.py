"""The worker role: the provider error counters are counted by pyembed and its workers only.

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-05

pyembed.count_provider_error was granted to the application role: any tenant could add to the
failed-call counters every tenant and the Prometheus endpoint read (pyembed.provider_errors()),
with any provider and kind, as often as it liked. The calls worth counting are those made with
the operator's keys: inside the database (pyembed's SECURITY DEFINER functions, which run as
their owner and count without a grant) and by `pyembed worker`. The NOLOGIN role pyembed_worker
(made here if the cluster has none; roles are the cluster's, so the downgrade leaves it) is the
worker's: sql/080-grants.sql grants it the counting function, and an operator grants the role to
the login its workers use. A client's own provider calls (with its own keys) are not counted.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0026"
down_revision: str | Sequence[str] | None = "0025"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql("""
DO $roles$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'pyembed_worker') THEN
    CREATE ROLE pyembed_worker NOLOGIN;
  END IF;
END $roles$;
""")


def downgrade() -> None:
    # As sql/080-grants.sql granted them before this revision.
    run_sql("""
REVOKE USAGE ON SCHEMA pyembed FROM pyembed_worker;
REVOKE EXECUTE ON FUNCTION pyembed.count_provider_error(text, text) FROM pyembed_worker;
GRANT EXECUTE ON FUNCTION pyembed.count_provider_error(text, text) TO pyembed_app;
""")
