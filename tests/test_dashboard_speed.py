"""Every dashboard view of a synthetic store of 50 runs x 20,000 tokens renders in under 2 s (Streamlit's AppTest,
caches cleared before each view, so every query runs), also with all 50 runs chosen in the per-token views.

Run with `-s` to see the figures: `python -m pytest tests/test_dashboard_speed.py -s`.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import streamlit as st
from fixtures_store import build_synthetic_store
from streamlit.testing.v1 import AppTest

from dashboard.views import VIEWS

CHARTS = {"Runs": 0, "Settings": 0, "Trade-off": 1, "Sweeps": 1, "Run detail": 1, "Compaction spikes": 2,
          "Long stream": 1, "SQL": 0, "Speculation": 0, "Retrieval": 0}  # no generation or task runs there
APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
BUDGET_S = 2.0
RUNS, STEPS = 50, 20_000


@pytest.fixture(scope="module")
def big_store(tmp_path_factory) -> Path:
    return build_synthetic_store(tmp_path_factory.mktemp("big") / "gridrun.duckdb", runs=RUNS, steps=STEPS)


@pytest.fixture(scope="module")
def app(big_store):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRIDRUN_STORE", str(big_store))  # read by every rerun of the script
        app = AppTest.from_file(APP, default_timeout=120).run()  # imports, code version: not part of a view's time
        assert not app.exception and not app.error
        yield app


def timed_run(app: AppTest) -> float:
    st.cache_data.clear()
    start = time.perf_counter()
    app.run()
    elapsed = time.perf_counter() - start
    assert not app.exception, [e.value for e in app.exception]
    return elapsed


def test_store_has_the_size_of_the_budget(big_store):
    import duckdb

    with duckdb.connect(str(big_store), read_only=True) as con:
        assert con.execute("SELECT count(DISTINCT run_hash), count(*) FROM tokens").fetchone() == (RUNS, RUNS * STEPS)


@pytest.mark.parametrize("view", list(VIEWS))
def test_each_view_renders_within_budget(app, view):
    app.sidebar.radio[0].set_value(view)
    if view == "SQL":
        app.run()
        app.text_area[0].input("SELECT run_hash, avg(nll), max(kv_len), count(*) FROM tokens GROUP BY ALL")
        app.main.button[0].click()
    elapsed = timed_run(app)
    assert app.main.title[0].value == view and len(app.get("vega_lite_chart")) == CHARTS[view] and not app.error
    print(f"\n{view}: {elapsed:.2f} s ({RUNS} runs x {STEPS:,} tokens, caches cleared)")
    assert elapsed < BUDGET_S, f"{view} took {elapsed:.2f} s >= {BUDGET_S} s"


@pytest.mark.parametrize("view", ["Run detail", "Compaction spikes"])
def test_per_token_views_with_every_run_chosen(app, big_store, view):
    import duckdb

    with duckdb.connect(str(big_store), read_only=True) as con:
        every_run = [row[0] for row in con.execute("SELECT run_hash FROM runs WHERE compaction_count > 0 OR "
                                                   f"{view == 'Run detail'} ORDER BY run_hash").fetchall()]
    app.sidebar.radio[0].set_value(view).run()
    app.multiselect[0].set_value(every_run)
    elapsed = timed_run(app)
    charts = app.get("vega_lite_chart")
    print(f"\n{view}, all {len(app.multiselect[0].value)} runs: {elapsed:.2f} s")
    assert len(app.multiselect[0].value) == len(every_run) >= RUNS - 1 and len(charts) >= 1
    assert elapsed < BUDGET_S, f"{view} with {RUNS} runs took {elapsed:.2f} s >= {BUDGET_S} s"
