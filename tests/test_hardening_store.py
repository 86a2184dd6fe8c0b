"""The store's files under hostile conditions: other spellings of one path, damaged stores left byte-for-byte
untouched by every entry point, unwritable or full disks, leftovers of a killed writer, foreign files that would make
DuckDB fetch an extension, a newer schema; and the SQL box's time and memory limits."""

from __future__ import annotations

import errno
import hashlib
import os
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

import store.sandbox as store_sandbox
import store.writer as writer_module
from gridrun.__main__ import main as gridrun_main
from paper.__main__ import main as paper_main
from store import queries
from store.opening import Sandbox
from store.writer import StoreError, StoreWriter, read_runs
from streaming_llm import RunConfig, RunResult, evaluate

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
BASE = {"model": "tiny-llama", "max_tokens": 200, "cap": 48, "sink": 4, "warmup": 2, "method": "streaming"}
GRID = ("name: g\nbase: {model: tiny-llama, max_tokens: 200, cap: 48, sink: 4, warmup: 2}\n"
        "experiments: {main: {runs: [{}]}}\n")
BLOCK, HEADER = 262_144, 3 * 4096  # DuckDB's block size and file header


@pytest.fixture(scope="module")
def result():
    return evaluate(RunConfig.from_dict({**BASE, "compress_every": 8}))


def digest(path: Path) -> str:
    """The store's bytes: its catalog file and, since schema 4, every file of its segment folder."""
    digest = hashlib.sha256(path.read_bytes())
    segments = path.with_name(path.name + ".segments")
    for file in sorted(segments.rglob("*")) if segments.is_dir() else []:
        digest.update(str(file.relative_to(segments)).encode())
        digest.update(file.read_bytes() if file.is_file() else b"/")
    return digest.hexdigest()


def make_store(path: Path, result, copies: int = 1000) -> None:
    """A store of one run whose tokens span many blocks (the run's rows repeated), registered as grid 'g'."""
    tokens = pa.concat_tables([result.tokens] * copies)
    with StoreWriter(path, "v1") as writer:
        writer.register_grid("g", Path("g.yaml"), GRID, [("main", result.config.run_hash)])
        writer.record_done(
            RunResult(result.config, result.summary, {"tokens": tokens, "compactions": result.compactions}),
            worker="t:1", attempts=1)


def damage(path: Path, table: str) -> None:
    """Flip one byte inside a block that holds `table`'s data: the header and catalog stay intact. `tokens` (a
    segment since schema 4): one byte in the middle of the run's token segment file."""
    if table == "tokens":
        segment = next(path.with_name(path.name + ".segments").glob("tokens/run_hash=[0-9a-f]*/*/*.parquet"))
        offset = segment.stat().st_size // 2
        with segment.open("r+b") as handle:
            handle.seek(offset)
            byte = handle.read(1)
            handle.seek(offset)
            handle.write(bytes([byte[0] ^ 0xFF]))
        return
    with duckdb.connect(str(path), read_only=True) as con:
        blocks = [row[0] for row in con.execute(
            f"SELECT DISTINCT block_id FROM pragma_storage_info('{table}') WHERE block_id >= 0 ORDER BY 1").fetchall()]
    offset = HEADER + blocks[len(blocks) // 2] * BLOCK + 5000
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def others(folder: Path, keep: str = "store.duckdb") -> list[str]:
    return sorted(p.name for p in folder.iterdir()
                  if p.name not in (keep, f"{keep}.segments") and not p.name.endswith((".lock", ".yaml")))


# --- one store, however it is spelled ---------------------------------------------------------------------------------
def test_a_symlink_or_another_spelling_is_the_same_store_and_the_link_stays_a_link(tmp_path, result):
    real = tmp_path / "data" / "store.duckdb"
    real.parent.mkdir()
    link = tmp_path / "link.duckdb"
    link.symlink_to(real)
    (tmp_path / "sub").mkdir()
    with StoreWriter(real, "v1"):
        for spelling in (link, tmp_path / "sub" / ".." / "data" / "store.duckdb"):
            with pytest.raises(StoreError, match="being written by another gridrun"):
                StoreWriter(spelling, "v1").open()
    with StoreWriter(link, "v1") as writer:
        writer.record_done(result, worker="t", attempts=1)
    assert link.is_symlink() and link.resolve() == real
    assert set(read_runs(real)) == {result.config.run_hash}
    assert others(tmp_path, keep="link.duckdb") == ["data", "sub"]


# --- damaged stores ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["flip in tokens", "flip in runs", "truncated by a block"])
def test_a_damaged_store_with_an_intact_header_is_refused_by_gridrun_and_left_untouched(how, tmp_path, result, capsys):
    store = tmp_path / "store.duckdb"
    make_store(store, result)
    if how.startswith("flip"):
        damage(store, how.split()[-1])
    else:
        os.truncate(store, store.stat().st_size - BLOCK)
    before = digest(store)
    grid = tmp_path / "g.yaml"
    grid.write_text(GRID.replace("runs: [{}]", "runs: [{compress_every: 4}]"))
    assert gridrun_main([str(grid), "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "truncated" in err and "left untouched" in err, err
    assert digest(store) == before and others(tmp_path) == []


def test_gridrun_status_dashboard_and_paper_say_a_store_is_damaged(tmp_path, result, capsys, monkeypatch):
    store = tmp_path / "store.duckdb"
    make_store(store, result)
    damage(store, "runs")
    before = digest(store)
    grid = tmp_path / "g.yaml"
    grid.write_text(GRID)
    assert gridrun_main(["status", str(grid), "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "truncated" in err, err
    assert paper_main(["export", "--store", str(store), "--grid", "g", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "damaged" in err and "Traceback" not in err, err
    monkeypatch.setenv("GRIDRUN_STORE", str(store))
    app = AppTest.from_file(APP, default_timeout=60).run()
    assert not app.exception, [e.value for e in app.exception]
    assert any("damaged" in error.value for error in app.error), [e.value for e in app.error]
    assert digest(store) == before


def test_a_store_of_a_newer_schema_gets_a_clear_message_in_the_dashboard(tmp_path, result, monkeypatch):
    store = tmp_path / "store.duckdb"
    make_store(store, result, copies=1)
    with duckdb.connect(str(store)) as con:
        con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(queries.StoreError, match="written by a newer gridrun"), queries.connect(store):
        pass
    monkeypatch.setenv("GRIDRUN_STORE", str(store))
    app = AppTest.from_file(APP, default_timeout=60).run()
    assert not app.exception and any("newer gridrun" in error.value for error in app.error)


def test_a_sqlite_file_is_refused_without_fetching_an_extension(tmp_path):
    import sqlite3

    path = tmp_path / "store.duckdb"
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE runs (x)")
    refused = "cannot be read as a DuckDB database"
    with pytest.raises(queries.StoreError, match=refused) as refused, queries.connect(path):
        pass
    assert "download" not in str(refused.value).lower()


def test_reader_connections_never_autoload_or_install_extensions(tmp_path, result):
    store = tmp_path / "store.duckdb"
    make_store(store, result, copies=1)
    for sandbox in (None, Sandbox("1GB", 2)):
        with queries.connect(store, sandbox=sandbox) as con:
            settings = con.execute("SELECT current_setting('autoload_known_extensions'), "
                                   "current_setting('autoinstall_known_extensions')").fetchall()
        assert settings == [(False, False)]


# --- folders and disks ------------------------------------------------------------------------------------------------
def test_a_parent_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    grid = tmp_path / "g.yaml"
    grid.write_text(GRID)
    assert gridrun_main([str(grid), "--store", str(tmp_path / "file" / "store.duckdb")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file, not a folder" in err, err
    with pytest.raises(StoreError, match="is a file, not a folder"):
        StoreWriter(tmp_path / "file" / "store.duckdb", "v1").open()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_a_clear_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(StoreError, match="not writable"):
            StoreWriter(folder / "store.duckdb", "v1").open()
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def full_disk_after(written: int):
    """A _copy_file that writes `written` bytes of the copy, then fails as a full disk does."""
    def copy(source: Path, target: Path) -> None:
        with source.open("rb") as src, target.open("wb") as dst:
            dst.write(src.read(written))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return copy


def test_a_full_disk_while_opening_leaves_nothing_partial(tmp_path, result, monkeypatch):
    store = tmp_path / "store.duckdb"
    make_store(store, result, copies=1)
    before = digest(store)
    monkeypatch.setattr(writer_module, "_copy_file", full_disk_after(100_000))
    with pytest.raises(StoreError, match="full disk"):
        StoreWriter(store, "v1").open()
    assert digest(store) == before and others(tmp_path) == []


def test_a_full_disk_while_publishing_keeps_the_last_snapshot_and_leaves_nothing_partial(tmp_path, result,
                                                                                           monkeypatch):
    store = tmp_path / "store.duckdb"
    with StoreWriter(store, "v1") as writer:
        before = store.read_bytes()
        monkeypatch.setattr(writer_module, "_copy_file", full_disk_after(100_000))
        with pytest.raises(StoreError, match="full disk"):
            writer.record_done(result, worker="t",
                               attempts=1)
        # The published catalog is the last one; the run's segment, never referenced by it, is never read.
        assert store.read_bytes() == before and not list(tmp_path.glob(".store.duckdb.publish-*"))
    assert read_runs(store) == {} and others(tmp_path) == []
    with queries.connect(store) as con:
        assert con.execute("SELECT count(*) FROM tokens").fetchall() == [(0,)]
    monkeypatch.undo()
    with StoreWriter(store, "v1"):  # the next writer removes it
        pass
    assert not list((tmp_path / "store.duckdb.segments").glob(f"*/run_hash={result.config.run_hash}"))


def test_snapshots_left_by_a_writer_killed_mid_publish_are_removed_by_the_next(tmp_path, result):
    store = tmp_path / "store.duckdb"
    make_store(store, result, copies=1)
    for pid in (4242, 999999):
        (tmp_path / f".store.duckdb.publish-{pid}").write_bytes(store.read_bytes())
    (tmp_path / ".store.duckdb.writing").write_bytes(b"partial")
    with StoreWriter(store, "v1"):
        pass
    assert others(tmp_path) == []
    assert set(read_runs(store)) == {result.config.run_hash}


# --- the SQL box ------------------------------------------------------------------------------------------------------
def test_sql_box_runs_pivot(tmp_path, result):
    store = tmp_path / "store.duckdb"
    make_store(store, result, copies=1)
    frame, _ = queries.run_user_sql(store, "PIVOT tokens ON compacted USING count(*) GROUP BY run_hash")
    assert len(frame) == 1 and frame.drop(columns="run_hash").sum(axis=1).iloc[0] == result.tokens.num_rows
    frame, _ = queries.run_user_sql(store, "-- per run\nUNPIVOT (SELECT run_hash, ppl, ppl_decode FROM runs) "
                                           "ON ppl, ppl_decode INTO NAME metric VALUE value")
    assert sorted(frame.metric) == ["ppl", "ppl_decode"]


def test_sql_box_stops_a_statement_at_its_time_limit(tmp_path, result):
    store = tmp_path / "store.duckdb"
    make_store(store, result, copies=1)
    started = time.perf_counter()
    with pytest.raises(queries.QueryLimit, match="stopped after 1 s"):
        queries.run_user_sql(store, "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) "
                                    "SELECT count(*) FROM r", seconds=1)
    assert time.perf_counter() - started < 10
    frame, _ = queries.run_user_sql(store, "SELECT count(*) AS n FROM runs")  # the store is still readable
    assert frame.n.iloc[0] == 1


def test_sql_box_stops_a_statement_at_its_memory_limit(tmp_path, result, monkeypatch):
    store = tmp_path / "store.duckdb"
    make_store(store, result, copies=1)
    monkeypatch.setattr(store_sandbox, "SQL_BOX_MEMORY", "64MB")
    with pytest.raises(queries.QueryLimit, match="memory limit"):
        queries.run_user_sql(store, "SELECT list(range) FROM range(50000000)")
