"""The evaluation protocol: prefill, then one token per step; per-step NLL, latency, span and compactions.

`evaluate(config)` reads top to bottom like the protocol. One stepper class per method (dense, streaming, recompute)
does the forward; all timing goes through `measure.Stopwatch`. Returns a RunResult and writes nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .cache import KVQuantSpec, StreamingCache
from .compat import cache_kwargs, check_transformers
from .config import ConfigError, RunConfig
from .environment import fingerprint
from .measure import Stopwatch, peak_memory_bytes, reset_peak_memory
from .models import apply_weight_quant, head_dim, is_random, load_model, load_tokenizer, model_config
from .parallel import BlockStepper, recompute_blocks
from .quant import kv_quantizer
from .rope import RotaryGeometry
from .text import TokenStream, load_stream

TOKEN_SCHEMA = pa.schema([
    ("step", pa.int32()),  # index of the token fed (its place in the text)
    ("position", pa.int64()),  # position id of the query
    ("token_id", pa.int64()),
    ("target_id", pa.int64()),
    ("nll", pa.float64()),  # of target_id, log-softmax in float32
    ("latency_ms", pa.float64()),  # forward + cache work; null for prefill rows (see summary.prefill_ms)
    ("compaction_ms", pa.float64()),
    ("kv_len", pa.int32()),  # attention span of the step
    ("compacted", pa.bool_()),
    ("evicted", pa.int32()),
    ("prefill", pa.bool_()),
])
COMPACTION_SCHEMA = pa.schema([
    ("step", pa.int32()),
    ("kv_len_before", pa.int32()),
    ("kv_len_after", pa.int32()),
    ("evicted", pa.int32()),
    ("compaction_ms", pa.float64()),
])
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class RunResult:
    """What one run produced: its config, a summary of scalars, and per-step and per-compaction columns."""

    config: RunConfig
    summary: dict[str, Any]
    tokens: pa.Table
    compactions: pa.Table
    forwards: pa.Table | None = None  # generation runs: one row per verification forward (streaming_llm.generate)


@dataclass
class LoadedModel:
    """A model and its tokenizer, reusable by every run that asks for the same model, dtype, device, attention and
    weight quantization. `quantization`: what quantized the weights (torchao config, tensor class, layout) and their
    bytes before and after, as strings for the run's environment."""

    name: str
    dtype: str
    device: torch.device
    attn_implementation: str
    model: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    weight_quant: str = "none"
    quantization: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, config: RunConfig) -> LoadedModel:
        check_transformers()
        if config.kv_quant != "none":
            try:
                architecture = model_config(config.model)
            except Exception:  # a config it cannot read: load_model below says why, in its own words
                architecture = None
            if architecture is not None:
                check_model_knobs(config, architecture)  # before the weights load, not after
        device = resolve_device(config.device)
        model = load_model(config.model, DTYPES[config.dtype], device, config.attn_implementation)
        quantization = apply_weight_quant(model, config.weight_quant)
        return cls(config.model, config.dtype, device, config.attn_implementation, model, load_tokenizer(config.model),
                   config.weight_quant, quantization)

    def serves(self, config: RunConfig) -> bool:
        return (self.name, self.dtype, self.device, self.attn_implementation, self.weight_quant) == (
            config.model, config.dtype, resolve_device(config.device), config.attn_implementation, config.weight_quant
        )

    def kv_bytes_per_token(self) -> int:
        config = self.model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return 2 * config.num_hidden_layers * heads * head_dim(config) * DTYPES[self.dtype].itemsize


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device = cuda but torch sees no CUDA device: use device auto or cpu")
    return torch.device(device)


# --- one stepper per method -----------------------------------------------------------------------------------------
class DenseStepper:
    """No eviction: HF's own DynamicCache, positions 0, 1, 2, ..."""

    def __init__(self, loaded: LoadedModel, config: RunConfig):
        self.model = loaded.model
        self.cache = DynamicCache(config=loaded.model.config)

    def forward(self, input_ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        out = self.model(input_ids=input_ids, logits_to_keep=0 if all_logits else 1, **cache_kwargs(self.cache))
        return out.logits[0]

    def span(self) -> int:
        return self.cache.get_seq_length()

    def last_position(self) -> int:
        return self.cache.get_seq_length() - 1

    def compact(self):
        return None

    def kv_storage(self) -> tuple[int, int] | None:
        """(bytes of every tensor the cache holds, entries it has room for) at their peak; None without a cache.
        A DynamicCache only grows, so its final size is its peak."""
        layers = self.cache.layers
        return sum(t.nbytes for layer in layers for t in (layer.keys, layer.values) if t is not None), self.span()


class StreamingStepper(DenseStepper):
    """Sinks + recent window with Lazy Pruning (`StreamingCache`); positions follow the RoPE mode."""

    def __init__(self, loaded: LoadedModel, config: RunConfig):
        self.model = loaded.model
        self.cache = StreamingCache(
            config.policy, RotaryGeometry.of(loaded.model), loaded.model.config.num_hidden_layers, config.rope_mode,
            kv_quant_spec(config, loaded.model.config),
        )
        self._last_position = -1

    def forward(self, input_ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        positions = self.cache.next_positions(input_ids.shape[-1], input_ids.device)
        self._last_position = self.cache.last_position  # from the host: no device sync inside the timed forward
        with self.cache.rotary_table(self.model):
            out = self.model(
                input_ids=input_ids, position_ids=positions, logits_to_keep=0 if all_logits else 1,
                **cache_kwargs(self.cache),
            )
        return out.logits[0]

    def span(self) -> int:
        return self.cache.last_span

    def last_position(self) -> int:
        return self._last_position

    def compact(self):
        """Apply the compaction the step decided (timed apart by the caller); the plan, or None."""
        self.cache.compact_pending()
        return self.cache.last_plan

    def kv_storage(self) -> tuple[int, int] | None:
        return self.cache.peak_nbytes, self.cache.capacity


def check_model_knobs(config: RunConfig, architecture) -> None:
    """The checks of `config` that need the model's architecture (its config, not its weights): kv_quant_group must
    divide head_dim. Raises ConfigError naming the knob, the constraint and the fix."""
    if config.kv_quant == "none":
        return
    dim = head_dim(architecture)
    if dim is not None and dim % config.kv_quant_group:
        divisors = [d for d in range(2, dim + 1) if dim % d == 0 and (config.kv_quant != "int4" or d % 2 == 0)]
        raise ConfigError(f"kv_quant_group = {config.kv_quant_group} does not divide head_dim = {dim} of model "
                          f"{config.model}: use a divisor of {dim} ({', '.join(map(str, divisors))})")


def kv_quant_spec(config: RunConfig, architecture) -> KVQuantSpec | None:
    """The cache's quantization for `config`, after the check that needs the model: kv_quant_group | head_dim."""
    if config.kv_quant == "none":
        return None
    check_model_knobs(config, architecture)
    return KVQuantSpec(kv_quantizer(config.kv_quant, config.kv_quant_group), config.kv_quant_residual,
                       full_sinks=config.kv_quant_sinks == "full")


class RecomputeStepper(DenseStepper):
    """The sliding-window recompute baseline: each step re-runs the model without cache on the last `cap` tokens."""

    def __init__(self, loaded: LoadedModel, config: RunConfig):
        self.model = loaded.model
        self.window = config.cap
        self.context = torch.empty((1, 0), dtype=torch.long, device=loaded.device)

    def forward(self, input_ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        self.context = torch.cat((self.context, input_ids), dim=-1)[:, -self.window :]
        out = self.model(input_ids=self.context, use_cache=False, logits_to_keep=0 if all_logits else 1)
        return out.logits[0]

    def span(self) -> int:
        return self.context.shape[-1]

    def last_position(self) -> int:
        return self.context.shape[-1] - 1

    def kv_storage(self) -> None:
        return None  # every step recomputes its window without a cache


STEPPERS = {"dense": DenseStepper, "streaming": StreamingStepper, "recompute": RecomputeStepper}


# --- the protocol ---------------------------------------------------------------------------------------------------
def evaluate(config: RunConfig, loaded: LoadedModel | None = None, stream: TokenStream | None = None) -> RunResult:
    """Run `config` and measure it. `loaded` and `stream` may be passed in to reuse a model or a text across runs."""
    if config.mode == "generate":
        from .generate import generate  # the generation protocol, beside this one

        return generate(config, loaded, stream)
    started_at = datetime.now(UTC)
    wall_start = time.perf_counter()
    if loaded is None or not loaded.serves(config):
        loaded = LoadedModel.load(config)
    if stream is None:
        stream = load_stream(
            loaded.tokenizer, config.dataset, config.max_tokens, config.sample, config.text_file, config.dataset_source
        )
    if len(stream.ids) < config.max_tokens:
        raise ValueError(f"the token stream has {len(stream.ids)} ids < max_tokens = {config.max_tokens}")
    device = loaded.device
    ids = torch.as_tensor(stream.ids[: config.max_tokens], device=device).unsqueeze(0)
    record = _Recorder(config.max_tokens - 1)
    reset_peak_memory(device)
    scoring_start = time.perf_counter()
    with torch.inference_mode():
        prefill_ms, kv_storage = PROTOCOLS[config.protocol](config, loaded, ids, record)
    scoring_s = time.perf_counter() - scoring_start

    peak_bytes, peak_kind = peak_memory_bytes(device)
    tokens = record.table()
    compactions = pa.Table.from_pylist(
        [dict(zip(COMPACTION_SCHEMA.names, row, strict=True)) for row in record.compactions], schema=COMPACTION_SCHEMA
    )
    compactions = compactions.set_column(
        compactions.schema.get_field_index("compaction_ms"), "compaction_ms",
        _nan_to_null(compactions.column("compaction_ms")),
    )
    _check_finite(tokens)
    summary = _summarise(config, loaded, stream, tokens, compactions, prefill_ms, kv_storage)
    summary["eval_tokens_per_s"] = tokens.num_rows / scoring_s
    _check_budget(config, summary)
    summary.update(
        peak_memory_bytes=peak_bytes, peak_memory_kind=peak_kind, started_at=started_at.isoformat(),
        ended_at=datetime.now(UTC).isoformat(), wall_s=time.perf_counter() - wall_start,
        environment={**fingerprint(device), **loaded.quantization},
    )
    return RunResult(config=config, summary=summary, tokens=tokens, compactions=compactions)


def _score_stepwise(config: RunConfig, loaded: LoadedModel, ids: torch.Tensor, record: _Recorder):
    """Prefill in one forward, then one token per forward, each timed. Returns (prefill_ms, the cache's measured
    (peak bytes, entries))."""
    stepper = STEPPERS[config.method](loaded, config)
    clock = Stopwatch(loaded.device)
    prefill_ms = 0.0
    if config.prefill:
        # One forward over the first `prefill` tokens: each of its positions predicts the next token.
        clock.start()
        logits = stepper.forward(ids[:, : config.prefill], all_logits=True)
        prefill_ms = clock.stop()
        record.prefill_rows(ids, _nll(logits, ids[0, 1 : config.prefill + 1]))
        # A compaction right after the prefill forward is an event of the prefill's last step.
        clock.start()
        plan = stepper.compact()
        record.compaction(config.prefill - 1, plan, clock.stop())

    for step in range(config.prefill, config.max_tokens - 1):
        clock.start()
        logits = stepper.forward(ids[:, step : step + 1])
        forward_ms = clock.stop()
        span, position = stepper.span(), stepper.last_position()
        clock.start()
        plan = stepper.compact()
        compaction_ms = clock.stop() if plan is not None else 0.0
        nll = _nll(logits, ids[0, step + 1 : step + 2])
        record.row(step=step, position=position, token=ids[0, step], target=ids[0, step + 1], nll=nll[0],
                   latency=forward_ms + compaction_ms, compaction=compaction_ms, span=span,
                   evicted=plan.evicted if plan else 0, prefill=False)
        record.compaction(step, plan, compaction_ms)
    return prefill_ms, stepper.kv_storage()


def _score_parallel(config: RunConfig, loaded: LoadedModel, ids: torch.Tensor, record: _Recorder):
    """The same rows from forwards of `chunk` tokens (streaming_llm.parallel); no latency is measured."""
    steps = config.max_tokens - 1
    if config.method == "recompute":
        scored = range(0, steps, config.score_stride)
        for block, logits in recompute_blocks(loaded.model, ids, config.cap, config.chunk, scored):
            nll = _nll(logits, ids[0, [step + 1 for step in block]])
            for step, value in zip(block, nll, strict=True):
                span = min(step + 1, config.cap)
                record.row(step=step, position=span - 1, token=ids[0, step], target=ids[0, step + 1], nll=value,
                           latency=math.nan, compaction=math.nan, span=span, evicted=0,
                           prefill=step < config.prefill)
        return None, None  # KV bytes are measured on the stepwise protocol's cache; this one holds none
    stepper = BlockStepper(loaded.model, config.policy if config.method == "streaming" else None, config.rope_mode)
    if config.prefill:
        logits = stepper.forward_block(ids[:, : config.prefill], one_step=True)
        record.prefill_rows(ids, _nll(logits, ids[0, 1 : config.prefill + 1]))
        last = stepper.trace[-1]
        record.compaction_event(config.prefill - 1, last.kv_len, last.evicted, math.nan)
    for first in range(config.prefill, steps, config.chunk):
        last = min(first + config.chunk, steps)
        logits = stepper.forward_block(ids[:, first:last])
        nll = _nll(logits, ids[0, first + 1 : last + 1])
        for offset, trace in enumerate(stepper.trace[first - last :]):
            step = first + offset
            record.row(step=step, position=trace.position, token=ids[0, step], target=ids[0, step + 1],
                       nll=nll[offset], latency=math.nan, compaction=math.nan, span=trace.kv_len,
                       evicted=trace.evicted, prefill=False)
            record.compaction_event(step, trace.kv_len, trace.evicted, math.nan)
    return None, None


PROTOCOLS = {"stepwise": _score_stepwise, "parallel": _score_parallel}


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    return F.cross_entropy(logits[-len(targets) :].float(), targets, reduction="none").double().cpu().numpy()


class _Recorder:
    """Preallocated per-step columns, filled in order."""

    def __init__(self, rows: int):
        self.columns = {
            name: np.zeros(rows, dtype=field_type.to_pandas_dtype())
            for name, field_type in zip(TOKEN_SCHEMA.names, TOKEN_SCHEMA.types, strict=True)
        }
        self.count = 0
        self.compactions: list[tuple] = []

    def row(self, *, step, position, token, target, nll, latency, compaction, span, evicted, prefill) -> None:
        values = (step, position, int(token), int(target), nll, latency, compaction, span, evicted > 0, evicted,
                  prefill)
        for name, value in zip(TOKEN_SCHEMA.names, values, strict=True):
            self.columns[name][self.count] = value
        self.count += 1

    def prefill_rows(self, ids: torch.Tensor, nll: np.ndarray) -> None:
        """The rows of a prefill forward over the first len(nll) tokens."""
        for i in range(len(nll)):
            # Under the causal mask, prefill position i attends the i + 1 entries up to itself.
            self.row(step=i, position=i, token=ids[0, i], target=ids[0, i + 1], nll=nll[i], latency=math.nan,
                     compaction=math.nan, span=i + 1, evicted=0, prefill=True)

    def compaction(self, step: int, plan, compaction_ms: float) -> None:
        """One compaction event, if the step compacted (`plan` is not None)."""
        if plan is not None:
            self.compaction_event(step, plan.length_before, plan.evicted, compaction_ms)

    def compaction_event(self, step: int, length_before: int, evicted: int, compaction_ms: float) -> None:
        """One compaction event, if the step evicted anything (a due compaction always does)."""
        if evicted > 0:
            self.compactions.append((step, length_before, length_before - evicted, evicted, compaction_ms))

    def table(self) -> pa.Table:
        arrays = [pa.array(self.columns[name][: self.count], type=t) for name, t in zip(
            TOKEN_SCHEMA.names, TOKEN_SCHEMA.types, strict=True)]
        table = pa.Table.from_arrays(arrays, schema=TOKEN_SCHEMA)
        # Prefill rows have no step latency of their own, parallel rows none at all: null, not a made-up number.
        for name in ("latency_ms", "compaction_ms"):
            table = table.set_column(table.schema.get_field_index(name), name, _nan_to_null(table.column(name)))
        return table


def _check_finite(tokens: pa.Table) -> None:
    """A NaN or infinite NLL fails the run, naming its first step: it is never stored (or averaged) as a number."""
    nll = tokens.column("nll").to_numpy()
    bad = np.flatnonzero(~np.isfinite(nll))
    if bad.size:
        step = int(tokens.column("step")[int(bad[0])].as_py())
        raise FloatingPointError(f"NLL is {nll[bad[0]]} at step {step} ({bad.size} non-finite of {nll.size} NLLs): "
                                 "the run's numbers are meaningless; check dtype / weight_quant / kv_quant")


def _nan_to_null(column: pa.ChunkedArray) -> pa.Array:
    column = column.combine_chunks()
    return pc.if_else(pc.is_nan(column), pa.scalar(None, pa.float64()), column)


def _summarise(config, loaded, stream, tokens: pa.Table, compactions: pa.Table, prefill_ms: float,
               kv_storage: tuple[int, int] | None) -> dict:
    nll = tokens.column("nll").to_numpy()
    decode = ~tokens.column("prefill").to_numpy(zero_copy_only=False)
    timed = config.protocol == "stepwise"
    latency = tokens.column("latency_ms").to_numpy(zero_copy_only=False)[decode][config.warmup :] if timed else None
    spans = tokens.column("kv_len").to_numpy()
    policy = config.policy if config.method == "streaming" else None
    return {
        "run_hash": config.run_hash,
        "method": config.method,
        "model": config.model,
        "random_weights": is_random(config.model),  # PPL of a random-weight model is meaningless
        "text_id": stream.text_id,
        "token_hash": stream.token_hash,
        "predicted_tokens": int(len(nll)),
        "decode_steps": int(decode.sum()),
        "ppl": float(np.exp(nll.mean())),
        "ppl_decode": float(np.exp(nll[decode].mean())),
        "mean_nll": float(nll.mean()),
        "protocol": config.protocol,
        # Latency exists only where each step was timed on its own: never derived from a parallel run.
        "tpot_ms_mean": float(latency.mean()) if timed else None,
        "tpot_ms_median": float(np.median(latency)) if timed else None,
        "tpot_ms_p95": float(np.percentile(latency, 95)) if timed else None,
        "timed_steps": int(len(latency)) if timed else 0,
        "prefill_ms": prefill_ms,
        "compaction_count": compactions.num_rows,
        "compaction_ms_total": float(pc.sum(compactions.column("compaction_ms")).as_py() or 0.0) if timed else None,
        "evicted_total": int(pc.sum(compactions.column("evicted")).as_py() or 0),
        "kv_len_max": int(spans.max()),
        "kv_len_mean": float(spans.mean()),
        # Measured: the most bytes the cache's tensors held, and that over the entries they had room for.
        "kv_cache_peak_bytes": kv_storage[0] if kv_storage else None,
        "kv_bytes_per_token": kv_storage[0] / kv_storage[1] if kv_storage else None,
        "weights_bytes": int(loaded.quantization["weights_bytes"]) if loaded.quantization else None,
        "weights_bytes_float": int(loaded.quantization["weights_bytes_float"]) if loaded.quantization else None,
        "window": policy.window if policy else None,
        "soft_capacity": policy.soft_capacity if policy else None,
        "hard_capacity": policy.hard_capacity if policy else None,
        "device": str(loaded.device),
    }


def _check_budget(config: RunConfig, summary: dict) -> None:
    """cap_mode peak promises that no step attends more than cap entries: a broken promise is an error, not a row."""
    peak_capped = config.method == "streaming" and config.cap is not None and config.cap_mode == "peak"
    if peak_capped and summary["kv_len_max"] > config.cap:
        raise RuntimeError(f"internal error: kv_len reached {summary['kv_len_max']} > cap = {config.cap}")
