"""One client per service and one retry policy for all (pyembed.retry.Retrier): read
from pyembed's code, so that a new SDK client or a second retry loop fails here. Before, Claude's
answers were retried by the Anthropic SDK's own policy (no max_retry_after, no 'gave up after')."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

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


RETRY_WORDS = ("max_retries", "max_retry_after", "retries")


def _literal_number(node: ast.AST | None) -> bool:
    return (isinstance(node, ast.Constant) and isinstance(node.value, int | float)
            and not isinstance(node.value, bool))


def test_no_call_site_has_its_own_retry_count_or_wait() -> None:
    """One count and one longest wait for every provider call, in pyembed/retry.py: no other
    module of pyembed/ gives a number as a retry count or a Retry-After cap (a parameter's
    default, an argument, the in-database setting's default), but the SDKs' own retries
    turned off (max_retries=0). Before, Claude's answers had their own count (2, where the
    embedder's and reranker's was 6)."""
    own = []
    for path in _files():
        if path.name == "retry.py" and path.parent.name == "pyembed":
            continue
        where = path.relative_to(REPO)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args
                positional = [*args.posonlyargs, *args.args]
                pairs = [*zip(positional[len(positional) - len(args.defaults):], args.defaults,
                              strict=True),
                         *zip(args.kwonlyargs, args.kw_defaults, strict=True)]
                own += [f"{where}:{node.lineno} {node.name}({a.arg}={ast.unparse(d)})"
                        for a, d in pairs if a.arg in RETRY_WORDS and _literal_number(d)]
            elif isinstance(node, ast.Call):
                own += [f"{where}:{node.lineno} {k.arg}={ast.unparse(k.value)}"
                        for k in node.keywords
                        if k.arg in RETRY_WORDS and _literal_number(k.value)
                        and not (k.arg == "max_retries" and k.value.value == 0)]  # type: ignore[attr-defined]
                # The session's setting read with its default (indb._setting).
                if (len(node.args) >= 3 and isinstance(node.args[1], ast.Constant)
                        and node.args[1].value in ("http_retries",)
                        and _literal_number(node.args[2])):
                    own.append(f"{where}:{node.lineno} http_retries default "
                               f"{ast.unparse(node.args[2])}")
    assert own == []


def test_every_provider_call_makes_as_many_attempts_by_default(
        client: Any, fake_api: Any, monkeypatch: Any) -> None:
    """An embedding, a rerank and a Claude answer, each with its defaults, against a service
    that keeps answering 429 (retry at once): each makes the same number of attempts, the
    policy's count plus one. Before, Claude gave up after 3 and the others after 7."""
    import pyembed
    from pyembed import rag
    from pyembed.embedder import Embedder
    from pyembed.models import registry
    from pyembed.providers import provider_for
    from pyembed.rerank import Reranker, reranker_spec
    from pyembed.retry import DEFAULT_RETRIES

    for name in ("OPENAI_API_KEY", "COHERE_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.setenv(name, "key-for-the-fake")
    corpus = client.create_corpus("retried", "fake/fake-hash@1:384")
    corpus.add([("a", "the quota of compute hours")])
    spec = registry.get("openai/text-embedding-3-small@1:1536")
    calls = {
        "openai": lambda: Embedder(spec, provider_for(spec)).embed(["a text"]),
        "cohere": lambda: Reranker(reranker_spec("cohere/rerank-v3.5")).scores("q", ["a"]),
        "anthropic": lambda: rag.answer(corpus, "What is the quota?", k=1),
    }
    attempts = {}
    for service, call in calls.items():
        fake_api.reset()
        fake_api.script(["429:retry-after=0"] * 20)
        with pytest.raises(pyembed.RateLimited, match="gave up after"):
            call()
        attempts[service] = len(fake_api.requests_to(service))
    assert attempts == dict.fromkeys(calls, DEFAULT_RETRIES + 1)
