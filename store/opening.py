"""Every check before a store is touched, written once: the file's header and length, the lock-retried read-only open,
its meta and schema version, the default path, and the connection readers query through (pointed at the segments
beside the catalog). Readers (store/queries.py, the SQL box) and the writer (store/writer.py) open stores only here.

It never writes a store: connections it opens are read-only.
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import duckdb
from sqlalchemy import BigInteger, Boolean, DateTime, Double, Integer, String, Text

from store.schema import (
    APPLICATION_ID,
    CATALOG_TABLES,
    MIGRATES_FROM,
    SCHEMA_VERSION,
    added_column_value,
    q,
    runs,
    segment_tables,
    segments_folder,
    superseded_runs,
    superseded_segment_tables,
    unsafe_segment_path,
)
from store.segments import catalog_views, scan_segments, segment_problem, unlisted_segments

DEFAULT_STORE = Path("results/gridrun.duckdb")
T = TypeVar("T")
# No connection of ours fetches or loads an extension (a foreign file, a SQLite one, would make DuckDB download one).
NO_EXTENSIONS = {"autoload_known_extensions": False, "autoinstall_known_extensions": False}
DUCKDB_MAGIC = b"DUCK"  # bytes 8..12 of every DuckDB database file
FILE_HEADER_BYTES = 3 * 4096  # DuckDB's main header and its two database headers, before the first block


class StoreError(RuntimeError):
    """The store cannot be read: missing, locked past the retries, or not a gridrun store. The message says the fix."""


class SegmentsChanged(StoreError):
    """A query listed a leftover segment that a writer then removed; running it again reads the store as it is."""


class StoreWriteError(StoreError):
    """The store cannot be written as asked; the message names the file, what is wrong and the fix. A StoreError too,
    so that one `except` catches what reading and writing a store refuse (store.writer names it StoreError)."""


def first_line(exc: BaseException) -> str:
    """The first line of an error's text (DuckDB's run over several), or its class name when it has none."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# --- readers' connections ---------------------------------------------------------------------------------------------
def signature(path: Path | str) -> tuple[int, int, int]:
    """Changes whenever the published snapshot is replaced or grows: a cache key for query results."""
    stat = os.stat(path)
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


@dataclass(frozen=True)
class Sandbox:
    """A connection for SQL typed by a user: DuckDB's memory limit and thread count (the SQL box, store/sandbox.py,
    declares the values)."""

    memory_limit: str
    threads: int


@contextmanager
def connect(path: Path | str, *, attempts: int = 20, sandbox: Sandbox | None = None):
    """A read-only connection, retried while a writer holds the file or a snapshot is being swapped in.

    `sandbox` sets its limits and turns off every file-system access (COPY TO, ATTACH, read_csv, extensions) but
    reading the store's own segment folder, and locks the configuration, for SQL typed by a user. A store moved or
    copied since its last writer (its catalog's views name the old segment folder) is read where it lies: temporary
    views over the folder beside it shadow the catalog's for this connection.
    """
    path = Path(path)
    if not path.is_file():
        raise StoreError(
            f"no store at {path}: run a grid first (python -m gridrun grids/smoke.yaml --store {path}) or pass --store"
        )
    unsafe = unsafe_segment_path(path)
    if unsafe:
        raise StoreError(f"{path}: {unsafe}")
    if not is_duckdb_file(path, str(path)):
        raise StoreError(f"{path} cannot be read as a DuckDB database (it is another kind of file, or truncated): pass "
                         "the store that python -m gridrun --store wrote")
    con, size = _open_snapshot(path, attempts, dict(NO_EXTENSIONS))
    try:
        try:
            check_length(con, path, size)
            _check_is_store(con, path)
            folder = _point_segments(con, path)
            _declare_new_tables(con)
            if sandbox is not None:
                # allowed_directories can only be set once the database runs; temp_directory and it only while
                # external access is on.
                con.execute("SET memory_limit = $value", {"value": sandbox.memory_limit})
                # A thread per core reserves a stack and a malloc arena each: on a many-core host they would use up the
                # box's address-space headroom (store/sandbox.py) before any query ran.
                con.execute("SET threads = $value", {"value": sandbox.threads})
                con.execute("SET temp_directory = ''")
                con.execute("SET allowed_directories = $folders", {"folders": [f"{folder}/"]})
                con.execute("SET enable_external_access = false")
                con.execute("SET lock_configuration = true")
            yield con
        except duckdb.Error as exc:
            if _vanished_leftover(con, exc):
                raise SegmentsChanged(f"{path}: a writer removed the segments a killed run had left while this query "
                                      "listed them (nothing of a result changed): run it again") from exc
            if _is_damage(exc):
                raise StoreError(f"{path} is damaged (corrupt or truncated: {first_line(exc)}); it was left "
                                 "untouched: restore it, or rerun the grid into a new --store") from exc
            raise
    finally:
        con.close()


def read(path: Path | str, query: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
    """`query(con)` on a fresh connection to the store, run a second time if a writer removed a killed run's leftover
    segments while the first listed them (the views list the segment folder before they filter by the runs table)."""
    try:
        with connect(path) as con:
            return query(con)
    except SegmentsChanged:
        with connect(path) as con:
            return query(con)


_MISSING_SEGMENT = re.compile(r"/(\w+)/run_hash=([0-9a-z_]+)/segment=([^/]+)/[^/\s\"']+\.parquet\"?: No such file")


def _vanished_leftover(con: duckdb.DuckDBPyConnection, exc: duckdb.Error) -> bool:
    """Whether `exc` is a segment file that disappeared and that no run names (a leftover of a killed writer, which
    the next writer removes): not damage, only a listing that went stale."""
    found = _MISSING_SEGMENT.search(str(exc))
    if not isinstance(exc, duckdb.IOException) or found is None:
        return False
    _, run_hash, segment = found.groups()
    named = con.execute("SELECT count(*) FROM (SELECT run_hash, segment FROM runs UNION ALL "
                        "SELECT run_hash, segment FROM superseded_runs) WHERE run_hash = $h AND segment = $s",
                        {"h": run_hash, "s": segment}).fetchone()[0]
    return named == 0


def _point_segments(con: duckdb.DuckDBPyConnection, path: Path) -> Path:
    """The segment folder beside the store; when the catalog's views name another (the store was moved or copied
    since its last writer), temporary views over this one shadow them. Returns the folder."""
    folder = segments_folder(path.resolve())
    if unlisted_segments(con):  # its views would read every file of the segment folders (a glob): refused
        raise StoreError(f"{path} was written by an older gridrun (its catalog does not list its segments' files): "
                         f"upgrade it in place, every row kept, with python -m gridrun migrate --store {path}")
    named = dict(con.execute("SELECT key, value FROM meta WHERE key = 'segments'").fetchall()).get("segments")
    if named == str(folder):
        return folder
    if not folder.is_dir():
        raise StoreError(f"{path} has no segment folder {folder} beside it (its per-step rows): move the store file "
                         "and its .segments folder together")
    for name, sql in catalog_views(con, folder).items():
        con.execute(f"CREATE OR REPLACE TEMPORARY VIEW {name} AS {sql}")
    return folder


_SQL_NAMES = {String: "VARCHAR", Text: "VARCHAR", Integer: "INTEGER", BigInteger: "BIGINT", Double: "DOUBLE",
              Boolean: "BOOLEAN", DateTime: "TIMESTAMPTZ"}


def _declare_new_tables(con: duckdb.DuckDBPyConnection) -> None:
    """A store whose last writer predates a per-step table (trials, say) or a column (a knob declared since) is read
    as if migrated, rather than failing: the table as an empty temporary view with its declared columns, a catalog
    table as a temporary view over the stored one plus the missing columns at what its rows hold
    (schema.added_column_value). The next writer migrates the store for real."""
    database = con.execute("SELECT current_database()").fetchone()[0]
    views = {row[0] for row in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    for table in (*segment_tables(), *superseded_segment_tables()):
        if table.name not in views:
            columns = ", ".join(f"CAST(NULL AS {_SQL_NAMES[type(column.type)]}) AS {q(column.name)}"
                                for column in table.columns)
            con.execute(f"CREATE TEMPORARY VIEW {table.name} AS SELECT {columns} WHERE false")
    present: dict[str, set[str]] = {}
    for table_name, column in con.execute(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_catalog = $db AND "
            "table_schema = 'main'", {"db": database}).fetchall():
        present.setdefault(table_name, set()).add(column)
    for table in CATALOG_TABLES:
        if table.name not in present:
            continue
        missing = [column for column in table.columns if column.name not in present[table.name]]
        if missing:
            added = ", ".join(f"CAST({added_column_value(column.name) or 'NULL'} AS {_SQL_NAMES[type(column.type)]}) "
                              f"AS {q(column.name)}" for column in missing)
            con.execute(f"CREATE TEMPORARY VIEW {table.name} AS SELECT *, {added} FROM {q(database)}.main.{table.name}")


def _is_damage(exc: duckdb.Error) -> bool:
    text = str(exc)
    segment = "Failed to read file" in text and ".segments/" in text  # a segment's Parquet that does not decode
    return isinstance(exc, duckdb.IOException) or "Corrupt database" in text or "checksum" in text or segment


def _open_snapshot(path: Path, attempts: int, config: dict) -> tuple[duckdb.DuckDBPyConnection, int]:
    """A read-only connection and the size of the very file it opened (a writer may swap in a new snapshot between
    a stat and the open: then the open is retried)."""
    for _ in range(attempts):
        before = os.stat(path)
        con = _open_read_only(path, attempts, config)
        if os.stat(path).st_ino == before.st_ino:
            return con, before.st_size
        con.close()
    raise StoreError(f"{path} was replaced {attempts} times while being opened: retry")


def check_length(con: duckdb.DuckDBPyConnection, path: Path, size: int) -> None:
    """Raise StoreError when the file (of `size` bytes) is shorter than the blocks its header counts (a truncated copy
    or download): DuckDB would only notice when a query reaches a missing block, an index's perhaps, midway through a
    write."""
    # Used blocks, not total ones: DuckDB truncates free blocks off the end of the file, but every used block is in it.
    blocks, block_size = con.execute("SELECT used_blocks, block_size FROM pragma_database_size()").fetchall()[0]
    expected = FILE_HEADER_BYTES + blocks * block_size
    if size < expected:
        raise StoreError(f"{path} cannot be read: corrupt or truncated ({size:,} bytes, its header counts {blocks} "
                         f"used blocks = {expected:,} bytes); it was left untouched: restore it, or rerun the grid "
                         "into a new --store")


def is_duckdb_file(path: Path, name: str, error: type[StoreError] = StoreError) -> bool:
    """Whether `path` starts as every DuckDB database does: a file that is not one is refused before DuckDB sees it
    (DuckDB would try to load an extension for a SQLite file). `error` naming `name` when it cannot be read."""
    try:
        with path.open("rb") as handle:
            header = handle.read(12)
    except OSError as exc:
        raise error(f"{name} cannot be read ({exc.strerror}): fix its permissions") from None
    return len(header) >= 12 and header[8:12] == DUCKDB_MAGIC


def _open_read_only(path: Path, attempts: int, config: dict) -> duckdb.DuckDBPyConnection:
    try:
        return open_read_only(path, attempts, config, locked=lambda exc: StoreError(
            f"{path} stays locked or unreadable after {attempts} tries ({exc}): open the published snapshot "
            "that gridrun writes (results/gridrun.duckdb), not a file a process is writing"))
    except duckdb.IOException as exc:
        raise StoreError(f"{path} cannot be read as a DuckDB database ({first_line(exc)}): pass the store "
                         "that python -m gridrun --store wrote") from exc


def open_read_only(path: Path, attempts: int, config: dict,
                   locked: Callable[[duckdb.IOException], StoreError]) -> duckdb.DuckDBPyConnection:
    """A read-only connection, retried with backoff while another process holds the file read-write (a writer's
    moment, a user's duckdb shell); `locked(error)` is raised after `attempts` tries, DuckDB's other errors at once."""
    delay = 0.05
    for attempt in range(attempts):
        try:
            return duckdb.connect(str(path), read_only=True, config=dict(config))
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower():
                raise
            if attempt == attempts - 1:
                raise locked(exc) from exc
            time.sleep(delay)
            delay = min(2 * delay, 0.5)
    raise AssertionError("unreachable")


def _check_is_store(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    tables = {row[0] for row in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    missing = {"runs", "tokens", "compactions", "experiments", "grids"} - tables
    if missing:
        raise StoreError(f"{path} is not a gridrun store (no table {', '.join(sorted(missing))}): pass the store "
                         "that python -m gridrun --store wrote")
    version = read_meta(con, strict=True).get("schema_version")
    if version is not None and version.isdigit() and int(version) in MIGRATES_FROM:
        raise StoreError(f"{path} was written by an older gridrun (store schema {version}): upgrade it in place, "
                         f"every row kept, with python -m gridrun migrate --store {path}")
    if version is not None and version != str(SCHEMA_VERSION):
        newer = version.isdigit() and int(version) > SCHEMA_VERSION
        raise StoreError(
            f"{path} has store schema version {version}, this checkout reads version {SCHEMA_VERSION}: "
            + ("it was written by a newer gridrun; update this checkout (git pull) to read it" if newer else
               "it was written by an older gridrun; read it with that version, or rerun the grid into a new --store")
        )
    if "configurations" not in tables:
        raise StoreError(f"{path} was written by an older gridrun (no table configurations): upgrade it in place, "
                         f"every row kept, with python -m gridrun migrate --store {path}")


# --- the writer's checks before it touches a file ------------------------------------------------------------------
def check_store_file(path: Path) -> None:
    """Raise StoreError unless `path` is absent or a gridrun store of a schema this code writes. Never modifies it."""
    unsafe = unsafe_segment_path(path)
    if unsafe:
        raise StoreWriteError(f"--store {path}: {unsafe}")
    if not path.exists():
        if path.is_symlink():
            return  # a link to a store yet to be made: the writer creates its target
        if path.parent.exists() and not path.parent.is_dir():
            raise StoreWriteError(f"--store {path}: {path.parent} is a file, not a folder: pass a path in a folder")
        return
    if not path.is_file():
        raise StoreWriteError(f"--store {path} is not a file: pass a path like results/gridrun.duckdb")
    if not is_duckdb_file(path, f"--store {path}", StoreWriteError):
        raise StoreWriteError(
            f"--store {path} is not a DuckDB database (corrupt, truncated or another kind of file); it was left "
            "untouched: pass another --store path, or move the file away"
        )
    before = path.stat()
    try:
        con = open_published(path)
    except duckdb.Error as exc:
        raise StoreWriteError(f"--store {path} cannot be opened ({first_line(exc)}); it was left untouched: pass "
                              "another --store") from exc
    try:
        if path.stat().st_ino == before.st_ino:  # else a writer published a new snapshot meanwhile: those are whole
            check_length(con, path, before.st_size)
        found = read_meta(con)
    except StoreError as exc:
        raise StoreWriteError(f"--store {exc}") from None
    except duckdb.Error as exc:
        raise damaged(path, exc) from exc
    finally:
        con.close()
    if found.get("application_id") != APPLICATION_ID:
        raise StoreWriteError(
            f"--store {path} is a DuckDB database but not a gridrun store (no meta.application_id = {APPLICATION_ID}); "
            "it was left untouched: pass another --store path"
        )
    version = found.get("schema_version")
    if version not in {str(SCHEMA_VERSION), *(str(old) for old in MIGRATES_FROM)}:
        raise StoreWriteError(
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
    for candidate in (folder, segments, *(segments / table.name for table in segment_tables())):
        if not candidate.exists() and not candidate.is_symlink():
            continue
        if not candidate.is_dir():
            raise StoreWriteError(f"--store {path}: {candidate} is not a folder (gridrun writes the store's files "
                             "there): move it away, or pass another --store")
        if not os.access(candidate, os.W_OK | os.X_OK):
            raise StoreWriteError(f"--store {path}: the folder {candidate} is not writable (gridrun writes the store's "
                             "snapshots and per-run segments there): make it writable, or pass another --store")


def os_problem(exc: OSError) -> str:
    """What an OSError says about the disk, for a message: permissions or a read-only disk, a full one, or its text."""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{exc.strerror}: the folder is not writable; make it writable"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{exc.strerror}: the disk is full; free space"
    return f"{exc.strerror or exc}; check the disk"


def damaged(path: Path, exc: BaseException) -> StoreWriteError:
    return StoreWriteError(f"--store {path} cannot be read: corrupt or truncated ({first_line(exc)}); it was left "
                      "untouched: pass another --store path, or move the file away")


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
        raise damaged(path, exc) from exc


def read_meta(con: duckdb.DuckDBPyConnection, strict: bool = False) -> dict[str, str]:
    """The store's meta table as a dict ({} when there is none); an unreadable one reads as {} unless `strict`."""
    tables = {row[0] for row in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    if "meta" not in tables:
        return {}
    try:
        return dict(con.execute("SELECT key, value FROM meta").fetchall())
    except duckdb.Error:
        if strict:
            raise
        return {}


def open_published(path: Path, attempts: int = 20) -> duckdb.DuckDBPyConnection:
    """The writer's read-only look at a published store (lock-retried; messages name --store)."""
    return open_read_only(path, attempts, NO_EXTENSIONS, locked=lambda exc: StoreWriteError(
        f"--store {path} stays locked by another process ({exc}): close it there (open the store with "
        "duckdb -readonly), then retry"))


def check_segments(con: duckdb.DuckDBPyConnection, segments: Path, name: Path) -> None:
    """Every segment the catalog references is there and whole: its files' total size and digest as recorded
    (Parquet has no checksum DuckDB verifies: a flipped bit would read as another number). Segments it does not
    reference (written by a writer killed before it published, or by a migration that did not finish) and
    temporary files are removed. Reads every segment once per writer, never per run."""
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
    present = scan_segments(segments, keep=set(referenced))
    for key, expected in sorted(referenced.items()):
        # A listed segment: its named files as recorded, and no other beside them; else its folders' files.
        problem = segment_problem(segments, *key, lists[key], *expected) if key in lists else None
        if problem is None and key not in lists and present.get(key) != expected:
            problem = "is " + ("missing" if key not in present else
                               f"{present[key][0]:,} bytes, recorded {expected[0]:,} (truncated?)"
                               if present[key][0] != expected[0] else
                               "of another content than recorded (bit-flipped)")
        if problem:
            raise StoreWriteError(
                f"--store {name} is damaged (a segment corrupt, truncated or missing): run {key[0]}'s "
                f"segment {key[1]} in {segments} {problem}; it was left untouched: restore the store file "
                "and its .segments folder together, or rerun into a new --store")


def verify_segments(path: Path | str, run_hashes: Iterable[str] | None = None) -> int:
    """Check every segment the store's runs rows name (of `run_hashes`, when given) against the sizes and digests its
    writer recorded; raise store.opening.StoreError naming the first damaged run, in one line. Returns how many
    segments were checked. Reads every byte of them once."""
    path = Path(path)
    wanted = set(run_hashes) if run_hashes is not None else None
    with connect(path) as con:
        rows = con.execute("SELECT run_hash, segment, segment_files, segment_bytes, segment_digest FROM runs "
                           "WHERE segment IS NOT NULL ORDER BY run_hash").fetchall()
    folder = segments_folder(path.resolve())
    checked = 0
    for run_hash, segment, listed, size, digest in rows:
        if wanted is not None and run_hash not in wanted:
            continue
        problem = segment_problem(folder, run_hash, segment, json.loads(listed), size, digest)  # connect: listed
        if problem:
            raise StoreError(f"{path} is damaged: run {run_hash}'s segment {segment} in {folder} {problem}; no number "
                             "was read from it: restore the store file and its .segments folder together, or rerun "
                             "the grid into a new --store")
        checked += 1
    return checked
