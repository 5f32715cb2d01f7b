"""A search by text from Python in few round trips (sql/066-query.sql): a cached query is one
call that routes, looks up, searches and records; a miss is that call (which also reserves the
provider call), the embedding, and one call that stores it, searches and records. With a read
replica the calls that search run there and one call records on the primary."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import psycopg
from pgvector import Vector
from psycopg.pq import TransactionStatus

from .cachekey import cache_key
from .corpora import corpus_info
from .db import PsycopgExecutor
from .dbcall import translated
from .errors import ModelMismatch
from .models import InputType
from .search import DEFAULT, Hit, Options, as_hits, bucket, check_k, filter_json, run
from .text import check_text, estimate_tokens

if TYPE_CHECKING:
    from .client import Corpus

SEARCH_QUERY = """SELECT corpus_id, active_key, model_key, cache_hit, reserved, recorded,
  embed_ms, search_ms, document_ids, chunk_ids, chunk_indexes, contents, metadatas, scores,
  model_keys
  FROM pyembed.search_query($1::text, $2::text, $3::integer, $4::text[], $5::bytea[],
                            $6::integer, $7::jsonb, $8::text, $9::jsonb, $10::integer,
                            $11::boolean, $12::text[], $13::bigint[], $14::bigint[])"""
SEARCH_EMBEDDED = """SELECT recorded, search_ms, document_ids, chunk_ids, chunk_indexes,
  contents, metadatas, scores, model_keys
  FROM pyembed.search_embedded($1::text, $2::text, $3::vector, $4::text, $5::bytea, $6::text,
                               $7::float8, $8::integer, $9::jsonb, $10::text, $11::jsonb,
                               $12::real, $13::boolean, $14::text[], $15::bigint[],
                               $16::bigint[], $17::bigint[], $18::float8[], $19::text[])"""
KEYWORD_RANKING = """SELECT ids::text, scores::text, keys::text
  FROM pyembed.keyword_ranking($1::text, $2::text, filter => $3::jsonb, group_by => $4::text,
                               passages => $5::integer)"""
"""Hybrid search's keyword ranking, with the passages of its best k documents, as its arrays'
text, which the client hands back to search_embedded as it came: the server reads it again,
where turning it into Python lists and back cost the search's critical path (the client's thread
embeds the query meanwhile)."""
RECORD = """SELECT pyembed.record_search($1::integer, $2::text, $3::text, $4::integer,
  $5::boolean, $6::real, $7::real, NULL, $8::real, $9::bytea, $10::text, $11::vector,
  $12::float8, $13::jsonb, $14::text[], $15::bigint[], $16::bigint[])"""

RESERVE = "SELECT pyembed.reserve_query($1::integer, $2::text, $3::bytea, $4::integer)"

_BACKGROUND = ThreadPoolExecutor(thread_name_prefix="pyembed-query")
"""Runs hybrid search's keyword ranking while the caller's thread embeds the query (and, for a
model in this process, the first round trip before it)."""

Counts = tuple[list[str], list[int], list[int]] | tuple[None, None, None]


@dataclass(frozen=True)
class Searched:
    """What one search by text found, the keys of its route, and its phase timings in ms."""

    hits: list[Hit]
    corpus_id: int
    active: str
    model_key: str | None
    cache_hit: bool | None
    timings: dict[str, float | None]


@dataclass(frozen=True)
class _Prepared:
    text: str
    input_type: InputType
    cache_key: bytes | None


def search_text(corpus: Corpus, query: str, k: int, filter: Mapping[str, Any] | None,
                mode: str, *, translate: Callable[[str], str] | None = None,
                options: Options = DEFAULT, log: bool = True) -> Searched:
    """Search `corpus` by text (see the module's docstring); `log`: write the query-log line.
    A query routed to a migration's target that a rollback retires meanwhile is routed
    again, once."""
    check_text(query, "query")
    options.check(mode)
    k = check_k(k)
    flt = filter_json(filter)
    # alpha as text: JSON has no NaN, which the database refuses with its own message
    opts = json.dumps({"group_by": options.group, "fusion": options.fusion,
                       "alpha": None if options.alpha is None else repr(float(options.alpha))})
    for attempt in (1, 2, 3):
        try:
            return _search(corpus, query, k, flt, mode, opts, options, translate, log)
        except ModelMismatch:
            if attempt == 3:
                raise
        except _Stale:
            corpus.info = corpus_info(corpus.client._conn, corpus.name)
    raise AssertionError("unreachable")


class _Stale(Exception):
    """The corpus's serving key is not one the client prepared the query for."""


def _search(corpus: Corpus, query: str, k: int, flt: str | None, mode: str, opts: str,
            options: Options, translate: Callable[[str], str] | None, log: bool) -> Searched:
    client = corpus.client
    started = time.perf_counter()
    primary, read = client._conn, client._reader()
    one = read is primary
    text = translate(query) if translate and mode != "keyword" else query
    keys = _keys(corpus) if mode != "keyword" else []
    prepared = {key: _prepare(corpus, key, text) for key in keys}
    counts = _due_counts(corpus) if one else (None, None, None)
    tokens = estimate_tokens(prepared[keys[0]].text) if keys else None
    if read.autocommit and read.info.transaction_status == TransactionStatus.IDLE:
        # the statement is its own transaction: its record may skip the WAL flush wait
        opts = json.dumps({**json.loads(opts), "quick_commit": True})
    params = [corpus.name, query, bucket(query), keys, [prepared[key].cache_key for key in keys],
              k, flt, mode, opts, tokens if one else None, log and one, *counts]
    ranking_params = [corpus.name, query, flt, options.group, k]
    early: tuple[np.ndarray, list[tuple[Any, ...]] | None] | None = None
    try:
        if _embeds_early(corpus, keys):
            row, early = _early(corpus, read, params, keys[0], prepared[keys[0]],
                                ranking_params if one and mode == "hybrid" else None)
        else:
            row = _rows(read, SEARCH_QUERY, params)[0]
    except BaseException:
        _put_back(corpus, counts)
        raise
    corpus_id, active, key, hit, reserved, recorded, embed_ms, search_ms = row[:8]
    _settle(corpus, counts, recorded)
    if mode != "keyword" and hit is None:
        raise _Stale
    served = prepared.get(key) if mode != "keyword" else None
    if client.cache is not None and served is not None:
        client.cache.counter.add(key, int(hit), int(not hit))
    if hit or mode == "keyword":
        done = time.perf_counter()
        if not one:
            _record(corpus, corpus_id, key, mode if log else None, k, hit, embed_ms, search_ms,
                    _ms(started, done), served, None, flt)
        return Searched(_hits(row[8:]), corpus_id, active, key if mode != "keyword" else None,
                        hit, {"embed_ms": embed_ms, "search_ms": search_ms,
                              "total_ms": _ms(started, done)})
    assert served is not None
    embedder = client.embedder(key)
    if not reserved:  # a replica's miss: the primary may have the entry, else reserves the call
        cached = _rows(primary, RESERVE, [corpus_id, key, served.cache_key,
                                          estimate_tokens(served.text)])[0][0]
        if cached is not None:
            rows = run(PsycopgExecutor(read), corpus.name, mode, query, cached, key, k, flt,
                       options)
            done = time.perf_counter()
            _record(corpus, corpus_id, key, mode if log else None, k, True, None,
                    None, _ms(started, done), served, None, flt)
            return Searched(as_hits(rows), corpus_id, active, key, True,
                            {"embed_ms": None, "search_ms": None, "total_ms": _ms(started, done)})
    if early is not None:  # made beside the first round trip (a miss of the key it served)
        vector, ranking = early
    else:
        # Hybrid search ranks by keywords on the server while the query is embedded here
        # (psycopg waits for the server without the GIL), so that the keyword leg overlaps
        # the embedding.
        keyword = (_BACKGROUND.submit(_rows, primary, KEYWORD_RANKING, ranking_params)
                   if one and mode == "hybrid" else None)
        try:
            with client._keep_turn() if keyword is not None else nullcontext(), \
                    client.billed_to(corpus_id):
                vector = embedder.embed_prepared(served.text, served.input_type, reserved=True)
        except BaseException:
            if keyword is not None:
                wait([keyword])  # the connection is free again; the embedding's error is the one
            raise
        ranking = keyword.result() if keyword is not None else None
    embedded = time.perf_counter()
    embed_ms = _ms(started, embedded)
    if one:
        counts = _due_counts(corpus)
        try:
            out = _rows(primary, SEARCH_EMBEDDED, [
                corpus.name, query, Vector(vector), key, served.cache_key, str(served.input_type),
                _ttl(corpus), k, flt, mode, opts, embed_ms, log, *counts,
                *(ranking[0] if ranking else (None, None, None))])[0]
        except BaseException:
            _put_back(corpus, counts)
            raise
        _settle(corpus, counts, out[0])
        search_ms, found = out[1], out[2:]
        done = time.perf_counter()
        return Searched(_hits(found), corpus_id, active, key, False,
                        {"embed_ms": embed_ms, "search_ms": search_ms,
                         "total_ms": _ms(started, done)})
    rows = run(PsycopgExecutor(read), corpus.name, mode, query, Vector(vector), key, k, flt,
               options)
    done = time.perf_counter()
    _record(corpus, corpus_id, key, mode if log else None, k, False, embed_ms,
            _ms(embedded, done), _ms(started, done), served, vector, flt)
    return Searched(as_hits(rows), corpus_id, active, key, False,
                    {"embed_ms": embed_ms, "search_ms": _ms(embedded, done),
                     "total_ms": _ms(started, done)})


def _embeds_early(corpus: Corpus, keys: list[str]) -> bool:
    """Whether the query is embedded beside the first round trip: when the search is sure to
    miss the cache (a client without one) and the model runs in this process at no cost
    (`Provider.in_process`), so that the embedding, not the round trip, is the wait."""
    client = corpus.client
    return bool(keys) and client.cache is None and client.embedder(keys[0]).provider.in_process


def _early(corpus: Corpus, read: psycopg.Connection[Any], params: list[Any], key: str,
           prepared: _Prepared, ranking_params: list[Any] | None
           ) -> tuple[tuple[Any, ...], tuple[np.ndarray, list[tuple[Any, ...]] | None] | None]:
    """search_query's row, made on a thread of its own while this one embeds the query for
    `key` (the key that serves it unless a migration shifts traffic), and with it, in the same
    round trip and transaction, the keyword ranking of `ranking_params` (hybrid search). The
    reservation search_query makes still decides whether the search goes on: its refusal is the
    search's error (and the ranking does not run), and a query another key serves drops the
    embedding and the ranking. Returns the row and, for a miss of `key`, (the embedding, the
    keyword ranking or None)."""
    client = corpus.client

    def first() -> tuple[tuple[Any, ...], bool, list[tuple[Any, ...]] | None]:
        # The ranking runs after the reservation, in its transaction: not if it is refused.
        found = _pipelined(read, [(SEARCH_QUERY, params)] + (
            [(KEYWORD_RANKING, ranking_params)] if ranking_params is not None else []))
        row = found[0][0]
        miss = row[3] is False and row[2] == key
        return row, miss, (found[1] if miss and ranking_params is not None else None)

    trip = _BACKGROUND.submit(first)
    try:
        # (the first round trip is on the connection meanwhile; a retry's call is accounted
        # to the corpus)
        with client._keep_turn(), client.billed_to(corpus.info.corpus_id):
            vector = client.embedder(key).embed_prepared(prepared.text, prepared.input_type,
                                                         reserved=True)
    except BaseException:
        wait([trip])  # the connection is free again; a refused reservation is the error
        if trip.exception() is not None:
            trip.result()
        raise
    row, miss, ranking = trip.result()
    return row, ((vector, ranking) if miss else None)


def _keys(corpus: Corpus) -> list[str]:
    """The keys that may serve a query now, as the client last read the corpus."""
    info = corpus.info
    shifting = info.migration_step == "shifting" and info.target_model_key
    return [info.model_key, info.target_model_key] if shifting else [info.model_key]  # type: ignore[list-item]


def _prepare(corpus: Corpus, key: str, text: str) -> _Prepared:
    embedder = corpus.client.embedder(key)
    prepared, input_type = embedder.prepare_query(text)
    ck = cache_key(prepared, key, input_type) if corpus.client.cache is not None else None
    return _Prepared(prepared, input_type, ck)


def _due_counts(corpus: Corpus) -> Counts:
    """The cache counts to write with the next call, if it is time."""
    cache = corpus.client.cache
    if cache is None or not cache.counter.due():
        return None, None, None
    return cache.counter.take()


def _settle(corpus: Corpus, counts: Counts, recorded: bool | None) -> None:
    if not recorded:
        _put_back(corpus, counts)


def _put_back(corpus: Corpus, counts: Counts) -> None:
    models, hits, misses = counts
    if corpus.client.cache is not None and models is not None and hits is not None \
            and misses is not None:
        corpus.client.cache.counter.put_back(models, hits, misses)


def _record(corpus: Corpus, corpus_id: int, key: str | None, kind: str | None, k: int,
            hit: bool | None, embed_ms: float | None, search_ms: float | None, total_ms: float,
            served: _Prepared | None, vector: np.ndarray | None, flt: str | None) -> None:
    """One call to the primary after a search on a replica: what the search would have
    written there (the query-log line, the cache entry of a miss, cache counts)."""
    counts = _due_counts(corpus)
    try:
        _rows(corpus.client._conn, RECORD, [
            corpus_id, key, kind, k, hit, embed_ms, search_ms, total_ms,
            served.cache_key if served else None, str(served.input_type) if served else None,
            None if vector is None else Vector(vector), _ttl(corpus), flt, *counts])
    except BaseException:
        _put_back(corpus, counts)
        raise


def _ttl(corpus: Corpus) -> float | None:
    cache = corpus.client.cache
    return cache.ttl.total_seconds() if cache is not None and cache.ttl else None


def _rows(conn: psycopg.Connection[Any], sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    return PsycopgExecutor(conn).rows(sql, params)


def _pipelined(conn: psycopg.Connection[Any], calls: Sequence[tuple[str, Sequence[Any]]]
               ) -> list[list[tuple[Any, ...]]]:
    """The rows of each of `calls` (statement, parameters), sent in one round trip and run in
    one transaction (outside a transaction block, the pipeline's implicit one): an error ends
    it, and the calls after it do not run."""
    if len(calls) == 1:
        return [PsycopgExecutor(conn).rows(*calls[0])]
    cursors = []
    with translated(), conn.pipeline():
        for sql, params in calls:
            cursor = psycopg.RawCursor(conn)
            cursor.execute(sql, list(params))
            cursors.append(cursor)
    return [cursor.fetchall() for cursor in cursors]


def _hits(arrays: Sequence[Any]) -> list[Hit]:
    return [Hit(*r) for r in zip(*arrays, strict=True)]


def _ms(a: float, b: float) -> float:
    return round(max(b - a, 0.0) * 1000.0, 3)
