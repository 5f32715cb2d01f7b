"""The pyembed schema: models, corpora, documents, chunks, vectors, cache, queue, migrations.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

Tables and indexes only: functions, triggers, views and grants live in sql/ and are
(re)applied after every upgrade to head.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyembed.schema import run_sql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


UPGRADE = r"""
CREATE EXTENSION IF NOT EXISTS vector WITH SCHEMA public;
CREATE EXTENSION IF NOT EXISTS plpython3u;

DO $roles$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'pyembed_app') THEN
    CREATE ROLE pyembed_app NOLOGIN;
  END IF;
END $roles$;

CREATE TABLE pyembed.models (
  model_key          text PRIMARY KEY,
  provider           text NOT NULL,
  model_id           text NOT NULL,
  model_version      text NOT NULL,
  dimensions         integer NOT NULL CHECK (dimensions BETWEEN 1 AND 16000),
  distance           text NOT NULL DEFAULT 'cosine' CHECK (distance IN ('cosine', 'dot', 'l2')),
  normalized         boolean NOT NULL DEFAULT true,
  input_types        boolean NOT NULL DEFAULT false,
  max_batch          integer NOT NULL DEFAULT 128 CHECK (max_batch > 0),
  max_tokens         integer NOT NULL DEFAULT 8192 CHECK (max_tokens > 0),
  request_dimensions integer CHECK (request_dimensions > 0),
  price_per_mtok     numeric,
  description        text NOT NULL DEFAULT '',
  created_at         timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT models_key_is_parts CHECK (
    model_key = provider || '/' || model_id || '@' || model_version || ':' || dimensions)
);

CREATE TABLE pyembed.corpora (
  corpus_id        integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  name             text NOT NULL UNIQUE CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
  model_key        text NOT NULL REFERENCES pyembed.models,
  target_model_key text REFERENCES pyembed.models,
  migration_step   text NOT NULL DEFAULT 'none' CHECK (migration_step IN
                     ('none', 'started', 'backfilled', 'validated', 'shifting')),
  traffic_share    smallint NOT NULL DEFAULT 0 CHECK (traffic_share BETWEEN 0 AND 100),
  chunk_tokens     integer NOT NULL DEFAULT 200 CHECK (chunk_tokens > 0),
  chunk_overlap    integer NOT NULL DEFAULT 40 CHECK (chunk_overlap >= 0),
  description      text NOT NULL DEFAULT '',
  created_at       timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT corpora_target_differs CHECK (target_model_key <> model_key),
  CONSTRAINT corpora_share_needs_target CHECK (target_model_key IS NOT NULL OR traffic_share = 0),
  CONSTRAINT corpora_overlap_below_size CHECK (chunk_overlap < chunk_tokens)
);

CREATE TABLE pyembed.documents (
  corpus_id    integer NOT NULL REFERENCES pyembed.corpora ON DELETE CASCADE,
  document_id  text NOT NULL CHECK (length(document_id) BETWEEN 1 AND 512),
  content_hash bytea NOT NULL,
  title        text,
  metadata     jsonb NOT NULL DEFAULT '{}',
  updated_at   timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (corpus_id, document_id)
);

CREATE TABLE pyembed.chunks (
  corpus_id    integer NOT NULL,
  chunk_id     bigint GENERATED ALWAYS AS IDENTITY,
  document_id  text NOT NULL,
  chunk_index  integer NOT NULL CHECK (chunk_index >= 0),
  content      text NOT NULL CHECK (content ~ '\S'),
  content_hash bytea NOT NULL,
  metadata     jsonb NOT NULL DEFAULT '{}',
  PRIMARY KEY (corpus_id, chunk_id),
  UNIQUE (corpus_id, document_id, chunk_index),
  FOREIGN KEY (corpus_id, document_id) REFERENCES pyembed.documents ON DELETE CASCADE
);

-- Checked per row before any index sees the vector (an HNSW expression index would otherwise
-- fail first with a bare "expected N dimensions"). The key ends with its dimensions.
CREATE FUNCTION pyembed._dims_match(embedding vector, model_key text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
  IF vector_dims(embedding) = split_part(model_key, ':', -1)::integer THEN
    RETURN true;
  END IF;
  RAISE EXCEPTION USING ERRCODE = 'PE003',
    MESSAGE = format('wrong dimensions: %s has %s dimensions, the vector has %s',
                     model_key, split_part(model_key, ':', -1), vector_dims(embedding));
END
$$;

CREATE TABLE pyembed.vectors (
  corpus_id    integer NOT NULL,
  chunk_id     bigint NOT NULL,
  model_key    text NOT NULL,
  embedding    vector NOT NULL,
  content_hash bytea,
  created_at   timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (corpus_id, chunk_id, model_key),
  FOREIGN KEY (corpus_id, chunk_id) REFERENCES pyembed.chunks ON DELETE CASCADE,
  CONSTRAINT vectors_dims_match_model CHECK (pyembed._dims_match(embedding, model_key))
);

CREATE TABLE pyembed.embedding_cache (
  cache_key  bytea PRIMARY KEY CHECK (length(cache_key) = 32),
  model_key  text NOT NULL,
  input_type text NOT NULL CHECK (input_type IN ('document', 'query')),
  embedding  vector NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  expires_at timestamptz
);
CREATE INDEX embedding_cache_model ON pyembed.embedding_cache (model_key);
CREATE INDEX embedding_cache_expiry ON pyembed.embedding_cache (expires_at)
  WHERE expires_at IS NOT NULL;

CREATE TABLE pyembed.cache_stats (
  day       date NOT NULL DEFAULT current_date,
  model_key text NOT NULL,
  hits      bigint NOT NULL DEFAULT 0,
  misses    bigint NOT NULL DEFAULT 0,
  PRIMARY KEY (day, model_key)
);

CREATE TABLE pyembed.queue (
  corpus_id    integer NOT NULL,
  chunk_id     bigint NOT NULL,
  model_key    text NOT NULL,
  content_hash bytea NOT NULL,
  attempts     integer NOT NULL DEFAULT 0,
  last_error   text,
  not_before   timestamptz NOT NULL DEFAULT now(),
  enqueued_at  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (corpus_id, chunk_id, model_key),
  FOREIGN KEY (corpus_id, chunk_id) REFERENCES pyembed.chunks ON DELETE CASCADE
);
CREATE INDEX queue_ready ON pyembed.queue (not_before);

CREATE TABLE pyembed.queue_failed (
  corpus_id    integer NOT NULL,
  chunk_id     bigint NOT NULL,
  model_key    text NOT NULL,
  content_hash bytea NOT NULL,
  attempts     integer NOT NULL,
  reason       text NOT NULL,
  failed_at    timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (corpus_id, chunk_id, model_key),
  FOREIGN KEY (corpus_id, chunk_id) REFERENCES pyembed.chunks ON DELETE CASCADE
);

CREATE TABLE pyembed.migrations (
  migration_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  corpus_id    integer NOT NULL REFERENCES pyembed.corpora ON DELETE CASCADE,
  from_key     text NOT NULL REFERENCES pyembed.models,
  to_key       text NOT NULL REFERENCES pyembed.models,
  state        text NOT NULL CHECK (state IN ('started', 'backfilled', 'validated', 'shifting',
                 'completed', 'rolled_back', 'cleaned')),
  validation   jsonb,
  started_at   timestamptz NOT NULL DEFAULT now(),
  finished_at  timestamptz
);
CREATE UNIQUE INDEX migrations_one_open_per_corpus ON pyembed.migrations (corpus_id)
  WHERE state NOT IN ('completed', 'rolled_back', 'cleaned');

CREATE TABLE pyembed.migration_events (
  event_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  migration_id bigint NOT NULL REFERENCES pyembed.migrations ON DELETE CASCADE,
  step         text NOT NULL,
  detail       jsonb NOT NULL DEFAULT '{}',
  at           timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE pyembed.eval_queries (
  corpus_id integer NOT NULL REFERENCES pyembed.corpora ON DELETE CASCADE,
  query_id  text NOT NULL,
  query     text NOT NULL CHECK (query ~ '\S'),
  relevant  text[] NOT NULL CHECK (cardinality(relevant) > 0),
  PRIMARY KEY (corpus_id, query_id)
);

CREATE TABLE pyembed.query_log (
  query_log_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  corpus_id    integer NOT NULL,
  model_key    text NOT NULL,
  kind         text NOT NULL,
  k            integer NOT NULL,
  cache_hit    boolean,
  embed_ms     real,
  search_ms    real,
  generate_ms  real,
  total_ms     real,
  at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX query_log_at ON pyembed.query_log (at);
"""

DOWNGRADE = r"""
DO $drop$ DECLARE f regprocedure; BEGIN
  -- Functions from sql/ live in this schema too; dropping the tables alone would leave them.
  FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
           WHERE p.pronamespace = 'pyembed'::regnamespace AND p.prokind = 'f'
             AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d
                              WHERE d.classid = 'pg_catalog.pg_proc'::regclass
                                AND d.objid = p.oid AND d.deptype = 'e') LOOP
    EXECUTE format('DROP FUNCTION %s CASCADE', f);
  END LOOP;
END $drop$;
REVOKE ALL ON SCHEMA pyembed FROM pyembed_app;
DROP TABLE pyembed.query_log, pyembed.eval_queries, pyembed.migration_events,
  pyembed.migrations, pyembed.queue_failed, pyembed.queue, pyembed.cache_stats,
  pyembed.embedding_cache, pyembed.vectors, pyembed.chunks, pyembed.documents,
  pyembed.corpora, pyembed.models CASCADE;
"""


def upgrade() -> None:
    run_sql(UPGRADE)


def downgrade() -> None:
    run_sql(DOWNGRADE)
