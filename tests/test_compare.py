"""`pyembed eval compare`: two local models on a small corpus with known answers."""

from __future__ import annotations

from typing import Any

import pyembed
from pyembed import evaluation
from pyembed.compare import compare
from pyembed.demo import sample_documents
from tests.conftest import Database
from tests.helpers import run_cli

MINILM = pyembed.LOCAL_DEFAULT.key
FAKE = "fake/fake-hash@1:384"

# Paraphrases that share no word with their answer: only a model of meaning finds them.
PARAPHRASES = [
    ("q1", "how long are copies of my data retained", "backups"),
    ("q2", "can employees log in through our identity provider", "sso"),
    ("q3", "when do I have to settle the bill", "billing"),
    ("q4", "which locations host the platform", "regions"),
    ("q5", "compensation when the platform goes down", "refunds"),
]


def test_the_semantic_model_wins_on_paraphrases(db: Database) -> None:
    with pyembed.connect(db.app_dsn) as client:
        kb = client.create_corpus("kb", FAKE)
        kb.add(sample_documents())
        for qid, q, doc in PARAPHRASES:
            evaluation.add_eval_query(client, "kb", qid, q, [doc])
        chunks, queries, rows = compare(client, "kb", [FAKE, MINILM])
    assert (chunks, queries) == (10, 5)
    by_key: dict[str, Any] = {r.model_key: r for r in rows}
    assert by_key[MINILM].ndcg > by_key[FAKE].ndcg + 0.2
    assert by_key[MINILM].recall >= by_key[FAKE].recall
    assert by_key[FAKE].texts_per_second > by_key[MINILM].texts_per_second
    assert by_key[MINILM].storage_bytes == by_key[FAKE].storage_bytes  # same width
    assert by_key[MINILM].cost_usd == 0.0


def test_compare_command_prints_the_table(db: Database) -> None:
    with pyembed.connect(db.app_dsn) as client:
        client.create_corpus("kb", FAKE).add(sample_documents())
        for qid, q, doc in PARAPHRASES:
            evaluation.add_eval_query(client, "kb", qid, q, [doc])
    out = run_cli("eval", "compare", "kb", FAKE, MINILM,
                  env={"PYEMBED_DSN": db.app_dsn, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if "@1:384" in line]
    assert MINILM in lines[0] and FAKE in lines[1]  # sorted best first
    empty = run_cli("eval", "compare", "kb", env={"PYEMBED_DSN": db.app_dsn})
    assert empty.returncode != 0
