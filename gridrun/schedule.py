"""Runs a list of planned runs on Ray actors and yields each outcome as it finishes.

One actor per GPU (num_gpus=1) on a cluster with GPUs, else CPU actors with matching torch threads; it never asks Ray
for a resource the cluster lacks. Runs are grouped by model so that each actor loads each model at most once. The
scheduler writes nothing: the driver records outcomes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from store.opening import first_line
from streaming_llm import RunConfig
from streaming_llm.config import GENERATION_BUDGET
from streaming_llm.known_noise import drop_messages

from .spec import PlannedRun

OBJECT_STORE_BYTES = 256 * 1024**2  # results are a few MB of Arrow each; Ray's default would take 30% of RAM


class ScheduleError(RuntimeError):
    """The cluster cannot run the grid as asked; the message says what it lacks and the fix."""


def model_key(config: RunConfig) -> tuple[str, str, str, str]:
    """What a loaded model serves: runs with the same key share one load."""
    return (config.model, config.dtype, config.device, config.attn_implementation)


PARALLEL_SPEEDUP = 10.0


def run_cost(config: RunConfig) -> float:
    """Relative cost in cached decode steps, for ordering and the ETA (the ETA rescales it by measured speed).

    A recompute step re-reads up to `cap` tokens: on a 2-core CPU with smollm2-135m it cost 5x a cached step at
    cap 128 and 7.2x at cap 256 (measured), i.e. about 2.8 + cap / 58.
    """
    steps = config.max_tokens - config.prefill
    if config.mode == "generate":
        # A forward per generated token (fewer with drafts, whose own steps roughly make up for it), prompt aside.
        steps = config.new_tokens * (2 if config.spec in ("draft", "self_stream") else 1)
    if config.mode == "task":
        # Trials of one depth share the haystack before the needle (fed once: streaming_llm.task_run); each then feeds
        # the rest of its prompt, and generates its answer a forward per token (cached steps on either protocol).
        assert config.context_tokens is not None and config.trials is not None
        context = config.context_tokens
        tails = [context * (1 - depth) for depth in config.depths] if config.depths else [context]
        fed = sum(context - tail + config.trials * tail for tail in tails)
        decode = config.trials * len(tails) * GENERATION_BUDGET[config.task if config.task is not None else "file"]
        # Stepwise, a context within the cap (or dense) goes in one causal forward (steppers.StepwiseTarget).
        blocks = config.protocol == "parallel" or config.method == "dense" or context <= (config.cap or 0)
        cost = (fed / PARALLEL_SPEEDUP if blocks else fed) + decode
        # Dense attention reads the whole context at every token: 2.8x strict's time at 12,288 tokens (measured).
        return cost * (1 + context / 6000) if config.method == "dense" else cost
    if config.protocol == "parallel":
        # A token of a chunked forward costs about a tenth of a cached step here; a scored recompute step is a
        # forward of up to cap tokens (bench/parallel_eval.py).
        if config.method == "recompute":
            assert config.cap is not None
            return steps / config.score_stride * config.cap / PARALLEL_SPEEDUP
        return steps / PARALLEL_SPEEDUP
    if config.method == "recompute":
        assert config.cap is not None
        return steps * (2.8 + config.cap / 58)
    return float(steps)


@dataclass(frozen=True)
class Outcome:
    """How one run ended in this invocation: done with its result, or failed with the reason."""

    run: PlannedRun
    status: str  # done | failed
    attempts: int  # tries in this invocation (a worker that died mid-run costs one)
    worker: str | None  # host:pid
    slot: str  # w0, w1, ...: stable when a dead actor is replaced
    started_at: datetime
    seconds: float  # on the worker, model load included
    result: Any = None  # the streaming_llm.RunResult of a done run, as the worker returned it
    error: str | None = None

    @property
    def summary(self) -> dict[str, Any] | None:
        return None if self.result is None else self.result.summary


class Events(Protocol):
    """What the scheduler reports while it works (the progress display; tests hook faults here)."""

    def worker_ready(self, slot: Slot) -> None: ...

    def run_started(self, slot: Slot, run: PlannedRun) -> None: ...

    def worker_lost(self, slot: Slot, run: PlannedRun, reason: str, retry: bool) -> None: ...

    def tick(self) -> None: ...


@dataclass
class Slot:
    """One actor and what it is doing."""

    index: int
    actor: Any
    info: dict[str, Any] = field(default_factory=dict)
    model: tuple[str, str, str, str] | None = None
    run: PlannedRun | None = None
    ref: Any = None
    started_at: datetime | None = None

    @property
    def name(self) -> str:
        return f"w{self.index}"


# --- Ray ------------------------------------------------------------------------------------------------------------
# A new local Ray turns token authentication on by default and logs on every start that it did: a note on Ray's
# defaults, not on the run; authentication stays on. Naming the default (RAY_AUTH_MODE=token) would quiet it too, but
# only before Ray's configuration is first read: set here, the driver missed it, its cluster did not, and the driver's
# calls were refused (InvalidAuthToken) until ray.init gave up.
RAY_TOKEN_AUTH_NOTICE = (
    "ray._private.authentication.authentication_token_setup",
    re.compile(r"^Token authentication is enabled for this Ray cluster\. Set RAY_AUTH_MODE=disabled to opt out\."),
)


@contextmanager
def ray_session(address: str | None):
    """Join the cluster at `address` (auto, ray://...), or start a local Ray that is shut down on the way out.

    A Ray already initialised in this process (tests) is used as it is and left running.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    try:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        else:
            # Ray starts workers at nice 15; here the workers are the job, so they compete at the driver's priority.
            os.environ.setdefault("RAY_worker_niceness", "0")
            drop_messages(*RAY_TOKEN_AUTH_NOTICE)
            ray.init(  # Ray counts the CPUs itself, cgroup limits included
                address="local", include_dashboard=False, log_to_driver=False,
                object_store_memory=OBJECT_STORE_BYTES, logging_level=logging.WARNING,
            )
    except Exception as exc:  # Ray raises bare Exceptions (a node that timed out starting, a cluster not found)
        ray.shutdown()  # whatever part of a local node did start
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ScheduleError(
            f"{where} could not be started or joined ({first}): nothing ran and the store holds every earlier result; "
            "run the same command again once the machine is less loaded (or the cluster is up)"
        ) from exc
    try:
        yield
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class WorkerPlan:
    """How many actors, with which resources: derived from what the cluster has, never more."""

    count: int
    gpus: bool  # one GPU per actor
    threads: int  # torch threads per actor
    cpus: float  # Ray CPUs per actor: `threads` on CPU actors; at most 1 on GPU actors, less when CPUs are scarcer

    @classmethod
    def for_cluster(cls, resources: dict[str, float], requested: int | None, runs: list[PlannedRun],
                    threads: int | None = None) -> WorkerPlan:
        """`requested` actors (default: one per GPU, else one per CPU) and `threads` torch threads each (default:
        the CPUs shared out), within what the cluster has."""
        gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
        if any(run.config.device == "cuda" for run in runs) and gpus == 0:
            raise ScheduleError(
                "the grid has runs with device: cuda but the Ray cluster has no GPU: use device: auto or cpu, or "
                "join a cluster with GPUs (--address)"
            )
        if requested is not None and requested < 1:
            raise ScheduleError(f"--workers {requested}: give 1 or more")
        if threads is not None and threads < 1:
            raise ScheduleError(f"--threads {threads}: give 1 or more")
        if gpus:
            count = min(requested or gpus, gpus)
            return cls(count, gpus=True, threads=threads or max(1, cpus // count), cpus=min(1.0, cpus / count))
        count = min(requested or cpus, cpus)  # more 1-CPU actors than CPUs would wait forever for a CPU
        threads = min(threads or max(1, cpus // count), cpus // count)
        return cls(count, gpus=False, threads=threads, cpus=float(threads))

    def describe(self) -> str:
        if self.gpus:
            return f"{self.count} GPU worker(s), 1 GPU each"
        return f"{self.count} CPU worker(s), {self.threads} thread(s) each"


class WorkerPool:
    """The actors; a dead one is replaced by a fresh one in the same slot."""

    def __init__(self, plan: WorkerPlan, events: Events):
        import ray

        from .worker import EvaluationWorker

        self.plan = plan
        self.events = events
        options: dict[str, Any] = {"max_restarts": 0, "max_task_retries": 0, "num_cpus": plan.cpus}
        if plan.gpus:
            options["num_gpus"] = 1
        self._actor_class = ray.remote(EvaluationWorker).options(**options)
        self.slots: list[Slot] = []

    def start(self) -> None:
        self.slots = [self._new_slot(index) for index in range(self.plan.count)]
        self._wait_ready(self.slots)

    def replace(self, slot: Slot) -> Slot:
        import ray

        ray.kill(slot.actor, no_restart=True)
        fresh = self._new_slot(slot.index)
        self.slots[slot.index] = fresh
        self._wait_ready([fresh])
        return fresh

    def stop(self) -> None:
        import ray

        for slot in self.slots:
            with contextlib.suppress(Exception):  # already dead: nothing to stop
                ray.kill(slot.actor, no_restart=True)
        self.slots = []

    def _new_slot(self, index: int) -> Slot:
        return Slot(index=index, actor=self._actor_class.remote(self.plan.threads))

    def _wait_ready(self, slots: list[Slot]) -> None:
        import ray

        refs = {slot.actor.describe.remote(): slot for slot in slots}
        pending = list(refs)
        waited = 0.0
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=5.0)
            for ref in ready:
                try:
                    refs[ref].info = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    raise ScheduleError(f"a worker failed to start: {exc}") from exc
                self.events.worker_ready(refs[ref])
            waited += 5.0
            if pending and waited % 60 == 0:
                print(f"waiting for {len(pending)} worker(s) to start: the cluster may be busy", flush=True)


# --- the queue --------------------------------------------------------------------------------------------------------
class RunQueue:
    """Pending runs grouped by model; within a group the longest run first, so the grid ends with short runs."""

    def __init__(self, runs: list[PlannedRun]):
        self.groups: dict[tuple, deque[PlannedRun]] = {}
        for run in sorted(runs, key=lambda r: -run_cost(r.config)):
            self.groups.setdefault(model_key(run.config), deque()).append(run)

    def __len__(self) -> int:
        return sum(len(group) for group in self.groups.values())

    def next_for(self, loaded: tuple | None, busy: list[tuple | None]) -> PlannedRun | None:
        """A run of the model this actor holds; else of the model with the most work that no other actor holds."""
        if loaded in self.groups and self.groups[loaded]:
            return self.groups[loaded].popleft()
        candidates = [key for key, group in self.groups.items() if group]
        if not candidates:
            return None
        untaken = [key for key in candidates if key not in busy]
        key = max(untaken or candidates, key=lambda k: sum(run_cost(r.config) for r in self.groups[k]))
        return self.groups[key].popleft()

    def retry(self, run: PlannedRun) -> None:
        self.groups.setdefault(model_key(run.config), deque()).appendleft(run)


# --- the scheduler ----------------------------------------------------------------------------------------------------
class Scheduler:
    """Hands runs to free actors and yields outcomes; an actor that dies mid-run costs that run one attempt."""

    def __init__(self, runs: list[PlannedRun], pool: WorkerPool, events: Events, retries: int = 1, tick_s: float = 1.0):
        self.queue = RunQueue(runs)
        self.pool = pool
        self.events = events
        self.retries = retries
        self.tick_s = tick_s
        self.attempts: dict[str, int] = {}

    def outcomes(self) -> Iterator[Outcome]:
        import ray

        for slot in self.pool.slots:
            self._assign(slot)
        while True:
            busy = {slot.ref: slot for slot in self.pool.slots if slot.ref is not None}
            if not busy:
                return
            ready, _ = ray.wait(list(busy), num_returns=1, timeout=self.tick_s)
            self.events.tick()
            for ref in ready:
                outcome = self._collect(busy[ref], ref)
                if outcome is not None:
                    yield outcome

    def _assign(self, slot: Slot) -> None:
        run = self.queue.next_for(slot.model, [s.model for s in self.pool.slots if s is not slot])
        slot.run, slot.ref = run, None
        if run is None:
            return
        self.attempts[run.run_hash] = self.attempts.get(run.run_hash, 0) + 1
        slot.model = model_key(run.config)
        slot.started_at = datetime.now(UTC)
        slot.ref = slot.actor.run.remote(run.config.normalised(), run.run_hash)
        self.events.run_started(slot, run)

    def _collect(self, slot: Slot, ref) -> Outcome | None:
        """The outcome of a finished ref; the freed actor gets its next run before the outcome is recorded."""
        import ray

        run, started_at = slot.run, slot.started_at
        assert run is not None and started_at is not None
        attempts = self.attempts[run.run_hash]
        try:
            value = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            reason = f"worker {slot.info.get('identity', slot.name)} died during the run ({first_line(exc)})"
            retry = attempts <= self.retries
            self.events.worker_lost(slot, run, reason, retry)
            if retry:
                self.queue.retry(run)
            fresh = self.pool.replace(slot)
            self._assign(fresh)
            if retry:
                return None
            return Outcome(run, "failed", attempts, slot.info.get("identity"), slot.name, started_at, 0.0,
                           error=f"{reason}; tried {attempts} time(s)")
        except ray.exceptions.RayError as exc:
            value = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "seconds": 0.0}
        worker = slot.info.get("identity")
        self._assign(slot)
        if value["status"] == "done":
            return Outcome(run, "done", attempts, worker, slot.name, started_at, value["seconds"],
                           result=value["result"])
        return Outcome(run, "failed", attempts, worker, slot.name, started_at, value["seconds"], error=value["error"])

