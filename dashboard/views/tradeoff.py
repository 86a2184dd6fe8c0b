"""Trade-off: per setting, ΔPPL paired per text sample (with its 95 % interval) against TPOT (or KV bytes), relative to
the recompute baseline or, for quantization, to the same policy in float; coloured by method or a knob, the reference
and the Pareto frontier drawn. Reads only."""

from __future__ import annotations

import streamlit as st

from dashboard import charts, data
from store.queries import SETTING_KNOBS

REFERENCES = {"recompute": "the recompute baseline (same cap, same tokens)",
              "float": "the same policy in float (quantization)"}


def render(source: data.Source) -> None:
    experiments = data.experiment_names(source.path, source.signature, source.grid)
    chosen = st.multiselect("experiments", experiments, default=experiments)
    settings = data.setting_table(source.path, source.signature, source.grid, tuple(chosen), source.include_stale)
    if settings.empty:
        st.info(f"No finished runs in {', '.join(chosen) or 'no experiment'} of grid {source.grid} yet.")
        return
    columns = st.columns(4)
    available = [name for name, (column, *_) in charts.TRADEOFF_REFERENCES.items() if settings[column].notna().any()]
    if not available:
        st.info("No setting here has a paired ΔPPL: neither a recompute baseline nor a float setting on its tokens.")
        return
    reference = columns[0].selectbox("ΔPPL relative to", available, format_func=REFERENCES.get)
    # Like with like: one quality measurement (protocol, samples, tokens, prefill) at a time, the most common first.
    measurements = list(settings.measurement.value_counts().index)
    measurement = columns[1].selectbox("quality measured by", measurements,
                                       help="ΔPPLs of settings measured on other tokens are not comparable")
    settings = settings[settings.measurement == measurement]
    knobs = [k for k in SETTING_KNOBS if k != "method" and k in settings and settings[k].astype(str).nunique() > 1]
    colour = columns[2].selectbox("colour by", ["method", *knobs])
    x_metric = columns[3].selectbox("x axis", charts.TRADEOFF_X, format_func=charts.METRIC_TITLES.get)
    column, prefix, count, _ = charts.TRADEOFF_REFERENCES[reference]
    shown = charts.tradeoff_frame(settings, reference)
    drawn = shown[shown[x_metric].notna()]
    if drawn.empty:
        st.info(f"No setting measured by {measurement} has both a ΔPPL relative to {REFERENCES[reference]} and a "
                f"{charts.METRIC_TITLES[x_metric]}: pick another measurement or reference.")
        return
    st.altair_chart(charts.tradeoff(settings, colour, x_metric, reference), width="stretch")
    st.caption(f"ΔPPL: mean over text samples of the PPL change paired per sample with {REFERENCES[reference]} (the "
               "cross, 0 by definition); vertical bars: its 95 % Student-t interval over the samples, an effect is "
               "resolved only where the bar excludes zero. TPOT: mean over stepwise timing repeats, horizontal bars "
               "± one std. Dashed step line (against recompute, on the TPOT axis): the Pareto frontier, per cap and "
               "weight quantization (no setting both faster and lower in ΔPPL).")
    left_out = settings[~settings.setting_hash.isin(drawn.setting_hash)]
    if reference == "recompute" and not left_out.empty:
        no_baseline = left_out[left_out[column].isna()]
        no_x = left_out[left_out[column].notna()]
        said = []
        if len(no_baseline):
            said.append(f"{len(no_baseline)} without a recompute baseline on their tokens "
                        f"({', '.join(no_baseline.label)})")
        if len(no_x):
            said.append(f"{len(no_x)} without a {charts.METRIC_TITLES[x_metric]} ({', '.join(no_x.label)})")
        st.info("Not drawn: " + "; ".join(said) + ".")
    table = ["label", "tpot_ms", "tpot_ms_std", "n_repeats", "speedup", column, f"{prefix}_low", f"{prefix}_high",
             f"{prefix}_resolved", count, "ppl", "ppl_std", "ppl_steps", "n_samples", "setting_hash"]
    frontier = drawn[drawn.pareto.fillna(False).astype(bool)] if reference == "recompute" else drawn.iloc[:0]
    if x_metric == "tpot_ms" and not frontier.empty:
        st.markdown("**On the Pareto frontier**")
        st.dataframe(frontier[table].sort_values("tpot_ms"), hide_index=True, width="stretch")
    st.markdown("**Every setting drawn**")
    every = [*table, "tpot_ratio"] if reference == "float" else table
    st.dataframe(drawn.sort_values(x_metric)[every], hide_index=True, width="stretch")
