"""One error hierarchy for pyembed; each database-side error has its own SQLSTATE."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import ClassVar
from urllib.parse import parse_qsl, unquote, urlsplit


class PyembedError(Exception):
    """Base of every error pyembed raises on purpose. `hint`, when given, is what to do about it:
    shown after the message as "(hint: ...)", as an error from SQL shows its HINT
    (pyembed.db.translate), and raised in SQL as the HINT (pyembed.indb.sql_error)."""

    sqlstate: ClassVar[str | None] = None

    def __init__(self, *args: object, hint: str | None = None) -> None:
        super().__init__(*args)
        self.hint = hint

    @property
    def said(self) -> str:
        """The message without its hint."""
        return super().__str__()

    def __str__(self) -> str:
        return f"{self.said} (hint: {self.hint})" if self.hint else self.said


class ConfigError(PyembedError):
    """The environment or configuration is wrong (missing tool, bad DSN, bad setting; in SQL, a
    provider's base URL or a model the provider does not serve): the owner's to fix, not the
    service's failure, so it has its own SQLSTATE."""

    sqlstate = "PE013"


class DatabaseNotReady(PyembedError):
    """The local cluster is not initialised or not running, the schema is missing, the
    connection was lost, or the client was closed."""


class InstallError(PyembedError):
    """Bringing the schema to head failed (the transaction was rolled back)."""


class ModelMismatch(PyembedError):
    """A vector or query was made by a model other than the corpus's pinned one."""

    sqlstate = "PE001"


class UnknownCorpus(PyembedError):
    """No corpus of that name."""

    sqlstate = "PE002"


class InvalidVector(PyembedError):
    """Wrong dimensions, NaN/Inf, zero or non-normalised vector."""

    sqlstate = "PE003"


class ModelKeyLocked(PyembedError):
    """A corpus's model key was changed outside the migration workflow."""

    sqlstate = "PE004"


class InvalidInput(PyembedError):
    """Bad user input: empty, oversized or NUL-containing text, a bad corpus name, ..."""

    sqlstate = "PE005"


class UnknownModel(PyembedError):
    """No model with that key in the registry."""

    sqlstate = "PE006"


class MigrationError(PyembedError):
    """A migration step was refused (one already running, gate not met, wrong step); or a schema
    script printed for one revision was applied to a database at another (pyembed install --sql
    --from)."""

    sqlstate = "PE007"


class MissingAPIKey(PyembedError):
    """The provider's API key environment variable is not set."""

    sqlstate = "PE008"


class NotEmbeddedYet(UserWarning):
    """A vector or hybrid search found fewer hits than asked for while chunks of its corpus wait
    in the queue for the worker (`pyembed worker`): no vector search finds them until they are
    embedded. From the NOTICE pyembed's SQL sends then (SQLSTATE NOT_EMBEDDED_YET)."""


NOT_EMBEDDED_YET = "01PE1"
"""The SQLSTATE of that NOTICE (pyembed._queued_notice, sql/030-search.sql)."""


ERROR_KINDS = ("rate_limited", "server_error", "no_response", "rejected", "bad_answer")
"""How a provider call can fail, as pyembed counts it (pyembed.provider_errors())."""


SHOWN_CHARACTERS = 80
"""How much of a caller's value an error message quotes (pyembed._quoted in SQL alike)."""


NONFINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def shown(value: object) -> str:
    """A caller's value as an error message quotes it: repr of its first SHOWN_CHARACTERS
    characters (repr escapes control and format characters: a terminal's escape sequence, a
    right-to-left override that reorders the message as shown), with how long it was when longer
    (a 1 MB value is not read back in every error and log line)."""
    if isinstance(value, float) and not math.isfinite(value):
        return NONFINITE[repr(value)]  # as PostgreSQL writes them: one wording from SQL and Python
    if not isinstance(value, str):
        return repr(value)
    more = f"... ({len(value)} characters)" if len(value) > SHOWN_CHARACTERS else ""
    return repr(value[:SHOWN_CHARACTERS]) + more


def stopped(exc: BaseException, corpus: str, what: str, kept: str) -> BaseException:
    """The error a long run over one corpus (`what`: an ingest, a backfill, a vector load)
    raises when `exc` stopped it: `exc` with the note `kept` (what it kept and how a rerun
    resumes), unless `exc` is UnknownCorpus. Each run looks its corpus up before it starts, so
    that error means a drop took the corpus meanwhile, and what the run wrote went with it: a
    rerun has nothing to resume (it finds no corpus). Whichever statement found it gone (SQL's
    'unknown corpus id N', a partition gone), the run says so in one wording, its corpus's
    name, as a lookup by name does."""
    if not isinstance(exc, UnknownCorpus):
        exc.add_note(kept)
        return exc
    said = f"unknown corpus {shown(corpus)}"
    dropped = exc if str(exc).startswith(f"{said} ") else UnknownCorpus(f"{said} {_LOOKUP_HINT}")
    dropped.add_note(f"{what} stopped: corpus {shown(corpus)} was dropped while it ran, and what "
                     "it had written went with it (nothing to resume)")
    dropped.__suppress_context__ = True  # (raised in place of exc, as `from None` would)
    return dropped


_LOOKUP_HINT = "(hint: `pyembed corpus list` shows the corpora)"
"""What pyembed.lookup_corpus's PE002 adds after its message (its HINT, as db.translate shows
one)."""


def status_kind(status: int | None) -> str:
    """The kind (ERROR_KINDS) of a failed HTTP call with this status, for every service: no
    status (no answer at all) no_response, 429 rate_limited, 408, 409 and 5xx server_error,
    any other status rejected."""
    if status is None:
        return "no_response"
    if status == 429:
        return "rate_limited"
    return "server_error" if status in (408, 409) or status >= 500 else "rejected"


class ProviderError(PyembedError):
    """The embedding or generation service failed after retries, or answered wrongly.

    `kind` is one of ERROR_KINDS: the service refused (429: rate_limited; other 4xx:
    rejected), failed (5xx, 408, 409: server_error), did not answer (no_response), or
    answered with something unusable (bad_answer).
    """

    sqlstate = "PE009"

    def __init__(self, message: str, *, kind: str = "bad_answer") -> None:
        super().__init__(message)
        self.kind = kind


class RateLimited(ProviderError):
    """The service asked us to wait longer than we are willing to."""

    sqlstate = "PE010"

    def __init__(self, message: str, *, kind: str = "rate_limited") -> None:
        super().__init__(message, kind=kind)


class ReadOnlyReplica(PyembedError):
    """A call that must write (to account a provider call) was made on a read-only replica or
    in a read-only transaction; or the replica has not yet replayed what this client wrote."""

    sqlstate = "PE011"


class Busy(PyembedError):
    """What a call needed was held by another session for longer than the call waits (a
    corpus's drop: its row and vectors; a lock timeout, such as a bulk load's or an index swap's
    5 s, or your own lock_timeout; a deadlock), or the statement ran past the session's
    statement_timeout: it changed nothing. Retry later. Mapped from PE012, and from SQLSTATE
    55P03 (lock not available), 40P01 (deadlock), 40001 (a serializable or repeatable read
    transaction's conflict) and 57014 (statement timeout, a cancel)."""

    sqlstate = "PE012"


class NotAllowed(PyembedError):
    """The role may not do this directly: write a column or table that pyembed's functions and
    triggers write (a document's doc_no, a corpus row), or that is the owner's (OwnerOnly).
    Mapped from SQLSTATE 42501 (insufficient privilege), and from PE014 (raised in SQL)."""

    sqlstate = "PE014"


class OwnerOnly(NotAllowed):
    """An operation that is pyembed's owner role's (index settings, status and rebuilds, the model
    registry, model migrations, tenants and their members, secrets) was called as another role,
    the application role: run it with the owner's DSN ($PYEMBED_OWNER_DSN, the owner commands'
    --dsn). Mapped from SQLSTATE 42501 (insufficient privilege) on a function, table or sequence,
    and from PE015 (raised in SQL)."""

    sqlstate = "PE015"


def _classes(base: type[PyembedError]) -> list[type[PyembedError]]:
    """`base` and its subclasses defined here (one elsewhere, such as a provider's transient
    error, takes its parent's SQLSTATE and comes back as its parent)."""
    return [base] + [c for sub in base.__subclasses__() if sub.__module__ == __name__
                     for c in _classes(sub)]


CLIENT_ONLY: tuple[type[PyembedError], ...] = (DatabaseNotReady, InstallError)
"""Errors of the client side alone (reaching the database, installing): never raised inside
SQL, so without a SQLSTATE; one raised there would be a bug (XX000, indb.sql_error)."""

_BY_SQLSTATE: dict[str, type[PyembedError]] = {
    cls.sqlstate: cls for cls in _classes(PyembedError) if cls.sqlstate}
"""Every error class raised in SQL, by its own SQLSTATE (PExxx)."""


def from_sqlstate(sqlstate: str | None, message: str) -> PyembedError | None:
    """The pyembed error for a database error's SQLSTATE, or None if it is not one of ours."""
    cls = _BY_SQLSTATE.get(sqlstate or "")
    return cls(message) if cls else None


_URL = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*)://(?:[^\s/?#@'\"<>()]*@)?([^\s/?#'\"<>()]+)"
                  r"[^\s'\"<>()]*")
_QUERY = re.compile(r"\?[\w.~%-]+=[^\s'\"<>()]*")
_TOKEN = re.compile(r"\b(Bearer|Basic)\s+[\w.~+/=-]{8,}", re.IGNORECASE)
_KEY = re.compile(r"\b(?:sk|pa|al)-[\w-]{8,}")
_SHORTEST_SECRET = 4
"""Shorter literal secrets are not searched for: they would match ordinary words."""


def redact(message: str, *, secrets: Iterable[str | None] = (),
           base_url: str | None = None) -> str:
    """`message` fit to show any role: each of `secrets` (API keys) and the user info, path and
    query of `base_url` removed wherever they appear, every URL cut to scheme://host[:port],
    query strings, bearer or basic credentials and key-shaped tokens replaced."""
    for secret in secrets:
        if secret and len(secret) >= _SHORTEST_SECRET:
            message = message.replace(secret, "<api key>")
    if base_url:
        message = _without_url_parts(message, base_url)
    message = _URL.sub(r"\1://\2", message)
    message = _QUERY.sub("?<redacted>", message)
    message = _TOKEN.sub(r"\1 <api key>", message)
    return _KEY.sub("<api key>", message)


def _without_url_parts(message: str, url: str) -> str:
    try:
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        literals = [userinfo, parts.username, parts.password, parts.query,
                    *(value for _, value in parse_qsl(parts.query))]
    except ValueError:
        return message
    path = parts.path.rstrip("/")
    for shown in {path, unquote(path)} if path else ():
        # The SDKs append their endpoint (and sometimes put the query) after the path.
        message = re.sub(re.escape(shown) + r"[^\s'\"<>()]*", "<redacted>", message)
    # A service may echo them percent-decoded.
    decoded = [unquote(literal) for literal in literals if literal]
    for literal in sorted({*filter(None, literals), *decoded}, key=len, reverse=True):
        if len(literal) >= _SHORTEST_SECRET:
            message = message.replace(literal, "<redacted>")
    return message
