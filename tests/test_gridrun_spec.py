"""Grid files: expansion, dedup, hashes, and validation errors that name the file, experiment, key and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from gridrun.spec import GridError, load_grid, parse_grid
from paper.gather import REQUIRED
from streaming_llm import RunConfig

ROOT = Path(__file__).resolve().parent.parent
GRID = """
name: demo
base: {model: tiny-llama, max_tokens: 128, cap: 32, sink: 4}
experiments:
  main:
    base: {repeats: 3}
    runs: [{method: recompute}, {method: streaming, compress_every: 1}, {method: streaming, compress_every: 8}]
  r_sweep:
    base: {method: streaming}
    grid: {compress_every: [1, 4, 8]}
  cross:
    base: {method: streaming}
    runs: [{slack: 0}, {slack: 4}]
    grid: {compress_every: [2, 8], sink: [0, 4]}
"""


def parse(text: str, overrides: list[str] | None = None):
    return parse_grid(text, Path("grids/demo.yaml"), overrides or [])


def test_expansion_counts_repeats_and_cartesian_product():
    grid = parse(GRID)
    members: dict[str, list[str]] = {}
    for experiment, run_hash in grid.membership():
        members.setdefault(experiment, []).append(run_hash)
    assert len(members["main"]) == 9  # 3 runs x 3 repeats
    assert len(members["r_sweep"]) == 3
    # runs x compress_every x sink configurations; slack without max_drop is a no-op, so they make 2 x 2 runs
    assert len(members["cross"]) == 2 * 2
    configurations = [experiment for experiment, _ in grid.configurations()]
    assert configurations.count("cross") == 2 * 2 * 2
    assert configurations.count("main") == 9
    repeats = sorted(run.config.repeat for run in grid.runs if "main" in run.experiments)
    assert repeats == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_a_run_listed_twice_runs_once_and_belongs_to_both_experiments():
    grid = parse(GRID)
    hashes = [run.run_hash for run in grid.runs]
    assert len(hashes) == len(set(hashes))
    strict = RunConfig.from_dict({"model": "tiny-llama", "max_tokens": 128, "cap": 32, "sink": 4,
                                  "method": "streaming", "compress_every": 1})
    shared = next(run for run in grid.runs if run.run_hash == strict.run_hash)
    assert shared.experiments == ("main", "r_sweep")
    # 9 (main) + 1 new in r_sweep (R=4; R=1 and R=8 repeat 0 are main's) + 4 (cross, where slack = 4 is slack = 0;
    # R=8 sink=4 is main's)
    assert len(grid.runs) == 9 + 1 + 3
    slack4 = RunConfig.from_dict({**strict.model_dump(exclude_unset=True), "compress_every": 8, "slack": 4})
    shared = next(run for run in grid.runs if run.run_hash == slack4.run_hash)
    assert [(p.config.slack, p.experiments) for p in shared.configs] == [
        (0, ("main", "r_sweep", "cross")), (4, ("cross",))]


def test_hash_is_the_runconfig_hash_and_repeats_share_a_group():
    grid = parse(GRID)
    for run in grid.runs:
        assert run.run_hash == RunConfig.from_dict(run.config.normalised()).run_hash
    recompute = [run.config for run in grid.runs if run.config.method == "recompute"]
    assert len({config.run_hash for config in recompute}) == 3
    assert len({config.group_hash for config in recompute}) == 1


def test_set_overrides_every_run_and_renames_the_grid():
    grid = parse(GRID, ["max_tokens=64"])
    assert {run.config.max_tokens for run in grid.runs} == {64}
    assert grid.name == "demo[max_tokens=64]"
    with pytest.raises(GridError, match="--set bogus: unknown key"):
        parse(GRID, ["bogus=1"])
    with pytest.raises(GridError, match="expected key=value"):
        parse(GRID, ["max_tokens"])


def test_only_selects_experiments_and_names_unknown_ones():
    grid = parse(GRID)
    assert {run.run_hash for run in grid.only(["r_sweep"]).runs} == {
        run.run_hash for run in grid.runs if "r_sweep" in run.experiments
    }
    with pytest.raises(GridError, match=r"--only nope: no such experiment \(known: main, r_sweep, cross\)"):
        grid.only(["nope"])


def test_where_selects_runs_by_knob_values_and_names_mistakes():
    grid = parse(GRID)
    lazy = grid.where(["compress_every=8"])
    assert {run.run_hash for run in lazy.runs} == {run.run_hash for run in grid.runs if run.config.compress_every == 8}
    assert 0 < len(lazy.runs) < len(grid.runs)
    # Every condition holds (and), after --only's experiments; the repeats of main are runs like any other.
    chosen = grid.only(["main"]).where(["compress_every=8", "repeat=2"])
    assert [(run.config.method, run.config.compress_every, run.config.repeat) for run in chosen.runs] == [
        ("streaming", 8, 2)]
    assert grid.where(["method=recompute"]).experiments == grid.experiments  # the grid stays the grid
    with pytest.raises(GridError, match="--where bogus: unknown key"):
        grid.where(["bogus=1"])
    with pytest.raises(GridError, match="--where repeats: a key of the grid file, not of a run"):
        grid.where(["repeats=2"])
    with pytest.raises(GridError, match=r"--where compress_every=7: no run of the grid"):
        grid.where(["compress_every=7"])
    with pytest.raises(GridError, match="--where 'compress_every': expected key=value"):
        grid.where(["compress_every"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\nbase: {capp: 3}\nexperiments: {a: {runs: [{}]}}",
         r"grids/demo.yaml: base: unknown key 'capp' \(allowed: model, .*repeats\)"),
        ("name: x\nexperiments: {a: {grid: {sinks: [1]}}}",
         r"experiment 'a' grid: unknown key 'sinks' \(allowed: model"),
        ("name: x\nexperiments: {a: {runs: [{model: tiny-llama, cap: big}]}}",
         r"experiment 'a' runs\[0\]: cap = 'big'"),
        ("name: x\nexperiments: {a: {runs: [{model: tiny-llama, method: fancy, cap: 8}]}}",
         r"experiment 'a' runs\[0\]: method = 'fancy'"),
        ("name: x\nbase: {model: tiny-llama, cap: 8, sink: 4}\nexperiments: {a: {grid: {overlap: [0, 4]}}}",
         r"experiment 'a' grid point overlap=4: .*cap_mode peak: even window = 1 peaks at .* > cap = 8.*raise cap"),
        ("name: x\nbase: {cap: 8}\nexperiments: {a: {grid: {sink: []}}}",
         r"experiment 'a' grid: sink is an empty list"),
        ("name: x\nbase: {cap: 8}\nexperiments: {a: {runs: [{sink: 1}], grid: {sink: [2]}}}",
         r"runs\[0\] sets sink, which grid also sweeps"),
        ("name: x\nbase: {cap: 8, repeats: 0}\nexperiments: {a: {runs: [{}]}}",
         r"repeats = 0: repeats must be an integer >= 1"),
        ("name: x\nexperiments: {a: {}}", r"experiment 'a': has neither grid: nor runs:"),
        ("name: x\nexperiments: {a: {runs: [{}], sweep: {}}}", r"unknown key 'experiments.a.sweep'"),
        ("name: x\nexperiments: {a: {grid: {sink: 4}}}", r"experiments.a.grid.sink = 4: Input should be a valid list"),
        ("base: {}\nexperiments: {a: {runs: [{}]}}", r"'name' is missing"),
        ("name: x\nexperiments: {}", r"experiments = \{\}"),
        ("- just\n- a list\n", r"a grid file is a mapping"),
        ("name: !!python/object/apply:os.system [echo hi]\nexperiments: {}", r"not valid YAML"),
        ("name: x\nexperiments:\n  a: {runs: [{}]}\n  a: {runs: [{}]}\n", r"key 'a' is given twice"),
    ],
)
def test_validation_errors_name_file_experiment_key_and_fix(text, message):
    with pytest.raises(GridError, match=message) as caught:
        parse(text)
    assert str(caught.value).startswith("grids/demo.yaml")


def test_missing_file_is_a_grid_error(tmp_path):
    with pytest.raises(GridError, match="cannot read the grid file"):
        load_grid(tmp_path / "absent.yaml")


PAPER_EXPERIMENTS = {"main", "r_sweep", "slack_sweep", "max_drop_sweep", "sink_sweep", "overlap", "refresh", "ladder",
                     "cap_mode"}


@pytest.mark.parametrize("name", ["paper.yaml", "paper-full.yaml", "paper-scale.yaml"])
def test_paper_grids_hold_every_sweep_of_the_study(name):
    grid = load_grid(ROOT / "grids" / name)
    assert set(grid.experiments) >= PAPER_EXPERIMENTS
    assert set(grid.experiments) >= set(REQUIRED)  # what `python -m paper export` needs of any grid
    long_stream = [run.config for run in grid.runs if "long_stream" in run.experiments]
    assert {config.method for config in long_stream} == {"dense", "streaming"}
    assert max(config.max_tokens for config in long_stream) >= 32_768
    assert min(config.max_tokens for config in long_stream if config.method == "dense") >= 16_384
    main = [run.config for run in grid.runs if "main" in run.experiments]
    assert {config.method for config in main} == {"recompute", "streaming"}
    assert {config.compress_every for config in main if config.method == "streaming"} >= {1}
    ladder = [config for experiment, config in grid.configurations() if experiment == "ladder"]
    assert len({config.setting_hash for config in ladder}) == 4
    assert {run.config.cap_mode for run in grid.runs if "cap_mode" in run.experiments} == {"soft", "peak"}
    # Each sweep shows something: three or more distinct computations, and equivalent settings at most once (one set
    # of settings sharing runs, whichever measurement: a text sample or a timing repeat).
    for experiment in PAPER_EXPERIMENTS - {"main"}:
        configs = [config for name, config in grid.configurations() if name == experiment]
        settings: dict[str, set[str]] = {}
        for config in configs:
            settings.setdefault(config.run_hash, set()).add(config.setting_hash)
        assert len({frozenset(s) for s in settings.values()}) >= 3, experiment
        shared = {frozenset(s) for s in settings.values() if len(s) > 1}
        assert len(shared) <= 1, (experiment, shared)
    # Quality over at least 5 texts (parallel, streams at least 8x the cap), timing over 3 stepwise repeats.
    for config in main:
        if config.protocol == "parallel":
            assert config.max_tokens >= 8 * config.cap
    for method in ("recompute", "streaming"):
        assert len({c.sample for c in main if c.method == method and c.protocol == "parallel"}) >= 5
        assert len({c.repeat for c in main if c.method == method and c.protocol == "stepwise"}) >= 3


def test_paper_full_is_at_the_study_size():
    grid = load_grid(ROOT / "grids" / "paper-full.yaml")
    configs = [run.config for run in grid.runs]
    assert {config.cap for config in configs if config.window is None and config.method != "dense"} == {2048}
    # The overlap experiment's set-window runs: lazy's window at cap 2048, plus the overlap they test.
    assert {config.window for config in configs if config.window is not None} == {1980}
    assert min(run.config.max_tokens for run in grid.runs
               if "long_stream" not in run.experiments and run.config.mode != "task") >= 20_000
    # Retrieval at the study's size: more trials than make run's 10, a context past Pythia's 2,048 positions.
    tasks = [run.config for run in grid.runs if "retrieval" in run.experiments]
    assert tasks and min(config.trials for config in tasks) >= 100
    assert {config.context_tokens for config in tasks} == {2048, 4096}


def test_smoke_grid_uses_only_tiny_models():
    grid = load_grid(ROOT / "grids" / "smoke.yaml")
    assert {run.config.model for run in grid.runs} <= {"tiny-llama", "tiny-neox"}


MEASURED = """
name: measured
base: {model: tiny-llama, cap: 32, sink: 4}
measurements:
  quality: {protocol: parallel, max_tokens: 256, prefill: 0, sample: [0, 1, 2]}
  timing: {protocol: stepwise, max_tokens: 96, prefill: 32, repeats: 2}
experiments:
  main:
    runs: [{method: recompute, score_stride: 4}, {method: streaming, compress_every: 8}]
  long:
    measurements: []
    base: {method: dense, protocol: parallel, max_tokens: 512}
    runs: [{}]
  timed_only:
    measurements: [timing]
    runs: [{method: streaming, compress_every: 1}]
"""


def test_measurements_measure_every_configuration_over_samples_and_repeats():
    grid = parse(MEASURED)
    by_experiment = {name: [run.config for run in grid.runs if name in run.experiments] for name in grid.experiments}
    main = by_experiment["main"]
    assert len(main) == 2 * (3 + 2)
    for method in ("recompute", "streaming"):
        runs = [c for c in main if c.method == method]
        quality = [c for c in runs if c.protocol == "parallel"]
        timing = [c for c in runs if c.protocol == "stepwise"]
        assert sorted(c.sample for c in quality) == [0, 1, 2] and {c.max_tokens for c in quality} == {256}
        assert sorted(c.repeat for c in timing) == [0, 1] and {c.max_tokens for c in timing} == {96}
        assert len({c.setting_hash for c in runs}) == 1  # one setting, two measurements
    assert {c.score_stride for c in main if c.method == "recompute" and c.protocol == "parallel"} == {4}
    assert [(c.method, c.max_tokens) for c in by_experiment["long"]] == [("dense", 512)]
    assert {c.protocol for c in by_experiment["timed_only"]} == {"stepwise"}


def test_an_unknown_measurement_or_key_is_named():
    with pytest.raises(GridError, match="measurements: speed not defined"):
        parse(MEASURED.replace("measurements: [timing]", "measurements: [speed]"))
    with pytest.raises(GridError, match="measurement 'quality': unknown key 'samples'"):
        parse(MEASURED.replace("sample: [0, 1, 2]", "samples: [0, 1, 2]"))
    # An experiment's own knob is never silently replaced by a measurement's.
    with pytest.raises(GridError, match="experiment 'timed_only' runs.0. sets max_tokens, which its measurements"):
        parse(MEASURED.replace("{method: streaming, compress_every: 1}", "{method: streaming, max_tokens: 64}"))


def test_gpu_smoke_is_the_main_comparison_at_the_study_size_on_cuda():
    grid = load_grid(ROOT / "grids" / "gpu-smoke.yaml")
    main = [run.config for run in grid.runs if "main" in run.experiments]
    assert {config.method for config in main} == {"recompute", "streaming"}
    assert {config.compress_every for config in main if config.method == "streaming"} == {1, 64}
    assert {(config.cap, config.device, config.dtype) for config in main} == {(2048, "cuda", "float16")}
    assert {config.protocol for config in main} == {"parallel", "stepwise"}


@pytest.mark.parametrize("name, compiled, ends, compiled_repeats", [
    ("paper.yaml", "default", {1, 128}, 1), ("paper-full.yaml", "reduce-overhead", {1, 512}, 3)])
def test_paper_grids_time_the_ring_layout_and_the_compiled_step(name, compiled, ends, compiled_repeats):
    """layout: compact vs ring at strict, lazy and the R sweep's ends; compile: ring eager vs compiled, strict and lazy.
    Timing only (stepwise, the grid's timing measurement: ring refuses the parallel protocol), so each ring setting is
    timed on the tokens of its compact twin, whose runs are main's and r_sweep's (shared, never run twice). On the CPU
    a compiled run compiles for about a minute: paper.yaml's compile experiment times one repeat of each setting."""
    grid = load_grid(ROOT / "grids" / name)
    order = list(grid.experiments)
    before = "quantization_sinks" if name == "paper.yaml" else "cap_mode"
    assert order[order.index(before):order.index(before) + 4] == [before, "layout", "compile", "long_stream"]
    timing = [run.config for run in grid.runs if "main" in run.experiments and run.config.protocol == "stepwise"]
    measured = {(c.prefill, c.max_tokens, c.warmup) for c in timing}
    for experiment in ("layout", "compile"):
        runs = [run for run in grid.runs if experiment in run.experiments]
        assert {run.config.protocol for run in runs} == {"stepwise"}
        assert {(c.prefill, c.max_tokens, c.warmup) for c in (run.config for run in runs)} == measured
        repeats = len({c.repeat for c in timing}) if experiment == "layout" else compiled_repeats
        assert len({run.config.repeat for run in runs}) == repeats and len({c.repeat for c in timing}) >= 3
    layout = {(run.config.layout, run.config.compress_every): run for run in grid.runs if "layout" in run.experiments}
    assert {r for _, r in layout} == {1, 64} | ends and {kind for kind, _ in layout} == {"compact", "ring"}
    assert len(layout) == 2 * len(ends | {64})
    for (kind, r), run in layout.items():
        assert run.config.compile == "none"
        if kind == "compact":  # main's or r_sweep's own timing runs
            assert {"main", "r_sweep"} & set(run.experiments), (r, run.experiments)
    compile_runs = [run.config for run in grid.runs if "compile" in run.experiments]
    assert {(c.layout, c.compile, c.compress_every) for c in compile_runs if c.method == "streaming"} == {
        ("ring", kind, r) for kind in ("none", compiled) for r in (1, 64)}
    # The recompute baseline eager and compiled, on the same tokens: a compiled setting's speedup is over the compiled
    # recompute (compiled against compiled).
    assert {(c.method, c.compile) for c in compile_runs if c.method != "streaming"} == {
        ("recompute", "none"), ("recompute", compiled)}
    assert len({(c.prefill, c.max_tokens, c.warmup, c.cap, c.sample) for c in compile_runs}) == 1
    # The eager ring runs of compile are layout's, the eager recompute runs main's.
    for run in grid.runs:
        if "compile" in run.experiments and run.config.compile == "none":
            assert ("layout" if run.config.method == "streaming" else "main") in run.experiments, run.experiments


def test_gpu_smoke_times_the_ring_compiled_with_cuda_graphs_and_shrinks_to_a_cpu():
    grid = load_grid(ROOT / "grids" / "gpu-smoke.yaml")
    compile_runs = [run.config for run in grid.runs if "compile" in run.experiments]
    assert {(c.layout, c.compile, c.compress_every) for c in compile_runs if c.method == "streaming"} == {
        ("ring", kind, r) for kind in ("none", "reduce-overhead") for r in (1, 64)}
    assert {(c.device, c.protocol, c.cap) for c in compile_runs} == {("cuda", "stepwise", 2048)}
    # The main table's strict and lazy against recompute, compiled against compiled: the recompute baseline compiled
    # too (warmup 16 >= the 3 reduce-overhead needs), its eager runs main's own.
    recompute = [run for run in grid.runs if "compile" in run.experiments and run.config.method == "recompute"]
    assert {run.config.compile for run in recompute} == {"none", "reduce-overhead"}
    assert all("main" in run.experiments for run in recompute if run.config.compile == "none")
    assert len({(c.prefill, c.max_tokens, c.warmup, c.repeat) for c in compile_runs}) == 2  # 2 repeats, one stream
    # What the tests' CPU copy of it sets (tests/fixtures_store.py): reduce-overhead needs CUDA graphs, so the copy
    # runs compile none; without it the grid is refused before any run starts, naming the knob.
    from fixtures_store import SHRUNK_GRIDS

    with pytest.raises(GridError, match="reduce-overhead captures CUDA graphs: device cpu has none"):
        load_grid(ROOT / "grids" / "gpu-smoke.yaml", [s for s in SHRUNK_GRIDS["gpu-smoke"] if s != "compile=none"])
    shrunk = load_grid(ROOT / "grids" / "gpu-smoke.yaml", list(SHRUNK_GRIDS["gpu-smoke"]))
    assert {(run.config.method, run.config.layout) for run in shrunk.runs if "compile" in run.experiments} == {
        ("streaming", "ring"), ("recompute", "compact")}
