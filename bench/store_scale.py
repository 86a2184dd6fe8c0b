"""Benchmark (not a test): what the store costs as it grows, at 1M, 10M and 100M token rows (--sizes).

For each size it builds a synthetic store fast (runs of 20,000 token rows with the study's sawtooth shapes, every 7th
run a recompute baseline so that the Settings view pairs ΔPPL token by token as on a real grid; rows generated in SQL
and written as the store's own per-run segments by one partitioned COPY; the runs rows through store.rows.run_row so
every declared column is filled), then measures with the real writer and query layer: opening
the writer (once per gridrun invocation: it checks every segment's digest), recording + publishing one more
20,000-token run through StoreWriter.record_done (median of --records), disk bytes per token row against the data (the
same token and compaction rows as one zstd Parquet file, and as uncompressed Arrow), and each dashboard view's
query-layer calls on a fresh connection (as on a cache miss). Sizes are printed side by side. Writes only under a
temporary folder (--dir to choose it: the 100M store needs ~3 GB).

    .venv/bin/python bench/store_scale.py [--sizes 1e6,1e7,1e8] [--records 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from store import queries  # noqa: E402
from store.rows import arrow_schema, run_row  # noqa: E402
from store.schema import runs as runs_table  # noqa: E402
from store.schema import segments_folder, tokens  # noqa: E402
from store.segments import scan_segments, segment_arrow_schema, write_segment  # noqa: E402
from store.writer import StoreWriter  # noqa: E402
from streaming_llm import RunConfig, RunResult  # noqa: E402
from streaming_llm.environment import code_version  # noqa: E402

STEPS = 20_000
PERIODS = (1, 4, 16, 32, 64, 128)
CAP, SINK = 256, 4
GRID, EXPERIMENT = "synthetic", "sweep"
POINTS, MARKS, RADIUS = 800, 150, 16  # the dashboard's Run detail and Compaction spikes defaults
SQL_EXAMPLE = ("SELECT method, compress_every, count(*) AS runs, avg(tpot_ms_mean) AS tpot_ms, avg(ppl) AS ppl "
               "FROM runs JOIN experiments USING (run_hash) WHERE status = 'done' GROUP BY ALL ORDER BY tpot_ms")


KINDS = (*PERIODS, "recompute")  # every 7th run is the baseline that the Settings view pairs ΔPPL with


def config(index: int) -> RunConfig:
    kind = KINDS[index % len(KINDS)]
    common = dict(model="tiny-llama", max_tokens=STEPS + 1, repeat=index // len(KINDS), warmup=8)
    if kind == "recompute":
        return RunConfig(method="recompute", cap=CAP, **common)
    return RunConfig(method="streaming", sink=SINK, cap=CAP, compress_every=kind, **common)


def summary(cv: str) -> dict:
    now = datetime.now(UTC).isoformat()
    return {"ppl": 150.0, "ppl_decode": 150.0, "mean_nll": 5.0, "tpot_ms_mean": 20.0, "tpot_ms_median": 20.0,
            "tpot_ms_p95": 22.0, "predicted_tokens": STEPS, "decode_steps": STEPS, "timed_steps": STEPS - 8,
            "compaction_count": 100, "kv_len_max": CAP, "kv_len_mean": CAP - 10.0, "window": 200,
            "peak_memory_bytes": 1 << 30, "text_id": "synthetic", "token_hash": "synthetic", "wall_s": 1.0,
            "started_at": now, "ended_at": now, "environment": {"code_version": cv, "device": "cpu:synthetic"}}


def build(path: Path, token_rows: int, cv: str) -> int:
    """A store of token_rows // STEPS runs; returns the number of runs."""
    runs = token_rows // STEPS
    with StoreWriter(path, cv) as writer:  # the schema, as gridrun creates it
        writer.register_grid(GRID, Path("synthetic.yaml"), "name: synthetic\n",
                             [(EXPERIMENT, config(i).run_hash) for i in range(runs)])
    rows = [run_row(config(i), summary(cv), status="done", error=None, attempts=1, worker="bench:0")
            for i in range(runs)]
    for row in rows:
        row |= {"recorded_at": datetime.now(UTC), "segment": "bench"}
    index = pa.table({"idx": np.arange(runs), "run_hash": [row["run_hash"] for row in rows],
                      "period": [1 if KINDS[i % len(KINDS)] == "recompute" else KINDS[i % len(KINDS)]
                                 for i in range(runs)],
                      "recompute": [KINDS[i % len(KINDS)] == "recompute" for i in range(runs)]})
    folder = segments_folder(path.resolve())
    types = {field.name: {"int32": "INTEGER", "int64": "BIGINT", "double": "DOUBLE", "bool": "BOOLEAN"}[str(field.type)]
             for field in segment_arrow_schema(tokens)}
    with duckdb.connect() as con:
        con.register("run_index", index)
        con.execute(f"""
            CREATE TEMPORARY VIEW generated AS
            WITH t AS (SELECT r.run_hash, r.period, r.recompute, (i % {STEPS})::INTEGER AS step, i
                       FROM range({runs * STEPS}) g(i) JOIN run_index r ON r.idx = i // {STEPS}),
                 s AS (SELECT *, NOT recompute AND step >= {CAP - 1} AND (step - {CAP - 1}) % period = 0 AS compacted,
                              CASE WHEN step < {CAP} THEN step + 1 WHEN recompute THEN {CAP}
                                   ELSE {CAP} - period + (step - {CAP}) % period + 1 END AS kv_len FROM t)
            SELECT step::{types["step"]} AS step, step::{types["position"]} AS position,
                   (hash(i) % 50000)::{types["token_id"]} AS token_id,
                   (hash(i + 1) % 50000)::{types["target_id"]} AS target_id,
                   5 + (hash(i) % 1000) / 1000 + CASE WHEN compacted THEN 0.3 ELSE 0 END AS nll,
                   20 + (hash(i * 7) % 1000) / 500 + CASE WHEN compacted THEN 3 ELSE 0 END AS latency_ms,
                   CASE WHEN compacted THEN 0.7 ELSE 0 END::DOUBLE AS compaction_ms, kv_len::INTEGER AS kv_len,
                   compacted, (CASE WHEN compacted THEN period ELSE 0 END)::INTEGER AS evicted, false AS prefill,
                   NULL::INTEGER AS forward, run_hash, 'bench' AS segment
            FROM s""")
        compaction_rows = ("SELECT step, kv_len AS kv_len_before, kv_len - evicted AS kv_len_after, evicted, "
                           "compaction_ms, run_hash, segment FROM generated WHERE compacted")
        for table, select in (("tokens", "SELECT * FROM generated"), ("compactions", compaction_rows)):
            (folder / table).mkdir(parents=True, exist_ok=True)
            con.execute(f"COPY ({select}) TO '{folder / table}' (FORMAT parquet, COMPRESSION zstd, "
                        "PARTITION_BY (run_hash, segment), OVERWRITE_OR_IGNORE, FILENAME_PATTERN 'data{i}')")
    found = scan_segments(folder, keep=None)
    for row in rows:
        row["segment_bytes"], row["segment_digest"] = found[(row["run_hash"], "bench")]
    with duckdb.connect(str(path)) as con:
        con.register("incoming", pa.Table.from_pylist(rows, schema=arrow_schema(runs_table)))
        names = ", ".join(f'"{name}"' for name in rows[0])
        con.execute(f"INSERT INTO runs ({names}) SELECT {names} FROM incoming")
        con.execute("CHECKPOINT")
    return runs


def data_bytes(path: Path, folder: Path) -> int:
    """The data: the store's token and compaction rows (with run_hash) as one zstd Parquet file per table."""
    total = 0
    with queries.connect(path) as con:
        for table in ("tokens", "compactions"):
            target = folder / f"data-{table}.parquet"
            con.execute(f"COPY {table} TO '{target}' (FORMAT parquet, COMPRESSION zstd)")
            total += target.stat().st_size
            target.unlink()
    return total


def writer_vs_copy(folder: Path) -> float:
    """Bytes of one run's token segment as gridrun's writer writes it, over the same rows written by DuckDB's COPY (as
    this bench builds its stores): the factor from the disk figures below to a store gridrun wrote."""
    rows = new_run(0)[1]
    written, _ = write_segment(folder, tokens, "0" * 16, "compare", rows)
    target = folder / "copy.parquet"
    with duckdb.connect() as con:
        con.register("rows", rows)
        con.execute(f"COPY rows TO '{target}' (FORMAT parquet, COMPRESSION zstd)")
    ratio = written / target.stat().st_size
    target.unlink()
    shutil.rmtree(folder / tokens.name)
    return ratio


def disk_bytes(path: Path) -> int:
    folder = segments_folder(path.resolve())
    return path.stat().st_size + sum(file.stat().st_size for file in folder.rglob("*") if file.is_file())


def new_run(index: int) -> tuple[RunConfig, pa.Table, pa.Table]:
    rng = np.random.default_rng(index)
    step = np.arange(STEPS, dtype=np.int32)
    period = 64
    compacted = (step >= CAP - 1) & ((step - CAP + 1) % period == 0)
    kv_len = np.where(step < CAP, step + 1, CAP - period + (step - CAP) % period + 1).astype(np.int32)
    tokens = pa.table({
        "step": step, "position": step.astype(np.int64), "token_id": rng.integers(0, 50000, STEPS),
        "target_id": rng.integers(0, 50000, STEPS), "nll": 5 + rng.random(STEPS), "latency_ms": 20 + rng.random(STEPS),
        "compaction_ms": np.where(compacted, 0.7, 0.0), "kv_len": kv_len, "compacted": compacted,
        "evicted": np.where(compacted, period, 0).astype(np.int32), "prefill": np.zeros(STEPS, dtype=bool),
    })
    compactions = pa.table({
        "step": step[compacted], "kv_len_before": kv_len[compacted], "kv_len_after": kv_len[compacted] - period,
        "evicted": np.full(int(compacted.sum()), period, dtype=np.int32),
        "compaction_ms": np.full(int(compacted.sum()), 0.7),
    })
    return RunConfig(model="tiny-llama", max_tokens=STEPS + 1, method="streaming", sink=SINK,
                     window=CAP - SINK - period,
                     compress_every=period, repeat=10**5 + index, warmup=8), tokens, compactions


def measure_writes(path: Path, cv: str, records: int) -> dict[str, float]:
    started = time.perf_counter()
    writer = StoreWriter(path, cv)
    writer.open()
    opened = time.perf_counter() - started
    totals, publishes, written = [], [], []
    try:
        for index in range(records):
            run, rows, compactions = new_run(index)
            before, segment_bytes, started = writer.publish_seconds, writer.segment_bytes, time.perf_counter()
            writer.record_done(
                RunResult(run, summary(cv), {"tokens": rows, "compactions": compactions}),
                worker="bench:1", attempts=1)
            totals.append(time.perf_counter() - started)
            publishes.append(writer.publish_seconds - before)
            written.append(writer.segment_bytes - segment_bytes + path.stat().st_size)  # segments + catalog copy
    finally:
        writer.close()
    arrow_bytes = new_run(0)[1].append_column("run_hash", pa.array(["0" * 16] * STEPS)).nbytes / STEPS
    return {"open_s": opened, "record_publish_s": statistics.median(totals),
            "publish_s": statistics.median(publishes), "written_bytes": statistics.median(written),
            "arrow_bytes_per_row": arrow_bytes}


def measure_views(path: Path) -> dict[str, float]:
    queries.current_code_version()  # imports torch once, outside the timings
    with queries.connect(path) as con:
        hashes = [row[0] for row in con.execute("SELECT run_hash FROM runs ORDER BY run_hash LIMIT 4").fetchall()]

    def runs(con):
        queries.grid_totals(con, GRID)
        queries.status_counts(con, GRID)
        queries.grid_overview(con)
        queries.run_table(con, GRID)

    def tradeoff(con):
        queries.setting_table(con, GRID, tuple(queries.experiment_names(con, GRID)))

    def sweeps(con):
        settings = queries.setting_table(con, GRID, (EXPERIMENT,))
        queries.sweep_knob(queries.declared_sweep(con, GRID, EXPERIMENT), EXPERIMENT, settings)

    def detail(con):
        queries.run_table(con, GRID)
        steps = queries.step_range(con, hashes[:3])
        queries.token_series(con, hashes[:3], steps, points=POINTS, rolling=64)
        queries.compaction_marks(con, hashes[:3], steps, points=MARKS)

    def spikes(con):
        queries.run_table(con, GRID)
        queries.spike_profile(con, hashes, radius=RADIUS)
        queries.spike_metrics(con, hashes, radius=RADIUS)

    def settings(con):
        queries.setting_table(con, GRID, tuple(queries.experiment_names(con, GRID)))

    def longstream(con):
        queries.run_table(con, GRID)
        queries.block_ppl(con, hashes, 256)

    def speculation(con):
        queries.speculation_table(con, GRID, None)

    timings = {}
    for name, view in (("Runs", runs), ("Trade-off", tradeoff), ("Sweeps", sweeps), ("Run detail (3 runs)", detail),
                       ("Compaction spikes (4 runs)", spikes), ("Settings", settings),
                       ("Long stream (4 runs)", longstream), ("Speculation", speculation)):
        started = time.perf_counter()
        with queries.connect(path) as con:
            view(con)
        timings[name] = time.perf_counter() - started
    started = time.perf_counter()
    queries.run_user_sql(path, SQL_EXAMPLE)
    timings["SQL"] = time.perf_counter() - started
    return timings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e6,1e7", help="token rows per store, comma separated (1e8 for 100M)")
    parser.add_argument("--records", type=int, default=3, help="runs recorded per size (the median is printed)")
    parser.add_argument("--dir", type=Path, default=None, help="where the stores are built (a temporary folder)")
    args = parser.parse_args(argv)
    sizes = [int(float(size)) for size in args.sizes.split(",")]
    cv = code_version()
    columns: dict[int, dict[str, float | str]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for size in sizes:
            path = Path(folder) / f"store-{size}.duckdb"
            started = time.perf_counter()
            runs = build(path, size, cv)
            built = time.perf_counter() - started
            writes = measure_writes(path, cv, args.records)
            rows = runs * STEPS + args.records * STEPS
            disk, data = disk_bytes(path), data_bytes(path, Path(folder))
            columns[size] = {
                "runs": f"{runs:,}", "token rows": f"{rows:,}", "build (s)": f"{built:.1f}",
                "open writer (s, once per gridrun)": f"{writes['open_s']:.2f}",
                "record + publish one 20k-token run (s)": f"{writes['record_publish_s']:.3f}",
                "  of which catalog publish (s)": f"{writes['publish_s']:.3f}",
                "  bytes written per run (MB)": f"{writes['written_bytes'] / 1e6:.2f}",
                "catalog file (MB)": f"{path.stat().st_size / 1e6:,.1f}",
                "store on disk (MB)": f"{disk / 1e6:,.0f}",
                "disk bytes per token row": f"{disk / rows:.1f}",
                "  vs the data as one zstd Parquet": f"{disk / data:.2f}x",
                "  vs the rows' Arrow bytes": f"{disk / rows / writes['arrow_bytes_per_row']:.2f}x",
                "  gridrun's segment vs this COPY's (same rows)": f"{writer_vs_copy(Path(folder)):.2f}x",
                **{f"view {name} (s)": f"{seconds:.2f}" for name, seconds in measure_views(path).items()},
            }
            for leftover in Path(folder).glob(f"*store-{size}*"):
                if leftover.is_dir():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()
    labels = list(next(iter(columns.values())))
    width = max(len(label) for label in labels)
    print(f"{'store built with':{width}}  " + "  ".join(f"{size:>12,}" for size in sizes))
    for label in labels:
        print(f"{label:{width}}  " + "  ".join(f"{columns[size][label]:>12}" for size in sizes))


if __name__ == "__main__":
    main()
