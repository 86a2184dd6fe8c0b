"""The Ray actor that runs evaluations: keeps a model loaded across runs and returns each result as Arrow tables.

It never opens the store (the driver is the only writer) and never lets one run's exception end the actor: a failed
run comes back as a failure with its error text.
"""

from __future__ import annotations

import gc
import math
import os
import socket
import time
import traceback
from typing import Any


class EvaluationWorker:
    """One evaluation process (one GPU, or `threads` CPU threads); wrapped by ray.remote in gridrun.schedule."""

    def __init__(self, threads: int | None = None):
        import torch  # imported here: the driver never needs torch to schedule

        import streaming_llm.evaluate  # noqa: F401 - transformers takes seconds to import: part of start-up, not of a run

        if threads:
            torch.set_num_threads(threads)
        self.loaded = None
        self.identity = f"{socket.gethostname()}:{os.getpid()}"

    def describe(self) -> dict[str, Any]:
        """Who this worker is (host:pid) and what it runs on: also the driver's check that the actor started."""
        import torch

        from streaming_llm.environment import code_version

        return {
            "identity": self.identity, "pid": os.getpid(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "code_version": code_version(),
        }

    def run(self, knobs: dict[str, Any], run_hash: str) -> dict[str, Any]:
        """Evaluate one run: {status: done, result (the RunResult, whole)} or {status: failed, error}."""
        from streaming_llm import LoadedModel, RunConfig, evaluate

        started = time.perf_counter()
        try:
            config = RunConfig.from_dict(knobs, where=f"run {run_hash}")
            if config.run_hash != run_hash:
                raise RuntimeError(
                    f"this worker hashes the run as {config.run_hash}, the driver as {run_hash}: the worker runs other "
                    "streaming_llm code than the driver; install the same code on every node"
                )
            if self.loaded is None or not self.loaded.serves(config):
                self._unload()
                self.loaded = LoadedModel.load(config)
            result = evaluate(config, loaded=self.loaded)
            check_finite(result.summary, result.tokens)
        except Exception as exc:  # one failed run must not end the actor; KeyboardInterrupt still does
            self._free_device_memory()
            return {"status": "failed", "error": _error_text(exc), "seconds": time.perf_counter() - started}
        return {"status": "done", "result": result, "seconds": time.perf_counter() - started}

    def _unload(self) -> None:
        self.loaded = None
        self._free_device_memory()

    @staticmethod
    def _free_device_memory() -> None:
        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def check_finite(summary: dict[str, Any], tokens) -> None:
    """A NaN or infinite NLL poisons every mean it enters: such a run fails instead of being stored."""
    if math.isfinite(summary.get("mean_nll", math.nan)):
        return
    if "answer_nll_mean" in summary:  # a task run: streaming_llm.task_run refuses a non-finite answer NLL itself
        return
    import numpy as np

    nll = tokens.column("nll").to_numpy()
    bad = np.flatnonzero(~np.isfinite(nll))
    first = ", ".join(str(int(tokens.column("step")[int(i)].as_py())) for i in bad[:5])
    raise FloatingPointError(
        f"non-finite NLL at {len(bad)} steps (first: {first}): e.g. float16 overflow; try dtype float32 or bfloat16"
    )


def _error_text(exc: BaseException) -> str:
    """The exception line first (what a table shows), then the traceback's last frames."""
    trace = "".join(traceback.format_exception(exc)[-6:])
    return f"{type(exc).__name__}: {exc}\n{trace}"
