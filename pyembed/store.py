"""Guarded storage and search: documents, chunks and vectors through psycopg 3 and pgvector."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from pgvector import Vector
from psycopg import sql
from psycopg.rows import dict_row

from .db import translated
from .errors import InvalidInput, InvalidVector, UnknownCorpus, UnknownModel
from .models import MODEL_COLUMNS, ModelSpec, spec_from_row
from .vector_copy import COLUMNS, copy_data


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


@dataclass(frozen=True)
class Hit:
    """One search result: which document and chunk, how close, and which model served it."""

    document_id: str
    chunk_id: int
    chunk_index: int
    content: str
    metadata: dict[str, Any]
    score: float
    model_key: str


@dataclass
class ChunkRow:
    """A chunk to store with its vector (already made by the model named at write time)."""

    document_id: str
    chunk_index: int
    content: str
    embedding: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)


def check_text(text: str, what: str = "text") -> str:
    """Reject text that cannot be stored: empty, whitespace-only or containing NUL."""
    if not isinstance(text, str):
        raise InvalidInput(f"{what} must be a string, got {type(text).__name__}")
    if "\x00" in text:
        raise InvalidInput(f"{what} contains a NUL byte (\\x00), which PostgreSQL cannot store")
    if not text.strip():
        raise InvalidInput(f"{what} is empty or only whitespace")
    return text


def as_unit_vectors(vectors: np.ndarray | Sequence[Sequence[float]], dims: int,
                    normalize: bool = True) -> np.ndarray:
    """float32 rows checked for shape, NaN/Inf and zero; unit-normalised when asked. float32
    rows already unit to within 1e-5 (what their float32 sums of squares can tell; the database
    allows 1e-3) are returned as they are, not copied: checking 5,000 384-d rows then takes
    ~0.7 ms, where scaling them in float64 took ~31."""
    arr = np.asarray(vectors)
    if arr.dtype != np.float32:
        arr = arr.astype(np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dims:
        raise InvalidVector(f"wrong dimensions: expected {dims}, got {arr.shape[-1] if arr.ndim else 0}")
    squares = np.einsum("ij,ij->i", arr, arr).astype(np.float64)
    # NaN and Inf make their row's sum NaN or Inf; a float32 sum may also overflow or lose
    # precision: such rows are summed again in float64.
    again = ~((squares > 1e-20) & (squares < 1e20))
    if again.any():
        squares[again] = np.einsum("ij,ij->i", arr[again], arr[again], dtype=np.float64)
    if not np.isfinite(squares).all():
        raise InvalidVector("vector contains NaN or Inf")
    if (squares == 0).any():
        raise InvalidVector(f"zero vector at row {int(np.argmin(squares))}")
    norms = np.sqrt(squares)
    if normalize and (np.abs(norms - 1) > 1e-5).any():
        arr = arr / norms[:, None]
    return arr.astype(np.float32, copy=False)


def model_spec(conn: psycopg.Connection[Any], key: str) -> ModelSpec:
    """The registered model with this key, as the database knows it."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(f"SELECT {MODEL_COLUMNS} FROM pyembed.models WHERE model_key = %s",
                          (key,)).fetchone()
    if row is None:
        raise UnknownModel(f"unknown model key {key!r}: `pyembed models` lists the known keys")
    return spec_from_row(row)


CORPORA = """SELECT c.corpus_id, c.name, c.model_key, m.dimensions, c.target_model_key,
       c.migration_step, c.traffic_share, c.chunk_tokens, c.chunk_overlap, c.description
  FROM pyembed.corpora c JOIN pyembed.models m USING (model_key)
 WHERE coalesce(c.tenant_id, 0) = coalesce((SELECT pyembed.current_tenant()), 0)"""
"""The session's tenant's corpora (stated here too: a superuser is not bound by row security)."""


def corpus_info(conn: psycopg.Connection[Any], name: str) -> CorpusInfo:
    row = conn.execute(CORPORA + " AND c.name = %s", (name,)).fetchone()
    if row is None:
        raise UnknownCorpus(f"unknown corpus {name!r}: `pyembed corpus list` shows the corpora")
    return CorpusInfo(*row)


def list_corpora(conn: psycopg.Connection[Any]) -> list[CorpusInfo]:
    rows = conn.execute(CORPORA + " ORDER BY c.name").fetchall()
    return [CorpusInfo(*r) for r in rows]


def create_corpus(conn: psycopg.Connection[Any], name: str, model_key: str, description: str = "",
                  chunk_tokens: int = 200, chunk_overlap: int = 40) -> CorpusInfo:
    with translated(), conn.transaction():
        conn.execute("SELECT pyembed.create_corpus(%s, %s, %s, %s, %s)",
                     (name, model_key, description, chunk_tokens, chunk_overlap))
    return corpus_info(conn, name)


def drop_corpus(conn: psycopg.Connection[Any], name: str) -> bool:
    with translated(), conn.transaction():
        row = conn.execute("SELECT pyembed.drop_corpus(%s)", (name,)).fetchone()
    return bool(row and row[0])


def sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def document_hash(text: str, metadata: Mapping[str, Any]) -> bytes:
    """What makes a document unchanged: its text and its metadata."""
    return sha256(text + "\x00" + json.dumps(metadata, sort_keys=True, default=str))


def document_hashes(conn: psycopg.Connection[Any], corpus_id: int,
                    document_ids: Sequence[str]) -> dict[str, bytes]:
    rows = conn.execute("SELECT document_id, content_hash FROM pyembed.documents "
                        "WHERE corpus_id = %s AND document_id = ANY(%s)",
                        (corpus_id, list(document_ids))).fetchall()
    return {d: bytes(h) for d, h in rows}


def write_chunks(conn: psycopg.Connection[Any], corpus: CorpusInfo, rows: Sequence[ChunkRow],
                 model_key: str, *, normalized: bool = True,
                 doc_hashes: Mapping[str, bytes] | None = None,
                 also: Mapping[str, np.ndarray] | None = None) -> list[int]:
    """Store documents (all their chunks, replacing older versions) and the chunks' vectors in
    one transaction, vectors by binary COPY into the corpus's partition; returns the chunk
    ids. `also` holds the same chunks' vectors for other keys (a migration's target key: dual
    write).

    The database checks the model key, dimensions and norms; a refused write stores nothing.
    """
    if not rows:
        return []
    for r in rows:
        check_text(r.content, f"chunk {r.document_id}#{r.chunk_index}")
    vectors = as_unit_vectors(np.stack([np.asarray(r.embedding) for r in rows]),
                              len(rows[0].embedding), normalize=normalized)
    docs: dict[str, list[ChunkRow]] = {}
    for r in rows:
        docs.setdefault(r.document_id, []).append(r)
    hashes = dict(doc_hashes or {})
    for d, chunks in docs.items():
        hashes.setdefault(d, document_hash("\x00".join(c.content for c in chunks),
                                           chunks[0].metadata))
    with translated(), conn.transaction(), conn.cursor() as cur:
        cur.execute(
            """INSERT INTO pyembed.documents (corpus_id, document_id, content_hash, metadata)
               SELECT %s, d, h, m::jsonb FROM unnest(%s::text[], %s::bytea[], %s::text[]) AS t(d, h, m)
               ON CONFLICT (corpus_id, document_id) DO UPDATE
                 SET content_hash = EXCLUDED.content_hash, metadata = EXCLUDED.metadata,
                     updated_at = now()
               RETURNING document_id, xmax = 0 AS inserted""",
            (corpus.corpus_id, list(docs), [hashes[d] for d in docs],
             [json.dumps(c[0].metadata, default=str) for c in docs.values()]))
        # A stored document that now has fewer chunks loses the rest (new ones have none).
        replaced = [d for d, inserted in cur.fetchall() if not inserted]
        if replaced:
            cur.execute(
                """DELETE FROM pyembed.chunks c USING unnest(%s::text[], %s::int[]) AS t(d, n)
                    WHERE c.corpus_id = %s AND c.document_id = t.d AND c.chunk_index >= t.n""",
                (replaced, [len(docs[d]) for d in replaced], corpus.corpus_id))
        # One statement for all chunks: the statement-level triggers (queue, keyword index)
        # then run once per batch, not once per chunk.
        metadata = [json.dumps(r.metadata, default=str) for r in rows]
        with _transition_tables_in_memory(cur, [
                len(r.content.encode()) + len(r.document_id) + len(m) + _ROW_OVERHEAD
                for r, m in zip(rows, metadata, strict=True)]):
            cur.execute(
                """INSERT INTO pyembed.chunks (corpus_id, document_id, chunk_index, content, metadata)
                   SELECT %s, d, i, c, m::jsonb
                     FROM unnest(%s::text[], %s::int[], %s::text[], %s::text[]) AS t(d, i, c, m)
                   ON CONFLICT (corpus_id, document_id, chunk_index) DO UPDATE
                     SET content = EXCLUDED.content, metadata = EXCLUDED.metadata
                   RETURNING document_id, chunk_index, chunk_id, xmax = 0 AS inserted""",
                (corpus.corpus_id, [r.document_id for r in rows], [r.chunk_index for r in rows],
                 [r.content for r in rows], metadata))
            written = cur.fetchall()
        by_position = {(d, i): c for d, i, c, _ in written}
        ids = [by_position[r.document_id, r.chunk_index] for r in rows]
        hashes_ = [sha256(r.content) for r in rows]
        # Chunks that are all new have no vectors to replace.
        replace = not all(inserted for *_, inserted in written)
        copy_vectors(cur, corpus.corpus_id, ids, model_key, vectors, hashes_, replace=replace)
        for key, extra in (also or {}).items():
            copy_vectors(cur, corpus.corpus_id, ids, key,
                         as_unit_vectors(extra, extra.shape[1], normalize=normalized), hashes_,
                         replace=replace)
    return ids


def vector_partition(corpus_id: int) -> sql.Identifier:
    """The corpus's partition of pyembed.vectors (pyembed._vector_partition_name in SQL)."""
    return sql.Identifier("pyembed", f"vectors_c{int(corpus_id)}")


# Bytes a written row takes beyond its values (tuple header, ids, key, hash, timestamps).
_ROW_OVERHEAD = 200
# The most work_mem a write raises it to: a batch whose rows need more spills to disk instead.
_WORK_MEM_CAP_KB = 1 << 20


@contextmanager
def _transition_tables_in_memory(cur: psycopg.Cursor[Any], row_bytes: Iterable[int]
                                 ) -> Iterator[None]:
    """work_mem raised, for the statement run inside, so that its statement triggers'
    transition tables hold rows of these sizes in memory, and restored after it. Beyond
    work_mem PostgreSQL writes a transition table to a temporary file, the whole write over
    again. Each row is kept whole (TOAST comes later) in a chunk rounded up to a power of two
    (up to 8 kB), so a 384-d vector row of ~1,650 bytes takes 2 kB; plus the chunk's header
    and the row's pointer."""
    needed = sum((1 << (b - 1).bit_length() if b <= 8192 else b) + 64 for b in row_bytes)
    kb = min(needed // 1024 + 1024, _WORK_MEM_CAP_KB)
    row = cur.execute("SELECT current_setting('work_mem'), set_config('work_mem', "
                      "greatest(pg_size_bytes(current_setting('work_mem')) / 1024, %s) || 'kB', "
                      "true)", (kb,)).fetchone()
    yield
    if row is not None:
        cur.execute("SELECT set_config('work_mem', %s, true)", (row[0],))


def copy_vectors(cur: psycopg.Cursor[Any], corpus_id: int, chunk_ids: Sequence[int],
                 model_key: str, vectors: np.ndarray, content_hashes: Sequence[bytes | None],
                 *, replace: bool = True) -> int:
    """Write these chunks' vectors for this model key by binary COPY into the corpus's
    partition of pyembed.vectors, where the database checks key, dimensions, norm, tenant and
    chunks. With `replace`, vectors the chunks already have for the key are deleted first
    (COPY cannot update). Run inside the caller's transaction; returns rows written."""
    if not len(chunk_ids):
        return 0
    data = copy_data(corpus_id, chunk_ids, model_key, vectors, content_hashes,
                     encoding=cur.connection.info.encoding)
    if replace:
        lo, hi = min(chunk_ids), max(chunk_ids)
        # n ids spanning n values are the whole range (a repeated id fails the COPY on the
        # primary key, and rolls the DELETE back with it).
        ids = None if hi - lo + 1 == len(chunk_ids) else list(chunk_ids)
        cur.execute("SELECT pyembed._clear_vectors(%s, %s, %s, %s, %s::bigint[])",
                    (corpus_id, model_key, lo, hi, ids))
    row_bytes = 4 * int(np.shape(vectors)[1]) + _ROW_OVERHEAD
    with _transition_tables_in_memory(cur, [row_bytes] * len(chunk_ids)), cur.copy(
            sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT BINARY)").format(
                vector_partition(corpus_id), sql.SQL(", ").join(map(sql.Identifier, COLUMNS)))
            ) as copy:
        for block in data:
            copy.write(block)
    return len(chunk_ids)


SEARCH_MODES = ("vector", "keyword", "hybrid")


def search(conn: psycopg.Connection[Any], corpus: str, query: np.ndarray | Sequence[float] | None,
           model_key: str | None, k: int = 10, filter: Mapping[str, Any] | None = None, *,
           mode: str = "vector", text: str | None = None) -> list[Hit]:
    """Guarded search: 'vector' (the database refuses a query vector made by another model,
    PE001), 'keyword' (BM25 on `text`) or 'hybrid' (both, fused by reciprocal rank)."""
    if mode not in SEARCH_MODES:
        raise InvalidInput(f"mode must be one of {', '.join(SEARCH_MODES)}, not {mode!r}")
    vec = None
    if mode != "keyword":
        vec = np.asarray(query, dtype=np.float32)
        if vec.ndim != 1 or not np.isfinite(vec).all():
            raise InvalidVector("the query vector must be one row of finite numbers")
    if mode != "vector" and not (text and text.strip()):
        raise InvalidInput(f"{mode} search needs the query text")
    flt = json.dumps(dict(filter)) if filter is not None else None
    sql, params = {
        "vector": ("SELECT * FROM pyembed.search(%s, %s, %s, %s, %s)",
                   (corpus, Vector(vec) if vec is not None else None, model_key, k, flt)),
        "keyword": ("SELECT * FROM pyembed.search_keyword(%s, %s, %s, %s)",
                    (corpus, text, k, flt)),
        "hybrid": ("SELECT * FROM pyembed.search_hybrid(%s, %s, %s, %s, %s, %s)",
                   (corpus, text, Vector(vec) if vec is not None else None, model_key, k, flt)),
    }[mode]
    with translated(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql, params)
        return [Hit(**row) for row in cur.fetchall()]
