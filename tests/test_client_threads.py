"""One Client shared by threads: its calls take turns on its connection. Before, two threads'
transactions nested on the one connection (psycopg's OutOfOrderTransactionNesting), and an add
that reported success could be rolled back with another thread's transaction, or be left
uncommitted until the client closed: adds reported, nothing stored."""

from __future__ import annotations

import threading
from typing import Any

import psycopg

from pyembed.client import Client
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
