"""Runs: status counts per experiment and a sortable, filterable table of run summaries, one row per configuration,
equivalent configurations (one shared run) marked. Reads only."""

from __future__ import annotations

import streamlit as st

from dashboard import data
from store.queries import KNOBS

NUMBER_FORMATS = {"ppl": "%.4f", "tpot_ms_mean": "%.3f", "peak_memory_mib": "%.1f", "compile_s": "%.1f"}
# Knobs with a filter of their own beside experiment, method and status: the cache's storage and the compiled step.
FILTERED_KNOBS = ("layout", "compile")


def render(source: data.Source) -> None:
    totals = data.grid_totals(source.path, source.signature, source.grid)
    st.subheader(f"Grid {source.grid}")
    for column, (name, value) in zip(st.columns(len(totals)), totals.items(), strict=True):
        column.metric(name, value)
    counts = data.status_counts(source.path, source.signature, source.grid)
    with st.expander("Every grid in this store"):
        st.dataframe(data.grid_overview(source.path, source.signature), hide_index=True, width="stretch")
    st.dataframe(counts.drop(columns="grid"), hide_index=True, width="stretch")

    runs = data.run_table(source.path, source.signature, source.grid, source.include_stale)
    filters = st.columns(4 + len(FILTERED_KNOBS))
    experiments = filters[0].multiselect("experiment", sorted({e for row in runs.experiments for e in row.split(", ")}))
    methods = filters[1].multiselect("method", sorted(runs.method.unique()))
    statuses = filters[2].multiselect("status", sorted(runs.status.unique()))
    knobs = {knob: column.multiselect(knob, sorted(runs[knob].dropna().unique()))
             for knob, column in zip(FILTERED_KNOBS, filters[3:], strict=False)}
    text = filters[-1].text_input("run hash or label contains")
    shown = runs
    if experiments:
        shown = shown[shown.experiments.apply(lambda value: bool(set(value.split(", ")) & set(experiments)))]
    if methods:
        shown = shown[shown.method.isin(methods)]
    if statuses:
        shown = shown[shown.status.isin(statuses)]
    for knob, values in knobs.items():
        if values:
            shown = shown[shown[knob].isin(values)]
    if text:
        shown = shown[shown.run_hash.str.contains(text, regex=False) | shown.label.str.contains(text, regex=False)]
    shared = runs[runs.sharing > 1]
    st.caption(f"{len(shown)} of {len(runs)} configurations ({runs.run_hash.nunique()} runs). Each row is one run's "
               "own measurement: PPL over the tokens it scored (its sample, protocol and max_tokens), TPOT over its "
               "timed steps (compile_s: a compiled run's first compiled step, a warmup step never in TPOT). A "
               "setting's ΔPPL and speedup pair its runs with the baseline's on the same tokens: see the Settings "
               "view. Click a column header to sort.")
    if not shared.empty:
        st.info(f"{len(shared)} configurations share {shared.run_hash.nunique()} runs with others: they keep the same "
                "tokens at every step (same schedule fingerprint), so each set was computed once and its rows show one "
                "result. Column 'equivalent to' lists the settings that share it; they are not independent results.")
    others = [k for k in KNOBS if k not in FILTERED_KNOBS]
    columns = ["label", "equivalent_to", "experiments", "status", "stale", "ppl", "tpot_ms_mean",
               "peak_memory_mib", "repeats", *FILTERED_KNOBS, "compile_s", *others, "compaction_count", "kv_len_max",
               "device_name",
               "run_hash", "config_hash", "group_hash", "code_version", "ended_at", "error"]
    config = {name: st.column_config.NumberColumn(format=fmt) for name, fmt in NUMBER_FORMATS.items()}
    config["equivalent_to"] = st.column_config.TextColumn("equivalent to", help="configurations that share this run")
    st.dataframe(shown[columns], hide_index=True, width="stretch", column_config=config)
