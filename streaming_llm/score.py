"""The score protocol (`mode: score`): prefill, then one token per step; per-step NLL, latency, span and compactions.

`score(config)` reads top to bottom like the protocol; `stepwise` times each step through one `Stepper` forward
(`measure.Stopwatch`), `parallel` yields the same rows from forwards of `chunk` tokens and times nothing. The run's
start and finish are the run kernel's (run.py). Returns a RunResult and writes nothing.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from .config import RunConfig
from .measure import Stopwatch
from .models import LoadedModel
from .parallel import BlockStepper, recompute_blocks
from .run import COMPACTION_SCHEMA, TOKEN_SCHEMA, RunResult, nan_to_null, start_run
from .steppers import make_stepper
from .text import TokenStream


def score(config: RunConfig, loaded: LoadedModel | None = None, stream: TokenStream | None = None) -> RunResult:
    """Run a `mode: score` configuration and measure it; `loaded` and `stream` may be reused across runs."""
    if config.mode != "score":
        raise ValueError(f"score() runs mode score; this config has mode {config.mode}: call evaluate()")
    run = start_run(config, loaded, stream, config.max_tokens, "max_tokens")
    ids = torch.as_tensor(run.stream.ids[: config.max_tokens], device=run.device).unsqueeze(0)
    record = _Recorder(config.max_tokens - 1)
    with run.measuring():
        scoring_start = time.perf_counter()
        with torch.inference_mode():
            prefill_ms, kv_storage = PROTOCOLS[config.protocol](config, run.loaded, ids, record)
        scoring_s = time.perf_counter() - scoring_start

    tokens, compactions = record.table(), record.compaction_table()
    summary = run.summarise(tokens, compactions, prefill_ms, kv_storage)
    summary["compile_s"] = record.compile_s  # the first compiled step's wall time (a warmup step, never in TPOT)
    summary["eval_tokens_per_s"] = tokens.num_rows / scoring_s
    return run.finish(summary, {"tokens": tokens, "compactions": compactions})


def _score_stepwise(config: RunConfig, loaded: LoadedModel, ids: torch.Tensor, record: _Recorder):
    """Prefill in one forward, then one token per forward, each timed. Returns (prefill_ms, the cache's measured
    (peak bytes, entries))."""
    stepper = make_stepper(loaded, config)
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
    record.compile_s = getattr(stepper, "compile_s", None)
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
    """Preallocated per-step columns, filled in order, and the compaction events."""

    def __init__(self, rows: int):
        self.columns = {
            name: np.zeros(rows, dtype=field_type.to_pandas_dtype())
            for name, field_type in zip(TOKEN_SCHEMA.names, TOKEN_SCHEMA.types, strict=True)
        }
        self.count = 0
        self.compactions: list[tuple] = []
        self.compile_s: float | None = None

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
            table = table.set_column(table.schema.get_field_index(name), name, nan_to_null(table.column(name)))
        return table

    def compaction_table(self) -> pa.Table:
        compactions = pa.Table.from_pylist(
            [dict(zip(COMPACTION_SCHEMA.names, row, strict=True)) for row in self.compactions],
            schema=COMPACTION_SCHEMA,
        )
        index = compactions.schema.get_field_index("compaction_ms")
        return compactions.set_column(index, "compaction_ms", nan_to_null(compactions.column("compaction_ms")))
