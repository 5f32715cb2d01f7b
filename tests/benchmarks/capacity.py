"""The capacity model of docs/scale-out.md (a script, not a test): prints its tables.

    python3 tests/benchmarks/capacity.py            # every table, as Markdown
    python3 tests/benchmarks/capacity.py --check    # the model against the sizes measured

No database and no third-party package: the sizes are computed by laying rows and index tuples
out on 8 kB pages the way PostgreSQL 15 and pgvector 0.8.0 do (heap pages and TOAST for the
vectors table, hnswbuild.c's element + neighbour tuples for HNSW with m = 16). `--check` prints
them next to what a scratch cluster measured for 20,000 rows of each kind (MEASURED_PER_ROW).
Times and query rates come from figures measured on the 2-core machines of this project
(MEASURED below, each with where it comes from); everything else is arithmetic on them.
"""

from __future__ import annotations

import argparse
import functools
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

PAGE = 8192
HEAP_PAGE_SPACE = PAGE - 24  # page header; heap pages have no special space
LINE_POINTER = 4
TUPLE_HEADER = 24  # 23 bytes, MAXALIGNed, no null bitmap
TOAST_THRESHOLD = 2032  # a row longer than this has its vector moved out of line (STORAGE external)
TOAST_CHUNK = 1996  # TOAST_MAX_CHUNK_SIZE for 8 kB pages
TOAST_POINTER = 18
TOAST_INDEX_PER_CHUNK = 24  # (chunk_id, chunk_seq) btree entry, approximate
PK_PER_ROW = 75  # the (corpus_id, chunk_id, model_key) primary key: 59-77 B/row measured

HNSW_M = 16
HNSW_PAGE_SPACE = PAGE - 24 - 8  # page header and HnswPageOpaqueData
HNSW_ELEMENT_HEADER = 72  # offsetof(HnswElementTupleData, data): 10 heap tids, neighbour tid
ITEM_POINTER = 6
BUILD_MEMORY_OVERHEAD = 775  # in-memory graph per element beyond its value (measured, see below)

SIZES = (1_000_000, 10_000_000, 100_000_000)
DIMS = (384, 1024, 1536)
STORAGES = ("float32", "halfvec", "bit")
# The model key stored in every row, by dims: local/all-minilm-l6-v2-int8@1:384,
# voyage/voyage-3@1:1024, openai/text-embedding-3-small@1:1536.
KEY_LENGTH = {384: 33, 1024: 22, 1536: 36}
GIB = 1024**3

# Figures measured here (2 cores). Sources: D = DESIGN.md "pgvector facts measured here";
# S = measured for docs/scale-out.md in a scratch cluster (PostgreSQL 15, pgvector 0.8.0, load
# average 4-9 from other work on the same 2 cores); G = git history of the guarded search.
MEASURED = {
    "copy_rows_per_s": (65_000, 85_000),  # D: binary COPY, 384-d, no HNSW index
    "insert_into_hnsw_rows_per_s": 400,  # D: rows into an existing HNSW index, 384-d
    "build_vs_insert": (5, 6),  # D: HNSW build after the load is 5-6x faster
    # S: CREATE INDEX rows/s (m 16, ef_construction 64, 2 parallel workers), by dims:
    "build_rows_per_s": {384: (2_400, 2_900), 1024: (1_000, 1_150), 1536: (650, 1_150)},
    "build_rows_per_s_bit": (4_700, 4_950),  # S: bit(d) expression index, any of the three dims
    # S: plain pgvector p50 at 100,000 clustered rows, hnsw.ef_search 100, recall@10 0.99-1.0:
    "search_p50_ms": {384: (1.7, 2.0), 1536: (4.0, 4.8)},
    "ef_200_over_ef_100": (2.1, 2.9),  # S: p50 ratio
    "guarded_over_plain": (1.09, 1.21),  # G: pyembed.search / plain pgvector, p50
    "index_pages_per_query": {100: 1_460, 200: 3_610},  # S: 1536-d, 100k rows, EXPLAIN BUFFERS
    "recall_1m_ef_200": 0.88,  # D: 1M rows, m 16, ef_construction 64
}

# S: bytes per row for 20,000 rows (heap main fork, TOAST with its index, HNSW index).
MEASURED_PER_ROW = {
    ("heap", "float32", 384): 2048, ("heap", "float32", 1024): 134 + 5530,
    ("heap", "float32", 1536): 141 + 8283, ("heap", "halfvec", 384): 911,
    ("heap", "halfvec", 1024): 134 + 2777, ("heap", "halfvec", 1536): 141 + 4142,
    ("hnsw", "float32", 384): 2048, ("hnsw", "float32", 1024): 8192, ("hnsw", "float32", 1536): 8192,
    ("hnsw", "halfvec", 384): 1171, ("hnsw", "halfvec", 1024): 2731, ("hnsw", "halfvec", 1536): 4096,
    ("hnsw", "bit", 384): 349, ("hnsw", "bit", 1024): 436, ("hnsw", "bit", 1536): 503,
}
# S: maintenance_work_mem 64 MB ran out after 9,665 (float32), 17,407 (halfvec) and 69,056 (bit)
# tuples of 1536 dims: 6,943 / 3,855 / 972 bytes per element, i.e. the value + ~775 bytes.


def maxalign(n: int) -> int:
    return (n + 7) & ~7


def value_bytes(dims: int, storage: str) -> int:
    """pgvector's datum size: vector 4d+8, halfvec 2d+8, bit d/8+8."""
    return {"float32": 4 * dims + 8, "halfvec": 2 * dims + 8, "bit": math.ceil(dims / 8) + 8}[storage]


def heap_storage(storage: str) -> str:
    """The column type the table stores: bit search keeps float32 vectors to rescore with."""
    return "float32" if storage == "bit" else storage


def fill_pages(tuples: list[int], space: int) -> int:
    """Pages used by tuples (sizes with their line pointers) inserted in order: the current page
    if it has room, else the first page with room (the free space map), else a new page."""
    smallest = min(tuples, default=0)
    free: list[int] = []
    roomy: list[int] = []  # pages that may still take the smallest tuple, in page order
    target = -1
    for size in tuples:
        if target < 0 or free[target] < size:
            roomy = [i for i in roomy if free[i] >= smallest]
            target = next((i for i in roomy if free[i] >= size), -1)
            if target < 0:
                free.append(space)
                target = len(free) - 1
                roomy.append(target)
        free[target] -= size
    return len(free)


def heap_row(dims: int, storage: str) -> tuple[int, list[int]]:
    """(main tuple with line pointer, TOAST tuples with line pointers) of one vectors row."""
    vec = value_bytes(dims, storage)
    head = TUPLE_HEADER + 4  # corpus_id
    head = maxalign(head) + 8  # chunk_id
    head += 1 + KEY_LENGTH.get(dims, 36)  # model_key, short varlena

    def tail(n: int) -> int:
        n += 33  # content_hash: 32 bytes, short varlena
        return maxalign(n) + 8  # created_at

    inline = tail(((head + 3) & ~3) + vec)  # the vector is int4-aligned with a 4-byte header
    if inline <= TOAST_THRESHOLD:
        return maxalign(inline) + LINE_POINTER, []
    main = maxalign(tail(head + TOAST_POINTER)) + LINE_POINTER
    data = vec - 4  # TOAST stores the datum without its varlena header
    chunks = [TOAST_CHUNK] * (data // TOAST_CHUNK) + ([data % TOAST_CHUNK] if data % TOAST_CHUNK else [])
    toast = [maxalign(TUPLE_HEADER + 8 + (1 if c < 127 else 4) + c) + LINE_POINTER for c in chunks]
    return main, toast


def table_bytes_per_row(dims: int, storage: str, sample: int = 20_000) -> float:
    """Main fork + TOAST + TOAST index bytes per row, from a page layout of `sample` rows."""
    main, toast = heap_row(dims, storage)
    main_pages = fill_pages([main] * sample, HEAP_PAGE_SPACE)
    toast_pages = fill_pages(toast * sample, HEAP_PAGE_SPACE)
    return (main_pages + toast_pages) * PAGE / sample + len(toast) * TOAST_INDEX_PER_CHUNK


@functools.cache
def heap_bytes_per_row(dims: int, storage: str) -> float:
    """Heap bytes per vector: the table (a bit index's table keeps float32) and its primary key."""
    return table_bytes_per_row(dims, heap_storage(storage)) + PK_PER_ROW


def hnsw_level(rng: random.Random, m: int) -> int:
    return int(-math.log(1.0 - rng.random()) / math.log(m))


@functools.cache
def hnsw_bytes_per_row(dims: int, storage: str, m: int = HNSW_M, sample: int = 20_000) -> float:
    """HNSW index bytes per vector: each element tuple (72 bytes + the value) with its neighbour
    tuple ((level + 2) * m item pointers) on the same page when both fit (hnswbuild.c)."""
    rng = random.Random(16)
    etup = maxalign(HNSW_ELEMENT_HEADER + value_bytes(dims, storage))
    pages = 1  # the metapage
    free = HNSW_PAGE_SPACE
    for _ in range(sample):
        ntup = maxalign(4 + (hnsw_level(rng, m) + 2) * m * ITEM_POINTER)
        combined = etup + ntup + LINE_POINTER
        page_free = free - LINE_POINTER  # PageGetFreeSpace leaves room for one line pointer
        if page_free < etup or (combined <= HNSW_PAGE_SPACE and page_free < combined):
            pages += 1
            free = HNSW_PAGE_SPACE
        free -= etup + LINE_POINTER
        if combined <= HNSW_PAGE_SPACE:
            free -= ntup + LINE_POINTER
        else:  # the neighbour tuple goes to the next page
            pages += 1
            free = HNSW_PAGE_SPACE - ntup - LINE_POINTER
    return pages * PAGE / sample


def naive_hnsw_bytes(dims: int, storage: str, m: int = HNSW_M) -> int:
    """The rule of thumb: the value plus 2m neighbours of ~8 bytes at layer 0."""
    return value_bytes(dims, storage) + 2 * m * 8


def build_memory_per_row(dims: int, storage: str) -> int:
    """maintenance_work_mem an in-memory HNSW build needs per vector (measured at 1536 dims)."""
    return value_bytes(dims, storage) + BUILD_MEMORY_OVERHEAD


@dataclass(frozen=True)
class Row:
    vectors: int
    dims: int
    storage: str
    heap: float
    index: float

    @property
    def total(self) -> float:
        return self.heap + self.index

    @property
    def resident(self) -> float:
        """RAM that keeps the index resident, with 25% for the heap's hot pages, connections and
        the OS (the search reads k heap rows per query; bit rescoring reads more, see the doc)."""
        return self.index * 1.25


def rows() -> list[Row]:
    out = []
    for n in SIZES:
        for d in DIMS:
            for s in STORAGES:
                out.append(Row(n, d, s, heap_bytes_per_row(d, s) * n, hnsw_bytes_per_row(d, s) * n))
    return out


def gib(n: float) -> str:
    if n >= 100 * GIB:
        return f"{n / GIB:,.0f}"
    return f"{n / GIB:,.1f}" if n >= GIB else f"{n / GIB:,.2f}"


def count(n: int) -> str:
    return f"{n // 1_000_000}M"


def table(header: list[str], body: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def check() -> str:
    body = []
    for (kind, storage, dims), measured in MEASURED_PER_ROW.items():
        if kind == "heap":
            model = table_bytes_per_row(dims, storage)
            naive = "-"
        else:
            model = hnsw_bytes_per_row(dims, storage)
            naive = f"{naive_hnsw_bytes(dims, storage):,}"
        body.append([kind, storage, str(dims), f"{measured:,}", f"{model:,.0f}",
                     f"{(model - measured) / measured:+.1%}", naive])
    return table(["relation", "type", "dims", "measured B/row", "model B/row", "model vs measured",
                  "rule of thumb B/row"], body)


def sizes_tables(all_rows: list[Row]) -> str:
    """Two tables: the HNSW index and the RAM that keeps it resident; heap and totals."""
    by = {(r.vectors, r.dims, r.storage): r for r in all_rows}
    index_body, heap_body = [], []
    for n in SIZES:
        for d in DIMS:
            f, h, b = (by[n, d, s] for s in STORAGES)
            index_body.append([count(n), str(d), gib(f.index), gib(h.index), gib(b.index),
                               gib(f.resident), gib(h.resident), gib(b.resident)])
            heap_body.append([count(n), str(d), gib(f.heap), gib(h.heap), gib(f.total), gib(h.total),
                              gib(b.total)])
    return (table(["vectors", "dims", "HNSW float32", "HNSW halfvec", "HNSW bit", "RAM float32",
                   "RAM halfvec", "RAM bit"], index_body) + "\n\n" +
            table(["vectors", "dims", "heap float32", "heap halfvec", "total float32",
                   "total halfvec", "total bit (float32 heap)"], heap_body))


def hours(seconds: float) -> str:
    if seconds < 100:
        return f"{seconds:,.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:,.0f} min"
    return f"{seconds / 3600:,.1f} h"


def span(lo: float, hi: float) -> str:
    a, b = hours(lo), hours(hi)
    return a if a == b else f"{a} - {b}"


def build_table() -> str:
    body = []
    copy_lo, copy_hi = MEASURED["copy_rows_per_s"]
    insert = MEASURED["insert_into_hnsw_rows_per_s"]
    base = MEASURED["build_rows_per_s"][384][0]
    for n in SIZES:
        for d in DIMS:
            # Binary COPY moves bytes: the 384-d rate, scaled by the row's vector bytes.
            scale = value_bytes(384, "float32") / value_bytes(d, "float32")
            copy = span(n / (copy_hi * scale), n / (copy_lo * scale))
            for s in ("float32", "bit"):
                lo, hi = (MEASURED["build_rows_per_s_bit"] if s == "bit"
                          else MEASURED["build_rows_per_s"][d])
                # Into an existing index: 400 rows/s at 384-d, slower with wider vectors in the
                # proportion the builds slow down (an assumption); not measured for bit.
                live = hours(n / (insert * lo / base)) if s == "float32" else "-"
                body.append([count(n), str(d), s, copy, span(n / hi, n / lo),
                             gib(build_memory_per_row(d, s) * n), live])
    return table(["vectors", "dims", "index", "binary COPY", "HNSW build", "maintenance_work_mem GiB",
                  "into a live index instead"], body)


def qps_table() -> str:
    body = []
    g_lo, g_hi = MEASURED["guarded_over_plain"]
    for d, (lo, hi) in MEASURED["search_p50_ms"].items():
        guarded = (lo * g_lo, hi * g_hi)
        for ef, (f_lo, f_hi) in ((100, (1.0, 1.0)), (200, MEASURED["ef_200_over_ef_100"])):
            p50 = (guarded[0] * f_lo, guarded[1] * f_hi)
            per_core = (1000 / p50[1], 1000 / p50[0])
            body.append([str(d), str(ef), f"{p50[0]:.1f} - {p50[1]:.1f}",
                         f"{per_core[0]:,.0f} - {per_core[1]:,.0f}",
                         f"{2 * 0.7 * per_core[0]:,.0f} - {2 * 0.7 * per_core[1]:,.0f}",
                         f"{16 * 0.7 * per_core[0]:,.0f} - {16 * 0.7 * per_core[1]:,.0f}"])
    return table(["dims", "ef_search", "guarded p50 ms", "QPS per busy core",
                  "QPS per 2-core node (70%)", "QPS per 16-core node (70%)"], body)


SECTIONS: dict[str, Callable[[], str]] = {
    "check": check,
    "sizes": lambda: sizes_tables(rows()),
    "builds": build_table,
    "qps": qps_table,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only the model against measured sizes")
    args = parser.parse_args()
    for name, section in SECTIONS.items():
        if args.check and name != "check":
            continue
        print(f"## {name}\n\n{section()}\n")


if __name__ == "__main__":
    main()
