"""What the PL/Python functions run inside PostgreSQL: each SQL wrapper calls one function here.

`plpy` and `GD` are PL/Python's module and per-session dictionary; embedders (and the local
model) are built once per backend and kept in GD.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import traceback
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from . import search, tenants
from .cache import PostgresCache
from .cachekey import HitCounter
from .chunking import chunk_text, fit_chunks
from .corpora import model_spec
from .errors import InvalidInput, MissingAPIKey, PyembedError, redact, shown
from .limits import text_tokens
from .models import InputType, ModelSpec
from .retry import IN_STATEMENT_RETRIES, MAX_RETRIES, MAX_TIMEOUT
from .sqlexec import PlpyExecutor, unpack_sqlstate, vector_text

T = TypeVar("T")


def _cache(plpy: Any, GD: dict[str, Any]) -> PostgresCache:
    """The package's cache through SPI; hits and misses counted per backend."""
    return PostgresCache(PlpyExecutor(plpy, GD), counter=GD.setdefault("pyembed.hits", HitCounter()))


HTTP_TIMEOUT_MAX = MAX_TIMEOUT
"""The most seconds pyembed.http_timeout may give a request (pyembed.retry's bound)."""
HTTP_RETRIES_MAX = MAX_RETRIES
"""The most retries pyembed.http_retries may ask for a request (pyembed.retry's bound)."""


def _setting(plpy: Any, name: str, default: float, fits: Callable[[float], bool],
             rule: str) -> float:
    """The session's pyembed.`name`, or `default` unset; InvalidInput saying `rule` ("a
    whole number 0..10") for a value that is not a number that `fits`."""
    row = plpy.execute(f"SELECT current_setting('pyembed.{name}', true) AS v")[0]["v"]
    if not row:
        return default
    try:
        value = float(row)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and fits(value)):
        raise InvalidInput(f"pyembed.{name} must be {rule}, got {row!r}")
    return value


def _secret(db: PlpyExecutor, name: str) -> str | None:
    """An API key from pyembed.secrets (owner-only), else the server's environment."""
    rows = db.rows("SELECT value FROM pyembed.secrets WHERE name = $1", [name], ["text"])
    return rows[0][0] if rows else os.environ.get(name)


def _service_settings(plpy: Any, db: PlpyExecutor, spec: Any
                      ) -> tuple[float, int, str | None, str | None]:
    """(timeout, retries, API key, base URL) for a service's model or reranker `spec`: the
    owner's settings and secrets (MissingAPIKey when the model needs a key that is unset)."""
    timeout = _setting(plpy, "http_timeout", 10.0, lambda v: 0 < v <= HTTP_TIMEOUT_MAX,
                       f"a number of seconds above 0 and at most {HTTP_TIMEOUT_MAX:g}")
    retries = int(_setting(plpy, "http_retries", IN_STATEMENT_RETRIES,
                           lambda v: v.is_integer() and 0 <= v <= HTTP_RETRIES_MAX,
                           f"a whole number 0..{HTTP_RETRIES_MAX}"))
    api_key = _secret(db, spec.api_key_env) if spec.api_key_env else None
    if spec.api_key_env and not api_key:
        raise MissingAPIKey(f"{spec.api_key_env} is not set for the database",
                            hint=f"as the owner, run `pyembed secret set {spec.api_key_env}` (or "
                                 f"SELECT pyembed.set_secret('{spec.api_key_env}', '...'))")
    # A proxy or gateway for the provider: owner-only like the key (a session setting would
    # let any role send the owner's key elsewhere).
    base_url = _secret(db, f"PYEMBED_{spec.provider.upper()}_BASE_URL")
    return timeout, retries, api_key, base_url


def embedder(plpy: Any, GD: dict[str, Any], key: str) -> Any:
    """The backend's embedder for a model key, rebuilt when its API key or timeouts change."""
    from .embedder import Embedder
    from .providers import provider_for

    db = PlpyExecutor(plpy, GD)
    spec = model_spec(db, key)
    timeout, retries, api_key, base_url = _service_settings(plpy, db, spec)
    fingerprint = (spec, timeout, retries, hash(api_key), base_url)
    cached = GD.setdefault("pyembed.embedders", {}).get(key)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    def meter(spec: ModelSpec, tokens: int) -> None:  # to the corpus of the current call
        tenants.meter(db, GD.get("pyembed.corpus_id"))(spec, tokens)

    emb = Embedder(spec, provider_for(spec, api_key=api_key, base_url=base_url, timeout=timeout),
                   cache=_cache(plpy, GD), max_retries=retries, max_retry_after=timeout,
                   meter=meter, on_error=tenants.error_counter(db), truncate_hint=None)
    GD["pyembed.embedders"][key] = (fingerprint, emb)
    return emb


def reranker(plpy: Any, GD: dict[str, Any], name: str) -> Any:
    """The backend's reranker called `name`, rebuilt when its API key or timeouts change; its
    key and base URL are the owner's secrets, as for embedders."""
    from .providers.rerank import reranker_for, reranker_spec
    from .rerank import RerankCache, Reranker

    db = PlpyExecutor(plpy, GD)
    spec = reranker_spec(name)
    timeout, retries, api_key, base_url = _service_settings(plpy, db, spec)
    fingerprint = (spec, timeout, retries, hash(api_key), base_url)
    cached = GD.setdefault("pyembed.rerankers", {}).get(spec.key)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]

    def meter(spec: Any, tokens: int) -> None:  # to the corpus of the current call
        tenants.meter(db, GD.get("pyembed.corpus_id"))(spec, tokens)

    rr = Reranker(spec, reranker_for(spec, api_key=api_key, base_url=base_url, timeout=timeout),
                  cache=RerankCache(db, counter=GD.setdefault("pyembed.hits", HitCounter())),
                  max_retries=retries, max_retry_after=timeout, meter=meter,
                  on_error=tenants.error_counter(db))
    GD["pyembed.rerankers"][spec.key] = (fingerprint, rr)
    return rr


@functools.cache
def _required(fn: Callable[..., Any]) -> tuple[tuple[str, bool], ...]:
    """`fn`'s arguments after plpy and GD, each with whether it needs a value: its type hint
    does not admit None. The arguments are named as the SQL function's."""
    hints = typing.get_type_hints(fn)
    return tuple((name, type(None) not in typing.get_args(hints.get(name)))
                 for name in list(inspect.signature(fn).parameters)[2:])


def check_nulls(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """InvalidInput naming the first argument given NULL that `fn` needs a value for, in the
    words of SQL (a Python type name, "got NoneType", said nothing to a SQL caller)."""
    for (name, required), value in zip(_required(fn), args, strict=False):
        if required and value is None:
            raise InvalidInput(f"{name} is NULL: pyembed.{fn.__name__}() needs a value for it")


def call(plpy: Any, fn: Callable[..., T], GD: dict[str, Any], *args: Any) -> T:
    """Run `fn(plpy, GD, *args)` (an argument NULL where its type hint admits no None is
    InvalidInput naming it); any error leaves as one plpy.Error with the message, SQLSTATE,
    DETAIL and HINT a PostgreSQL error would have (see sql_error). The SQL wrapper of each
    function takes away the "plpy.Error: " that PL/Python puts before the message."""
    try:
        check_nulls(fn, args)
        return fn(plpy, GD, *args)
    except Exception as exc:
        message, fields = sql_error(plpy, exc, f"pyembed.{fn.__name__}")
    plpy.error(message, **fields)
    raise AssertionError("plpy.error returned")


SPI_FIELDS = ("detail", "hint", "query", "position", "schema_name", "table_name", "column_name",
              "datatype_name", "constraint_name")
"""The order of a plpy.SPIError's `spidata`, after its packed SQLSTATE."""
ERROR_FIELDS = ("sqlstate", "detail", "hint", "schema_name", "table_name", "column_name",
                "datatype_name", "constraint_name")
"""What plpy.error takes besides the message (and a plpy.Error carries)."""


def _spi_fields(exc: Any) -> dict[str, Any]:
    """SQLSTATE, DETAIL, HINT and the named objects of an error from a statement run through SPI
    (plpy.SPIError: a spiexceptions class has `sqlstate`, a code PL/Python has no class for,
    such as pyembed's, is only in `spidata`)."""
    spidata = getattr(exc, "spidata", None)
    if not spidata:
        return {"sqlstate": getattr(exc, "sqlstate", None)}
    fields = dict(zip(SPI_FIELDS, spidata[1:], strict=False))
    return {"sqlstate": unpack_sqlstate(spidata[0]),
            **{k: v for k, v in fields.items() if k in ERROR_FIELDS}}


def sql_error(plpy: Any, exc: Exception, where: str) -> tuple[str, dict[str, Any]]:
    """The message and the plpy.error fields of the SQL error `exc` becomes.

    A database error from a statement the function ran keeps its own SQLSTATE, DETAIL and HINT;
    a pyembed error its SQLSTATE (errors._BY_SQLSTATE), with the DETAIL and HINT of the
    database error it was made from, if any. Anything else (a client-side error too,
    errors.CLIENT_ONLY) is a bug: XX000 (internal_error), the exception's class and text, and
    its traceback in the server log only."""
    if isinstance(exc, plpy.SPIError):
        message, fields = str(exc.args[0]) if exc.args else str(exc), _spi_fields(exc)
    elif isinstance(exc, plpy.Error):
        message = str(exc.args[0]) if exc.args else str(exc)
        fields = {k: getattr(exc, k, None) for k in ERROR_FIELDS}
    elif isinstance(exc, PyembedError) and exc.sqlstate:
        sqlstate = exc.sqlstate
        origin = exc.__cause__ or exc.__context__
        fields = _spi_fields(origin) if isinstance(origin, plpy.SPIError) else {}
        if fields.get("sqlstate") != sqlstate:  # not the database error it stands for
            fields = {}
        message, fields["sqlstate"] = exc.said, sqlstate
        if exc.hint:
            fields["hint"] = exc.hint
    else:
        plpy.log(f"pyembed: internal error in {where}:\n" + "".join(
            traceback.format_exception(type(exc), exc, exc.__traceback__)))
        message = f"internal error in {where}: {type(exc).__name__}: {redact(str(exc))}"
        fields = {"sqlstate": "XX000",
                  "hint": "a bug in pyembed: the server log has the Python traceback"}
    fields["sqlstate"] = fields.get("sqlstate") or "XX000"
    return message, {k: v for k, v in fields.items() if v is not None}


def _input_type(value: str | None) -> InputType:
    try:
        return InputType(value or "document")
    except ValueError:
        raise InvalidInput(f"input_type must be 'document' or 'query', not {shown(value)}") from None


def embed(plpy: Any, GD: dict[str, Any], input: str, model_key: str, input_type: str) -> str:
    GD["pyembed.corpus_id"] = None  # accounted to no corpus
    emb = embedder(plpy, GD, model_key)
    return vector_text(emb.embed([input], _input_type(input_type))[0])


def embed_batch(plpy: Any, GD: dict[str, Any], inputs: list[str | None], model_key: str,
                input_type: str) -> list[str]:
    if any(t is None for t in inputs):
        raise InvalidInput("inputs has a NULL: pyembed.embed_batch() needs a text in each")
    GD["pyembed.corpus_id"] = None
    emb = embedder(plpy, GD, model_key)
    return [vector_text(v) for v in emb.embed([t for t in inputs if t is not None],
                                              _input_type(input_type))]


def search_text(plpy: Any, GD: dict[str, Any], corpus: str, query: str, k: int,
                filter: str | None, mode: str, group_by: str = "document",
                fusion: str | None = None, alpha: float | None = None) -> list[tuple[Any, ...]]:
    """A search by text (the corpus's model embeds the query); a NULL filter, fusion or alpha
    is none, or the default."""

    def embed_query(where: search.Route, text: str) -> Any:
        GD["pyembed.corpus_id"] = where.corpus_id  # the provider call is accounted to it
        return embedder(plpy, GD, where.key).embed_query(text)

    rows, where = search.search_text(PlpyExecutor(plpy, GD), corpus, query, k, filter, mode,
                                     embed_query,
                                     options=search.Options(group_by, fusion, alpha))
    GD["pyembed.corpus_id"] = where.corpus_id  # a rerank of these rows is accounted to it
    return rows


def search_reranked(plpy: Any, GD: dict[str, Any], corpus: str, query: str, rerank: str, k: int,
                    filter: str | None, mode: str, candidates: int | None,
                    group_by: str = "document", fusion: str | None = None,
                    alpha: float | None = None) -> list[tuple[Any, ...]]:
    """search_text's best `candidates` hits, reordered by the reranker `rerank`: the best k,
    each with the reranker's score and identity."""
    from .rerank import candidates as depth_for

    depth = depth_for(search.check_k(k), candidates)
    rr = reranker(plpy, GD, rerank)  # an unknown reranker or a missing key before any search
    rows = search_text(plpy, GD, corpus, query, depth, filter, mode, group_by, fusion, alpha)
    hits = rr.rerank(query, search.as_hits(rows), k)
    return [(h.document_id, h.chunk_id, h.chunk_index, h.content, h.metadata, h.score,
             h.model_key, h.rerank_score, h.reranker) for h in hits]


def _token_counter(GD: dict[str, Any], spec: ModelSpec) -> Callable[[list[str]], list[int] | None]:
    """The model's own token counter (no API key needed to count), kept per backend."""
    from .providers import provider_for

    counters = GD.setdefault("pyembed.counters", {})
    if spec.key not in counters:
        try:
            counters[spec.key] = provider_for(spec, api_key="unused").count_tokens
        except PyembedError:
            counters[spec.key] = lambda texts: None
    return counters[spec.key]  # type: ignore[no-any-return]


def add_document(plpy: Any, GD: dict[str, Any], corpus: str, document_id: str, content: str,
                 metadata: str | None) -> int:
    """Store a document and its chunks; the chunk triggers queue them for the worker. A NULL
    metadata is none ('{}')."""
    from .text import check_text, document_hash, read_json

    db = PlpyExecutor(plpy, GD)
    # The rule for ids is the documents table's (its trigger asks pyembed._document_id_problem
    # at the write): asked here with the corpus, before the text is chunked.
    ((corpus_id, model_key, chunk_tokens, chunk_overlap, problem),) = db.rows(
        "SELECT corpus_id, model_key, chunk_tokens, chunk_overlap, "
        "pyembed._document_id_problem($2) FROM pyembed.lookup_corpus($1)",
        [corpus, document_id], ["text", "text"])
    if problem is not None:
        raise InvalidInput(problem)
    check_text(content or "", f"document {document_id!r}")
    meta = read_json(metadata, "metadata") if metadata else {}
    if not isinstance(meta, dict):
        raise InvalidInput("metadata must be a JSON object")
    spec = model_spec(db, model_key)
    chunks = fit_chunks(chunk_text(content or "", chunk_tokens, chunk_overlap), text_tokens(spec),
                        _token_counter(GD, spec))
    meta_text = json.dumps(meta)
    db.rows("""INSERT INTO pyembed.documents (corpus_id, document_id, content_hash, metadata)
               VALUES ($1, $2, $3, $4::jsonb)
               ON CONFLICT (corpus_id, document_id) DO UPDATE
                 SET content_hash = EXCLUDED.content_hash, metadata = EXCLUDED.metadata""",
            [corpus_id, document_id, document_hash(content or "", meta), meta_text],
            ["integer", "text", "bytea", "text"])
    # One statement for all chunks: the statement triggers (queue, keyword index) run once.
    db.rows("""INSERT INTO pyembed.chunks (corpus_id, document_id, chunk_index, content, metadata)
               SELECT $1, $2, i - 1, c, $4::jsonb FROM unnest($3::text[]) WITH ORDINALITY AS t(c, i)
               ON CONFLICT (corpus_id, document_id, chunk_index) DO UPDATE
                 SET content = EXCLUDED.content, metadata = EXCLUDED.metadata""",
            [corpus_id, document_id, chunks, meta_text], ["integer", "text", "text[]", "text"])
    db.rows("SELECT pyembed.delete_chunks($1, ARRAY[$2], ARRAY[$3])",
            [corpus, document_id, len(chunks)], ["text", "text", "integer"])
    return len(chunks)
