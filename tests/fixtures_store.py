"""Stores for the dashboard, paper and query tests: one filled with real evaluate() runs of tiny-llama, and a large
synthetic one (50 runs x 20,000 tokens) for timing. Test-only: the project's writer is store/, never this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import sqlalchemy as sa

from store.schema import KNOB_COLUMNS, SCHEMA_VERSION, SUMMARY_COLUMNS, metadata

# The study's layout in miniature: the experiment names paper/export.py reads, at a size a test can afford.
SMALL_BASE = {"model": "tiny-llama", "max_tokens": 120, "cap": 32, "sink": 4, "warmup": 4}
SMALL_GRID: dict[str, list[dict]] = {
    "main": [
        {"method": "recompute"},
        {"method": "streaming", "compress_every": 1},
        {"method": "streaming", "compress_every": 8},
    ],
    "r_sweep": [{"method": "streaming", "compress_every": r} for r in (1, 4, 8)],
    "slack_sweep": [{"method": "streaming", "compress_every": 8, "slack": s} for s in (0, 4)],
    "max_drop_sweep": [{"method": "streaming", "compress_every": 8, "slack": 4, "max_drop": m} for m in (0, 8)],
    "sink_sweep": [{"method": "streaming", "compress_every": 8, "sink": s} for s in (0, 4)],
    "cap_mode": [{"method": "streaming", "compress_every": 8, "cap_mode": m} for m in ("peak", "soft")],
    "ladder": [
        {"method": "streaming", "compress_every": 1},
        {"method": "streaming", "compress_every": 8},
        {"method": "streaming", "compress_every": 8, "slack": 4},
        {"method": "streaming", "compress_every": 8, "slack": 4, "max_drop": 8},
    ],
}
REPEATED = [{"method": "streaming", "compress_every": 8}, {"method": "recompute"}]  # run twice: mean +- std, n = 2


def create_store(path: Path) -> None:
    """An empty store with the schema of store/schema.py."""
    engine = sa.create_engine(f"duckdb:///{path}")
    metadata.create_all(engine)
    engine.dispose()
    with duckdb.connect(str(path)) as con:
        con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])


def runs_row(result, *, status: str = "done", error: str | None = None) -> dict:
    """The runs row of a RunResult, column for column as store/schema.py declares it."""
    config, summary = result.config, dict(result.summary)
    environment = summary.pop("environment")
    summary["window_resolved"] = summary.pop("window")
    summary["device_name"] = environment["device"]
    normalised = config.normalised()
    row = {
        "run_hash": config.run_hash, "group_hash": config.group_hash, "status": status, "error": error,
        "attempts": 1, "config_json": json.dumps(normalised, sort_keys=True),
        **{column.name: normalised[column.name] for column in KNOB_COLUMNS},
        **{column.name: summary.get(column.name) for column in SUMMARY_COLUMNS},
        "started_at": datetime.fromisoformat(summary["started_at"]),
        "ended_at": datetime.fromisoformat(summary["ended_at"]),
        "code_version": environment["code_version"], "git_commit": environment["git_commit"],
        "environment_json": json.dumps(environment, sort_keys=True),
    }
    return row


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


def build_small_store(path: Path, grid: str = "small") -> Path:
    """Run SMALL_GRID (plus REPEATED twice) with evaluate() on tiny-llama and store every run; ~1 minute here."""
    from streaming_llm import LoadedModel, RunConfig, evaluate

    configs: dict[str, RunConfig] = {}
    membership: list[tuple[str, str]] = []
    for experiment, overrides in SMALL_GRID.items():
        for override in overrides:
            repeats = 2 if override in REPEATED else 1
            for repeat in range(repeats):
                config = RunConfig.from_dict({**SMALL_BASE, **override, "repeat": repeat})
                configs[config.run_hash] = config
                membership.append((experiment, config.run_hash))
    create_store(path)
    loaded = None
    with duckdb.connect(str(path)) as con:
        for config in configs.values():
            if loaded is None:
                loaded = LoadedModel.load(config)
            result = evaluate(config, loaded)
            insert_run(con, runs_row(result), result.tokens, result.compactions)
        add_membership(con, grid, membership)
    return path


def build_synthetic_store(path: Path, runs: int = 50, steps: int = 20_000, grid: str = "synthetic") -> Path:
    """`runs` streaming runs of `steps` tokens each with sawtooth kv_len and latency spikes at compactions, plus one
    recompute baseline: the size the dashboard must stay fast on. Numbers are synthetic, the shapes are the study's."""
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
            knobs = {column.name: None for column in KNOB_COLUMNS} | {
                "model": "synthetic", "dataset": "shakespeare", "sample": 0, "max_tokens": steps + 1, "prefill": 0,
                "warmup": 8, "method": method, "sink": 4, "cap": 256, "cap_mode": "peak", "overlap": 0, "refresh": 0,
                "refresh_policy": "none", "slack": slack if method == "streaming" else 0,
                "compress_every": compress_every if method == "streaming" else 1, "max_drop": 0,
                "rope_mode": "realign", "dtype": "float32", "device": "cpu", "attn_implementation": "sdpa",
                "repeat": repeat,
            }
            latency = tokens.column("latency_ms").to_numpy()[8:]
            nll = tokens.column("nll").to_numpy()
            row = {
                "run_hash": run_hash, "group_hash": f"group{index % 24:04d}" if method == "streaming" else "base",
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
        add_membership(con, grid, membership)
    return path


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
