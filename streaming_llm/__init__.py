"""StreamingLLM (attention sinks + recent window, RoPE re-alignment) with Lazy Pruning, on the transformers Cache API.

Import it alone and call it on a model: this package knows nothing of grids, Ray or the store.

The rooms, in reading order: evaluate.py (the entry point: runs the protocol of `config.mode`), score.py and
generate.py (the two protocols, each top to bottom), run.py (the run kernel both share: start, measure, checks,
finish), steppers.py (how each method feeds the model), cache.py (StreamingCache), storage.py (float / quantized
storage behind one contract), policy.py (the compaction schedule: pure integers). Beside them: config.py (RunConfig),
models.py (loading), text.py, rope.py, quant.py, parallel.py (exact multi-token blocks), speculative.py (drafters),
measure.py (the one clock), environment.py, compat.py. Imports go one way: no module imports one that imports it.
"""

from . import known_noise  # noqa: F401  (first: filters libraries' known-harmless start-up messages)
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
