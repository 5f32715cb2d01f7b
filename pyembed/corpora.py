"""The corpus catalogue and document storage: corpora by name (through the database's one
lookup, pyembed.lookup_corpus), registered models, and documents with their chunks."""

from __future__ import annotations

import dataclasses
import json
from array import array
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from .dbcall import integer, translated
from .errors import InvalidInput, UnknownModel, shown
from .models import MODEL_COLUMNS, MODEL_FIELDS, ModelSpec, spec_from_row
from .sqlexec import Executor, executor
from .text import check_document_id, check_text, document_hash, sha256, text_list
from .vectors import ROW_OVERHEAD, as_unit_vectors, copy_vectors, transition_tables_in_memory

if TYPE_CHECKING:
    import psycopg


@dataclass(frozen=True)
class CorpusInfo:
    corpus_id: int
    name: str
    model_key: str
    dimensions: int
    target_model_key: str | None
    migration_step: str
    traffic_share: int
    chunk_tokens: int
    chunk_overlap: int
    description: str
    storage: str = "vector"


@dataclass
class ChunkRow:
    """A chunk to store with its vector (already made by the model named at write time)."""

    document_id: str
    chunk_index: int
    content: str
    embedding: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)


class Spans(Sequence[str]):
    """A document's chunks as where they lie in its text (chunking.iter_spans): each is sliced
    from the text when it is read, so that a long document's chunks take two numbers each
    until they are written."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.bounds = array("q")
        """Each chunk's start and end in `text`, one after the other."""

    def append(self, start: int, end: int) -> None:
        self.bounds.extend((start, end))

    def __len__(self) -> int:
        return len(self.bounds) // 2

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if not -n <= index < n:
            raise IndexError("chunk index out of range")
        index %= n
        return self.text[self.bounds[2 * index]:self.bounds[2 * index + 1]]

    def __iter__(self) -> Iterator[str]:
        bounds = iter(self.bounds)
        for start, end in zip(bounds, bounds, strict=True):
            yield self.text[start:end]


@dataclass(frozen=True)
class DocumentChunks:
    """A document to write: its id, the hash of its text and metadata (text.document_hash), its
    metadata, and its chunks' texts in order (a list, or `Spans`), numbered from 0 unless
    `indexes` numbers them."""

    document_id: str
    content_hash: bytes
    metadata: dict[str, Any]
    chunks: Sequence[str]
    indexes: Sequence[int] | None = None
    metadata_json: str = ""
    """`metadata` as the JSON text its write sends: made once, here unless the caller made it
    for its lookup (Corpus.prepare)."""

    def __post_init__(self) -> None:
        if not self.metadata_json:
            object.__setattr__(self, "metadata_json", json.dumps(self.metadata, default=str))


_INFO = """c.corpus_id, c.name, c.model_key, m.dimensions, c.target_model_key, c.migration_step,
       c.traffic_share, c.chunk_tokens, c.chunk_overlap, c.description, c.storage"""


def model_spec(db: psycopg.Connection[Any] | Executor, key: str) -> ModelSpec:
    """The registered model with this key, as the database knows it."""
    if not isinstance(key, str):  # (the database would say "operator does not exist")
        raise InvalidInput(f"a model key is a text like 'provider/model@version:dims', not "
                           f"{type(key).__name__} {key!r}")
    rows = executor(db).rows(f"SELECT {MODEL_COLUMNS} FROM pyembed.models WHERE model_key = $1",
                             [key], ["text"])
    if not rows:
        raise UnknownModel(f"unknown model key {shown(key)}",
                           hint="`pyembed models` lists the known keys")
    return spec_from_row(dict(zip(MODEL_FIELDS, rows[0], strict=True)))


def corpus_info(conn: psycopg.Connection[Any], name: str) -> CorpusInfo:
    """The caller's tenant's corpus `name` (UnknownCorpus, PE002, otherwise)."""
    with translated():
        row = conn.execute(f"SELECT {_INFO} FROM pyembed.lookup_corpus(%s) c "
                           "JOIN pyembed.models m USING (model_key)", (name,)).fetchone()
    assert row is not None  # lookup_corpus raises instead
    return CorpusInfo(*row)


def list_corpora(conn: psycopg.Connection[Any]) -> list[CorpusInfo]:
    """The session's tenant's corpora (stated here too: a superuser is not bound by row security)."""
    with translated():  # (a login the database refuses: PE014)
        rows = conn.execute(f"SELECT {_INFO} FROM pyembed.corpora c JOIN pyembed.models m "
                            "USING (model_key) WHERE c.corpus_id = ANY (pyembed.visible_corpora()) "
                            "ORDER BY c.name").fetchall()
    return [CorpusInfo(*r) for r in rows]


def create_corpus(conn: psycopg.Connection[Any], name: str, model_key: str, description: str = "",
                  chunk_tokens: int = 200, chunk_overlap: int = 40,
                  storage: str = "vector", *, exist_ok: bool = False) -> CorpusInfo:
    """A new corpus pinned to `model_key`; `storage` is how its HNSW index holds the vectors:
    vector (float32), halfvec (float16) or binary (sign bits, rescored exactly). With
    `exist_ok`, the corpus of that name if it has the same key (else ModelMismatch) and
    chunking (else InvalidInput)."""
    with translated(), conn.transaction():
        conn.execute("SELECT pyembed.create_corpus(%s, %s, %s, %s, %s, %s, %s)",
                     (name, model_key, description, integer(chunk_tokens, "chunk_tokens", conn),
                      integer(chunk_overlap, "chunk_overlap", conn), storage, exist_ok))
    return corpus_info(conn, name)


def drop_corpus(conn: psycopg.Connection[Any], name: str) -> None:
    """Drop the corpus with every row written for it; UnknownCorpus for a name the caller's
    tenant has no corpus of, as every other call by name."""
    with translated(), conn.transaction():
        conn.execute("SELECT pyembed.drop_corpus(%s)", (name,))


def delete_documents(conn: psycopg.Connection[Any], name: str,
                     document_ids: Sequence[str]) -> int:
    """Delete these documents of the corpus (their chunks, vectors, keyword postings and queued
    work with them) through pyembed.delete_documents, the application role's one way to delete
    (it holds no DELETE: 080-grants.sql says why); returns how many it deleted (an id the corpus
    has none of is skipped). UnknownCorpus as every call by name."""
    ids = [check_document_id(d) for d in text_list(document_ids, "document_ids")]
    with translated(), conn.transaction():
        row = conn.execute("SELECT pyembed.delete_documents(%s, %s::text[])",
                           (name, ids)).fetchone()
    return int(row[0]) if row else 0


class RefusedDocuments(InvalidInput):
    """Documents a write would refuse by the database's rules (pyembed._document_problems: the
    rule for ids, which the documents table's trigger asks at every write, and the tables'
    bounds on metadata and a chunk's text): `problems` holds each one's, by id, in the
    database's words; the message is the first one's."""

    def __init__(self, problems: Mapping[str, str]) -> None:
        super().__init__(next(iter(problems.values())))
        self.problems = dict(problems)


def document_hashes(conn: psycopg.Connection[Any], corpus_id: int,
                    documents: Mapping[str, str | None]) -> tuple[dict[str, bytes], int, int]:
    """The stored documents' content hashes, by id, the most bytes a chunk's text may have
    (the chunks table's bound: `chunks_refused` once the changed documents are cut) and the
    most chunks one document may have (the corpus's max_document_chunks: `too_big`);
    RefusedDocuments if the database's rules refuse one of `documents` (id: its metadata as
    JSON text, or None). Asked in the one statement a write makes before its documents are
    embedded, so that no provider is paid for a document the write would refuse, and the rules
    are the database's alone."""
    # A lookup by primary key for each id, whatever the planner makes of the array's length.
    rows = conn.execute(
        "SELECT i.id, (SELECT d.content_hash FROM pyembed.documents d "
        "WHERE d.corpus_id = %(c)s AND d.document_id = i.id), p.problem, "
        "(b.bounds ->> 'chunks_content_bound')::bigint, "
        "(SELECT c.max_document_chunks FROM pyembed.corpora c WHERE c.corpus_id = %(c)s) "
        "FROM unnest(%(ids)s::text[]) WITH ORDINALITY AS i(id, n) "
        "LEFT JOIN pyembed._document_problems(%(ids)s::text[], %(meta)s::text[]::jsonb[], "
        "NULL) p ON p.id = i.id CROSS JOIN pyembed._write_bounds() AS b(bounds) ORDER BY i.n",
        {"c": corpus_id, "ids": list(documents), "meta": list(documents.values())}).fetchall()
    problems = {i: p for i, _, p, _, _ in rows if p is not None}
    if problems:
        raise RefusedDocuments(problems)
    return ({i: bytes(h) for i, h, _, _, _ in rows if h is not None},
            rows[0][3] if rows else 0, rows[0][4] if rows else 0)


def too_big(conn: psycopg.Connection[Any], corpus_id: int,
            sizes: Mapping[str, tuple[int, int]]) -> None:
    """RefusedDocuments for the documents of `sizes` (id: its chunks and its text's bytes as
    UTF-8) past the corpus's bound on one document, in the database's words and with its fix
    (pyembed._document_size_problem, which the chunks table's trigger asks at the write)."""
    rows = conn.execute(
        "SELECT s.id, p.problem || ' (hint: ' || p.hint || ')' "
        "FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) AS s(id, chunks, bytes) "
        "CROSS JOIN LATERAL pyembed._document_size_problem(%s, s.id, s.chunks, s.bytes) p "
        "WHERE p.problem IS NOT NULL",
        (list(sizes), [c for c, _ in sizes.values()], [b for _, b in sizes.values()],
         corpus_id)).fetchall()
    if rows:
        raise RefusedDocuments(dict(rows))


def chunks_refused(conn: psycopg.Connection[Any], longest: Mapping[str, int]) -> None:
    """RefusedDocuments for the documents whose longest chunk (`longest`: its bytes as UTF-8,
    by id) the chunks table refuses, in the database's words (pyembed._document_problems)."""
    rows = conn.execute("SELECT p.id, p.problem FROM pyembed._document_problems("
                        "%s::text[], NULL, %s::bigint[]) p",
                        (list(longest), list(longest.values()))).fetchall()
    if rows:
        raise RefusedDocuments(dict(rows))


@dataclass(frozen=True)
class Written:
    """What a write of documents did, as the database found them when it wrote: documents
    inserted, replaced (another text or metadata was stored) and left alone (the same was
    stored already: another writer stored it since the caller looked), and the chunk ids
    written, in the order of the rows written."""

    added: int
    updated: int
    unchanged: int
    ids: list[int]


def write_chunks(conn: psycopg.Connection[Any], corpus: CorpusInfo, rows: Sequence[ChunkRow],
                 model_key: str, *, normalized: bool = True,
                 texts: Mapping[str, str] | None = None,
                 also: Mapping[str, np.ndarray] | None = None) -> list[int]:
    """Store documents (all their chunks, replacing older versions) and the chunks' vectors in
    one transaction; returns the chunk ids. `texts` holds each document's whole text, which
    with its metadata says whether it is unchanged (text.document_hash); a document missing
    there is taken to be its chunks' texts joined. `also` holds the same chunks' vectors for
    other keys (a migration's target key: dual write).

    The database checks the model key, dimensions and norms; a refused write stores nothing.
    """
    return write_documents(conn, corpus, rows, model_key, normalized=normalized, texts=texts,
                           also=also).ids


def write_documents(conn: psycopg.Connection[Any], corpus: CorpusInfo, rows: Sequence[ChunkRow],
                    model_key: str, *, normalized: bool = True,
                    texts: Mapping[str, str] | None = None,
                    also: Mapping[str, np.ndarray] | None = None,
                    only_changed: bool = False) -> Written:
    """As write_chunks, and says what the database did. With `only_changed`, a document whose
    stored text and metadata are already these (a concurrent writer stored them after the
    caller looked) is left alone, its chunks and vectors unwritten, and counted unchanged."""
    if not rows:
        return Written(0, 0, 0, [])
    vectors = np.stack([np.asarray(r.embedding) for r in rows])
    groups: dict[str, list[int]] = {}
    for n, r in enumerate(rows):
        groups.setdefault(r.document_id, []).append(n)
    order = [n for members in groups.values() for n in members]  # rows by document
    documents = [DocumentChunks(
        d, document_hash((texts or {}).get(d) or "".join(rows[n].content for n in members),
                         rows[members[0]].metadata),
        rows[members[0]].metadata, [rows[n].content for n in members],
        [rows[n].chunk_index for n in members]) for d, members in groups.items()]
    written, stored = _write(conn, corpus, documents, model_key, [vectors[order]],
                             normalized=normalized,
                             also={k: [np.asarray(v)[order]] for k, v in (also or {}).items()},
                             only_changed=only_changed)
    # The ids in the order of the rows given (those of documents left alone are not written).
    at = {n: i for n, i in zip((n for n in order if rows[n].document_id in stored),
                               written.ids, strict=True)}
    return dataclasses.replace(written, ids=[at[n] for n in sorted(at)])


_PIECE = 1 << 20
"""Characters of a document's text encoded at a time."""
WRITE_LOCK_WAIT = "60s"
"""How long a write waits for a document another session holds (an application's transaction
left open on it) before it is Busy, unless the session has a lock_timeout of its own: far more
than another pyembed writer's transaction holds one."""
WRITE_ROWS = 1_000
"""Vectors a write COPYs at a time: its vectors are taken from the caller's blocks this many
rows at a time."""


def write_prepared(conn: psycopg.Connection[Any], corpus: CorpusInfo,
                   documents: Sequence[DocumentChunks], model_key: str,
                   vectors: Sequence[np.ndarray], *, normalized: bool = True,
                   also: Mapping[str, Sequence[np.ndarray]] | None = None,
                   only_changed: bool = False) -> Written:
    """Store documents (all their chunks, replacing older versions) and the chunks' vectors in
    one transaction, as write_documents does. `vectors` is the chunks' vectors in the
    documents' order, as blocks of rows (each as the embedder made it, not copied into one
    array); `also` the same for other keys."""
    return _write(conn, corpus, documents, model_key, vectors, normalized=normalized,
                  also=also, only_changed=only_changed)[0]


def _write(conn: psycopg.Connection[Any], corpus: CorpusInfo,
           documents: Sequence[DocumentChunks], model_key: str, vectors: Sequence[np.ndarray],
           *, normalized: bool, also: Mapping[str, Sequence[np.ndarray]] | None,
           only_changed: bool) -> tuple[Written, set[str]]:
    total = sum(len(d.chunks) for d in documents)
    if not total:
        return Written(0, 0, 0, []), set()
    for key, blocks in {model_key: vectors, **(also or {})}.items():
        if sum(len(b) for b in blocks) != total:
            raise InvalidInput(f"{total} chunks and {sum(len(b) for b in blocks)} vectors for "
                               f"{key}: give one per chunk")
    for d in documents:
        for n, chunk in enumerate(d.chunks):
            check_text(chunk, f"chunk {d.document_id}#{_index(d, n)}")
    # Checked before anything is written; float32 rows already unit are not copied.
    dims = len(vectors[0][0])
    vectors = [as_unit_vectors(b, dims, normalize=normalized) for b in vectors]
    also = {k: [as_unit_vectors(b, len(b[0]), normalize=normalized) for b in blocks]
            for k, blocks in (also or {}).items()}
    from psycopg.pq import TransactionStatus  # (psycopg: not in the server's PL/Python)

    nested = conn.info.transaction_status != TransactionStatus.IDLE
    with translated(), conn.transaction(), conn.cursor() as cur, _lock_wait_bounded(cur, nested):
        cur.execute(
            """INSERT INTO pyembed.documents (corpus_id, document_id, content_hash, metadata)
               SELECT %s, d, h, m::jsonb FROM unnest(%s::text[], %s::bytea[], %s::text[]) AS t(d, h, m)
               ON CONFLICT (corpus_id, document_id) DO UPDATE
                 SET content_hash = EXCLUDED.content_hash, metadata = EXCLUDED.metadata
                 WHERE NOT %s OR documents.content_hash IS DISTINCT FROM EXCLUDED.content_hash
               RETURNING document_id, xmax = 0 AS inserted""",
            (corpus.corpus_id, [d.document_id for d in documents],
             [d.content_hash for d in documents],
             [d.metadata_json for d in documents], only_changed))
        stored = dict(cur.fetchall())
        # (The row of a document left alone is not returned: the one stored is the same.)
        unchanged = len(documents) - len(stored)
        if not stored:
            return Written(0, 0, unchanged, []), set()
        # A stored document that now has fewer chunks loses the rest (new ones have none).
        replaced = [d for d in documents if d.document_id in stored and not stored[d.document_id]]
        if replaced:
            cur.execute("SELECT pyembed.delete_chunks(%s, %s::text[], %s::integer[])",
                        (corpus.name, [d.document_id for d in replaced],
                         [len(d.chunks) for d in replaced]))
        kept = [d.document_id in stored for d in documents]
        ids, replace = _write_chunks(cur, corpus,
                                     [d for d, k in zip(documents, kept, strict=True) if k])
        # The vectors, COPY'd WRITE_ROWS at a time from the blocks given, each COPY with its
        # chunks' text hashes (sliced from the chunks again, not kept from the insert).
        for key, blocks in {model_key: vectors, **also}.items():
            hashes = (sha256(chunk) for d, k in zip(documents, kept, strict=True) if k
                      for chunk in d.chunks)
            at = 0
            for part in _kept_rows(blocks, [len(d.chunks) for d in documents], kept):
                copy_vectors(cur, corpus.corpus_id, ids[at:at + len(part)].tolist(),
                             key, part, list(islice(hashes, len(part))), replace=replace)
                at += len(part)
    added = sum(1 for inserted in stored.values() if inserted)
    return Written(added, len(stored) - added, unchanged, ids.tolist()), set(stored)


@contextmanager
def _lock_wait_bounded(cur: psycopg.Cursor[Any], nested: bool) -> Iterator[None]:
    """Inside a write's transaction: its lock waits bounded by WRITE_LOCK_WAIT where the session
    sets none (a document another session holds made it wait, silently, for ever), and the
    caller's own transaction, if the write is nested in one, given its setting back after."""
    row = cur.execute("SELECT current_setting('lock_timeout'), set_config('lock_timeout', %s, "
                      "true) WHERE current_setting('lock_timeout') = '0'",
                      (WRITE_LOCK_WAIT,)).fetchone()
    yield  # (an error rolls the setting back with the write's savepoint)
    if row is not None and nested:
        cur.execute("SELECT set_config('lock_timeout', %s, true)", (row[0],))


def _index(document: DocumentChunks, n: int) -> int:
    return document.indexes[n] if document.indexes is not None else n


def _write_chunks(cur: psycopg.Cursor[Any], corpus: CorpusInfo,
                  documents: Sequence[DocumentChunks]) -> tuple[np.ndarray, bool]:
    """Insert (or update) the documents' chunks: their ids, in order, and whether any was
    there before (updated, not inserted). One statement for them all: the statement-level
    triggers (queue, keyword index, which indexes each document it meets whole) then run once
    per write, not once per chunk or part. The chunks' texts are sent as one UTF-8 value (a
    document's text, or its chunks' texts one after another) that the statement slices: a
    long document's chunks are never all held as strings, nor sent as overlapping copies."""
    blob = bytearray()
    starts: list[int] = []
    lengths: list[int] = []
    for d in documents:
        if isinstance(d.chunks, Spans):
            at = len(blob)
            for piece in range(0, len(d.chunks.text), _PIECE):
                blob += d.chunks.text[piece:piece + _PIECE].encode("utf-8")
            first, end = _utf8_bounds(d.chunks)
            starts += (first + (at + 1)).tolist()  # (1-based)
            lengths += (end - first).tolist()
        else:
            for chunk in d.chunks:
                starts.append(len(blob) + 1)
                blob += chunk.encode("utf-8")
                lengths.append(len(blob) + 1 - starts[-1])
    numbers = [n for n, d in enumerate(documents, start=1) for _ in range(len(d.chunks))]
    metadata = [d.metadata_json for d in documents]
    extra = [len(d.document_id.encode()) + len(m) + ROW_OVERHEAD
             for d, m in zip(documents, metadata, strict=True)]
    ids = np.empty(len(starts), dtype=np.int64)
    replace = False
    with transition_tables_in_memory(cur, (size + extra[n - 1] for n, size
                                           in zip(numbers, lengths, strict=True))):
        cur.execute(
            """WITH given AS MATERIALIZED (
                 SELECT t.n, t.i, t.s, t.l, t.p
                   FROM unnest(%(n)s::int[], %(i)s::int[], %(s)s::int[], %(l)s::int[])
                        WITH ORDINALITY AS t(n, i, s, l, p)
               ), written AS (
                 INSERT INTO pyembed.chunks (corpus_id, document_id, chunk_index, content,
                                             metadata)
                 SELECT %(corpus)s, (%(d)s::text[])[g.n], g.i,
                        convert_from(substring(%(texts)s::bytea FROM g.s FOR g.l), 'UTF8'),
                        (%(m)s::text[])[g.n]::jsonb
                   FROM given g
                 ON CONFLICT (corpus_id, document_id, chunk_index) DO UPDATE
                   SET content = EXCLUDED.content, metadata = EXCLUDED.metadata
                 RETURNING document_id, chunk_index, chunk_id, xmax = 0 AS inserted)
               SELECT w.chunk_id, w.inserted
                 FROM written w
                 JOIN given g ON (%(d)s::text[])[g.n] = w.document_id AND g.i = w.chunk_index
                ORDER BY g.p""",
            {"corpus": corpus.corpus_id, "d": [d.document_id for d in documents],
             "m": metadata, "n": numbers, "s": starts, "l": lengths, "texts": blob,
             "i": [_index(d, n) for d in documents for n in range(len(d.chunks))]})
        del blob, starts, numbers
        for row, (chunk_id, inserted) in enumerate(cur):
            ids[row] = chunk_id
            replace = replace or not inserted
    return ids, replace


def _utf8_bounds(spans: Spans) -> tuple[np.ndarray, np.ndarray]:
    """Where each of the spans starts and ends in its text's UTF-8 bytes."""
    bounds = np.frombuffer(spans.bounds, dtype=np.int64).reshape(-1, 2)
    if spans.text.isascii():
        return bounds[:, 0], bounds[:, 1]
    points = np.unique(bounds)
    at = np.empty_like(points)
    done = written = 0
    for k, point in enumerate(points.tolist()):
        written += len(spans.text[done:point].encode("utf-8"))
        done = point
        at[k] = written
    return at[np.searchsorted(points, bounds[:, 0])], at[np.searchsorted(points, bounds[:, 1])]


def _kept_rows(blocks: Sequence[np.ndarray], counts: Sequence[int],
               kept: Sequence[bool]) -> Iterator[np.ndarray]:
    """The rows of `blocks` (the chunks' vectors, `counts[i]` of them for document i, in
    order) of the documents `kept`, in parts of at most WRITE_ROWS rows."""
    owner = iter(np.repeat(np.asarray(kept, dtype=bool), counts))
    for block in blocks:
        mask = np.fromiter(owner, dtype=bool, count=len(block))
        rows = block if mask.all() else block[mask]
        for start in range(0, len(rows), WRITE_ROWS):
            yield rows[start:start + WRITE_ROWS]