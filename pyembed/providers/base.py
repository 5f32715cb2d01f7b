"""The provider interface: one embedding service or local model behind `embed_batch`."""

from __future__ import annotations

import email.utils
import math
import os
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import ClassVar, Generic, Protocol, TypeAlias, TypeVar
from urllib.parse import urlsplit

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError, MissingAPIKey, ProviderError, redact, status_kind
from ..models import LOCAL_DEFAULT, InputType, ModelSpec

Vectors: TypeAlias = Sequence[Sequence[float]] | npt.NDArray[np.floating]
"""What `embed_batch` returns: one vector per input text, in input order."""

LOCAL_THREADS_ENV = "PYEMBED_LOCAL_THREADS"
"""The threads a local model may use in one process (default: see `local_threads`)."""
MAX_LOCAL_THREADS = 4
"""The default's cap: beyond about four threads a model this small gains little."""

MOST_LOCAL_THREADS = 256
"""The most threads PYEMBED_LOCAL_THREADS may ask for: a count past any machine's CPUs is a
typo, and the engine makes every thread at once (a count in the tens of thousands had the
process killed, with no error of its own)."""

TRANSIENT_STATUSES = frozenset({408, 409, 429})
"""HTTP statuses worth retrying, besides every 5xx."""

UNREADABLE = (AssertionError, AttributeError, LookupError, TypeError, ValueError)
"""What an SDK raises, or reading its result raises, for an answer that is not in the service's
format: a 200 whose body is HTML or not JSON, JSON without the fields the SDK reads, base64 that
is not (a stream the SDK cannot follow fails its assertions)."""

T = TypeVar("T")


def unreadable(exc: BaseException) -> str:
    """What to say of an answer `UNREADABLE` refused: its error's class and first line."""
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"the answer is not in the service's format ({type(exc).__name__}" + (
        f": {first})" if first else ")")


class _Spec(Protocol):
    """What a service client needs of the model it serves (ModelSpec, RerankerSpec)."""

    @property
    def provider(self) -> str: ...
    @property
    def model_id(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def api_key_env(self) -> str | None: ...


S = TypeVar("S", bound=_Spec)


class TransientProviderError(ProviderError):
    """A failure worth retrying: rate limit, server error, timeout or lost connection.

    `status` is the HTTP status, or None when no response came back; `retry_after` is the
    wait in seconds the service asked for, if it did.
    """

    def __init__(self, message: str, *, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, kind=status_kind(status))
        self.status = status
        self.retry_after = retry_after


class ServiceClient(Generic[S]):
    """What every client of a provider's service shares: its spec, key, base URL and
    timeout checked once, failures and bad answers as redacted pyembed errors, and answers
    put back in input order. Subclasses set `name` (and `base_url_env`); `items` names what
    the service returns."""

    name: ClassVar[str]
    """The provider part of the keys this class serves, e.g. "voyage"."""
    base_url_env: ClassVar[str | None] = None
    """Environment variable that overrides the service's base URL, e.g. for a proxy."""
    items: ClassVar[str] = "vectors"
    serves: ClassVar[str] = "models"

    def __init__(self, spec: S, *, api_key: str | None = None, base_url: str | None = None,
                 timeout: float = 30.0) -> None:
        if spec.provider != self.name:
            raise ConfigError(f"{type(self).__name__} serves {self.name} {self.serves}, not "
                              f"{spec.key}")
        if not (math.isfinite(timeout) and timeout > 0):  # NaN and inf reach the socket
            raise ConfigError(f"timeout must be positive, got {timeout}")
        self.spec = spec
        self.timeout = timeout
        self.api_key = api_key or self._key_from_env()
        if base_url is None and self.base_url_env is not None:
            base_url = os.environ.get(self.base_url_env) or None
        self.base_url = checked_base_url(base_url, self.base_url_env or "the base URL")

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    def close(self) -> None:
        """Close the connections this client's SDK keeps (Client.close calls it): none by
        default (a model in this process; Voyage's per-thread session, shared)."""

    def _key_from_env(self) -> str | None:
        env = self.spec.api_key_env
        if env is None:
            return None
        key = os.environ.get(env, "").strip()
        if not key:
            raise MissingAPIKey(f"{env} is not set", hint=self.missing_key_hint())
        return key

    def missing_key_hint(self) -> str:
        """What to do without the key: the hint of "VAR is not set"."""
        return "export it"

    def failure(self, status: int | None, detail: str, *,
                retry_after: float | None = None) -> ProviderError:
        """The error to raise for a failed request: transient for 408/409/429/5xx and for
        no response at all (status None), permanent otherwise. Its message is redacted (see
        `pyembed.errors.redact`); raise it `from None`, since the SDK's exception is not."""
        what = f"HTTP {status}" if status is not None else "no response"
        if status is not None and 200 <= status < 300:  # an answer the SDK could not read
            first = (detail.strip().splitlines() or ["no detail given"])[0][:200]
            return self.bad_response(f"the answer is not in the service's format ({what}: "
                                     f"{first})")
        where = f"{self.name} ({self.model_id})"
        message = self._scrub(f"{where}: {what}: {detail.strip() or 'no detail given'}")
        if status is None or status in TRANSIENT_STATUSES or status >= 500:
            return TransientProviderError(message, status=status, retry_after=retry_after)
        return ProviderError(message, kind=status_kind(status))

    def bad_response(self, detail: str) -> ProviderError:
        """The error to raise when the service answered, but not with a usable answer."""
        return ProviderError(self._scrub(f"{self.name} ({self.model_id}): {detail}"))

    @contextmanager
    def reading_answer(self) -> Iterator[None]:
        """Around a request and the reading of its answer: an answer not in the service's
        format (`UNREADABLE`) is the service's bad answer, not a failure of pyembed's, and
        nothing of it is used."""
        try:
            yield
        except UNREADABLE as exc:
            raise self.bad_response(unreadable(exc)) from None

    def in_input_order(self, indexed: Iterable[tuple[object, T]], count: int) -> list[T]:
        """The items of an answer to `count` texts, each given with the index of its text,
        in input order; `bad_response` unless the indexes are exactly 0..count-1, once each."""
        items = list(indexed)
        if len(items) != count:
            raise self.bad_response(f"the service returned {len(items)} {self.items} for "
                                    f"{count} texts")
        ordered: dict[int, T] = {}
        for index, item in items:
            if not isinstance(index, int) or isinstance(index, bool):
                raise self.bad_response(f"the service returned an index {index!r}, not a "
                                        f"whole number")
            if not 0 <= index < count:
                raise self.bad_response(f"the service returned index {index} for {count} texts")
            if index in ordered:
                raise self.bad_response(f"the service returned index {index} twice")
            ordered[index] = item
        return [ordered[index] for index in range(count)]

    def _scrub(self, message: str) -> str:
        return redact(message, secrets=[self.api_key], base_url=self.base_url)


class Provider(ServiceClient[ModelSpec], ABC):
    """One embedding backend for one model; subclasses declare `name` and `embed_batch`.

    Batching, validation, retries and response checks belong to `pyembed.embedder.Embedder`;
    a provider sends one batch, puts the answer in input order (refusing one whose indexes
    are not 0..N-1 once each, see `in_input_order`) and translates the service's failures
    into `TransientProviderError` (worth retrying) or `ProviderError` (not), through
    `failure` and `bad_response`, whose messages are redacted for any role to see.
    """

    truncates_input: ClassVar[bool] = False
    """Whether the model itself cuts texts to `spec.max_tokens` tokens, exactly."""
    batches_by_length: ClassVar[bool] = False
    """Whether the embedder should batch texts of similar length together (a model run
    here pays for padding; a service bills tokens, not batches)."""
    max_batch: ClassVar[int | None] = None
    """Texts per call, when the provider sets it instead of the spec's `max_batch` (a model
    in this process that splits a call into runs of its own)."""
    in_process: ClassVar[bool] = False
    """Whether a call runs in this process and costs nothing but its CPU time (no service, no
    bill): a search by text may start it before its first round trip has reserved the call
    (pyembed.query), which still decides whether the search goes on."""

    def missing_key_hint(self) -> str:
        # The corpus's model is pinned: the local model is advice for a new corpus only.
        return (f"export it where the call runs; a new corpus can use the local model "
                f"{LOCAL_DEFAULT.key}, which needs no key")

    @abstractmethod
    def embed_batch(self, texts: list[str], input_type: InputType) -> Vectors:
        """Vectors for one batch of texts, in order; `input_type` matters only to models
        whose spec has `input_types`."""

    def count_tokens(self, texts: list[str]) -> list[int] | None:
        """Exact token counts in the model's own tokenizer, or None if this provider can
        only have them estimated."""
        return None


def checked_base_url(url: str | None, what: str) -> str | None:
    """`url` if it is an http or https URL with a host (and a port 1..65535 if it names one),
    else ConfigError naming `what` (not the URL, which may hold credentials): the SDKs raise
    their own errors for it (httpx's InvalidURL), or retry it as a failed connection."""
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and (
            parts.port is None or parts.port > 0)
    except ValueError:  # a port out of range or not a number, a bracket left open
        valid = False
    if not valid:
        raise ConfigError(f"{what} is not an http or https URL with a host (and a port "
                          "1..65535, if it names one)")
    return url


def local_threads() -> int:
    """The thread count for a local model: PYEMBED_LOCAL_THREADS, else 1 in a PostgreSQL
    backend (PL/Python: one process per connection, so threads there multiply by the
    connections) and the usable CPUs up to MAX_LOCAL_THREADS elsewhere (the CLI, a worker)."""
    raw = os.environ.get(LOCAL_THREADS_ENV)
    if raw is None:
        if "plpy" in sys.modules:
            return 1
        usable = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                  else os.cpu_count() or 1)
        return max(1, min(usable, MAX_LOCAL_THREADS))
    try:
        threads = int(raw)
    except ValueError:
        threads = 0
    if not 1 <= threads <= MOST_LOCAL_THREADS:
        raise ConfigError(f"{LOCAL_THREADS_ENV} must be a whole number 1..{MOST_LOCAL_THREADS}, "
                          f"got {raw!r}")
    return threads


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait from a response's Retry-After (seconds or HTTP date) or
    retry-after-ms header, or None if absent or unreadable."""
    if not headers:
        return None
    lowered = {k.lower(): v for k, v in headers.items()}
    millis = lowered.get("retry-after-ms")
    if millis is not None:
        try:
            seconds = float(millis) / 1000.0
            if math.isfinite(seconds):
                return max(seconds, 0.0)
        except ValueError:
            pass
    value = lowered.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
        # "nan" and "inf" read as floats; no wait can be taken from them.
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)
