"""Model choice on your own data: candidates side by side on a sample of the corpus and its
evaluation queries (exact search, so the index does not blur the comparison)."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

from .client import Client, in_client_turn
from .corpora import model_spec
from .dbcall import count
from .errors import InvalidInput
from .evaluation import KeyScore, Ranker, eval_queries, evaluate
from .migration import storage_bytes
from .models import InputType
from .text import estimate_tokens


@dataclass(frozen=True)
class Candidate(KeyScore):
    """A candidate key's score on the sample, with its throughput and its storage and cost on
    the whole corpus."""

    texts_per_second: float
    storage_bytes: int
    cost_usd: float | None


def _exact(doc_ids: Sequence[str], docs: npt.NDArray[np.float32]) -> Ranker:
    """Exact search over the sample: chunks by inner product with the query, best first."""
    def rank(queries: npt.NDArray[np.float32], hits: int) -> list[list[str]]:
        return [[doc_ids[i] for i in np.argsort(-s, kind="stable")[:hits]]
                for s in queries @ docs.T]

    return rank


@in_client_turn
def compare(client: Client, corpus: str, model_keys: Sequence[str], *, sample: int = 2000,
            k: int = 10, seed: int = 0) -> tuple[int, int, list[Candidate]]:
    """(sampled chunks, evaluation queries, one row per candidate). The sample holds every
    chunk of the documents the evaluation queries name, then random others up to `sample`."""
    if not model_keys:
        raise InvalidInput("name at least one model key to compare")
    if count(sample, "sample") < 0:  # no upper bound: a sample past the corpus takes it all
        raise InvalidInput(f"sample is a number of chunks, at least 0, got {sample}")
    info = client.corpus(corpus).info
    specs = {key: model_spec(client._conn, key) for key in model_keys}  # UnknownModel first
    evals = eval_queries(client._conn, info.corpus_id)
    if not evals:
        raise InvalidInput(f"corpus {corpus} has no evaluation queries: `pyembed eval add` first")
    relevant = sorted({d for e in evals for d in e.relevant})
    rows = client._conn.execute(
        "SELECT document_id, content FROM pyembed.chunks WHERE corpus_id = %s "
        "AND document_id = ANY(%s)", (info.corpus_id, relevant)).fetchall()
    others = client._conn.execute(
        "SELECT document_id, content FROM pyembed.chunks WHERE corpus_id = %s "
        "AND NOT document_id = ANY(%s) ORDER BY chunk_id", (info.corpus_id, relevant)).fetchall()
    random.Random(seed).shuffle(others)
    rows += others[:max(sample - len(rows), 0)]
    total = client._conn.execute("SELECT count(*), coalesce(sum(length(content)), 0) FROM "
                                "pyembed.chunks WHERE corpus_id = %s",
                                (info.corpus_id,)).fetchone()
    assert total is not None
    n_chunks = int(total[0])
    tokens_per_chunk = float(np.mean([estimate_tokens(c) for _, c in rows])) if rows else 0.0
    doc_ids = [d for d, _ in rows]
    out = []
    for key in model_keys:
        spec = specs[key]
        embedder = client.embedder(key, truncate=True)
        with client.billed_to(info.corpus_id):  # its sample's and queries' embeddings
            started = time.perf_counter()
            docs = embedder.embed([c for _, c in rows], InputType.DOCUMENT)
            embed_s = time.perf_counter() - started
            score, _ = evaluate(embedder, evals, _exact(doc_ids, docs), k)
        cost = (n_chunks * tokens_per_chunk / 1e6 * spec.price_per_mtok
                if spec.price_per_mtok is not None else None)
        out.append(Candidate(**asdict(score),
                             texts_per_second=len(rows) / embed_s if embed_s else 0.0,
                             storage_bytes=storage_bytes(n_chunks, spec.dimensions)[1],
                             cost_usd=cost))
    return len(rows), len(evals), out
