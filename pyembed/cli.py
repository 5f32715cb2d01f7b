"""The `pyembed` command line: one clear line and exit 1 on every error, bad input included
(130 and 143 when Ctrl-C or SIGTERM stops a command).

Every command that talks to a database connects through `_connect` (a psycopg connection)
or `_client` (a pyembed Client); both resolve the DSN in `_dsn`. Top-level commands come
first, then each group's commands together, in the order `pyembed --help` lists them.
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import json
import math
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import psycopg
import typer
from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from . import (
    cache,
    evaluation,
    health,
    index,
    migration,
    models,
    provider_secrets,
    recall,
    schema,
    tenants,
)
from .client import Client
from .client import connect as connect_client
from .config import DSN_ENV, WORKER_DSN_ENV
from .corpora import corpus_info, create_corpus, delete_documents, drop_corpus, list_corpora
from .db import connect, connection_lost, resolve_dsn, translate
from .dbcall import translated
from .doctor import doctor_cmd
from .errors import DatabaseNotReady, InvalidInput, MigrationError, NotEmbeddedYet, PyembedError
from .localdb import LocalCluster
from .models import BUILTIN, LOCAL_DEFAULT
from .recall import RECALL_ALERT
from .secret_input import read_secret, warn_of_password_in_argv
from .text import read_json

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="The embedding model as an enforced part of your PostgreSQL schema.")
db_app = typer.Typer(no_args_is_help=True, help="The embedded local PostgreSQL cluster.")
corpus_app = typer.Typer(no_args_is_help=True,
                         help="Create, list, show and drop corpora; delete documents.")
migrate_app = typer.Typer(no_args_is_help=True, help=(
    "Change a corpus's model without downtime: plan, start, backfill, validate, shift, "
    "complete (or rollback), cleanup. Runs as the owner (PYEMBED_OWNER_DSN)."))
eval_app = typer.Typer(no_args_is_help=True, help="Evaluation queries used to validate migrations.")
cache_app = typer.Typer(no_args_is_help=True, help="The embedding cache in PostgreSQL.")
metrics_app = typer.Typer(no_args_is_help=True, help="Prometheus metrics.")
tenant_app = typer.Typer(no_args_is_help=True, help="Tenants: isolated corpora, limits, members.")
secret_app = typer.Typer(no_args_is_help=True,
                         help="Provider keys and base URLs for the in-database functions.")
replica_app = typer.Typer(no_args_is_help=True, help=(
    "Streaming replicas of the local cluster on loopback, to serve searches "
    "(PYEMBED_READ_DSN): made with PostgreSQL's pg_basebackup -R."))
db_app.add_typer(replica_app, name="replica")
app.add_typer(db_app, name="db")
app.add_typer(corpus_app, name="corpus")
app.add_typer(migrate_app, name="migrate")
app.add_typer(eval_app, name="eval")
app.add_typer(cache_app, name="cache")
app.add_typer(metrics_app, name="metrics")
app.add_typer(tenant_app, name="tenant")
app.add_typer(secret_app, name="secret")
_PICTURES = {**{c: 0x2400 + c for c in range(0x20) if c not in (0x09, 0x0A)}, 0x7F: 0x2421,
             **{c: 0xFFFD for c in range(0x80, 0xA0)}}
"""Control characters as one visible character each (Unicode's control pictures, ␛ for ESC; C1
controls as �): the same length, so a rich Text's styles keep their places."""


class _Console(Console):
    """A console that writes no control character of the text it is given: stored texts are
    anyone's, and an escape sequence in one would set the terminal's title, hide or recolour
    lines, or move the cursor over what pyembed printed. Its own styles are escape sequences it
    makes later, from the Text's spans, and stay."""

    def render_str(self, text: str, **options: Any) -> Text:
        return super().render_str(text.translate(_PICTURES), **options)

    def render(self, renderable: Any, options: Any = None) -> Iterable[Segment]:
        if isinstance(renderable, Text) and renderable.plain != (
                shown := renderable.plain.translate(_PICTURES)):
            renderable = renderable.copy()
            renderable.plain = shown
        return super().render(renderable, options)


# Without markup, both: whatever a command prints (names, texts, errors) reads as it is; styles
# are given as rich Text. Soft wrap, both: a message is one line at any width and in a pipe (a
# "next: pyembed migrate ..." cut at 80 columns is no command to copy or grep); tables still
# fold their cells to the width.
console = _Console(markup=False, soft_wrap=True)
err_console = _Console(stderr=True, soft_wrap=True, markup=False)

OwnerDsnOption = Annotated[str | None, typer.Option(
    "--dsn", envvar="PYEMBED_OWNER_DSN", callback=warn_of_password_in_argv,
    help="owner DSN; default: $PYEMBED_DSN, else the local cluster's owner")]
DsnOption = Annotated[str | None, typer.Option("--dsn", envvar=DSN_ENV,
                                               callback=warn_of_password_in_argv,
                                               help="libpq DSN; default: the local cluster")]
WorkerDsnOption = Annotated[str | None, typer.Option(
    "--dsn", envvar=[WORKER_DSN_ENV, DSN_ENV], callback=warn_of_password_in_argv,
    help="libpq DSN; default: the local cluster's worker login (in pyembed_worker and "
         "pyembed_operator: every tenant's)")]
NUMBERS = {"ignore_unknown_options": True}
"""context_settings of a command with a numeric argument: a negative number (-1) is the
argument, refused by its own range check, not an unknown option."""
TargetKeyOption = Annotated[str, typer.Option("--to", help="target model key")]
RerankOption = Annotated[str | None, typer.Option(
    "--rerank", metavar="MODEL",
    help="reorder the best candidates with a reranker: voyage/rerank-2.5, "
         "voyage/rerank-2.5-lite or cohere/rerank-v3.5 (needs VOYAGE_API_KEY / COHERE_API_KEY)")]
CandidatesOption = Annotated[int | None, typer.Option(
    "--rerank-candidates", help="how many search hits the reranker reorders, at least -k "
         "(default 50, or k if larger)")]
JsonOption = Annotated[bool, typer.Option(
    "--json", help="print one JSON document instead of a table (README: Command line)")]
DaysOption = Annotated[int, typer.Option(min=1, max=36500, help="days back from today")]
"""A report's window: at least today, at most a century (before: -1 said nothing was recorded,
and a huge one failed with the database's 'timestamp out of range')."""


# -- connections ---------------------------------------------------------------------------

def _dsn(dsn: str | None, *, owner: bool = False) -> str:
    """The command's database: --dsn (which reads $PYEMBED_DSN, or $PYEMBED_OWNER_DSN for the
    owner), else the environment, else the local cluster (DatabaseNotReady if there is none)."""
    return dsn or resolve_dsn(owner=owner)


@contextmanager
def _pyembed_errors(conn: Callable[[], psycopg.Connection[Any]]) -> Iterator[None]:
    """Database errors with a pyembed SQLSTATE as pyembed errors, and a database without the
    pyembed schema (asked on `conn()`) as DatabaseNotReady: `main` prints either as one line."""
    try:
        with translated():
            yield
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
        if _schema_missing(conn()):
            raise DatabaseNotReady("this database has no pyembed schema: run `pyembed install`"
                                   ) from None
        raise


def _schema_missing(conn: psycopg.Connection[Any]) -> bool:
    try:
        row = conn.execute("SELECT to_regnamespace('pyembed') IS NULL").fetchone()
    except psycopg.Error:
        return False  # cannot tell: the original error is the better message
    return bool(row and row[0])


@contextmanager
def _connect(dsn: str | None, *, owner: bool = False) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit psycopg connection (pgvector registered) to the command's database."""
    with connect(_dsn(dsn, owner=owner), autocommit=True) as conn, \
            _pyembed_errors(lambda: conn):
        yield conn


@contextmanager
def _client(dsn: str | None, *, owner: bool = False) -> Iterator[Client]:
    """A pyembed Client on the command's database. Its connection stays the client's (not
    `client.conn`, which marks it handed to other code): one the server closes between two
    calls (a restart) is opened again, as for any program's client."""
    with connect_client(_dsn(dsn, owner=owner)) as client, \
            _pyembed_errors(lambda: client._conn):
        yield client


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


# -- output --------------------------------------------------------------------------------

def _print_json(data: Any) -> None:
    """Write `data` as one line of JSON on stdout: the only place --json output is written
    (a command prints one such document; `search --json` one per hit, JSON Lines). A number
    JSON cannot hold (NaN, infinity) is written as null."""
    print(json.dumps(_json_safe(data), default=_json_default, allow_nan=False), flush=True)


def _json_default(value: Any) -> str:
    """A value JSON has no type for: a time in ISO 8601 (README: the --json field names), any
    other as its text."""
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    return str(value)


def _json_safe(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _json_safe(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_json_safe(v) for v in data]
    return data


class _Table(Table):
    """A table laid out as wide as it must be for each column to show a character of each cell
    a line: at the console's width when that is enough, else wider (a narrower terminal wraps
    its lines). Below that, rich gave some columns no width at all: a search's document ids,
    texts and model keys were gone at 30 columns, and a usage report's tenants at 40."""

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        # (as rich lays it out: the columns share the width less the borders; a column's width
        # counts its padding, one space each side)
        while min(self._calculate_column_widths(
                console, options.update_width(width - self._extra_width)), default=3) < 3 \
                and width < 10_000:
            width += 1
        yield from super().__rich_console__(console, options.update_width(width))


def _table(*titles: str, numbers: tuple[str, ...] = (), **options: Any) -> Table:
    """A table whose every column folds a long cell onto more lines, at any width and in a
    pipe: never elided, because users copy model keys and ids out of them. Columns named in
    `numbers` stay unwrapped while the others can give way (a number split over two lines
    misreads)."""
    table = _Table(**options)
    for title in titles:
        table.add_column(title, overflow="fold", no_wrap=title in numbers)
    return table


# -- top-level commands --------------------------------------------------------------------

@contextmanager
def _progress(*columns: Any) -> Iterator[Callable[[int, int | None, str], None]]:
    """A transient progress bar on stdout, shown by its first update (done, total,
    description): after the command's first call of the work, so after its options were
    checked where they are (the database, for most), and never before an error about them. Only
    on a terminal: elsewhere a bar is a stray line."""
    from rich.progress import Progress, TaskID

    bar = Progress(*columns, console=console, transient=True, disable=not console.is_terminal)
    task: TaskID | None = None

    def update(done: int, total: int | None, description: str) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(description, total=total)
        bar.update(task, completed=done, total=total, description=description)

    try:
        yield update
    finally:
        if task is not None:
            bar.stop()


@app.command("install")
def install_cmd(
    dsn: Annotated[str | None, typer.Option("--dsn", envvar="PYEMBED_OWNER_DSN",
                                            callback=warn_of_password_in_argv,
                                            help="owner DSN; default: $PYEMBED_DSN, else the "
                                                 "local cluster's owner")] = None,
    sql: Annotated[bool, typer.Option("--sql", help="print the SQL script instead")] = False,
    start: Annotated[str | None, typer.Option(
        "--from", help="with --sql: the database's revision (pyembed doctor shows it); "
                       "default: a database without the schema")] = None,
) -> None:
    """Bring a database to the current pyembed schema (idempotent).

    Example: pyembed install --dsn postgresql://owner@db/app

    Example: pyembed install --sql > pyembed.sql
    """
    if sql:
        sys.stdout.write(schema.offline_sql(start))
        return
    if start is not None:
        raise InvalidInput("--from goes with --sql: an install reads the database's revision")
    console.print(f"pyembed schema at revision {schema.install(_dsn(dsn, owner=True))}")


@app.command("models")
def models_cmd(dsn: DsnOption = None, as_json: JsonOption = False) -> None:
    """List the models the database knows (pyembed.models), built-in and registered.

    Example: pyembed models --dsn postgresql://app@db/app
    """
    if dsn is None and not LocalCluster().initialised:
        # No database to ask yet: show what `pyembed install` will seed, and say so.
        err_console.print("no database (no --dsn, $PYEMBED_DSN or local cluster): the built-in "
                          "models `pyembed install` adds; registered ones show once connected")
        specs = sorted(BUILTIN, key=lambda s: s.key)
    else:
        with _connect(dsn) as conn:
            specs = models.registered(conn)
    if as_json:
        _print_json({"models": [
            {"model_key": m.key, "provider": m.provider, "model_id": m.model_id,
             "version": m.version, "dimensions": m.dimensions, "distance": m.distance,
             "normalized": m.normalized, "input_types": m.input_types,
             "max_batch": m.max_batch, "max_tokens": m.max_tokens,
             "request_dimensions": m.request_dimensions, "price_per_mtok": m.price_per_mtok,
             "description": m.description} for m in specs]})
        return
    table = _table("model key", "dims", "distance", "input types", "batch", "max tokens",
                   "$ / 1M tokens", "about")
    for m in specs:
        table.add_row(m.key, str(m.dimensions), m.distance, "yes" if m.input_types else "no",
                      str(m.max_batch), str(m.max_tokens),
                      f"{m.price_per_mtok:.2f}" if m.price_per_mtok is not None else "-",
                      m.description)
    console.print(table)


@app.command("search")
def search_cmd(
    corpus: str,
    query: str,
    k: Annotated[int, typer.Option("-k", help="number of results")] = 5,
    mode: Annotated[str, typer.Option(help="vector, keyword or hybrid")] = "hybrid",
    filter: Annotated[str | None, typer.Option(help='metadata filter, JSON, e.g. {"lang":"en"}')]
    = None,
    group: Annotated[str, typer.Option(
        "--group", help="document: k distinct documents, each with its best chunk; chunk: the "
                        "k best chunks")] = "document",
    fusion: Annotated[str | None, typer.Option(
        "--fusion", help="hybrid only: rrf (reciprocal rank) or relative (min-max normalised "
                         "scores, the default)")] = None,
    alpha: Annotated[float | None, typer.Option(
        "--alpha", help="relative fusion's weight of the vector search, 0..1 (keyword: "
                        "1 - alpha); default 0.4")] = None,
    rerank: RerankOption = None,
    rerank_candidates: CandidatesOption = None,
    dsn: DsnOption = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="print JSON Lines: one object per hit, best first")] = False,
) -> None:
    """Search a corpus; the query is embedded with the corpus's own model. Hits are k distinct
    documents unless --group chunk.

    Example: pyembed search docs "what does error E4012 mean" -k 3 --mode hybrid

    Reranked: pyembed search docs "what does error E4012 mean" -k 3 --rerank voyage/rerank-2.5
    """
    try:
        flt = read_json(filter, "--filter") if filter is not None else None
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"--filter is not valid JSON: {exc}") from None
    if flt is not None and not isinstance(flt, dict):
        raise InvalidInput(f"--filter must be a JSON object, like '{{\"lang\": \"en\"}}', "
                           f"not {filter}")
    with _client(dsn) as client:
        hits = client.corpus(corpus).search(query, k=k, filter=flt, mode=mode, group=group,
                                            fusion=fusion, alpha=alpha, rerank=rerank,
                                            rerank_candidates=rerank_candidates)
    if as_json:
        for rank, h in enumerate(hits, 1):
            _print_json({"rank": rank, "document_id": h.document_id, "chunk_id": h.chunk_id,
                         "chunk_index": h.chunk_index, "score": h.score,
                         "model_key": h.model_key, "content": h.content,
                         "metadata": h.metadata,
                         **({"rerank_score": h.rerank_score, "reranker": h.reranker}
                            if rerank else {})})
        return
    reranked = ("rerank",) if rerank else ()
    table = _table("#", *reranked, "score", "document", "chunk", "text", "model key",
                   numbers=("#", *reranked, "score", "chunk"),
                   title=f"reranked by {hits[0].reranker}" if rerank and hits else None,
                   title_justify="left")
    for i, h in enumerate(hits, 1):
        shown = (f"{h.rerank_score:.4f}",) if rerank else ()
        table.add_row(str(i), *shown, f"{h.score:.4f}", h.document_id,
                      str(h.chunk_index), " ".join(h.content.split())[:100],
                      h.model_key or "-")
    console.print(table if hits else "no results")


@app.command("ingest")
def ingest_cmd(
    corpus: Annotated[str, typer.Argument(help="the corpus to add to")],
    paths: Annotated[list[Path], typer.Argument(
        help="files or folders: .txt/.md (one document each), .jsonl, .csv; - reads JSON "
             "Lines from standard input")],
    batch_size: Annotated[int, typer.Option("--batch-size", help="documents per batch")] = 64,
    truncate: Annotated[bool, typer.Option(
        "--truncate", help="embed only the first tokens the model reads of each chunk instead "
                           "of splitting chunks that are too long for it (documents are still "
                           "split at the corpus's --chunk-tokens; for one chunk per document, "
                           "create the corpus with a large --chunk-tokens)")] = False,
    text_field: Annotated[str, typer.Option(
        "--text-field", help="JSONL key / CSV column holding the text")] = "text",
    id_field: Annotated[str, typer.Option(
        "--id-field", help="JSONL key / CSV column holding the id")] = "id",
    strict: Annotated[bool, typer.Option(
        "--strict", help="exit non-zero if any file or record was skipped")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")] = False,
    progress_every: Annotated[float, typer.Option(
        "--progress-every", help="seconds between progress lines when stderr is not a "
        "terminal (a terminal gets a progress bar)")] = 10.0,
    dsn: DsnOption = None,
    as_json: JsonOption = False,
) -> None:
    """Add documents from files and folders to a corpus; unchanged ones are skipped, bad
    lines are reported with their line numbers and the rest still loads.

    Example: pyembed ingest docs ./handbook faq.csv beir/scifact/corpus.jsonl

    From a pipe: export-docs | pyembed ingest docs -
    """
    from .ingest import ingest

    with _client(dsn) as client:
        target = client.corpus(corpus)
        report = ingest(target, paths, batch_size=batch_size, truncate=truncate,
                        progress=not quiet, console=err_console, text_field=text_field,
                        id_field=id_field, progress_every=progress_every)
    if as_json:
        _print_json({"corpus": target.name, "model_key": target.model_key,
                     "added": report.added, "updated": report.updated,
                     "unchanged": report.skipped, "failed": report.failed,
                     "chunks": report.chunks, "seconds": round(report.seconds, 3),
                     "problems": _problems_json(report.problems)})
    else:
        _skipped(report.problems)
        console.print(f"{target.name} ({target.model_key}): {report.summary()}",
                      highlight=False, soft_wrap=True)
    if report.problems and (strict or report.processed == report.failed):
        raise PyembedError(f"{len(report.problems)} problem(s) while ingesting"
                           + ("; nothing was loaded" if report.processed == report.failed
                              else ""))


def _problems_json(problems: Sequence[Any]) -> list[dict[str, Any]]:
    """Each skipped file or line (ingest.FileProblem) as --json gives it."""
    return [{"path": str(p.path), "line": p.line, "message": p.message} for p in problems]


def _skipped(problems: Sequence[Any], shown: int = 20) -> None:
    """The first `shown` lines or files a command read and skipped, each with why."""
    for problem in problems[:shown]:
        err_console.print(Text.assemble(("skipped", "yellow"), f" {problem}"), highlight=False)
    if len(problems) > shown:
        err_console.print(Text(f"... and {len(problems) - shown} more problems", style="yellow"))


@app.command("ask")
def ask_cmd(
    corpus: Annotated[str, typer.Argument(help="the corpus to answer from")],
    question: Annotated[str, typer.Argument(help="the question")],
    k: Annotated[int, typer.Option("-k", "--k", help="passages to retrieve")] = 5,
    model: Annotated[str | None, typer.Option(
        "--model", envvar="PYEMBED_CLAUDE_MODEL", help="Claude model id")] = None,
    mode: Annotated[str, typer.Option(
        "--mode", help="retrieval: vector, keyword (BM25) or hybrid")] = "hybrid",
    min_score: Annotated[float | None, typer.Option(
        "--min-score", help="drop passages scoring below this")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="answer length cap")] = 1024,
    stream: Annotated[bool, typer.Option(help="print the answer as it arrives")] = True,
    rerank: RerankOption = None,
    rerank_candidates: CandidatesOption = None,
    dsn: DsnOption = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="print one JSON object (answer, citations, sources, timings); "
                       "implies --no-stream")] = False,
) -> None:
    """Answer a question from a corpus with Claude, citing passages as [1], [2], ...
    Without ANTHROPIC_API_KEY it shows the retrieved passages instead.

    Example: pyembed ask docs "What does error E4012 mean?" -k 3

    Reranked passages: pyembed ask docs "What does error E4012 mean?" --rerank rerank-2.5
    """
    from .rag import answer

    streamed: list[str] = []

    def show(piece: str) -> None:
        streamed.append(piece)
        console.print(piece, end="", highlight=False, soft_wrap=True)

    with _client(dsn) as client:
        try:
            result = answer(client.corpus(corpus), question, k=k, model=model,
                            max_tokens=max_tokens, min_score=min_score, mode=mode,
                            rerank=rerank, rerank_candidates=rerank_candidates,
                            on_text=show if stream and not as_json else None)
        except BaseException:
            if streamed:  # a stream cut off: end its line, so that the error is a line of its own
                console.print()
            raise
    if as_json:
        by_number = {s.number: s for s in result.sources}
        _print_json({
            "question": result.question, "answer": result.text,
            "generated": result.generated, "insufficient": result.insufficient,
            "note": result.note, "stop_reason": result.stop_reason,
            "citations": [{"number": n, "document_id": by_number[n].document_id}
                          for n in result.cited if n in by_number],
            "sources": [{"number": s.number, "document_id": s.document_id,
                         "chunk_id": s.hit.chunk_id, "chunk_index": s.hit.chunk_index,
                         "score": s.score, "cited": s.number in result.cited,
                         **({"rerank_score": s.hit.rerank_score, "reranker": s.hit.reranker}
                            if rerank else {}),
                         "content": s.content, "trimmed": s.trimmed,
                         "metadata": s.hit.metadata}
                        for s in result.sources],
            "left_out": [{"document_id": h.document_id, "chunk_id": h.chunk_id,
                          "chunk_index": h.chunk_index, "score": h.score}
                         for h in result.left_out],
            "model_key": result.model_key, "generation_model": result.generation_model,
            "timings": result.timings, "usage": result.usage})
        return
    if result.generated and stream:
        console.print()
    elif result.text is not None:
        console.print(result.text, highlight=False, soft_wrap=True)
    if result.stop_reason == "max_tokens":
        err_console.print(Text.assemble(("note:", "yellow"), " the answer was cut at --max-tokens"))
    if result.note:
        err_console.print(Text.assemble(("note:", "yellow"), f" {result.note}"))

    if result.sources:
        table = _table("#", *(("rerank",) if rerank else ()), "score", "document",
                       "passage" if result.generated else "text",
                       title="sources" + (" (* cited)" if result.generated else "")
                       + (f", reranked by {result.sources[0].hit.reranker}" if rerank else ""),
                       title_justify="left")
        for s in result.sources:
            text = " ".join(s.content.split())
            if result.generated and len(text) > 120:
                text = text[:117] + "..."
            cited = "*" if s.number in result.cited else ""
            shown = (f"{s.hit.rerank_score:.3f}",) if rerank else ()
            table.add_row(f"[{s.number}]{cited}", *shown, f"{s.score:.3f}",
                          s.document_id, text)
        console.print(table)
    t = result.timings
    generation = (f", generate {t['generate_ms']:.0f} ms with {result.generation_model}"
                  if result.generated else "")
    tokens = (f"; tokens in {result.usage['input_tokens']}, out {result.usage['output_tokens']}"
              if result.usage else "")
    reranking = f", rerank {t['rerank_ms']:.0f} ms" if "rerank_ms" in t else ""
    console.print(f"model key {result.model_key}; embed {t['embed_ms']:.0f} ms, search "
                  f"{t['search_ms']:.0f} ms{reranking}{generation}; total {t['total_ms']:.0f} ms{tokens}",
                  highlight=False)


@app.command("worker")
def worker_cmd(
    batch_size: Annotated[int, typer.Option("--batch-size", help="chunks per claim")] = 64,
    max_attempts: Annotated[int, typer.Option(help="attempts before a chunk is failed")] = 5,
    lease: Annotated[float, typer.Option(
        "--lease", envvar="PYEMBED_WORKER_LEASE", min=1.0,
        help="seconds a claimed batch stays hidden from other workers, renewed while it is in "
             "flight: a dead worker's batch is taken over when its lease ends")] = 30.0,
    forever: Annotated[bool, typer.Option("--forever", help="keep polling when empty")] = False,
    recall_every: Annotated[float, typer.Option(
        "--recall-every", envvar="PYEMBED_RECALL_EVERY", min=0.0,
        help="seconds between re-runs of sampled searches for recall@10 (0: never)")] = 60.0,
    dsn: WorkerDsnOption = None,
) -> None:
    """Embed queued chunks (SKIP LOCKED batches; run several for more throughput).

    Stops when nothing is left to claim (other workers' leases and retries due within a minute
    are waited for); exits 3 when chunks are left leased by another worker (or a dead one) or
    waiting to retry, naming when they come free.

    Example: pyembed worker --batch-size 128     (stops when the queue is empty; SIGTERM stops it)
    """
    from .worker import Worker

    worker = Worker(dsn or resolve_dsn(worker=True), batch_size=batch_size,
                    max_attempts=max_attempts, lease_seconds=lease, recall_every=recall_every)
    try:
        with _progress() as bar:

            def show(stats: Any, pending: int) -> None:
                done = stats.embedded + stats.failed + stats.stale
                bar(done, done + pending, f"embedding ({stats.rate:.0f} texts/s, "
                                          f"{stats.failed} failed)")

            stats = worker.run(drain=not forever, progress=show)
    finally:
        worker.close()
    console.print(f"embedded {stats.embedded}, failed {stats.failed}, waiting to retry "
                  f"{stats.retried}, skipped {stats.stale} (changed or deleted meanwhile) in "
                  f"{stats.seconds:.1f} s "
                  f"({stats.rate:.1f} texts/s)")
    if stats.all_failed:
        raise PyembedError(f"every item failed; last error: {stats.errors[-1]}")

    def clock(moment: Any) -> str:
        return f"{moment.astimezone():%H:%M:%S}" if moment else "?"  # the local time

    left = []
    if stats.leased:
        left.append(f"{stats.leased} chunks are leased by another worker (or a dead one) until "
                    f"{clock(stats.leased_until)}; they were not embedded")
    if stats.waiting:
        left.append(f"{stats.waiting} chunks wait to be retried after an error until "
                    f"{clock(stats.waiting_until)}")
    if left:
        err_console.print(Text.assemble(("error:", "red"), " " + "; ".join(left)), highlight=False)
        raise SystemExit(3)  # not 1: nothing failed, but the queue is not done


@app.command("plan-storage")
def plan_storage(vectors: Annotated[int, typer.Option("--vectors", min=0,
                                                      help="number of vectors")]
                 = 1_000_000, as_json: JsonOption = False) -> None:
    """Storage by dimensions: float32 raw, halfvec raw, and with an HNSW index.

    Example: pyembed plan-storage --vectors 2000000
    """
    rows = []
    for dims in (256, 384, 512, 768, 1024, 1536, 3072):
        raw, hnsw = migration.storage_bytes(vectors, dims)
        rows.append({"dimensions": dims, "float32_bytes": raw,
                     "halfvec_bytes": vectors * (2 * dims + 8), "float32_hnsw_bytes": hnsw})
    if as_json:
        _print_json({"vectors": vectors, "hnsw_m": 16, "sizes": rows})
        return
    table = _table("dimensions", "float32 raw", "halfvec raw", "float32 + HNSW",
                   title=f"{vectors:,} vectors (HNSW m=16)")
    for r in rows:
        table.add_row(str(r["dimensions"]), _mb(r["float32_bytes"]), _mb(r["halfvec_bytes"]),
                      _mb(r["float32_hnsw_bytes"]))
    console.print(table)


@app.command("status")
def status_cmd(dsn: DsnOption = None, as_json: JsonOption = False,
               recall_alert: Annotated[float, typer.Option(
                   "--recall-alert", envvar="PYEMBED_RECALL_ALERT", min=0.0, max=1.0,
                   help="recall@10 below which a corpus alerts")] = RECALL_ALERT) -> None:
    """Health at a glance: coverage, queue, throughput, cache, latency, recall, with alerts.

    Example: pyembed status       (exits 1 when something is alerting, --json too)
    """
    with _connect(dsn) as conn:
        findings = health.report(conn, recall_alert=recall_alert)
    alerts = [f for f in findings if f.level == "alert"]
    if as_json:
        _print_json({"findings": [dataclasses.asdict(f) for f in findings],
                     "alerts": len(alerts)})
    else:
        style = {"ok": "green", "warn": "yellow", "alert": "bold red"}
        by_tenant = any(f.tenant for f in findings)  # (the operator's: a column of its own)
        table = _table(*(("tenant",) if by_tenant else ()), "area", "subject", "value", "",
                       "note", numbers=("",))
        for f in findings:
            table.add_row(*((f.tenant,) if by_tenant else ()), f.area, f.subject, f.value,
                          Text(f.level, style=style[f.level]), f.note)
        console.print(table if findings else "nothing to report yet: no corpus")
    if alerts:
        raise PyembedError(f"{len(alerts)} alert(s): " + "; ".join(
            (f"tenant {f.tenant}: " if f.tenant else "") + f"{f.area} {f.subject}: {f.note}"
            for f in alerts[:3]))


@app.command("recall")
def recall_cmd(
    corpus: str,
    queries: Annotated[int, typer.Option(
        "--queries", min=1, max=1000, help="stored vectors searched as queries")] = 50,
    dsn: DsnOption = None, as_json: JsonOption = False,
) -> None:
    """recall@10 of the guarded search against exact search (every vector compared), now.

    Stored vectors of the corpus are the queries; the figure is recorded beside the ones the
    worker measures from sampled real searches (`pyembed status` shows both, and alerts below
    --recall-alert).

    Example: pyembed recall docs --json      ({"recall_at_10": 0.99, ...})
    """
    with _connect(dsn) as conn:
        found = recall.measure(conn, corpus, queries)
    if not found:
        raise PyembedError(f"corpus {corpus!r} has no vectors to measure recall with yet")
    first = found[0]  # the active key's
    if as_json:
        _print_json({"corpus": corpus, "model_key": first.model_key, "queries": first.queries,
                     "recall_at_10": first.recall_at_10,
                     "keys": [dataclasses.asdict(m) for m in found]})
        return
    table = _table("model key", "queries", "recall@10", numbers=("queries", "recall@10"))
    for m in found:
        table.add_row(m.model_key, str(m.queries), f"{m.recall_at_10:.3f}")
    console.print(table)


app.command("doctor")(doctor_cmd)


@app.command("usage")
def usage_cmd(days: DaysOption = 30, dsn: DsnOption = None, as_json: JsonOption = False) -> None:
    """Provider calls, tokens and estimated cost per tenant, corpus and model key, and the
    failed calls per provider and kind since install (429s are rate_limited).

    Example: pyembed usage --days 7
    """
    with _connect(dsn) as conn:
        rows = tenants.usage(conn, days)
        failed = [e for e in tenants.provider_errors(conn) if e.errors]
    if as_json:
        _print_json({"days": days, "usage": [dataclasses.asdict(r) for r in rows],
                     "provider_errors": [dataclasses.asdict(e) for e in failed]})
        return
    table = _table("tenant", "corpus", "model key", "calls", "tokens", "est. cost",
                   numbers=("calls", "tokens", "est. cost"))
    for r in rows:
        table.add_row(r.tenant, r.corpus, r.model_key, f"{r.requests:,}",
                      f"{r.tokens:,}", f"${r.cost_usd:,.4f}")
    console.print(table if rows else "no provider calls recorded")
    if failed:
        errors = _table("provider", "failed calls", "count", numbers=("count",),
                        title="failed provider calls since install")
        for e in failed:
            errors.add_row(e.provider, e.kind, f"{e.errors:,}")
        console.print(errors)


@app.command("demo")
def demo_cmd() -> None:
    """Run the tour on the embedded default: local cluster, local model, search, the 2 AM guard.

    Example: pyembed demo
    """
    from .demo import run

    run(console)


# -- pyembed db ----------------------------------------------------------------------------

@db_app.command("init")
def db_init() -> None:
    """Create and start the local cluster in $PYEMBED_HOME (default ./.pyembed).

    Example: pyembed db init
    """
    c = LocalCluster()
    made = c.init()
    console.print(f"{'created' if made else 'already exists'}: {c.home} (port {c.state().port})")


@db_app.command("start")
def db_start() -> None:
    """Start the local cluster.  Example: pyembed db start"""
    c = LocalCluster()
    console.print("started" if c.start() else "already running")


@db_app.command("stop")
def db_stop() -> None:
    """Stop the local cluster.  Example: pyembed db stop"""
    c = LocalCluster()
    console.print("stopped" if c.stop() else "not running")


@db_app.command("status")
def db_status(as_json: JsonOption = False) -> None:
    """Show whether the local cluster exists and runs.  Example: pyembed db status"""
    status = LocalCluster().status()
    if as_json:
        _print_json(status)
        return
    for k, v in status.items():
        console.print(f"{k}: {v}", highlight=False, soft_wrap=True)


@db_app.command("url")
def db_url(owner: Annotated[bool, typer.Option(help="the owner's DSN instead of the app role's")]
           = False) -> None:
    """Print the DSN of the local cluster.  Example: psql "$(pyembed db url)" """
    print(LocalCluster().dsn(owner=owner))


@replica_app.command("add")
def replica_add(name: str) -> None:
    """Make a hot standby of the local cluster and start it; prints its read DSN.

    Example: export PYEMBED_READ_DSN="$(pyembed db replica add r1)"
    """
    replica = LocalCluster().add_replica(name)
    err_console.print(f"replica {name} streams from the local cluster on port "
                      f"{replica.state().port}")
    print(replica.dsn())


@replica_app.command("list")
def replica_list(as_json: JsonOption = False) -> None:
    """The local cluster's replicas, with how far each is behind.  Example: pyembed db replica list"""
    cluster = LocalCluster()
    rows = []
    for name in cluster.replicas():
        replica = cluster.replica(name)
        running = replica.running()
        lag = cluster.replica_lag(name) if running and cluster.running() else {}
        rows.append({"name": name, "port": replica.state().port, "running": running,
                     "bytes_behind": lag.get("bytes_behind"),
                     "seconds_behind": lag.get("seconds_behind")})
    if as_json:
        _print_json({"replicas": rows})
        return
    table = _table("replica", "port", "running", "WAL behind", "time behind")
    for r in rows:
        behind, seconds = r["bytes_behind"], r["seconds_behind"]
        table.add_row(str(r["name"]), str(r["port"]), "yes" if r["running"] else "no",
                      f"{behind:,} bytes" if isinstance(behind, int) else "-",
                      f"{seconds:.1f} s" if isinstance(seconds, float) else "-")
    console.print(table if rows else "no replicas: pyembed db replica add NAME")


@replica_app.command("remove")
def replica_remove(name: str) -> None:
    """Stop a replica and delete its copy.  Example: pyembed db replica remove r1"""
    console.print("removed" if LocalCluster().remove_replica(name) else f"no replica {name}")


# -- pyembed corpus ------------------------------------------------------------------------

@corpus_app.command("create")
def corpus_create(
    name: str,
    model: Annotated[str, typer.Option("--model", help="model key")] = LOCAL_DEFAULT.key,
    description: str = "",
    chunk_tokens: Annotated[int, typer.Option(
        "--chunk-tokens", help="longest chunk, in estimated tokens (a longer document is split "
                               "into overlapping chunks)")] = 200,
    chunk_overlap: Annotated[int, typer.Option(
        "--chunk-overlap", help="tokens each chunk repeats from the one before")] = 40,
    storage: Annotated[str, typer.Option(
        "--storage", help="how the HNSW index holds the vectors: vector (float32), halfvec "
                          "(float16, half the index) or binary (sign bits, rescored exactly)")
    ] = "vector",
    exist_ok: Annotated[bool, typer.Option(
        "--exist-ok", help="succeed if the corpus exists with the same model key and chunking")
    ] = False,
    dsn: DsnOption = None,
) -> None:
    """Create a corpus pinned to one model key.

    Example: pyembed corpus create docs --model voyage/voyage-3@1:1024 --storage halfvec
    """
    with _connect(dsn) as conn:
        existed = exist_ok and any(c.name == name for c in list_corpora(conn))
        info = create_corpus(conn, name, model, description, chunk_tokens, chunk_overlap,
                             storage=storage, exist_ok=exist_ok)
    console.print(f"{'corpus exists:' if existed else 'created corpus'} {info.name} pinned to "
                  f"{info.model_key} ({info.storage})")


@corpus_app.command("list")
def corpus_list(dsn: DsnOption = None, as_json: JsonOption = False) -> None:
    """List corpora with their model keys.  Example: pyembed corpus list"""
    with _connect(dsn) as conn:
        rows = list_corpora(conn)
    if as_json:
        _print_json({"corpora": [dataclasses.asdict(r) for r in rows]})
        return
    table = _table("corpus", "model key", "dims", "migration", "description",
                   numbers=("dims",))
    for r in rows:
        table.add_row(r.name, r.model_key, str(r.dimensions),
                      r.migration_step if r.target_model_key is None
                      else f"{r.migration_step} -> {r.target_model_key} ({r.traffic_share}%)",
                      r.description)
    console.print(table)


@corpus_app.command("show")
def corpus_show(name: str, dsn: DsnOption = None, as_json: JsonOption = False) -> None:
    """Show one corpus.  Example: pyembed corpus show docs"""
    with _connect(dsn) as conn:
        info = corpus_info(conn, name)
    if as_json:
        _print_json(dataclasses.asdict(info))
        return
    for k, v in dataclasses.asdict(info).items():
        console.print(f"{k}: {v}", highlight=False, soft_wrap=True)


def _print_index(rows: list[index.IndexStatus], as_json: bool) -> None:
    if as_json:
        _print_json({"indexes": [r.as_json() for r in rows]})
        return
    # One block per key, not a table: nine columns crushed the key to three letters a line at
    # 80 columns.
    for r in rows:
        built = (f"m {r.m}, ef_construction {r.ef_construction}" if r.m is not None
                 else "no index (exact scan)")
        size = f", {_mb(r.index_bytes)}" if r.index_bytes is not None else ""
        oversample = f", oversample {r.oversample}" if r.storage == "binary" else ""
        console.print(f"{r.model_key} ({r.storage}): {r.rows:,} rows\n"
                      f"  {built}{size} (rule for {r.rows:,} rows: m {r.rule_m}, "
                      f"ef_construction {r.rule_ef_construction})\n"
                      f"  ef_search {r.ef_search}{oversample}",
                      highlight=False, soft_wrap=True)
    if rows and rows[0].settings:
        console.print(f"owner overrides: {json.dumps(rows[0].settings)}")


INDEX_RANGES = " (its range: checked by the database, see above)"
"""Where the index settings' ranges are held, said instead of the figures, which the help would
keep a second copy of."""


@corpus_app.command("index")
def corpus_index(
    name: str,
    m: Annotated[int | None, typer.Option("--m", help="HNSW links per node" + INDEX_RANGES)
                 ] = None,
    ef_construction: Annotated[int | None, typer.Option(
        "--ef-construction", help="HNSW build search width" + INDEX_RANGES)] = None,
    ef_search: Annotated[int | None, typer.Option(
        "--ef-search", help="search width pyembed sets for its searches" + INDEX_RANGES)] = None,
    oversample: Annotated[int | None, typer.Option(
        "--oversample", help="binary storage: candidates rescored per hit" + INDEX_RANGES)
                          ] = None,
    rule: Annotated[bool, typer.Option(
        "--rule", help="drop every override: back to pyembed's rule")] = False,
    dsn: OwnerDsnOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show or override a corpus's HNSW parameters (as the owner); m and ef_construction apply
    at the next `pyembed corpus reindex`.

    The database holds each setting's range (the corpora table's check,
    pyembed._index_settings_problem) and names it when it refuses a value.

    Example: pyembed corpus index docs --ef-search 200
    """
    given: dict[str, int | None] = {k: v for k, v in (("m", m), ("ef_construction", ef_construction),
                               ("ef_search", ef_search), ("oversample", oversample))
             if v is not None}
    with _connect(dsn, owner=True) as conn:
        if rule:
            given = dict.fromkeys(index.SETTINGS)
        if given:
            index.set_index_settings(conn, name, **given)
        rows = index.index_status(conn, name)
    _print_index(rows, as_json)


@corpus_app.command("reindex")
def corpus_reindex(
    name: str,
    storage: Annotated[str | None, typer.Option(
        "--storage", help="rebuild in this storage: vector, halfvec or binary")] = None,
    dsn: OwnerDsnOption = None,
    as_json: JsonOption = False,
) -> None:
    """Rebuild a corpus's HNSW index online (CONCURRENTLY, then swapped) with the parameters
    in force, optionally in another storage; searches and writes go on (as the owner).

    Example: pyembed corpus reindex docs --storage halfvec
    """
    with _connect(dsn, owner=True) as conn:
        rows = index.rebuild_index(conn, name, storage)
    _print_index(rows, as_json)


@corpus_app.command("drop")
def corpus_drop(name: str,
                yes: Annotated[bool, typer.Option("--yes", help="do not ask")] = False,
                dsn: DsnOption = None) -> None:
    """Drop a corpus with its documents and vectors.  Example: pyembed corpus drop docs --yes"""
    with _connect(dsn) as conn:
        if not yes:  # asked of a corpus that exists (UnknownCorpus first), on stderr: not a result
            corpus_info(conn, name)
            if not sys.stdin.isatty():  # no one to answer: the prompt ran into "error: aborted"
                raise InvalidInput(f"corpus drop asks before it drops {name}, and no one can "
                                   "answer (stdin is not a terminal): pass --yes")
            typer.confirm(f"drop corpus {name} and all its documents and vectors?", abort=True,
                          err=True)
        drop_corpus(conn, name)
    console.print(f"dropped {name}")


@corpus_app.command("delete-documents")
def corpus_delete_documents(
        name: str,
        document_ids: Annotated[list[str], typer.Argument(help="the documents' ids")],
        dsn: DsnOption = None) -> None:
    """Delete documents of a corpus with their chunks and vectors.

    Example: pyembed corpus delete-documents docs e4012 sso
    """
    with _connect(dsn) as conn:
        deleted = delete_documents(conn, name, document_ids)
    asked = len(set(document_ids))
    console.print(f"deleted {deleted} of {asked} document{'s' if asked != 1 else ''} from "
                  f"{name}" + (" (the others are not in it)" if deleted < asked else ""))


# -- pyembed migrate (as the owner) --------------------------------------------------------

@migrate_app.command("plan")
def migrate_plan(corpus: str, to: TargetKeyOption,
                 storage: Annotated[str | None, typer.Option(
                     "--storage", help="the target key's storage (vector, halfvec, binary; "
                                       "default: the corpus's), as migrate start takes it")] = None,
                 dsn: OwnerDsnOption = None, as_json: JsonOption = False) -> None:
    """What moving CORPUS to another model costs: calls, hours, dollars, storage.

    Example: pyembed migrate plan docs --to voyage/voyage-3@1:1024 --storage halfvec
    """
    with _client(dsn, owner=True) as client:
        p = migration.plan(client, corpus, to, storage)
    if as_json:
        _print_json({"corpus": p.corpus, "from_key": p.from_key, "to_key": p.to_key,
                     "documents": p.documents, "chunks": p.chunks, "tokens": p.tokens,
                     "api_calls": p.api_calls, "hours": p.hours, "cost_usd": p.cost_usd,
                     "storage_before": {"raw_bytes": p.storage_before[0],
                                        "hnsw_bytes": p.storage_before[1]},
                     "storage_during": {"raw_bytes": p.storage_after[0],
                                        "hnsw_bytes": p.storage_after[1]}})
        return
    table = _table("", "value", title=f"{p.corpus}: {p.from_key} -> {p.to_key}")
    for k, v in [("documents", f"{p.documents:,}"), ("chunks", f"{p.chunks:,}"),
                 ("estimated tokens", f"{p.tokens:,}"), ("API calls", f"{p.api_calls:,}"),
                 ("time at the provider's rate", f"{p.hours:.2f} h"),
                 ("cost", f"${p.cost_usd:,.2f}" if p.cost_usd is not None else "unknown"),
                 ("storage now (raw / with HNSW)",
                  f"{_mb(p.storage_before[0])} / {_mb(p.storage_before[1])}"),
                 ("during the migration (both keys)",
                  f"{_mb(p.storage_after[0])} / {_mb(p.storage_after[1])}")]:
        table.add_row(k, v)
    console.print(table)


@migrate_app.command("start")
def migrate_start(corpus: str, to: TargetKeyOption,
                  storage: Annotated[str | None, typer.Option(
                      "--storage", help="the target key's storage (vector, halfvec, binary; "
                                        "default: the corpus's)")] = None,
                  dsn: OwnerDsnOption = None) -> None:
    """Pin a target key: new and changed chunks are embedded for both keys from now on.

    Example: pyembed migrate start docs --to voyage/voyage-3@1:1024 --storage halfvec
    """
    with _client(dsn, owner=True) as client:
        mid = migration.start(client, corpus, to, storage)
    console.print(f"migration {mid} started: {corpus} -> {to}; next: pyembed migrate backfill "
                  f"{corpus}")


@migrate_app.command("backfill")
def migrate_backfill(
    corpus: str,
    rate: Annotated[float | None, typer.Option(help="at most this many texts per second")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size")] = None,
    dsn: OwnerDsnOption = None,
) -> None:
    """Embed every chunk for the target key (resumes where a crash left off), then build the
    shadow index.  Example: pyembed migrate backfill docs --rate 50
    """
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    # (A style, not markup: the console reads no markup, which showed "[progress.description]".)
    with _client(dsn, owner=True) as client, _progress(
            TextColumn("{task.description}", style="progress.description"), BarColumn(),
            MofNCompleteColumn(), TimeRemainingColumn()) as bar:
        report = migration.backfill(client, corpus, rate=rate, batch_size=batch_size,
                                    progress=lambda done, total: bar(done, total, "backfill"))
    skipped = (f", skipped {report.skipped} (changed or deleted meanwhile; a changed one is "
               "queued for both keys)" if report.skipped else "")
    resumed = (f"; resumed: {report.resumed} chunks had their vector already"
               if report.resumed else "")
    console.print(f"backfilled {report.written} chunks{skipped} in {report.seconds:.1f} s "
                  f"({report.rate:.1f} chunks/s){resumed}; shadow index built; next: pyembed "
                  f"migrate validate {corpus}")


@migrate_app.command("validate")
def migrate_validate(
    corpus: str,
    max_drop: Annotated[float, typer.Option(
        help="largest nDCG/recall drop allowed, 0..1 (the scores' scale)")] = 0.02,
    force: Annotated[bool, typer.Option(
        "--force", help="validate on fewer evaluation queries than a validation needs "
                        "(pyembed.min_eval_queries(), 10); the report records it")] = False,
    dsn: OwnerDsnOption = None,
    as_json: JsonOption = False,
) -> None:
    """Compare old and new keys on the corpus's evaluation queries (at least 10, or --force);
    refuse below the gate.

    Example: pyembed migrate validate docs --max-drop 0.01
    """
    with _client(dsn, owner=True) as client:
        v = migration.validate(client, corpus, max_drop=max_drop, force=force)
    if as_json:
        _print_json({"corpus": corpus, **v.as_json()})
    else:
        _print_validation(corpus, v)
    if not v.passed:
        raise MigrationError(f"validation failed: the new key is more than {max_drop} below the "
                             "old one; promotion refused (roll back, or validate with a looser "
                             "--max-drop)")
    if not as_json:
        console.print(f"validated; next: pyembed migrate shift {corpus} 10")


def _print_validation(corpus: str, v: migration.Validation) -> None:
    table = _table("model key", "Recall@10", "nDCG@10", "ms / query",
                   numbers=("Recall@10", "nDCG@10", "ms / query"),
                   title=f"{corpus}: {v.queries} evaluation queries"
                         + (f" (forced: fewer than the {v.min_queries} a validation needs)"
                            if v.forced else "") + f"; top-10 overlap {v.overlap:.0%}")
    for side in (v.old, v.new):
        table.add_row(side.model_key, f"{side.recall:.4f}", f"{side.ndcg:.4f}",
                      f"{side.ms_per_query:.1f}")
    console.print(table)


@migrate_app.command("shift", context_settings=NUMBERS)
def migrate_shift(corpus: str, share: int, dsn: OwnerDsnOption = None) -> None:
    """Serve SHARE percent of searches (stable by query) from the new key.

    Example: pyembed migrate shift docs 10     (then 50, then 100)
    """
    with _client(dsn, owner=True) as client:
        migration.shift(client, corpus, share)
    console.print(f"{corpus}: {share}% of searches now use the new key")


@migrate_app.command("complete")
def migrate_complete(corpus: str, dsn: OwnerDsnOption = None) -> None:
    """Promote the new key (after shift 100); old vectors stay until cleanup.

    Example: pyembed migrate complete docs
    """
    with _client(dsn, owner=True) as client:
        migration.complete(client, corpus)
    console.print(f"{corpus} is now pinned to its new key; pyembed migrate cleanup {corpus} "
                  "frees the old vectors")


@migrate_app.command("rollback")
def migrate_rollback(corpus: str, dsn: OwnerDsnOption = None) -> None:
    """Return every search and write to the old key, at once.  Example: pyembed migrate rollback docs"""
    with _client(dsn, owner=True) as client:
        migration.rollback(client, corpus)
    console.print(f"{corpus}: rolled back; all searches use the old key")


@migrate_app.command("cleanup")
def migrate_cleanup(corpus: str, dsn: OwnerDsnOption = None) -> None:
    """Delete vectors and indexes of keys the corpus no longer serves.

    Example: pyembed migrate cleanup docs
    """
    with _client(dsn, owner=True) as client:
        n = migration.cleanup(client, corpus)
    console.print(f"{corpus}: removed {n} vectors of old keys")


@migrate_app.command("status")
def migrate_status(corpus: str, dsn: OwnerDsnOption = None, as_json: JsonOption = False) -> None:
    """Step, shadow-index coverage, errors and traffic share.  Example: pyembed migrate status docs"""
    with _client(dsn, owner=True) as client:
        st = migration.status(client, corpus)
    if as_json:
        _print_json({"corpus": st.corpus, "model_key": st.model_key,
                     "target_model_key": st.target_model_key, "step": st.step,
                     "traffic_share": st.traffic_share, "coverage": st.coverage,
                     "chunks": st.chunks, "target_vectors": st.target_vectors,
                     "queued": st.queued, "failed": st.failed,
                     "retired": [{"model_key": k, "vectors": n} for k, n in st.retired],
                     "next": st.next,
                     "events": [{"at": at, "step": step, "detail": detail}
                                for at, step, detail in st.events]})
        return
    cov = f"{st.coverage:.1%}" if st.coverage is not None else "-"
    console.print(f"{st.corpus}: {st.model_key}" + (
        f" -> {st.target_model_key}, step {st.step}, traffic {st.traffic_share}%, "
        f"coverage {cov} ({st.target_vectors}/{st.chunks}), queued {st.queued}, "
        f"failed {st.failed}" if st.target_model_key else ", no migration in progress"),
        highlight=False)
    for key, vectors in st.retired:
        console.print(f"  {vectors} vectors of {key}, a key it no longer serves", highlight=False)
    if st.next:
        console.print(f"  next: {st.next}", highlight=False)
    for at, step, detail in st.events[:10]:
        console.print(f"  {at}  {step}" + (f"  {json.dumps(detail)}" if detail else ""),
                      highlight=False)


# -- pyembed eval --------------------------------------------------------------------------

@eval_app.command("add")
def eval_add(
    corpus: str, query_id: str, query: str,
    relevant: Annotated[list[str], typer.Option("--relevant", help="a relevant document id "
                                                                   "(repeat the option)")],
    dsn: DsnOption = None,
) -> None:
    """Store an evaluation query and the documents that answer it.

    Example: pyembed eval add docs q1 "what is E4012?" --relevant error-e4012
    """
    with _client(dsn) as client:
        evaluation.add_eval_query(client, corpus, query_id, query, relevant)
    console.print(f"stored evaluation query {query_id} for {corpus}")


@eval_app.command("import")
def eval_import(
    corpus: str,
    queries: Annotated[Path, typer.Argument(
        help="JSON Lines, a line {\"id\", \"query\", \"relevant\": a list of document ids}; "
             "with --qrels, BEIR's queries.jsonl ({\"_id\", \"text\"})")],
    qrels: Annotated[Path | None, typer.Option(
        "--qrels", help="BEIR qrels TSV: query-id, corpus-id, score (above 0: relevant)")] = None,
    dsn: DsnOption = None,
    as_json: JsonOption = False,
) -> None:
    """Store many evaluation queries from a file; bad lines are reported with their line
    numbers and the rest are stored (a query stored under the same id is replaced).

    Example: pyembed eval import scifact queries.jsonl --qrels qrels/test.tsv
    """
    with _client(dsn) as client:
        stored, problems = evaluation.import_eval_queries(client, corpus, queries, qrels)
    if as_json:
        _print_json({"corpus": corpus, "stored": stored, "problems": _problems_json(problems)})
    else:
        _skipped(problems)
        console.print(f"stored {stored} evaluation queries for {corpus}"
                      + (f"; {len(problems)} line(s) skipped" if problems else ""),
                      markup=False, highlight=False)
    if not stored:
        raise PyembedError(f"{len(problems)} problem(s) while importing; nothing was stored")


@eval_app.command("list")
def eval_list(corpus: str, dsn: DsnOption = None, as_json: JsonOption = False) -> None:
    """List a corpus's evaluation queries and the documents that answer them.

    Example: pyembed eval list docs
    """
    with _client(dsn) as client:
        queries = evaluation.stored_eval_queries(client, corpus)
    if as_json:
        _print_json({"corpus": corpus, "queries": [
            {"query_id": q.query_id, "query": q.query, "relevant": q.relevant}
            for q in queries]})
        return
    table = _table("query id", "query", "relevant",
                   title=f"{corpus}: {len(queries)} evaluation quer"
                         f"{'y' if len(queries) == 1 else 'ies'}")
    for q in queries:
        table.add_row(q.query_id, q.query, ", ".join(q.relevant))
    console.print(table)


@eval_app.command("remove")
def eval_remove(corpus: str,
                query_ids: Annotated[list[str], typer.Argument(help="the queries' ids")],
                dsn: DsnOption = None) -> None:
    """Delete evaluation queries of a corpus.

    Example: pyembed eval remove docs q1 q2
    """
    with _client(dsn) as client:
        removed = evaluation.remove_eval_queries(client, corpus, query_ids)
    asked = len(set(query_ids))
    console.print(f"removed {removed} of {asked} evaluation quer{'y' if asked == 1 else 'ies'} "
                  f"from {corpus}" + (" (the others are not in it)" if removed < asked else ""))


@eval_app.command("compare")
def eval_compare(
    corpus: str,
    model_keys: Annotated[list[str], typer.Argument(help="candidate model keys")],
    sample: Annotated[int, typer.Option(min=0, help="chunks to embed per candidate")] = 2000,
    dsn: DsnOption = None,
    as_json: JsonOption = False,
) -> None:
    """Benchmark candidate models on your corpus and evaluation queries, side by side.

    Example: pyembed eval compare docs local/all-minilm-l6-v2-int8@1:384 voyage/voyage-3@1:1024
    """
    from .compare import compare

    with _client(dsn) as client:
        chunks, queries, rows = compare(client, corpus, model_keys, sample=sample)
    rows = sorted(rows, key=lambda r: -r.ndcg)
    if as_json:
        _print_json({"corpus": corpus, "queries": queries, "sampled_chunks": chunks,
                     "candidates": [dataclasses.asdict(r) for r in rows]})
        return
    table = _table("model key", "Recall@10", "nDCG@10", "ms / query", "texts / s",
                   "storage (full, HNSW)", "cost (full)",
                   numbers=("Recall@10", "nDCG@10"),
                   title=f"{corpus}: {queries} evaluation queries over {chunks} sampled chunks")
    for r in rows:
        table.add_row(r.model_key, f"{r.recall:.4f}", f"{r.ndcg:.4f}", f"{r.ms_per_query:.1f}",
                      f"{r.texts_per_second:,.0f}", _mb(r.storage_bytes),
                      f"${r.cost_usd:,.2f}" if r.cost_usd is not None else "-")
    console.print(table)


# -- pyembed cache -------------------------------------------------------------------------

@cache_app.command("stats")
def cache_stats(days: DaysOption = 30, dsn: DsnOption = None, as_json: JsonOption = False) -> None:
    """Hits, misses and hit rate per day and model.  Example: pyembed cache stats --days 7"""
    with _connect(dsn) as conn:
        rows = cache.stats(conn, days)
    if as_json:
        _print_json({"days": days, "stats": [
            {"day": r.day.isoformat(), "model_key": r.model_key, "hits": r.hits,
             "misses": r.misses, "hit_rate": r.hit_rate, "entries": r.entries} for r in rows]})
        return
    table = _table("day", "model key", "hits", "misses", "hit rate", "entries",
                   numbers=("day", "hits", "misses", "hit rate", "entries"))
    for r in rows:
        rate = f"{r.hit_rate:.0%}" if r.hit_rate is not None else "-"
        table.add_row(str(r.day), r.model_key, str(r.hits), str(r.misses), rate, str(r.entries))
    console.print(table if rows else "no cache lookups recorded yet")


@cache_app.command("purge")
def cache_purge(
    model: Annotated[str | None, typer.Option(
        "--model", help="only this model key or reranker (e.g. voyage/rerank-2.5)")] = None,
    expired: Annotated[bool, typer.Option("--expired", help="only expired entries")] = False,
    older_than: Annotated[int | None, typer.Option(
        "--older-than", metavar="DAYS", min=0, max=36500,
        help="only entries made more than DAYS days ago (the caches have no size bound: a "
             "scheduled purge keeps them to an age)")] = None,
    dsn: DsnOption = None,
) -> None:
    """Delete cached embeddings and rerank scores.
    Example: pyembed cache purge --model openai/text-embedding-3-small@1:1536"""
    from .rerank import reranker_spec

    reranker = None
    if model is not None:
        try:
            reranker = reranker_spec(model).key
        except PyembedError:
            pass  # not a reranker: a model key, which the database checks (UnknownModel)
    with _connect(dsn) as conn:
        # a model key never names a reranker, so --model selects from one cache only
        n = cache.purge(conn, model, expired, older_than) if reranker is None else 0
        r = (cache.purge_rerank_scores(conn, reranker, expired, older_than)
             if model is None or reranker else 0)
    console.print(f"deleted {n} cache entries" + (f" and {r} rerank scores" if r else ""))


# -- pyembed metrics -----------------------------------------------------------------------

@metrics_app.command("serve")
def metrics_serve(
    port: Annotated[int, typer.Option(help="port to listen on", min=1, max=65535)] = 9187,
    address: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    dsn: WorkerDsnOption = None,
) -> None:
    """Serve /metrics for Prometheus (figures read from the database at each scrape).

    Logs in as the worker does ($PYEMBED_WORKER_DSN first): the operator's login reports every
    tenant, each figure labelled with its tenant; a tenant's login, its own tenant.

    Example: pyembed metrics serve --port 9187
    """
    from .metrics import serve

    target = dsn or resolve_dsn(worker=True)
    try:  # the database at the start: a DSN that is not one stops here; one down is said once
        connect(target, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        err_console.print(Text.assemble(
            ("warning:", "yellow"), f" the database does not answer yet ({_one_line(exc)}): "
            "pyembed_up is 0 until it does"), highlight=False)
    serve(target, port=port, address=address,
          ready=lambda: console.print(f"serving http://{address}:{port}/metrics (Ctrl-C stops)"),
          stopped=lambda: bool(_stops))
    _stops.clear()  # Ctrl-C or SIGTERM is how a server ends: exit 0, as `worker` does


# -- pyembed tenant ------------------------------------------------------------------------

@tenant_app.command("create")
def tenant_create(
    name: str,
    rpm: Annotated[int | None, typer.Option("--rpm", help="provider requests per minute")] = None,
    tpm: Annotated[int | None, typer.Option("--tpm", help="tokens per minute")] = None,
    dsn: OwnerDsnOption = None,
) -> None:
    """Create a tenant (as the owner).  Example: pyembed tenant create acme --rpm 300 --tpm 100000"""
    with _connect(dsn, owner=True) as conn:
        tenants.create_tenant(conn, name, requests_per_minute=rpm, tokens_per_minute=tpm)
    console.print(f"created tenant {name}")


@tenant_app.command("list")
def tenant_list(dsn: OwnerDsnOption = None, as_json: JsonOption = False) -> None:
    """List the tenants with their limits and members (as the owner).  Example: pyembed tenant list"""
    with _connect(dsn, owner=True) as conn:
        rows = tenants.list_tenants(conn)
    if as_json:
        _print_json({"tenants": [dataclasses.asdict(r) for r in rows]})
        return
    table = _table("tenant", "requests/min", "tokens/min", "members", "created",
                   numbers=("requests/min", "tokens/min"))
    for r in rows:
        table.add_row(r.name, *("unlimited" if limit is None else f"{limit:,}"
                                for limit in (r.requests_per_minute, r.tokens_per_minute)),
                      ", ".join(m + (" (not the role added: add it again)"
                                     if m in r.stale_members else "")
                                for m in r.members) or "none", f"{r.created_at:%Y-%m-%d %H:%M}")
    console.print(table)


@tenant_app.command("add-member")
def tenant_add_member(
    tenant: str, role: str,
    login: Annotated[bool, typer.Option(
        "--login", help="create ROLE as a login in pyembed_app, its password read from a prompt "
                        "that does not echo it, or from standard input")] = False,
    password: Annotated[str | None, typer.Option(
        hidden=True, help="refused: a password on the command line is seen by ps and kept in "
                          "shell history (use --login)")] = None,
    dsn: OwnerDsnOption = None,
) -> None:
    """Let a login role act for a tenant.

    Example: pyembed tenant add-member acme acme_app     (or, making the login: pyembed tenant
    add-member acme acme_app --login, then type its password; or printf %s "$PW" | pyembed
    tenant add-member acme acme_app --login)
    """
    if password is not None:
        raise InvalidInput("--password takes no value on the command line any more (ps shows "
                           "it to every user of the machine, and the shell's history keeps it): "
                           "use --login, which reads the password from a prompt that does not "
                           "echo it, or from standard input; nothing was made")
    with _connect(dsn, owner=True) as conn:  # (an unreachable database before the prompt)
        secret = read_secret(f"{role}'s password") if login else None
        tenants.add_member(conn, tenant, role, create_login=secret)
    console.print(f"{role} now acts for tenant {tenant}")


# -- pyembed secret ------------------------------------------------------------------------

@secret_app.command("set")
def secret_set(name: str, dsn: OwnerDsnOption = None) -> None:
    """Store a provider's API key or base URL for the in-database functions (as the owner).

    The value is read from a prompt that does not echo it, or from standard input's first line
    when that is not a terminal: never from the command line (ps, shell history); it is sent so
    that no server log holds it.

    Example: pyembed secret set VOYAGE_API_KEY     (or: printf %s "$KEY" | pyembed secret set ...)
    """
    with _connect(dsn, owner=True) as conn:  # (an unreachable database before the prompt)
        unset = provider_secrets.set_secret(conn, name, read_secret(name))
    console.print(f"{name} stored (readable by the owner's functions only)")
    if unset:
        err_console.print(Text.assemble(
            ("warning:", "yellow"), f" this login may not set {', '.join(unset)}: the server's "
            "own settings decide whether the statement is logged (its value is a bind "
            "parameter, never in its text)"), highlight=False)


# -- entry point ---------------------------------------------------------------------------

def _reflow(doc: str) -> str:
    """`doc` with each paragraph on one line, for the terminal to wrap at its width: rich help
    keeps a docstring's line breaks after its first paragraph, which then read ragged at any
    width but the source's. A paragraph that starts with \\b keeps its lines (click's mark)."""
    return "\n\n".join(p if p.startswith("\b") else " ".join(line.strip() for line in p.splitlines())
                       for p in inspect.cleandoc(doc).split("\n\n"))


def _summarise(group: typer.Typer) -> None:
    """Give each command its docstring's paragraphs each on one line as its help, and its first
    paragraph without its example as its summary in its group's list, in every group."""
    for info in group.registered_commands:
        doc = info.help or (info.callback.__doc__ if info.callback else None)
        if not doc:
            continue
        info.help = _reflow(doc)
        if info.short_help is None:
            first = " ".join(info.help.split("\n\n")[0].split())
            info.short_help = first.split(" Example:")[0]
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _summarise(sub.typer_instance)


_summarise(app)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def _noted(exc: BaseException) -> str:
    """The notes added to `exc` (or the error it stands for: click's Abort for Ctrl-C) on its
    way, such as what a stopped `ingest` kept, for the same line."""
    notes = [*getattr(exc, "__notes__", ()), *getattr(exc.__cause__, "__notes__", ())]
    return "".join(f"; {note}" for note in notes)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is as Ctrl-C's KeyboardInterrupt is, so that it
    unwinds the same way: the open transaction rolled back (psycopg cancels a statement in
    flight), what an ingest kept noted, one line; by default SIGTERM ended the process where it
    stood, with no word."""


_stops: list[KeyboardInterrupt] = []
"""The interruptions this run raised: typer turns one into a return value of 130 (`python -m
pyembed` exited 0 on Ctrl-C, with no word), dropping it and the notes on it."""


def _stop(signum: int, frame: Any) -> None:
    stop = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    _stops.append(stop)
    raise stop


def _interruption(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM `exc` is or stands for (click raises Abort from it), if any."""
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, KeyboardInterrupt):
            return e
    return None


@contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """pyembed's warnings (NotEmbeddedYet: a search short of k while chunks wait for the worker)
    as one `warning:` line each on stderr, the first time each is said, not Python's
    file:line form; any other warning as Python shows it."""
    shown = warnings.showwarning
    said: set[str] = set()

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if not issubclass(category, NotEmbeddedYet):
            shown(message, category, *args, **kwargs)
        elif str(message) not in said:
            said.add(str(message))
            err_console.print(Text.assemble(("warning:", "yellow"), f" {message}"),
                              highlight=False)

    with warnings.catch_warnings():
        warnings.simplefilter("always", NotEmbeddedYet)
        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> Any:
    """Entry point: run the CLI, turning pyembed and connection errors into one line."""
    def fail(message: str, code: int = 1, exc: BaseException | None = None) -> None:
        message += _noted(exc) if exc is not None else ""
        err_console.print(Text.assemble(("error:", "red"), f" {message}"), highlight=False)
        sys.exit(code)

    _stops.clear()
    signals = (signal.SIGINT, signal.SIGTERM)
    # (Only the main thread may set a handler; main(argv) in your program leaves yours as they
    # were.)
    previous = ({s: signal.signal(s, _stop) for s in signals}
                if threading.current_thread() is threading.main_thread() else {})
    try:
        with _warnings_as_lines():
            code = app(argv, standalone_mode=False)
        if _stops:
            raise _stops[-1]
        if isinstance(code, int) and code:  # typer.Exit(code): `python -m pyembed` exited 0
            sys.exit(code)
        return code
    except PyembedError as exc:
        fail(_one_line(exc), exc=exc)
    except psycopg.OperationalError as exc:
        if connection_lost(exc):
            fail(f"cannot reach the database: {_one_line(exc)}", exc=exc)
        fail(_one_line(translate(exc)), exc=exc)
    except psycopg.Error as exc:
        fail(_one_line(translate(exc)), exc=exc)
    except (typer.Abort, KeyboardInterrupt) as exc:
        # The shell's codes for a command a signal ended, 128 + its number: a script can tell
        # an interruption from a failure; an answer of no to a question is a refusal (1).
        stop = _interruption(exc)
        if isinstance(stop, Terminated):
            fail("stopped by SIGTERM", 128 + signal.SIGTERM, exc=exc)
        if stop is not None:
            fail("interrupted (Ctrl-C)", 128 + signal.SIGINT, exc=exc)
        fail("aborted", exc=exc)
    except OSError as exc:  # the machine's answer (a file, a port, a folder): not a bug
        fail(_one_line(exc), exc=exc)
    except Exception as exc:
        # Usage errors from typer's click (format_message + exit_code); anything else is a bug.
        # Exit 1, not click's 2: bad input is one exit code whoever finds it, the option parser
        # (a range, a type) or pyembed (its own checks, the database's).
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            if not exc.format_message():  # a group named alone: its help is the answer
                sys.exit(1)
            fail(f"{exc.format_message()} (see --help)")
        raise
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)


__all__ = ["app", "main"]
