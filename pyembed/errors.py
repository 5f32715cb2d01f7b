"""One error hierarchy for pyembed; each database-side error has its own SQLSTATE."""

from __future__ import annotations

from typing import ClassVar


class PyembedError(Exception):
    """Base of every error pyembed raises on purpose."""

    sqlstate: ClassVar[str | None] = None


class ConfigError(PyembedError):
    """The environment or configuration is wrong (missing tool, bad DSN, bad setting)."""


class DatabaseNotReady(PyembedError):
    """The local cluster is not initialised or not running, or the schema is missing."""


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
    """A migration step was refused (one already running, gate not met, wrong step)."""

    sqlstate = "PE007"


class MissingAPIKey(PyembedError):
    """The provider's API key environment variable is not set."""

    sqlstate = "PE008"


class ProviderError(PyembedError):
    """The embedding or generation service failed after retries, or answered wrongly."""

    sqlstate = "PE009"


class RateLimited(ProviderError):
    """The service asked us to wait longer than we are willing to."""

    sqlstate = "PE010"


_BY_SQLSTATE: dict[str, type[PyembedError]] = {
    cls.sqlstate: cls
    for cls in (ModelMismatch, UnknownCorpus, InvalidVector, ModelKeyLocked, InvalidInput,
                UnknownModel, MigrationError, MissingAPIKey, ProviderError, RateLimited)
    if cls.sqlstate
}


def from_sqlstate(sqlstate: str | None, message: str) -> PyembedError | None:
    """The pyembed error for a database error's SQLSTATE, or None if it is not one of ours."""
    cls = _BY_SQLSTATE.get(sqlstate or "")
    return cls(message) if cls else None
