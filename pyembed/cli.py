"""The `pyembed` command line: one clear line and a non-zero exit on every error."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import psycopg
import typer
from rich.console import Console
from rich.table import Table

from . import schema
from . import store
from .config import DSN_ENV
from .db import connect
from .errors import InvalidInput, PyembedError
from .localdb import LocalCluster
from .models import LOCAL_DEFAULT, registry

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="The embedding model as an enforced part of your PostgreSQL schema.")
db_app = typer.Typer(no_args_is_help=True, help="The embedded local PostgreSQL cluster.")
corpus_app = typer.Typer(no_args_is_help=True, help="Create, list, show and drop corpora.")
app.add_typer(db_app, name="db")
app.add_typer(corpus_app, name="corpus")
cache_app = typer.Typer(no_args_is_help=True, help="The embedding cache in PostgreSQL.")
app.add_typer(cache_app, name="cache")
console = Console()
err_console = Console(stderr=True, soft_wrap=True)

DsnOption = Annotated[str | None, typer.Option("--dsn", envvar=DSN_ENV,
                                               help="libpq DSN; default: the local cluster")]


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
def db_status() -> None:
    """Show whether the local cluster exists and runs.  Example: pyembed db status"""
    for k, v in LocalCluster().status().items():
        console.print(f"{k}: {v}")


@db_app.command("url")
def db_url(owner: Annotated[bool, typer.Option(help="the owner's DSN instead of the app role's")]
           = False) -> None:
    """Print the DSN of the local cluster.  Example: psql "$(pyembed db url)" """
    print(LocalCluster().dsn(owner=owner))


@app.command("install")
def install_cmd(
    dsn: Annotated[str | None, typer.Option("--dsn", envvar="PYEMBED_OWNER_DSN",
                                            help="owner DSN; default: the local cluster")] = None,
    sql: Annotated[bool, typer.Option("--sql", help="print the SQL script instead")] = False,
) -> None:
    """Bring a database to the current pyembed schema (idempotent).

    Example: pyembed install --dsn postgresql://owner@db/app   |   pyembed install --sql > pyembed.sql
    """
    if sql:
        sys.stdout.write(schema.offline_sql())
        return
    console.print(f"pyembed schema at revision {schema.install(dsn)}")


@app.command("models")
def models_cmd() -> None:
    """List the known embedding models and their keys.  Example: pyembed models"""
    table = Table()
    table.add_column("model key", overflow="fold")  # never elided: users copy it
    for title in ("dims", "batch", "max tokens", "MTEB", "$ / 1M tokens", "about"):
        table.add_column(title)
    for m in registry.all():
        table.add_row(m.key, str(m.dimensions), str(m.max_batch), str(m.max_tokens),
                      f"{m.mteb:.1f}" if m.mteb is not None else "-",
                      f"{m.price_per_mtok:.2f}" if m.price_per_mtok is not None else "-",
                      m.description)
    console.print(table)


@corpus_app.command("create")
def corpus_create(
    name: str,
    model: Annotated[str, typer.Option("--model", help="model key")] = LOCAL_DEFAULT.key,
    description: str = "",
    dsn: DsnOption = None,
) -> None:
    """Create a corpus pinned to one model key.

    Example: pyembed corpus create docs --model voyage/voyage-3@1:1024
    """
    with connect(dsn, autocommit=True) as conn:
        info = store.create_corpus(conn, name, model, description)
    console.print(f"created corpus {info.name} pinned to {info.model_key}")


@corpus_app.command("list")
def corpus_list(dsn: DsnOption = None) -> None:
    """List corpora with their model keys.  Example: pyembed corpus list"""
    with connect(dsn, autocommit=True) as conn:
        rows = store.list_corpora(conn)
    table = Table("corpus", "model key", "dims", "migration", "description")
    for r in rows:
        table.add_row(r.name, r.model_key, str(r.dimensions),
                      r.migration_step if r.target_model_key is None
                      else f"{r.migration_step} -> {r.target_model_key} ({r.traffic_share}%)",
                      r.description)
    console.print(table)


@corpus_app.command("show")
def corpus_show(name: str, dsn: DsnOption = None) -> None:
    """Show one corpus.  Example: pyembed corpus show docs"""
    with connect(dsn, autocommit=True) as conn:
        info = store.corpus_info(conn, name)
    for k, v in info.__dict__.items():
        console.print(f"{k}: {v}")


@corpus_app.command("drop")
def corpus_drop(name: str,
                yes: Annotated[bool, typer.Option("--yes", help="do not ask")] = False,
                dsn: DsnOption = None) -> None:
    """Drop a corpus with its documents and vectors.  Example: pyembed corpus drop docs --yes"""
    if not yes:
        typer.confirm(f"drop corpus {name} and all its documents and vectors?", abort=True)
    with connect(dsn, autocommit=True) as conn:
        dropped = store.drop_corpus(conn, name)
    console.print(f"dropped {name}" if dropped else f"no corpus {name}")


@app.command("search")
def search_cmd(
    corpus: str,
    query: str,
    k: Annotated[int, typer.Option("-k", help="number of results")] = 5,
    mode: Annotated[str, typer.Option(help="vector, keyword or hybrid")] = "hybrid",
    filter: Annotated[str | None, typer.Option(help='metadata filter, JSON, e.g. {"lang":"en"}')]
    = None,
    dsn: DsnOption = None,
) -> None:
    """Search a corpus; the query is embedded with the corpus's own model.

    Example: pyembed search docs "what does error E4012 mean" -k 3 --mode hybrid
    """
    import json

    from .client import connect as client_connect

    try:
        flt = json.loads(filter) if filter else None
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"--filter is not valid JSON: {exc}") from None
    with client_connect(dsn) as client:
        hits = client.corpus(corpus).search(query, k=k, filter=flt, mode=mode)
    table = Table("#", "score", "document", "chunk", "text", "model key")
    for i, h in enumerate(hits, 1):
        table.add_row(str(i), f"{h.score:.4f}", h.document_id, str(h.chunk_index),
                      " ".join(h.content.split())[:100], h.model_key or "-")
    console.print(table if hits else "no results")


@cache_app.command("stats")
def cache_stats(days: int = 30, dsn: DsnOption = None) -> None:
    """Hits, misses and hit rate per day and model.  Example: pyembed cache stats --days 7"""
    from . import cache

    with connect(dsn, autocommit=True) as conn:
        rows = cache.stats(conn, days)
    table = Table("day", "model key", "hits", "misses", "hit rate", "entries")
    for r in rows:
        rate = f"{r.hit_rate:.0%}" if r.hit_rate is not None else "-"
        table.add_row(str(r.day), r.model_key, str(r.hits), str(r.misses), rate, str(r.entries))
    console.print(table if rows else "no cache lookups recorded yet")


@cache_app.command("purge")
def cache_purge(
    model: Annotated[str | None, typer.Option("--model", help="only this model key")] = None,
    expired: Annotated[bool, typer.Option("--expired", help="only expired entries")] = False,
    dsn: DsnOption = None,
) -> None:
    """Delete cache entries.  Example: pyembed cache purge --model openai/text-embedding-3-small@1:1536"""
    from . import cache

    with connect(dsn, autocommit=True) as conn:
        n = cache.purge(conn, model, expired)
    console.print(f"deleted {n} cache entries")


@app.command("worker")
def worker_cmd(
    batch_size: Annotated[int, typer.Option("--batch-size", help="chunks per claim")] = 64,
    max_attempts: Annotated[int, typer.Option(help="attempts before a chunk is failed")] = 5,
    forever: Annotated[bool, typer.Option("--forever", help="keep polling when empty")] = False,
    dsn: DsnOption = None,
) -> None:
    """Embed queued chunks (SKIP LOCKED batches; run several for more throughput).

    Example: pyembed worker --batch-size 128     (stops when the queue is empty; SIGTERM stops it)
    """
    from rich.progress import Progress

    from .worker import Worker

    worker = Worker(dsn, batch_size=batch_size, max_attempts=max_attempts)
    try:
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("embedding", total=worker.pending() or None)

            def show(stats: Any, pending: int) -> None:
                done = stats.embedded + stats.failed + stats.stale
                bar.update(task, completed=done, total=done + pending,
                           description=f"embedding ({stats.rate:.0f} texts/s, "
                                       f"{stats.failed} failed)")

            stats = worker.run(drain=not forever, progress=show)
    finally:
        worker.close()
    console.print(f"embedded {stats.embedded}, failed {stats.failed}, waiting to retry "
                  f"{stats.retried}, stale {stats.stale} in {stats.seconds:.1f} s "
                  f"({stats.rate:.1f} texts/s)")
    if stats.all_failed:
        raise PyembedError(f"every item failed; last error: {stats.errors[-1]}")


@app.command("demo")
def demo_cmd() -> None:
    """Run the tour on the embedded default: local cluster, local model, search, the 2 AM guard.

    Example: pyembed demo
    """
    from .demo import run

    run(console)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def main(argv: list[str] | None = None) -> Any:
    """Entry point: run the CLI, turning pyembed and connection errors into one line."""
    def fail(message: str, code: int = 1) -> None:
        err_console.print(f"[red]error:[/red] {message}", highlight=False, markup=True)
        sys.exit(code)

    try:
        return app(argv, standalone_mode=False)
    except PyembedError as exc:
        fail(_one_line(exc))
    except psycopg.OperationalError as exc:
        fail(f"cannot reach the database: {_one_line(exc)}")
    except (typer.Abort, KeyboardInterrupt):
        fail("aborted")
    except Exception as exc:
        # Usage errors from typer's click (format_message + exit_code); anything else is a bug.
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            fail(f"{exc.format_message()} (see --help)", int(exc.exit_code))
        raise


__all__ = ["app", "main"]
