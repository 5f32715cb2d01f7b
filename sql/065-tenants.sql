-- Tenant accounting and rate limits. Every provider call is reserved here first, in the
-- caller's tenant: requests, tokens and estimated cost per tenant, corpus, model key and minute;
-- a tenant over its requests or tokens per minute is refused (PE010) before the call. Each
-- reservation is a row of its own and no row is locked: a call that waits on its provider
-- holds nothing another call needs (the limit counts committed calls, so calls in flight at the
-- same moment may each pass it once).
CREATE OR REPLACE FUNCTION pyembed.reserve_usage(p_model_key text, p_corpus_id integer,
                                                 p_requests integer, p_tokens bigint)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  t pyembed.tenants;
  tid integer := coalesce(pyembed.current_tenant(), 0);
  bucket timestamptz := date_trunc('minute', now());
  used record;
  price numeric;
BEGIN
  -- (p_corpus_id NULL: a call accounted to no corpus, pyembed.embed's)
  IF num_nulls(p_model_key, p_requests, p_tokens) > 0 THEN
    PERFORM pyembed._needs(p_model_key IS NULL, 'p_model_key', 'reserve_usage');
    PERFORM pyembed._needs(p_requests IS NULL, 'p_requests', 'reserve_usage');
    PERFORM pyembed._needs(p_tokens IS NULL, 'p_tokens', 'reserve_usage');
  END IF;
  IF current_setting('transaction_read_only') = 'on' THEN
    RAISE EXCEPTION USING ERRCODE = 'PE011',
      MESSAGE = 'a provider call cannot be accounted in a read-only transaction (a replica)',
      HINT = 'for a query, embed on the primary (SELECT pyembed.embed(query, model_key, ''query'')) '
             'and search here with pyembed.search(corpus, vector, model_key, k); cached queries '
             'need no call; documents are added on the primary';
  END IF;
  -- What one call may count is the table's rule (usage_counts_not_negative, usage_tokens_in_range:
  -- the reports add the rows up; NOT NULL), checked by its insert below.
  price := (SELECT m.price_per_mtok FROM pyembed.models m WHERE m.model_key = p_model_key);
  IF p_corpus_id IS NOT NULL AND NOT (p_corpus_id = ANY (pyembed.visible_corpora())) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE002', MESSAGE = format('unknown corpus id %s', p_corpus_id),
      HINT = 'the corpus was dropped meanwhile, or is not one of your tenant''s: `pyembed corpus '
             'list` shows yours';
  END IF;
  IF tid <> 0 THEN
    SELECT * INTO t FROM pyembed.tenants WHERE tenant_id = tid;
    IF t.requests_per_minute IS NOT NULL OR t.tokens_per_minute IS NOT NULL THEN
      SELECT coalesce(sum(u.requests), 0) AS requests, coalesce(sum(u.tokens), 0) AS tokens
        INTO used FROM pyembed.usage u WHERE u.tenant_id = tid AND u.minute = bucket;
      IF used.requests + p_requests > t.requests_per_minute
         OR used.tokens + p_tokens > t.tokens_per_minute THEN
        RAISE EXCEPTION USING ERRCODE = 'PE010',
          MESSAGE = format('tenant %s is over its rate limit (%s requests and %s tokens per '
                           'minute; used %s and %s this minute, asked for %s and %s); retry in '
                           '%s s', t.name, coalesce(t.requests_per_minute::text, 'unlimited'),
                           coalesce(t.tokens_per_minute::text, 'unlimited'), used.requests,
                           used.tokens, p_requests, p_tokens,
                           ceil(extract(epoch FROM bucket + interval '1 minute' - now()))),
          HINT = 'retry then; or, as the owner, raise the tenant''s requests_per_minute or '
                 'tokens_per_minute (`pyembed tenant --help`)';
      END IF;
    END IF;
  END IF;
  INSERT INTO pyembed.usage (tenant_id, corpus_id, model_key, minute, requests, tokens, cost_usd)
  VALUES (tid, coalesce(p_corpus_id, 0), p_model_key, bucket, p_requests, p_tokens,
          coalesce(price, 0) * p_tokens / 1e6);
END
$$;

-- A ledger's row (usage, cache counts and entries, the query log) is for a model the registry
-- has or a reranker pyembed knows (PE006), whichever function wrote it: a key nobody registered
-- was a row for nothing in the tenant's reports and the metrics. The query log's '-' is a
-- search that embedded nothing (keyword); usage's 'anthropic/<model>' an answer's Claude call.
CREATE OR REPLACE FUNCTION pyembed._ledger_key_known() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF EXISTS (SELECT FROM pyembed.models m WHERE m.model_key = NEW.model_key)
     OR NEW.model_key = ANY (pyembed.rerankers())
     OR (TG_TABLE_NAME = 'query_log' AND NEW.model_key = '-')
     -- a call of an answer service (pyembed.rag's Claude model: its ids are the service's)
     OR (TG_TABLE_NAME = 'usage' AND NEW.model_key LIKE 'anthropic/_%') THEN
    RETURN NEW;
  END IF;
  RAISE EXCEPTION USING ERRCODE = 'PE006',
    MESSAGE = format('unknown model key %s: not in the registry nor a reranker',
                     pyembed._quoted(NEW.model_key)),
    HINT = '`pyembed models` lists the registered keys, pyembed.rerankers() the rerankers';
END
$$;

CREATE OR REPLACE TRIGGER usage_key_known
  BEFORE INSERT OR UPDATE OF model_key ON pyembed.usage
  FOR EACH ROW EXECUTE FUNCTION pyembed._ledger_key_known();
CREATE OR REPLACE TRIGGER cache_stats_key_known
  BEFORE INSERT OR UPDATE OF model_key ON pyembed.cache_stats
  FOR EACH ROW EXECUTE FUNCTION pyembed._ledger_key_known();
CREATE OR REPLACE TRIGGER embedding_cache_key_known
  BEFORE INSERT OR UPDATE OF model_key ON pyembed.embedding_cache
  FOR EACH ROW EXECUTE FUNCTION pyembed._ledger_key_known();
CREATE OR REPLACE TRIGGER query_log_key_known
  BEFORE INSERT OR UPDATE OF model_key ON pyembed.query_log
  FOR EACH ROW EXECUTE FUNCTION pyembed._ledger_key_known();

-- A report's window, `amount` days or hours back from now: 1 to a hundred years, or PE005 (a
-- window past that is out of the timestamps' range, and one below 1 would report nothing).
-- `amount` numeric: the reports take any number a client sends (pyembed._count_arg says why).
CREATE OR REPLACE FUNCTION pyembed._report_window(amount numeric, unit text) RETURNS interval
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
  most integer := CASE unit WHEN 'days' THEN 36500 ELSE 876000 END;
BEGIN
  IF amount IS NULL OR amount < 1 OR amount > most OR amount <> trunc(amount) THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('a report covers 1..%s %s, not %s', most, unit,
                       coalesce(amount::text, 'NULL'));
  END IF;
  RETURN CASE unit WHEN 'days' THEN make_interval(days => amount::integer)
                   ELSE make_interval(hours => amount::integer) END;
END
$$;

-- Usage per tenant, corpus and model key: the caller's tenant's, or every tenant's for a
-- superuser (who is not acting for one).
CREATE OR REPLACE FUNCTION pyembed.usage_report(days numeric DEFAULT 30)
RETURNS TABLE (tenant text, corpus text, model_key text, requests bigint, tokens bigint,
               cost_usd double precision)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT coalesce(t.name, '-'), coalesce(c.name, '-'), u.model_key, sum(u.requests)::bigint,
         sum(u.tokens)::bigint, sum(u.cost_usd)::float8
    FROM pyembed.usage u
    LEFT JOIN pyembed.tenants t ON t.tenant_id = u.tenant_id
    LEFT JOIN pyembed.corpora c ON c.corpus_id = u.corpus_id
   WHERE u.minute > now() - (SELECT pyembed._report_window(days, 'days'))
     AND (u.tenant_id = coalesce(pyembed.current_tenant(), 0)
          OR (pyembed.current_tenant() IS NULL
              AND (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = session_user)))
   GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
$$;

-- Failed provider calls, counted per provider and kind of failure (pyembed.errors.ERROR_KINDS)
-- in sequences: a call that fails inside the database aborts its transaction, and nextval is
-- the one write a rollback keeps. Not per tenant: the figure is the operator's (429 storms,
-- outages), and a counter per tenant and model would be a sequence each.
CREATE OR REPLACE FUNCTION pyembed._ensure_error_counters(p_provider text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  k text;
  seq text;
BEGIN
  FOREACH k IN ARRAY ARRAY['rate_limited', 'server_error', 'no_response', 'rejected',
                              'bad_answer'] LOOP
    CONTINUE WHEN EXISTS (SELECT FROM pyembed.provider_error_counters c
                           WHERE c.provider = p_provider AND c.kind = k);
    -- A name from a digest when the provider's name is not a plain word (it may be any text).
    seq := 'provider_errors_' || CASE WHEN p_provider ~ '^[a-z][a-z0-9_]{0,20}$'
                                      THEN p_provider || '_' || k
                                      ELSE left(md5(p_provider || '/' || k), 16) END;
    EXECUTE format('CREATE SEQUENCE IF NOT EXISTS pyembed.%I', seq);
    INSERT INTO pyembed.provider_error_counters (provider, kind, counter)
    VALUES (p_provider, k, format('pyembed.%I', seq)::regclass);
  END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION pyembed._models_error_counters() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  PERFORM pyembed._ensure_error_counters(NEW.provider);
  RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER models_error_counters AFTER INSERT ON pyembed.models
  FOR EACH ROW EXECUTE FUNCTION pyembed._models_error_counters();

SELECT pyembed._ensure_error_counters(p.provider)
  FROM (SELECT DISTINCT provider FROM pyembed.models) p;

-- One failed call. A kind or provider it has no counter for is ignored rather than raised:
-- the caller is about to raise the provider's own error, which must not be hidden.
CREATE OR REPLACE FUNCTION pyembed.count_provider_error(p_provider text, p_kind text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  seq regclass;
BEGIN
  SELECT c.counter INTO seq FROM pyembed.provider_error_counters c
   WHERE c.provider = p_provider AND c.kind = p_kind;
  IF seq IS NOT NULL THEN
    PERFORM nextval(seq);
  END IF;
END
$$;

-- Failed calls per provider and kind since the counters were made (a Prometheus counter).
CREATE OR REPLACE FUNCTION pyembed.provider_errors()
RETURNS TABLE (provider text, kind text, errors bigint)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT c.provider, c.kind, coalesce(pg_sequence_last_value(c.counter), 0)
    FROM pyembed.provider_error_counters c ORDER BY 1, 2
$$;

-- A tenant's member is a role that exists (PE005): a name that is none (a typo) left the real
-- login acting for no tenant, and a role made later under that name joined the tenant unseen.
-- Membership is the role's own: its OID is stored beside its name (whatever the writer gave),
-- and a session matches on both. A member role that is dropped leaves its tenant with it (its
-- row matches no session; a role created again under the name is added again, on purpose,
-- which replaces the row).
-- It is a login role, not in pyembed_operator (whose logins act for any tenant they name), and
-- not the schema's owner: a session acts for its login's tenant, so a
-- group (pyembed_app, a NOLOGIN role of the tenant's logins) was stored as a member that no
-- session matches, and its logins went on acting for no tenant, in the untenanted corpora; the
-- owner made a member would see one tenant's corpora only, in every migration and install.
CREATE OR REPLACE FUNCTION pyembed._member_is_a_role() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  can_login boolean;
  superuser boolean;
BEGIN
  SELECT r.oid, r.rolcanlogin, r.rolsuper INTO NEW.role_oid, can_login, superuser
    FROM pg_catalog.pg_roles r WHERE r.rolname = NEW.role_name;
  IF NEW.role_oid IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('no role %s', pyembed._quoted(NEW.role_name)),
      HINT = 'create the login first (pyembed tenant add-member TENANT ROLE --login)';
  END IF;
  IF NOT can_login THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('role %s cannot log in: a session acts for the tenant of its login role, '
                       'not of a group it is in', pyembed._quoted(NEW.role_name)),
      HINT = 'add each login that acts for the tenant';
  END IF;
  IF NEW.role_oid = (SELECT n.nspowner FROM pg_catalog.pg_namespace n
                      WHERE n.nspname = 'pyembed') THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('role %s owns the pyembed schema: it manages every tenant and acts for '
                       'none', pyembed._quoted(NEW.role_name)),
      HINT = 'add a login of its own for the tenant (pyembed tenant add-member TENANT ROLE '
             '--login)';
  END IF;
  -- (A login granted pyembed_operator after joining acts for its tenant all the same:
  -- pyembed._session_acts_for_tenants.)
  IF NOT superuser AND pg_catalog.pg_has_role(NEW.role_oid, 'pyembed_operator', 'MEMBER') THEN
    RAISE EXCEPTION USING ERRCODE = 'PE005',
      MESSAGE = format('role %s is in pyembed_operator, which acts for every tenant: a tenant''s '
                       'login must not be (revoke pyembed_operator from it, or add another login)',
                       pyembed._quoted(NEW.role_name));
  END IF;
  RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER tenant_members_role
  BEFORE INSERT OR UPDATE ON pyembed.tenant_members
  FOR EACH ROW EXECUTE FUNCTION pyembed._member_is_a_role();
