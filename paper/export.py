"""`python -m paper export`: the paper's LaTeX tables and figures from one grid of the store.

Every number comes from store/queries.py (the dashboard's queries). The export checks first that every run the paper
needs is done; if not it fails with the list of what is missing and writes nothing, never a placeholder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import pandas as pd

from paper import figures
from paper.latex import MissingNumber, Table, escape, knob, mean_std, number
from store import queries
from store.verify import verify_segments

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
METHOD_ORDER = {"recompute": 0, "dense": 1, "streaming": 2}
LADDER_RUNGS = ("Strict", "Lazy", "+ slack", "+ slack + max\\_drop")
STALE_MARK = r"$^\dagger$"
EQUIVALENT_MARK = r"$\equiv$"
EQUIVALENT_NOTE = (r" $\equiv$: configurations that keep the same tokens at every step (one computation, run once), "
                   "shown as one row.")
# Optional: when the grid has them, quantization.tex and its figure (failed configurations are rows, with reasons).
QUANT_EXPERIMENTS = ("quantization", "quantization_sinks")
# What an export writes only for some grids: removed from the output folder when this grid has none, so that a folder
# exported from another grid before never mixes its tables into this one's.
OPTIONAL_OUTPUTS = ("speculative.tex", "quantization.tex", "quantization.pdf", "quantization.png")


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


def export(store: Path, grid: str | None, out: Path, include_stale: bool = False) -> list[Path]:
    """Write tables.tex, ablations.tex, sweeps.tex, profile.tex, figures.tex and the figures (PDF + PNG) to `out`, and
    speculative.tex / quantization.tex (+ figure) where the grid has those experiments."""
    verify_segments(store)  # no published number from a segment other than its writer recorded (StoreError)
    with queries.connect(store) as con:
        grid = resolve_grid(con, grid, store)
        check_complete(con, grid, include_stale)
        gathered = gather(con, grid, include_stale)
        quant = gather_quantization(con, grid, include_stale)
    try:
        texts = {
            "tables.tex": main_table(gathered),
            "ablations.tex": ladder_table(gathered),
            "sweeps.tex": sweeps_table(gathered),
            "profile.tex": profile_table(gathered),
        }
        if gathered.speculation is not None:
            texts["speculative.tex"] = speculative_table(gathered)
        if quant is not None:
            texts["quantization.tex"] = quantization_table(*quant)
    except MissingNumber as missing:
        raise ExportError(f"grid {grid}: {missing}; nothing was written") from None
    out.mkdir(parents=True, exist_ok=True)
    # First, before anything is written: an export that fails halfway never leaves another grid's tables beside these.
    planned = {*texts, *(("quantization.pdf", "quantization.png") if quant is not None else ())}
    for name in OPTIONAL_OUTPUTS:
        if name not in planned:
            (out / name).unlink(missing_ok=True)
    written = []
    for name, text in texts.items():
        (out / name).write_text(text)
        written.append(out / name)
    written += figures.write_all(gathered, out)
    if quant is not None:
        written += figures.save(figures.quantization(quant[0]), out / "quantization")
    return written


# --- quantization ---------------------------------------------------------------------------------------------------
QUANT_KNOBS = ("kv_quant", "kv_quant_sinks", "weight_quant")


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
    groups = queries.group_table(con, grid, present, include_stale)
    policy = [k for k in queries.KNOBS if k not in QUANT_KNOBS and k not in ("kv_quant_group", "kv_quant_residual")]
    floats = groups[(groups.kv_quant == "none") & (groups.weight_quant == "none")]
    reference = floats[policy + ["ppl", "tpot_ms"]].rename(columns={"ppl": "float_ppl", "tpot_ms": "float_tpot_ms"})
    groups = groups.merge(reference, on=policy, how="left")
    groups = groups.assign(delta_float_pct=100 * (groups.ppl / groups.float_ppl - 1),
                           tpot_ratio=groups.tpot_ms / groups.float_tpot_ms)
    runs = queries.run_table(con, grid, include_stale)
    failed = runs[(runs.status == "failed") & runs.run_hash.isin(missing.run_hash)]
    return groups, failed


def quantization_table(groups: pd.DataFrame, failed: pd.DataFrame) -> str:
    columns = [("Configuration", "l"), ("PPL", "r"), (r"$\Delta$PPL (\%)", "r"), ("TPOT (ms)", "r"),
               ("TPOT ratio", "r"), ("KV B/token", "r"), ("Weights (MiB)", "r"), ("$n$", "r")]
    table = Table(columns=columns, label="tab:quantization", caption=(
        "Quantization: KV-cache codes (kv\\_quant; sinks kept full or quantized) and torchao weights (weight\\_quant). "
        "$\\Delta$PPL and the TPOT ratio are relative to the same policy in float; KV bytes per token and weight "
        "bytes are measured (nbytes of every tensor held). Mean $\\pm$ std over $n$ repeats; failed configurations "
        "are listed with their reason."))
    for compress_every, block in groups.groupby("compress_every", sort=True):
        block = block.sort_values(["weight_quant", "kv_quant", "kv_quant_sinks"])
        rows = []
        for row in block.itertuples():
            what = f"configuration {row.group_hash}"
            rows.append([
                _quant_label(row), mean_std(row.ppl, row.ppl_std, row.n, 3, what=f"PPL of {what}"),
                f"${number(row.delta_float_pct, 2, signed=True, what=f'delta PPL vs float of {what}')}$",
                mean_std(row.tpot_ms, row.tpot_ms_std, row.n, 2, what=f"TPOT of {what}"),
                f"${number(row.tpot_ratio, 2, what=f'TPOT ratio of {what}')}\\times$",
                f"${number(row.kv_bytes_per_token, 0, what=f'KV bytes of {what}')}$",
                f"${number(row.weights_bytes / 2**20, 1, what=f'weights bytes of {what}')}$", str(row.n)])
        lost = failed[failed.compress_every == compress_every]
        for row in lost.itertuples():
            reason = escape(str(row.error).strip().splitlines()[0][:90]) if isinstance(row.error, str) else "unknown"
            rows.append([f"{_quant_label(row)}: \\textit{{failed}} ({reason})", *["---"] * 6, "0"])
        notes = [f"group {row.group_hash}" for row in block.itertuples()] + [f"run {row.run_hash}"
                                                                             for row in lost.itertuples()]
        table.add_panel(rf"\emph{{{knob('compress_every', compress_every)}}}", rows, notes)
    return table.render()


def _quant_label(row) -> str:
    kv = escape(row.kv_quant) if row.kv_quant == "none" or row.kv_quant_sinks == "full" else \
        f"{escape(row.kv_quant)}, sinks quantized"
    return f"KV {kv}; weights {escape(row.weight_quant)}"


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


# --- completeness ---------------------------------------------------------------------------------------------------
def check_complete(con: duckdb.DuckDBPyConnection, grid: str, include_stale: bool) -> None:
    """Raise ExportError listing every missing experiment, run, baseline or sweep value."""
    present = set(queries.experiment_names(con, grid))
    problems = [f"experiment {name}: not in grid {grid} (needed for {need})"
                for name, need in REQUIRED.items() if name not in present]
    needed = [name for name in (*REQUIRED, SPECULATIVE) if name in present]
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
    for name in needed:
        if name == SPECULATIVE:
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


# --- reading --------------------------------------------------------------------------------------------------------
def gather(con: duckdb.DuckDBPyConnection, grid: str, include_stale: bool) -> Gathered:
    experiments = {name: queries.setting_table(con, grid, [name], include_stale) for name in REQUIRED}
    main = experiments[MAIN]
    streaming = main[main.method == "streaming"].sort_values("compress_every")
    profile = queries.cost_profile(con, grid, list(streaming.timing_group_hash), include_stale)
    labels = {row.setting_hash: row_label(row, ["compress_every"]) for row in main.itertuples()}
    runs = [hashes[0] for hashes in streaming.run_hashes]
    steps = queries.step_range(con, runs)
    window = figures.sawtooth_window(steps, int(streaming.compress_every.max()), int(streaming.cap.max()))
    kv_series = queries.token_series(con, runs, window, points=window.last - window.first + 1, rolling=1)
    kv_series["label"] = kv_series.run_hash.map(
        {hashes[0]: f"{labels[setting]}, repeat 0 of n={n}"
         for hashes, setting, n in zip(streaming.run_hashes, streaming.setting_hash, streaming.n_repeats, strict=True)})
    pooled_runs = [run for hashes in streaming.run_hashes for run in hashes]
    series = [labels[setting] for hashes, setting in zip(streaming.run_hashes, streaming.setting_hash, strict=True)
              for _ in hashes]
    spikes = queries.spike_profile(con, pooled_runs, series=series, radius=figures.SPIKE_RADIUS)
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
    speculation = queries.speculation_table(con, grid, [SPECULATIVE], include_stale) \
        if SPECULATIVE in queries.experiment_names(con, grid) else None
    return Gathered(grid, experiments, all_groups, profile, kv_series, spikes, long_stream_blocks(con, experiments),
                    speculation)


def long_stream_blocks(con: duckdb.DuckDBPyConnection, experiments: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """PPL per block of positions of one run per setting of the long-stream experiment (its first text sample)."""
    settings = experiments[LONG_STREAM]
    runs = {hashes[0]: row_label(row, ["sink", "compress_every"]) for hashes, row in
            zip(settings.run_hashes, settings.itertuples(), strict=True)}
    steps = queries.step_range(con, list(runs))
    block = 1024 if steps.last >= 16 * 1024 else max(16, (steps.last + 1) // 16)
    blocks = queries.block_ppl(con, list(runs), block)
    return blocks.assign(label=blocks.run_hash.map(runs), block=block)


# --- row labels -----------------------------------------------------------------------------------------------------
def method_name(row) -> str:
    if row.method == "streaming":
        return "Strict" if row.compress_every == 1 else "Lazy"
    return {"recompute": "Recompute", "dense": "Dense"}.get(row.method, escape(row.method))


def row_label(row, knobs: list[str]) -> str:
    """'Lazy ($R{=}64$, slack{=}16)': the method, then the given knobs that apply to it."""
    shown = [k for k in knobs if row.method == "streaming" or (row.method == "recompute" and k == "cap")]
    if row.method == "recompute" and "cap" not in shown:
        shown.append("cap")
    parts = ", ".join(knob(k, getattr(row, k)) for k in shown)
    stale = STALE_MARK if row.stale else ""
    return f"{method_name(row)}{stale}" + (f" ({parts})" if parts else "")


def ladder_rung(row) -> int:
    """The ablation ladder: strict -> lazy -> + slack -> + slack + max_drop; -1 for anything else."""
    if row.method != "streaming":
        return -1
    if row.compress_every == 1:
        return 0 if row.slack == 0 and row.max_drop == 0 else -1
    if row.slack == 0:
        return 1 if row.max_drop == 0 else -1
    return 2 if row.max_drop == 0 else 3


def ladder_label(row) -> str:
    """'+ slack ($R{=}64$, slack{=}16)': the rung, then the knob values that make it."""
    if row.rung < 0:
        return row_label(row, ["compress_every", "slack", "max_drop"])
    knobs = ["compress_every", *[k for k in ("slack", "max_drop") if getattr(row, k)]]
    stale = STALE_MARK if row.stale else ""
    return f"{LADDER_RUNGS[row.rung]}{stale} ({', '.join(knob(k, getattr(row, k)) for k in knobs)})"


def _sorted(groups: pd.DataFrame) -> pd.DataFrame:
    order = groups.method.map(METHOD_ORDER).fillna(9)
    knobs = [k for k in queries.SETTING_KNOBS if k != "method" and k in groups]
    return groups.assign(_order=order).sort_values(["_order", *knobs]).drop(columns="_order")


def merge_equivalent(groups: pd.DataFrame) -> pd.DataFrame:
    """Settings of one table measured by the same runs (configurations that keep the same tokens at every step) as one
    row, at the place of the first: the numbers of the one with the most repeats and samples (it pools the most of the
    shared runs; the first among equals), `equivalents` the settings of the others ('' when none), `setting_hashes`
    all their hashes. One computation never shows as several results."""
    if groups.empty:
        return groups.assign(equivalents=pd.Series(dtype=str), setting_hashes=pd.Series(dtype=str))
    keys = list(zip(groups.run_groups, groups.code_version, strict=True))
    blocks: dict[tuple, list[int]] = {}
    for position, key in enumerate(keys):
        blocks.setdefault(key, []).append(position)
    kept, equivalents, hashes = [], [], []
    for positions in blocks.values():
        block = groups.iloc[positions]
        differing = [k for k in queries.KNOBS if k in block and block[k].astype(str).nunique() > 1]
        chosen = max(range(len(positions)), key=lambda i: (block.n_repeats.iloc[i], block.n_samples.iloc[i], -i))
        kept.append(positions[chosen])
        equivalents.append("; ".join(", ".join(knob(k, row[k]) for k in differing)
                                     for i, (_, row) in enumerate(block.iterrows()) if i != chosen))
        hashes.append(", ".join(block.setting_hash))
    return groups.iloc[kept].assign(equivalents=equivalents, setting_hashes=hashes)


def _equivalent(row) -> str:
    return f" {EQUIVALENT_MARK} {row.equivalents}" if row.equivalents else ""


# --- tables ---------------------------------------------------------------------------------------------------------
RESULT_COLUMNS = [("Method", "l"), ("TPOT (ms)", "r"), ("Speedup", "r"), ("PPL", "r"), (r"$\Delta$PPL (\%)", "r")]
N_COLUMNS = [("$n_r$", "r"), ("$n_t$", "r")]  # timing repeats, text samples


def result_cells(row) -> list[str]:
    """TPOT, speedup, PPL, ΔPPL: the cells every results table shares. ΔPPL is paired per text sample and says how
    many samples agree with its sign (k/n)."""
    what = f"setting {row.setting_hash}"
    if row.is_baseline:
        speedup, delta = r"\textit{ref.}", r"\textit{ref.}"
    else:
        speedup = f"${number(row.speedup, 2, what=f'speedup of {what}')}\\times$"
        delta = mean_std(row.delta_ppl_pct, row.delta_ppl_pct_std, row.n_pairs, 2, signed=True,
                         what=f"delta PPL of {what}")
        delta += f" ({int(row.agree)}/{int(row.n_pairs)})"
    return [mean_std(row.tpot_ms, row.tpot_ms_std, row.n_repeats, 2, what=f"TPOT of {what}"), speedup,
            mean_std(row.ppl, row.ppl_std, row.n_samples, 2, what=f"PPL of {what}"), delta]


def n_cells(row) -> list[str]:
    return [str(int(row.n_repeats)), str(int(row.n_samples))]


def _caption(text: str, groups: pd.DataFrame, merged: bool = False) -> str:
    devices = ", ".join(sorted({escape(d) for d in groups.device_name}))
    protocols = ", ".join(sorted({escape(p) for p in groups.quality_protocol}))
    stale = f" {STALE_MARK}: made by other evaluation code than the current one." if groups.stale.any() else ""
    strides = sorted({int(k) for k in groups.quality_stride.dropna() if k > 1}) if "quality_stride" in groups else []
    if strides:  # the baseline scored a subset of steps: its PPL is over those, everyone else's over every step
        stale += (f" The recompute baseline's PPL is over every {'/'.join(map(str, strides))}-th step only (a "
                  "cap-token forward each); every $\\Delta$PPL pairs a setting with it on those steps.")
    return (f"{text} TPOT: mean $\\pm$ std over the $n_r$ stepwise timing repeats of each setting; PPL: mean $\\pm$ "
            f"std over its $n_t$ text samples ({protocols} protocol); $\\Delta$PPL paired per sample with the "
            f"recompute baseline of the same tokens (in brackets: samples agreeing in sign); speedup relative to the "
            f"baseline's TPOT (same grid, text, cap and device: {devices}).{stale}"
            + (EQUIVALENT_NOTE if merged else ""))


def main_table(gathered: Gathered) -> str:
    groups = _sorted(gathered.experiments[MAIN])
    knobs = [k for k in queries.varying_knobs(groups) if k not in ("method", "compress_every") and k not in
             queries.CONTEXT]
    merged = merge_equivalent(groups)
    table = Table(columns=[*RESULT_COLUMNS, ("Peak mem. (MiB)", "r"), *N_COLUMNS], label="tab:main",
                  caption=_caption(f"Main results (grid {escape(gathered.grid)}).", groups,
                                   merged.equivalents.any()))
    for (dataset, device), block in merged.groupby(["dataset", "device_name"], sort=True):
        rows = [[row_label(row, ["compress_every", *knobs]) + _equivalent(row), *result_cells(row),
                 mean_std(row.peak_memory_mib, row.peak_memory_mib_std, row.n_repeats, 0,
                          what=f"peak memory of {row.setting_hash}"), *n_cells(row)] for row in block.itertuples()]
        table.add_panel(rf"\emph{{{escape(dataset)}}} ({escape(device)})", rows,
                        [f"setting {row.setting_hashes}" for row in block.itertuples()])
    return table.render()


def ladder_table(gathered: Gathered) -> str:
    groups = gathered.experiments[LADDER]
    groups = groups.assign(rung=[ladder_rung(row) for row in groups.itertuples()]).sort_values(
        ["rung", "compress_every", "slack", "max_drop"])
    merged = merge_equivalent(groups)
    # A wrapping label column: each rung names every knob value that makes it.
    table = Table(columns=[("Configuration", "p{4.4cm}"), *RESULT_COLUMNS[1:], ("Compactions", "r"), *N_COLUMNS],
                  label="tab:ablations", caption=_caption("Ablation ladder: strict $\\to$ lazy $\\to$ + slack $\\to$ "
                                                          "+ slack + max\\_drop.", groups,
                                                          merged.equivalents.any()))
    rows = [[ladder_label(row) + _equivalent(row), *result_cells(row),
             f"${number(row.compactions, 1, what='compactions')}$", *n_cells(row)] for row in merged.itertuples()]
    notes = [f"setting {row.setting_hashes}" for row in merged.itertuples()]
    table.add_panel(None, rows, notes)
    return table.render()


def sweeps_table(gathered: Gathered) -> str:
    merged = {name: merge_equivalent(_sorted(gathered.experiments[name])) for name in SWEEPS}
    table = Table(columns=[("Value", "l"), *RESULT_COLUMNS[1:], *N_COLUMNS], label="tab:sweeps",
                  caption=_caption("Sweeps: one knob varied, the others held fixed.",
                                   pd.concat([gathered.experiments[name] for name in SWEEPS]),
                                   any(frame.equivalents.any() for frame in merged.values())))
    for name, (swept, title) in SWEEPS.items():
        groups = merged[name]
        others = [k for k in queries.varying_knobs(groups) if k not in ("method", swept)]
        fixed = [k for k in ("cap", "sink", "compress_every", "slack", "max_drop") if k != swept and k not in others]
        streaming = groups[groups.method == "streaming"]
        held = ", ".join(knob(k, streaming[k].iloc[0]) for k in fixed) if not streaming.empty else ""
        rows = [[row_label(row, [swept, *others]) + _equivalent(row), *result_cells(row), *n_cells(row)]
                for row in groups.itertuples()]
        notes = [f"setting {row.setting_hashes}" for row in groups.itertuples()]
        table.add_panel(rf"\emph{{{title}}} ({held})", rows, notes)
    return table.render()


def _speculative_problems(speculation: pd.DataFrame) -> list[str]:
    if speculation.empty:
        return [f"experiment {SPECULATIVE}: no generation runs (mode: generate)"]
    return [f"experiment {SPECULATIVE}: configuration {row.group_hash} ({row.spec}, k={row.num_draft}) has no "
            "spec none run with the same policy, prompt, device and code" for row in speculation.itertuples()
            if pd.isna(row.reference_hash)]


def speculative_table(gathered: Gathered) -> str:
    """Speculative decoding under each cache policy: tokens/s, speedup and identical output vs spec none."""
    rows_in = gathered.speculation
    devices = ", ".join(sorted({escape(d) for d in rows_in.device_name}))
    table = Table(
        columns=[("Policy", "l"), ("Spec", "l"), ("$k$", "r"), ("Tokens/s", "r"), ("Speedup", "r"),
                 ("Accept.", "r"), ("Mean acc. len.", "r"), ("Identical", "l"), ("$n$", "r")],
        label="tab:speculative",
        caption=("Speculative decoding over the cache policies (greedy, verified in one forward per block). Speedup: "
                 "tokens/s over spec none's under the same policy; mean accepted length: tokens per verification "
                 "forward; identical: the generated ids equal spec none's (from the stored hashes). Mean $\\pm$ std "
                 f"over the $n$ repeats ({devices})."))
    for policy, block in rows_in.groupby(rows_in.apply(_policy_name, axis=1), sort=False):
        rows, notes = [], []
        for row in block.itertuples():
            what = f"configuration {row.group_hash}"
            reference = row.spec == "none"
            rows.append([
                "", escape(row.spec), "--" if reference else str(row.num_draft),
                mean_std(row.tokens_per_s, row.tokens_per_s_std, row.n, 1, what=f"tokens/s of {what}"),
                r"\textit{ref.}" if reference else f"${number(row.speedup, 2, what=f'speedup of {what}')}\\times$",
                "--" if reference else f"${number(row.acceptance_rate, 2, what=f'acceptance of {what}')}$",
                f"${number(row.mean_accepted_length, 2, what=f'accepted length of {what}')}$",
                "yes" if bool(row.identical) else "no", str(row.n)])
            notes.append(f"group {row.group_hash}")
        rows[0][0] = policy
        table.add_panel(None, rows, notes)
    return table.render()


def _policy_name(row) -> str:
    if row.method != "streaming":
        return method_name(row)
    stale = STALE_MARK if row.stale else ""
    return f"{method_name(row)}{stale} ({knob('compress_every', row.compress_every)}, {knob('cap', row.cap)})"


def profile_table(gathered: Gathered) -> str:
    profile = gathered.profile
    table = Table(columns=[("Configuration", "l"), ("Compactions", "r"), ("Forward (ms)", "r"),
                           ("Compaction (ms)", "r"), ("Total (ms)", "r"), ("$n$", "r")], label="tab:profile",
                  caption="Cost per decoded token, strict vs lazy (timed steps; forward includes cache updates). Mean "
                          "$\\pm$ std over the $n$ repeats.")
    rows = [[row.label, mean_std(row.compactions, row.compactions_std, row.n, 1, what="compactions"),
             mean_std(row.forward_ms, row.forward_ms_std, row.n, 3, what="forward ms"),
             mean_std(row.compaction_ms, row.compaction_ms_std, row.n, 3, what="compaction ms"),
             mean_std(row.total_ms, row.total_ms_std, row.n, 3, what="total ms"), str(row.n)]
            for row in profile.itertuples()]
    table.add_panel(None, rows, [f"setting {row.setting_hash}" for row in profile.itertuples()])
    return table.render()
