"""Hand-written parallel passages and questions (multilingual_pairs.json): one short fact per
entry, its passage and a question it answers, each in English, German, French and Spanish.
Used by tests/test_multilingual.py and tests/benchmarks/bench_multilingual.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyembed

LANGUAGES = ("en", "de", "fr", "es")
DATA = Path(__file__).with_suffix(".json")


@dataclass(frozen=True)
class Fact:
    id: str
    passage: dict[str, str]
    question: dict[str, str]

    def document(self, lang: str) -> pyembed.Document:
        """The passage in `lang` as a document with id `<fact>.<lang>`."""
        return pyembed.Document(f"{self.id}.{lang}", self.passage[lang], {"fact": self.id})


def load() -> list[Fact]:
    facts = [Fact(f["id"], f["passage"], f["question"])
             for f in json.loads(DATA.read_text(encoding="utf-8"))]
    for fact in facts:
        assert set(fact.passage) == set(fact.question) == set(LANGUAGES), fact.id
    assert len({f.id for f in facts}) == len(facts)
    return facts


def fact_of(document_id: str) -> str:
    """The fact a document (`<fact>.<lang>`) states."""
    return document_id.rsplit(".", 1)[0]
