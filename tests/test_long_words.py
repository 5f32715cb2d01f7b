"""A word longer than a chunk (base64, a data URI, a URL, text without spaces) is cut into
chunks of its own at every entry point, so a document holding one is embedded like any other
instead of being refused by the model's token limit (or the chunk's 1 MB bound); so is a
chunk of a corpus whose windows are wider than its model reads."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from pyembed.chunking import chunk_text, fit_chunks
from pyembed.text import estimate_tokens
from pyembed.worker import Worker
from tests.conftest import Database

KEY = "fake/fake-hash@1:1024"  # a 2,048-token limit: the long word below is about 5,000
BLOB = "QUJD" * 5000
TEXT = f"The logo is inlined as data:image/png;base64,{BLOB} in the page header."
WIDE = " ".join(f"w{i:04d}" for i in range(2000))  # about 3,000 tokens, all in one window
# (corpus, chunk_tokens, document): each makes a chunk over the model's limit before the fix.
CASES = [("pages", 200, TEXT), ("wide", 4000, WIDE)]


@pytest.mark.parametrize(("size", "overlap"), [(200, 40), (20, 5), (2, 1)])
def test_no_chunk_outgrows_its_window_and_none_is_lost(size: int, overlap: int) -> None:
    chunks = chunk_text(TEXT, size, overlap)
    assert chunks and all(c and estimate_tokens(c) <= size for c in chunks)
    end = 0  # each chunk is a stretch of the text that starts at most a space after the last
    for chunk in chunks:
        start = TEXT.rfind(chunk, 0, end + 1 + len(chunk))
        assert start >= 0, chunk
        end = max(end, start + len(chunk))
    assert end == len(TEXT)


def test_the_models_tokenizer_splits_a_word_it_finds_too_long() -> None:
    def per_character(texts: list[str]) -> list[int]:
        return [len(t) for t in texts]

    chunks = fit_chunks(["a" * 100, "short words here"], 10, per_character)
    assert all(len(c) <= 10 for c in chunks)
    assert "".join(chunks[:-2]) == "a" * 100


@pytest.mark.parametrize(("name", "window", "text"), CASES)
def test_corpus_add_embeds_every_chunk(client: Any, name: str, window: int, text: str) -> None:
    docs = client.create_corpus(name, KEY, chunk_tokens=window)
    report = docs.add([("header", text)])
    assert report.added == 1 and report.chunks > 1
    [hit] = docs.search(text[:40], k=1)
    assert hit.document_id == "header"


@pytest.mark.parametrize(("name", "window", "text"), CASES)
def test_sql_add_document_queues_chunks_the_worker_can_embed(
        db: Database, app: psycopg.Connection[Any], name: str, window: int, text: str) -> None:
    app.execute("SELECT pyembed.create_corpus(%s, %s, chunk_tokens => %s)", (name, KEY, window))
    n = app.execute("SELECT pyembed.add_document(%s, 'header', %s)", (name, text)).fetchone()
    assert n is not None and n[0] > 1
    worker = Worker(db.app_dsn, batch_size=64, retry_base=0.05)
    try:
        stats = worker.run(drain=True, poll_interval=0.05, drain_wait=2.0)
    finally:
        worker.close()
    assert (stats.embedded, stats.failed) == (n[0], 0)
    assert app.execute("SELECT count(*) FROM pyembed.queue").fetchone() == (0,)


def test_a_long_document_is_chunked_in_the_memory_of_its_chunks_not_of_its_words() -> None:
    """Every entry point chunks with chunk_text (Corpus.add and `pyembed ingest`, SQL's
    add_document in PL/Python). It made a list of the document's words, an object of ~60 bytes
    for each ~7 characters, then its chunks: a 10 MB .txt took ~120 MB to chunk and `pyembed
    ingest` peaked at 320 MB RSS. The words are read one at a time now, and only a window's
    are held: chunking takes about the chunks' own size, and iter_chunks, which keeps none,
    a window's."""
    import tracemalloc

    words = [f"w{i % 9973}x" for i in range(300_000)]
    text = " ".join(words) + "\n\n"  # about 2.1 MB, words of 6-8 characters
    del words
    tracemalloc.start()
    try:
        chunks = chunk_text(text, 200, 40)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    kept = sum(len(c) + 49 for c in chunks) + 8 * len(chunks)  # str headers, the list
    assert len(chunks) > 1000 and peak < kept + 256 * 1024, (peak, kept, len(text))

    from pyembed.chunking import iter_chunks

    tracemalloc.start()
    try:
        streamed = sum(1 for _ in iter_chunks(text, 200, 40))
        window_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert streamed == len(chunks)
    assert window_peak < 256 * 1024, window_peak


@pytest.mark.parametrize("per_token", [2, 4, 8])
def test_the_chunker_asks_the_estimate_for_its_bounds(monkeypatch: pytest.MonkeyPatch,
                                                      per_token: int) -> None:
    """The chunker's bounds (when a whole text may be one window, how long a piece of a long
    word is) are the estimate's own (text.over_tokens, text.most_chars): an estimate of
    another character rate moves them with it. Before, iter_chunks and _words kept '4 *
    max_tokens (+ 3)' of their own: at 8 characters a token, a word the estimate puts at the
    window was cut in pieces of 4 characters a token."""
    import pyembed.text

    monkeypatch.setattr(pyembed.text, "CHARS_PER_TOKEN", per_token, raising=False)
    window = 50
    fits = "x" * (per_token * window)
    assert estimate_tokens(fits) == window and estimate_tokens(fits + "x") == window + 1
    assert chunk_text(fits, window, 10) == [fits]
    assert chunk_text(f"  {fits}\n", window, 10) == [fits]
    assert chunk_text(fits + "y", window, 10) == [fits, "y"]
    words = " ".join(["abc"] * 200)  # words, not characters, put it over: split into windows
    assert estimate_tokens(words) > window and len(chunk_text(words, window, 10)) > 1
