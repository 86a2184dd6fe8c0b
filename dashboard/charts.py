"""Altair charts of the dashboard, built from the query layer's DataFrames.

Pure functions (DataFrame in, chart out): they never query the store, and never compute a number the store did not
give (aggregation and downsampling already happened in SQL).
"""

from __future__ import annotations

import altair as alt
import pandas as pd

HEIGHT = 260
PANEL_WIDTH = 820
SCHEME = alt.Scale(scheme="tableau10")
# Below the panels of a concatenated chart; beside a single chart, where Streamlit's sizing would squash the plot
# to make room for a legend below it.
RUN_LEGEND = alt.Legend(orient="bottom", columns=2, labelLimit=520, title=None)
SIDE_LEGEND = alt.Legend(labelLimit=360, title=None)
METRIC_TITLES = {
    "tpot_ms": "TPOT (ms / token)",
    "ppl": "perplexity",
    "delta_ppl_pct": "ΔPPL vs recompute (%, paired per text)",
    "delta_float_pct": "ΔPPL vs float (%, paired per text)",
    "speedup": "speedup vs recompute (x)",
    "tpot_ratio": "TPOT over the float setting's (x)",
    "peak_memory_mib": "peak memory (MiB)",
    "compactions": "compactions per run",
    "kv_len_max": "largest kv_len",
    "kv_bytes_per_token": "KV bytes per cached token",
    "total_bytes": "KV cache peak + weights (bytes)",
    "compact_ratio": "TPOT over the compact eager setting's (x)",
    "compile_s": "compile time (s, first compiled step)",
}
TRADEOFF_X = ("tpot_ms", "kv_bytes_per_token", "total_bytes")  # what the trade-off view can put on its x axis
# Per metric, the columns of setting_table that bound its bar: (low, high) directly, or a std to put either side.
METRIC_BOUNDS: dict[str, tuple[str, str] | str] = {
    "delta_ppl_pct": ("delta_ppl_low", "delta_ppl_high"),
    "delta_float_pct": ("delta_float_low", "delta_float_high"),
    "ppl": "ppl_std",
    "tpot_ms": "tpot_ms_std",
    "peak_memory_mib": "peak_memory_mib_std",
    "compile_s": "compile_s_std",
}
BOUNDS_CAPTION = {
    "delta_ppl_pct": "Each point: the mean over text samples of the ΔPPL paired per sample with the recompute baseline "
                     "(on the steps both scored); bars: its 95 % Student-t interval over the samples "
                     "(t_0.975,n-1 · std / √n). An interval that excludes zero is a resolved effect.",
    "delta_float_pct": "Each point: the mean over text samples of the ΔPPL paired per sample with the same setting in "
                       "float (kv_quant and weight_quant none) on the same tokens; bars: its 95 % Student-t interval "
                       "over the samples (none with one sample).",
    "ppl": "Each point: the mean PPL over text samples; bars: ± one standard deviation between samples (the texts "
           "differ more than the settings do: compare ΔPPL, paired per text).",
    "tpot_ms": "Each point: the mean TPOT over stepwise timing repeats; bars: ± one standard deviation.",
    "peak_memory_mib": "Each point: the mean over timing repeats; bars: ± one standard deviation.",
    "compile_s": "Each point: the mean over timing repeats of the first compiled step's wall time (a warmup step, "
                 "never in TPOT); bars: ± one standard deviation.",
    "speedup": "Each point: the recompute baseline's mean TPOT on the same tokens over the setting's, the baseline run "
               "with the same compile (compiled against compiled: a compiled setting over the compiled recompute, an "
               "eager one over the eager; no point without one).",
}


def bounds_columns(metric: str) -> list[str]:
    bounds = METRIC_BOUNDS.get(metric)
    return list(bounds) if isinstance(bounds, tuple) else [bounds] if bounds else []


def _with_bounds(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """`{metric}_low` and `{metric}_high`: the bar of each point (the point itself where none is stored)."""
    bounds = METRIC_BOUNDS.get(metric)
    if isinstance(bounds, tuple):
        low, high = frame[bounds[0]].fillna(frame[metric]), frame[bounds[1]].fillna(frame[metric])
    else:
        spread = frame[bounds].fillna(0.0) if bounds in frame else 0.0
        low, high = frame[metric] - spread, frame[metric] + spread
    return frame.assign(**{f"{metric}_low": low, f"{metric}_high": high})


# What a trade-off's ΔPPL is relative to: the column, its interval's prefix, its pair count, and the reference's role.
TRADEOFF_REFERENCES = {
    "recompute": ("delta_ppl_pct", "delta_ppl", "n_pairs", "recompute baseline"),
    "float": ("delta_float_pct", "delta_float", "n_float_pairs", "float reference"),
}


def tradeoff_frame(settings: pd.DataFrame, reference: str = "recompute") -> pd.DataFrame:
    """The settings a trade-off against `reference` (TRADEOFF_REFERENCES) draws, `is_reference` marking the reference
    points (ΔPPL 0 by definition): against recompute, every setting with a paired ΔPPL; against float, the quantized
    settings and the float settings of the same policies (policy_key)."""
    column, _, _, _ = TRADEOFF_REFERENCES[reference]
    if reference == "recompute":
        return settings[settings[column].notna()].assign(is_reference=settings["is_baseline"])
    quantized = settings[settings[column].notna()]
    floats = settings[(settings.kv_quant == "none") & (settings.weight_quant == "none")
                      & settings.policy_key.isin(quantized.policy_key)]
    floats = floats.assign(**{column: 0.0, "delta_float_low": 0.0, "delta_float_high": 0.0})
    return pd.concat([quantized.assign(is_reference=False), floats.assign(is_reference=True)])


def tradeoff(settings: pd.DataFrame, colour: str, x_metric: str = "tpot_ms", reference: str = "recompute"
             ) -> alt.LayerChart:
    """ΔPPL against `reference` (paired per text sample, bars: its 95 % t interval) against TPOT (bars: ± std over
    repeats) or the bytes of `x_metric` (TRADEOFF_X), one point per setting of tradeoff_frame, coloured by `colour`;
    the reference (ΔPPL 0) a large cross, zero a grey rule and, on the TPOT axis against recompute, the Pareto frontier
    a dashed step line. Settings without the x value are not drawn (the view lists them)."""
    column, prefix, count, role = TRADEOFF_REFERENCES[reference]
    frame = tradeoff_frame(settings, reference)
    frame = frame[frame[x_metric].notna()]
    frontier_shown = x_metric == "tpot_ms" and reference == "recompute"
    frame = frame.assign(x=frame[x_metric], x_std=frame["tpot_ms_std"] if x_metric == "tpot_ms" else float("nan"),
                         pareto=frame["pareto"].fillna(False).astype(bool) & frontier_shown,
                         frontier=frame["context"] + " / cap " + frame["cap"].astype(str) + " / weights "
                         + frame["weight_quant"].astype(str))
    frame = frame.assign(x_low=frame.x - frame.x_std.fillna(0.0), x_high=frame.x + frame.x_std.fillna(0.0),
                         y_low=frame[f"{prefix}_low"].fillna(frame[column]),
                         y_high=frame[f"{prefix}_high"].fillna(frame[column]), pairs=frame[count])
    frame = frame.assign(colour=frame[colour].astype(str), role=frame["is_reference"].map({True: role,
                                                                                           False: "setting"}))
    x = alt.X("x:Q", title=METRIC_TITLES[x_metric] + " (log scale)", scale=alt.Scale(type="log"))
    title = "ΔPPL vs recompute (%, paired per text)" if reference == "recompute" else \
        "ΔPPL vs the same policy in float (%, paired per text)"
    y = alt.Y(f"{column}:Q", title=title + ", 95 % interval")
    tooltip = ["label:N", alt.Tooltip("x:Q", title=x_metric, format=".4g"),
               alt.Tooltip("tpot_ms_std:Q", format=".3f"), "n_repeats:Q",
               alt.Tooltip(f"{column}:Q", format="+.3f"), alt.Tooltip("y_low:Q", title="95 % low", format="+.3f"),
               alt.Tooltip("y_high:Q", title="95 % high", format="+.3f"), alt.Tooltip("pairs:Q", title="samples"),
               alt.Tooltip("ppl:Q", format=".4f"), "ppl_steps:N",
               alt.Tooltip("speedup:Q", title="speedup (vs recompute, same compile)", format=".2f")]
    base = alt.Chart(frame)
    points = base.mark_point(filled=True, size=80).encode(
        x=x, y=y, color=alt.Color("colour:N", title=colour, scale=SCHEME, legend=SIDE_LEGEND),
        shape=alt.Shape("role:N", title=None, scale=alt.Scale(domain=["setting", role], range=["circle", "cross"])),
        size=alt.condition("datum.is_reference", alt.value(300), alt.value(80)), tooltip=tooltip,
    )
    x_bars = base.transform_filter("datum.n_repeats > 1").mark_rule().encode(
        x="x_low:Q", x2="x_high:Q", y=f"{column}:Q", color="colour:N")
    y_bars = base.transform_filter("datum.pairs > 1").mark_rule().encode(
        x="x:Q", y="y_low:Q", y2="y_high:Q", color="colour:N")
    zero = alt.Chart(pd.DataFrame({"zero": [0.0]})).mark_rule(color="grey", strokeDash=[2, 2]).encode(y="zero:Q")
    frontier = base.transform_filter("datum.pareto").mark_line(
        interpolate="step-after", color="black", strokeDash=[4, 3], point=False
    ).encode(x="x:Q", y=f"{column}:Q", order="x:Q", detail="frontier:N")
    return alt.layer(zero, frontier, x_bars, y_bars, points).properties(height=HEIGHT + 140)


def sweep(frame: pd.DataFrame, knob: str, metric: str, series: str) -> alt.LayerChart:
    """`metric` against `knob`, one line per series, bars from METRIC_BOUNDS where the store gives a spread."""
    frame = _with_bounds(frame, metric)
    numeric = pd.api.types.is_numeric_dtype(frame[knob])
    scale = alt.Scale(zero=False) if numeric else alt.Undefined
    x = alt.X(f"{knob}:{'Q' if numeric else 'N'}", title=knob, scale=scale)
    y = alt.Y(f"{metric}:Q", title=METRIC_TITLES.get(metric, metric), scale=alt.Scale(zero=False))
    base = alt.Chart(frame).encode(x=x, color=alt.Color(f"{series}:N", title="held fixed", scale=SCHEME,
                                                         legend=SIDE_LEGEND))
    tooltip = [f"{knob}", alt.Tooltip(f"{metric}:Q", format=".4g"), alt.Tooltip(f"{metric}_low:Q", format=".4g"),
               alt.Tooltip(f"{metric}_high:Q", format=".4g"), f"{series}:N", "label:N"]
    line = base.mark_line(point=True).encode(y=y, tooltip=tooltip)
    bars = base.mark_errorbar(ticks=True).encode(
        y=alt.Y(f"{metric}_low:Q", title=METRIC_TITLES.get(metric, metric)), y2=f"{metric}_high:Q")
    layers = [bars, line]
    if metric == "delta_ppl_pct":
        layers.insert(0, alt.Chart(pd.DataFrame({"zero": [0.0]})).mark_rule(color="grey", strokeDash=[2, 2]).encode(
            y="zero:Q"))
    return alt.layer(*layers).properties(height=HEIGHT + 60)


def token_curves(series: pd.DataFrame, marks: pd.DataFrame, step_domain: tuple[int, int]) -> alt.VConcatChart:
    """Per-token panels on one shared step axis, in one chart (one Vega view draws faster than three): rolling NLL,
    latency per step with compactions marked, measured kv_len (a band from the smallest to the largest kv_len of each
    bucket: the exact sawtooth when a bucket is one step)."""
    x = alt.X("step:Q", title="step", scale=alt.Scale(domain=list(step_domain), nice=False))
    colour = alt.Color("label:N", scale=SCHEME, legend=RUN_LEGEND)
    base = alt.Chart(series).encode(x=x, color=colour)
    panel = {"height": HEIGHT - 40, "width": PANEL_WIDTH}
    nll = base.mark_line().encode(
        y=alt.Y("nll_rolling:Q", title="rolling NLL", scale=alt.Scale(zero=False)),
        tooltip=["label:N", "step:Q", alt.Tooltip("nll_rolling:Q", format=".4f")],
    ).properties(title="rolling NLL", **panel)
    latency_line = base.mark_line(strokeWidth=1).encode(
        y=alt.Y("latency_ms:Q", title="latency (ms / step)"),
        tooltip=["label:N", "step:Q", alt.Tooltip("latency_ms:Q", format=".3f"),
                 alt.Tooltip("latency_ms_max:Q", format=".3f"), "compactions:Q"],
    )
    compaction_rules = alt.Chart(marks).mark_rule(opacity=0.35, strokeDash=[2, 2]).encode(
        x=x, color=colour, tooltip=["label:N", "step:Q", "events:Q", "evicted:Q"])
    latency = alt.layer(compaction_rules, latency_line).properties(
        title="latency per step (dashed: compactions)", **panel)
    kv_band = base.mark_area(opacity=0.3).encode(y=alt.Y("kv_len_min:Q", title="kv_len (measured)"), y2="kv_len_max:Q")
    kv_line = base.mark_line(strokeWidth=1).encode(
        y="kv_len_max:Q", tooltip=["label:N", "step:Q", "kv_len_min:Q", "kv_len_max:Q"])
    kv_len = alt.layer(kv_band, kv_line).properties(title="kv_len (attention span per step)", **panel)
    return alt.vconcat(nll, latency, kv_len).resolve_scale(color="shared")


def spike(profile: pd.DataFrame, metric: str, title: str) -> alt.LayerChart:
    """Mean excess of `metric` over each run's median around compactions (offset 0: the compaction's step), band ± std
    over events."""
    excess, std = profile[f"{metric}_excess"], profile[f"{metric}_excess_std"].fillna(0.0)
    frame = profile.assign(excess=excess, low=excess - std, high=excess + std)
    radius = int(profile["offset"].abs().max())
    x = alt.X("offset:Q", title="steps from compaction", scale=alt.Scale(domain=[-radius, radius], nice=False))
    base = alt.Chart(frame).encode(x=x, color=alt.Color("label:N", scale=SCHEME, legend=SIDE_LEGEND))
    band = base.mark_area(opacity=0.15).encode(y=alt.Y("low:Q", title=f"{title} − run median"), y2="high:Q")
    line = base.mark_line(point=True).encode(
        y="excess:Q", tooltip=["label:N", "offset:Q", alt.Tooltip("excess:Q", format=".4g"), "events:Q"])
    zero = alt.Chart(pd.DataFrame({"offset": [0]})).mark_rule(color="grey").encode(x="offset:Q")
    return alt.layer(band, line, zero).properties(height=HEIGHT, title=f"{title} around compactions")
