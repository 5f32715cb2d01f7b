"""Multilingual corpora, the three supported ways:

1. One multilingual model per corpus (the default advice): create the corpus on a multilingual
   key, e.g. local/multilingual-e5-small-q4@1:384 (offline) or
   cohere/embed-multilingual-v3.0@3:1024, and add documents of any language; a question then
   finds passages in other languages, which routing (2) never does.
2. Per-language corpora: `Router` detects each document's and query's language (py3langid,
   offline) and sends it to the corpus `<base>-<lang>`, e.g. kb-en, kb-de, each on a model
   chosen for that language.
3. Translate before embedding: `Corpus.add(..., translate=fn)` and
   `Corpus.search(..., translate=fn)` embed `fn(text)` (e.g. a call to your translation
   service) while the stored chunk keeps the original text.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .client import AddReport, Client, Document
from .errors import InvalidInput, UnknownCorpus
from .search import Hit


@functools.lru_cache(maxsize=8)
def _identifier(languages: tuple[str, ...]) -> Any:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    identifier = LanguageIdentifier.from_model_file(MODEL_FILE)
    if languages:
        identifier.set_languages(list(languages))
    return identifier


def detect(text: str, languages: Sequence[str] | None = None) -> str:
    """The ISO 639-1 code of the text's language (py3langid's model, offline), among
    `languages` if given."""
    return str(_identifier(tuple(languages or ())).classify(text)[0])


@dataclass
class Router:
    """Documents and queries to `<base>-<lang>` corpora by detected language; `fallback`
    takes what is in no configured language."""

    client: Client
    base: str
    languages: Sequence[str]
    fallback: str = "en"

    def __post_init__(self) -> None:
        if self.fallback not in self.languages:
            raise InvalidInput(f"the fallback language {self.fallback!r} must be one of "
                               f"{list(self.languages)}")

    def corpus_name(self, lang: str) -> str:
        return f"{self.base}-{lang if lang in self.languages else self.fallback}"

    def create(self, model_keys: Mapping[str, str], **kwargs: Any) -> None:
        """Create one corpus per language, each on its own model key."""
        for lang in self.languages:
            self.client.create_corpus(self.corpus_name(lang), model_keys[lang], **kwargs)

    def add(self, documents: Iterable[Document]) -> dict[str, AddReport]:
        """Add each document to its language's corpus; returns what each corpus did."""
        groups: dict[str, list[Document]] = defaultdict(list)
        for d in documents:
            lang = detect(d.text, self.languages)
            groups[self.corpus_name(lang)].append(
                Document(d.id, d.text, {**d.metadata, "lang": lang}))
        return {name: self.client.corpus(name).add(docs) for name, docs in groups.items()}

    def search(self, query: str, k: int = 10, **kwargs: Any) -> tuple[str, list[Hit]]:
        """(the corpus that answered, its hits) for a query in any configured language."""
        name = self.corpus_name(detect(query, self.languages))
        try:
            corpus = self.client.corpus(name)
        except UnknownCorpus:
            raise UnknownCorpus(f"no corpus {name} for this query's language: "
                                "create it with Router.create") from None
        return name, corpus.search(query, k=k, **kwargs)
