"""Embedding providers: Voyage, OpenAI, Cohere, the local models (MiniLM, multilingual e5) and a
fake for tests.

Each provider module imports its SDK, so `provider_for` imports only the one it needs.
"""

from __future__ import annotations

import importlib

from ..errors import ConfigError
from ..models import ModelSpec
from .base import Provider, TransientProviderError, Vectors

__all__ = ["Provider", "TransientProviderError", "Vectors", "provider_for"]

_CLASSES: dict[str, tuple[str, str]] = {
    "voyage": ("pyembed.providers.voyage", "VoyageProvider"),
    "openai": ("pyembed.providers.openai", "OpenAIProvider"),
    "cohere": ("pyembed.providers.cohere", "CohereProvider"),
    "local": ("pyembed.providers.local", "LocalProvider"),
    "fake": ("pyembed.providers.fake", "FakeProvider"),
}

_BY_MODEL: dict[tuple[str, str], tuple[str, str]] = {
    ("local", "multilingual-e5-small-q4"): ("pyembed.providers.e5", "E5Provider"),
}
"""Models served by a class of their own within their provider (looked up first)."""


def provider_for(spec: ModelSpec, *, api_key: str | None = None, base_url: str | None = None,
                 timeout: float = 30.0) -> Provider:
    """A provider for `spec`'s model (raises MissingAPIKey if it needs a key that is unset)."""
    try:
        module_name, class_name = _BY_MODEL.get((spec.provider, spec.model_id)) or \
            _CLASSES[spec.provider]
    except KeyError:
        raise ConfigError(
            f"no provider named {spec.provider!r} (model {spec.key}); "
            f"known: {', '.join(sorted(_CLASSES))}"
        ) from None
    cls: type[Provider] = getattr(importlib.import_module(module_name), class_name)
    return cls(spec, api_key=api_key, base_url=base_url, timeout=timeout)
