"""StreamingLLM (attention sinks + recent window, RoPE re-alignment) with Lazy Pruning, on the transformers Cache API.

Import it alone and call it on a model: this package knows nothing of grids, Ray or the store.
"""

from . import known_noise  # noqa: F401  (first: filters libraries' known-harmless start-up messages)
from .cache import StreamingCache
from .config import ConfigError, RunConfig
from .evaluate import LoadedModel, RunResult, evaluate
from .policy import CompactionSchedule, StreamingPolicy, schedule_fingerprint, simulate_spans
from .rope import RotaryGeometry, UnsupportedModelError

__all__ = [
    "CompactionSchedule", "ConfigError", "LoadedModel", "RotaryGeometry", "RunConfig", "RunResult", "StreamingCache",
    "StreamingPolicy", "UnsupportedModelError", "evaluate", "schedule_fingerprint", "simulate_spans",
]
