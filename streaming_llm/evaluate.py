"""The public entry point: `evaluate(config)` runs the protocol of `config.mode` (score.py, generate.py or
task_run.py) and returns its RunResult. It only dispatches: the protocols, the run kernel (run.py), the steppers and
the loading live elsewhere.

The names that callers imported from this module before it was split are still importable here (re-exported).
"""

from __future__ import annotations

from collections.abc import Callable

from .config import RunConfig
from .generate import generate
from .models import DTYPES, LoadedModel, check_model_knobs, load_model, resolve_device
from .run import COMPACTION_SCHEMA, TOKEN_SCHEMA, RunResult
from .score import score
from .steppers import STEPPERS, DenseStepper, RecomputeStepper, Stepper, StreamingStepper, kv_quant_spec
from .task_run import task_run
from .text import TokenStream

__all__ = [
    "COMPACTION_SCHEMA", "DTYPES", "MODES", "STEPPERS", "TOKEN_SCHEMA", "DenseStepper", "LoadedModel",
    "RecomputeStepper", "RunResult", "Stepper", "StreamingStepper", "check_model_knobs", "evaluate", "kv_quant_spec",
    "load_model", "resolve_device",
]

RunProtocol = Callable[[RunConfig, LoadedModel | None, TokenStream | None], RunResult]
MODES: dict[str, RunProtocol] = {"score": score, "generate": generate, "task": task_run}


def evaluate(config: RunConfig, loaded: LoadedModel | None = None, stream: TokenStream | None = None) -> RunResult:
    """Run `config` and measure it. `loaded` and `stream` may be passed in to reuse a model or a text across runs."""
    return MODES[config.mode](config, loaded, stream)
