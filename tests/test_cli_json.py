"""`--json` on every command that prints data, and model keys never cut in tables (issue 23).

The CLI runs as a subprocess (piped, like `pyembed ... | less`) against a real database.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

import pyembed
from pyembed import evaluation
from pyembed.demo import sample_documents
from tests.conftest import REPO, Database
from tests.helpers import run_cli
from tests.test_cli import db_env

LONG = "fake/fake-hash-with-a-very-long-name-for-testing@2:384"
FAKE = "fake/fake-hash@1:384"
WIDTHS = ("20", "40", "60", "80")
"""Terminal widths (COLUMNS): at 20 and 40 rich gave some columns no width at all, and a key or
id was gone, not cut (cli._Table)."""


@pytest.fixture
def long_db(db: Database) -> Iterator[Database]:
    """A database with corpus `kb` pinned to a long model key, documents and eval queries."""
    with pyembed.connect(db.owner_dsn) as owner:
        owner.conn.execute("SELECT pyembed.register_model('fake', "
                           "'fake-hash-with-a-very-long-name-for-testing', '2', 384)")
    with pyembed.connect(db.app_dsn) as client:
        client.create_corpus("kb", LONG, description="a corpus with a long model key").add(
            sample_documents())
        evaluation.add_eval_query(client, "kb", "q1", "error E4012 quota", ["error-e4012"])
    yield db


def cli(db: Database, *args: str, width: str = "200") -> Any:
    out = run_cli(*args, env={**db_env(db), "COLUMNS": width})
    return out


def unfolded(text: str) -> list[str]:
    """The output with line folding undone: all of it with whitespace dropped, and each table
    column's cells read top to bottom (a folded key continues in the same column)."""
    columns: dict[tuple[int, int], str] = {}
    for line in text.splitlines():
        cells = re.split("[│┃]", line)
        for i, cell in enumerate(cells):
            key = (len(cells), i)
            columns[key] = columns.get(key, "") + "".join(cell.split())
    return ["".join(text.split()), *columns.values()]


def assert_whole_key(text: str, key: str = LONG) -> None:
    assert "…" not in text and "..." not in text, text
    assert any(key in part for part in unfolded(text)), text


# -- keys are never cut -------------------------------------------------------------------

@pytest.mark.parametrize("width", WIDTHS)
def test_keys_are_never_elided_at_narrow_widths(long_db: Database, width: str) -> None:
    for args in (("corpus", "list"), ("corpus", "show", "kb"), ("status",),
                 ("search", "kb", "error E4012 quota", "-k", "2"), ("cache", "stats"),
                 ("migrate", "plan", "kb", "--to", FAKE), ("migrate", "status", "kb")):
        out = cli(long_db, *args, width=width)
        assert out.returncode in (0, 1), (args, out.stderr)
        assert_whole_key(out.stdout)


@pytest.mark.parametrize("width", WIDTHS)
def test_eval_compare_keeps_keys_whole(long_db: Database, width: str) -> None:
    out = cli(long_db, "eval", "compare", "kb", LONG, FAKE, width=width)
    assert out.returncode == 0, out.stderr
    assert_whole_key(out.stdout)
    assert_whole_key(out.stdout, FAKE)


# -- --json: one document on stdout, the table's values -----------------------------------

def documented(command: str, *objects: dict[str, Any]) -> None:
    """Every field of `objects` is named in the README's `--json` row for `command`."""
    readme = (REPO / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith(f"| `{command}"))
    for obj in objects:
        missing = [name for name in obj if not re.search(rf"\b{name}\b", row)]
        assert not missing, (command, missing)


def as_json(db: Database, *args: str) -> Any:
    out = cli(db, *args, "--json")
    assert out.returncode == 0, out.stderr
    document = json.loads(out.stdout)  # the whole of stdout is one document
    assert_iso_times(document)
    return document


TIME = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d")


def assert_iso_times(document: Any) -> None:
    """Every time in a --json document is ISO 8601, as the README says (a date, then T, then
    the time and its offset): Python's and PostgreSQL's text of a timestamp, with a space and
    PostgreSQL's `+00`, is refused by strict readers (jq's fromdateiso8601 among them)."""
    if isinstance(document, dict):
        for value in document.values():
            assert_iso_times(value)
    elif isinstance(document, list):
        for value in document:
            assert_iso_times(value)
    elif isinstance(document, str) and TIME.match(document):
        assert document[10] == "T", document
        parsed = datetime.datetime.fromisoformat(document)
        assert parsed.isoformat() == document and parsed.tzinfo is not None, document


def test_corpus_list_and_show(long_db: Database) -> None:
    with pyembed.connect(long_db.app_dsn) as client:
        client.create_corpus("notes", FAKE)
    table = cli(long_db, "corpus", "list", width="250").stdout
    corpora = as_json(long_db, "corpus", "list")["corpora"]
    assert [(c["name"], c["model_key"], c["dimensions"]) for c in corpora] == [
        ("kb", LONG, 384), ("notes", FAKE, 384)]
    for c in corpora:
        row = next(line for line in table.splitlines() if f" {c['name']} " in line)
        assert c["model_key"] in row and f" {c['dimensions']} " in row
        assert set(c) >= {"corpus_id", "name", "model_key", "dimensions", "target_model_key",
                          "migration_step", "traffic_share", "description"}
        documented("corpus list", c)

    shown = as_json(long_db, "corpus", "show", "kb")
    assert shown == next(c for c in corpora if c["name"] == "kb")
    lines = cli(long_db, "corpus", "show", "kb").stdout.splitlines()
    assert lines == [f"{k}: {'None' if v is None else v}" for k, v in shown.items()]


def test_models(long_db: Database) -> None:
    found = {m["model_key"]: m for m in as_json(long_db, "models")["models"]}
    assert found[LONG]["dimensions"] == 384 and found[LONG]["model_id"] == (
        "fake-hash-with-a-very-long-name-for-testing")
    assert found[pyembed.LOCAL_DEFAULT.key]["provider"] == "local"
    documented("models", found[LONG])
    table = cli(long_db, "models", width="60").stdout
    for key in found:
        assert_whole_key(table, key)


def test_search_is_json_lines_one_hit_a_line(long_db: Database) -> None:
    args = ("search", "kb", "error E4012 quota", "-k", "3")
    out = cli(long_db, *args, "--json")
    assert out.returncode == 0, out.stderr
    hits = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(hits) == 3 and hits[0]["document_id"] == "error-e4012"
    for rank, hit in enumerate(hits, 1):
        assert set(hit) == {"rank", "document_id", "chunk_id", "chunk_index", "score",
                            "model_key", "content", "metadata"}
        assert hit["rank"] == rank and hit["model_key"] == LONG
        assert isinstance(hit["score"], float) and isinstance(hit["metadata"], dict)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    documented("search", *hits)
    table = cli(long_db, *args, width="250").stdout
    rows = [line for line in table.splitlines() if line.startswith("│ ") and "│ " in line[2:]]
    assert [row.split("│")[3].strip() for row in rows] == [h["document_id"] for h in hits]
    assert [row.split("│")[2].strip() for row in rows] == [f"{h['score']:.4f}" for h in hits]
    nothing = cli(long_db, "search", "kb", "zzzz", "--mode", "keyword", "--json")
    assert nothing.returncode == 0 and nothing.stdout == ""


def test_ask_with_claude(long_db: Database, fake_api: Any,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-json")
    monkeypatch.delenv("PYEMBED_CLAUDE_MODEL", raising=False)
    fake_api.reply_text = "E4012 means the monthly compute quota is used up [1]."
    got = as_json(long_db, "ask", "kb", "What does error E4012 mean?", "-k", "2")
    assert got["answer"] == fake_api.reply_text
    assert got["generated"] is True and got["insufficient"] is False and got["note"] is None
    assert got["citations"] == [{"number": 1, "document_id": "error-e4012"}]
    assert [s["number"] for s in got["sources"]] == [1, 2]
    assert got["sources"][0]["document_id"] == "error-e4012" and got["sources"][0]["cited"]
    assert got["model_key"] == LONG and got["generation_model"]
    assert set(got["timings"]) >= {"embed_ms", "search_ms", "generate_ms", "total_ms"}
    assert got["usage"]["output_tokens"] > 0
    documented("ask", got, got["sources"][0], got["citations"][0], got["timings"], got["usage"])


def test_an_answer_stream_cut_short_ends_its_line_before_the_error(
        long_db: Database, fake_api: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-json")
    fake_api.reply_text = "E4012 means the monthly compute quota is used up [1]."
    fake_api.script("short")  # the stream stops after some text, before message_stop
    out = cli(long_db, "ask", "kb", "What does error E4012 mean?", "-k", "2")
    assert out.returncode == 1
    assert out.stdout.strip() and out.stdout.endswith("\n"), out.stdout  # the part shown
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr


def test_ask_without_a_key_gives_the_passages(long_db: Database,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    out = cli(long_db, "ask", "kb", "What does error E4012 mean?", "-k", "2", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["generated"] is False and got["answer"] is None and got["note"]
    assert got["citations"] == [] and len(got["sources"]) == 2
    assert got["sources"][0]["document_id"] == "error-e4012"
    table = cli(long_db, "ask", "kb", "What does error E4012 mean?", "-k", "2",
                width="250").stdout
    for s in got["sources"]:
        assert f"[{s['number']}]" in table and s["document_id"] in table


def test_status_keeps_its_exit_code(long_db: Database) -> None:
    ok = cli(long_db, "status", "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["alerts"] == 0
    documented("status", report, *report["findings"])
    for f in report["findings"]:
        assert set(f) == {"area", "subject", "value", "level", "note", "number", "tenant"}
        assert f["tenant"] == ""  # (the application login's own: no tenant named)
    assert {f["subject"] for f in report["findings"] if f["area"] == "coverage"} == {
        f"kb [active] {LONG}"}
    table = cli(long_db, "status", width="250").stdout
    for f in report["findings"]:
        row = next(line for line in table.splitlines()
                   if f" {f['area']} " in line and f" {f['subject']} " in line)
        assert f["value"] in row and f" {f['level']} " in row

    with pyembed.connect(long_db.app_dsn) as client:
        client.conn.execute("SELECT pyembed.add_document('kb', 'c', 'gamma text waiting')")
    bad = cli(long_db, "status", "--json")
    assert bad.returncode == 1 == cli(long_db, "status").returncode
    report = json.loads(bad.stdout)
    assert report["alerts"] == 1
    [alert] = [f for f in report["findings"] if f["level"] == "alert"]
    assert alert["area"] == "coverage" and alert["number"] == 10 / 11
    assert bad.stderr.startswith("error: 1 alert(s): coverage kb")


def test_usage_and_cache_stats(long_db: Database) -> None:
    usage = as_json(long_db, "usage")
    assert usage["days"] == 30 and isinstance(usage["usage"], list)
    for r in usage["usage"]:
        assert set(r) == {"tenant", "corpus", "model_key", "requests", "tokens", "cost_usd"}
    for e in usage["provider_errors"]:
        assert set(e) == {"provider", "kind", "errors"} and e["errors"] > 0
    stats = as_json(long_db, "cache", "stats", "--days", "7")
    assert stats["days"] == 7
    [row] = [r for r in stats["stats"] if r["model_key"] == LONG]
    assert set(row) == {"day", "model_key", "hits", "misses", "hit_rate", "entries"}
    assert row["entries"] == 10 and row["misses"] >= 10
    documented("usage", usage, *usage["usage"], *usage["provider_errors"])
    documented("cache stats", stats, row)
    table = cli(long_db, "cache", "stats", "--days", "7", width="250").stdout
    line = next(line for line in table.splitlines() if LONG in line)
    assert row["day"] in line and f" {row['misses']} " in line and f" {row['entries']} " in line


def test_migrate_plan_and_status(long_db: Database) -> None:
    plan = as_json(long_db, "migrate", "plan", "kb", "--to", FAKE)
    assert (plan["corpus"], plan["from_key"], plan["to_key"]) == ("kb", LONG, FAKE)
    assert plan["documents"] == 10 and plan["chunks"] == 10
    assert set(plan["storage_before"]) == {"raw_bytes", "hnsw_bytes"} == set(
        plan["storage_during"])
    documented("migrate plan", plan, plan["storage_before"])
    table = cli(long_db, "migrate", "plan", "kb", "--to", FAKE, width="250").stdout
    assert f"{LONG}->{FAKE}" in unfolded(table)[0] and f" {plan['api_calls']:,} " in table

    status = as_json(long_db, "migrate", "status", "kb")
    assert status["model_key"] == LONG and status["target_model_key"] is None
    assert status["coverage"] is None and isinstance(status["events"], list)
    assert cli(long_db, "migrate", "start", "kb", "--to", FAKE).returncode == 0
    status = as_json(long_db, "migrate", "status", "kb")
    assert status["target_model_key"] == FAKE and status["chunks"] == 10
    assert status["events"] and set(status["events"][0]) == {"at", "step", "detail"}
    documented("migrate status", status, status["events"][0])
    text = cli(long_db, "migrate", "status", "kb", width="250").stdout
    assert f"{LONG} -> {FAKE}, step {status['step']}" in text


def test_tenant_list(long_db: Database) -> None:
    from pyembed import tenants

    with pyembed.connect(long_db.owner_dsn) as owner:
        tenants.create_tenant(owner.conn, "acme", requests_per_minute=300)
    (acme,) = as_json(long_db, "tenant", "list")["tenants"]
    assert (acme["name"], acme["requests_per_minute"], acme["members"]) == ("acme", 300, [])
    assert acme["created_at"][:10] in cli(long_db, "tenant", "list", width="250").stdout
    documented("tenant list", acme)


def test_eval_list_and_remove(long_db: Database) -> None:
    """The evaluation queries a corpus holds, listed and removed from the command line (the
    application role deletes through pyembed.delete_eval_queries: it holds no DELETE)."""
    got = as_json(long_db, "eval", "list", "kb")
    assert got == {"corpus": "kb", "queries": [
        {"query_id": "q1", "query": "error E4012 quota", "relevant": ["error-e4012"]}]}
    documented("eval list", got, *got["queries"])
    assert "error E4012 quota" in cli(long_db, "eval", "list", "kb", width="120").stdout
    out = cli(long_db, "eval", "remove", "kb", "q1", "q9")
    assert out.returncode == 0 and " ".join(out.stdout.split()) == (
        "removed 1 of 2 evaluation queries from kb (the others are not in it)"), out
    assert as_json(long_db, "eval", "list", "kb")["queries"] == []


def test_eval_compare(long_db: Database) -> None:
    got = as_json(long_db, "eval", "compare", "kb", FAKE, LONG)
    assert (got["corpus"], got["queries"], got["sampled_chunks"]) == ("kb", 1, 10)
    keys = [c["model_key"] for c in got["candidates"]]
    assert sorted(keys) == sorted([FAKE, LONG])
    for c in got["candidates"]:
        assert set(c) == {"model_key", "recall", "ndcg", "ms_per_query", "texts_per_second",
                          "storage_bytes", "cost_usd"}
    documented("eval compare", got, *got["candidates"])
    table = cli(long_db, "eval", "compare", "kb", FAKE, LONG, width="250").stdout
    for c in got["candidates"]:
        row = next(line for line in table.splitlines() if f" {c['model_key']} " in line)
        assert f"{c['recall']:.4f}" in row and f"{c['ndcg']:.4f}" in row


def test_plan_storage_and_db_status(tmp_path: Any) -> None:
    got = json.loads(run_cli("plan-storage", "--vectors", "2000000", "--json").stdout)
    assert got["vectors"] == 2_000_000 and got["hnsw_m"] == 16
    assert [s["dimensions"] for s in got["sizes"]] == [256, 384, 512, 768, 1024, 1536, 3072]
    s = got["sizes"][1]
    documented("plan-storage", got, s)
    assert s["float32_bytes"] < s["float32_hnsw_bytes"] and s["halfvec_bytes"] < s["float32_bytes"]
    table = run_cli("plan-storage", "--vectors", "2000000", env={"COLUMNS": "250"}).stdout
    assert "2,000,000 vectors" in table

    env = {"PYEMBED_HOME": str(tmp_path / "none")}
    status = json.loads(run_cli("db", "status", "--json", env=env).stdout)
    assert (status["home"], status["initialised"], status["running"]) == (
        str(tmp_path / "none"), False, False)
    # the same fields as a running cluster's, null where there is nothing yet
    assert set(status) == {"home", "initialised", "running", "port", "socket_dir", "data",
                           "log"} and status["port"] is None
    documented("db status", status)
    assert json.loads(run_cli("db", "replica", "list", "--json", env=env).stdout) == {
        "replicas": []}
    assert "initialised: False" in run_cli("db", "status", env=env).stdout


def test_json_output_holds_no_number_json_cannot(capsys: pytest.CaptureFixture[str]) -> None:
    """NaN and infinity are not JSON (json.dumps wrote them bare): every --json document goes
    through one writer, which writes them as null, the README's missing value."""
    from pyembed.cli import _print_json

    _print_json({"cost_usd": float("nan"), "rows": [float("inf"), 1.5, {"x": -float("inf")}]})
    line = capsys.readouterr().out
    assert json.loads(line, parse_constant=lambda c: pytest.fail(c)) == {
        "cost_usd": None, "rows": [None, 1.5, {"x": None}]}


def test_ingest_and_eval_import(long_db: Database, tmp_path: Any) -> None:
    """What a script reads of a load: counts and each skipped line, one JSON document (before:
    a sentence on stdout and the skipped lines on stderr, outside22)."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "n1", "text": "a new text"}) + "\nnot json\n")
    got = as_json(long_db, "ingest", "kb", str(docs), "--quiet")
    assert got == {"corpus": "kb", "model_key": LONG, "added": 1, "updated": 0, "unchanged": 0,
                   "failed": 1, "chunks": 1, "seconds": got["seconds"], "problems": [
                       {"path": str(docs), "line": 2, "message": got["problems"][0]["message"]}]}
    assert got["problems"][0]["message"].startswith("invalid JSON")
    documented("ingest", got, *got["problems"])
    queries = tmp_path / "eval.jsonl"
    queries.write_text(json.dumps({"id": "q2", "query": "new", "relevant": ["n1"]}) + "\n"
                       + json.dumps({"id": "q3", "query": "gone", "relevant": ["zz"]}) + "\n")
    got = as_json(long_db, "eval", "import", "kb", str(queries))
    assert got["stored"] == 1 and [p["line"] for p in got["problems"]] == [2], got
    documented("eval import", got, *got["problems"])
