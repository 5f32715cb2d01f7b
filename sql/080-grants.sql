-- Privileges, granted on purpose: the application role never reads vectors directly.
REVOKE ALL ON ALL TABLES IN SCHEMA pyembed FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pyembed FROM PUBLIC;
-- Revoked first, so that the schema's grants are listed in this order whichever revision
-- granted one before (0005 grants the owner's): an upgrade's schema equals an install's.
REVOKE USAGE ON SCHEMA pyembed FROM pyembed_app, pyembed_owner, pyembed_worker;
GRANT USAGE ON SCHEMA pyembed TO pyembed_app, pyembed_owner;
-- The tables' owner role runs the foreign-key checks and is bound by the tenant policies.
GRANT EXECUTE ON FUNCTION pyembed.current_tenant(), pyembed.visible_corpora() TO pyembed_owner;
-- No sequence: an identity column's insert takes its number without USAGE on the sequence (as
-- documents.doc_no always did), and with USAGE a tenant could nextval chunks_chunk_id_seq, every
-- tenant's, to count their chunk writes. Revoked where an older install granted it.
REVOKE ALL ON ALL SEQUENCES IN SCHEMA pyembed FROM pyembed_app;
-- The application, worker and operator groups hold no predefined role that reads past the tenant
-- policies:
-- pg_read_all_stats (and pg_monitor, which holds it) shows every session's statement, other
-- tenants' texts and queries included, and pg_read_all_data every table's rows, vectors and
-- secrets included; nor pg_write_all_data, whose table-level UPDATE and DELETE on every table let
-- a tenant LOCK any of them in any mode (below). `pyembed db replica add` granted pg_monitor to
-- pyembed_app for the replicas' lag, which pyembed.replica_lag() now gives: revoked from a
-- database where it was granted.
DO $revoke$
DECLARE
  m record;
BEGIN
  FOR m IN SELECT r.rolname AS granted, g.rolname AS grp
             FROM pg_catalog.pg_auth_members a
             JOIN pg_catalog.pg_roles r ON r.oid = a.roleid
             JOIN pg_catalog.pg_roles g ON g.oid = a.member
            WHERE r.rolname IN ('pg_monitor', 'pg_read_all_stats', 'pg_read_all_data',
                                'pg_write_all_data')
              AND g.rolname IN ('pyembed_app', 'pyembed_worker', 'pyembed_operator')
  LOOP
    EXECUTE format('REVOKE %I FROM %I', m.granted, m.grp);
  END LOOP;
END $revoke$;

-- Each grant is what a documented operation of the application role needs; row-level security
-- keeps it to its tenant's rows. The cache, its counts and usage are ledgers it must not write
-- (nor read: the cache holds vectors) other than through their functions: no privilege at all.
-- tests/golden/privileges.txt records the result.
GRANT SELECT ON pyembed.models, pyembed.corpora, pyembed.migrations, pyembed.migration_events
  TO pyembed_app;
-- No table-level UPDATE, DELETE or TRUNCATE on any table: any of them lets a role LOCK the table
-- in every mode, and the tables are every tenant's (one tenant's `LOCK pyembed.documents IN
-- ACCESS EXCLUSIVE MODE` stalled every other's searches and writes until it ended). SELECT
-- allows ACCESS SHARE, INSERT ROW EXCLUSIVE, a column's UPDATE no LOCK at all; rows are deleted
-- through pyembed.delete_documents, delete_chunks, delete_failures, delete_eval_queries and
-- _clear_vectors, which apply the caller's tenant themselves. REVOKE ALL first: see below.
REVOKE ALL ON pyembed.eval_queries FROM pyembed_app;
GRANT SELECT, INSERT, UPDATE (query_id, query, relevant)
  ON pyembed.eval_queries TO pyembed_app;
-- Documents and chunks: written, but not what the database numbers them by (doc_no, chunk_id:
-- identities, positive; the keyword index's blocks, the vectors' doc_no, postings and queued
-- work hang on them) nor the corpus a row belongs to. (A chunk's content_hash is computed again
-- by pyembed._chunk_hash whatever the writer gives.) REVOKE first: a table grant covers every
-- column, and revoking it revokes the column grants too, so this re-applies the same.
REVOKE INSERT, UPDATE, DELETE ON pyembed.documents, pyembed.chunks FROM pyembed_app;
GRANT SELECT ON pyembed.documents, pyembed.chunks TO pyembed_app;
-- A document's updated_at is set by pyembed._document_stamped (015-chunks.sql): not granted.
GRANT INSERT (corpus_id, document_id, content_hash, title, metadata),
      UPDATE (document_id, content_hash, title, metadata)
  ON pyembed.documents TO pyembed_app;
GRANT INSERT (corpus_id, document_id, chunk_index, content, content_hash, metadata),
      UPDATE (document_id, chunk_index, content, content_hash, metadata)
  ON pyembed.chunks TO pyembed_app;
-- Chunk writes queue their work as the writer; a vector's write dequeues it (DELETE); the worker
-- claims, renews, retries and releases jobs through pyembed.claim_jobs, renew_jobs, retry_jobs
-- and release_jobs, and writes only those its claim still holds (hold_jobs) (a job's attempts decide when it expires, its last error is the failure
-- expire_jobs records: no UPDATE of them by the caller), and moves failed jobs aside through
-- pyembed.fail_job and expire_jobs, the one way a failure row is written (it is a queued job,
-- moved); failures are read, and cleared through pyembed.delete_failures. A queued key is checked by
-- pyembed._queue_keys_accepted (PE001). A job is made by the chunk write
-- (pyembed._enqueue_chunks, as its owner) and ends with its vector's write (_dequeue_written, as
-- its owner) or its chunk's deletion: the application role reads jobs, never deletes one (work
-- dropped that way left a chunk without a vector and nothing to say so). REVOKE first: see above.
REVOKE ALL ON pyembed.queue FROM pyembed_app;
GRANT SELECT ON pyembed.queue TO pyembed_app;
REVOKE ALL ON pyembed.queue_failed FROM pyembed_app;
GRANT SELECT ON pyembed.queue_failed TO pyembed_app;
-- The query log is read, and written only by pyembed.record_search (a search's own record, with
-- the corpus it checks is the caller's): a line the caller wrote itself was another figure of
-- pyembed.latency and another number of the one sequence every tenant's searches share.
-- REVOKE ALL first: revoking the table's INSERT leaves its column grants.
REVOKE ALL ON pyembed.query_log FROM pyembed_app;
GRANT SELECT ON pyembed.query_log TO pyembed_app;
REVOKE ALL ON pyembed.embedding_cache, pyembed.cache_stats, pyembed.usage, pyembed.rerank_cache
  FROM pyembed_app;
GRANT SELECT ON pyembed.coverage, pyembed.throughput, pyembed.cache_health, pyembed.latency,
  pyembed.recall_health, pyembed.migration_report TO pyembed_app;
-- Vectors: write (guarded) into the corpus's own partition, see which chunks have one, never
-- read the embedding. Each corpus's partition grants INSERT alone, for COPY, to its tenant's
-- logins (pyembed._partition_writers); the parent none: its INSERT let any tenant LOCK it in ROW
-- EXCLUSIVE mode, which locks every tenant's partition. No UPDATE: a vector is
-- replaced by delete and insert (pyembed.vectors.copy_vectors does), so its text hash is always
-- written with its embedding, and its created_at is the server's (pyembed._vector_document).
-- REVOKE ALL first: it also revokes the column grants of a database upgraded from before.
REVOKE ALL ON pyembed.vectors FROM pyembed_app;
GRANT SELECT (corpus_id, chunk_id, model_key, content_hash, created_at) ON pyembed.vectors
  TO pyembed_app;

GRANT EXECUTE ON FUNCTION
  pyembed.search(text, vector, text, numeric, jsonb, text),
  pyembed.create_corpus(text, text, text, numeric, numeric, text, boolean),
  pyembed.drop_corpus(text),
  pyembed._vector_check(integer, bigint, text, vector),
  pyembed.current_tenant(),
  pyembed.visible_corpora(),
  pyembed.lookup_corpus(text),
  pyembed._setting_range(text),
  pyembed._index_name(integer, text),
  pyembed._vector_counts(),
  pyembed._check_setting(text, numeric),
  pyembed.version(),
  pyembed.code_digest(),
  pyembed.sql_digest(),
  pyembed.min_eval_queries(),
  pyembed._eval_queries_enough(integer, boolean),
  pyembed.vector_table(text),
  pyembed.begin_bulk_load(text),
  pyembed.end_bulk_load(text),
  pyembed.unindexed_corpora(),
  pyembed.cache_get(bytea[]),
  pyembed.cache_put(bytea[], text, text, vector[], float8),
  pyembed.cache_count(text[], bigint[], bigint[]),
  pyembed.cache_report(numeric),
  pyembed.cache_purge(text, boolean, numeric),
  pyembed.rerank_cache_get(bytea[]),
  pyembed.rerank_cache_put(bytea[], text, float8[], float8),
  pyembed.rerank_cache_purge(text, boolean, numeric),
  pyembed._clear_vectors(integer, text, bigint, bigint, bigint[]),
  pyembed.delete_documents(text, text[]),
  pyembed.delete_chunks(text, text[], integer[]),
  pyembed.delete_failures(text, bigint[]),
  pyembed.delete_eval_queries(text, text[]),
  pyembed._dequeue_written(integer, text, bigint, bigint, bytea[]),
  pyembed.expire_jobs(numeric),
  pyembed.fail_job(integer, bigint, text, bytea, integer, text),
  pyembed.claim_jobs(numeric, numeric, float8, text[]),
  pyembed.renew_jobs(float8, integer[], bigint[], text[], integer[]),
  pyembed.retry_jobs(text, integer[], bigint[], text[], bytea[], integer[], float8[]),
  pyembed.release_jobs(integer[], bigint[], text[], integer[]),
  pyembed.queue_by_tenant(numeric, text[], float8),
  pyembed.acting_tenants(),
  pyembed.hold_jobs(integer, text, bigint[], bytea[], integer[]),
  pyembed._document_id_problem(text),
  pyembed._write_bounds(),
  pyembed._document_problems(text[], jsonb[], bigint[]),
  pyembed._document_size_problem(integer, text, bigint, bigint),
  pyembed.reserve_usage(text, integer, integer, bigint),
  pyembed.usage_report(numeric),
  pyembed.provider_errors(),
  pyembed.embed(text, text, text),
  pyembed.embed_batch(text[], text, text),
  pyembed.search_text(text, text, numeric, jsonb, text, text, text, double precision),
  pyembed.search_reranked(text, text, text, numeric, jsonb, text, numeric, text, text,
                           double precision),
  pyembed.search_keyword(text, text, numeric, jsonb, text),
  pyembed.search_hybrid(text, text, vector, text, numeric, jsonb, numeric, numeric, text, text,
                        double precision, bigint[], float8[], text[]),
  pyembed.keyword_ranking(text, text, numeric, jsonb, text, numeric),
  pyembed.add_document(text, text, text, jsonb),
  pyembed.search_query(text, text, integer, text[], bytea[], integer, jsonb, text, jsonb,
                       integer, boolean, text[], bigint[], bigint[]),
  pyembed.search_embedded(text, text, vector, text, bytea, text, float8, integer, jsonb, text,
                          jsonb, real, boolean, text[], bigint[], bigint[], bigint[], float8[],
                          text[]),
  pyembed.reserve_query(integer, text, bytea, integer),
  pyembed.measure_recall(text, numeric),
  pyembed.recall_sampled(numeric),
  pyembed.recall_report(numeric),
  pyembed.replica_lag(),
  pyembed.record_search(integer, text, text, integer, boolean, real, real, real, real, bytea,
                        text, vector, float8, jsonb, text[], bigint[], bigint[])
  TO pyembed_app;
-- A failed provider call is counted by pyembed's own functions (they run as their owner) and by
-- `pyembed worker`, whose login the operator makes a member of pyembed_worker: the counters are
-- every tenant's and the metrics endpoint's, and the application role could add any count.
REVOKE EXECUTE ON FUNCTION pyembed.count_provider_error(text, text) FROM pyembed_app;
GRANT USAGE ON SCHEMA pyembed TO pyembed_worker;
GRANT EXECUTE ON FUNCTION pyembed.count_provider_error(text, text) TO pyembed_worker;
-- The model registry is the operator's, like the tenants: every tenant's corpora use a key's row
-- (its vector space, price and batch bounds), so a tenant that registered a key first would set
-- them for all. Revoked by name: a database upgraded from when it was granted keeps the grant.
REVOKE EXECUTE ON FUNCTION pyembed.register_model(text, text, text, numeric, text, boolean,
  boolean, numeric, numeric, numeric, numeric, text) FROM pyembed_app;
-- Model migrations are the DBA's: granted to nobody, run as the owner.
-- pyembed.secrets and pyembed.set_secret stay the owner's: REVOKE above, no GRANT.
