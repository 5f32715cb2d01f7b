"""pyembed: the embedding model as an enforced part of the PostgreSQL schema."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import loaded

__version__ = "0.1.0"

# Inside PostgreSQL, whichever module a PL/Python body imports (pyembed.indb, pyembed.bm25 for
# a keyword search, pyembed.config for doctor's probe): which code this backend runs, for doctor.
loaded.announce()

# Names are imported on first use (PEP 562): PL/Python imports small modules of this package
# (pyembed.bm25 for every session's first keyword search) without the client, SQLAlchemy and
# the providers behind these names.
_WHERE = {
    "AddReport": "client", "Client": "client", "Corpus": "client", "Document": "client",
    "connect": "client",
    "Busy": "errors", "ConfigError": "errors", "DatabaseNotReady": "errors",
    "InstallError": "errors",
    "InvalidInput": "errors", "InvalidVector": "errors", "MigrationError": "errors",
    "MissingAPIKey": "errors", "ModelKeyLocked": "errors", "ModelMismatch": "errors",
    "NotAllowed": "errors", "NotEmbeddedYet": "errors", "OwnerOnly": "errors",
    "ProviderError": "errors", "PyembedError": "errors",
    "RateLimited": "errors",
    "ReadOnlyReplica": "errors", "UnknownCorpus": "errors", "UnknownModel": "errors",
    "LOCAL_DEFAULT": "models", "LOCAL_MULTILINGUAL": "models", "InputType": "models",
    "ModelSpec": "models", "registry": "models",
    "install": "schema",
    "Hit": "search",
}

if TYPE_CHECKING:
    from .client import AddReport, Client, Corpus, Document, connect
    from .errors import (
        Busy,
        ConfigError,
        DatabaseNotReady,
        InstallError,
        InvalidInput,
        InvalidVector,
        MigrationError,
        MissingAPIKey,
        ModelKeyLocked,
        ModelMismatch,
        NotAllowed,
        NotEmbeddedYet,
        OwnerOnly,
        ProviderError,
        PyembedError,
        RateLimited,
        ReadOnlyReplica,
        UnknownCorpus,
        UnknownModel,
    )
    from .models import LOCAL_DEFAULT, LOCAL_MULTILINGUAL, InputType, ModelSpec, registry
    from .schema import install
    from .search import Hit


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'pyembed' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = [
    "LOCAL_DEFAULT",
    "LOCAL_MULTILINGUAL",
    "AddReport",
    "Busy",
    "Client",
    "ConfigError",
    "Corpus",
    "DatabaseNotReady",
    "Document",
    "Hit",
    "InputType",
    "InstallError",
    "InvalidInput",
    "InvalidVector",
    "MigrationError",
    "MissingAPIKey",
    "ModelKeyLocked",
    "ModelMismatch",
    "ModelSpec",
    "NotAllowed",
    "NotEmbeddedYet",
    "OwnerOnly",
    "ProviderError",
    "PyembedError",
    "RateLimited",
    "ReadOnlyReplica",
    "UnknownCorpus",
    "UnknownModel",
    "__version__",
    "connect",
    "install",
    "registry",
]
