"""`pyembed demo`: the tour on the embedded default, with no API key and no server to set up."""

from __future__ import annotations

import contextlib
import os
import time

from rich.console import Console
from rich.text import Text

from . import schema
from .client import Document, connect
from .config import DSN_ENV, package_dir
from .errors import ModelMismatch, UnknownCorpus
from .localdb import LocalCluster

QUESTION = "what does error E4012 mean and how do I fix it?"
OTHER_MODEL = "fake/fake-hash@1:384"  # same width as the corpus's model: no dimension check helps


def sample_documents() -> list[Document]:
    docs = []
    for path in sorted((package_dir() / "data" / "sample").glob("*.md")):
        title, _, body = path.read_text().partition("\n")
        docs.append(Document(path.stem, body.strip(), {"title": title.lstrip("# ").strip()}))
    return docs


def run(console: Console) -> None:
    if not os.environ.get(DSN_ENV):
        cluster = LocalCluster()
        console.rule("1. a local PostgreSQL cluster")
        made = cluster.init()
        cluster.start()
        console.print(f"{'created' if made else 'using'} {cluster.home} "
                      f"(port {cluster.state().port}); `pyembed db stop` stops it")
    console.rule("2. the pyembed schema")
    console.print(f"schema at revision {schema.install()}")

    with connect() as client:
        console.rule("3. a corpus pinned to the local model")
        with contextlib.suppress(UnknownCorpus):  # a run before this one made it
            client.drop_corpus("demo")
        corpus = client.create_corpus("demo", description="support articles (sample)")
        console.print(Text.assemble("corpus ", ("demo", "bold"), " is pinned to ",
                                    (corpus.model_key, "bold")))
        t0 = time.perf_counter()
        report = corpus.add(sample_documents())
        console.print(f"embedded and stored {report.added + report.updated} documents "
                      f"({report.chunks} chunks) in {time.perf_counter() - t0:.1f} s")

        console.rule("4. search")
        console.print(Text.assemble("query: ", (QUESTION, "italic")))
        for hit in corpus.search(QUESTION, k=3):
            console.print(f"  {hit.score:.3f}  {hit.document_id:<14} {hit.content[:70]}...")

        console.rule("5. the 2 AM mistake: a query embedded with another model")
        other = client.embedder(OTHER_MODEL).embed_query(QUESTION)
        console.print(f"query vector from {OTHER_MODEL} ({other.shape[0]} dims, same as the corpus)")
        try:
            corpus.search(other, k=3, model_key=OTHER_MODEL)
        except ModelMismatch as exc:
            console.print(Text.assemble(("refused by the database:", "red"), f" {exc}"))
        else:  # pragma: no cover - the guard is broken if we get here
            raise SystemExit("the model guard did not fire")


__all__ = ["run", "sample_documents"]
