"""Retrieval quality on a corpus's own evaluation queries: storing and reading them, the
metrics (Recall@k, nDCG@k, top-k overlap) and the scoring of one model key, shared by the
migration gate (`migration.validate`) and model choice (`compare`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .client import Client, in_client_turn
from .dbcall import translated
from .errors import InvalidInput, shown
from .models import InputType
from .text import check_storable, check_text, read_json, text_list

if TYPE_CHECKING:
    import psycopg

    from .embedder import Embedder
    from .ingest import FileProblem

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
    relevant = _relevant(relevant)
    _store(client, client.corpus(corpus).info.corpus_id, query_id, query, relevant)


def _relevant(relevant: Any) -> list[str]:
    """The relevant document ids as a list (a str is a Sequence of its characters)."""
    if isinstance(relevant, str):
        raise InvalidInput("relevant is a list of document ids, not one string")
    return text_list(relevant, "relevant")


def _store(client: Client, corpus_id: int, query_id: str, query: str,
           relevant: list[str]) -> None:
    """add_eval_query's checks and write, for a corpus already looked up."""
    # Texts the driver can send; what they may hold (empty, unknown ids) is the table's
    # trigger's to say, in its words.
    for value, what in ((query_id, "query_id"), (query, "query"),
                        *((d, "a relevant document id") for d in relevant)):
        if not isinstance(value, str):
            raise InvalidInput(f"{what} must be a string, not {shown(value)}")
        check_storable(value, what)
    with translated():
        client._conn.execute(
            """INSERT INTO pyembed.eval_queries (corpus_id, query_id, query, relevant)
               VALUES (%s, %s, %s, %s) ON CONFLICT (corpus_id, query_id) DO UPDATE
               SET query = EXCLUDED.query, relevant = EXCLUDED.relevant""",
            (corpus_id, query_id, query, list(relevant)))


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


def import_eval_queries(client: Client, corpus: str, queries: Path,
                        qrels: Path | None = None) -> tuple[int, list[FileProblem]]:
    """Store the evaluation queries of a JSON Lines file, each through add_eval_query (a
    query stored under the same id is replaced): (how many were stored, the problems of the
    lines that were not, with their line numbers). Without `qrels`, a line is
    {"id", "query", "relevant": [document ids]}; with `qrels`, a BEIR layout: the lines are
    {"_id" (or "id"), "text" (or "query")} and the relevant documents are the TSV's rows
    (query-id, corpus-id, score; a header row and scores of 0 skipped), and a query the TSV
    judges no document relevant for is not of its split: passed over, not a problem. Without
    `qrels`, a query with no relevant document is a problem, as an id that names no document
    of the corpus is."""
    from .ingest import FileProblem

    corpus_id = client.corpus(corpus).info.corpus_id  # UnknownCorpus before any line
    problems: list[FileProblem] = []
    judged: dict[str, list[str]] | None = None
    if qrels is not None:
        judged = {}
        for number, row in enumerate(_lines(qrels, problems), start=1):
            cells = row.split("\t")
            if len(cells) < 3 or not cells[2].strip().lstrip("-").isdigit():
                if number > 1:  # (the first may be the header row)
                    problems.append(FileProblem(qrels, number, "expected query-id, corpus-id "
                                                               "and a whole-number score"))
                continue
            if int(cells[2]) > 0:
                judged.setdefault(cells[0], []).append(cells[1])
    stored = 0
    for number, line in enumerate(_lines(queries, problems), start=1):
        if not line.strip():
            continue
        try:
            obj = read_json(line, "the line")
            if not isinstance(obj, dict):
                raise InvalidInput(f"expected a JSON object, got {type(obj).__name__}")
            query_id = obj.get("id", obj.get("_id"))
            text = obj.get("query", obj.get("text"))
            if not isinstance(query_id, str) or not isinstance(text, str):
                raise InvalidInput("expected string fields id (or _id) and query (or text)")
            if judged is not None and query_id not in judged:
                continue  # (BEIR's queries.jsonl holds every split's queries)
            relevant = judged[query_id] if judged is not None else obj.get("relevant")
            if not relevant:
                raise InvalidInput(f"query {query_id!r} has no relevant document")
            _store(client, corpus_id, query_id, text, _relevant(relevant))
        except (ValueError, InvalidInput) as exc:  # (json's errors are ValueErrors)
            problems.append(FileProblem(queries, number, str(exc)))
            continue
        stored += 1
    return stored, problems


def _lines(path: Path, problems: list[FileProblem]) -> Iterator[str]:
    """The UTF-8 lines of `path` (a BOM is fine), or none and a problem if it cannot be
    read."""
    from .ingest import FileProblem

    try:
        with path.open(encoding="utf-8-sig") as f:
            yield from (line.rstrip("\r\n") for line in f)
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        problems.append(FileProblem(path, None, f"cannot read: {why}"))
