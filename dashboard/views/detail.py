"""Run detail: per-token curves of one or several runs on one step axis (rolling NLL, latency with compactions marked,
the measured kv_len sawtooth), downsampled in SQL, and the chosen runs' knobs and summary. Reads only."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import charts, data
from store.queries import StepRange

# About one point per pixel of a wide chart: more only slows the browser down.
POINTS = 800
MARKS = 150
# The chosen runs' own numbers and knobs under the curves: how each was stored, compiled and measured.
SUMMARY = ["label", "method", "compress_every", "cap", "layout", "compile", "compile_s", "protocol", "tpot_ms_mean",
           "ppl", "compaction_count", "kv_len_max", "peak_memory_mib", "device_name", "run_hash"]


def render(source: data.Source) -> None:
    runs = data.run_table(source.path, source.signature, source.grid, source.include_stale)
    runs = runs[runs.status == "done"]
    runs = runs.drop_duplicates("run_hash")  # one entry per run: its label names the equivalent configurations
    if runs.empty:
        st.info(f"Grid {source.grid} has no finished run yet.")
        return
    labels = dict(zip(runs.run_hash, runs.label, strict=True))
    chosen = st.multiselect("runs", list(labels), default=default_runs(runs), format_func=labels.get)
    if not chosen:
        st.info("Pick one or more runs.")
        return
    full = data.step_range(source.path, source.signature, tuple(chosen))
    columns = st.columns([3, 1])
    first, last = columns[0].slider("steps", full.first, full.last, (full.first, full.last))
    rolling = int(columns[1].number_input("rolling NLL window (tokens)", min_value=1, max_value=4096, value=64))
    steps = StepRange(first, last)
    series, marks = data.token_series(source.path, source.signature, tuple(chosen), steps, rolling, POINTS, MARKS)
    series = series.assign(label=series.run_hash.map(labels))
    marks = marks.assign(label=marks.run_hash.map(labels)) if not marks.empty else marks.assign(label=pd.Series(
        dtype=str))
    st.altair_chart(charts.token_curves(series, marks, (first, last)), width="content")
    st.caption(f"At most {POINTS} points per run, each summarising {steps.stride(POINTS)} consecutive step(s) (mean "
               f"latency, smallest and largest kv_len), and at most {MARKS} compaction marks per run: narrow the step "
               "range to see single steps.")
    st.dataframe(runs.set_index("run_hash").loc[chosen].reset_index()[SUMMARY], hide_index=True, width="stretch",
                 column_config={"compile_s": st.column_config.NumberColumn(
                     "compile_s", format="%.1f", help="a compiled run's first compiled step (seconds): a warmup step, "
                     "never in TPOT"), "tpot_ms_mean": st.column_config.NumberColumn(format="%.3f")})


def default_runs(runs: pd.DataFrame, most: int = 3) -> list[str]:
    """A few runs that differ: the first run of each method and compaction interval, up to `most`; timed (stepwise)
    runs first, as only they have a latency per step, and among them the main experiment's (the study's comparison)."""
    main = runs.experiments.apply(lambda names: "main" in names.split(", "))
    ranked = runs.assign(_timed=runs.protocol == "stepwise", _main=main).sort_values(
        ["_timed", "_main"], ascending=False, kind="stable")
    distinct = ranked.drop_duplicates(subset=["method", "compress_every"])
    return list(distinct.run_hash[:most])
