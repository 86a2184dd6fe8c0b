"""One number, one query, on the main job's own store: grids/paper.yaml (shrunk with --set to tiny-llama and short
streams) through the dashboard's data layer and the paper's gather must give every setting the same PPL, ΔPPL, interval
and TPOT; the data layer labels the grid's mix of runs (knobs missing for some methods) without an exception."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures_store import ROOT, shrunk_grid_store

from dashboard import data
from paper import gather
from store import queries

NUMBERS = ["ppl", "ppl_std", "n_samples", "delta_ppl_pct", "delta_ppl_ci", "delta_ppl_low", "delta_ppl_high",
           "delta_ppl_resolved", "n_pairs", "tpot_ms", "tpot_ms_std", "n_repeats", "speedup"]
QUANT_NUMBERS = ["delta_float_pct", "delta_float_low", "delta_float_high", "n_float_pairs", "tpot_ratio",
                 "kv_bytes_per_token", "weights_bytes"]


@pytest.fixture(scope="module")
def paper_store(tmp_path_factory) -> tuple[Path, str]:
    return shrunk_grid_store(tmp_path_factory, "paper")


def same(left: pd.DataFrame, right: pd.DataFrame, columns: list[str]) -> None:
    left, right = left.set_index("setting_hash").sort_index(), right.set_index("setting_hash").sort_index()
    assert list(left.index) == list(right.index)
    for column in columns:
        a, b = left[column].to_numpy(dtype=float), right[column].to_numpy(dtype=float)
        # Equal to the last bits but for DuckDB's parallel aggregation order (a std may differ in its 16th digit).
        assert np.allclose(a, b, rtol=1e-12, atol=0, equal_nan=True), (column, a, b)


def test_dashboard_and_paper_read_every_setting_from_one_query(paper_store):
    path, grid = paper_store
    signature = queries.signature(path)
    with queries.connect(path) as con:
        gathered = gather.gather(con, grid, include_stale=False)
        quantized, _ = gather.gather_quantization(con, grid, include_stale=False)
    for experiment, settings in gathered.experiments.items():
        shown = data.setting_table(path, signature, grid, (experiment,), False)
        same(shown, settings, NUMBERS)
        assert shown.label.str.len().min() > 0
    shown = data.setting_table(path, signature, grid, tuple(gather.QUANT_EXPERIMENTS), False)
    same(shown, quantized, NUMBERS + QUANT_NUMBERS)
    # The trade-off figure's points are the Trade-off view's (all experiments), measured as the main table.
    names = tuple(queries.read(path, lambda con: queries.experiment_names(con, grid)))
    everything = data.setting_table(path, signature, grid, names, False)
    same(everything[everything.setting_hash.isin(gathered.all_groups.setting_hash)], gathered.all_groups, NUMBERS)


def test_dashboard_and_paper_read_the_retrieval_cells_from_one_query(paper_store):
    """The Retrieval view's cells and the paper's retrieval table and needle figure: the same numbers, every cell."""
    path, grid = paper_store
    with queries.connect(path) as con:
        paper = gather.gather_retrieval(con, grid, include_stale=False)
    shown = data.retrieval_table(path, queries.signature(path), grid, False)
    assert paper is not None and len(paper) == len(shown) >= 7  # the cells of grids/paper.yaml's retrieval
    keys = ["group_hash", "depth"]
    shown, paper = shown.sort_values(keys).reset_index(drop=True), paper.sort_values(keys).reset_index(drop=True)
    assert list(shown.setting) == list(paper.setting)
    for column in ("trials", "accuracy", "accuracy_low", "accuracy_high", "answer_nll", "retained", "distance",
                   "span_window", "span_recent_max"):
        assert np.allclose(shown[column].to_numpy(dtype=float), paper[column].to_numpy(dtype=float),
                           rtol=1e-12, atol=0, equal_nan=True), column


def test_main_effects_have_intervals_over_the_five_plays(paper_store):
    path, grid = paper_store
    with queries.connect(path) as con:
        main = queries.setting_table(con, grid, ["main"])
    streaming = main[main.method == "streaming"]
    assert len(streaming) == 2 and (streaming.n_pairs == 5).all() and (streaming.n_samples == 5).all()
    assert streaming.delta_ppl_ci.notna().all() and (streaming.delta_ppl_low < streaming.delta_ppl_high).all()
    assert (streaming.n_repeats == 3).all() and streaming.speedup.notna().all()


def test_sweeps_sweep_the_experiments_own_knob(paper_store):
    path, grid = paper_store
    signature = queries.signature(path)
    expected = {name: knob for name, (knob, _) in gather.SWEEPS.items()}
    for experiment, knob in expected.items():
        settings = data.setting_table(path, signature, grid, (experiment,), False)
        declared = data.declared_sweep(path, signature, grid, experiment)
        assert queries.sweep_knob(declared, experiment, settings) == knob, experiment


def test_labels_of_the_grid_mix_under_the_installed_pandas(paper_store):
    path, grid = paper_store
    signature = queries.signature(path)
    runs = data.run_table(path, signature, grid, False)
    assert len(runs) and runs.label.str.len().min() > 0
    assert not runs.label.duplicated().any()


PANDAS_2 = ("pandas==2.3.3", "pytz")  # pandas 3 dropped its pytz dependency


def test_labels_under_pandas_2(paper_store, tmp_path):
    """The lower end of pyproject's pandas range: the data layer under pandas 2.3 (installed into a folder put first
    on sys.path) labels the same runs as under the installed pandas."""
    path, grid = paper_store
    target = tmp_path / "pandas2"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                              *PANDAS_2], capture_output=True, text=True)
    if install.returncode != 0:
        message = f"cannot install {PANDAS_2}: {install.stderr.strip()[-300:]}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    script = (
        "import sys, json, pandas; from pathlib import Path; from dashboard import data; from store import queries\n"
        f"path = Path({str(path)!r}); grid = {grid!r}; signature = queries.signature(path)\n"
        "runs = data.run_table(path, signature, grid, False)\n"
        "settings = data.setting_table(path, signature, grid, None, False)\n"
        "print(json.dumps({'pandas': pandas.__version__, 'runs': sorted(runs.label), "
        "'settings': sorted(settings.label)}))\n")
    environment = {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{ROOT}"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["pandas"].startswith("2.3")
    signature = queries.signature(path)
    assert found["runs"] == sorted(data.run_table(path, signature, grid, False).label)
    assert found["settings"] == sorted(data.setting_table(path, signature, grid, None, False).label)
