"""Every command of the CLI, read from its command tree (a new command or option included, none
listed by hand), run with bad values for each of its arguments and options by their type: one
line on stderr that names the problem, exit 1 (the project's one code for bad input, whoever
finds it: the option parser or pyembed, test_cli), no traceback, nothing on stdout, and the
database as it was.""" 

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pyembed
from tests.conftest import Database
from tests.helpers import run_cli

KEY = "fake/fake-hash@1:384"
DOCS = [("a", "refunds are paid within five days"), ("b", "a late delivery is refunded")]

HOSTILE_NAMES = ["nope", "a'; DROP TABLE x; --", "n" * 200, "\u202eabc", "a\x00b", ""]
"""Names of a corpus, tenant or replica that name nothing here: unknown, SQL-like, long, a
right-to-left mark, a NUL (which a process's argv cannot carry, but main(argv) can), empty."""
BAD_INTS = ["abc", "-1", "0", str(2**63)]
BAD_FLOATS = ["abc", "nan", "inf", "-1"]
BAD_WORDS = ["bogus", "a'; DROP TABLE x; --", "a\x00b", ""]
"""For an option that takes one of a set of words (a mode, a model key, a storage type)."""
BAD_TEXTS = ["", "a\x00b", " \t "]
"""For free text (a query, a question, an id): empty, a NUL, blank."""

ACCEPTED: dict[tuple[str, str, str], str] = {
    **{("corpus delete-documents", "document_ids", value): "an id the corpus has no document "
       "of is skipped, and the line says so (deleted 0 of 1)"
       for value in ("'bogus'", '"a\'; DROP TABLE x; --"')},
    ("cache purge", "older_than", "0"): "entries older than 0 days: every entry (its minimum)",
    **{("eval remove", "query_ids", value): "an id the corpus has no query of is skipped, and "
       "the line says so (removed 0 of 1)" for value in ("'bogus'", '"a\'; DROP TABLE x; --"')},
    **{(command, "name", "'nope'"): "a new name: the command makes it" for command in (
        "corpus create", "tenant create", "db replica add")},
    ("db replica remove", "name", "'nope'"): "idempotent: it says `no replica nope`",
    **{("ask", "model", value): "a Claude model id is the service's to judge (the fake server "
       "answers any); the SDK sends it as JSON" for value in ("'bogus'", '"a\'; DROP TABLE x; --"',
                                                          "'a\\x00b'")},
    ("ask", "model", "''"): "empty is no --model: the default model",
    ("ask", "min_score", "-1"): "a score's floor: cosine scores go down to -1",
    ("plan-storage", "vectors", "0"): "a plan for no vectors is zero bytes",
    ("plan-storage", "vectors", str(2**63)): "arithmetic: any count has its sizes",
    ("ingest", "batch_size", str(2**63)): "a batch as large as the input",
    ("worker", "max_attempts", str(2**63)): "a job is tried that many times: in effect, always",
    ("eval compare", "sample", "0"): "only the chunks of the documents the queries name",
    ("eval compare", "sample", str(2**63)): "every chunk of the corpus",
}
"""(command, parameter, value) that a command takes as a good value, with the reason."""

SKIPPED: dict[tuple[str, ...], str] = {
    ("demo",): "no parameter; it makes a project folder and cluster (tests/test_readme)",
    ("db", "init"): "no parameter: it makes a cluster (test_cli, test_localdb_port)",
    ("db", "start"): "no parameter: it starts a cluster (test_cli)",
    ("db", "stop"): "no parameter: it stops a cluster (test_cli)",
}


def commands() -> Iterator[tuple[tuple[str, ...], Any]]:
    import typer

    from pyembed.cli import app

    def walk(command: Any, prefix: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
        subs = getattr(command, "commands", None)
        if not subs:
            yield prefix, command
            return
        for name, sub in subs.items():
            yield from walk(sub, (*prefix, name))

    return walk(typer.main.get_command(app), ())


def digest(owner: psycopg.Connection[Any]) -> dict[str, str]:
    """Each table of the schema: its row count and a hash of its rows."""
    tables = [r[0] for r in owner.execute(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'pyembed' "
        "AND c.relkind IN ('r', 'p') AND NOT c.relispartition ORDER BY 1")]
    query = " UNION ALL ".join(
        f"SELECT '{t}', count(*) || ':' || coalesce(sum(hashtext(x::text)::bigint), 0) "
        f"FROM {t} x" for t in tables)
    return dict(owner.execute(query).fetchall())  # type: ignore[arg-type]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Files an ingest cannot read as documents, by what is wrong with each."""
    made = {"missing": tmp_path / "missing.txt", "a directory": tmp_path / "folder.txt"}
    made["a directory"].mkdir()
    for what, data in [("empty", b""), ("not UTF-8", b"\xff\xfe\x00caf\xe9 \x81\x82"),
                       ("NUL bytes", b"refunds\x00are paid"), ("empty JSONL", b"\n\n"),
                       ("binary JSONL", b"\x89PNG\r\n\x1a\n\x00\x00")]:
        path = tmp_path / (what.replace(" ", "_") + (".jsonl" if "JSONL" in what else ".txt"))
        path.write_bytes(data)
        made[what] = path
    return made


def base_args(command: Any, good: dict[str, str]) -> dict[str, list[str]]:
    """A good value for each required parameter, by its name."""
    values: dict[str, list[str]] = {}
    for p in command.params:
        if p.required:
            values[p.name] = [good[p.name]]
    return values


def invocation(command: Any, values: dict[str, list[str]]) -> list[str]:
    args: list[str] = []
    positional: list[str] = []
    for p in command.params:
        if p.name not in values:
            continue
        if p.param_type_name == "argument":
            positional += values[p.name]
        else:
            for v in values[p.name]:
                args.append(f"{p.opts[0]}={v}" if p.opts[0].startswith("--") else p.opts[0])
                if not p.opts[0].startswith("--"):
                    args.append(v)
    return [*args, "--", *positional] if positional else args


NAME_PARAMS = {"corpus", "name", "tenant", "role"}
FILE_PARAMS = {"paths", "queries", "qrels"}
KEPT = {("ingest",): "added 0, updated 0", ("eval", "import"): "stored 0 evaluation queries"}
"""What a command that reads files says on stdout it kept when it stops for their problems."""
TEXT_PARAMS = {"query", "question", "query_id", "description", "password", "relevant"}
FREE_TEXT = {"description", "password"}
"""Texts any value of which is good, but a NUL (PostgreSQL's texts cannot hold one)."""


def bad_values(p: Any, files: dict[str, Path]) -> list[tuple[str, str, bool]]:
    """(what it is, the value, whether the option parser refuses it) for parameter `p`."""
    kind = p.type_descriptor.annotation
    lo, hi = p.min, p.max
    if p.name == "dsn" or getattr(kind, "__name__", "") == "bool" or kind is bool:
        return []
    if p.name in FILE_PARAMS:
        return [(what, str(path), False) for what, path in files.items()]
    if kind is int:
        return [(v, v, v == "abc" or (lo is not None and int(v) < lo)
                 or (hi is not None and int(v) > hi)) for v in BAD_INTS]
    if kind is float:
        return [(v, v, v == "abc" or (lo is not None and not float(v) >= lo)
                 or (hi is not None and not float(v) <= hi)) for v in BAD_FLOATS]
    if p.name in NAME_PARAMS:
        return [(repr(v), v, False) for v in HOSTILE_NAMES]
    if p.name in FREE_TEXT:
        return [("a NUL", "a\x00b", False)]
    if p.name in TEXT_PARAMS:
        return [(repr(v), v, False) for v in BAD_TEXTS]
    return [(repr(v), v, False) for v in BAD_WORDS]


def corpus_to_walk(db: Database, tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, str], dict[str, str]]:
    """Corpus `docs` with DOCS, document a ingested as an ingest stores it (another ingest of it
    changes nothing): the CLI's environment and a good value of each required parameter."""
    with psycopg.connect(db.owner_dsn, autocommit=True) as owner:
        owner.execute("SELECT pyembed.register_model('fake', 'fake-hash', '2', 384)")
    with pyembed.connect(db.app_dsn) as client:
        client.create_corpus("docs", KEY).add(DOCS)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    env = {"PYEMBED_DSN": db.app_dsn, "PYEMBED_OWNER_DSN": db.owner_dsn,
           "PYEMBED_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    # Document a as an ingest stores it: another ingest of it changes nothing.
    unchanged = tmp_path / "a.jsonl"
    unchanged.write_text(json.dumps({"id": "a", "text": DOCS[0][1]}) + "\n")
    assert run_cli("ingest", "docs", str(unchanged), env=env).returncode == 0
    queries = tmp_path / "eval.jsonl"
    queries.write_text(json.dumps({"id": "q1", "query": "refund", "relevant": ["a"]}) + "\n")
    good = {"corpus": "docs", "name": "docs", "query": "refund", "question": "refund?",
            "paths": str(unchanged), "queries": str(queries), "share": "50", "query_id": "q1",
            "model_keys": KEY,
            "tenant": "acme", "role": "acme_user", "to": KEY, "relevant": "a",
            "document_ids": "zz", "query_ids": "zz"}
    return env, good


@pytest.mark.usefixtures("own_clusters")  # `db replica add` calls LocalCluster.add_replica
def test_every_command_refuses_bad_values_with_one_line(
        db: Database, files: dict[str, Path], tmp_path: Path, fake_api: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    env, good = corpus_to_walk(db, tmp_path, monkeypatch)
    wrong: list[str] = []
    seen = turn = 0
    with psycopg.connect(db.owner_dsn, autocommit=True) as owner:
        for path, command in commands():
            if path in SKIPPED:
                continue
            base = base_args(command, good)
            for p in command.params:
                values = bad_values(p, files)
                turn += 1  # at most 3 values a parameter, in turn: each meets many parameters
                for what, value, usage in (values + values)[turn % len(values):][:3] if len(
                        values) > 3 else values:
                    if (" ".join(path), p.name, what) in ACCEPTED:
                        continue
                    args = invocation(command, {**base, p.name: [value]})
                    before = digest(owner)
                    out = run_cli(*path, *args, env=env)
                    seen += 1
                    problem = judge(out, usage, kept=KEPT.get(path))
                    if not problem and (after := digest(owner)) != before:
                        problem = "the database changed: " + ", ".join(
                            t for t in after if after[t] != before.get(t))
                    if problem:
                        wrong.append(f"pyembed {' '.join(path)} {p.name}={what}: {problem}: "
                                     f"exit {out.returncode}, stdout {out.stdout[:200]!r}, "
                                     f"stderr {out.stderr[-400:]!r}")
    assert seen > 200  # (the walk found the parameters it walks)
    assert not wrong, "\n".join(wrong)



PAST_INTEGER = str(2**31)
"""One past PostgreSQL's integer: a count the option parser takes and the database cannot."""
NAMED_AS = {("tenant create", "rpm"): "requests_per_minute",
            ("tenant create", "tpm"): "tokens_per_minute"}
"""Options whose error names the setting they stand for (the option is its short form)."""


def test_every_whole_number_past_integer_is_refused_by_its_own_bound(
        db: Database, tmp_path: Path, fake_api: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every whole-number option, given one past PostgreSQL's integer: refused in one line that
    names the option (its bound, not "integer out of range"), or taken where ACCEPTED says why.
    The walk above tries a few values an option in turn; this one tries the one value on all."""
    env, good = corpus_to_walk(db, tmp_path, monkeypatch)
    wrong: list[str] = []
    seen = 0
    with psycopg.connect(db.owner_dsn, autocommit=True) as owner:
        for path, command in commands():
            if path in SKIPPED:
                continue
            for p in command.params:
                if p.type_descriptor.annotation not in (int, int | None) or (
                        " ".join(path), p.name, str(2**63)) in ACCEPTED:  # so this one too
                    continue
                args = invocation(command, {**base_args(command, good), p.name: [PAST_INTEGER]})
                before = digest(owner)
                out = run_cli(*path, *args, env=env)
                seen += 1
                usage = p.max is not None and int(PAST_INTEGER) > p.max
                problem = judge(out, usage, kept=KEPT.get(path))
                line = out.stderr.strip().splitlines()[-1:] or [""]
                named = {p.name, p.name.replace("_", " "), *(o.lstrip("-") for o in p.opts),
                         NAMED_AS.get((" ".join(path), p.name), p.name)}
                if not problem and not any(n in line[0] for n in named):
                    problem = f"the error does not name {p.name}"
                if not problem and "out of range" in line[0]:
                    problem = "the database's range, not the option's bound"
                if not problem and digest(owner) != before:
                    problem = "the database changed"
                if problem:
                    wrong.append(f"pyembed {' '.join(path)} {p.name}={PAST_INTEGER}: {problem}: "
                                 f"exit {out.returncode}, stderr {out.stderr[-300:]!r}")
    assert seen > 15  # (the walk found the options it walks)
    assert not wrong, "\n".join(wrong)

def judge(out: Any, usage: bool, *, kept: str | None = None) -> str | None:
    """What is wrong with a refusal: None if it is one line, `error: ...`, exit 1, nothing on
    stdout; a refusal by the option parser (`usage`) names the option and says `(see --help)`.
    A command that read files (`kept`: KEPT's) says, before its error line, each file or line it
    skipped and why (`skipped ...`), and on stdout what it kept (`kept`)."""
    lines = out.stderr.strip().splitlines()
    if "Traceback" in out.stderr:
        return "a traceback"
    if out.returncode == 0:
        return "taken"
    if out.returncode != 1:
        return f"exit {out.returncode}, not 1"
    if usage and not (lines and lines[-1].startswith("error: Invalid value for '")
                      and lines[-1].endswith("(see --help)")):
        return "not the option parser's line"
    if kept and out.stdout.strip() and lines:
        if not all(line.startswith("skipped ") for line in lines[:-1]) or not lines[-1].startswith(
                "error: ") or kept not in out.stdout:
            return "not what it skipped, kept and why it stopped"
        return None
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return "not one error line"
    if out.stdout.strip():
        return "a result on stdout"
    return None


SERVED = {(("metrics", "serve"), what): "an exporter serves while its database is down, "
          "pyembed_up 0 (test_metrics_serve_says_its_database_does_not_answer)"
          for what in ("a closed port", "a wrong password")}
REPORTED = {(("doctor",), what): "doctor's answer is its checklist on stdout, exit 1: the FAIL "
            "line names the problem" for what in ("a closed port", "a wrong password",
                                                  "not a DSN")}
ACCEPTED_DSN = {(("models",), "no DSN and no local cluster"): "it lists the built-in models and "
                "says on stderr that there is no database"}


def bad_dsns(db: Database, home: Path) -> dict[str, tuple[dict[str, str], str]]:
    """Each way a command's database can be wrong: its environment, and a word its error names."""
    wrong_password = psycopg.conninfo.make_conninfo(db.app_dsn, password="wrong")
    closed = f"postgresql://pyembed_user:x@127.0.0.1:{closed_port()}/pyembed"
    return {
        "no DSN and no local cluster": ({"PYEMBED_HOME": str(home)}, "pyembed db init"),
        "a closed port": ({"PYEMBED_DSN": closed, "PYEMBED_OWNER_DSN": closed,
                           "PYEMBED_WORKER_DSN": closed}, "cannot reach the database"),
        "a wrong password": ({"PYEMBED_DSN": wrong_password, "PYEMBED_OWNER_DSN": wrong_password,
                              "PYEMBED_WORKER_DSN": wrong_password}, "password"),
        "not a DSN": ({"PYEMBED_DSN": "x = = y", "PYEMBED_OWNER_DSN": "x = = y",
                       "PYEMBED_WORKER_DSN": "x = = y"}, "not a DSN"),
    }


def test_every_command_with_a_database_says_when_it_cannot_reach_it(
        db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command with a --dsn, with each bad database: one line naming what is wrong."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    good = {"corpus": "docs", "name": "docs", "query": "refund", "question": "refund?",
            "paths": str(tmp_path), "queries": str(tmp_path), "share": "50", "query_id": "q1",
            "model_keys": KEY,
            "tenant": "acme", "role": "acme_user", "to": KEY, "relevant": "a",
            "document_ids": "zz", "query_ids": "zz"}
    wrong = []
    turn = 0
    for path, command in commands():
        if not any(p.name == "dsn" for p in command.params):
            continue
        args = invocation(command, base_args(command, good))
        kinds = list(bad_dsns(db, tmp_path / "home").items())
        turn += 1  # two kinds a command, in turn: each kind meets half the commands
        for what, (env, words) in (kinds + kinds)[turn % len(kinds):][:2]:
            if (path, what) in SERVED or (path, what) in ACCEPTED_DSN:
                continue
            out = run_cli(*path, *args, env=env)
            if (path, what) in REPORTED:
                if "Traceback" in out.stderr or out.returncode != 1 or \
                        "FAIL server reachable" not in out.stdout:
                    wrong.append(f"pyembed {' '.join(path)} with {what}: exit "
                                 f"{out.returncode}, stdout {out.stdout[:300]!r}")
                continue
            problem = judge(out, False)
            if path == ("install",):  # (an install says it changed nothing, then why)
                words = words.replace("cannot reach the database", "Connection refused")
            if not problem and words not in out.stderr:
                problem = f"the error does not say {words!r}"
            if problem:
                wrong.append(f"pyembed {' '.join(path)} with {what}: {problem}: exit "
                             f"{out.returncode}, stdout {out.stdout[:200]!r}, "
                             f"stderr {out.stderr[-300:]!r}")
    assert not wrong, "\n".join(wrong)


def test_metrics_serve_says_its_database_does_not_answer(tmp_path: Path) -> None:
    """`metrics serve` with its database down: it serves (pyembed_up 0, as an exporter does while
    its database restarts), and says at its start, on stderr, that the database does not answer;
    a DSN that is not one stops it with one line. Before, both served in silence."""
    from tests.test_cli import pyembed as subprocess_cli

    closed = f"postgresql://u@127.0.0.1:{closed_port()}/db"  # (no password: none is warned of)
    with pytest.raises(subprocess.TimeoutExpired) as served:
        subprocess_cli("metrics", "serve", "--port", str(closed_port()), "--dsn", closed,
                       timeout=8)
    said = (served.value.stderr or b"").decode()
    assert said.startswith("warning: the database does not answer yet") and \
        "pyembed_up is 0" in said, said
    out = run_cli("metrics", "serve", "--dsn", "x = = y")
    assert judge(out, False) is None and "not a DSN" in out.stderr, out


def test_a_command_that_needs_a_providers_key_names_it_and_changes_nothing(
        db: Database, tmp_path: Path, fake_api: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every path to a paid service with its API key unset: one line naming the variable, and
    the database as it was (no document half-added, no usage counted)."""
    with psycopg.connect(db.owner_dsn, autocommit=True) as owner:
        owner.execute("SELECT pyembed.create_corpus('paid', 'voyage/voyage-3@1:1024')")
    with pyembed.connect(db.app_dsn) as client:
        client.create_corpus("docs", KEY).add(DOCS)
    for name in ("VOYAGE_API_KEY", "OPENAI_API_KEY", "COHERE_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    env = {"PYEMBED_DSN": db.app_dsn, "PYEMBED_OWNER_DSN": db.owner_dsn}
    assert run_cli("eval", "add", "docs", "q1", "refunds?", "--relevant", "a",
                   env=env).returncode == 0
    text = tmp_path / "new.txt"
    text.write_text("a new document")
    wrong = []
    with psycopg.connect(db.owner_dsn, autocommit=True) as owner:
        for args, variable in [
            (("search", "paid", "refunds"), "VOYAGE_API_KEY"),
            (("ingest", "paid", str(text)), "VOYAGE_API_KEY"),
            (("search", "docs", "refunds", "--rerank", "voyage/rerank-2.5"), "VOYAGE_API_KEY"),
            (("search", "docs", "refunds", "--rerank", "cohere/rerank-v3.5"), "COHERE_API_KEY"),
            (("eval", "compare", "docs", "openai/text-embedding-3-small@1:1536"),
             "OPENAI_API_KEY"),
            (("migrate", "start", "docs", "--to", "voyage/voyage-3@1:1024"), None),
            (("migrate", "backfill", "docs"), "VOYAGE_API_KEY"),
        ]:
            before = digest(owner)
            out = run_cli(*args, env=env)
            if variable is None:  # a step that needs no key: it goes on (and changes its rows)
                assert out.returncode == 0, out
                continue
            problem = judge(out, False, kept=KEPT.get(args[:1]))
            if not problem and variable not in out.stderr:
                problem = f"the error does not name {variable}"
            if not problem and (after := digest(owner)) != before:
                problem = "the database changed: " + ", ".join(
                    t for t in after if after[t] != before.get(t))
            if problem:
                wrong.append(f"pyembed {' '.join(args)}: {problem}: exit {out.returncode}, "
                             f"stdout {out.stdout[:200]!r}, stderr {out.stderr[-300:]!r}")
    assert not wrong, "\n".join(wrong)
