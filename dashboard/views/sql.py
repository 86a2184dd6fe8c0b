"""SQL: a query box over the store. Read-only: only one SELECT runs, in a sandboxed read-only connection; a statement
that would write is refused with a message."""

from __future__ import annotations

import duckdb
import streamlit as st

from store import queries, sandbox

EXAMPLE = """SELECT method, compress_every, slack, max_drop, count(*) AS runs,
       round(avg(tpot_ms_mean), 3) AS tpot_ms, round(avg(ppl), 4) AS ppl
FROM runs JOIN experiments USING (run_hash)
WHERE status = 'done'
GROUP BY ALL ORDER BY tpot_ms"""


def render(source) -> None:
    sandbox.start()  # the first visit starts the box's process server, so that no statement pays it
    st.caption("Tables: runs, tokens, compactions, experiments, grids, meta. Read-only: one SELECT (or PIVOT) at a "
               f"time, at most {queries.SQL_BOX_ROW_LIMIT:,} rows shown; a statement is stopped after "
               f"{queries.SQL_BOX_SECONDS:g} s or at {queries.SQL_BOX_MEMORY} of memory.")
    with st.form("sql"):
        sql = st.text_area("query", EXAMPLE, height=180)
        submitted = st.form_submit_button("Run")
    if not submitted:
        return
    try:
        frame, truncated = queries.run_user_sql(source.path, sql)
    except (queries.WriteRefused, queries.QueryLimit) as refusal:
        st.error(str(refusal))
        return
    except (duckdb.Error, queries.StoreError, RuntimeError) as error:  # the user's SQL: shown, never raised
        st.error(f"query failed: {error}")
        return
    st.dataframe(frame, hide_index=True, width="stretch")
    st.caption(f"{len(frame):,} rows" + (f" (first {queries.SQL_BOX_ROW_LIMIT:,} shown)" if truncated else ""))
