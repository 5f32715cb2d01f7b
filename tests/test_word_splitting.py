"""Text is split into words at one set of characters on both sides: pyembed.text.SPACES, Python's
str.isspace written as bracket ranges PostgreSQL reads alike. The chunker (Python) cuts chunks at
whole words; pyembed._document_terms (SQL) finds where a chunk repeats the words that end the one
before (the overlap) by splitting both at the same characters, and indexes each word of the
document once. Before, SQL split at the locale's \\s, which under C.UTF-8 left U+00A0, U+2007,
U+202F, U+0085 and U+001C..U+001F inside words: a document whose words the chunker had cut at a
no-break space had its overlap counted twice in its keyword postings (tf 2 for words it holds
once)."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

import psycopg
import pytest

import pyembed
from pyembed.chunking import chunk_text
from pyembed.text import SPACES

KEY = "fake/fake-hash@1:384"
CODE_POINTS = [chr(c) for c in range(1, 0x110000) if not 0xD800 <= c <= 0xDFFF]
LOCALE_DIFFERED = ["\u00a0", "\u2007", "\u202f", "\u0085", "\x1c", "\x1f"]


def test_the_ranges_are_pythons_whitespace_and_postgresqls_too(
        owner: psycopg.Connection[Any]) -> None:
    """Every code point, every whitespace and format character among them: SPACES holds the
    ones Python's str.isspace (and so str.split, re's \\s and the token estimate) takes for
    space, PostgreSQL's regular expressions read the ranges as Python's do, and the SQL that
    splits chunks into words writes exactly these ranges."""
    spaces = re.compile(f"[{SPACES}]")
    python = {ch for ch in CODE_POINTS if spaces.fullmatch(ch)}
    assert python == {ch for ch in CODE_POINTS if ch.isspace()}
    assert {ch for ch in CODE_POINTS if unicodedata.category(ch) == "Cf"} & python == set()
    sql = {r[0] for r in owner.execute(
        "SELECT ch FROM unnest(%s::text[]) ch WHERE ch ~ ('^[' || %s || ']$')",
        (CODE_POINTS, SPACES)).fetchall()}
    assert sql == python
    body = owner.execute("SELECT prosrc FROM pg_proc "
                         "WHERE oid = 'pyembed._document_terms'::regproc").fetchone()
    # (an escape string, which reads alike whatever standard_conforming_strings says)
    escaped = SPACES.replace("\\", "\\\\")
    assert body is not None and f"E'[{escaped}]+'" in body[0]
    assert "'\\s" not in body[0]


@pytest.mark.parametrize("space", LOCALE_DIFFERED, ids=[f"U+{ord(c):04X}" for c in
                                                        LOCALE_DIFFERED])
def test_a_documents_overlap_is_indexed_once_whatever_space_separates_its_words(
        space: str, client: pyembed.Client,
        owner: psycopg.Connection[Any]) -> None:
    text = space.join(f"w{i}" for i in range(80))
    assert len(chunk_text(text, 20, 5)) > 2  # chunks that overlap
    client.create_corpus("kb", KEY, chunk_tokens=20, chunk_overlap=5).add([("d", text)])
    postings = owner.execute("SELECT lexeme, tf, doc_len FROM pyembed.document_postings").fetchall()
    assert {lexeme for lexeme, _, _ in postings} == {f"w{i}" for i in range(80)}
    assert {(tf, doc_len) for _, tf, doc_len in postings} == {(1, 80)}
