"""The SQL box: its entry points (check_read_only, run_user_sql), its limits, and its process. A user's statement is
parsed and run in a child process whose address space is limited (RLIMIT_AS) and which is killed at the wall-clock
limit, so that no statement, however it allocates (DuckDB's list functions allocate outside its buffer manager) or
however long it takes to parse, takes the reader's process down.

It never writes: the child opens the store through store.opening.connect with its Sandbox limits and checks the
statement with check_read_only. Rows come back through a pipe.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import re
import resource
import sys
import threading
import types
from pathlib import Path

import duckdb
import pandas as pd

from store import opening
from store.opening import Sandbox, connect

SQL_BOX_STATEMENTS = frozenset({duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN})


SQL_BOX_ROW_LIMIT = 10_000


SQL_BOX_SECONDS = 20.0  # a statement still running then is interrupted


SQL_BOX_THREADS = 2  # DuckDB threads of the box's connection (see connect)


SQL_BOX_MEMORY = "1GB"  # DuckDB's memory_limit for the box's connection; nothing spills to disk


# PIVOT without an IN list is DuckDB's one MULTI statement a reader needs (it looks up the pivot values first).
_PIVOT = re.compile(r"^\s*(?:--[^\n]*\n\s*|/\*.*?\*/\s*)*(?:UN)?PIVOT\b", re.IGNORECASE | re.DOTALL)


# EXPLAIN ANALYZE runs the statement it explains, and the box may write into the segment folder it reads (DuckDB's
# allowed_directories grants both): what follows EXPLAIN is checked like a statement of its own.
_EXPLAIN = re.compile(r"^\s*(?:--[^\n]*\n\s*|/\*.*?\*/\s*)*EXPLAIN\s+(?:ANALY[SZ]E\s+)?(?:\([^)]*\)\s*)?",
                      re.IGNORECASE | re.DOTALL)


# Address space the child may add to what it holds when it starts (Python, DuckDB and pandas loaded): DuckDB's own
# memory_limit (SQL_BOX_MEMORY) plus room for its threads' stacks and allocator arenas, which reserve address
# space they never touch.
ADDRESS_SPACE_HEADROOM = 1 << 30
RESULT_BYTES = 256 << 20  # the rows a statement may send back (pickled): past this it is refused like memory
_START = threading.Lock()
_CONTEXT: list[multiprocessing.context.BaseContext] = []


class WriteRefused(ValueError):
    """A statement given to the read-only SQL box would write (or is not a query)."""


class QueryLimit(RuntimeError):
    """A statement of the SQL box ran past its time or memory limit and was stopped."""


def check_read_only(sql: str) -> None:
    """Raise WriteRefused unless `sql` is exactly one SELECT (or EXPLAIN, or PIVOT) statement."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.OutOfMemoryException:
        raise  # a limit of the process parsing it (the SQL box's child), not a fault of the statement
    except duckdb.Error as exc:
        raise WriteRefused(f"not valid SQL: {exc}") from None
    if len(statements) != 1:
        raise WriteRefused(f"{len(statements)} statements given: the SQL box runs one SELECT at a time")
    kind = statements[0].type
    if kind == duckdb.StatementType.EXPLAIN:
        explained = _EXPLAIN.match(sql)
        if explained is None:
            raise WriteRefused("refused: an EXPLAIN this box cannot read; write EXPLAIN [ANALYZE] SELECT ...")
        check_read_only(sql[explained.end():])
        return
    if kind == duckdb.StatementType.MULTI and _PIVOT.match(sql):
        return  # the read-only, locked, sandboxed connection refuses anything a PIVOT could try to write
    if kind not in SQL_BOX_STATEMENTS:
        raise WriteRefused(
            f"refused: {kind.name} statements are not run here; the store is read-only and this box runs SELECT "
            "queries only (results are written by python -m gridrun)"
        )


def run_user_sql(path: Path | str, sql: str, limit: int = SQL_BOX_ROW_LIMIT,
                 seconds: float = SQL_BOX_SECONDS) -> tuple[pd.DataFrame, bool]:
    """Run a user's SELECT in a sandboxed read-only connection: its first `limit` rows, and whether there were more.

    It is checked, parsed and run in a child process (store/sandbox.py) killed after `seconds` (QueryLimit), whose
    connection holds at most SQL_BOX_MEMORY and whose address space at most that much more than it started with.
    """
    columns, rows, more = run_in_child(path, sql, limit, seconds, SQL_BOX_MEMORY)
    return pd.DataFrame(rows, columns=columns), more



def run_in_child(path: Path | str, sql: str, limit: int, seconds: float, memory: str) -> tuple[list[str], list, bool]:
    """`sql`'s column names, first `limit` rows and whether there were more, computed in a child process limited to
    `memory` (DuckDB's memory_limit) plus ADDRESS_SPACE_HEADROOM of address space and killed after `seconds`,
    parsing included. Raises what the box raised in-process: WriteRefused, QueryLimit, StoreError, duckdb.Error."""
    context = _context()
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(str(path), sql, limit, memory, sender), daemon=True,
                            name="gridrun-sql-box")
    with _without_main():
        child.start()
    sender.close()
    try:
        if not receiver.poll(seconds):
            raise QueryLimit(f"stopped after {seconds:g} s, the SQL box's time limit: narrow the query (a WHERE on "
                             "run_hash, fewer joins of tokens) or run it in duckdb -readonly")
        try:
            kind, payload = receiver.recv()
        except (EOFError, OSError, pickle.UnpicklingError):
            child.join(5)
            raise QueryLimit(f"stopped at the SQL box's memory limit ({memory} for DuckDB, its process's address "
                             f"space; the process ended with code {child.exitcode}): aggregate before joining, filter "
                             "on run_hash, or run it in duckdb -readonly") from None
    finally:
        receiver.close()
        if child.is_alive():
            child.kill()
        child.join(5)
    if kind == "rows":
        return payload
    raise _rebuild(*payload)


@contextlib.contextmanager
def _without_main():
    """While a child is started: a bare __main__, so that multiprocessing does not record the parent's main script for
    the child to run again as __mp_main__ (under Streamlit, __main__ is the dashboard's app.py: every statement would
    render the whole dashboard in its child, before its limits, inside its time)."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def start() -> None:
    """Start the forkserver now: its first start loads the store's modules (1-5 s here), which the first statement of
    a reader would otherwise pay inside its time limit. Idempotent and cheap once it runs."""
    from multiprocessing import forkserver

    _context()
    forkserver.ensure_running()


def _context() -> multiprocessing.context.BaseContext:
    """A forkserver: each statement's child is forked from a small server that has loaded the store's modules once
    (a plain fork of a reader, the dashboard with its threads, could copy a lock held by another thread)."""
    with _START:
        if not _CONTEXT:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["store.sandbox", "store.opening"])
            _CONTEXT.append(context)
        return _CONTEXT[0]


def _child(path: str, sql: str, limit: int, memory: str, sender) -> None:
    """Runs in the child: limit the address space, then check, parse and run the statement; send rows or an error."""
    try:
        _limit_address_space(_parse_bytes(memory) + ADDRESS_SPACE_HEADROOM)
        sender.send(("rows", _run(path, sql, limit, memory)))
    except MemoryError:
        _send_error(sender, (__name__, "QueryLimit", f"stopped at the SQL box's memory limit ({memory}): "
                             "aggregate before joining, filter on run_hash, or run it in duckdb -readonly"))
    except BaseException as exc:  # noqa: BLE001 - every error goes back to the reader, as the box raised it in-process
        _send_error(sender, (type(exc).__module__, type(exc).__name__, str(exc)))
    finally:
        sender.close()


def _run(path: str, sql: str, limit: int, memory: str) -> tuple[list[str], list, bool]:
    try:
        check_read_only(sql)  # parsing a long statement can itself reach the limit
        with connect(path, sandbox=Sandbox(memory, SQL_BOX_THREADS)) as con:
            result = con.execute(sql)
            rows = result.fetchmany(limit + 1)
            columns = [column[0] for column in result.description or []]
    except duckdb.OutOfMemoryException:
        raise QueryLimit(f"stopped at the SQL box's memory limit ({memory}): aggregate before joining, "
                         "filter on run_hash, or run it in duckdb -readonly") from None
    payload = (columns, rows[:limit], len(rows) > limit)
    if len(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)) > RESULT_BYTES:
        raise QueryLimit(f"the result is larger than {RESULT_BYTES >> 20} MiB, the SQL box's limit on what it shows: "
                         "select fewer columns or rows, or run it in duckdb -readonly")
    return payload


def _send_error(sender, error: tuple[str, str, str]) -> None:
    # When even the error cannot be sent, the reader sees the pipe close and reports the memory limit.
    with contextlib.suppress(OSError, MemoryError, pickle.PicklingError):
        sender.send(("error", error))


def _rebuild(module: str, name: str, message: str) -> BaseException:
    """The child's exception as the reader's: the box's own classes and DuckDB's keep their class."""
    namespaces = {__name__: sys.modules[__name__], "store.opening": opening, "duckdb": duckdb, "_duckdb": duckdb}
    namespace = namespaces.get(module) or (duckdb if module.startswith("duckdb") else None)
    kind = getattr(namespace, name, None) if namespace is not None else None
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(message)
        except TypeError:
            pass
    return RuntimeError(f"{name}: {message}")


def _limit_address_space(extra: int) -> None:
    """RLIMIT_AS = the address space the process holds now + `extra` (never above a hard limit already set)."""
    try:
        with open("/proc/self/statm") as statm:
            held = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no /proc (not Linux): DuckDB's memory_limit and the wall-clock kill still hold
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    wanted = held + extra
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_AS, (wanted, hard))


_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?I?B)?\s*", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _parse_bytes(text: str) -> int:
    """'1GB', '64MB', '512MiB' (DuckDB's memory_limit spelling) -> bytes."""
    found = _SIZE.fullmatch(text)
    if found is None:
        raise ValueError(f"{text!r}: not a size like 1GB or 64MB")
    return int(float(found.group(1)) * _UNITS[(found.group(2) or "B").upper()])
