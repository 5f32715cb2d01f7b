"""A number past PostgreSQL's integer, given where pyembed's SQL takes an `integer`, is refused
as invalid input naming the parameter, from Python and from the command line: before, the
driver sent it as a bigint, which failed as "integer out of range" or as "function
pyembed.create_corpus(..., bigint, ...) does not exist" instead of reaching the parameter's
check. A tenant's limit below 1 is named too (it was reported as an invalid tenant name).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest

import pyembed
from pyembed import cache, migration, recall, tenants
from pyembed.errors import InvalidInput
from pyembed.models import ModelSpec
from tests.conftest import Database
from tests.helpers import run_cli as cli
from tests.test_cli import db_env

FAKE = "fake/fake-hash@1:384"
HUGE = 2**31  # one past PostgreSQL's integer
EDGES = [HUGE, -HUGE - 1, 10**20]


def entry_points(app: pyembed.Client, owner: pyembed.Client
                 ) -> dict[str, Callable[[int], Any]]:
    """Each entry point that hands an integer to pyembed's SQL, by the parameter's name."""
    docs = app.corpus("docs")
    return {
        "chunk_tokens": lambda n: app.create_corpus("other", FAKE, chunk_tokens=n),
        "chunk_overlap": lambda n: app.create_corpus("other", FAKE, chunk_overlap=n),
        "k": lambda n: docs.search("alpha", k=n, mode="keyword"),
        "share": lambda n: migration.shift(owner, "docs", n),
        "requests_per_minute": lambda n: tenants.create_tenant(owner.conn, "t",
                                                               requests_per_minute=n),
        "tokens_per_minute": lambda n: tenants.create_tenant(owner.conn, "t",
                                                             tokens_per_minute=n),
        "days": lambda n: tenants.usage(app.conn, n),
        "queries": lambda n: recall.measure(app.conn, "docs", n),
        "max_samples": lambda n: recall.measure_sampled(app.conn, n),
        "hours": lambda n: recall.report(app.conn, n),
        "max_batch": lambda n: owner.register_model(ModelSpec("fake", "m", "1", 4, max_batch=n)),
        "max_tokens": lambda n: owner.register_model(ModelSpec("fake", "m", "1", 4, max_tokens=n)),
    }


def test_a_number_past_postgres_integer_is_invalid_input_naming_its_parameter(
        db: Database) -> None:
    with pyembed.connect(db.app_dsn) as app, pyembed.connect(db.owner_dsn) as owner:
        app.create_corpus("docs", FAKE).add([("a", "alpha text")])
        migration.start(owner, "docs", "fake/fake-hash@2:1024")
        for name, call in entry_points(app, owner).items():
            for n in EDGES:
                with pytest.raises(InvalidInput, match=f"^{name} must be a whole number from "
                                                       f"-2147483648 to 2147483647, not {n}$"):
                    call(n)
        with pytest.raises(InvalidInput, match=r"^days must be a whole number"):
            cache.stats(app.conn, HUGE)
        # In range, each still reaches the database's own check (or works).
        with pytest.raises(InvalidInput, match=r"k must be 1\.\.1000"):
            app.corpus("docs").search("alpha", k=2**31 - 1, mode="keyword")
        with pytest.raises(InvalidInput, match="a report covers"):
            tenants.usage(app.conn, 0)
        assert app.corpus("docs").search("alpha", k=1, mode="keyword")[0].document_id == "a"


@pytest.mark.parametrize("args", [
    ("search", "docs", "alpha", "-k", str(HUGE)),
    ("ask", "docs", "alpha", "-k", str(HUGE)),
    ("corpus", "create", "other", "--chunk-tokens", str(HUGE)),
    ("migrate", "shift", "docs", str(HUGE)),
    ("tenant", "create", "t", "--rpm", str(HUGE)),
])
def test_the_command_line_says_which_number_is_too_large(db: Database,
                                                         args: tuple[str, ...]) -> None:
    with pyembed.connect(db.app_dsn) as app:
        app.create_corpus("docs", FAKE).add([("a", "alpha text")])
    out = cli(*args, env=db_env(db))
    assert out.returncode == 1, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert f"must be a whole number from -2147483648 to 2147483647, not {HUGE}" in lines[0]


def test_a_tenant_limit_below_1_is_named_not_blamed_on_the_name(
        owner: psycopg.Connection[Any]) -> None:
    for kwargs, message in [({"requests_per_minute": 0}, "requests_per_minute must be 1 or more"),
                            ({"tokens_per_minute": -5}, "tokens_per_minute must be 1 or more")]:
        with pytest.raises(InvalidInput, match=f"^{message} \\(or unlimited\\), not "):
            tenants.create_tenant(owner, "acme", **kwargs)
    with pytest.raises(InvalidInput, match=r"^invalid tenant name 'Acme!': use 1-63"):
        tenants.create_tenant(owner, "Acme!", requests_per_minute=10)
    assert tenants.create_tenant(owner, "acme", requests_per_minute=10) > 0
