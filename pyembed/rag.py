"""Answers with Claude from a corpus's passages (retrieval-augmented generation), with
numbered citations, a latency breakdown and a row in pyembed.query_log."""

from __future__ import annotations

import dataclasses
import html
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anthropic

from .client import Corpus, _ms
from .dbcall import count
from .errors import InvalidInput, ProviderError, redact, shown, status_kind
from .limits import limits_for
from .providers.base import (
    TRANSIENT_STATUSES,
    UNREADABLE,
    TransientProviderError,
    checked_base_url,
    parse_retry_after,
    unreadable,
)
from .retry import DEFAULT_RETRIES, MAX_RETRIES, MAX_TIMEOUT, Retrier
from .search import MODES, Hit, check_k
from .text import check_text, estimate_tokens, has_text, number, truncate_to_tokens

log = logging.getLogger(__name__)

MODEL_ENV = "PYEMBED_CLAUDE_MODEL"
"""Environment variable naming the Claude model `answer` uses by default."""
API_KEY_ENV = "ANTHROPIC_API_KEY"
DEFAULT_MODEL = "claude-sonnet-5-5"
"""The Claude model `answer` uses when given none and $PYEMBED_CLAUDE_MODEL is not set."""
MAX_TOKENS = (1, 128_000)
"""The answer's length cap a Claude model takes (max_tokens): from 1 to the most output tokens
of any model (each model refuses more than its own, with the service's 400)."""

INSUFFICIENT = "The documents do not contain enough information to answer this."
"""The sentence Claude is told to answer with when the passages do not hold the answer (and
the answer pyembed gives itself when nothing was retrieved)."""
NO_API_KEY_NOTE = (f"{API_KEY_ENV} is not set: showing the retrieved passages instead of a "
                   "generated answer.")

SYSTEM_PROMPT = f"""\
You answer questions using only the documents in the user's message, inside <documents>.
Each document has an index attribute. Support every statement with the index of the
document it comes from, in square brackets, like [1] or [2][3]. Do not use any knowledge
beyond these documents, and do not cite documents that do not support the statement.
If the documents do not contain enough information to answer the question, reply with
exactly this sentence and nothing else:
{INSUFFICIENT}"""



@dataclass(frozen=True)
class _Claude:
    """A Claude model as pyembed.usage accounts its calls (tenants.Keyed): the key
    'anthropic/<model>', as a reranker's is its provider and model."""

    model: str

    @property
    def key(self) -> str:
        return f"anthropic/{self.model}"

    @property
    def provider(self) -> str:
        return "anthropic"


_CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


@dataclass(frozen=True)
class Source:
    """A retrieved passage with the number it is cited by ([1] is `number` 1)."""

    number: int
    hit: Hit
    shown: str | None = None
    """The part of the passage Claude was given when it was cut to fit the prompt (its first
    part); None when it was given whole."""

    @property
    def trimmed(self) -> bool:
        """Whether the passage was cut to fit Claude's context (see `shown`)."""
        return self.shown is not None

    @property
    def document_id(self) -> str:
        return self.hit.document_id

    @property
    def content(self) -> str:
        return self.hit.content

    @property
    def score(self) -> float:
        return self.hit.score


@dataclass
class Answer:
    """The outcome of `answer`.

    `text` is None when nothing was generated (no API key: see `note`). `insufficient` is
    true when nothing was retrieved or Claude said the passages do not answer the question.
    `timings` holds embed_ms, search_ms, generate_ms and total_ms (0 for a step not taken),
    and rerank_ms when a reranker reordered the passages.
    """

    question: str
    text: str | None
    sources: list[Source]
    model_key: str
    generation_model: str | None
    cited: list[int] = field(default_factory=list)
    insufficient: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    usage: dict[str, int] | None = None
    generated: bool = False
    note: str | None = None
    stop_reason: str | None = None
    left_out: list[Hit] = field(default_factory=list)
    """Passages retrieved but not given to Claude: past what its context holds beside the
    question and max_tokens (`note` says so; the first that did not fit whole is a source,
    cut: `Source.trimmed`)."""

    @property
    def cited_sources(self) -> list[Source]:
        """The sources the text cites, in number order."""
        wanted = set(self.cited)
        return [s for s in self.sources if s.number in wanted]


def build_prompt(question: str, sources: Sequence[Source]) -> str:
    """The user message: the numbered passages inside <documents>, then the question."""
    return "\n".join(["<documents>", *(_document(s) for s in sources), "</documents>",
                      f"\nQuestion: {question}"])


def _document(source: Source, body: str | None = None) -> str:
    """One passage as the prompt gives it (`body` instead of the text shown, if given)."""
    attrs = f'index="{source.number}" id="{html.escape(source.document_id, quote=True)}"'
    title = source.hit.metadata.get("title")
    if isinstance(title, str) and title.strip():
        attrs += f' title="{html.escape(title.strip(), quote=True)}"'
    body = (source.shown if source.shown is not None else source.content) if body is None \
        else body
    # A passage must not be able to close its own tag and pose as another document.
    body = body.replace("</document", "&lt;/document")
    return f"<document {attrs}>\n{body}\n</document>"


MIN_PASSAGE_TOKENS = 100
"""The fewest tokens of a passage worth giving Claude when the rest of it does not fit."""


def _room(question: str, max_tokens: int, model: str) -> int:
    """The tokens Claude's context leaves for passages beside the system prompt, the question
    and the answer's `max_tokens` (pyembed.limits); InvalidInput when too few are left for
    one passage."""
    context = limits_for("anthropic", model).request_tokens or 0
    fixed = estimate_tokens(SYSTEM_PROMPT) + estimate_tokens(build_prompt(question, []))
    room = context - max_tokens - fixed
    if room < MIN_PASSAGE_TOKENS:
        raise InvalidInput(f"the question is about {fixed} tokens with the prompt around it: "
                           f"with max_tokens {max_tokens} that leaves no room for a passage in "
                           f"claude's {context}-token context; shorten the question or lower "
                           f"max_tokens")
    return room


def _fit_prompt(sources: Sequence[Source], room: int) -> tuple[list[Source], list[Hit]]:
    """The sources, in order, whose passages fit in `room` tokens of the prompt, the first
    that does not fit whole cut to the rest (if at least MIN_PASSAGE_TOKENS are left); and
    the passages left out."""
    kept: list[Source] = []
    for source in sources:
        tokens = estimate_tokens(_document(source)) + 1  # (and its line break)
        if tokens <= room:
            kept.append(source)
            room -= tokens
            continue
        around = estimate_tokens(_document(source, "")) + 1
        if room - around >= MIN_PASSAGE_TOKENS:
            kept.append(dataclasses.replace(
                source, shown=truncate_to_tokens(source.content, room - around)))
        return kept, [s.hit for s in sources[len(kept):]]
    return kept, []


def citations(text: str, count: int) -> list[int]:
    """The source numbers 1..count cited in `text` as [n] or [n, m], sorted, each once."""
    found = {int(n) for group in _CITATION.findall(text) for n in group.split(",")}
    return sorted(n for n in found if 1 <= n <= count)


def is_insufficient(text: str) -> bool:
    """Whether a generated answer is the INSUFFICIENT sentence (give or take case, spacing
    and a final full stop)."""
    def norm(s: str) -> str:
        return " ".join(s.lower().split()).rstrip(".")

    return norm(INSUFFICIENT) in norm(text)


def answer(corpus: Corpus, question: str, *, k: int = 5, model: str | None = None,
           max_tokens: int = 1024, min_score: float | None = None,
           filter: Mapping[str, Any] | None = None, mode: str = "vector",
           rerank: str | None = None, rerank_candidates: int | None = None,
           on_text: Callable[[str], None] | None = None,
           client: anthropic.Anthropic | None = None, timeout: float = 60.0,
           max_retries: int = DEFAULT_RETRIES) -> Answer:
    """Answer `question` from the `k` passages of `corpus` nearest to it (those scoring at
    least `min_score`), citing them as [1], [2], ... with Claude `model` (default:
    $PYEMBED_CLAUDE_MODEL, else DEFAULT_MODEL).

    Passages are found by `mode` search ('vector', 'keyword' or 'hybrid', as in
    `Corpus.search`; `min_score` compares with that mode's score) among the chunks whose
    metadata contains `filter`. With `rerank` (e.g. "voyage/rerank-2.5"), the best
    `rerank_candidates` of them (at least k; default 50, or k if larger) are reordered by that
    reranker and the best k kept; `min_score` then compares with the reranker's score.

    Claude is called through `client`, else a client built from $ANTHROPIC_API_KEY (and
    $ANTHROPIC_BASE_URL); with neither, the passages are returned without a generated
    answer (`generated` false, `note` says why). `on_text` receives the answer as it
    streams. Nothing retrieved means no call and an `insufficient` answer. The query is
    recorded in pyembed.query_log (a failure to record it is logged, never raised).

    Raises InvalidInput for an empty question or a bad k/max_tokens/mode, RateLimited when
    Claude keeps refusing for rate limits, ProviderError for any other failed call.
    """
    check_text(question, "question")
    check_k(k)
    count(max_tokens, "max_tokens", MAX_TOKENS)
    if mode not in MODES:
        raise InvalidInput(f"mode must be one of {', '.join(MODES)}, not {shown(mode)}")
    # NaN compares false with every score (every passage dropped) and reaches the socket as a
    # timeout; a finite number is what either can mean.
    if min_score is not None and not _finite(min_score):
        raise InvalidInput(f"min_score must be a finite number, got {min_score!r}")
    number(timeout, "timeout", 0.0, MAX_TIMEOUT, above=True, unit="seconds")
    count(max_retries, "max_retries", (0, MAX_RETRIES))
    model = model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    if not isinstance(model, str):  # (the SDK sends it as it is, and the service says 400)
        raise InvalidInput(f"model is a Claude model id, a text, not {type(model).__name__} "
                           f"{model!r}")
    # A question Claude's context cannot take beside max_tokens and a passage: before any call.
    room = _room(question, max_tokens, model)
    start = time.perf_counter()

    found = corpus.retrieve(question, k, filter, mode=mode, rerank=rerank,
                            rerank_candidates=rerank_candidates)
    key = found.model_key or corpus.model_key
    hits = found.hits
    if min_score is not None:
        hits = [h for h in hits
                if (h.score if h.rerank_score is None else h.rerank_score) >= min_score]
    searched = time.perf_counter()
    sources = [Source(i, h) for i, h in enumerate(hits, start=1)]
    result = Answer(question, None, sources, key, None)

    if not sources:
        result.text, result.insufficient = INSUFFICIENT, True
    else:
        if client is None:
            api_key = os.environ.get(API_KEY_ENV, "").strip()
            if api_key:
                # The SDK reads its base URL from the environment, and raises httpx's
                # InvalidURL for one that is not a URL.
                checked_base_url(os.environ.get("ANTHROPIC_BASE_URL") or None,
                                 "ANTHROPIC_BASE_URL")
                client = anthropic.Anthropic(api_key=api_key, timeout=timeout, max_retries=0)
        if client is None:
            result.note = NO_API_KEY_NOTE
        else:
            # One retry policy for every service (pyembed.retry): a client's own retries off.
            client = client.with_options(max_retries=0)
            # Only what Claude's context holds is sent (the service refuses a longer prompt
            # with a 400, after the reservation counted it): the best passages whole, the
            # first that does not fit cut, the rest left out and said so.
            result.sources, result.left_out = _fit_prompt(sources, room)
            if result.left_out or any(s.trimmed for s in result.sources):
                result.note = _fitted_note(result, max_tokens, model)
            prompt = build_prompt(question, result.sources)
            # Each attempt is reserved first, as every provider call is: the prompt's tokens
            # and the answer's cap, refused over the tenant's limits before Claude is called.
            tokens = estimate_tokens(SYSTEM_PROMPT + prompt) + max_tokens
            _generate(client, result, prompt, model=model, max_tokens=max_tokens,
                      on_text=on_text, timeout=timeout, max_retries=max_retries,
                      before=lambda: corpus._reserve(_Claude(model), tokens))
    done = time.perf_counter()
    result.timings = {"embed_ms": found.timings["embed_ms"] or 0.0,
                      "search_ms": found.timings["search_ms"] or 0.0,
                      **({"rerank_ms": found.timings.get("rerank_ms") or 0.0} if rerank else {}),
                      "generate_ms": _ms(searched, done) if result.generated else 0.0,
                      "total_ms": _ms(start, done)}
    corpus.log_query("ask", k, result.timings, generated=result.generated, model_key=key)
    return result


def _fitted_note(result: Answer, max_tokens: int, model: str) -> str:
    """What `note` says of passages cut or left out to fit Claude's context."""
    cut = [s.number for s in result.sources if s.trimmed]
    parts = ([f"passage [{cut[0]}] was cut"] if cut else []) + (
        [f"{len(result.left_out)} passage{'s' if len(result.left_out) != 1 else ''} "
         f"{'were' if len(result.left_out) != 1 else 'was'} left out"] if result.left_out else [])
    context = limits_for("anthropic", model).request_tokens
    return (f"{' and '.join(parts)} to fit claude's {context}-token context beside the question "
            f"and max_tokens ({max_tokens})")


def _finite(value: object) -> bool:
    """Whether `value` is a real number (not a bool, text or NaN/inf)."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _generate(client: anthropic.Anthropic, result: Answer, prompt: str, *, model: str,
              max_tokens: int, on_text: Callable[[str], None] | None, timeout: float,
              max_retries: int = DEFAULT_RETRIES,
              before: Callable[[], None] | None = None) -> None:
    """Fill `result` with Claude's answer to `prompt`, a transient failure retried by
    pyembed.retry.Retrier until a piece of a streamed answer was shown (a retry would show it
    again); `before` runs before each attempt (the usage meter)."""
    shown: list[str] = []

    def show(piece: str) -> None:
        shown.append(piece)
        if on_text is not None:
            on_text(piece)

    def once() -> tuple[str, Any]:
        try:
            return _call(client, prompt, model=model, max_tokens=max_tokens,
                         on_text=show if on_text is not None else None, timeout=timeout)
        except TransientProviderError as exc:
            if shown:
                raise ProviderError(str(exc), kind=exc.kind) from None
            raise

    text, message = Retrier(f"claude ({model})", max_retries=max_retries)(once, before=before)
    result.text = text
    result.generated = True
    result.generation_model = str(message.model or model)
    result.stop_reason = message.stop_reason
    result.cited = citations(text, len(result.sources))
    result.insufficient = is_insufficient(text)
    result.usage = {"input_tokens": message.usage.input_tokens,
                    "output_tokens": message.usage.output_tokens}


def _call(client: anthropic.Anthropic, prompt: str, *, model: str, max_tokens: int,
          on_text: Callable[[str], None] | None, timeout: float) -> tuple[str, Any]:
    """One request for Claude's answer to `prompt`: its text and message."""
    messages: list[anthropic.types.MessageParam] = [{"role": "user", "content": prompt}]
    try:
        if on_text is None:
            message = client.messages.create(model=model, max_tokens=max_tokens,
                                             system=SYSTEM_PROMPT, messages=messages,
                                             timeout=timeout)
            text = "".join(b.text for b in message.content if b.type == "text")
        else:
            pieces: list[str] = []
            with client.messages.stream(model=model, max_tokens=max_tokens,
                                        system=SYSTEM_PROMPT, messages=messages,
                                        timeout=timeout) as stream:
                for piece in stream.text_stream:
                    pieces.append(piece)
                    on_text(piece)
                message = stream.get_final_message()
            text = "".join(pieces)
            if message.stop_reason is None:
                raise ProviderError(f"claude ({model}): the answer stream ended before "
                                    "the message was complete")
        usage = (message.usage.input_tokens, message.usage.output_tokens)
        if not isinstance(text, str) or not all(isinstance(n, int) for n in usage):
            raise TypeError("no text, or token counts that are not whole numbers")
        if not has_text(text):  # nothing to show or cite: the service's bad answer
            raise ProviderError(f"claude ({model}): the answer is empty (stop reason "
                                f"{message.stop_reason})")
    except anthropic.AnthropicError as exc:
        raise _provider_error(exc, model, client) from None
    except UNREADABLE as exc:
        raise ProviderError(_scrubbed(f"claude ({model}): {unreadable(exc)}", client)) from None
    return text, message


def _provider_error(exc: anthropic.AnthropicError, model: str,
                    client: anthropic.Anthropic) -> ProviderError:
    """One line naming the model and what went wrong, with any credential scrubbed out."""
    where = f"claude ({model})"
    if isinstance(exc, anthropic.APIStatusError):
        detail = _detail(exc)
        if exc.status_code == 401:
            detail += f" (check {API_KEY_ENV})"
        message = f"{where}: HTTP {exc.status_code}: {detail}"
    elif isinstance(exc, anthropic.APITimeoutError):
        message = f"{where}: no response: timed out"
    elif isinstance(exc, anthropic.APIConnectionError):
        message = f"{where}: no response: {exc.message}"
    else:
        message = f"{where}: {exc}"
    message = _scrubbed(message, client)
    # Transient as every service's (ServiceClient.failure): no answer, 408, 409, 429 and 5xx,
    # retried by the Retrier, which makes the last 429 RateLimited.
    if isinstance(exc, anthropic.APIStatusError) and (exc.status_code in TRANSIENT_STATUSES
                                                      or exc.status_code >= 500):
        return TransientProviderError(message, status=exc.status_code,
                                      retry_after=parse_retry_after(exc.response.headers))
    if isinstance(exc, anthropic.APIConnectionError):  # a timeout too
        return TransientProviderError(message)
    # The kind every provider's failure has (pyembed.errors.ERROR_KINDS): a status's, and a
    # bad answer for what the SDK could not read.
    kind = (status_kind(exc.status_code) if isinstance(exc, anthropic.APIStatusError) else
            "bad_answer")
    return ProviderError(message, kind=kind)


def _scrubbed(message: str, client: anthropic.Anthropic) -> str:
    """`message` on one line, with any credential or base URL scrubbed out."""
    return " ".join(redact(message, secrets=(client.api_key, client.auth_token,
                                             os.environ.get(API_KEY_ENV)),
                           base_url=str(client.base_url)).split())


def _detail(exc: anthropic.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"]) or "no detail given"
    return exc.message or "no detail given"


__all__ = ["DEFAULT_MODEL", "INSUFFICIENT", "NO_API_KEY_NOTE", "SYSTEM_PROMPT", "Answer",
           "Source", "answer", "build_prompt", "citations", "is_insufficient"]
