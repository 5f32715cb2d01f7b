"""One client per service and one retry policy for all (pyembed.retry.Retrier): read
from pyembed's code, so that a new SDK client or a second retry loop fails here. Before, Claude's
answers were retried by the Anthropic SDK's own policy (no max_retry_after, no 'gave up after')."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SDK_CLIENTS = {"OpenAI", "ClientV2", "Anthropic", "AsyncOpenAI", "AsyncAnthropic"}
"""The service SDKs' client classes (openai, cohere, anthropic; voyageai's API resources make
no client)."""


def _files() -> list[Path]:
    return [p for p in sorted(REPO.glob("pyembed/**/*.py"))
            if "data" not in p.relative_to(REPO).parts]


def test_every_sdk_client_pyembed_makes_leaves_retries_to_the_retrier() -> None:
    """Every construction of an SDK client (and every with_options copy) in pyembed/ turns the
    SDK's retries off: max_retries=0."""
    made = []
    for path in _files():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = (node.func.attr if isinstance(node.func, ast.Attribute) else
                    node.func.id if isinstance(node.func, ast.Name) else "")
            if name in SDK_CLIENTS | {"with_options"}:
                retries = [k.value for k in node.keywords if k.arg == "max_retries"]
                zero = len(retries) == 1 and isinstance(retries[0], ast.Constant) and (
                    retries[0].value == 0)
                made.append((f"{path.relative_to(REPO)}:{node.lineno} {name}", zero))
    assert {where.split()[1] for where, _ in made} >= {"OpenAI", "ClientV2", "Anthropic"}
    assert [where for where, zero in made if not zero] == []


def test_retries_are_made_in_one_place() -> None:
    """tenacity (the retry loop) is used by pyembed/retry.py alone."""
    def imports_tenacity(node: ast.AST) -> bool:
        if isinstance(node, ast.ImportFrom):
            return (node.module or "").startswith("tenacity")
        return isinstance(node, ast.Import) and any(a.name.startswith("tenacity")
                                                    for a in node.names)

    users = sorted(str(p.relative_to(REPO)) for p in _files()
                   if any(imports_tenacity(n) for n in ast.walk(ast.parse(p.read_text()))))
    assert users == ["pyembed/retry.py"]


HTTP_MODULES = {"openai", "cohere", "voyageai", "anthropic", "httpx", "requests", "urllib3",
                "aiohttp", "urllib.request", "http.client"}
ONE_CLIENT_EACH = {
    # The one module of pyembed that talks to each service (and so its one client): the SDK it
    # imports. PL/Python reaches the same modules through pyembed.indb (provider_for, reranker_for).
    "pyembed/providers/openai.py": {"openai"},
    "pyembed/providers/cohere.py": {"cohere", "httpx"},  # httpx: the SDK's timeout errors
    "pyembed/providers/voyage.py": {"voyageai", "requests"},  # requests: its session, no retries
    "pyembed/rag.py": {"anthropic"},
}


def test_each_service_is_called_from_one_module() -> None:
    """Every import of an HTTP library or a service's SDK in pyembed/ (a new one included) is
    its service's one module: no second client of a service (PL/Python had one of its own once)."""
    found: dict[str, set[str]] = {}
    for path in _files():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            for name in names:
                top = next((m for m in HTTP_MODULES if name == m or name.startswith(m + ".")),
                           None)
                if top:
                    found.setdefault(str(path.relative_to(REPO)), set()).add(top)
    assert found == ONE_CLIENT_EACH
