"""A query-log line holds timings that are durations and a k of at least one; a registered
model's provider is one pyembed can call.

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-04

The application role records its own searches in pyembed.query_log (pyembed.record_search, and
Corpus.log_query's INSERT), and the table took any real: a line with a NaN or infinite embed_ms
made the latency view's percentiles NaN and `pyembed status` fail with a traceback for every
user of the database, a negative one moved them; k took 0 and negative numbers. As with model
prices (revision 0019), `x < 'Infinity'` also refuses NaN (PostgreSQL orders NaN above every
number). Lines already stored outside these bounds lose the timing (NULL: not measured) or, for
k, the line.

pyembed.register_model (granted to the application role) took any provider name, and a corpus on
such a model took documents no worker could embed. The registry now names the providers pyembed
has (pyembed/providers: a new one comes with a revision); NOT VALID, so a model already
registered with another provider stays (its corpora keep their data), while no new one can be.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0021"
down_revision: str | Sequence[str] | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMINGS = ("embed_ms", "search_ms", "generate_ms", "total_ms")
PROVIDERS = ("voyage", "openai", "cohere", "local", "fake")


def upgrade() -> None:
    run_sql("\n".join(
        [f"UPDATE pyembed.query_log SET {c} = NULL WHERE NOT ({c} >= 0 AND {c} < 'Infinity');"
         for c in TIMINGS]
        + ["DELETE FROM pyembed.query_log WHERE k < 1;",
           "ALTER TABLE pyembed.query_log ADD CONSTRAINT query_log_k_check CHECK (k >= 1);"]
        + [f"ALTER TABLE pyembed.query_log ADD CONSTRAINT query_log_{c}_check\n"
           f"  CHECK ({c} >= 0 AND {c} < 'Infinity');" for c in TIMINGS]
        + ["ALTER TABLE pyembed.models ADD CONSTRAINT models_provider_check\n"
           f"  CHECK (provider IN ({', '.join(repr(p) for p in PROVIDERS)})) NOT VALID;"]))


def downgrade() -> None:
    run_sql("ALTER TABLE pyembed.models DROP CONSTRAINT IF EXISTS models_provider_check;")
    run_sql("\n".join(f"ALTER TABLE pyembed.query_log DROP CONSTRAINT IF EXISTS query_log_{c}_check;"
                      for c in ("k", *TIMINGS)))
