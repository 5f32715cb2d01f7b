"""A database dumped with pg_dump and restored into another cluster, as a DBA moves or recovers
one: roles are the cluster's, so the dump comes without them. `pyembed install` then makes the
schema's group roles and applies its functions and grants (until then doctor's schema check
names what is missing), after which the application searches with its guards as before; a
tenant's member, made again in the new cluster, is named by doctor until it is added again.
Two private clusters: the restore disturbs no other test."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

import pyembed
from pyembed import doctor, schema, tenants
from pyembed.localdb import LocalCluster

pytestmark = pytest.mark.usefixtures("own_clusters")  # it makes clusters (conftest)

KEY = "fake/fake-hash@1:384"
MEMBER = "restored_acme_app"


def _cluster() -> LocalCluster:
    home = Path(tempfile.mkdtemp(prefix="pyembed-restore-", dir="/tmp"))
    home.chmod(0o755)  # the server's OS user must traverse it
    return LocalCluster(home)


def _remove(c: LocalCluster) -> None:
    c.stop()
    shutil.rmtree(c.home, ignore_errors=True)


@pytest.fixture(scope="module")
def dump() -> Iterator[Path]:
    """A custom-format dump of a database with a corpus of no tenant, a tenant's corpus and a
    queued document."""
    source = _cluster()
    try:
        source.init()
        source.start()
        schema.install(source.dsn(owner=True))
        with psycopg.connect(source.dsn(owner=True), autocommit=True) as owner:
            tenants.create_tenant(owner, "acme", requests_per_minute=None)
            tenants.add_member(owner, "acme", MEMBER, create_login="pw")
        with pyembed.connect(source.dsn()) as client:
            client.create_corpus("docs", KEY).add([("quota", "Error E4012: quota used up.")])
        member = make_conninfo(source.dsn(), user=MEMBER, password="pw")
        with pyembed.connect(member) as client:
            client.create_corpus("tdocs", KEY).add([("acme", "Acme's own E4012 runbook.")])
        with psycopg.connect(source.dsn(), autocommit=True) as app:
            app.execute("SELECT pyembed.add_document('docs', 'queued', 'Queued for a worker.')")
        out = source.home / "pyembed.dump"
        subprocess.run([f"{source.state().bindir}/pg_dump", "-Fc", "-f", str(out),
                        source.dsn(owner=True)], check=True, capture_output=True)
        kept = Path(tempfile.mkdtemp(prefix="pyembed-dump-", dir="/tmp")) / "pyembed.dump"
        shutil.copy(out, kept)
    finally:
        _remove(source)
    yield kept
    shutil.rmtree(kept.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def target() -> Iterator[LocalCluster]:
    c = _cluster()
    try:
        c.init()
        c.start()
        yield c
    finally:
        _remove(c)


def test_a_dump_restored_into_another_cluster_installs_and_searches_as_before(
        dump: Path, target: LocalCluster) -> None:
    # pg_restore says which roles it lacked (the schema's owner role, the tenant's login) and
    # restores the rest: its exit status is 1.
    subprocess.run([f"{target.state().bindir}/pg_restore", "-d", target.dsn(owner=True),
                    str(dump)], capture_output=True, text=True)
    with psycopg.connect(target.dsn(owner=True), autocommit=True) as owner:
        check = doctor.check_schema(owner)  # (before: ok, while the application reached nothing)
    assert check.status == "fail" and check.fix == "pyembed install", check
    assert "no role pyembed_owner" in check.detail and "pyembed_app may not use" in check.detail
    schema.install(target.dsn(owner=True))  # (before: "role pyembed_owner does not exist")
    with psycopg.connect(target.dsn(owner=True), autocommit=True) as owner:
        assert doctor.check_schema(owner).status == "ok"
    with pyembed.connect(target.dsn()) as client:
        assert [c.name for c in client.corpora()] == ["docs"]
        docs = client.corpus("docs")
        assert [h.document_id for h in docs.search("E4012 quota", k=1)] == ["quota"]
        with pytest.raises(pyembed.ModelMismatch):
            docs.search([1.0] + [0.0] * 383, model_key="fake/fake-hash@2:384")
    with psycopg.connect(target.dsn(), autocommit=True) as app:
        assert app.execute("SELECT count(*) FROM pyembed.queue").fetchone() == (1,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute("SELECT * FROM pyembed.vectors")

    # The tenant's login made again in the new cluster: another role than the one added.
    with psycopg.connect(target.dsn(owner=True), autocommit=True) as owner:
        owner.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw' IN ROLE pyembed_app")
                      .format(sql.Identifier(MEMBER)))
        check = doctor.check_tenant_members(owner, target.dsn(owner=True))
        assert check.status == "fail" and f"acme's {MEMBER} another role" in check.detail
        tenants.add_member(owner, "acme", MEMBER)
        assert doctor.check_tenant_members(owner, target.dsn(owner=True)).status == "ok"
    member = make_conninfo(target.dsn(), user=MEMBER, password="pw")
    with pyembed.connect(member) as client:
        assert [c.name for c in client.corpora()] == ["tdocs"]
        assert [h.document_id for h in client.corpus("tdocs").search("E4012", k=1)] == ["acme"]
