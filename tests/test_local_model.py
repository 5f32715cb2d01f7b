"""The local MiniLM model: it loads without a network, embeds sensibly, and a text's
vector does not depend on what it is batched with."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from pyembed.embedder import Embedder
from pyembed.errors import ConfigError, InvalidInput
from pyembed.models import LOCAL_DEFAULT, InputType, ModelSpec
from pyembed.providers import provider_for
from pyembed.providers.local import LocalProvider, shared_model


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(LOCAL_DEFAULT)


def test_embeds_unit_vectors(embedder: Embedder) -> None:
    vectors = embedder.embed(["hello world", "a second, longer sentence to embed"])
    assert vectors.dtype == np.float32 and vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert isinstance(embedder.provider, LocalProvider)


def test_similar_meaning_is_closer(embedder: Embedder) -> None:
    cat, kitten, tax = embedder.embed(
        ["the cat sat on the mat", "a kitten on a rug", "quarterly tax filing deadline"])
    assert cat @ kitten > 0.4
    assert cat @ kitten > cat @ tax + 0.3


def test_padding_does_not_change_a_vector(embedder: Embedder) -> None:
    short = "the cat sat on the mat"
    long = " ".join(["a much longer text about many unrelated things"] * 20)
    alone = embedder.provider.embed_batch([short], InputType.DOCUMENT)
    batched = embedder.provider.embed_batch([long, short], InputType.DOCUMENT)
    assert float(np.asarray(alone)[0] @ np.asarray(batched)[1]) > 0.999


def test_query_and_document_vectors_are_the_same(embedder: Embedder) -> None:
    document = embedder.embed(["where do cats sleep"])[0]
    np.testing.assert_array_equal(embedder.embed_query("where do cats sleep"), document)


def test_long_texts_are_counted_exactly_and_need_truncate() -> None:
    text = "word " * 300  # 300 tokens plus [CLS] and [SEP]
    with pytest.raises(InvalidInput, match="text 0 is 302 tokens, over the 256-token limit"):
        Embedder(LOCAL_DEFAULT).embed([text])
    assert Embedder(LOCAL_DEFAULT).embed(["word " * 254]).shape == (1, 384)

    truncated = Embedder(LOCAL_DEFAULT, truncate=True).embed([text])[0]
    np.testing.assert_allclose(truncated, Embedder(LOCAL_DEFAULT).embed(["word " * 254])[0],
                               atol=1e-6)


def test_model_is_loaded_once_and_shared_between_threads() -> None:
    texts = [f"sentence number {i} about cats" for i in range(8)]
    expected = shared_model().embed(texts)
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = np.asarray(provider_for(LOCAL_DEFAULT).embed_batch(texts,
                                                                        InputType.DOCUMENT))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert shared_model() is shared_model()
    for vectors in results.values():
        np.testing.assert_allclose(vectors, expected, atol=1e-6)


def test_only_minilm_runs_locally() -> None:
    with pytest.raises(ConfigError, match="runs only all-minilm-l6-v2-int8"):
        LocalProvider(ModelSpec("local", "other-model", "1", 384))
