"""One way to run pyembed's SQL from the package and from inside PostgreSQL.

The same statement text (PostgreSQL's own `$1` placeholders, every parameter cast) runs through
a psycopg connection or through PL/Python's `plpy`, so code that reads or writes the database
(the cache, search dispatch) is written once for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from .errors import from_sqlstate

if TYPE_CHECKING:
    import psycopg


@runtime_checkable
class Executor(Protocol):
    def rows(self, sql: str, params: Sequence[Any], types: Sequence[str], *,
             binary: bool = False) -> list[tuple[Any, ...]]:
        """Run `sql` with `params` (of PostgreSQL `types`, for plpy); the rows it returns
        (`binary`: read in binary form where the driver can, for vectors). A database error
        with a pyembed SQLSTATE is raised as its pyembed error."""

    def vectors(self, vectors: Sequence[npt.NDArray[np.float32]]) -> list[Any]:
        """`vectors` as a parameter the statement casts with `::vector[]`."""

    def vector(self, value: Any) -> npt.NDArray[np.float32]:
        """A `vector` the statement returned, as float32."""


def unpack_sqlstate(code: int) -> str:
    """PostgreSQL's packed error code (six bits a character, first character lowest) as its five
    characters."""
    return "".join(chr(((code >> (6 * i)) & 0x3F) + ord("0")) for i in range(5))


def vector_text(vec: npt.NDArray[np.float32]) -> str:
    """pgvector's text form; repr keeps every float32 exactly."""
    return "[" + ",".join(map(repr, np.asarray(vec, dtype=float).tolist())) + "]"


class PlpyExecutor:
    """Statements through PL/Python's SPI, prepared once per backend (plans kept in GD)."""

    def __init__(self, plpy: Any, GD: dict[str, Any]) -> None:
        self.plpy, self.GD = plpy, GD

    def rows(self, sql: str, params: Sequence[Any], types: Sequence[str], *,
             binary: bool = False) -> list[tuple[Any, ...]]:
        plans = self.GD.setdefault("pyembed.plans", {})
        if sql not in plans:
            plans[sql] = self.plpy.prepare(sql, list(types))
        try:  # each plpy.execute runs in a subtransaction of its own: its error can be caught
            result = self.plpy.execute(plans[sql], list(params))
        except self.plpy.SPIError as exc:
            spidata = getattr(exc, "spidata", None)  # where a code without a class (ours) is
            sqlstate = unpack_sqlstate(spidata[0]) if spidata else getattr(exc, "sqlstate", None)
            mapped = from_sqlstate(sqlstate, str(exc.args[0] if exc.args else exc))
            if mapped is None:
                raise
            raise mapped from None
        columns = result.colnames() if len(result) else []  # len: rows returned, not affected
        return [tuple(r[c] for c in columns) for r in result]

    def vectors(self, vectors: Sequence[npt.NDArray[np.float32]]) -> list[Any]:
        return [vector_text(v) for v in vectors]

    def vector(self, value: Any) -> npt.NDArray[np.float32]:
        return np.array(str(value)[1:-1].split(","), dtype=np.float32)


def executor(db: psycopg.Connection[Any] | Executor) -> Executor:
    """`db` itself, or a psycopg connection's statements as an Executor."""
    if isinstance(db, Executor):
        return db
    from .db import PsycopgExecutor  # a connection: the client's path, which loaded psycopg

    return PsycopgExecutor(db)
