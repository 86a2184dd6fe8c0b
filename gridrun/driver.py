"""The driver: plan which runs of a grid to do, run them on Ray, record each outcome in the store as it finishes.

It is the store's only writer (one transaction per finished run). It never records a run it did not see finish, so
an interruption loses at most the runs in progress, and resuming finishes the grid with every run exactly once.
"""

from __future__ import annotations

import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from store.writer import StoredRun, StoreWriter, read_runs

from .interrupt import interrupt_after, stop_on_signals, stopping
from .progress import KnobDigest, Progress
from .schedule import Events, Outcome, Scheduler, WorkerPlan, WorkerPool, ray_session, run_cost
from .spec import Grid, PlannedRun

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE = 0, 1, 2


@dataclass(frozen=True)
class Decision:
    """Whether a run is to be done now, and why."""

    run: PlannedRun
    action: str  # run | skip
    reason: str  # pending | failed | stale | forced | done


def decide(runs: tuple[PlannedRun, ...], stored: dict[str, StoredRun], code_version: str,
           force: bool) -> list[Decision]:
    """Done by the current code: skip (unless forced). Failed, missing (never run or interrupted), stale: run."""
    decisions = []
    for run in runs:
        previous = stored.get(run.run_hash)
        if previous is None:
            reason = "pending"
        elif previous.status != "done":
            reason = "failed"
        elif previous.code_version != code_version:
            reason = "stale"
        else:
            reason = "done"
        if force and reason == "done":
            reason = "forced"
        decisions.append(Decision(run, "skip" if reason == "done" else "run", reason))
    return decisions


@dataclass
class GridReport:
    """What one invocation did."""

    total: int
    skipped: int = 0
    done: int = 0
    failed: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # done, but by workers running other evaluation code
    wall_s: float = 0.0
    run_seconds: float = 0.0  # sum of the runs' own wall_s
    store_seconds: float = 0.0  # recording finished runs, snapshots included
    workers: int = 0
    startup_s: float = 0.0  # starting Ray (when local) and the actors
    busy_s: float = 0.0  # from the actors being ready to the last outcome recorded
    # Per worker slot: seconds it spent in runs (model loads included) and when, after start-up, its last run ended.
    worker_seconds: dict[str, float] = field(default_factory=dict)
    worker_last_s: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False

    @property
    def complete(self) -> bool:
        return not self.interrupted and not self.failed and not self.stale and self.skipped + self.done == self.total


def dry_run(grid: Grid, store: Path, code_version: str, force: bool, out: TextIO | None = None) -> int:
    """List every run with its hash and whether it would run or be skipped; starts and writes nothing."""
    out = out or sys.stdout
    decisions = decide(grid.runs, read_runs(store, [run.run_hash for run in grid.runs]), code_version, force)
    knobs = KnobDigest([run.config for run in grid.runs])
    out.write(f"runs show their method and what differs from the most common knobs: {knobs.common()}\n")
    for decision in decisions:
        run = decision.run
        described = knobs.describe(run.config)
        verb = "run " if decision.action == "run" else "skip"
        shared = len(run.configurations()) - 1
        also = f" (≡ {shared} more configuration{'s' if shared > 1 else ''})" if shared else ""
        out.write(f"{verb} {run.run_hash} ({decision.reason:7}) [{','.join(run.experiments)}] {described}{also}\n")
    write_equivalences(grid, out)
    to_run = [d.run for d in decisions if d.action == "run"]
    cost = sum(run_cost(run.config) for run in to_run)
    configurations = sum(len(run.configurations()) for run in grid.runs)
    out.write(f"grid {grid.name}: {len(decisions)} runs for {configurations} configurations, {len(to_run)} to run, "
              f"{len(decisions) - len(to_run)} to skip; {cost:,.0f} cached-step equivalents of work; store {store}\n")
    return EXIT_OK


def write_equivalences(grid: Grid, out: TextIO) -> None:
    """One line per set of equivalent configurations: they keep the same tokens at every step, so they share a run."""
    equivalences = grid.equivalences()
    if not equivalences:
        return
    out.write(f"{len(equivalences)} set(s) of equivalent configurations, each run once:\n")
    knobs = KnobDigest([config for equivalence in equivalences for config in equivalence.configs])
    for equivalence in equivalences:
        # What sets this set apart from the others (their common knobs), when there are several
        context = knobs.describe(equivalence.configs[0]).partition(" ")[2]
        out.write(f"  {equivalence.describe()}" + (f"; at {context}" if context else "") + "\n")


class GridRunner:
    """Runs the runs of `grid` that `decide` selects, recording each outcome; returns a GridReport."""

    def __init__(self, grid: Grid, store: Path, code_version: str, *, force: bool = False,
                 address: str | None = None, workers: int | None = None, threads: int | None = None,
                 retries: int = 1,
                 out: TextIO | None = None, registered: Grid | None = None, events: Events | None = None):
        self.grid = grid
        self.registered = registered or grid  # the whole grid's membership, when --only selects part of it
        self.store = Path(store)
        self.code_version = code_version
        self.force = force
        self.address = address
        self.workers = workers
        self.threads = threads
        self.retries = retries
        self.out = out or sys.stdout
        self.events = events
        self._warned_code = False

    def run(self) -> GridReport:
        started = time.perf_counter()
        stop_on_signals()
        with StoreWriter(self.store, self.code_version) as writer:
            stored = writer.stored_runs([run.run_hash for run in self.grid.runs])
            decisions = decide(self.grid.runs, stored, self.code_version, self.force)
            writer.register_grid(self.registered.name, self.registered.path, self.registered.spec_yaml,
                                 self.registered.membership(), self.registered.configurations())
            to_run = [d.run for d in decisions if d.action == "run"]
            report = GridReport(total=len(decisions), skipped=len(decisions) - len(to_run))
            self.out.write(_plan_line(self.grid.name, decisions) + "\n")
            if to_run:
                try:
                    self._execute(to_run, stored, writer, report)
                except KeyboardInterrupt:
                    report.interrupted = True
        report.wall_s = time.perf_counter() - started
        return report

    def _execute(self, to_run: list[PlannedRun], stored: dict[str, StoredRun], writer: StoreWriter,
                 report: GridReport) -> None:
        import ray

        progress = Progress(to_run, out=self.out)
        startup = time.perf_counter()
        ours = not ray.is_initialized()  # a Ray this driver starts (or joins) is the driver's to shut down
        try:
            self._run_on_ray(to_run, stored, writer, report, progress, startup)
        except SystemExit as exc:
            # ray.init installs a SIGTERM handler that exits without a word; one landing before stop_on_signals
            # takes the handler back is an interruption like any other.
            if exc.code != signal.SIGTERM:
                raise
            stopping()
            if ours:
                ray.shutdown()
            raise KeyboardInterrupt from None
        except KeyboardInterrupt:
            stopping()
            if ours:
                ray.shutdown()  # a signal during ray.init: ray_session had nothing to shut down yet (idempotent)
            raise

    def _run_on_ray(self, to_run: list[PlannedRun], stored: dict[str, StoredRun], writer: StoreWriter,
                    report: GridReport, progress: Progress, startup: float) -> None:
        import ray

        with ray_session(self.address):
            stop_on_signals(reset=False)  # ray.init replaced SIGTERM's handler with one that exits without a word
            plan = WorkerPlan.for_cluster(ray.cluster_resources(), self.workers, to_run, self.threads)
            report.workers = plan.count
            if self.workers is not None and self.workers > plan.count:
                self.out.write(f"--workers {self.workers}: the cluster has room for {plan.count} (one per "
                               f"{'GPU' if plan.gpus else 'CPU'}); using {plan.count}\n")
            self.out.write(f"starting {plan.describe()} for {len(to_run)} runs; run lines show what differs from "
                           f"{progress.knobs.common()}\n")
            self.out.flush()
            pool = WorkerPool(plan, _Fanout(progress, self.events))
            try:
                pool.start()
                ready = time.perf_counter()
                report.startup_s = ready - startup
                scheduler = Scheduler(to_run, pool, _Fanout(progress, self.events), retries=self.retries)
                for outcome in scheduler.outcomes():
                    with interrupt_after():  # a run that finished is recorded, published and counted whole
                        recorded = time.perf_counter()
                        current = self._record(outcome, stored.get(outcome.run.run_hash), writer)
                        report.store_seconds += time.perf_counter() - recorded
                        progress.finished(outcome)
                        slot = outcome.slot
                        report.worker_seconds[slot] = report.worker_seconds.get(slot, 0.0) + outcome.seconds
                        report.worker_last_s[slot] = report.busy_s = time.perf_counter() - ready
                        if outcome.status != "done":
                            report.failed.append(outcome.run.run_hash)
                        elif not current:
                            report.stale.append(outcome.run.run_hash)
                        else:
                            report.done += 1
                            report.run_seconds += float((outcome.summary or {}).get("wall_s", 0.0))
            finally:
                pool.stop()

    def _record(self, outcome: Outcome, previous: StoredRun | None, writer: StoreWriter) -> bool:
        """Store the outcome; False when the result was made by other evaluation code than the driver's."""
        earlier = previous.attempts if previous is not None and previous.status == "failed" else 0
        attempts = earlier + outcome.attempts
        config = outcome.run.config
        if outcome.status == "done":
            assert outcome.summary is not None
            produced_by = (outcome.summary.get("environment") or {}).get("code_version")
            if produced_by != self.code_version and not self._warned_code:
                self._warned_code = True
                self.out.write(f"warning: worker {outcome.worker} runs evaluation code {produced_by}, the driver "
                               f"{self.code_version}: its results are stored as stale; install the same code on "
                               "every node\n")
            writer.record_done(config, outcome.summary, outcome.tokens, outcome.compactions,
                               worker=outcome.worker or "", attempts=attempts, forward_rows=outcome.forwards,
                               trial_rows=outcome.trials)
            return produced_by == self.code_version
        writer.record_failed(config, outcome.error or "unknown error", worker=outcome.worker,
                             attempts=attempts, started_at=outcome.started_at)
        return True


class _Fanout:
    """Events to the progress display and to an optional observer (tests inject faults through it)."""

    def __init__(self, *targets: Events | None):
        self.targets = [target for target in targets if target is not None]

    def worker_ready(self, slot) -> None:
        for target in self.targets:
            target.worker_ready(slot)

    def run_started(self, slot, run) -> None:
        for target in self.targets:
            target.run_started(slot, run)

    def worker_lost(self, slot, run, reason, retry) -> None:
        for target in self.targets:
            target.worker_lost(slot, run, reason, retry)

    def tick(self) -> None:
        for target in self.targets:
            target.tick()


def _plan_line(name: str, decisions: list[Decision]) -> str:
    counts: dict[str, int] = {}
    for decision in decisions:
        counts[decision.reason] = counts.get(decision.reason, 0) + 1
    parts = ", ".join(f"{count} {reason}" for reason, count in sorted(counts.items()))
    return f"grid {name}: {len(decisions)} runs ({parts})"


def resume_command(argv: list[str]) -> str:
    """The command that resumes this invocation: the same arguments, without --force (done runs stay done)."""
    kept = [arg for arg in argv if arg != "--force"]
    return shlex.join(["python", "-m", "gridrun", *kept])
