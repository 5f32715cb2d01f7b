"""Retries of one provider request, shared by the embedder and the reranker: transient failures
(429, 5xx, timeouts, lost connections) are retried with exponential backoff, or after the wait
the service asked for; a service that asks for more than `max_retry_after` is RateLimited."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from .errors import ConfigError, ProviderError, RateLimited
from .providers.base import TransientProviderError
from .text import number

T = TypeVar("T")

DEFAULT_RETRIES = 6
"""Retries of one provider request unless the caller asks for another count: the same for
every service and call (embeddings, reranks, Claude's answers), in Python and the CLI."""
IN_STATEMENT_RETRIES = 2
"""The default of pyembed.http_retries, for every provider request a statement makes in the
database (embeddings and reranks alike): fewer, since PL/Python cannot be cancelled while it
waits."""
DEFAULT_MAX_RETRY_AFTER = 60.0
"""The longest wait a service may ask for before a retry (Retry-After) unless the caller
says otherwise; past it the request is RateLimited at once."""
MAX_RETRIES = 10
"""The most retries a caller may ask for one request (rag.answer's max_retries, the session's
pyembed.http_retries in the database): each is a wait on a service that keeps failing."""
MAX_TIMEOUT = 3600.0
"""The most seconds a caller may give one request (rag.answer's timeout, pyembed.http_timeout):
PL/Python cannot be cancelled while Python runs, so the bound is the longest a statement may
hang, and a socket takes no timeout past what its C type holds (1e300 was OverflowError)."""

_log = logging.getLogger(__name__)


class Retrier:
    """Runs one request (a callable) up to `max_retries + 1` times; `what` names the model in
    messages and logs, `on_error` hears of every failed attempt (pyembed counts them) and of
    every answer the caller finds wrong (`report`)."""

    def __init__(self, what: str, *, max_retries: int = DEFAULT_RETRIES,
                 max_retry_after: float = DEFAULT_MAX_RETRY_AFTER,
                 sleep: Callable[[float], None] = time.sleep,
                 on_error: Callable[[ProviderError], None] | None = None) -> None:
        if not 0 <= max_retries <= MAX_RETRIES:
            raise ConfigError(f"max_retries must be 0..{MAX_RETRIES}, got {max_retries}")
        # NaN would never be exceeded: every wait the service asked for would be taken.
        max_retry_after = number(max_retry_after, "max_retry_after", 0.0, unit="seconds",
                                 error=ConfigError)
        self.what = what
        self.max_retries = max_retries
        self.max_retry_after = max_retry_after
        self._sleep = sleep
        self._on_error = on_error
        self._backoff = wait_exponential(multiplier=0.5, max=30.0) + wait_random(0, 0.5)

    def __call__(self, request: Callable[[], T], *,
                 before: Callable[[], None] | None = None) -> T:
        """`request()`'s result; ProviderError once the attempts are used up (RateLimited if
        the last was refused with a 429), RateLimited at once when the service asks to wait
        longer than `max_retry_after`. Anything but a
        TransientProviderError is not retried. `before` runs before each attempt (a meter):
        its errors (a tenant's rate limit) are not the service's, nor retried."""
        retrying = Retrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception_type(TransientProviderError),
            sleep=self._sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            result: T = retrying(self._once, request, before)
            return result
        except TransientProviderError as exc:
            tries = self.max_retries + 1
            # One class per failure for every service: a service still refusing (429) is
            # RateLimited (PE010), as Claude's refusal and a tenant's limit are.
            cls = RateLimited if exc.kind == "rate_limited" else ProviderError
            raise cls(f"{self.what}: gave up after {tries} "
                      f"attempt{'s' if tries != 1 else ''}; last error: {exc}",
                      kind=exc.kind) from exc

    def _once(self, request: Callable[[], T], before: Callable[[], None] | None) -> T:
        if before is not None:
            before()
        try:
            return request()
        except ProviderError as exc:
            self.report(exc)
            if (isinstance(exc, TransientProviderError) and exc.retry_after is not None
                    and exc.retry_after > self.max_retry_after):
                raise RateLimited(
                    f"{self.what}: the service asks to wait {exc.retry_after:g} s, more "
                    f"than max_retry_after ({self.max_retry_after:g} s); try again later "
                    f"({exc})"
                ) from exc
            raise

    def report(self, error: ProviderError) -> None:
        """Tell `on_error` of a failed request; a failure to report it never hides the error
        itself."""
        if self._on_error is None:
            return
        try:
            self._on_error(error)
        except Exception as exc:  # the provider's error is the one to raise
            _log.warning("%s: could not count a failed request (%s)", self.what, exc)

    def _log_retry(self, state: RetryCallState) -> None:
        _log.info("%s: attempt %d of %d failed (%s); retrying in %.1f s", self.what,
                  state.attempt_number, self.max_retries + 1,
                  state.outcome.exception() if state.outcome else None,
                  state.upcoming_sleep)

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, TransientProviderError) and error.retry_after is not None:
            return error.retry_after
        return self._backoff(state)
