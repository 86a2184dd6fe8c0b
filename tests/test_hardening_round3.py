"""Hardening, round 3 (issue 20), one class of fault per section: work bounded before it starts, readers that read only
what the catalog names, refusing before computing, SQL box limits held by the process, signals at every moment, inputs
read as far as needed. Each test is written against the class, not only the case that found it."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import psutil
import pytest
from sqlalchemy import BigInteger, Integer

from gridrun.__main__ import main
from gridrun.spec import GridError, load_grid
from store.schema import KNOB_COLUMNS
from streaming_llm import RunConfig
from streaming_llm.config import INT32_MAX, KNOB_BOUNDS, _integer_knobs, knob_bound

ROOT = Path(__file__).resolve().parent.parent
GOOD = "name: h\nbase: {model: tiny-llama, max_tokens: 64, cap: 32, warmup: 2}\n"
GENERATE = "{mode: generate, prompt_tokens: 16, new_tokens: 8, temperature: 0.5}"


def refused(tmp_path: Path, capsys, grid_text: str, *extra: str, seconds: float = 10.0) -> str:
    """Run the CLI on `grid_text`: exit 2, one line, within `seconds` and 200 MiB, no store folder, no Ray. Returns the
    line."""
    grid, store = tmp_path / "g.yaml", tmp_path / "out" / "store.duckdb"
    grid.write_text(grid_text)
    tracemalloc.start()
    started = time.perf_counter()
    code = main([str(grid), "--store", str(store), *extra])
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert elapsed < seconds and peak < 200 * 2**20, (elapsed, peak)
    assert not store.parent.exists()
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    return err


# --- 1. work bounded before it starts ---------------------------------------------------------------------------------
COLUMN_LIMITS = {Integer: INT32_MAX, BigInteger: 2**63 - 1}


def test_every_integer_knob_is_bounded_within_its_store_column():
    columns = {column.name: column for column in KNOB_COLUMNS}
    knobs = _integer_knobs()
    assert {"seed", "prompt_tokens", "num_draft", "ngram_max", "draft_layers", "draft_cap", "new_tokens"} <= set(knobs)
    for knob in knobs:
        limit = COLUMN_LIMITS[type(columns[knob].type)]
        assert knob_bound(knob) <= limit, knob
    assert set(KNOB_BOUNDS) <= set(knobs)


@pytest.mark.parametrize("knob", _integer_knobs())
@pytest.mark.parametrize("past", ["its bound", "INT32", "INT64"])
def test_an_integer_knob_past_its_bound_is_refused_before_anything(knob, past, tmp_path, capsys):
    value = {"its bound": knob_bound(knob) + 1, "INT32": 2**31, "INT64": 2**63}[past]
    err = refused(tmp_path, capsys, GOOD + f"experiments: {{a: {{runs: [{GENERATE}]}}}}\n", "--set", f"{knob}={value}")
    assert knob in err and f"{value:,}" in err, err


# YAML 1.1 floats need a dot ("1e-320" would be a string, refused for its type instead)
@pytest.mark.parametrize("value", ["1.0e-320", "4.9e-324", "1.0e-300", "2.2250738585072014e-308", ".nan", ".inf",
                                   "-0.0", "0.00001", "101.0"])
def test_a_temperature_without_finite_probabilities_is_refused(value, tmp_path, capsys):
    err = refused(tmp_path, capsys, GOOD + f"experiments: {{a: {{runs: [{GENERATE}]}}}}\n", "--set",
                  f"temperature={value}")
    assert "temperature" in err and ("must be 0 (greedy) or a number" in err or "-0.0" in err), err


def test_the_smallest_allowed_temperature_samples_finite_probabilities():
    import torch

    from streaming_llm.config import MIN_TEMPERATURE
    from streaming_llm.speculative import probabilities

    config = RunConfig.from_dict({"model": "tiny-llama", "mode": "generate", "temperature": MIN_TEMPERATURE,
                                  "cap": 32})
    logits = torch.tensor([[-65504.0, 0.0, 65504.0]])
    assert torch.isfinite(probabilities(logits, config.temperature)).all()


@pytest.mark.parametrize(("condition", "message"), [
    ("sample=false", "sample=False"), ("repeat=true", "repeat=True"), ("method=fast", "method='fast'"),
    ("max_tokens=64.0", "max_tokens=64.0"), ("model=7", "model=7"),
])
def test_where_refuses_a_value_of_another_type(condition, message, tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text(GOOD + "experiments: {a: {grid: {sample: [0, 1]}}}\n")
    assert main(["status", str(grid), "--store", str(tmp_path / "s.duckdb"), "--where", condition]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert len(load_grid(grid).where(["sample=0"]).runs) == 1


def test_where_accepts_an_integer_for_a_float_knob(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text(GOOD + f"experiments: {{a: {{runs: [{GENERATE.replace('0.5', '1.0')}]}}}}\n")
    assert len(load_grid(grid).where(["temperature=1"]).runs) == 1


def lists(count: int, start: int = 0) -> str:
    return "[" + ", ".join(str(start + i) for i in range(count)) + "]"


@pytest.mark.parametrize("measurements", [
    # lists of one measurement multiply (100^3 overlays from 300 values)
    f"{{m: {{sample: {lists(100)}, warmup: {lists(100, 2)}, chunk: {lists(100, 1)}}}}}",
    # several measurements add up, each a product
    f"{{m1: {{sample: {lists(60)}, warmup: {lists(60, 2)}}}, m2: {{sample: {lists(60)}, chunk: {lists(60, 1)}}}}}",
    # a measurement's repeats times its lists
    f"{{m: {{sample: {lists(200)}, repeats: 100}}}}",
    f"{{m: {{sample: {lists(200)}, repeats: [100, 200]}}}}",
])
def test_measurement_lists_are_counted_as_products_before_expanding(measurements, tmp_path, capsys):
    err = refused(tmp_path, capsys, GOOD + f"measurements: {measurements}\n"
                  "experiments: {a: {grid: {compress_every: [1, 2, 4]}}}\n")
    assert "more than 10,000 runs" in err, err


def test_counting_is_exact_for_measurements_and_repeats(tmp_path, monkeypatch):
    import gridrun.spec

    grid = tmp_path / "g.yaml"
    grid.write_text(GOOD.replace("warmup: 2", "warmup: 2, repeats: 3")
                    + "measurements: {q: {sample: [0, 1, 2]}, t: {repeats: 2, protocol: stepwise}}\n"
                    "experiments: {a: {grid: {compress_every: [1, 2]}}}\n")
    # (3 samples x the base's 3 repeats + 2 repeats) x 2 points = 22 runs listed (18 distinct)
    monkeypatch.setattr(gridrun.spec, "MAX_RUNS", 22)
    assert len(load_grid(grid).configurations()) == 18
    monkeypatch.setattr(gridrun.spec, "MAX_RUNS", 21)
    with pytest.raises(GridError, match="more than 21 runs"):
        load_grid(grid)


STUDY = "name: big\nbase: {model: smollm2-135m, max_tokens: 896, prefill: 256, cap: 256, sink: 4}\n"


@pytest.mark.parametrize("bad", [
    "{mode: generate, seed: 5000000000, temperature: 0.5}",  # past the store column
    "{cap: 6, overlap: 4}",  # no window fits the cap (cap_mode peak)
    "{max_tokens: 100, warmup: 200}",  # a plain check, after 9,900 costly runs
])
def test_a_grid_of_9999_study_size_runs_with_one_bad_run_is_refused_in_seconds(bad, tmp_path, capsys):
    text = (STUDY + "experiments:\n"
            f"  a: {{grid: {{sample: {lists(10)}, compress_every: {lists(99, 1)}, slack: {lists(10)}}}}}\n"
            f"  b: {{runs: [{bad}]}}\n")
    assert len(text) < 1024
    err = refused(tmp_path, capsys, text, seconds=30)
    assert "experiment 'b'" in err, err


# --- 2. readers read exactly what the catalog names ------------------------------------------------------------------
TWO_RUNS = ("name: two\nbase: {model: tiny-llama, max_tokens: 40, cap: 32, warmup: 2}\n"
            "experiments: {a: {runs: [{compress_every: 1}, {compress_every: 8}]}}\n")


@pytest.fixture(scope="module")
def two_run_results():
    from gridrun.spec import parse_grid
    from streaming_llm import evaluate

    grid = parse_grid(TWO_RUNS, Path("two.yaml"), [])
    return grid, [evaluate(run.config) for run in grid.runs]


def two_run_store(tmp_path: Path, two_run_results) -> tuple[Path, Path, list[str], int]:
    """A store of a grid's two done runs; returns it, its grid file, the run hashes and the token rows."""
    from store.writer import StoreWriter
    from streaming_llm.environment import code_version

    grid, results = two_run_results
    store, grid_file = tmp_path / "store.duckdb", tmp_path / "two.yaml"
    grid_file.write_text(TWO_RUNS)
    with StoreWriter(store, code_version()) as writer:
        writer.register_grid(grid.name, grid_file, TWO_RUNS, grid.membership(), grid.configurations())
        for result in results:
            writer.record_done(result, worker="t",
                               attempts=1)
    return store, grid_file, [r.config.run_hash for r in results], sum(r.tokens.num_rows for r in results)


def token_file(store: Path, run_hash: str) -> Path:
    return next(store.with_name(store.name + ".segments").glob(f"tokens/run_hash={run_hash}/*/data.parquet"))


def count_tokens(store: Path) -> int:
    import duckdb

    with duckdb.connect(str(store), read_only=True) as con:
        return con.execute("SELECT count(*) FROM tokens").fetchone()[0]


def test_a_stray_parquet_file_beside_a_segment_is_never_read(tmp_path, two_run_results, capsys):
    import shutil

    from store import queries

    store, grid_file, hashes, rows = two_run_store(tmp_path, two_run_results)
    original = token_file(store, hashes[0])
    shutil.copyfile(original, original.with_name("data-copy.parquet"))
    (original.parent.parent / "segment=stray").mkdir()
    shutil.copyfile(original, original.parent.parent / "segment=stray" / "data.parquet")
    assert count_tokens(store) == rows  # plain duckdb, through the catalog's views
    with queries.connect(store) as con:  # the dashboard's and the paper's connection
        assert con.execute("SELECT count(*) FROM tokens").fetchone()[0] == rows
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(store, moved / store.name)  # a moved store: the reader's temporary views list the files too
    shutil.move(store.with_name(store.name + ".segments"), moved / (store.name + ".segments"))
    with queries.connect(moved / store.name) as con:
        assert con.execute("SELECT count(*) FROM tokens").fetchone()[0] == rows
    assert main(["status", str(grid_file), "--store", str(moved / store.name)]) == 2  # but the stray is reported
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and hashes[0] in err and "data-copy.parquet" in err, err


def test_segment_views_name_files_never_a_glob(tmp_path, two_run_results):
    import duckdb

    store, _, _, _ = two_run_store(tmp_path, two_run_results)
    with duckdb.connect(str(store), read_only=True) as con:
        views = con.execute("SELECT view_name, sql FROM duckdb_views() WHERE NOT internal").fetchall()
    per_step = [sql for name, sql in views if name.endswith(("tokens", "compactions", "forwards"))]
    assert len(per_step) == 6 and not any("*" in sql or "?" in sql for sql in per_step), per_step


def damage_segment(store: Path, hashes: list[str], how: str) -> None:
    first, second = token_file(store, hashes[0]), token_file(store, hashes[1])
    if how == "deleted":
        first.unlink()
    elif how == "truncated":
        os.truncate(first, first.stat().st_size // 2)
    elif how == "bit-flipped":
        data = bytearray(first.read_bytes())
        data[len(data) // 2] ^= 0x01
        first.write_bytes(bytes(data))
    elif how == "swapped":
        a, b = first.read_bytes(), second.read_bytes()
        first.write_bytes(b)
        second.write_bytes(a)
    elif how == "stray file":
        first.with_name("data-copy.parquet").write_bytes(first.read_bytes())
    elif how == "garbage stray":
        first.with_name("zz.parquet").write_bytes(b"not parquet at all")


@pytest.mark.parametrize("how", ["deleted", "truncated", "bit-flipped", "swapped", "stray file", "garbage stray"])
def test_a_damaged_segment_is_one_line_naming_the_run_in_status_and_paper_export(how, tmp_path, two_run_results,
                                                                                capsys):
    from paper.__main__ import main as paper_main

    store, grid_file, hashes, _ = two_run_store(tmp_path, two_run_results)
    damage_segment(store, hashes, how)
    assert main(["status", str(grid_file), "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "damaged" in err and hashes[0] in err and "Traceback" not in err, err
    assert paper_main(["export", "--store", str(store), "--grid", "two", "--out", str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert "damaged" in captured.err and hashes[0] in captured.err and "Traceback" not in captured.err, captured
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_store_whose_catalog_lists_no_files_is_refused_by_readers_until_a_writer_lists_them(tmp_path,
                                                                                              two_run_results):
    import duckdb

    from store import queries
    from store.writer import StoreWriter

    store, _, _, rows = two_run_store(tmp_path, two_run_results)
    with duckdb.connect(str(store)) as con:  # as a writer before segment lists wrote it
        con.execute("UPDATE runs SET segment_files = NULL")
    with pytest.raises(queries.StoreError, match="migrate"), queries.connect(store):
        pass
    with StoreWriter(store, "v1"):
        pass
    with queries.connect(store) as con:
        assert con.execute("SELECT count(*) FROM tokens").fetchone()[0] == rows


# --- 3. refuse before computing ---------------------------------------------------------------------------------------
def refused_store(tmp_path: Path, capsys, store: Path) -> str:
    """gridrun on a valid one-run grid into `store`: exit 2, one line, before Ray; returns the line."""
    grid = tmp_path / "g.yaml"
    grid.write_text(GOOD + "experiments: {a: {runs: [{}]}}\n")
    code = main([str(grid), "--store", str(store)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    return err


@pytest.mark.parametrize("name", ["a\\b", "tab\there", "new\nline", "bell\x07"])
def test_a_store_path_duckdb_would_misread_is_refused_and_nothing_is_written(name, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    for store in (folder / name / "store.duckdb", folder / f"{name}.duckdb"):
        err = refused_store(tmp_path, capsys, store)
        assert "backslash or a control character" in err, err
        assert list(folder.iterdir()) == []


@pytest.mark.parametrize("what", ["segment folder", "table folder"])
def test_a_segment_folder_that_cannot_be_written_is_refused_before_ray(what, tmp_path, capsys):
    store = tmp_path / "store.duckdb"
    segments = tmp_path / "store.duckdb.segments"
    if what == "segment folder":
        segments.write_text("not a folder")
    else:
        segments.mkdir()
        (segments / "tokens").write_text("not a folder")
    err = refused_store(tmp_path, capsys, store)
    assert "is not a folder" in err and not store.exists(), err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_segment_folder_is_refused_before_ray(tmp_path, capsys):
    store = tmp_path / "store.duckdb"
    segments = tmp_path / "store.duckdb.segments"
    (segments / "tokens").mkdir(parents=True)
    (segments / "tokens").chmod(0o555)
    try:
        err = refused_store(tmp_path, capsys, store)
    finally:
        (segments / "tokens").chmod(0o755)
    assert "not writable" in err and "tokens" in err, err


def test_a_failed_segment_write_names_the_cause_not_a_full_disk(tmp_path, monkeypatch):
    import errno

    import store.segments as segments_module
    from store.writer import StoreError, StoreWriter
    from streaming_llm import evaluate

    result = evaluate(RunConfig.from_dict({"model": "tiny-llama", "max_tokens": 40, "cap": 32, "warmup": 2}))

    def refuse(final, data):
        raise PermissionError(errno.EACCES, "Permission denied")

    with StoreWriter(tmp_path / "store.duckdb", "v1") as writer, pytest.raises(StoreError) as caught:
        monkeypatch.setattr(segments_module, "_write_durably", refuse)
        writer.record_done(result, worker="t", attempts=1)
    assert "not writable" in str(caught.value) and "full" not in str(caught.value), caught.value


# --- 4. the SQL box's limits hold -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    from store.writer import StoreWriter

    path = tmp_path_factory.mktemp("box") / "store.duckdb"
    with StoreWriter(path, "v1"):
        pass
    return path


@pytest.mark.parametrize("sql", [
    "SELECT len(range(400000000)) AS n",  # a list function: allocated outside DuckDB's buffer manager
    "SELECT length(repeat('x', 3000000000)) AS n",  # one string of 3 GB
    "SELECT len(list(range)) AS n FROM range(400000000)",
])
def test_sql_box_stops_a_statement_at_its_memory_limit_whatever_allocates(sql, empty_store):
    from store import queries

    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(queries.QueryLimit, match="memory limit"):
        queries.run_user_sql(empty_store, sql)
    assert time.perf_counter() - started < 60
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - grown  # KiB: the reader's own peak
    assert grown < 300 * 1024, grown
    assert queries.run_user_sql(empty_store, "SELECT count(*) AS n FROM runs")[0].n.tolist() == [0]


def test_sql_box_time_limit_covers_parsing(empty_store):
    from store import queries

    sql = "SELECT 1 AS n WHERE 1 IN (" + ",".join(str(i) for i in range(4_000_000)) + ")"  # 31 MB to parse
    # Which limit a parse this long reaches first depends on the machine's speed: either is the box's own message.
    either_limit = "stopped (after 2 s|at the SQL box's memory limit)"
    started = time.perf_counter()
    with pytest.raises(queries.QueryLimit, match=either_limit):
        queries.run_user_sql(empty_store, sql, seconds=2)
    assert time.perf_counter() - started < 8
    started = time.perf_counter()
    with pytest.raises(queries.QueryLimit, match=either_limit):  # parsed by the write check, also in the child
        queries.run_user_sql(empty_store, sql.replace("SELECT", "INSERT INTO runs SELECT", 1), seconds=2)
    assert time.perf_counter() - started < 8


def test_sql_box_parse_out_of_memory_is_the_memory_limit_never_invalid_sql(empty_store, monkeypatch):
    import duckdb

    from store import queries

    def parse_out_of_memory(sql):
        raise duckdb.OutOfMemoryException("Out of Memory Error: Failed to allocate block of 16777216 bytes")

    monkeypatch.setattr(duckdb, "extract_statements", parse_out_of_memory)
    with pytest.raises(duckdb.OutOfMemoryException):
        queries.check_read_only("SELECT 1")
    from store import sandbox

    with pytest.raises(queries.QueryLimit, match="memory limit"):
        sandbox._run(str(empty_store), "SELECT 1", 10, sandbox.SQL_BOX_MEMORY)


def test_sql_box_errors_keep_their_kind(empty_store):
    import duckdb

    from store import queries

    with pytest.raises(queries.WriteRefused, match="INSERT"):
        queries.run_user_sql(empty_store, "INSERT INTO meta VALUES ('a', 'b')")
    with pytest.raises(duckdb.CatalogException, match="no_such_table"):
        queries.run_user_sql(empty_store, "SELECT * FROM no_such_table")
    with pytest.raises(queries.StoreError, match="no store"):
        queries.run_user_sql(empty_store.with_name("absent.duckdb"), "SELECT 1")
    frame, more = queries.run_user_sql(empty_store, "SELECT range AS i, [range] AS l FROM range(7)", limit=5)
    assert frame.i.tolist() == [0, 1, 2, 3, 4] and frame.l.tolist()[0] == [0] and more


# --- 5. signals, every moment -----------------------------------------------------------------------------------------
SIGNAL_GRID = ("name: sig\nbase: {model: tiny-llama, dataset: shakespeare, cap: 48, sink: 4, warmup: 2, "
               "method: streaming}\nexperiments: {a: {grid: {max_tokens: [900, 901, 902, 903, 904, 905, 906, 907]}}}\n")
# Validation that takes a while (distinct cap_mode peak policies to resolve): a window for a signal before Ray starts.
SLOW_GRID = ("name: slow\nbase: {model: tiny-llama, max_tokens: 4096, cap: 4000, sink: 4}\n"
             f"experiments: {{a: {{grid: {{compress_every: {lists(200, 1)}, slack: {lists(20)}}}}}}}\n")


def start_driver(grid: Path, store: Path, sigint: signal.Handlers = signal.SIG_DFL) -> subprocess.Popen:
    """`python -m gridrun` in a subprocess with SIGINT's disposition `sigint` (SIG_IGN: as a background job starts)."""
    return subprocess.Popen(
        [sys.executable, "-u", "-m", "gridrun", str(grid), "--store", str(store), "--workers", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, sigint),
    )


def wait_for(driver: subprocess.Popen, ready, timeout: float = 120) -> list[str]:
    """Read the driver's lines until `ready(line)` holds; returns them."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert driver.stdout is not None
    for line in driver.stdout:
        lines.append(line)
        if ready(line):
            return lines
        assert time.monotonic() < deadline, "".join(lines)
    raise AssertionError("the driver ended first:\n" + "".join(lines))


def finish(driver: subprocess.Popen, lines: list[str]) -> tuple[int, str]:
    children = psutil.Process(driver.pid).children(recursive=True)
    rest, _ = driver.communicate(timeout=90)
    _, alive = psutil.wait_procs(children, timeout=15)
    names = [process.name() for process in alive]
    for process in alive:
        process.kill()
    output = "".join(lines) + rest
    assert not names, f"processes left running: {names}\n{output}"
    assert "Traceback" not in output and "Exception ignored" not in output, output
    return driver.returncode, output


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("inherited", [signal.SIG_DFL, signal.SIG_IGN])
def test_a_signal_while_the_grid_is_validated_stops_the_driver(sig, inherited, tmp_path):
    grid, store = tmp_path / "slow.yaml", tmp_path / "store.duckdb"
    grid.write_text(SLOW_GRID)
    driver = start_driver(grid, store, inherited)
    time.sleep(1.5)  # python's start and imports, then the validation
    driver.send_signal(sig)
    code, output = finish(driver, [])
    assert code == 130, output
    assert "interrupted before any run started; nothing was recorded. Resume with:" in output, output
    assert not store.exists()


def test_sigterm_while_ray_starts_says_so_and_how_to_resume(tmp_path):
    grid, store = tmp_path / "sig.yaml", tmp_path / "store.duckdb"
    grid.write_text(SIGNAL_GRID)
    driver = start_driver(grid, store)
    lines = wait_for(driver, lambda line: line.startswith("grid sig: 8 runs"))
    deadline = time.monotonic() + 60
    while not any(p.name() == "gcs_server" for p in psutil.Process(driver.pid).children(recursive=True)):
        assert time.monotonic() < deadline and driver.poll() is None, "Ray's GCS never started"
        time.sleep(0.02)
    driver.send_signal(signal.SIGTERM)  # ray.init is running: its own handler is installed
    code, output = finish(driver, lines)
    assert code == 130, output
    assert "interrupted" in output and "Resume with:" in output, output


def test_repeated_signals_exit_130_without_a_traceback_even_with_sigint_ignored_at_start(tmp_path):
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGINT, signal.SIGTERM)  # the first SIGINT alone must stop it
    grid, store = tmp_path / "sig.yaml", tmp_path / "store.duckdb"
    grid.write_text(SIGNAL_GRID)
    driver = start_driver(grid, store, signal.SIG_IGN)
    lines = wait_for(driver, lambda line: line.startswith("done   1/"))
    for sig in signals:
        driver.send_signal(sig)
        time.sleep(0.05)
    code, output = finish(driver, lines)
    assert code == 130, output
    assert "Ray shut down" in output and "Resume with:" in output, output
    import duckdb

    with duckdb.connect(str(store), read_only=True) as con:
        assert 1 <= con.execute("SELECT count(*) FROM runs WHERE status = 'done'").fetchone()[0] < 8


# --- 6. inputs read as far as needed ----------------------------------------------------------------------------------
def hostile_text(seed: int = 0, words: int = 4000) -> str:
    """Words of every length, runs of spaces and newlines, multi-byte characters: where a prefix may cut a token."""
    rng = random.Random(seed)
    alphabet = "abcdefghij" * 3 + "ÄéΩ漢字😀" + "0123456789" + ".,;'-"
    parts = []
    for _ in range(words):
        parts.append("".join(rng.choice(alphabet) for _ in range(rng.choice([1, 2, 3, 5, 8, 13, 40]))))
        parts.append(rng.choice([" ", " ", " ", "  ", "\n", "\n\n", "\t", " \n "]))
    return "".join(parts)


@pytest.mark.parametrize("model", ["smollm2-135m", "tiny-llama"])
def test_a_text_file_read_in_blocks_gives_the_whole_files_token_ids(model, tmp_path, monkeypatch):
    from streaming_llm import text
    from streaming_llm.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    path = tmp_path / "t.txt"
    whole = hostile_text()
    path.write_text(whole, encoding="utf-8")
    expected = tokenizer.encode(whole)
    for block in (5, 97, 4096):  # blocks that cut characters and words everywhere
        monkeypatch.setattr(text, "FILE_BLOCK_BYTES", block)
        for max_tokens in (2, 17, 300, 1000, len(expected)):
            stream = text.load_stream(tokenizer, "file", max_tokens, text_file=str(path))
            assert stream.ids.tolist() == expected[:max_tokens], (block, max_tokens)
            assert stream.token_hash == text.token_hash(np.asarray(expected[:max_tokens], dtype=np.int64))
    with pytest.raises(text.TextError, match="< max_tokens"):
        text.load_stream(tokenizer, "file", len(expected) + 1, text_file=str(path))


def test_a_large_text_file_is_read_only_as_far_as_max_tokens_needs(tmp_path):
    from streaming_llm import text
    from streaming_llm.models import load_tokenizer

    path = tmp_path / "big.txt"
    chunk = hostile_text(1, 2000).encode()
    with path.open("wb") as handle:
        for _ in range(60 * 2**20 // len(chunk)):
            handle.write(chunk)
    tokenizer = load_tokenizer("smollm2-135m")
    tracemalloc.start()
    started = time.perf_counter()
    stream = text.load_stream(tokenizer, "file", 64, text_file=str(path))
    elapsed, peak = time.perf_counter() - started, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert stream.ids.tolist() == tokenizer.encode(chunk.decode())[:64]
    assert peak < 16 * 2**20 and elapsed < 10, (peak, elapsed)


BINARY_FILES = {
    "invalid UTF-8": b"plain text, then \xff\xfe\x00 bytes",
    "NUL bytes": b"\x00" * 5000,
    "a PNG header": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 20,
    "invalid UTF-8 past the first block": ("word " * 20_000).encode() + b"\xc3\x28",
}


@pytest.mark.parametrize("case", list(BINARY_FILES))
def test_a_binary_text_file_is_one_line_exit_2(case, tmp_path, capsys):
    from streaming_llm.__main__ import main as eval_main

    path = tmp_path / "t.bin"
    path.write_bytes(BINARY_FILES[case])
    max_tokens = 200_000 if "past" in case else 64
    assert eval_main(["eval", "--model", "tiny-llama", "--text-file", str(path), "--max-tokens", str(max_tokens),
                      "--cap", "32", "--warmup", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and ("UTF-8" in err or "NUL" in err), err
    if "past" not in case:  # gridrun refuses it before Ray and the store too
        run = f"{{dataset: file, text_file: '{path}'}}"
        err = refused(tmp_path, capsys, GOOD + f"experiments: {{a: {{runs: [{run}]}}}}\n")
        assert "text_file" in err, err


def model_folder(tmp_path: Path, config: dict | str) -> Path:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return folder


LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 64,
         "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 8192}
BAD_CONFIGS = {
    "num_attention_heads 0": ({**LLAMA, "num_attention_heads": 0}, "num_attention_heads = 0"),
    "num_hidden_layers -1": ({**LLAMA, "num_hidden_layers": -1}, "num_hidden_layers = -1"),
    "hidden_size a string": ({**LLAMA, "hidden_size": "64"}, "hidden_size = '64'"),
    "heads do not divide": ({**LLAMA, "num_attention_heads": 5}, "not a multiple"),
    "kv heads do not divide": ({**LLAMA, "num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
    "text_config heads 0": ({**LLAMA, "text_config": {"num_attention_heads": 0}}, "text_config.num_attention_heads"),
    "deeply nested": ('{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nests more than"),
    "deep objects": ('{"a": ' * 50_000 + "1" + "}" * 50_000, "nests more than"),
    "not JSON": ("{model_type: llama", "not valid JSON"),
    "a list": ("[1, 2]", "not a JSON object"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_a_model_config_transformers_cannot_take_is_one_line_exit_2(case, tmp_path, capsys):
    from streaming_llm.__main__ import main as eval_main

    config, message = BAD_CONFIGS[case]
    folder = model_folder(tmp_path, config)
    assert eval_main(["eval", "--model", str(folder), "--max-tokens", "64", "--cap", "32", "--warmup", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    err = refused(tmp_path, capsys, GOOD.replace("tiny-llama", f"'{folder}'") + "experiments: {a: {runs: [{}]}}\n")
    assert message in err, err

