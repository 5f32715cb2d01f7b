-- Tenancy: which tenant a session acts for, which corpora it sees, and the one lookup of a corpus
-- by name that every function and every Python path uses (PE002 for a name the caller's tenant
-- does not have, another tenant's included).

-- Whether the session's login role (session_user, not the owner a SECURITY DEFINER function runs
-- as) may act for the tenant its pyembed.act_as_tenant names: a superuser, or a login in
-- pyembed_operator (revision 0037: the operator's worker and exporter) that is no tenant's member
-- (a tenant's login keeps acting for its tenant whatever roles it is granted: membership is
-- checked here, where a grant made after `tenant add-member` cannot slip past it). A function of
-- its own, which pyembed._session_tenant calls only when pyembed.act_as_tenant is set: as a
-- subquery there, pg_roles' shared catalogs were planned into, locked for and set up in every
-- statement that reads the session's tenant (every search), in the shared lock table (a shared
-- catalog's lock never takes the fast path).
CREATE OR REPLACE FUNCTION pyembed._session_acts_for_tenants() RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT r.rolsuper
         OR (pg_catalog.pg_has_role(r.oid, 'pyembed_operator', 'MEMBER')
             AND NOT EXISTS (SELECT FROM pyembed.tenant_members m
                              WHERE m.role_oid = r.oid AND m.role_name = r.rolname))
    FROM pg_catalog.pg_roles r WHERE r.rolname = session_user
$$;

-- The tenant the pyembed.act_as_tenant of a superuser or an operator's login names (NULL: the setting is empty or unset),
-- or PE005 when it names none: a mistyped name acted for no tenant, so that a DBA's `migrate
-- start docs` moved the corpus docs of no tenant instead of refusing. A function of its own,
-- for the same reason: as a subquery in pyembed._session_tenant, pyembed.tenants was locked for
-- and set up in every statement that reads the session's tenant (every search), though nearly no
-- session reads it.
CREATE OR REPLACE FUNCTION pyembed._acting_tenant() RETURNS integer
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  found_id integer;
  named text := current_setting('pyembed.act_as_tenant', true);
BEGIN
  IF coalesce(named, '') = '' THEN
    RETURN NULL;
  END IF;
  SELECT t.tenant_id INTO found_id FROM pyembed.tenants t WHERE t.name = named;
  IF found_id IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('pyembed.act_as_tenant names no tenant: %s', pyembed._quoted(named)),
      HINT = '`pyembed tenant list` lists them; set it empty to act for none';
  END IF;
  RETURN found_id;
END
$$;

-- The tenant this session acts for (NULL: none): the pyembed.act_as_tenant (by name) of a
-- superuser or an operator's login (pyembed._session_acts_for_tenants),
-- else the tenant its login role is a member of: the role itself, by name and OID (the OID from
-- the backend's cache of roles, no catalog in the statement), so that a member role dropped and
-- a role created again under its name is no member: -1, a tenant of nothing, which
-- pyembed.current_tenant refuses (the login is the tenant's by name, and must not see the corpora
-- of no tenant, as a restore into another cluster, whose roles have new OIDs, made every member
-- do). A SQL function the planner inlines into the
-- statements that read it (no function call: pyembed.lookup_corpus's is part of every search's
-- cost), so without a pinned search_path (090-search-path.sql) and executable by no other role.
-- CASE evaluates its branches only when reached: nearly every session reads tenant_members.
CREATE OR REPLACE FUNCTION pyembed._session_tenant() RETURNS TABLE (tenant_id integer)
LANGUAGE sql STABLE
AS $$
  SELECT CASE WHEN coalesce(current_setting('pyembed.act_as_tenant', true), '') <> ''
               AND pyembed._session_acts_for_tenants()
              THEN pyembed._acting_tenant()
              ELSE (SELECT CASE WHEN m.role_oid
                                     = pg_catalog.to_regrole(pg_catalog.quote_ident(session_user))
                                THEN m.tenant_id ELSE -1 END
                      FROM pyembed.tenant_members m WHERE m.role_name = session_user)
          END
$$;

-- The same for callers outside pyembed's own statements (row-level security policies, the
-- application). PL/pgSQL, not SQL: it keeps its plan for the session, where a SECURITY DEFINER
-- SQL function is planned again at every call.
CREATE OR REPLACE FUNCTION pyembed.current_tenant() RETURNS integer
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  t integer := (SELECT s.tenant_id FROM pyembed._session_tenant() s);
BEGIN
  IF t = -1 THEN
    PERFORM pyembed._stale_member();
  END IF;
  RETURN t;
END
$$;

-- PE014 for a login whose name is a tenant's member but which is another role than the one
-- added (pyembed._session_tenant's -1): from every statement that reads the session's tenant.
-- Nothing for any other session.
CREATE OR REPLACE FUNCTION pyembed._stale_member() RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  tenant text;
BEGIN
  SELECT t.name INTO tenant FROM pyembed.tenant_members m JOIN pyembed.tenants t USING (tenant_id)
   WHERE m.role_name = session_user
     AND m.role_oid IS DISTINCT FROM pg_catalog.to_regrole(pg_catalog.quote_ident(session_user));
  IF FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'PE014',
      MESSAGE = format('login %s is not the role added to tenant %s: a role made again under its '
                       'name, or restored into another cluster (where roles get new OIDs), is '
                       'refused until it is added again', pyembed._quoted(session_user),
                       pyembed._quoted(tenant)),
      HINT = format('as the owner: pyembed tenant add-member %s %s', tenant, session_user);
  END IF;
END
$$;

-- The tenants this session may act for, each with the name a report labels it by: for a
-- superuser or an operator's login (pyembed._session_acts_for_tenants) every tenant, by the name
-- its pyembed.act_as_tenant takes, and '' (none) first, labelled '-' (one that names a tenant in
-- its own setting: that tenant alone, PE005 for a name no tenant has); for any other login one
-- row, its own tenant (tenant NULL: its setting would change nothing), so that a tenant's worker
-- or exporter asking is told of its own tenant only. The one list the worker, `pyembed metrics
-- serve` and `pyembed status` go through, each acting for a tenant at a time.
CREATE OR REPLACE FUNCTION pyembed.acting_tenants()
RETURNS TABLE (tenant text, label text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF coalesce(pyembed._session_acts_for_tenants(), false)
     AND coalesce(current_setting('pyembed.act_as_tenant', true), '') <> '' THEN
    RETURN QUERY SELECT t.name, t.name FROM pyembed.tenants t
                  WHERE t.tenant_id = pyembed._acting_tenant();
  ELSIF coalesce(pyembed._session_acts_for_tenants(), false) THEN
    RETURN QUERY SELECT ''::text, '-'::text
                 UNION ALL
                 SELECT * FROM (SELECT t.name, t.name FROM pyembed.tenants t
                                 ORDER BY t.tenant_id) o;
  ELSE
    RETURN QUERY SELECT NULL::text,
                        coalesce((SELECT t.name FROM pyembed.tenants t
                                   WHERE t.tenant_id = pyembed.current_tenant()), '-');
  END IF;
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

-- The caller's tenant's corpus of this name, if there is one. `coalesce(tenant_id, 0) = ...`
-- reads the unique index corpora_tenant_name and finds the tenant once. A SQL function the
-- planner inlines into the statement that reads it (pyembed.search's, which then makes no call
-- for its corpus), so without a pinned search_path (090-search-path.sql).
CREATE OR REPLACE FUNCTION pyembed._corpus_named(corpus text) RETURNS SETOF pyembed.corpora
LANGUAGE sql STABLE
AS $$
  SELECT co.* FROM pyembed.corpora co
   WHERE co.name = corpus
     AND coalesce(co.tenant_id, 0) = coalesce((SELECT s.tenant_id
                                                 FROM pyembed._session_tenant() s), 0)
$$;

-- The caller's tenant's corpus of this name (pyembed._corpus_named), or PE002.
CREATE OR REPLACE FUNCTION pyembed.lookup_corpus(corpus text) RETURNS pyembed.corpora
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  c pyembed.corpora;
  stack text;
BEGIN
  SELECT * INTO c FROM pyembed._corpus_named(corpus);
  IF NOT FOUND THEN
    PERFORM pyembed.current_tenant();  -- (a stale member's PE014, not "unknown corpus")
    IF corpus IS NULL THEN
      -- PE005 naming the function the caller called (the outermost of pyembed's in the call
      -- stack), as every NULL argument is; looked up only here, off the path of a found corpus.
      GET DIAGNOSTICS stack = PG_CONTEXT;
      PERFORM pyembed._needs(true, 'corpus', coalesce(
        (regexp_match(stack, E'^.*PL/pgSQL function pyembed\\.(\\w+)\\('))[1], 'lookup_corpus'));
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'PE002',
      MESSAGE = format('unknown corpus %s', pyembed._quoted(corpus)),
      HINT = '`pyembed corpus list` shows the corpora';
  END IF;
  RETURN c;
END
$$;

-- PE005 naming an argument given NULL (`missing`: `arg IS NULL`) that the function `fn` needs a
-- value for (the message the PL/Python functions give, pyembed.indb.check_nulls).
-- Callers on a search's path call it only once num_nulls() of their arguments is above 0: a
-- PERFORM is a statement of its own, and one per argument on every call cost each search more
-- than one test of them all.
-- A caller's value as an error message quotes it (NULL: NULL): its first 80 characters in single
-- quotes (one inside doubled), their control and format characters written \uXXXX (a terminal's
-- escape sequence, a right-to-left override reordering the message as shown, a line break
-- starting a fake log line) and a backslash doubled, with how long it was when longer (a 1 MB
-- value is not read back in every error and log line), as pyembed.errors.shown quotes one in
-- Python.
CREATE OR REPLACE FUNCTION pyembed._quoted(value text) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT CASE WHEN value IS NULL THEN 'NULL'
    ELSE '''' || (SELECT string_agg(
                   CASE WHEN t.ch ~ (E'[\\x01-\\x1f\\x7f-\\x9f\\u00ad\\u061c\\u180e\\u200b-\\u200f'
                                     '\\u2028-\\u202e\\u2060-\\u206f\\ufeff\\ufff9-\\ufffb]')
                        THEN E'\\u' || lpad(to_hex(ascii(t.ch)), 4, '0')
                        WHEN t.ch = E'\\' THEN E'\\\\' WHEN t.ch = '''' THEN ''''''
                        ELSE t.ch END, '' ORDER BY t.n)
                   FROM regexp_split_to_table(left(value, 80), '') WITH ORDINALITY t(ch, n))
         || '''' || CASE WHEN length(value) > 80 THEN format('... (%s characters)', length(value))
                         ELSE '' END
  END
$$;

-- A count a SQL client gives a function (k, candidates, queries): the function takes it as
-- numeric, so that any number a client sends (a bigint or numeric past integer, as psql types
-- 3000000000 and drivers send a large int) reaches its range check instead of failing as
-- "function ... does not exist"; returned as integer for the functions it is passed on to, or
-- PE005 in the words of Python's and the CLI's check (`k must be 1..1000, got 3000000000`). NULL
-- is passed on: the caller's own check names it.
CREATE OR REPLACE FUNCTION pyembed._count_arg(value numeric, what text, low integer,
                                              high integer) RETURNS integer
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF value < low OR value > high OR value <> trunc(value) THEN  -- NaN is above every number
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('%s must be %s..%s, got %s', what, low, high, value);
  END IF;
  RETURN value::integer;
END
$$;

-- PE005 for arrays a function takes together, one element each (`names`), whose `lengths`
-- differ: unnest padded the shorter with NULLs, which skipped an element's row or failed on a
-- NOT NULL naming a column. Called once the caller has seen them differ.
CREATE OR REPLACE FUNCTION pyembed._one_each(fn text, names text, lengths integer[])
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  RAISE EXCEPTION USING ERRCODE = 'PE005',
    MESSAGE = format('%s must have one element each: pyembed.%s() got %s elements', names, fn,
                     array_to_string(lengths, ', ', '0'));
END
$$;

CREATE OR REPLACE FUNCTION pyembed._needs(missing boolean, what text, fn text) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF missing THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('%s is NULL: pyembed.%s() needs a value for it', what, fn);
  END IF;
END
$$;
