"""A deterministic, offline fake embedding model for tests: hashed bag of words."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from ..models import InputType, ModelSpec
from .base import Provider

_WORD = re.compile(r"\w+")
_CONSTANT = "\x00constant"
"""A pseudo-word every text contains, so that no text maps to the zero vector."""
_CONSTANT_WEIGHT = 0.1


def _bucket(token: str, key: bytes, dimensions: int) -> tuple[int, float]:
    digest = hashlib.blake2b(token.encode(), key=key, digest_size=8).digest()
    number = int.from_bytes(digest, "little")
    return number % dimensions, (1.0 if number >> 63 else -1.0)


def fake_vectors(texts: Sequence[str], *, space: str,
                 dimensions: int) -> npt.NDArray[np.float32]:
    """Unit vectors, one per text: each lowercased word adds ±1 to a dimension chosen by a
    blake2b hash keyed by `space`, so texts sharing words are similar and different spaces
    (model versions) are unrelated."""
    key = hashlib.blake2b(space.encode(), digest_size=32).digest()
    out = np.zeros((len(texts), dimensions), dtype=np.float64)
    for row, text in enumerate(texts):
        index, sign = _bucket(_CONSTANT, key, dimensions)
        out[row, index] += sign * _CONSTANT_WEIGHT
        for word in _WORD.findall(text.lower()):
            index, sign = _bucket(word, key, dimensions)
            out[row, index] += sign
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out.astype(np.float32)


class FakeProvider(Provider):
    """The `fake` provider: `fake_vectors` in a space named by the model id and version.

    It records what it was asked: `calls` (number of `embed_batch` calls) and `batches`
    (the texts of each call), for tests to assert on.
    """

    name = "fake"

    def __init__(self, spec: ModelSpec, *, api_key: str | None = None,
                 base_url: str | None = None, timeout: float = 30.0) -> None:
        super().__init__(spec, api_key=api_key, base_url=base_url, timeout=timeout)
        self.calls = 0
        self.batches: list[list[str]] = []

    def embed_batch(self, texts: list[str], input_type: InputType) -> npt.NDArray[np.float32]:
        """Deterministic vectors for `texts`; the input type does not change them."""
        self.calls += 1
        self.batches.append(list(texts))
        return fake_vectors(texts, space=f"{self.spec.model_id}@{self.spec.version}",
                            dimensions=self.spec.dimensions)
