"""Sweeps: a setting's numbers against the knob its experiment sweeps, the other knobs held fixed: ΔPPL paired per
text sample with its 95 % interval, PPL and TPOT with their spread. Reads only."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import charts, data
from store.queries import SETTING_KNOBS, sweep_knob

METRICS = ["delta_ppl_pct", "delta_float_pct", "ppl", "tpot_ms", "speedup", "tpot_ratio", "compact_ratio",
           "compile_s", "peak_memory_mib", "compactions", "kv_len_max"]
# Over text samples; every other metric is over the timing repeats.
COUNTS = {"delta_ppl_pct": "n_pairs", "delta_float_pct": "n_float_pairs", "ppl": "n_samples"}


def render(source: data.Source) -> None:
    experiments = data.experiment_names(source.path, source.signature, source.grid)
    columns = st.columns(3)
    experiment = columns[0].selectbox("experiment", experiments, index=_default_experiment(experiments))
    settings = data.setting_table(source.path, source.signature, source.grid, (experiment,), source.include_stale)
    knobs = [k for k in SETTING_KNOBS if k != "method" and k in settings and settings[k].astype(str).nunique() > 1]
    if settings.empty or not knobs:
        st.info(f"Experiment {experiment} has no knob with several finished values to sweep; pick another.")
        return
    swept = sweep_knob(data.declared_sweep(source.path, source.signature, source.grid, experiment), experiment,
                       settings)
    knob = columns[1].selectbox("knob", knobs, index=knobs.index(swept) if swept in knobs else 0,
                                help="the experiment's own knob first; measurement knobs (sample, protocol, "
                                     "max_tokens) are never swept: they are how a setting is measured")
    # The paired ΔPPL first: against recompute where there is one, against float for a quantization experiment.
    present = [m for m in METRICS if settings[m].notna().any()] or METRICS
    metric = columns[2].selectbox("metric", present, format_func=lambda m: charts.METRIC_TITLES.get(m, m))
    others = [k for k in knobs if k != knob]
    frame = settings.assign(series=_series(settings, ["method", *others])).sort_values(knob)
    frame = frame[frame[metric].notna()]
    if frame.empty:
        st.info(f"No setting of {experiment} has a {charts.METRIC_TITLES.get(metric, metric)}: a ΔPPL needs a "
                "recompute baseline on the same tokens, a TPOT a stepwise run.")
        return
    series = sorted(frame.series.unique())
    if len(series) > 1:
        held = st.multiselect("held fixed at", series, default=series)
        frame = frame[frame.series.isin(held)]
    st.altair_chart(charts.sweep(frame, knob, metric, "series"), width="stretch")
    st.caption(charts.BOUNDS_CAPTION.get(metric, "Each point: the setting's value; no spread is stored for it."))
    bounds = [c for c in charts.bounds_columns(metric) if c in frame]
    shown = [knob, "series", metric, *bounds, COUNTS.get(metric, "n_repeats"), "measurement", "label", "setting_hash"]
    st.dataframe(frame[shown], hide_index=True, width="stretch")


def _default_experiment(experiments: list[str]) -> int:
    for index, name in enumerate(experiments):
        if "sweep" in name:
            return index
    return 0


def _series(settings: pd.DataFrame, others: list[str]) -> pd.Series:
    """What a line holds fixed, as text ('method=streaming, slack=0')."""
    present = [k for k in others if k in settings]
    return settings[present].astype(str).apply(lambda row: ", ".join(f"{k}={v}" for k, v in row.items()), axis=1)
