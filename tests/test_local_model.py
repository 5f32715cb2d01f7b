"""The local MiniLM model: it loads without a network, embeds sensibly, and a text's
vector does not depend on what it is batched with."""

from __future__ import annotations

import importlib.resources
import os
import sys
import threading
import types
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer

from pyembed.chunking import fit_chunks
from pyembed.embedder import Embedder
from pyembed.errors import ConfigError, InvalidInput
from pyembed.models import LOCAL_DEFAULT, InputType, ModelSpec
from pyembed.providers import provider_for
from pyembed.providers.base import LOCAL_THREADS_ENV, local_threads
from pyembed.providers.local import (
    LocalProvider,
    MiniLM,
    length_batches,
    session_options,
    shared_model,
    truncated,
)
from pyembed.text import estimate_tokens


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


# -- bounded memory: sub-batches by tokens, sorted by length ------------------------------------

def _mixed_texts() -> list[str]:
    """24 texts from 3 to about 70 tokens, lengths in no order."""
    words = "cats sleep in the sun while the database vacuums its tables at night".split()
    return [" ".join(words[j % len(words)] for j in range((i * 37) % 60 + 3))
            + f" (text {i})" for i in range(24)]


@pytest.fixture
def small_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs of at most 256 padded tokens, so that short texts make several."""
    monkeypatch.setattr("pyembed.providers.local.BATCH_TOKENS", 256)


def test_length_batches_cover_every_text_once_within_the_budget() -> None:
    lengths = [(i * 37) % 240 + 5 for i in range(100)] + [300]
    groups = length_batches(lengths, 1024)

    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        assert [lengths[i] for i in group] == sorted(lengths[i] for i in group)
        assert len(group) * max(lengths[i] for i in group) <= 1024 or len(group) == 1
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(lengths)  # one pass from short to long: little padding
    assert [g for g in groups if 300 in (lengths[i] for i in g)] == [[100]]  # over: alone
    assert length_batches([], 1024) == []


def test_sub_batches_give_the_vectors_of_one_batch(small_runs: None) -> None:
    model = shared_model()
    assert isinstance(model, MiniLM)
    texts = _mixed_texts()
    ids = model.token_ids(texts)
    assert len(length_batches([len(i) for i in ids], 256)) == 5

    one_run = model._run(ids)  # everything padded to the longest, as before
    sub_batched = model.embed(texts)

    assert sub_batched.shape == (24, 384)
    cosines = np.sum(one_run * sub_batched, axis=1)
    assert cosines.min() > 0.999  # int8 activations are scaled per run: not bit-equal


@pytest.fixture(scope="module")
def two_threads() -> MiniLM:
    """A MiniLM of its own that runs two sub-batches at once."""
    return MiniLM(threads=2)


@pytest.mark.parametrize("threads", [1, 2])
def test_length_sorting_keeps_the_input_order(small_runs: None, threads: int,
                                              two_threads: MiniLM) -> None:
    model = two_threads if threads == 2 else MiniLM(threads=1)
    assert model.threads == threads
    texts = _mixed_texts()
    alone = np.concatenate([shared_model().embed([text]) for text in texts])

    for ordered in (texts, texts[::-1], texts[1::2] + texts[::2]):
        vectors = model.embed(ordered)
        nearest = np.argmax(vectors @ alone.T, axis=1)
        assert [texts[i] for i in nearest] == ordered


def _recording(provider: LocalProvider) -> list[list[str]]:
    """The texts of each of the provider's calls."""
    seen: list[list[str]] = []
    embed_batch = provider.embed_batch

    def recording(texts: list[str], input_type: InputType) -> np.ndarray:
        seen.append(texts)
        return embed_batch(texts, input_type)

    provider.embed_batch = recording  # type: ignore[method-assign]
    return seen


def test_the_embedder_batches_by_length_and_keeps_the_order(
        small_runs: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LocalProvider, "max_batch", 8)
    spec = LOCAL_DEFAULT
    provider = LocalProvider(spec)
    seen = _recording(provider)
    texts = _mixed_texts()
    cache = DictCache()

    vectors = Embedder(spec, provider, cache=cache).embed(texts)

    assert len(seen) == 3 and sorted(t for batch in seen for t in batch) == sorted(texts)
    assert [estimate_tokens(t) for batch in seen for t in batch] == sorted(
        estimate_tokens(t) for t in texts)
    alone = shared_model().embed(texts)
    assert np.sum(vectors * alone, axis=1).min() > 0.999
    for text, vector in zip(texts, vectors, strict=True):  # cached under its own text
        np.testing.assert_array_equal(cache.store[text], vector)


def test_the_local_model_takes_more_texts_a_call_than_a_service() -> None:
    provider = LocalProvider(LOCAL_DEFAULT)
    seen = _recording(provider)
    texts = [f"text {i} for one call" for i in range(3 * LOCAL_DEFAULT.max_batch)]

    Embedder(LOCAL_DEFAULT, provider).embed(texts)

    assert [len(batch) for batch in seen] == [len(texts)]  # its threads wait once, at the end
    assert LocalProvider.max_batch is not None and LocalProvider.max_batch >= 1024


class DictCache:
    def __init__(self) -> None:
        self.store: dict[str, np.ndarray] = {}

    def get_many(self, texts: list[str], spec: ModelSpec,
                 input_type: InputType) -> dict[int, np.ndarray]:
        return {i: self.store[t] for i, t in enumerate(texts) if t in self.store}

    def put_many(self, texts: list[str], vectors: np.ndarray, spec: ModelSpec,
                 input_type: InputType) -> None:
        self.store.update(zip(texts, vectors, strict=True))


def test_sub_batches_run_at_once_on_the_model_threads(small_runs: None, two_threads: MiniLM,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    both_running = threading.Barrier(2, timeout=30)  # broken unless two runs overlap
    ran_on: set[int] = set()
    overlap = [True]
    run = MiniLM._run

    def overlapping(self: MiniLM, *args: object) -> np.ndarray:
        me = threading.get_ident()
        first = me not in ran_on
        ran_on.add(me)
        if overlap[0] and first:
            both_running.wait()  # each of the two threads' first runs waits for the other's
        return run(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(MiniLM, "_run", overlapping)
    texts = _mixed_texts()

    vectors = two_threads.embed(texts)

    assert len(ran_on) == 2 and threading.get_ident() not in ran_on
    assert np.sum(vectors * shared_model().embed(texts), axis=1).min() > 0.999
    ran_on.clear()
    overlap[0] = False
    MiniLM(threads=1).embed(texts)
    assert ran_on == {threading.get_ident()}  # one thread: the caller's, no pool


def test_a_lone_text_runs_on_every_thread(two_threads: MiniLM,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A call of one text (a query) is one run, the caller's whole wait: on a model of several
    threads it runs on all of them, where a batch's runs take one thread each; a model of one
    thread (a database backend's) never loads a second session."""
    threads_of_runs: list[int] = []
    run = MiniLM._run

    def recording(self: MiniLM, ids: list[np.ndarray],
                  session: Any = None) -> np.ndarray:
        assert session is not None
        threads_of_runs.append(session.get_session_options().intra_op_num_threads)
        return run(self, ids, session)

    monkeypatch.setattr(MiniLM, "_run", recording)
    text = "What does p53 do after DNA damage?"

    lone = two_threads.embed([text])
    assert threads_of_runs == [2]
    threads_of_runs.clear()
    two_threads.embed([text, "a second text"])  # one run of two texts: a batch's thread
    assert threads_of_runs == [1]
    threads_of_runs.clear()
    one_thread = MiniLM(threads=1)
    alone = one_thread.embed([text])
    assert threads_of_runs == [1] and one_thread._lone is None
    # the same bits as on one thread: a new query's search finds what a cached one finds
    np.testing.assert_array_equal(lone, alone)


def test_session_options_bound_memory_and_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    for threads in (1, 2):
        options = session_options(threads)
        assert options.enable_cpu_mem_arena is True and options.enable_mem_pattern is False
        assert options.intra_op_num_threads == threads and options.inter_op_num_threads == 1
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options().intra_op_num_threads == 1

    monkeypatch.setenv(LOCAL_THREADS_ENV, "3")
    assert local_threads() == 3
    monkeypatch.setenv(LOCAL_THREADS_ENV, "256")
    assert local_threads() == 256
    for bad in ("100000", "257", "0", "-1", "abc"):
        monkeypatch.setenv(LOCAL_THREADS_ENV, bad)
        with pytest.raises(ConfigError, match=r"PYEMBED_LOCAL_THREADS must be a whole number "
                           rf"1\.\.256, got '{bad}'"):
            local_threads()
    monkeypatch.delenv(LOCAL_THREADS_ENV)
    assert local_threads() == min(len(os.sched_getaffinity(0)), 4)
    monkeypatch.setitem(sys.modules, "plpy", types.ModuleType("plpy"))
    assert local_threads() == 1  # inside a PostgreSQL backend


# -- each text tokenised once ---------------------------------------------------------------------

class CountingTokenizer:
    """A tokenizer that records the texts it encodes."""

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer
        self.encoded: list[str] = []

    def encode_batch(self, texts: list[str]) -> list[object]:
        self.encoded += texts
        return self.tokenizer.encode_batch(texts)  # type: ignore[attr-defined, no-any-return]


def test_a_chunk_is_tokenised_once_from_counting_to_embedding(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = shared_model()
    counting = CountingTokenizer(model._tokenizer)
    monkeypatch.setattr(model, "_tokenizer", counting)
    provider = LocalProvider(LOCAL_DEFAULT)
    texts = [f"{text} (once)" for text in _mixed_texts()] + ["word " * 300 + "(once)"]

    chunks = fit_chunks(texts, LOCAL_DEFAULT.max_tokens, provider.count_tokens)  # as Corpus.add
    vectors = Embedder(LOCAL_DEFAULT, provider).embed(chunks)

    assert len(chunks) == 26  # the long text was split in two, and its halves counted
    assert sorted(counting.encoded) == sorted(texts + chunks[-2:])  # each once
    assert not any(chunk in model._kept for chunk in chunks)  # taken by embed
    monkeypatch.undo()
    np.testing.assert_allclose(vectors, Embedder(LOCAL_DEFAULT).embed(chunks), atol=1e-6)


def test_truncation_reads_what_the_tokenizers_own_truncation_gives() -> None:
    tokenizer = Tokenizer.from_str((importlib.resources.files("pyembed") / "data"
                                    / "minilm-tokenizer.json").read_text("utf-8"))
    tokenizer.enable_truncation(LOCAL_DEFAULT.max_tokens)
    texts = ["word " * 300, "short text", "a mixed, longer text: 3.5% of 12,000 cells " * 40,
             "x" * 2000, "é" * 600]
    expected = tokenizer.encode_batch(texts)

    for ids, want in zip(MiniLM(threads=1).token_ids(texts), expected, strict=True):
        assert truncated(ids).tolist() == want.ids
        assert want.attention_mask == [1] * len(want.ids) and not any(want.type_ids)


def test_token_ids_kept_for_embedding_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pyembed.providers.local.TOKENS_KEPT", 100)
    model = MiniLM(threads=1)
    texts = [f"text number {i} about cats and sleep" for i in range(40)]

    counts = model.count_tokens(texts)

    newest = max(n for n in range(len(texts) + 1) if sum(counts[len(texts) - n:]) <= 100)
    assert 0 < newest < len(texts)
    assert list(model._kept) == texts[-newest:]  # the newest that fit
    assert sum(len(ids) for ids in model._kept.values()) == model._kept_tokens <= 100
    assert counts == [len(ids) for ids in model.token_ids(texts)]
    assert list(model._kept) == [] and model._kept_tokens == 0


def test_the_threads_take_the_longest_runs_first(small_runs: None, two_threads: MiniLM,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[int] = []
    run = MiniLM._run

    def recording(self: MiniLM, ids: list[np.ndarray], *args: object) -> np.ndarray:
        started.append(max(len(i) for i in ids))
        return run(self, ids, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(MiniLM, "_run", recording)
    texts = _mixed_texts()

    vectors = two_threads.embed(texts)

    assert len(started) == 5 and sorted(started[:2]) == sorted(started)[-2:]
    assert started[-1] == min(started)  # the threads end on the shortest run
    assert np.sum(vectors * shared_model().embed(texts), axis=1).min() > 0.999
