"""Hostile grid input: every bad file or --set value exits 2 with one line naming the file, experiment, key and fix,
in seconds and bounded memory, before Ray starts or any store file exists; and what only the machine can tell (text
files, GPUs, models, datasets) is checked before the first run too."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import pytest

from gridrun.__main__ import main
from gridrun.preflight import _model_problem
from gridrun.spec import load_grid

ROOT = Path(__file__).resolve().parent.parent
GOOD = "name: h\nbase: {model: tiny-llama, max_tokens: 64, cap: 32, warmup: 2}\n"


def bomb(levels: int = 8, width: int = 9) -> str:
    lines = ['l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * width) + "]")
    return GOOD + "\n".join(lines) + "\nexperiments: {a: {runs: [{}]}}\n"


def experiment(body: str) -> str:
    return GOOD + f"experiments:\n  a: {body}\n"


BAD_FILES = {
    "latin-1": ("name: caf\xe9\nexperiments: {a: {runs: [{}]}}\n".encode("latin-1"), "is not UTF-8"),
    "utf-16 with a BOM": (experiment("{runs: [{}]}").encode("utf-16"), "UTF-16"),
    "NUL bytes": (b"name: h\x00\n", "NUL"),
    "deep lists": (("name: h\nbase: " + "[" * 50_000 + "]" * 50_000 + "\n").encode(), "nested more than"),
    "deep mappings": (("name: h\nbase: " + "{a: " * 5_000 + "1" + "}" * 5_000 + "\n").encode(), "nested more than"),
    "alias bomb": (bomb().encode(), "expands to more than"),
    "recursive alias": (b"name: h\nbase: &a {x: *a}\nexperiments: {a: {runs: [{}]}}\n", "expands to more than"),
    "2 MB file": (("# padding\n" * 200_000 + GOOD).encode(), "larger than"),
    "repeats 1e9": (experiment("{base: {repeats: 1000000000}, runs: [{}]}").encode(), "repeats"),
    "cap 1e9 peak": (experiment("{runs: [{cap: 1000000000, cap_mode: peak}]}").encode(), "cap 1,000,000,000"),
    "compress_every 1e9": (experiment("{runs: [{compress_every: 1000000000}]}").encode(), "compress_every"),
    "huge slack": (experiment("{runs: [{slack: 123456789012}]}").encode(), "slack"),
    "max_tokens 1e23": (experiment("{runs: [{max_tokens: 100000000000000000000000}]}").encode(), "max_tokens"),
    "sample > INT32": (experiment("{runs: [{sample: 2147483648}]}").encode(), "sample"),
    "repeat > INT32": (experiment("{runs: [{repeat: 2147483648}]}").encode(), "repeat"),
    "chunk > INT32": (experiment("{runs: [{protocol: parallel, chunk: 2147483648}]}").encode(), "chunk"),
    "product of lists": (experiment("{grid: {sink: [0,1,2,3,4,5,6,7,8,9], slack: [0,1,2,3,4,5,6,7,8,9], "
                                    "overlap: [0,1,2,3,4,5,6,7,8,9], max_drop: [0,1,2,3,4,5,6,7,8,9], "
                                    "repeats: [1,2,3,4,5,6,7,8,9,10]}}").encode(), "more than 10,000 runs"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_grid_file_is_one_line_exit_2_fast_small_and_before_anything(case, tmp_path, capsys):
    data, message = BAD_FILES[case]
    grid, store = tmp_path / "bad.yaml", tmp_path / "out" / "store.duckdb"
    grid.write_bytes(data)
    tracemalloc.start()
    started = time.perf_counter()
    code = main([str(grid), "--store", str(store)])
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"error: {grid}") and message in err, err
    assert seconds < 5 and peak < 100 * 2**20, (seconds, peak)  # ~0.1 s on an idle machine
    assert not store.parent.exists()  # no store file, no folder, no lock
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


@pytest.mark.parametrize(("value", "message"), [
    ("cap=1000000000000", "cap 1,000,000,000,000"),
    ("model=[a, b]", "not a YAML scalar"),
    ("max_tokens=&a [*a, *a]", "not a YAML scalar"),
    ("repeats=1000000000", "repeats"),
])
def test_a_bad_set_value_is_refused_the_same_way(value, message, tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text(experiment("{runs: [{}]}"))
    assert main([str(grid), "--store", str(tmp_path / "s" / "store.duckdb"), "--set", value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "s").exists()


def test_no_traceback_from_the_command_line(tmp_path):
    grid = tmp_path / "bad.yaml"
    grid.write_bytes(BAD_FILES["deep lists"][0])
    result = subprocess.run([sys.executable, "-m", "gridrun", str(grid), "--store", str(tmp_path / "s.duckdb")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_merge_keys_expand_as_yaml_defines(tmp_path):
    merged, plain = tmp_path / "merged.yaml", tmp_path / "plain.yaml"
    merged.write_text(textwrap.dedent("""
        name: h
        base: &b {model: tiny-llama, max_tokens: 64, warmup: 2}
        experiments:
          a:
            runs:
              - {<<: *b, method: streaming, cap: 32, sink: 4, compress_every: 4}
              - {<<: *b, method: streaming, cap: 32, sink: 2, warmup: 3}
    """))
    plain.write_text(textwrap.dedent("""
        name: h
        base: {model: tiny-llama, max_tokens: 64, warmup: 2}
        experiments:
          a: {runs: [{method: streaming, cap: 32, sink: 4, compress_every: 4},
                     {method: streaming, cap: 32, sink: 2, warmup: 3}]}
    """))
    assert [r.run_hash for r in load_grid(merged).runs] == [r.run_hash for r in load_grid(plain).runs]


def test_the_largest_allowed_values_still_validate_in_seconds(tmp_path):
    grid = tmp_path / "big.yaml"
    grid.write_text(experiment("{runs: [{cap: 16380, max_tokens: 4000000, prefill: 0}]}"))
    started = time.perf_counter()
    assert len(load_grid(grid).runs) == 1
    assert time.perf_counter() - started < 10


# --- what only the machine can tell -----------------------------------------------------------------------------------
def run_cli(tmp_path, run: str, capsys, *extra: str) -> tuple[int, str]:
    grid, store = tmp_path / "g.yaml", tmp_path / "s" / "store.duckdb"
    grid.write_text(experiment(f"{{runs: [{run}]}}"))
    code = main([str(grid), "--store", str(store), *extra])
    err = capsys.readouterr().err
    assert not store.parent.exists()
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    return code, err


def test_a_missing_text_file_is_refused_before_anything(tmp_path, capsys):
    code, err = run_cli(tmp_path, "{dataset: file, text_file: no-such-file.txt}", capsys)
    assert code == 2 and "experiment 'a': text_file: 'no-such-file.txt' is not a file" in err, err


def test_device_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, err = run_cli(tmp_path, "{device: cuda}", capsys)
    assert code == 2 and "device: cuda, but this machine has no CUDA GPU" in err, err


@pytest.mark.parametrize(("run", "message"), [
    ("{model: ./no-such-folder}", "not a model folder"),
    ("{model: no-such-org/no-such-model}", "not in the local hub cache"),
    ("{dataset: pg19, dataset_source: ./no/such/folder}", "is not a folder"),
    ("{dataset: wikitext}", "HF_HUB_OFFLINE is set"),
])
def test_models_and_datasets_that_cannot_be_found_offline_are_refused(run, message, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, err = run_cli(tmp_path, run, capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_a_hub_model_in_the_local_cache_is_accepted(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--some-org--some-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--some-org--some-model" / "refs").mkdir()
    (tmp_path / "models--some-org--some-model" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert _model_problem("some-org/some-model") is None
    assert "not in the local hub cache" in (_model_problem("some-org/other-model") or "")


def test_a_kv_quant_group_the_model_cannot_take_is_refused_before_ray_and_the_store(tmp_path, capsys):
    grid, store = tmp_path / "g.yaml", tmp_path / "s" / "store.duckdb"
    grid.write_text(experiment("{runs: [{method: streaming, cap: 64, kv_quant: int8, kv_quant_group: 32}]}"))
    assert main([str(grid), "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "kv_quant_group: kv_quant_group = 32 does not divide head_dim = 16" in err, err
    assert "use a divisor of 16 (2, 4, 8, 16)" in err, err
    assert not store.parent.exists()
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_ray_failing_to_start_is_one_line_and_no_traceback(tmp_path, capsys, monkeypatch):
    import ray

    def timed_out(*args, **kwargs):
        raise Exception("The current node timed out during startup. This could happen because some of the raylet "
                        "failed to startup or the GCS has become overloaded.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", timed_out)
    grid, store = tmp_path / "g.yaml", tmp_path / "store.duckdb"
    grid.write_text(experiment("{runs: [{method: streaming, cap: 32}]}"))
    assert main([str(grid), "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a local Ray could not be started or joined (The current node timed out" in err
    assert "run the same command again" in err


def test_the_pre_load_check_leaves_a_model_it_cannot_read_to_the_worker(tmp_path):
    """A config without attention heads (Mamba) or a hub id that is not cached: gridrun's check says nothing, downloads
    nothing, and never crashes; the worker reports the model's own error with the run."""
    from gridrun.preflight import _architecture_problem
    from streaming_llm import RunConfig

    mamba = tmp_path / "mamba"
    mamba.mkdir()
    (mamba / "config.json").write_text('{"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2, '
                                       '"vocab_size": 256}')
    knobs = dict(method="streaming", cap=64, kv_quant="int8", kv_quant_group=32)
    assert _architecture_problem(RunConfig(model=str(mamba), **knobs)) is None
    assert "does not divide head_dim = 16" in _architecture_problem(RunConfig(model="tiny-llama", **knobs))
