"""The run kernel every protocol shares: `start_run` (model, text, clock), `Run.measuring` (peak memory) and the
finish (`Run.summarise`: the finite-NLL check and the summary; `Run.finish`: the budget check, timestamps and the
environment). A protocol (score.py, generate.py) steps the model in between; this module never does.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .config import RunConfig
from .environment import fingerprint
from .measure import peak_memory_bytes, reset_peak_memory
from .models import LoadedModel, is_random, resolve_device
from .results import COMPACTION_SCHEMA, TOKEN_SCHEMA, RunResult  # noqa: F401  (the protocols import them from here)
from .text import TokenStream, load_stream


@dataclass
class Run:
    """One run between its start and its finish: the model and text it uses, and when it started."""

    config: RunConfig
    loaded: LoadedModel
    stream: TokenStream
    started_at: datetime
    wall_start: float  # time.perf_counter() at the start
    peak_memory: tuple[int, str] | None = None  # (bytes, what they are), read when `measuring` ends

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @contextmanager
    def measuring(self) -> Iterator[None]:
        """The protocol's measured part: the peak memory is that reached inside (its reset and reading are here)."""
        reset_peak_memory(self.device)
        yield
        self.peak_memory = peak_memory_bytes(self.device)

    def summarise(self, tokens: pa.Table, compactions: pa.Table, prefill_ms: float | None,
                  kv_storage: tuple[int, int] | None) -> dict[str, Any]:
        """The summary every protocol reports, after the check that every NLL is finite (a run that fails it raises
        FloatingPointError). `kv_storage`: the cache's (peak bytes, entries), None without a cache."""
        check_finite(tokens)
        return summarise(self.config, self.loaded, self.stream, tokens, compactions, prefill_ms, kv_storage)

    def finish(self, summary: dict[str, Any], tables: dict[str, pa.Table]) -> RunResult:
        """The RunResult: `summary` after the budget check, with the peak memory, timestamps and environment, and the
        run's per-run `tables` (streaming_llm.results.STEP_TABLES names)."""
        if self.peak_memory is None:
            raise RuntimeError("internal error: a run finished without its measured part (Run.measuring)")
        check_budget(self.config, summary)
        peak_bytes, peak_kind = self.peak_memory
        summary.update(
            peak_memory_bytes=peak_bytes, peak_memory_kind=peak_kind, started_at=self.started_at.isoformat(),
            ended_at=datetime.now(UTC).isoformat(), wall_s=time.perf_counter() - self.wall_start,
            environment={**fingerprint(self.device), **self.loaded.quantization},
        )
        return RunResult(config=self.config, summary=summary, tables=tables)


def start_run(config: RunConfig, loaded: LoadedModel | None, stream: TokenStream | None, stream_tokens: int,
              length_knob: str) -> Run:
    """Start `config`'s run: its clock, its model (`loaded` when it serves the config, else loaded now) and its first
    `stream_tokens` tokens of text (`stream` when given), which the knob named `length_knob` asks for."""
    started_at = datetime.now(UTC)
    wall_start = time.perf_counter()
    check_compile_environment(config)
    if loaded is None or not loaded.serves(config):
        loaded = LoadedModel.load(config)
    if stream is None:
        stream = load_stream(loaded.tokenizer, config.dataset, stream_tokens, config.sample, config.text_file,
                             config.dataset_source)
    if len(stream.ids) < stream_tokens:
        raise ValueError(f"the token stream has {len(stream.ids)} ids < {length_knob} = {stream_tokens}")
    return Run(config, loaded, stream, started_at, wall_start)


def check_compile_environment(config: RunConfig) -> None:
    """What a compiled run needs from this machine, checked before the model loads: CUDA for reduce-overhead (CUDA
    graphs), and on a CPU the C++ compiler inductor builds its kernels with."""
    if config.compile == "none":
        return
    device = resolve_device(config.device)
    if config.compile == "reduce-overhead" and device.type != "cuda":
        raise RuntimeError(f"compile = reduce-overhead captures CUDA graphs, and this run's device is {device.type}: "
                           "use compile default on a CPU, or run on a CUDA device")
    if device.type == "cpu" and not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        raise RuntimeError(f"compile = {config.compile} on a CPU needs a C++ compiler (torch.compile's inductor builds "
                           "its kernels with one) and none is on PATH: install g++ (scripts/setup.sh does: "
                           "apt-get install g++), or use compile none")


def check_finite(tokens: pa.Table) -> None:
    """A NaN or infinite NLL fails the run, naming its first step: it is never stored (or averaged) as a number."""
    nll = tokens.column("nll").to_numpy()
    bad = np.flatnonzero(~np.isfinite(nll))
    if bad.size:
        step = int(tokens.column("step")[int(bad[0])].as_py())
        raise FloatingPointError(f"NLL is {nll[bad[0]]} at step {step} ({bad.size} non-finite of {nll.size} NLLs): "
                                 "the run's numbers are meaningless; check dtype / weight_quant / kv_quant")


def check_budget(config: RunConfig, summary: dict) -> None:
    """cap_mode peak promises that no step attends more than cap entries: a broken promise is an error, not a row."""
    peak_capped = config.method == "streaming" and config.cap is not None and config.cap_mode == "peak"
    if peak_capped and summary["kv_len_max"] > config.cap:
        raise RuntimeError(f"internal error: kv_len reached {summary['kv_len_max']} > cap = {config.cap}")


def nan_to_null(column: pa.ChunkedArray) -> pa.Array:
    """NaN as null: a time that was not measured is no number."""
    column = column.combine_chunks()
    return pc.if_else(pc.is_nan(column), pa.scalar(None, pa.float64()), column)


def summarise(config: RunConfig, loaded: LoadedModel, stream: TokenStream, tokens: pa.Table, compactions: pa.Table,
              prefill_ms: float | None, kv_storage: tuple[int, int] | None) -> dict[str, Any]:
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
        **cache_and_model_summary(loaded, policy, kv_storage),
    }


def cache_and_model_summary(loaded: LoadedModel, policy, kv_storage: tuple[int, int] | None) -> dict[str, Any]:
    """The summary keys every protocol reports of its cache and model: the most bytes the cache's tensors held (and
    that over the entries they had room for), the weights' bytes, the policy's capacities and the device."""
    return {
        "kv_cache_peak_bytes": kv_storage[0] if kv_storage else None,
        "kv_bytes_per_token": kv_storage[0] / kv_storage[1] if kv_storage else None,
        "weights_bytes": int(loaded.quantization["weights_bytes"]) if loaded.quantization else None,
        "weights_bytes_float": int(loaded.quantization["weights_bytes_float"]) if loaded.quantization else None,
        "window": policy.window if policy else None,
        "soft_capacity": policy.soft_capacity if policy else None,
        "hard_capacity": policy.hard_capacity if policy else None,
        "device": str(loaded.device),
    }
