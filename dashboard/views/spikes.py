"""Compaction spikes: NLL and latency aligned on compaction events (mean over events, ± std), with each run's peak,
area above its median and width. Reads only."""

from __future__ import annotations

import streamlit as st

from dashboard import charts, data

METRIC_COLUMNS = [
    "label", "events", "latency_ms_peak_excess", "latency_ms_peak_offset", "latency_ms_area", "latency_ms_width",
    "nll_peak_excess", "nll_peak_offset", "nll_area", "nll_width", "series",
]


def render(source: data.Source) -> None:
    runs = data.run_table(source.path, source.signature, source.grid, source.include_stale)
    runs = runs[(runs.status == "done") & (runs.compaction_count > 0)]
    runs = runs.drop_duplicates("run_hash")  # one entry per run: its label names the equivalent configurations
    if runs.empty:
        st.info(f"Grid {source.grid} has no finished run with compactions yet.")
        return
    labels = dict(zip(runs.run_hash, runs.label, strict=True))
    # Timed (stepwise) runs first: only they have a latency per step to align.
    timed_first = runs.assign(_timed=runs.protocol == "stepwise").sort_values("_timed", ascending=False, kind="stable")
    default = list(timed_first.drop_duplicates(subset=["compress_every", "slack", "max_drop"]).run_hash[:4])
    columns = st.columns([3, 1])
    chosen = columns[0].multiselect("runs", list(labels), default=default, format_func=labels.get)
    radius = int(columns[1].slider("steps either side", 2, 64, 16))
    if not chosen:
        st.info("Pick one or more runs that compact.")
        return
    profile, metrics = data.spikes(source.path, source.signature, tuple(chosen), radius)
    if profile.empty:
        st.info(f"No compaction of these runs has {radius} timed steps on both sides: lower the steps either side.")
        return
    profile = profile.assign(label=profile.series.map(labels))
    st.altair_chart(charts.spike(profile, "latency_ms", "latency (ms)"), width="stretch")
    st.altair_chart(charts.spike(profile, "nll", "NLL"), width="stretch")
    st.caption("Offset 0 is the step whose latency includes the compaction. Excess: the mean minus the run's median "
               "over all its timed steps. Peak excess: the highest excess; area: the sum of the positive excess over "
               "the window (unit x steps); width: steps at or above half the peak excess. At most 2,000 evenly "
               "spaced events per run.")
    st.dataframe(metrics.assign(label=metrics.series.map(labels))[METRIC_COLUMNS], hide_index=True,
                 width="stretch")
