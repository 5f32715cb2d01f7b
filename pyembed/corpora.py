"""The corpus catalogue and document storage: corpora by name (through the database's one
lookup, pyembed.lookup_corpus), registered models, and documents with their chunks."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .dbcall import integer, translated
from .errors import InvalidInput, UnknownModel, shown
from .models import MODEL_COLUMNS, MODEL_FIELDS, ModelSpec, spec_from_row
from .sqlexec import Executor, executor
from .text import check_text, document_hash, sha256
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
        raise UnknownModel(f"unknown model key {shown(key)}: `pyembed models` lists the known keys")
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


class RefusedIds(InvalidInput):
    """Document ids the rule for ids refuses (pyembed._document_id_problem, which the documents
    table's trigger asks at every write): `problems` holds each one's, in the database's words;
    the message is the first one's."""

    def __init__(self, problems: Mapping[str, str]) -> None:
        super().__init__(next(iter(problems.values())))
        self.problems = dict(problems)


def document_hashes(conn: psycopg.Connection[Any], corpus_id: int,
                    document_ids: Sequence[str]) -> dict[str, bytes]:
    """The stored documents' content hashes, by id; RefusedIds if the database's rule for ids
    refuses one. Asked in the one statement a write makes before its documents are embedded,
    so that no provider is paid for a document the write would refuse, and the rule is the
    database's alone."""
    # A lookup by primary key for each id, whatever the planner makes of the array's length.
    rows = conn.execute(
        "SELECT i.id, (SELECT d.content_hash FROM pyembed.documents d "
        "WHERE d.corpus_id = %s AND d.document_id = i.id), pyembed._document_id_problem(i.id) "
        "FROM unnest(%s::text[]) AS i(id)",
        (corpus_id, list(document_ids))).fetchall()
    problems = {i: p for i, _, p in rows if p is not None}
    if problems:
        raise RefusedIds({i: problems[i] for i in document_ids if i in problems})
    return {i: bytes(h) for i, h, _ in rows if h is not None}


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
    for r in rows:
        check_text(r.content, f"chunk {r.document_id}#{r.chunk_index}")
    vectors = as_unit_vectors(np.stack([np.asarray(r.embedding) for r in rows]),
                              len(rows[0].embedding), normalize=normalized)
    docs: dict[str, list[ChunkRow]] = {}
    for r in rows:
        docs.setdefault(r.document_id, []).append(r)
    hashes = {d: document_hash((texts or {}).get(d) or "".join(c.content for c in chunks),
                               chunks[0].metadata) for d, chunks in docs.items()}
    with translated(), conn.transaction(), conn.cursor() as cur:
        cur.execute(
            """INSERT INTO pyembed.documents (corpus_id, document_id, content_hash, metadata)
               SELECT %s, d, h, m::jsonb FROM unnest(%s::text[], %s::bytea[], %s::text[]) AS t(d, h, m)
               ON CONFLICT (corpus_id, document_id) DO UPDATE
                 SET content_hash = EXCLUDED.content_hash, metadata = EXCLUDED.metadata
                 WHERE NOT %s OR documents.content_hash IS DISTINCT FROM EXCLUDED.content_hash
               RETURNING document_id, xmax = 0 AS inserted""",
            (corpus.corpus_id, list(docs), [hashes[d] for d in docs],
             [json.dumps(c[0].metadata, default=str) for c in docs.values()], only_changed))
        stored = dict(cur.fetchall())
        # (The row of a document left alone is not returned: the one stored is the same.)
        unchanged = len(docs) - len(stored)
        if unchanged:
            keep = [n for n, r in enumerate(rows) if r.document_id in stored]
            if not keep:
                return Written(0, 0, unchanged, [])
            rows = [rows[n] for n in keep]
            vectors = vectors[keep]
            if also:
                also = {k: np.asarray(v)[keep] for k, v in also.items()}
        # A stored document that now has fewer chunks loses the rest (new ones have none).
        replaced = [d for d, inserted in stored.items() if not inserted]
        if replaced:
            cur.execute(
                """DELETE FROM pyembed.chunks c USING unnest(%s::text[], %s::int[]) AS t(d, n)
                    WHERE c.corpus_id = %s AND c.document_id = t.d AND c.chunk_index >= t.n""",
                (replaced, [len(docs[d]) for d in replaced], corpus.corpus_id))
        # One statement for all chunks: the statement-level triggers (queue, keyword index)
        # then run once per batch, not once per chunk.
        metadata = [json.dumps(r.metadata, default=str) for r in rows]
        with transition_tables_in_memory(cur, [
                len(r.content.encode()) + len(r.document_id) + len(m) + ROW_OVERHEAD
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
        chunk_hashes = [sha256(r.content) for r in rows]
        # Chunks that are all new have no vectors to replace.
        replace = not all(inserted for *_, inserted in written)
        copy_vectors(cur, corpus.corpus_id, ids, model_key, vectors, chunk_hashes, replace=replace)
        for key, extra in (also or {}).items():
            copy_vectors(cur, corpus.corpus_id, ids, key,
                         as_unit_vectors(extra, extra.shape[1], normalize=normalized),
                         chunk_hashes, replace=replace)
    added = sum(1 for inserted in stored.values() if inserted)
    return Written(added, len(stored) - added, unchanged, ids)
