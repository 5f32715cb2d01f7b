"""pyembed.bm25 (what pyembed._bm25_top runs) against BM25 added up posting by posting."""

from __future__ import annotations

import random

import pytest

from pyembed import bm25


def _blocks(postings: dict[int, list[tuple[int, int, int]]], rng: random.Random
            ) -> tuple[bytes, list[int], list[int], list[int]]:
    """Each term's postings in blocks of 512 chunk ids, terms in a shuffled order (as an index
    on lexemes gives them)."""
    packed, blocks, terms, sizes = b"", [], [], []
    order = list(postings)
    rng.shuffle(order)
    for t in order:
        by_block: dict[int, list[tuple[int, int, int]]] = {}
        for p in sorted(postings[t]):
            by_block.setdefault(p[0] >> 9, []).append(p)
        for block in sorted(by_block):
            data = bm25.pack(by_block[block])
            packed += data
            blocks.append(block)
            terms.append(t + 1)
            sizes.append(len(data))
    return packed, blocks, terms, sizes


@pytest.mark.parametrize("seed", range(8))
def test_top_adds_each_chunks_parts_rarest_term_first(seed: int) -> None:
    rng = random.Random(seed)
    spread = 3000 if seed % 2 else 10**9  # dense ids, or ids far apart (numbered by sorting)
    chunks = {rng.randrange(1, spread): rng.randint(1, 300) for _ in range(600)}
    idfs = sorted((rng.uniform(0.05, 8) for _ in range(5)), reverse=True)
    postings: dict[int, list[tuple[int, int, int]]] = {}
    for t in range(len(idfs)):
        for c in rng.sample(sorted(chunks), rng.randint(1, len(chunks))):
            postings.setdefault(t, []).append((c, rng.randint(1, 256), chunks[c]))
    avgdl = sum(chunks.values()) / len(chunks)
    expected: dict[int, float] = {}
    for t, idf in enumerate(idfs):
        for c, tf, dl in postings.get(t, []):
            part = idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * dl / avgdl))
            expected[c] = expected[c] + part if c in expected else part
    ranked = sorted(expected.items(), key=lambda kv: (-kv[1], kv[0]))
    packed, blocks, terms, sizes = _blocks(postings, rng)
    for n in (1, 7, 1000):
        ids, scores = bm25.top(packed, blocks, terms, sizes, idfs, avgdl, n)
        assert ids == [c for c, _ in ranked[:n]]
        assert scores == [s for _, s in ranked[:n]]  # the same floats, to the last bit


def test_ties_go_to_the_smaller_chunk_id_and_nothing_scores_nothing() -> None:
    packed = bm25.pack([(9, 1, 5), (3, 1, 5), (7, 2, 5)])  # 3 and 9 tie, below 7
    ids, scores = bm25.top(packed, [2], [1], [len(packed)], [1.0], 5.0, 2)
    assert ids == [1024 + 7, 1024 + 3] and scores[0] > scores[1]
    assert bm25.top(packed, [2], [1], [len(packed)], [1.0], 5.0, 3)[0] == [1031, 1027, 1033]
    assert bm25.top(b"", [], [], [], [1.0], 5.0, 3) == ([], [])
