"""pyembed: the embedding model as an enforced part of the PostgreSQL schema."""

__version__ = "0.1.0"

from .client import AddReport, Client, Corpus, Document, connect
from .errors import (
    ConfigError,
    DatabaseNotReady,
    InstallError,
    InvalidInput,
    InvalidVector,
    MigrationError,
    MissingAPIKey,
    ModelKeyLocked,
    ModelMismatch,
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

__all__ = [
    "LOCAL_DEFAULT",
    "LOCAL_MULTILINGUAL",
    "AddReport",
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
