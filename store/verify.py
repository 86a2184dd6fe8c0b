"""What a store's segments must be, as its catalog names them: the views' file lists, and a check of every file's
size and digest against what the writer recorded, so that a reader never reads a file the catalog does not name and
`paper export` / `gridrun status` never read a damaged number.

Reads only; never changes a store.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import duckdb

from .schema import SEGMENT_TABLES, segment_views, segments_folder

DIGEST_BYTES = 16  # BLAKE2b-128, as store/writer.py records it


def segment_file_lists(con: duckdb.DuckDBPyConnection) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The segment files the catalog names, per per-step table: those of runs (current) and of superseded_runs."""
    lists = []
    for owner in ("runs", "superseded_runs"):
        per_table: dict[str, list[str]] = {table.name: [] for table in SEGMENT_TABLES}
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
    for table in SEGMENT_TABLES:
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
    total, combined = 0, hashlib.blake2b(digest_size=DIGEST_BYTES)
    for file in files:
        path = folder / file
        try:
            with path.open("rb") as handle:
                file_digest = hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=DIGEST_BYTES))
        except FileNotFoundError:
            return f"lacks {file} (deleted?)"
        except OSError as exc:
            return f"cannot read {file} ({exc.strerror})"
        total += path.stat().st_size
        combined.update(file_digest.digest())
    if size is not None and total != size:
        return f"is {total:,} bytes, recorded {size:,} (truncated or replaced?)"
    if digest is not None and combined.hexdigest() != digest:
        return "holds other bytes than recorded (bit-flipped, or swapped with another run's?)"
    return None


def verify_segments(path: Path | str, run_hashes: Iterable[str] | None = None) -> int:
    """Check every segment the store's runs rows name (of `run_hashes`, when given) against the sizes and digests its
    writer recorded; raise store.queries.StoreError naming the first damaged run, in one line. Returns how many
    segments were checked. Reads every byte of them once."""
    from .queries import StoreError, connect

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
