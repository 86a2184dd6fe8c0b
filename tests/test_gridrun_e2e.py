"""gridrun end to end on a local Ray with CPU actors and tiny-llama: exactly-once rows, SQL equal to evaluate(), resume,
a failing run, a SIGKILLed actor, Ctrl-C on the driver, a reader while the grid writes, foreign stores.

One Ray instance serves the module (Ray starts in seconds on 2 cores); the Ctrl-C test starts its own in a subprocess.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import psutil
import pytest

from gridrun.__main__ import main
from gridrun.driver import GridRunner
from gridrun.spec import load_grid
from streaming_llm import RunConfig, evaluate
from streaming_llm.environment import code_version

ROOT = Path(__file__).resolve().parent.parent
TINY = "model: tiny-llama, dataset: shakespeare, cap: 48, sink: 4, warmup: 2"


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=128 * 1024**2)
    yield
    ray.shutdown()


def write_grid(folder: Path, body: str, name: str = "t") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def run_grid(path: Path, store: Path, **options):
    whole = load_grid(path)
    out = io.StringIO()
    report = GridRunner(whole, store, code_version(), out=out, **options).run()
    return report, out.getvalue()


def query(store: Path, sql: str, params: list | None = None) -> list[tuple]:
    with duckdb.connect(str(store), read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


GRID = f"""
name: e2e
base: {{{TINY}, max_tokens: 160}}
experiments:
  main:
    base: {{repeats: 2}}
    runs: [{{method: recompute}}, {{method: streaming, compress_every: 1}}]
  r_sweep:
    base: {{method: streaming}}
    grid: {{compress_every: [1, 8]}}
"""


def test_grid_stores_every_run_once_equal_to_evaluate_and_resumes(ray_local, tmp_path):
    grid_path, store = write_grid(tmp_path, GRID), tmp_path / "store.duckdb"
    grid = load_grid(grid_path)
    assert len(grid.runs) == 5  # 2 x 2 in main, R=8 new in r_sweep
    report, out = run_grid(grid_path, store, workers=2)
    assert report.complete and report.done == 5, out
    assert query(store, "SELECT count(*), count(DISTINCT run_hash) FROM runs WHERE status = 'done'") == [(5, 5)]
    assert query(store, "SELECT count(*) FROM tokens") == [(5 * 159,)]
    assert query(store, "SELECT run_hash, count(*) FROM tokens GROUP BY 1 HAVING count(*) <> 159") == []
    membership = query(store, "SELECT experiment, count(*) FROM experiments WHERE grid = 'e2e' GROUP BY 1 ORDER BY 1")
    assert membership == [("main", 4), ("r_sweep", 2)]

    # The stored numbers are evaluate()'s: same model, text and thread count (the actors run one thread each).
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = RunConfig.from_dict({"model": "tiny-llama", "cap": 48, "sink": 4, "warmup": 2, "max_tokens": 160,
                                      "method": "streaming", "compress_every": 8})
        direct = evaluate(config)
    finally:
        torch.set_num_threads(threads)
    stored = query(store, "SELECT nll, kv_len, token_id, compacted FROM tokens WHERE run_hash = ? ORDER BY step",
                   [config.run_hash])
    np.testing.assert_allclose([row[0] for row in stored], direct.tokens.column("nll").to_numpy(), rtol=1e-12)
    assert [row[1] for row in stored] == direct.tokens.column("kv_len").to_pylist()
    assert [row[2] for row in stored] == direct.tokens.column("token_id").to_pylist()
    assert [row[3] for row in stored] == direct.tokens.column("compacted").to_pylist()
    (ppl, compactions), = query(store, "SELECT ppl, compaction_count FROM runs WHERE run_hash = ?", [config.run_hash])
    assert ppl == pytest.approx(direct.summary["ppl"], rel=1e-12)
    assert compactions == direct.summary["compaction_count"]

    # Resume: everything is done, nothing runs, nothing is added.
    before = query(store, "SELECT run_hash, recorded_at FROM runs ORDER BY 1")
    report, out = run_grid(grid_path, store)
    assert (report.complete, report.done, report.skipped) == (True, 0, 5), out
    assert query(store, "SELECT run_hash, recorded_at FROM runs ORDER BY 1") == before

    # --force reruns; the earlier results are kept as superseded, the current tables hold each run once.
    report, _ = run_grid(grid_path, store, force=True, workers=1)
    assert report.done == 5
    assert query(store, "SELECT count(*) FROM tokens") == [(5 * 159,)]
    assert query(store, "SELECT count(*) FROM superseded_tokens") == [(5 * 159,)]


def test_a_failing_run_is_marked_failed_with_its_error_and_the_others_finish(ray_local, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short for the run")
    grid_path = write_grid(tmp_path, f"""
        name: failing
        base: {{{TINY}, max_tokens: 120, method: streaming}}
        experiments:
          a:
            runs: [{{compress_every: 1}}, {{compress_every: 4}}, {{dataset: file, text_file: {short}}}]
    """)
    store = tmp_path / "store.duckdb"
    report, out = run_grid(grid_path, store, workers=1)
    assert not report.complete and report.done == 2 and len(report.failed) == 1, out
    (status, error, attempts, tokens), = query(
        store, "SELECT status, error, attempts, (SELECT count(*) FROM tokens t WHERE t.run_hash = r.run_hash) "
               "FROM runs r WHERE dataset = 'file'")
    assert (status, attempts, tokens) == ("failed", 1, 0)
    assert "< max_tokens = 120" in error or "shorter" in error, error
    assert "FAILED" in out

    short.write_text("long enough now. " * 20)
    report, out = run_grid(grid_path, store, workers=1)
    assert report.complete and (report.done, report.skipped) == (1, 2), out
    assert query(store, "SELECT status, attempts FROM runs WHERE dataset = 'file'") == [("done", 2)]


class KillWorker:
    """Events observer: SIGKILLs the actor running `run_hash` `delay` seconds into its first attempt."""

    def __init__(self, run_hash: str, delay: float):
        self.run_hash, self.delay, self.killed = run_hash, delay, []

    def run_started(self, slot, run) -> None:
        if run.run_hash == self.run_hash and not self.killed:
            pid = slot.info["pid"]
            self.killed.append(pid)
            threading.Timer(self.delay, os.kill, (pid, signal.SIGKILL)).start()

    def worker_ready(self, slot) -> None: ...

    def worker_lost(self, slot, run, reason, retry) -> None: ...

    def tick(self) -> None: ...


@pytest.mark.parametrize("retries", [1, 0])
def test_a_killed_worker_costs_one_attempt_and_leaves_no_partial_rows(ray_local, tmp_path, retries):
    grid_path = write_grid(tmp_path, f"""
        name: kill
        base: {{{TINY}, method: streaming}}
        experiments:
          a: {{runs: [{{max_tokens: 2000, compress_every: 16}}, {{max_tokens: 150}}, {{max_tokens: 151}}]}}
    """)
    store = tmp_path / "store.duckdb"
    long_run = next(run for run in load_grid(grid_path).runs if run.config.max_tokens == 2000)
    killer = KillWorker(long_run.run_hash, delay=0.8)  # the run takes 2 s or more: the kill lands mid-run
    report, out = run_grid(grid_path, store, workers=1, retries=retries, events=killer)
    assert killer.killed and not psutil.pid_exists(killer.killed[0]), out
    rows = query(store, "SELECT status, attempts, error, (SELECT count(*) FROM tokens t WHERE t.run_hash = r.run_hash)"
                        " FROM runs r WHERE run_hash = ?", [long_run.run_hash])
    assert query(store, "SELECT count(*) FROM runs WHERE status = 'done' AND max_tokens < 200") == [(2,)]
    if retries:
        assert report.complete, out
        assert rows == [("done", 2, None, 1999)]
    else:
        assert not report.complete and report.failed == [long_run.run_hash], out
        status, attempts, error, tokens = rows[0]
        assert (status, attempts, tokens) == ("failed", 1, 0)
        assert "died during the run" in error


READER = textwrap.dedent("""
    import os, sys, time, duckdb
    store, stop = sys.argv[1], sys.argv[2]
    while not os.path.exists(stop):
        if os.path.exists(store):
            try:
                con = duckdb.connect(store, read_only=True)
                row = con.execute(
                    "SELECT (SELECT count(*) FROM runs WHERE status = 'done'), (SELECT count(*) FROM tokens), "
                    "(SELECT coalesce(sum(max_tokens - 1), 0) FROM runs WHERE status = 'done')").fetchall()[0]
                con.close()
                print(*row, flush=True)
            except Exception as exc:
                print("ERROR", type(exc).__name__, exc, flush=True)
        time.sleep(0.02)
""")


def test_readers_see_whole_runs_while_the_grid_writes(ray_local, tmp_path):
    grid_path = write_grid(tmp_path, f"""
        name: reading
        base: {{{TINY}, method: streaming}}
        experiments:
          a: {{grid: {{max_tokens: [300, 301, 302, 303, 304, 305]}}}}
    """)
    store, stop = tmp_path / "store.duckdb", tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(store), str(stop)], stdout=subprocess.PIPE, text=True)
    try:
        report, out = run_grid(grid_path, store, workers=2)
        time.sleep(0.5)
    finally:
        stop.touch()
        seen, _ = reader.communicate(timeout=60)
    assert report.complete, out
    lines = seen.splitlines()
    assert lines and not [line for line in lines if line.startswith("ERROR")], seen[:2000]
    snapshots = [tuple(int(x) for x in line.split()) for line in lines]
    assert all(tokens == expected for _, tokens, expected in snapshots), "a reader saw part of a run"
    done = [runs for runs, _, _ in snapshots]
    assert done == sorted(done) and done[-1] == 6 and len(set(done)) >= 3  # readers saw runs arrive one by one


INTERRUPTED = f"""
    name: interrupted
    base: {{{TINY}, method: streaming}}
    experiments:
      a: {{grid: {{max_tokens: [900, 901, 902, 903, 904, 905, 906, 907]}}}}
"""


def start_driver_and_stop_it(grid_path: Path, store: Path, sig: int, after: str) -> tuple[int, str]:
    """Run the CLI in a subprocess (with its own local Ray), send `sig` once a line starts with `after`; then check
    that the processes it started are gone. Returns the exit code and the output."""
    driver = subprocess.Popen(
        [sys.executable, "-u", "-m", "gridrun", str(grid_path), "--store", str(store), "--workers", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # Ctrl-C as at a terminal, however pytest was started: a shell's background job (`cmd &` without job control)
        # ignores SIGINT, and a child inherits that, so the driver would never see the signal this test sends.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines: list[str] = []
    children: list[psutil.Process] = []
    assert driver.stdout is not None
    deadline = time.monotonic() + 120
    for line in driver.stdout:
        lines.append(line)
        children = psutil.Process(driver.pid).children(recursive=True) or children
        if line.startswith(after):
            break
        assert time.monotonic() < deadline, "".join(lines)
    driver.send_signal(sig)
    rest, _ = driver.communicate(timeout=90)
    _, alive = psutil.wait_procs(children, timeout=10)
    names = [process.name() for process in alive]
    for process in alive:
        process.kill()
    if sig == signal.SIGKILL:
        # A SIGKILLed driver cannot stop anything: Ray's workers, raylet and GCS die with it (Ray ties their fate to
        # the driver), but its two per-node agents linger; they hold no resources of a later Ray.
        assert set(names) <= {"ray::DashboardAgent", "ray::RuntimeEnvAgent"}, names
    else:
        assert not names, f"processes left running: {names}"
    return driver.returncode, "".join(lines) + rest


def assert_whole_runs(store: Path) -> int:
    """No partial run in the store; returns the number of runs done."""
    (done, tokens, expected), = query(store, "SELECT (SELECT count(*) FROM runs WHERE status = 'done'), "
                                             "(SELECT count(*) FROM tokens), "
                                             "(SELECT sum(max_tokens - 1) FROM runs WHERE status = 'done')")
    assert tokens == expected
    return done


def test_ctrl_c_keeps_finished_runs_stops_ray_and_resume_finishes_exactly_once(ray_local, tmp_path):
    grid_path, store = write_grid(tmp_path, INTERRUPTED), tmp_path / "store.duckdb"
    code, output = start_driver_and_stop_it(grid_path, store, signal.SIGINT, after="done   2/")
    assert code == 130, output
    assert "Resume with:" in output and f"python -m gridrun {grid_path} --store {store} --workers 1" in output
    finished = assert_whole_runs(store)
    assert 2 <= finished < 8

    report, out = run_grid(grid_path, store, workers=2)
    assert report.complete and report.skipped == finished and report.done == 8 - finished, out
    assert query(store, "SELECT count(*), count(DISTINCT run_hash) FROM runs WHERE status = 'done'") == [(8, 8)]
    assert query(store, "SELECT count(*) FROM tokens") == [(sum(range(899, 907)),)]
    assert query(store, "SELECT count(*) FROM superseded_tokens") == [(0,)]


def test_sigterm_stops_a_grid_like_ctrl_c_after_ray_started(ray_local, tmp_path):
    # ray.init installs its own SIGTERM handler (it exits without a word); the driver re-installs gridrun's.
    grid_path, store = write_grid(tmp_path, INTERRUPTED), tmp_path / "store.duckdb"
    code, output = start_driver_and_stop_it(grid_path, store, signal.SIGTERM, after="done   1/")
    assert code == 130, output
    assert "Ray shut down" in output and "Resume with:" in output, output
    assert 1 <= assert_whole_runs(store) < 8


def test_a_killed_driver_leaves_whole_runs_and_resuming_finishes_exactly_once(ray_local, tmp_path):
    grid_path, store = write_grid(tmp_path, INTERRUPTED), tmp_path / "store.duckdb"
    code, output = start_driver_and_stop_it(grid_path, store, signal.SIGKILL, after="done   1/")
    assert code == -signal.SIGKILL, output
    finished = assert_whole_runs(store)
    assert 1 <= finished < 8
    report, out = run_grid(grid_path, store, workers=2)  # the dead driver's lock and working copy are no obstacle
    assert report.complete and report.skipped == finished, out
    assert query(store, "SELECT count(*), count(DISTINCT run_hash) FROM runs WHERE status = 'done'") == [(8, 8)]
    assert assert_whole_runs(store) == 8


def test_cli_refuses_a_foreign_store_and_never_overwrites_it(tmp_path, capsys):
    grid_path, store = write_grid(tmp_path, GRID), tmp_path / "theirs.duckdb"
    with duckdb.connect(str(store)) as con:
        con.execute("CREATE TABLE accounts AS SELECT 1 AS id")
    before = store.read_bytes()
    assert main([str(grid_path), "--store", str(store)]) == 2
    assert "not a gridrun store" in capsys.readouterr().err
    assert store.read_bytes() == before


def test_dry_run_lists_runs_and_writes_nothing_and_status_counts(ray_local, tmp_path, capsys):
    grid_path, store = write_grid(tmp_path, GRID), tmp_path / "store.duckdb"
    assert main([str(grid_path), "--store", str(store), "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert listed.count("run  ") == 5 and "5 to run, 0 to skip" in listed
    assert not store.exists()
    report, _ = run_grid(grid_path, store, workers=1)
    assert main([str(grid_path), "--store", str(store), "--dry-run", "--set", "max_tokens=170"]) == 0
    assert "5 to run" in capsys.readouterr().out
    assert main([str(grid_path), "--store", str(store), "--dry-run"]) == 0
    assert "0 to run, 5 to skip" in capsys.readouterr().out
    # --where picks runs by knob values: streaming R=1's two repeats (main), one shared with r_sweep, forced again.
    assert main([str(grid_path), "--store", str(store), "--dry-run", "--force", "--where", "method=streaming",
                 "--where", "compress_every=1"]) == 0
    assert "2 to run, 0 to skip" in capsys.readouterr().out
    assert main(["status", str(grid_path), "--store", str(store), "--where", "repeat=1"]) == 0
    table = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    assert table["main"] == ["2", "2", "0", "0", "0"]
    assert main([str(grid_path), "--store", str(store), "--dry-run", "--where", "compress_every=3"]) == 2
    assert "--where compress_every=3: no run of the grid" in capsys.readouterr().err
    assert main(["status", str(grid_path), "--store", str(store)]) == 0
    table = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    assert table["main"] == ["4", "4", "0", "0", "0"]  # runs done pending failed stale
    assert table["(distinct"] == ["runs)", "5", "5", "0", "0", "0"]

    # A result of other evaluation code is stale: shown, rerun, and kept as superseded.
    old = load_grid(grid_path).runs[-1].run_hash  # r_sweep's R=8: in no other experiment
    with duckdb.connect(str(store)) as con:
        con.execute("UPDATE runs SET code_version = 'old-code' WHERE run_hash = ?", [old])
    assert main(["status", str(grid_path), "--store", str(store)]) == 0
    table = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    assert table["r_sweep"] == ["2", "1", "0", "0", "1"]
    assert main([str(grid_path), "--store", str(store), "--dry-run"]) == 0
    assert f"run  {old} (stale  )" in capsys.readouterr().out
    report, out = run_grid(grid_path, store, workers=1)
    assert report.complete and (report.done, report.skipped) == (1, 4), out
    assert query(store, "SELECT run_hash, code_version FROM superseded_runs") == [(old, "old-code")]
    assert query(store, "SELECT count(*) FROM run_summaries WHERE stale") == [(0,)]


def test_address_joins_a_running_cluster_and_leaves_it_running(ray_local, tmp_path):
    import ray

    two_runs = INTERRUPTED.replace("[900, 901, 902, 903, 904, 905, 906, 907]", "[200, 201]")
    grid_path, store = write_grid(tmp_path, two_runs), tmp_path / "store.duckdb"
    address = ray.get_runtime_context().gcs_address
    result = subprocess.run(
        [sys.executable, "-m", "gridrun", str(grid_path), "--store", str(store), "--address", address],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2/2 done" in result.stdout
    assert ray.cluster_resources().get("CPU") == 2  # the cluster this test runs on is still up
    assert assert_whole_runs(store) == 2
