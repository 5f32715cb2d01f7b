"""Document ids that read as one are refused at every write, not stored as several: an empty id or
whitespace alone, whitespace at either end (a space, a tab, a no-break space), a control
character, an id not in Unicode's NFC. Before, "doc", "doc " and "doc" + NBSP, "é" composed and
decomposed, and "   " were each a distinct document. The rule is the documents table's write
trigger (pyembed._document_id_problem), so each entry point meets the same rule and message:
SQL's INSERT and UPDATE, pyembed.add_document, Corpus.add, the ORM, `pyembed ingest`. A row
stored before the rule stays writable (an upgrade does not fail on it).

The rule has one copy, the database's: a client asks it in its lookup of the stored documents,
before a provider is paid (before, pyembed.text kept a copy of its own, whose Unicode tables
could disagree with PostgreSQL's on NFC)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import pyembed
from pyembed import orm
from pyembed.ingest import ingest
from pyembed.models import InputType
from pyembed.schema import install, sqlalchemy_url
from tests.conftest import REPO, Database

KEY = "fake/fake-hash@1:384"

BAD = {
    "empty": ("", "a document id is 1..512 characters, got 0 characters"),
    "spaces": ("   ", 'document id "   " is only whitespace'),
    "NBSP alone": ("\u00a0", 'document id "\u00a0" is only whitespace'),
    "trailing space": ("doc ", 'document id "doc " ends with whitespace (U+0020)'),
    "trailing NBSP": ("doc\u00a0", 'document id "doc\u00a0" ends with whitespace (U+00A0)'),
    "leading tab": ("\tdoc", 'document id "\\tdoc" starts with whitespace (U+0009)'),
    "trailing ideographic space": ("doc\u3000",
                                   'document id "doc\u3000" ends with whitespace (U+3000)'),
    "control character": ("a\x01b", 'document id "a\\u0001b" has a control character (U+0001)'),
    "C1 control": ("a\x85b", 'document id "a\\u0085b" has a control character (U+0085)'),
    "decomposed": ("cafe\u0301", 'document id "cafe\u0301" is not in Unicode normal form NFC '
                                 '(as NFC: "caf\u00e9")'),
    "too long": ("x" * 513, "a document id is 1..512 characters, got 513 characters"),
}
GOOD = ["doc", "my doc.txt", "caf\u00e9", "a/b/c", "\u65e5\u672c", "x\u00a0y", "emoji \U0001f600"]


def test_the_rules_answers(app: psycopg.Connection[Any]) -> None:
    ids = [i for i, _ in BAD.values()] + GOOD + ["x" * 512]
    sql = [r[0] for r in app.execute(
        "SELECT pyembed._document_id_problem(i) FROM unnest(%s::text[]) WITH ORDINALITY "
        "AS t(i, n) ORDER BY n", (ids,)).fetchall()]
    assert sql == [m for _, m in BAD.values()] + [None] * (len(GOOD) + 1)


def _provider_calls(monkeypatch: pytest.MonkeyPatch, client: pyembed.Client) -> list[list[str]]:
    """The texts of each call of the fake provider's embed_batch, from now on."""
    provider = client.embedder(KEY).provider
    embed_batch = provider.embed_batch
    calls: list[list[str]] = []

    def recording(texts: list[str], input_type: InputType) -> Any:
        calls.append(list(texts))
        return embed_batch(texts, input_type)

    monkeypatch.setattr(provider, "embed_batch", recording)
    return calls


def test_the_rule_is_the_databases_alone(tmp_path: Path, db: Database,
                                         owner: psycopg.Connection[Any],
                                         app: psycopg.Connection[Any],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A rule the database is given (here: no id starting "draft-", a rule of this test's own)
    is the one every entry point meets, before any provider is paid: Corpus.add, ingest (the
    refused record at its line, the others loaded) and pyembed.add_document. Before, the client
    asked a copy of the rule in Python: it paid the provider for "draft-1"'s chunks, which the
    trigger then refused."""
    owner.execute("ALTER FUNCTION pyembed._document_id_problem(text) RENAME TO _id_rule_before")
    owner.execute("""CREATE FUNCTION pyembed._document_id_problem(id text) RETURNS text
                     LANGUAGE sql IMMUTABLE AS $$
                       SELECT CASE WHEN id LIKE 'draft-%' THEN 'no drafts: ' || id
                                   ELSE pyembed._id_rule_before(id) END $$""")
    owner.execute("GRANT EXECUTE ON FUNCTION pyembed._document_id_problem(text), "
                  "pyembed._id_rule_before(text) TO pyembed_app")
    with pyembed.connect(db.app_dsn) as client:
        kb = client.create_corpus("kb", KEY)
        calls = _provider_calls(monkeypatch, client)
        with pytest.raises(pyembed.InvalidInput) as err:
            kb.add([pyembed.Document("fine", "a good text"),
                    pyembed.Document("draft-1", "a draft's text")])
        assert str(err.value) == "no drafts: draft-1"
        assert calls == []
        for doc_id, _ in BAD.values():  # the rule before still answers through it
            with pytest.raises(pyembed.InvalidInput):
                kb.add([pyembed.Document(doc_id, "some text")])
        assert calls == []
        path = tmp_path / "docs.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in [
            {"id": "one", "text": "the first text"}, {"id": "draft-2", "text": "a draft"},
            {"id": "two", "text": "the second text"}]), encoding="utf-8")
        report = ingest(kb, path, progress=False)
        assert [(p.line, p.message) for p in report.problems] == [(2, "no drafts: draft-2")]
        assert (report.added, report.failed) == (2, 1)
        assert sorted(t for c in calls for t in c) == ["the first text", "the second text"]
    with pytest.raises(psycopg.Error) as sql_err:
        app.execute("SELECT pyembed.add_document('kb', 'draft-3', 'some text')")
    assert sql_err.value.sqlstate == "PE005" and "no drafts: draft-3" in str(sql_err.value)
    assert sorted(r[0] for r in app.execute("SELECT document_id FROM pyembed.documents")) == [
        "one", "two"]


@pytest.mark.parametrize("bad", list(BAD), ids=list(BAD))
def test_sql_writes_refuse_a_bad_id(app: psycopg.Connection[Any], bad: str) -> None:
    doc_id, message = BAD[bad]
    corpus_id = app.execute("SELECT pyembed.create_corpus('c', %s)", (KEY,)).fetchone()[0]  # type: ignore[index]
    with pytest.raises(psycopg.Error) as err:
        app.execute("INSERT INTO pyembed.documents (corpus_id, document_id, content_hash) "
                    "VALUES (%s, %s, '')", (corpus_id, doc_id))
    assert (err.value.sqlstate, err.value.diag.message_primary) == ("PE005", message)
    with pytest.raises(psycopg.Error) as err:
        app.execute("SELECT pyembed.add_document('c', %s, 'some text')", (doc_id,))
    assert err.value.sqlstate == "PE005" and message in str(err.value)
    app.execute("SELECT pyembed.add_document('c', 'doc', 'some text')")
    with pytest.raises(psycopg.Error) as err:
        app.execute("UPDATE pyembed.documents SET document_id = %s", (doc_id,))
    assert (err.value.sqlstate, err.value.diag.message_primary) == ("PE005", message)
    assert [r[0] for r in app.execute("SELECT document_id FROM pyembed.documents")] == ["doc"]


@pytest.mark.parametrize("bad", list(BAD), ids=list(BAD))
def test_client_and_orm_refuse_a_bad_id(db: Database, bad: str) -> None:
    doc_id, message = BAD[bad]
    with pyembed.connect(db.app_dsn) as client:
        kb = client.create_corpus("kb", KEY)
        with pytest.raises(pyembed.InvalidInput) as err:
            kb.add([pyembed.Document(doc_id, "some text")])
        assert str(err.value) == message
        kb.add([pyembed.Document("doc", "some text")])
        corpus_id = kb.info.corpus_id
    # The ORM's mapping writes a document's id by renaming one (its INSERT names updated_at,
    # which is the server's: pyembed.documents is written by the client).
    engine = sa.create_engine(sqlalchemy_url(db.app_dsn))
    try:
        with Session(engine) as session:
            doc = session.get(orm.Document, (corpus_id, "doc"))
            assert doc is not None
            doc.document_id = doc_id
            # pyembed's error, as from the client (pyembed.orm's handle_error), the driver's as
            # its cause.
            with pytest.raises(pyembed.InvalidInput) as orm_err:
                session.commit()
            orig = orm_err.value.__cause__
            assert isinstance(orig, psycopg.Error)
            assert (orig.sqlstate, orig.diag.message_primary) == ("PE005", message), str(orm_err.value)
    finally:
        engine.dispose()


def test_ingest_reports_bad_ids_with_their_line_and_loads_the_rest(
        tmp_path: Path, db: Database, app: psycopg.Connection[Any]) -> None:
    lines = [{"id": doc_id, "text": f"text {n}"} for n, (doc_id, _) in enumerate(BAD.values())
             if doc_id]  # (an empty id is a record without one: reported as such)
    lines.append({"id": "fine", "text": "a good one"})
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    with pyembed.connect(db.app_dsn) as client:
        report = ingest(client.create_corpus("files", KEY), path, progress=False)
    expected = [(n + 1, m) for n, (_, m) in enumerate(v for v in BAD.values() if v[0])]
    assert [(p.line, p.message) for p in report.problems] == expected
    # The command line: the same, one line each, and the good record loaded.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYEMBED_")}
    env["PYEMBED_DSN"] = db.app_dsn
    done = subprocess.run([sys.executable, "-m", "pyembed", "ingest", "files", str(path)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    shown = done.stderr.splitlines()
    for line, message in expected:  # (the id as the terminal shows it: control characters drawn)
        assert any(s.startswith(f"skipped {path}:{line}: ") and
                   s.endswith(message.rsplit('"', 1)[-1]) for s in shown), done.stderr
    assert [r[0] for r in app.execute("SELECT document_id FROM pyembed.documents")] == ["fine"]


def test_a_text_files_id_is_its_path_as_nfc(tmp_path: Path, db: Database,
                                            app: psycopg.Connection[Any]) -> None:
    """A file system may give a name decomposed (NFD): the id pyembed makes from it is NFC,
    the one the rule accepts, whichever form the name came in."""
    (tmp_path / unicodedata.normalize("NFD", "caf\u00e9.txt")).write_text("about coffee")
    with pyembed.connect(db.app_dsn) as client:
        report = ingest(client.create_corpus("files", KEY), tmp_path, progress=False)
    assert not report.problems
    assert [r[0] for r in app.execute("SELECT document_id FROM pyembed.documents")] == [
        "caf\u00e9"]


def test_a_row_stored_before_the_rule_stays_writable(
        db: Database, owner: psycopg.Connection[Any], app: psycopg.Connection[Any]) -> None:
    """The rule is checked when an id is written: a row an older version stored (made here with
    the trigger off) is read, has its other columns updated, is renamed and deleted, and
    installing pyembed's SQL again (what an upgrade runs) does not fail on it. Adding it again
    names the id, and is refused."""
    app.execute("SELECT pyembed.create_corpus('c', %s)", (KEY,))
    owner.execute("ALTER TABLE pyembed.documents DISABLE TRIGGER documents_id_checked")
    owner.execute("INSERT INTO pyembed.documents (corpus_id, document_id, content_hash) "
                  "SELECT corpus_id, 'old ', '' FROM pyembed.corpora")
    owner.execute("ALTER TABLE pyembed.documents ENABLE TRIGGER documents_id_checked")
    install(db.owner_dsn)
    app.execute("UPDATE pyembed.documents SET metadata = '{\"a\": 1}' WHERE document_id = 'old '")
    with pytest.raises(psycopg.Error) as err:  # adding it again names the id: refused
        app.execute("SELECT pyembed.add_document('c', 'old ', 'a new text')")
    assert err.value.sqlstate == "PE005"
    app.execute("UPDATE pyembed.documents SET document_id = 'old' WHERE document_id = 'old '")
    assert [r[0] for r in app.execute("SELECT document_id FROM pyembed.documents")] == ["old"]
    assert app.execute("SELECT pyembed.delete_documents('c', '{old}')").fetchone() == (1,)
