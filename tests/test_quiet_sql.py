"""pyembed's SQL says nothing on an ordinary call: no NOTICE reaches the client (psql prints
each one, drivers log them), from the application role's writes and searches or the owner's
maintenance, however often a session repeats them.
"""

from __future__ import annotations

from typing import Any

import psycopg

import pyembed
from pyembed import migration
from pyembed.db import connect
from tests.conftest import Database

FAKE = "fake/fake-hash@1:384"


def notices(conn: psycopg.Connection[Any]) -> list[str]:
    """The notices `conn` receives from now on, as 'SQLSTATE message'."""
    heard: list[str] = []
    conn.add_notice_handler(lambda d: heard.append(f"{d.sqlstate} {d.message_primary}"))
    return heard


def test_the_application_roles_writes_and_searches_send_no_notice(app: psycopg.Connection[Any]
                                                                   ) -> None:
    heard = notices(app)
    app.execute("SELECT pyembed.create_corpus('docs', %s)", (FAKE,))
    for doc, text in [("a", "first text"), ("b", "second text"), ("a", "first text changed"),
                      ("a", "first text changed again"), ("b", "second text changed")]:
        app.execute("SELECT pyembed.add_document('docs', %s, %s)", (doc, text))
    for _ in range(2):  # an UPDATE of chunks, statement by statement, like an ORM's
        app.execute("UPDATE pyembed.chunks SET metadata = '{\"n\": 1}' WHERE document_id = 'b'")
    for mode in ("keyword", "hybrid", "vector", "hybrid"):
        app.execute("SELECT * FROM pyembed.search_text('docs', 'first', 5, NULL, %s)", (mode,))
    app.execute("SELECT pyembed.drop_corpus('docs')")
    # No worker ran: each search with a vector leg (hybrid, vector, hybrid) says that chunks
    # wait for it (test_not_embedded_yet); nothing else is said.
    assert [h.split(" ")[0] for h in heard] == ["01PE1"] * 3


def test_a_clients_repeated_writes_send_no_notice(client: pyembed.Client) -> None:
    heard = notices(client.conn)
    docs = client.create_corpus("docs", FAKE)
    for version in range(3):
        docs.add([("a", f"alpha text, version {version}"), ("b", f"beta text {version}")])
    assert docs.search("alpha", k=1)[0].document_id == "a"
    assert heard == []


def test_the_owners_rebuilds_and_migration_steps_send_no_notice(db: Database) -> None:
    with connect(db.app_dsn, autocommit=True) as app:
        app.execute("SELECT pyembed.create_corpus('docs', %s)", (FAKE,))
        app.execute("SELECT pyembed.add_document('docs', 'a', 'some text')")
    with connect(db.owner_dsn, autocommit=True) as owner:
        heard = notices(owner)
        for storage in (None, "halfvec", "binary", None):
            owner.execute("SELECT pyembed.rebuild_index('docs', %s)", (storage,))
        owner.execute("SELECT pyembed.set_index_settings('docs', '{\"ef_search\": 200}')")
        owner.execute("SELECT pyembed.migration_start('docs', 'fake/fake-hash@1:1024')")
        owner.execute("SELECT pyembed.rebuild_index('docs')")
        owner.execute("SELECT pyembed.migration_rollback('docs')")
        owner.execute("SELECT pyembed.migration_cleanup('docs', false)")
        assert heard == []


def test_the_owners_rebuilds_and_cleanup_from_python_send_no_notice(db: Database) -> None:
    with pyembed.connect(db.owner_dsn) as owner:
        heard = notices(owner.conn)
        owner.create_corpus("docs", FAKE).add([("a", "some text")])
        for storage in (None, "halfvec", None):
            owner.rebuild_index("docs", storage)
        migration.start(owner, "docs", "fake/fake-hash@1:1024")
        migration.rollback(owner, "docs")
        migration.cleanup(owner, "docs")
        assert heard == []
