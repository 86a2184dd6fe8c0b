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
    "delta_ppl_pct": "ΔPPL vs recompute (%)",
    "speedup": "speedup vs recompute (x)",
    "peak_memory_mib": "peak memory (MiB)",
    "compactions": "compactions per run",
    "kv_len_max": "largest kv_len",
    "kv_bytes_per_token": "KV bytes per cached token",
    "total_bytes": "KV cache peak + weights (bytes)",
}
TRADEOFF_X = ("tpot_ms", "kv_bytes_per_token", "total_bytes")  # what the trade-off view can put on its x axis
# The metrics whose spread over repeats the store gives (a ratio of means has none).
METRIC_STD = {"tpot_ms": "tpot_ms_std", "ppl": "ppl_std", "peak_memory_mib": "peak_memory_mib_std"}


def _with_bounds(frame: pd.DataFrame, value: str, std: str) -> pd.DataFrame:
    spread = frame[std].fillna(0.0) if std in frame else 0.0
    return frame.assign(**{f"{value}_low": frame[value] - spread, f"{value}_high": frame[value] + spread})


def tradeoff(groups: pd.DataFrame, colour: str, x_metric: str = "tpot_ms") -> alt.LayerChart:
    """TPOT (or bytes: `x_metric` of TRADEOFF_X) vs PPL, one point per configuration (mean over repeats, bars of ± std
    where n > 1), coloured by `colour`, the recompute baseline drawn as a large cross and, on the TPOT axis, the
    Pareto frontier (lower TPOT and PPL) as a step line. Configurations without a cache have no bytes: not drawn."""
    if x_metric != "tpot_ms":
        groups = groups[groups[x_metric].notna()].assign(tpot_ms=groups[x_metric], tpot_ms_std=float("nan"),
                                                         pareto=False)
    frame = _with_bounds(_with_bounds(groups, "tpot_ms", "tpot_ms_std"), "ppl", "ppl_std")
    frame = frame.assign(colour=frame[colour].astype(str), role=frame["is_baseline"].map(
        {True: "recompute baseline", False: "configuration"}))
    x = alt.X("tpot_ms:Q", title=METRIC_TITLES[x_metric], scale=alt.Scale(zero=False))
    y = alt.Y("ppl:Q", title=METRIC_TITLES["ppl"], scale=alt.Scale(zero=False))
    tooltip = ["label:N", "n:Q", alt.Tooltip("tpot_ms:Q", format=".3f"), alt.Tooltip("tpot_ms_std:Q", format=".3f"),
               alt.Tooltip("ppl:Q", format=".4f"), alt.Tooltip("ppl_std:Q", format=".4f"),
               alt.Tooltip("speedup:Q", format=".2f"), alt.Tooltip("delta_ppl_pct:Q", format=".3f")]
    base = alt.Chart(frame)
    points = base.mark_point(filled=True, size=80).encode(
        x=x, y=y, color=alt.Color("colour:N", title=colour, scale=SCHEME),
        shape=alt.Shape("role:N", title=None, scale=alt.Scale(domain=["configuration", "recompute baseline"],
                                                               range=["circle", "cross"])),
        size=alt.condition("datum.is_baseline", alt.value(300), alt.value(80)), tooltip=tooltip,
    )
    repeated = base.transform_filter("datum.n > 1")
    x_bars = repeated.mark_rule().encode(x="tpot_ms_low:Q", x2="tpot_ms_high:Q", y="ppl:Q", color="colour:N")
    y_bars = repeated.mark_rule().encode(x="tpot_ms:Q", y="ppl_low:Q", y2="ppl_high:Q", color="colour:N")
    frontier = base.transform_filter("datum.pareto").mark_line(
        interpolate="step-after", color="black", strokeDash=[4, 3], point=False
    ).encode(x="tpot_ms:Q", y="ppl:Q", order="tpot_ms:Q", detail="context:N")
    return alt.layer(frontier, x_bars, y_bars, points).properties(height=HEIGHT + 140)


def sweep(groups: pd.DataFrame, knob: str, metric: str, series: str) -> alt.LayerChart:
    """`metric` (mean, bars of ± std over repeats where the store has a spread) against `knob`, one line per series."""
    frame = _with_bounds(groups, metric, METRIC_STD.get(metric, "-"))
    numeric = pd.api.types.is_numeric_dtype(frame[knob])
    scale = alt.Scale(zero=False) if numeric else alt.Undefined
    x = alt.X(f"{knob}:{'Q' if numeric else 'N'}", title=knob, scale=scale)
    y = alt.Y(f"{metric}:Q", title=METRIC_TITLES.get(metric, metric), scale=alt.Scale(zero=False))
    base = alt.Chart(frame).encode(x=x, color=alt.Color(f"{series}:N", title="held fixed", scale=SCHEME,
                                                         legend=SIDE_LEGEND))
    tooltip = [f"{knob}", alt.Tooltip(f"{metric}:Q", format=".4g"), "n:Q", f"{series}:N"]
    line = base.mark_line(point=True).encode(y=y, tooltip=tooltip)
    bars = base.transform_filter("datum.n > 1").mark_errorbar(ticks=True).encode(
        y=alt.Y(f"{metric}_low:Q", title=METRIC_TITLES.get(metric, metric)), y2=f"{metric}_high:Q")
    return alt.layer(bars, line).properties(height=HEIGHT + 60)


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
