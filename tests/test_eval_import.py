"""`pyembed eval import` and pyembed.evaluation.import_eval_queries: many evaluation queries
from a file, ours ({"id", "query", "relevant"}) or BEIR's (queries.jsonl and a qrels TSV), each
bad line reported with its number and the rest stored, through add_eval_query (one path).
Before: one query a process with `pyembed eval add` (12 took 10.8 s, outside22)."""

from __future__ import annotations

import json
from pathlib import Path

import pyembed
from pyembed import evaluation
from tests.conftest import Database
from tests.helpers import run_cli

KEY = "fake/fake-hash@1:384"


def test_a_file_of_queries_is_stored_and_its_bad_lines_named(
        tmp_path: Path, client: pyembed.Client, db: Database) -> None:
    client.create_corpus("kb", KEY).add([("d1", "alpha text"), ("d2", "beta text")])
    ours = tmp_path / "eval.jsonl"
    ours.write_text("\n".join([
        json.dumps({"id": "q1", "query": "what is alpha", "relevant": ["d1"]}),
        "not json",
        json.dumps({"id": "q2", "query": "what is beta", "relevant": ["nobody"]}),
        json.dumps({"id": "q3", "query": "what is it", "relevant": []}),
        "",
        json.dumps({"id": "q4", "query": "alpha and beta", "relevant": ["d1", "d2"]}),
    ]) + "\n", encoding="utf-8")
    out = run_cli("eval", "import", "kb", str(ours), env={"PYEMBED_DSN": db.app_dsn})
    assert out.returncode == 0, out.stderr
    assert "stored 2 evaluation queries for kb; 3 line(s) skipped" in out.stdout
    skipped = out.stderr.splitlines()
    assert [line.split(": ")[0] for line in skipped] == [
        f"skipped {ours}:2", f"skipped {ours}:3", f"skipped {ours}:4"], skipped
    assert "nobody" in skipped[1] and "no relevant document" in skipped[2]
    stored = {q.query_id: q.relevant for q in evaluation.stored_eval_queries(client, "kb")}
    assert stored == {"q1": ["d1"], "q4": ["d1", "d2"]}

    # BEIR's layout: the queries' texts in one file, the judgements in a TSV with a header
    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"_id": "1", "text": "beta?"}) + "\n"
                       + json.dumps({"_id": "2", "text": "unjudged"}) + "\n", encoding="utf-8")
    qrels = tmp_path / "test.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\n1\td2\t1\n1\td1\t0\n", encoding="utf-8")
    count, problems = evaluation.import_eval_queries(client, "kb", queries, qrels)
    assert (count, problems) == (1, [])  # (query 2 is of no split the TSV judges)
    stored = {q.query_id: q.relevant for q in evaluation.stored_eval_queries(client, "kb")}
    assert stored["1"] == ["d2"]

    # a file with nothing to store exits 1; an unknown corpus is one error, not one a line
    empty = run_cli("eval", "import", "kb", str(tmp_path / "missing.jsonl"),
                    env={"PYEMBED_DSN": db.app_dsn})
    assert empty.returncode == 1 and "cannot read" in empty.stderr
    unknown = run_cli("eval", "import", "nope", str(ours), env={"PYEMBED_DSN": db.app_dsn})
    assert unknown.returncode == 1 and "unknown corpus" in unknown.stderr
    assert unknown.stderr.count("\n") == 1 and "Traceback" not in unknown.stderr
