"""BM25 (k1 1.2, b 0.75) of packed postings, scored in bulk: what pyembed._bm25_top runs.

pyembed.posting_blocks packs a term's postings in blocks of 512 chunk ids (or doc_no), 10 bytes a
posting (the id's place in its block int2, tf int4, doc_len int4, big-endian);
pyembed._bm25 hands over the blocks of a query's terms in one byte string.
Each posting's part is computed as the SQL statement it replaces computed it, in float8 and in
the same order of operations, and a chunk's parts are added rarest term first (the order of
`idfs`), so the scores are the same to the last bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import numpy as np
import numpy.typing as npt

POSTING = np.dtype([("offset", ">i2"), ("tf", ">i4"), ("doc_len", ">i4")])
BLOCK_BITS = 9  # a block holds the chunk ids block << 9 .. (block << 9) + 511
# Above this many chunk ids a posting (their range / the postings), chunks are numbered by
# sorting their ids instead of given a slot each for every id of the range.
SPARSE = 16


def pack(postings: Sequence[tuple[int, int, int]]) -> bytes:
    """(chunk id, tf, doc_len) triples of one block in the packed form."""
    return np.array([(c & ((1 << BLOCK_BITS) - 1), tf, dl) for c, tf, dl in postings],
                    dtype=POSTING).tobytes()


def top(packed: bytes, blocks: Sequence[int], terms: Sequence[int], sizes: Sequence[int],
        idfs: Sequence[float], avgdl: float, n: int) -> tuple[list[int], list[float]]:
    """The n best chunks of the packed postings, best first (ties: smaller chunk id first):
    (chunk ids, BM25 scores). `blocks`, `terms` and `sizes` give each block's number, term
    (1-based place in `idfs`) and length in bytes, in the order the blocks were packed."""
    postings = np.frombuffer(packed, dtype=POSTING)
    if not len(postings) or n < 1:
        return [], []
    term = np.asarray(terms, dtype=np.int64) - 1
    count = np.asarray(sizes, dtype=np.int64) // POSTING.itemsize
    tf = postings["tf"].astype(np.float64)
    doc_len = postings["doc_len"].astype(np.float64)
    idf = np.repeat(np.asarray(idfs, dtype=np.float64)[term], count)
    # r.idf * p.tf * 2.2 / (p.tf + 1.2 * (0.25 + 0.75::float8 * p.doc_len / avgdl)) in SQL
    part = idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * doc_len / avgdl))
    chunk_ids = (np.repeat(np.asarray(blocks, dtype=np.int64) << BLOCK_BITS, count)
                 + postings["offset"])
    # Each term's postings: the blocks of that term (one run of them, as the index gives them).
    end = np.cumsum(count)
    start = end - count
    runs: list[slice | npt.NDArray[np.int64]] = []
    for t in range(len(idfs)):  # rarest first: the order the parts are added in
        mine = np.flatnonzero(term == t)
        if len(mine) == 0:
            continue
        if mine[-1] - mine[0] + 1 == len(mine):
            runs.append(slice(int(start[mine[0]]), int(end[mine[-1]])))
        else:
            runs.append(np.concatenate([np.arange(start[b], end[b]) for b in mine]))
    lo, hi = int(chunk_ids.min()), int(chunk_ids.max())
    if hi - lo < SPARSE * len(chunk_ids) + 65536:
        score = np.zeros(hi - lo + 1)
        for run in runs:  # a chunk has one posting a term: no index twice in one run
            score[chunk_ids[run] - lo] += part[run]
        return _best(score, lo, n)
    ids, at = np.unique(chunk_ids, return_inverse=True)
    score = np.zeros(len(ids))
    for run in runs:
        score[at[run]] += part[run]
    top_ids, top_scores = _best(score, 0, n)
    return ids[top_ids].tolist(), top_scores


def problem(packed: bytes, blocks: Sequence[int | None], terms: Sequence[int | None],
            sizes: Sequence[int | None], idfs: Sequence[float | None], avgdl: float,
            n: int) -> str | None:
    """What makes postings unlike those pyembed._bm25 packs (a DBA's direct call of
    pyembed._bm25_top), said as its PE005; None for postings top() can rank. Built-ins on the
    lists as given: cheaper than arrays for a query's few blocks, on every keyword search."""
    if not len(blocks) == len(terms) == len(sizes):
        return (f"blocks, terms and sizes must have one element each: got {len(blocks)}, "
                f"{len(terms)} and {len(sizes)}")
    if None in blocks or None in terms or None in sizes or None in idfs:
        return "blocks, terms, sizes and idfs must have no NULL element"
    whole, size = cast(Sequence[int], sizes), POSTING.itemsize
    if whole and (min(whole) < 0 or any(s % size for s in whole)):
        return f"each of sizes must be a whole number of {size}-byte postings"
    if sum(whole) != len(packed):
        return f"sizes must add up to the {len(packed)} bytes of packed, not {sum(whole)}"
    places, ids = cast(Sequence[int], terms), cast(Sequence[int], blocks)
    if places and (min(places) < 1 or max(places) > len(idfs)):
        return f"each of terms must be 1..{len(idfs)}, a place in idfs"
    if ids and (min(ids) < -(1 << 53) or max(ids) >= 1 << 53):
        return "each of blocks must be within -2^53..2^53 (a chunk id's block)"
    if not (all(map(math.isfinite, cast(Sequence[float], idfs))) and math.isfinite(avgdl)
            and avgdl > 0):
        return "idfs must be finite and avgdl a finite number above 0"
    if n < 0:
        return f"n must be at least 0, got {n}"
    return None


def top_for_sql(packed: bytes, blocks: Sequence[int], terms: Sequence[int],
                sizes: Sequence[int], idfs: Sequence[float], avgdl: float, n: int
                ) -> tuple[list[int], list[str]]:
    """top()'s ranking as pyembed._bm25_top returns it: each score as its exact hexadecimal
    form (float.hex). PL/Python hands a float to PostgreSQL as text, which float8in reads with
    strtod (C99: hexadecimal floats too, to the last bit); the hexadecimal form is written and
    read without the search for a shortest decimal that repr makes. ValueError (`problem`) for
    postings unlike pyembed._bm25's."""
    said = problem(packed, blocks, terms, sizes, idfs, avgdl, n)
    if said is not None:
        raise ValueError(said)
    ids, scores = top(packed, blocks, terms, sizes, idfs, avgdl, n)
    return ids, list(map(float.hex, scores))


def _best(score: npt.NDArray[np.float64], lo: int, n: int) -> tuple[list[int], list[float]]:
    """The n best of `score` (index + lo: the chunk id; 0: no posting), best first, ties by
    chunk id."""
    k = min(n, int(np.count_nonzero(score)))
    if k == 0:
        return [], []
    cut = np.partition(score, len(score) - k)[len(score) - k]  # the k-th best score
    keep = np.flatnonzero(score >= cut)  # and every chunk that reaches it (ties)
    best = keep[np.lexsort((keep, -score[keep]))[:k]]
    return (best + lo).tolist(), score[best].tolist()
