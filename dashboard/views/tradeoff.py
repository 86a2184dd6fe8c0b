"""Trade-off: TPOT against PPL per configuration, coloured by method or a knob, baseline and Pareto frontier drawn.
Reads only."""

from __future__ import annotations

import streamlit as st

from dashboard import charts, data
from store.queries import varying_knobs


def render(source: data.Source) -> None:
    experiments = data.experiment_names(source.path, source.signature, source.grid)
    chosen = st.multiselect("experiments", experiments, default=experiments)
    groups = data.group_table(source.path, source.signature, source.grid, tuple(chosen), source.include_stale)
    groups = groups[groups.tpot_ms.notna()]  # parallel runs measure quality only: no TPOT to place them at
    if groups.empty:
        st.info(f"No finished runs in {', '.join(chosen) or 'no experiment'} of grid {source.grid} yet.")
        return
    options = ["method", *[k for k in varying_knobs(groups) if k != "method"]]
    colour = st.selectbox("colour by", options)
    x_metric = st.selectbox("x axis", charts.TRADEOFF_X, format_func=charts.METRIC_TITLES.get)
    st.altair_chart(charts.tradeoff(groups, colour, x_metric), width="stretch")
    st.caption("Mean over repeats; bars: ± one standard deviation where n > 1; cross: the recompute baseline; "
               "dashed step line: the Pareto frontier (no configuration is both faster and lower in PPL).")
    frontier = groups[groups.pareto][["label", "n", "tpot_ms", "tpot_ms_std", "ppl", "ppl_std", "speedup",
                                      "delta_ppl_pct", "context"]]
    st.markdown("**On the Pareto frontier**")
    st.dataframe(frontier.sort_values("tpot_ms"), hide_index=True, width="stretch")
