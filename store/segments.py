"""A store's per-step rows as immutable per-run Parquet segments (store/schema.py "Segments"): writing a segment's files
durably, the catalog's views over exactly the files it names, and the check of every file's size and digest (one digest
function) against what the writer recorded, so that a reader never reads a file the catalog does not name and
`paper export` / `gridrun status` never read a damaged number.

It never writes the catalog, and never deletes a segment the catalog names.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from .schema import (
    SCHEMA_SEGMENT,
    SEGMENT_FILE,
    segment_tables,
    segment_views,
    stored_arrow_type,
)

DIGEST_BYTES = 16  # BLAKE2b-128: each file's, and each segment's over its files' (in the runs row's segment_digest)


def new_digest() -> hashlib.blake2b:
    """The one digest of the store's segments: of a file's bytes, and of a segment (over its files' digests, per-step
    tables in declared order, file names sorted)."""
    return hashlib.blake2b(digest_size=DIGEST_BYTES)


def file_digest(path: Path) -> tuple[int, bytes]:
    """The size and digest of one segment file."""
    with path.open("rb") as handle:
        digest = hashlib.file_digest(handle, new_digest)
    return path.stat().st_size, digest.digest()


# --- writing ------------------------------------------------------------------------------------------------------
def write_segment(folder: Path, table, run_hash: str, segment: str, rows: pa.Table) -> tuple[int, bytes]:
    """One immutable Parquet file of a run's rows of `table` (its declared columns and types, run_hash from the path),
    written under a temporary name, made durable, then renamed into place. Returns its size and digest."""
    sink = pa.BufferOutputStream()
    # No dictionary pages: per-step values rarely repeat, and dictionaries made segments ~25% larger than the same
    # rows written by DuckDB (bench/store_scale.py prints the ratio).
    pq.write_table(_segment_rows(table, rows), sink, compression="zstd", use_dictionary=False)
    data = sink.getvalue()
    _write_durably(folder / table.name / f"run_hash={run_hash}" / f"segment={segment}" / SEGMENT_FILE, data)
    digest = new_digest()
    digest.update(data)
    return data.size, digest.digest()


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
        sync_directory(level)


def sync_directory(directory: Path) -> None:
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


def write_schema_segment(folder: Path, table) -> None:
    """The 0-row file that gives a table's view its columns while no run has rows in it."""
    final = folder / table.name / f"run_hash={SCHEMA_SEGMENT}" / f"segment={SCHEMA_SEGMENT}" / "schema.parquet"
    if final.is_file():
        return
    sink = pa.BufferOutputStream()
    pq.write_table(_segment_rows(table, None), sink)
    _write_durably(final, sink.getvalue())  # a torn file would break the table's view
    sync_directory(folder)  # the table's folder, new on a store's first open, is an entry of the segment folder


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
    """A per-step table's segment columns as stored (store/schema.py stored_arrow_type), run_hash aside (the path)."""
    return pa.schema([pa.field(c.name, stored_arrow_type(c), nullable=c.nullable)
                      for c in table.columns if c.name != "run_hash"])


def scan_segments(folder: Path, keep: set[tuple[str, str]] | None) -> dict[tuple[str, str], tuple[int, str]]:
    """Each segment's total bytes and digest (BLAKE2b over its files' BLAKE2b, per-step tables in declared order, file
    names sorted). With `keep`, segments not in it are deleted, and so are temporary files."""
    sizes: dict[tuple[str, str], int] = {}
    digests: dict[tuple[str, str], hashlib.blake2b] = {}
    for table in segment_tables():
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
                    size, digest = file_digest(file)
                    sizes[key] = sizes.get(key, 0) + size
                    digests.setdefault(key, new_digest()).update(digest)
    return {key: (sizes[key], digests[key].hexdigest()) for key in sizes}


# --- what the catalog names, and checking it ------------------------------------------------------------------
def segment_file_lists(con: duckdb.DuckDBPyConnection) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The segment files the catalog names, per per-step table: those of runs (current) and of superseded_runs."""
    lists = []
    for owner in ("runs", "superseded_runs"):
        per_table: dict[str, list[str]] = {table.name: [] for table in segment_tables()}
        rows = con.execute(f"SELECT segment_files FROM {owner} WHERE segment IS NOT NULL AND segment_files IS NOT NULL "
                           "ORDER BY run_hash, segment").fetchall()
        for (listed,) in rows:
            for file in json.loads(listed):
                per_table.setdefault(file.split("/", 1)[0], []).append(file)
        lists.append(per_table)
    return lists[0], lists[1]


def catalog_views(con: duckdb.DuckDBPyConnection, folder: Path) -> dict[str, str]:
    """The segment views of the catalog on `con`, over the files it names in `folder`."""
    current, superseded = segment_file_lists(con)
    return segment_views(str(folder), current, superseded)


def create_segment_views(con: duckdb.DuckDBPyConnection, folder: Path) -> None:
    """(Re)create the catalog's per-step views over exactly the segment files it names (schema.segment_views)."""
    for name, sql in catalog_views(con, folder).items():
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")


def unlisted_segments(con: duckdb.DuckDBPyConnection) -> int:
    """How many runs (current or superseded) have a segment whose files the catalog does not list (written by a
    gridrun before the lists were recorded; the next writer lists them)."""
    columns = {row[0] for row in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'runs'").fetchall()}
    if "segment" not in columns:
        return 0
    if "segment_files" not in columns:
        return con.execute("SELECT count(*) FROM runs WHERE segment IS NOT NULL").fetchone()[0]
    return con.execute("SELECT (SELECT count(*) FROM runs WHERE segment IS NOT NULL AND segment_files IS NULL) + "
                       "(SELECT count(*) FROM superseded_runs WHERE segment IS NOT NULL AND segment_files IS NULL)"
                       ).fetchone()[0]


def segment_file_names(folder: Path, run_hash: str, segment: str) -> list[str]:
    """The Parquet files in one segment's folders, relative to the segment folder, in digest order (per-step tables
    as declared, names sorted): what a writer lists for a segment recorded before lists were."""
    files = []
    for table in segment_tables():
        directory = folder / table.name / f"run_hash={run_hash}" / f"segment={segment}"
        if directory.is_dir():
            files += [f"{table.name}/{directory.parent.name}/{directory.name}/{file.name}"
                      for file in sorted(directory.iterdir()) if file.name.endswith(".parquet")]
    return files


def segment_problem(folder: Path, run_hash: str, segment: str, files: list[str], size: int | None,
                    digest: str | None) -> str | None:
    """What is wrong with one run's segment, or None: a named file missing, a stray Parquet file beside them (a copy a
    glob would read), or a total size or BLAKE2b digest other than recorded (truncated, bit-flipped, swapped)."""
    named = set(files)
    for directory in sorted({(folder / file).parent for file in files}):
        strays = sorted(f.name for f in directory.iterdir() if f.name.endswith(".parquet")
                        and f"{directory.relative_to(folder)}/{f.name}" not in named) if directory.is_dir() else []
        if strays:
            return f"holds {', '.join(strays)} beside the files the catalog names (a stray copy?)"
    total, combined = 0, new_digest()
    for file in files:
        path = folder / file
        try:
            file_size, digest_of_file = file_digest(path)
        except FileNotFoundError:
            return f"lacks {file} (deleted?)"
        except OSError as exc:
            return f"cannot read {file} ({exc.strerror})"
        total += file_size
        combined.update(digest_of_file)
    if size is not None and total != size:
        return f"is {total:,} bytes, recorded {size:,} (truncated or replaced?)"
    if digest is not None and combined.hexdigest() != digest:
        return "holds other bytes than recorded (bit-flipped, or swapped with another run's?)"
    return None
