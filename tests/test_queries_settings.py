"""Settings as the unit of the paper's tables: quality over text samples (parallel runs), timing over repeats
(stepwise runs), ΔPPL paired per sample with the recompute baseline; checked against numbers computed here from the
runs themselves, written by the store's own writer (no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from store import queries
from store.writer import StoreWriter
from streaming_llm import LoadedModel, RunConfig, evaluate
from streaming_llm.results import RunResult

SETTINGS = {
    "recompute": dict(method="recompute", cap=32),
    "strict": dict(method="streaming", cap=32, sink=4, compress_every=1),
    "lazy": dict(method="streaming", cap=32, sink=4, compress_every=8),
}
SAMPLES = (0, 1, 2)
REPEATS = (0, 1)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_models) -> tuple[Path, dict]:
    loaded: LoadedModel = tiny_models["tiny-llama"]
    common = dict(model="tiny-llama", attn_implementation="eager", device="cpu")
    runs: dict[str, dict[str, list]] = {}
    for name, knobs in SETTINGS.items():
        quality = [evaluate(RunConfig(**common, **knobs, protocol="parallel", chunk=40, max_tokens=160, sample=sample),
                            loaded=loaded) for sample in SAMPLES]
        timing = [evaluate(RunConfig(**common, **knobs, max_tokens=60, prefill=24, warmup=2, repeat=repeat),
                           loaded=loaded) for repeat in REPEATS]
        runs[name] = {"quality": quality, "timing": timing}
    path = tmp_path_factory.mktemp("settings") / "store.duckdb"
    results = [result for kinds in runs.values() for group in kinds.values() for result in group]
    with StoreWriter(path, results[0].summary["environment"]["code_version"]) as writer:
        writer.register_grid("g", Path("g.yaml"), "name: g\n", [("main", r.config.run_hash) for r in results])
        for result in results:
            writer.record_done(result, worker="test:1",
                               attempts=1)
    return path, runs


def test_quality_is_over_samples_and_timing_over_repeats(store):
    path, runs = store
    with queries.connect(path) as con:
        table = queries.setting_table(con, "g").set_index("method", drop=False)
    assert len(table) == 3
    for name, kinds in runs.items():
        row = table[(table.method == kinds["quality"][0].config.method)
                    & (table.compress_every == kinds["quality"][0].config.compress_every)].iloc[0]
        ppls = np.array([r.summary["ppl"] for r in kinds["quality"]])
        tpots = np.array([r.summary["tpot_ms_mean"] for r in kinds["timing"]])
        assert row.n_samples == len(SAMPLES) and row.n_repeats == len(REPEATS), name
        assert row.quality_protocol == "parallel" and row.quality_tokens == 160
        assert row.ppl == pytest.approx(ppls.mean()) and row.ppl_std == pytest.approx(ppls.std(ddof=1))
        assert row.tpot_ms == pytest.approx(tpots.mean()) and row.tpot_ms_std == pytest.approx(tpots.std(ddof=1))
        assert row.setting_hash == kinds["timing"][0].config.setting_hash
        assert set(row.run_hashes) == {r.config.run_hash for r in kinds["timing"]}
        # The timing runs read other tokens (60, with a prefill): their PPL is in no quality number.
        assert not np.isclose(row.ppl, np.mean([r.summary["ppl"] for r in kinds["timing"]]))


def test_delta_ppl_is_paired_per_sample_and_speedup_is_over_stepwise_timing(store):
    path, runs = store
    with queries.connect(path) as con:
        table = queries.setting_table(con, "g")
    base_ppl = {r.config.sample: r.summary["ppl"] for r in runs["recompute"]["quality"]}
    base_tpot = np.mean([r.summary["tpot_ms_mean"] for r in runs["recompute"]["timing"]])
    for name in ("strict", "lazy"):
        kinds = runs[name]
        row = table[table.setting_hash == kinds["quality"][0].config.setting_hash].iloc[0]
        deltas = np.array([100 * (r.summary["ppl"] / base_ppl[r.config.sample] - 1) for r in kinds["quality"]])
        assert row.n_pairs == 3
        assert row.delta_ppl_pct == pytest.approx(deltas.mean())
        assert row.delta_ppl_pct_std == pytest.approx(deltas.std(ddof=1))
        assert row.agree == int((np.sign(deltas) == np.sign(deltas.mean())).sum())
        # The 95 % Student-t interval over the 3 samples: t_{0.975, 2} = 4.3027 (any table of t quantiles).
        half = 4.302652729749752 * deltas.std(ddof=1) / np.sqrt(3)
        assert row.delta_ppl_ci == pytest.approx(half, rel=1e-9)
        assert (row.delta_ppl_low, row.delta_ppl_high) == pytest.approx((deltas.mean() - half, deltas.mean() + half))
        assert row.delta_ppl_resolved == (deltas.mean() - half > 0 or deltas.mean() + half < 0)
        tpot = np.mean([r.summary["tpot_ms_mean"] for r in kinds["timing"]])
        assert row.speedup == pytest.approx(base_tpot / tpot)
        assert not row.is_baseline
    assert table[table.method == "recompute"].iloc[0].is_baseline


def test_a_setting_with_only_parallel_runs_has_quality_and_no_timing(tmp_path, tiny_models):
    loaded = tiny_models["tiny-llama"]
    results = [evaluate(RunConfig(model="tiny-llama", attn_implementation="eager", device="cpu", method="dense",
                                  protocol="parallel", max_tokens=80, sample=sample), loaded=loaded)
               for sample in (0, 1)]
    path = tmp_path / "store.duckdb"
    with StoreWriter(path, results[0].summary["environment"]["code_version"]) as writer:
        writer.register_grid("g", Path("g.yaml"), "name: g\n", [("main", r.config.run_hash) for r in results])
        for result in results:
            writer.record_done(result, worker="t",
                               attempts=1)
    with queries.connect(path) as con:
        row = queries.setting_table(con, "g").iloc[0]
    assert row.n_samples == 2 and row.n_repeats == 0
    assert pd.isna(row.tpot_ms) and pd.isna(row.speedup) and pd.isna(row.pareto)


def test_delta_against_a_strided_baseline_is_paired_on_its_steps(tmp_path, tiny_models):
    loaded = tiny_models["tiny-llama"]
    common = dict(model="tiny-llama", attn_implementation="eager", device="cpu", protocol="parallel", max_tokens=150)
    base = [evaluate(RunConfig(**common, method="recompute", cap=32, score_stride=5, sample=s), loaded=loaded)
            for s in (0, 1)]
    lazy = [evaluate(RunConfig(**common, method="streaming", cap=32, compress_every=8, sample=s), loaded=loaded)
            for s in (0, 1)]
    path = tmp_path / "store.duckdb"
    with StoreWriter(path, base[0].summary["environment"]["code_version"]) as writer:
        writer.register_grid("g", Path("g.yaml"), "name: g\n", [("main", r.config.run_hash) for r in base + lazy])
        for result in base + lazy:
            writer.record_done(result, worker="t",
                               attempts=1)
    deltas = []
    for b, x in zip(base, lazy, strict=True):
        steps = b.tokens.column("step").to_numpy()
        assert len(steps) == 30  # every 5th of 149 steps
        x_nll = x.tokens.column("nll").to_numpy()[steps]
        deltas.append(100 * (np.exp(x_nll.mean() - b.tokens.column("nll").to_numpy().mean()) - 1))
    with queries.connect(path) as con:
        row = queries.setting_table(con, "g").set_index("method").loc["streaming"]
    assert row.n_pairs == 2 and row.delta_ppl_pct == pytest.approx(np.mean(deltas))
    # The setting's own PPL is over all its steps; only the comparison is restricted to the baseline's.
    assert row.ppl == pytest.approx(np.mean([x.summary["ppl"] for x in lazy]))


def test_a_quantized_setting_is_paired_with_its_float_setting_on_the_same_tokens(tmp_path, tiny_models):
    """ΔPPL vs float per text sample (the same policy with kv_quant none), over the steps both scored, and the TPOT
    ratio over the float setting's timing on the same tokens; a float setting has no float comparison."""
    loaded = tiny_models["tiny-llama"]
    common = dict(model="tiny-llama", attn_implementation="eager", device="cpu", method="streaming", cap=32, sink=4,
                  compress_every=8, max_tokens=72, prefill=32, kv_quant_group=8)
    runs = {kv: [evaluate(RunConfig(**common, kv_quant=kv, sample=sample), loaded=loaded) for sample in (0, 1, 2)]
            for kv in ("none", "int4")}
    path = tmp_path / "store.duckdb"
    results = [r for kind in runs.values() for r in kind]
    with StoreWriter(path, results[0].summary["environment"]["code_version"]) as writer:
        writer.register_grid("g", Path("g.yaml"), "name: g\n", [("quantization", r.config.run_hash) for r in results])
        for result in results:
            writer.record_done(result, worker="t",
                               attempts=1)
    with queries.connect(path) as con:
        table = queries.setting_table(con, "g").set_index("kv_quant")
    def mean_nll(result) -> float:
        return float(result.tokens.column("nll").to_numpy().mean())

    deltas = np.array([100 * (np.exp(mean_nll(q) - mean_nll(f)) - 1)
                       for q, f in zip(runs["int4"], runs["none"], strict=True)])
    row = table.loc["int4"]
    assert row.n_float_pairs == 3 and row.delta_float_pct == pytest.approx(deltas.mean())
    assert row.delta_float_ci == pytest.approx(4.302652729749752 * deltas.std(ddof=1) / np.sqrt(3))
    # Timing: the stepwise runs of sample 0..2 are one measurement per sample; the float one on the same tokens.
    (timed,) = [r for r in runs["int4"] if r.config.run_hash in set(row.run_hashes)]
    (reference,) = [r for r in runs["none"] if r.config.sample == timed.config.sample]
    assert row.tpot_ratio == pytest.approx(timed.summary["tpot_ms_mean"] / reference.summary["tpot_ms_mean"])
    assert pd.isna(table.loc["none"].delta_float_pct) and table.loc["none"].n_float_pairs == 0


def _as_compiled(result: RunResult, speed: float, compile_s: float) -> RunResult:
    """`result` as if its decode step had been compiled (compile default): the same tokens and NLLs (a compiled step
    gives eager's, the engine's exactness tests), `speed` times its TPOT's pace and a compile time. Stands in for a
    compiled run, which takes a minute of inductor here: what is tested is which timing a setting is paired with."""
    config = RunConfig(**result.config.model_dump() | {"compile": "default"})
    summary = result.summary | {"tpot_ms_mean": result.summary["tpot_ms_mean"] / speed, "compile_s": compile_s}
    return RunResult(config, summary, dict(result.tables))


@pytest.fixture(scope="module")
def compiled_store(tmp_path_factory, tiny_models) -> tuple[Path, dict[str, list[RunResult]]]:
    """Stepwise timing runs on the same tokens: recompute (2 repeats) and ring lazy R=8, each eager and compiled, in
    grid `g`; grid `h` holds the same runs but the compiled recompute."""
    loaded: LoadedModel = tiny_models["tiny-llama"]
    common = dict(model="tiny-llama", attn_implementation="eager", device="cpu", max_tokens=60, prefill=24, warmup=2,
                  cap=32)
    eager = {
        "recompute": [evaluate(RunConfig(**common, method="recompute", repeat=r), loaded=loaded) for r in (0, 1)],
        "ring": [evaluate(RunConfig(**common, method="streaming", sink=4, compress_every=8, layout="ring"),
                          loaded=loaded)],
    }
    # Other paces for the compiled recompute and ring (3x, 1.5x): a compiled setting paired with the eager recompute
    # would show a speedup 3x too large, and one paired with both would show twice.
    runs = {**eager, "recompute compiled": [_as_compiled(r, 3.0, 2.0) for r in eager["recompute"]],
            "ring compiled": [_as_compiled(r, 1.5, 4.0) for r in eager["ring"]]}
    path = tmp_path_factory.mktemp("compiled") / "store.duckdb"
    every = [r for kind in runs.values() for r in kind]
    with StoreWriter(path, every[0].summary["environment"]["code_version"]) as writer:
        writer.register_grid("g", Path("g.yaml"), "name: g\n", [("compile", r.config.run_hash) for r in every])
        writer.register_grid("h", Path("h.yaml"), "name: h\n", [("compile", r.config.run_hash) for r in every
                                                                 if r not in runs["recompute compiled"]])
        for result in every:
            writer.record_done(result, worker="t", attempts=1)
    return path, runs


def _tpot(results: list[RunResult]) -> float:
    return float(np.mean([r.summary["tpot_ms_mean"] for r in results]))


def test_a_compiled_setting_is_timed_against_the_compiled_recompute_and_an_eager_one_against_the_eager(
        compiled_store):
    """Compiled against compiled: each setting once (the eager and the compiled recompute are both on its tokens),
    its speedup the recompute's TPOT with the same `compile` over its own."""
    path, runs = compiled_store
    with queries.connect(path) as con:
        table = queries.setting_table(con, "g")
    assert len(table) == 4 and table.setting_hash.is_unique
    for name, base in (("recompute", "recompute"), ("ring", "recompute"),
                       ("recompute compiled", "recompute compiled"), ("ring compiled", "recompute compiled")):
        (row,) = table[table.setting_hash == runs[name][0].config.setting_hash].itertuples()
        assert row.compile == runs[name][0].config.compile and row.tpot_ms == pytest.approx(_tpot(runs[name]))
        assert row.speedup == pytest.approx(_tpot(runs[base]) / _tpot(runs[name])), name
    compiled_ring = table[table.setting_hash == runs["ring compiled"][0].config.setting_hash].iloc[0]
    assert compiled_ring.speedup == pytest.approx(1.5 / 3.0 * _tpot(runs["recompute"]) / _tpot(runs["ring"]))


def test_a_compiled_setting_without_a_compiled_recompute_has_no_speedup(compiled_store):
    """Never an eager baseline for a compiled setting: NULL, which the paper's completeness check reports."""
    path, runs = compiled_store
    with queries.connect(path) as con:
        table = queries.setting_table(con, "h").set_index("setting_hash")
    assert len(table) == 3
    assert pd.isna(table.loc[runs["ring compiled"][0].config.setting_hash].speedup)
    ring = table.loc[runs["ring"][0].config.setting_hash]
    assert ring.speedup == pytest.approx(_tpot(runs["recompute"]) / _tpot(runs["ring"]))
