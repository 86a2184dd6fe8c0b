"""Per-run tables are declared once, in the engine (streaming_llm.results.STEP_TABLES), and flow to the store whole:
a RunResult carries them, the writer stores each as a segment, and the catalog's views (and superseded_*) read them,
with no edit in store/."""

from __future__ import annotations

import pyarrow as pa
import pytest
from sqlalchemy import BigInteger, Boolean, Double, Integer
from test_store_segments import SUMMARY, run

from store import queries
from store.schema import segment_tables, superseded_segment_tables
from store.segments import segment_arrow_schema
from store.writer import StoreError, StoreWriter
from streaming_llm import RunResult, results

PROBES = pa.schema([  # what a new protocol might return: one row per probe
    pa.field("trial", pa.int32(), nullable=False),
    pa.field("depth", pa.float64(), nullable=False),
    pa.field("needle_id", pa.int64()),
    pa.field("correct", pa.bool_(), nullable=False),
])


def test_store_tables_are_the_engine_schemas() -> None:
    by_name = {table.name: table for table in segment_tables()}
    assert list(by_name) == list(results.STEP_TABLES)
    for name, schema in results.STEP_TABLES.items():
        columns = by_name[name].columns
        assert [c.name for c in columns] == ["run_hash", *schema.names]
        assert [c.nullable for c in columns][1:] == [field.nullable for field in schema]
        assert segment_arrow_schema(by_name[name]) == schema  # segment files hold the engine's columns as declared
    assert [t.name for t in superseded_segment_tables()] == [f"superseded_{name}" for name in results.STEP_TABLES]


def test_a_table_registered_in_the_engine_is_stored_and_queryable(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(results.STEP_TABLES, "probes", PROBES)
    probes = next(table for table in segment_tables() if table.name == "probes")
    assert [type(c.type) for c in probes.columns[1:]] == [Integer, Double, BigInteger, Boolean]
    config, tokens, compactions = run(0, 300)
    rows = pa.table({"trial": pa.array([0, 1, 2], pa.int32()), "depth": [0.0, 0.5, 1.0], "needle_id": [7, None, 9],
                     "correct": [True, False, True]}, schema=PROBES)
    store = tmp_path / "store.duckdb"
    with StoreWriter(store, "v1") as writer:
        writer.register_grid("g", tmp_path / "g.yaml", "name: g", [("main", config.run_hash)])
        writer.record_done(RunResult(config, SUMMARY, {"tokens": tokens, "compactions": compactions, "probes": rows}),
                           worker="t:1", attempts=1)
        # A rerun of the same hash: the first result moves to superseded_probes, as the built-in tables' do.
        writer.record_done(RunResult(config, SUMMARY, {"tokens": tokens, "compactions": compactions,
                                                       "probes": rows.slice(0, 2)}), worker="t:1", attempts=1)
    with queries.connect(store) as con:
        stored = con.execute("SELECT run_hash, trial, depth, needle_id, correct FROM probes ORDER BY trial").fetchall()
        assert stored == [(config.run_hash, 0, 0.0, 7, True), (config.run_hash, 1, 0.5, None, False)]
        assert con.execute("SELECT count(*) FROM superseded_probes").fetchone()[0] == 3
        assert con.execute("SELECT count(*) FROM tokens").fetchone()[0] == tokens.num_rows  # the others unchanged
        kinds = dict(con.execute("SELECT column_name, data_type FROM information_schema.columns "
                                 "WHERE table_name = 'probes'").fetchall())
        assert kinds == {"trial": "INTEGER", "depth": "DOUBLE", "needle_id": "BIGINT", "correct": "BOOLEAN",
                         "run_hash": "VARCHAR"}
    frame, _ = queries.run_user_sql(store, "SELECT avg(CAST(correct AS INTEGER)) AS accuracy FROM probes")
    assert frame.accuracy.iloc[0] == pytest.approx(0.5)


def test_a_table_the_engine_does_not_declare_is_refused(tmp_path) -> None:
    config, tokens, compactions = run(0, 50)
    with StoreWriter(tmp_path / "store.duckdb", "v1") as writer, pytest.raises(StoreError, match="STEP_TABLES"):
        writer.record_done(RunResult(config, SUMMARY, {"tokens": tokens, "compactions": compactions,
                                                       "probes": pa.table({"trial": [0]})}), worker="t", attempts=1)


def test_a_store_older_than_a_declared_table_reads_it_as_empty(tmp_path, monkeypatch) -> None:
    """A store whose last writer predates a table (say, trials) is read with that table empty, its columns declared,
    not as an error; its next writer creates the table for real."""
    config, tokens, compactions = run(0, 50)
    store = tmp_path / "store.duckdb"
    with StoreWriter(store, "v1") as writer:
        writer.register_grid("g", tmp_path / "g.yaml", "name: g", [("main", config.run_hash)])
        writer.record_done(RunResult(config, SUMMARY, {"tokens": tokens, "compactions": compactions}),
                           worker="t:1", attempts=1)
    monkeypatch.setitem(results.STEP_TABLES, "probes", PROBES)  # declared after the store was written
    with queries.connect(store) as con:
        assert con.execute("SELECT count(*) FROM probes").fetchone()[0] == 0
        assert con.execute("SELECT count(*) FROM superseded_probes").fetchone()[0] == 0
        assert [row[0] for row in con.execute("DESCRIBE probes").fetchall()] == ["run_hash", *PROBES.names]
        assert con.execute("SELECT count(*) FROM tokens").fetchone()[0] == tokens.num_rows


def test_a_store_older_than_a_declared_knob_column_reads_and_migrates_it_at_the_knobs_default(tmp_path) -> None:
    """A store written before a knob existed (layout, a task knob) is read as if migrated, the old rows at the knob's
    default (null where the default is None), in the catalog views too; its next writer adds the columns so."""
    import duckdb

    config, tokens, compactions = run(0, 50)
    store = tmp_path / "store.duckdb"
    with StoreWriter(store, "v1") as writer:
        writer.register_grid("g", tmp_path / "g.yaml", "name: g", [("main", config.run_hash)])
        writer.record_done(RunResult(config, SUMMARY, {"tokens": tokens, "compactions": compactions}),
                           worker="t:1", attempts=1)
    with duckdb.connect(str(store)) as con:  # as an older gridrun wrote it: no layout or task column yet
        for table in ("runs", "configurations", "superseded_runs"):
            con.execute(f"ALTER TABLE {table} DROP COLUMN layout")
            con.execute(f"ALTER TABLE {table} DROP COLUMN task")
    with queries.connect(store) as con:
        assert queries.run_table(con, "g", True)[["layout", "task"]].values.tolist() == [["compact", None]]
        assert con.execute("SELECT layout, task FROM run_summaries").fetchall() == [("compact", None)]
    with StoreWriter(store, "v1"):
        pass  # the migration
    with duckdb.connect(str(store), read_only=True) as con:
        assert con.execute("SELECT layout, task FROM main.runs").fetchall() == [("compact", None)]
