"""The Retrieval view (mode task) through Streamlit's AppTest, and the reads it shares with the paper
(store/retrieval.py): on a store filled by grids/smoke.yaml (its retrieval experiment) and on one without task runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import duckdb
import pytest
from fixtures_store import build_synthetic_store, smoke_store
from streamlit.testing.v1 import AppTest

from store import queries, retrieval

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return smoke_store(tmp_path_factory)


def open_retrieval(path: Path, monkeypatch, grid: str) -> AppTest:
    monkeypatch.setenv("GRIDRUN_STORE", str(path))
    app = AppTest.from_file(APP, default_timeout=60).run()
    app.sidebar.selectbox[0].set_value(grid)
    app.sidebar.radio[0].set_value("Retrieval").run()
    assert not app.exception, [e.value for e in app.exception]
    assert not app.error, [e.value for e in app.error]
    return app


def raw_trials(store: Path, group_hash: str, depth: float) -> list[tuple]:
    with duckdb.connect(str(store), read_only=True) as con:
        return con.execute("""
            SELECT t.trial, t.answer, t.expected, t.score, t.retained, t.instance_hash
            FROM trials t JOIN runs r USING (run_hash)
            WHERE r.status = 'done' AND t.depth = ?
              AND run_hash IN (SELECT run_hash FROM configurations WHERE grid = 'smoke' AND config_group_hash = ?)
            ORDER BY r."repeat", t.trial""", [depth, group_hash]).fetchall()


def test_heatmap_distance_chart_and_one_cells_trials(store, monkeypatch):
    """The heatmap (one panel per setting, accuracy in colour with its interval in the tooltip), accuracy against
    distance with the caches' spans as rules, and the chosen cell's trials: the store's rows of that configuration
    and depth, for the first cell and after choosing another setting."""
    app = open_retrieval(store, monkeypatch, "smoke")
    specs = [json.loads(chart.proto.spec) for chart in app.get("vega_lite_chart")]
    assert len(specs) == 2
    heat, distance = specs
    assert heat["facet"]["field"] == "setting" and heat["columns"] == 4  # panels wrap, four a row
    assert {layer["mark"]["type"] for layer in heat["spec"]["layer"]} == {"rect", "text"}
    cell = next(layer for layer in heat["spec"]["layer"] if layer["mark"]["type"] == "rect")
    assert cell["encoding"]["color"]["field"] == "accuracy"
    assert {"accuracy_low", "accuracy_high"} <= {t["field"] for t in cell["encoding"]["tooltip"]}
    rules = [layer["encoding"]["x"]["field"] for layer in distance["spec"]["layer"] if layer["mark"]["type"] == "rule"
             and layer["encoding"]["x"]["field"].startswith("span_")]
    assert sorted(rules) == ["span_recent_max", "span_window"]
    with queries.connect(store) as con:
        cells = retrieval.retrieval_cells(con, "smoke")
    assert set(cells.setting) == {"dense", "strict (cap 64)", "lazy R=16 (cap 64)"}
    strict = cells[cells.setting == "strict (cap 64)"].iloc[0]
    lazy = cells[cells.setting == "lazy R=16 (cap 64)"].iloc[0]
    assert (strict.span_window, strict.span_recent_max) == (59, 59)  # W = cap - sink - 1: the incoming token's room
    assert (lazy.span_window, lazy.span_recent_max) == (44, 59)  # W + R - 1 just before a cut
    assert cells[cells.setting == "dense"].span_window.isna().all()

    for setting in ("dense", "lazy R=16 (cap 64)"):
        app.selectbox(key="retrieval_setting").set_value(setting).run()
        chosen = app.selectbox(key="retrieval_depth").value
        tokens, depth = re.fullmatch(r"(\d+) tokens, depth ([0-9.]+)", chosen).groups()
        row = cells[(cells.setting == setting) & (cells.depth == float(depth))
                    & (cells.context_tokens == int(tokens))].iloc[0]
        shown = app.dataframe[0].value
        expected = raw_trials(store, row.group_hash, float(depth))
        assert len(shown) == len(expected) == row.trials == 2
        assert list(shown[["trial", "answer", "expected", "score", "retained", "instance_hash"]].itertuples(
            index=False, name=None)) == expected
        assert shown.needle.str.match(r"^\[\d+, \d+\)$").all()


def test_a_store_without_task_runs_shows_a_note(tmp_path, monkeypatch):
    store = build_synthetic_store(tmp_path / "gridrun.duckdb", runs=2, steps=64)
    app = open_retrieval(store, monkeypatch, "synthetic")
    assert not app.get("vega_lite_chart")
    assert "No finished retrieval task runs" in app.info[0].value


def test_trial_rows_select_by_configuration_and_depth(store):
    """trial_rows selects by configuration and depth: a depth the configuration has none of gives no rows."""
    with queries.connect(store) as con:
        cells = retrieval.retrieval_cells(con, "smoke")
        row = cells.iloc[0]
        assert len(retrieval.trial_rows(con, "smoke", row.group_hash, float(row.depth))) == row.trials
        assert retrieval.trial_rows(con, "smoke", row.group_hash, 0.123).empty
        assert retrieval.trial_rows(con, "smoke", row.group_hash, None).empty


def test_labels_tell_apart_the_soft_cap_and_never_merge_two_configurations():
    """setting_label names the soft cap (another cache than the peak cap's); two configurations the label cannot tell
    apart (here: a seed) keep their own cells, by their short hashes, and the others keep their plain labels."""
    import pandas as pd

    base = dict(method="streaming", compress_every=64, cap=256, window=189, sink=4, cap_mode="peak", overlap=0,
                refresh=0, refresh_policy="none", slack=0, max_drop=0, kv_quant="none", context_tokens=1024)
    rows = [dict(base, group_hash="aaaaaaaa1", depth=0.5), dict(base, group_hash="bbbbbbbb2", depth=0.5),
            dict(base, group_hash="cccccccc3", depth=0.5, cap_mode="soft"),
            dict(base, group_hash="dddddddd4", depth=0.5, method="dense")]
    cells = pd.DataFrame(rows)
    labels = cells.apply(retrieval.setting_label, axis=1).tolist()
    assert labels == ["lazy R=64 (cap 256)", "lazy R=64 (cap 256)", "lazy R=64 (cap 256 soft)", "dense"]
    distinct = retrieval.distinct_settings(cells.assign(setting=labels))["setting"].tolist()
    assert distinct == ["lazy R=64 (cap 256) #aaaaaa", "lazy R=64 (cap 256) #bbbbbb", "lazy R=64 (cap 256 soft)",
                        "dense"]
