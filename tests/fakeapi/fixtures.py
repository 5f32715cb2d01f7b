"""pytest fixtures for the fake API server; load with `pytest_plugins`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .server import FakeAPI


@pytest.fixture(scope="session")
def fake_api_server() -> Iterator[FakeAPI]:
    """One fake API server for the whole session."""
    with FakeAPI() as server:
        yield server


@pytest.fixture
def fake_api(fake_api_server: FakeAPI, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAPI]:
    """The session's fake API server with an empty script and request log, and
    PYEMBED_{VOYAGE,OPENAI,COHERE}_BASE_URL and ANTHROPIC_BASE_URL pointing at it."""
    fake_api_server.reset()
    for name, value in fake_api_server.env().items():
        monkeypatch.setenv(name, value)
    yield fake_api_server
    fake_api_server.reset()
