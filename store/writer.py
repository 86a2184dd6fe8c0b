"""The store's only writer: one transaction per finished run, per-step rows through DuckDB's Arrow path, and a
published snapshot that readers open while a grid runs.

DuckDB lets one process hold a file read-write and then nobody else may even read it. So the writer never opens the
published file: it commits to a private working copy beside it, checkpoints, and atomically replaces the published
file with a copy (readers that already have the old file open keep reading it). It never overwrites a file that is
not a gridrun store.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
from sqlalchemy.schema import CreateTable

from streaming_llm import RunConfig

from .schema import (
    APPLICATION_ID,
    KNOB_COLUMNS,
    RESULT_TABLES,
    SCHEMA_VERSION,
    SUMMARY_COLUMNS,
    VIEWS,
    compactions,
    metadata,
    runs,
    tokens,
)

DEFAULT_STORE = Path("results/gridrun.duckdb")
DUCKDB_MAGIC = b"DUCK"  # bytes 8..12 of every DuckDB database file


class StoreError(RuntimeError):
    """The store cannot be used as asked; the message names the file, what is wrong and the fix."""


@dataclass(frozen=True)
class StoredRun:
    """What the store knows of one run hash."""

    status: str  # done | failed
    code_version: str
    attempts: int
    error: str | None


# --- checking a file before anything touches it ----------------------------------------------------------------------
def check_store_file(path: Path) -> None:
    """Raise StoreError unless `path` is absent or a gridrun store of a schema this code writes. Never modifies it."""
    if not path.exists():
        return
    if not path.is_file():
        raise StoreError(f"--store {path} is not a file: pass a path like results/gridrun.duckdb")
    with path.open("rb") as handle:
        header = handle.read(12)
    if len(header) < 12 or header[8:12] != DUCKDB_MAGIC:
        raise StoreError(
            f"--store {path} is not a DuckDB database (corrupt, truncated or another kind of file); it was left "
            "untouched: pass another --store path, or move the file away"
        )
    try:
        con = _connect_read_only(path)
    except duckdb.Error as exc:
        raise StoreError(f"--store {path} cannot be opened ({exc}); it was left untouched: pass another --store"
                         ) from exc
    try:
        found = _read_meta(con)
    finally:
        con.close()
    if found.get("application_id") != APPLICATION_ID:
        raise StoreError(
            f"--store {path} is a DuckDB database but not a gridrun store (no meta.application_id = {APPLICATION_ID}); "
            "it was left untouched: pass another --store path"
        )
    version = found.get("schema_version")
    if version != str(SCHEMA_VERSION):
        raise StoreError(
            f"--store {path} has store schema version {version}, this gridrun writes version {SCHEMA_VERSION}; it was "
            "left untouched: pass a new --store path (or use the gridrun that wrote it)"
        )


def _read_meta(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    tables = {row[0] for row in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    if "meta" not in tables:
        return {}
    try:
        return dict(con.execute("SELECT key, value FROM meta").fetchall())
    except duckdb.Error:
        return {}


def _connect_read_only(path: Path, attempts: int = 20) -> duckdb.DuckDBPyConnection:
    """Read-only, retried: another process may hold the file read-write for a moment (a user's duckdb shell)."""
    delay = 0.05
    for attempt in range(attempts):
        try:
            return duckdb.connect(str(path), read_only=True)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower():
                raise
            if attempt == attempts - 1:
                raise StoreError(
                    f"--store {path} stays locked by another process ({exc}): close it there (open the store with "
                    "duckdb -readonly), then retry"
                ) from exc
            time.sleep(delay)
            delay = min(2 * delay, 0.5)
    raise AssertionError("unreachable")


def read_runs(path: Path, hashes: Iterable[str] | None = None) -> dict[str, StoredRun]:
    """The stored status of each run hash (all of them when `hashes` is None), from the published snapshot."""
    check_store_file(path)
    if not path.exists():
        return {}
    con = _connect_read_only(path)
    try:
        return _stored_runs(con, hashes)
    finally:
        con.close()


def _stored_runs(con: duckdb.DuckDBPyConnection, hashes: Iterable[str] | None) -> dict[str, StoredRun]:
    rows = con.execute("SELECT run_hash, status, code_version, attempts, error FROM runs").fetchall()
    wanted = set(hashes) if hashes is not None else None
    return {
        row[0]: StoredRun(row[1], row[2], row[3], row[4]) for row in rows if wanted is None or row[0] in wanted
    }


# --- the writer ------------------------------------------------------------------------------------------------------
class StoreWriter:
    """Holds the store for writing: `record_*` commits one run and publishes a new snapshot before returning."""

    def __init__(self, path: Path, code_version: str):
        self.path = Path(path)
        self.code_version = code_version
        self.working = self.path.with_name(f".{self.path.name}.writing")
        self.lock_path = self.path.with_name(f".{self.path.name}.lock")
        self.publish_seconds = 0.0  # time spent checkpointing and copying snapshots
        self.publishes = 0
        self._lock_file = None
        self.con: duckdb.DuckDBPyConnection | None = None

    def __enter__(self) -> StoreWriter:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        check_store_file(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            # The published file is the truth; a working copy left by a crash may hold a commit that was never
            # published (its run was never reported done), so it is rebuilt from the published file.
            for leftover in (self.working, self.working.with_name(self.working.name + ".wal")):
                leftover.unlink(missing_ok=True)
            if self.path.exists():
                _copy_file(self.path, self.working)
            try:
                self.con = duckdb.connect(str(self.working))
                self._create_schema()
            except duckdb.Error as exc:
                raise StoreError(
                    f"--store {self.path} cannot be read: corrupt or truncated ({exc}); it was left untouched: pass "
                    "another --store path, or move the file away"
                ) from exc
            self._publish()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.con is not None:
            self.con.close()
            self.con = None
            for leftover in (self.working, self.working.with_name(self.working.name + ".wal")):
                leftover.unlink(missing_ok=True)
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _take_lock(self) -> None:
        handle = self.lock_path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise StoreError(
                f"--store {self.path} is being written by another gridrun ({holder}): wait for it to finish, or pass "
                "another --store"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}")
        handle.flush()
        self._lock_file = handle

    def _create_schema(self) -> None:
        con = self._con()
        existing = {row[0] for row in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        con.begin()
        for table in metadata.sorted_tables:
            if table.name not in existing:
                con.execute(str(CreateTable(table).compile(dialect=_dialect())))
        for name, sql in VIEWS.items():
            con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
        meta = {
            "application_id": APPLICATION_ID, "schema_version": str(SCHEMA_VERSION), "code_version": self.code_version,
        }
        for key, value in meta.items():
            con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, value])
        con.execute("INSERT OR IGNORE INTO meta VALUES ('created_at', ?)", [datetime.now(UTC).isoformat()])
        con.commit()

    def _con(self) -> duckdb.DuckDBPyConnection:
        if self.con is None:
            raise StoreError("the store writer is closed")
        return self.con

    # --- reading what is there ---
    def stored_runs(self, hashes: Iterable[str] | None = None) -> dict[str, StoredRun]:
        return _stored_runs(self._con(), hashes)

    # --- writing ---
    def register_grid(self, name: str, path: Path, spec_yaml: str, membership: list[tuple[str, str]]) -> None:
        """The grid's file and its experiment <-> run membership, replacing what an earlier version of it listed."""
        con = self._con()
        con.begin()
        try:
            con.execute("DELETE FROM grids WHERE grid = ?", [name])
            con.execute("INSERT INTO grids VALUES (?, ?, ?, ?)", [name, str(path), spec_yaml, datetime.now(UTC)])
            con.execute("DELETE FROM experiments WHERE grid = ?", [name])
            rows = pa.table({
                "grid": pa.array([name] * len(membership), pa.string()),
                "experiment": pa.array([m[0] for m in membership], pa.string()),
                "run_hash": pa.array([m[1] for m in membership], pa.string()),
            })
            _insert_arrow(con, "experiments", rows)
            con.commit()
        except BaseException:
            con.rollback()
            raise
        self._publish()

    def record_done(self, config: RunConfig, summary: dict[str, Any], token_rows: pa.Table, compaction_rows: pa.Table,
                    *, worker: str, attempts: int) -> None:
        """A finished run, whole, in one transaction; earlier results of its hash move to superseded_*."""
        for table, rows in ((tokens, token_rows), (compactions, compaction_rows)):
            missing = set(rows.column_names) - {column.name for column in table.columns}
            if missing:
                raise StoreError(
                    f"the engine returns {table.name} column(s) {', '.join(sorted(missing))} that store/schema.py "
                    f"lacks: declare them in the {table.name} table and bump SCHEMA_VERSION"
                )
        row = run_row(config, summary, status="done", error=None, attempts=attempts, worker=worker)
        self._replace(config.run_hash, row, token_rows, compaction_rows)

    def record_failed(self, config: RunConfig, error: str, *, worker: str | None, attempts: int,
                      started_at: datetime | None) -> None:
        """A failed run: its knobs and error text, no per-step rows. An earlier done result moves to superseded_*."""
        row = failed_row(config, error, self.code_version, attempts=attempts, worker=worker, started_at=started_at)
        self._replace(config.run_hash, row, None, None)

    def _replace(self, run_hash: str, row: dict[str, Any], token_rows: pa.Table | None,
                 compaction_rows: pa.Table | None) -> None:
        con = self._con()
        con.begin()
        try:
            # fetchall, not fetchone: DuckDB 2 refuses the next statement while a result is unfinished.
            previous = con.execute("SELECT status FROM runs WHERE run_hash = ?", [run_hash]).fetchall()
            if previous and previous[0][0] == "done":
                now = datetime.now(UTC)
                for table in RESULT_TABLES:
                    con.execute(
                        f"INSERT INTO superseded_{table.name} SELECT *, ? FROM {table.name} WHERE run_hash = ?",
                        [now, run_hash],
                    )
            for table in RESULT_TABLES:
                con.execute(f"DELETE FROM {table.name} WHERE run_hash = ?", [run_hash])
            row["recorded_at"] = datetime.now(UTC)
            _insert_arrow(con, runs.name, pa.Table.from_pylist([row], schema=_runs_arrow_schema()))
            for table, rows in ((tokens, token_rows), (compactions, compaction_rows)):
                if rows is not None and rows.num_rows:
                    with_hash = rows.add_column(0, "run_hash", pa.array([run_hash] * rows.num_rows, pa.string()))
                    _insert_arrow(con, table.name, with_hash)
            con.commit()
        except BaseException:
            con.rollback()
            raise
        self._publish()

    def _publish(self) -> None:
        """Make the committed state what readers see: checkpoint, copy, atomic rename over the published path."""
        started = time.perf_counter()
        con = self._con()
        con.execute("CHECKPOINT")
        staging = self.path.with_name(f".{self.path.name}.publish-{os.getpid()}")
        try:
            _copy_file(self.working, staging)
            os.replace(staging, self.path)
        finally:
            staging.unlink(missing_ok=True)
        self.publish_seconds += time.perf_counter() - started
        self.publishes += 1


def _insert_arrow(con: duckdb.DuckDBPyConnection, table: str, rows: pa.Table) -> None:
    """Bulk insert through DuckDB's Arrow scan, by column name (quoted: `window` is an SQL keyword)."""
    names = ", ".join(f'"{name}"' for name in rows.column_names)
    con.register("incoming_rows", rows)
    try:
        con.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM incoming_rows")
    finally:
        con.unregister("incoming_rows")


def _copy_file(source: Path, target: Path) -> None:
    """A durable byte copy; copy_file_range lets filesystems with reflinks (btrfs, XFS) share blocks instead."""
    with source.open("rb") as src, target.open("wb") as dst:
        size = os.fstat(src.fileno()).st_size
        copied = 0
        try:
            while copied < size:
                step = os.copy_file_range(src.fileno(), dst.fileno(), size - copied)
                if step == 0:
                    break
                copied += step
        except OSError:
            src.seek(0)
            dst.seek(0)
            dst.truncate()
            shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())


def _dialect():
    import duckdb_engine

    return duckdb_engine.Dialect()


def _runs_arrow_schema() -> pa.Schema:
    return pa.schema([(column.name, _arrow_type(column)) for column in runs.columns])


def _arrow_type(column) -> pa.DataType:
    kind = type(column.type).__name__
    return {
        "String": pa.string(), "Text": pa.string(), "Integer": pa.int64(), "BigInteger": pa.int64(),
        "Double": pa.float64(), "Boolean": pa.bool_(), "DateTime": pa.timestamp("us", tz="UTC"),
    }[kind]


# --- rows -------------------------------------------------------------------------------------------------------------
def run_row(config: RunConfig, summary: dict[str, Any], *, status: str, error: str | None, attempts: int,
            worker: str | None) -> dict[str, Any]:
    """The runs row of a finished run, column for column as store/schema.py declares it."""
    summary = dict(summary)
    environment = summary.pop("environment", {}) or {}
    summary["window_resolved"] = summary.pop("window", None)
    summary["device_name"] = environment.get("device")
    normalised = config.normalised()
    return {
        "run_hash": config.run_hash, "group_hash": config.group_hash, "setting_hash": config.setting_hash,
        "status": status, "error": error,
        "attempts": attempts, "config_json": json.dumps(normalised, sort_keys=True),
        **{column.name: normalised[column.name] for column in KNOB_COLUMNS},
        **{column.name: summary.get(column.name) for column in SUMMARY_COLUMNS},
        "started_at": _timestamp(summary.get("started_at")), "ended_at": _timestamp(summary.get("ended_at")),
        "code_version": environment.get("code_version", "unknown"), "git_commit": environment.get("git_commit"),
        "environment_json": json.dumps(environment, sort_keys=True), "worker": worker,
    }


def failed_row(config: RunConfig, error: str, code_version: str, *, attempts: int, worker: str | None,
               started_at: datetime | None) -> dict[str, Any]:
    normalised = config.normalised()
    return {
        "run_hash": config.run_hash, "group_hash": config.group_hash, "setting_hash": config.setting_hash,
        "status": "failed", "error": error,
        "attempts": attempts, "config_json": json.dumps(normalised, sort_keys=True),
        **{column.name: normalised[column.name] for column in KNOB_COLUMNS},
        "started_at": started_at, "ended_at": datetime.now(UTC), "code_version": code_version, "worker": worker,
    }


def _timestamp(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value)
