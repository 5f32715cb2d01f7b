"""One threaded HTTP server on 127.0.0.1 that answers like the Voyage, OpenAI, Cohere and
Anthropic APIs, so the real SDKs can be tested without a network.

Each service lives under its own prefix (see `FakeAPI.base_url`), behind which the paths
are the real ones: /voyage/v1/embeddings, /openai/v1/embeddings, /cohere/v2/embed,
/anthropic/v1/messages. A gateway's path before the prefix (a base URL such as
http://user:pw@127.0.0.1:<port>/gateway-token/voyage/v1?sig=...) reaches the same service.
Every request is recorded, then answered by the next scripted `Behaviour` (or normally once
the script is used up). Error messages echo what a careless gateway would: the key given and
the request's URL.
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
import math
import re
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from pyembed.limits import limits_for
from pyembed.models import registry
from pyembed.providers.fake import fake_vectors
from pyembed.providers.rerank import fake_scores

from .tokens import service_tokens

Service = Literal["voyage", "openai", "cohere", "anthropic"]
Kind = Literal["ok", "status", "hang", "slow", "short", "wrongdims", "indexes", "nan", "notjson",
               "empty", "strings"]

_ROUTES: dict[str, Service] = {
    "/voyage/v1/embeddings": "voyage",
    "/openai/v1/embeddings": "openai",
    "/cohere/v2/embed": "cohere",
    "/voyage/v1/rerank": "voyage",
    "/cohere/v2/rerank": "cohere",
    "/anthropic/v1/messages": "anthropic",
}
_ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error",
                     403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                     429: "rate_limit_error", 529: "overloaded_error"}


@dataclass(frozen=True)
class Behaviour:
    """How the server answers one request.

    ok: a normal answer. status: an error with that HTTP status (and a Retry-After header
    if `retry_after` is set). hang: no answer until the server's `hang_seconds` pass, then
    the connection closes. slow: a normal answer after `delay` seconds. short: one vector
    too few (Anthropic: an answer cut off, and a stream that stops before message_stop).
    wrongdims: vectors of half the dimensions.
    indexes: one embedding per listed index, labelled with it and carrying the vector of the
    text at that index modulo the number of texts (Cohere's answer has no indexes: it gets
    those vectors in that order).
    nan: NaN as the first number of the first vector (JSON's NaN token, or in base64).
    Rerank endpoints: short is one score too few, indexes one score per listed index, and
    nan a NaN score for the first document.
    Answers not in the service's format, from every endpoint: notjson is a 200 whose body is
    an HTML page (a gateway's), empty a 200 whose body is `{}`; strings (embeddings) gives
    each vector's numbers as JSON strings ("0.25").
    """

    kind: Kind = "ok"
    status: int = 200
    retry_after: str | None = None
    indexes: tuple[int, ...] = ()
    delay: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Behaviour:
        """"ok", "hang", "short", "wrongdims", "nan", "<status>", "<status>:retry-after=<value>",
        "indexes=<i>,<j>,..." or "slow=<seconds>", e.g. "429:retry-after=2", "indexes=1,1,0,3"
        or "slow=2.5"."""
        if text.startswith("slow="):
            try:
                return cls(kind="slow", delay=float(text.removeprefix("slow=")))
            except ValueError:
                raise ValueError(f"unknown behaviour {text!r}") from None
        if text in ("ok", "hang", "short", "wrongdims", "nan", "notjson", "empty", "strings"):
            return cls(kind=text)  # type: ignore[arg-type]
        if text.startswith("indexes="):
            listed = text.removeprefix("indexes=").split(",")
            if not all(item.isdigit() for item in listed):
                raise ValueError(f"unknown behaviour {text!r}")
            return cls(kind="indexes", indexes=tuple(int(item) for item in listed))
        status, _, option = text.partition(":")
        name, _, value = option.partition("=")
        if not status.isdigit() or not 400 <= int(status) <= 599 or (option and (
                name != "retry-after" or not value)):
            raise ValueError(f"unknown behaviour {text!r}")
        return cls(kind="status", status=int(status), retry_after=value or None)


@dataclass(frozen=True)
class Recorded:
    """One request as the server received it: `path` is the service's own route, `target`
    what the request line asked for (a gateway prefix and query string included)."""

    service: Service
    path: str
    headers: dict[str, str]
    body: Any
    behaviour: Behaviour
    target: str = ""


def server_vectors(service: str, model: str, texts: Sequence[str],
                   dimensions: int) -> npt.NDArray[np.float32]:
    """The vectors the server returns for `texts` (deterministic, unit length)."""
    return fake_vectors(texts, space=f"{service}/{model}", dimensions=dimensions)


class _BadRequest(Exception):
    pass


class FakeAPI:
    """The server: start it (or use it as a context manager), point clients at
    `base_url(service)` or export `env()`, `script` behaviours, read `requests`."""

    def __init__(self, *, hang_seconds: float = 10.0,
                 reply_text: str = "This is a fake answer from the test server.") -> None:
        self.hang_seconds = hang_seconds
        self.reply_text = reply_text
        """What the fake Claude answers to every message (restored by `reset`)."""
        self._default_reply = reply_text
        self._lock = threading.Lock()
        self._script: collections.deque[Behaviour] = collections.deque()
        self._requests: list[Recorded] = []
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """http://127.0.0.1:<port>"""
        if self._httpd is None:
            raise RuntimeError("the fake API server is not running")
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def base_url(self, service: Service) -> str:
        """The base URL to give `service`'s SDK (or pyembed's PYEMBED_*_BASE_URL)."""
        suffix = "/v1" if service in ("voyage", "openai") else ""
        return f"{self.url}/{service}{suffix}"

    def env(self) -> dict[str, str]:
        """Environment variables that point pyembed's providers and the Anthropic SDK here."""
        return {
            "PYEMBED_VOYAGE_BASE_URL": self.base_url("voyage"),
            "PYEMBED_OPENAI_BASE_URL": self.base_url("openai"),
            "PYEMBED_COHERE_BASE_URL": self.base_url("cohere"),
            "ANTHROPIC_BASE_URL": self.base_url("anthropic"),
        }

    def script(self, *behaviours: str | Behaviour | Iterable[str | Behaviour]) -> None:
        """Queue behaviours for the next requests, in order: `script("500", "ok")` or
        `script(["429:retry-after=1", "ok"])`; strings are read by `Behaviour.parse`."""
        flat = [item for b in behaviours
                for item in ([b] if isinstance(b, str | Behaviour) else b)]
        parsed = [b if isinstance(b, Behaviour) else Behaviour.parse(b) for b in flat]
        with self._lock:
            self._script.extend(parsed)

    @property
    def pending(self) -> int:
        """Scripted behaviours not used yet."""
        with self._lock:
            return len(self._script)

    @property
    def requests(self) -> list[Recorded]:
        """Every request received since the last reset, in arrival order."""
        with self._lock:
            return list(self._requests)

    def requests_to(self, service: Service) -> list[Recorded]:
        """The requests received by one service."""
        return [r for r in self.requests if r.service == service]

    def reset(self) -> None:
        """Forget the script and the request log, and restore the default reply."""
        with self._lock:
            self._script.clear()
            self._requests.clear()
            self.reply_text = self._default_reply

    def start(self) -> FakeAPI:
        """Listen on a free port of 127.0.0.1, in a background thread."""
        self._stopping.clear()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="fake-api", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and release hanging requests."""
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeAPI:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _record(self, path: str, target: str, headers: dict[str, str],
                body: Any) -> Behaviour:
        service = _ROUTES[path]
        with self._lock:
            behaviour = self._script.popleft() if self._script else Behaviour()
            self._requests.append(Recorded(service, path, headers, body, behaviour, target))
        return behaviour


def _handler_for(api: FakeAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        fake = api

    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeAPI

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output clean."""

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        path = _route(self.path)
        if path is None:
            self._json(404, {"error": f"no route {self.path}"})
            return
        service = _ROUTES[path]
        try:
            body: Any = json.loads(raw or b"null")
        except ValueError:
            body = raw.decode("utf-8", "replace")
        headers = {k.lower(): v for k, v in self.headers.items()}
        behaviour = self.fake._record(path, self.path, headers, body)
        try:
            self._answer(service, path, headers, body, behaviour)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _answer(self, service: Service, path: str, headers: dict[str, str], body: Any,
                behaviour: Behaviour) -> None:
        if behaviour.kind == "hang":
            self.fake._stopping.wait(self.fake.hang_seconds)
            self.close_connection = True
            return
        if behaviour.kind == "slow":
            self.fake._stopping.wait(behaviour.delay)  # then answers as "ok"
        key = _api_key(service, headers)
        if not key:
            self._error(service, 401, "no API key given")
            return
        if behaviour.kind == "notjson":
            self._body(200, b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html")
            return
        if behaviour.kind == "empty":
            self._json(200, {})
            return
        if behaviour.kind == "status":
            message = (f"Incorrect API key provided: {key}; request: POST {self.path}"
                       if behaviour.status == 401 else
                       f"fake failure with HTTP {behaviour.status}; request: POST "
                       f"http://{headers.get('host', '')}{self.path}")
            self._error(service, behaviour.status, message, behaviour.retry_after)
            return
        try:
            if service == "anthropic":
                self._messages(body, behaviour)
            elif path.endswith("/rerank"):
                self._json(200, _rerank(service, body, behaviour))
            else:
                self._json(200, _embeddings(service, body, behaviour))
        except _BadRequest as exc:
            self._error(service, 400, str(exc))

    def _json(self, status: int, payload: object,
              extra_headers: dict[str, str] | None = None) -> None:
        self._body(status, json.dumps(payload).encode(), "application/json", extra_headers)

    def _body(self, status: int, data: bytes, content_type: str,
              extra_headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (extra_headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, service: Service, status: int, message: str,
               retry_after: str | None = None) -> None:
        payload: object
        if service == "voyage":
            payload = {"detail": message}
        elif service == "openai":
            payload = {"error": {"message": message, "type": "invalid_request_error"
                                 if status < 500 else "server_error", "param": None,
                                 "code": None}}
        elif service == "cohere":
            payload = {"message": message}
        else:
            payload = {"type": "error", "error": {
                "type": _ANTHROPIC_ERRORS.get(status, "api_error"), "message": message}}
        self._json(status, payload, {"Retry-After": retry_after} if retry_after else None)

    def _messages(self, body: Any, behaviour: Behaviour) -> None:
        if not isinstance(body, dict) or not isinstance(body.get("max_tokens"), int):
            raise _BadRequest("max_tokens: Field required")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("messages: at least one message is required")
        # The service's own check: the prompt and max_tokens within the context window.
        sent = json.dumps(messages, ensure_ascii=False)  # (the text, not its \u escapes)
        prompt = service_tokens(sent) + service_tokens(str(body.get("system")))
        context = limits_for("anthropic").request_tokens or 0
        if prompt + body["max_tokens"] > context:
            raise _BadRequest(f"prompt is too long: {prompt} tokens > "
                              f"{context - body['max_tokens']} maximum")
        words = self.fake.reply_text.split(" ")
        cut = behaviour.kind == "short"
        if cut:
            words = words[:max(1, len(words) // 2)]
        message = {
            "id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
            "model": body.get("model", "claude"), "content": [], "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": service_tokens(sent),
                      "output_tokens": len(words)},
        }
        if not body.get("stream"):
            message["content"] = [{"type": "text", "text": " ".join(words)}]
            message["stop_reason"] = "max_tokens" if cut else "end_turn"
            self._json(200, message)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        for event in _stream_events(message, words, cut):
            self.wfile.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()


def _stream_events(message: dict[str, Any], words: list[str],
                   cut: bool) -> Iterator[dict[str, Any]]:
    start_usage = dict(message["usage"], output_tokens=1)
    yield {"type": "message_start", "message": dict(message, usage=start_usage)}
    yield {"type": "content_block_start", "index": 0,
           "content_block": {"type": "text", "text": ""}}
    yield {"type": "ping"}
    for i, word in enumerate(words):
        yield {"type": "content_block_delta", "index": 0,
               "delta": {"type": "text_delta", "text": word if i == 0 else " " + word}}
    if cut:
        return
    yield {"type": "content_block_stop", "index": 0}
    yield {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
           "usage": {"output_tokens": len(words)}}
    yield {"type": "message_stop"}


def _route(target: str) -> str | None:
    """The route a request line's target is for: one of `_ROUTES`, after any gateway path,
    with query strings removed wherever they are (the SDKs append their endpoint to a base
    URL's query string, not to its path)."""
    path = re.sub(r"\?[^/]*", "", target) + "/"
    for route in _ROUTES:
        prefix, _, endpoint = route.rpartition("/")
        if f"{prefix}/" in path and target.endswith(endpoint):
            return route
    return None


def _api_key(service: Service, headers: dict[str, str]) -> str:
    """The key a request carries: a bearer token, Anthropic's x-api-key, or "user:password"
    from Basic credentials (what the SDKs send for a base URL with user info)."""
    if service == "anthropic" and "x-api-key" in headers:
        return headers["x-api-key"]
    scheme, _, key = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(key.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return ""
    return key.strip() if scheme.lower() == "bearer" else ""


def _dimensions(service: Service, model: str, requested: object) -> int:
    if requested is not None:
        if not isinstance(requested, int) or requested < 1:
            raise _BadRequest(f"invalid output dimension {requested!r}")
        return requested
    for spec in registry.all():
        if (spec.provider, spec.model_id) == (service, model) and spec.request_dimensions is None:
            return spec.dimensions
    raise _BadRequest(f"model {model!r} not found")


def _within_limits(service: Service, model: str, texts: list[str], query: str | None = None,
                   truncation: bool = False) -> None:
    """A 400 for a request past the service's documented limits (pyembed.limits), as the
    service refuses it: too many texts, a text too long (unless the service may cut it), too
    many tokens in the request, a rerank query too long."""
    limits = limits_for(service, model)
    if limits.texts is not None and len(texts) > limits.texts:
        raise _BadRequest(f"too many inputs: {len(texts)} > {limits.texts}")
    extra = service_tokens(query) if query is not None else 0
    if query is not None and limits.query_tokens is not None and extra > limits.query_tokens:
        raise _BadRequest(f"the query is {extra} tokens, over the limit of {limits.query_tokens}")
    each = [extra + service_tokens(t) for t in texts]
    if not truncation and limits.text_tokens is not None and max(each) > limits.text_tokens:
        raise _BadRequest(f"input {max(range(len(each)), key=each.__getitem__)} is "
                          f"{max(each)} tokens, over the limit of {limits.text_tokens}")
    if limits.request_tokens is not None and sum(each) > limits.request_tokens:
        raise _BadRequest(f"the request has {sum(each)} tokens, over the limit of "
                          f"{limits.request_tokens}")


def _embeddings(service: Service, body: Any, behaviour: Behaviour) -> dict[str, Any]:
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise _BadRequest("model: Field required")
    model = body["model"]
    texts = body.get("texts") if service == "cohere" else body.get("input")
    if isinstance(texts, str) and service == "openai":
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(
            isinstance(t, str) and t for t in texts):
        raise _BadRequest("input must be a non-empty list of non-empty strings")
    requested = body.get("dimensions" if service == "openai" else "output_dimension")
    dimensions = _dimensions(service, model, requested)
    if service == "voyage" and body.get("input_type") not in (None, "query", "document"):
        raise _BadRequest(f"input_type {body.get('input_type')!r} is not query or document")
    if service == "cohere":
        if body.get("input_type") not in ("search_document", "search_query", "classification",
                                          "clustering"):
            raise _BadRequest(f"invalid input_type {body.get('input_type')!r}")
        if "float" not in (body.get("embedding_types") or ["float"]):
            raise _BadRequest("this fake serves float embeddings only")
    _within_limits(service, model, texts)
    if behaviour.kind == "wrongdims":
        dimensions //= 2
    vectors = server_vectors(service, model, texts, dimensions)
    indexes = list(range(len(texts)))
    if behaviour.kind == "short":
        vectors, indexes = vectors[:-1], indexes[:-1]
    if behaviour.kind == "indexes":
        indexes = list(behaviour.indexes)
        vectors = vectors[[i % len(texts) for i in indexes]]
    if behaviour.kind == "nan":
        vectors = vectors.copy()
        vectors[0, 0] = np.nan
    tokens = sum(service_tokens(t) for t in texts)
    values: list[list[Any]] = vectors.tolist()
    if behaviour.kind == "strings":
        values = [[str(x) for x in row] for row in values]
    if service == "cohere":
        return {"id": str(uuid.uuid4()), "response_type": "embeddings_by_type",
                "embeddings": {"float": values}, "texts": texts,
                "meta": {"api_version": {"version": "2"},
                         "billed_units": {"input_tokens": tokens}}}
    as_base64 = body.get("encoding_format") == "base64"
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
             if as_base64 else row}
            for i, v, row in zip(indexes, vectors, values, strict=True)]
    usage = ({"total_tokens": tokens} if service == "voyage"
             else {"prompt_tokens": tokens, "total_tokens": tokens})
    return {"object": "list", "data": data, "model": model, "usage": usage}


RERANKERS = {"voyage": ("rerank-2.5", "rerank-2.5-lite"), "cohere": ("rerank-v3.5",)}
"""The rerank models each fake service knows."""


def _rerank(service: Service, body: Any, behaviour: Behaviour) -> dict[str, Any]:
    """A rerank answer: `fake_scores` of each document, best first (as both services sort)."""
    if not isinstance(body, dict) or body.get("model") not in RERANKERS.get(service, ()):
        raise _BadRequest(f"model {body.get('model') if isinstance(body, dict) else None!r} "
                          "not found")
    query, documents = body.get("query"), body.get("documents")
    if not isinstance(query, str) or not query:
        raise _BadRequest("query must be a non-empty string")
    if not isinstance(documents, list) or not documents or not all(
            isinstance(d, str) for d in documents):
        raise _BadRequest("documents must be a non-empty list of strings")
    if len(documents) > 1000:
        raise _BadRequest("too many documents: at most 1000")
    # Voyage cuts a long query or document with truncation on; Cohere cuts a document.
    _within_limits(service, body["model"], documents, query,
                   truncation=service == "cohere" or body.get("truncation") is not False)
    scores: list[float] = fake_scores(query, documents)
    indexes = sorted(range(len(documents)), key=lambda i: -scores[i])
    if behaviour.kind == "short":
        indexes = indexes[:-1]
    if behaviour.kind == "indexes":
        indexes = list(behaviour.indexes)
    if behaviour.kind == "nan":
        scores[0] = math.nan
    results = [{"index": i, "relevance_score": scores[i % len(documents)]} for i in indexes]
    tokens = sum(service_tokens(query) + service_tokens(d) for d in documents)
    if service == "cohere":
        return {"id": str(uuid.uuid4()), "results": results,
                "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}}}
    top_k = body.get("top_k")
    if isinstance(top_k, int):
        results = results[:top_k]
    return {"object": "list", "data": results, "model": body["model"],
            "usage": {"total_tokens": tokens}}
