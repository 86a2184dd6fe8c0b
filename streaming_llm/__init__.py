"""StreamingLLM (attention sinks + recent window, RoPE re-alignment) with Lazy Pruning, on the transformers Cache API.

Import it alone and call it on a model: this package knows nothing of grids, Ray or the store.
"""

from .cache import StreamingCache
from .config import ConfigError, RunConfig
from .evaluate import evaluate
from .models import LoadedModel
from .policy import CompactionSchedule, StreamingPolicy, schedule_fingerprint, simulate_spans
from .rope import RotaryGeometry, UnsupportedModelError
from .run import RunResult

__all__ = [
    "CompactionSchedule", "ConfigError", "LoadedModel", "RotaryGeometry", "RunConfig", "RunResult", "StreamingCache",
    "StreamingPolicy", "UnsupportedModelError", "evaluate", "schedule_fingerprint", "simulate_spans",
]
