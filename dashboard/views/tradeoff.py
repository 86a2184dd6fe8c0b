"""Trade-off: per setting, ΔPPL paired per text sample (with its 95 % interval) against TPOT (or KV bytes), coloured
by method or a knob, the recompute baseline and the Pareto frontier drawn. Reads only."""

from __future__ import annotations

import streamlit as st

from dashboard import charts, data
from store.queries import SETTING_KNOBS

SHOWN = ["label", "tpot_ms", "tpot_ms_std", "n_repeats", "speedup", "delta_ppl_pct", "delta_ppl_low",
         "delta_ppl_high", "delta_ppl_resolved", "n_pairs", "ppl", "ppl_std", "n_samples", "setting_hash"]


def render(source: data.Source) -> None:
    experiments = data.experiment_names(source.path, source.signature, source.grid)
    chosen = st.multiselect("experiments", experiments, default=experiments)
    settings = data.setting_table(source.path, source.signature, source.grid, tuple(chosen), source.include_stale)
    if settings.empty:
        st.info(f"No finished runs in {', '.join(chosen) or 'no experiment'} of grid {source.grid} yet.")
        return
    columns = st.columns(3)
    # Like with like: one quality measurement (protocol, tokens, prefill) at a time, the most common first.
    measurements = list(settings.measurement.value_counts().index)
    measurement = columns[0].selectbox("quality measured by", measurements,
                                       help="ΔPPLs of settings measured on other tokens are not comparable")
    settings = settings[settings.measurement == measurement]
    knobs = [k for k in SETTING_KNOBS if k != "method" and k in settings and settings[k].astype(str).nunique() > 1]
    colour = columns[1].selectbox("colour by", ["method", *knobs])
    x_metric = columns[2].selectbox("x axis", charts.TRADEOFF_X, format_func=charts.METRIC_TITLES.get)
    drawn = settings.delta_ppl_pct.notna() & settings[x_metric].notna()
    if not drawn.any():
        st.info("No setting here has both a paired ΔPPL (a recompute baseline on the same tokens) and a "
                f"{charts.METRIC_TITLES[x_metric]}.")
        return
    st.altair_chart(charts.tradeoff(settings, colour, x_metric), width="stretch")
    st.caption("ΔPPL: mean over text samples of the PPL change paired per sample with the recompute baseline (the "
               "cross, 0 by definition); vertical bars: its 95 % Student-t interval over the samples, an effect is "
               "resolved only where the bar excludes zero. TPOT: mean over stepwise timing repeats, horizontal bars "
               "± one std. Dashed step line: the Pareto frontier (no setting both faster and lower in ΔPPL).")
    left_out = settings[~drawn]
    if not left_out.empty:
        no_baseline = left_out[left_out.delta_ppl_pct.isna()]
        no_x = left_out[left_out.delta_ppl_pct.notna()]
        said = []
        if len(no_baseline):
            said.append(f"{len(no_baseline)} without a recompute baseline on their tokens "
                        f"({', '.join(no_baseline.label)})")
        if len(no_x):
            said.append(f"{len(no_x)} without a {charts.METRIC_TITLES[x_metric]} ({', '.join(no_x.label)})")
        st.info("Not drawn: " + "; ".join(said) + ".")
    frontier = settings[drawn & settings.pareto.fillna(False).astype(bool)]
    if x_metric == "tpot_ms" and not frontier.empty:
        st.markdown("**On the Pareto frontier**")
        st.dataframe(frontier[SHOWN].sort_values("tpot_ms"), hide_index=True, width="stretch")
    st.markdown("**Every setting drawn**")
    st.dataframe(settings[drawn][SHOWN].sort_values(x_metric if x_metric in SHOWN else "tpot_ms"), hide_index=True,
                 width="stretch")
