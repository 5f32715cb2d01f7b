"""Connections: which DSN to use, psycopg with pgvector registered, database errors mapped."""

from __future__ import annotations

import os
import re
import select
import sys
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
from pgvector import Vector
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.pq import ConnStatus, TransactionStatus
from psycopg.types.array import ListBinaryDumper

from . import errors
from .config import DSN_ENV, OWNER_DSN_ENV, WORKER_DSN_ENV
from .dbcall import translated


def resolve_dsn(*, owner: bool = False, worker: bool = False) -> str:
    """$PYEMBED_DSN (or $PYEMBED_OWNER_DSN for the owner, $PYEMBED_WORKER_DSN then $PYEMBED_DSN
    for a worker), else the local cluster's (its worker login for a worker: a member of
    pyembed_worker, which counts failed provider calls)."""
    if owner and os.environ.get(OWNER_DSN_ENV):
        return os.environ[OWNER_DSN_ENV]
    if worker and os.environ.get(WORKER_DSN_ENV):
        return os.environ[WORKER_DSN_ENV]
    if os.environ.get(DSN_ENV):
        return os.environ[DSN_ENV]
    from .localdb import LocalCluster

    return LocalCluster().dsn(owner=owner, worker=worker)


def dsn_parts(dsn: object) -> dict[str, Any]:
    """A libpq DSN or URL's parameters; ConfigError "not a DSN: ..." (the password redacted, as
    libpq quotes what it cannot parse) for one it cannot parse, InvalidInput for a non-string."""
    from psycopg.conninfo import conninfo_to_dict

    if not isinstance(dsn, str):
        raise errors.InvalidInput(f"a DSN is a string, not {errors.shown(dsn)}")
    try:
        return conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise errors.ConfigError(
            f"not a DSN: {errors.redact(' '.join(str(exc).split()))[:300]}") from None


class VectorArray(list[Vector]):
    """Vectors for a `::vector[]` parameter, sent in pgvector's binary form on a connection
    from `connect` (psycopg sends a plain list as text: every float printed and parsed)."""


class PsycopgExecutor:
    """Statements on a psycopg connection (vector types registered), as its own statements."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def rows(self, sql: str, params: Sequence[Any], types: Sequence[str] = (), *,
             binary: bool = False) -> list[tuple[Any, ...]]:
        with translated(), psycopg.RawCursor(self.conn) as cur:
            cur.execute(sql, list(params), binary=binary)
            return cur.fetchall() if cur.description else []

    def vectors(self, vectors: Sequence[npt.NDArray[np.float32]]) -> list[Any]:
        return VectorArray(Vector(v) for v in vectors)

    def vector(self, value: Any) -> npt.NDArray[np.float32]:
        return np.asarray(value.to_numpy() if isinstance(value, Vector) else value, dtype=np.float32)



def connect(dsn: str | None = None, *, owner: bool = False, **kwargs: Any) -> psycopg.Connection[Any]:
    """A psycopg connection with the vector types registered (if the extension exists), and
    VectorArray sent in binary."""
    target = dsn or resolve_dsn(owner=owner)
    dsn_parts(target)  # one that libpq cannot parse: ConfigError, not psycopg's error
    conn = psycopg.connect(target, **kwargs)
    opened_here(conn)
    conn.add_notice_handler(_warned)
    try:
        _prepare(conn)
    except psycopg.Error as exc:
        # The connection opened: a statement of its own the server refused (a statement_timeout
        # hit while a catalogue it reads was locked), not a database out of reach, which is what
        # its callers took a psycopg.OperationalError here for.
        conn.close()
        if connection_lost(exc):
            raise
        raise translate(exc) from exc
    return conn


def _prepare(conn: psycopg.Connection[Any]) -> None:
    if conn.pgconn.parameter_status(b"standard_conforming_strings") != b"on":
        # (A role's or database's setting for older applications.) psycopg escapes a bytea in an
        # array parameter by it, doubling its backslashes, and the server then reads 66 bytes
        # of text for a 32-byte cache key: pyembed's SQL reads alike either way.
        with conn.transaction():
            conn.execute("SET standard_conforming_strings = on")
    try:
        register_vector(conn)
    except psycopg.ProgrammingError:
        pass  # extension not installed yet: `pyembed install` creates it
    else:
        conn.adapters.register_dumper(VectorArray, ListBinaryDumper)


def _warned(diag: psycopg.errors.Diagnostic) -> None:
    """pyembed's NOTICE that a search found fewer hits than asked for while chunks wait for the
    worker, as the Python warning NotEmbeddedYet (with its hint, as an error shows one)."""
    if diag.sqlstate == errors.NOT_EMBEDDED_YET:
        hint = f" (hint: {diag.message_hint})" if diag.message_hint else ""
        warnings.warn(errors.NotEmbeddedYet(f"{diag.message_primary}{hint}"),
                      stacklevel=_callers_level())


def _callers_level() -> int:
    """warnings.warn's stacklevel, called from _warned, of the first frame outside psycopg and
    pyembed: the warning names the line of your code that searched, not psycopg's notice
    callback (Python 3.11 has no skip_file_prefixes)."""
    level, frame = 2, sys._getframe(2)
    while frame.f_back is not None and \
            str(frame.f_globals.get("__name__")).partition(".")[0] in ("psycopg", "pyembed"):
        level, frame = level + 1, frame.f_back
    return level


def conninfo(conn: psycopg.Connection[Any]) -> str:
    """The connection string `conn` was opened with (its password too), to open it again: a
    multi-host DSN stays one, so that libpq chooses a server again."""
    params = conn.info.get_parameters()
    if conn.info.password:
        params["password"] = conn.info.password
    return make_conninfo("", **params)


_OPENED_IN: weakref.WeakKeyDictionary[psycopg.Connection[Any], int] = weakref.WeakKeyDictionary()
"""The process each long-lived connection belongs to (inherited)."""


def opened_here(conn: psycopg.Connection[Any]) -> None:
    """Record that `conn` belongs to this process: `connect`'s connections, and those given to a
    Client, which may be used or closed only in the process that opened them (inherited)."""
    _OPENED_IN.setdefault(conn, os.getpid())


def inherited(conn: psycopg.Connection[Any]) -> int | None:
    """The process that opened `conn`, when this one is a child it forked after (a preloading
    application server): the socket is that process's session, in which a statement from here
    would mix the two processes' messages and results, and which a close from here would end
    (libpq's close tells the server so). Such a connection is released here, without a word to
    the server: this process's copy of the socket is pointed at the null device, then closed.
    None for a connection of this process."""
    pid = _OPENED_IN.get(conn)
    if pid is None or pid == os.getpid():
        return None
    if not conn.closed:
        null = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(null, conn.pgconn.socket)
        finally:
            os.close(null)
        conn.close()
    return pid


def release(conn: psycopg.Connection[Any]) -> None:
    """Close `conn`; one inherited from a parent process is only released (inherited)."""
    if inherited(conn) is None:
        conn.close()


def lost(conn: psycopg.Connection[Any]) -> bool:
    """Whether `conn` is gone: closed, inherited from the process this one forked from (and
    released, see inherited), or, between statements, closed by its server (a restart, a
    terminated backend). Seen without a round trip: the server's last message and the end of
    its socket are read if they are there."""
    if inherited(conn) is not None or conn.closed:
        return True
    with conn.lock:
        if conn.info.transaction_status == TransactionStatus.ACTIVE:
            return False  # a statement in flight answers for itself
        try:
            ready, _, _ = select.select([conn.pgconn.socket], [], [], 0)
            if ready:
                conn.pgconn.consume_input()
                conn.pgconn.consume_input()  # the end of a closed socket comes after its data
        except (psycopg.OperationalError, OSError, ValueError):
            return True
        return conn.pgconn.status == ConnStatus.BAD


def connection_lost(exc: psycopg.Error) -> bool:
    """Whether `exc` says the database was not reached (no connection, or one it closed or
    refused: no SQLSTATE, class 08, 57P, too many connections), as opposed to an error the
    server returned for a statement (a statement or lock timeout, a deadlock, a serialization
    failure), which psycopg gives the same Python class, OperationalError."""
    state = exc.sqlstate or ""
    return not state or state == "53300" or state.startswith(("08", "57P"))


def unreachable(exc: psycopg.Error) -> errors.DatabaseNotReady:
    """DatabaseNotReady for a connection that did not open, in the words of every entry point
    that opens one (pyembed.connect, load_vectors)."""
    return errors.DatabaseNotReady("cannot reach the database: "
                                   + " ".join(str(exc).split())[:300])


def lost_during(what: str, exc: BaseException, then: str = "") -> errors.DatabaseNotReady:
    """DatabaseNotReady for a connection lost `what` (during the call, while measuring recall):
    the server's words in one line, then `then` (what was kept, what the next call does)."""
    return errors.DatabaseNotReady(f"the connection to the database was lost {what} ("
                                   + " ".join(str(exc).split())[:200] + ")" + then)


def server_error(exc: psycopg.Error) -> str:
    """What the server said, in one line: its class, SQLSTATE and message."""
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}, SQLSTATE {exc.sqlstate}: {text}"


IDENTITY = ("SELECT session_user::text, current_user::text, "
             "coalesce(current_setting('pyembed.act_as_tenant', true), '')")
"""Who a session acts as: its login role, its current role (SET ROLE) and the tenant a superuser
acts for (pyembed.current_tenant() reads the first and the last; privileges, the second)."""


def identity(conn: psycopg.Connection[Any]) -> tuple[str, ...]:
    """Who `conn`'s session acts as: login role, current role, tenant setting (IDENTITY)."""
    idle = conn.info.transaction_status == TransactionStatus.IDLE
    with translated():
        row = conn.execute(IDENTITY).fetchone()
    if idle and not conn.autocommit:
        conn.rollback()  # (nothing was written: the caller's connection stays idle)
    return tuple(str(v) for v in row) if row else ("", "", "")


def reopen(dsn: str | None, acted_as: tuple[str, ...] | None, what: str, *,
           handed_out: str | None = None, old: psycopg.Connection[Any] | None = None,
           **kwargs: Any) -> tuple[psycopg.Connection[Any], tuple[str, ...]]:
    """A new connection for the `what`'s (a client's, a worker's), which the server closed (or,
    `old` inherited, this process forked from its owner), and who it acts as; never silently
    as another role or tenant than `acted_as` (the first connection's): DatabaseNotReady saying
    why, as when the old one was `handed_out` to your code (which may have SET ROLE on it). The
    rule of every object in pyembed that owns a connection and opens it again."""
    parent = inherited(old) if old is not None else None
    gone = (f"the {what}'s connection belongs to process {parent}, which this process forked "
            "from after connecting (the two would share one session)"
            if parent is not None else f"the server closed the {what}'s connection")
    if handed_out:
        raise errors.DatabaseNotReady(
            f"{gone}, and {handed_out} was handed to your "
            "code, "
            "which may have changed its role (SET ROLE) or tenant: a new connection would act as "
            f"the login instead. Nothing was sent; call {what}.reconnect() to go on as the "
            "login, or make a new one")
    conn = connect(dsn, **kwargs)
    now = identity(conn)
    if acted_as is not None and now != acted_as:
        conn.close()
        raise errors.DatabaseNotReady(
            f"{gone}, which acted as role {acted_as[1]!r} "
            f"(tenant {acted_as[2] or 'of the login'}); a new one acts as {now[1]!r} (tenant "
            f"{now[2] or 'of the login'}). Nothing was sent; call {what}.reconnect() to go on "
            "as the login, or make a new one")
    return conn, now


def twin(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any] | None:
    """A second connection (autocommit) to `conn`'s server and database that acts as `conn`
    does: the same login role, current role and tenant setting, so privileges and row-level
    security treat both alike. None when one cannot be opened or would act otherwise."""
    params = conn.info.get_parameters()
    # The server `conn` reached, not another of a multi-host DSN (a standby, say).
    params.update(host=conn.info.host, port=str(conn.info.port))
    if conn.info.hostaddr:
        params["hostaddr"] = conn.info.hostaddr
    for choice in ("load_balance_hosts", "target_session_attrs"):
        params.pop(choice, None)
    if conn.info.password:
        params["password"] = conn.info.password
    try:
        other = connect(make_conninfo("", **params), autocommit=True)
    except psycopg.Error:
        return None
    try:
        login, role, tenant = conn.execute(IDENTITY).fetchone() or ("", "", "")
        now = other.execute(IDENTITY).fetchone()
        if now is not None and now[1] != role:
            other.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        if now is not None and now[2] != tenant:
            other.execute("SELECT set_config('pyembed.act_as_tenant', %s, false)", (tenant,))
        if other.execute(IDENTITY).fetchone() == (login, role, tenant):
            return other
    except psycopg.Error:
        pass
    other.close()
    return None


BOUND_SUFFIX = "_bound"
"""A table's bound on a column's length is the CHECK <table>_<column>_bound (revision 0022)."""

COLUMN_CHECKS = {BOUND_SUFFIX: "is longer than pyembed accepts",
                 "_in_range": "is out of the range pyembed accepts",
                 "_check": "is not a value pyembed accepts"}
"""A CHECK on one column is named <table>_<column><suffix> (PostgreSQL's own name for a column's
CHECK ends in _check): what a value that breaks it is, by suffix."""

ROW_CHECKS = {
    "models_key_is_parts": "a model key is provider/model_id@version:dimensions",
    "models_price_in_range": "a model's price is 0 to 1000000 per million tokens",
    "corpora_overlap_below_size": "a corpus's chunk overlap is below its chunk size",
    "corpora_share_needs_target": "a corpus shifts traffic only to a migration target",
    "corpora_target_differs": "a migration's target key differs from the corpus's key",
    "corpora_storage_known": "a corpus's storage is vector, halfvec or binary",
    "corpora_target_storage_known": "a corpus's storage is vector, halfvec or binary",
    "corpora_index_settings_object": "index settings are a JSON object",
    "corpora_index_settings_known": "index settings are m, ef_construction, ef_search or "
                                    "oversample, each an integer in its range "
                                    "(pyembed._index_settings_problem says which is not)",
    "recall_samples_filter_object": "a recall sample's filter is a JSON object",
    "documents_metadata_object": "a document's metadata is a JSON object",
    "chunks_metadata_object": "a chunk's metadata is a JSON object",
    "migrations_validation_object": "a migration's validation report is a JSON object",
    "migration_events_detail_object": "a migration event's detail is a JSON object",
    "cache_stats_counts_not_negative": "cache hit and miss counts are not negative",
    "cache_stats_counts_in_range": "cache hit and miss counts are 0 to 2147483647 a call",
    "usage_counts_not_negative": "usage requests, tokens and cost are not negative",
}
"""The CHECKs over a row (or named for their rule): what each requires. Every CHECK of the
schema is one of these or a column's (COLUMN_CHECKS); tests/test_hardening.py walks them."""

_PARTITION_OF = re.compile(r"_c\d+$")

TEXT_CHECKS = {"chunks_content_check": "content", "eval_queries_query_check": "query"}
"""The CHECKs that a text column holds text (revision 0027: not only whitespace, control and
format characters), by name, and their column."""


def check_message(table: str, check: str) -> str | None:
    """What breaking the CHECK `check` of `table` (a partition: of its table) means, naming the
    column; None for a name that follows neither ROW_CHECKS nor COLUMN_CHECKS."""
    if not check.startswith(table + "_"):
        table = _PARTITION_OF.sub("", table)
    if check in TEXT_CHECKS:
        return (f"{table}.{TEXT_CHECKS[check]} is empty or only whitespace and control "
                f"characters (the table's check {check})")
    if check in ROW_CHECKS:
        return f"{ROW_CHECKS[check]} (the table's check {check})"
    for suffix, means in COLUMN_CHECKS.items():
        if check.endswith(suffix) and check.startswith(table + "_") \
                and len(check) > len(table) + 1 + len(suffix):
            column = check[len(table) + 1:-len(suffix)]
            return f"{table}.{column} {means} (the table's check {check})"
    return None


def translate(exc: psycopg.Error) -> Exception:
    """Our error class for a database error raised by pyembed's SQL, or by a statement of yours
    on pyembed's tables: a value a CHECK or NOT NULL refuses, or a row a foreign or unique key
    refuses (InvalidInput); a row of a corpus row-level security hides (UnknownCorpus); a table,
    column or function the role may not use (NotAllowed, OwnerOnly); a lock another session
    held too long (Busy). Else the error itself."""
    diag = exc.diag
    table, check = diag.table_name or "", diag.constraint_name or ""
    if isinstance(exc, psycopg.errors.CheckViolation) and diag.schema_name == "pyembed":
        means = check_message(table, check)
        if means:
            return errors.InvalidInput(means)
    if isinstance(exc, psycopg.errors.NotNullViolation) and diag.schema_name == "pyembed":
        return errors.InvalidInput(f"{_PARTITION_OF.sub('', table)}.{diag.column_name} "
                                   "needs a value")
    message = diag.message_primary or str(exc)
    # (PL/Python's prefix on an error a body raised that no PL/pgSQL wrapper raised again:
    # pyembed._cannot_import's, from pyembed._bm25_top under a keyword search)
    message = message.removeprefix("plpy.SPIError: ")
    if isinstance(exc, psycopg.errors.UntranslatableCharacter) or (
            type(exc) is psycopg.DataError and "NUL" in message) or (
            isinstance(exc, psycopg.errors.InvalidTextRepresentation)
            and message.startswith("invalid input syntax for type json")):
        # psycopg refuses a NUL in a text parameter before sending it, the server a \u0000 or
        # a lone surrogate in JSON (or a character its encoding lacks): the caller's value,
        # whatever the entry point.
        detail = f" ({diag.message_detail})" if diag.message_detail else ""
        return errors.InvalidInput(f"a value PostgreSQL cannot store: {message}{detail}")
    if isinstance(exc, (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected)):
        # The server answered: another session holds a lock the statement waited for longer
        # than its lock_timeout (pyembed's own bounds included), or the two deadlocked.
        return errors.Busy(f"{message}: another session holds what this needs (a transaction "
                           "left open, a load or an index build on the corpus); the statement "
                           "changed nothing: retry when it is done")
    if isinstance(exc, psycopg.errors.SerializationFailure):
        # (A session whose default_transaction_isolation is serializable or repeatable read.)
        return errors.Busy(f"{message}: another session's transaction changed what this one "
                           "read or writes (this session's isolation is serializable or "
                           "repeatable read), and this one changed nothing: retry")
    if isinstance(exc, psycopg.errors.QueryCanceled):
        # The server cancelled the statement: it ran past the session's statement_timeout (a
        # role's or database's setting, or your own), or someone cancelled it.
        if "statement timeout" in message:
            return errors.Busy(f"{message}: the statement took longer than this session allows "
                               "(statement_timeout), and changed nothing: retry, or raise the "
                               "timeout for this login (ALTER ROLE ... SET statement_timeout)")
        return errors.Busy(f"{message}: another session cancelled the statement "
                           "(pg_cancel_backend), and it changed nothing: retry")
    if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
        # A write on a hot standby, or in a transaction or session that is read-only.
        return errors.ReadOnlyReplica(f"{message}: this session cannot write (a replica, or a "
                                      "read-only transaction): run it on the primary")
    gone = _dropped_corpus(exc, message)
    if gone:
        return gone
    mistyped = _WRONG_TYPES.match(message) if isinstance(
        exc, psycopg.errors.UndefinedFunction) else None
    if mistyped:
        # psycopg types a parameter by its Python value: an int, float, bytes or bool where a
        # corpus name or a key goes finds no function of that signature.
        return errors.InvalidInput(f"{mistyped[1]}() takes no arguments of the types "
                                   f"({mistyped[2]}): a corpus name, model key, id or text is a "
                                   "str")
    owners = _owner_only(exc, message)
    if owners:
        return owners
    if isinstance(exc, psycopg.errors.GeneratedAlways):
        # (Said before privileges are checked, and without the table's name.)
        return errors.NotAllowed(f"{message}: the database numbers it (an identity column "
                                 "GENERATED ALWAYS); leave it out, or set it to DEFAULT")
    if diag.schema_name == "pyembed" or _RLS.search(message):
        refused = _refused_row(exc, message)
        if refused:
            return refused
    if diag.message_hint:
        message += f" (hint: {diag.message_hint})"
    return errors.from_sqlstate(exc.sqlstate, message) or exc


_WRONG_TYPES = re.compile(r"function (pyembed\.\w+)\((.*)\) does not exist$")

GRANTED_TO = {"pyembed.count_provider_error": "pyembed_worker"}
"""The functions granted to a role other than the application role (sql/080-grants.sql), and
that role: who may call them besides the owner."""
GRANTED_DSN = {"pyembed_worker": "`pyembed worker` reads $PYEMBED_WORKER_DSN"}

_OWNERS = re.compile(r"(?:permission denied for|must be owner of) "
                     r"(function|table|view|sequence|relation|index) (\S+)$")

APP_RELATIONS = frozenset({
    "cache_health", "chunks", "corpora", "coverage", "documents", "eval_queries", "latency",
    "migration_events", "migration_report", "migrations", "models", "query_log", "queue",
    "queue_failed",
    "recall_health", "throughput", "vectors"})
"""The tables and views the application role holds a privilege on (sql/080-grants.sql): it reads
or writes some of what they hold, the rest is written by pyembed's functions and triggers.
Every other relation is the owner's. tests/test_privileges.py walks the catalogue for it."""


def _owner_only(exc: psycopg.Error, message: str) -> errors.NotAllowed | None:
    """For a function, table or sequence the role lacks the privilege for: NotAllowed for a
    command or column of a relation the application role is granted others of (APP_RELATIONS),
    else OwnerOnly: what is granted is granted on purpose (sql/080-grants.sql), the rest is the
    owner's."""
    found = _OWNERS.match(message) if isinstance(exc, psycopg.errors.InsufficientPrivilege) \
        else None
    if not found:
        return None
    kind, name = found.groups()
    name = name if "." in name else f"pyembed.{name}"
    if kind in ("table", "view") and message.startswith("permission denied") \
            and name.removeprefix("pyembed.") in APP_RELATIONS:
        return errors.NotAllowed(
            f"this role may not do this to {kind} {name}: the application role's grants "
            "(sql/080-grants.sql) allow some commands and columns of it, not this one; the rest "
            "is written by pyembed's functions and triggers (a document through "
            "pyembed.add_document or Corpus.add, a corpus through create_corpus; rows are "
            "deleted through pyembed.delete_documents, delete_chunks, delete_failures and "
            "delete_eval_queries)")
    role = GRANTED_TO.get(name)
    if role:
        return errors.OwnerOnly(f"{kind} {name} is for the owner and members of {role}: "
                                f"use a login in {role} (GRANT {role} TO the login; "
                                f"{GRANTED_DSN.get(role, 'its DSN')})")
    return errors.OwnerOnly(f"{kind} {name} is pyembed's owner role's: run this with the "
                            "owner's DSN ($PYEMBED_OWNER_DSN, the owner commands' --dsn)")


_RLS = re.compile(r'violates row-level security policy(?: \(USING expression\))? for table '
                  r'"([^"]+)"')
_NO_PARTITION = re.compile(r'no partition of relation "(vectors)" found for row')


def _refused_row(exc: psycopg.Error, message: str) -> errors.PyembedError | None:
    """A row a table of pyembed refuses, written directly (SQL, the ORM): one its row-level
    security does not show this role's tenant (UnknownCorpus, as pyembed's functions say for a
    corpus out of sight), or one its foreign key or unique key refuses (InvalidInput)."""
    diag = exc.diag
    table = _PARTITION_OF.sub("", diag.table_name or "")
    detail = f": {diag.message_detail}" if diag.message_detail else ""
    rls = _RLS.search(message) if isinstance(exc, psycopg.errors.InsufficientPrivilege) else None
    if not rls and isinstance(exc, psycopg.errors.CheckViolation):
        # A vector for a corpus id that has no partition: said as for another tenant's corpus,
        # which row-level security refuses, so that neither tells the other apart.
        rls = _NO_PARTITION.match(message)
    if rls:
        table = _PARTITION_OF.sub("", rls.group(1))
        return errors.UnknownCorpus(
            f"pyembed.{table}: the row's corpus is not one this role sees (it belongs to "
            "another tenant, or to none): row-level security refused it")
    if isinstance(exc, psycopg.errors.ForeignKeyViolation):
        if message.startswith("update or delete"):
            return errors.InvalidInput(f"pyembed.{table}: the row is still referred to{detail}")
        return errors.InvalidInput(f"pyembed.{table} refers to a row that does not exist{detail}")
    if isinstance(exc, psycopg.errors.UniqueViolation):
        return errors.InvalidInput(_taken(table, diag.constraint_name or "") + detail)
    return None


UNIQUE_KEYS = {
    "chunks_corpus_id_document_id_chunk_index_key": ("corpus_id", "document_id", "chunk_index"),
    "chunks_pkey": ("corpus_id", "chunk_id"),
    "documents_doc_no": ("corpus_id", "doc_no"),
    "documents_pkey": ("corpus_id", "document_id"),
    "eval_queries_pkey": ("corpus_id", "query_id"),
    "vectors_pkey": ("corpus_id", "chunk_id", "model_key"),
}
"""The columns of each unique index of a table the application role writes (a vectors
partition's by its parent's name): the server gives the taken values (DETAIL) only to a role
that may read them all, and row-level security withholds them from every role it applies to.
tests/test_privileges.py checks this against the catalogue."""


def _taken(table: str, index: str) -> str:
    """What a unique-key violation of `index` on `table` means, naming the key's columns (not
    its values, which the role may not be allowed to see)."""
    columns = UNIQUE_KEYS.get(_PARTITION_IN.sub("", index))
    if not columns:
        return f"pyembed.{table} already holds a row with that key (its unique index {index})"
    own = [c for c in columns if c != "corpus_id"]
    where = " in that corpus" if len(own) < len(columns) else ""
    verb = "is" if len(own) == 1 else "are"
    return (f"pyembed.{table}: that {', '.join(own)} {verb} taken{where} (a row with the same "
            f"{', '.join(columns)} exists: unique index {index})")


_PARTITION_IN = re.compile(r"_c\d+(?=_|$)")


_PARTITION = re.compile(r'relation "(?:pyembed\.)?vectors_c(\d+)" does not exist')
_OTHERS_PARTITION = re.compile(r"permission denied for table vectors_c(\d+)")


def _dropped_corpus(exc: psycopg.Error, message: str) -> errors.UnknownCorpus | None:
    """UnknownCorpus for a Python path's statement on a corpus that a drop took after the path
    looked it up: its vectors partition is gone (42P01), or its row, which a write's foreign
    key names (23503). (pyembed's SQL functions raise PE002 for these themselves.)"""
    if isinstance(exc, psycopg.errors.UndefinedTable):
        found = _PARTITION.search(message)
        if found:
            return errors.UnknownCorpus(f"unknown corpus id {found.group(1)}: it was dropped "
                                        "while this call was using it")
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        # Another tenant's partition: only its tenant's logins may write it
        # (pyembed._partition_writers), and its corpus is out of this role's sight. Or an
        # operator's login made since the last install, which grants it each partition by name.
        found = _OTHERS_PARTITION.fullmatch(message)
        if found:
            return errors.UnknownCorpus(f"unknown corpus id {found.group(1)}: it is not one "
                                        "this role's tenant has (an operator's login granted "
                                        "pyembed_operator since the last `pyembed install` "
                                        "writes no partition until the owner runs it again)")
    if (isinstance(exc, psycopg.errors.ForeignKeyViolation)
            and 'table "corpora"' in (exc.diag.message_detail or "")
            and not message.startswith("update or delete")):
        return errors.UnknownCorpus(
            "unknown corpus: no corpus has that id (it never did, or it was dropped while this "
            f"call was writing to it; pyembed.{_PARTITION_OF.sub('', exc.diag.table_name or '')})")
    return None
