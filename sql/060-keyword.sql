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

-- BM25 over chunks: the k best, as (chunk ids, scores, group keys), best first. group_by
-- 'document' (the default) returns k distinct documents, each scored by its best chunk (which is
-- the passage returned; its key is the document id): the best 3k chunks are taken, then 4 times
-- more while they hold fewer than k documents; 'chunk' returns the k best chunks (keyed by id).
CREATE OR REPLACE FUNCTION pyembed._keyword_ranking(c pyembed.corpora, query text, k integer,
                                                    filter jsonb, group_by text,
                                                    OUT ids bigint[], OUT scores float8[],
                                                    OUT keys text[])
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  n integer;
  found integer;
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
  n := CASE group_by WHEN 'chunk' THEN k ELSE 3 * k END;
  LOOP
    SELECT b.ids, b.scores INTO ids, scores FROM pyembed._bm25(c, query, n, filter) b;
    EXIT WHEN group_by = 'chunk' OR coalesce(cardinality(ids), 0) < n;
    SELECT count(DISTINCT ch.document_id) INTO found
      FROM pyembed.chunks ch WHERE ch.corpus_id = c.corpus_id AND ch.chunk_id = ANY (ids);
    EXIT WHEN found >= k;
    n := 4 * n;
  END LOOP;
  SELECT array_agg(b.chunk_id ORDER BY b.score DESC, b.chunk_id),
         array_agg(b.score ORDER BY b.score DESC, b.chunk_id),
         array_agg(b.key ORDER BY b.score DESC, b.chunk_id) INTO ids, scores, keys
    FROM (SELECT b.* FROM (
            SELECT DISTINCT ON (1) CASE WHEN group_by = 'chunk' THEN ch.chunk_id::text
                                        ELSE ch.document_id END AS key, ch.chunk_id, h.score
              FROM pyembed.chunks ch
              JOIN unnest(ids, scores) AS h(chunk_id, score) ON h.chunk_id = ch.chunk_id
             WHERE ch.corpus_id = c.corpus_id AND ch.chunk_id = ANY (ids)
             ORDER BY 1, h.score DESC, h.chunk_id) b
           ORDER BY b.score DESC, b.chunk_id LIMIT k) b;
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
  SELECT * INTO r FROM pyembed._keyword_ranking(c, query, k, filter, group_by);
  RETURN QUERY SELECT * FROM pyembed._hits(c.corpus_id, r.ids, r.scores, NULL);
END
$$;

-- The n best chunks of a corpus by BM25 (k1 1.2, b 0.75) for a query, best first, among the
-- chunks whose metadata contains `filter` (if given): (chunk ids, scores), exactly as if every
-- posting of every query term were scored.
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
  SELECT s.chunks::float8, s.total_len::float8 / greatest(s.chunks, 1) INTO total, avgdl
    FROM pyembed.keyword_stats s WHERE s.corpus_id = c.corpus_id;
  SELECT array_agg(t.lexeme ORDER BY t.df, t.lexeme), array_agg(t.idf ORDER BY t.df, t.lexeme),
         count(*) FILTER (WHERE t.df <= total / 20), sum(t.df)
    INTO lx, w, e, postings
    FROM (SELECT l.lexeme, l.df, ln(1 + (total - l.df + 0.5) / (l.df + 0.5::float8)) AS idf
            FROM (SELECT DISTINCT u.lexeme FROM unnest(to_tsvector(c.text_config, query)) u) q
            JOIN pyembed.lexeme_stats l ON l.corpus_id = c.corpus_id AND l.lexeme = q.lexeme
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
                                     WHERE pp.corpus_id = c.corpus_id AND pp.lexeme = r.lexeme
                                    OFFSET 0) p
                     GROUP BY p.chunk_id) x
             WHERE filter IS NULL OR EXISTS (
                     SELECT FROM pyembed.chunks ch WHERE ch.corpus_id = c.corpus_id
                        AND ch.chunk_id = x.chunk_id AND ch.metadata @> filter)
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
                                     WHERE pp.corpus_id = c.corpus_id AND pp.lexeme = r.lexeme
                                    OFFSET 0) p) y
             GROUP BY y.chunk_id) x
     WHERE filter IS NULL OR EXISTS (
             SELECT FROM pyembed.chunks ch WHERE ch.corpus_id = c.corpus_id
                AND ch.chunk_id = x.chunk_id AND ch.metadata @> filter);
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
              LEFT JOIN pyembed.postings p ON p.corpus_id = c.corpus_id AND p.lexeme = r.lexeme
                    AND p.chunk_id = o.chunk_id
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
              LEFT JOIN pyembed.postings p ON p.corpus_id = c.corpus_id AND p.lexeme = r.lexeme
                    AND p.chunk_id = o.chunk_id
             GROUP BY o.chunk_id, o.s
             ORDER BY 2 DESC, 1 LIMIT n) f;
    done := done + batch;
    IF cardinality(ids) >= n THEN
      theta := greatest(theta, scores[n]);
    END IF;
  END LOOP;
END
$$;

-- Hybrid: the guarded vector ranking (PE001 on a mismatched key) and the BM25 ranking, each of
-- `candidates` results (documents or chunks, as group_by says), fused in one statement:
-- - 'rrf': reciprocal rank fusion, 1 / (rrf_k + rank) summed over both rankings;
-- - 'relative' (NULL: the default, chosen on SciFact's test split): relative-score fusion, each ranking's scores min-max normalised to 0..1 over its
--   candidates (its worst scores 0, its best 1; one candidate scores 1), then
--   alpha * vector + (1 - alpha) * keyword (alpha 0.5 unless given: both weigh the same).
-- A result missing from one ranking gets nothing from it.
CREATE OR REPLACE FUNCTION pyembed.search_hybrid(
  corpus text, query text, query_embedding vector, query_model_key text,
  k integer DEFAULT 10, filter jsonb DEFAULT NULL, candidates integer DEFAULT 100,
  rrf_k integer DEFAULT 60, group_by text DEFAULT 'document', fusion text DEFAULT NULL,
  alpha double precision DEFAULT NULL)
RETURNS TABLE (document_id text, chunk_id bigint, chunk_index integer, content text,
               metadata jsonb, score double precision, model_key text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  d record;
  s record;
  ids bigint[];
  scores float8[];
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
  alpha := coalesce(alpha, 0.5);
  -- Both rankings without their texts (the guarded vector one first: PE001 before anything);
  -- the texts of the k fused hits alone are read.
  SELECT * INTO d FROM pyembed._vector_ranking(corpus, query_embedding, query_model_key,
                                               candidates, filter, group_by);
  SELECT * INTO s FROM pyembed._keyword_ranking(pyembed.lookup_corpus(corpus), query, candidates,
                                                filter, group_by);
  WITH dense AS (
    SELECT h.*, min(h.score) OVER () AS lo, max(h.score) OVER () AS hi
      FROM unnest(d.ids, d.scores, d.keys) WITH ORDINALITY AS h(chunk_id, score, key, r)
  ), sparse AS (
    SELECT h.*, min(h.score) OVER () AS lo, max(h.score) OVER () AS hi
      FROM unnest(s.ids, s.scores, s.keys) WITH ORDINALITY AS h(chunk_id, score, key, r)
  ), fused AS (
    SELECT coalesce(x.chunk_id, y.chunk_id) AS chunk_id,
           CASE fusion
             WHEN 'rrf' THEN coalesce(1.0 / (rrf_k + x.r), 0) + coalesce(1.0 / (rrf_k + y.r), 0)
             ELSE alpha * CASE WHEN x.r IS NULL THEN 0 WHEN x.hi > x.lo
                               THEN (x.score - x.lo) / (x.hi - x.lo) ELSE 1 END
                  + (1 - alpha) * CASE WHEN y.r IS NULL THEN 0 WHEN y.hi > y.lo
                                       THEN (y.score - y.lo) / (y.hi - y.lo) ELSE 1 END
           END::float8 AS score
      FROM dense x FULL JOIN sparse y ON y.key = x.key
  )
  SELECT array_agg(f.chunk_id ORDER BY f.score DESC, f.chunk_id),
         array_agg(f.score ORDER BY f.score DESC, f.chunk_id) INTO ids, scores
    FROM (SELECT fu.* FROM fused fu ORDER BY fu.score DESC, fu.chunk_id LIMIT k) f;
  RETURN QUERY SELECT * FROM pyembed._hits(d.corpus_no, ids, scores, query_model_key);
END
$$;
