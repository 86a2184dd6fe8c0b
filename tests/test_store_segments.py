"""The store of schema 4: per-run Parquet segments beside a small catalog. Recording a run writes bytes proportional
to the run, not to the store; the disk holds little more than the data; a writer killed -9 at any point of recording
leaves no partial run and no visible orphan (the next writer removes the leftovers); a schema 3 store migrates with
every row; the store reads from any cwd, and where it lies after a move."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures_store import _synthetic_tokens, create_store, insert_run

from store import queries
from store.schema import SCHEMA_VERSION, segments_folder
from store.writer import StoreError, StoreWriter, read_runs
from streaming_llm import RunConfig, RunResult

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = {"ppl": 10.0, "tpot_ms_mean": 2.0, "environment": {"code_version": "v1", "device": "cpu"}}


def run(index: int, steps: int, seed: int = 0) -> tuple[RunConfig, pa.Table, pa.Table]:
    config = RunConfig(model="tiny-llama", max_tokens=steps + 1, method="streaming", sink=4, window=200,
                       compress_every=8, repeat=index)
    tokens, compactions = _synthetic_tokens(np.random.default_rng(seed + index), steps, cap=256, sink=4,
                                            compress_every=8)
    return config, tokens, compactions


def record(writer: StoreWriter, index: int, steps: int) -> RunConfig:
    config, tokens, compactions = run(index, steps)
    writer.record_done(
        RunResult(config, SUMMARY, {"tokens": tokens, "compactions": compactions}),
        worker="t:1", attempts=1)
    return config


def files(folder: Path) -> dict[Path, tuple[int, int, int]]:
    return {path: (path.stat().st_ino, path.stat().st_mtime_ns, path.stat().st_size)
            for path in folder.rglob("*") if path.is_file()}


def disk(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def test_recording_a_run_writes_bytes_of_that_run_not_of_the_store(tmp_path):
    written = {}
    for label, steps in (("small", 2_000), ("large", 200_000)):
        folder = tmp_path / label
        with StoreWriter(folder / "store.duckdb", "v1") as writer:
            for index in range(3):
                record(writer, index, steps)
            before = files(folder)
            record(writer, 99, 20_000)  # the same run in both stores
            after = files(folder)
        written[label] = sum(after[path][2] for path in after if before.get(path) != after[path])
        assert disk(folder) > (3 * steps + 20_000) * 2 if label == "large" else True
    # The large store holds 100x the token rows; recording one more run costs the same bytes (the run's segments and
    # the catalog, KB per run), where a whole-store snapshot would cost the large store's size.
    assert written["large"] <= 1.1 * written["small"] + 64 * 1024, written


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names a synced descriptor through /proc (Linux)")
def test_each_rename_is_followed_by_a_sync_of_the_folder_that_holds_it(tmp_path, monkeypatch):
    import stat

    import store.writer as writer_module

    events: list[tuple[str, Path]] = []
    synced_files: set[Path] = set()
    sources: dict[Path, Path] = {}
    rename, fsync = os.replace, os.fsync

    def synced(handle: int) -> None:
        fsync(handle)
        path = Path(os.readlink(f"/proc/self/fd/{handle}"))
        if stat.S_ISDIR(os.fstat(handle).st_mode):
            events.append(("sync", path))
        else:
            synced_files.add(path)

    def renamed_to(source, target) -> None:
        rename(source, target)
        target = Path(target).resolve()  # as the synced folders are named (readlink of their descriptors)
        sources[target] = Path(source).resolve()
        events.append(("rename", target))

    monkeypatch.setattr(writer_module.os, "replace", renamed_to)
    monkeypatch.setattr(writer_module.os, "fsync", synced)
    with StoreWriter(tmp_path / "store.duckdb", "v1") as writer:  # its first open writes the 0-row schema segments
        record(writer, 0, 100)
    renamed = [path for kind, path in events if kind == "rename"]
    assert {path.name for path in renamed} >= {"data.parquet", "schema.parquet", "store.duckdb"}
    for path in renamed:
        later = events[events.index(("rename", path)) + 1 :]
        assert ("sync", path.parent) in later, f"{path.name} renamed but its folder never synced"
        if path.suffix == ".parquet":
            assert sources[path] in synced_files, f"{path} renamed into place before its data was synced"
    new_folders = {path.parent.parent for path in renamed if path.suffix == ".parquet"}  # run_hash=...
    assert all(("sync", folder) in events and ("sync", folder.parent) in events for folder in new_folders)
    # The tables' folders are entries of the segment folder, made when the writer first opens the store.
    assert ("sync", (tmp_path / "store.duckdb.segments").resolve()) in events


def test_the_disk_holds_at_most_1_3x_the_rows_as_one_zstd_parquet_file(tmp_path):
    """The data: the same token and compaction rows (with their run_hash) as one zstd Parquet file per table. The
    segments hold at most 1.3x that; the catalog a constant (DuckDB's blocks) plus a few KB per run."""
    store = tmp_path / "store.duckdb"
    with StoreWriter(store, "v1") as writer:
        configs = [record(writer, index, 20_000) for index in range(8)]
    data = 0
    for name in ("tokens", "compactions"):
        rows = []
        for index, config in enumerate(configs):
            table = dict(zip(("tokens", "compactions"), run(index, 20_000)[1:], strict=True))[name]
            rows.append(table.add_column(0, "run_hash", pa.array([config.run_hash] * table.num_rows)))
        pq.write_table(pa.concat_tables(rows), tmp_path / f"{name}.parquet", compression="zstd")
        data += (tmp_path / f"{name}.parquet").stat().st_size
    segments = disk(tmp_path / "store.duckdb.segments")
    assert segments <= 1.3 * data, (segments, data)
    assert store.stat().st_size <= 2_500_000 + 8 * 8192, store.stat().st_size


# --- kill -9 at every point of recording ------------------------------------------------------------------------------
KILL_AT = {
    # the segment's temporary file written, not renamed
    "segment write": "writer_module.os.fsync = die",
    # segment renamed into place, its runs row not committed
    "catalog commit": "writer_module._insert_arrow = lambda *a, **k: die()",
    # committed to the working copy, the publish copy not begun
    "publish copy": "writer_module._copy_file = lambda *a, **k: die()",
    # the publish copy whole, not renamed over the published catalog
    "publish rename": "copy = writer_module._copy_file\n"
                      "writer_module._copy_file = lambda *a, **k: (copy(*a, **k), die())",
}
SCRIPT = """
import os, signal, sys
from pathlib import Path
sys.path[:0] = [{root!r}, {tests!r}]
import store.writer as writer_module
from test_store_segments import record
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
writer = writer_module.StoreWriter(Path({store!r}), "v1")
writer.open()
{kill}
record(writer, 1, 5000)
"""


@pytest.mark.parametrize("point", list(KILL_AT))
def test_a_writer_killed_while_recording_leaves_no_partial_run_and_the_next_cleans_up(tmp_path, point):
    store = tmp_path / "store.duckdb"
    with StoreWriter(store, "v1") as writer:
        first = record(writer, 0, 5000)
    script = SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), store=str(store), kill=KILL_AT[point])
    process = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True)
    assert process.returncode == -signal.SIGKILL, process.stderr
    second = run(1, 5000)[0]
    # Readers see the last published store: the first run whole, nothing of the second.
    with queries.connect(store) as con:
        assert con.execute("SELECT run_hash, count(*) FROM tokens GROUP BY ALL").fetchall() == [(first.run_hash, 5000)]
        assert con.execute("SELECT count(*) FROM compactions WHERE run_hash = ?", [second.run_hash]).fetchall() == [
            (0,)]
    assert set(read_runs(store)) == {first.run_hash}
    with StoreWriter(store, "v1") as writer:  # the next writer removes every leftover, then records the run whole
        leftovers = [path.name for path in tmp_path.rglob("*")
                     if second.run_hash in str(path) or path.name.endswith(".tmp") or ".publish-" in path.name]
        assert leftovers == []
        record(writer, 1, 5000)
    with queries.connect(store) as con:
        assert sorted(con.execute("SELECT run_hash, count(*) FROM tokens GROUP BY ALL").fetchall()) == sorted(
            [(first.run_hash, 5000), (second.run_hash, 5000)])


def test_a_rerun_replaces_the_current_rows_and_keeps_the_earlier_as_superseded(tmp_path):
    store = tmp_path / "store.duckdb"
    with StoreWriter(store, "v1") as writer:
        config = record(writer, 0, 3000)
        _, tokens, compactions = run(0, 3000, seed=7)
        writer.record_done(
            RunResult(config, SUMMARY, {"tokens": tokens, "compactions": compactions}),
            worker="t:2", attempts=2)
    with queries.connect(store) as con:
        assert con.execute("SELECT count(*), sum(nll) FROM tokens").fetchall() == [
            (3000, pytest.approx(float(np.sum(tokens.column("nll").to_numpy()))))]
        assert con.execute("SELECT count(*), count(DISTINCT superseded_at) FROM superseded_tokens").fetchall() == [
            (3000, 1)]
        assert con.execute("SELECT worker FROM runs").fetchall() == [("t:2",)]


# --- migration --------------------------------------------------------------------------------------------------------
def test_a_schema_3_store_migrates_into_segments_with_every_row(tmp_path):
    store = tmp_path / "old.duckdb"
    create_store(store)  # the layout of schema 3: per-step rows in tables of the file
    rows = {}
    with duckdb.connect(str(store)) as con:
        for index in range(3):
            config, tokens, compactions = run(index, 20_000)
            row = {"run_hash": config.run_hash, "group_hash": config.group_hash, "setting_hash": config.setting_hash,
                   "status": "done", "attempts": 1, "config_json": "{}", **config.normalised(), "ppl": 1.0 + index,
                   "code_version": "old"}
            insert_run(con, row, tokens, compactions)
        # an earlier result of run 0, superseded
        con.execute("INSERT INTO superseded_runs (run_hash, group_hash, setting_hash, status, attempts, config_json, "
                    "model, code_version, superseded_at) SELECT run_hash, group_hash, setting_hash, status, attempts, "
                    "config_json, model, code_version, TIMESTAMPTZ '2026-01-01 00:00:00+00' FROM runs "
                    "WHERE ppl = 1.0")
        con.execute("INSERT INTO superseded_tokens SELECT *, TIMESTAMPTZ '2026-01-01 00:00:00+00' FROM tokens "
                    "WHERE run_hash = (SELECT run_hash FROM runs WHERE ppl = 1.0)")
        for table in ("tokens", "compactions", "superseded_tokens", "runs"):
            rows[table] = con.execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall()
    with pytest.raises(queries.StoreError, match="migrate"), queries.connect(store):
        pass
    before = store.stat().st_size
    with StoreWriter(store, "v1"):
        pass
    with queries.connect(store) as con:
        kinds = dict(con.execute("SELECT table_name, table_type FROM information_schema.tables").fetchall())
        assert kinds["tokens"] == kinds["superseded_tokens"] == "VIEW" and kinds["runs"] == "BASE TABLE"
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall() == [
            (str(SCHEMA_VERSION),)]
        for table in ("tokens", "compactions", "superseded_tokens"):
            assert con.execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall() == rows[table], table
        names = [c for c in con.execute("SELECT * FROM runs LIMIT 0").description]
        migrated = con.execute("SELECT * EXCLUDE (segment, segment_bytes, segment_digest) FROM runs "
                               "ORDER BY ALL").fetchall()
        assert len(names) == len(rows["runs"][0]) and len(migrated) == 3
    # The catalog keeps no per-step rows, nor the blocks they held: a constant plus a few KB per run.
    assert store.stat().st_size <= min(2_500_000, before / 2), (store.stat().st_size, before)
    with StoreWriter(store, "v2") as writer:  # the migrated catalog keeps its keys: a rerun replaces, a new run adds
        record(writer, 0, 20_000)
        record(writer, 5, 100)
    with queries.connect(store) as con:
        assert con.execute("SELECT count(*), count(DISTINCT run_hash) FROM runs").fetchall() == [(4, 4)]
        assert con.execute("SELECT count(*) FROM superseded_runs").fetchall() == [(2,)]
        assert con.execute("SELECT count(*) FROM tokens").fetchall() == [(3 * 20_000 + 100,)]


# --- one thing to open ------------------------------------------------------------------------------------------------
def test_the_store_reads_from_any_cwd_and_where_it_lies_after_a_move(tmp_path):
    store = tmp_path / "a" / "store.duckdb"
    with StoreWriter(store, "v1") as writer:
        first = record(writer, 0, 1000)
    count = ("import duckdb, sys; con = duckdb.connect(sys.argv[1], read_only=True); "
             "print(con.execute('SELECT count(*) FROM tokens').fetchone()[0])")
    for cwd in ("/", str(tmp_path)):  # plain duckdb, no settings
        shown = subprocess.run([sys.executable, "-c", count, str(store)], cwd=cwd, capture_output=True, text=True)
        assert shown.stdout.strip() == "1000", shown.stderr
    moved = tmp_path / "b" / "moved.duckdb"
    moved.parent.mkdir()
    shutil.copy(store, moved)
    shutil.copytree(tmp_path / "a" / "store.duckdb.segments", tmp_path / "b" / "moved.duckdb.segments")
    shutil.rmtree(tmp_path / "a")
    with queries.connect(moved) as con:  # the query layer reads the segments beside the file
        assert con.execute("SELECT count(*) FROM tokens").fetchall() == [(1000,)]
    assert queries.run_user_sql(moved, "SELECT count(*) AS n FROM tokens")[0].n.tolist() == [1000]
    with StoreWriter(moved, "v1"):  # a writer re-points the catalog's own views
        pass
    shown = subprocess.run([sys.executable, "-c", count, str(moved)], cwd="/", capture_output=True, text=True)
    assert shown.stdout.strip() == "1000", shown.stderr
    assert set(read_runs(moved)) == {first.run_hash}
    alone = tmp_path / "alone.duckdb"  # the catalog without its folder: a clear error, not a wrong read
    shutil.copy(moved, alone)
    shutil.rmtree(tmp_path / "b")
    with pytest.raises(queries.StoreError, match="move the store file and its .segments folder together"), \
            queries.connect(alone):
        pass


def test_a_segment_folder_without_its_store_file_is_refused_and_left_untouched(tmp_path):
    store = tmp_path / "store.duckdb"
    with StoreWriter(store, "v1") as writer:
        record(writer, 0, 100)
    store.unlink()
    before = sorted(path for path in tmp_path.rglob("*") if path.is_file())
    with pytest.raises(StoreError, match="no store file but its segment folder"):
        StoreWriter(store, "v1").open()
    assert sorted(path for path in tmp_path.rglob("*") if path.is_file()) == before


def test_the_store_scale_benchmark_runs_at_a_tiny_size(tmp_path):
    """bench/store_scale.py end to end at 40,000 token rows: every line of its table printed (timings not checked)."""
    shown = subprocess.run([sys.executable, str(ROOT / "bench" / "store_scale.py"), "--sizes", "40000", "--records",
                            "1", "--dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert shown.returncode == 0, shown.stderr[-3000:]
    lines = dict(re.split(r"\s{2,}", line.strip()) for line in shown.stdout.splitlines() if line.strip())
    assert lines["runs"] == "2" and lines["token rows"] == "60,000"
    assert float(lines["vs the data as one zstd Parquet"].rstrip("x")) > 0
    for view in ("Runs", "Trade-off", "Sweeps", "Run detail (3 runs)", "Compaction spikes (4 runs)", "Settings",
                 "Long stream (4 runs)", "Speculation", "SQL"):
        assert float(lines[f"view {view} (s)"]) >= 0
    assert list(tmp_path.iterdir()) == []  # the benchmark's stores are removed


@pytest.mark.parametrize("folder", ["step=7", "a*", "exp[1]", "x{y}"])
def test_a_path_duckdb_would_misread_is_refused_before_anything(tmp_path, folder):
    """A parent folder `name=value` is read by DuckDB as a column of every segment row (hive partitioning); a glob
    character matches other folders' files. Such a store path is refused, writing nothing, and so is reading one."""
    from gridrun.__main__ import main

    store = tmp_path / folder / "store.duckdb"
    grid = tmp_path / "g.yaml"
    grid.write_text("name: g\nbase: {model: tiny-llama, max_tokens: 40, warmup: 2}\n"
                    "experiments: {a: {runs: [{method: dense}]}}\n")
    assert main([str(grid), "--store", str(store)]) == 2
    assert not (tmp_path / folder).exists()
    (tmp_path / folder).mkdir()
    store.write_bytes(b"")
    with pytest.raises(queries.StoreError, match="put the store in a path without"), queries.connect(store):
        pass


def test_a_leftover_segment_that_vanishes_under_a_reader_is_read_again_not_damage(tmp_path):
    """A killed writer leaves a segment no run names; the next writer removes it. A reader whose listing of the folder
    still held it fails to open it (DuckDB: Cannot open file "...": No such file or directory): that is
    SegmentsChanged, not damage, and queries.read runs the query again. A segment a run names that is missing stays
    damage. (The race itself cannot be timed in a test: the first attempt raises DuckDB's error as the race does.)"""
    store = tmp_path / "store.duckdb"
    with StoreWriter(store, "cv") as writer:
        config = record(writer, 0, 300)
    folder = segments_folder(store.resolve()) / "tokens" / f"run_hash={config.run_hash}"
    with queries.connect(store) as con:
        named = con.execute("SELECT segment FROM runs").fetchone()[0]

    def vanished(segment: str) -> duckdb.IOException:
        return duckdb.IOException(f'IO Error: Cannot open file "{folder}/segment={segment}/data.parquet": No such file '
                                  "or directory")

    attempts = []

    def query(con):
        attempts.append(1)
        if len(attempts) == 1:
            raise vanished("killed")
        return con.execute("SELECT count(*) FROM tokens").fetchone()[0]

    assert queries.read(store, query) == 300 and len(attempts) == 2
    with pytest.raises(queries.SegmentsChanged, match="run it again"), queries.connect(store):
        raise vanished("killed")
    with pytest.raises(queries.StoreError, match="is damaged") as caught, queries.connect(store):
        raise vanished(named)
    assert not isinstance(caught.value, queries.SegmentsChanged)
