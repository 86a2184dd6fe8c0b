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

import contextlib
import errno
import fcntl
import hashlib
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
import pyarrow.parquet as pq
from sqlalchemy.schema import CreateTable

from streaming_llm import RunConfig

from .queries import DUCKDB_MAGIC, NO_EXTENSIONS, check_length, q
from .queries import StoreError as ReadError
from .schema import (
    APPLICATION_ID,
    CATALOG_TABLES,
    CONFIGURATION_OWN,
    KNOB_COLUMNS,
    MIGRATES_FROM,
    SCHEMA_SEGMENT,
    SCHEMA_VERSION,
    SEGMENT_FILE,
    SEGMENT_TABLES,
    SUMMARY_COLUMNS,
    SUPERSEDED_SEGMENT_TABLES,
    VIEWS,
    compactions,
    configurations,
    forwards,
    runs,
    segments_folder,
    sql_string,
    superseded_runs,
    tokens,
    trials,
    unsafe_segment_path,
)
from .verify import catalog_views, segment_file_names, segment_problem

DEFAULT_STORE = Path("results/gridrun.duckdb")


class StoreError(ReadError):
    """The store cannot be written as asked; the message names the file, what is wrong and the fix. A
    store.queries.StoreError too, so that one `except` catches what reading and writing a store refuse."""


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
    unsafe = unsafe_segment_path(path)
    if unsafe:
        raise StoreError(f"--store {path}: {unsafe}")
    if not path.exists():
        if path.is_symlink():
            return  # a link to a store yet to be made: the writer creates its target
        if path.parent.exists() and not path.parent.is_dir():
            raise StoreError(f"--store {path}: {path.parent} is a file, not a folder: pass a path in a folder")
        return
    if not path.is_file():
        raise StoreError(f"--store {path} is not a file: pass a path like results/gridrun.duckdb")
    try:
        with path.open("rb") as handle:
            header = handle.read(12)
    except OSError as exc:
        raise StoreError(f"--store {path} cannot be read ({exc.strerror}): fix its permissions") from None
    if len(header) < 12 or header[8:12] != DUCKDB_MAGIC:
        raise StoreError(
            f"--store {path} is not a DuckDB database (corrupt, truncated or another kind of file); it was left "
            "untouched: pass another --store path, or move the file away"
        )
    before = path.stat()
    try:
        con = _connect_read_only(path)
    except duckdb.Error as exc:
        raise StoreError(f"--store {path} cannot be opened ({_first_line(exc)}); it was left untouched: pass another "
                         "--store") from exc
    try:
        if path.stat().st_ino == before.st_ino:  # else a writer published a new snapshot meanwhile: those are whole
            check_length(con, path, before.st_size)
        found = _read_meta(con)
    except ReadError as exc:
        raise StoreError(f"--store {exc}") from None
    except duckdb.Error as exc:
        raise _damaged(path, exc) from exc
    finally:
        con.close()
    if found.get("application_id") != APPLICATION_ID:
        raise StoreError(
            f"--store {path} is a DuckDB database but not a gridrun store (no meta.application_id = {APPLICATION_ID}); "
            "it was left untouched: pass another --store path"
        )
    version = found.get("schema_version")
    if version not in {str(SCHEMA_VERSION), *(str(old) for old in MIGRATES_FROM)}:
        raise StoreError(
            f"--store {path} has store schema version {version}, this gridrun writes version {SCHEMA_VERSION}; it was "
            "left untouched: pass a new --store path (or use the gridrun that wrote it)"
        )


def check_writable(path: Path) -> None:
    """Raise StoreError unless a writer could write the store at `path` (its folder, or the nearest one that exists,
    and its segment folder with each table's folder where they exist); checked before anything is computed, so that
    a run is never computed only to find its segment cannot be written. Creates nothing."""
    target = Path(path).resolve()
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    segments = segments_folder(target)
    for candidate in (folder, segments, *(segments / table.name for table in SEGMENT_TABLES)):
        if not candidate.exists() and not candidate.is_symlink():
            continue
        if not candidate.is_dir():
            raise StoreError(f"--store {path}: {candidate} is not a folder (gridrun writes the store's files "
                             "there): move it away, or pass another --store")
        if not os.access(candidate, os.W_OK | os.X_OK):
            raise StoreError(f"--store {path}: the folder {candidate} is not writable (gridrun writes the store's "
                             "snapshots and per-run segments there): make it writable, or pass another --store")


def _os_problem(exc: OSError) -> str:
    """What an OSError says about the disk, for a message: permissions or a read-only disk, a full one, or its text."""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{exc.strerror}: the folder is not writable; make it writable"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{exc.strerror}: the disk is full; free space"
    return f"{exc.strerror or exc}; check the disk"


def _damaged(path: Path, exc: BaseException) -> StoreError:
    return StoreError(f"--store {path} cannot be read: corrupt or truncated ({_first_line(exc)}); it was left "
                      "untouched: pass another --store path, or move the file away")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def verify_readable(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Read every block of every table (DuckDB checks each block's checksum on read): a truncated or bit-flipped
    store whose header and catalog are intact is refused here, before anything is written or published."""
    try:
        tables = con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE'").fetchall()
        for (table,) in tables:
            columns = [row[0] for row in con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table]).fetchall()]
            hashed = ", ".join(f'"{c}"' for c in columns)
            con.execute(f'SELECT count(*), max(hash({hashed})) FROM "{table}"').fetchall()
    except duckdb.Error as exc:
        raise _damaged(path, exc) from exc


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
            return duckdb.connect(str(path), read_only=True, config=NO_EXTENSIONS)
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
    except duckdb.Error as exc:
        raise _damaged(path, exc) from exc
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
                self._check_segments()
                if self._create_schema():
                    self._compact()
            except duckdb.Error as exc:
                raise _damaged(self.path, exc) from exc
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

    def _check_segments(self) -> None:
        """Every segment the catalog references is there and whole: its files' total size and digest as recorded
        (Parquet has no checksum DuckDB verifies: a flipped bit would read as another number). Segments it does not
        reference (written by a writer killed before it published, or by a migration that did not finish) and
        temporary files are removed. Reads every segment once per writer, never per run."""
        con = self._con()
        referenced: dict[tuple[str, str], tuple[int, str]] = {}
        lists: dict[tuple[str, str], list[str]] = {}
        for table in (runs, superseded_runs):
            columns = {row[0] for row in con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table.name]).fetchall()}
            if "segment_digest" in columns:
                listed = "segment_files" if "segment_files" in columns else "NULL"
                for run_hash, segment, size, digest, files in con.execute(
                        f"SELECT run_hash, segment, segment_bytes, segment_digest, {listed} FROM {table.name} "
                        "WHERE segment IS NOT NULL").fetchall():
                    referenced[(run_hash, segment)] = (size, digest)
                    if files is not None:
                        lists[(run_hash, segment)] = json.loads(files)
        present = _scan_segments(self.segments, keep=set(referenced))
        for key, expected in sorted(referenced.items()):
            # A listed segment: its named files as recorded, and no other beside them; else its folders' files.
            problem = segment_problem(self.segments, *key, lists[key], *expected) if key in lists else None
            if problem is None and key not in lists and present.get(key) != expected:
                problem = "is " + ("missing" if key not in present else
                                   f"{present[key][0]:,} bytes, recorded {expected[0]:,} (truncated?)"
                                   if present[key][0] != expected[0] else
                                   "of another content than recorded (bit-flipped)")
            if problem:
                raise StoreError(
                    f"--store {self.path} is damaged (a segment corrupt, truncated or missing): run {key[0]}'s "
                    f"segment {key[1]} in {self.segments} {problem}; it was left untouched: restore the store file "
                    "and its .segments folder together, or rerun into a new --store")

    def _create_schema(self) -> bool:
        """Create what is missing. Migration 2 -> 3 adds the table configurations and the columns declared since
        (generation runs), null in older rows: a version 2 run keeps its rows under its hash (then the configuration's
        own), and readers treat each as its own configuration. Migration to 4 moves the per-step tables into segments
        (_move_to_segments). The segment views are (re)pointed at the folder beside the catalog on every open.
        Returns whether per-step tables were moved."""
        con = self._con()
        existing = {row[0] for row in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE'").fetchall()}
        previous = _read_meta(con).get("schema_version")
        con.begin()
        if previous is not None and previous != str(SCHEMA_VERSION):
            con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                        [f"migrated_from_{previous}", datetime.now(UTC).isoformat()])
        for table in CATALOG_TABLES:
            if table.name not in existing:
                con.execute(str(CreateTable(table).compile(dialect=_dialect())))
                continue
            # An older version's table gains the columns declared since, null in its rows (never dropped or retyped).
            present = {row[0] for row in con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table.name]).fetchall()}
            for column in table.columns:
                if column.name not in present:
                    kind = column.type.compile(dialect=_dialect())
                    con.execute(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}')
        moved = self._move_to_segments(existing)
        for table in SEGMENT_TABLES:
            _write_schema_segment(self.segments, table)
        self._list_segment_files()
        self._create_segment_views()
        for name, sql in VIEWS.items():
            con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
        meta = {
            "application_id": APPLICATION_ID, "schema_version": str(SCHEMA_VERSION), "code_version": self.code_version,
            "segments": str(self.segments),
        }
        for key, value in meta.items():
            con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, value])
        con.execute("INSERT OR IGNORE INTO meta VALUES ('created_at', ?)", [datetime.now(UTC).isoformat()])
        con.commit()
        return moved

    def _list_segment_files(self) -> None:
        """Record the files of each segment that has no list yet (migrated, or written before lists were recorded):
        those in its folders now, which _check_segments has just checked against the recorded size and digest."""
        con = self._con()
        for owner in (runs, superseded_runs):
            unlisted = con.execute(f"SELECT DISTINCT run_hash, segment FROM {owner.name} "
                                   "WHERE segment IS NOT NULL AND segment_files IS NULL").fetchall()
            for run_hash, segment in unlisted:
                con.execute(f"UPDATE {owner.name} SET segment_files = ? WHERE run_hash = ? AND segment = ?",
                            [json.dumps(segment_file_names(self.segments, run_hash, segment)), run_hash, segment])

    def _create_segment_views(self) -> None:
        """The per-step views, over exactly the segment files the catalog names (store/schema.py segment_views)."""
        con = self._con()
        for name, sql in catalog_views(con, self.segments).items():
            con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")

    def _compact(self) -> None:
        """Rewrite the working copy without the blocks the migrated per-step tables held (DuckDB reuses freed blocks
        but never gives them back): the catalog becomes the few KB per run it is meant to be."""
        self._con().execute("CHECKPOINT")
        self.con.close()
        self.con = None
        compact = self.working.with_name(self.working.name + ".compact")
        compact.unlink(missing_ok=True)
        with duckdb.connect(str(compact), config=NO_EXTENSIONS) as con:
            name = con.execute("SELECT current_database()").fetchall()[0][0]
            con.execute(f"ATTACH '{sql_string(str(self.working))}' AS migrated (READ_ONLY)")
            con.execute(f'COPY FROM DATABASE migrated TO "{name}"')
            con.execute("DETACH migrated")
            con.execute("CHECKPOINT")
        os.replace(compact, self.working)
        self.working.with_name(self.working.name + ".wal").unlink(missing_ok=True)
        self.con = duckdb.connect(str(self.working), config=NO_EXTENSIONS)

    def _move_to_segments(self, existing: set[str]) -> bool:
        """Schema 2 and 3 kept per-step rows in tables of the catalog: each run's rows become its segment 'migrated',
        each superseded result's 'migrated-<superseded_at>', every row kept; then the tables are dropped."""
        con = self._con()
        moved = False
        for table, superseded in zip(SEGMENT_TABLES, SUPERSEDED_SEGMENT_TABLES, strict=True):
            for source, owner, segment in ((table, runs, "'migrated'"),
                                           (superseded, superseded_runs,
                                            "'migrated-' || coalesce(epoch_us(superseded_at), 0)")):
                if source.name not in existing:
                    continue
                present = {row[0] for row in con.execute("SELECT column_name FROM information_schema.columns "
                                                         "WHERE table_name = ?", [source.name]).fetchall()}
                columns = ", ".join(
                    f'CAST({q(c.name) if c.name in present else "NULL"} AS {c.type.compile(dialect=_dialect())}) '
                    f"AS {q(c.name)}" for c in table.columns if c.name != "run_hash")
                (self.segments / table.name).mkdir(parents=True, exist_ok=True)
                folder = sql_string(str(self.segments / table.name))
                con.execute(f"""
                    COPY (SELECT {columns}, run_hash, {segment} AS segment FROM {source.name}) TO '{folder}'
                    (FORMAT parquet, COMPRESSION zstd, PARTITION_BY (run_hash, segment), OVERWRITE_OR_IGNORE,
                     FILENAME_PATTERN 'data{{i}}')""")
                same = " AND o.superseded_at IS NOT DISTINCT FROM s.superseded_at" if owner is superseded_runs else ""
                con.execute(f"""
                    UPDATE {owner.name} o SET segment = {segment.replace("superseded_at", "o.superseded_at")}
                    WHERE EXISTS (SELECT 1 FROM {source.name} s WHERE s.run_hash = o.run_hash{same})""")
                con.execute(f"DROP TABLE {source.name}")
                moved = True
        if moved:
            found = _scan_segments(self.segments, keep=None)
            rows = pa.table({"run_hash": [key[0] for key in found], "segment": [key[1] for key in found],
                             "size": pa.array([size for size, _ in found.values()], pa.int64()),
                             "digest": [digest for _, digest in found.values()]})
            con.register("segment_sizes", rows)
            for owner in (runs, superseded_runs):
                con.execute(f"UPDATE {owner.name} o SET segment_bytes = z.size, segment_digest = z.digest "
                            "FROM segment_sizes z WHERE z.run_hash = o.run_hash AND z.segment = o.segment")
            con.unregister("segment_sizes")
        return moved

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
                _insert_arrow(con, configurations.name, pa.Table.from_pylist(
                    listed, schema=pa.schema([(c.name, _arrow_type(c)) for c in configurations.columns])))
            con.commit()
        except BaseException:
            con.rollback()
            raise
        self._publish()

    def record_done(self, config: RunConfig, summary: dict[str, Any], token_rows: pa.Table, compaction_rows: pa.Table,
                    *, worker: str, attempts: int, forward_rows: pa.Table | None = None,
                    trial_rows: pa.Table | None = None) -> None:
        """A finished run, whole, in one transaction; earlier results of its hash move to superseded_*.
        `forward_rows`: a generation run's verification forwards; `trial_rows`: a task run's trials."""
        for table, rows in ((tokens, token_rows), (compactions, compaction_rows), (forwards, forward_rows),
                            (trials, trial_rows)):
            if rows is None:
                continue
            missing = set(rows.column_names) - {column.name for column in table.columns}
            if missing:
                raise StoreError(
                    f"the engine returns {table.name} column(s) {', '.join(sorted(missing))} that store/schema.py "
                    f"lacks: declare them in the {table.name} table and bump SCHEMA_VERSION"
                )
        row = run_row(config, summary, status="done", error=None, attempts=attempts, worker=worker)
        self._replace(config.run_hash, row, token_rows, compaction_rows, forward_rows, trial_rows)

    def record_failed(self, config: RunConfig, error: str, *, worker: str | None, attempts: int,
                      started_at: datetime | None) -> None:
        """A failed run: its knobs and error text, no per-step rows. An earlier done result moves to superseded_*."""
        row = failed_row(config, error, self.code_version, attempts=attempts, worker=worker, started_at=started_at)
        self._replace(config.run_hash, row, None, None)

    def _replace(self, run_hash: str, row: dict[str, Any], token_rows: pa.Table | None,
                 compaction_rows: pa.Table | None, forward_rows: pa.Table | None = None,
                 trial_rows: pa.Table | None = None) -> None:
        try:
            self._commit_run(run_hash, row, token_rows, compaction_rows, forward_rows, trial_rows)
        except duckdb.Error as exc:
            raise StoreError(f"--store {self.path}: recording run {run_hash} failed ({_first_line(exc)}; a full "
                             "disk?): the runs recorded before it are kept; free space, then rerun") from exc
        self._publish()

    def _commit_run(self, run_hash: str, row: dict[str, Any], token_rows: pa.Table | None,
                    compaction_rows: pa.Table | None, forward_rows: pa.Table | None,
                    trial_rows: pa.Table | None = None) -> None:
        """The run's segment files first (invisible until the catalog that names them is published), then its runs
        row in one catalog transaction; an earlier done result's row moves to superseded_runs with its segment."""
        if not _SAFE_NAME.fullmatch(run_hash):
            raise StoreError(f"run hash {run_hash!r} is not a file-name-safe hash: the store names segments by it")
        parts = [(table, rows) for table, rows in ((tokens, token_rows), (compactions, compaction_rows),
                                                   (forwards, forward_rows), (trials, trial_rows))
                 if rows is not None and rows.num_rows]
        segment = uuid.uuid4().hex[:16] if parts else None
        files = [f"{table.name}/run_hash={run_hash}/segment={segment}/{SEGMENT_FILE}" for table, _ in parts]
        written, digest = 0, hashlib.blake2b(digest_size=16)
        try:
            for table, rows in parts:
                size, file_digest = _write_segment(self.segments, table, run_hash, segment, rows)
                written += size
                digest.update(file_digest)
        except OSError as exc:
            raise StoreError(f"--store {self.path}: writing run {run_hash}'s segment failed ({_os_problem(exc)}): the "
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
            _insert_arrow(con, runs.name, pa.Table.from_pylist([row], schema=_runs_arrow_schema()))
            self._create_segment_views()  # they list the files the catalog names: this run's now among them
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
            raise StoreError(f"--store {self.path}: publishing a snapshot failed ({_first_line(exc)}; a full disk?): "
                             "the published store is the last whole snapshot; free space, then rerun") from exc
        finally:
            staging.unlink(missing_ok=True)
        try:
            _sync_directory(self.target.parent)
        except OSError as exc:
            raise StoreError(f"--store {self.path}: the snapshot was published, but syncing its folder failed "
                             f"({_first_line(exc)}): it may not survive a crash of the machine; check the disk, then "
                             "rerun (nothing is lost: the runs recorded so far are in the store)") from exc
        self.publish_seconds += time.perf_counter() - started
        self.publishes += 1


_SAFE_NAME = re.compile(r"[0-9A-Za-z][0-9A-Za-z_.-]*")


def _scan_segments(folder: Path, keep: set[tuple[str, str]] | None) -> dict[tuple[str, str], tuple[int, str]]:
    """Each segment's total bytes and digest (BLAKE2b over its files' BLAKE2b, per-step tables in declared order, file
    names sorted). With `keep`, segments not in it are deleted, and so are temporary files."""
    sizes: dict[tuple[str, str], int] = {}
    digests: dict[tuple[str, str], hashlib.blake2b] = {}
    for table in SEGMENT_TABLES:
        for directory in (folder / table.name).glob("run_hash=*/segment=*"):
            key = (directory.parent.name.removeprefix("run_hash="), directory.name.removeprefix("segment="))
            if key == (SCHEMA_SEGMENT, SCHEMA_SEGMENT):
                continue
            if keep is not None and key not in keep:
                shutil.rmtree(directory, ignore_errors=True)
                with contextlib.suppress(OSError):
                    directory.parent.rmdir()  # only when empty
                continue
            for file in sorted(directory.iterdir()):
                if keep is not None and file.name.endswith(".tmp"):
                    file.unlink(missing_ok=True)
                elif file.name.endswith(".parquet"):
                    size, digest = _file_digest(file)
                    sizes[key] = sizes.get(key, 0) + size
                    digests.setdefault(key, hashlib.blake2b(digest_size=16)).update(digest)
    return {key: (sizes[key], digests[key].hexdigest()) for key in sizes}


def _file_digest(path: Path) -> tuple[int, bytes]:
    with path.open("rb") as handle:
        digest = hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=16))
    return path.stat().st_size, digest.digest()


def _write_segment(folder: Path, table, run_hash: str, segment: str, rows: pa.Table) -> tuple[int, bytes]:
    """One immutable Parquet file of a run's rows of `table` (its declared columns and types, run_hash from the path),
    written under a temporary name, made durable, then renamed into place. Returns its size and digest."""
    sink = pa.BufferOutputStream()
    # No dictionary pages: per-step values rarely repeat, and dictionaries made segments ~25% larger than the same
    # rows written by DuckDB (bench/store_scale.py prints the ratio).
    pq.write_table(_segment_rows(table, rows), sink, compression="zstd", use_dictionary=False)
    data = sink.getvalue()
    _write_durably(folder / table.name / f"run_hash={run_hash}" / f"segment={segment}" / SEGMENT_FILE, data)
    return data.size, hashlib.blake2b(data, digest_size=16).digest()


def _write_durably(final: Path, data: pa.Buffer) -> None:
    """`data` as the file `final` (in a folder <table>/<run_hash=...>/<segment=...>, made if missing): written under a
    temporary name and fsynced, renamed into place, then the rename and the new folders made durable by syncing the
    three folders whose entries they are."""
    directory = final.parent
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / f".{final.name}.{os.getpid()}.tmp"
    try:
        with temporary.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)
    for level in (directory, directory.parent, directory.parent.parent):
        _sync_directory(level)


def _sync_directory(directory: Path) -> None:
    """fsync a folder, which makes renames into it and entries created in it survive a crash (POSIX; elsewhere a
    folder cannot be opened, and the rename is as durable as the platform makes it)."""
    if os.name != "posix":
        return
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # filesystems that cannot sync a folder (some FUSE, NFS)
            raise
    finally:
        os.close(handle)


def _write_schema_segment(folder: Path, table) -> None:
    """The 0-row file that gives a table's view its columns while no run has rows in it."""
    final = folder / table.name / f"run_hash={SCHEMA_SEGMENT}" / f"segment={SCHEMA_SEGMENT}" / "schema.parquet"
    if final.is_file():
        return
    sink = pa.BufferOutputStream()
    pq.write_table(_segment_rows(table, None), sink)
    _write_durably(final, sink.getvalue())  # a torn file would break the table's view
    _sync_directory(folder)  # the table's folder, new on a store's first open, is an entry of the segment folder


def _segment_rows(table, rows: pa.Table | None) -> pa.Table:
    """`rows` in the declared columns of `table` (run_hash aside), declared types, nulls for columns it lacks."""
    schema = segment_arrow_schema(table)
    count = 0 if rows is None else rows.num_rows
    columns = []
    for field in schema:
        if rows is not None and field.name in rows.column_names:
            columns.append(rows.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(count, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def segment_arrow_schema(table) -> pa.Schema:
    """A per-step table's segment columns as Arrow types equal to the DuckDB types of its declaration."""
    kinds = {"Integer": pa.int32(), "BigInteger": pa.int64(), "Double": pa.float64(), "Boolean": pa.bool_(),
             "String": pa.string(), "Text": pa.string()}
    return pa.schema([pa.field(c.name, kinds[type(c.type).__name__], nullable=c.nullable)
                      for c in table.columns if c.name != "run_hash"])


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
        **knob_values(normalised),
        **{column.name: summary.get(column.name) for column in SUMMARY_COLUMNS},
        "started_at": _timestamp(summary.get("started_at")), "ended_at": _timestamp(summary.get("ended_at")),
        "code_version": environment.get("code_version", "unknown"), "git_commit": environment.get("git_commit"),
        "environment_json": json.dumps(environment, sort_keys=True), "worker": worker,
    }


def knob_values(normalised: dict[str, Any]) -> dict[str, Any]:
    """The knob columns of a normalised configuration: a knob it does not hold (the task knobs outside task runs) is
    null, and a list (depths) its JSON text."""
    values = {column.name: normalised.get(column.name) for column in KNOB_COLUMNS}
    return {name: json.dumps(value) if isinstance(value, list) else value for name, value in values.items()}


def configuration_row(grid: str, experiment: str, config: RunConfig) -> dict[str, Any]:
    """The configurations row of one configuration an experiment lists: its own knobs, window and capacities."""
    normalised = config.normalised()
    policy = config.policy if config.method == "streaming" else None
    own = dict.fromkeys(CONFIGURATION_OWN) | {"setting_hash": config.setting_hash}
    if policy is not None:
        own.update(window_resolved=policy.window, soft_capacity=policy.soft_capacity,
                   hard_capacity=policy.hard_capacity)
    return {
        "grid": grid, "experiment": experiment, "config_hash": config.config_hash,
        "config_group_hash": config.config_group_hash, "run_hash": config.run_hash,
        "config_json": json.dumps(normalised, sort_keys=True),
        **knob_values(normalised), **own,
    }


def failed_row(config: RunConfig, error: str, code_version: str, *, attempts: int, worker: str | None,
               started_at: datetime | None) -> dict[str, Any]:
    normalised = config.normalised()
    return {
        "run_hash": config.run_hash, "group_hash": config.group_hash, "setting_hash": config.setting_hash,
        "status": "failed", "error": error,
        "attempts": attempts, "config_json": json.dumps(normalised, sort_keys=True),
        **knob_values(normalised),
        "started_at": started_at, "ended_at": datetime.now(UTC), "code_version": code_version, "worker": worker,
    }


def _timestamp(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value)
