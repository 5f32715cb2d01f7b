"""The Python API's public entry points, read by introspection (the public methods of Client and
Corpus, rag.answer, the migration functions, orm.search, the tenants functions, ingest, the
Worker's constructor: a new one or a new parameter included),
each called with bad values for each parameter by its annotation: a pyembed error (or TypeError
for a value of the wrong type, Python's own contract) whose message names the problem, never a
raw psycopg, SDK, numpy or KeyError exception, and the database as it was."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

import pyembed
from pyembed import evaluation, ingest, migration, orm, rag, tenants
from pyembed.worker import Worker
from tests.conftest import Database
from tests.test_cli_walk import DOCS, KEY, digest

SKIPPED = {
    **{name: "no parameter a caller gives (a context manager, the client's own upkeep)"
       for name in ("Client.call", "Client.outside_turn", "Client.wrote", "Client.reader",
                    "Client.reconnect", "Client.close", "Corpus.call", "Corpus.bulk_load")},
    "Corpus.log_query": "a search's own record of itself, given by the search: it never raises, "
                        "by its contract (a search never fails for its log line)",
    "Corpus.serving_key": "routing: any text has a serving key (a hash of it); it reads nothing",
    **{f"pyembed.rag.{name}": "a pure helper of answer() on the texts it made"
       for name in ("build_prompt", "citations", "is_insufficient")},
    **{f"pyembed.ingest.{name}": "a pure helper of ingest() on the counts and texts it read"
       for name in ("stopped_line", "progress_line", "markdown_title")},
    **{f"pyembed.tenants.{name}": "the in-database code's own: a callable that meters or counts "
       "a provider call, made for each embedder (test_tenants)"
       for name in ("meter", "error_counter")},
    "pyembed.tenants.acting_for": "a context manager (a transaction acting for a tenant that "
                                  "acting_tenants() named): a name no tenant has is PE005 at its "
                                  "first statement (test_operator_worker)",
}
"""Public callables the walk leaves out, with why."""

NAN = float("nan")
TEXTS: list[Any] = ["", "a\x00b", " \u200b\t", 5, None]
NAMES: list[Any] = ["nope", "a'; DROP TABLE x; --", "n" * 200, "\u202eabc", "a\x00b", "", 5, None]
INTS: list[Any] = [-1, 0, 2**63, "abc", 1.5, None, True]
FLOATS: list[Any] = [NAN, math.inf, -1.0, "abc", None]
VECTORS: list[Any] = [[NAN] * 384, [0.0] * 384, [1.0] * 3, np.full(384, math.inf), ["x"] * 384]
MAPPINGS: list[Any] = ["lang=en", [("lang", "en")], {"lang": object()}, {1: "en"}]
DOCUMENTS: list[Any] = [[("", "x")], [("c", "")], [("c", "x\x00y")], [("c", 5)], "c",
                        [{"id": "c"}], [None], [("c", "x", "y")]]
KEYS: list[Any] = ["acme/none@1:3", "fake/fake-hash@1:3", "not a key", "", None, 5]

NAME_PARAMS = {"name", "corpus", "tenant"}
KEY_PARAMS = {"model_key", "to_key"}


def bad_values(name: str, annotation: str) -> list[Any]:
    """Bad values for a parameter, by its name and annotation (the source's text)."""
    if name in NAME_PARAMS:
        return NAMES
    if name in KEY_PARAMS:
        return KEYS
    if name == "documents":
        return DOCUMENTS
    if name in ("query", "query_embedding"):
        return [*TEXTS[:3], *VECTORS] if "str" in annotation else VECTORS
    if annotation.startswith("Mapping") or annotation.startswith("dict"):
        return MAPPINGS
    if annotation.startswith(("int", "float")):
        return INTS if annotation.startswith("int") else FLOATS
    if annotation.startswith("str"):
        return TEXTS if name in ("question", "kind") else ["bogus", *TEXTS]
    return []


def entry_points() -> Iterator[tuple[str, Callable[..., Any], inspect.Signature]]:
    for cls in (pyembed.Client, pyembed.Corpus):
        for name, member in inspect.getmembers(cls):
            label = f"{cls.__name__}.{name}"
            if name.startswith("_") or label in SKIPPED or not callable(member) or isinstance(
                    inspect.getattr_static(cls, name), property):
                continue
            yield label, member, inspect.signature(member)
    yield "Worker", Worker, inspect.signature(Worker.__init__)
    for fn in (pyembed.connect, pyembed.install):
        yield f"pyembed.{fn.__name__}", fn, inspect.signature(fn)
    for module in (rag, migration, orm, tenants, ingest, evaluation):
        for name in (n for n in dir(module) if not n.startswith("_")):
            member = getattr(module, name)
            if inspect.isfunction(member) and member.__module__ == module.__name__ and \
                    f"{module.__name__}.{name}" not in SKIPPED:
                yield f"{module.__name__}.{name}", member, inspect.signature(member)


ACCEPTED: dict[tuple[str, str, str], str] = {
    ("Client.create_corpus", "name", "'nope'"): "a new name: it makes the corpus",
    ("pyembed.rag.answer", "min_score", "-1.0"): "a score's floor: cosine scores go down to -1",
    ("pyembed.rag.answer", "max_retries", "0"): "no retry: one attempt",
    **{("pyembed.rag.answer", "model", value): "a Claude model id is the service's to judge (the "
       "fake server answers any)" for value in ("'bogus'", "' \\u200b\\t'", "'a\\x00b'")},
    ("pyembed.rag.answer", "model", "''"): "empty is no model: $PYEMBED_CLAUDE_MODEL or the default",
    ("pyembed.migration.storage_bytes", "vectors", "0"): "no vectors take no bytes",
    ("pyembed.tenants.create_tenant", "name", "'nope'"): "a new name: it makes the tenant",
    ("pyembed.tenants.add_member", "create_login", "'bogus'"): "a new role's name: it makes the "
                                                               "login",
    **{(f"pyembed.ingest.{fn}", name, value): "a field's name is the file's to have: records "
       "without it are bad records, reported, and the run goes on"
       for fn in ("ingest", "read_documents") for name in ("text_field", "id_field")
       for value in ("'bogus'", "'a\\x00b'", "' \\u200b\\t'")},
    **{("pyembed.migration.storage_bytes", name, str(2**63)): "arithmetic: any count has its size"
       for name in ("vectors", "dims")},
}
"""(entry point, parameter, value) an entry point takes as a good value, with the reason."""

RAISED_ELSE: dict[tuple[str, str], type[BaseException]] = {}
"""(entry point, parameter) whose documented contract is another exception, with it."""


def wrong_type(value: Any, annotation: str) -> bool:
    """Whether `value` is not of the annotation's kind (Python's TypeError is the answer then)."""
    if value is None:
        return "None" not in annotation
    if annotation.startswith("int"):
        return not isinstance(value, int) or isinstance(value, bool)
    if annotation.startswith("float"):
        return not isinstance(value, int | float) or isinstance(value, bool)
    if annotation.startswith("str") and "Sequence" not in annotation:
        return not isinstance(value, str)
    if annotation.startswith(("Mapping", "dict")):
        return not isinstance(value, dict)
    if annotation.startswith("Iterable"):
        return isinstance(value, str) or any(
            not isinstance(d, tuple | dict) or (isinstance(d, tuple) and len(d) != 2)
            or (isinstance(d, tuple) and not isinstance(d[1], str)) for d in value)
    return isinstance(value, list) and any(isinstance(x, str) for x in value)


@pytest.fixture
def walked(db: Database, fake_api: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    with psycopg.connect(db.owner_dsn, autocommit=True) as owner:
        owner.execute("SELECT pyembed.register_model('fake', 'fake-hash', '2', 384)")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    with pyembed.connect(db.app_dsn) as client, pyembed.connect(db.owner_dsn) as as_owner:
        client.create_corpus("docs", KEY).add(DOCS)
        tenants.create_tenant(as_owner.conn, "acme")  # (add_member's good tenant)
        yield client, as_owner


def test_every_public_entry_point_refuses_bad_values_with_a_pyembed_error(
        db: Database, walked: Any, tmp_path: Path) -> None:
    import sqlalchemy as sa

    client, as_owner = walked
    corpus = client.corpus("docs")
    source = tmp_path / "docs.jsonl"
    source.write_text('{"id": "c", "text": "a new text"}\n')
    good: dict[str, Any] = {
        "corpus": "docs", "name": "docs", "model_key": KEY, "to_key": "fake/fake-hash@2:384",
        "query": "refund", "question": "refund?", "documents": [("c", "a new text")],
        "kind": "vector", "k": 10, "timings": {}, "share": 50, "vectors": 10, "dims": 384,
        "text": "a text [1]", "count": 1, "sources": [], "query_embedding": [0.5] * 384,
        "tenant": "acme", "role": "pyembed_app", "paths": source, "path": source,
        "query_id": "q1", "relevant": ["c"], "query_ids": ["zz"],
    }
    engine = sa.create_engine(pyembed.schema.sqlalchemy_url(db.app_dsn),
                              poolclass=sa.pool.NullPool)
    wrong: list[str] = []
    seen = 0
    with psycopg.connect(db.owner_dsn, autocommit=True) as owner:
        for label, fn, signature in entry_points():
            params = [p for p in signature.parameters.values()
                      if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
            base: dict[str, Any] = {}
            for p in params:
                if p.name == "client" and label.startswith("pyembed.migration"):
                    base["client"] = as_owner
                elif p.name == "client" and label.startswith("pyembed.evaluation"):
                    base["client"] = client
                elif p.name == "conn" and label.startswith("pyembed.tenants"):
                    base["conn"] = as_owner.conn
                elif p.name == "corpus" and p.annotation == "Corpus":
                    base["corpus"] = corpus
                elif p.default is p.empty:
                    if p.name not in good:
                        break
                    base[p.name] = good[p.name]
            else:
                owner_of = (client if label.startswith("Client.") else
                            corpus if label.startswith("Corpus.") else None)
                call = getattr(owner_of, fn.__name__) if owner_of is not None else fn
                for p in params:
                    if p.name in ("client", "conn") or (p.name == "corpus"
                                                        and p.annotation == "Corpus"):
                        continue
                    for value in bad_values(p.name, str(p.annotation)):
                        if value is None and p.default is None:
                            continue  # its default
                        key = (label, p.name, repr(value)[:40])
                        if key in ACCEPTED:
                            continue
                        before = digest(owner)
                        seen += 1
                        problem = attempt(call, {**base, p.name: value}, engine,
                                          wrong_type(value, str(p.annotation)),
                                          RAISED_ELSE.get((label, p.name)))
                        if problem is None and (after := digest(owner)) != before:
                            problem = "the database changed: " + ", ".join(
                                t for t in after if after[t] != before.get(t))
                        if problem:
                            wrong.append(f"{label}({p.name}={repr(value)[:40]}): {problem}")
    engine.dispose()
    assert seen > 100
    assert not wrong, "\n".join(wrong)


def attempt(call: Callable[..., Any], kwargs: dict[str, Any], engine: Any, typed: bool,
            other: type[BaseException] | None) -> str | None:
    """What is wrong with calling `call(**kwargs)`: None if it raised a pyembed error with a
    message (or TypeError for a value of the wrong type, or the listed `other`)."""
    import sqlalchemy as sa

    try:
        result = call(**kwargs)
        if isinstance(result, sa.Select):  # orm: the statement runs where the caller runs it
            with engine.connect() as conn:
                conn.execute(result).all()
    except pyembed.PyembedError as exc:
        return None if str(exc).strip() else f"{type(exc).__name__} without a message"
    except Exception as exc:
        if (typed and isinstance(exc, TypeError)) or (other and isinstance(exc, other)):
            return None
        return f"{type(exc).__module__}.{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return "taken"


def test_a_closed_client_says_so_from_every_entry_point(db: Database, walked: Any) -> None:
    """Every public entry point on a closed client (or its corpus): one pyembed error that says
    the client is closed, not psycopg's "the connection is closed"."""
    client, as_owner = walked
    corpus = client.corpus("docs")
    client.close()
    as_owner.close()
    good: dict[str, Any] = {
        "corpus": "docs", "name": "docs", "model_key": KEY, "to_key": "fake/fake-hash@2:384",
        "query": "refund", "question": "refund?", "documents": [("c", "a new text")],
        "share": 50, "query_embedding": [0.5] * 384}
    wrong = []
    for label, fn, signature in entry_points():
        if label.startswith(("pyembed.orm", "pyembed.migration.storage_bytes", "Worker",
                             "pyembed.connect", "pyembed.install")):
            continue  # (no client)
        kwargs: dict[str, Any] = {}
        for p in signature.parameters.values():
            if p.name == "client" and label.startswith("pyembed.migration"):
                kwargs["client"] = as_owner
            elif p.name == "corpus" and p.annotation == "Corpus":
                kwargs["corpus"] = corpus
            elif p.name != "self" and p.default is p.empty and p.kind is not p.VAR_KEYWORD:
                if p.name not in good:
                    break
                kwargs[p.name] = good[p.name]
        else:
            owner_of = (client if label.startswith("Client.") else
                        corpus if label.startswith("Corpus.") else None)
            call = getattr(owner_of, fn.__name__) if owner_of is not None else fn
            try:
                call(**kwargs)
                wrong.append(f"{label}: no error")
            except pyembed.PyembedError as exc:
                if "closed" not in str(exc):
                    wrong.append(f"{label}: {type(exc).__name__}: {exc}")
            except Exception as exc:
                wrong.append(f"{label}: {type(exc).__module__}.{type(exc).__name__}: {exc}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("options", [{"fusion": "rrf", "alpha": 0.5}, {"alpha": 1.5},
                                     {"alpha": NAN}, {"fusion": "relative", "alpha": -0.1}])
def test_a_hybrid_searchs_options_are_refused_before_its_query_is_embedded(
        db: Database, walked: Any, options: dict[str, Any]) -> None:
    """alpha out of 0..1, or with rrf, was refused by the database after the query had been
    embedded (and paid for: a usage row, a cache count); now before, with the database's words."""
    client, _ = walked
    with psycopg.connect(db.owner_dsn, autocommit=True) as owner:
        before = digest(owner)
        with pytest.raises(pyembed.InvalidInput, match="alpha"):
            client.corpus("docs").search("a question never asked", mode="hybrid", **options)
        assert digest(owner) == before
