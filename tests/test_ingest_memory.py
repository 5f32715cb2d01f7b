"""A long document is added in about the memory of its vectors, not of its chunks:
`Corpus.prepare` keeps where each chunk lies in the document's text (two numbers) and the
vectors as the blocks the embedder made them in, and `Corpus.write` slices the chunks again
for its one statement. Before, a document's chunks were built whole, each in a row object
with its vector, and the vectors were copied whole several times on the way."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import pytest

import pyembed.client
from pyembed.corpora import Spans

KEY = "fake/fake-hash@1:384"  # in this process: what is measured is pyembed's own memory
_T = TypeVar("_T")


def _text(words: int) -> str:
    return " ".join(f"w{i % 9973}x" for i in range(words)) + "\n\n"  # 7 characters a word


def _peak(call: Callable[[], _T]) -> tuple[_T, int]:
    tracemalloc.start()
    try:
        result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_long_document_is_added_in_about_its_vectors_memory(
        client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a document twice as long adds to the peak of `Corpus.add` is what its added
    vectors take, and its added text about once (sent to the write's one statement as UTF-8);
    the fixed part, a group's texts and vectors on their way (smaller groups here, so that
    the vectors are most of the peak), cancels out."""
    monkeypatch.setattr(pyembed.client, "EMBED_CHUNKS", 128, raising=False)
    docs = client.create_corpus("long", KEY)
    sizes = []
    for n, words in enumerate((100_000, 200_000)):
        text = _text(words)
        report, peak = _peak(lambda: docs.add([(f"long{n}", text)]))  # noqa: B023
        assert report.added == 1
        sizes.append((report.chunks, len(text), peak))
    (chunks1, text1, peak1), (chunks2, text2, peak2) = sizes
    vectors = (chunks2 - chunks1) * 384 * 4
    assert chunks1 > 1024 and chunks2 > 2 * chunks1 - 10
    print(f"{sizes=} growth {peak2 - peak1:,} B, vectors {vectors:,} B")
    assert peak2 - peak1 < 1.2 * vectors + 2.6 * (text2 - text1), (peak2 - peak1, vectors)


def test_a_prepared_document_holds_its_vectors_and_where_its_chunks_are(client: Any) -> None:
    docs = client.create_corpus("long", KEY)
    text = _text(100_000)
    prepared = docs.prepare([("long", text)])
    [document] = prepared.documents
    assert isinstance(document.chunks, Spans)  # two numbers a chunk, not its text
    assert len(document.chunks) == prepared.chunks > 1000
    assert sum(len(v) for v in prepared.vectors) == prepared.chunks
    assert all(v.dtype == np.float32 and v.shape[1] == 384 for v in prepared.vectors)
    assert docs.write(prepared).chunks == prepared.chunks
