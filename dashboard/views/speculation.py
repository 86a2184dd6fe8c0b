"""Speculation: tokens/s and acceptance of the draft kinds against k, one panel per cache policy, with the speedup over
`spec: none` under the same policy and whether the output is identical to it. Reads only."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import data


def policy_label(row: pd.Series) -> str:
    """'dense', 'strict (cap 256)', 'lazy R=32 (cap 256)': the cache policy a generation run decodes under."""
    if row["method"] != "streaming":
        return str(row["method"])
    kind = "strict" if row["compress_every"] == 1 else f"lazy R={row['compress_every']}"
    budget = f"cap {row['cap']}" if pd.notna(row["cap"]) else f"window {row['window']}"
    return f"{kind} ({budget}, {row['rope_mode']})"


def render(source: data.Source) -> None:
    table = data.speculation_table(source.path, source.signature, source.grid, source.include_stale)
    if table.empty:
        st.info(f"No finished generation runs (mode: generate) in grid {source.grid} yet.")
        return
    experiments = sorted({name for names in table.experiments for name in names})
    chosen = st.multiselect("experiments", experiments, default=experiments)
    table = table[table.experiments.apply(lambda names: bool(set(names) & set(chosen)))]
    if table.empty:
        st.info("No generation runs in the chosen experiments.")
        return
    table = table.assign(policy=table.apply(policy_label, axis=1),
                         k=table.num_draft.where(table.spec != "none", 0))
    base = alt.Chart(table).encode(
        x=alt.X("k:Q", title="num_draft k (0: spec none)"),
        # One colour per draft kind in both charts (each chart would otherwise colour only the kinds it draws).
        color=alt.Color("spec:N", scale=alt.Scale(domain=sorted(table.spec.unique())),
                        legend=alt.Legend(orient="right")),
        tooltip=["policy", "spec", "k", alt.Tooltip("tokens_per_s:Q", format=".1f"),
                 alt.Tooltip("speedup:Q", format=".2f"), alt.Tooltip("acceptance_rate:Q", format=".2f"),
                 alt.Tooltip("mean_accepted_length:Q", format=".2f"), "identical", "n"],
    )
    speed = (base.mark_line(point=True).encode(y=alt.Y("tokens_per_s:Q", title="generated tokens/s"))
             .properties(width=260, height=220).facet(column=alt.Column("policy:N", title=None)))
    accept = (base.transform_filter("datum.spec != 'none'").mark_line(point=True)
              .encode(y=alt.Y("acceptance_rate:Q", title="acceptance rate", scale=alt.Scale(domain=[0, 1])))
              .properties(width=260, height=160).facet(column=alt.Column("policy:N", title=None)))
    st.altair_chart(speed, width="content")
    st.altair_chart(accept, width="content")
    st.caption("Mean over repeats. Speedup: tokens/s over those of spec none under the same policy, prompt, device and "
               "code. identical: the generated ids equal spec none's (greedy speculation must; sampling need not).")
    shown = table[["policy", "spec", "k", "n", "tokens_per_s", "tokens_per_s_std", "ms_per_token", "speedup",
                   "acceptance_rate", "mean_accepted_length", "identical", "compactions", "group_hash"]]
    st.dataframe(shown, hide_index=True, width="stretch")
