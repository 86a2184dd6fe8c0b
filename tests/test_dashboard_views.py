"""Every dashboard view on a store filled by grids/smoke.yaml, through Streamlit's AppTest: no exception, the charts
and tables each view promises, the SQL box's refusals, and new runs showing up while a grid is still publishing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb
import pytest
from fixtures_store import copy_store, smoke_store
from streamlit.testing.v1 import AppTest

from dashboard.__main__ import parse, streamlit_command
from dashboard.views import VIEWS

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
CHARTS = {"Runs": 0, "Settings": 0, "Trade-off": 1, "Sweeps": 1, "Run detail": 1, "Compaction spikes": 2,
          "Long stream": 1, "SQL": 0, "Speculation": 2, "Retrieval": 2}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return smoke_store(tmp_path_factory)


def open_app(path: Path, monkeypatch, view: str = "Runs") -> AppTest:
    monkeypatch.setenv("GRIDRUN_STORE", str(path))
    app = AppTest.from_file(APP, default_timeout=60).run()
    app.sidebar.selectbox[0].set_value("smoke")  # the grid of grids/smoke.yaml (the store holds smoke-paper too)
    app.sidebar.radio[0].set_value(view).run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def chart_marks(app: AppTest) -> list[set[str]]:
    """The mark types of each Altair chart on the page."""
    def marks(spec: dict) -> set[str]:
        found = {spec["mark"]["type"] if isinstance(spec.get("mark"), dict) else spec.get("mark")} - {None}
        for key in ("layer", "vconcat", "hconcat"):
            for child in spec.get(key, []):
                found |= marks(child)
        return found

    return [marks(json.loads(chart.proto.spec)) for chart in app.get("vega_lite_chart")]


def test_every_view_renders_its_charts(store, monkeypatch):
    assert set(CHARTS) == set(VIEWS)
    app = open_app(store, monkeypatch)
    for view in VIEWS:
        app.sidebar.radio[0].set_value(view).run()
        assert not app.exception, (view, [e.value for e in app.exception])
        assert not app.error, (view, [e.value for e in app.error])
        assert len(app.get("vega_lite_chart")) == CHARTS[view], view
        assert app.main.title[0].value == view


def test_runs_view_lists_every_run_of_the_grid(store, monkeypatch):
    app = open_app(store, monkeypatch, "Runs")
    with duckdb.connect(str(store), read_only=True) as con:
        members = con.execute("SELECT count(DISTINCT run_hash) FROM experiments WHERE grid = 'smoke'").fetchone()[0]
        configs = con.execute(
            "SELECT count(DISTINCT config_hash) FROM configurations WHERE grid = 'smoke'").fetchone()[0]
    runs_table = app.dataframe[-1].value
    assert len(runs_table) == configs > members  # one row per configuration; equivalent ones share a run
    assert runs_table.run_hash.nunique() == members
    shared = runs_table[runs_table.run_hash.duplicated(keep=False)]
    assert len(shared) and (shared.equivalent_to != "").all() and shared.label.str.contains("≡").all()
    assert any("share" in info.value for info in app.info)
    assert {"ppl", "tpot_ms_mean", "peak_memory_mib", "repeats", "stale", "compress_every", "slack", "max_drop",
            "sink", "cap"} <= set(runs_table.columns)
    # A run's own measurement only: comparisons are a setting's, paired on the same tokens (the Settings view).
    assert not {"delta_ppl_pct", "speedup"} & set(runs_table.columns)
    assert {m.label: m.value for m in app.metric}["done"] == str(members)


def test_tradeoff_marks_baseline_frontier_and_error_bars(store, monkeypatch):
    app = open_app(store, monkeypatch, "Trade-off")
    (marks,) = chart_marks(app)
    assert {"point", "line", "rule"} <= marks  # configurations, Pareto frontier, error bars (main has repeats)
    spec = json.loads(app.get("vega_lite_chart")[0].proto.spec)
    fields = {layer.get("encoding", {}).get("y", {}).get("field") for layer in spec["layer"]}
    assert "delta_ppl_pct" in fields and "ppl" not in fields  # paired ΔPPL with its interval, not PPL ± spread
    frontier = app.dataframe[0].value
    assert len(frontier) >= 1 and frontier.tpot_ms.is_monotonic_increasing
    assert frontier.delta_ppl_pct.is_monotonic_decreasing  # faster settings on the frontier lose more quality
    assert app.selectbox[0].label == "ΔPPL relative to" and app.selectbox[1].label == "quality measured by"
    app.selectbox[2].set_value("compress_every").run()
    assert not app.exception


def test_tradeoff_of_quantization_against_its_float_settings(store, monkeypatch):
    """On the KV-bytes axis, relative to the same policy in float: the quantized settings and their float references."""
    monkeypatch.setenv("GRIDRUN_STORE", str(store))
    app = AppTest.from_file(APP, default_timeout=60).run()
    app.sidebar.selectbox[0].set_value("smoke-paper")
    app.sidebar.radio[0].set_value("Trade-off").run()
    app.multiselect[0].set_value(["quantization"]).run()
    app.selectbox[0].set_value("float").run()  # widgets with a format_func take the value, not its label
    app.selectbox[3].set_value("kv_bytes_per_token").run()
    assert not app.exception, [e.value for e in app.exception]
    assert len(app.get("vega_lite_chart")) == 1
    drawn = app.dataframe[-1].value
    assert drawn.delta_float_pct.notna().all() and (drawn.delta_float_pct == 0).sum() == 2  # R=1 and R=16 in float
    assert len(drawn) == 8 and drawn.tpot_ratio.notna().sum() == 6


def test_sweep_of_r_holds_the_other_knobs_fixed(store, monkeypatch):
    app = open_app(store, monkeypatch, "Sweeps")
    app.selectbox[0].set_value("r_sweep").run()
    assert app.selectbox[1].value == "compress_every"
    assert not {"sample", "protocol", "max_tokens", "prefill"} & set(app.selectbox[1].options)
    assert app.selectbox[2].value == "delta_ppl_pct"
    table = app.dataframe[0].value
    assert sorted(table.compress_every) == [1, 4, 16] and table.series.nunique() == 1
    app.selectbox[2].set_value("ppl").run()
    assert not app.exception and len(app.get("vega_lite_chart")) == 1


def test_run_detail_and_spikes_follow_the_chosen_runs(store, monkeypatch):
    app = open_app(store, monkeypatch, "Run detail")
    assert len(app.multiselect[0].value) >= 2
    app.slider[0].set_value((10, 120)).run()
    assert not app.exception and len(app.get("vega_lite_chart")) == 1
    app.sidebar.radio[0].set_value("Compaction spikes").run()
    chosen = app.multiselect[0].value
    metrics = app.dataframe[0].value
    assert len(metrics) == len(chosen) >= 2
    assert (metrics.events > 0).all() and {"latency_ms_peak_excess", "latency_ms_area", "latency_ms_width",
                                            "nll_peak_excess", "nll_area", "nll_width"} <= set(metrics.columns)


def test_long_stream_and_settings_views_of_the_paper_grid(store, monkeypatch):
    monkeypatch.setenv("GRIDRUN_STORE", str(store))
    app = AppTest.from_file(APP, default_timeout=60).run()
    app.sidebar.selectbox[0].set_value("smoke-paper")
    app.sidebar.radio[0].set_value("Long stream").run()
    assert not app.exception, [e.value for e in app.exception]
    assert app.selectbox[0].value == "long_stream"
    spec = json.loads(app.get("vega_lite_chart")[0].proto.spec)
    assert spec["encoding"]["y"]["scale"]["type"] == "log"
    app.sidebar.radio[0].set_value("Settings").run()
    assert not app.exception, [e.value for e in app.exception]
    table = app.dataframe[0].value
    assert {"n_samples", "n_repeats", "delta_ppl_pct", "delta_ppl_low", "delta_ppl_high", "delta_ppl_resolved",
            "agree"} <= set(table.columns)
    # The long-stream runs (parallel) give their settings quality but no TPOT.
    parallel = table[table.measurement.str.startswith("parallel")]
    assert len(parallel) and parallel.n_samples.min() >= 1


@pytest.mark.parametrize("sql", ["DELETE FROM runs", "DROP TABLE tokens", "INSERT INTO meta VALUES ('a', 'b')",
                                 "COPY runs TO 'stolen.csv'"])
def test_sql_box_refuses_writes_with_a_message(store, monkeypatch, sql):
    app = open_app(store, monkeypatch, "SQL")
    app.text_area[0].input(sql)
    app.main.button[0].click().run()
    assert not app.exception
    assert len(app.error) == 1 and "refused" in app.error[0].value and "read-only" in app.error[0].value
    with duckdb.connect(str(store), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] > 0


def test_sql_box_runs_a_select(store, monkeypatch):
    app = open_app(store, monkeypatch, "SQL")
    app.text_area[0].input("SELECT method, count(*) AS runs FROM runs GROUP BY ALL ORDER BY method")
    app.main.button[0].click().run()
    assert not app.exception and not app.error
    assert list(app.dataframe[0].value.method) == ["dense", "recompute", "streaming"]  # dense: long_stream


def test_new_runs_appear_when_a_new_snapshot_is_published(store, monkeypatch, tmp_path):
    """gridrun replaces the published file atomically as runs finish; a rerun of the page reads the new one."""
    published, partial, full = tmp_path / "gridrun.duckdb", tmp_path / "partial.duckdb", tmp_path / "full.duckdb"
    copy_store(store, full)
    copy_store(store, partial)
    with duckdb.connect(str(partial)) as con:
        con.execute("DELETE FROM runs WHERE method = 'streaming' AND compress_every = 4")  # not finished yet
    copy_store(partial, published)
    app = open_app(published, monkeypatch, "Runs")
    before = {m.label: m.value for m in app.metric}
    os.replace(full, published)
    app.run()
    after = {m.label: m.value for m in app.metric}
    assert int(before["pending"]) >= 1 and int(after["pending"]) == 0
    assert int(after["done"]) == int(before["done"]) + int(before["pending"])


def test_a_store_that_appears_later_is_shown(store, monkeypatch, tmp_path):
    """The dashboard may be started before the grid publishes its first snapshot."""
    published = tmp_path / "gridrun.duckdb"
    monkeypatch.setenv("GRIDRUN_STORE", str(published))
    app = AppTest.from_file(APP, default_timeout=60).run()
    assert not app.exception and "no store at" in app.info[0].value and not app.main.title
    copy_store(store, published)
    app.run()
    assert not app.exception and app.main.title[0].value == "Runs" and len(app.metric) == 5


def test_serve_command_binds_localhost_with_usage_stats_off(tmp_path):
    command = streamlit_command(parse(["--store", str(tmp_path / "s.duckdb"), "--port", "8999"]))
    pairs = dict(zip(command[::1], command[1::1], strict=False))
    assert pairs["--server.address"] == "127.0.0.1" and pairs["--server.port"] == "8999"
    assert pairs["--browser.gatherUsageStats"] == "false" and pairs["--server.headless"] == "true"
    assert command[-2:] == ["--store", str(tmp_path / "s.duckdb")]


def test_speculation_charts_give_each_draft_kind_one_colour(store, monkeypatch):
    app = open_app(store, monkeypatch, "Speculation")
    domains = []
    for chart in app.get("vega_lite_chart"):
        spec = json.loads(chart.proto.spec)
        domains.append(spec["spec"]["encoding"]["color"]["scale"]["domain"])
    assert len(domains) == 2 and domains[0] == domains[1] and "none" in domains[0], domains


def paper_grid_view(store: Path, monkeypatch, view: str) -> AppTest:
    monkeypatch.setenv("GRIDRUN_STORE", str(store))
    app = AppTest.from_file(APP, default_timeout=60).run()
    app.sidebar.selectbox[0].set_value("smoke-paper")
    app.sidebar.radio[0].set_value(view).run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def widget(widgets, label: str):
    return next(w for w in widgets if w.label == label)


def test_runs_view_shows_and_filters_layout_and_compile(store, monkeypatch):
    """The layout and compile experiments' runs: both knobs as columns and filters, compile_s of the compiled run."""
    app = paper_grid_view(store, monkeypatch, "Runs")
    every = app.dataframe[-1].value
    assert {"layout", "compile", "compile_s"} <= set(every.columns)
    assert set(every.layout) == {"compact", "ring"} and set(every["compile"]) == {"none", "default"}
    widget(app.multiselect, "layout").set_value(["ring"]).run()
    ring = app.dataframe[-1].value
    assert len(ring) and (ring.layout == "ring").all() and len(ring) < len(every)
    widget(app.multiselect, "compile").set_value(["default"]).run()
    compiled = app.dataframe[-1].value  # the filters compose: ring and compiled
    assert not app.exception and len(compiled) == 1 and compiled.compile_s.iloc[0] > 0
    assert compiled.tpot_ms_mean.iloc[0] > 0 and compiled.layout.iloc[0] == "ring"
    # the compiled ring run and the compiled recompute it is timed against
    assert set(every[every["compile"] == "default"].method) == {"streaming", "recompute"}
    eager = every[every["compile"] == "none"]
    assert eager.compile_s.isna().all()


def test_settings_view_times_ring_settings_against_their_compact_twin(store, monkeypatch):
    app = paper_grid_view(store, monkeypatch, "Settings")
    app.multiselect[0].set_value(["layout", "compile"]).run()
    assert not app.exception, [e.value for e in app.exception]
    table = app.dataframe[0].value
    assert {"layout", "compile", "compact_ratio", "compile_s", "compile_s_std"} <= set(table.columns)
    twins = table[(table.layout == "compact") & (table["compile"] == "none")]
    others = table[(table.layout != "compact") | (table["compile"] != "none")]
    assert len(twins) == 3 and len(others) == 4  # strict, lazy and recompute; ring strict, lazy, compiled lazy and
    assert twins.compact_ratio.isna().all() and others.compact_ratio.notna().all()  # compiled recompute
    for row in others.itertuples():
        twin = twins[(twins.method == row.method) & (twins.compress_every == row.compress_every)].iloc[0]
        assert row.compact_ratio == pytest.approx(row.tpot_ms / twin.tpot_ms)
    assert (others.compile_s.notna() == (others["compile"] != "none")).all()
    # Speedup compiled against compiled: over the recompute with the setting's own compile, never the other.
    recompute = table[table.method == "recompute"].set_index("compile")
    assert set(recompute.index) == {"none", "default"} and recompute.tpot_ms.nunique() == 2
    for row in table.itertuples():
        assert row.speedup == pytest.approx(recompute.tpot_ms[row.compile] / row.tpot_ms), row.label


def test_run_detail_shows_the_chosen_runs_layout_compile_and_compile_s(store, monkeypatch):
    app = paper_grid_view(store, monkeypatch, "Run detail")
    runs = app.multiselect[0]
    assert any("compile=default" in label for label in runs.options)  # the label names the knob
    with duckdb.connect(str(store), read_only=True) as con:
        (compiled,) = con.execute("SELECT run_hash FROM runs WHERE compile = 'default' AND method = 'streaming'"
                                  ).fetchone()
    runs.set_value([*runs.value, compiled]).run()
    assert not app.exception, [e.value for e in app.exception]
    summary = app.dataframe[0].value
    assert {"layout", "compile", "compile_s"} <= set(summary.columns) and len(summary) == len(runs.value)
    row = summary[summary["compile"] == "default"].iloc[0]
    assert row.layout == "ring" and row.compile_s > 0


def test_sweeps_of_the_layout_and_compile_experiments(store, monkeypatch):
    app = paper_grid_view(store, monkeypatch, "Sweeps")
    app.selectbox[0].set_value("layout").run()
    assert app.selectbox[1].value == "layout"  # the experiment's own knob, among the two its grid declares
    app.selectbox[2].set_value("compact_ratio").run()
    assert not app.exception and len(app.get("vega_lite_chart")) == 1
    assert set(app.dataframe[0].value.layout) == {"ring"}  # the compact twins are the reference, not a point
    app.selectbox[0].set_value("compile").run()
    app.selectbox[2].set_value("compile_s").run()
    drawn = app.dataframe[0].value  # the compiled ring and the compiled recompute, one series each
    assert not app.exception and set(drawn["compile"]) == {"default"} and (drawn.compile_s > 0).all()
    assert len(drawn) == 2 and drawn.series.nunique() == 2
    app.selectbox[2].set_value("speedup").run()
    drawn = app.dataframe[0].value
    assert not app.exception and set(drawn["compile"]) == {"none", "default"}
    assert "compiled against compiled" in " ".join(caption.value for caption in app.caption)
