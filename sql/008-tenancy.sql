-- Tenancy: which tenant a session acts for, which corpora it sees, and the one lookup of a corpus
-- by name that every function and every Python path uses (PE002 for a name the caller's tenant
-- does not have, another tenant's included).

-- The tenant this session acts for (NULL: none). PL/pgSQL, not SQL: it keeps its plans for the
-- session, where a SECURITY DEFINER SQL function is planned again at every call.
CREATE OR REPLACE FUNCTION pyembed.current_tenant() RETURNS integer
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  -- Two IFs: the first, which decides nearly every call, is an expression without a query.
  IF coalesce(current_setting('pyembed.act_as_tenant', true), '') <> '' THEN
    IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = session_user) THEN
      RETURN (SELECT t.tenant_id FROM pyembed.tenants t
               WHERE t.name = current_setting('pyembed.act_as_tenant', true));
    END IF;
  END IF;
  RETURN (SELECT m.tenant_id FROM pyembed.tenant_members m WHERE m.role_name = session_user);
END
$$;

-- The corpora this session may see, evaluated once per query by the row-level security policies.
CREATE OR REPLACE FUNCTION pyembed.visible_corpora() RETURNS integer[]
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  RETURN (SELECT coalesce(array_agg(corpus_id), '{}') FROM pyembed.corpora
           WHERE coalesce(tenant_id, 0) = coalesce(pyembed.current_tenant(), 0));
END
$$;

-- The caller's tenant's corpus of this name, or PE002. `coalesce(tenant_id, 0) = ...` reads the
-- unique index corpora_tenant_name and calls current_tenant() once.
CREATE OR REPLACE FUNCTION pyembed.lookup_corpus(corpus text) RETURNS pyembed.corpora
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora;
BEGIN
  SELECT * INTO c FROM pyembed.corpora co
   WHERE co.name = corpus
     AND coalesce(co.tenant_id, 0) = coalesce((SELECT pyembed.current_tenant()), 0);
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'PE002',
      MESSAGE = format('unknown corpus %s', coalesce(quote_literal(left(corpus, 80)), 'NULL')),
      HINT = '`pyembed corpus list` shows the corpora';
  END IF;
  RETURN c;
END
$$;
