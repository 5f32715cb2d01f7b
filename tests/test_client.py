"""The Python API on a real database: add, skip unchanged, replace changed, search, guard."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import psycopg
import pytest

import pyembed
from tests.helpers import count, free_port

KEY = "fake/fake-hash@1:384"


def test_add_skips_unchanged_and_replaces_changed_documents(client: Any,
                                                            app: psycopg.Connection[Any]) -> None:
    docs = client.create_corpus("notes", KEY, chunk_tokens=20, chunk_overlap=5)
    long_text = " ".join(f"word{i}" for i in range(60))
    report = docs.add([("a", "alpha beta gamma"), ("b", long_text)])
    assert (report.added, report.updated, report.skipped) == (2, 0, 0)
    assert report.chunks > 3
    assert docs.add([("a", "alpha beta gamma"), ("b", long_text)]) == pyembed.AddReport(0, 0, 2, 0)
    report = docs.add([pyembed.Document("b", "now short"), ("a", "alpha beta gamma")])
    assert (report.added, report.updated, report.skipped, report.chunks) == (0, 1, 1, 1)
    assert count(app, "chunks") == 2  # b's extra chunks are gone, with their vectors
    assert app.execute("SELECT count(*) FROM pyembed.vectors").fetchone() == (2,)
    assert count(app, "queue") == 0  # written vectors dequeue their chunks
    report = docs.add([pyembed.Document("a", "alpha beta gamma", {"lang": "en"})])
    assert report.updated == 1  # metadata changed


def test_search_by_text_and_by_vector_with_its_key(client: Any) -> None:
    docs = client.create_corpus("kb", KEY)
    docs.add([("e4012", "error E4012 quota exceeded"), ("sso", "single sign on with SAML")])
    assert docs.search("what is E4012", k=1)[0].document_id == "e4012"
    vec = client.embedder(KEY).embed_query("SAML sign on")
    assert docs.search(vec, model_key=KEY, k=1)[0].document_id == "sso"
    other = client.embedder("fake/fake-hash@1:1024").embed_query("SAML")
    with pytest.raises(pyembed.ModelMismatch):
        docs.search(other, model_key="fake/fake-hash@1:1024")
    with pytest.raises(pyembed.InvalidInput, match="model_key"):
        docs.search(np.ones(384))
    with pytest.raises(pyembed.InvalidInput):
        docs.search("   ")


def test_a_query_vector_without_its_key_is_invalid_input_at_every_entry(client: Any) -> None:
    """Corpus.search(vector) without model_key was a TypeError (orm.search's a missing
    argument, pyembed.search.search's the SQL NULL check's); every entry that takes a vector now
    says what to pass, before any statement. The CLI takes only text."""
    from pyembed import orm
    from pyembed.search import search

    docs = client.create_corpus("kb", KEY)
    docs.add([("sso", "single sign on with SAML")])
    vec = client.embedder(KEY).embed_query("SAML sign on")
    entries = {
        "Corpus.search": lambda: docs.search(vec),
        "Corpus.search hybrid": lambda: docs.search(list(vec), mode="hybrid"),
        "Corpus.retrieve": lambda: docs.retrieve(vec, k=3),
        "search.search": lambda: search(client.conn, "kb", vec, None),
        "search.search hybrid": lambda: search(client.conn, "kb", vec, None, mode="hybrid",
                                               text="SAML"),
        "orm.search": lambda: orm.search("kb", vec),
        "orm.search None": lambda: orm.search("kb", vec, None),
    }
    for entry, call in entries.items():
        with pytest.raises(pyembed.InvalidInput) as info:
            call()
        assert str(info.value).startswith("a query vector needs model_key=..."), (entry, info)
    # With its key, each works (orm.search's: tests/test_orm.py).
    assert docs.search(vec, model_key=KEY, k=1)[0].document_id == "sso"
    assert search(client.conn, "kb", vec, KEY, k=1)[0].document_id == "sso"


def test_bad_documents_store_nothing(client: Any, app: psycopg.Connection[Any]) -> None:
    docs = client.create_corpus("bad", KEY)
    for bad in ("", "  ", "nul\x00byte"):
        with pytest.raises(pyembed.InvalidInput):
            docs.add([("ok", "fine text"), ("bad", bad)])
    assert count(app, "documents") == 0
    with pytest.raises(pyembed.UnknownCorpus):
        client.corpus("missing")


def test_every_document_shape_is_read_whole_or_refused(client: Any,
                                                      app: psycopg.Connection[Any]) -> None:
    docs = client.create_corpus("shapes", KEY)
    report = docs.add([("t2", "two fields", None), ("t3", "three fields", {"lang": "en"}),
                       ["l3", "a list", {"lang": "de"}], {"id": 7, "text": "an int id"},
                       pyembed.Document("d", "a document", {"lang": "fr"})])
    assert report.added == 5
    stored = dict(app.execute("SELECT document_id, metadata FROM pyembed.documents").fetchall())
    assert stored == {"t2": {}, "t3": {"lang": "en"}, "l3": {"lang": "de"}, "7": {},
                      "d": {"lang": "fr"}}
    for bad, says in [((None, "id of None"), "got NoneType"), ((b"id", "bytes"), "got bytes"),
                      (("x", "four", {}, "fields"), "tuple of 4"), (("x",), "tuple of 1"),
                      ("just a text", "not a str"), ({"text": "no id"}, "keys ['text']"),
                      ((True, "a bool id"), "got bool"),
                      # Keys beyond id, text and metadata were dropped unseen (a title, a
                      # misspelt metadata), and an empty list or string taken for no metadata.
                      ({"id": "x", "text": "titled", "title": "T"}, "keys ['id', 'text', 'ti"),
                      ({"id": "x", "text": "typo", "meta": {"a": 1}}, "keys ['id', 'meta', 't"),
                      (("x", "empty list", []), "metadata must be a JSON object, got list"),
                      ({"id": "x", "text": "empty string", "metadata": ""},
                       "metadata must be a JSON object, got str")]:
        with pytest.raises(pyembed.InvalidInput, match=re.escape(says)):
            docs.add([("ok", "fine text"), bad])
    with pytest.raises(pyembed.InvalidInput, match="'twice' is given twice"):
        docs.add([("twice", "first text"), ("twice", "second text")])
    assert count(app, "documents") == 5


def test_register_a_model_of_your_own(owner_client: Any, client: Any) -> None:
    spec = pyembed.ModelSpec("openai", "my-finetune", "3", 768, price_per_mtok=0.05,
                             api_key_env="OPENAI_API_KEY")
    with pytest.raises(pyembed.OwnerOnly, match="register_model"):
        client.register_model(spec)  # the registry is every tenant's: the owner registers
    assert owner_client.register_model(spec) == "openai/my-finetune@3:768"
    assert owner_client.register_model(spec) == spec.key  # idempotent
    corpus = client.create_corpus("custom", spec.key)
    assert corpus.model_key == spec.key
    with pytest.raises(pyembed.InvalidInput, match="other settings"):
        owner_client.register_model(pyembed.ModelSpec("openai", "my-finetune", "3", 768,
                                                distance="dot"))


def test_a_database_that_does_not_answer_is_one_pyembed_error(client: Any) -> None:
    """As for the read DSN: a primary that refuses the connection is DatabaseNotReady, and a DSN
    that is not one is ConfigError (both were raw psycopg errors)."""
    with pytest.raises(pyembed.DatabaseNotReady, match="cannot reach the database"):
        pyembed.connect(f"postgresql://nobody@127.0.0.1:{free_port()}/x?connect_timeout=3")
    with pytest.raises(pyembed.ConfigError, match="not a DSN"):
        pyembed.connect("not a dsn ===")
    # libpq quotes a URI it cannot parse, with its password: pyembed.db.connect, which every
    # connection opens through (the CLI's too), shows it without.
    with pytest.raises(pyembed.ConfigError, match="not a DSN") as bad:
        pyembed.connect("postgresql://app:s3cret-pw@[::1/x")
    assert "s3cret-pw" not in str(bad.value)


def test_create_corpus_exist_ok_returns_the_same_corpus_only(client: Any,
                                                             app: psycopg.Connection[Any]) -> None:
    """exist_ok (checked in pyembed.create_corpus): the existing corpus when its key and chunking
    are those asked for; another key is a mismatch, other chunking invalid, and without it an
    existing name stays an error."""
    first = client.create_corpus("again", KEY, chunk_tokens=50, chunk_overlap=10)
    again = client.create_corpus("again", KEY, chunk_tokens=50, chunk_overlap=10, exist_ok=True,
                                 storage="halfvec", description="not compared")
    assert again.info == first.info
    with pytest.raises(pyembed.InvalidInput, match="already exists") as info:
        client.create_corpus("again", KEY, chunk_tokens=50, chunk_overlap=10)
    # the hint names the option as each entry point spells it (the CLI's was a Python name)
    assert "--exist-ok on the command line, exist_ok => true in SQL" in str(info.value)
    with pytest.raises(pyembed.ModelMismatch, match="pinned to fake/fake-hash@1:384, not "
                                                    "fake/fake-hash@1:1024"):
        client.create_corpus("again", "fake/fake-hash@1:1024", chunk_tokens=50,
                             chunk_overlap=10, exist_ok=True)
    with pytest.raises(pyembed.InvalidInput, match="chunk_tokens 50 and chunk_overlap 10, not "
                                                   "200 and 40"):
        client.create_corpus("again", KEY, exist_ok=True)
    with pytest.raises(psycopg.Error) as err:  # the same from SQL
        app.execute("SELECT pyembed.create_corpus('again', 'fake/fake-hash@1:1024', "
                    "chunk_tokens => 50, chunk_overlap => 10, exist_ok => true)")
    assert err.value.sqlstate == "PE001"
    assert app.execute("SELECT pyembed.create_corpus('again', %s, chunk_tokens => 50, "
                       "chunk_overlap => 10, exist_ok => true)", (KEY,)).fetchone() == (
                           first.info.corpus_id,)
    assert count(app, "corpora") == 1


def test_a_write_in_a_read_only_session_is_read_only_replica(db: Any) -> None:
    """A hot standby and a read-only session refuse writes with SQLSTATE 25006, which reached
    the caller as psycopg's ReadOnlySqlTransaction; searches there still answer."""
    from pyembed import cache

    with pyembed.connect(db.app_dsn) as client:
        client.create_corpus("docs", KEY).add([("a", "a stored text about quotas")])
    read_only = db.app_dsn + "?options=-c%20default_transaction_read_only%3Don"
    with pyembed.connect(read_only) as client:
        for write in (lambda: client.create_corpus("other", KEY),
                      lambda: client.drop_corpus("docs"),
                      lambda: cache.purge(client.conn)):
            with pytest.raises(pyembed.ReadOnlyReplica, match="cannot write"):
                write()
        assert [h.document_id for h in client.corpus("docs").search("quotas", mode="keyword")
                ] == ["a"]


def _named_corpus_methods() -> list[str]:
    """Every public method of Client that takes a corpus's name, a new one included (not
    create_corpus's new name, nor reranker's, a reranker's)."""
    import inspect

    return sorted(name for name, method in inspect.getmembers(pyembed.Client, inspect.isfunction)
                  if not name.startswith("_") and name not in ("create_corpus", "reranker")
                  and list(inspect.signature(method).parameters)[1:2] in (["name"], ["corpus"]))


@pytest.mark.parametrize("method", _named_corpus_methods())
def test_every_client_method_naming_an_unknown_corpus_raises_unknown_corpus(
        owner_client: Any, method: str) -> None:
    """A name the caller's tenant has no corpus of is UnknownCorpus from every method, never a
    result to check: drop_corpus returned False (and SQL pyembed.drop_corpus false)."""
    assert {"corpus", "drop_corpus", "index_status"} <= set(_named_corpus_methods())
    with pytest.raises(pyembed.UnknownCorpus, match="unknown corpus 'nope'"):
        getattr(owner_client, method)("nope")
    if method == "drop_corpus":  # and in SQL, as pyembed.lookup_corpus
        with pytest.raises(psycopg.Error) as err:
            owner_client.conn.execute("SELECT pyembed.drop_corpus('nope')")
        assert err.value.sqlstate == "PE002"


@pytest.mark.parametrize("name", [5, 5.5, b"docs", True], ids=repr)
@pytest.mark.parametrize("method", [*_named_corpus_methods(), "create_corpus"])
def test_a_corpus_name_that_is_not_a_str_is_invalid_input(owner_client: Any, method: str,
                                                           name: object) -> None:
    """psycopg types a parameter by its Python value: an int, float, bytes or bool name found
    no pyembed function of that signature, and psycopg's UndefinedFunction came out raw."""
    with pytest.raises(pyembed.InvalidInput, match=r"\(\) takes no arguments of the types "
                       r"\((smallint|double precision|bytea|boolean)[,)].*is a str$"):
        getattr(owner_client, method)(name)
    if method == "create_corpus":  # a model key too
        with pytest.raises(pyembed.InvalidInput, match=r"is a str$"):
            owner_client.create_corpus("docs", 384)
