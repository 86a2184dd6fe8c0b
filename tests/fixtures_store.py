"""Stores for the dashboard, paper and query tests: one filled by `python -m gridrun grids/smoke.yaml`, and a large
synthetic one (50 runs x 20,000 tokens) for timing. Test-only: the project's writer is store/, never this module.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import sqlalchemy as sa
import yaml

from store.schema import APPLICATION_ID, KNOB_COLUMNS, metadata, segment_tables, superseded_segment_tables
from streaming_llm import RunConfig

ROOT = Path(__file__).resolve().parent.parent
SMOKE_GRID = ROOT / "grids" / "smoke.yaml"
PAPER_GRID = "smoke-paper"
# The paper experiments at smoke size, for as long as grids/smoke.yaml lacks them.
PAPER_EXTRA_EXPERIMENTS = {
    # slack 16: staged eviction acts (with slack 8 < R - 1 every max_drop would be the run of R=16)
    "max_drop_sweep": {"base": {"method": "streaming", "compress_every": 16, "slack": 16},
                       "grid": {"max_drop": [0, 8]}},
    "sink_sweep": {"base": {"method": "streaming", "compress_every": 16}, "grid": {"sink": [0, 4]}},
    "quantization": {"base": {"method": "streaming", "kv_quant_group": 8},
                     "grid": {"kv_quant": ["none", "int8"], "weight_quant": ["none", "int8"]},
                     "runs": [{"compress_every": 1}, {"compress_every": 16}]},
    "quantization_sinks": {"base": {"method": "streaming", "kv_quant": "int4", "kv_quant_group": 8,
                                    "compress_every": 16}, "grid": {"kv_quant_sinks": ["full", "quantized"]}},
    # The ring layout beside compact (main's timing runs, shared); one compiled ring run and the compiled recompute it
    # is timed against (compiled against compiled; inductor: ~30-60 s each here), the eager ones shared.
    "layout": {"base": {"method": "streaming", "repeats": 2}, "grid": {"layout": ["compact", "ring"],
                                                                      "compress_every": [1, 16]}},
    "compile": {"grid": {"compile": ["none", "default"]},
                "runs": [{"method": "recompute"}, {"method": "streaming", "layout": "ring", "compress_every": 16}]},
    "long_stream": {"base": {"protocol": "parallel", "max_tokens": 1200, "prefill": 0},
                    "runs": [{"method": "dense"}, {"method": "streaming", "sink": 0, "compress_every": 16},
                             {"method": "streaming", "compress_every": 1}, {"method": "streaming",
                                                                            "compress_every": 16}]},
}
_BUILT: dict[str, Path] = {}
READS_DURING_GRID: list[int | str] = []  # done counts (or errors) read while grids/smoke.yaml was running

LEGACY_VERSION = 3  # the layout create_store makes: every table, per-step rows included, in the one DuckDB file


def create_store(path: Path) -> None:
    """An empty store in the layout of schema 3 (the tables of store/schema.py, per-step rows in tables of the file), as
    gridrun wrote it before segments: fill it with insert_run, then `upgrade` it (the writer's migration) to read it."""
    engine = sa.create_engine(f"duckdb:///{path}")
    metadata.create_all(engine)
    for table in (*segment_tables(), *superseded_segment_tables()):  # declared apart: derived from the engine's
        table.create(engine)
    engine.dispose()
    with duckdb.connect(str(path)) as con:
        con.executemany("INSERT INTO meta VALUES (?, ?)",
                        [["application_id", APPLICATION_ID], ["schema_version", str(LEGACY_VERSION)]])


def copy_store(source: Path, target: Path) -> Path:
    """A copy of a store under another name: its catalog file and its segment folder (they move together)."""
    shutil.copyfile(source, target)
    folder = source.with_name(source.name + ".segments")
    if folder.is_dir():
        shutil.copytree(folder, target.with_name(target.name + ".segments"), dirs_exist_ok=True)
    return target


def upgrade(path: Path) -> Path:
    """Migrate a store made by create_store to the current schema through the writer (as gridrun migrate does)."""
    from store.writer import StoreWriter
    from streaming_llm.environment import code_version

    with StoreWriter(path, code_version()):
        pass
    return path


def insert_run(con: duckdb.DuckDBPyConnection, row: dict, tokens: pa.Table | None,
               compactions: pa.Table | None) -> None:
    """One run in one transaction, through DuckDB's Arrow path."""
    con.begin()
    columns = ", ".join(f'"{name}"' for name in row)  # quoted: `window` is an SQL keyword
    con.register("incoming", pa.Table.from_pylist([row]))
    con.execute(f"INSERT INTO runs ({columns}) SELECT {columns} FROM incoming")
    con.unregister("incoming")
    for name, table in (("tokens", tokens), ("compactions", compactions)):
        if table is None:
            continue
        with_hash = table.add_column(0, "run_hash", pa.array([row["run_hash"]] * table.num_rows, pa.string()))
        names = ", ".join(with_hash.column_names)
        con.register("incoming", with_hash)
        con.execute(f"INSERT INTO {name} ({names}) SELECT {names} FROM incoming")
        con.unregister("incoming")
    con.commit()


def add_membership(con: duckdb.DuckDBPyConnection, grid: str, membership: Iterable[tuple[str, str]]) -> None:
    con.execute("INSERT INTO grids VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [grid, f"grids/{grid}.yaml", f"name: {grid}\n", datetime.now(UTC)])
    con.executemany("INSERT INTO experiments VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                    [[grid, experiment, run_hash] for experiment, run_hash in membership])


def smoke_store(tmp_path_factory) -> Path:
    """A store filled by `python -m gridrun grids/smoke.yaml`, plus grid PAPER_GRID (smoke and the paper experiments
    smoke lacks; runs shared with smoke are not rerun). Built once per test session (about half a minute here).
    While smoke runs, the store is read through store/queries.py as the dashboard does: see `READS_DURING_GRID`."""
    if "smoke" not in _BUILT:
        folder = tmp_path_factory.mktemp("smoke-store")
        store = folder / "gridrun.duckdb"
        READS_DURING_GRID.extend(_gridrun(SMOKE_GRID, store, read_while_running=True))
        _gridrun(_paper_grid(folder), store)
        _BUILT["smoke"] = store
    return _BUILT["smoke"]


# The grids users run, shrunk with --set (tiny-llama; gpu-smoke also to a CPU and short streams) so that each builds in
# a minute or two here: the stores the dashboard and the paper must read as the users' own (every experiment kind and
# every measurement each grid has, at their own lengths: the quantization runs read other tokens than the timing ones).
SHRUNK_GRIDS: dict[str, tuple[str, ...]] = {
    "paper": ("model=tiny-llama", "kv_quant_group=8"),  # every measurement at its own size: ~1.5 min
    # gpu-smoke on a CPU: compile none (its reduce-overhead runs need CUDA graphs; their ring runs stay, eager)
    "gpu-smoke": ("model=tiny-llama", "device=cpu", "compile=none", "dtype=float32", "cap=128", "prefill=128",
                  "max_tokens=200",
                  "prompt_tokens=64", "new_tokens=32"),
}


def shrunk_grid_store(tmp_path_factory, grid: str) -> tuple[Path, str]:
    """(store, grid name) of `python -m gridrun grids/{grid}.yaml --set ...` (SHRUNK_GRIDS), built once per session."""
    sets = SHRUNK_GRIDS[grid]
    name = f"{grid}[{','.join(sets)}]"
    if name not in _BUILT:
        store = tmp_path_factory.mktemp(f"{grid}-store") / "gridrun.duckdb"
        extra = [argument for value in sets for argument in ("--set", value)]
        _gridrun(ROOT / "grids" / f"{grid}.yaml", store, extra=extra)
        _BUILT[name] = store
    return _BUILT[name], name


def _paper_grid(folder: Path) -> Path:
    from paper.gather import LAYOUT_EXPERIMENTS, QUANT_EXPERIMENTS, REQUIRED

    spec = yaml.safe_load(SMOKE_GRID.read_text())
    spec["name"] = PAPER_GRID
    for name, experiment in PAPER_EXTRA_EXPERIMENTS.items():
        wanted = name in REQUIRED or name in QUANT_EXPERIMENTS or name in LAYOUT_EXPERIMENTS
        if wanted and name not in spec["experiments"]:
            spec["experiments"][name] = experiment
    path = folder / f"{PAPER_GRID}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _gridrun(grid: Path, store: Path, read_while_running: bool = False, extra: list[str] | None = None
             ) -> list[int | str]:
    """Run the grid; with `read_while_running`, read the done count (or the error) every 0.2 s until it ends."""
    from store import queries

    command = [sys.executable, "-m", "gridrun", str(grid), "--store", str(store), *(extra or [])]
    reads: list[int | str] = []
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        while read_while_running and process.poll() is None:
            if store.exists():
                try:
                    with queries.connect(store) as con:
                        reads.append(queries.grid_totals(con, grid.stem)["done"])
                except (queries.StoreError, duckdb.Error) as error:
                    reads.append(f"{type(error).__name__}: {error}")
            time.sleep(0.2)
        stdout, stderr = process.communicate(timeout=600)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return reads


def build_synthetic_store(path: Path, runs: int = 50, steps: int = 20_000,
                          grids: tuple[str, ...] = ("synthetic",)) -> Path:
    """`runs` streaming runs of `steps` tokens each with sawtooth kv_len and latency spikes at compactions, plus one
    recompute baseline, members of each of `grids`: the size the dashboard must stay fast on. Numbers are synthetic,
    the shapes are the study's."""
    from streaming_llm.environment import code_version

    create_store(path)
    rng = np.random.default_rng(0)
    now = datetime.now(UTC)
    membership = []
    with duckdb.connect(str(path)) as con:
        for index in range(runs):
            method = "recompute" if index == 0 else "streaming"
            compress_every = [1, 4, 16, 32, 64, 128][index % 6]
            slack, repeat = [0, 8, 16, 32][(index // 6) % 4], index // 24
            tokens, compactions = _synthetic_tokens(rng, steps, cap=256, sink=4, compress_every=compress_every)
            run_hash = f"synthetic{index:07d}"
            knobs = {column.name: RunConfig.model_fields[column.name].default for column in KNOB_COLUMNS} | {
                "model": "synthetic", "dataset": "shakespeare", "sample": 0, "max_tokens": steps + 1, "prefill": 0,
                "warmup": 8, "protocol": "stepwise", "chunk": 256, "score_stride": 1, "method": method, "sink": 4,
                "cap": 256, "cap_mode": "peak", "overlap": 0, "refresh": 0,
                "refresh_policy": "none", "slack": slack if method == "streaming" else 0,
                "compress_every": compress_every if method == "streaming" else 1, "max_drop": 0,
                "rope_mode": "realign", "dtype": "float32", "device": "cpu", "attn_implementation": "sdpa",
                "repeat": repeat,
            }
            latency = tokens.column("latency_ms").to_numpy()[8:]
            nll = tokens.column("nll").to_numpy()
            row = {
                "run_hash": run_hash, "group_hash": f"group{index % 24:04d}" if method == "streaming" else "base",
                "setting_hash": f"group{index % 24:04d}" if method == "streaming" else "base",
                "status": "done", "error": None, "attempts": 1, "config_json": json.dumps(knobs), **knobs,
                "text_id": "synthetic", "token_hash": "synthetic", "random_weights": True, "predicted_tokens": steps,
                "decode_steps": steps, "ppl": float(np.exp(nll.mean())), "ppl_decode": float(np.exp(nll.mean())),
                "mean_nll": float(nll.mean()), "tpot_ms_mean": float(latency.mean()),
                "tpot_ms_median": float(np.median(latency)), "tpot_ms_p95": float(np.percentile(latency, 95)),
                "timed_steps": len(latency), "prefill_ms": 0.0, "compaction_count": compactions.num_rows,
                "compaction_ms_total": float(np.sum(compactions.column("compaction_ms").to_numpy())),
                "evicted_total": int(np.sum(compactions.column("evicted").to_numpy())),
                "kv_len_max": int(tokens.column("kv_len").to_numpy().max()),
                "kv_len_mean": float(tokens.column("kv_len").to_numpy().mean()), "kv_cache_peak_bytes": 1 << 20,
                "window_resolved": 200, "soft_capacity": 256, "hard_capacity": 256,
                "peak_memory_bytes": 1 << 30, "peak_memory_kind": "synthetic", "device_name": "cpu:synthetic",
                "wall_s": 1.0, "started_at": now, "ended_at": now, "code_version": code_version(), "git_commit": None,
                "environment_json": "{}",
            }
            insert_run(con, row, tokens, compactions)
            membership.append(("sweep", run_hash))
        for grid in grids:
            add_membership(con, grid, membership)
    return upgrade(path)


def _synthetic_tokens(rng, steps: int, cap: int, sink: int, compress_every: int) -> tuple[pa.Table, pa.Table]:
    step = np.arange(steps, dtype=np.int32)
    low = cap - compress_every
    kv_len = np.where(step < cap, step + 1, low + (step - cap) % compress_every + 1).astype(np.int32)
    compacted = (step >= cap - 1) & ((step - cap + 1) % compress_every == 0)
    evicted = np.where(compacted, compress_every, 0).astype(np.int32)
    compaction_ms = np.where(compacted, 0.5 + rng.random(steps), 0.0)
    latency = 20 + rng.normal(0, 1, steps) + compaction_ms * 4
    nll = 5 + rng.normal(0, 0.5, steps) + np.where(compacted, 0.3, 0.0)
    tokens = pa.table({
        "step": step, "position": step.astype(np.int64), "token_id": rng.integers(0, 1000, steps),
        "target_id": rng.integers(0, 1000, steps), "nll": nll, "latency_ms": latency, "compaction_ms": compaction_ms,
        "kv_len": kv_len, "compacted": compacted, "evicted": evicted, "prefill": np.zeros(steps, dtype=bool),
    })
    events = step[compacted]
    compactions = pa.table({
        "step": events, "kv_len_before": kv_len[compacted], "kv_len_after": kv_len[compacted] - compress_every,
        "evicted": evicted[compacted], "compaction_ms": compaction_ms[compacted],
    })
    return tokens, compactions
