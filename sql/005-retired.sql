-- Signatures that changed: CREATE OR REPLACE cannot replace a function whose arguments changed,
-- so the old one is dropped here, before the files that create the new one.
DROP FUNCTION IF EXISTS pyembed.search_text(text, text, integer, jsonb);
DROP FUNCTION IF EXISTS pyembed._search_target(text, text);
DROP FUNCTION IF EXISTS pyembed.migration_cleanup(text);
DROP FUNCTION IF EXISTS pyembed._enqueue_chunk() CASCADE;  -- now a statement trigger
-- Vectors partitioned by corpus (revision 0006): the per-partition guard and statement
-- triggers replace these, and bulk loads COPY into the partition instead of a staging table.
DROP FUNCTION IF EXISTS pyembed._guard_vectors() CASCADE;
DROP FUNCTION IF EXISTS pyembed._dequeue_written() CASCADE;
DROP FUNCTION IF EXISTS pyembed.load_vectors();
-- One statement trigger deletes a deleted chunk's vectors and postings (pyembed._chunks_deleted).
DROP FUNCTION IF EXISTS pyembed._drop_chunk_vectors() CASCADE;
DROP FUNCTION IF EXISTS pyembed._unindex_chunks() CASCADE;
-- Searches grouped by document (group_by), and hybrid fusion options (fusion, alpha): issue 22.
DROP FUNCTION IF EXISTS pyembed.search(text, vector, text, integer, jsonb);
DROP FUNCTION IF EXISTS pyembed.search_keyword(text, text, integer, jsonb);
DROP FUNCTION IF EXISTS pyembed.search_hybrid(text, text, vector, text, integer, jsonb, integer,
                                              integer);
DROP FUNCTION IF EXISTS pyembed._search_text(text, text, integer, jsonb, text);
DROP FUNCTION IF EXISTS pyembed.search_text(text, text, integer, jsonb, text);
-- Storage per corpus (revision 0013): these gained a storage argument.
DROP FUNCTION IF EXISTS pyembed._index_spec(integer, text);
DROP FUNCTION IF EXISTS pyembed._vector_index_sql(integer, text, boolean);
DROP FUNCTION IF EXISTS pyembed.create_corpus(text, text, text, integer, integer);
-- create_corpus gained exist_ok (a script that creates its corpus can run again).
DROP FUNCTION IF EXISTS pyembed.create_corpus(text, text, text, integer, integer, text);
DROP FUNCTION IF EXISTS pyembed.migration_start(text, text);
-- BM25 that scores every posting when the query's postings are few (issue 22): a new argument.
DROP FUNCTION IF EXISTS pyembed._bm25(pyembed.corpora, text, integer, jsonb);
-- Keyword search by document scores documents' own postings (revision 0016): new arguments.
DROP FUNCTION IF EXISTS pyembed._bm25(pyembed.corpora, text, integer, jsonb, bigint);
DROP FUNCTION IF EXISTS pyembed._keyword_ranking(pyembed.corpora, text, integer, jsonb, text);
-- The vector ranking takes the corpus row its caller looked up (one lookup per search).
DROP FUNCTION IF EXISTS pyembed._vector_ranking(text, vector, text, integer, jsonb, text);
-- The vector leg returns its hits' scores too, then their document numbers (revision 0018):
-- same arguments, more OUT parameters.
DO $retired$
BEGIN
  IF EXISTS (SELECT FROM pg_catalog.pg_proc p
              WHERE p.pronamespace = 'pyembed'::regnamespace AND p.proname = '_nearest_in'
                AND NOT ('docs' = ANY (p.proargnames))) THEN
    DROP FUNCTION pyembed._nearest_in;
  END IF;
END
$retired$;
-- Hybrid search takes a keyword ranking made while the client embedded (issue 22, item 4).
DROP FUNCTION IF EXISTS pyembed.search_hybrid(text, text, vector, text, integer, jsonb, integer,
                                              integer, text, text, double precision);
DROP FUNCTION IF EXISTS pyembed._search_mode(text, text, text, vector, text, integer, jsonb,
                                             jsonb);
DROP FUNCTION IF EXISTS pyembed._search_arrays(text, text, text, vector, text, integer, jsonb,
                                               jsonb);
DROP FUNCTION IF EXISTS pyembed.search_embedded(text, text, vector, text, bytea, text, float8,
                                                integer, jsonb, text, jsonb, real, boolean,
                                                text[], bigint[], bigint[]);
-- The searches read their hits' texts with a query of their own, whose plan PL/pgSQL keeps.
DROP FUNCTION IF EXISTS pyembed._hits(integer, bigint[], double precision[], text);
-- BM25 scored from packed posting blocks (revision 0017): every_posting_upto went.
DROP FUNCTION IF EXISTS pyembed._bm25(pyembed.corpora, text, integer, jsonb, bigint, boolean);
-- Keyword passages are found for document numbers (revision 0018), not document ids.
DROP FUNCTION IF EXISTS pyembed._keyword_passages(pyembed.corpora, text, text[]);
-- halfvec's rule packs its index pages (pyembed._halfvec_m): the rule takes the storage.
DROP FUNCTION IF EXISTS pyembed.hnsw_rule(bigint, integer);
DROP FUNCTION IF EXISTS pyembed._index_params(jsonb, bigint, integer);
-- Hybrid search's vector leg: the documents among its candidates' nearest chunks (a new
-- argument, chunks).
DROP FUNCTION IF EXISTS pyembed._vector_ranking(pyembed.corpora, vector, text, integer, jsonb,
                                                text);
-- A setting's check takes any number (numeric: past bigint too), for Python's as well.
DROP FUNCTION IF EXISTS pyembed._check_setting(text, bigint);
-- A validation passes on fewer evaluation queries than pyembed.min_eval_queries() only when
-- forced: migration_validated gained that argument.
DROP FUNCTION IF EXISTS pyembed.migration_validated(text, jsonb, boolean);
-- The counts a SQL client gives (k, candidates, days, hours, queries, max_samples, chunk_tokens,
-- chunk_overlap) are numeric, so that a number past integer reaches its range check
-- (pyembed._count_arg): as integer it failed as "function ... does not exist".
DROP FUNCTION IF EXISTS pyembed.search(text, vector, text, integer, jsonb, text);
DROP FUNCTION IF EXISTS pyembed.search_text(text, text, integer, jsonb, text, text, text,
                                            double precision);
DROP FUNCTION IF EXISTS pyembed.search_keyword(text, text, integer, jsonb, text);
DROP FUNCTION IF EXISTS pyembed.keyword_ranking(text, text, integer, jsonb, text);
DROP FUNCTION IF EXISTS pyembed.search_hybrid(text, text, vector, text, integer, jsonb, integer,
                                              integer, text, text, double precision, bigint[],
                                              double precision[], text[]);
DROP FUNCTION IF EXISTS pyembed.search_reranked(text, text, text, integer, jsonb, text, integer,
                                                text, text, double precision);
DROP FUNCTION IF EXISTS pyembed.create_corpus(text, text, text, integer, integer, text, boolean);
DROP FUNCTION IF EXISTS pyembed.cache_report(integer) CASCADE;  -- cache_health: 075-health.sql
DROP FUNCTION IF EXISTS pyembed.usage_report(integer);
DROP FUNCTION IF EXISTS pyembed._report_window(integer, text);
DROP FUNCTION IF EXISTS pyembed.measure_recall(text, integer);
DROP FUNCTION IF EXISTS pyembed.recall_sampled(integer);
DROP FUNCTION IF EXISTS pyembed.recall_report(integer) CASCADE;  -- recall_health: as cache_health
-- The counts a DBA types in the owner's functions are numeric too (migration_shift's share,
-- register_model's dimensions and sizes, hnsw_rule's rows and dims): a number past integer
-- reached no check, "function ... does not exist".
DROP FUNCTION IF EXISTS pyembed.migration_shift(text, integer);
DROP FUNCTION IF EXISTS pyembed.hnsw_rule(bigint, integer, text);
DROP FUNCTION IF EXISTS pyembed.register_model(text, text, text, integer, text, boolean, boolean,
                                               integer, integer, integer, numeric, text);
-- The write's pre-check takes a lookup's documents at once (its bounds read once, not a
-- document at a time) and their longest chunks' bytes: pyembed._document_problems.
DROP FUNCTION IF EXISTS pyembed._document_problem(text, jsonb);
-- The worker's counts too (its batch size and attempts): `pyembed worker --batch-size
-- 2147483648` said only "integer out of range".
DROP FUNCTION IF EXISTS pyembed.claim_jobs(integer, integer, double precision, text[]);
DROP FUNCTION IF EXISTS pyembed.expire_jobs(integer);
DROP FUNCTION IF EXISTS pyembed._job_bounds(integer, double precision);
-- A search's hits as arrays from its corpus row, its ranking called directly (no search function,
-- no second lookup): pyembed._ranked_hits.
DROP FUNCTION IF EXISTS pyembed._search_arrays(text, text, text, vector, text, integer, jsonb,
                                               jsonb, bigint[], float8[], text[]);
DROP FUNCTION IF EXISTS pyembed._search_mode(text, text, text, vector, text, integer, jsonb,
                                             jsonb, bigint[], float8[], text[]);
-- keyword_ranking finds the passages of its best documents (`passages`), beside the embedding.
DROP FUNCTION IF EXISTS pyembed.keyword_ranking(text, text, numeric, jsonb, text);
-- The cache purges gained older_than_days (an age bound a scheduled purge keeps the caches to).
DROP FUNCTION IF EXISTS pyembed.cache_purge(text, boolean);
DROP FUNCTION IF EXISTS pyembed.rerank_cache_purge(text, boolean);
-- Who may act for a tenant it names: superusers, and now the operator's logins
-- (pyembed._session_acts_for_tenants).
DROP FUNCTION IF EXISTS pyembed._session_is_superuser();
