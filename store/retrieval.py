"""Reads for the retrieval tasks (mode task) beyond store.queries.retrieval_table: the trials of one cell, and the
cache's span per task configuration (the rule the dashboard draws against the needle's distance). Reads only."""

from __future__ import annotations

from collections.abc import Sequence

import duckdb
import pandas as pd

from store.queries import _members_sql, current_code_version, retrieval_table

TRIAL_COLUMNS = ("trial", "answer", "expected", "score", "retained", "needle_start", "needle_end", "distance",
                 "question_start", "kv_len", "answer_nll", "instance_hash", "run_hash", "repeat")


def trial_rows(con: duckdb.DuckDBPyConnection, grid: str, group_hash: str, depth: float | None,
               include_stale: bool = False) -> pd.DataFrame:
    """The trials of one cell of retrieval_table: configuration `group_hash` of `grid` (its done runs, repeats
    pooled) at needle `depth` (None: a task file's rows, whose depth is null), one row per trial in TRIAL_COLUMNS."""
    columns = ", ".join(f"t.{c}" if c != "repeat" else "m.repeat" for c in TRIAL_COLUMNS)
    sql = f"""
        WITH members AS ({_members_sql("grid = $grid")})
        SELECT {columns}
        FROM members m JOIN trials t USING (run_hash)
        WHERE m.group_hash = $group_hash AND m.status = 'done' AND m.mode = 'task'
            AND ($include_stale OR NOT m.stale)
            AND (t.depth = $depth OR ($depth IS NULL AND t.depth IS NULL))
        ORDER BY m.repeat, t.trial
    """
    params = {"cv": current_code_version(), "grid": grid, "group_hash": group_hash, "include_stale": include_stale,
              "depth": depth}
    return con.execute(sql, params).df()


def cache_spans(con: duckdb.DuckDBPyConnection, grid: str, include_stale: bool = False) -> pd.DataFrame:
    """Per task configuration of `grid` with done runs (`group_hash`, as retrieval_table's): `window` (W, the recent
    tokens a compaction keeps) and `recent_max` (W + R - 1: the recent tokens held just before a compaction, the
    incoming one aside), both null for a method without a window (dense), with `method`, `sink`, `compress_every`."""
    sql = f"""
        WITH members AS ({_members_sql("grid = $grid")})
        SELECT group_hash, any_value(method) AS method, any_value(window_resolved) AS window,
            any_value(window_resolved) + any_value(compress_every) - 1 AS recent_max,
            any_value(sink) AS sink, any_value(compress_every) AS compress_every
        FROM members
        WHERE status = 'done' AND mode = 'task' AND ($include_stale OR NOT stale)
        GROUP BY group_hash ORDER BY group_hash
    """
    return con.execute(sql, {"cv": current_code_version(), "grid": grid, "include_stale": include_stale}).df()


def setting_label(row) -> str:
    """'dense', 'strict (cap 256)', 'lazy R=64 (cap 256 soft)', 'lazy R=64 (cap 256) refresh=8 middle',
    '... kv_quant=int4': how a retrieval table's row (a task configuration) reads, in plain text, on the dashboard and
    in the paper; two configurations the label would merge are told apart by retrieval_cells."""
    if row["method"] != "streaming":
        label = str(row["method"])
    else:
        kind = "strict" if row["compress_every"] == 1 else f"lazy R={row['compress_every']}"
        budget = f"cap {row['cap']}" if pd.notna(row["cap"]) else f"window {row['window']}"
        if row.get("cap_mode") == "soft" and pd.notna(row["cap"]):
            budget += " soft"  # W = cap - S - slack, up to W + R held: another cache than the peak cap's
        label = f"{kind} ({budget})"
        for name in ("overlap", "refresh", "slack", "max_drop"):
            if pd.notna(row.get(name)) and row.get(name):
                label += f" {name}={row[name]}" + (f" {row['refresh_policy']}" if name == "refresh" else "")
        if pd.notna(row.get("sink")) and row["sink"] != 4:
            label += f" sink={row['sink']}"
    if pd.notna(row.get("kv_quant")) and row["kv_quant"] not in (None, "none"):
        label += f" kv_quant={row['kv_quant']}"
    return label


def retrieval_cells(con: duckdb.DuckDBPyConnection, grid: str, experiments: Sequence[str] | None = None,
                    include_stale: bool = False) -> pd.DataFrame:
    """queries.retrieval_table per configuration and depth, with each configuration's plain `setting` label
    (setting_label) and the cache's span (`span_window`, `span_recent_max`: cache_spans): what the dashboard's
    Retrieval view and the paper's retrieval table and needle figure show, from this one read."""
    cells = retrieval_table(con, grid, experiments, True, include_stale)
    if cells.empty:
        return cells.assign(setting=pd.Series(dtype=str), span_window=pd.Series(dtype=float),
                            span_recent_max=pd.Series(dtype=float))
    spans = cache_spans(con, grid, include_stale)[["group_hash", "window", "recent_max"]]
    cells = cells.merge(spans.rename(columns={"window": "span_window", "recent_max": "span_recent_max"}),
                        on="group_hash", how="left")
    return distinct_settings(cells.assign(setting=cells.apply(setting_label, axis=1)))


def distinct_settings(cells: pd.DataFrame) -> pd.DataFrame:
    """`cells` whose `setting` labels never put two configurations in one cell (setting, context_tokens, depth):
    where knobs the label leaves out (a seed, a dtype, ...) tell them apart, their labels gain the configuration's
    short hash."""
    clash = cells.groupby(["setting", "context_tokens", "depth"], dropna=False)["group_hash"].transform("nunique") > 1
    merged = cells["setting"].isin(set(cells.loc[clash, "setting"]))
    cells = cells.copy()
    cells.loc[merged, "setting"] = cells.loc[merged, "setting"] + " #" + cells.loc[merged, "group_hash"].str[:6]
    return cells
