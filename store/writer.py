"""The store's only writer: one catalog commit per finished run, per-step rows in immutable per-run Parquet segments,
and a published catalog that readers open while a grid runs.

A store is two things side by side: the catalog X.duckdb (meta, grids, experiments, configurations, runs,
superseded_runs: KB per run) and the folder X.duckdb.segments (one Parquet file per run and per-step table,
store/schema.py "Segments"). Recording a run writes its segment files (temporary name, fsync, rename, folder fsync),
commits its runs row, which names the segment, to a private working copy of the catalog, and publishes that copy by
atomic replace: the cost is the run's rows plus the catalog, never the token rows already stored. The catalog's views
read only the segments its runs rows reference, so a segment written by a writer killed before it published is never
seen (the next writer removes it) and readers never see a lock (DuckDB forbids readers while a process holds a file
read-write: the writer never opens the published catalog for writing). The views name the segment folder by its absolute
path, so `duckdb -readonly X.duckdb` reads the store from any cwd; a store moved or copied elsewhere is re-pointed by
the next writer (python -m gridrun migrate --store NEW), and store/queries.py reads it where it lies meanwhile. It never
overwrites a file that is not a gridrun store, and never deletes a segment its published catalog references.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from streaming_llm.config import RunConfig
from streaming_llm.results import RunResult

from .migrate import compact, create_schema
from .opening import (  # noqa: F401  (DEFAULT_STORE, check_writable: gridrun imports them from here)
    DEFAULT_STORE,
    NO_EXTENSIONS,
    check_segments,
    check_store_file,
    check_writable,
    damaged,
    first_line,
    open_published,
    os_problem,
    verify_readable,
)
from .opening import StoreWriteError as StoreError
from .rows import configuration_row, failed_row, rows_table, run_row
from .schema import SEGMENT_FILE, configurations, q, runs, segment_tables, segments_folder
from .segments import create_segment_views, new_digest, sync_directory, write_segment

SAFE_NAME = re.compile(r"[0-9A-Za-z][0-9A-Za-z_.-]*")  # a run hash names its segment's folder


@dataclass(frozen=True)
class StoredRun:
    """What the store knows of one run hash."""

    status: str  # done | failed
    code_version: str
    attempts: int
    error: str | None


# --- what is stored ------------------------------------------------------------------------------------------------


def read_runs(path: Path, hashes: Iterable[str] | None = None) -> dict[str, StoredRun]:
    """The stored status of each run hash (all of them when `hashes` is None), from the published snapshot."""
    check_store_file(path)
    if not path.exists():
        return {}
    con = open_published(path)
    try:
        return _stored_runs(con, hashes)
    except duckdb.Error as exc:
        raise damaged(path, exc) from exc
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
        self.path = Path(path)  # as the user spelled it, for messages
        # Every spelling of one file (a symlink, a relative path, `..`) is one store: one lock, one working copy, and
        # snapshots replace the link's target, never the link.
        self.target = self.path.resolve()
        self.code_version = code_version
        self.working = self.target.with_name(f".{self.target.name}.writing")
        self.lock_path = self.target.with_name(f".{self.target.name}.lock")
        self.segments = segments_folder(self.target)
        self.publish_seconds = 0.0  # time spent checkpointing and copying snapshots
        self.publishes = 0
        self.segment_bytes = 0  # bytes of segment files written
        self._lock_file = None
        self.con: duckdb.DuckDBPyConnection | None = None

    def __enter__(self) -> StoreWriter:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        check_store_file(self.target)
        folder = self.target.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"--store {self.path}: cannot create the folder {folder} ({exc.strerror}): pass a "
                             "--store in a folder you can write") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise StoreError(f"--store {self.path}: the folder {folder} is not writable (gridrun writes its snapshots "
                             "and a lock file beside the store): pass a --store in a folder you can write")
        self._take_lock()
        try:
            # The published file is the truth; a working copy left by a crash may hold a commit that was never
            # published (its run was never reported done), so it is rebuilt from the published file. Snapshots a
            # killed writer was copying (each a whole store) are removed: only the lock holder makes them.
            self._remove_leftovers(staging=True)
            if self.target.exists():
                _copy_file(self.target, self.working)
            elif any(self.segments.glob("*/run_hash=*/segment=*/*.parquet")):
                raise StoreError(f"--store {self.path}: there is no store file but its segment folder {self.segments} "
                                 "holds runs (the file was moved or deleted); it was left untouched: restore the file, "
                                 "move the folder away, or pass another --store")
            try:
                self.con = duckdb.connect(str(self.working), config=NO_EXTENSIONS)
                verify_readable(self.con, self.path)
                check_segments(self.con, self.segments, self.path)
                if create_schema(self.con, self.segments, self.code_version):
                    self.con = compact(self.con, self.working)
            except duckdb.Error as exc:
                raise damaged(self.path, exc) from exc
            self._publish()
        except OSError as exc:
            self.close()
            raise StoreError(f"--store {self.path}: {exc.strerror or exc} while making its working copy (a full "
                             "disk?); nothing was changed: free space or pass another --store") from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.con is not None:
            self.con.close()
            self.con = None
        if self._lock_file is not None:
            self._remove_leftovers(staging=False)
            self._lock_file.close()
            self._lock_file = None

    def _remove_leftovers(self, staging: bool) -> None:
        """The working copy and its WAL; with `staging`, also the snapshots being copied when a writer died."""
        leftovers = [self.working, self.working.with_name(self.working.name + ".wal"),
                     self.working.with_name(self.working.name + ".compact")]
        if staging:
            leftovers += self.target.parent.glob(f".{self.target.name}.publish-*")
        for leftover in leftovers:
            leftover.unlink(missing_ok=True)

    def _take_lock(self) -> None:
        try:
            handle = self.lock_path.open("a+")
        except OSError as exc:
            raise StoreError(f"--store {self.path}: cannot create the lock file {self.lock_path} ({exc.strerror}): "
                             "pass a --store in a folder you can write") from None
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

    def _con(self) -> duckdb.DuckDBPyConnection:
        if self.con is None:
            raise StoreError("the store writer is closed")
        return self.con

    # --- reading what is there ---
    def stored_runs(self, hashes: Iterable[str] | None = None) -> dict[str, StoredRun]:
        return _stored_runs(self._con(), hashes)

    # --- writing ---
    def register_grid(self, name: str, path: Path, spec_yaml: str, membership: list[tuple[str, str]],
                      configs: list[tuple[str, RunConfig]] | None = None) -> None:
        """The grid's file, its experiment <-> run membership and the (experiment, configuration) pairs behind it,
        replacing what an earlier version of it listed."""
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
            con.execute("DELETE FROM configurations WHERE grid = ?", [name])
            if configs:
                listed = [configuration_row(name, experiment, config) for experiment, config in configs]
                _insert_arrow(con, configurations.name, rows_table(configurations, listed))
            con.commit()
        except BaseException:
            con.rollback()
            raise
        self._publish()

    def record_done(self, result: RunResult, *, worker: str, attempts: int) -> None:
        """A finished run (streaming_llm's RunResult, whole) in one transaction: its runs row and a segment of its
        per-run tables; earlier results of its hash move to superseded_*."""
        declared = {table.name: table for table in segment_tables()}
        for name, rows in result.tables.items():
            if name not in declared:
                raise StoreError(f"the engine returns a table {name!r} that streaming_llm.results.STEP_TABLES does not "
                                 f"declare (declared: {', '.join(declared)}): register its schema there")
            missing = set(rows.column_names) - {column.name for column in declared[name].columns}
            if missing:
                raise StoreError(
                    f"the engine returns {name} column(s) {', '.join(sorted(missing))} that its schema in "
                    f"streaming_llm.results.STEP_TABLES lacks: declare them there"
                )
        row = run_row(result.config, result.summary, status="done", error=None, attempts=attempts, worker=worker)
        self._replace(result.config.run_hash, row, result.tables)

    def record_failed(self, config: RunConfig, error: str, *, worker: str | None, attempts: int,
                      started_at: datetime | None) -> None:
        """A failed run: its knobs and error text, no per-step rows. An earlier done result moves to superseded_*."""
        row = failed_row(config, error, self.code_version, attempts=attempts, worker=worker, started_at=started_at)
        self._replace(config.run_hash, row, {})

    def _replace(self, run_hash: str, row: dict[str, Any], tables: dict[str, pa.Table]) -> None:
        try:
            self._commit_run(run_hash, row, tables)
        except duckdb.Error as exc:
            raise StoreError(f"--store {self.path}: recording run {run_hash} failed ({first_line(exc)}; a full "
                             "disk?): the runs recorded before it are kept; free space, then rerun") from exc
        self._publish()

    def _commit_run(self, run_hash: str, row: dict[str, Any], tables: dict[str, pa.Table]) -> None:
        """The run's segment files first (invisible until the catalog that names them is published), then its runs
        row in one catalog transaction; an earlier done result's row moves to superseded_runs with its segment."""
        if not SAFE_NAME.fullmatch(run_hash):
            raise StoreError(f"run hash {run_hash!r} is not a file-name-safe hash: the store names segments by it")
        # In STEP_TABLES order: the segment's digest runs over its files in that order.
        parts = [(table, tables[table.name]) for table in segment_tables()
                 if tables.get(table.name) is not None and tables[table.name].num_rows]
        segment = uuid.uuid4().hex[:16] if parts else None
        files = [f"{table.name}/run_hash={run_hash}/segment={segment}/{SEGMENT_FILE}" for table, _ in parts]
        written, digest = 0, new_digest()
        try:
            for table, rows in parts:
                size, file_digest = write_segment(self.segments, table, run_hash, segment, rows)
                written += size
                digest.update(file_digest)
        except OSError as exc:
            raise StoreError(f"--store {self.path}: writing run {run_hash}'s segment failed ({os_problem(exc)}): the "
                             "runs recorded before it are kept; then rerun") from None
        con = self._con()
        con.begin()
        try:
            # fetchall, not fetchone: DuckDB 2 refuses the next statement while a result is unfinished.
            previous = con.execute("SELECT status FROM runs WHERE run_hash = ?", [run_hash]).fetchall()
            if previous and previous[0][0] == "done":
                names = ", ".join(q(column.name) for column in runs.columns)
                con.execute(f"INSERT INTO superseded_runs ({names}, superseded_at) SELECT {names}, ? FROM runs "
                            "WHERE run_hash = ?", [datetime.now(UTC), run_hash])
            con.execute("DELETE FROM runs WHERE run_hash = ?", [run_hash])
            row["recorded_at"] = datetime.now(UTC)
            if parts:
                row |= {"segment": segment, "segment_bytes": written, "segment_digest": digest.hexdigest(),
                        "segment_files": json.dumps(files)}
            _insert_arrow(con, runs.name, rows_table(runs, [row]))
            create_segment_views(con, self.segments)  # they list the files the catalog names: this run's now among them
            con.commit()
        except BaseException:
            con.rollback()
            raise
        self.segment_bytes += written

    def _publish(self) -> None:
        """Make the committed state what readers see: checkpoint, copy, atomic rename over the published path."""
        started = time.perf_counter()
        con = self._con()
        staging = self.target.with_name(f".{self.target.name}.publish-{os.getpid()}")
        try:
            con.execute("CHECKPOINT")
            _copy_file(self.working, staging)
            os.replace(staging, self.target)
        except (OSError, duckdb.Error) as exc:
            raise StoreError(f"--store {self.path}: publishing a snapshot failed ({first_line(exc)}; a full disk?): "
                             "the published store is the last whole snapshot; free space, then rerun") from exc
        finally:
            staging.unlink(missing_ok=True)
        try:
            sync_directory(self.target.parent)
        except OSError as exc:
            raise StoreError(f"--store {self.path}: the snapshot was published, but syncing its folder failed "
                             f"({first_line(exc)}): it may not survive a crash of the machine; check the disk, then "
                             "rerun (nothing is lost: the runs recorded so far are in the store)") from exc
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




