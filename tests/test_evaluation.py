"""Retrieval metrics: properties of Recall@k and nDCG@k, top-k overlap, and the scoring of one
key (no database: a stub embedder and ranker)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyembed.embedder import Embedder
from pyembed.evaluation import HITS_PER_DOCUMENT, EvalQuery, evaluate, metrics, overlap, top_k
from pyembed.models import InputType

IDS = st.text(alphabet="abcdefghij", min_size=1, max_size=2)
KS = st.integers(1, 20)


@st.composite
def split(draw: st.DrawFn) -> tuple[list[str], list[str], int]:
    """(k distinct ids, other ids none of which is among them, k)."""
    k = draw(KS)
    ids = draw(st.lists(IDS, min_size=k, max_size=k + 20, unique=True))
    return ids[:k], ids[k:], k


@settings(max_examples=300, deadline=None)
@given(ranked=st.lists(IDS, max_size=40), relevant=st.sets(IDS, min_size=1, max_size=15), k=KS)
def test_metrics_lie_in_the_unit_interval(ranked: list[str], relevant: set[str], k: int) -> None:
    recall, ndcg = metrics(ranked, relevant, k)
    assert 0.0 <= recall <= 1.0
    assert 0.0 <= ndcg <= 1.0


@settings(max_examples=300, deadline=None)
@given(parts=split(), extra=st.lists(IDS, max_size=10), data=st.data())
def test_every_relevant_item_ranked_first_scores_one(
        parts: tuple[list[str], list[str], int], extra: list[str], data: st.DataObject) -> None:
    top, rest, k = parts
    relevant = top[:data.draw(st.integers(1, k))]
    recall, ndcg = metrics(relevant + [d for d in top if d not in relevant] + rest + extra,
                           set(relevant), k)
    assert recall == 1.0
    assert ndcg == pytest.approx(1.0)


@settings(max_examples=200, deadline=None)
@given(parts=split())
def test_more_relevant_items_than_k_ranked_first(parts: tuple[list[str], list[str], int]) -> None:
    top, rest, k = parts
    relevant = set(top + rest)
    recall, ndcg = metrics(top + rest, relevant, k)
    assert ndcg == pytest.approx(1.0)
    assert recall == pytest.approx(k / len(relevant))


@settings(max_examples=300, deadline=None)
@given(parts=split(), data=st.data())
def test_nothing_relevant_in_the_top_k_scores_zero(
        parts: tuple[list[str], list[str], int], data: st.DataObject) -> None:
    top, rest, k = parts
    # Relevant items may follow the top k, or not be ranked at all.
    relevant = set(data.draw(st.lists(st.sampled_from(rest), max_size=5))) if rest else set()
    relevant |= data.draw(st.sets(st.text(alphabet="xyz", min_size=1, max_size=2), min_size=1))
    ranked = top + data.draw(st.lists(st.sampled_from(top), max_size=5)) + rest
    assert metrics(ranked, relevant, k) == (0.0, 0.0)


@settings(max_examples=300, deadline=None)
@given(parts=split(), tails=st.tuples(st.lists(IDS, max_size=15), st.lists(IDS, max_size=15)),
       relevant=st.sets(IDS, min_size=1, max_size=15))
def test_items_after_the_top_k_do_not_count(
        parts: tuple[list[str], list[str], int], tails: tuple[list[str], list[str]],
        relevant: set[str]) -> None:
    top, _, k = parts
    assert metrics(top + tails[0], relevant, k) == metrics(top + tails[1], relevant, k)
    assert metrics(top, relevant, k) == metrics(top + tails[0], relevant, k)


def test_a_document_ranked_again_counts_once() -> None:
    assert top_k(["a", "b", "a", "c"], 2) == ["a", "b"]
    assert metrics(["a", "a", "a", "b"], {"a", "b"}, k=2) == (1.0, 1.0)


def test_overlap_of_top_k() -> None:
    assert overlap([["a", "b"], ["c", "d"]], [["b", "a"], ["e", "f"]], k=2) == 0.5
    with pytest.raises(ValueError):
        overlap([["a"]], [], k=1)


@dataclass
class _Spec:
    key: str


class _StubEmbedder:
    """Embeds query i as the vector [i]."""

    spec = _Spec("fake/stub@1:1")

    def embed(self, texts: Sequence[str], input_type: InputType) -> npt.NDArray[np.float32]:
        assert input_type is InputType.QUERY
        return np.arange(len(texts), dtype=np.float32).reshape(-1, 1)


def test_evaluate_scores_each_query_on_its_ranking() -> None:
    evals = [EvalQuery("first", frozenset({"a"})), EvalQuery("second", frozenset({"z"}))]
    asked: list[Any] = []

    def rank(vectors: npt.NDArray[np.float32], hits: int) -> list[list[str]]:
        asked.append((vectors[:, 0].tolist(), hits))
        return [["a", "b"], ["b", "c"]]

    score, rankings = evaluate(cast(Embedder, _StubEmbedder()), evals, rank, k=5)
    assert asked == [([0.0, 1.0], 5 * HITS_PER_DOCUMENT)]
    assert rankings == [["a", "b"], ["b", "c"]]
    assert (score.model_key, score.recall, score.ndcg) == ("fake/stub@1:1", 0.5, 0.5)
    assert score.ms_per_query >= 0
