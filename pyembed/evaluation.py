"""Retrieval quality on a corpus's own evaluation queries: storing and reading them, the
metrics (Recall@k, nDCG@k, top-k overlap) and the scoring of one model key, shared by the
migration gate (`migration.validate`) and model choice (`compare`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .client import Client, in_client_turn
from .dbcall import translated
from .errors import InvalidInput, shown
from .models import InputType
from .text import check_storable, check_text, text_list

if TYPE_CHECKING:
    import psycopg

    from .embedder import Embedder

HITS_PER_DOCUMENT = 3
"""Chunk hits fetched per document a ranking should hold: a document can match with several
chunks, so k * 3 hits leave k distinct documents in all but odd cases."""

Ranker = Callable[[npt.NDArray[np.float32], int], list[list[str]]]
"""(query vectors, hits to fetch) -> for each query, document ids best first."""


@dataclass(frozen=True)
class EvalQuery:
    """An evaluation query and the ids of the documents that answer it."""

    query: str
    relevant: frozenset[str]


@dataclass(frozen=True)
class KeyScore:
    """How one model key retrieves on a set of evaluation queries: mean Recall@k and nDCG@k,
    and the milliseconds per query to embed it and rank."""

    model_key: str
    recall: float
    ndcg: float
    ms_per_query: float


@in_client_turn
def add_eval_query(client: Client, corpus: str, query_id: str, query: str,
                   relevant: Sequence[str]) -> None:
    """Store an evaluation query with the ids of the documents that answer it (replacing the
    one stored under the same id). InvalidInput, from the table's trigger, for an empty query,
    no relevant id, or an id that names no document of the corpus."""
    if isinstance(relevant, str):  # a str is a Sequence of its characters
        raise InvalidInput("relevant is a list of document ids, not one string")
    relevant = text_list(relevant, "relevant")
    # Texts the driver can send; what they may hold (empty, unknown ids) is the table's
    # trigger's to say, in its words.
    for value, what in ((query_id, "query_id"), (query, "query"),
                        *((d, "a relevant document id") for d in relevant)):
        if not isinstance(value, str):
            raise InvalidInput(f"{what} must be a string, not {shown(value)}")
        check_storable(value, what)
    info = client.corpus(corpus).info
    with translated():
        client._conn.execute(
            """INSERT INTO pyembed.eval_queries (corpus_id, query_id, query, relevant)
               VALUES (%s, %s, %s, %s) ON CONFLICT (corpus_id, query_id) DO UPDATE
               SET query = EXCLUDED.query, relevant = EXCLUDED.relevant""",
            (info.corpus_id, query_id, query, list(relevant)))


@dataclass(frozen=True)
class StoredEvalQuery:
    """An evaluation query as stored: its id, its text and the ids of the documents that
    answer it."""

    query_id: str
    query: str
    relevant: list[str]


@in_client_turn
def stored_eval_queries(client: Client, corpus: str) -> list[StoredEvalQuery]:
    """The corpus's evaluation queries, in query id order (UnknownCorpus as every call by
    name)."""
    info = client.corpus(corpus).info
    with translated():
        rows = client._conn.execute(
            "SELECT query_id, query, relevant FROM pyembed.eval_queries WHERE corpus_id = %s "
            "ORDER BY query_id", (info.corpus_id,)).fetchall()
    return [StoredEvalQuery(i, q, list(rel)) for i, q, rel in rows]


@in_client_turn
def remove_eval_queries(client: Client, corpus: str, query_ids: Sequence[str]) -> int:
    """Delete these evaluation queries of the corpus (pyembed.delete_eval_queries, the
    application role's one way: it holds no DELETE); returns how many (an id it has no query
    of is skipped)."""
    ids = [check_text(q, "a query id") for q in text_list(query_ids, "query_ids")]
    with translated():
        row = client._conn.execute("SELECT pyembed.delete_eval_queries(%s, %s::text[])",
                                   (corpus, ids)).fetchone()
    return int(row[0]) if row else 0


def eval_queries(conn: psycopg.Connection[Any], corpus_id: int) -> list[EvalQuery]:
    """A corpus's evaluation queries, in query id order (empty when it has none)."""
    rows = conn.execute("SELECT query, relevant FROM pyembed.eval_queries WHERE corpus_id = %s "
                        "ORDER BY query_id", (corpus_id,))
    return [EvalQuery(q, frozenset(rel)) for q, rel in rows]


def top_k(ranked: Sequence[str], k: int) -> list[str]:
    """The first `k` distinct ids of a ranking (a document ranked again counts once)."""
    return list(dict.fromkeys(ranked))[:k]


def metrics(ranked: Sequence[str], relevant: set[str] | frozenset[str],
            k: int = 10) -> tuple[float, float]:
    """Recall@k and nDCG@k (binary relevance) of a document ranking; `relevant` is not empty."""
    top = top_k(ranked, k)
    dcg = sum(1 / math.log2(i + 2) for i, d in enumerate(top) if d in relevant)
    idcg = sum(1 / math.log2(i + 2) for i in range(min(len(relevant), k)))
    return sum(1 for d in top if d in relevant) / len(relevant), dcg / idcg if idcg else 0.0


def overlap(a: Sequence[Sequence[str]], b: Sequence[Sequence[str]], k: int = 10) -> float:
    """Mean share of the top-k documents that two rankings of each query have in common."""
    return float(np.mean([len(set(top_k(x, k)) & set(top_k(y, k))) / k
                          for x, y in zip(a, b, strict=True)]))


def evaluate(embedder: Embedder, evals: Sequence[EvalQuery], rank: Ranker,
             k: int = 10) -> tuple[KeyScore, list[list[str]]]:
    """Score the embedder's model key on `evals` (not empty): each query is embedded and
    ranked by `rank`, asked for k * HITS_PER_DOCUMENT hits; (the score, the rankings)."""
    started = time.perf_counter()
    vectors = embedder.embed([e.query for e in evals], InputType.QUERY)
    rankings = rank(vectors, k * HITS_PER_DOCUMENT)
    seconds = time.perf_counter() - started
    scores = [metrics(r, e.relevant, k) for r, e in zip(rankings, evals, strict=True)]
    return KeyScore(embedder.spec.key, float(np.mean([s[0] for s in scores])),
                    float(np.mean([s[1] for s in scores])),
                    1000 * seconds / len(evals)), rankings
