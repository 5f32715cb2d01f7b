"""Guarded search, written once for the package and the PL/Python functions: which model key
serves a query (a migration's stable traffic share), the dispatch to the SQL search functions,
and a bounded re-route when a rollback retires the key a query was routed to."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .dbcall import count
from .errors import InvalidInput, InvalidVector, ModelMismatch, shown
from .sqlexec import Executor, executor
from .text import check_depth, check_json, read_json
from .vectors import float_array

if TYPE_CHECKING:
    import psycopg

MODES = ("vector", "keyword", "hybrid")
GROUPS = ("document", "chunk")
"""What a hit is: the best chunk of each of k distinct documents, or any of the k best chunks."""
FUSIONS = ("rrf", "relative")
"""How hybrid search fuses its two rankings (pyembed.search_hybrid): reciprocal rank fusion, or
relative-score fusion (min-max normalised scores, weighed by alpha)."""

# One statement per mode, and which of (corpus, query text, query vector, its key, k, filter,
# group, fusion, alpha) it takes, in order.
_SEARCHES = {
    "vector": ("SELECT * FROM pyembed.search($1::text, $2::vector, $3::text, $4::integer, "
               "$5::jsonb, $6::text)", (0, 2, 3, 4, 5, 6)),
    "keyword": ("SELECT * FROM pyembed.search_keyword($1::text, $2::text, $3::integer, "
                "$4::jsonb, $5::text)", (0, 1, 4, 5, 6)),
    "hybrid": ("SELECT * FROM pyembed.search_hybrid($1::text, $2::text, $3::vector, $4::text, "
               "$5::integer, $6::jsonb, group_by => $7::text, fusion => $8::text, "
               "alpha => $9::float8)", (0, 1, 2, 3, 4, 5, 6, 7, 8)),
}
_TYPES = ("text", "text", "text", "text", "integer", "text", "text", "text", "float8")
_ROUTE = """SELECT corpus_id, model_key,
  CASE WHEN migration_step = 'shifting' THEN target_model_key END, traffic_share
  FROM pyembed.lookup_corpus($1::text)"""


def vector_key(model_key: str | None) -> str:
    """The key a query vector was made with, as the caller gave it; InvalidInput naming what to
    pass when it gave none (every entry that takes a vector: Corpus.search and .retrieve,
    pyembed.search.search, pyembed.orm.search)."""
    if model_key is None:
        raise InvalidInput("a query vector needs model_key=..., the key of the model that made "
                           "it (a corpus's is its model_key; a text query is embedded with it)")
    if not isinstance(model_key, str):
        raise InvalidInput(f"model_key is a text like 'provider/model@version:dims', not "
                           f"{type(model_key).__name__} {model_key!r}")
    return model_key


def query_vector(query: object) -> np.ndarray:
    """A query vector as one row of float32 numbers; InvalidVector for anything else."""
    vec = float_array(query)
    if vec.ndim != 1 or not vec.size or not np.isfinite(vec).all():
        raise InvalidVector("the query vector must be one row of finite numbers")
    return vec


@dataclass(frozen=True)
class Hit:
    """One search result: which document and chunk, how close, and which model served it;
    after a rerank stage, the reranker's score and identity too (`score` stays the
    retrieval's)."""

    document_id: str
    chunk_id: int
    chunk_index: int
    content: str
    metadata: dict[str, Any]
    score: float
    model_key: str
    rerank_score: float | None = None
    reranker: str | None = None


def bucket(query: str) -> int:
    """0..99 from the sha256 of the stripped query: the same query always lands the same way."""
    return int.from_bytes(hashlib.sha256(query.strip().encode()).digest()[:8], "big") % 100


def serving_key(query: str, active: str, target: str | None, share: int) -> str:
    """The target key for `share` percent of queries (by hash), else the active key."""
    if target is None or share <= 0:
        return active
    return target if bucket(query) < share else active


@dataclass(frozen=True)
class Route:
    """Where a query goes: its corpus, the corpus's active key, and the key that serves it."""

    corpus_id: int
    active: str
    key: str


def route(db: Executor, corpus: str | None, query: str) -> Route:
    """The corpus `query` searches (PE002 if the caller's tenant has none of that name) and the
    key that serves it now."""
    corpus_id, active, target, share = db.rows(_ROUTE, [corpus], ["text"])[0]
    return Route(corpus_id, active, serving_key(query, active, target, share))


@dataclass(frozen=True)
class Options:
    """How a search ranks: `group` ('document': k distinct documents, each with its best chunk
    as the passage; 'chunk': the k best chunks), and for hybrid search its `fusion` ('rrf' or
    'relative'; None: the database's default) and `alpha` (relative fusion's weight of the
    vector ranking, 0..1; the keyword ranking's is 1 - alpha; None: 0.4)."""

    group: str | None = "document"
    fusion: str | None = None
    alpha: float | None = None

    def check(self, mode: str | None) -> None:
        """InvalidInput for a value the database would refuse too, before any embedding."""
        if mode not in MODES:
            raise InvalidInput(f"mode must be one of {', '.join(MODES)}, not {shown(mode)}")
        if self.group not in GROUPS:
            raise InvalidInput(f"group must be one of {', '.join(GROUPS)}, not {shown(self.group)}")
        if mode != "hybrid" and (self.fusion is not None or self.alpha is not None):
            raise InvalidInput(f"fusion and alpha apply to hybrid search, not to {mode} search")
        if self.fusion is not None and self.fusion not in FUSIONS:
            raise InvalidInput(f"fusion must be one of {', '.join(FUSIONS)}, not {shown(self.fusion)}")
        # The database's checks too (pyembed.search_hybrid), here before the query is embedded
        # and paid for: a refused search records no usage.
        if self.alpha is not None and self.fusion == "rrf":
            raise InvalidInput("alpha weighs relative fusion, not rrf: pass fusion='relative' "
                               "with alpha, or leave alpha out")
        if self.alpha is not None and not (isinstance(self.alpha, int | float)
                                           and 0 <= self.alpha <= 1):
            raise InvalidInput(f"alpha must be 0..1 (the vector search's weight), got "
                               f"{shown(self.alpha)}")


DEFAULT = Options()


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def filter_json(filter: object) -> str | None:
    """A metadata filter as the search functions take it (jsonb text): the database answers a
    filter that is not a JSON object with its own PE005, whatever the client handed in."""
    try:
        if filter is None:
            return None
        if isinstance(filter, str):  # JSON text already
            check_json(read_json(filter, "a metadata filter", parse_constant=_not_json),
                       "a metadata filter")
            return filter
        if not isinstance(filter, Mapping):  # (the database's answer comes after the embedding)
            raise TypeError(f"not {type(filter).__name__}")
        value = dict(filter)
        check_depth(value, "a metadata filter")
        # What jsonb cannot hold, named here for every caller, orm.search's SELECT among them.
        check_json(value, "a metadata filter")
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"a metadata filter is a JSON object: {exc}") from None


K_RANGE = (1, 1000)
"""How many hits a search returns, as pyembed's SQL search functions check it (sql/030-search.sql,
sql/060-keyword.sql)."""


def check_k(k: object) -> int:
    """`k` if it is in K_RANGE, else InvalidInput in the words of the SQL functions' check, for
    every entry point alike: a k past PostgreSQL's integer, which cannot reach that check, named
    Python's or PostgreSQL's integer range instead of k's."""
    return count(k, "k", K_RANGE)


def run(db: Executor, corpus: str | None, mode: str | None, text: str | None, vector: Any,
        model_key: str | None, k: int | None, filter: Mapping[str, Any] | str | None,
        options: Options = DEFAULT) -> list[tuple[Any, ...]]:
    """The rows of one guarded search (`vector` as db.vectors makes it)."""
    options.check(mode)
    assert mode is not None
    flt = filter_json(filter)
    sql, take = _SEARCHES[mode]
    params = (corpus, text, vector, model_key, None if k is None else check_k(k), flt,
              options.group, options.fusion, options.alpha)
    return db.rows(sql, [params[i] for i in take], [_TYPES[i] for i in take])


def search_text(db: Executor, corpus: str | None, query: str, k: int | None,
                filter: Mapping[str, Any] | str | None, mode: str | None,
                embed_query: Callable[[Route, str], np.ndarray], *,
                read: Executor | None = None, options: Options = DEFAULT
                ) -> tuple[list[tuple[Any, ...]], Route]:
    """Search by text: the query is embedded by `embed_query(route, query)` with the key that
    serves it (the corpus's model, or its migration target for a share of queries), so no
    mismatch is possible; (rows, the route taken). The route is read from `db`, the search
    runs on `read` (a replica) if given. A query routed to a target that a rollback retires
    meanwhile is routed again, once."""
    read = read or db
    options.check(mode)
    for attempt in (1, 2):
        where = route(db, corpus, query)
        if mode == "keyword":
            return run(read, corpus, mode, query, None, None, k, filter, options), where
        vector = read.vectors([embed_query(where, query)])[0]
        try:
            return run(read, corpus, mode, query, vector, where.key, k, filter, options), where
        except ModelMismatch:
            if attempt == 2 or where.key == where.active:
                raise
    raise AssertionError("unreachable")


def search(conn: psycopg.Connection[Any], corpus: str, query: np.ndarray | Sequence[float] | None,
           model_key: str | None, k: int = 10, filter: Mapping[str, Any] | None = None, *,
           mode: str = "vector", text: str | None = None, group: str = "document",
           fusion: str | None = None, alpha: float | None = None) -> list[Hit]:
    """Guarded search with a vector you made: 'vector' (the database refuses a query vector
    made by another model, PE001), 'keyword' (BM25 on `text`) or 'hybrid' (both, fused by
    `fusion`, see Options). By default the hits are k distinct documents (group='document'),
    each with its best chunk; group='chunk' returns the k best chunks."""
    options = Options(group, fusion, alpha)
    options.check(mode)
    vec = None
    if mode != "keyword":
        model_key = vector_key(model_key)
        vec = query_vector(query)
    if mode != "vector" and not (text and text.strip()):
        raise InvalidInput(f"{mode} search needs the query text")
    db = executor(conn)
    rows = run(db, corpus, mode, text, None if vec is None else db.vectors([vec])[0],
               model_key, k, filter, options)
    return as_hits(rows)


def as_hits(rows: Sequence[Sequence[Any]]) -> list[Hit]:
    return [Hit(*r) for r in rows]
