"""Storage and HNSW settings per corpus: vector, halfvec or binary, and the owner's overrides.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04

`storage` says how a corpus's HNSW index holds its vectors: `vector` (float32, as before),
`halfvec` (float16: half the index) or `binary` (the sign bits, bit(n) with Hamming distance;
searches rescore the top candidates exactly from the float32 vectors). The table keeps every
vector in float32 whatever the storage: binary searches rescore from it, and exact searches
(recall checks, the scan over 4,000 dimensions) read it. `target_storage` is the storage of a
model migration's target key, which becomes `storage` when the migration completes.
`index_settings` holds the owner's overrides of pyembed's rule (pyembed.hnsw_rule): m,
ef_construction, ef_search, oversample. Existing corpora keep their indexes (m 16,
ef_construction 64, the rule's first tier) and storage `vector`.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    run_sql("""
ALTER TABLE pyembed.corpora
  ADD COLUMN storage text NOT NULL DEFAULT 'vector'
    CONSTRAINT corpora_storage_known CHECK (storage IN ('vector', 'halfvec', 'binary')),
  ADD COLUMN target_storage text
    CONSTRAINT corpora_target_storage_known
      CHECK (target_storage IN ('vector', 'halfvec', 'binary')),
  ADD COLUMN index_settings jsonb NOT NULL DEFAULT '{}'
    CONSTRAINT corpora_index_settings_object CHECK (jsonb_typeof(index_settings) = 'object');
""")


def downgrade() -> None:
    run_sql("""
ALTER TABLE pyembed.corpora DROP COLUMN index_settings, DROP COLUMN target_storage,
  DROP COLUMN storage;
""")
