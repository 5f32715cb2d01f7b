-- Keyword search: BM25 (k1 1.2, b 0.75) over the tsvector lexemes of each chunk, with term and
-- document frequencies kept in tables by triggers, and hybrid search by reciprocal rank fusion.
-- (PL/pgSQL plans a statement when it first runs it, so each branch may name only the
-- transition tables its trigger event has.)

-- SECURITY DEFINER: the application role writes chunks but has no access to the index tables.
-- work_mem: a batch's postings (~13 a chunk) are sorted by chunk in memory, not on disk.
CREATE OR REPLACE FUNCTION pyembed._index_chunks() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET work_mem = '64MB'
AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO pyembed.postings (corpus_id, lexeme, chunk_id, tf, doc_len)
    SELECT n.corpus_id, t.lexeme, n.chunk_id, t.tf, sum(t.tf) OVER (PARTITION BY n.chunk_id)
      FROM new_rows n
      JOIN pyembed.corpora c ON c.corpus_id = n.corpus_id
      CROSS JOIN LATERAL (
        SELECT u.lexeme, coalesce(array_length(u.positions, 1), 1) AS tf
          FROM unnest(to_tsvector(c.text_config, n.content)) u) t;
  ELSE
    CREATE TEMP TABLE IF NOT EXISTS pyembed_changed (corpus_id integer, chunk_id bigint,
                                                     content text) ON COMMIT DELETE ROWS;
    INSERT INTO pyembed_changed
    SELECT n.corpus_id, n.chunk_id, n.content FROM new_rows n JOIN old_rows o
        ON o.corpus_id = n.corpus_id AND o.chunk_id = n.chunk_id
     WHERE o.content_hash IS DISTINCT FROM n.content_hash;
    DELETE FROM pyembed.postings p USING pyembed_changed x
     WHERE p.corpus_id = x.corpus_id AND p.chunk_id = x.chunk_id;
    INSERT INTO pyembed.postings (corpus_id, lexeme, chunk_id, tf, doc_len)
    SELECT x.corpus_id, t.lexeme, x.chunk_id, t.tf, sum(t.tf) OVER (PARTITION BY x.chunk_id)
      FROM pyembed_changed x
      JOIN pyembed.corpora c ON c.corpus_id = x.corpus_id
      CROSS JOIN LATERAL (
        SELECT u.lexeme, coalesce(array_length(u.positions, 1), 1) AS tf
          FROM unnest(to_tsvector(c.text_config, x.content)) u) t;
    DELETE FROM pyembed_changed;
  END IF;
  RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER chunks_keyword_insert
  AFTER INSERT ON pyembed.chunks REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._index_chunks();
CREATE OR REPLACE TRIGGER chunks_keyword_update
  AFTER UPDATE ON pyembed.chunks REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._index_chunks();

-- Deleting chunks deletes their postings: pyembed._chunks_deleted in 010-guards.sql.

-- Document frequencies and corpus totals follow the postings. Each statement that writes
-- postings records its counts in keyword_pending, a row of its own (no lock anyone else needs);
-- pyembed._apply_keyword_counts folds a transaction's counts into the counters when it commits,
-- in one statement sorted by corpus and lexeme, so that writers hold counter rows only while
-- committing and always take them in the same order (no deadlock). Until then, a transaction's
-- own searches score its new chunks with the counts committed before it.
CREATE OR REPLACE FUNCTION pyembed._count_postings() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO pyembed.keyword_pending (corpus_id, lexemes, dfs, chunks, total_len)
    SELECT l.corpus_id, l.lexemes, l.dfs, t.chunks, t.total_len
      FROM (SELECT corpus_id, array_agg(lexeme ORDER BY lexeme) AS lexemes,
                   array_agg(n ORDER BY lexeme) AS dfs
              FROM (SELECT corpus_id, lexeme, count(*)::integer AS n FROM new_rows
                     GROUP BY corpus_id, lexeme) d GROUP BY corpus_id) l
      JOIN (SELECT corpus_id, count(DISTINCT chunk_id) AS chunks, sum(tf) AS total_len
              FROM new_rows GROUP BY corpus_id) t USING (corpus_id);
  ELSE
    INSERT INTO pyembed.keyword_pending (corpus_id, lexemes, dfs, chunks, total_len)
    SELECT l.corpus_id, l.lexemes, l.dfs, -t.chunks, -t.total_len
      FROM (SELECT corpus_id, array_agg(lexeme ORDER BY lexeme) AS lexemes,
                   array_agg(-n ORDER BY lexeme) AS dfs
              FROM (SELECT corpus_id, lexeme, count(*)::integer AS n FROM old_rows
                     GROUP BY corpus_id, lexeme) d GROUP BY corpus_id) l
      JOIN (SELECT corpus_id, count(DISTINCT chunk_id) AS chunks, sum(tf) AS total_len
              FROM old_rows GROUP BY corpus_id) t USING (corpus_id);
  END IF;
  RETURN NULL;
END
$$;

-- At commit (a deferred constraint trigger, once per pending row: the first folds them all).
-- Counts of a corpus dropped meanwhile are let go.
CREATE OR REPLACE FUNCTION pyembed._apply_keyword_counts() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET work_mem = '64MB'
AS $$
BEGIN
  WITH mine AS (
    DELETE FROM pyembed.keyword_pending p
     WHERE p.xact = pg_current_xact_id()
       AND EXISTS (SELECT FROM pyembed.corpora c WHERE c.corpus_id = p.corpus_id)
    RETURNING p.corpus_id, p.lexemes, p.dfs, p.chunks, p.total_len
  ), lexemes AS (
    INSERT INTO pyembed.lexeme_stats AS s (corpus_id, lexeme, df)
    SELECT m.corpus_id, u.lexeme, sum(u.df)
      FROM mine m, unnest(m.lexemes, m.dfs) AS u(lexeme, df)
     GROUP BY m.corpus_id, u.lexeme ORDER BY m.corpus_id, u.lexeme
    ON CONFLICT (corpus_id, lexeme) DO UPDATE SET df = s.df + EXCLUDED.df
  )
  INSERT INTO pyembed.keyword_stats AS s (corpus_id, chunks, total_len)
  SELECT m.corpus_id, sum(m.chunks), sum(m.total_len) FROM mine m
   GROUP BY m.corpus_id ORDER BY m.corpus_id
  ON CONFLICT (corpus_id) DO UPDATE
    SET chunks = s.chunks + EXCLUDED.chunks, total_len = s.total_len + EXCLUDED.total_len;
  DELETE FROM pyembed.keyword_pending p WHERE p.xact = pg_current_xact_id();
  RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER postings_count_insert
  AFTER INSERT ON pyembed.postings REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._count_postings();
CREATE OR REPLACE TRIGGER postings_count_delete
  AFTER DELETE ON pyembed.postings REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._count_postings();

-- BM25 over chunks. Each query lexeme reads its postings in its own sub-query (OFFSET 0 keeps
-- the planner from flattening it, which made long queries many times slower).
CREATE OR REPLACE FUNCTION pyembed.search_keyword(corpus text, query text, k integer DEFAULT 10,
                                                  filter jsonb DEFAULT NULL)
RETURNS TABLE (document_id text, chunk_id bigint, chunk_index integer, content text,
               metadata jsonb, score double precision, model_key text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora;
BEGIN
  c := pyembed.lookup_corpus(corpus);
  IF k IS NULL OR k < 1 OR k > 1000 THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005', MESSAGE = format('k must be 1..1000, got %s', k);
  END IF;
  IF query IS NULL OR query !~ '\S' THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005', MESSAGE = 'the query is empty';
  END IF;
  IF filter IS NOT NULL AND jsonb_typeof(filter) <> 'object' THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('a metadata filter is a JSON object, not %s', jsonb_typeof(filter));
  END IF;
  RETURN QUERY
  WITH st AS (
    SELECT s.chunks::float8 AS n, s.total_len::float8 / greatest(s.chunks, 1) AS avgdl
      FROM pyembed.keyword_stats s WHERE s.corpus_id = c.corpus_id
  ), terms AS (
    SELECT l.lexeme, ln(1 + (st.n - l.df + 0.5) / (l.df + 0.5)) AS idf
      FROM (SELECT DISTINCT u.lexeme FROM unnest(to_tsvector(c.text_config, query)) u) q
      JOIN pyembed.lexeme_stats l ON l.corpus_id = c.corpus_id AND l.lexeme = q.lexeme, st
     WHERE l.df > 0
  ), scored AS (
    SELECT p.chunk_id,
           sum(t.idf * p.tf * 2.2 / (p.tf + 1.2 * (0.25 + 0.75 * p.doc_len / st.avgdl))) AS s
      FROM terms t, st,
           LATERAL (SELECT pp.chunk_id, pp.tf, pp.doc_len FROM pyembed.postings pp
                     WHERE pp.corpus_id = c.corpus_id AND pp.lexeme = t.lexeme OFFSET 0) p
     GROUP BY p.chunk_id
  )
  SELECT ch.document_id, ch.chunk_id, ch.chunk_index, ch.content, ch.metadata, sc.s, NULL::text
    FROM scored sc
    JOIN pyembed.chunks ch ON ch.corpus_id = c.corpus_id AND ch.chunk_id = sc.chunk_id
   WHERE filter IS NULL OR ch.metadata @> filter
   ORDER BY sc.s DESC, ch.chunk_id
   LIMIT k;
END
$$;

-- Hybrid: reciprocal rank fusion (1 / (rrf_k + rank)) of the guarded vector ranking and the
-- BM25 ranking, each over `candidates` results. The vector half checks the model key (PE001).
CREATE OR REPLACE FUNCTION pyembed.search_hybrid(
  corpus text, query text, query_embedding vector, query_model_key text,
  k integer DEFAULT 10, filter jsonb DEFAULT NULL, candidates integer DEFAULT 100,
  rrf_k integer DEFAULT 60)
RETURNS TABLE (document_id text, chunk_id bigint, chunk_index integer, content text,
               metadata jsonb, score double precision, model_key text)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
  WITH dense AS (
    SELECT s.*, row_number() OVER (ORDER BY s.score DESC) AS r
      FROM pyembed.search(corpus, query_embedding, query_model_key, candidates, filter) s
  ), sparse AS (
    SELECT s.*, row_number() OVER (ORDER BY s.score DESC) AS r
      FROM pyembed.search_keyword(corpus, query, candidates, filter) s
  ), fused AS (
    SELECT coalesce(d.chunk_id, s.chunk_id) AS chunk_id,
           coalesce(1.0 / (rrf_k + d.r), 0) + coalesce(1.0 / (rrf_k + s.r), 0) AS score
      FROM dense d FULL JOIN sparse s ON s.chunk_id = d.chunk_id
  )
  SELECT coalesce(d.document_id, s.document_id), f.chunk_id,
         coalesce(d.chunk_index, s.chunk_index), coalesce(d.content, s.content),
         coalesce(d.metadata, s.metadata), f.score::float8, query_model_key
    FROM fused f
    LEFT JOIN dense d ON d.chunk_id = f.chunk_id
    LEFT JOIN sparse s ON s.chunk_id = f.chunk_id
   ORDER BY f.score DESC, f.chunk_id
   LIMIT k
$$;
