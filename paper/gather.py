"""What the paper prints, read from the store: the experiments a paper grid must hold, the completeness check (every
run the paper needs done, or the export stops listing what is missing), and `gather`, which reads every number through
store/queries.py in one connection. It never writes a file and never formats a number."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import pandas as pd

from paper.labels import LADDER_RUNGS, ladder_rung, method_name, row_label
from store import queries, retrieval
from store.queries import StepRange

MAIN = "main"
LADDER = "ladder"
LONG_STREAM = "long_stream"
# Sweep experiments, the knob each sweeps, and how its panel is titled.
SWEEPS: dict[str, tuple[str, str]] = {
    "r_sweep": ("compress_every", "compaction interval $R$"),
    "slack_sweep": ("slack", "slack"),
    "max_drop_sweep": ("max_drop", "max\\_drop"),
    "sink_sweep": ("sink", "attention sinks"),
    "cap_mode": ("cap_mode", "cap\\_mode (soft vs peak)"),
}
REQUIRED = {MAIN: "tables.tex, profile.tex and the figures", LADDER: "ablations.tex",
            **{name: "sweeps.tex" for name in SWEEPS}, LONG_STREAM: "long_stream.pdf/.png"}
# Optional: when the grid has it, speculative.tex (a grid of score experiments only, like paper-scale, has none).
SPECULATIVE = "speculative"
# Optional: when the grid has them, quantization.tex and its figure (failed configurations are rows, with reasons).
QUANT_EXPERIMENTS = ("quantization", "quantization_sinks")
# Optional: when the grid has it, retrieval.tex and needle.pdf/.png (mode task: accuracy per setting, length, depth).
RETRIEVAL = "retrieval"
# Optional: when the grid has them, layout.tex (the ring layout and the compiled step, timing only: a ring setting's
# quality is its compact twin's) and ring rows beside compact ones in the main table.
LAYOUT_EXPERIMENTS = ("layout", "compile")
SPIKE_RADIUS = 16  # steps either side of a compaction in the NLL-around-compactions figure


class ExportError(RuntimeError):
    """The export cannot be made as asked; the message lists what is missing and how to get it."""


@dataclass
class Gathered:
    """Everything the paper prints, read from the store in one connection."""

    grid: str
    experiments: dict[str, pd.DataFrame]  # settings (store.queries.setting_table) per required experiment
    all_groups: pd.DataFrame
    profile: pd.DataFrame
    kv_series: pd.DataFrame
    spikes: pd.DataFrame
    long_stream: pd.DataFrame  # block PPL per run of the long-stream experiment, with its label and block size
    # Generation configurations of the speculative experiment (queries.speculation_table); None without one.
    speculation: pd.DataFrame | None
    # Settings of the layout and compile experiments (queries.setting_table: compact_ratio, compile_s); None without.
    storage: pd.DataFrame | None = None


def resolve_grid(con: duckdb.DuckDBPyConnection, grid: str | None, store: Path) -> str:
    names = queries.grid_names(con)
    if grid is not None:
        if grid not in names:
            raise ExportError(f"--grid {grid} is not in {store} (grids: {', '.join(names) or 'none'})")
        return grid
    if "paper" in names:
        return "paper"
    if len(names) == 1:
        return names[0]
    raise ExportError(f"{store} holds grids {', '.join(names) or 'none'}: pass --grid NAME")


def check_complete(con: duckdb.DuckDBPyConnection, grid: str, include_stale: bool) -> None:
    """Raise ExportError listing every missing experiment, run, baseline or sweep value."""
    present = set(queries.experiment_names(con, grid))
    problems = [f"experiment {name}: not in grid {grid} (needed for {need})"
                for name, need in REQUIRED.items() if name not in present]
    needed = [name for name in (*REQUIRED, SPECULATIVE, RETRIEVAL, *LAYOUT_EXPERIMENTS) if name in present]
    for row in queries.missing_runs(con, grid, needed, include_stale).itertuples():
        why = "stale (made by other evaluation code; rerun the grid, or pass --include-stale)" if row.stale \
            else row.status + (f": {str(row.error).splitlines()[0]}" if isinstance(row.error, str) else "")
        method = row.method if isinstance(row.method, str) else "not run yet"
        problems.append(f"experiment {row.experiment}: run {row.run_hash} ({method}) {why}")
    if not problems:
        problems += _shape_problems(con, grid, include_stale, needed)
    if problems:
        listing = "\n  ".join(problems)
        raise ExportError(
            f"paper export of grid {grid} is incomplete; nothing was written. Missing:\n  {listing}\n"
            f"Finish the grid (python -m gridrun GRID.yaml; python -m gridrun status GRID.yaml shows what is left)."
        )


def _shape_problems(con: duckdb.DuckDBPyConnection, grid: str, include_stale: bool, needed: list[str]) -> list[str]:
    problems = []
    if SPECULATIVE in needed:
        problems += _speculative_problems(queries.speculation_table(con, grid, [SPECULATIVE], include_stale))
    if RETRIEVAL in needed and queries.retrieval_table(con, grid, [RETRIEVAL], False, include_stale).empty:
        problems.append(f"experiment {RETRIEVAL}: no trials (its runs must be mode: task)")
    layout = [name for name in needed if name in LAYOUT_EXPERIMENTS]
    if layout:
        problems += _layout_problems(queries.setting_table(con, grid, layout, include_stale), grid)
    for name in needed:
        if name in (SPECULATIVE, RETRIEVAL, *LAYOUT_EXPERIMENTS):
            continue
        groups = queries.setting_table(con, grid, [name], include_stale)
        # The long-stream figure is quality only: no TPOT, no baseline (recompute past 8k positions is not the point).
        timed = groups if name != LONG_STREAM else groups.iloc[:0]
        for row in timed[timed.tpot_ms.isna()].itertuples():
            problems.append(f"experiment {name}: setting {row.setting_hash} has no stepwise run, so no TPOT (parallel "
                            "runs measure quality only): add a stepwise run of it")
        for row in timed[(timed.speedup.isna() | timed.delta_ppl_pct.isna()) & ~timed.is_baseline].itertuples():
            problems.append(f"experiment {name}: no recompute baseline in grid {grid} with the same tokens, model, "
                            f"cap ({row.cap}), device ({row.device_name}) and code as setting {row.setting_hash} "
                            f"(for its {'TPOT' if pd.isna(row.speedup) else 'text samples'})")
        if name in SWEEPS and groups[SWEEPS[name][0]].nunique() < 2:
            problems.append(f"experiment {name}: {SWEEPS[name][0]} takes fewer than two values")
        if name == LADDER:
            rungs = {ladder_rung(row) for row in groups.itertuples()}
            problems += [f"experiment {LADDER}: no '{rung}' configuration" for index, rung in enumerate(LADDER_RUNGS)
                         if index not in rungs]
        if name == LONG_STREAM and groups.method.nunique() < 2:
            problems.append(f"experiment {LONG_STREAM}: needs dense and streaming runs to compare")
        if name == MAIN:
            kinds = {method_name(row) for row in groups.itertuples()}
            problems += [f"experiment {MAIN}: no {kind} configuration" for kind in ("Recompute", "Strict", "Lazy")
                         if kind not in kinds]
    return problems


def _layout_problems(settings: pd.DataFrame, grid: str) -> list[str]:
    """Every setting of the layout experiments timed and with a baseline (the recompute with its compile: compiled
    against compiled); a ring or compiled one beside its compact eager twin (the same setting at layout compact,
    compile none, on the same tokens); a compiled one with compile_s."""
    problems = []
    for row in settings.itertuples():
        what = f"experiment {row.experiments[0] if len(row.experiments) == 1 else '/'.join(row.experiments)}: " \
               f"setting {row.setting_hash} (layout {row.layout}, compile {row.compile})"
        if pd.isna(row.tpot_ms):
            problems.append(f"{what} has no stepwise run, so no TPOT: measure it with the timing measurement")
        elif pd.isna(row.speedup) and not row.is_baseline:
            # compiled against compiled (queries.setting_table): an eager recompute is never a compiled setting's
            problems.append(f"{what}: no recompute baseline in grid {grid} with the same tokens, cap, device and "
                            f"compile ({row.compile}): add method recompute at compile {row.compile} to the "
                            "experiment, timed as it is")
        if (row.layout != "compact" or row.compile != "none") and pd.isna(row.compact_ratio):
            problems.append(f"{what}: no compact eager twin (the same setting at layout compact, compile none, on "
                            "the same tokens) to time it against: add layout compact to the experiment")
        if row.compile != "none" and pd.isna(row.compile_s):
            problems.append(f"{what}: compiled, but no compile_s recorded (made by code before the compile knob?)")
    return problems


def _speculative_problems(speculation: pd.DataFrame) -> list[str]:
    if speculation.empty:
        return [f"experiment {SPECULATIVE}: no generation runs (mode: generate)"]
    return [f"experiment {SPECULATIVE}: configuration {row.group_hash} ({row.spec}, k={row.num_draft}) has no "
            "spec none run with the same policy, prompt, device and code" for row in speculation.itertuples()
            if pd.isna(row.reference_hash)]


def gather(con: duckdb.DuckDBPyConnection, grid: str, include_stale: bool) -> Gathered:
    experiments = {name: queries.setting_table(con, grid, [name], include_stale) for name in REQUIRED}
    main = experiments[MAIN]
    streaming = main[main.method == "streaming"].sort_values("compress_every")
    profile = queries.cost_profile(con, grid, list(streaming.timing_group_hash), include_stale)
    labels = {row.setting_hash: row_label(row, ["compress_every"]) for row in main.itertuples()}
    runs = [hashes[0] for hashes in streaming.run_hashes]
    steps = queries.step_range(con, runs)
    window = sawtooth_window(steps, int(streaming.compress_every.max()), int(streaming.cap.max()))
    kv_series = queries.token_series(con, runs, window, points=window.last - window.first + 1, rolling=1)
    kv_series["label"] = kv_series.run_hash.map(
        {hashes[0]: f"{labels[setting]}, repeat 0 of n={n}"
         for hashes, setting, n in zip(streaming.run_hashes, streaming.setting_hash, streaming.n_repeats, strict=True)})
    pooled_runs = [run for hashes in streaming.run_hashes for run in hashes]
    series = [labels[setting] for hashes, setting in zip(streaming.run_hashes, streaming.setting_hash, strict=True)
              for _ in hashes]
    spikes = queries.spike_profile(con, pooled_runs, series=series, radius=SPIKE_RADIUS)
    all_groups = queries.setting_table(con, grid, None, include_stale)
    # The trade-off figure compares like with like: the model, text and device of the main table, timed settings.
    # Only settings measured as the main table's are (same quality protocol, tokens and prefill): a PPL of another
    # measurement (a shorter stepwise stream, other texts) is not comparable.
    context = ["model", "dataset", "device_name", "quality_protocol", "quality_tokens", "quality_prefill"]
    all_groups = all_groups[all_groups.tpot_ms.notna()].merge(main[context].drop_duplicates(), on=context)
    # Settings measured by the same runs (equivalent configurations) are one point, not several independent results.
    all_groups = all_groups.drop_duplicates(["run_groups", "code_version"])
    by_timing = dict(zip(streaming.timing_group_hash, streaming.setting_hash, strict=True))
    order = {setting: index for index, setting in enumerate(streaming.setting_hash)}
    profile = profile.assign(setting_hash=profile.group_hash.map(by_timing))
    profile = profile.assign(label=profile.setting_hash.map(labels)).sort_values(
        "setting_hash", key=lambda column: column.map(order))
    present = queries.experiment_names(con, grid)
    speculation = queries.speculation_table(con, grid, [SPECULATIVE], include_stale) \
        if SPECULATIVE in present else None
    layout = [name for name in LAYOUT_EXPERIMENTS if name in present]
    storage = queries.setting_table(con, grid, layout, include_stale) if layout else None
    return Gathered(grid, experiments, all_groups, profile, kv_series, spikes, long_stream_blocks(con, experiments),
                    speculation, storage)


def long_stream_blocks(con: duckdb.DuckDBPyConnection, experiments: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """PPL per block of positions of one run per setting of the long-stream experiment (its first text sample)."""
    settings = experiments[LONG_STREAM]
    runs = {hashes[0]: row_label(row, ["sink", "compress_every"]) for hashes, row in
            zip(settings.run_hashes, settings.itertuples(), strict=True)}
    steps = queries.step_range(con, list(runs))
    block = 1024 if steps.last >= 16 * 1024 else max(16, (steps.last + 1) // 16)
    blocks = queries.block_ppl(con, list(runs), block)
    return blocks.assign(label=blocks.run_hash.map(runs), block=block)


def gather_quantization(con: duckdb.DuckDBPyConnection, grid: str,
                        include_stale: bool) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(done configurations with ΔPPL and the TPOT ratio vs the same policy in float, failed runs with their error),
    or None when the grid has no quantization experiment. Pending or stale runs stop the export, as elsewhere."""
    present = [name for name in QUANT_EXPERIMENTS if name in queries.experiment_names(con, grid)]
    if not present:
        return None
    missing = queries.missing_runs(con, grid, present, include_stale)
    waiting = missing[(missing.status != "failed") | missing.stale]
    if not waiting.empty:
        listing = "\n  ".join(f"experiment {row.experiment}: run {row.run_hash} {row.status}"
                               for row in waiting.itertuples())
        raise ExportError(f"paper export of grid {grid} is incomplete; nothing was written. Missing:\n  {listing}")
    # Every number of a quantized setting (ΔPPL vs float paired per text sample, TPOT ratio) from the query layer.
    groups = queries.setting_table(con, grid, present, include_stale)
    runs = queries.run_table(con, grid, include_stale)
    failed = runs[(runs.status == "failed") & runs.run_hash.isin(missing.run_hash)]
    return groups, failed


def gather_retrieval(con: duckdb.DuckDBPyConnection, grid: str, include_stale: bool) -> pd.DataFrame | None:
    """The retrieval experiment's cells (queries.retrieval_table per configuration and depth) with each one's plain
    `setting` label and the cache's span (`span_window`, `span_recent_max`: store.retrieval.cache_spans), or None when
    the grid has no such experiment (check_complete has refused a run of it that is not done, and no trials)."""
    if RETRIEVAL not in queries.experiment_names(con, grid):
        return None
    return retrieval.retrieval_cells(con, grid, [RETRIEVAL], include_stale)


def sawtooth_window(steps: StepRange, compress_every: int, cap: int) -> StepRange:
    """Steps that show a few teeth of the largest R after the cache first fills."""
    first = max(steps.first, cap - 2 * compress_every)
    last = min(steps.last, first + max(4 * compress_every, 64))
    return StepRange(steps.first if last <= first else first, last)
