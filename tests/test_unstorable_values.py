"""Values PostgreSQL cannot store (NUL, a lone surrogate, NaN or Infinity in JSON, metadata that is
not an object) are refused by one check, naming the document, on every path that writes
documents: Corpus.add, `pyembed ingest` (the rest of the file still loads) and search."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pyembed
from pyembed import evaluation, tenants
from pyembed.client import Client
from pyembed.ingest import ingest
from tests.conftest import Database
from tests.helpers import count

KEY = "fake/fake-hash@1:384"

BAD_DOCUMENTS: dict[str, tuple[Any, Any, Any]] = {
    "surrogate in text": ("s1", "a lone \ud800 surrogate", {}),
    "NUL in id": ("id\x00nul", "fine text", {}),
    "surrogate in id": ("id\udc00", "fine text", {}),
    "NaN in metadata": ("m1", "fine text", {"x": math.nan}),
    "Infinity in metadata": ("m2", "fine text", {"x": [1.0, math.inf]}),
    "NUL in a metadata value": ("m3", "fine text", {"x": {"y": "a\x00b"}}),
    "NUL in a metadata key": ("m4", "fine text", {"a\x00b": 1}),
    "surrogate in metadata": ("m5", "fine text", {"x": "\ud83d"}),
    "metadata not an object": ("m6", "fine text", [1, 2]),
    "metadata key not a string": ("m7", "fine text", {1: "a", "1": "b"}),
}


@pytest.mark.parametrize("doc", BAD_DOCUMENTS.values(), ids=list(BAD_DOCUMENTS))
def test_corpus_add_refuses_what_postgresql_cannot_store(
        client: Client, app: psycopg.Connection[Any], doc: tuple[Any, Any, Any]) -> None:
    corpus = client.create_corpus("values", KEY)
    doc_id, text, metadata = doc
    bad = {"id": doc_id, "text": text, "metadata": metadata}
    with pytest.raises(pyembed.InvalidInput) as raised:
        corpus.add([("ok", "a good document"), bad])
    assert repr(doc_id) in str(raised.value) or "document id" in str(raised.value)
    with pytest.raises(pyembed.InvalidInput):
        corpus.add([pyembed.Document(doc_id, text, metadata)])
    assert count(app, "documents") == 0  # nothing half-written


def test_ingest_reports_each_unstorable_line_and_loads_the_rest(
        tmp_path: Path, client: Client, app: psycopg.Connection[Any]) -> None:
    corpus = client.create_corpus("values", KEY)
    # JSON escapes as a file carries them: json.loads gives the lone surrogate, the NUL, NaN.
    lines = ['{"id": "ok1", "text": "the first good line"}',
             '{"id": "sur", "text": "lone \\ud800 surrogate"}',
             '{"id": "nan", "text": "metadata NaN", "metadata": {"x": NaN}}',
             '{"id": "inf", "text": "metadata Infinity", "metadata": {"x": -Infinity}}',
             '{"id": "metanul", "text": "metadata NUL", "metadata": {"x": "a\\u0000b"}}',
             '{"id": "ok2", "text": "the second good line"}']
    path = tmp_path / "hostile.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    report = ingest(corpus, path, progress=False)

    assert (report.added, report.failed) == (2, 4)
    assert sorted(p.line for p in report.problems if p.line is not None) == [2, 3, 4, 5]
    assert sorted(r[0] for r in app.execute("SELECT document_id FROM pyembed.documents")) == [
        "ok1", "ok2"]


@pytest.mark.parametrize("query", ["a lone \ud800 surrogate", "nul \x00 byte"])
@pytest.mark.parametrize("mode", ["vector", "keyword", "hybrid"])
def test_a_query_postgresql_cannot_store_is_invalid_input(client: Client, query: str,
                                                         mode: str) -> None:
    corpus = client.create_corpus("values", KEY)
    corpus.add([("ok", "a good document")])
    with pytest.raises(pyembed.InvalidInput):
        corpus.search(query, mode=mode)


def test_good_metadata_still_round_trips(client: Client, app: psycopg.Connection[Any]) -> None:
    corpus = client.create_corpus("values", KEY)
    metadata = {"lang": "en", "n": 1.5, "tags": ["a", "b"], "nested": {"ok": None}, "é": "ü"}
    corpus.add([pyembed.Document("d1", "a good document", metadata)])
    stored = app.execute("SELECT metadata FROM pyembed.documents").fetchone()
    assert stored is not None and stored[0] == json.loads(json.dumps(metadata))


UNSTORABLE = {"NUL": "a\x00b", "surrogate": "a\ud800b"}


@pytest.mark.parametrize("bad", UNSTORABLE.values(), ids=list(UNSTORABLE))
def test_every_entry_point_refuses_an_unstorable_value_as_invalid_input(
        db: Database, client: Client, bad: str) -> None:
    """Past the document paths, such a value reached psycopg or the server as it was: a raw
    psycopg.DataError, UntranslatableCharacter, InvalidTextRepresentation or UnicodeEncodeError
    (a traceback from the CLI), from a corpus's name or description, a search filter, an
    evaluation query, a model's description, a tenant or a member. Any database error that is
    the caller's value is InvalidInput, whichever path sent it."""
    docs = client.create_corpus("values", KEY)
    docs.add([("a", "fine text")])
    with pyembed.connect(db.owner_dsn) as owner:
        calls: dict[str, Callable[[], object]] = {
            "corpus description": lambda: client.create_corpus("more", KEY, description=bad),
            "corpus name": lambda: client.corpus(bad),
            "drop": lambda: client.drop_corpus(bad),
            "filter key": lambda: docs.search("fine", filter={bad: 1}),
            "filter value": lambda: docs.search("fine", mode="keyword", filter={"x": bad}),
            "eval query id": lambda: evaluation.add_eval_query(client, "values", bad, "q", ["a"]),
            "eval query text": lambda: evaluation.add_eval_query(client, "values", "q", bad, ["a"]),
            "model description": lambda: owner.register_model(
                pyembed.ModelSpec("fake", "unstorable", "1", 4, description=bad)),
            "tenant": lambda: tenants.create_tenant(owner.conn, bad),
            "member": lambda: tenants.add_member(owner.conn, "nobody", bad),
            "index settings": lambda: owner.set_index_settings(bad, ef_search=10),
        }
        for what, call in calls.items():
            with pytest.raises(pyembed.InvalidInput, match=r"cannot store|no UTF-8 form"):
                call()
                pytest.fail(f"{what}: accepted")
