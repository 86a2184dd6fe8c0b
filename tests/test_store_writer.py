"""The store writer without Ray: exactly-once rows, values equal to evaluate(), superseded and stale results, published
snapshots that readers can open while the writer holds the store, and foreign or corrupt files left untouched."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import numpy as np
import pytest

from store.writer import StoreError, StoreWriter, read_runs
from streaming_llm import RunConfig, evaluate

BASE = {"model": "tiny-llama", "max_tokens": 200, "cap": 48, "sink": 4, "warmup": 2, "method": "streaming"}


@pytest.fixture(scope="module")
def results():
    configs = [RunConfig.from_dict({**BASE, "compress_every": r}) for r in (1, 8)]
    return [evaluate(config) for config in configs]


def record(writer: StoreWriter, result, attempts: int = 1) -> None:
    writer.record_done(result, worker="test:1",
                       attempts=attempts)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_stored_rows_equal_evaluate(tmp_path, results):
    path = tmp_path / "store.duckdb"
    with StoreWriter(path, "v1") as writer:
        for result in results:
            record(writer, result)
    with duckdb.connect(str(path), read_only=True) as con:
        for result in results:
            run_hash = result.config.run_hash
            stored = con.sql(
                "SELECT * EXCLUDE (run_hash) FROM tokens WHERE run_hash = ? ORDER BY step", params=[run_hash]
            ).to_arrow_table()
            assert stored.num_rows == result.tokens.num_rows == BASE["max_tokens"] - 1
            for name in result.tokens.column_names:
                expected = result.tokens.column(name).to_numpy(zero_copy_only=False)
                got = stored.column(name).to_numpy(zero_copy_only=False)
                np.testing.assert_array_equal(got, expected, err_msg=name)
            row = con.execute(
                "SELECT ppl, tpot_ms_mean, compaction_count, window_resolved, status, code_version, attempts, "
                "compress_every FROM runs WHERE run_hash = ?", [run_hash]).fetchall()[0]
            summary = result.summary
            assert row == (summary["ppl"], summary["tpot_ms_mean"], summary["compaction_count"], summary["window"],
                           "done", summary["environment"]["code_version"], 1, result.config.compress_every)
            compactions = con.execute("SELECT count(*) FROM compactions WHERE run_hash = ?", [run_hash]).fetchall()[0]
            assert compactions[0] == result.compactions.num_rows > 0


def test_recording_twice_keeps_one_copy_and_supersedes_the_old(tmp_path, results):
    path = tmp_path / "store.duckdb"
    result = results[0]
    with StoreWriter(path, "v1") as writer:
        record(writer, result)
        record(writer, result)
        writer.record_failed(results[1].config, "RuntimeError: boom", worker=None, attempts=1, started_at=None)
        writer.record_failed(results[1].config, "RuntimeError: boom again", worker=None, attempts=2,
                             started_at=None)
    with duckdb.connect(str(path), read_only=True) as con:
        count = con.execute("SELECT count(*) FROM tokens WHERE run_hash = ?", [result.config.run_hash]).fetchall()[0]
        assert count[0] == result.tokens.num_rows
        superseded = con.execute("SELECT count(*) FROM superseded_tokens").fetchall()[0]
        assert superseded[0] == result.tokens.num_rows
        failed = con.execute("SELECT status, error, attempts FROM runs WHERE run_hash = ?",
                             [results[1].config.run_hash]).fetchall()
        assert failed == [("failed", "RuntimeError: boom again", 2)]
        assert con.execute("SELECT count(*) FROM tokens WHERE run_hash = ?",
                           [results[1].config.run_hash]).fetchall()[0][0] == 0


def test_runs_of_other_code_are_stale_in_the_views(tmp_path, results):
    path = tmp_path / "store.duckdb"
    with StoreWriter(path, results[0].summary["environment"]["code_version"]) as writer:
        record(writer, results[0])
    with duckdb.connect(str(path), read_only=True) as con:
        assert con.execute("SELECT stale FROM run_summaries").fetchall() == [(False,)]
        assert con.execute("SELECT count(*) FROM current_runs").fetchall()[0] == (1,)
    with StoreWriter(path, "other-code"):
        pass
    with duckdb.connect(str(path), read_only=True) as con:
        assert con.execute("SELECT stale FROM run_summaries").fetchall() == [(True,)]
        assert con.execute("SELECT count(*) FROM current_runs").fetchall()[0] == (0,)
        assert con.execute("SELECT count(*) FROM tokens").fetchall()[0][0] == results[0].tokens.num_rows  # kept
    assert read_runs(path)[results[0].config.run_hash].status == "done"


def test_readers_open_the_store_while_the_writer_holds_it(tmp_path, results):
    path = tmp_path / "store.duckdb"
    reader = textwrap.dedent(f"""
        import duckdb
        con = duckdb.connect({str(path)!r}, read_only=True)
        print(con.execute("SELECT count(*) FROM runs").fetchall()[0][0])
    """)
    with StoreWriter(path, "v1") as writer:
        record(writer, results[0])
        first = subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True, timeout=60)
        record(writer, results[1])
        second = subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True, timeout=60)
    assert (first.returncode, first.stdout.strip(), first.stderr) == (0, "1", "")
    assert (second.returncode, second.stdout.strip(), second.stderr) == (0, "2", "")


def test_a_second_writer_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "store.duckdb"
    with StoreWriter(path, "v1"), pytest.raises(StoreError, match="being written by another gridrun"):
        StoreWriter(path, "v1").open()


def test_a_crash_before_publishing_leaves_the_published_store_as_it_was(tmp_path, results):
    path = tmp_path / "store.duckdb"
    with StoreWriter(path, "v1") as writer:
        record(writer, results[0])
    working = tmp_path / ".store.duckdb.writing"
    with duckdb.connect(str(working)) as con:  # what a crash after commit, before publish, leaves behind
        con.execute("CREATE TABLE junk (x INTEGER)")
    with StoreWriter(path, "v1") as writer:
        assert set(writer.stored_runs()) == {results[0].config.run_hash}
    with duckdb.connect(str(path), read_only=True) as con:
        tables = {row[0] for row in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert "junk" not in tables


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b""), "not a DuckDB database"),
        (lambda p: p.write_bytes(b"SQLite format 3\x00" + bytes(4096)), "not a DuckDB database"),
        (lambda p: p.write_text("name,value\na,1\n"), "not a DuckDB database"),
        (lambda p: _duckdb_file(p, "CREATE TABLE t AS SELECT 42 AS x"), "not a gridrun store"),
        (lambda p: _duckdb_file(p, "CREATE TABLE meta (key VARCHAR, value VARCHAR); "
                                   "INSERT INTO meta VALUES ('application_id', 'gridrun-store'), "
                                   "('schema_version', '999')"), "schema version 999"),
    ],
)
def test_foreign_or_corrupt_store_is_refused_and_left_untouched(tmp_path, make, message):
    path = tmp_path / "store.duckdb"
    make(path)
    before = digest(path)
    with pytest.raises(StoreError, match=message):
        StoreWriter(path, "v1").open()
    with pytest.raises(StoreError, match=message):
        read_runs(path)
    assert digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["store.duckdb"]


def test_a_truncated_store_is_refused(tmp_path, results):
    path = tmp_path / "store.duckdb"
    with StoreWriter(path, "v1") as writer:
        record(writer, results[0])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    before = digest(path)
    with pytest.raises(StoreError, match="cannot be read: corrupt or truncated"):
        StoreWriter(path, "v1").open()
    assert digest(path) == before


def _duckdb_file(path: Path, sql: str) -> None:
    with duckdb.connect(str(path)) as con:
        con.execute(sql)


def test_the_schema_mirrors_every_column_and_summary_key_of_the_engine(results):
    from store.schema import SUMMARY_COLUMNS, compactions, forwards, runs, tokens
    from streaming_llm.evaluate import COMPACTION_SCHEMA, TOKEN_SCHEMA
    from streaming_llm.generate import FORWARD_SCHEMA, GENERATION_TOKEN_SCHEMA

    assert [c.name for c in tokens.columns][1:] == GENERATION_TOKEN_SCHEMA.names
    assert GENERATION_TOKEN_SCHEMA.names[: len(TOKEN_SCHEMA)] == TOKEN_SCHEMA.names
    assert [c.name for c in forwards.columns][1:] == FORWARD_SCHEMA.names
    assert [c.name for c in compactions.columns][1:] == COMPACTION_SCHEMA.names
    stored_elsewhere = {"run_hash", "method", "model", "protocol", "environment", "window", "device", "started_at",
                        "ended_at"}
    summary_columns = {c.name for c in SUMMARY_COLUMNS}
    assert set(results[0].summary) - stored_elsewhere <= summary_columns
    assert {"environment_json", "window_resolved", "device_name", "started_at", "ended_at"} <= set(runs.columns.keys())


def test_generation_run_is_stored_with_its_forwards(tmp_path):
    config = RunConfig.from_dict({**BASE, "method": "dense", "cap": None, "mode": "generate", "prompt_tokens": 32,
                                  "new_tokens": 24, "spec": "prompt_lookup", "num_draft": 3})
    result = evaluate(config)
    path = tmp_path / "store.duckdb"
    with StoreWriter(path, "v1") as writer:
        writer.record_done(result, worker="test:1", attempts=1)
        writer.record_done(result, worker="test:1", attempts=1)  # a rerun supersedes, never mixes
    with duckdb.connect(str(path), read_only=True) as con:
        row = con.execute("SELECT mode, spec, num_draft, generated_tokens, generated_hash, acceptance_rate, "
                          "verify_forwards FROM runs WHERE run_hash = ?", [config.run_hash]).fetchone()
        assert row == ("generate", "prompt_lookup", 3, 24, result.summary["generated_hash"],
                       pytest.approx(result.summary["acceptance_rate"]), result.forwards.num_rows)
        forwards = con.execute("SELECT forward, accepted, generated FROM forwards WHERE run_hash = ? ORDER BY forward",
                               [config.run_hash]).fetchall()
        assert forwards == list(zip(*(result.forwards.column(n).to_pylist() for n in ("forward", "accepted",
                                                                                      "generated")), strict=True))
        generated = con.execute("SELECT count(*), count(DISTINCT forward) FROM tokens WHERE run_hash = ? "
                                "AND NOT prefill", [config.run_hash]).fetchone()
        assert generated == (24, result.forwards.num_rows)
        assert con.execute("SELECT count(*) FROM superseded_forwards").fetchone()[0] == result.forwards.num_rows
    from store.schema import SUMMARY_COLUMNS

    stored_elsewhere = {"run_hash", "method", "model", "protocol", "environment", "window", "device", "started_at",
                        "ended_at"}
    assert set(result.summary) - stored_elsewhere <= {c.name for c in SUMMARY_COLUMNS}
