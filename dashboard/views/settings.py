"""Settings: one row per setting, quality over text samples and timing over repeats, each with its own n. Reads only."""

from __future__ import annotations

import streamlit as st

from dashboard import data
from store.queries import SETTING_KNOBS

NUMBER_FORMATS = {
    "ppl": "%.4f", "ppl_std": "%.4f", "delta_ppl_pct": "%+.3f %%", "delta_ppl_low": "%+.3f %%",
    "delta_ppl_high": "%+.3f %%", "delta_float_pct": "%+.3f %%", "delta_float_low": "%+.3f %%",
    "delta_float_high": "%+.3f %%", "tpot_ms": "%.3f", "tpot_ms_std": "%.3f", "speedup": "%.2fx",
    "tpot_ratio": "%.2fx", "compact_ratio": "%.2fx", "compile_s": "%.1f s", "compile_s_std": "%.1f s",
}


def render(source: data.Source) -> None:
    experiments = data.experiment_names(source.path, source.signature, source.grid)
    chosen = st.multiselect("experiments", experiments, default=experiments)
    settings = data.setting_table(source.path, source.signature, source.grid, tuple(chosen), source.include_stale)
    if settings.empty:
        st.info(f"No finished runs in {', '.join(chosen) or 'no experiment'} of grid {source.grid} yet.")
        return
    st.caption(
        "Quality is a statistic over text samples: PPL mean ± std over n_samples texts (from the protocol shown), and "
        "ΔPPL paired per sample with the recompute baseline on the same tokens, with its 95 % Student-t interval "
        "over the n_pairs samples (low, high; resolved: the interval excludes zero; agree: samples with the mean's "
        "sign). Quantized settings are also paired with the same setting in float (ΔPPL vs float, TPOT ratio). "
        "Timing is a statistic over repeats: TPOT mean ± std over n_repeats stepwise runs; parallel runs have none. "
        "speedup: the recompute baseline's TPOT on the same tokens over the setting's, the baseline run with the same "
        "compile (compiled against compiled: a compiled setting over the compiled recompute, an eager one over the "
        "eager; none without one). "
        "A ring or compiled setting (layout, compile) is timed only and against its compact eager twin (compact_ratio: "
        "TPOT over the twin's on the same tokens); compile_s: its first compiled step's wall time, never in TPOT. "
        "The paper's tables print these same numbers (one query: store.queries.setting_table).")
    quantized = ["delta_float_pct", "delta_float_low", "delta_float_high", "n_float_pairs", "tpot_ratio"] \
        if settings.delta_float_pct.notna().any() else []
    # A ring or compiled setting: its TPOT over its compact eager twin's, and its compile time.
    storage = ["compact_ratio", "compile_s", "compile_s_std"] \
        if ((settings.layout != "compact") | (settings.compile != "none")).any() else []
    columns = ["label", "experiments", "delta_ppl_pct", "delta_ppl_low", "delta_ppl_high", "delta_ppl_resolved",
               "n_pairs", "agree", "ppl", "ppl_std", "n_samples", "measurement", "tpot_ms",
               "tpot_ms_std", "n_repeats", "speedup", *quantized, *storage,
               *[k for k in SETTING_KNOBS if k in settings],
               "stale", "setting_hash"]
    config = {name: st.column_config.NumberColumn(format=fmt) for name, fmt in NUMBER_FORMATS.items()}
    st.dataframe(settings[columns], hide_index=True, width="stretch", column_config=config)
