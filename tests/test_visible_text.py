"""A text of whitespace, control and format characters alone is empty, at every entry point
(query, document text, chunk content, evaluation query) and in the database where text is
stored: one set of characters (pyembed.text.INVISIBLE), read alike by Python and PostgreSQL.
Before, '\\S' and str.strip() let control characters (ESC, BEL) and zero-width spaces through:
such a query was searched and such a chunk stored and embedded."""

from __future__ import annotations

import re
from typing import Any

import psycopg
import pytest

import pyembed
from pyembed.db import translate
from pyembed.text import INVISIBLE, has_text
from tests.conftest import Database
from tests.helpers import sql_error

KEY = "fake/fake-hash@1:384"
EMPTY = ["\x01\x02\x1b", " \u200b\ufeff\t", "\u2060\u00ad\x7f", "\u061c \U000e0001"]


def _range_ends() -> list[int]:
    """Each INVISIBLE range's ends and their neighbours, and a few ordinary characters."""
    points = {ord(c) for c in "aZ9é中😀"}
    for m in re.finditer(r"\\(?:x([0-9a-f]{2})|u([0-9a-f]{4})|U([0-9a-f]{8}))", INVISIBLE):
        point = int(next(g for g in m.groups() if g), 16)
        points |= {point - 1, point, point + 1}
    return sorted(p for p in points if 0 < p < 0x110000 and not 0xd800 <= p <= 0xdfff)


def test_python_and_the_database_read_the_characters_alike(owner: psycopg.Connection[Any]) -> None:
    points = _range_ends()
    rows = owner.execute(f"SELECT p, chr(p) ~ '[^{INVISIBLE}]' FROM unnest(%s::int[]) p",
                         (points,)).fetchall()
    assert {p: seen for p, seen in rows} == {p: has_text(chr(p)) for p in points}
    # Every place the database checks for text uses these ranges: the tables' CHECKs and
    # the functions that take a query or an evaluation query.
    defs = [r[0] for r in owner.execute(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname IN "
        "('chunks_content_check', 'eval_queries_query_check') UNION ALL "
        "SELECT prosrc FROM pg_proc WHERE pronamespace = 'pyembed'::regnamespace "
        "AND prosrc LIKE '%query%~%'")]
    assert len(defs) >= 4
    for text in defs:
        assert "\\S" not in text, text
    # (the functions' ranges in escape strings, read alike whatever standard_conforming_strings
    # says; the CHECKs' as PostgreSQL prints them)
    escaped = INVISIBLE.replace("\\", "\\\\")
    assert sum(INVISIBLE in text or escaped in text for text in defs) >= 4


@pytest.mark.parametrize("text", EMPTY)
def test_every_entry_point_refuses_a_text_without_a_character(
        db: Database, client: pyembed.Client, owner: psycopg.Connection[Any],
        app: psycopg.Connection[Any], text: str) -> None:
    docs = client.create_corpus("docs", KEY)
    docs.add([("d1", "a stored text")])
    for mode in ("vector", "keyword", "hybrid"):
        with pytest.raises(pyembed.InvalidInput, match="only whitespace and control"):
            docs.search(text, k=1, mode=mode)
    with pytest.raises(pyembed.InvalidInput, match="only whitespace and control"):
        docs.add([("d2", text)])
    with pytest.raises(pyembed.InvalidInput, match="only whitespace and control"):
        client.embedder(KEY).embed([text])
    for statement, params in [
            ("SELECT * FROM pyembed.search_text('docs', %s, 1, mode => 'keyword')", (text,)),
            ("SELECT * FROM pyembed.search_text('docs', %s, 1)", (text,)),
            ("SELECT pyembed.add_document('docs', 'd3', %s)", (text,)),
            ("SELECT pyembed.embed(%s, %s)", (text, KEY))]:
        err = sql_error(app, statement, params)
        assert err.sqlstate == "PE005", (statement, err)
    # The tables themselves, whatever the writer.
    chunk = ("INSERT INTO pyembed.chunks (corpus_id, document_id, chunk_index, content, "
             "content_hash) SELECT corpus_id, 'd1', 9, %s, '\\x00' FROM pyembed.corpora")
    err = sql_error(owner, chunk, (text,))
    assert isinstance(translate(err), pyembed.InvalidInput), err
    err = sql_error(owner, "INSERT INTO pyembed.eval_queries (corpus_id, query_id, query, "
                           "relevant) SELECT corpus_id, 'q', %s, '{d1}' FROM pyembed.corpora",
                    (text,))
    assert err.sqlstate == "PE005", err
    assert [h.document_id for h in docs.search("stored text", k=1)] == ["d1"]


@pytest.mark.parametrize("run", ["\u200b" * 4000, "\x1b" * 4000, " ".join(["\x01\x02"] * 1500)])
def test_a_document_with_a_window_of_invisible_characters_is_stored_without_it(
        client: pyembed.Client, app: psycopg.Connection[Any], run: str) -> None:
    """A run of format or control characters longer than a chunk became a chunk of its own,
    which chunks.content refuses: Corpus.add refused the whole document ("text 4 is empty")
    and pyembed.add_document raised the table's 23514, though the document has text."""
    from pyembed.chunking import chunk_text

    text = "word " * 300 + run + " last words"
    chunks = chunk_text(text, 100, 20)
    assert chunks and all(has_text(chunk) for chunk in chunks)
    assert chunks[-1].endswith("last words")
    docs = client.create_corpus("docs", KEY, chunk_tokens=100, chunk_overlap=20)
    assert docs.add([("d1", text)]).chunks == len(chunks)
    assert app.execute("SELECT pyembed.add_document('docs', 'd2', %s)", (text,)).fetchone() == (
        len(chunks),)
    assert [h.document_id for h in docs.search("last words", k=2, mode="keyword")] == [
        "d1", "d2"]
