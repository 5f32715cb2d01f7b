"""What a statement of the package goes through on a psycopg connection: its integer parameters
checked, its errors translated to pyembed's.

The modules that PL/Python imports (the cache, search, corpora, models, tenants) use these on
their client path; inside PostgreSQL their statements run through plpy, so this module imports
psycopg only when a statement runs, where the client has imported it already.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from . import errors
from .text import check_whole_number

if TYPE_CHECKING:
    import psycopg


@contextmanager
def translated() -> Iterator[None]:
    """Re-raise database errors with a pyembed SQLSTATE as pyembed errors."""
    import psycopg  # loaded by the connection the statement in here runs on

    from .db import translate

    try:
        yield
    except psycopg.Error as exc:
        mapped = translate(exc)
        if mapped is exc:
            raise
        raise mapped from exc
    except UnicodeEncodeError as exc:  # a parameter psycopg cannot send (a lone surrogate)
        raise errors.InvalidInput(
            f"a value PostgreSQL cannot store: {exc.object[exc.start:exc.end]!r} at "
            f"position {exc.start} ({exc.reason})") from None


INTEGER_RANGE = (-2**31, 2**31 - 1)
"""What PostgreSQL's `integer` holds."""


def integer(value: object, what: str, conn: psycopg.Connection[Any] | None = None) -> int:
    """`value` as an int for an `integer` parameter of pyembed's SQL, whose own checks then bound
    it; InvalidInput naming `what` otherwise. The driver would round 2.5 or cast "3" on the way
    in, and send a number past PostgreSQL's integer as a bigint, which fails as "integer out of
    range" or as no such function instead of reaching the parameter's check. Given `conn`, a
    setting stored in a row (chunk_tokens, max_batch, a tenant's limits) is checked by
    pyembed._check_setting, against the range its table's CHECK holds and in SQL's words (a
    number past bigint goes as numeric)."""
    number = count(value, what)  # a whole number, or InvalidInput in count's words
    if conn is not None:
        with translated(), conn.transaction():
            row = conn.execute("SELECT pyembed._check_setting(%s, %s::numeric)",
                               (what, number)).fetchone()
        if row and row[0]:
            return number
    low, high = INTEGER_RANGE
    if low <= number <= high:
        return number
    raise errors.InvalidInput(f"{what} must be a whole number from {low} to {high}, not {number}")


def count(value: object, what: str, bounds: tuple[int, int] | None = None) -> int:
    """`value` as an int for a count: InvalidInput naming `what` for a value that is not a
    whole number. One that pyembed's SQL takes as `numeric` (days, hours, queries, max_samples,
    share) has its range in the SQL function's check alone, which a number of any size reaches
    (the driver sends one past bigint as numeric): no `bounds` here. A count only Python takes
    (rag.answer's max_tokens) gives its `bounds`, said in the SQL check's words
    (pyembed._count_arg: `what must be low..high, got value`)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise errors.InvalidInput(f"{what} must be a whole number, not {errors.shown(value)}")
    number = check_whole_number(int(value), what)  # the driver needs its digits
    if bounds is not None and not bounds[0] <= number <= bounds[1]:
        raise errors.InvalidInput(f"{what} must be {bounds[0]}..{bounds[1]}, got {number}")
    return number
