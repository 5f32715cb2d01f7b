"""`pyembed doctor` as a user runs it: one line per check, the fix on each failure, exit 1."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import sql

import pyembed as pyembed_api
from pyembed import doctor, health, schema, tenants
from tests.conftest import REPO, Database
from tests.helpers import run_cli as pyembed
from tests.test_deferred_index import KEY, KILLED, wait_for_killed_loader

NAMES = ["server reachable"] + [name for name, _ in doctor.CHECKS]


def _lines(out: str) -> dict[str, str]:
    found = {}
    for line in out.splitlines():
        for name in NAMES:
            if line[5:].startswith(name + ":"):
                found[name] = line
    return found


def _doctor(db: Database, **env: str) -> tuple[int, dict[str, str], str]:
    out = pyembed("doctor", env={"PYEMBED_DSN": db.app_dsn, "PYEMBED_OWNER_DSN": db.owner_dsn,
                                 **env})
    return out.returncode, _lines(out.stdout), out.stdout + out.stderr


def test_healthy_database_every_check_ok(db: Database) -> None:
    code, lines, text = _doctor(db)
    assert code == 0, text
    assert list(lines) == NAMES, text
    assert len(text.strip().splitlines()) == len(NAMES), text
    for line in lines.values():
        assert line.startswith("ok   "), line
    out = pyembed("doctor", "--json", env={"PYEMBED_DSN": db.app_dsn,
                                           "PYEMBED_OWNER_DSN": db.owner_dsn})
    assert out.returncode == 0, out.stdout + out.stderr
    got = json.loads(out.stdout)
    assert got["failures"] == 0 and [c["name"] for c in got["checks"]] == NAMES
    assert {c["status"] for c in got["checks"]} == {"ok"}
    assert set(got["checks"][0]) == {"name", "status", "detail", "fix"}
    assert "PostgreSQL " in lines["server reachable"] and "127.0.0.1:" in lines["server reachable"]
    assert lines["schema at head"].endswith(f"at {schema.head_revision()}")
    assert "vector " in lines["extensions vector and plpython3u"]
    assert "plpython3u " in lines["extensions vector and plpython3u"]


def test_schema_behind_fails_with_the_fix(db: Database) -> None:
    schema.downgrade(db.owner_dsn, "0008")
    code, lines, text = _doctor(db)
    assert code == 1, text
    assert lines["schema at head"] == (f"FAIL schema at head: at 0008, head is "
                                       f"{schema.head_revision()} — fix: pyembed install")


def test_server_unreachable_skips_the_rest() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends
    out = pyembed("doctor", "--dsn", f"postgresql://x:y@127.0.0.1:{port}/pyembed")
    assert out.returncode == 1, out.stdout
    lines = _lines(out.stdout)
    assert lines["server reachable"].startswith("FAIL server reachable: ")
    assert "fix: " in lines["server reachable"]
    for name in NAMES[1:]:
        assert lines[name] == f"skip {name}: the server is not reachable"
    # --json: the same checks as one document, the same exit code
    out = pyembed("doctor", "--json", "--dsn", f"postgresql://x:y@127.0.0.1:{port}/pyembed")
    assert out.returncode == 1, out.stdout
    got = json.loads(out.stdout)
    assert [c["name"] for c in got["checks"]] == NAMES and got["failures"] == 1
    assert [c["status"] for c in got["checks"]] == ["fail"] + ["skip"] * (len(NAMES) - 1)
    assert got["checks"][0]["fix"] and lines["server reachable"].startswith(
        f"FAIL server reachable: {got['checks'][0]['detail']}")


def test_missing_api_key_is_a_warning(db: Database) -> None:
    with psycopg.connect(db.app_dsn, autocommit=True) as conn:
        conn.execute("SELECT pyembed.create_corpus('docs', 'voyage/voyage-3@1:1024')")
    code, lines, text = _doctor(db)
    assert code == 0, text  # a warning, not a failure
    line = lines["API keys for the corpora's providers"]
    assert line.startswith("WARN ") and "VOYAGE_API_KEY not set" in line and "fix: export" in line
    code, lines, text = _doctor(db, VOYAGE_API_KEY="pa-test")
    assert lines["API keys for the corpora's providers"].startswith("ok   "), text


def test_old_queued_work_without_a_worker(db: Database) -> None:
    with psycopg.connect(db.app_dsn, autocommit=True) as conn:
        conn.execute("SELECT pyembed.create_corpus('docs', 'fake/fake-hash@1:384')")
        conn.execute("SELECT pyembed.add_document('docs', 'a', 'some text to embed later')")
    code, lines, _ = _doctor(db)
    assert lines["worker alive"].startswith("ok   ") and "queued" in lines["worker alive"]
    with psycopg.connect(db.owner_dsn, autocommit=True) as conn:
        conn.execute("UPDATE pyembed.queue SET enqueued_at = now() - interval '1 hour', "
                     "not_before = now() - interval '1 hour'")
    code, lines, text = _doctor(db)
    assert code == 0, text
    line = lines["worker alive"]
    assert line.startswith("WARN worker alive: "), text
    assert "nothing written in the last 5 minutes" in line and "fix: run `pyembed worker`" in line


def test_a_database_without_the_schema_says_install(empty_db: Database) -> None:
    code, lines, text = _doctor(empty_db)
    assert code == 1, text
    assert lines["server reachable"].startswith("ok   ")
    for name in NAMES[1:4] + NAMES[5:6]:
        assert lines[name].startswith("FAIL ") and lines[name].endswith("— fix: pyembed install"), text
    # (no PL/Python probe ran: no reference for the backends' code)
    assert lines["backends run the installed pyembed"].startswith("skip "), text


def test_a_server_running_another_pyembed_fails_the_plpython_check(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyembed

    with psycopg.connect(db.app_dsn, autocommit=True) as conn:
        assert doctor.check_plpython(conn).status == "ok"
        monkeypatch.setattr(pyembed, "__version__", "9.9.9")
        check = doctor.check_plpython(conn)
    assert check.status == "fail" and "9.9.9" in check.detail


def test_a_client_whose_code_or_sql_changed_under_the_same_version_fails_doctor(
        db: Database, tmp_path: Any) -> None:
    """Before, doctor compared the PL/Python package's version string and the schema's revision
    only: a checkout whose Python code or sql/ files changed, version and revision the same,
    passed both checks. The client here is a copy of this checkout (same version), run in a new
    process from the copy: a comment added to one .py file fails the PL/Python check, and so does
    a changed tokenizer (pyembed/data, which the server's local model reads to count tokens:
    before, the digest was of .py files alone, and that passed); one added to one sql/ file fails
    the schema check; the copy as it is passes both."""
    for part in ("pyembed", "sql", "alembic"):
        shutil.copytree(REPO / part, tmp_path / part,
                        ignore=shutil.ignore_patterns("__pycache__"))

    def doctor_from_copy(command: str = "doctor") -> tuple[int, dict[str, str], str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYEMBED_")}
        env.update(PYTHONPATH=str(tmp_path), PYEMBED_DSN=db.app_dsn,
                   PYEMBED_OWNER_DSN=db.owner_dsn)
        out = subprocess.run([sys.executable, "-c", "import pyembed, sys; "
                              "assert pyembed.__file__.startswith(sys.argv[1]), pyembed.__file__; "
                              "from pyembed.cli import main; main([sys.argv[2]])", str(tmp_path),
                              command],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        return out.returncode, _lines(out.stdout), out.stdout + out.stderr

    plpython, schema_check = "PL/Python imports pyembed", "schema at head"
    code, lines, text = doctor_from_copy()
    assert code == 0 and lines[plpython].startswith("ok   ") and \
        lines[schema_check].startswith("ok   "), text

    with open(tmp_path / "pyembed" / "text.py", "a") as f:
        f.write("# changed, the version not\n")
    code, lines, text = doctor_from_copy()
    assert code == 1, text
    assert lines[plpython].startswith(f"FAIL {plpython}: the server runs other pyembed "
                                      f"{pyembed_api.__version__} code than this client"), text
    assert "install the same pyembed for the server's python3" in lines[plpython]
    assert lines[schema_check].startswith("ok   "), text

    shutil.copy(REPO / "pyembed" / "text.py", tmp_path / "pyembed" / "text.py")
    tokenizer = tmp_path / "pyembed" / "data" / "minilm-tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes().rstrip() + b"\n\n")  # (the same JSON)
    code, lines, text = doctor_from_copy()
    assert code == 1 and lines[plpython].startswith(f"FAIL {plpython}: the server runs other "
                                                    "pyembed"), text
    shutil.copy(REPO / "pyembed" / "data" / "minilm-tokenizer.json", tokenizer)

    with open(tmp_path / "sql" / "080-grants.sql", "a") as f:
        f.write("-- changed, the revision not\n")
    code, lines, text = doctor_from_copy()
    assert code == 1, text
    assert lines[schema_check].startswith(
        f"FAIL {schema_check}: at {schema.head_revision()}, but its functions are not this "
        "client's sql/ files"), text
    assert lines[schema_check].endswith("— fix: pyembed install"), text
    assert lines[plpython].startswith("ok   "), text
    # The fix, as printed, from the copy: its sql/ files are the database's again.
    assert doctor_from_copy("install")[0] == 0
    code, lines, text = doctor_from_copy()
    assert code == 0 and lines[schema_check].startswith("ok   "), text


def test_doctor_writes_nothing_and_passes_in_a_read_only_session(db: Database) -> None:
    """What a hot standby enforces: every check answers there (the PL/Python probe imports
    pyembed, it embeds nothing: before, it was 'a provider call cannot be accounted')."""
    code, lines, text = _doctor(db, PGOPTIONS="-c default_transaction_read_only=on")
    assert code == 0, text
    assert all(not line.startswith("FAIL") for line in lines.values()), text
    assert lines["PL/Python imports pyembed"].startswith("ok   "), text


def test_the_advice_for_a_tenants_unindexed_corpus_works_as_printed(
        db: Database, owner: psycopg.Connection[Any]) -> None:
    """A tenant's load killed mid-way: status and doctor tell that tenant what to run, and it
    runs. They named the owner's `pyembed corpus reindex killed`, which finds no corpus of that
    name: the owner acts for no tenant."""
    role = f"tk_{uuid.uuid4().hex[:6]}"
    tenants.create_tenant(owner, "acme", requests_per_minute=None)
    tenants.add_member(owner, "acme", role, create_login="pw")
    dsn = psycopg.conninfo.make_conninfo(db.app_dsn, user=role, password="pw")
    try:
        with pyembed_api.connect(dsn) as client:
            client.create_corpus("killed", KEY)
        proc = subprocess.run([sys.executable, "-c", KILLED, dsn], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == -9, proc.stderr
        wait_for_killed_loader(owner)
        with psycopg.connect(dsn, autocommit=True) as conn:
            (found,) = health.indexes(conn)
            check = doctor.check_indexes(conn)
            assert found.level == "warn" and check.status == "warn"
            assert check.fix == found.note
            assert "reindex" not in found.note, found.note
            advice = re.search(r"SELECT [^`]*?\)", found.note)
            assert advice, found.note
            conn.execute(advice.group(0))
            assert health.indexes(conn) == []
    finally:  # roles are the cluster's, not the test database's
        owner.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
        owner.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_a_backend_that_loaded_other_code_than_the_installed_is_named_with_the_fix(
        db: Database, cluster: Any, owner: psycopg.Connection[Any]) -> None:
    """A long-lived session that imported pyembed before another install keeps running the code
    it imported: doctor's PL/Python probe, a fresh backend, imports the installed code and did
    not see it. Each backend now takes a shared advisory lock keyed by the stamp of the code it
    imported (pyembed.loaded), and doctor names the backends whose stamp is not its own probe's,
    with their pids and the fix. The install is changed here as an upgrade changes it: the
    server's package (this worker's cluster's pylib/pyembed: a link to this checkout, or a copy
    where the server's OS user cannot read it) is set aside for a link to a copy whose text.py
    differs, then put back. Before, the check did not exist: doctor passed."""
    from pyembed.config import code_stamp
    from pyembed.loaded import LOCK_CLASS

    check = "backends run the installed pyembed"
    link = cluster.pylib / "pyembed"
    source = link.resolve()
    copy = cluster.pylib.parent / f"other-pyembed-{uuid.uuid4().hex[:8]}"
    shutil.copytree(source, copy / "pyembed", ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "pyembed" / "text.py", "a") as f:
        f.write("# another install's code\n")
    with psycopg.connect(db.app_dsn, autocommit=True) as old:
        old.execute("SELECT pyembed.version()")  # imports the code installed now
        pid = old.info.backend_pid
        held = owner.execute("SELECT objid FROM pg_locks WHERE locktype = 'advisory' "
                             "AND classid = %s::oid AND objsubid = 2 AND pid = %s",
                             (LOCK_CLASS, pid)).fetchall()
        assert held == [(code_stamp() % 2**32,)]  # the stamp of the code this process runs
        code, lines, text = _doctor(db)
        assert code == 0 and lines[check].startswith(f"ok   {check}: yes"), text
        kept = cluster.pylib / f"kept-{uuid.uuid4().hex[:8]}"
        link.rename(kept)
        try:
            link.symlink_to(copy / "pyembed", target_is_directory=True)
            code, lines, text = _doctor(db)
            assert code == 1, text
            line = lines[check]
            assert line.startswith(f"FAIL {check}: "), text
            assert re.search(rf"\bpid {pid} \(\w+ on {db.name}, ", line), line
            assert line.endswith("— fix: reconnect those sessions (a new session imports the "
                                 "installed code), or end them: SELECT pg_terminate_backend(pid) "
                                 "for each pid listed"), line
            # The fix as printed: the session ended, it is not named any more.
            owner.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
            code, lines, text = _doctor(db)
            assert f"pid {pid} " not in lines[check], lines[check]
        finally:
            link.unlink()
            kept.rename(link)
            shutil.rmtree(copy)


@pytest.mark.parametrize("statement", [
    "SELECT * FROM pyembed.search_keyword('docs', 'alpha')",  # imports pyembed.bm25 alone
    "SELECT pyembed.code_digest()",  # imports pyembed.config alone
    "SELECT pyembed.embed('alpha', 'fake/fake-hash@1:384')",  # pyembed.indb
])
def test_every_import_path_of_the_in_database_code_takes_the_stamp_lock(
        db: Database, owner: psycopg.Connection[Any], statement: str) -> None:
    """Whichever pyembed module a backend's first PL/Python call imports, the backend takes its
    stamp lock once, so doctor sees it. Before, only pyembed.indb's import took it: a backend
    that ran only keyword searches (pyembed._bm25_top imports pyembed.bm25) held none, and
    doctor could not name it when it ran old code."""
    from pyembed.config import code_stamp
    from pyembed.loaded import LOCK_CLASS

    with pyembed_api.connect(db.app_dsn) as client:
        client.create_corpus("docs", "fake/fake-hash@1:384").add([("a", "alpha text")])
    with psycopg.connect(db.app_dsn, autocommit=True) as fresh:
        fresh.execute(statement).fetchall()
        held = owner.execute("SELECT objid FROM pg_locks WHERE locktype = 'advisory' "
                             "AND classid = %s::oid AND objsubid = 2 AND pid = %s",
                             (LOCK_CLASS, fresh.info.backend_pid)).fetchall()
        assert held == [(code_stamp() % 2**32,)], statement
    # A parallel operation cannot run the lock's SPI call ("cannot start subtransactions during
    # a parallel operation"): no PL/Python function may run in one (_bm25_top was PARALLEL SAFE).
    assert owner.execute("SELECT array_agg(proname) FROM pg_proc WHERE proparallel <> 'u' AND "
                         "prolang = (SELECT oid FROM pg_language WHERE lanname = 'plpython3u')"
                         ).fetchone() == (None,)
    with psycopg.connect(db.owner_dsn, autocommit=True) as fresh:
        fresh.execute("SET force_parallel_mode = on")
        assert fresh.execute("SELECT pyembed._bm25_top('', '{}', '{}', '{}', '{}', 1, 5)"
                             ).fetchone() == (("{}", "{}"),)


CANNOT_IMPORT = "the server's Python cannot import pyembed: "
PLPYTHON_ENTRY = {
    "_version": "SELECT pyembed.version()",
    "_code_digest": "SELECT pyembed.code_digest()",
    "_embed": "SELECT pyembed.embed('alpha', 'fake/fake-hash@1:384')",
    "_embed_batch": "SELECT pyembed.embed_batch(ARRAY['alpha'], 'fake/fake-hash@1:384')",
    "_search_text": "SELECT * FROM pyembed.search_text('docs', 'alpha')",
    "_add_document": "SELECT pyembed.add_document('docs', 'b', 'beta text')",
    "_search_reranked": "SELECT * FROM pyembed.search_reranked('docs', 'alpha', 'fake/overlap')",
    "_bm25_top": "SELECT * FROM pyembed.search_keyword('docs', 'alpha')",
}
"""Each PL/Python function of the schema, by a statement of the application role that runs it."""


def test_every_plpython_function_says_the_server_cannot_import_pyembed_with_the_fix(
        db: Database, cluster: Any, owner: psycopg.Connection[Any]) -> None:
    """Walks every PL/Python function of the catalogue (a new one fails here until it is listed)
    through the entry point that runs it, in a fresh backend whose server cannot import pyembed
    (the server's package set aside for one whose import fails on a dependency the server's
    Python lacks, then put back; without it the server would import another install's, from
    its site-packages): PE013 naming it, with the fix as HINT, and
    so from the Python client (ConfigError) and doctor (its fix). Before, PL/Python's own error:
    SQLSTATE 38000, "ModuleNotFoundError: No module named 'pyembed'", no fix."""
    bodies = owner.execute(
        "SELECT array_agg(proname::text ORDER BY proname) FROM pg_proc WHERE prolang = "
        "(SELECT oid FROM pg_language WHERE lanname = 'plpython3u')").fetchone()
    assert bodies is not None and set(bodies[0]) == set(PLPYTHON_ENTRY)
    with pyembed_api.connect(db.app_dsn) as client:
        client.create_corpus("docs", "fake/fake-hash@1:384").add([("a", "alpha text")])
    link = cluster.pylib / "pyembed"
    kept = cluster.pylib / f"kept-{uuid.uuid4().hex[:8]}"
    broken = cluster.pylib.parent / f"broken-pyembed-{uuid.uuid4().hex[:8]}"
    (broken / "pyembed").mkdir(parents=True)
    (broken / "pyembed" / "__init__.py").write_text("import pyembed_lacks_this_module\n")
    link.rename(kept)
    try:
        link.symlink_to(broken / "pyembed", target_is_directory=True)
        for body, statement in PLPYTHON_ENTRY.items():
            with psycopg.connect(db.app_dsn, autocommit=True) as fresh, \
                    pytest.raises(psycopg.Error) as err:
                fresh.execute(statement)
            said = err.value.diag.message_primary or ""
            assert err.value.sqlstate == "PE013", (body, err.value.sqlstate, said)
            # (a body no PL/pgSQL wrapper raises again keeps PL/Python's prefix in psql)
            assert said.removeprefix("plpy.SPIError: ").startswith(
                CANNOT_IMPORT + "ModuleNotFoundError"), (body, said)
            assert (err.value.diag.message_hint or "").startswith(
                "make pyembed importable by the server's python3"), body
        with pyembed_api.connect(db.app_dsn) as client, \
                pytest.raises(pyembed_api.ConfigError, match=f"^{CANNOT_IMPORT}.*hint: make"):
            client.corpus("docs").search("alpha", mode="keyword")
        with psycopg.connect(db.app_dsn, autocommit=True) as fresh:
            check = doctor.check_plpython(fresh)
        assert check.status == "fail" and check.detail.startswith(CANNOT_IMPORT), check
        assert check.fix.startswith("make pyembed importable by the server's python3"), check
        assert owner.execute("SELECT count(*) FROM pyembed.documents").fetchone() == (1,)
    finally:
        link.unlink(missing_ok=True)
        kept.rename(link)
        shutil.rmtree(broken)
    with psycopg.connect(db.app_dsn, autocommit=True) as fresh:
        assert fresh.execute(PLPYTHON_ENTRY["_version"]).fetchone() == (pyembed_api.__version__,)


def test_a_corpus_vector_leg_missing_or_changed_by_hand_is_named_with_the_fix(
        db: Database) -> None:
    """A corpus's own vector leg (sql/025-nearest.sql) dropped or changed by hand: the search
    falls back or runs it as changed, which nothing said before; doctor names each corpus and
    key with `pyembed install` as the fix, which makes them again."""
    with psycopg.connect(db.owner_dsn, autocommit=True) as owner:
        for name in ("legs_a", "legs_b"):
            owner.execute("SELECT pyembed.create_corpus(%s, 'fake/fake-hash@1:384')", (name,))
        a, b = (owner.execute("SELECT pyembed._nearest_function_name(corpus_id, model_key) "
                              "FROM pyembed.corpora WHERE name = %s", (n,)).fetchone()[0]
                for n in ("legs_a", "legs_b"))
        owner.execute(sql.SQL("DROP FUNCTION pyembed.{}").format(sql.Identifier(a)))
        owner.execute(sql.SQL("ALTER FUNCTION pyembed.{} SET work_mem = '1MB'").format(
            sql.Identifier(b)))
    code, lines, text = _doctor(db)
    assert code == 0, text
    assert lines["corpora's vector legs"] == (
        "WARN corpora's vector legs: legs_a (fake/fake-hash@1:384): missing, legs_b "
        "(fake/fake-hash@1:384): changed by hand (a missing one's searches plan their statement "
        "every time; one changed by hand runs as changed) — fix: pyembed install"), text
    schema.install(db.owner_dsn)
    code, lines, text = _doctor(db)
    assert lines["corpora's vector legs"].startswith("ok   "), text



def test_a_session_holding_the_stamp_key_exclusively_is_named(
        db: Database, plain: str) -> None:
    """Any role may take any advisory key: a login holding (LOCK_CLASS, the installed code's
    stamp) exclusively kept every backend that loads that code from taking its shared stamp
    lock, doctor's own probe included, so the check skipped ("this session did not import
    pyembed") and a backend running older code went unnamed. Doctor counts shared stamp locks
    only (a backend's), and names a session holding the key exclusively, with the fix."""
    from pyembed.config import code_stamp
    from pyembed.loaded import LOCK_CLASS

    check = "backends run the installed pyembed"
    stamp = code_stamp() % 2**32
    with psycopg.connect(plain, autocommit=True) as spoof:
        spoof.execute("SELECT pg_advisory_lock(%s, (%s::bigint - "
                      "CASE WHEN %s::bigint >= 2147483648 THEN 4294967296 ELSE 0 END)::integer)",
                      (LOCK_CLASS, stamp, stamp))
        code, lines, text = _doctor(db)
        assert code != 0 and lines[check].startswith(f"FAIL {check}: 1 session(s) hold"), text
        assert f"pid {spoof.info.backend_pid} " in lines[check], text
    code, lines, text = _doctor(db)
    assert lines[check].startswith(f"ok   {check}: yes"), text


def test_a_tenant_member_whose_role_was_made_again_is_named_with_the_fix(
        db: Database, owner: psycopg.Connection[Any]) -> None:
    """A member's role made again under its name, as restoring a dump into another cluster
    makes every role anew (pg_dump leaves roles out): its login is refused (it acted for no
    tenant, seeing the corpora of none), while doctor said every check was ok and `tenant list`
    showed it a member.
    Doctor fails naming it with `pyembed tenant add-member`, which mends it as printed; `tenant
    list` marks it. A dropped member's role is a warning."""
    again, gone = (f"tm_{uuid.uuid4().hex[:6]}" for _ in range(2))
    tenants.create_tenant(owner, "acme", requests_per_minute=None)
    owner.execute("SELECT pyembed.create_corpus('nobodys', 'fake/fake-hash@1:384')")
    try:
        for role in (again, gone):
            tenants.add_member(owner, "acme", role, create_login="pw")
        for role in (again, gone):
            owner.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
        owner.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw' IN ROLE pyembed_app")
                      .format(sql.Identifier(again)))
        dsn = psycopg.conninfo.make_conninfo(db.app_dsn, user=again, password="pw")
        with pyembed_api.connect(dsn) as client, pytest.raises(pyembed_api.NotAllowed,
                                                               match="tenant 'acme'"):
            client.corpora()  # (it listed another party's: the corpus of no tenant)
        code, lines, text = _doctor(db)
        assert code == 1, text
        line = lines["tenants' members"]
        assert line.startswith(f"FAIL tenants' members: acme's {again} another role than the "
                               "one added"), text
        assert f"acme's {gone} no longer a role" in line, text
        fix = f"pyembed tenant add-member acme {again}"
        assert line.endswith("fix: as the owner, add each again: " + fix), text
        out = pyembed("tenant", "list", "--json", env={"PYEMBED_OWNER_DSN": db.owner_dsn})
        (acme,) = json.loads(out.stdout)["tenants"]
        assert acme["stale_members"] == sorted([again, gone]), out.stdout
        out = pyembed(*fix.split()[1:], env={"PYEMBED_OWNER_DSN": db.owner_dsn})
        assert out.returncode == 0, out.stdout + out.stderr
        with pyembed_api.connect(dsn) as client:
            assert client.corpora() == []
        owner.execute("DELETE FROM pyembed.tenant_members WHERE role_name = %s", (gone,))
        code, lines, text = _doctor(db)
        assert code == 0 and lines["tenants' members"] == (
            "ok   tenants' members: each is the login role added"), text
    finally:  # roles are the cluster's, not the test database's
        owner.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(again)))
        owner.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(again)))


OWNER_ONLY = ("corpora's vector legs", "tenants' members")


def test_doctor_with_the_owners_dsn_runs_the_owner_checks(db: Database) -> None:
    """`pyembed doctor --dsn <the owner's DSN>` skipped the owner-only checks unless
    PYEMBED_OWNER_DSN was set too ("only the owner may read them"). Now the given login, the
    owner, runs them; an application login's doctor skips them saying why and how to run them."""
    as_owner = pyembed("doctor", "--dsn", db.owner_dsn, env={})
    lines = _lines(as_owner.stdout)
    assert as_owner.returncode == 0, as_owner.stdout + as_owner.stderr
    for name in OWNER_ONLY:
        assert lines[name].startswith("ok   "), lines[name]
    as_app = pyembed("doctor", "--dsn", db.app_dsn, env={})
    lines = _lines(as_app.stdout)
    for name in OWNER_ONLY:
        assert lines[name] == (
            f"skip {name}: only the owner may read them, and this login is not the schema's "
            "owner nor a member of it — fix: run doctor as the owner: `pyembed doctor --dsn "
            "<the owner's DSN>`, or with PYEMBED_OWNER_DSN set beside this DSN"), lines[name]


def test_doctor_as_a_member_of_the_owner_that_does_not_inherit_runs_the_owner_checks(
        db: Database, owner: psycopg.Connection[Any]) -> None:
    """A login that may act as the schema's owner only by SET ROLE (a NOINHERIT member of it):
    doctor runs the owner-only checks as the owner's role, where they were skipped."""
    from tests.helpers import login_role

    schema_owner = owner.execute("SELECT pg_get_userbyid(nspowner) FROM pg_namespace "
                                 "WHERE nspname = 'pyembed'").fetchone()[0]  # type: ignore[index]
    with login_role(owner, db.app_dsn, "dba", sql.SQL("NOINHERIT IN ROLE {}").format(
            sql.Identifier(schema_owner))) as dba:
        out = pyembed("doctor", env={"PYEMBED_DSN": dba})
        lines = _lines(out.stdout)
        for name in OWNER_ONLY:
            assert lines[name].startswith("ok   "), out.stdout + out.stderr
