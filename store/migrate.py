"""Schema migrations of a store's catalog, in place and every row kept: tables and columns declared since a store was
written are added (null in its rows), and the per-step tables of schemas 2 and 3 move into per-run segments (schema 4).
Run by StoreWriter when it opens a store (python -m gridrun migrate --store X runs just that).

It never drops or retypes a column, and never deletes a row: a migrated row is copied before its table is dropped.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
from sqlalchemy.schema import CreateTable

from .opening import NO_EXTENSIONS, read_meta
from .schema import (
    APPLICATION_ID,
    CATALOG_TABLES,
    SCHEMA_VERSION,
    VIEWS,
    added_column_value,
    q,
    runs,
    segment_tables,
    sql_string,
    superseded_runs,
    superseded_segment_tables,
)
from .segments import create_segment_views, scan_segments, segment_file_names, write_schema_segment


def dialect():
    """SQLAlchemy's DuckDB dialect, which compiles the declared tables and column types (imported on first use)."""
    import duckdb_engine

    return duckdb_engine.Dialect()


def create_schema(con: duckdb.DuckDBPyConnection, segments: Path, code_version: str) -> bool:
    """Create what is missing. Migration 2 -> 3 adds the table configurations and the columns declared since
    (generation runs), null in older rows: a version 2 run keeps its rows under its hash (then the configuration's
    own), and readers treat each as its own configuration. Migration to 4 moves the per-step tables into segments
    (move_to_segments). The segment views are (re)pointed at the folder beside the catalog on every open.
    Returns whether per-step tables were moved."""
    existing = {row[0] for row in con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE'").fetchall()}
    previous = read_meta(con).get("schema_version")
    con.begin()
    if previous is not None and previous != str(SCHEMA_VERSION):
        con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                    [f"migrated_from_{previous}", datetime.now(UTC).isoformat()])
    for table in CATALOG_TABLES:
        if table.name not in existing:
            con.execute(str(CreateTable(table).compile(dialect=dialect())))
            continue
        # An older version's table gains the columns declared since, null in its rows (never dropped or retyped).
        present = {row[0] for row in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table.name]).fetchall()}
        for column in table.columns:
            if column.name not in present:
                kind = column.type.compile(dialect=dialect())
                value = added_column_value(column.name)
                default = f" DEFAULT {value}" if value is not None else ""
                con.execute(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}{default}')
    moved = move_to_segments(con, segments, existing)
    for table in segment_tables():
        write_schema_segment(segments, table)
    list_segment_files(con, segments)
    create_segment_views(con, segments)
    for name, sql in VIEWS.items():
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
    meta = {
        "application_id": APPLICATION_ID, "schema_version": str(SCHEMA_VERSION), "code_version": code_version,
        "segments": str(segments),
    }
    for key, value in meta.items():
        con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, value])
    con.execute("INSERT OR IGNORE INTO meta VALUES ('created_at', ?)", [datetime.now(UTC).isoformat()])
    con.commit()
    return moved


def list_segment_files(con: duckdb.DuckDBPyConnection, segments: Path) -> None:
    """Record the files of each segment that has no list yet (migrated, or written before lists were recorded):
    those in its folders now, which opening.check_segments has just checked against the recorded size and digest."""
    for owner in (runs, superseded_runs):
        unlisted = con.execute(f"SELECT DISTINCT run_hash, segment FROM {owner.name} "
                               "WHERE segment IS NOT NULL AND segment_files IS NULL").fetchall()
        for run_hash, segment in unlisted:
            con.execute(f"UPDATE {owner.name} SET segment_files = ? WHERE run_hash = ? AND segment = ?",
                        [json.dumps(segment_file_names(segments, run_hash, segment)), run_hash, segment])


def compact(con: duckdb.DuckDBPyConnection, working: Path) -> duckdb.DuckDBPyConnection:
    """Rewrite the working copy without the blocks the migrated per-step tables held (DuckDB reuses freed blocks
    but never gives them back): the catalog becomes the few KB per run it is meant to be. Closes `con`; returns the
    connection to the compacted copy."""
    con.execute("CHECKPOINT")
    con.close()
    compact = working.with_name(working.name + ".compact")
    compact.unlink(missing_ok=True)
    with duckdb.connect(str(compact), config=NO_EXTENSIONS) as con:
        name = con.execute("SELECT current_database()").fetchall()[0][0]
        con.execute(f"ATTACH '{sql_string(str(working))}' AS migrated (READ_ONLY)")
        con.execute(f'COPY FROM DATABASE migrated TO "{name}"')
        con.execute("DETACH migrated")
        con.execute("CHECKPOINT")
    os.replace(compact, working)
    working.with_name(working.name + ".wal").unlink(missing_ok=True)
    return duckdb.connect(str(working), config=NO_EXTENSIONS)


def move_to_segments(con: duckdb.DuckDBPyConnection, segments: Path, existing: set[str]) -> bool:
    """Schema 2 and 3 kept per-step rows in tables of the catalog: each run's rows become its segment 'migrated',
    each superseded result's 'migrated-<superseded_at>', every row kept; then the tables are dropped."""
    moved = False
    for table, superseded in zip(segment_tables(), superseded_segment_tables(), strict=True):
        for source, owner, segment in ((table, runs, "'migrated'"),
                                       (superseded, superseded_runs,
                                        "'migrated-' || coalesce(epoch_us(superseded_at), 0)")):
            if source.name not in existing:
                continue
            present = {row[0] for row in con.execute("SELECT column_name FROM information_schema.columns "
                                                     "WHERE table_name = ?", [source.name]).fetchall()}
            columns = ", ".join(
                f'CAST({q(c.name) if c.name in present else "NULL"} AS {c.type.compile(dialect=dialect())}) '
                f"AS {q(c.name)}" for c in table.columns if c.name != "run_hash")
            (segments / table.name).mkdir(parents=True, exist_ok=True)
            folder = sql_string(str(segments / table.name))
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
        found = scan_segments(segments, keep=None)
        rows = pa.table({"run_hash": [key[0] for key in found], "segment": [key[1] for key in found],
                         "size": pa.array([size for size, _ in found.values()], pa.int64()),
                         "digest": [digest for _, digest in found.values()]})
        con.register("segment_sizes", rows)
        for owner in (runs, superseded_runs):
            con.execute(f"UPDATE {owner.name} o SET segment_bytes = z.size, segment_digest = z.digest "
                        "FROM segment_sizes z WHERE z.run_hash = o.run_hash AND z.segment = o.segment")
        con.unregister("segment_sizes")
    return moved
