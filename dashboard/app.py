"""The Streamlit script of the dashboard (`python -m dashboard` runs it): sidebar choices, then the chosen view.

Reads the store given by `--store` (after `--`), else $GRIDRUN_STORE, else results/gridrun.duckdb. Never writes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import duckdb
import streamlit as st

from dashboard import data
from dashboard.views import VIEWS
from store import queries

WATCH_SECONDS = 5


def store_path() -> Path:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--store", type=Path)
    known, _ = parser.parse_known_args(sys.argv[1:])
    return known.store or Path(os.environ.get("GRIDRUN_STORE", queries.DEFAULT_STORE))


@st.fragment(run_every=WATCH_SECONDS)
def watch(path: Path, shown: data.Signature | None) -> None:
    """Rerun the page when a new snapshot of the store is published (a grid still writing finished more runs), or
    when the store first appears."""
    try:
        changed = queries.signature(path) != shown
    except OSError:
        return
    if changed:
        st.rerun(scope="app")


def sidebar(path: Path) -> data.Source | None:
    st.sidebar.title("gridrun")
    st.sidebar.caption(f"store: `{path}`")
    watching = st.sidebar.toggle("watch for new runs", value=True, help=f"checks the store every {WATCH_SECONDS} s")
    try:
        signature = queries.signature(path) if path.exists() else None
        grids = data.grid_names(path, signature) if signature else []
    except (OSError, queries.StoreError) as error:
        st.error(str(error) if isinstance(error, queries.StoreError) else f"cannot read {path}: {error}")
        return None
    if watching:
        with st.sidebar:
            watch(path, signature)
    if not grids:
        what = f"{path} holds no grid yet" if signature else f"no store at {path} yet"
        st.info(f"{what}: run python -m gridrun GRID.yaml --store {path} (this page shows its runs as they finish).")
        return None
    grid = st.sidebar.selectbox("grid", grids)
    include_stale = st.sidebar.checkbox("include stale runs", help="runs made by another version of the "
                                        "evaluation code; never mixed with current ones in a row or a baseline")
    stale = data.grid_totals(path, signature, grid)["stale"]
    if stale and not include_stale:
        st.sidebar.warning(f"{stale} stale runs hidden (made by other evaluation code): tick include stale runs.")
    if st.sidebar.button("Refresh"):
        st.rerun()
    return data.Source(path, signature, grid, include_stale)


def main() -> None:
    st.set_page_config(page_title="gridrun", layout="wide")
    path = store_path().resolve()
    view = st.sidebar.radio("view", list(VIEWS))
    try:
        source = sidebar(path)
        if source is None:
            return
        st.title(view)
        VIEWS[view](source)
    except queries.StoreError as error:  # damaged, foreign, or of another schema version: said, never a traceback
        st.error(str(error))
    except duckdb.Error as error:
        st.error(f"reading {path} failed: {' '.join(str(error).split())[:500]}")


main()
