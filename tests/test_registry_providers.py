"""A registered model's provider is one pyembed can call: the registry (pyembed.models) refuses
another, from SQL as from Python. Before, `pyembed.register_model` (then granted to the
application role) took any provider name; a corpus on such a model took documents it could never
embed. The registry is the owner's now (test_privileges)."""

from __future__ import annotations

import re
from typing import Any

import psycopg
import pytest

import pyembed
from pyembed.client import Client
from pyembed.providers import _CLASSES

REGISTER = ("SELECT pyembed.register_model(%s, 'm', '1', 384, 'cosine', true, false, 64, 512, "
            "NULL, NULL, NULL)")


def test_a_provider_pyembed_does_not_know_is_refused(owner: psycopg.Connection[Any]) -> None:
    conn = owner
    with pytest.raises(psycopg.errors.CheckViolation, match="models_provider_check"):
        conn.execute(REGISTER, ("nosuchprov",))
    assert conn.execute(REGISTER, ("fake",)).fetchone() == ("fake/m@1:384",)


def test_the_python_registry_refuses_it_too(owner_client: Client) -> None:
    with pytest.raises(pyembed.InvalidInput, match=r"models\.provider is not a value"):
        owner_client.register_model(pyembed.ModelSpec("nosuchprov", "m", "1", 384))


def test_the_check_names_every_provider_pyembed_has(owner: psycopg.Connection[Any]) -> None:
    row = owner.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                        "WHERE conname = 'models_provider_check'").fetchone()
    assert row is not None
    assert set(re.findall(r"'(\w+)'", row[0])) == set(_CLASSES)
