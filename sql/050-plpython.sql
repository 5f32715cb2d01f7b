-- Embedding from SQL: thin wrappers; the logic is in pyembed.indb (typed, tested).
-- Network calls are bounded by pyembed.http_timeout (seconds, default 10, at most 3600) per
-- request and pyembed.http_retries (default 2, at most 10): PL/Python cannot be cancelled
-- while Python runs.
--
-- Each function is PL/pgSQL around a PL/Python body, pyembed._<name>, so that its errors read
-- like PostgreSQL's own. PL/Python reports every Python exception as "<class>: message" with
-- the traceback as CONTEXT, even one raised by plpy.error. pyembed.indb.call makes every error
-- a plpy.Error with the SQLSTATE, DETAIL and HINT it should have (a database error's own,
-- PE001.. for pyembed's, XX000 for a bug); the wrapper raises it again without "plpy.Error: "
-- and without the traceback (the schema, table and constraint names are not carried). It
-- catches query_canceled too (a statement timeout inside the function), which WHEN OTHERS
-- leaves out; pyembed._raise_again raises it (an empty DETAIL or HINT would show as an empty
-- line).
-- The bodies are SECURITY INVOKER: they run as their wrapper, which has the security mode.

-- The wrappers' error, raised again: without PL/Python's "plpy.Error: " (or "plpy.SPIError: ",
-- pyembed._cannot_import's), with DETAIL and HINT only when they have text. Immutable, as
-- pyembed._needs: it only raises (the stable version() and code_digest() call it).
CREATE OR REPLACE FUNCTION pyembed._raise_again(e_state text, e_message text, e_detail text,
                                               e_hint text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  e_message := CASE WHEN starts_with(e_message, 'plpy.Error: ') THEN substr(e_message, 13)
                    WHEN starts_with(e_message, 'plpy.SPIError: ') THEN substr(e_message, 16)
                    ELSE e_message END;
  IF e_detail = '' AND e_hint = '' THEN
    RAISE EXCEPTION USING ERRCODE = e_state, MESSAGE = e_message;
  ELSIF e_hint = '' THEN
    RAISE EXCEPTION USING ERRCODE = e_state, MESSAGE = e_message, DETAIL = e_detail;
  ELSIF e_detail = '' THEN
    RAISE EXCEPTION USING ERRCODE = e_state, MESSAGE = e_message, HINT = e_hint;
  ELSE
    RAISE EXCEPTION USING ERRCODE = e_state, MESSAGE = e_message, DETAIL = e_detail,
                          HINT = e_hint;
  END IF;
END
$$;

-- PE013 for a PL/Python body whose server cannot import pyembed (`error`: what the import
-- raised), with the fix: every body calls it from its import's except clause, where PL/Python
-- said SQLSTATE 38000 and Python's exception class ("ModuleNotFoundError: No module named
-- 'pyembed'"). The one place its words are written; `pyembed doctor` shows the hint as its fix.
CREATE OR REPLACE FUNCTION pyembed._cannot_import(error text) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  RAISE EXCEPTION USING ERRCODE = 'PE013',
    MESSAGE = format('the server''s Python cannot import pyembed: %s', error),
    HINT = 'make pyembed importable by the server''s python3 (a local cluster links it into '
           'its pylib folder at `pyembed db start`; elsewhere install it for the server''s '
           'python3: docker/install-host.sh), then call again';
END
$$;

CREATE OR REPLACE FUNCTION pyembed._embed(input text, model_key text, input_type text)
RETURNS vector
LANGUAGE plpython3u VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
try:
    from pyembed import indb
except Exception as exc:  # pyembed._cannot_import: PE013 with the fix, not 38000 and a class
    plpy.execute(plpy.prepare("SELECT pyembed._cannot_import($1)", ["text"]), [repr(exc)])
return indb.call(plpy, indb.embed, GD, input, model_key, input_type)
$$;

CREATE OR REPLACE FUNCTION pyembed.embed(input text, model_key text,
                                         input_type text DEFAULT 'document')
RETURNS vector
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  e_state text; e_message text; e_detail text; e_hint text;
BEGIN
  RETURN pyembed._embed(input, model_key, input_type);
EXCEPTION WHEN OTHERS OR query_canceled THEN
  GET STACKED DIAGNOSTICS e_state = RETURNED_SQLSTATE, e_message = MESSAGE_TEXT,
                          e_detail = PG_EXCEPTION_DETAIL, e_hint = PG_EXCEPTION_HINT;
  PERFORM pyembed._raise_again(e_state, e_message, e_detail, e_hint);
END
$$;

CREATE OR REPLACE FUNCTION pyembed._embed_batch(inputs text[], model_key text, input_type text)
RETURNS vector[]
LANGUAGE plpython3u VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
try:
    from pyembed import indb
except Exception as exc:  # pyembed._cannot_import: PE013 with the fix, not 38000 and a class
    plpy.execute(plpy.prepare("SELECT pyembed._cannot_import($1)", ["text"]), [repr(exc)])
return indb.call(plpy, indb.embed_batch, GD, inputs, model_key, input_type)
$$;

-- At most 1,000 texts a call (Voyage's limit per request): a PL/Python call cannot be cancelled
-- (statement_timeout waits for it), so a call is kept to a bounded time; call again for more.
CREATE OR REPLACE FUNCTION pyembed.embed_batch(inputs text[], model_key text,
                                               input_type text DEFAULT 'document')
RETURNS vector[]
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  e_state text; e_message text; e_detail text; e_hint text;
BEGIN
  IF cardinality(inputs) > 1000 THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('embed_batch takes at most 1000 texts a call, not %s: call it again for '
                       'the rest', cardinality(inputs));
  END IF;
  RETURN pyembed._embed_batch(inputs, model_key, input_type);
EXCEPTION WHEN OTHERS OR query_canceled THEN
  GET STACKED DIAGNOSTICS e_state = RETURNED_SQLSTATE, e_message = MESSAGE_TEXT,
                          e_detail = PG_EXCEPTION_DETAIL, e_hint = PG_EXCEPTION_HINT;
  PERFORM pyembed._raise_again(e_state, e_message, e_detail, e_hint);
END
$$;

-- Search by text: the query is embedded with the corpus's own model, so no mismatch is possible.
-- mode: 'vector' (default), 'keyword' (BM25) or 'hybrid' (both, fused: see search_hybrid);
-- group_by 'document' (k distinct documents, the default) or 'chunk'.
CREATE OR REPLACE FUNCTION pyembed._search_text(corpus text, query text, k integer,
                                                filter jsonb, mode text, group_by text,
                                                fusion text, alpha double precision)
RETURNS TABLE (document_id text, chunk_id bigint, chunk_index integer, content text,
               metadata jsonb, score double precision, model_key text)
LANGUAGE plpython3u VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
try:
    from pyembed import indb
except Exception as exc:  # pyembed._cannot_import: PE013 with the fix, not 38000 and a class
    plpy.execute(plpy.prepare("SELECT pyembed._cannot_import($1)", ["text"]), [repr(exc)])
return indb.call(plpy, indb.search_text, GD, corpus, query, k, filter, mode, group_by, fusion,
                 alpha)
$$;

CREATE OR REPLACE FUNCTION pyembed.search_text(corpus text, query text, k numeric DEFAULT 10,
                                               filter jsonb DEFAULT NULL, mode text DEFAULT 'vector',
                                               group_by text DEFAULT 'document',
                                               fusion text DEFAULT NULL,
                                               alpha double precision DEFAULT NULL)
RETURNS TABLE (document_id text, chunk_id bigint, chunk_index integer, content text,
               metadata jsonb, score double precision, model_key text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  e_state text; e_message text; e_detail text; e_hint text;
BEGIN
  RETURN QUERY SELECT * FROM pyembed._search_text(corpus, query,
                                                   pyembed._count_arg(k, 'k', 1, 1000), filter,
                                                   mode, group_by, fusion, alpha);
EXCEPTION WHEN OTHERS OR query_canceled THEN
  GET STACKED DIAGNOSTICS e_state = RETURNED_SQLSTATE, e_message = MESSAGE_TEXT,
                          e_detail = PG_EXCEPTION_DETAIL, e_hint = PG_EXCEPTION_HINT;
  PERFORM pyembed._raise_again(e_state, e_message, e_detail, e_hint);
END
$$;

-- Store a document: chunked here, embedded later by `pyembed worker` (the chunks are queued).
-- The body writes to the corpus pyembed.lookup_corpus finds for the session's user (its
-- tenant's), as the other bodies read theirs. Behind its wrapper like them: PL/Python puts
-- "plpy.Error: " before every message it raises (plpy.error's and a statement's alike, PG 15),
-- which only a PL/pgSQL wrapper can take off, so no role but the owner executes a body.
CREATE OR REPLACE FUNCTION pyembed._add_document(corpus text, document_id text, content text,
                                                 metadata jsonb)
RETURNS integer
LANGUAGE plpython3u VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
try:
    from pyembed import indb
except Exception as exc:  # pyembed._cannot_import: PE013 with the fix, not 38000 and a class
    plpy.execute(plpy.prepare("SELECT pyembed._cannot_import($1)", ["text"]), [repr(exc)])
return indb.call(plpy, indb.add_document, GD, corpus, document_id, content, metadata)
$$;
-- Revoked by name: a database upgraded from when add_document ran as its caller keeps the grant.
REVOKE EXECUTE ON FUNCTION pyembed._add_document(text, text, text, jsonb),
  pyembed._raise_again(text, text, text, text) FROM pyembed_app;

CREATE OR REPLACE FUNCTION pyembed.add_document(corpus text, document_id text, content text,
                                                metadata jsonb DEFAULT '{}')
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  e_state text; e_message text; e_detail text; e_hint text;
BEGIN
  RETURN pyembed._add_document(corpus, document_id, content, metadata);
EXCEPTION WHEN OTHERS OR query_canceled THEN
  GET STACKED DIAGNOSTICS e_state = RETURNED_SQLSTATE, e_message = MESSAGE_TEXT,
                          e_detail = PG_EXCEPTION_DETAIL, e_hint = PG_EXCEPTION_HINT;
  -- A drop that committed after the body looked the corpus up took its row (the document's
  -- foreign key) or its partition: PE002, as the search paths say (pyembed._dropped_meanwhile).
  IF e_state IN ('23503', '42P01') THEN
    PERFORM pyembed.lookup_corpus(corpus);
  END IF;
  PERFORM pyembed._raise_again(e_state, e_message, e_detail, e_hint);
END
$$;

-- API keys for the functions above; only the owner can set or read them. An error raised in
-- the call is reported while the call's settings hold: log_min_error_statement then keeps the
-- calling statement, the secret typed in it, out of the server log (and the parameters of a
-- call that bound them, log_parameter_max_length_on_error).
CREATE OR REPLACE FUNCTION pyembed.set_secret(name text, value text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
SET log_min_error_statement = panic
SET log_parameter_max_length_on_error = 0
AS $$
DECLARE
  msg text;
  con text;
BEGIN
  INSERT INTO pyembed.secrets AS s (name, value) VALUES (set_secret.name, set_secret.value)
  ON CONFLICT ON CONSTRAINT secrets_pkey
  DO UPDATE SET value = EXCLUDED.value, updated_at = now();
EXCEPTION WHEN check_violation THEN
  -- The table's error without PostgreSQL's DETAIL, which shows the whole row: the secret itself
  -- (in the error the client gets and the server logs) beside a name the table refused.
  GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT, con = CONSTRAINT_NAME;
  RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE = msg, CONSTRAINT = con,
    TABLE = 'secrets', SCHEMA = 'pyembed', DETAIL = format('secret %s', pyembed._quoted(name));
END
$$;

-- The pyembed the server's PL/Python imports (`pyembed doctor` compares it with the client's),
-- with pyembed.indb, what the other PL/Python functions run: importing it is doctor's probe,
-- which writes nothing, so that it answers on a replica and in a read-only transaction too.
CREATE OR REPLACE FUNCTION pyembed._version() RETURNS text
LANGUAGE plpython3u STABLE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
try:
    import pyembed
    import pyembed.indb
except Exception as exc:  # pyembed._cannot_import: PE013 with the fix, not 38000 and a class
    plpy.execute(plpy.prepare("SELECT pyembed._cannot_import($1)", ["text"]), [repr(exc)])
return pyembed.__version__
$$;

CREATE OR REPLACE FUNCTION pyembed.version() RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  e_state text; e_message text; e_detail text; e_hint text;
BEGIN
  RETURN pyembed._version();
EXCEPTION WHEN OTHERS OR query_canceled THEN
  GET STACKED DIAGNOSTICS e_state = RETURNED_SQLSTATE, e_message = MESSAGE_TEXT,
                          e_detail = PG_EXCEPTION_DETAIL, e_hint = PG_EXCEPTION_HINT;
  PERFORM pyembed._raise_again(e_state, e_message, e_detail, e_hint);
END
$$;

-- A digest of the package (its Python code and the data it reads) of the pyembed the server's
-- PL/Python imports (pyembed.config.code_digest): `pyembed doctor` compares it with the client's, since a
-- checkout whose code changed keeps its version string. Writes nothing, as version() above.
CREATE OR REPLACE FUNCTION pyembed._code_digest() RETURNS text
LANGUAGE plpython3u STABLE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
try:
    from pyembed import config
except Exception as exc:  # pyembed._cannot_import: PE013 with the fix, not 38000 and a class
    plpy.execute(plpy.prepare("SELECT pyembed._cannot_import($1)", ["text"]), [repr(exc)])
return config.code_digest()
$$;

CREATE OR REPLACE FUNCTION pyembed.code_digest() RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  e_state text; e_message text; e_detail text; e_hint text;
BEGIN
  RETURN pyembed._code_digest();
EXCEPTION WHEN OTHERS OR query_canceled THEN
  GET STACKED DIAGNOSTICS e_state = RETURNED_SQLSTATE, e_message = MESSAGE_TEXT,
                          e_detail = PG_EXCEPTION_DETAIL, e_hint = PG_EXCEPTION_HINT;
  PERFORM pyembed._raise_again(e_state, e_message, e_detail, e_hint);
END
$$;
