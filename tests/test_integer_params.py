"""A number past PostgreSQL's integer, given where pyembed's SQL takes an `integer`, is refused
as invalid input naming the parameter, from Python and from the command line: before, the
driver sent it as a bigint, which failed as "integer out of range" or as "function
pyembed.create_corpus(..., bigint, ...) does not exist" instead of reaching the parameter's
check. A tenant's limit below 1 is named too (it was reported as an invalid tenant name).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

import pyembed
from pyembed import cache, ingest, migration, models, orm, rag, recall, tenants
from pyembed.errors import InvalidInput
from pyembed.models import ModelSpec
from pyembed.worker import Worker
from tests.conftest import Database
from tests.helpers import run_cli as cli
from tests.test_cli import db_env

FAKE = "fake/fake-hash@1:384"
SETTINGS = {"chunk_tokens": "1..100000", "chunk_overlap": "0..99999", "max_batch": "1..100000",
            "max_tokens": "1..10000000", "request_dimensions": "1..16000",
            "requests_per_minute": "1..100000000", "tokens_per_minute": "1..2000000000",
            "max_document_chunks": "1..10000000"}
"""Every integer setting stored in a row, with its range (revision 0028's CHECKs)."""
OWN_RANGE = SETTINGS | {"k": "1..1000"}
"""Parameters named with their own range however far past it a number is (k: pyembed.search's)."""
COUNT_WORDS = {"share": r"share must be 1\.\.100, got ", "days": r"a report covers 1\.\.36500 days, not ",
               "queries": r"queries must be 1\.\.1000, got ",
               "max_samples": r"max_samples must be 0\.\.2147483647, got ",
               "hours": r"a report covers 1\.\.876000 hours, not "}
"""The counts SQL's functions check, in their words."""
HUGE = 2**31  # one past PostgreSQL's integer
EDGES = [HUGE, -HUGE - 1, 10**20]


def entry_points(app: pyembed.Client, owner: pyembed.Client
                 ) -> dict[str, Callable[[int], Any]]:
    """Each entry point that hands an integer to pyembed's SQL, by the parameter's name."""
    docs = app.corpus("docs")
    return {
        "chunk_tokens": lambda n: app.create_corpus("other", FAKE, chunk_tokens=n),
        "chunk_overlap": lambda n: app.create_corpus("other", FAKE, chunk_overlap=n),
        "k": lambda n: docs.search("alpha", k=n, mode="keyword"),
        "share": lambda n: migration.shift(owner, "docs", n),
        "requests_per_minute": lambda n: tenants.create_tenant(owner.conn, "t",
                                                               requests_per_minute=n),
        "tokens_per_minute": lambda n: tenants.create_tenant(owner.conn, "t",
                                                             tokens_per_minute=n),
        "days": lambda n: tenants.usage(app.conn, n),
        "queries": lambda n: recall.measure(app.conn, "docs", n),
        "max_samples": lambda n: recall.measure_sampled(app.conn, n),
        "hours": lambda n: recall.report(app.conn, n),
        "max_batch": lambda n: owner.register_model(ModelSpec("fake", "m", "1", 4, max_batch=n)),
        "max_tokens": lambda n: owner.register_model(ModelSpec("fake", "m", "1", 4, max_tokens=n)),
    }


def test_a_number_past_postgres_integer_is_invalid_input_naming_its_parameter(
        db: Database) -> None:
    with pyembed.connect(db.app_dsn) as app, pyembed.connect(db.owner_dsn) as owner:
        app.create_corpus("docs", FAKE).add([("a", "alpha text")])
        migration.start(owner, "docs", "fake/fake-hash@2:1024")
        for name, call in entry_points(app, owner).items():
            for n in EDGES:
                # its own bounds, a setting stored in a row's (test_setting_ranges below) or a
                # count's (test_every_count_reads_the_same_from_sql_and_python)
                rule = (f"^{name} must be {re.escape(OWN_RANGE[name])}, got {n}$"
                        if name in OWN_RANGE else f"^{COUNT_WORDS[name]}{n}$")
                with pytest.raises(InvalidInput, match=rule):
                    call(n)
        with pytest.raises(InvalidInput, match=f"^{COUNT_WORDS['days']}{HUGE}$"):
            cache.stats(app.conn, HUGE)
        # In range, each still reaches the database's own check (or works).
        with pytest.raises(InvalidInput, match=r"k must be 1\.\.1000"):
            app.corpus("docs").search("alpha", k=2**31 - 1, mode="keyword")
        with pytest.raises(InvalidInput, match="a report covers"):
            tenants.usage(app.conn, 0)
        assert app.corpus("docs").search("alpha", k=1, mode="keyword")[0].document_id == "a"


def test_a_number_past_pythons_digit_limit_is_invalid_input_naming_its_parameter(
        db: Database) -> None:
    """Python makes no text of an int past sys.get_int_max_str_digits() digits: the driver
    (and a message quoting the number) raised a raw ValueError for k=10**5000."""
    with pyembed.connect(db.app_dsn) as app, pyembed.connect(db.owner_dsn) as owner:
        app.create_corpus("docs", FAKE).add([("a", "alpha text")])
        migration.start(owner, "docs", "fake/fake-hash@2:1024")
        for name, call in entry_points(app, owner).items():
            with pytest.raises(InvalidInput, match=f"^{name} is a whole number of about 5001 "):
                call(10**5000)


@pytest.mark.parametrize("args", [
    ("search", "docs", "alpha", "-k", str(HUGE)),
    ("ask", "docs", "alpha", "-k", str(HUGE)),
    ("corpus", "create", "other", "--chunk-tokens", str(HUGE)),
    ("migrate", "shift", "docs", str(HUGE)),
    ("tenant", "create", "t", "--rpm", str(HUGE)),
])
def test_the_command_line_says_which_number_is_too_large(db: Database,
                                                         args: tuple[str, ...]) -> None:
    with pyembed.connect(db.app_dsn) as app:
        app.create_corpus("docs", FAKE).add([("a", "alpha text")])
    out = cli(*args, env=db_env(db))
    assert out.returncode == 1, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    setting = {"--chunk-tokens": "chunk_tokens", "--rpm": "requests_per_minute",
               "-k": "k"}.get(args[-2])
    if setting:  # the parameter's own range, as SQL and Python say it
        assert lines[0] == f"error: {setting} must be {OWN_RANGE[setting]}, got {HUGE}", lines[0]
    else:  # a count's: migrate shift's share (before: the integer's range)
        assert lines[0] == f"error: share must be 1..100, got {HUGE}", lines[0]


K_OUTSIDE = [0, -1, 1001, 2**31 - 1, 2**31, 10**12, -(10**12)]


def test_k_outside_its_range_is_named_with_its_range_at_every_entry_point(
        db: Database, app: psycopg.Connection[Any]) -> None:
    """k is 1..1000 wherever it is given: SQL's search functions, Corpus.search and retrieve
    (reranked too), orm.search, rag.answer, and the command line's search and ask say
    `k must be 1..1000, got N` for every N outside. Before, a k past PostgreSQL's integer
    (orm.search(k=10**12)) was named with the integer's range, not k's."""
    with pyembed.connect(db.app_dsn) as client:
        docs = client.create_corpus("docs", FAKE)
        docs.add([("a", "alpha text")])
        vector = client.embedder(FAKE).embed_query("alpha")
        calls: dict[str, Callable[[int], Any]] = {
            "Corpus.search": lambda n: docs.search("alpha", k=n),
            "Corpus.search (keyword)": lambda n: docs.search("alpha", k=n, mode="keyword"),
            "Corpus.search (vector)": lambda n: docs.search(vector, k=n, model_key=FAKE),
            "Corpus.search (reranked)": lambda n: docs.search("alpha", k=n,
                                                              rerank="fake/overlap"),
            "Corpus.retrieve": lambda n: docs.retrieve("alpha", k=n, mode="hybrid"),
            "orm.search": lambda n: orm.search("docs", vector, FAKE, k=n),
            "rag.answer": lambda n: rag.answer(docs, "alpha?", k=n),
        }
        for where, call in calls.items():
            for n in K_OUTSIDE:
                with pytest.raises(InvalidInput) as err:
                    call(n)
                assert str(err.value) == f"k must be 1..1000, got {n}", where
    sql = {"search": "SELECT * FROM pyembed.search('docs', %(v)s::vector, %(key)s, %(k)s)",
           "search_text": "SELECT * FROM pyembed.search_text('docs', 'alpha', %(k)s)",
           "search_keyword": "SELECT * FROM pyembed.search_keyword('docs', 'alpha', %(k)s)",
           "search_reranked": "SELECT * FROM pyembed.search_reranked('docs', 'alpha', "
                              "'fake/overlap', %(k)s)"}
    for where, statement in sql.items():
        # (a number past integer is no such function's argument in SQL; NULL is named as a
        # missing value, as every parameter's)
        for n in (n for n in K_OUTSIDE if -(2**31) <= n < 2**31):
            with pytest.raises(psycopg.Error) as sql_err:
                app.execute(statement, {"v": str(vector.tolist()), "key": FAKE, "k": n})
            assert (sql_err.value.sqlstate, sql_err.value.diag.message_primary) == (
                "PE005", f"k must be 1..1000, got {n}"), where
    for n in (0, 1001, 10**12):
        for command in (("search", "docs", "alpha", "-k", str(n)),
                        ("ask", "docs", "alpha?", "-k", str(n))):
            out = cli(*command, env=db_env(db))
            assert (out.returncode, out.stderr.strip()) == (
                1, f"error: k must be 1..1000, got {n}"), command


def test_a_tenant_limit_below_1_is_named_not_blamed_on_the_name(
        owner: psycopg.Connection[Any]) -> None:
    for kwargs, message in [({"requests_per_minute": 0},
                             r"requests_per_minute must be 1\.\.100000000, got 0"),
                            ({"tokens_per_minute": -5},
                             r"tokens_per_minute must be 1\.\.2000000000, got -5")]:
        with pytest.raises(InvalidInput, match=f"^{message}$"):
            tenants.create_tenant(owner, "acme", **kwargs)
    with pytest.raises(InvalidInput, match=r"^invalid tenant name 'Acme!': use 1-63"):
        tenants.create_tenant(owner, "Acme!", requests_per_minute=10)
    assert tenants.create_tenant(owner, "acme", requests_per_minute=10) > 0


def test_setting_ranges(db: Database, owner: psycopg.Connection[Any]) -> None:
    """Walks every integer column of the rows that hold settings (corpora, models, tenants; a new
    one included): each but their numbers has a range CHECK (<table>_<column>_in_range, revision
    0028) that pyembed._setting_range reads, listed in SETTINGS. One past its top is the same
    error from SQL and Python. Before, chunk_tokens had no upper bound (a corpus of chunks of
    3000000000 tokens), nor had a model's batch and token bounds or a tenant's limits."""
    columns = owner.execute(
        "SELECT a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
        "WHERE c.relnamespace = 'pyembed'::regnamespace "
        "AND c.relname IN ('corpora', 'models', 'tenants') AND a.attnum > 0 "
        "AND NOT a.attisdropped AND a.atttypid IN ('int2'::regtype, 'int4'::regtype, "
        "'int8'::regtype) AND a.attidentity = '' AND a.attname NOT IN "
        "('corpus_id', 'tenant_id', 'dimensions', 'traffic_share')").fetchall()
    assert {c for (c,) in columns} == set(SETTINGS)
    for setting, rule in SETTINGS.items():
        assert owner.execute("SELECT pyembed._setting_range(%s)", (setting,)).fetchone() \
            == (rule,), setting
    too_many = int(SETTINGS["chunk_tokens"].split("..")[1]) + 1
    message = f"chunk_tokens must be 1..100000, got {too_many}"
    with psycopg.connect(db.app_dsn, autocommit=True) as app:
        app.execute("SELECT pyembed.create_corpus('small', %s)", (FAKE,))
        with pytest.raises(psycopg.Error, match=re.escape(message)) as err:
            app.execute("SELECT pyembed.create_corpus('big', %s, '', %s)", (FAKE, too_many))
        assert err.value.sqlstate == "PE005"
        with pytest.raises(psycopg.errors.CheckViolation, match="corpora_chunk_tokens_in_range"):
            owner.execute("UPDATE pyembed.corpora SET chunk_tokens = %s", (too_many,))
    owner.rollback()
    with pyembed.connect(db.app_dsn) as client, \
            pytest.raises(InvalidInput, match=f"^{re.escape(message)}$"):
        client.create_corpus("big", FAKE, chunk_tokens=too_many)
    with pyembed.connect(db.owner_dsn) as client, \
            pytest.raises(InvalidInput, match=r"^max_batch must be 1\.\.100000, got 100001$"):
        client.register_model(ModelSpec("fake", "m", "1", 4, max_batch=100_001))


@pytest.mark.parametrize("value", [0, 100_001, 2**31, 2**63, 2**80])
def test_a_settings_range_message_is_written_once_in_sql(app: psycopg.Connection[Any],
                                                          value: int) -> None:
    """dbcall.integer asks pyembed._check_setting, the function create_corpus and register_model
    call, for a setting stored in a row: Python's InvalidInput is SQL's PE005, its words, for a
    number past bigint too (sent as numeric). Before, dbcall.integer wrote the message itself beside
    SQL's (no database error behind it)."""
    from pyembed.dbcall import integer

    with pytest.raises(InvalidInput) as err:
        integer(value, "chunk_tokens", app)
    assert str(err.value) == f"chunk_tokens must be 1..100000, got {value}"
    cause = err.value.__cause__
    assert isinstance(cause, psycopg.Error) and cause.sqlstate == "PE005", cause
    assert "_check_setting" in (cause.diag.context or ""), cause.diag.context
    assert integer(100_000, "chunk_tokens", app) == 100_000
    with pytest.raises(InvalidInput, match=r"^k must be a whole number from -2147483648"):
        integer(2**31, "k", app)  # not a stored setting: PostgreSQL's integer, Python's words


OUTSIDE = [-(2**31) - 1, -1, 0, 101, 1001, 100_001, 36_501, 876_001, 2**31, 10**20]
"""Numbers around every count's bounds and past PostgreSQL's integer either way."""
NOT_COUNTS = {
    ("_count_arg", "value"): "the counts' check itself",
    ("_check_setting", "value"): "the settings' check itself",
    ("_report_window", "amount"): "the reports' window check, walked through days and hours",
    ("register_model", "price_per_mtok"): "a price, not a count (models_price_in_range)",
    ("claim_jobs", "max_attempts"): "compared with a job's attempts as given: any count is taken",
    ("expire_jobs", "max_attempts"): "as claim_jobs's",
    ("queue_by_tenant", "max_attempts"): "as claim_jobs's",
    **{("_hybrid_ranking", p): "search_hybrid's, walked there (the checks are this helper's)"
       for p in ("k", "candidates", "rrf_k")},
}


def test_every_count_reads_the_same_from_sql_and_python(db: Database) -> None:
    """Walks every numeric parameter of pyembed's functions (the counts a SQL client gives:
    numeric so that any number reaches the check) with numbers around and past its bounds: SQL
    refuses each with PE005 naming the count and its own bounds, never PostgreSQL's integer,
    and the Python entry point that passes it on says the same words. A new numeric parameter
    fails here until it is listed. Before, Python's days, hours, queries, max_samples and share
    past integer named the integer's range ('days must be a whole number from -2147483648 to
    2147483647, not 2147483648', where SQL says 'a report covers 1..36500 days, not ...'), and
    a negative max_samples was taken as 0."""
    with pyembed.connect(db.app_dsn) as app, pyembed.connect(db.owner_dsn) as owner:
        docs = app.create_corpus("docs", FAKE)
        docs.add([("a", "alpha text")])
        migration.start(owner, "docs", "fake/fake-hash@2:1024")
        vector = str(app.embedder(FAKE).embed_query("alpha").tolist())
        python: dict[str, Callable[[int], Any]] = {
            "k": lambda n: docs.search("alpha", k=n, mode="keyword"),
            "chunk_tokens": lambda n: app.create_corpus("other", FAKE, chunk_tokens=n),
            "chunk_overlap": lambda n: app.create_corpus("other", FAKE, chunk_overlap=n),
            "days": lambda n: tenants.usage(app.conn, n),
            "cache days": lambda n: cache.stats(app.conn, n),
            "cache older_than_days": lambda n: cache.purge(app.conn, older_than_days=n),
            "rerank older_than_days": lambda n: cache.purge_rerank_scores(app.conn,
                                                                          older_than_days=n),
            "queries": lambda n: recall.measure(app.conn, "docs", n),
            "max_samples": lambda n: recall.measure_sampled(app.conn, n),
            "hours": lambda n: recall.report(app.conn, n),
            "share": lambda n: migration.shift(owner, "docs", n),
            "max_batch": lambda n: models.register(owner.conn, ModelSpec("fake", "m", "9", 8,
                                                                         max_batch=n)),
            "max_tokens": lambda n: models.register(owner.conn, ModelSpec("fake", "m", "9", 8,
                                                                          max_tokens=n)),
            "request_dimensions": lambda n: models.register(
                owner.conn, ModelSpec("fake", "m", "9", 8, request_dimensions=n)),
            "rerank candidates": lambda n: docs.search("alpha", k=1, rerank="fake/overlap",
                                                       rerank_candidates=n),
            "worker batch_size": lambda n: Worker(db.app_dsn, batch_size=n).claim(),
        }
        # (function, parameter) -> (its call with %(n)s, the Python entry point's name or None
        # for a count only SQL takes, whether the owner calls it)
        counts: dict[tuple[str, str], tuple[str, str | None, bool]] = {
            ("search", "k"): (f"search('docs', '{vector}', '{FAKE}', %(n)s)", "k", False),
            ("search_text", "k"): ("search_text('docs', 'alpha', %(n)s)", "k", False),
            ("search_keyword", "k"): ("search_keyword('docs', 'alpha', %(n)s)", "k", False),
            ("search_hybrid", "k"): (f"search_hybrid('docs', 'alpha', '{vector}', '{FAKE}', "
                                     "%(n)s)", "k", False),
            ("search_hybrid", "candidates"): (
                f"search_hybrid('docs', 'alpha', '{vector}', '{FAKE}', 10, NULL, %(n)s)", None,
                False),
            ("search_hybrid", "rrf_k"): (
                f"search_hybrid('docs', 'alpha', '{vector}', '{FAKE}', 10, NULL, 100, %(n)s, "
                "fusion => 'rrf')", None, False),
            ("keyword_ranking", "candidates"): ("keyword_ranking('docs', 'alpha', %(n)s)", None,
                                                False),
            ("keyword_ranking", "passages"): (
                "keyword_ranking('docs', 'alpha', passages => %(n)s)", None, False),
            ("search_reranked", "k"): ("search_reranked('docs', 'alpha', 'fake/overlap', %(n)s)",
                                       "k", False),
            ("search_reranked", "candidates"): (
                "search_reranked('docs', 'alpha', 'fake/overlap', 1, NULL, 'vector', %(n)s)",
                "rerank candidates", False),
            ("create_corpus", "chunk_tokens"): (f"create_corpus('other', '{FAKE}', '', %(n)s)",
                                                "chunk_tokens", False),
            ("create_corpus", "chunk_overlap"): (
                f"create_corpus('other', '{FAKE}', '', 200, %(n)s)", "chunk_overlap", False),
            ("usage_report", "days"): ("usage_report(%(n)s)", "days", False),
            ("cache_report", "days"): ("cache_report(%(n)s)", "cache days", False),
            ("cache_purge", "older_than_days"): ("cache_purge(NULL, false, %(n)s)",
                                                 "cache older_than_days", False),
            ("rerank_cache_purge", "older_than_days"): (
                "rerank_cache_purge(NULL, false, %(n)s)", "rerank older_than_days", False),
            ("measure_recall", "queries"): ("measure_recall('docs', %(n)s)", "queries", False),
            ("recall_sampled", "max_samples"): ("recall_sampled(%(n)s)", "max_samples", False),
            ("recall_report", "hours"): ("recall_report(%(n)s)", "hours", False),
            ("migration_shift", "share"): ("migration_shift('docs', %(n)s)", "share", True),
            ("register_model", "dimensions"): ("register_model('fake', 'm', '9', %(n)s)", None,
                                               True),
            ("register_model", "max_batch"): (
                "register_model('fake', 'm', '9', 8, max_batch => %(n)s)", "max_batch", True),
            ("register_model", "max_tokens"): (
                "register_model('fake', 'm', '9', 8, max_tokens => %(n)s)", "max_tokens", True),
            ("register_model", "request_dimensions"): (
                "register_model('fake', 'm', '9', 8, request_dimensions => %(n)s)",
                "request_dimensions", True),
            ("hnsw_rule", "rows"): ("hnsw_rule(%(n)s, 384)", None, True),
            ("hnsw_rule", "dims"): ("hnsw_rule(1000, %(n)s)", None, True),
            ("claim_jobs", "batch"): ("claim_jobs(5, %(n)s, 30)", "worker batch_size", False),
            ("_job_bounds", "batch"): ("_job_bounds(%(n)s, 30)", None, True),
        }
        walked = owner.conn.execute(
            "SELECT p.proname, a.name FROM pg_proc p, unnest(p.proargnames, p.proargtypes::oid[])"
            " a(name, type) WHERE p.pronamespace = 'pyembed'::regnamespace"
            " AND a.type = 'numeric'::regtype").fetchall()
        assert {tuple(r) for r in walked} == set(counts) | set(NOT_COUNTS)
        for (function, parameter), (call, entry, as_owner) in counts.items():
            with psycopg.connect(db.owner_dsn if as_owner else db.app_dsn) as conn:
                for n in OUTSIDE:
                    try:
                        conn.execute(f"SELECT * FROM pyembed.{call}", {"n": n})
                        conn.rollback()  # in this count's bounds: nothing kept
                        continue
                    except psycopg.Error as err:
                        conn.rollback()
                        assert err.sqlstate == "PE005", (function, parameter, n, err)
                        said = err.diag.message_primary or ""
                    assert str(n) in said and "2147483647" not in said.replace(
                        f"..{2**31 - 1}", ""), (function, parameter, said)
                    if entry is None:
                        continue
                    with pytest.raises(InvalidInput) as py_err:
                        python[entry](n)
                    assert str(py_err.value) == said, (function, parameter, n)


PYTHON_ONLY_EDGES = [HUGE, -HUGE - 1, 10**20, 0]
"""Past PostgreSQL's integer either way, and one below every count's bound here."""
REACHES_SQL = {"chunk_tokens", "chunk_overlap", "k", "rerank_candidates", "share", "days",
               "queries", "max_samples", "hours", "requests_per_minute", "tokens_per_minute",
               "older_than_days"}
"""Numbers pyembed's SQL checks, walked above (their words are SQL's own)."""
NOT_WALKED = {
    ("Corpus.log_query", "k"): "a search's own record of itself (never raises, test_api_walk)",
    ("pyembed.rag.citations", "count"): "a pure helper of answer() on the texts it made",
    ("Client.set_index_settings", "settings"): "a JSON object SQL checks key by key "
                                               "(test_index_settings)",
    ("pyembed.tenants.meter", "corpus_id"): "the in-database code's own (GD's corpus id)",
    ("pyembed.migration.backfill", "progress"): "a callback, not a number",
    ("pyembed.migration.storage_bytes", "vectors"): "arithmetic: any count has its size",
    ("pyembed.migration.storage_bytes", "dims"): "arithmetic: any width has its size",
    ("pyembed.rag.answer", "min_score"): "any finite score (its words: 'a finite number')",
    ("Corpus.search", "alpha"): "a weight 0..1, a float (test_api_walk, test_search_modes)",
    ("Corpus.retrieve", "alpha"): "as Corpus.search's",
    ("pyembed.migration.validate", "max_drop"): "0..1, a float (text.number's words)",
    ("pyembed.migration.backfill", "rate"): "any rate above 0: 1e300 texts/s is no limit",
    ("pyembed.ingest.ingest", "progress_every"): "seconds, a float (text.number's words)",
    **{("Worker", name): "seconds, a float (text.number's words)"
       for name in ("lease_seconds", "retry_base", "retry_max", "recall_every")},
    ("Worker", "batch_size"): "pyembed.claim_jobs' bound, said by its check at the first claim "
                              "(test_cli_walk walks `pyembed worker --batch-size`)",
    ("Worker", "max_attempts"): "at least 1, any count above: compared with a job's attempts",
    ("Client.billed_to", "corpus_id"): "a corpus's id the client read, not a count",
    ("pyembed.evaluation.eval_queries", "corpus_id"): "a corpus's id its caller read",
}
"""Numeric parameters of the Python entry points left out here, with why."""


def python_numbers() -> set[tuple[str, str]]:
    """(entry point, parameter) of every int- or float-annotated parameter of the public Python
    API (test_api_walk's entry points and the recall, cache and models functions)."""
    import inspect

    from tests.test_api_walk import entry_points

    found = set()
    walked = list(entry_points())
    for module in (recall, cache, models):
        walked += [(f"{module.__name__}.{name}", member, inspect.signature(member))
                   for name, member in vars(module).items()
                   if not name.startswith("_") and inspect.isfunction(member)
                   and member.__module__ == module.__name__]
    for label, _, signature in walked:
        for p in signature.parameters.values():
            if str(p.annotation).split(" ")[0] in ("int", "float", "int | None", "float | None") \
                    or str(p.annotation).startswith(("int", "float")):
                found.add((label, p.name))
    return found


def test_every_python_only_number_says_its_own_bound(db: Database, fake_api: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Walks every numeric parameter of the public Python API (a new one fails here until it is
    listed): each that only Python checks refuses a number past PostgreSQL's integer, and one
    below its bound, with its own bound in SQL's words (`name must be low..high, got n`, as
    pyembed._count_arg says it), never the integer's range. Before, rag.answer's max_tokens and
    max_retries and migration.validate's k past integer said 'must be a whole number from
    -2147483648 to 2147483647', models.register's dimensions too (SQL's check, numeric since
    revision 0033, was not reached), backfill's batch_size took any number above 0, and
    rag.answer's timeout=1e300 reached the socket (OverflowError)."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    with pyembed.connect(db.app_dsn) as app, pyembed.connect(db.owner_dsn) as owner:
        docs = app.create_corpus("docs", FAKE)
        docs.add([("a", "alpha text")])
        migration.start(owner, "docs", "fake/fake-hash@2:1024")
        # (entry point, parameter) -> (its call, the words for n)
        own: dict[tuple[str, str], tuple[Callable[[Any], Any], str]] = {
            ("pyembed.rag.answer", "max_tokens"): (
                lambda n: rag.answer(docs, "alpha?", max_tokens=n),
                "max_tokens must be 1..128000, got {n}"),
            ("pyembed.rag.answer", "max_retries"): (
                lambda n: rag.answer(docs, "alpha?", max_retries=n),
                "max_retries must be 0..10, got {n}"),
            ("pyembed.rag.answer", "timeout"): (
                lambda n: rag.answer(docs, "alpha?", timeout=float(n)),
                "timeout must be above 0 and at most 3600 seconds, got {n!r}"),
            ("pyembed.migration.validate", "k"): (
                lambda n: migration.validate(owner, "docs", k=n), "k must be 1..333, got {n}"),
            ("pyembed.migration.backfill", "batch_size"): (
                lambda n: migration.backfill(owner, "docs", batch_size=n),
                "batch_size must be 1..100000, got {n}"),
            ("pyembed.ingest.ingest", "batch_size"): (
                lambda n: ingest.ingest(docs, "README.md", batch_size=n),
                "batch_size must be 1..10000, got {n}"),
            ("Worker", "recall_samples"): (
                lambda n: Worker(db.app_dsn, recall_samples=n),
                "recall_samples must be 0..2147483647, got {n}"),
            ("pyembed.models.register", "dimensions"): (
                lambda n: models.register(owner.conn, ModelSpec("fake", "m", "9", n)),
                "dimensions must be 1..16000, got {n}"),
        }
        found = python_numbers()
        listed = set(own) | set(NOT_WALKED)
        assert {f for f in found if f[1] not in REACHES_SQL} - listed == set(), "not listed"
        for (label, parameter), (call, words) in own.items():
            for n in PYTHON_ONLY_EDGES:
                value = float(n) if parameter == "timeout" else n
                if parameter in ("max_retries", "recall_samples") and n == 0:
                    continue  # in its bounds: no retry, no recall run
                with pytest.raises(InvalidInput) as err:
                    call(value)
                assert str(err.value) == words.format(n=value), (label, parameter, n)
