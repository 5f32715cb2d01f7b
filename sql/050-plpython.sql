-- Embedding from SQL: thin PL/Python wrappers; the logic is in pyembed.indb (typed, tested).
-- Network calls are bounded by pyembed.http_timeout (seconds, default 10) per request and
-- pyembed.http_retries (default 2): PL/Python cannot be cancelled while Python runs.

CREATE OR REPLACE FUNCTION pyembed.embed(input text, model_key text,
                                         input_type text DEFAULT 'document')
RETURNS vector
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
from pyembed import indb
return indb.call(plpy, indb.embed, GD, input, model_key, input_type)
$$;

CREATE OR REPLACE FUNCTION pyembed.embed_batch(inputs text[], model_key text,
                                               input_type text DEFAULT 'document')
RETURNS vector[]
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
from pyembed import indb
return indb.call(plpy, indb.embed_batch, GD, inputs, model_key, input_type)
$$;

-- Search by text: the query is embedded with the corpus's own model, so no mismatch is possible.
-- mode: 'vector' (default), 'keyword' (BM25) or 'hybrid' (both, fused by reciprocal rank).
CREATE OR REPLACE FUNCTION pyembed.search_text(corpus text, query text, k integer DEFAULT 10,
                                               filter jsonb DEFAULT NULL, mode text DEFAULT 'vector')
RETURNS TABLE (document_id text, chunk_id bigint, chunk_index integer, content text,
               metadata jsonb, score double precision, model_key text)
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
from pyembed import indb
return indb.call(plpy, indb.search_text, GD, corpus, query, k, filter, mode)
$$;

-- Store a document: chunked here, embedded later by `pyembed worker` (the chunks are queued).
CREATE OR REPLACE FUNCTION pyembed.add_document(corpus text, document_id text, content text,
                                                metadata jsonb DEFAULT '{}')
RETURNS integer
LANGUAGE plpython3u VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
from pyembed import indb
return indb.call(plpy, indb.add_document, GD, corpus, document_id, content, metadata)
$$;

-- API keys for the functions above; only the owner can set or read them.
CREATE OR REPLACE FUNCTION pyembed.set_secret(name text, value text) RETURNS void
LANGUAGE sql VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
  INSERT INTO pyembed.secrets (name, value) VALUES (name, value)
  ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, updated_at = now()
$$;
