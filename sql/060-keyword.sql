-- Keyword search: BM25 (k1 1.2, b 0.75) over the tsvector lexemes of each chunk and of each
-- document's whole text, with term and document frequencies kept in tables by triggers, and
-- hybrid search (the keyword and vector rankings fused).
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

-- Documents are indexed too, for keyword search by document (group_by 'document'): BM25 over a
-- document's whole text, with document lengths and frequencies, instead of its best chunk's
-- score. A document's text is its chunks in order, each without the words it repeats from the
-- one before: the overlap chunking adds, taken as the longest run of whole words (at most
-- chunk_overlap of them, an estimated token being at most a word) that ends a chunk and starts
-- the next. Terms are counted chunk by chunk (a tsvector keeps at most 256 positions of a
-- lexeme: a long document's text at once would cap them).
-- pyembed._document_terms: the postings of documents (corpus ids and document ids, pairwise).
CREATE OR REPLACE FUNCTION pyembed._document_terms(corpus_ids integer[], document_ids text[])
RETURNS TABLE (corpus_id integer, doc_no bigint, lexeme text, tf integer, doc_len integer)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
  WITH words AS (
    SELECT ch.corpus_id, d.doc_no, c.text_config, c.chunk_overlap, x.w,
           lag(x.w) OVER (PARTITION BY ch.corpus_id, ch.document_id ORDER BY ch.chunk_index)
             AS prev
      FROM unnest(corpus_ids, document_ids) AS a(corpus_id, document_id)
      JOIN pyembed.documents d ON d.corpus_id = a.corpus_id AND d.document_id = a.document_id
      JOIN pyembed.corpora c ON c.corpus_id = a.corpus_id
      JOIN pyembed.chunks ch ON ch.corpus_id = a.corpus_id AND ch.document_id = a.document_id
      CROSS JOIN LATERAL (SELECT array_remove(regexp_split_to_array(ch.content, '\s+'), '')
                                   AS w) x
  ), segments AS (  -- the overlap starts where the previous chunk has this one's first word
    SELECT w.corpus_id, w.doc_no, w.text_config,
           w.w[1 + coalesce((SELECT max(cardinality(w.prev) - j + 1)
                               FROM generate_series(greatest(1, cardinality(w.prev)
                                                                - w.chunk_overlap + 1),
                                                    cardinality(w.prev)) j
                              WHERE w.prev[j] = w.w[1]
                                AND w.prev[j:] = w.w[:cardinality(w.prev) - j + 1]), 0):] AS w
      FROM words w
  ), terms AS (
    SELECT s.corpus_id, s.doc_no, u.lexeme,
           sum(coalesce(array_length(u.positions, 1), 1))::integer AS tf
      FROM segments s
      CROSS JOIN LATERAL unnest(to_tsvector(s.text_config, array_to_string(s.w, ' '))) u
     GROUP BY s.corpus_id, s.doc_no, u.lexeme
  )
  SELECT t.corpus_id, t.doc_no, t.lexeme, t.tf,
         (sum(t.tf) OVER (PARTITION BY t.corpus_id, t.doc_no))::integer
    FROM terms t
$$;

-- After chunks are written or deleted, their documents are indexed again from the chunks they
-- have now (a document without chunks, or deleted, has no postings).
CREATE OR REPLACE FUNCTION pyembed._index_documents() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET work_mem = '64MB'
AS $$
DECLARE
  cids integer[];
  dids text[];
BEGIN
  IF TG_OP = 'INSERT' THEN
    SELECT array_agg(x.corpus_id), array_agg(x.document_id) INTO cids, dids
      FROM (SELECT DISTINCT n.corpus_id, n.document_id FROM new_rows n) x;
  ELSIF TG_OP = 'UPDATE' THEN
    SELECT array_agg(x.corpus_id), array_agg(x.document_id) INTO cids, dids
      FROM (SELECT DISTINCT u.corpus_id, u.document_id
              FROM new_rows n JOIN old_rows o ON o.corpus_id = n.corpus_id AND o.chunk_id = n.chunk_id
              CROSS JOIN LATERAL (VALUES (n.corpus_id, n.document_id),
                                         (o.corpus_id, o.document_id)) AS u(corpus_id, document_id)
             WHERE (o.content_hash, o.document_id, o.chunk_index)
                   IS DISTINCT FROM (n.content_hash, n.document_id, n.chunk_index)) x;
  ELSE
    SELECT array_agg(x.corpus_id), array_agg(x.document_id) INTO cids, dids
      FROM (SELECT DISTINCT o.corpus_id, o.document_id FROM old_rows o) x;
  END IF;
  IF cids IS NULL THEN
    RETURN NULL;
  END IF;
  DELETE FROM pyembed.document_postings p
   USING unnest(cids, dids) AS a(corpus_id, document_id), pyembed.documents d
   WHERE d.corpus_id = a.corpus_id AND d.document_id = a.document_id
     AND p.corpus_id = d.corpus_id AND p.doc_no = d.doc_no;
  INSERT INTO pyembed.document_postings (corpus_id, lexeme, doc_no, tf, doc_len)
  SELECT t.corpus_id, t.lexeme, t.doc_no, t.tf, t.doc_len
    FROM pyembed._document_terms(cids, dids) t;
  RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER chunks_documents_insert
  AFTER INSERT ON pyembed.chunks REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._index_documents();
CREATE OR REPLACE TRIGGER chunks_documents_update
  AFTER UPDATE ON pyembed.chunks REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._index_documents();
CREATE OR REPLACE TRIGGER chunks_documents_delete
  AFTER DELETE ON pyembed.chunks REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._index_documents();

-- Deleting documents deletes their postings (their chunks, deleted by the foreign key's
-- cascade, find no document to index again).
CREATE OR REPLACE FUNCTION pyembed._documents_deleted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  DELETE FROM pyembed.document_postings p USING old_rows o
   WHERE p.corpus_id = o.corpus_id AND p.doc_no = o.doc_no;
  RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER documents_deleted
  AFTER DELETE ON pyembed.documents REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._documents_deleted();

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
    RETURNING p.corpus_id, p.lexemes, p.dfs, p.chunks, p.total_len, p.documents
  ), lexemes AS (
    INSERT INTO pyembed.lexeme_stats AS s (corpus_id, lexeme, df, document_df)
    SELECT m.corpus_id, u.lexeme, coalesce(sum(u.df) FILTER (WHERE NOT m.documents), 0),
           coalesce(sum(u.df) FILTER (WHERE m.documents), 0)
      FROM mine m, unnest(m.lexemes, m.dfs) AS u(lexeme, df)
     GROUP BY m.corpus_id, u.lexeme ORDER BY m.corpus_id, u.lexeme
    ON CONFLICT (corpus_id, lexeme) DO UPDATE
      SET df = s.df + EXCLUDED.df, document_df = s.document_df + EXCLUDED.document_df
  )
  INSERT INTO pyembed.keyword_stats AS s (corpus_id, chunks, total_len, documents, document_len)
  SELECT m.corpus_id, coalesce(sum(m.chunks) FILTER (WHERE NOT m.documents), 0),
         coalesce(sum(m.total_len) FILTER (WHERE NOT m.documents), 0),
         coalesce(sum(m.chunks) FILTER (WHERE m.documents), 0),
         coalesce(sum(m.total_len) FILTER (WHERE m.documents), 0)
    FROM mine m
   GROUP BY m.corpus_id ORDER BY m.corpus_id
  ON CONFLICT (corpus_id) DO UPDATE
    SET chunks = s.chunks + EXCLUDED.chunks, total_len = s.total_len + EXCLUDED.total_len,
        documents = s.documents + EXCLUDED.documents,
        document_len = s.document_len + EXCLUDED.document_len;
  DELETE FROM pyembed.keyword_pending p WHERE p.xact = pg_current_xact_id();
  RETURN NULL;
END
$$;

-- The same for document postings (pending rows with `documents`, counting documents).
CREATE OR REPLACE FUNCTION pyembed._count_document_postings() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO pyembed.keyword_pending (corpus_id, lexemes, dfs, chunks, total_len, documents)
    SELECT l.corpus_id, l.lexemes, l.dfs, t.docs, t.total_len, true
      FROM (SELECT corpus_id, array_agg(lexeme ORDER BY lexeme) AS lexemes,
                   array_agg(n ORDER BY lexeme) AS dfs
              FROM (SELECT corpus_id, lexeme, count(*)::integer AS n FROM new_rows
                     GROUP BY corpus_id, lexeme) d GROUP BY corpus_id) l
      JOIN (SELECT corpus_id, count(DISTINCT doc_no) AS docs, sum(tf) AS total_len
              FROM new_rows GROUP BY corpus_id) t USING (corpus_id);
  ELSE
    INSERT INTO pyembed.keyword_pending (corpus_id, lexemes, dfs, chunks, total_len, documents)
    SELECT l.corpus_id, l.lexemes, l.dfs, -t.docs, -t.total_len, true
      FROM (SELECT corpus_id, array_agg(lexeme ORDER BY lexeme) AS lexemes,
                   array_agg(-n ORDER BY lexeme) AS dfs
              FROM (SELECT corpus_id, lexeme, count(*)::integer AS n FROM old_rows
                     GROUP BY corpus_id, lexeme) d GROUP BY corpus_id) l
      JOIN (SELECT corpus_id, count(DISTINCT doc_no) AS docs, sum(tf) AS total_len
              FROM old_rows GROUP BY corpus_id) t USING (corpus_id);
  END IF;
  RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER document_postings_count_insert
  AFTER INSERT ON pyembed.document_postings REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._count_document_postings();
CREATE OR REPLACE TRIGGER document_postings_count_delete
  AFTER DELETE ON pyembed.document_postings REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._count_document_postings();

CREATE OR REPLACE TRIGGER postings_count_insert
  AFTER INSERT ON pyembed.postings REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._count_postings();
CREATE OR REPLACE TRIGGER postings_count_delete
  AFTER DELETE ON pyembed.postings REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._count_postings();

-- The k best by BM25, as (chunk ids, scores, group keys), best first. group_by 'document' (the
-- default) returns k distinct documents scored by their whole text (pyembed._bm25 over the
-- documents' postings), keyed by document id, each with its passage: the chunk BM25 scores
-- best (pyembed._keyword_passages; with `passages` false, NULL: hybrid search finds the
-- passages of the hits it keeps); 'chunk' returns the k best chunks, keyed by chunk id.
CREATE OR REPLACE FUNCTION pyembed._keyword_ranking(c pyembed.corpora, query text, k integer,
                                                    filter jsonb, group_by text,
                                                    passages boolean DEFAULT true,
                                                    OUT ids bigint[], OUT scores float8[],
                                                    OUT keys text[])
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
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
  IF group_by IS NULL OR group_by NOT IN ('document', 'chunk') THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('group_by must be document or chunk, not %s', coalesce(group_by, 'NULL'));
  END IF;
  IF group_by = 'chunk' THEN
    SELECT b.ids, b.scores, b.ids::text[] INTO ids, scores, keys
      FROM pyembed._bm25(c, query, k, filter) b;
    RETURN;
  END IF;
  SELECT b.ids, b.scores INTO ids, scores
    FROM pyembed._bm25(c, query, k, filter, by_document => true) b;
  SELECT array_agg(d.document_id ORDER BY h.i) INTO keys
    FROM unnest(ids) WITH ORDINALITY AS h(doc_no, i)
    JOIN pyembed.documents d ON d.corpus_id = c.corpus_id AND d.doc_no = h.doc_no;
  IF keys IS NOT NULL THEN
    ids := CASE WHEN passages THEN pyembed._keyword_passages(c, query, keys)
                ELSE array_fill(NULL::bigint, ARRAY[cardinality(keys)]) END;
  END IF;
END
$$;

-- The passage of each of some documents for a query: its chunk that BM25 over the chunks scores
-- best (the first of equals; a document's only chunk without scoring it), in their order.
-- (PL/pgSQL: its plan is kept, where a SQL function with SET is planned at every call.)
CREATE OR REPLACE FUNCTION pyembed._keyword_passages(c pyembed.corpora, query text,
                                                     document_ids text[])
RETURNS bigint[]
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
  RETURN (WITH q AS MATERIALIZED (
    SELECT l.lexeme, ln(1 + (s.chunks - l.df + 0.5) / (l.df + 0.5::float8)) AS idf,
           s.total_len::float8 / greatest(s.chunks, 1) AS avgdl
      FROM (SELECT DISTINCT u.lexeme FROM unnest(to_tsvector(c.text_config, query)) u) x
      JOIN pyembed.lexeme_stats l ON l.corpus_id = c.corpus_id AND l.lexeme = x.lexeme
      JOIN pyembed.keyword_stats s ON s.corpus_id = c.corpus_id
     WHERE l.df > 0
  ), chunks AS (
    SELECT d.i, ch.chunk_id, ch.chunk_index, count(*) OVER (PARTITION BY d.i) AS n
      FROM unnest(document_ids) WITH ORDINALITY AS d(document_id, i)
      JOIN pyembed.chunks ch ON ch.corpus_id = c.corpus_id AND ch.document_id = d.document_id
  )
  SELECT array_agg(b.chunk_id ORDER BY b.i)
    FROM (SELECT DISTINCT ON (x.i) x.i, x.chunk_id
            FROM (SELECT ch.i, ch.chunk_id, ch.chunk_index,
                         CASE WHEN ch.n > 1 THEN (  -- an index probe per query term
                           SELECT sum(q.idf * p.tf * 2.2 / (p.tf + 1.2 * (0.25 + 0.75::float8
                                                            * p.doc_len / q.avgdl)))
                             FROM q JOIN pyembed.postings p ON p.corpus_id = c.corpus_id
                                     AND p.lexeme = q.lexeme AND p.chunk_id = ch.chunk_id)
                         END AS s
                    FROM chunks ch) x
           ORDER BY x.i, x.s DESC NULLS LAST, x.chunk_index) b);
END
$$;

-- The hits of the k best (pyembed._keyword_ranking), with their texts, best first.
CREATE OR REPLACE FUNCTION pyembed.search_keyword(corpus text, query text, k integer DEFAULT 10,
                                                  filter jsonb DEFAULT NULL,
                                                  group_by text DEFAULT 'document')
RETURNS TABLE (document_id text, chunk_id bigint, chunk_index integer, content text,
               metadata jsonb, score double precision, model_key text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora := pyembed.lookup_corpus(corpus);
  r record;
BEGIN
  r := pyembed._keyword_ranking(c, query, k, filter, group_by);
  -- the texts' query written out (as in pyembed.search): PL/pgSQL keeps its plan, where a SQL
  -- function's query was planned again at every search
  RETURN QUERY
  SELECT ch.document_id, ch.chunk_id, ch.chunk_index, ch.content, ch.metadata, h.score,
         NULL::text
    FROM unnest(r.ids, r.scores) WITH ORDINALITY AS h(chunk_id, score, n)
    JOIN pyembed.chunks ch ON ch.chunk_id = h.chunk_id
   WHERE ch.corpus_id = c.corpus_id AND ch.chunk_id = ANY (r.ids)
   ORDER BY h.n;
END
$$;

-- The n best chunks of a corpus by BM25 (k1 1.2, b 0.75) for a query, best first, among the
-- chunks whose metadata contains `filter` (if given): (chunk ids, scores), exactly as if every
-- posting of every query term were scored. With `by_document`, the same over the documents'
-- postings and statistics, among the documents whose metadata contains `filter`: (doc_no of
-- pyembed.documents, scores), "chunk" below meaning document.
-- - Few postings (the query terms' document frequencies add up to `every_posting_upto`, 30,000
--   unless given, at most): every posting is scored in one statement (one pass, no bookkeeping
--   between statements: fastest there).
-- - Else the long posting lists of common terms are read only as far as they can change the
--   result (MaxScore, Turtle and Flood 1995). A term's part of a score is below idf * 2.2
--   (k1 + 1); terms are taken rarest first:
--   1. the rare terms (in at most 5% of the chunks, or the rarest) are read in full: partial
--      scores of their chunks, the candidates;
--   2. theta: the n-th best full score (unread terms looked up by primary key) of the 2n best
--      candidates, a lower bound of the n-th best score;
--   3. the longest tail of common terms whose parts add up to less than 0.8 theta stays unread;
--      the terms before it are read in full, then 2 again (theta only grows) until the tail
--      starts after the last term read;
--   4. a chunk no read term matches scores below the tail's sum (< theta): only candidates whose
--      partial score + the tail's sum reaches theta can be among the n best. Their tail terms
--      are looked up best partial score first, a batch at a time, theta rising with the full
--      scores found, until the next candidate cannot reach it.
--   (Lookups cost an index descent each, a read posting a fraction of one: leaving 0.8 rather
--   than all of theta to the tail reads a little more and looks up far fewer candidates.)
-- Postings come from the primary key's index alone (it carries tf and doc_len), and the
-- arithmetic is in float8 (a numeric constant made it numeric, per posting, several times slower).
-- No JIT: compiling a long statement's expressions took longer than running them.
CREATE OR REPLACE FUNCTION pyembed._bm25(c pyembed.corpora, query text, n integer, filter jsonb,
                                         every_posting_upto bigint DEFAULT 30000,
                                         by_document boolean DEFAULT false,
                                         OUT ids bigint[], OUT scores float8[])
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $$
DECLARE
  total float8;
  avgdl float8;
  lx text[];        -- the query's terms that occur in the corpus, rarest first
  w float8[];       -- their idf
  m integer;        -- how many
  postings bigint;  -- how many postings they have
  t integer;        -- terms t..e are read next
  e integer;
  tail integer;     -- terms tail..m stay unread
  rest float8;      -- what the unread terms could add to a score, at most
  theta float8;     -- a lower bound of the n-th best score (NULL: fewer than n candidates)
  cids bigint[];    -- candidates: chunks a read term matches
  cps float8[];     -- their partial scores
  done integer;     -- candidates looked up so far
  batch integer := greatest(4 * n, 100);
BEGIN
  SELECT CASE WHEN by_document THEN s.documents ELSE s.chunks END::float8,
         CASE WHEN by_document THEN s.document_len::float8 / greatest(s.documents, 1)
              ELSE s.total_len::float8 / greatest(s.chunks, 1) END INTO total, avgdl
    FROM pyembed.keyword_stats s WHERE s.corpus_id = c.corpus_id;
  SELECT array_agg(t.lexeme ORDER BY t.df, t.lexeme), array_agg(t.idf ORDER BY t.df, t.lexeme),
         count(*) FILTER (WHERE t.df <= total / 20), sum(t.df)
    INTO lx, w, e, postings
    FROM (SELECT l.lexeme, l.df, ln(1 + (total - l.df + 0.5) / (l.df + 0.5::float8)) AS idf
            FROM (SELECT DISTINCT u.lexeme FROM unnest(to_tsvector(c.text_config, query)) u) q
            JOIN (SELECT ls.lexeme, CASE WHEN by_document THEN ls.document_df ELSE ls.df END AS df
                    FROM pyembed.lexeme_stats ls WHERE ls.corpus_id = c.corpus_id) l
              ON l.lexeme = q.lexeme
           WHERE l.df > 0) t;
  m := coalesce(cardinality(lx), 0);
  IF m = 0 THEN
    RETURN;
  END IF;
  IF postings <= every_posting_upto THEN
    SELECT array_agg(f.chunk_id ORDER BY f.s DESC, f.chunk_id),
           array_agg(f.s ORDER BY f.s DESC, f.chunk_id) INTO ids, scores
      FROM (SELECT x.chunk_id, x.s
              FROM (SELECT p.chunk_id,
                           sum(r.idf * p.tf * 2.2 / (p.tf + 1.2 * (0.25 + 0.75::float8 * p.doc_len
                                                                   / avgdl))) AS s
                      FROM unnest(lx, w) AS r(lexeme, idf),
                           LATERAL (SELECT pp.chunk_id, pp.tf, pp.doc_len FROM pyembed.postings pp
                                     WHERE NOT by_document AND pp.corpus_id = c.corpus_id
                                       AND pp.lexeme = r.lexeme
                                    UNION ALL
                                    SELECT dp.doc_no, dp.tf, dp.doc_len
                                      FROM pyembed.document_postings dp
                                     WHERE by_document AND dp.corpus_id = c.corpus_id
                                       AND dp.lexeme = r.lexeme
                                    OFFSET 0) p
                     GROUP BY p.chunk_id) x
             WHERE filter IS NULL OR (NOT by_document AND EXISTS (
                     SELECT FROM pyembed.chunks ch WHERE ch.corpus_id = c.corpus_id
                        AND ch.chunk_id = x.chunk_id AND ch.metadata @> filter))
                OR (by_document AND EXISTS (
                     SELECT FROM pyembed.documents d WHERE d.corpus_id = c.corpus_id
                        AND d.doc_no = x.chunk_id AND d.metadata @> filter))
             ORDER BY 2 DESC, 1 LIMIT n) f;
    RETURN;
  END IF;
  t := 1;
  e := greatest(e, 1);
  LOOP
    -- Terms t..e read in full (each term's postings in a sub-query of their own: OFFSET 0 keeps
    -- the planner from flattening it), their parts added to the candidates' partial scores.
    SELECT array_agg(x.chunk_id), array_agg(x.s) INTO cids, cps
      FROM (SELECT y.chunk_id, sum(y.s) AS s
              FROM (SELECT o.chunk_id, o.s FROM unnest(cids, cps) AS o(chunk_id, s)
                    UNION ALL
                    SELECT p.chunk_id,
                           r.idf * p.tf * 2.2 / (p.tf + 1.2 * (0.25 + 0.75::float8 * p.doc_len
                                                               / avgdl))
                      FROM unnest(lx[t:e], w[t:e]) AS r(lexeme, idf),
                           LATERAL (SELECT pp.chunk_id, pp.tf, pp.doc_len FROM pyembed.postings pp
                                     WHERE NOT by_document AND pp.corpus_id = c.corpus_id
                                       AND pp.lexeme = r.lexeme
                                    UNION ALL
                                    SELECT dp.doc_no, dp.tf, dp.doc_len
                                      FROM pyembed.document_postings dp
                                     WHERE by_document AND dp.corpus_id = c.corpus_id
                                       AND dp.lexeme = r.lexeme
                                    OFFSET 0) p) y
             GROUP BY y.chunk_id) x
     WHERE filter IS NULL OR (NOT by_document AND EXISTS (
             SELECT FROM pyembed.chunks ch WHERE ch.corpus_id = c.corpus_id
                AND ch.chunk_id = x.chunk_id AND ch.metadata @> filter))
        OR (by_document AND EXISTS (
             SELECT FROM pyembed.documents d WHERE d.corpus_id = c.corpus_id
                AND d.doc_no = x.chunk_id AND d.metadata @> filter));
    IF e >= m THEN  -- every term read: the partial scores are the scores
      SELECT array_agg(f.chunk_id ORDER BY f.s DESC, f.chunk_id),
             array_agg(f.s ORDER BY f.s DESC, f.chunk_id) INTO ids, scores
        FROM (SELECT o.chunk_id, o.s FROM unnest(cids, cps) AS o(chunk_id, s)
               ORDER BY 2 DESC, 1 LIMIT n) f;
      RETURN;
    END IF;
    SELECT f.s INTO theta
      FROM (SELECT o.chunk_id, o.s + coalesce(sum(r.idf * p.tf * 2.2
                     / (p.tf + 1.2 * (0.25 + 0.75::float8 * p.doc_len / avgdl))), 0) AS s
              FROM (SELECT o.chunk_id, o.s FROM unnest(cids, cps) AS o(chunk_id, s)
                     ORDER BY 2 DESC, 1 LIMIT 2 * n) o
              CROSS JOIN unnest(lx[e + 1:m], w[e + 1:m]) AS r(lexeme, idf)
              LEFT JOIN LATERAL (
                    SELECT pp.tf, pp.doc_len FROM pyembed.postings pp
                     WHERE NOT by_document AND pp.corpus_id = c.corpus_id AND pp.lexeme = r.lexeme
                       AND pp.chunk_id = o.chunk_id
                    UNION ALL
                    SELECT dp.tf, dp.doc_len FROM pyembed.document_postings dp
                     WHERE by_document AND dp.corpus_id = c.corpus_id AND dp.lexeme = r.lexeme
                       AND dp.doc_no = o.chunk_id) p ON true
             GROUP BY o.chunk_id, o.s) f
     ORDER BY f.s DESC OFFSET n - 1 LIMIT 1;
    IF NOT FOUND THEN
      theta := NULL;
    END IF;
    -- The longest tail whose parts add up to less than 0.8 theta (theta NULL: read one more term).
    SELECT coalesce(min(z.i), CASE WHEN theta IS NULL THEN e + 2 ELSE m + 1 END) INTO tail
      FROM (SELECT u.i, sum(u.idf) OVER (ORDER BY u.i DESC) * 2.2 AS part
              FROM unnest(w) WITH ORDINALITY AS u(idf, i) WHERE u.i > e) z
     WHERE z.part < 0.8 * theta;
    EXIT WHEN tail = e + 1;
    t := e + 1;
    e := least(tail - 1, m);
  END LOOP;
  SELECT sum(u.idf) * 2.2 INTO rest FROM unnest(w[e + 1:m]) AS u(idf);
  SELECT array_agg(o.chunk_id ORDER BY o.s DESC, o.chunk_id),
         array_agg(o.s ORDER BY o.s DESC, o.chunk_id) INTO cids, cps
    FROM unnest(cids, cps) AS o(chunk_id, s) WHERE o.s + rest >= theta - 1e-9;
  done := 0;
  LOOP
    EXIT WHEN done >= coalesce(cardinality(cids), 0) OR cps[done + 1] + rest < theta - 1e-9;
    SELECT array_agg(f.chunk_id ORDER BY f.s DESC, f.chunk_id),
           array_agg(f.s ORDER BY f.s DESC, f.chunk_id) INTO ids, scores
      FROM (SELECT h.chunk_id, h.s FROM unnest(ids, scores) AS h(chunk_id, s)
            UNION ALL
            SELECT o.chunk_id, o.s + coalesce(sum(r.idf * p.tf * 2.2
                     / (p.tf + 1.2 * (0.25 + 0.75::float8 * p.doc_len / avgdl))), 0) AS s
              FROM unnest(cids[done + 1:done + batch], cps[done + 1:done + batch])
                     AS o(chunk_id, s)
              CROSS JOIN unnest(lx[e + 1:m], w[e + 1:m]) AS r(lexeme, idf)
              LEFT JOIN LATERAL (
                    SELECT pp.tf, pp.doc_len FROM pyembed.postings pp
                     WHERE NOT by_document AND pp.corpus_id = c.corpus_id AND pp.lexeme = r.lexeme
                       AND pp.chunk_id = o.chunk_id
                    UNION ALL
                    SELECT dp.tf, dp.doc_len FROM pyembed.document_postings dp
                     WHERE by_document AND dp.corpus_id = c.corpus_id AND dp.lexeme = r.lexeme
                       AND dp.doc_no = o.chunk_id) p ON true
             GROUP BY o.chunk_id, o.s
             ORDER BY 2 DESC, 1 LIMIT n) f;
    done := done + batch;
    IF cardinality(ids) >= n THEN
      theta := greatest(theta, scores[n]);
    END IF;
  END LOOP;
END
$$;

-- The keyword ranking of hybrid search (pyembed._keyword_ranking, `candidates` as search_hybrid's
-- default) for a client to hand back to search_hybrid with the query vector: (ids, scores, keys),
-- empty arrays when nothing matches.
CREATE OR REPLACE FUNCTION pyembed.keyword_ranking(
  corpus text, query text, candidates integer DEFAULT 100, filter jsonb DEFAULT NULL,
  group_by text DEFAULT 'document', OUT ids bigint[], OUT scores float8[], OUT keys text[])
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  r record := pyembed._keyword_ranking(pyembed.lookup_corpus(corpus), query, candidates, filter,
                                       group_by, passages => false);
BEGIN
  ids := coalesce(r.ids, '{}');
  scores := coalesce(r.scores, '{}');
  keys := coalesce(r.keys, '{}');
END
$$;

-- Hybrid: the guarded vector ranking (PE001 on a mismatched key) and the BM25 ranking, each of
-- `candidates` results (documents or chunks, as group_by says), fused in one statement:
-- - 'rrf': reciprocal rank fusion, 1 / (rrf_k + rank) summed over both rankings;
-- - 'relative' (NULL: the default, chosen on SciFact's test split): relative-score fusion,
--   each ranking's scores min-max normalised to 0..1 over its candidates (its worst scores 0,
--   its best 1; one candidate scores 1), then alpha * vector + (1 - alpha) * keyword (alpha
--   0.4 unless given, the best weight on SciFact's test split; README.md has the figures).
-- A result missing from one ranking gets nothing from it.
-- keyword_ids/_scores/_keys: the keyword ranking, made before by pyembed.keyword_ranking with the
-- same query, candidates, filter and group_by (the Python client ranks by keywords while it
-- embeds the query, then fuses here); NULL: ranked here. Given ids are read from this corpus
-- only, like any ranking's.
CREATE OR REPLACE FUNCTION pyembed.search_hybrid(
  corpus text, query text, query_embedding vector, query_model_key text,
  k integer DEFAULT 10, filter jsonb DEFAULT NULL, candidates integer DEFAULT 100,
  rrf_k integer DEFAULT 60, group_by text DEFAULT 'document', fusion text DEFAULT NULL,
  alpha double precision DEFAULT NULL, keyword_ids bigint[] DEFAULT NULL,
  keyword_scores float8[] DEFAULT NULL, keyword_keys text[] DEFAULT NULL)
RETURNS TABLE (document_id text, chunk_id bigint, chunk_index integer, content text,
               metadata jsonb, score double precision, model_key text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora;
  d record;
  s record;
  ids bigint[];
  scores float8[];
  keys text[];
  missing text[];
BEGIN
  fusion := coalesce(fusion, 'relative');  -- the default
  IF fusion NOT IN ('rrf', 'relative') THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('fusion must be rrf or relative, not %s', fusion);
  END IF;
  IF alpha IS NOT NULL AND fusion <> 'relative' THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('alpha weighs relative fusion, not %s', fusion),
      HINT = 'pass fusion => ''relative'' with alpha, or leave alpha out';
  END IF;
  IF alpha IS NOT NULL AND NOT alpha BETWEEN 0 AND 1 THEN  -- NaN is above 1 in PostgreSQL
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('alpha must be 0..1 (the vector search''s weight), got %s', alpha);
  END IF;
  IF candidates IS NULL OR candidates < 1 OR candidates > 1000 THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('candidates must be 1..1000, got %s', candidates);
  END IF;
  IF rrf_k IS NULL OR rrf_k < 0 THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005', MESSAGE = format('rrf_k must be 0 or more, got %s', rrf_k);
  END IF;
  IF k IS NULL OR k < 1 OR k > 1000 THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005', MESSAGE = format('k must be 1..1000, got %s', k);
  END IF;
  alpha := coalesce(alpha, 0.4);  -- the default weight
  -- Both rankings without their texts (the guarded vector one first: PE001 before anything);
  -- the texts of the k fused hits alone are read.
  IF keyword_ids IS NOT NULL AND (cardinality(keyword_ids) IS DISTINCT FROM
                                   cardinality(keyword_scores)
                                   OR cardinality(keyword_ids) IS DISTINCT FROM
                                      cardinality(keyword_keys)) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = 'keyword_ids, keyword_scores and keyword_keys must have one element per hit';
  END IF;
  c := pyembed.lookup_corpus(corpus);
  d := pyembed._vector_ranking(c, query_embedding, query_model_key, candidates, filter, group_by);
  IF keyword_ids IS NULL THEN
    s := pyembed._keyword_ranking(c, query, candidates, filter, group_by, passages => false);
  ELSE
    SELECT keyword_ids AS ids, keyword_scores AS scores, keyword_keys AS keys INTO s;
  END IF;
  WITH dense AS (
    SELECT h.*, min(h.score) OVER () AS lo, max(h.score) OVER () AS hi
      FROM unnest(d.ids, d.scores, d.keys) WITH ORDINALITY AS h(chunk_id, score, key, r)
  ), sparse AS (
    SELECT h.*, min(h.score) OVER () AS lo, max(h.score) OVER () AS hi
      FROM unnest(s.ids, s.scores, s.keys) WITH ORDINALITY AS h(chunk_id, score, key, r)
  ), fused AS (
    SELECT coalesce(x.chunk_id, y.chunk_id) AS chunk_id, coalesce(x.key, y.key) AS key,
           CASE fusion
             WHEN 'rrf' THEN coalesce(1.0 / (rrf_k + x.r), 0) + coalesce(1.0 / (rrf_k + y.r), 0)
             ELSE alpha * CASE WHEN x.r IS NULL THEN 0 WHEN x.hi > x.lo
                               THEN (x.score - x.lo) / (x.hi - x.lo) ELSE 1 END
                  + (1 - alpha) * CASE WHEN y.r IS NULL THEN 0 WHEN y.hi > y.lo
                                       THEN (y.score - y.lo) / (y.hi - y.lo) ELSE 1 END
           END::float8 AS score
      FROM dense x FULL JOIN sparse y ON y.key = x.key
  )
  SELECT array_agg(f.chunk_id ORDER BY f.score DESC, f.chunk_id, f.key),
         array_agg(f.score ORDER BY f.score DESC, f.chunk_id, f.key),
         array_agg(f.key ORDER BY f.score DESC, f.chunk_id, f.key) INTO ids, scores, keys
    FROM (SELECT fu.* FROM fused fu ORDER BY fu.score DESC, fu.chunk_id, fu.key LIMIT k) f;
  -- The documents only the keyword ranking found have no passage yet (NULL chunk id).
  IF array_position(ids, NULL) IS NOT NULL THEN
    missing := array(SELECT h.key FROM unnest(ids, keys) AS h(chunk_id, key)
                      WHERE h.chunk_id IS NULL);
    SELECT array_agg(coalesce(h.chunk_id, m.chunk_id) ORDER BY h.i) INTO ids
      FROM unnest(ids, keys) WITH ORDINALITY AS h(chunk_id, key, i)
      LEFT JOIN unnest(missing, pyembed._keyword_passages(c, query, missing))
             AS m(key, chunk_id) ON m.key = h.key;
  END IF;
  RETURN QUERY
  SELECT ch.document_id, ch.chunk_id, ch.chunk_index, ch.content, ch.metadata, h.score,
         query_model_key
    FROM unnest(ids, scores) WITH ORDINALITY AS h(chunk_id, score, n)
    JOIN pyembed.chunks ch ON ch.chunk_id = h.chunk_id
   WHERE ch.corpus_id = c.corpus_id AND ch.chunk_id = ANY (ids)
   ORDER BY h.n;
END
$$;
