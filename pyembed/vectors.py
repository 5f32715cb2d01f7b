"""The one writer of vectors: checked float32 rows, COPY'd in PostgreSQL's binary format into the
corpus's partition of pyembed.vectors, where the database checks key, dimensions, norm, tenant
and chunks. The worker, the migration backfill, `Corpus.add` (through corpora.write_chunks) and
bulk_load all write through `copy_vectors`.

psycopg's `Copy.write_row` with pgvector-python's dumper formats one row at a time in Python; a
batch's rows all have the same width (one corpus, one key, one dimension count, a hash or none),
so numpy lays a block of them out at once in the same bytes: the binary COPY format, and
pgvector's binary vector (uint16 dimensions, uint16 unused, big-endian float32s, as
`pgvector.Vector.to_binary` writes it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InvalidInput, InvalidVector

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql

COLUMNS = ("corpus_id", "chunk_id", "model_key", "embedding", "content_hash")
SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # then flags and header extension length: 0, 0
TRAILER = b"\xff\xff"  # a field count of -1
MAX_DIMS = 16_000  # pgvector's limit for the vector type
BLOCK_ROWS = 1_000  # memory stays flat, whatever the batch size

# Bytes a written row takes beyond its values (tuple header, ids, key, hash, timestamps).
ROW_OVERHEAD = 200
# The most work_mem a write raises it to: a batch whose rows need more spills to disk instead.
_WORK_MEM_CAP_KB = 1 << 20


def float_array(value: Any, dtype: type[np.floating[Any]] = np.float32) -> np.ndarray:
    """`value` (a vector, rows of them, a pgvector Vector) as an array of `dtype`; InvalidVector
    for text, rows of unequal lengths, or anything else that is not numbers, which numpy would
    parse ("0.5") or refuse with its own error."""
    if hasattr(value, "to_numpy"):  # a pgvector Vector, by its method: PL/Python loads no pgvector
        value = value.to_numpy()
    try:
        arr = np.asarray(value)
        if arr.dtype.kind not in "iuf":
            if arr.dtype.kind != "O":
                raise TypeError(f"{arr.dtype.name} values")
            arr = arr.astype(np.float64)  # Decimal and other number objects
        with np.errstate(over="ignore"):  # too large for dtype: Inf, refused where checked
            return arr.astype(dtype, copy=False)
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise InvalidVector(f"a vector is numbers, one row of them per vector ({exc})") from None


def as_unit_vectors(vectors: np.ndarray | Sequence[Sequence[float]], dims: int,
                    normalize: bool = True) -> np.ndarray:
    """float32 rows checked for shape, NaN/Inf and zero; unit-normalised when asked. float32
    rows already unit to within 1e-5 (what their float32 sums of squares can tell; the database
    allows 1e-3) are returned as they are, not copied."""
    float32 = isinstance(vectors, np.ndarray) and vectors.dtype == np.float32
    arr = float_array(vectors, np.float32 if float32 else np.float64)
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


def _row_type(key_bytes: int, dims: int, hash_bytes: int) -> np.dtype:
    """One tuple: its field count, then each field's byte length and bytes (none for NULL)."""
    fields: list[tuple[str, str] | tuple[str, str, tuple[int]]] = [
        ("fields", ">i2"),
        ("corpus_id_len", ">i4"), ("corpus_id", ">i4"),
        ("chunk_id_len", ">i4"), ("chunk_id", ">i8"),
        ("model_key_len", ">i4"), *([("model_key", f"S{key_bytes}")] if key_bytes else []),
        ("embedding_len", ">i4"), ("dims", ">u2"), ("unused", ">u2"),
        ("embedding", ">f4", (dims,)),
        ("content_hash_len", ">i4"),
    ]
    if hash_bytes:
        fields.append(("content_hash", f"S{hash_bytes}"))
    return np.dtype(fields)


def copy_data(corpus_id: int, chunk_ids: Sequence[int], model_key: str, vectors: np.ndarray,
              content_hashes: Sequence[bytes | None], *, encoding: str = "utf-8",
              block_rows: int = BLOCK_ROWS) -> Iterator[bytes]:
    """The COPY data for these rows (columns COLUMNS, in this order), signature and trailer
    included, in blocks to pass to psycopg's `Copy.write` one after the other. The inputs are
    checked here, before the first block."""
    vectors = float_array(vectors)
    if vectors.ndim != 2:
        raise InvalidVector(f"vectors must be one row per chunk (2-D), got {vectors.ndim}-D")
    if not len(chunk_ids) == len(vectors) == len(content_hashes):
        raise InvalidInput(f"{len(chunk_ids)} chunk ids, {len(vectors)} vectors and "
                           f"{len(content_hashes)} content hashes: one of each per row")
    if vectors.shape[1] > MAX_DIMS:
        raise InvalidVector(f"{vectors.shape[1]} dimensions: a vector has at most {MAX_DIMS:,}")
    return _blocks(corpus_id, np.asarray(chunk_ids, dtype=np.int64), model_key.encode(encoding),
                   vectors, content_hashes, block_rows)


def _blocks(corpus_id: int, ids: np.ndarray, key: bytes, vectors: np.ndarray,
            content_hashes: Sequence[bytes | None], block_rows: int) -> Iterator[bytes]:
    dims = vectors.shape[1]
    # Rows whose hashes differ in width (a NULL hash has none) go in blocks of their own.
    widths = np.fromiter((-1 if h is None else len(h) for h in content_hashes), dtype=np.int64,
                         count=len(content_hashes))
    yield SIGNATURE
    for width in np.unique(widths).tolist():
        rows = np.flatnonzero(widths == width)
        row_type = _row_type(len(key), dims, max(width, 0))
        for start in range(0, len(rows), block_rows):
            part = rows[start:start + block_rows]
            block = np.empty(len(part), dtype=row_type)
            block["fields"] = len(COLUMNS)
            block["corpus_id_len"], block["corpus_id"] = 4, corpus_id
            block["chunk_id_len"], block["chunk_id"] = 8, ids[part]
            block["model_key_len"] = len(key)
            if key:
                block["model_key"] = key
            block["embedding_len"] = 4 + 4 * dims
            block["dims"], block["unused"] = dims, 0
            block["embedding"] = vectors[part]
            block["content_hash_len"] = width
            if width > 0:
                block["content_hash"] = [content_hashes[i] for i in part.tolist()]
            yield block.tobytes()
    yield TRAILER


def vector_partition(corpus_id: int) -> sql.Identifier:
    """The corpus's partition of pyembed.vectors (pyembed._vector_partition_name in SQL)."""
    from psycopg import sql  # the client's writers only: PL/Python uses this module's numpy part

    return sql.Identifier("pyembed", f"vectors_c{int(corpus_id)}")


@contextmanager
def transition_tables_in_memory(cur: psycopg.Cursor[Any], row_bytes: Iterable[int]
                                ) -> Iterator[None]:
    """work_mem raised, for the statement run inside, so that its statement triggers'
    transition tables hold rows of these sizes in memory (beyond work_mem PostgreSQL writes a
    transition table to a temporary file), and restored after it. Each row is kept whole (TOAST
    comes later) in a chunk rounded up to a power of two (up to 8 kB), plus the chunk's header
    and the row's pointer."""
    needed = sum((1 << (b - 1).bit_length() if b <= 8192 else b) + 64 for b in row_bytes)
    kb = min(needed // 1024 + 1024, _WORK_MEM_CAP_KB)
    row = cur.execute("SELECT current_setting('work_mem'), set_config('work_mem', "
                      "greatest(pg_size_bytes(current_setting('work_mem')) / 1024, %s) || 'kB', "
                      "true)", (kb,)).fetchone()
    yield
    if row is not None:
        cur.execute("SELECT set_config('work_mem', %s, true)", (row[0],))


# The chunks among (id, text hash) pairs whose text is still the one hashed (the pair as one
# bytea in a hashed `= ANY`, as pyembed._dequeue_written does), kept from being deleted until
# the vectors are written (a concurrent delete would fail the write's chunk check).
_STILL_CURRENT = """
SELECT ch.chunk_id FROM pyembed.chunks ch
 WHERE ch.corpus_id = %(corpus_id)s AND ch.chunk_id = ANY (%(ids)s::bigint[])
   AND int8send(ch.chunk_id) || ch.content_hash = ANY (%(pairs)s::bytea[])
   FOR KEY SHARE
"""


def copy_vectors(cur: psycopg.Cursor[Any], corpus_id: int, chunk_ids: Sequence[int],
                 model_key: str, vectors: np.ndarray, content_hashes: Sequence[bytes | None],
                 *, replace: bool = True, only_current: bool = False,
                 claimed: Sequence[int] | None = None) -> list[int]:
    """Write these chunks' vectors for this model key, inside the caller's transaction; returns
    the chunk ids written. With `replace`, vectors the chunks already have for the key are
    deleted first (COPY cannot update). With `only_current`, a vector is written only if its
    chunk still has the text its hash names (a chunk changed or deleted since is skipped: its
    new text is queued already). With `claimed` (a worker's claim of each chunk's job, its
    attempts), only the jobs that claim still holds are written, as pyembed.hold_jobs finds and
    locks them: one another worker took over after this one's lease ran out is its to write."""
    from psycopg import sql  # as vector_partition

    current: set[int] | None = None
    if claimed is not None and len(chunk_ids):
        current = {r[0] for r in cur.execute(
            "SELECT pyembed.hold_jobs(%s, %s, %s::bigint[], %s::bytea[], %s::integer[])",
            (corpus_id, model_key, list(chunk_ids), list(content_hashes),
             list(claimed))).fetchall()}
    elif only_current and len(chunk_ids):
        pairs = [int(i).to_bytes(8, "big", signed=True) + (h or b"")
                 for i, h in zip(chunk_ids, content_hashes, strict=True)]
        current = {r[0] for r in cur.execute(_STILL_CURRENT, {
            "corpus_id": corpus_id, "ids": list(chunk_ids), "pairs": pairs}).fetchall()}
    if current is not None:
        keep = [n for n, i in enumerate(chunk_ids) if i in current]
        if len(keep) < len(chunk_ids):
            chunk_ids = [chunk_ids[n] for n in keep]
            vectors = np.asarray(vectors)[keep]
            content_hashes = [content_hashes[n] for n in keep]
    if not len(chunk_ids):
        return []
    data = copy_data(corpus_id, chunk_ids, model_key, vectors, content_hashes,
                     encoding=cur.connection.info.encoding)
    if replace:
        lo, hi = min(chunk_ids), max(chunk_ids)
        # n ids spanning n values are the whole range (a repeated id fails the COPY on the
        # primary key, and rolls the DELETE back with it).
        ids = None if hi - lo + 1 == len(chunk_ids) else list(chunk_ids)
        cur.execute("SELECT pyembed._clear_vectors(%s, %s, %s, %s, %s::bigint[])",
                    (corpus_id, model_key, lo, hi, ids))
    row_bytes = 4 * int(np.shape(vectors)[1]) + ROW_OVERHEAD
    with transition_tables_in_memory(cur, [row_bytes] * len(chunk_ids)), cur.copy(
            sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT BINARY)").format(
                vector_partition(corpus_id), sql.SQL(", ").join(map(sql.Identifier, COLUMNS)))
            ) as copy:
        for block in data:
            copy.write(block)
    return list(chunk_ids)
