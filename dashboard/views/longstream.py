"""Long stream: perplexity per block of positions along one stream, one line per run (dense past its trained length,
streaming, window attention). Reads only."""

from __future__ import annotations

import altair as alt
import streamlit as st

from dashboard import charts, data


def render(source: data.Source) -> None:
    runs = data.run_table(source.path, source.signature, source.grid, source.include_stale)
    runs = runs[(runs.status == "done")]
    if runs.empty:
        st.info(f"Grid {source.grid} has no finished run yet.")
        return
    longest = runs.sort_values("max_tokens", ascending=False)
    experiments = list(dict.fromkeys(e for row in longest.experiments for e in row.split(", ")))
    columns = st.columns([2, 1])
    experiment = columns[0].selectbox("experiment", experiments,
                                      index=experiments.index("long_stream") if "long_stream" in experiments else 0)
    members = longest[longest.experiments.apply(lambda value: experiment in value.split(", "))]
    members = members.drop_duplicates(subset="label")
    default_block = 1024 if members.max_tokens.max() >= 16 * 1024 else max(16, int(members.max_tokens.max()) // 16)
    block = int(columns[1].number_input("block (positions)", min_value=1, max_value=1 << 20, value=default_block))
    blocks = data.block_ppl(source.path, source.signature, tuple(members.run_hash), block)
    blocks = blocks.assign(label=blocks.run_hash.map(dict(zip(members.run_hash, members.label, strict=True))))
    chart = alt.Chart(blocks).mark_line(point=True).encode(
        x=alt.X("block_start:Q", title=f"position (start of a block of {block})"),
        y=alt.Y("ppl:Q", title="perplexity of the block (log scale)", scale=alt.Scale(type="log")),
        color=alt.Color("label:N", scale=charts.SCHEME, legend=charts.SIDE_LEGEND),
        tooltip=["label:N", "block_start:Q", alt.Tooltip("ppl:Q", format=".3f"), "tokens:Q"],
    ).properties(height=charts.HEIGHT + 60)
    st.altair_chart(chart, width="stretch")
    st.caption("StreamingLLM's claim: flat under streaming with sinks, a cliff for window attention without sinks, and "
               "dense attention collapsing past the model's trained length.")
