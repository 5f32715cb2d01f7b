"""Maintenance locks the corpus row FOR NO KEY UPDATE, before any relation: no deadlock with
the searches, writes and measurements that run beside it.

Revision ID: 0021
Revises: 0018
Create Date: 2026-12-04

The online index swap (pyembed._swap_vector_index) and every migration step locked the corpus
row FOR UPDATE, which also waits for (and holds off) every row written for the corpus: those
whose foreign key locks the corpus row FOR KEY SHARE (a search's recall sample, a recall
measurement, a document). Such rows are written by transactions that already hold the corpus's
partition (a search records after it has searched), while the step, holding the row, waited for
the partition (dropping an index, or the constraint that follows a key change): a deadlock, and
one of the two failed. The steps now take FOR NO KEY UPDATE (no key of the row changes; steps of
one corpus still take turns), pyembed.rebuild_index and pyembed.set_index_settings take the row
before anything else too (the build locked the partition before the swap took the row; the
settings were merged into a stale read, so that one of two concurrent calls was lost), a
migration's complete and rollback remove queued jobs before their key change locks the
partition (writers lock the jobs of a chunk they change, then its partition), and
migration_backfilled locks the partition only when it has an index to build.

Functions only: sql/ is applied again after the upgrade; the bodies work at the older
revisions too, so the downgrade leaves them to the older package's own install.
"""

from __future__ import annotations

from collections.abc import Sequence

revision: str = "0021"
down_revision: str | Sequence[str] | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Nothing but the sql/ files, which every upgrade to head applies again."""


def downgrade() -> None:
    """Nothing: the older package's install brings its own functions back."""
