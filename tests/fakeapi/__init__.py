"""A local stand-in for the Voyage, OpenAI, Cohere and Anthropic HTTP APIs, for tests."""

from .server import Behaviour, FakeAPI, Recorded, server_vectors

__all__ = ["Behaviour", "FakeAPI", "Recorded", "server_vectors"]
