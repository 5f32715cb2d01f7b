-- Chunks: their text hash, and what deleting them deletes; documents: when they changed.

-- Chunks carry the sha256 of their text, computed here so it cannot disagree with the text: at
-- every write of a chunk, whichever columns it names (an UPDATE of content_hash alone included).
CREATE OR REPLACE FUNCTION pyembed._chunk_hash() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  NEW.content_hash := sha256(convert_to(NEW.content, 'UTF8'));
  RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER chunks_hash
  BEFORE INSERT OR UPDATE ON pyembed.chunks
  FOR EACH ROW EXECUTE FUNCTION pyembed._chunk_hash();

-- One document's size: at most its corpus's max_document_chunks chunks (revision 0038: a setting
-- with a range, as chunk_tokens; 10,000 unless the owner sets another): one statement writes a
-- document, holding its locks until the last chunk. The problem with document `id` of
-- corpus p_corpus_id having `chunks` chunks (`bytes`: its text's bytes as UTF-8, when the caller
-- knows them) and the fix, or NULL when it fits. The one copy of the rule: the chunks table's
-- statement triggers ask it at every write (every writer: your SQL, the client, `pyembed
-- ingest`, pyembed.add_document), a client before it embeds (pyembed.corpora.document_hashes).
CREATE OR REPLACE FUNCTION pyembed._document_size_problem(p_corpus_id integer, id text,
                                                          chunks bigint, bytes bigint,
                                                          OUT problem text, OUT hint text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora;
BEGIN
  SELECT * INTO c FROM pyembed.corpora WHERE corpus_id = p_corpus_id;
  IF NOT FOUND OR chunks IS NULL OR chunks <= c.max_document_chunks THEN
    RETURN;
  END IF;
  problem := format('document %s is too big for corpus %s: %s chunks%s, more than its '
                    'max_document_chunks %s', to_jsonb(id)::text, c.name, chunks,
                    CASE WHEN bytes IS NOT NULL THEN format(' (%s bytes of text)', bytes) END,
                    c.max_document_chunks);
  hint := format('split the document, give the corpus a larger chunk_tokens, or raise its bound '
                 'as the owner: set pyembed.corpora.max_document_chunks to %s for corpus_id %s '
                 '(at most %s)', chunks, c.corpus_id,
                 split_part(pyembed._setting_range('max_document_chunks'), '..', 2));
END
$$;

-- PE005 for a write of chunks past its document's bound (above), before the keyword index and
-- the queue see them (AFTER triggers of one event run in the order of their names). A writer
-- numbers a document's chunks from 0: its highest chunk_index + 1 is its number of chunks.
CREATE OR REPLACE FUNCTION pyembed._chunks_bounded() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  r record;
  p record;
BEGIN
  SELECT n.corpus_id, n.document_id, max(n.chunk_index)::bigint + 1 AS chunks INTO r
    FROM new_rows n JOIN pyembed.corpora c ON c.corpus_id = n.corpus_id
   WHERE n.chunk_index >= c.max_document_chunks
   GROUP BY n.corpus_id, n.document_id
   ORDER BY n.document_id LIMIT 1;
  IF r.corpus_id IS NOT NULL THEN
    p := pyembed._document_size_problem(r.corpus_id, r.document_id, r.chunks, NULL);
    RAISE EXCEPTION USING ERRCODE = 'PE005', MESSAGE = p.problem, HINT = p.hint;
  END IF;
  RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER chunks_bound_insert
  AFTER INSERT ON pyembed.chunks REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._chunks_bounded();
CREATE OR REPLACE TRIGGER chunks_bound_update
  AFTER UPDATE ON pyembed.chunks REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._chunks_bounded();

-- Deleting chunks deletes their vectors and keyword postings (one statement per corpus,
-- instead of row-level foreign keys; a dropped corpus has dropped its partition already),
-- planned as pyembed._vectors_written is (010-guards.sql).
CREATE OR REPLACE FUNCTION pyembed._chunks_deleted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_custom_plan
SET enable_seqscan = off
AS $$
DECLARE
  r record;
BEGIN
  FOR r IN SELECT corpus_id, array_agg(chunk_id) AS ids FROM old_rows GROUP BY corpus_id LOOP
    DELETE FROM pyembed.vectors v WHERE v.corpus_id = r.corpus_id AND v.chunk_id = ANY (r.ids);
    DELETE FROM pyembed.postings p WHERE p.corpus_id = r.corpus_id AND p.chunk_id = ANY (r.ids);
  END LOOP;
  RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER chunks_deleted
  AFTER DELETE ON pyembed.chunks REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pyembed._chunks_deleted();

-- A document's updated_at is the server's: the time of the write that last changed one of its
-- other columns, whatever the writer gave (a row rewritten unchanged, as the keyword index's
-- lock does, keeps its time).
CREATE OR REPLACE FUNCTION pyembed._document_stamped() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF TG_OP = 'UPDATE'
     AND to_jsonb(NEW) - 'updated_at' IS NOT DISTINCT FROM to_jsonb(OLD) - 'updated_at' THEN
    NEW.updated_at := OLD.updated_at;
  ELSE
    NEW.updated_at := now();
  END IF;
  RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER documents_stamped
  BEFORE INSERT OR UPDATE ON pyembed.documents
  FOR EACH ROW EXECUTE FUNCTION pyembed._document_stamped();

-- A document's metadata is its chunks' too (the vector searches filter and return the chunks'
-- copy, the keyword searches the document's): a write of the document's alone (your SQL, the
-- ORM's Document.metadata_) is copied to its chunks, so that every search reads the same. Its
-- content_hash, which covers the metadata pyembed last wrote, is then no document's hash (an
-- empty one): the next add of that document stores what it gives, even the metadata it had.
CREATE OR REPLACE FUNCTION pyembed._document_metadata_written() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF TG_WHEN = 'BEFORE' THEN
    IF NEW.content_hash IS NOT DISTINCT FROM OLD.content_hash THEN
      NEW.content_hash := ''::bytea;
    END IF;
    RETURN NEW;
  END IF;
  UPDATE pyembed.chunks SET metadata = NEW.metadata
   WHERE corpus_id = NEW.corpus_id AND document_id = NEW.document_id
     AND metadata IS DISTINCT FROM NEW.metadata;
  RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER documents_metadata_hash
  BEFORE UPDATE OF metadata ON pyembed.documents
  FOR EACH ROW WHEN (OLD.metadata IS DISTINCT FROM NEW.metadata)
  EXECUTE FUNCTION pyembed._document_metadata_written();

CREATE OR REPLACE TRIGGER documents_metadata_copied
  AFTER UPDATE OF metadata ON pyembed.documents
  FOR EACH ROW WHEN (OLD.metadata IS DISTINCT FROM NEW.metadata)
  EXECUTE FUNCTION pyembed._document_metadata_written();

-- A document id is compared exactly, so ids a reader takes for one were distinct ids: "doc" and
-- "doc " or "doc" + a no-break space, "é" composed and decomposed, or an id of spaces alone.
-- Refused (PE005), not normalised: an id changed on the way in would not be found again by the
-- id its writer holds. An id is not only whitespace, has none at its start or end (Unicode's
-- White_Space characters), no control characters (U+0000..U+001F, U+007F..U+009F), and is in
-- Unicode normal form NFC, the form text typed or pasted mostly comes in. The problem with `id`,
-- or NULL. The one copy of the rule: a client asks it in its lookup of the stored documents
-- (pyembed.corpora.document_hashes), before a provider is paid for their chunks.
CREATE OR REPLACE FUNCTION pyembed._document_id_problem(id text) RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  -- White_Space (Unicode's PropList), as a bracket expression.
  ws CONSTANT text := E'[\\u0009-\\u000D\\u0020\\u0085\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F'
                      '\\u205F\\u3000]';
  -- The control and format characters JSON leaves as they are (it escapes those below U+0020),
  -- which the message writes \uXXXX (a terminal's escape, a right-to-left override reordering
  -- the message as shown), as pyembed.text's.
  unshown CONSTANT text := E'[\\x7f-\\x9f\\u00ad\\u061c\\u180e\\u200b-\\u200f\\u2028-\\u202e\\u2060-\\u206f'
                           '\\ufeff\\ufff9-\\ufffb]';
  said text;
  nfc text;
  bad text;
  shown text[];
BEGIN
  IF id IS NULL THEN  -- (as pyembed._needs says it, which the writer's role may not call)
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = 'id is NULL: pyembed._document_id_problem() needs a value for it';
  END IF;
  IF length(id) NOT BETWEEN 1 AND 512 THEN  -- (the column's CHECK, in these words first)
    RETURN format('a document id is 1..512 characters, got %s characters', length(id));
  END IF;
  bad := substring(id FROM E'[\\u0001-\\u001F\\u007F-\\u009F]');
  IF id ~ ('^' || ws || '*$') THEN
    said := 'is only whitespace';
  ELSIF left(id, 1) ~ ws THEN
    said := format('starts with whitespace (U+%s)', lpad(upper(to_hex(ascii(left(id, 1)))), 4, '0'));
  ELSIF right(id, 1) ~ ws THEN
    said := format('ends with whitespace (U+%s)', lpad(upper(to_hex(ascii(right(id, 1)))), 4, '0'));
  ELSIF bad IS NOT NULL THEN
    said := format('has a control character (U+%s)', lpad(upper(to_hex(ascii(bad))), 4, '0'));
  ELSIF NOT id IS NFC NORMALIZED THEN
    nfc := normalize(id, NFC);
    said := 'is not in Unicode normal form NFC (as NFC: %s)';
  ELSE
    RETURN NULL;
  END IF;
  -- the ids shown as JSON, their unshown characters escaped (the id, then its NFC form)
  SELECT array_agg((SELECT string_agg(CASE WHEN t.ch ~ unshown
                                           THEN E'\\u' || lpad(to_hex(ascii(t.ch)), 4, '0')
                                           ELSE t.ch END, '' ORDER BY t.n)
                      FROM regexp_split_to_table(to_jsonb(v.i)::text, '') WITH ORDINALITY t(ch, n))
                   ORDER BY v.o)
    INTO shown FROM unnest(ARRAY[id, nfc]) WITH ORDINALITY v(i, o) WHERE v.i IS NOT NULL;
  RETURN format('document id %s %s', shown[1], format(said, shown[2]));
END
$$;

-- The bounds a write of documents must keep that the client can ask before its embedding, by
-- constraint name: the documents' and chunks' metadata (pg_column_size) and a chunk's text
-- (octet_length), from their CHECKs <table>_<column>_bound (revision 0022), read from the
-- catalogue: the one place each bound is held. One read for a whole lookup
-- (pyembed.corpora.document_hashes): a tightened CHECK is obeyed.
CREATE OR REPLACE FUNCTION pyembed._write_bounds() RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT coalesce(jsonb_object_agg(c.conname, (regexp_match(pg_catalog.pg_get_constraintdef(c.oid),
                                                             E'<= (\\d+)\\)'))[1]::bigint), '{}')
    FROM pg_catalog.pg_constraint c
   WHERE c.connamespace = 'pyembed'::regnamespace AND c.contype = 'c'
     AND c.conname IN ('documents_metadata_bound', 'chunks_metadata_bound', 'chunks_content_bound')
$$;

-- What a write of each document `ids`[i] with `metadata`[i] and its longest chunk of
-- `chunk_bytes`[i] bytes (UTF-8) would be refused for, by the documents and chunks tables' own
-- rules: (id, problem) for each refused one, in the order given. The id rule above, then the
-- bounds of pyembed._write_bounds (read once a call). A client asks it in its lookup of the
-- stored documents (pyembed.corpora.document_hashes), and for its chunks' lengths once it has
-- cut them, before a provider is paid for their chunks: a document refused at its write had
-- been embedded, its batch's provider calls lost. NULL metadata or chunk_bytes (or an element
-- of either): none given.
CREATE OR REPLACE FUNCTION pyembed._document_problems(ids text[], metadata jsonb[],
                                                      chunk_bytes bigint[])
RETURNS TABLE (id text, problem text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  bounds jsonb;
  most bigint;
  name text;
  i integer;
BEGIN
  IF ids IS NULL THEN
    PERFORM pyembed._needs(true, 'ids', '_document_problems');
  END IF;
  IF cardinality(metadata) <> cardinality(ids) OR cardinality(chunk_bytes) <> cardinality(ids) THEN
    PERFORM pyembed._one_each('_document_problems', 'ids, metadata and chunk_bytes',
                              ARRAY[cardinality(ids), cardinality(metadata),
                                    cardinality(chunk_bytes)]);
  END IF;
  bounds := pyembed._write_bounds();
  FOR i IN 1 .. coalesce(cardinality(ids), 0) LOOP
    id := ids[i];
    problem := pyembed._document_id_problem(id);
    IF problem IS NULL THEN
      FOREACH name IN ARRAY ARRAY['documents_metadata_bound', 'chunks_metadata_bound'] LOOP
        most := (bounds ->> name)::bigint;
        IF pg_column_size(metadata[i]) > most THEN
          -- (the id as JSON, as the id rule shows one: it has passed that rule)
          problem := format('document %s: metadata is at most %s bytes as jsonb, got %s (the '
                            'table''s check %s)', to_jsonb(id)::text, most,
                            pg_column_size(metadata[i]), name);
          EXIT;
        END IF;
      END LOOP;
    END IF;
    most := (bounds ->> 'chunks_content_bound')::bigint;
    IF problem IS NULL AND chunk_bytes[i] > most THEN
      problem := format('document %s: a chunk is at most %s bytes as UTF-8, got %s (the '
                        'table''s check chunks_content_bound): give it a smaller chunk_tokens',
                        to_jsonb(id)::text, most, chunk_bytes[i]);
    END IF;
    IF problem IS NOT NULL THEN
      RETURN NEXT;
    END IF;
  END LOOP;
END
$$;

-- Checked at every write of a document's id (every writer: your SQL, the client, the ORM,
-- `pyembed ingest`, pyembed.add_document), not at a write of its other columns: a row stored
-- before the rule can still be updated or deleted, and renamed to an id the rule accepts.
CREATE OR REPLACE FUNCTION pyembed._document_id_checked() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  problem text;
BEGIN
  IF NEW.document_id IS NULL OR (TG_OP = 'UPDATE' AND NEW.document_id = OLD.document_id) THEN
    RETURN NEW;  -- (NULL: the column's NOT NULL says so)
  END IF;
  problem := pyembed._document_id_problem(NEW.document_id);
  IF problem IS NOT NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = problem,
      HINT = 'give an id as its writer will look it up again: NFC, no whitespace at its ends, no '
             'control characters (README: document ids)';
  END IF;
  RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER documents_id_checked
  BEFORE INSERT OR UPDATE OF document_id ON pyembed.documents
  FOR EACH ROW EXECUTE FUNCTION pyembed._document_id_checked();

-- Deleting documents and chunks: the application role holds no DELETE on pyembed's tables,
-- because a table-level DELETE (or UPDATE, TRUNCATE) lets a role LOCK the table in any mode, and
-- these tables are every tenant's: one tenant's ACCESS EXCLUSIVE lock stalled every other's
-- searches and writes. These functions delete the caller's tenant's rows as their owner, the
-- corpus looked up as every call by name does (PE002 for a name the tenant has no corpus of).

-- Deletes these documents of the corpus (their chunks, vectors, keyword postings and queued
-- work with them); returns how many. An id the corpus has no document of is skipped; one that
-- no document can have (pyembed._document_id_problem) is PE005.
CREATE OR REPLACE FUNCTION pyembed.delete_documents(corpus text, document_ids text[])
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora;
  n bigint;
  bad text;
BEGIN
  IF num_nulls(corpus, document_ids) > 0 THEN
    PERFORM pyembed._needs(corpus IS NULL, 'corpus', 'delete_documents');
    PERFORM pyembed._needs(document_ids IS NULL, 'document_ids', 'delete_documents');
  END IF;
  c := pyembed.lookup_corpus(corpus);
  -- an id no document can have is a mistake to say, not one more id to skip
  IF array_position(document_ids, NULL) IS NOT NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005', MESSAGE = 'document_ids holds a NULL',
      HINT = 'leave the NULL out: each element is the id of a document to delete';
  END IF;
  SELECT p INTO bad FROM unnest(document_ids) i, pyembed._document_id_problem(i) p
   WHERE p IS NOT NULL LIMIT 1;
  IF bad IS NOT NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005', MESSAGE = bad,
      HINT = 'give an id as its writer will look it up again: NFC, no whitespace at its ends, no '
             'control characters (README: document ids)';
  END IF;
  DELETE FROM pyembed.documents d
   WHERE d.corpus_id = c.corpus_id AND d.document_id = ANY (document_ids);
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
$$;

-- Deletes each of these documents' chunks from index from_index[i] on (0: all of them; their
-- vectors, postings and queued work with them), the documents kept: what a document rewritten
-- with fewer chunks loses (pyembed.corpora.write_chunks, pyembed.add_document). Returns how many.
CREATE OR REPLACE FUNCTION pyembed.delete_chunks(corpus text, document_ids text[],
                                                 from_index integer[])
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora;
  n bigint;
BEGIN
  IF num_nulls(corpus, document_ids, from_index) > 0 THEN
    PERFORM pyembed._needs(corpus IS NULL, 'corpus', 'delete_chunks');
    PERFORM pyembed._needs(document_ids IS NULL, 'document_ids', 'delete_chunks');
    PERFORM pyembed._needs(from_index IS NULL, 'from_index', 'delete_chunks');
  END IF;
  IF cardinality(document_ids) <> cardinality(from_index) THEN
    PERFORM pyembed._one_each('delete_chunks', 'document_ids and from_index',
                              ARRAY[cardinality(document_ids), cardinality(from_index)]);
  END IF;
  IF EXISTS (SELECT FROM unnest(from_index) AS i WHERE i IS NULL OR i < 0) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = 'from_index must hold chunk indexes (0 or more): pyembed.delete_chunks() got '
                || coalesce((SELECT i::text FROM unnest(from_index) AS i
                              WHERE i IS NULL OR i < 0 LIMIT 1), 'NULL');
  END IF;
  c := pyembed.lookup_corpus(corpus);
  DELETE FROM pyembed.chunks ch USING unnest(document_ids, from_index) AS t(d, i)
   WHERE ch.corpus_id = c.corpus_id AND ch.document_id = t.d AND ch.chunk_index >= t.i;
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
$$;
