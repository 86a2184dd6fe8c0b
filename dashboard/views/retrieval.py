"""Retrieval: what the cache forgets (mode task). The needle heatmap (context length x depth, accuracy in colour) per
setting, accuracy against the needle's distance to the question with the cache's span drawn, and one cell's trials.
Reads only, through dashboard.data."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import data

FACET_COLUMNS = 4  # panels a row: six settings side by side ran off a 1,500-pixel page
TRIAL_SHOWN = ["trial", "answer", "expected", "score", "retained", "needle", "distance", "answer_nll", "kv_len",
               "instance_hash", "repeat"]


def render(source: data.Source) -> None:
    table = data.retrieval_table(source.path, source.signature, source.grid, source.include_stale)
    if table.empty:
        st.info(f"No finished retrieval task runs (mode: task) in grid {source.grid} yet.")
        return
    experiments = sorted({name for names in table.experiments for name in names})
    chosen = st.multiselect("experiments", experiments, default=experiments, key="retrieval_experiments")
    table = table[table.experiments.apply(lambda names: bool(set(names) & set(chosen)))]
    if table.empty:
        st.info("No task runs in the chosen experiments.")
        return
    # Dense first (the reference), then the caches, the quantized ones last; otherwise in the table's order.
    order = table.assign(_quantized=table.kv_quant.fillna("none") != "none", _cache=table.method != "dense")
    settings = list(dict.fromkeys(order.sort_values(["_cache", "_quantized"], kind="stable").setting))
    table = table.assign(needle_from=table.distance + table.needle_tokens,
                         depth_label=table.depth.map(lambda d: "file" if pd.isna(d) else f"{d:g}"))
    table = table.assign(cell_label=[f"{int(tokens)} tokens, depth {depth}" for tokens, depth
                                     in zip(table.context_tokens, table.depth_label, strict=True)])
    depths = table.depth_label.nunique()
    tooltip = ["setting", "task", "context_tokens", "depth_label", alt.Tooltip("accuracy:Q", format=".2f"),
               alt.Tooltip("accuracy_low:Q", format=".2f", title="95% low"),
               alt.Tooltip("accuracy_high:Q", format=".2f", title="95% high"), "trials",
               alt.Tooltip("answer_nll:Q", format=".3f"), alt.Tooltip("retained:Q", format=".1f"),
               alt.Tooltip("distance:Q", format=".0f")]
    st.subheader("Needle in a haystack")
    heat = alt.Chart(table).encode(
        x=alt.X("context_tokens:O", title="context tokens", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("depth_label:O", title="needle depth", sort="descending", axis=alt.Axis(labelOverlap=False)),
    )
    cells = heat.mark_rect().encode(
        color=alt.Color("accuracy:Q", scale=alt.Scale(domain=[0, 1], scheme="redyellowgreen"), title="accuracy"),
        tooltip=tooltip)
    labels = heat.mark_text(fontSize=11).encode(
        text=alt.Text("accuracy:Q", format=".0%"),
        # Readable on the scheme's dark ends (red at 0, green at 1), dark on its light middle.
        color=alt.condition("datum.accuracy < 0.25 || datum.accuracy > 0.8", alt.value("white"), alt.value("black")))
    # Long setting names (refresh, kv_quant) are cut at the panel's width rather than run into the next panel's.
    header = alt.Header(labelLimit=170)
    # Panels wrap (FACET_COLUMNS a row) and grow with the depths, so every depth keeps its label.
    heatmap = (alt.layer(cells, labels).properties(width=170, height=max(160, 22 * depths))
               .facet(facet=alt.Facet("setting:N", title=None, sort=settings, header=header),
                      columns=FACET_COLUMNS))
    st.altair_chart(heatmap, width="content")
    st.caption("Accuracy: the mean RULER score (string_match_all) of the greedy answers; the tooltip gives its Wilson "
               "95 % interval and n. Depth: the fraction of the haystack before the needle.")

    st.subheader("Accuracy against the needle's distance")
    base = alt.Chart(table).encode(x=alt.X("needle_from:Q", title="tokens, needle start to question"))
    # One panel may hold several context lengths (dense at 1,024 and at 12,288 tokens): told apart by colour.
    lengths = alt.Color("context_tokens:N", title="context tokens")
    points = base.mark_point(filled=True, size=50).encode(
        y=alt.Y("accuracy:Q", title="accuracy", scale=alt.Scale(domain=[0, 1])), color=lengths, shape="task:N",
        tooltip=tooltip)
    bars = base.mark_rule().encode(y="accuracy_low:Q", y2="accuracy_high:Q", color=lengths)
    window = base.mark_rule(strokeDash=[4, 3], color="gray").encode(x="span_window:Q")
    recent = base.mark_rule(strokeDash=[1, 3], color="gray").encode(x="span_recent_max:Q")
    distance = (alt.layer(bars, points, window, recent).properties(width=200, height=180)
                .facet(facet=alt.Facet("setting:N", title=None, sort=settings, header=alt.Header(labelLimit=200)),
                       columns=FACET_COLUMNS))
    st.altair_chart(distance, width="content")
    st.caption("Bars: Wilson 95 % intervals. Dashed rule: the window W (recent tokens a compaction keeps); dotted: the "
               "most recent tokens the cache holds just before a compaction (W + R - 1). A needle whose start lies "
               "left of the rule is held whole when the question starts; none for dense (no eviction).")

    st.subheader("Trials of one cell")
    left, right = st.columns(2)
    setting = left.selectbox("setting", settings, key="retrieval_setting")
    rows = table[table.setting == setting]
    # A cell is a configuration at a context length and depth: one setting may hold a depth at two lengths.
    cell_label = right.selectbox("context and depth", list(rows.cell_label), key="retrieval_depth")
    cell = rows[rows.cell_label == cell_label].iloc[0]
    depth_label = cell.depth_label
    depth = None if pd.isna(cell.depth) else float(cell.depth)
    trials = data.retrieval_trials(source.path, source.signature, source.grid, str(cell.group_hash), depth,
                                   source.include_stale)
    st.markdown(f"**{setting}**, {int(cell.context_tokens)} tokens, depth {depth_label}: {int(cell.correct):g} of "
                f"{int(cell.trials)} "
                f"(accuracy {cell.accuracy:.2f}, 95 % [{cell.accuracy_low:.2f}, {cell.accuracy_high:.2f}]), "
                f"mean answer NLL {cell.answer_nll:.3f}")
    trials = trials.assign(needle=[f"[{s}, {e})" if pd.notna(s) else "" for s, e
                                   in zip(trials.needle_start, trials.needle_end, strict=True)])
    st.dataframe(trials[TRIAL_SHOWN], hide_index=True, width="stretch")
    st.caption("The prompt's end is not stored: an instance is regenerated from its task, length, depth and seed, and "
               "checked against instance_hash.")
