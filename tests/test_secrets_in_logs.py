"""No secret reaches the server's log: a failing call of a function that stores an API key, and a
login made with a password (`tenant add-member --login`, the local cluster's and the Docker
stack's logins), whose password is on no command line either."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pyembed import tenants
from pyembed.errors import InvalidInput
from pyembed.localdb import LocalCluster, find_bindir
from tests.conftest import Database
from tests.helpers import run_cli

REPO = Path(__file__).resolve().parent.parent

FAILING_CALLS = {
    "set_secret": [
        # a name the table refuses: the error is raised inside the call
        ("", "SELECT pyembed.set_secret('not a name', '{secret}')"),
        # a valid one in a read-only transaction: the INSERT inside the call fails
        ("SET TRANSACTION READ ONLY", "SELECT pyembed.set_secret('VOYAGE_API_KEY', '{secret}')"),
    ],
}
"""For each function that stores a secret it is given, calls that fail inside it, the secret
typed as a literal as a psql user types it (what runs first in the transaction, the call)."""


def _secret() -> str:
    return f"sekret-{uuid.uuid4().hex}"


def _log(cluster: LocalCluster) -> str:
    return cluster.log_file.read_text(errors="replace")


def test_every_function_that_stores_a_secret_is_called_here(owner: psycopg.Connection[Any]) -> None:
    """From the catalogue: the functions whose body writes pyembed.secrets, so that a new one
    needs its failing calls above."""
    rows = owner.execute(
        "SELECT p.proname FROM pg_catalog.pg_proc p WHERE p.pronamespace = 'pyembed'::regnamespace "
        "AND p.prosrc ~* 'insert\\s+into\\s+pyembed\\.secrets' ORDER BY 1").fetchall()
    assert {r[0] for r in rows} == set(FAILING_CALLS)


@pytest.mark.parametrize("function", sorted(FAILING_CALLS))
def test_a_failing_call_logs_no_secret(cluster: LocalCluster, owner: psycopg.Connection[Any],
                                       function: str) -> None:
    """The failing call is logged (its ERROR line), but not its statement, the secret in it;
    the error the caller gets does not hold it either. Before: the server log's STATEMENT line
    held the call with the secret."""
    assert owner.execute("SHOW log_min_error_statement").fetchone() == ("error",)
    for first, call in FAILING_CALLS[function]:
        secret = _secret()
        with pytest.raises(psycopg.Error) as caught:
            with owner.transaction():
                if first:
                    owner.execute(first)
                owner.execute(call.format(secret=secret))
        assert secret not in str(caught.value) and secret not in repr(caught.value.diag.__dict__)
        log = _log(cluster)
        assert caught.value.diag.message_primary in log  # (the failure itself is logged)
        assert secret not in log, call


def test_a_login_password_never_reaches_the_server(cluster: LocalCluster, db: Database,
                                                   owner: psycopg.Connection[Any]) -> None:
    """`tenant add-member --password`: the server gets the password's SCRAM verifier, never the
    password, even with every statement logged and when the role statement fails; the login
    works with the password. Before: `CREATE ROLE ... PASSWORD 'the password'` in the log (the
    failing one's STATEMENT line; every one under log_statement = 'ddl' or 'all')."""
    role, password = f"login_{uuid.uuid4().hex[:8]}", _secret()
    tenants.create_tenant(owner, "acme")
    owner.execute("SET log_statement = 'all'")
    try:
        tenants.add_member(owner, "acme", role, create_login=password)
        with pytest.raises(InvalidInput, match="already exists") as caught:
            tenants.add_member(owner, "acme", role, create_login=password)
        assert password not in str(caught.value)
    finally:
        owner.execute("RESET log_statement")
    assert password not in _log(cluster)
    stored = owner.execute("SELECT rolpassword FROM pg_catalog.pg_authid WHERE rolname = %s",
                           (role,)).fetchone()
    assert stored is not None and str(stored[0]).startswith("SCRAM-SHA-256$")
    dsn = make_conninfo(db.app_dsn, user=role, password=password)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role,)
    assert conninfo_to_dict(dsn)["user"] == role
    owner.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
    owner.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_every_role_password_pyembed_sets_is_a_verifier() -> None:
    """Read from pyembed's code: a PASSWORD clause appears only in pyembed.passwords, which
    sends libpq's verifier; every CREATE or ALTER ROLE that sets one takes it from there (the
    tenants' logins and the local cluster's). Before: tenants.py and localdb.py formatted
    the password itself into the statement."""
    found = [f"{p.relative_to(REPO)}:{n}" for p in sorted(REPO.glob("pyembed/**/*.py"))
             if p.name != "passwords.py"
             for n, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"PASSWORD\s*[{%']", line)]
    assert found == []
    users = {p.name for p in REPO.glob("pyembed/**/*.py") if "password_clause(" in p.read_text()}
    assert users == {"passwords.py", "tenants.py", "localdb.py"}


def _cli(args: list[str], stdin: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("PYEMBED_")} | env
    return subprocess.run([sys.executable, "-m", "pyembed", *args], input=stdin, text=True,
                          capture_output=True, env=full, cwd=REPO, timeout=120)


def test_secret_set_takes_the_value_from_stdin_and_no_log_holds_it(
        cluster: LocalCluster, db: Database, owner: psycopg.Connection[Any]) -> None:
    """`pyembed secret set NAME` reads the value from standard input (a prompt that does not
    echo on a terminal), never from argv, and stores it with every statement of the database
    logged: the log has the session's statements but not the value, stored or refused. Before:
    no such command; a key typed into SQL under log_statement = 'all' was in the log."""
    name, refused_name = f"TEST_{uuid.uuid4().hex[:8].upper()}", "not a name"
    secret, other = _secret(), _secret()
    env = {"PYEMBED_OWNER_DSN": db.owner_dsn}
    database = sql.Identifier(owner.info.dbname)
    owner.execute(sql.SQL("ALTER DATABASE {} SET log_statement = 'all'").format(database))
    try:
        stored = _cli(["secret", "set", name], secret + "\n", env)
        refused = _cli(["secret", "set", refused_name], other + "\n", env)
        empty = _cli(["secret", "set", name], "", env)
    finally:
        owner.execute(sql.SQL("ALTER DATABASE {} RESET log_statement").format(database))
    assert stored.returncode == 0 and f"{name} stored" in stored.stdout, stored.stderr
    assert owner.execute("SELECT value FROM pyembed.secrets WHERE name = %s",
                         (name,)).fetchone() == (secret,)
    owner.execute("DELETE FROM pyembed.secrets WHERE name = %s", (name,))
    for failed in (refused, empty):
        assert failed.returncode == 1 and failed.stdout == "", failed
        assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    assert "nothing stored" in empty.stderr
    log = _log(cluster)
    assert "has_parameter_privilege" in log  # (the command's session was logged)
    assert secret not in log and other not in log
    assert other not in refused.stderr


def test_add_member_takes_the_password_from_stdin_never_argv(
        cluster: LocalCluster, db: Database, owner: psycopg.Connection[Any]) -> None:
    """`pyembed tenant add-member acme ROLE --login` reads the new login's password from
    standard input (a prompt that does not echo on a terminal), as `secret set` does; the old
    `--password VALUE`, which ps and the shell's history showed, is refused in one line with
    nothing made. Before: --password was the only way, and --login no option."""
    tenants.create_tenant(owner, "acme")
    role, password = f"login_{uuid.uuid4().hex[:8]}", _secret()
    env = {"PYEMBED_OWNER_DSN": db.owner_dsn}
    try:
        old = _cli(["tenant", "add-member", "acme", role, "--password", password], "", env)
        assert old.returncode == 1 and old.stdout == "", old
        assert "use --login" in old.stderr and len(old.stderr.strip().splitlines()) == 1, old
        assert password not in old.stderr
        assert owner.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s",
                             (role,)).fetchone() == (0,)
        empty = _cli(["tenant", "add-member", "acme", role, "--login"], "", env)
        assert empty.returncode == 1 and "nothing stored" in empty.stderr, empty
        made = _cli(["tenant", "add-member", "acme", role, "--login"], password + "\n", env)
        assert made.returncode == 0 and f"{role} now acts for tenant acme" in made.stdout, made
        with psycopg.connect(make_conninfo(db.app_dsn, user=role, password=password)) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (role,)
        assert password not in _log(cluster)
    finally:
        owner.execute("DELETE FROM pyembed.tenant_members")
        owner.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role))) if owner.execute(
            "SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() else None
        owner.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_the_docker_logins_passwords_are_verifiers_off_every_command_line(
        cluster: LocalCluster, db: Database, owner: psycopg.Connection[Any],
        tmp_path: Path) -> None:
    """docker/initdb-docker.sh, run against a real server with every statement logged and
    every command it starts recorded: each login (the app's, the worker's, the replication
    role) logs in with its password, stored as a SCRAM verifier; no command's arguments and no
    log line hold a password. Before: `psql -v pw=<password>` (in ps) ran `ALTER ROLE ...
    PASSWORD '<password>'` (in the log under log_statement = 'all' or 'ddl')."""
    passwords = {"PYEMBED_APP_PASSWORD": _secret(), "PYEMBED_WORKER_PASSWORD": _secret(),
                 "PYEMBED_REPLICATION_PASSWORD": _secret()}
    logins = {"pyembed_user": "PYEMBED_APP_PASSWORD",
              "pyembed_worker_user": "PYEMBED_WORKER_PASSWORD",
              "replicator": "PYEMBED_REPLICATION_PASSWORD"}
    saved = dict(owner.execute(  # the test cluster's own logins, given back as they were
        "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s)",
        (list(logins),)).fetchall())
    assert "replicator" not in saved
    made = [r for r in logins if r not in saved and r != "replicator"]
    for role in made:  # (the worker's login is made when a test first asks for its DSN)
        owner.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    calls, bin_dir = tmp_path / "calls", tmp_path / "bin"
    bin_dir.mkdir()
    for name, real in (("psql", f"{find_bindir()}/psql"), ("python", sys.executable)):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\nexec {real} "$@"\n')
        (bin_dir / name).chmod(0o755)
    info = conninfo_to_dict(db.owner_dsn)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PYEMBED_", "PG"))},
           **passwords, "POSTGRES_USER": str(info["user"]), "PGHOST": str(info["host"]),
           "PGPORT": str(info["port"]), "PGPASSWORD": str(info["password"]),
           "PGDATA": str(tmp_path), "PYEMBED_PYTHON": str(bin_dir / "python"),
           "PGOPTIONS": "-c log_statement=all", "PYTHONPATH": str(REPO),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    try:
        out = subprocess.run(["bash", str(REPO / "docker" / "initdb-docker.sh")], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        for role, var in logins.items():
            stored = owner.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s",
                                   (role,)).fetchone()
            assert stored is not None and str(stored[0]).startswith("SCRAM-SHA-256$"), role
            with psycopg.connect(make_conninfo(db.app_dsn, user=role, password=passwords[var],
                                               dbname="postgres")) as conn:
                assert conn.execute("SELECT session_user").fetchone() == (role,)
        recorded, log = calls.read_text(), _log(cluster)
        for password in passwords.values():
            assert password not in recorded and password not in log
        assert "replicator" in recorded  # (the commands were recorded)
        assert "ALTER ROLE" in log and "replicator" in log  # (the statements were logged)
        assert (tmp_path / "pg_hba.conf").read_text().startswith("host replication replicator")
    finally:
        for role, verifier in saved.items():
            owner.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(verifier)))
        for role in ["replicator", *made]:
            owner.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_a_dsn_with_a_password_on_the_command_line_is_warned_of(db: Database) -> None:
    """Every kind of --dsn option (the application's, the owner's, the worker's, doctor's) given
    a DSN holding a password on the command line, which ps shows every user of the machine,
    warns in one line naming the variable to set instead; the same DSN from that variable, or
    one without a password, does not. Before: nothing said so."""
    warning = "the --dsn given holds a password"
    cases = [(["status"], "PYEMBED_DSN", db.app_dsn),
             (["tenant", "list"], "PYEMBED_OWNER_DSN", db.owner_dsn),
             (["worker"], "PYEMBED_WORKER_DSN or PYEMBED_DSN", db.app_dsn),
             (["doctor"], "PYEMBED_DSN", db.app_dsn)]
    for args, variable, dsn in cases:
        given = run_cli(*args, "--dsn", dsn)
        lines = [line for line in given.stderr.splitlines() if warning in line]
        assert len(lines) == 1 and f"set {variable} instead" in lines[0], given
        assert str(conninfo_to_dict(dsn)["password"]) not in given.stderr
        from_env = run_cli(*args, env={variable.split(" or ")[-1]: dsn})
        assert warning not in from_env.stderr, from_env
    plain = run_cli("status", "--dsn", make_conninfo(db.app_dsn, password=""))
    assert warning not in plain.stderr, plain
