"""Sweeps: a metric against one knob's values with the other knobs held fixed, mean ± std over repeats. Reads only."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import charts, data
from store.queries import varying_knobs

METRICS = ["tpot_ms", "ppl", "delta_ppl_pct", "speedup", "peak_memory_mib", "compactions", "kv_len_max"]


def render(source: data.Source) -> None:
    experiments = data.experiment_names(source.path, source.signature, source.grid)
    columns = st.columns(3)
    experiment = columns[0].selectbox("experiment", experiments, index=_default_experiment(experiments))
    groups = data.group_table(source.path, source.signature, source.grid, (experiment,), source.include_stale)
    knobs = [k for k in varying_knobs(groups) if k != "method"]
    if groups.empty or not knobs:
        st.info(f"Experiment {experiment} has no knob with several finished values to sweep; pick another.")
        return
    knob = columns[1].selectbox("knob", knobs)
    metric = columns[2].selectbox("metric", METRICS, format_func=lambda m: charts.METRIC_TITLES.get(m, m))
    others = [k for k in knobs if k != knob]
    frame = groups.assign(series=_series(groups, ["method", *others])).sort_values(knob)
    series = sorted(frame.series.unique())
    if len(series) > 1:
        held = st.multiselect("held fixed at", series, default=series)
        frame = frame[frame.series.isin(held)]
    st.altair_chart(charts.sweep(frame, knob, metric, "series"), width="stretch")
    st.caption("Each point: the mean over the configuration's repeats (n in the table); bars: ± one standard "
               "deviation where the store holds a spread (TPOT, PPL, memory).")
    std = charts.METRIC_STD.get(metric)
    shown = [knob, "series", metric, *([std] if std else []), "n", "label", "group_hash"]
    st.dataframe(frame[shown], hide_index=True, width="stretch")


def _default_experiment(experiments: list[str]) -> int:
    for index, name in enumerate(experiments):
        if "sweep" in name:
            return index
    return 0


def _series(groups: pd.DataFrame, others: list[str]) -> pd.Series:
    """What a line holds fixed, as text ('method=streaming, slack=0')."""
    present = [k for k in others if k in groups]
    return groups[present].astype(str).apply(lambda row: ", ".join(f"{k}={v}" for k, v in row.items()), axis=1)
