"""The paper's figures (PDF for LaTeX, PNG for a quick look) and figures.tex, drawn with matplotlib.

Plots only what export.gather read through store/queries.py (the kv_len curve is the measured one, never a formula);
it never queries the store itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from paper.latex import escape  # noqa: E402

if TYPE_CHECKING:
    from paper.gather import Gathered

SIZE = (6.0, 3.2)
STYLE = {"font.size": 9, "axes.grid": True, "grid.alpha": 0.3, "savefig.bbox": "tight", "pdf.fonttype": 42}


def write_all(gathered: Gathered, out: Path) -> list[Path]:
    with plt.rc_context(STYLE):
        written = _save(kv_len(gathered.kv_series), out / "kv_len")
        written += _save(tradeoff(gathered.all_groups), out / "tradeoff")
        written += _save(nll_compactions(gathered.spikes), out / "nll_compactions")
        written += _save(long_stream(gathered.long_stream), out / "long_stream")
    figures_tex = out / "figures.tex"
    figures_tex.write_text(figures_latex(gathered))
    return [*written, figures_tex]


def save(figure: plt.Figure, stem: Path) -> list[Path]:
    return _save(figure, stem)


def quantization(groups: pd.DataFrame) -> plt.Figure:
    """PPL against measured KV bytes per cached token, one line per policy (R) and weight quantization."""
    figure, axes = plt.subplots(figsize=SIZE)
    full_sinks = groups[(groups.kv_quant == "none") | (groups.kv_quant_sinks == "full")]
    for (compress_every, weight_quant), block in full_sinks.groupby(["compress_every", "weight_quant"], sort=True):
        block = block.sort_values("kv_bytes_per_token")
        axes.errorbar(block.kv_bytes_per_token, block.ppl, yerr=block.ppl_std.fillna(0), marker="o", markersize=4,
                      capsize=2, label=f"R={compress_every}, weights {weight_quant} (n_t={_n_range(block.n_samples)})")
    quantized_sinks = groups[(groups.kv_quant != "none") & (groups.kv_quant_sinks == "quantized")]
    for row in quantized_sinks.itertuples():
        axes.plot(row.kv_bytes_per_token, row.ppl, marker="x", color="black", linestyle="none")
    if not quantized_sinks.empty:
        axes.plot([], [], marker="x", color="black", linestyle="none", label="sinks quantized too")
    axes.set_xscale("log")
    axes.set(xlabel="KV bytes per cached token (measured, log scale)", ylabel="perplexity")
    axes.legend(fontsize=6)
    return figure


def needle(cells: pd.DataFrame) -> plt.Figure:
    """Accuracy against the tokens from the needle's start to the question, one series per setting with its Wilson 95 %
    interval, and the caches' spans as rules: the window W (dashed) and the most recent tokens held just before a
    compaction (dotted; W + R - 1). Points, not lines: no accuracy is measured between two depths. Series (a setting at
    a context length) are offset a few tokens apart so that equal points stay visible."""
    cells = cells[cells.distance.notna()]
    rows = (cells[["setting", "context_tokens"]].drop_duplicates().shape[0] + 3) // 2  # the legend's, two a row
    figure, axes = plt.subplots(figsize=(SIZE[0], SIZE[1] * 1.25 + 0.16 * rows))
    # A series is a setting at one context length: dense at 1,024 and at 12,288 tokens are two caches' stories.
    series = list(dict.fromkeys(zip(cells.setting, cells.context_tokens, strict=True)))
    several = {setting for setting, _ in series if sum(s == setting for s, _ in series) > 1}
    spread = 0.004 * float(cells.distance.max() + cells.needle_tokens.max())
    for index, (setting, tokens) in enumerate(series):
        block = cells[(cells.setting == setting) & (cells.context_tokens == tokens)].sort_values("distance")
        x = block.distance + block.needle_tokens + (index - (len(series) - 1) / 2) * spread
        errors = [block.accuracy - block.accuracy_low, block.accuracy_high - block.accuracy]
        name = f"{setting}, {int(tokens):,} tokens" if setting in several else setting
        axes.errorbar(x, block.accuracy, yerr=errors, marker="o", markersize=3.5, capsize=2, linestyle="none",
                      label=f"{name} (n={_n_range(block.trials)})")
    spans: dict[float, str] = {}
    rules = (("span_window", "--", "window W"), ("span_recent_max", ":", "W + R - 1 (before a cut)"))
    for column, style, what in rules:
        values = sorted(cells[column].dropna().unique())
        for value in values:
            axes.axvline(value, color="gray", linestyle=style, linewidth=0.8)
            spans.setdefault(float(value), str(int(value)))
        if values:
            axes.plot([], [], color="gray", linestyle=style, linewidth=0.8, label=what)
    for value, text in spans.items():  # one number per rule's position, however many caches share it
        axes.annotate(text, (value, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 2),
                      textcoords="offset points", fontsize=6, ha="center", va="bottom", color="gray")
    axes.set(xlabel="tokens from the needle's start to the question", ylabel="accuracy (Wilson 95 % interval)",
             ylim=(-0.05, 1.05))
    # Below the plot: inside it, the legend hid the points at accuracy 0.
    axes.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    figure.tight_layout()
    return figure


def _save(figure: plt.Figure, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".pdf"), stem.with_suffix(".png")]
    for path in paths:
        figure.savefig(path, dpi=200)
    plt.close(figure)
    return paths


def kv_len(series: pd.DataFrame) -> plt.Figure:
    """Measured kv_len per step of the first repeat of each streaming configuration."""
    figure, axes = plt.subplots(figsize=SIZE)
    for label, run in series.groupby("label", sort=False):
        axes.step(run.step, run.kv_len_max, where="post", label=_plain(label), linewidth=1)
    axes.set(xlabel="step", ylabel="kv_len (measured attention span)")
    axes.legend(loc="lower right", fontsize=7)
    return figure


def tradeoff(groups: pd.DataFrame) -> plt.Figure:
    """ΔPPL (paired per text sample with the recompute baseline; bars: its 95 % t interval over the samples) against
    TPOT (bars: ± std over repeats) per setting, the baseline at zero, the Pareto frontier dashed. Settings without a
    paired ΔPPL are not drawn (export.gather keeps only those measured as the main table)."""
    figure, axes = plt.subplots(figsize=SIZE)
    groups = groups[groups.delta_ppl_pct.notna()]
    axes.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
    for (method, compress_every), block in groups.groupby(["method", "compress_every"], sort=True):
        baseline = method == "recompute"
        name = f"streaming R={compress_every}" if method == "streaming" else method
        name = "recompute (baseline)" if baseline else name
        low = (block.delta_ppl_pct - block.delta_ppl_low).fillna(0.0)
        high = (block.delta_ppl_high - block.delta_ppl_pct).fillna(0.0)
        axes.errorbar(block.tpot_ms, block.delta_ppl_pct, xerr=block.tpot_ms_std.fillna(0), yerr=[low, high],
                      fmt="X" if baseline else "o", markersize=9 if baseline else 5, capsize=2, linestyle="none",
                      color="black" if baseline else None,
                      label=f"{name} (n_r={_n_range(block.n_repeats)}, n_t={_n_range(block.n_pairs)})")
    pareto = groups[groups.pareto.fillna(False).astype(bool)]
    for index, (_, frontier) in enumerate(pareto.groupby(["model", "dataset", "device_name"])):
        frontier = frontier.sort_values("tpot_ms")
        axes.step(frontier.tpot_ms, frontier.delta_ppl_pct, where="post", linestyle="--", color="grey", linewidth=1,
                  label="Pareto frontier" if index == 0 else None)
    axes.set_xscale("log")  # the recompute baseline is often an order of magnitude slower than the rest
    axes.set(xlabel="TPOT (ms / token, log scale)", ylabel="ΔPPL vs recompute (%, paired per text)",
             title="ΔPPL with its 95 % t interval over n_t texts; TPOT over n_r repeats")
    axes.legend(fontsize=6, ncols=2, loc="upper center", bbox_to_anchor=(0.5, -0.18))  # below: never over a bar
    return figure


def nll_compactions(spikes: pd.DataFrame) -> plt.Figure:
    """Mean NLL minus each run's median around compactions, ± std over events, events pooled over repeats."""
    figure, axes = plt.subplots(figsize=SIZE)
    for label, block in spikes.groupby("series", sort=False):
        std = block.nll_excess_std.fillna(0)
        line, = axes.plot(block.offset, block.nll_excess, marker=".", linewidth=1,
                          label=f"{_plain(label)} (n={int(block.runs.max())} runs, {int(block.events.max())} events)")
        axes.fill_between(block.offset, block.nll_excess - std, block.nll_excess + std, alpha=0.15,
                          color=line.get_color())
    axes.axvline(0, color="grey", linewidth=0.8)
    axes.set(xlabel="steps from compaction", ylabel="NLL − run median")
    axes.legend(fontsize=7)
    return figure


def long_stream(blocks: pd.DataFrame) -> plt.Figure:
    """PPL per block of positions along one long stream, one line per setting (log scale: dense can explode)."""
    figure, axes = plt.subplots(figsize=SIZE)
    for label, run in blocks.groupby("label", sort=True):
        axes.plot(run.block_start, run.ppl, marker=".", linewidth=1, label=_plain(label))
    axes.set_yscale("log")
    axes.set(xlabel=f"position (start of a block of {int(blocks.block.iloc[0])} tokens)",
             ylabel="perplexity of the block (log scale)")
    axes.legend(fontsize=7)
    return figure


def figures_latex(gathered: Gathered) -> str:
    grid = escape(gathered.grid)
    captions = {
        "kv_len": "Measured attention span (kv\\_len) per step: strict compaction keeps it at the cap, lazy pruning "
                  "lets it grow for $R$ steps and cuts it back (the sawtooth).",
        "tradeoff": "$\\Delta$PPL against TPOT for every timed setting of the grid measured as the main table: "
                    "$\\Delta$PPL is the mean over the $n_t$ text samples of the change paired per sample with "
                    "the recompute baseline (the cross, zero by definition), its bar the 95\\,\\% Student-$t$ "
                    "interval over the samples (an effect is resolved only where the bar excludes zero); TPOT mean "
                    "$\\pm$ std over $n_r$ stepwise repeats; the dashed line is the Pareto frontier.",
        "nll_compactions": "NLL around compaction events (minus each run's median), mean $\\pm$ std over events "
                           "pooled over the repeats; $n$ in the legend.",
        "long_stream": "Perplexity per block of positions along one long stream: dense attention past the model's "
                       "trained length against streaming (sinks + window, strict and lazy) and window attention "
                       "without sinks.",
    }
    blocks = [
        "\n".join([r"\begin{figure}[t]", r"\centering", rf"\includegraphics[width=\linewidth]{{{name}}}",
                   rf"\caption{{{caption} Grid {grid}.}}", rf"\label{{fig:{name.replace('_', '-')}}}",
                   r"\end{figure}"])
        for name, caption in captions.items()
    ]
    return "\n\n".join(blocks) + "\n"


def _n_range(n: pd.Series) -> str:
    low, high = int(n.min()), int(n.max())
    return str(low) if low == high else f"{low}–{high}"


def _plain(label: str) -> str:
    """A LaTeX row label as plain text for a matplotlib legend."""
    return label.replace("{=}", "=").replace("$", "").replace("\\_", "_").replace("^\\dagger", "†")
