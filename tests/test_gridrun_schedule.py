"""Scheduling decisions without Ray: actors sized to the cluster (never a GPU it lacks), runs grouped so each actor
loads each model at most once, longest runs first, and the resume decision."""

from __future__ import annotations

from pathlib import Path

import pytest

from gridrun.driver import decide
from gridrun.schedule import RunQueue, ScheduleError, WorkerPlan, model_key, run_cost
from gridrun.spec import PlannedRun, parse_grid
from store.writer import StoredRun
from streaming_llm import RunConfig, RunResult

GRID = """
name: models
base: {cap: 32, sink: 4, max_tokens: 100}
experiments:
  a: {grid: {model: [tiny-llama, tiny-neox, smollm2-135m], compress_every: [1, 2, 4, 8]}}
  b: {runs: [{model: tiny-llama, method: recompute, max_tokens: 400}]}
"""


def runs(text: str = GRID) -> list[PlannedRun]:
    return list(parse_grid(text, Path("grids/models.yaml"), []).runs)


@pytest.mark.parametrize(
    ("resources", "requested", "expected"),
    [
        ({"CPU": 2.0}, None, WorkerPlan(2, gpus=False, threads=1, cpus=1.0)),
        ({"CPU": 2.0}, 1, WorkerPlan(1, gpus=False, threads=2, cpus=2.0)),
        ({"CPU": 2.0}, 5, WorkerPlan(2, gpus=False, threads=1, cpus=1.0)),  # never more 1-CPU actors than CPUs
        ({"CPU": 16.0}, 3, WorkerPlan(3, gpus=False, threads=5, cpus=5.0)),
        ({"CPU": 64.0, "GPU": 8.0}, None, WorkerPlan(8, gpus=True, threads=8, cpus=1.0)),
        ({"CPU": 64.0, "GPU": 8.0}, 12, WorkerPlan(8, gpus=True, threads=8, cpus=1.0)),  # never a GPU it lacks
        ({"CPU": 64.0, "GPU": 8.0}, 2, WorkerPlan(2, gpus=True, threads=32, cpus=1.0)),
        ({"CPU": 4.0, "GPU": 8.0}, None, WorkerPlan(8, gpus=True, threads=1, cpus=0.5)),  # nor a CPU
    ],
)
def test_workers_fit_the_cluster(resources, requested, expected):
    assert WorkerPlan.for_cluster(resources, requested, runs()) == expected


def test_threads_per_actor_can_be_set_within_the_cpus_each_actor_gets():
    assert WorkerPlan.for_cluster({"CPU": 2.0}, 1, runs(), threads=1) == WorkerPlan(1, gpus=False, threads=1, cpus=1.0)
    assert WorkerPlan.for_cluster({"CPU": 2.0}, 2, runs(), threads=4).threads == 1
    with pytest.raises(ScheduleError, match="--threads 0"):
        WorkerPlan.for_cluster({"CPU": 2.0}, 1, runs(), threads=0)


def test_cuda_runs_on_a_cluster_without_gpus_are_refused_before_anything_starts():
    cuda = runs(GRID.replace("max_tokens: 100}", "max_tokens: 100, device: cuda}"))
    with pytest.raises(ScheduleError, match="device: cuda but the Ray cluster has no GPU"):
        WorkerPlan.for_cluster({"CPU": 2.0}, None, cuda)
    assert WorkerPlan.for_cluster({"CPU": 2.0, "GPU": 1.0}, None, cuda).gpus


def test_each_actor_loads_each_model_at_most_once_and_long_runs_go_first():
    planned = runs()
    queue = RunQueue(planned)
    actors: list[tuple | None] = [None, None]
    loads: list[list[tuple]] = [[], []]
    order: list[PlannedRun] = []
    while len(queue):
        for index in range(len(actors)):  # actors free up in turn
            run = queue.next_for(actors[index], [actors[j] for j in range(len(actors)) if j != index])
            if run is None:
                continue
            if model_key(run.config) != actors[index]:
                actors[index] = model_key(run.config)
                loads[index].append(actors[index])
            order.append(run)
    assert sorted(r.run_hash for r in order) == sorted(r.run_hash for r in planned)
    for loaded in loads:
        assert len(loaded) == len(set(loaded))
    assert order[0].config.method == "recompute"  # the costliest run starts first
    assert run_cost(order[0].config) == max(run_cost(r.config) for r in planned)


def test_retried_runs_go_back_to_the_front_of_their_model():
    planned = runs()
    queue = RunQueue(planned)
    first = queue.next_for(None, [])
    assert first is not None
    queue.retry(first)
    assert queue.next_for(model_key(first.config), []) is first


def test_resume_skips_done_runs_of_this_code_and_reruns_the_rest():
    planned = runs()[:5]
    stored = {
        planned[0].run_hash: StoredRun("done", "v2", 1, None),
        planned[1].run_hash: StoredRun("done", "v1", 1, None),
        planned[2].run_hash: StoredRun("failed", "v2", 2, "boom"),
    }
    reasons = [(d.action, d.reason) for d in decide(tuple(planned), stored, "v2", force=False)]
    assert reasons == [("skip", "done"), ("run", "stale"), ("run", "failed"), ("run", "pending"), ("run", "pending")]
    forced = [(d.action, d.reason) for d in decide(tuple(planned), stored, "v2", force=True)]
    assert forced[0] == ("run", "forced")


def test_progress_lines_rates_and_eta():
    import io
    from datetime import UTC, datetime

    from gridrun.progress import KnobDigest, Progress
    from gridrun.schedule import Outcome

    planned = runs(GRID.replace("compress_every: [1, 2, 4, 8]", "compress_every: [1, 8]"))  # R ties: the lower
    digest = KnobDigest([run.config for run in planned])
    assert digest.common() == "model=tiny-llama max_tokens=100 compress_every=1"
    strict = next(run for run in planned if run.config.compress_every == 1 and run.config.model == "tiny-llama")
    assert digest.describe(strict.config) == "streaming"
    lazy = next(run for run in planned if run.config.compress_every == 8 and run.config.model == "tiny-neox")
    assert digest.describe(lazy.config) == "streaming model=tiny-neox compress_every=8"
    assert digest.describe(planned[-1].config) == "recompute max_tokens=400"  # R is not a knob of recompute

    out = io.StringIO()
    progress = Progress(planned, out=out, live=False)
    summary = {"ppl": 12.5, "tpot_ms_mean": 2.0, "timed_steps": 500, "wall_s": 1.5}
    now = datetime.now(UTC)
    progress.finished(Outcome(strict, "done", 1, "host:1", "w0", now, 1.5, result=RunResult(strict.config, summary)))
    progress.finished(Outcome(planned[1], "failed", 2, "host:1", "w0", now, 0.1, error="ValueError: bad\ntrace"))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"done   1/{len(planned)} {strict.run_hash} [a] streaming: ppl 12.500")
    assert lines[1].startswith(f"FAILED 2/{len(planned)} {planned[1].run_hash} [a]") and lines[1].endswith("bad")
    assert "w0 500.0 tok/s" in progress.status()  # 500 steps at 2 ms
    remaining = sum(run_cost(run.config) for run in planned) - run_cost(strict.config) - run_cost(planned[1].config)
    expected = remaining * 1.5 / run_cost(strict.config)  # one worker: seconds per unit of cost, measured
    minutes, seconds = divmod(round(expected), 60)
    assert progress.eta() == f"{minutes}m{seconds:02d}s"


def test_a_task_runs_progress_line_shows_its_accuracy_not_a_ppl():
    import io
    from datetime import UTC, datetime

    from gridrun.progress import Progress
    from gridrun.schedule import Outcome

    config = RunConfig(model="tiny-llama", mode="task", task="passkey", context_tokens=420, depths=[0.5], trials=4,
                       cap=96)
    planned = [PlannedRun(config=config, experiments=("retrieval",))]
    out = io.StringIO()
    summary = {"accuracy": 0.75, "trial_count": 4, "answer_nll_mean": 0.5, "wall_s": 2.0}
    Progress(planned, out=out, live=False).finished(
        Outcome(planned[0], "done", 1, "host:1", "w0", datetime.now(UTC), 2.0, result=RunResult(config, summary)))
    line = out.getvalue().splitlines()[0]
    assert "accuracy 0.75 over 4 trials, answer NLL 0.500" in line and "ppl" not in line
