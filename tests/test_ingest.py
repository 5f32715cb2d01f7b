"""Files in: each format read into a real database, bad records reported and skipped."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from rich.console import Console

import pyembed
from pyembed.client import Client, Corpus
from pyembed.db import connect, twin
from pyembed.ingest import (
    MAX_FIELD_BYTES,
    FileProblem,
    IngestError,
    IngestReport,
    ingest,
    markdown_title,
    progress_line,
    read_documents,
)
from pyembed.models import InputType
from tests.conftest import REPO, Database
from tests.fakeapi.server import FakeAPI
from tests.helpers import assert_ingest_resumes, count

KEY = "fake/fake-hash@1:384"


@pytest.fixture
def corpus(client: Client) -> Corpus:
    return client.create_corpus("files", KEY)


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _jsonl(*objects: Any) -> str:
    return "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objects)


def _documents(conn: psycopg.Connection[Any]) -> dict[str, dict[str, Any]]:
    rows = conn.execute("SELECT document_id, metadata FROM pyembed.documents").fetchall()
    return dict(rows)


def _where(report: IngestReport) -> list[tuple[str, int | None]]:
    return [(p.path.name, p.line) for p in report.problems]


def test_text_and_markdown_files(tmp_path: Path, corpus: Corpus,
                                 app: psycopg.Connection[Any]) -> None:
    notes = _write(tmp_path / "notes.txt", "Plain notes about backups.\n")
    guide = _write(tmp_path / "guide.md", "```sh\n# not a title\n```\n\n## Setting up SSO\n\n"
                   "Single sign-on works with SAML.\n")

    report = ingest(corpus, [notes, guide], progress=False)

    assert (report.added, report.updated, report.skipped, report.failed) == (2, 0, 0, 0)
    assert report.problems == [] and report.chunks == 2
    assert _documents(app) == {"notes": {"source": "notes.txt"},
                               "guide": {"source": "guide.md", "title": "Setting up SSO"}}
    assert corpus.search("SAML single sign-on", k=1)[0].document_id == "guide"


def test_jsonl_with_metadata_and_beir_fields(tmp_path: Path, corpus: Corpus,
                                             app: psycopg.Connection[Any]) -> None:
    path = _write(tmp_path / "docs.jsonl", "\ufeff" + _jsonl(
        {"id": "a", "text": "alpha text", "lang": "en", "tags": ["x"]},
        {"_id": "4983", "title": "Microstructural development", "text": "Alterations of the "
         "architecture of cerebral white matter", "metadata": {"year": 2001}},
        {"id": 7, "text": "an integer id"},
    ))

    report = ingest(corpus, path, progress=False)

    assert (report.added, report.failed, report.problems) == (3, 0, [])
    assert _documents(app) == {"a": {"lang": "en", "tags": ["x"]},
                               "4983": {"title": "Microstructural development", "year": 2001},
                               "7": {}}
    [hit] = corpus.search("microstructural", k=1)
    assert hit.document_id == "4983"
    assert hit.content.startswith("Microstructural development\n\nAlterations")


def test_csv_with_metadata_columns_and_custom_fields(tmp_path: Path, corpus: Corpus,
                                                     app: psycopg.Connection[Any]) -> None:
    path = _write(tmp_path / "faq.csv", 'key,body,team\nr1,"Refunds take ten days,\n'
                  'to the original card",billing\n\nr2,Quota resets monthly,compute\n')

    report = ingest(corpus, path, progress=False, id_field="key", text_field="body")

    assert (report.added, report.problems) == (2, [])
    assert _documents(app) == {"r1": {"team": "billing"}, "r2": {"team": "compute"}}
    assert corpus.search("refunds original card", k=1)[0].content == (
        "Refunds take ten days,\nto the original card")


def test_csv_fields_up_to_a_chunks_bound_load_and_a_longer_one_is_reported(
        tmp_path: Path, corpus: Corpus, app: psycopg.Connection[Any]) -> None:
    """A 200 KB field loads (csv's default limit, 128 KiB, skipped it); one over the bound of a
    chunk's text (MAX_FIELD_BYTES) is reported with its line, and the records after it load,
    read as they are written (csv stopped inside the field and read its rest as records)."""
    words = " ".join(f"word{i}" for i in range(40_000))
    assert 200_000 < len(words) < MAX_FIELD_BYTES
    huge = ("line of text\n" * (MAX_FIELD_BYTES // 13 + 1)).rstrip()
    path = _write(tmp_path / "big.csv", f'id,text,lang\nbig,"{words}",en\n'
                  f'huge,"{huge}\nstill, the same field",en\nafter,"the record after",en\n')

    report = ingest(corpus, path, progress=False)

    assert (report.added, report.failed) == (2, 1)
    (problem,) = report.problems
    assert problem.line == 3 and problem.message.startswith("field 'text' is ")
    assert f"{MAX_FIELD_BYTES:,}-byte bound" in problem.message
    assert sorted(_documents(app)) == ["after", "big"]
    assert corpus.search("word39999", k=1, mode="keyword")[0].document_id == "big"
    assert csv.field_size_limit() == 131072  # the process's limit as it was


def test_the_field_bound_is_the_chunks_bound_in_the_database(
        owner: psycopg.Connection[Any]) -> None:
    """MAX_FIELD_BYTES stays a constant of ingest's (a field is bounded while it is read, before
    anything reaches the database): it is the bound the chunks table's CHECK holds."""
    (definition,) = owner.execute(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conname = 'chunks_content_bound' AND conrelid = 'pyembed.chunks'::regclass"
    ).fetchone() or (None,)
    assert definition == f"CHECK ((octet_length(content) <= {MAX_FIELD_BYTES}))"


def test_reading_a_csv_file_leaves_the_processs_csv_limit_alone(tmp_path: Path) -> None:
    """csv.field_size_limit is the whole process's, every thread's: while a CSV file is being
    read (between its records, where the user's code runs), it stays as it was, and another
    thread's csv reader still refuses a field over it. Before, it was sys.maxsize then."""
    big = "x" * 200_000
    path = _write(tmp_path / "two.csv", f"id,text\na,first text\nb,{big}\nc,third\n")
    records = read_documents(path)
    assert next(records).id == "a"  # paused inside the file
    assert csv.field_size_limit() == 131072
    refused: list[BaseException] = []

    def other_thread() -> None:
        try:
            list(csv.reader(io.StringIO(big)))
        except csv.Error as exc:
            refused.append(exc)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert len(refused) == 1 and "field limit" in str(refused[0])
    assert [r.id for r in records] == ["b", "c"]  # pyembed's own reader takes the long field
    assert csv.field_size_limit() == 131072


def test_bad_lines_are_reported_with_line_numbers_and_the_rest_loads(
        tmp_path: Path, corpus: Corpus, app: psycopg.Connection[Any]) -> None:
    path = _write(tmp_path / "mixed.jsonl", _jsonl(
        {"id": "ok1", "text": "first good line"},
        "{not json",
        {"text": "no id here"},
        {"id": "no-text"},
        {"id": "blank", "text": "   "},
        {"id": "nul", "text": "nul \u0000 byte"},
        {"id": "ok1", "text": "the same id again"},
        "",
        ["a", "list"],
        {"id": "x" * 513, "text": "id too long"},
        {"id": True, "text": "a boolean id"},
        {"id": "ok2", "text": "second good line"},
    ))

    report = ingest(corpus, path, progress=False)

    assert report.added == 2 and report.failed == 9
    assert _where(report) == [("mixed.jsonl", n) for n in (2, 3, 4, 5, 6, 7, 9, 10, 11)]
    messages = [p.message for p in report.problems]
    assert messages[0].startswith("invalid JSON")
    assert "no 'id' (or '_id') field" in messages[1]
    assert "'no-text'" in messages[2] and "no 'text' field" in messages[2]
    assert "text is empty" in messages[3] and "NUL byte" in messages[4]
    assert "duplicate id 'ok1'" in messages[5] and "mixed.jsonl:1" in messages[5]
    assert "expected a JSON object" in messages[6] and "1..512 characters, got 513" in messages[7]
    assert str(report.problems[0]).startswith(f"{path}:2: invalid JSON")
    assert sorted(_documents(app)) == ["ok1", "ok2"]
    assert corpus.search("first good line", k=1)[0].content == "first good line"


def test_documents_the_corpus_refuses_are_isolated(tmp_path: Path, corpus: Corpus,
                                                   app: psycopg.Connection[Any]) -> None:
    # Metadata over the 64 kB bound of documents.metadata: the database's rule (asked before the
    # batch is embedded: test_write_prechecks) refuses that document, the others are loaded.
    lines = [{"id": f"d{i}", "text": f"document number {i}"} for i in range(5)]
    lines.insert(2, {"id": "huge", "text": "a huge note", "note": "x" * 70_000})
    path = _write(tmp_path / "batch.jsonl", _jsonl(*lines))

    report = ingest(corpus, path, batch_size=4, progress=False)

    assert (report.added, report.failed) == (5, 1)
    [problem] = report.problems
    assert (problem.path, problem.line) == (path, 3)
    assert problem.message.startswith('document "huge": metadata is at most 65536 bytes'), \
        problem.message
    assert "huge" not in _documents(app) and count(app, "documents") == 5

    lines[2]["note"] = "a short note"
    _write(path, _jsonl(*lines))
    report = ingest(corpus, path, batch_size=4, progress=False)
    assert (report.added, report.skipped, report.failed) == (1, 5, 0)


def test_reingest_skips_unchanged_and_updates_changed_files(tmp_path: Path, corpus: Corpus,
                                                            app: psycopg.Connection[Any]) -> None:
    _write(tmp_path / "a.md", "# A\n\nfirst version")
    _write(tmp_path / "b.txt", "stays the same")
    assert ingest(corpus, tmp_path, progress=False).added == 2

    again = ingest(corpus, tmp_path, progress=False)
    assert (again.added, again.updated, again.skipped, again.chunks) == (0, 0, 2, 0)

    _write(tmp_path / "a.md", "# A, renamed\n\nsecond version")
    changed = ingest(corpus, tmp_path, progress=False)
    assert (changed.added, changed.updated, changed.skipped, changed.chunks) == (0, 1, 1, 1)
    assert _documents(app)["a"]["title"] == "A, renamed"
    assert corpus.search("second version", k=1)[0].content == "# A, renamed\n\nsecond version"
    assert count(app, "chunks") == 2


def test_a_directory_is_walked_recursively(tmp_path: Path, corpus: Corpus,
                                           app: psycopg.Connection[Any]) -> None:
    root = tmp_path / "kb"
    _write(root / "index.md", "# Home\n\nwelcome")
    _write(root / "guides" / "setup.md", "# Setup\n\ninstall it")
    _write(root / "guides" / "deep" / "faq.txt", "questions and answers")
    _write(root / "data" / "rows.jsonl", _jsonl({"id": "row1", "text": "a row"}))
    _write(root / "data" / "table.csv", "id,text\nc1,a csv row\n")
    _write(root / "logo.png", b"\x89PNG\r\n\x1a\n\x00\x00")  # not a supported type: ignored
    _write(root / ".git" / "notes.md", "hidden folders are skipped")

    report = ingest(corpus, root, progress=False)

    assert report.problems == [] and report.added == 5
    docs = _documents(app)
    assert sorted(docs) == ["c1", "guides/deep/faq", "guides/setup", "index", "row1"]
    assert docs["guides/setup"] == {"source": "guides/setup.md", "title": "Setup"}
    assert [d.id for d in read_documents(root)] == [  # a folder's files, then its folders
        "index", "row1", "c1", "guides/setup", "guides/deep/faq"]


def test_a_file_that_is_not_utf8_is_one_problem(tmp_path: Path, corpus: Corpus) -> None:
    _write(tmp_path / "good.txt", "fine")
    latin = _write(tmp_path / "latin1.txt", "caf\u00e9 au lait".encode("latin-1"))

    report = ingest(corpus, tmp_path, progress=False)

    assert report.added == 1 and report.failed == 0
    [problem] = report.problems
    assert (problem.path, problem.line) == (latin, 1)
    assert problem.message.startswith("not UTF-8: byte 0xe9")


def test_a_jsonl_line_that_is_not_utf8_is_one_bad_record(tmp_path: Path, corpus: Corpus) -> None:
    """A JSONL file's lines are records of their own, as an invalid JSON line is skipped alone:
    one line in Latin-1 skipped the whole file, its good lines with it."""
    latin = _write(tmp_path / "mixed.jsonl",
                   '\ufeff{"id": "a", "text": "ok"}\n'.encode() + '{"id": "b", "text": "caf\u00e9"}'
                   '\n'.encode("latin-1") + '{"id": "c", "text": "caf\u00e9"}\n'.encode())

    report = ingest(corpus, tmp_path, progress=False)

    assert report.added == 2 and report.failed == 1, report
    [problem] = report.problems
    assert (problem.path, problem.line) == (latin, 2)
    assert problem.message == ("not UTF-8: byte 0xe9 at offset 24 of the line (convert the file "
                               "to UTF-8)")
    assert sorted(d.id for d in read_documents(latin, problems=[])) == ["a", "c"]


def test_empty_files_missing_columns_and_unsupported_paths(tmp_path: Path,
                                                           corpus: Corpus) -> None:
    paths = [
        _write(tmp_path / "empty.txt", ""),
        _write(tmp_path / "blank.md", "\n  \n"),
        _write(tmp_path / "empty.jsonl", "\n"),
        _write(tmp_path / "empty.csv", ""),
        _write(tmp_path / "header-only.csv", "id,text\n"),
        _write(tmp_path / "no-text.csv", "id,body\n1,hello\n"),
        _write(tmp_path / "ragged.csv", "id,text\n1,one\n2,two,extra\n3\n4,,\n5,five\n"),
        _write(tmp_path / "notes.docx", "binary"),
        tmp_path / "missing.md",
    ]

    report = ingest(corpus, paths, progress=False)

    assert report.added == 2  # ragged.csv rows 1 and 5
    # failed records are no documents: the rate counts the two added only
    assert report.failed > 0 and report.seconds > 0
    assert report.documents_per_second == pytest.approx(2 / report.seconds)
    by_name = {p.path.name: p for p in report.problems if p.path.name != "ragged.csv"}
    assert by_name["empty.txt"].message == "empty file"
    assert by_name["blank.md"].message == "empty file"
    assert by_name["empty.jsonl"].message == "empty file"
    assert by_name["empty.csv"].message.startswith("empty file")
    assert by_name["header-only.csv"].message == "no records after the header row"
    assert by_name["no-text.csv"].line == 1
    assert by_name["no-text.csv"].message == ("no 'text' column in the header row "
                                              "(columns: id, body)")
    assert "unsupported file type '.docx'" in by_name["notes.docx"].message
    assert by_name["missing.md"].message == "no such file or folder"
    ragged = [(p.line, p.message) for p in report.problems if p.path.name == "ragged.csv"]
    assert ragged == [(3, "3 fields where the header has 2"),
                      (4, "1 fields where the header has 2"),
                      (5, "3 fields where the header has 2")]
    assert report.failed == 2 + 3  # the empty text files and ragged.csv's rows


@pytest.mark.timeout(60)
def test_a_fifo_or_a_device_is_one_problem_not_a_hang(tmp_path: Path, corpus: Corpus) -> None:
    """A FIFO waited for a writer when opened and /dev/zero was read for ever (ingest's count
    of records for its progress bar did the same): neither is a file of records."""
    folder = tmp_path / "docs"
    _write(folder / "a.txt", "a real file")
    os.mkfifo(folder / "fifo.jsonl")
    (folder / "zero.txt").symlink_to("/dev/zero")
    problems: list[FileProblem] = []
    assert [d.id for d in read_documents(folder, problems=problems)] == ["a"]
    assert [(p.path.name, p.message) for p in problems] == [
        (name, "not a regular file (a FIFO, device or socket)")
        for name in ("fifo.jsonl", "zero.txt")]
    shown = io.StringIO()
    report = ingest(corpus, [folder, folder / "zero.txt"], progress=True,
                    console=Console(file=shown, force_terminal=True))
    assert report.added == 1
    assert _where(report) == [("fifo.jsonl", None), ("zero.txt", None), ("zero.txt", None)]


def test_links_to_nothing_and_loops_of_links_are_named_as_such(tmp_path: Path,
                                                             corpus: Corpus) -> None:
    """A folder's link to a missing file, a loop of file links, a link to its own folder (a
    loop for a walk that follows links): the real file loads once, and each link to nothing is
    one problem saying what it is. Before, the links to nothing were
    'not a regular file (a FIFO, device or socket)'."""
    folder = tmp_path / "docs"
    _write(folder / "a.txt", "a real file")
    (folder / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    (folder / "l1.md").symlink_to("l2.md")
    (folder / "l2.md").symlink_to("l1.md")
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to("..")
    problems: list[FileProblem] = []
    assert [d.id for d in read_documents(folder, problems=problems)] == ["a"]
    assert [(p.path.name, p.message) for p in problems] == [
        ("gone.txt", f"a symbolic link to {str(tmp_path / 'nowhere.txt')!r}, which leads to no "
                     "file (missing, or a loop of links)"),
        ("l1.md", "a symbolic link to 'l2.md', which leads to no file (missing, or a loop of "
                  "links)"),
        ("l2.md", "a symbolic link to 'l1.md', which leads to no file (missing, or a loop of "
                  "links)")]
    report = ingest(corpus, folder, progress=False)
    assert (report.added, len(report.problems)) == (1, 3)


def test_read_documents_raises_without_a_problem_list(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.jsonl", _jsonl({"id": "a", "text": "fine"}, "{bad"))
    docs = read_documents(path)
    assert next(docs).id == "a"
    with pytest.raises(IngestError) as raised:
        next(docs)
    assert isinstance(raised.value, pyembed.InvalidInput)
    assert raised.value.problem == FileProblem(path, 2, raised.value.problem.message)

    problems: list[FileProblem] = []
    assert [d.id for d in read_documents(path, problems=problems)] == ["a"]
    assert [p.line for p in problems] == [2]


def test_duplicate_ids_across_files_are_reported(tmp_path: Path, corpus: Corpus) -> None:
    _write(tmp_path / "one" / "readme.md", "# One")
    _write(tmp_path / "two.jsonl", _jsonl({"id": "readme", "text": "also readme"}))
    report = ingest(corpus, [tmp_path / "one", tmp_path / "two.jsonl"], progress=False)
    assert report.added == 1
    [problem] = report.problems
    assert problem.line == 1 and "duplicate id 'readme'" in problem.message


def test_progress_bar_and_throughput(tmp_path: Path, corpus: Corpus) -> None:
    path = _write(tmp_path / "many.jsonl",
                  _jsonl(*({"id": str(i), "text": f"text {i}"} for i in range(30))))
    console = Console(record=True, force_terminal=True, width=120)

    report = ingest(corpus, path, batch_size=8, console=console)

    assert report.processed == 30 and report.seconds > 0 and report.chunks == 30
    assert report.documents_per_second == pytest.approx(30 / report.seconds, rel=0.01)
    assert report.chunks_per_second == pytest.approx(30 / report.seconds, rel=0.01)
    shown = console.export_text()
    assert "documents/s" in shown and "chunks/s" in shown and "texts/s" not in shown
    assert "ingest:" not in shown  # a terminal gets the bar, not lines
    with pytest.raises(pyembed.InvalidInput):
        ingest(corpus, path, batch_size=0)
    with pytest.raises(pyembed.InvalidInput, match="progress_every"):
        ingest(corpus, path, progress_every=-1)


def test_progress_lines_without_a_terminal(tmp_path: Path, corpus: Corpus) -> None:
    long = " ".join(f"word{i}" for i in range(300))  # more than one chunk
    path = _write(tmp_path / "many.jsonl", _jsonl(
        *({"id": str(i), "text": long if i % 10 == 0 else f"text {i}"} for i in range(30))))
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=60)

    report = ingest(corpus, path, batch_size=8, console=console, progress_every=0)

    lines = out.getvalue().splitlines()
    assert len(lines) == 4  # one per batch: 8, 16, 24, 30
    assert [line.split(" documents")[0] for line in lines] == [
        "ingest: 8/30", "ingest: 16/30", "ingest: 24/30", "ingest: 30/30"]
    assert all(len(line) > 60 and "documents/s" in line and "chunks/s" in line
               for line in lines)  # one line each, whatever the width
    assert "ETA" in lines[0] and f"{report.chunks} chunks;" in lines[-1]
    assert report.chunks > 30

    quiet = io.StringIO()
    ingest(corpus, path, console=Console(file=quiet, force_terminal=False))  # every 10 s
    assert quiet.getvalue() == ""  # unchanged documents in well under 10 s


def test_progress_line() -> None:
    assert progress_line(100, 340, 1000, 10.0) == (
        "ingest: 100/1000 documents (10%), 340 chunks; 10.0 documents/s, 34.0 chunks/s; "
        "ETA 1m30s")
    assert progress_line(5, 5, 0, 0.0) == (
        "ingest: 5 documents, 5 chunks; 0.0 documents/s, 0.0 chunks/s")


def _cli(args: list[str], db: Database, **kwargs: Any) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYEMBED_")}
    env.update({"PYEMBED_DSN": db.app_dsn, "COLUMNS": "60"})
    return subprocess.Popen([sys.executable, "-m", "pyembed", *args], env=env, cwd=REPO,
                            **kwargs)


@pytest.mark.parametrize("content", ["nothing", "unsupported and hidden files"])
def test_a_folder_without_a_supported_file_is_a_problem_not_a_silent_success(
        tmp_path: Path, corpus: Corpus, db: Database, content: str) -> None:
    """An empty folder, or one of unsupported or hidden files only, loads nothing: the API
    reports it as a problem and `pyembed ingest` says so and exits non-zero. Before, both
    ended as if all was loaded (exit 0, no word)."""
    folder = tmp_path / "docs"
    folder.mkdir()
    if content != "nothing":
        _write(folder / "notes.docx", "binary")
        _write(folder / ".hidden.txt", "a hidden text")
    report = ingest(corpus, folder, progress=False)
    assert report.processed == 0
    (problem,) = report.problems
    assert problem.path == folder and problem.message.startswith("no supported file")
    with pytest.raises(IngestError, match="no supported file"):
        list(read_documents(folder))
    done = _cli(["ingest", "files", str(folder)], db, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE)
    out, err = done.communicate(timeout=120)
    assert done.returncode == 1, (out, err)
    assert b"no supported file" in err and b"nothing was loaded" in err, err


def test_cli_in_a_pipe_prints_progress_lines_and_a_one_line_summary(
        tmp_path: Path, corpus: Corpus, db: Database) -> None:
    path = _write(tmp_path / "many.jsonl",
                  _jsonl(*({"id": str(i), "text": f"text {i}"} for i in range(20))))

    proc = _cli(["ingest", "files", str(path), "--batch-size", "5", "--progress-every", "0"],
                db, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = proc.communicate(timeout=300)

    assert proc.returncode == 0, stderr
    progress = [line for line in stderr.decode().splitlines() if line.startswith("ingest:")]
    assert [line.split(" documents")[0] for line in progress] == [
        "ingest: 5/20", "ingest: 10/20", "ingest: 15/20", "ingest: 20/20"]
    [summary] = stdout.decode().splitlines()
    assert summary.startswith(f"files ({KEY}): added 20, updated 0, unchanged 0, failed 0; "
                              "20 chunks written in ")
    assert summary.endswith(" chunks/s)") and " documents/s, " in summary


def test_cli_on_a_narrow_terminal_prints_a_one_line_summary(
        tmp_path: Path, corpus: Corpus, db: Database) -> None:
    path = _write(tmp_path / "many.jsonl",
                  _jsonl(*({"id": str(i), "text": f"text {i}"} for i in range(20))))
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 60, 0, 0))

    proc = _cli(["ingest", "files", str(path), "--batch-size", "5"], db,
                stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)

    assert proc.wait(timeout=300) == 0, shown
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", shown.decode())
    [summary] = [line for line in text.splitlines() if "added 20" in line]
    assert summary.strip().startswith(f"files ({KEY}): added 20, updated 0, unchanged 0")
    assert summary.strip().endswith(" chunks/s)")
    assert "ingest:" not in text  # a terminal gets the bar, not lines


def test_markdown_title() -> None:
    assert markdown_title("intro\n# Title #\ntext") == "Title"
    assert markdown_title("~~~\n# code\n~~~\n### Third level") == "Third level"
    assert markdown_title("#hashtag, not a heading") is None


# -- each batch embedded while the one before is written -----------------------------------------

@contextmanager
def _writes_blocked(db: Database) -> Iterator[psycopg.Connection[Any]]:
    """Documents cannot be written until the block ends (or the yielded connection rolls
    back); reading them still works."""
    with psycopg.connect(db.owner_dsn) as blocker:
        blocker.execute("LOCK TABLE pyembed.documents IN EXCLUSIVE MODE")
        yield blocker
        blocker.rollback()


def _recording(monkeypatch: pytest.MonkeyPatch, corpus: Corpus,
               before: Callable[[int], None]) -> list[list[str]]:
    """The texts of each provider call of the corpus's embedder; `before(n)` runs before the
    n-th (1-based)."""
    provider = corpus.client.embedder(KEY).provider
    embed_batch = provider.embed_batch
    calls: list[list[str]] = []

    def recording(texts: list[str], input_type: InputType) -> Any:
        calls.append(texts)
        before(len(calls))
        return embed_batch(texts, input_type)

    monkeypatch.setattr(provider, "embed_batch", recording)
    return calls


def test_the_next_batch_is_embedded_while_one_is_written(
        tmp_path: Path, corpus: Corpus, db: Database, app: psycopg.Connection[Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path / "three.jsonl",
                  _jsonl(*({"id": str(i), "text": f"batch {i} alone"} for i in range(3))))
    second = threading.Event()
    calls = _recording(monkeypatch, corpus, lambda n: second.set() if n == 2 else None)
    reports: list[IngestReport] = []

    with _writes_blocked(db):
        run = threading.Thread(target=lambda: reports.append(
            ingest(corpus, path, batch_size=1, progress=False)))
        run.start()
        embedded = second.wait(timeout=60)  # never, if the first write had to end first
        written = count(app, "documents")
    run.join(timeout=60)

    assert embedded and written == 0
    assert [c[0] for c in calls] == ["batch 0 alone", "batch 1 alone", "batch 2 alone"]
    [report] = reports
    assert (report.added, report.chunks) == (3, 3) and count(app, "documents") == 3


def test_a_failure_while_a_batch_is_written_keeps_that_batch_and_a_rerun_resumes(
        tmp_path: Path, corpus: Corpus, db: Database, app: psycopg.Connection[Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path / "six.jsonl",
                  _jsonl(*({"id": str(i), "text": f"document {i}"} for i in range(6))))

    with _writes_blocked(db) as blocker:
        def fail_second(n: int) -> None:
            if n == 2:  # batch 1 is being written (blocked): unblock it a little later
                threading.Timer(0.5, blocker.rollback).start()
                raise pyembed.ProviderError("the model crashed")

        _recording(monkeypatch, corpus, fail_second)
        with pytest.raises(pyembed.ProviderError, match="the model crashed"):
            ingest(corpus, path, batch_size=2, progress=False)
        kept = sorted(_documents(app))  # the run waited for the batch being written
    monkeypatch.undo()

    assert kept == ["0", "1"]
    again = ingest(corpus, path, batch_size=2, progress=False)
    assert (again.added, again.skipped, again.failed) == (4, 2, 0)
    assert count(app, "chunks") == 6


def test_a_killed_ingest_stores_no_part_of_its_batch_and_a_rerun_resumes(
        tmp_path: Path, corpus: Corpus, db: Database, app: psycopg.Connection[Any]) -> None:
    path = _write(tmp_path / "forty.jsonl", _jsonl(
        *({"id": str(i), "text": f"document {i} " + "word " * 300} for i in range(40))))
    first = _write(tmp_path / "first.jsonl", "".join(path.read_text().splitlines(True)[:10]))
    before = ingest(corpus, first, progress=False)
    assert (before.added, before.chunks) == (10, 40)

    writers = ("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND "
               "wait_event_type = 'Lock' AND query LIKE 'INSERT INTO pyembed.documents%'")
    with _writes_blocked(db):
        proc = _cli(["ingest", "files", str(path), "--batch-size", "5", "--quiet"], db,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        waiting = _wait_for(lambda: len(app.execute(writers).fetchall()) == 1)
        [(writer,)] = app.execute(writers).fetchall()
        proc.kill()
        proc.wait(timeout=60)
    assert _wait_for(lambda: app.execute("SELECT NOT EXISTS (SELECT FROM pg_stat_activity "
                                         "WHERE pid = %s)", (writer,)).fetchone() == (True,))

    assert waiting  # killed while a batch was being written
    assert count(app, "documents") == 10 and count(app, "chunks") == 40
    again = ingest(corpus, path, batch_size=5, progress=False)
    assert (again.added, again.skipped, again.failed, again.chunks) == (30, 10, 0, 120)
    assert count(app, "chunks") == count(app, "vectors") == 160


def _wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_without_a_second_connection_batches_are_written_in_turn(
        tmp_path: Path, corpus: Corpus, app: psycopg.Connection[Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pyembed.ingest.twin", lambda conn: None)
    path = _write(tmp_path / "many.jsonl",
                  _jsonl(*({"id": str(i), "text": f"text {i}"} for i in range(12))))
    main = corpus.client.conn.info.backend_pid
    writers: set[int] = set()
    write = Corpus.write

    def recording(self: Corpus, prepared: Any, conn: Any = None) -> Any:
        writers.add((conn or self.client.conn).info.backend_pid)
        return write(self, prepared, conn)

    monkeypatch.setattr(Corpus, "write", recording)
    report = ingest(corpus, path, batch_size=5, progress=False)

    assert (report.added, report.chunks) == (12, 12) and writers == {main}
    assert count(app, "documents") == 12


def test_the_second_connection_acts_as_the_first(db: Database,
                                                 owner: psycopg.Connection[Any]) -> None:
    identity = ("SELECT session_user::text, current_user::text, "
                "current_setting('pyembed.act_as_tenant', true)")
    with connect(db.app_dsn, autocommit=True) as app_conn, twin(app_conn) as other:
        assert other is not None and other.info.backend_pid != app_conn.info.backend_pid
        assert other.execute(identity).fetchone() == app_conn.execute(identity).fetchone()
        assert other.info.dbname == app_conn.info.dbname == db.name

    owner.execute("SET ROLE pyembed_app")
    owner.execute("SELECT set_config('pyembed.act_as_tenant', 'acme', false)")
    with twin(owner) as other:
        assert other is not None
        assert other.execute(identity).fetchone() == (
            owner.info.user, "pyembed_app", "acme") == owner.execute(identity).fetchone()
    owner.execute("RESET ROLE")

    owner.execute("SET SESSION AUTHORIZATION pyembed_app")  # a login it cannot open again
    assert twin(owner) is None


def test_two_concurrent_ingests_of_one_file_report_what_each_stored(
        tmp_path: Path, db: Database, corpus: Corpus, owner: psycopg.Connection[Any]) -> None:
    """Both ingests read the corpus before either wrote (the documents' table held in SHARE
    mode until both wait to write). Before, both reported "added 20": each counted what it had
    read, not what the database did. Now the second finds the same documents stored when it
    writes, leaves them alone and says so: added 20 once, unchanged 20 once."""
    path = _write(tmp_path / "docs.jsonl",
                  _jsonl(*({"id": f"d{i}", "text": f"document {i} about refunds"}
                           for i in range(20))))
    reports: list[IngestReport] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with pyembed.connect(db.app_dsn) as mine:
                reports.append(ingest(mine.corpus("files"), path, progress=False))
        except BaseException as exc:
            errors.append(exc)

    with owner.transaction():
        owner.execute("LOCK TABLE pyembed.documents IN SHARE MODE")
        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        waiting = 0
        while waiting < 2 and not errors and time.monotonic() < deadline:
            time.sleep(0.05)
            row = owner.execute("SELECT count(*) FROM pg_catalog.pg_locks WHERE NOT granted "
                                "AND relation = 'pyembed.documents'::regclass").fetchone()
            waiting = row[0] if row else 0
    for t in threads:
        t.join(30)
    assert waiting == 2 and not errors, (waiting, errors)
    counts = sorted((r.added, r.updated, r.skipped, r.chunks) for r in reports)
    assert counts == [(0, 0, 20, 0), (20, 0, 0, 20)], counts
    assert count(owner, "documents") == 20 and count(owner, "vectors") == 20


def test_a_run_a_rate_limit_stops_says_what_it_kept_and_a_rerun_resumes(
        tmp_path: Path, db: Database, app: psycopg.Connection[Any], fake_api: FakeAPI) -> None:
    """The provider's 429 (asking to wait an hour, past what pyembed waits) stops the run after
    two batches: `pyembed ingest` exits 1 with one line giving the error, the documents kept
    and that running it again resumes; the rerun adds only the rest, its provider called for
    them alone. Before, the line gave the error alone."""
    app.execute("SELECT pyembed.create_corpus('paid', 'voyage/voyage-3@1:1024')")
    path = _write(tmp_path / "docs.jsonl",
                  _jsonl(*({"id": f"d{i}", "text": f"text number {i}"} for i in range(10))))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYEMBED_") and not k.endswith("_API_KEY")}
    env.update(fake_api.env(), PYEMBED_DSN=db.app_dsn, VOYAGE_API_KEY="pa-ingest-429")
    command = [sys.executable, "-m", "pyembed", "ingest", "paid", str(path), "--batch-size", "2",
               "--quiet"]
    fake_api.script("ok", "ok", *["429:retry-after=3600"] * 5)
    stopped = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO,
                             timeout=120)
    assert stopped.returncode == 1, stopped
    (line,) = stopped.stderr.splitlines()
    assert line.startswith("error: ") and "429" in line, line
    assert line.endswith("; ingest stopped with 4 documents kept (added 4, updated 0, "
                         "unchanged 0); running it again resumes: the documents kept are "
                         "skipped as unchanged"), line
    assert count(app, "documents") == 4
    assert_ingest_resumes(command, env, fake_api)
    assert count(app, "documents") == 10


def test_a_run_whose_corpus_is_dropped_meanwhile_says_nothing_is_kept(
        tmp_path: Path, db: Database, corpus: Corpus) -> None:
    """Someone drops the corpus (`pyembed corpus drop`) while `pyembed ingest` loads it: the run
    stops with UnknownCorpus and a note saying the corpus was dropped while it ran, with
    nothing to resume. Before (found from outside by outside20), the note said 'ingest stopped
    with 20 documents kept ...; running it again resumes: the documents kept are skipped as
    unchanged', of documents gone with their corpus. The drop is made from the progress line
    that follows the first stored batch, so that it falls between two batches."""
    path = _write(tmp_path / "docs.jsonl",
                  _jsonl(*({"id": f"d{i}", "text": f"text {i}"} for i in range(6))))
    dropped: list[int] = []

    class DropAfterFirstBatch(io.StringIO):
        def write(self, text: str) -> int:
            if not dropped and count(watch, "documents") >= 2:
                dropped.append(count(watch, "documents"))
                with pyembed.connect(db.app_dsn) as other:
                    other.drop_corpus("files")
            return super().write(text)

    with psycopg.connect(db.app_dsn, autocommit=True) as watch:
        console = Console(file=DropAfterFirstBatch(), force_terminal=False)
        with pytest.raises(pyembed.UnknownCorpus) as err:
            ingest(corpus, [path], batch_size=2, console=console, progress_every=0)
    assert dropped == [2], dropped
    assert str(err.value) == ("unknown corpus 'files' (hint: `pyembed corpus list` shows the "
                              "corpora)")  # (as migrate backfill's: one wording)
    assert err.value.__notes__ == [
        "ingest stopped: corpus 'files' was dropped while it ran, and what it had written "
        "went with it (nothing to resume)"], err.value.__notes__


def test_a_write_of_a_document_held_open_elsewhere_waits_only_so_long(
        db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A document another session holds (an application's transaction left open on its row)
    made `Corpus.add` and `pyembed ingest` of it wait for ever, saying nothing (found from
    outside by outside20). A write now waits corpora.WRITE_LOCK_WAIT, unless the session has a
    lock_timeout of its own, then is Busy, having changed nothing; a write inside the caller's
    own transaction gives that transaction its setting back."""
    import psycopg

    from pyembed import corpora

    monkeypatch.setattr(corpora, "WRITE_LOCK_WAIT", "300ms")
    with pyembed.connect(db.app_dsn) as client, psycopg.connect(db.app_dsn) as holder:
        kb = client.create_corpus("held", "fake/fake-hash@1:384")
        kb.add([("d1", "the first text")])
        # holder's transaction stays open on d1's row
        holder.execute("UPDATE pyembed.documents SET title = title WHERE document_id = 'd1'")
        with pytest.raises(pyembed.Busy, match="lock timeout"):
            kb.add([("d1", "the second text")])
        with pytest.raises(pyembed.Busy):  # the session's own bound, not pyembed's
            client.conn.execute("SET lock_timeout = '200ms'")
            try:
                kb.add([("d1", "the second text")])
            finally:
                client.conn.execute("SET lock_timeout = 0")
        holder.rollback()
        assert client.conn.execute("SELECT content FROM pyembed.chunks WHERE document_id = 'd1'"
                                   ).fetchall() == [("the first text",)]
        with client.conn.transaction():
            kb.add([("d1", "the second text")])
            assert client.conn.execute("SELECT current_setting('lock_timeout')"
                                       ).fetchone() == ("0",)
        assert client.conn.execute("SELECT content FROM pyembed.chunks WHERE document_id = 'd1'"
                                   ).fetchall() == [("the second text",)]


def test_progress_lines_while_one_long_document_is_embedded(
        tmp_path: Path, corpus: Corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    """A single long file (a 50 MB text is about 100,000 chunks) printed no progress line until
    it was written, however long its embedding took (found from outside: 5 minutes, nothing):
    the lines counted written documents only. Now its chunks embedded so far are shown after
    each request's group of them."""
    from pyembed import client

    monkeypatch.setattr(client, "EMBED_CHUNKS", 8)  # a group per 8 chunks, as per 1,024
    long = " ".join(f"word{i}" for i in range(3000))
    path = _write(tmp_path / "long.txt", long)
    out = io.StringIO()
    report = ingest(corpus, path, console=Console(file=out, force_terminal=False),
                    progress_every=0)
    lines = out.getvalue().splitlines()
    assert report.chunks > 24, report
    embedding = [line for line in lines if line.startswith("ingest: 0/1 documents")]
    assert [line.split(" chunks;")[0].rsplit(" ", 1)[1] for line in embedding][:3] == [
        "8", "16", "24"], lines
    assert lines[-1].startswith("ingest: 1/1 documents") and (
        f"{report.chunks} chunks;" in lines[-1]), lines


def test_a_dash_reads_json_lines_from_standard_input(corpus: Corpus, client: Client,
                                                     db: Database) -> None:
    """`pyembed ingest docs -` loads JSON Lines from a pipe, its bad lines named `<stdin>:N`,
    and a rerun of the same input skips what is loaded. Before: `-` was "no such file or
    folder" and nothing loaded."""
    lines = _jsonl({"id": "a", "text": "alpha text"}, {"id": "b", "text": ""},
                   {"id": "c", "text": "gamma text"})
    for run, loaded in ((1, b"added 2, updated 0, unchanged 0"), (2, b"added 0, updated 0, unchanged 2")):
        proc = _cli(["ingest", "files", "-", "--quiet"], db, stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(lines.encode(), timeout=120)
        assert proc.returncode == 0, (run, out, err)
        assert loaded in out + err and b"<stdin>:2" in out + err, (run, out, err)
    assert sorted(_documents(client.conn)) == ["a", "c"]
