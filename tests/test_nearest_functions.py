"""A corpus's own vector leg per key (pyembed._nearest_c<id>_<md5 of key>, sql/025-nearest.sql):
made, replaced and dropped with the corpus's row, made again by every install, executable by the
owner alone, and answering every way of reading as the dynamic statement it replaces."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from pgvector import Vector

from pyembed import schema
from pyembed.corpora import ChunkRow, create_corpus, drop_corpus, write_chunks
from pyembed.search import search
from tests.conftest import Database
from tests.helpers import assert_nearest_functions_in_line as assert_in_line
from tests.helpers import nearest_functions as functions
from tests.helpers import nearest_functions_expected as expected
from tests.helpers import rows, unit

KEY = "fake/fake-hash@1:384"


def documents(n: int, chunks: int, seed: int = 0) -> list[ChunkRow]:
    """n documents of `chunks` chunks each, every chunk its own vector."""
    return [ChunkRow(f"doc{d}", c, f"text {d}.{c}", unit(384, seed + d * chunks + c),
                     {"n": d, "parity": "even" if d % 2 == 0 else "odd"})
            for d in range(n) for c in range(chunks)]


def answers(app: psycopg.Connection[Any], corpus: str, k: int, **kw: Any) -> list[tuple[Any, ...]]:
    return [(h.document_id, h.chunk_id, h.score)
            for h in search(app, corpus, unit(384, 9999), KEY, k=k, **kw)]


WAYS: list[tuple[int, dict[str, Any]]] = [
    (5, {"group": "chunk"}),                                # the index
    (5, {}),                                                # by document: n widens (2k, 4k...)
    (7, {"filter": {"parity": "odd"}}),                     # filtered: iterative scan
    (7, {"filter": {"parity": "odd"}, "group": "chunk"}),
    (1000, {"group": "chunk"}),                             # k >= rows: the exact scan
    (1000, {"filter": {"parity": "even"}}),                 # the exact scan, filtered
]


@pytest.mark.parametrize("storage", ["vector", "halfvec", "binary"])
def test_every_way_of_reading_answers_as_the_dynamic_statement(
        owner: psycopg.Connection[Any], app: psycopg.Connection[Any], storage: str) -> None:
    """Each way a search reads a corpus (the index, by document with its widening loop, filtered,
    the exact scan, filtered or not) through the corpus's own function, then with the function
    dropped (the search's fallback: the dynamic statement it replaced, planned at each search):
    the same hits and scores, in the same session, each twice (the kept plans' second run)."""
    info = create_corpus(app, "ways", KEY, storage=storage)
    write_chunks(app, info, documents(60, 4), KEY)
    owner.execute("ANALYZE pyembed.vectors")
    assert_in_line(owner)
    (name,) = expected(owner)
    kept = [answers(app, "ways", k, **kw) for k, kw in WAYS for _ in range(2)]
    assert all(kept[i] == kept[i + 1] for i in range(0, len(kept), 2))
    assert [len(a) for a in kept[::2]] == [5, 5, 7, 7, 240, 30]
    owner.execute(f"DROP FUNCTION pyembed.{name}")  # a generated name: ids and hex only
    assert [answers(app, "ways", k, **kw) for k, kw in WAYS for _ in range(2)] == kept
    assert owner.execute("SELECT pyembed._nearest_functions(%s)", (info.corpus_id,)).fetchone() \
        == ([name],)
    assert_in_line(owner)
    assert [answers(app, "ways", k, **kw) for k, kw in WAYS for _ in range(2)] == kept


@pytest.mark.parametrize("storage", ["vector", "halfvec", "binary"])
def test_the_kept_generic_plans_read_the_hnsw_index(
        owner: psycopg.Connection[Any], storage: str) -> None:
    """The function's statements are planned once for the session with the LIMIT a parameter
    (generic plans): with the vector leg's settings they still read the partial HNSW index, by
    document (whose loop asks for 2k, then 4k...) and filtered alike, and the exact scan reads
    none. On a few hundred rows a sort is cheaper: sorting is off, so that only the index can
    order them. A binary corpus's candidates (k x its oversample setting) are a parameter too."""
    info = create_corpus(owner, "planned", KEY, storage=storage)
    write_chunks(owner, info, documents(100, 3), KEY)
    if storage == "binary":  # candidates k x oversample (a parameter), fewer than the rows
        owner.execute("SELECT pyembed.set_index_settings('planned', '{\"oversample\": 2}')")
    owner.execute("ANALYZE pyembed.vectors")
    owner.execute("LOAD 'auto_explain'")
    owner.execute("SET auto_explain.log_min_duration = 0")
    owner.execute("SET auto_explain.log_nested_statements = on")
    owner.execute("SET client_min_messages = log")
    owner.execute("SET auto_explain.log_level = notice")
    notices: list[str] = []
    owner.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
    index = f"Index Scan using vectors_hnsw_c{info.corpus_id}_"
    q = Vector(unit(384, 9999))
    for k, kw, reads_index in ((5, "", True), (5, ", group_by => 'chunk'", True),
                               (5, ", filter => '{\"parity\": \"odd\"}'", True),
                               (1000, ", group_by => 'chunk'", False)):
        for _ in range(2):
            notices.clear()
            owner.execute("SET enable_sort = off")
            owner.execute(f"SELECT * FROM pyembed.search('planned', %s, %s, {k}{kw})",
                          (q, KEY)).fetchall()
            owner.execute("RESET enable_sort")
            leg = [n for n in notices if "array_agg" in n and "LIMIT $3" in n]
            assert leg, "\n".join(notices)[-3000:]
            assert (index in leg[-1]) == reads_index, leg[-1]


def test_made_with_the_corpus_and_dropped_with_it_in_one_session(
        db: Database, owner: psycopg.Connection[Any], app: psycopg.Connection[Any]) -> None:
    """A corpus dropped and made again under its name, searched in one session throughout: the
    new corpus's function (a new id) reads the new partition, and no plan kept from the old one
    reads the dropped partition. Owned by the schema's owner, executable by it alone."""
    first = create_corpus(app, "again", KEY)
    write_chunks(app, first, rows(50, 384, prefix="old"), KEY)
    assert_in_line(owner)
    old = [h.document_id for h in search(app, "again", unit(384, 3), KEY, k=3)]
    assert old[0] == "old3"
    (name,) = functions(owner)
    assert owner.execute(
        "SELECT p.proowner = n.nspowner, has_function_privilege('pyembed_app', p.oid, 'EXECUTE'), "
        "has_function_privilege('public', p.oid, 'EXECUTE'), p.prosecdef, p.proconfig "
        "FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE p.proname = %s",
        (name,)).fetchone() == (True, False, False, False, None)
    drop_corpus(app, "again")
    assert functions(owner) == set()
    second = create_corpus(app, "again", KEY)
    assert second.corpus_id != first.corpus_id
    write_chunks(app, second, rows(50, 384, prefix="new"), KEY)
    assert_in_line(owner)
    assert search(app, "again", unit(384, 3), KEY, k=3)[0].document_id == "new3"
    with app.transaction():
        app.execute("SET TRANSACTION READ ONLY")
        assert search(app, "again", unit(384, 3), KEY, k=3)[0].document_id == "new3"


def test_a_migration_and_a_storage_change_bring_the_functions_in_line(
        owner: psycopg.Connection[Any], app: psycopg.Connection[Any]) -> None:
    """A migration's start makes the target key's function (with its own storage), its rollback
    drops it; a storage change replaces the key's function with the new storage's statement."""
    info = create_corpus(app, "moving", KEY)
    write_chunks(app, info, rows(30, 384), KEY)
    to = owner.execute("SELECT pyembed.register_model('fake', 'fake-hash', '2', 384)").fetchone()
    assert to is not None
    owner.execute("SELECT pyembed.migration_start('moving', %s, 'binary')", (to[0],))
    assert_in_line(owner)
    assert len(functions(owner)) == 2
    body = owner.execute("SELECT prosrc FROM pg_proc WHERE proname = "
                         "pyembed._nearest_function_name(%s, %s)", (info.corpus_id, to[0])).fetchone()
    assert body is not None and "binary_quantize" in body[0]
    owner.execute("SELECT pyembed.migration_rollback('moving')")
    assert_in_line(owner)
    assert len(functions(owner)) == 1
    before = search(app, "moving", unit(384, 4), KEY, k=3)
    owner.execute("SELECT pyembed.rebuild_index('moving', 'halfvec')")
    assert_in_line(owner)
    (name,) = functions(owner)
    assert "halfvec(384)" in owner.execute("SELECT prosrc FROM pg_proc WHERE proname = %s",
                                           (name,)).fetchone()[0]
    assert [h.chunk_id for h in search(app, "moving", unit(384, 4), KEY, k=3)] == [
        h.chunk_id for h in before]


def test_install_makes_them_again_and_drops_strays(
        db: Database, owner: psycopg.Connection[Any], app: psycopg.Connection[Any]) -> None:
    """A function changed by hand (its text, a grant, a SET clause), one dropped and one left
    by a corpus that is gone: `pyembed install` puts each back as the template makes it."""
    for name in ("a", "b", "c"):
        write_chunks(app, create_corpus(app, name, KEY), rows(10, 384), KEY)
    a, b, c = sorted(functions(owner), key=lambda n: int(n.split("_")[2][1:]))
    owner.execute(f"CREATE OR REPLACE FUNCTION pyembed.{a}(vector, jsonb, integer, integer, "
                  "boolean, OUT ids bigint[], OUT distances float8[], OUT scores float8[], "
                  "OUT docs bigint[]) LANGUAGE plpgsql STABLE AS 'BEGIN END'")
    owner.execute(f"GRANT EXECUTE ON FUNCTION pyembed.{b} TO pyembed_app")
    owner.execute(f"ALTER FUNCTION pyembed.{b} SET work_mem = '1MB'")
    owner.execute(f"DROP FUNCTION pyembed.{c}")
    stray = "_nearest_c999999_" + "0" * 32
    owner.execute(f"CREATE FUNCTION pyembed.{stray}() RETURNS int LANGUAGE sql AS 'SELECT 1'")
    with pytest.raises(AssertionError):
        assert_in_line(owner)
    schema.install(db.owner_dsn)
    assert_in_line(owner)
    assert len(search(app, "a", unit(384, 2), KEY, k=3)) == 3


def test_a_function_gone_between_the_legs_parse_and_its_run_is_searched_around(
        owner: psycopg.Connection[Any], app: psycopg.Connection[Any]) -> None:
    """A function dropped after the search's small statement resolved its name and before it
    ran is "cache lookup failed for function N" (XX000) to that search (an online storage change
    before its functions were replaced in place hit it): the search answers by the dynamic
    statement, as for a missing one. Any other internal error is raised as it is."""
    info = create_corpus(app, "gone", KEY)
    write_chunks(app, info, rows(20, 384), KEY)
    before = answers(app, "gone", 5)
    (name,) = functions(owner)
    for message in ("cache lookup failed for function 12345", "something else broke"):
        owner.execute(
            f"CREATE OR REPLACE FUNCTION pyembed.{name}(vector, jsonb, integer, integer, boolean, "
            "OUT ids bigint[], OUT distances float8[], OUT scores float8[], OUT docs bigint[]) "
            "LANGUAGE plpgsql STABLE AS $$BEGIN RAISE EXCEPTION USING ERRCODE = 'XX000', "
            f"MESSAGE = '{message}'; END$$")
        if message.startswith("cache"):
            assert answers(app, "gone", 5) == before
        else:
            with pytest.raises(Exception, match="something else broke"):
                answers(app, "gone", 5)
