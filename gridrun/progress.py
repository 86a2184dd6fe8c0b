"""The progress display: runs done / total, per-worker tokens/s, ETA, and one summary line per finished run.

On a terminal the status line is redrawn in place; in a log it is printed every `every_s` seconds. Display only:
it never decides anything about the runs.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO

from streaming_llm import RunConfig
from streaming_llm.config import KNOBS_USED_BY, TASK_KNOBS, knobs_in

from .schedule import Outcome, Slot, run_cost
from .spec import PlannedRun


@dataclass
class _WorkerStats:
    tokens: int = 0
    seconds: float = 0.0
    current: str | None = None  # run hash
    since: float = 0.0  # when the current run started

    def rate(self) -> float | None:
        """Decode tokens per second over the finished runs."""
        return self.tokens / self.seconds if self.seconds > 0 else None


class Progress:
    """Implements schedule.Events and prints what the driver records."""

    def __init__(self, runs: list[PlannedRun], out: TextIO | None = None, live: bool | None = None,
                 every_s: float = 30.0):
        self.out = out or sys.stdout
        self.live = self.out.isatty() if live is None else live
        self.every_s = every_s
        self.total = len(runs)
        self.remaining_cost = {run.run_hash: run_cost(run.config) for run in runs}
        self.knobs = KnobDigest([run.config for run in runs])
        self.done = self.failed = 0
        self.cost_done = 0.0
        self.seconds_done = 0.0
        self.workers: dict[str, _WorkerStats] = {}
        self.started = time.perf_counter()
        self._last_print = self.started
        self._status_shown = False

    # --- schedule.Events ---
    def worker_ready(self, slot: Slot) -> None:
        info = slot.info
        where = "GPU" if info.get("cuda") else f"{info.get('threads')} CPU thread(s)"
        self.workers.setdefault(slot.name, _WorkerStats())
        self.line(f"{slot.name}: worker {info.get('identity')} ready ({where})")

    def run_started(self, slot: Slot, run: PlannedRun) -> None:
        stats = self.workers.setdefault(slot.name, _WorkerStats())
        stats.current, stats.since = run.run_hash, time.perf_counter()

    def worker_lost(self, slot: Slot, run: PlannedRun, reason: str, retry: bool) -> None:
        then = "retrying it on a fresh worker" if retry else "giving up on it"
        self.line(f"{slot.name}: {reason}: run {run.run_hash} produced nothing; {then}")

    def tick(self) -> None:
        now = time.perf_counter()
        if self.live:
            self._draw_status()
        elif now - self._last_print >= self.every_s:
            self._last_print = now
            self.line(self.status())

    # --- what the driver reports ---
    def finished(self, outcome: Outcome) -> None:
        run = outcome.run
        self.remaining_cost.pop(run.run_hash, None)
        worker = self.workers.setdefault(outcome.slot, _WorkerStats())
        if worker.current == run.run_hash:  # the scheduler may have handed this worker its next run already
            worker.current = None
        count = f"{self.done + self.failed + 1}/{self.total}"
        if outcome.status == "done":
            self.done += 1
            summary = outcome.summary or {}
            self.cost_done += run_cost(run.config)
            self.seconds_done += outcome.seconds
            stats = self.workers.setdefault(outcome.slot, _WorkerStats())
            if summary.get("tpot_ms_mean") is not None:
                # Decode speed: the prefill's tokens come in one forward and would inflate a tokens / wall_s rate.
                stats.tokens += int(summary.get("timed_steps", 0))
                stats.seconds += int(summary.get("timed_steps", 0)) * float(summary["tpot_ms_mean"]) / 1000
                speed = f"tpot {summary['tpot_ms_mean']:.1f} ms"
            else:  # a parallel run times no step: its speed is tokens scored per second
                speed = f"{summary.get('eval_tokens_per_s', float('nan')):.0f} tok/s (parallel)"
            if run.config.mode == "task":  # a task run scores answers, not tokens: its accuracy and answer NLL
                result = (f"accuracy {summary.get('accuracy', float('nan')):.2f} over "
                          f"{summary.get('trial_count', 0)} trials, answer NLL "
                          f"{summary.get('answer_nll_mean', float('nan')):.3f}")
            else:
                result = f"ppl {summary.get('ppl', float('nan')):.3f}, {speed}"
            self.line(
                f"done   {count} {run.run_hash} [{','.join(run.experiments)}] {self.describe(run.config)}: "
                f"{result}, {summary.get('wall_s', 0.0):.1f} s on {outcome.worker}"
            )
        else:
            self.failed += 1
            first = (outcome.error or "").strip().splitlines()[0] if outcome.error else "unknown error"
            self.line(f"FAILED {count} {run.run_hash} [{','.join(run.experiments)}] {self.describe(run.config)}: "
                      f"{first}")
        if self.live:
            self._draw_status()

    def describe(self, config: RunConfig) -> str:
        return self.knobs.describe(config)

    def status(self) -> str:
        rates = []
        now = time.perf_counter()
        for name, stats in sorted(self.workers.items()):
            rate = stats.rate()
            running = f" (run {_duration(now - stats.since)})" if stats.current else ""
            rates.append(f"{name} {rate:.1f} tok/s{running}" if rate is not None else f"{name} -{running}")
        return (f"[{self.done + self.failed}/{self.total} runs, {self.failed} failed] {' '.join(rates)} "
                f"| elapsed {_duration(time.perf_counter() - self.started)} | ETA {self.eta()}")

    def eta(self) -> str:
        if self.cost_done <= 0:
            return "after the first run"
        seconds_per_cost = self.seconds_done / self.cost_done
        workers = max(1, len(self.workers))
        return _duration(sum(self.remaining_cost.values()) * seconds_per_cost / workers)

    def line(self, text: str) -> None:
        if self.live and self._status_shown:
            self.out.write("\r\033[K")
        self.out.write(text + "\n")
        self._status_shown = False
        self.out.flush()

    def _draw_status(self) -> None:
        self.out.write("\r\033[K" + self.status())
        self._status_shown = True
        self.out.flush()


class KnobDigest:
    """Describes a run by what sets it apart: its method and the knobs it reads whose value differs from the most
    common one among the grid's runs (printed once by `common()`)."""

    def __init__(self, configs: list[RunConfig]):
        self.common_values: dict[str, object] = {}
        for key in RunConfig.model_fields:
            # Among the runs that read the knob: a recompute run's compress_every is a normalised default.
            values = [config.normalised()[key] for config in configs if _reads(config, key)]
            texts = [repr(value) for value in values]
            if len(set(texts)) > 1 and key != "method":
                modal = max(sorted(set(texts)), key=texts.count)
                self.common_values[key] = values[texts.index(modal)]

    def common(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.common_values.items())

    def describe(self, config: RunConfig) -> str:
        knobs = config.normalised()
        shown = [
            f"{key}={knobs[key]}" for key, common in self.common_values.items()
            if _reads(config, key) and knobs[key] != common
        ]
        return " ".join([config.method, *shown])


def _reads(config: RunConfig, key: str) -> bool:
    if key in TASK_KNOBS:  # held by task runs only (normalised() of the others has no such key)
        return config.mode == "task"
    return key not in knobs_in("cache") or key in KNOBS_USED_BY[config.method]


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
