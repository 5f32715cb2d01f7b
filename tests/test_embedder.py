"""The embedder without a network or database: validation, batching, retries, response
checks, normalisation and the cache protocol, with the fake provider and small stubs."""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pyembed.cachekey import cache_key
from pyembed.embedder import Embedder, plan_batches
from pyembed.errors import (
    ConfigError,
    InvalidInput,
    InvalidVector,
    ModelMismatch,
    ProviderError,
    RateLimited,
)
from pyembed.models import InputType, ModelSpec, registry
from pyembed.providers import Provider, TransientProviderError, Vectors, provider_for
from pyembed.providers.fake import FakeProvider, fake_vectors
from pyembed.text import estimate_tokens, truncate_to_tokens

FAKE = registry.get("fake/fake-hash@1:1024")
SMALL16 = ModelSpec("fake", "tiny", "1", 16)
SMALL = ModelSpec("fake", "fake-hash", "1", 384, max_batch=8, max_tokens=100, input_types=True)


def fake(spec: ModelSpec = FAKE) -> FakeProvider:
    return FakeProvider(spec)


class DictCache:
    """An in-memory EmbeddingCache keyed like the real one."""

    def __init__(self) -> None:
        self.store: dict[bytes, npt.NDArray[np.float32]] = {}
        self.gets: list[list[str]] = []
        self.puts: list[list[str]] = []

    def get_many(self, texts: list[str], spec: ModelSpec,
                 input_type: InputType) -> dict[int, npt.NDArray[np.float32]]:
        self.gets.append(list(texts))
        keys = [cache_key(t, spec.key, input_type) for t in texts]
        return {i: self.store[k] for i, k in enumerate(keys) if k in self.store}

    def put_many(self, texts: list[str], vectors: npt.NDArray[np.float32], spec: ModelSpec,
                 input_type: InputType) -> None:
        assert len(texts) == len(vectors)
        self.puts.append(list(texts))
        for text, vector in zip(texts, vectors, strict=True):
            self.store[cache_key(text, spec.key, input_type)] = vector


class Stub(Provider):
    """A fake-provider stand-in whose answer for each call is scripted."""

    name = "fake"

    def __init__(self, spec: ModelSpec,
                 *answers: Callable[[list[str]], Vectors] | BaseException) -> None:
        super().__init__(spec)
        self.answers = list(answers)
        self.calls: list[tuple[list[str], InputType]] = []

    def embed_batch(self, texts: list[str], input_type: InputType) -> Vectors:
        self.calls.append((texts, input_type))
        answer = self.answers.pop(0) if self.answers else _unit
        if isinstance(answer, BaseException):
            raise answer
        return answer(texts)


def _unit(texts: list[str]) -> npt.NDArray[np.float32]:
    return fake_vectors(texts, space="stub", dimensions=SMALL.dimensions)


def transient(status: int = 503, retry_after: float | None = None) -> TransientProviderError:
    return TransientProviderError(f"fake: HTTP {status}: busy", status=status,
                                  retry_after=retry_after)


# -- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(("bad", "message"), [
    ("", "text 1 is empty or only whitespace"),
    ("  \n\t ", "text 1 is empty or only whitespace"),
    ("a\x00b", "text 1 contains a NUL byte"),
    (None, "text 1 must be a string, got NoneType"),
])
def test_bad_texts_are_rejected_before_any_call(bad: str, message: str) -> None:
    provider = fake()
    with pytest.raises(InvalidInput, match=message):
        Embedder(FAKE, provider).embed(["fine", bad, "also fine"])
    assert provider.calls == 0


def test_oversized_text_names_its_index_and_estimate() -> None:
    provider = fake(SMALL)
    long = "word " * 100  # 100 words: about 130 tokens
    with pytest.raises(InvalidInput, match=r"text 2 is about 130 tokens, over the 100-token "
                                           r"limit of fake/fake-hash@1:384"):
        Embedder(SMALL, provider).embed(["a", "b", long])
    assert provider.calls == 0


def test_truncate_embeds_a_prefix_within_the_limit() -> None:
    provider = fake(SMALL)
    long = " ".join(f"w{i}" for i in range(200))

    vectors = Embedder(SMALL, provider, truncate=True).embed([long])

    [[sent]] = provider.batches
    assert long.startswith(sent) and estimate_tokens(sent) <= SMALL.max_tokens
    assert sent.split()[-1] == "w75"  # 76 words: 76 * 1.3 = 98.8 tokens
    np.testing.assert_allclose(vectors[0], fake_vectors([sent], space="fake-hash@1",
                                                        dimensions=384)[0])


def test_exact_counts_from_the_provider_replace_the_estimate() -> None:
    class Counting(Stub):
        def count_tokens(self, texts: list[str]) -> list[int]:
            return [len(text) for text in texts]

    with pytest.raises(InvalidInput, match="text 0 is 150 tokens, over the 100-token"):
        Embedder(SMALL, Counting(SMALL)).embed(["x" * 150])
    assert Embedder(SMALL, Counting(SMALL)).embed(["x" * 100]).shape == (1, 384)


def test_texts_are_sent_stripped() -> None:
    provider = fake()
    Embedder(FAKE, provider).embed(["  padded\n"])
    assert provider.batches == [["padded"]]


def test_empty_input_makes_no_call() -> None:
    provider, cache = fake(), DictCache()
    vectors = Embedder(FAKE, provider, cache=cache).embed([])
    assert vectors.shape == (0, 1024) and provider.calls == 0 and cache.gets == []


@pytest.mark.parametrize("texts", ["one text", b"bytes", 7])
def test_one_string_is_not_a_list_of_texts(texts: object) -> None:
    """A str was iterated as its characters: embed("hello") made a vector per letter, and
    check("hello") passed."""
    provider = fake()
    for call in (Embedder(FAKE, provider).embed, Embedder(FAKE, provider).check):
        with pytest.raises(InvalidInput, match="is a list of strings"):
            call(texts)
    assert provider.calls == 0


def test_provider_for_another_model_is_refused() -> None:
    with pytest.raises(ModelMismatch, match=r"fake/fake-hash@2:1024.*fake/fake-hash@1:1024"):
        Embedder(FAKE, fake(registry.get("fake/fake-hash@2:1024")))


def test_token_budget_below_the_per_text_limit_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_batch_tokens"):
        Embedder(SMALL, fake(SMALL), max_batch_tokens=99)


def test_unknown_provider_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no provider named 'acme'"):
        provider_for(ModelSpec("acme", "m", "1", 8))


# -- batching ----------------------------------------------------------------------------


def test_batches_by_count() -> None:
    spec = ModelSpec("fake", "fake-hash", "1", 64, max_batch=128)
    provider = fake(spec)
    texts = [f"text number {i}" for i in range(300)]

    vectors = Embedder(spec, provider).embed(texts)

    assert provider.calls == 3
    assert [len(b) for b in provider.batches] == [128, 128, 44]
    np.testing.assert_allclose(vectors, fake_vectors(texts, space="fake-hash@1",
                                                     dimensions=64))


def test_batches_by_token_budget() -> None:
    provider = fake(SMALL)
    texts = [f"{i:03d}" + "x" * 396 for i in range(6)]  # 400 chars: 100 tokens each

    Embedder(SMALL, provider, max_batch_tokens=250).embed(texts)

    assert [len(b) for b in provider.batches] == [2, 2, 2]


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.integers(1, 500), max_size=60), max_batch=st.integers(1, 20),
       budget=st.integers(1, 2000))
def test_plan_batches_properties(counts: list[int], max_batch: int, budget: int) -> None:
    batches = plan_batches(counts, max_batch, budget)

    assert [i for batch in batches for i in batch] == list(range(len(counts)))
    for batch in batches:
        tokens = sum(counts[i] for i in batch)
        assert 1 <= len(batch) <= max_batch
        assert tokens <= budget or len(batch) == 1
    for batch, following in itertools.pairwise(batches):  # greedy: each batch is full
        tokens = sum(counts[i] for i in batch)
        assert len(batch) == max_batch or tokens + counts[following.start] > budget


_WORDS = st.sampled_from(["cat", "dog", "mat", "rug", "tax", "Cat", "sun"])
_TEXTS = st.lists(st.lists(_WORDS, min_size=1, max_size=30).map(" ".join), max_size=40)


@settings(max_examples=100, deadline=None)
@given(texts=_TEXTS, max_batch=st.integers(1, 8), budget=st.integers(100, 300))
def test_every_text_is_embedded_once_in_order(texts: list[str], max_batch: int,
                                              budget: int) -> None:
    spec = ModelSpec("fake", "fake-hash", "1", 32, max_batch=max_batch, max_tokens=100)
    provider = fake(spec)

    vectors = Embedder(spec, provider, max_batch_tokens=budget).embed(texts)

    sent = [t for batch in provider.batches for t in batch]
    assert sent == list(dict.fromkeys(texts))
    for batch in provider.batches:
        assert len(batch) <= max_batch
        assert sum(map(estimate_tokens, batch)) <= budget
    np.testing.assert_allclose(vectors, fake_vectors(texts, space="fake-hash@1",
                                                     dimensions=32).reshape(-1, 32))


# -- retries -----------------------------------------------------------------------------


def test_transient_errors_are_retried_with_growing_backoff() -> None:
    sleeps: list[float] = []
    stub = Stub(SMALL, transient(), transient(), transient())

    Embedder(SMALL, stub, sleep=sleeps.append).embed(["a"])

    assert len(stub.calls) == 4
    assert [0.5 <= sleeps[0] <= 1.0, 1.0 <= sleeps[1] <= 1.5, 2.0 <= sleeps[2] <= 2.5] == [
        True, True, True]


def test_retry_after_is_honoured_exactly() -> None:
    sleeps: list[float] = []
    Embedder(SMALL, Stub(SMALL, transient(429, 7.5)), sleep=sleeps.append).embed(["a"])
    assert sleeps == [7.5]


def test_retry_after_over_the_cap_raises_rate_limited_at_once() -> None:
    sleeps: list[float] = []
    stub = Stub(SMALL, transient(429, 61.0))
    with pytest.raises(RateLimited, match="wait 61 s, more than max_retry_after"):
        Embedder(SMALL, stub, max_retry_after=60.0, sleep=sleeps.append).embed(["a"])
    assert sleeps == [] and len(stub.calls) == 1


def test_gives_up_after_max_retries() -> None:
    stub = Stub(SMALL, *[transient(502)] * 3)
    with pytest.raises(ProviderError, match="gave up after 3 attempts; last error: "
                                            "fake: HTTP 502") as info:
        Embedder(SMALL, stub, max_retries=2, sleep=lambda _: None).embed(["a"])
    assert type(info.value) is ProviderError and len(stub.calls) == 3


def test_permanent_errors_are_not_retried() -> None:
    stub = Stub(SMALL, ProviderError("fake: HTTP 400: bad"))
    with pytest.raises(ProviderError, match="HTTP 400"):
        Embedder(SMALL, stub, sleep=lambda _: None).embed(["a"])
    assert len(stub.calls) == 1


# -- response checks and normalisation ---------------------------------------------------


def _with(row: npt.NDArray[np.float64]) -> Callable[[list[str]], Vectors]:
    return lambda texts: np.vstack([_unit(texts)[:-1], row])


@pytest.mark.parametrize(("answer", "message"), [
    (lambda texts: _unit(texts)[:-1], "returned 1 vectors for 2 texts"),
    (lambda texts: [], "returned 0 vectors for 2 texts"),
    (lambda texts: _unit(texts)[:, :100], "100-dimension vectors, expected 384"),
    (lambda texts: [[1.0] * 384, [1.0] * 383], "unequal lengths"),
    (_with(np.full(384, np.nan)), "NaN or infinity"),
    (_with(np.full(384, np.inf)), "NaN or infinity"),
    (_with(np.zeros(384)), "zero vector"),
])
def test_bad_responses_are_provider_errors(answer: Callable[[list[str]], Vectors],
                                           message: str) -> None:
    with pytest.raises(ProviderError, match=message):
        Embedder(SMALL, Stub(SMALL, answer)).embed(["a", "b"])


def test_vectors_are_normalised_when_the_model_is() -> None:
    raw = np.arange(1, 385, dtype=np.float64).reshape(1, 384)
    vectors = Embedder(SMALL, Stub(SMALL, lambda texts: raw * 3)).embed(["a"])
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors[0]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(vectors[0], raw[0] / np.linalg.norm(raw[0]), rtol=1e-5)


def test_vectors_are_kept_as_is_when_the_model_is_not_normalised() -> None:
    spec = ModelSpec("fake", "raw", "1", 384, normalized=False, distance="l2")
    raw = np.arange(1, 385, dtype=np.float64).reshape(1, 384)
    vectors = Embedder(spec, Stub(spec, lambda texts: raw)).embed(["a"])
    np.testing.assert_allclose(vectors, raw)


@settings(max_examples=200, deadline=None)
@given(arrays(np.float64, (3, 16), elements=st.floats(-1e6, 1e6)))
@example(np.full((3, 16), 2.58275422e-161))  # squares are denormal: the norm was off by 5e-5
def test_normalisation_gives_unit_vectors_in_the_same_direction(
        raw: npt.NDArray[np.float64]) -> None:
    if (np.abs(raw).max(axis=1) == 0).any():
        with pytest.raises(ProviderError):
            Embedder(SMALL16, Stub(SMALL16, lambda texts: raw)).embed(["a", "b", "c"])
        return
    vectors = Embedder(SMALL16, Stub(SMALL16, lambda texts: raw)).embed(["a", "b", "c"])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    # The oracle scales each row first: squares of components near 1e-161 are denormal.
    scaled = raw / np.abs(raw).max(axis=1, keepdims=True)
    cosines = (vectors.astype(np.float64) * scaled).sum(axis=1) / np.linalg.norm(scaled, axis=1)
    np.testing.assert_allclose(cosines, 1.0, rtol=1e-5)


# -- input types ---------------------------------------------------------------------------


def test_input_type_reaches_models_that_have_them() -> None:
    stub = Stub(SMALL)
    embedder = Embedder(SMALL, stub)
    embedder.embed(["doc"])
    query = embedder.embed_query("query")
    assert query.shape == (384,)
    assert [kind for _, kind in stub.calls] == [InputType.DOCUMENT, InputType.QUERY]


def test_unknown_input_type_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="input type must be one of"):
        Embedder(FAKE, fake()).embed(["a"], "passage")  # type: ignore[arg-type]


def test_models_without_input_types_embed_queries_as_documents() -> None:
    spec = ModelSpec("fake", "plain", "1", 384, input_types=False)
    stub, cache = Stub(spec), DictCache()
    embedder = Embedder(spec, stub, cache=cache)
    embedder.embed(["same text"])
    embedder.embed_query("same text")
    assert [kind for _, kind in stub.calls] == [InputType.DOCUMENT]


# -- cache ---------------------------------------------------------------------------------


def test_cache_half_hit_embeds_only_misses() -> None:
    texts = [f"document {i}" for i in range(200)]
    cache = DictCache()
    Embedder(FAKE, fake(), cache=cache).embed(texts[::2])
    provider = fake()

    vectors = Embedder(FAKE, provider, cache=cache).embed(texts)

    misses = texts[1::2]
    assert provider.calls == math.ceil(len(misses) / FAKE.max_batch) == 2
    assert [t for b in provider.batches for t in b] == misses
    assert cache.gets[-1] == texts and cache.puts[-1] == misses and len(cache.puts) == 2
    np.testing.assert_allclose(vectors, fake().embed_batch(texts, InputType.DOCUMENT))


def test_duplicates_are_embedded_once() -> None:
    provider, cache = fake(), DictCache()

    vectors = Embedder(FAKE, provider, cache=cache).embed(["a b", "c", "a b", " a b "])

    assert provider.batches == [["a b", "c"]]
    assert cache.puts == [["a b", "c"]]
    assert (vectors[0] == vectors[2]).all() and (vectors[0] == vectors[3]).all()


def test_all_cached_makes_no_call() -> None:
    cache = DictCache()
    Embedder(FAKE, fake(), cache=cache).embed(["x", "y"])
    provider = fake()
    Embedder(FAKE, provider, cache=cache).embed(["y", "x"])
    assert provider.calls == 0 and len(cache.puts) == 1


def test_batches_done_before_a_failure_are_cached() -> None:
    cache = DictCache()
    stub = Stub(SMALL, _unit, ProviderError("fake: HTTP 400: bad"))
    texts = [f"t{i}" for i in range(12)]  # two batches of 8 and 4

    with pytest.raises(ProviderError):
        Embedder(SMALL, stub, cache=cache).embed(texts)

    assert cache.puts == [texts[:8]]


def test_cache_entries_are_per_model_and_input_type() -> None:
    cache = DictCache()
    Embedder(FAKE, fake(), cache=cache).embed(["x"])
    other = fake(registry.get("fake/fake-hash@2:1024"))
    Embedder(other.spec, other, cache=cache).embed(["x"])
    query = fake()
    Embedder(FAKE, query, cache=cache).embed_query("x")
    assert other.calls == 1 and query.calls == 1


def test_malformed_cache_hit_is_rejected() -> None:
    class Broken(DictCache):
        def get_many(self, texts: list[str], spec: ModelSpec,
                     input_type: InputType) -> dict[int, npt.NDArray[np.float32]]:
            return {0: np.zeros(3, dtype=np.float32)}

    with pytest.raises(InvalidVector, match=r"shape \(3,\) for text 0"):
        Embedder(FAKE, fake(), cache=Broken()).embed(["x"])


# -- cache keys, token estimates, truncation -----------------------------------------------

_SPACE = st.text(alphabet=" \t\n\r", max_size=4)


@given(text=st.text(), pad=st.tuples(_SPACE, _SPACE), key=st.sampled_from(
    [FAKE.key, "openai/text-embedding-3-small@1:1536"]), kind=st.sampled_from(list(InputType)))
def test_cache_key_properties(text: str, pad: tuple[str, str], key: str,
                              kind: InputType) -> None:
    text = text.replace("\x00", "")
    digest = cache_key(text, key, kind)
    assert len(digest) == 32 and digest == cache_key(text, key, kind)
    assert cache_key(pad[0] + text + pad[1], key, kind) == digest
    assert cache_key(text, key + "x", kind) != digest
    assert cache_key(text, key, "query" if kind == "document" else "document") != digest
    assert cache_key(text + "x", key, kind) != digest


def test_cache_key_is_the_documented_sha256() -> None:
    expected = hashlib.sha256(b"hi\x00fake/fake-hash@1:1024\x00query").digest()
    assert cache_key("  hi\n", FAKE.key, InputType.QUERY) == expected


def test_estimate_tokens() -> None:
    assert estimate_tokens("one two three") == 4  # 3 words * 1.3 = 3.9
    assert estimate_tokens("x" * 401) == 101  # 401 chars / 4 = 100.25


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.sampled_from("ab \n"), min_size=1).filter(str.strip).map(str.strip),
       limit=st.integers(2, 60))
def test_truncation_properties(text: str, limit: int) -> None:
    cut = truncate_to_tokens(text, limit)
    assert text.startswith(cut) and cut.strip() == cut and cut
    assert estimate_tokens(cut) <= limit
    if estimate_tokens(text) <= limit:
        assert cut == text


def _vectors(texts: Sequence[str]) -> npt.NDArray[np.float32]:
    return fake_vectors(texts, space="fake-hash@1", dimensions=1024)


def test_fake_model_is_deterministic_and_semantic() -> None:
    a, b, c = _vectors(["the cat sat on the mat", "The cat sat on a mat!", "tax deadline"])
    assert np.allclose(a, _vectors(["the cat sat on the mat"])[0])
    assert a @ b > 0.7 > 0.2 > abs(a @ c)
    other = fake_vectors(["the cat sat on the mat"], space="fake-hash@2", dimensions=1024)[0]
    assert abs(a @ other) < 0.2
    assert np.linalg.norm(_vectors(["!!!"])[0]) == pytest.approx(1.0)
