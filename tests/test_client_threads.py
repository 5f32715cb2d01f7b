"""One Client shared by threads: its calls take turns on its connection. Before, two threads'
transactions nested on the one connection (psycopg's OutOfOrderTransactionNesting), and an add
that reported success could be rolled back with another thread's transaction, or be left
uncommitted until the client closed: adds reported, nothing stored."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

import pyembed
from pyembed import evaluation, migration
from pyembed.client import Client
from pyembed.compare import compare
from tests.conftest import Database
from tests.fakeapi import FakeAPI
from tests.helpers import count

KEY = "fake/fake-hash@1:384"
THREADS, ROUNDS = 6, 8


def test_threads_sharing_a_client_store_every_add_they_are_told_of(
        client: Client, app: psycopg.Connection[Any]) -> None:
    client.create_corpus("shared", KEY)
    client.create_corpus("other", KEY)
    added: list[int] = []
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        corpus = client.corpus("shared" if thread % 2 else "other")
        for n in range(ROUNDS):
            try:
                added.append(corpus.add([(f"t{thread}-{n}", f"thread {thread} text {n}")]).added)
                for mode in ("vector", "keyword", "hybrid"):
                    corpus.search(f"thread {thread} text {n}", k=3, mode=mode)
            except BaseException as exc:  # every failure is the finding
                errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert sum(added) == THREADS * ROUNDS
    assert client.conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert count(app, "documents") == THREADS * ROUNDS  # seen from another session: committed


def test_what_a_client_hands_out_waits_for_its_turn(client: Client,
                                                   owner: psycopg.Connection[Any]) -> None:
    """An embedder from client.embedder() shares the client's connection: its cache lookup and
    store and its usage reservation wait while another thread's call holds the turn with a
    transaction open (as Corpus.write does). Before, they ran inside that transaction and were
    rolled back with it: a provider call made, its usage and cache entry gone."""
    embedder = client.embedder(KEY)
    inside = threading.Event()
    done = threading.Event()
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            embedder.embed(["a text no one embedded before"])
        except BaseException as exc:  # every failure is the finding
            errors.append(exc)
        finally:
            done.set()

    class RolledBack(Exception):
        pass

    with client.turn:
        try:
            with client.conn.transaction():
                client.conn.execute("SELECT 1")
                inside.set()
                worker = threading.Thread(target=other_thread)
                worker.start()
                assert not done.wait(1.0)  # it waits for the turn
                raise RolledBack
        except RolledBack:
            pass
    worker.join(10)
    assert errors == [] and done.is_set()
    assert client.conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert owner.execute("SELECT count(*) FROM pyembed.usage WHERE model_key = %s",
                         (KEY,)).fetchone() == (1,)
    assert owner.execute("SELECT count(*) FROM pyembed.embedding_cache WHERE model_key = %s",
                         (KEY,)).fetchone() == (1,)


OPENAI = "openai/text-embedding-3-small@1:1536"
DELAY = 4.0
"""Seconds the slow fake provider takes to answer."""


@pytest.mark.parametrize("path", ["add", "search", "rerank", "backfill", "compare"])
def test_a_provider_call_holds_no_turn_of_the_client(
        db: Database, fake_api: FakeAPI, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """While one thread's call of a shared client waits on a slow provider (an add's, a
    search's query, a rerank, a migration's backfill, a comparison), another thread's search
    runs: the turn is given back around the provider call. Before, the search waited for the
    HTTP answer."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-turns-1")
    monkeypatch.setenv("VOYAGE_API_KEY", "pa-turns-1")
    with pyembed.connect(db.owner_dsn) as client:
        fast = client.create_corpus("fast", KEY)
        fast.add([("d", "a text searched meanwhile")])
        slow = client.create_corpus("slow", OPENAI if path in ("add", "search", "rerank") else KEY)
        slow.add([("s", "a text of the slow corpus")])
        if path == "backfill":
            migration.start(client, "slow", OPENAI)
        if path == "compare":
            evaluation.add_eval_query(client, "slow", "q", "slow corpus", ["s"])
        calls: dict[str, Callable[[], object]] = {
            "add": lambda: slow.add([("n", "a new text")]),
            "search": lambda: slow.search("a query not cached yet", k=1),
            "rerank": lambda: slow.search("a text", k=1, mode="keyword",
                                          rerank="voyage/rerank-2.5"),
            "backfill": lambda: migration.backfill(client, "slow"),
            "compare": lambda: compare(client, "slow", [OPENAI]),
        }
        errors: list[BaseException] = []

        def slow_call() -> None:
            try:
                calls[path]()
            except BaseException as exc:  # the finding
                errors.append(exc)

        fake_api.reset()
        fake_api.script(f"slow={DELAY}")
        thread = threading.Thread(target=slow_call)
        thread.start()
        deadline = time.monotonic() + 30
        while not fake_api.requests and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fake_api.requests, errors
        started = time.perf_counter()
        assert fast.search("a text searched meanwhile", k=1)[0].document_id == "d"
        took = time.perf_counter() - started
        thread.join()
        assert errors == []
        assert took < DELAY / 2, f"the search waited {took:.2f} s on another thread's call"


def test_async_code_calls_a_shared_client_through_threads(client: Client) -> None:
    """README's advice for async code (no async API): asyncio.to_thread, each call taking its
    turn on the shared client, every answer its own query's."""
    import asyncio

    docs = client.create_corpus("aio", KEY)
    docs.add([(f"d{i}", f"error E40{i:02d} means quota {i} is used up") for i in range(8)])

    async def main() -> list[str]:
        found = await asyncio.gather(*(asyncio.to_thread(docs.search, f"E40{i:02d}", k=1,
                                                         mode="keyword") for i in range(8)))
        return [hits[0].document_id for hits in found]

    assert asyncio.run(main()) == [f"d{i}" for i in range(8)]
