"""StreamingLLM (attention sinks + recent window, RoPE re-alignment) with Lazy Pruning, on the transformers Cache API.

Import it alone and call it on a model: this package knows nothing of grids, Ray or the store.

The rooms, in reading order: evaluate.py (the entry point: runs the protocol of `config.mode`), score.py,
generate.py and task_run.py (the three protocols, each top to bottom; tasks.py builds and scores the retrieval
instances task_run.py feeds), run.py (the run kernel all three share: start, measure, checks,
finish), steppers.py (how each method feeds the model), cache.py (StreamingCache), storage.py (float / quantized / ring
storage behind one contract), policy.py (the compaction schedule: pure integers). Beside them: config.py (RunConfig;
knob groups declared on its fields), results.py (RunResult and STEP_TABLES, the per-run tables), models.py
(loading), text.py, rope.py, quant.py, parallel.py (exact multi-token blocks), speculative.py (drafters), measure.py
(the one clock), environment.py, compat.py. Imports go one way: no module imports one that imports it. Importing the
package loads config, policy and results only (no torch: the store reads them); the rest loads on first use.
"""

import sys
from importlib import import_module
from types import ModuleType
from typing import TYPE_CHECKING

from . import known_noise  # noqa: F401  (first: filters libraries' known-harmless start-up messages)
from .config import ConfigError, RunConfig
from .policy import CompactionSchedule, StreamingPolicy, schedule_fingerprint, simulate_spans
from .results import RunResult

if TYPE_CHECKING:
    from .cache import StreamingCache
    from .models import LoadedModel
    from .rope import RotaryGeometry, UnsupportedModelError

# Imported on first use, so that RunConfig and the policy (pure: no torch) load in a fraction of a second: the store
# derives its knob columns from RunConfig, and its readers must not wait for torch.
_LAZY = {
    "StreamingCache": "cache", "LoadedModel": "models", "RotaryGeometry": "rope",
    "UnsupportedModelError": "rope",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(ModuleType):
    """`streaming_llm.evaluate` is the function, as when this package imported it eagerly: importing the submodule
    streaming_llm.evaluate binds the module to that name, which this setter ignores (the module stays reachable as
    sys.modules['streaming_llm.evaluate'] and by `from streaming_llm.evaluate import ...`)."""

    @property
    def evaluate(self):
        return import_module(".evaluate", __name__).evaluate

    @evaluate.setter
    def evaluate(self, value) -> None:
        pass


sys.modules[__name__].__class__ = _Package


__all__ = [
    "CompactionSchedule", "ConfigError", "LoadedModel", "RotaryGeometry", "RunConfig", "RunResult", "StreamingCache",
    "StreamingPolicy", "UnsupportedModelError", "evaluate", "schedule_fingerprint", "simulate_spans",
]
