"""Files in: text, Markdown, JSON Lines and CSV files (or folders of them) read as
documents and added to a corpus in batches, bad records reported and skipped."""

from __future__ import annotations

import codecs
import csv
import importlib.util
import json
import os
import re
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .client import AddReport, Corpus, Document, PreparedAdd
from .corpora import RefusedDocuments
from .db import twin
from .dbcall import count
from .errors import ConfigError, InvalidInput, ModelMismatch, shown, stopped
from .text import has_text, number, read_json

MARKDOWN_SUFFIXES = frozenset({".md", ".markdown"})
TEXT_SUFFIXES = frozenset({".txt"}) | MARKDOWN_SUFFIXES
"""One document per file (Markdown: its first heading is the "title")."""
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
STDIN = Path("-")
"""The path that reads JSON Lines from standard input (`pyembed ingest docs -`)."""
STDIN_NAME = Path("<stdin>")
"""How problems and duplicate ids name standard input."""
"""One JSON object per line."""
CSV_SUFFIXES = frozenset({".csv"})
"""A header row, then one document per record."""
SUFFIXES = TEXT_SUFFIXES | JSONL_SUFFIXES | CSV_SUFFIXES
MAX_FIELD_BYTES = 1 << 20
"""The longest CSV field read, in UTF-8 bytes: the bound of a chunk's text
(chunks_content_bound), the longest text a table of a document holds in one value."""

_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_BLOCK = 1 << 20
PROGRESS_EVERY = 10.0
"""Seconds between progress lines when the console is not a terminal."""


@dataclass(frozen=True)
class FileProblem:
    """Why a file, or one line of it (`line`, 1-based), was not loaded."""

    path: Path
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        return f"{where}: {self.message}"


class IngestError(InvalidInput):
    """A file or record that cannot be read as a document (raised by `read_documents`
    when it is not given a list to collect problems in)."""

    def __init__(self, problem: FileProblem) -> None:
        super().__init__(str(problem))
        self.problem = problem


@dataclass(frozen=True)
class IngestReport:
    """What `ingest` did: documents added, updated and skipped (unchanged); `failed`
    records that were read but not loaded (bad lines, documents the corpus refused);
    every problem, with its file and line; chunks written; and the throughput."""

    added: int
    updated: int
    skipped: int
    failed: int
    problems: list[FileProblem]
    chunks: int
    seconds: float

    @property
    def processed(self) -> int:
        """Records handled: added, updated, skipped or failed."""
        return self.added + self.updated + self.skipped + self.failed

    @property
    def documents_per_second(self) -> float:
        """Documents ingested (added, updated or found unchanged) per second of the run: a
        record that failed is not a document ingested."""
        done = self.processed - self.failed
        return done / self.seconds if self.seconds > 0 else 0.0

    @property
    def chunks_per_second(self) -> float:
        """Chunks written per second of the run."""
        return self.chunks / self.seconds if self.seconds > 0 else 0.0

    @property
    def unread(self) -> int:
        """Files and folders not read (missing, unsupported, not UTF-8, ...): each is one of the
        problems, as each failed record is."""
        return len(self.problems) - self.failed

    def summary(self) -> str:
        """One line: the counts (failed records and files not read add up to the problems),
        the time and both rates."""
        unread = f", {self.unread} file(s) not read" if self.unread else ""
        return (f"added {self.added}, updated {self.updated}, unchanged {self.skipped}, "
                f"failed {self.failed}{unread}; {self.chunks} chunks written in "
                f"{self.seconds:.1f} s "
                f"({self.documents_per_second:.1f} documents/s, "
                f"{self.chunks_per_second:.1f} chunks/s)")


@dataclass(frozen=True)
class _Record:
    document: Document
    path: Path
    line: int | None


@dataclass
class _Reader:
    """Reads documents from files, collecting problems and rejecting ids seen before."""

    text_field: str = "text"
    id_field: str = "id"
    problems: list[FileProblem] | None = None
    bad_records: int = 0
    seen: dict[str, tuple[Path, int | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for what, name in (("text_field", self.text_field), ("id_field", self.id_field)):
            if not isinstance(name, str) or not name:
                raise InvalidInput(f"{what} must be a field's name, got {shown(name)}")

    def problem(self, path: Path, line: int | None, message: str, *, record: bool) -> None:
        found = FileProblem(path, line, message)
        if self.problems is None:
            raise IngestError(found)
        self.problems.append(found)
        self.bad_records += record

    def read(self, path: Path) -> Iterator[_Record]:
        """The records of a file, or of every supported file under a folder (sorted,
        hidden entries skipped)."""
        if path == STDIN:  # (a pipe: read as it comes, never whole)
            yield from self._unique(STDIN_NAME, self._jsonl(STDIN_NAME, sys.stdin.buffer))
        elif path.is_dir():
            found = False
            for file in _walk(path):
                found = True
                yield from self.read_file(file, file.relative_to(path))
            if not found:  # (else a run that loaded nothing looked like one that was done)
                self.problem(path, None, "no supported file in the folder (expected "
                             f"{', '.join(sorted(SUFFIXES))}; hidden ones are skipped)",
                             record=False)
        elif not path.exists():
            self.problem(path, None, "no such file or folder", record=False)
        else:
            yield from self.read_file(path, Path(path.name))

    def read_file(self, path: Path, name: Path) -> Iterator[_Record]:
        """The records of one file; `name` is its path relative to the folder read (text
        files take their id from it)."""
        suffix = path.suffix.lower()
        if suffix not in SUFFIXES:
            self.problem(path, None, f"unsupported file type {suffix or '(none)'!r}: expected "
                         f"one of {', '.join(sorted(SUFFIXES))}", record=False)
            return
        if path.is_symlink() and not path.exists():  # a link to nothing (a walk lists it)
            self.problem(path, None, f"a symbolic link to {os.readlink(path)!r}, which leads to "
                         "no file (missing, or a loop of links)", record=False)
            return
        if not path.is_file():
            # Reading a FIFO waits for a writer, a device (/dev/zero) never ends: neither is a
            # file of records.
            self.problem(path, None, "not a regular file (a FIFO, device or socket)",
                         record=False)
            return
        try:
            # (a JSONL file's lines are records of their own: each is decoded as it is read)
            bad = None if suffix in JSONL_SUFFIXES else _utf8_problem(path)
        except OSError as exc:
            self.problem(path, None, f"cannot read: {exc.strerror or exc}", record=False)
            return
        if bad is not None:
            self.problem(path, bad[0], bad[1], record=False)
            return
        yield from self._unique(path, self._text(path, name) if suffix in TEXT_SUFFIXES
                                else self._jsonl(path) if suffix in JSONL_SUFFIXES
                                else self._csv(path))

    def _unique(self, path: Path, records: Iterator[_Record]) -> Iterator[_Record]:
        """`records` of `path` whose ids no earlier record of the run had (a repeat is a
        problem naming where the id was first)."""
        try:
            for record in records:
                first = self.seen.get(record.document.id)
                if first is not None:
                    where = f"{first[0]}:{first[1]}" if first[1] is not None else str(first[0])
                    self.problem(path, record.line,
                                 f"duplicate id {shown(record.document.id)} (first in {where})",
                                 record=True)
                    continue
                self.seen[record.document.id] = (record.path, record.line)
                yield record
        except OSError as exc:
            self.problem(path, None, f"cannot read: {exc.strerror or exc}", record=False)

    def _checked(self, path: Path, line: int | None, doc_id: str, text: str,
                 metadata: dict[str, Any]) -> _Record | None:
        what = (f"id {doc_id!r}: " if doc_id else "")
        if "\x00" in text:
            self.problem(path, line, f"{what}text contains a NUL byte", record=True)
        elif "\x00" in doc_id:  # (the driver cannot send it: the database never sees it)
            self.problem(path, line, "id contains a NUL byte", record=True)
        elif not has_text(text):
            self.problem(path, line, f"{what}text is empty", record=True)
        else:
            return _Record(Document(doc_id, text, metadata), path, line)
        return None

    def _text(self, path: Path, name: Path) -> Iterator[_Record]:
        text = path.read_text(encoding="utf-8-sig")
        metadata: dict[str, Any] = {"source": name.as_posix()}
        title = markdown_title(text) if path.suffix.lower() in MARKDOWN_SUFFIXES else None
        if title:
            metadata["title"] = title
        if not text.strip():
            self.problem(path, None, "empty file", record=True)
            return
        # The id is pyembed's to make: a path's name as NFC, the form the rule for ids asks
        # for (a file system may give it decomposed).
        doc_id = unicodedata.normalize("NFC", name.with_suffix("").as_posix())
        record = self._checked(path, None, doc_id, text, metadata)
        if record is not None:
            yield record

    def _jsonl(self, path: Path, stream: BinaryIO | None = None) -> Iterator[_Record]:
        empty = True
        with path.open("rb") if stream is None else nullcontext(stream) as f:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    empty = False
                    self.problem(path, number,
                                 _not_utf8(raw[exc.start], f"{exc.start} of the line"),
                                 record=True)
                    continue
                if not line.strip():
                    continue
                empty = False
                try:
                    obj = read_json(line, "the line")
                except (ValueError, InvalidInput) as exc:
                    self.problem(path, number, f"invalid JSON: {exc}", record=True)
                    continue
                if not isinstance(obj, dict):
                    self.problem(path, number, f"expected a JSON object, got "
                                 f"{type(obj).__name__}", record=True)
                    continue
                record = self._object(path, number, obj)
                if record is not None:
                    yield record
        if empty:
            self.problem(path, None, "empty file", record=False)

    def _object(self, path: Path, line: int, obj: dict[str, Any]) -> _Record | None:
        id_key = self.id_field if self.id_field in obj else "_id" if "_id" in obj else None
        if id_key is None:
            self.problem(path, line, f"no {self.id_field!r} (or '_id') field", record=True)
            return None
        doc_id = obj[id_key]
        if isinstance(doc_id, bool) or not isinstance(doc_id, str | int) or doc_id == "":
            self.problem(path, line, f"{id_key!r} must be a non-empty string or an integer, "
                         f"got {json.dumps(doc_id)[:40]}", record=True)
            return None
        doc_id = str(doc_id)
        text = obj.get(self.text_field)
        if not isinstance(text, str):
            self.problem(path, line, f"id {doc_id!r}: " + (
                f"no {self.text_field!r} field" if text is None
                else f"{self.text_field!r} must be a string"), record=True)
            return None
        nested = obj.get("metadata")
        metadata: dict[str, Any] = dict(nested) if isinstance(nested, dict) else {}
        for key, value in obj.items():
            if key not in (id_key, self.text_field) and not (
                    key == "metadata" and isinstance(value, dict)):
                metadata[key] = value
        title = obj.get("title")
        if isinstance(title, str) and title.strip() and text.strip():
            text = f"{title.strip()}\n\n{text}"  # BEIR: the title is part of the passage
        return self._checked(path, line, doc_id, text, metadata)

    def _csv(self, path: Path) -> Iterator[_Record]:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = _CSV.reader(f)
            try:
                header = next(reader, None)
            except _CSV.Error as exc:
                self.problem(path, 1, f"unreadable header row: {exc}", record=False)
                return
            if header is None:
                self.problem(path, None, "empty file (expected a header row)", record=False)
                return
            header = [h.strip() for h in header]
            missing = [c for c in (self.id_field, self.text_field) if c not in header]
            if missing:
                self.problem(path, 1, f"no {' or '.join(map(repr, missing))} column in the "
                             f"header row (columns: {', '.join(header)})", record=False)
                return
            id_at, text_at = header.index(self.id_field), header.index(self.text_field)
            line, empty = reader.line_num + 1, True
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    if empty:
                        self.problem(path, None, "no records after the header row",
                                     record=False)
                    return
                except _CSV.Error as exc:
                    self.problem(path, line, f"unreadable CSV record: {exc}", record=True)
                    line, empty = reader.line_num + 1, False
                    continue
                start, line = line, reader.line_num + 1
                if not any(cell.strip() for cell in row):
                    continue
                empty = False
                if len(row) != len(header):
                    self.problem(path, start, f"{len(row)} fields where the header has "
                                 f"{len(header)}", record=True)
                    continue
                over = [(h, size) for h, cell in zip(header, row, strict=True)
                        if len(cell) > MAX_FIELD_BYTES // 4
                        and (size := len(cell.encode("utf-8", "surrogatepass"))) > MAX_FIELD_BYTES]
                if over:
                    column, size = over[0]
                    self.problem(path, start, f"field {column!r} is {size:,} bytes, over the "
                                 f"{MAX_FIELD_BYTES:,}-byte bound of a chunk's text",
                                 record=True)
                    continue
                doc_id = row[id_at].strip()
                if not doc_id:
                    self.problem(path, start, f"empty {self.id_field!r}", record=True)
                    continue
                metadata = {h: v for i, (h, v) in enumerate(zip(header, row, strict=True))
                            if i not in (id_at, text_at)}
                record = self._checked(path, start, doc_id, row[text_at], metadata)
                if record is not None:
                    yield record


def _private_csv() -> Any:
    """An instance of the csv parser (_csv) of pyembed's own, without a field size limit. The
    limit (128 KiB unless set) is the module instance's: csv.field_size_limit would change it
    for the whole process, every thread's reader and the user's; and a field over it is
    refused in the middle of its record, whose rest is then read as records of their own.
    Each field is checked against MAX_FIELD_BYTES here instead, whole."""
    spec = importlib.util.find_spec("_csv")
    if spec is None or spec.loader is None:
        raise ConfigError("Python's csv parser (_csv) is missing")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    before = csv.field_size_limit()
    module.field_size_limit(sys.maxsize)
    if module is sys.modules.get("_csv") or csv.field_size_limit() != before:
        csv.field_size_limit(before)  # a parser whose limit is the process's: leave it be
        raise ConfigError("this Python's csv parser keeps one field size limit for the whole "
                          "process: pyembed cannot read CSV fields over it without changing it")
    return module


_CSV = _private_csv()


def read_documents(path: Path, *, text_field: str = "text", id_field: str = "id",
                   problems: list[FileProblem] | None = None) -> Iterator[Document]:
    """The documents in a file, or in the supported files under a folder (recursively).

    `.txt`/`.md`: one document per file, id the path (relative to the folder) without its
    suffix, metadata "source" (that path) and, for Markdown, "title" (the first heading).
    `.jsonl`: one JSON object per line, id from `id_field` (or BEIR's `_id`), text from
    `text_field` (a "title" is put before it), other keys as metadata. `.csv`: a header row
    naming `id_field` and `text_field` columns, other columns as metadata. The path `-`:
    JSON Lines read from standard input (its problems name `<stdin>`). Files are UTF-8
    (a BOM is fine); a JSONL line that is not is a bad record, any other such file a bad file.

    A bad record (invalid JSON or UTF-8, missing or empty id or text, NUL byte, id already read) or
    file (missing, unsupported, not UTF-8, a FIFO or device) is appended to `problems` and skipped; without
    a `problems` list it raises IngestError.
    """
    reader = _Reader(text_field, id_field, problems)  # its arguments checked at the call
    return (record.document for record in reader.read(Path(path)))


def ingest(corpus: Corpus, paths: Path | str | Iterable[Path | str], *, batch_size: int = 64,
           truncate: bool = False, progress: bool = True, console: Console | None = None,
           text_field: str = "text", id_field: str = "id",
           progress_every: float = PROGRESS_EVERY) -> IngestReport:
    """Add the documents of files and folders (see `read_documents`) to `corpus` in
    batches of `batch_size`, skipping unchanged ones; bad records are reported in
    `problems` and the rest still load. Files are read as they are loaded, never whole.

    Each batch is embedded while the one before it is written, on a second connection of
    the same role (when one opens; else each batch is written before the next is embedded),
    and each is written in one transaction. A batch the corpus refuses (InvalidInput) is
    retried one document at a time, so only the refused documents fail. Any other error (the
    embedding service failing, the database going away) stops the run once the batch being
    written is; batches added before it stay, and running again skips them. The error carries
    a note (`stopped_line`) saying how many documents were kept and that a rerun resumes.

    Into a corpus whose key has no vectors yet, the HNSW index is built once, at the end (the
    run's time includes it), instead of each vector inserted into it (`Corpus.bulk_load`).

    `progress` shows on `console` a progress bar if it is a terminal, else a line every
    `progress_every` seconds (documents and chunks so far, both rates, ETA).
    """
    # A batch is held in memory and written in one transaction: bounded as the worker's claim.
    batch_size = count(batch_size, "batch_size", (1, 10000))
    progress_every = number(progress_every, "progress_every", 0.0, unit="seconds")
    if isinstance(paths, str | Path):
        paths = [paths]
    roots = [Path(p) for p in paths]
    problems: list[FileProblem] = []
    reader = _Reader(text_field, id_field, problems)
    totals = {"added": 0, "updated": 0, "skipped": 0, "failed": 0, "chunks": 0}
    start = time.perf_counter()
    console = console or Console(stderr=True)
    estimate = sum(_estimate(p) for p in roots) if progress else 0
    meter: _Meter = (_Meter() if not progress
                     else _Bar(console, estimate, start) if console.is_terminal
                     else _Lines(console, estimate, start, progress_every))

    def advance(n: int) -> None:
        meter.show(_handled(totals), totals["chunks"])

    def embedding(chunks: int) -> None:  # a batch's chunks embedded so far, before its write
        meter.show(_handled(totals), totals["chunks"] + chunks)

    try:
        with meter, corpus.bulk_load(), \
                _Loader(corpus, truncate, totals, problems, advance, embedding) as loader:
            batch: list[_Record] = []
            for root in roots:
                for record in reader.read(root):
                    batch.append(record)
                    if len(batch) >= batch_size:
                        loader.add(batch)
                        batch = []
            if batch:
                loader.add(batch)
            loader.settle()
            totals["failed"] += reader.bad_records
            meter.done(_handled(totals), totals["chunks"])
    except BaseException as exc:  # a provider's rate limit, the database gone, Ctrl-C
        raise stopped(exc, corpus.name, "ingest", stopped_line(totals))  # noqa: B904

    seconds = time.perf_counter() - start
    problems.sort(key=lambda p: (str(p.path), p.line or 0))
    return IngestReport(totals["added"], totals["updated"], totals["skipped"], totals["failed"],
                        problems, totals["chunks"], round(seconds, 3))


def stopped_line(totals: dict[str, int]) -> str:
    """What a run stopped by an error kept, and that running it again resumes: each batch is
    written in a transaction of its own, and a document stored already is skipped as
    unchanged, its provider not called again."""
    kept = totals["added"] + totals["updated"] + totals["skipped"]
    return (f"ingest stopped with {kept} document{'s' if kept != 1 else ''} kept (added "
            f"{totals['added']}, updated {totals['updated']}, unchanged {totals['skipped']}); "
            "running it again resumes: the documents kept are skipped as unchanged")


def _handled(totals: dict[str, int]) -> int:
    return sum(totals[k] for k in ("added", "updated", "skipped", "failed"))


class _Meter:
    """Shows how far an ingest is; this one shows nothing."""

    def __enter__(self) -> _Meter:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def show(self, documents: int, chunks: int) -> None:
        """`documents` handled and `chunks` written so far."""

    def done(self, documents: int, chunks: int) -> None:
        """The run has read everything."""


class _Bar(_Meter):
    """A rich progress bar, for a terminal (it redraws in place)."""

    def __init__(self, console: Console, total: int, start: float) -> None:
        columns = (TextColumn("[progress.description]{task.description}"), BarColumn(),
                   MofNCompleteColumn(), TextColumn("{task.fields[rates]}"),
                   TimeElapsedColumn(), TimeRemainingColumn())
        self.bar = Progress(*columns, console=console, transient=True)
        self.task = self.bar.add_task("documents", total=total or None, rates="")
        self.start = start

    def __enter__(self) -> _Bar:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(None, None, None)

    def show(self, documents: int, chunks: int) -> None:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.update(self.task, completed=documents,
                        rates=f"{documents / elapsed:.1f} documents/s, "
                              f"{chunks / elapsed:.1f} chunks/s")

    def done(self, documents: int, chunks: int) -> None:
        self.show(documents, chunks)
        self.bar.update(self.task, total=documents)


class _Lines(_Meter):
    """A line every `every` seconds, for a pipe or a log file (a bar there prints nothing
    until the end)."""

    def __init__(self, console: Console, total: int, start: float, every: float) -> None:
        self.console = console
        self.total = total
        self.start = self.last = start
        self.every = every

    def show(self, documents: int, chunks: int) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self.console.print(progress_line(documents, chunks, self.total, now - self.start),
                               soft_wrap=True, highlight=False, markup=False)


def progress_line(documents: int, chunks: int, total: int, seconds: float) -> str:
    """"ingest: 1200/5183 documents (23%), 4100 chunks; 12.1 documents/s, 41.3 chunks/s;
    ETA 5m29s" (the total and ETA when the number of records is known)."""
    rate = documents / seconds if seconds > 0 else 0.0
    done = (f"{documents}/{total} documents ({100 * documents // total}%)"
            if total and documents <= total else f"{documents} documents")
    line = (f"ingest: {done}, {chunks} chunks; {rate:.1f} documents/s, "
            f"{chunks / seconds if seconds > 0 else 0.0:.1f} chunks/s")
    if total and documents <= total and rate > 0:
        left = round((total - documents) / rate)
        line += f"; ETA {left // 60}m{left % 60:02d}s"
    return line


class _Loader:
    """Adds batches to a corpus, writing each on a second connection (`db.twin`) in a thread
    while the caller embeds the next: one batch in the writing at a time, whose results are
    counted when the next is handed over (`add`) or at the end (`settle`)."""

    def __init__(self, corpus: Corpus, truncate: bool, totals: dict[str, int],
                 problems: list[FileProblem], advance: Callable[[int], None],
                 embedding: Callable[[int], None]) -> None:
        self.corpus = corpus
        self.truncate = truncate
        self.totals = totals
        self.problems = problems
        self.advance = advance
        self.embedding = embedding
        self.conn = twin(corpus.client._conn)
        self.pool = (ThreadPoolExecutor(1, thread_name_prefix="pyembed-ingest-writer")
                     if self.conn is not None else None)
        self.writing: tuple[Future[AddReport], list[_Record]] | None = None

    def __enter__(self) -> _Loader:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        """Wait for the batch being written (a run stopped by an error keeps it, and counts
        it), then close."""
        try:
            if self.writing is not None and exc is not None:
                failed = self.writing[0].exception()
                if failed is not None:  # (its first line: the error's is one line too)
                    said = str(failed).strip().splitlines() or [type(failed).__name__]
                    exc.add_note(f"the batch being written then failed too: {said[0]}")
                else:
                    _count(self.totals, self.writing[0].result())
        finally:
            if self.pool is not None:
                self.pool.shutdown()
            if self.conn is not None:
                self.conn.close()

    def add(self, batch: list[_Record]) -> None:
        """Embed `batch` (here), then write it (on the second connection, once the batch
        before is written)."""
        try:
            prepared = self.corpus.prepare([r.document for r in batch], truncate=self.truncate,
                                           embedded=self.embedding)
        except RefusedDocuments as exc:  # the database's rules, asked before any embedding
            rest = [r for r in batch if r.document.id not in exc.problems]
            for record in batch:
                if record.document.id in exc.problems:
                    _failed(self.totals, self.problems, record, exc.problems[record.document.id])
            self.advance(len(batch) - len(rest))
            if rest:
                self.add(rest)
            return
        except InvalidInput:  # (a text over the model's limit): find which, one by one
            self.settle()
            _add(self.corpus, batch, self.truncate, self.totals, self.problems, self.advance)
            return
        self.settle()
        if self.pool is None:
            self.writing = (_done(self.corpus.write, prepared), batch)
        else:
            self.writing = (self.pool.submit(self.corpus.write, prepared, self.conn), batch)

    def settle(self) -> None:
        """Wait for the batch being written and count it (a refused one is added again, one
        document at a time)."""
        if self.writing is None:
            return
        future, batch = self.writing
        self.writing = None
        try:
            report = future.result()
        except (InvalidInput, ModelMismatch):  # refused, or a migration step came between
            _add(self.corpus, batch, self.truncate, self.totals, self.problems, self.advance)
            return
        if report.chunks:
            self.corpus.client.wrote()
        _count(self.totals, report)
        self.advance(len(batch))


def _done(write: Callable[[PreparedAdd], AddReport], prepared: PreparedAdd) -> Future[AddReport]:
    """`write(prepared)` done now, as a settled Future."""
    future: Future[AddReport] = Future()
    try:
        future.set_result(write(prepared))
    except Exception as exc:
        future.set_exception(exc)
    return future


def _count(totals: dict[str, int], report: AddReport) -> None:
    totals["added"] += report.added
    totals["updated"] += report.updated
    totals["skipped"] += report.skipped
    totals["chunks"] += report.chunks


def _add(corpus: Corpus, batch: list[_Record], truncate: bool, totals: dict[str, int],
         problems: list[FileProblem], advance: Callable[[int], None]) -> None:
    """Add one batch; if the corpus refuses it, add its documents one by one."""
    try:
        report = corpus.add([r.document for r in batch], truncate=truncate)
    except InvalidInput as exc:
        if len(batch) > 1:
            for record in batch:
                _add(corpus, [record], truncate, totals, problems, advance)
        else:  # (the rule for ids names the id in its words)
            record = batch[0]
            _failed(totals, problems, record, str(exc) if isinstance(exc, RefusedDocuments)
                    else f"id {shown(record.document.id)}: {exc}")
            advance(1)
        return
    _count(totals, report)
    advance(len(batch))


def _failed(totals: dict[str, int], problems: list[FileProblem], record: _Record,
            message: str) -> None:
    """Count `record` as failed, for `message` at its file and line."""
    problems.append(FileProblem(record.path, record.line, message))
    totals["failed"] += 1


def markdown_title(text: str) -> str | None:
    """The text of the first ATX heading (`# Title`) outside fenced code, if any."""
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := _HEADING.match(line)):
            return m.group(1).strip() or None
    return None


def _walk(root: Path) -> Iterator[Path]:
    """Supported files under `root`, sorted, skipping hidden files and folders."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in SUFFIXES:
                yield Path(folder) / name


def _not_utf8(byte: int, offset: str) -> str:
    """The problem of a byte that is not UTF-8, at `offset` (in the file, or of a line)."""
    return f"not UTF-8: byte 0x{byte:02x} at offset {offset} (convert the file to UTF-8)"


def _utf8_problem(path: Path) -> tuple[int, str] | None:
    """(line, message) for the first byte that is not UTF-8, or None if the file is."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                data, at = exc.object, exc.start  # data: bytes held over + this block
                line += data[:at].count(b"\n")
                return line, _not_utf8(data[at], str(offset - (len(data) - len(block)) + at))
            line += block.count(b"\n")
            offset += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return line, "not UTF-8: the file ends in the middle of a character"
    return None


def _estimate(path: Path) -> int:
    """A quick count of the records under `path`, for the progress bar."""
    if path == STDIN:
        return 0  # (unknown: the bar counts without a total)
    files = _walk(path) if path.is_dir() else [path] if path.is_file() else []
    total = 0
    for file in files:
        if not file.is_file():
            continue
        suffix = file.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            total += 1
            continue
        try:
            with file.open("rb") as f:
                lines = sum(1 for raw in f if raw.strip())
        except OSError:
            continue
        total += max(lines - (suffix in CSV_SUFFIXES), 0) if suffix in SUFFIXES else 0
    return total


__all__ = ["SUFFIXES", "FileProblem", "IngestError", "IngestReport", "ingest",
           "markdown_title", "progress_line", "read_documents"]
