-- Keyword search: BM25 (k1 1.2, b 0.75) over the tsvector lexemes of each chunk and of each
-- document's whole text, with term and document frequencies kept in tables by triggers, and
-- hybrid search (the keyword and vector rankings fused).
-- Texts are tokenised in Unicode normal form NFC, chunks and queries alike (normalize(.., NFC)
-- before every to_tsvector): "é" typed composed finds it written decomposed (NFD, as some macOS
-- and PDF tools write it), and the reverse. The stored text stays as it was given.
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
          FROM unnest(to_tsvector(c.text_config, normalize(n.content, NFC))) u) t;
  ELSE
    -- Created once a session; IF NOT EXISTS would send the client a NOTICE on every later call.
    IF to_regclass('pg_temp.pyembed_changed') IS NULL THEN
      CREATE TEMP TABLE pyembed_changed (corpus_id integer, chunk_id bigint, content text)
        ON COMMIT DELETE ROWS;
    END IF;
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
          FROM unnest(to_tsvector(c.text_config, normalize(x.content, NFC))) u) t;
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
      -- split at pyembed.text.SPACES, the chunker's (the locale's \s is not Python's)
      CROSS JOIN LATERAL (SELECT array_remove(regexp_split_to_array(ch.content,
               E'[\\u0009-\\u000D\\u001C-\\u0020\\u0085\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000]+'), '')
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
      CROSS JOIN LATERAL unnest(to_tsvector(s.text_config,
                                          normalize(array_to_string(s.w, ' '), NFC))) u
     GROUP BY s.corpus_id, s.doc_no, u.lexeme
  )
  SELECT t.corpus_id, t.doc_no, t.lexeme, t.tf,
         (sum(t.tf) OVER (PARTITION BY t.corpus_id, t.doc_no))::integer
    FROM terms t
$$;

-- After chunks are written or deleted, their documents are indexed again from the chunks they
-- have now (a document without chunks, or deleted, has no postings). Two writers of one
-- document's chunks take turns: each first locks the document's row (all of them in one order:
-- no deadlock; FOR NO KEY UPDATE, which the foreign key's checks of chunk writes do not wait
-- for) and updates it, so the second waits until the first ends, then reads, with the fresh
-- snapshot of its next statement, the chunks and document postings the first committed
-- (without the lock it indexed the document from its own chunks only, or failed on a duplicate
-- document posting). Under REPEATABLE READ, whose snapshot cannot see them, the update makes
-- the second fail with a serialization error instead.
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
  PERFORM FROM pyembed.documents d JOIN unnest(cids, dids) AS a(corpus_id, document_id)
            ON d.corpus_id = a.corpus_id AND d.document_id = a.document_id
   ORDER BY d.corpus_id, d.document_id FOR NO KEY UPDATE OF d;
  UPDATE pyembed.documents d SET updated_at = d.updated_at
    FROM unnest(cids, dids) AS a(corpus_id, document_id)
   WHERE d.corpus_id = a.corpus_id AND d.document_id = a.document_id;
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

-- A block of pyembed.posting_blocks as the postings hold it now (NULL: none): the postings of a
-- lexeme whose chunk ids are block << 9 .. (block << 9) + 511, or for a negative block the
-- document postings whose doc_no are (-1 - block) << 9 ..; each 10 bytes, big-endian: the id's
-- place in the block (int2), tf (int4) and the length (int4). pyembed.bm25 reads them.
-- (PL/pgSQL: its plans are kept; a SQL function with SET is planned at every call.)
CREATE OR REPLACE FUNCTION pyembed._packed_block(corpus integer, term text, block bigint)
RETURNS bytea
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF NOT block BETWEEN -(1::bigint << 54) AND (1::bigint << 54) THEN  -- (block << 9 fits bigint)
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('no posting block has number %s', block),
      HINT = 'give a block number of the corpus''s pyembed.posting_blocks';
  END IF;
  IF block >= 0 THEN
    RETURN (SELECT string_agg(int2send((p.chunk_id & 511)::smallint) || int4send(p.tf)
                              || int4send(p.doc_len), ''::bytea ORDER BY p.chunk_id)
              FROM pyembed.postings p
             WHERE p.corpus_id = corpus AND p.lexeme = term AND p.chunk_id >= block << 9
               AND p.chunk_id < (block + 1) << 9);
  END IF;
  RETURN (SELECT string_agg(int2send((p.doc_no & 511)::smallint) || int4send(p.tf)
                            || int4send(p.doc_len), ''::bytea ORDER BY p.doc_no)
            FROM pyembed.document_postings p
           WHERE p.corpus_id = corpus AND p.lexeme = term AND p.doc_no >= (-1 - block) << 9
             AND p.doc_no < (-block) << 9);
END
$$;

-- Document frequencies and corpus totals follow the postings. Each statement that writes
-- postings records its counts in keyword_pending, a row of its own (no lock anyone else needs);
-- pyembed._apply_keyword_counts folds a transaction's counts into the counters when it commits,
-- in one statement sorted by corpus and lexeme, so that writers hold counter rows only while
-- committing and always take them in the same order (no deadlock). Until then, a transaction's
-- own searches score its new chunks with the counts committed before it.
CREATE OR REPLACE FUNCTION pyembed._count_postings() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET work_mem = '64MB'
AS $$
BEGIN
  -- Per lexeme and block of 512 ids (pyembed.posting_blocks): the counts add up by lexeme; new
  -- postings come packed as well (a block new at commit is stored as they are). The arrays of
  -- one aggregate have their elements in the same order (no order needed: a block's postings
  -- are scored in any order, and the commit sorts the blocks).
  IF TG_OP = 'INSERT' THEN
    INSERT INTO pyembed.keyword_pending (corpus_id, lexemes, blocks, dfs, postings, chunks,
                                         total_len, documents)
    SELECT l.corpus_id, l.lexemes, l.blocks, l.dfs, l.postings, t.chunks, t.total_len, false
      FROM (SELECT corpus_id, array_agg(lexeme) AS lexemes, array_agg(block) AS blocks,
                   array_agg(n) AS dfs, array_agg(postings) AS postings
              FROM (SELECT p.corpus_id, p.lexeme, p.chunk_id >> 9 AS block,
                           count(*)::integer AS n,
                           string_agg(int2send((p.chunk_id & 511)::smallint)
                                      || int4send(p.tf) || int4send(p.doc_len),
                                      ''::bytea) AS postings
                      FROM new_rows p GROUP BY 1, 2, 3) d GROUP BY corpus_id) l
      JOIN (SELECT corpus_id, count(DISTINCT chunk_id) AS chunks, sum(tf) AS total_len
              FROM new_rows GROUP BY corpus_id) t USING (corpus_id);
  ELSE
    INSERT INTO pyembed.keyword_pending (corpus_id, lexemes, blocks, dfs, chunks, total_len,
                                         documents)
    SELECT l.corpus_id, l.lexemes, l.blocks, l.dfs, -t.chunks, -t.total_len, false
      FROM (SELECT corpus_id, array_agg(lexeme) AS lexemes, array_agg(block) AS blocks,
                   array_agg(-n) AS dfs
              FROM (SELECT corpus_id, lexeme, chunk_id >> 9 AS block, count(*)::integer AS n
                      FROM old_rows GROUP BY 1, 2, 3) d GROUP BY corpus_id) l
      JOIN (SELECT corpus_id, count(DISTINCT chunk_id) AS chunks, sum(tf) AS total_len
              FROM old_rows GROUP BY corpus_id) t USING (corpus_id);
  END IF;
  RETURN NULL;
END
$$;

-- Statistics for the tables the write path reads, taken at a writer's commit when one has grown
-- fourfold (and past 8 pages) since its last ANALYZE or VACUUM (pg_class.relpages). The plans
-- PL/pgSQL keeps are made from them: a new database's first ingest runs for a minute before
-- autovacuum's first ANALYZE, and on empty statistics the planner read posting blocks through
-- the (corpus_id, id) indexes (every term of 512 ids for each block). SKIP_LOCKED: a writer
-- never waits for another's ANALYZE (or autovacuum's); the table's next commit tries again.
-- (In bigint: 4 * 8192 bytes a page past 65,535 pages, a table of 512 MB, is no integer.)
CREATE OR REPLACE FUNCTION pyembed._analyze_grown() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  t regclass;
BEGIN
  FOR t IN SELECT c.oid::regclass FROM pg_catalog.pg_class c
            WHERE c.oid IN ('pyembed.postings'::regclass, 'pyembed.document_postings'::regclass,
                            'pyembed.chunks'::regclass, 'pyembed.documents'::regclass)
              AND pg_catalog.pg_relation_size(c.oid) >= 8192 * greatest(4 * c.relpages::bigint, 8)
            ORDER BY c.oid LOOP
    EXECUTE format('ANALYZE (SKIP_LOCKED) %s', t);
  END LOOP;
END
$$;

-- At commit (a deferred constraint trigger, once per pending row: the first folds them all).
-- Counts of a corpus dropped meanwhile are let go. Then the blocks the transaction touched are
-- brought up to date by one statement sorted by key, as the counters were: each block is
-- inserted, or locked (ON CONFLICT DO UPDATE locks the newest version of the row, committed by
-- whichever writer held it before) and updated; every writer takes its locks in the same order,
-- so two committing writers never deadlock. A block the transaction only added postings to
-- (its postings statements inserted, none deleted) gets them appended to what the block holds
-- (a block's postings are in no order), or is made of them if new. Any other goes in as a
-- placeholder (one posting of tf 0, which no real posting has) or is locked as it is, and is
-- then rebuilt from the postings by a statement of its own, whose snapshot holds what every
-- writer that held the block before committed (a block rebuilt from an older one would drop
-- their postings); one left with no postings is deleted.
CREATE OR REPLACE FUNCTION pyembed._apply_keyword_counts() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET work_mem = '64MB'
AS $$
DECLARE
  cs integer[];
  ls text[];
  bs bigint[];
  ps bytea[];  -- the postings the transaction added to a block, NULL if it deleted any
  rc integer[];  -- the blocks to rebuild
  rl text[];
  rb bigint[];
BEGIN
  WITH mine AS (
    DELETE FROM pyembed.keyword_pending p
     WHERE p.xact = pg_current_xact_id()
       AND EXISTS (SELECT FROM pyembed.corpora c WHERE c.corpus_id = p.corpus_id)
    RETURNING p.corpus_id, p.lexemes, p.blocks, p.dfs, p.postings, p.chunks, p.total_len,
              p.documents
  ), lexemes AS (
    INSERT INTO pyembed.lexeme_stats AS s (corpus_id, lexeme, df, document_df)
    SELECT m.corpus_id, u.lexeme, coalesce(sum(u.df) FILTER (WHERE NOT m.documents), 0),
           coalesce(sum(u.df) FILTER (WHERE m.documents), 0)
      FROM mine m, unnest(m.lexemes, m.dfs) AS u(lexeme, df)
     GROUP BY m.corpus_id, u.lexeme ORDER BY m.corpus_id, u.lexeme
    ON CONFLICT (corpus_id, lexeme) DO UPDATE
      SET df = s.df + EXCLUDED.df, document_df = s.document_df + EXCLUDED.document_df
  ), totals AS (
    INSERT INTO pyembed.keyword_stats AS s (corpus_id, chunks, total_len, documents,
                                            document_len)
    SELECT m.corpus_id, coalesce(sum(m.chunks) FILTER (WHERE NOT m.documents), 0),
           coalesce(sum(m.total_len) FILTER (WHERE NOT m.documents), 0),
           coalesce(sum(m.chunks) FILTER (WHERE m.documents), 0),
           coalesce(sum(m.total_len) FILTER (WHERE m.documents), 0)
      FROM mine m
     GROUP BY m.corpus_id ORDER BY m.corpus_id
    ON CONFLICT (corpus_id) DO UPDATE
      SET chunks = s.chunks + EXCLUDED.chunks, total_len = s.total_len + EXCLUDED.total_len,
          documents = s.documents + EXCLUDED.documents,
          document_len = s.document_len + EXCLUDED.document_len
  )
  SELECT array_agg(t.corpus_id), array_agg(t.lexeme), array_agg(t.block), array_agg(t.postings)
    INTO cs, ls, bs, ps
    FROM (SELECT m.corpus_id, u.lexeme, u.block,
                 CASE WHEN count(*) = count(u.postings)
                      THEN string_agg(u.postings, ''::bytea) END AS postings
            FROM mine m, unnest(m.lexemes, m.blocks, m.postings) AS u(lexeme, block, postings)
           GROUP BY 1, 2, 3) t;
  DELETE FROM pyembed.keyword_pending p WHERE p.xact = pg_current_xact_id();
  IF cs IS NULL THEN
    RETURN NULL;
  END IF;
  PERFORM pyembed._analyze_grown();  -- before the blocks' plans are made
  INSERT INTO pyembed.posting_blocks AS b (corpus_id, lexeme, block, postings)
  SELECT t.corpus_id, t.lexeme, t.block, coalesce(t.postings, E'\\x00000000000000000000'::bytea)
    FROM unnest(cs, ls, bs, ps) AS t(corpus_id, lexeme, block, postings)
   ORDER BY 1, 2, 3
  ON CONFLICT (corpus_id, lexeme, block) DO UPDATE
    SET postings = b.postings || EXCLUDED.postings
    WHERE EXCLUDED.postings <> E'\\x00000000000000000000'::bytea;  -- (else locked, not updated)
  SELECT array_agg(t.corpus_id), array_agg(t.lexeme), array_agg(t.block) INTO rc, rl, rb
    FROM unnest(cs, ls, bs, ps) AS t(corpus_id, lexeme, block, postings)
   WHERE t.postings IS NULL;
  IF rc IS NULL THEN
    RETURN NULL;
  END IF;
  WITH built AS (
    SELECT t.corpus_id, t.lexeme, t.block,
           pyembed._packed_block(t.corpus_id, t.lexeme, t.block) AS postings
      FROM unnest(rc, rl, rb) AS t(corpus_id, lexeme, block)
  ), emptied AS (
    DELETE FROM pyembed.posting_blocks b USING built n
     WHERE n.postings IS NULL AND b.corpus_id = n.corpus_id AND b.lexeme = n.lexeme
       AND b.block = n.block
  )
  UPDATE pyembed.posting_blocks b SET postings = n.postings
    FROM built n
   WHERE n.postings IS NOT NULL AND b.corpus_id = n.corpus_id AND b.lexeme = n.lexeme
     AND b.block = n.block AND b.postings <> n.postings;
  RETURN NULL;
END
$$;

-- The same for document postings (pending rows with `documents`, counting documents).
CREATE OR REPLACE FUNCTION pyembed._count_document_postings() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET work_mem = '64MB'
AS $$
BEGIN
  -- As in pyembed._count_postings, by blocks of 512 doc_no (numbered -1 - doc_no >> 9).
  IF TG_OP = 'INSERT' THEN
    INSERT INTO pyembed.keyword_pending (corpus_id, lexemes, blocks, dfs, postings, chunks,
                                         total_len, documents)
    SELECT l.corpus_id, l.lexemes, l.blocks, l.dfs, l.postings, t.docs, t.total_len, true
      FROM (SELECT corpus_id, array_agg(lexeme) AS lexemes, array_agg(block) AS blocks,
                   array_agg(n) AS dfs, array_agg(postings) AS postings
              FROM (SELECT p.corpus_id, p.lexeme, -1 - (p.doc_no >> 9) AS block,
                           count(*)::integer AS n,
                           string_agg(int2send((p.doc_no & 511)::smallint)
                                      || int4send(p.tf) || int4send(p.doc_len),
                                      ''::bytea) AS postings
                      FROM new_rows p GROUP BY 1, 2, 3) d GROUP BY corpus_id) l
      JOIN (SELECT corpus_id, count(DISTINCT doc_no) AS docs, sum(tf) AS total_len
              FROM new_rows GROUP BY corpus_id) t USING (corpus_id);
  ELSE
    INSERT INTO pyembed.keyword_pending (corpus_id, lexemes, blocks, dfs, chunks, total_len,
                                         documents)
    SELECT l.corpus_id, l.lexemes, l.blocks, l.dfs, -t.docs, -t.total_len, true
      FROM (SELECT corpus_id, array_agg(lexeme) AS lexemes, array_agg(block) AS blocks,
                   array_agg(-n) AS dfs
              FROM (SELECT corpus_id, lexeme, -1 - (doc_no >> 9) AS block, count(*)::integer AS n
                      FROM old_rows GROUP BY 1, 2, 3) d GROUP BY corpus_id) l
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
-- documents' postings), keyed by document number (doc_no, as text, as pyembed._vector_ranking
-- keys them), each with its passage: the chunk BM25 scores
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
DECLARE
  b record;
  most integer;
BEGIN
  IF k IS NULL OR k < 1 OR k > 1000 THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('k must be 1..1000, got %s', coalesce(k::text, 'NULL'));
  END IF;
  -- Only whitespace, control and format characters is empty too (pyembed.text.INVISIBLE).
  IF query IS NULL OR query !~ E'[^\\x01-\\x20\\x7f-\\xa0\\xad\\u0600-\\u0605\\u061c\\u06dd\\u070f\\u0890-\\u0891\\u08e2\\u1680\\u180e\\u2000-\\u200f\\u2028-\\u202f\\u205f-\\u2064\\u2066-\\u206f\\u3000\\ufeff\\ufff9-\\ufffb\\U000110bd\\U000110cd\\U00013430-\\U00013438\\U0001bca0-\\U0001bca3\\U0001d173-\\U0001d17a\\U000e0001\\U000e0020-\\U000e007f]' THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = 'the query is empty or only whitespace and control characters',
      HINT = 'give a query with a word in it';
  END IF;
  -- At most as long as an evaluation query may be (its table's CHECK eval_queries_query_bound,
  -- read from the catalogue for a long query alone): a 1 MB query failed on PostgreSQL's limit
  -- of a tsvector (54000), and each of its terms is a posting list BM25 reads.
  IF length(query) > 1000 THEN
    most := (SELECT (regexp_match(pg_catalog.pg_get_constraintdef(o.oid), '<= ([0-9]+)[)]'))[1]::integer
               FROM pg_catalog.pg_constraint o
              WHERE o.connamespace = 'pyembed'::regnamespace
                AND o.conname = 'eval_queries_query_bound');
    IF length(query) > most THEN
      RAISE EXCEPTION USING ERRCODE = 'PE005',
        MESSAGE = format('a keyword query is at most %s characters, got %s', most,
                         length(query)),
        HINT = 'shorten it to its key words (an evaluation query has the same bound)';
    END IF;
  END IF;
  IF filter IS NOT NULL AND jsonb_typeof(filter) <> 'object' THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('a metadata filter is a JSON object, not %s', jsonb_typeof(filter));
  END IF;
  -- The bound of the filter a sampled search records (recall_samples_filter_bound), checked
  -- for every search: else one search in a sample rate's share failed on recording it.
  IF pg_column_size(filter) > 65536 THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('a metadata filter is at most 65536 bytes (as jsonb), got %s',
                       pg_column_size(filter));
  END IF;
  IF group_by IS NULL OR group_by NOT IN ('document', 'chunk') THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('group_by must be document or chunk, not %s', pyembed._quoted(group_by));
  END IF;
  -- (assignments, not statements: no plan to make or executor to start)
  b := pyembed._bm25(c, query, k, filter, by_document => group_by = 'document');
  ids := b.ids;
  scores := b.scores;
  keys := b.ids::text[];
  IF group_by = 'document' AND keys IS NOT NULL THEN
    ids := CASE WHEN passages THEN pyembed._keyword_passages(c, query, ids)
                ELSE array_fill(NULL::bigint, ARRAY[cardinality(keys)]) END;
  END IF;
END
$$;

-- The passage of each of some documents (by doc_no) for a query: its chunk that BM25 over the
-- chunks scores best (the first of equals; a document's only chunk without scoring it), in their
-- order. The chunks to score are read as runs of consecutive chunk ids (a document's chunks,
-- written together, are one run): an index range scan of a run per query term, not a probe per
-- chunk and term, each its own descent of the index. A chunk's parts are added in the
-- order of the query's terms (q's rows), the same for every chunk.
-- (PL/pgSQL: its plan is kept, where a SQL function with SET is planned at every call.)
CREATE OR REPLACE FUNCTION pyembed._keyword_passages(c pyembed.corpora, query text,
                                                     doc_nos bigint[])
RETURNS bigint[]
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
  RETURN (WITH q AS MATERIALIZED (
    SELECT l.lexeme, ln(1 + (s.chunks - l.df + 0.5) / (l.df + 0.5::float8)) AS idf,
           s.total_len::float8 / greatest(s.chunks, 1) AS avgdl, row_number() OVER () AS t
      FROM (SELECT DISTINCT u.lexeme
              FROM unnest(to_tsvector(c.text_config, normalize(query, NFC))) u) x
      JOIN pyembed.lexeme_stats l ON l.corpus_id = c.corpus_id AND l.lexeme = x.lexeme
      JOIN pyembed.keyword_stats s ON s.corpus_id = c.corpus_id
     WHERE l.df > 0
  ), chunks AS MATERIALIZED (
    SELECT h.i, ch.chunk_id, ch.chunk_index, count(*) OVER (PARTITION BY h.i) AS n
      FROM unnest(doc_nos) WITH ORDINALITY AS h(doc_no, i)
      JOIN pyembed.documents d ON d.corpus_id = c.corpus_id AND d.doc_no = h.doc_no
      JOIN pyembed.chunks ch ON ch.corpus_id = c.corpus_id AND ch.document_id = d.document_id
  ), runs AS (  -- the ids of the chunks to score, as runs of consecutive ids
    SELECT min(r.chunk_id) AS lo, max(r.chunk_id) AS hi
      FROM (SELECT u.chunk_id, u.chunk_id - row_number() OVER (ORDER BY u.chunk_id) AS g
              FROM (SELECT DISTINCT ch.chunk_id FROM chunks ch WHERE ch.n > 1) u) r
     GROUP BY r.g
  ), scored AS (
    SELECT p.chunk_id,
           sum(q.idf * p.tf * 2.2 / (p.tf + 1.2 * (0.25 + 0.75::float8 * p.doc_len / q.avgdl))
               ORDER BY q.t) AS s
      FROM runs r CROSS JOIN q
      CROSS JOIN LATERAL (  -- (OFFSET 0: a range scan for each run and term, not a join)
        SELECT p.chunk_id, p.tf, p.doc_len FROM pyembed.postings p
         WHERE p.corpus_id = c.corpus_id AND p.lexeme = q.lexeme
           AND p.chunk_id BETWEEN r.lo AND r.hi OFFSET 0) p
     GROUP BY p.chunk_id
  )
  SELECT array_agg(b.chunk_id ORDER BY b.i)
    FROM (SELECT DISTINCT ON (x.i) x.i, x.chunk_id
            FROM (SELECT ch.i, ch.chunk_id, ch.chunk_index,
                         CASE WHEN ch.n > 1 THEN sc.s END AS s
                    FROM chunks ch LEFT JOIN scored sc ON sc.chunk_id = ch.chunk_id) x
           ORDER BY x.i, x.s DESC NULLS LAST, x.chunk_index) b);
END
$$;

-- The hits of the k best (pyembed._keyword_ranking), with their texts, best first.
CREATE OR REPLACE FUNCTION pyembed.search_keyword(corpus text, query text, k numeric DEFAULT 10,
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
  r := pyembed._keyword_ranking(c, query, pyembed._count_arg(k, 'k', 1, 1000), filter, group_by);
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
-- chunks whose metadata contains `filter` (if given): (chunk ids, scores), every posting of every
-- query term scored. With `by_document`, the same over the documents' postings and statistics,
-- among the documents whose metadata contains `filter`: (doc_no of pyembed.documents, scores).
-- The postings come packed from pyembed.posting_blocks (a row a term per 512 ids, read in index
-- order) and are scored in bulk by pyembed._bm25_top; the blocks this transaction has changed
-- but not yet committed (rebuilt at commit) are packed from pyembed.postings instead, so that
-- it finds what it wrote. With a filter, the best 4n are checked, then 8 times more while
-- fewer than n pass.
-- A term's parts are added rarest term first (as the one statement that scored postings row by
-- row added them), in float8: the same scores to the last bit.
-- Its statements keep generic plans (plan_cache_mode): PL/pgSQL chose a custom plan for each of
-- these small statements at every search, and made it again each time.
CREATE OR REPLACE FUNCTION pyembed._bm25(c pyembed.corpora, query text, n integer, filter jsonb,
                                         by_document boolean DEFAULT false,
                                         OUT ids bigint[], OUT scores float8[])
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
  total float8;
  avgdl float8;
  lx text[];        -- the query's terms that occur in the corpus, rarest first
  w float8[];       -- their idf
  packed bytea;     -- their postings, block after block
  blocks bigint[];  -- each block's number
  terms integer[];  -- its term (its place in lx)
  sizes integer[];  -- its length in bytes
  m integer;
  cids bigint[];
  cps float8[];
  top record;
BEGIN
  IF n < 0 OR n > 1000 THEN  -- (its callers give keyword_ranking's k or candidates, checked)
    PERFORM pyembed._count_arg(n, 'n', 0, 1000);
  END IF;
  SELECT CASE WHEN by_document THEN s.documents ELSE s.chunks END::float8,
         CASE WHEN by_document THEN s.document_len::float8 / greatest(s.documents, 1)
              ELSE s.total_len::float8 / greatest(s.chunks, 1) END INTO total, avgdl
    FROM pyembed.keyword_stats s WHERE s.corpus_id = c.corpus_id;
  SELECT array_agg(t.lexeme ORDER BY t.df, t.lexeme), array_agg(t.idf ORDER BY t.df, t.lexeme)
    INTO lx, w
    FROM (SELECT l.lexeme, l.df, ln(1 + (total - l.df + 0.5) / (l.df + 0.5::float8)) AS idf
            FROM (SELECT DISTINCT u.lexeme
                    FROM unnest(to_tsvector(c.text_config, normalize(query, NFC))) u) q
            JOIN (SELECT ls.lexeme, CASE WHEN by_document THEN ls.document_df ELSE ls.df END AS df
                    FROM pyembed.lexeme_stats ls WHERE ls.corpus_id = c.corpus_id) l
              ON l.lexeme = q.lexeme
           WHERE l.df > 0) t;
  IF lx IS NULL THEN
    RETURN;
  END IF;
  IF NOT EXISTS (SELECT FROM pyembed.keyword_pending p
                  WHERE p.xact = pg_current_xact_id_if_assigned() AND p.corpus_id = c.corpus_id)
  THEN
    IF by_document THEN  -- (a statement each: the generic plan's index condition has the bound)
      SELECT string_agg(b.postings, ''::bytea), array_agg(-1 - b.block),
             array_agg(array_position(lx, b.lexeme)), array_agg(length(b.postings))
        INTO packed, blocks, terms, sizes
        FROM pyembed.posting_blocks b
       WHERE b.corpus_id = c.corpus_id AND b.lexeme = ANY (lx) AND b.block < 0;
    ELSE
      SELECT string_agg(b.postings, ''::bytea), array_agg(b.block),
             array_agg(array_position(lx, b.lexeme)), array_agg(length(b.postings))
        INTO packed, blocks, terms, sizes
        FROM pyembed.posting_blocks b
       WHERE b.corpus_id = c.corpus_id AND b.lexeme = ANY (lx) AND b.block >= 0;
    END IF;
  ELSE
    WITH touched AS (
      SELECT DISTINCT u.lexeme, u.block
        FROM pyembed.keyword_pending p, unnest(p.lexemes, p.blocks) AS u(lexeme, block)
       WHERE p.xact = pg_current_xact_id_if_assigned() AND p.corpus_id = c.corpus_id
         AND u.lexeme = ANY (lx) AND CASE WHEN by_document THEN u.block < 0 ELSE u.block >= 0 END
    ), packed_blocks AS (
      SELECT b.lexeme, b.block, b.postings FROM pyembed.posting_blocks b
       WHERE b.corpus_id = c.corpus_id AND b.lexeme = ANY (lx)
         AND CASE WHEN by_document THEN b.block < 0 ELSE b.block >= 0 END
         AND NOT EXISTS (SELECT FROM touched t WHERE t.lexeme = b.lexeme AND t.block = b.block)
      UNION ALL
      SELECT t.lexeme, t.block, x.postings
        FROM touched t,
             LATERAL (SELECT pyembed._packed_block(c.corpus_id, t.lexeme, t.block) AS postings) x
       WHERE x.postings IS NOT NULL
    )
    SELECT string_agg(b.postings, ''::bytea),
           array_agg(CASE WHEN by_document THEN -1 - b.block ELSE b.block END),
           array_agg(array_position(lx, b.lexeme)), array_agg(length(b.postings))
      INTO packed, blocks, terms, sizes
      FROM packed_blocks b;
  END IF;
  IF packed IS NULL THEN
    RETURN;
  END IF;
  m := CASE WHEN filter IS NULL THEN n ELSE 4 * n END;
  LOOP
    top := pyembed._bm25_top(packed, blocks, terms, sizes, w, avgdl, m);
    cids := top.ids;
    cps := top.scores;
    IF filter IS NULL THEN
      ids := cids;
      scores := cps;
      RETURN;
    END IF;
    SELECT array_agg(h.chunk_id ORDER BY h.i), array_agg(h.s ORDER BY h.i) INTO ids, scores
      FROM (SELECT h.chunk_id, h.s, h.i FROM unnest(cids, cps) WITH ORDINALITY AS h(chunk_id, s, i)
             WHERE (NOT by_document AND EXISTS (
                      SELECT FROM pyembed.chunks ch WHERE ch.corpus_id = c.corpus_id
                         AND ch.chunk_id = h.chunk_id AND ch.metadata @> filter))
                OR (by_document AND EXISTS (
                      SELECT FROM pyembed.documents d WHERE d.corpus_id = c.corpus_id
                         AND d.doc_no = h.chunk_id AND d.metadata @> filter))
             ORDER BY h.i LIMIT n) h;
    EXIT WHEN coalesce(cardinality(ids), 0) >= n OR coalesce(cardinality(cids), 0) < m;
    m := 8 * m;
  END LOOP;
END
$$;

-- The keyword ranking of hybrid search (pyembed._keyword_ranking, `candidates` as search_hybrid's
-- default) for a client to hand back to search_hybrid with the query vector: (ids, scores, keys),
-- empty arrays when nothing matches. Grouped by document, the best `passages` documents come
-- with their passages (their best chunks by BM25, pyembed._keyword_passages) and the others'
-- ids are NULL: search_hybrid looks up only the passages of the fused hits that lack one. The
-- Python client asks for k, its search's own (the keyword hits a fusion can keep without the
-- vector leg's support are among the keyword ranking's best k), while it embeds the query, so
-- that the call after the embedding (pyembed.search_embedded) seldom looks one up.
CREATE OR REPLACE FUNCTION pyembed.keyword_ranking(
  corpus text, query text, candidates numeric DEFAULT 100, filter jsonb DEFAULT NULL,
  group_by text DEFAULT 'document', passages numeric DEFAULT 0, OUT ids bigint[],
  OUT scores float8[], OUT keys text[])
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora;
  r record;
  n integer;
BEGIN
  IF num_nulls(candidates, passages) > 0 THEN
    PERFORM pyembed._needs(candidates IS NULL, 'candidates', 'keyword_ranking');
    PERFORM pyembed._needs(passages IS NULL, 'passages', 'keyword_ranking');
  END IF;
  -- _count_arg (a call with a SET clause) only for its error, as in pyembed.search
  n := CASE WHEN passages BETWEEN 0 AND 1000 AND passages = trunc(passages) THEN passages::integer
            ELSE pyembed._count_arg(passages, 'passages', 0, 1000) END;
  c := pyembed.lookup_corpus(corpus);
  r := pyembed._keyword_ranking(c, query,
                                CASE WHEN candidates BETWEEN 1 AND 1000
                                          AND candidates = trunc(candidates)
                                     THEN candidates::integer
                                     ELSE pyembed._count_arg(candidates, 'candidates', 1, 1000)
                                END, filter, group_by, passages => false);
  ids := coalesce(r.ids, '{}');
  scores := coalesce(r.scores, '{}');
  keys := coalesce(r.keys, '{}');
  n := least(n, cardinality(keys));
  IF group_by = 'document' AND n > 0 THEN
    ids := pyembed._keyword_passages(c, query, keys[1:n]::bigint[]) || ids[n + 1:];
  END IF;
END
$$;

-- The n best of packed postings (as pyembed.posting_blocks holds them), block after block,
-- each block numbered as in `blocks`, of the term at its place in `terms` (their idf: `idfs`)
-- and `sizes` bytes long: (chunk ids, BM25 scores), best first, ties by chunk id. Parallel
-- unsafe, as every PL/Python function here: a backend's first import of pyembed takes its stamp
-- lock through SPI (pyembed.loaded), which a parallel operation refuses.
CREATE OR REPLACE FUNCTION pyembed._bm25_top(packed bytea, blocks bigint[], terms integer[],
                                             sizes integer[], idfs float8[], avgdl float8,
                                             n integer, OUT ids bigint[], OUT scores float8[])
LANGUAGE plpython3u IMMUTABLE STRICT PARALLEL UNSAFE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
try:
    from pyembed import bm25
except Exception as exc:  # pyembed._cannot_import: PE013 with the fix, not 38000 and a class
    plpy.execute(plpy.prepare("SELECT pyembed._cannot_import($1)", ["text"]), [repr(exc)])
try:
    return bm25.top_for_sql(packed, blocks, terms, sizes, idfs, avgdl, n)
except ValueError as exc:  # (postings unlike pyembed._bm25's: a DBA's direct call)
    plpy.error(str(exc), sqlstate="PE005")
$$;

-- Hybrid search's ranking of corpus `c` (looked up by its caller): its arguments checked, then
-- the two legs fused, best first, as (chunk ids, scores): each hit's passage, the vector leg's
-- nearest chunk or, for a document only the keyword ranking found, its best chunk by BM25. Its
-- callers read the texts: pyembed.search_hybrid as rows, search_embedded (a new query's second
-- call) as arrays, without a layer between.
CREATE OR REPLACE FUNCTION pyembed._hybrid_ranking(
  c pyembed.corpora, query text, query_embedding vector, query_model_key text, k numeric,
  filter jsonb, candidates numeric, rrf_k numeric, group_by text, fusion text,
  alpha double precision, keyword_ids bigint[], keyword_scores float8[], keyword_keys text[],
  OUT ids bigint[], OUT scores float8[])
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  d record;
  s record;
  keys text[];
  missing bigint[];
BEGIN
  fusion := coalesce(fusion, 'relative');  -- the default
  IF fusion NOT IN ('rrf', 'relative') THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('fusion must be rrf or relative, not %s', pyembed._quoted(fusion));
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
  -- k and candidates are numeric (pyembed._count_arg says why): whole numbers in range, as
  -- integer below
  IF candidates IS NULL OR candidates < 1 OR candidates > 1000 OR candidates <> trunc(candidates)
  THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('candidates must be 1..1000, got %s', candidates);
  END IF;
  IF rrf_k IS NULL OR rrf_k < 0 THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005', MESSAGE = format('rrf_k must be 0 or more, got %s', rrf_k);
  END IF;
  IF k IS NULL OR k < 1 OR k > 1000 OR k <> trunc(k) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('k must be 1..1000, got %s', coalesce(k::text, 'NULL'));
  END IF;
  alpha := coalesce(alpha, 0.4);  -- the default weight
  -- Both rankings without their texts (the guarded vector one first: PE001 before anything);
  -- the texts of the k fused hits alone are read.
  IF (keyword_ids IS NOT NULL AND (cardinality(keyword_ids) IS DISTINCT FROM
                                    cardinality(keyword_scores)
                                    OR cardinality(keyword_ids) IS DISTINCT FROM
                                       cardinality(keyword_keys)))
     OR array_ndims(keyword_ids) > 1 OR array_ndims(keyword_scores) > 1
     OR array_ndims(keyword_keys) > 1 THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = 'keyword_ids, keyword_scores and keyword_keys must have one element per hit '
                '(one-dimensional arrays)';
  END IF;
  -- a ranking as pyembed.keyword_ranking gives it: at most `candidates` hits, finite scores (a
  -- NaN sorts above every number and would rank first)
  IF cardinality(keyword_ids) > candidates THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('a handed-in keyword ranking has at most candidates (%s) hits, not %s',
                       candidates, cardinality(keyword_ids));
  END IF;
  -- (array operators and one match over the joined keys: unnest and a match per key cost
  -- every new hybrid query several times more)
  IF array_position(keyword_scores, NULL) IS NOT NULL
     OR keyword_scores && '{NaN,Infinity,-Infinity}'::float8[] THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = 'keyword_scores must be finite numbers (NULL, NaN and infinity are refused)';
  END IF;
  -- a key is a document number or a chunk id, as pyembed.keyword_ranking gives it: the keys
  -- joined by spaces are numbers and spaces, with one space fewer than keys (none in a key)
  IF cardinality(keyword_keys) > 0
     AND (array_position(keyword_keys, NULL) IS NOT NULL
          OR array_to_string(keyword_keys, ' ') !~ '^-?[0-9]{1,18}( -?[0-9]{1,18})*$'
          OR length(replace(array_to_string(keyword_keys, ' '), ' ', ''))
             <> length(array_to_string(keyword_keys, ' ')) - cardinality(keyword_keys) + 1) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = 'keyword_keys must be the keys pyembed.keyword_ranking returned (whole numbers)';
  END IF;
  -- the vector leg: the documents among the `candidates` nearest chunks (one index scan)
  d := pyembed._vector_ranking(c, query_embedding, query_model_key, candidates::integer, filter,
                               group_by, chunks => candidates::integer);
  IF keyword_ids IS NULL THEN
    s := pyembed._keyword_ranking(c, query, candidates::integer, filter, group_by,
                                  passages => false);
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
    -- ties in the order of the vector leg's chunk ids, then the keys: a keyword passage found
    -- before (keyword_ranking's `passages`) does not move its document among equals
    SELECT coalesce(x.chunk_id, y.chunk_id) AS chunk_id, coalesce(x.key, y.key) AS key,
           coalesce(x.chunk_id, CASE WHEN group_by = 'chunk' THEN y.chunk_id END) AS tie,
           CASE fusion
             WHEN 'rrf' THEN coalesce(1.0 / (rrf_k + x.r), 0) + coalesce(1.0 / (rrf_k + y.r), 0)
             ELSE alpha * CASE WHEN x.r IS NULL THEN 0 WHEN x.hi > x.lo
                               THEN (x.score - x.lo) / (x.hi - x.lo) ELSE 1 END
                  + (1 - alpha) * CASE WHEN y.r IS NULL THEN 0 WHEN y.hi > y.lo
                                       THEN (y.score - y.lo) / (y.hi - y.lo) ELSE 1 END
           END::float8 AS score
      FROM dense x FULL JOIN sparse y ON y.key = x.key
  )
  SELECT array_agg(f.chunk_id ORDER BY f.score DESC, f.tie, f.key),
         array_agg(f.score ORDER BY f.score DESC, f.tie, f.key),
         array_agg(f.key ORDER BY f.score DESC, f.tie, f.key) INTO ids, scores, keys
    FROM (SELECT fu.* FROM fused fu ORDER BY fu.score DESC, fu.tie, fu.key LIMIT k::integer) f;
  -- The documents only the keyword ranking found have no passage yet (NULL chunk id).
  IF array_position(ids, NULL) IS NOT NULL THEN
    missing := array(SELECT h.key::bigint FROM unnest(ids, keys) AS h(chunk_id, key)
                      WHERE h.chunk_id IS NULL);
    SELECT array_agg(coalesce(h.chunk_id, m.chunk_id) ORDER BY h.i) INTO ids
      FROM unnest(ids, keys) WITH ORDINALITY AS h(chunk_id, key, i)
      LEFT JOIN unnest(missing, pyembed._keyword_passages(c, query, missing))
             AS m(doc_no, chunk_id) ON m.doc_no::text = h.key;
  END IF;
END
$$;

-- Hybrid: the guarded vector ranking (PE001 on a mismatched key) and the BM25 ranking, fused in
-- one statement. The BM25 ranking has `candidates` results (documents or chunks, as group_by
-- says); the vector ranking has the documents among the `candidates` nearest chunks (fewer where
-- a document has several of them; grouped by chunk, the chunks themselves), read by one scan:
-- `candidates` distinct documents took a scan twice as deep, or two, for the same quality. The
-- fusions:
-- - 'rrf': reciprocal rank fusion, 1 / (rrf_k + rank) summed over both rankings;
-- - 'relative' (NULL: the default, chosen on SciFact's test split): relative-score fusion,
--   each ranking's scores min-max normalised to 0..1 over its candidates (its worst scores 0,
--   its best 1; one candidate scores 1), then alpha * vector + (1 - alpha) * keyword (alpha
--   0.4 unless given, the best weight on SciFact's test split; README.md has the figures).
-- A result missing from one ranking gets nothing from it.
-- keyword_ids/_scores/_keys: the keyword ranking, made before by pyembed.keyword_ranking with the
-- same query, candidates, filter and group_by (the Python client ranks by keywords while it
-- embeds the query, then fuses here); NULL: ranked here. A given id is a document's passage
-- (keyword_ranking's `passages`), NULL one to look up if the document is kept. Given ids are
-- read from this corpus only, like any ranking's.
CREATE OR REPLACE FUNCTION pyembed.search_hybrid(
  corpus text, query text, query_embedding vector, query_model_key text,
  k numeric DEFAULT 10, filter jsonb DEFAULT NULL, candidates numeric DEFAULT 100,
  rrf_k numeric DEFAULT 60, group_by text DEFAULT 'document', fusion text DEFAULT NULL,
  alpha double precision DEFAULT NULL, keyword_ids bigint[] DEFAULT NULL,
  keyword_scores float8[] DEFAULT NULL, keyword_keys text[] DEFAULT NULL)
RETURNS TABLE (document_id text, chunk_id bigint, chunk_index integer, content text,
               metadata jsonb, score double precision, model_key text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora;
  r record;
BEGIN
  IF num_nulls(query_embedding, query_model_key) > 0 THEN
    PERFORM pyembed._needs(query_embedding IS NULL, 'query_embedding', 'search_hybrid');
    PERFORM pyembed._needs(query_model_key IS NULL, 'query_model_key', 'search_hybrid');
  END IF;
  -- the corpus by lookup_corpus's rule, inlined as in pyembed.search (no call), and its error
  SELECT * INTO c FROM pyembed._corpus_named(corpus);
  IF NOT FOUND THEN
    c := pyembed.lookup_corpus(corpus);
  END IF;
  r := pyembed._hybrid_ranking(c, query, query_embedding, query_model_key, k, filter, candidates,
                               rrf_k, group_by, fusion, alpha, keyword_ids, keyword_scores,
                               keyword_keys);
  RETURN QUERY
  SELECT ch.document_id, ch.chunk_id, ch.chunk_index, ch.content, ch.metadata, r.scores[h.n],
         query_model_key
    FROM unnest(r.ids) WITH ORDINALITY AS h(chunk_id, n)
    JOIN pyembed.chunks ch ON ch.corpus_id = c.corpus_id AND ch.chunk_id = h.chunk_id
   ORDER BY h.n;
END
$$;
