"""SciFact corpora in a benchmark database that persists, so that reruns reuse the embeddings.

The database `scifact` in the local cluster under `.pyembed-bench-scifact` (a folder the
repository ignores) keeps pyembed's embedding cache (keyed by text + model key + input type)
between runs: the first run embeds ~23k texts with the local model (many minutes), later runs
rebuild the corpora from the cache in a minute or two.

Two corpora, both from `corpus.jsonl` read as `pyembed ingest` reads it (title + text):
- `scifact_cli`: made as a new user would, `pyembed corpus create` and `pyembed ingest` at
  their defaults (chunks of 200 estimated tokens with 40 of overlap, ~3.4 a document);
- `scifact_doc`: one chunk per document, embedded from its first tokens (truncate=True).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

REPO = Path(__file__).resolve().parents[2]
FOLDER = REPO / ".pyembed-bench-scifact"
DATABASE = "scifact"
DATA = REPO / ".." / "shared" / "data" / "scifact"
CORPORA = {"cli": "scifact_cli", "doc": "scifact_doc"}


def persistent_database(folder: Path = FOLDER, name: str = DATABASE) -> tuple[str, str]:
    """(owner DSN, application DSN) of the benchmark database, created on first use and
    brought to the schema's head on every use."""
    from pyembed.localdb import OWNER, LocalCluster
    from pyembed.schema import install as install_schema
    from tests.benchmarks.common import in_database

    cluster = LocalCluster(folder)
    cluster.init()
    cluster.start()
    admin_dsn = cluster.dsn(owner=True)
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        if admin.execute("SELECT FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            admin.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name),
                                                                       sql.Identifier(OWNER)))
    owner = in_database(admin_dsn, name)
    install_schema(owner)
    return owner, in_database(cluster.dsn(owner=False), name)


def build(client: Any, which: str, data: Path = DATA, *, rebuild: bool = True,
          limit: int | None = None, cached_only: bool = False) -> dict[str, float]:
    """Create corpus `CORPORA[which]` and ingest SciFact into it (dropped first with
    `rebuild`; documents it has already are skipped otherwise). With `cached_only`, only the
    documents whose every chunk's embedding is in the cache (a first run cut short).
    Returns its counts and the time the build took."""
    import pyembed
    from pyembed.ingest import ingest, read_documents

    name = CORPORA[which]
    exists = any(c.name == name for c in client.corpora())
    if exists and rebuild:
        client.drop_corpus(name)
    started = time.perf_counter()
    if not exists or rebuild:
        if which == "cli":
            client.create_corpus(name)  # the CLI's defaults
        else:
            client.create_corpus(name, pyembed.LOCAL_DEFAULT.key, chunk_tokens=100_000,
                                 chunk_overlap=0)
    corpus = client.corpus(name)
    truncate = which == "doc"
    if limit is None and not cached_only and which == "cli":
        ingest(corpus, data / "corpus.jsonl", progress=False)  # `pyembed ingest` itself
    else:
        docs = list(read_documents(data / "corpus.jsonl"))[:limit]
        if cached_only:
            docs = in_cache(client, corpus, docs, truncate)
        for i in range(0, len(docs), 64):
            corpus.add(docs[i:i + 64], truncate=truncate)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, **counts(client.conn, corpus.info.corpus_id)}


def in_cache(client: Any, corpus: Any, docs: list[Any], truncate: bool) -> list[Any]:
    """The documents whose chunks' embeddings are all in the cache (as Corpus.add chunks
    them)."""
    from pyembed.chunking import chunk_text, fit_chunks
    from pyembed.models import InputType

    embedder = client.embedder(corpus.model_key, truncate=truncate)
    info = corpus.info
    kept = []
    for i in range(0, len(docs), 256):
        batch = docs[i:i + 256]
        texts = []
        for d in batch:
            chunks = chunk_text(d.text, info.chunk_tokens, info.chunk_overlap)
            if not truncate:
                chunks = fit_chunks(chunks, embedder.spec.max_tokens,
                                    embedder.provider.count_tokens)
            texts.append(chunks)
        flat = [t for ts in texts for t in ts]
        hits = client.cache.get_many(flat, embedder.spec, InputType.DOCUMENT)
        at = 0
        for d, ts in zip(batch, texts, strict=True):
            if all(j in hits for j in range(at, at + len(ts))):
                kept.append(d)
            at += len(ts)
    return kept


def counts(conn: psycopg.Connection[Any], corpus_id: int) -> dict[str, float]:
    row = conn.execute("SELECT count(DISTINCT document_id), count(*) FROM pyembed.chunks "
                       "WHERE corpus_id = %s", (corpus_id,)).fetchone()
    assert row is not None
    return {"documents": row[0], "chunks": row[1]}


if __name__ == "__main__":  # build both corpora (the slow, first-run part of bench_scifact)
    import sys

    sys.path.insert(0, str(REPO))
    import pyembed

    owner_dsn, app_dsn = persistent_database()
    with pyembed.connect(app_dsn) as client:
        for which in sys.argv[1:] or list(CORPORA):
            print(which, build(client, which), flush=True)


def subset(source: Path, folder: Path, limit: int | None) -> tuple[Path, int]:
    """The first `limit` lines of `source` (all without a limit) in a file of their own."""
    path = folder / "corpus.jsonl"
    documents = 0
    with source.open(encoding="utf-8") as f, path.open("w", encoding="utf-8") as out:
        for line in f:
            if limit is not None and documents >= limit:
                break
            out.write(line)
            documents += 1
    return path, documents
