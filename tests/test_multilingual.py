"""Multilingual corpora: language routing at ingest and query time, and the translate hook."""

from __future__ import annotations

import pytest

import pyembed
from pyembed.multilingual import Router, detect
from tests.conftest import Database

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
