"""How a protocol feeds the model: one stepper per method behind `Stepper` (a token per forward, its compaction timed
apart), and the generation targets behind `BlockTarget` (a block per forward, rewound after rejected drafts).

Steppers hold a model and a cache and nothing else: they never time, record or summarise (the protocols do).
"""

from __future__ import annotations

import copy
from typing import Protocol

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache

from .cache import StreamingCache
from .compat import cache_kwargs
from .config import RunConfig
from .measure import Stopwatch
from .models import LoadedModel, check_model_knobs
from .parallel import BlockStepper, StepTrace
from .policy import CompactionPlan, CompactionSchedule
from .quant import kv_quantizer
from .rope import RotaryGeometry
from .storage import KVQuantSpec, RingBlockStorage


class Stepper(Protocol):
    """A method's cache fed one step per forward (a prefill: one causal forward), as the stepwise protocol times it:
    `forward` (the model), then `compact` (the cache work the step decided), each timed on its own."""

    def forward(self, input_ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Logits [n, vocab] of the last token of `input_ids` [1, n] (of all n with `all_logits`)."""
        ...

    def span(self) -> int:
        """Entries the last forward's query attended (its kv_len)."""
        ...

    def last_position(self) -> int:
        """Position id of the last forward's last query."""
        ...

    def compact(self) -> CompactionPlan | None:
        """Apply the compaction the last step decided; the plan, or None when none was due."""
        ...

    def kv_storage(self) -> tuple[int, int] | None:
        """(bytes of every tensor the cache held at its peak, entries it had room for); None without a cache."""
        ...


class BlockTarget(Protocol):
    """The generation protocol's target: a block of tokens per forward, exact as if fed one at a time, with a
    `rewind` for the drafts it rejected. `trace` holds one StepTrace per token it holds."""

    trace: list[StepTrace]
    compile_s: float | None  # the wall time of compiling its forward (warm-up included); None when none is compiled

    def forward_block(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [n, vocab] of the n tokens of `input_ids` [1, n]."""
        ...

    def rewind(self, count: int) -> None:
        """Forget the newest `count` tokens of the last block."""
        ...

    def kv_storage(self) -> tuple[int, int] | None:
        """As `Stepper.kv_storage`."""
        ...


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

    def compact(self) -> CompactionPlan | None:
        return None

    def kv_storage(self) -> tuple[int, int] | None:
        """A DynamicCache only grows, so its final size is its peak."""
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

    def compact(self) -> CompactionPlan | None:
        """Apply the compaction the step decided (timed apart by the caller); the plan, or None."""
        self.cache.compact_pending()
        return self.cache.last_plan

    def kv_storage(self) -> tuple[int, int] | None:
        return self.cache.peak_nbytes, self.cache.capacity


class RingStepper(StreamingStepper):
    """The streaming cache in the ring layout (`layout: ring`: storage.RingStorage, QuantizedRingStorage with
    `kv_quant`): the cache's host work in `begin_step` / `finish_step` around a forward whose shapes never change, so
    that it can be compiled (`compile`: torch.compile of the one-token forward; a prefill stays eager). `compile_s`:
    the first compiled forward's wall time (compilation included), None when nothing was compiled; `backend`
    overrides inductor (tests count graphs)."""

    def __init__(self, loaded: LoadedModel, config: RunConfig, backend=None):
        self.model = loaded.model
        architecture = loaded.model.config
        self.cache = StreamingCache(config.policy, RotaryGeometry.of(loaded.model), architecture.num_hidden_layers,
                                    config.rope_mode, kv_quant_spec(config, architecture), layout="ring")
        like = _no_entries(loaded)
        self.cache.allocate(like, like)  # before the first forward: every step's shapes are known from the start
        self._last_position = -1
        self.clock = Stopwatch(loaded.device)
        self.compile_s: float | None = None
        self.decode = (_eager_forward if config.compile == "none"
                       else compiled_forward(_eager_forward, config.compile, backend))
        self.graphs = CudaGraphCheck(config.compile)

    def forward(self, input_ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        count = input_ids.shape[-1]
        mask = self.cache.begin_step(count)
        positions = self.cache.next_positions(count, input_ids.device)
        self._last_position = self.cache.last_position
        forward = self.decode if count == 1 and not all_logits else _eager_forward
        first_compiled = forward is not _eager_forward and self.compile_s is None
        if first_compiled:
            self.graphs.mark_static(self.cache.storage.device_buffers())
            self.clock.start()
        with self.cache.rotary_table(self.model):
            logits = forward(self.model, self.cache, input_ids, positions, mask, all_logits)
        if first_compiled:
            self.compile_s = self.clock.stop() / 1000
            self.graphs.check_captured()
        self.cache.finish_step(count)
        return self.graphs.own(logits) if forward is not _eager_forward else logits


def _no_entries(loaded: LoadedModel) -> torch.Tensor:
    """Keys of no entry [1, kv_heads, 0, head_dim], the model's dtype and device: a ring's shapes before a forward."""
    architecture = loaded.model.config
    heads = architecture.num_attention_heads
    kv_heads = getattr(architecture, "num_key_value_heads", None) or heads
    head_dim = getattr(architecture, "head_dim", None) or architecture.hidden_size // heads
    return torch.empty((1, kv_heads, 0, head_dim), dtype=loaded.model.dtype, device=loaded.device)


def _eager_forward(model, cache, input_ids, positions, mask, all_logits: bool) -> torch.Tensor:
    out = model(input_ids=input_ids, position_ids=positions, attention_mask=mask,
                logits_to_keep=0 if all_logits else 1, **cache_kwargs(cache))
    return out.logits[0]


class CudaGraphCheck:
    """What compile reduce-overhead (CUDA graph trees) needs around a compiled step, a no-op under other modes.

    The buffers a step updates in place are marked static (else every replay copies them into the graph's own inputs,
    the whole cache per step). torch.compile falls back to running without graphs when it cannot capture (a CPU tensor,
    a mutated input it does not own...) with only a log line: a run timed so would be named reduce-overhead and measure
    something else, so the fallback is an error, checked after every compiled step. A replay overwrites its outputs,
    so logits a caller keeps (a block's rows) are cloned.
    """

    def __init__(self, mode: str):
        self.active = mode == "reduce-overhead"
        self.skips_before = _cudagraph_skips()

    def mark_static(self, buffers: list[torch.Tensor]) -> None:
        if self.active:
            for buffer in buffers:
                torch._dynamo.mark_static_address(buffer)

    def check_captured(self) -> None:
        skipped = _cudagraph_skips() - self.skips_before
        if self.active and skipped:
            raise RuntimeError(f"compile = reduce-overhead: torch.compile skipped CUDA graphs for the decode step "
                               f"({skipped} skip(s); TORCH_LOGS=perf_hints names the cause), so it would run and be "
                               "timed without them; use compile default, or fix what the log names")

    def own(self, logits: torch.Tensor) -> torch.Tensor:
        """After every compiled step: still under CUDA graphs (graph trees can give up later in a run, past their
        re-record limit or at a new node's input-mutation check), and the logits the caller keeps."""
        if not self.active:
            return logits
        self.check_captured()
        return logits.clone()


def _cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def compiled_forward(forward, mode: str, backend=None):
    """`forward` (a ring cache's one-token forward, or the recompute baseline's full-window one) under torch.compile
    (`mode` default or reduce-overhead; or `backend`), for fixed shapes only (`dynamic=False`).

    Dynamo's compiled code is cached per function and guarded on the cache object: a new run's cache recompiles,
    and past the recompile limit dynamo would fall back to eager without a word, so every compiled run starts from
    an empty cache (one run at a time per process, as gridrun's actors run them).
    """
    torch._dynamo.reset()
    if backend is not None:
        return torch.compile(forward, backend=backend, dynamic=False)
    return torch.compile(forward, mode=mode, dynamic=False)


def kv_quant_spec(config: RunConfig, architecture) -> KVQuantSpec | None:
    """The cache's quantization for `config`, after the check that needs the model: kv_quant_group | head_dim."""
    if config.kv_quant == "none":
        return None
    check_model_knobs(config, architecture)
    return KVQuantSpec(kv_quantizer(config.kv_quant, config.kv_quant_group), config.kv_quant_residual,
                       full_sinks=config.kv_quant_sinks == "full")


class RecomputeStepper(DenseStepper):
    """The sliding-window recompute baseline: each step re-runs the model without cache on the last `cap` tokens.

    With `compile`, the forward over a full window ([1, cap] tokens: the same shape at every step once the window has
    filled) is compiled. The filling steps before it stay eager: their forward is the eager baseline's (n < cap
    tokens, not a padded cap-token one, so a compiled run times them as an eager one does) and it changes shape at
    every step. Compilation happens at the first decode step, a warmup step (the config requires warmup >= 1), on a
    full window of placeholder ids whose logits are dropped; its wall time is `compile_s`, and no step the protocol
    times compiles. `backend` overrides inductor (tests count graphs)."""

    def __init__(self, loaded: LoadedModel, config: RunConfig, backend=None):
        self.model = loaded.model
        self.window = config.cap
        self.context = torch.empty((1, 0), dtype=torch.long, device=loaded.device)
        self.clock = Stopwatch(loaded.device)
        self.compile_s: float | None = None
        self.decode = None if config.compile == "none" else compiled_forward(_window_forward, config.compile, backend)
        self.graphs = CudaGraphCheck(config.compile)

    def forward(self, input_ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        # A new tensor of the window's shape and strides (a slice of a longer one would have other strides: another
        # compiled graph).
        count = input_ids.shape[-1]
        drop = max(0, self.context.shape[-1] + count - self.window)
        self.context = torch.cat((self.context[:, drop:], input_ids[:, max(0, count - self.window) :]), dim=-1)
        if self.decode is None or all_logits:
            return _window_forward(self.model, self.context, all_logits)
        if self.compile_s is None:
            self.clock.start()
            self.decode(self.model, torch.zeros((1, self.window), dtype=torch.long, device=self.context.device))
            self.compile_s = self.clock.stop() / 1000
            self.graphs.check_captured()
        if self.context.shape[-1] < self.window:
            return _window_forward(self.model, self.context)
        return self.graphs.own(self.decode(self.model, self.context))

    def span(self) -> int:
        return self.context.shape[-1]

    def last_position(self) -> int:
        return self.context.shape[-1] - 1

    def kv_storage(self) -> None:
        return None  # every step recomputes its window without a cache


def _window_forward(model, context: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
    out = model(input_ids=context, use_cache=False, logits_to_keep=0 if all_logits else 1)
    return out.logits[0]


STEPPERS: dict[str, type[Stepper]] = {
    "dense": DenseStepper, "streaming": StreamingStepper, "recompute": RecomputeStepper,
}


def make_stepper(loaded: LoadedModel, config: RunConfig) -> Stepper:
    """The stepper of `config`: its method's, in the ring layout where `layout` is ring."""
    if config.layout == "ring":
        return RingStepper(loaded, config)
    return STEPPERS[config.method](loaded, config)


# --- the generation targets -----------------------------------------------------------------------------------------
class StepwiseTarget:
    """The run's own stepper (dense, streaming or recompute), one token per forward, as the score protocol steps it.

    The reference every block path is compared with; it cannot rewind, so it verifies no drafts (spec none). A first
    block (the prompt) goes in one causal forward when that is exactly the same (no compaction due inside it).
    """

    def __init__(self, loaded: LoadedModel, config: RunConfig):
        self.stepper: Stepper = make_stepper(loaded, config)
        self.config = config
        self.trace: list[StepTrace] = []

    @staticmethod
    def one_forward_is_exact(config: RunConfig, count: int) -> bool:
        """Whether `count` first tokens in one causal forward equal `count` steps: no compaction (streaming) or
        window slide (recompute) would have fired before the last of them. Under kv_quant they are equal up to the
        quantization of the block's own keys (a prefill: 8.8e-3 in the logits of a tiny model at int4)."""
        if config.method == "streaming":
            policy = config.policy
            return count - policy.soft_capacity < policy.compress_every  # lengths 1..count - 1 never compact
        return config.method == "dense" or count <= config.cap

    def forward_block(self, input_ids: torch.Tensor) -> torch.Tensor:
        count = input_ids.shape[-1]
        if count > 1 and not self.trace and self.one_forward_is_exact(self.config, count):
            logits = self.stepper.forward(input_ids, all_logits=True)
            plan = self.stepper.compact()
            self.trace.extend(StepTrace(i, i + 1, 0) for i in range(count - 1))
            self.trace.append(StepTrace(count - 1, count, plan.evicted if plan else 0))
            return logits
        rows = []
        for i in range(input_ids.shape[-1]):
            logits = self.stepper.forward(input_ids[:, i : i + 1])
            span, position = self.stepper.span(), self.stepper.last_position()
            plan = self.stepper.compact()
            self.trace.append(StepTrace(position, span, plan.evicted if plan else 0))
            rows.append(logits[-1])
        return torch.stack(rows)

    def rewind(self, count: int) -> None:
        if count:
            raise ValueError(f"the stepwise target cannot rewind {count} tokens: drafts need a block target")

    @property
    def compile_s(self) -> float | None:
        """The stepper's first compiled forward's wall time (None when nothing was compiled)."""
        return getattr(self.stepper, "compile_s", None)

    def kv_storage(self) -> tuple[int, int] | None:
        return self.stepper.kv_storage()


class DenseBlockTarget:
    """No eviction, a block per forward over HF's DynamicCache; a rewind crops the rejected entries."""

    compile_s = None  # eager only

    def __init__(self, loaded: LoadedModel, config: RunConfig):
        self.model = loaded.model
        self.cache = DynamicCache(config=loaded.model.config)
        self.trace: list[StepTrace] = []

    def forward_block(self, input_ids: torch.Tensor) -> torch.Tensor:
        start = self.cache.get_seq_length()
        out = self.model(input_ids=input_ids, logits_to_keep=0, **cache_kwargs(self.cache))
        self.trace.extend(StepTrace(start + i, start + i + 1, 0) for i in range(input_ids.shape[-1]))
        return out.logits[0]

    def rewind(self, count: int) -> None:
        if count:
            self.cache.crop(-count)  # transformers 5.24: a negative value removes that many entries
            del self.trace[-count:]

    def kv_storage(self) -> tuple[int, int] | None:
        """(bytes of the DynamicCache's tensors, entries): it only grows, so its final size is its peak."""
        tensors = [t for layer in self.cache.layers for t in (layer.keys, layer.values) if t is not None]
        return sum(t.nbytes for t in tensors), self.cache.get_seq_length()


class StreamingBlockTarget(BlockStepper):
    """A streaming cache verified a block per forward (streaming_llm.parallel): compactions inside the block are
    replayed per query, and a rewind restores the state, schedule and trace of the accepted prefix."""

    compile_s = None  # eager only

    def __init__(self, loaded: LoadedModel, config: RunConfig):
        super().__init__(loaded.model, config.policy, config.rope_mode)

    def kv_storage(self) -> tuple[int, int] | None:
        """(bytes of the block storage: per entry a pre-RoPE key, a rotated one (realign / exact) and a value, for the
        kept ones plus a block and its anchored copies; entries)."""
        if self.keys is None:
            return None
        storages = [t for t in (self.keys, self.rotated, self.values) if t is not None]
        return sum(t.nbytes for t in storages), self.keys.shape[3]


class RingBlockTarget:
    """The streaming cache in the ring layout, verified a block per forward (`layout: ring` with `spec:
    prompt_lookup`): every verification forward has one shape, [1, k + 1] tokens (k = `num_draft`), so that it can be
    compiled (`compile`) once. A shorter draft is padded: the padding's entries go to free slots that no query
    attends, each padding query attends its own entry only, and its logits are dropped.

    The schedule runs on the host over the block's steps (storage.RingBlockStorage): each query's mask row is what the
    stepwise cache attends at its step, compactions inside the block included, with the anchored copies its offset
    needs. A rewind restores the slot map, schedule, length and trace of the accepted prefix (kept per step by the
    replay); nothing on the device is copied back: the rejected entries' slots are free again, and masked. The prompt
    goes in one eager causal forward when that is exact (StepwiseTarget.one_forward_is_exact), else in blocks of
    k + 1. Compiled, the block forward is warmed up when the target is built (`compile_s`: that wall time, outside
    the prompt's and every block's time); `backend` overrides inductor (tests count graphs).
    Positions in the trace are stream indices, as RingStepper's.
    """

    PADDING_ID = 0  # any token id: its entry is never attended and its logits are dropped

    def __init__(self, loaded: LoadedModel, config: RunConfig, backend=None):
        self.model = loaded.model
        self.config = config
        self.block = config.num_draft + 1
        architecture = loaded.model.config
        self.storage = RingBlockStorage(config.policy, RotaryGeometry.of(loaded.model),
                                        architecture.num_hidden_layers, config.rope_mode, self.block)
        like = _no_entries(loaded)
        policy = config.policy
        # A block starts with at most H + R - 1 entries (the longest span is H + R) and adds k + 1 in slots free at
        # its start; a prompt in one forward holds at most C + R entries.
        self.storage.allocate(like, like, policy.hard_capacity + policy.compress_every + self.block)
        self.cache = _RingBlockCache(self.storage)
        self.schedule = CompactionSchedule(policy)
        self.tokens_seen = 0
        self.trace: list[StepTrace] = []
        self._after: list[tuple[np.ndarray, CompactionSchedule]] = []  # per token of the last block: its state after
        self.device = loaded.device
        self.clock = Stopwatch(loaded.device)
        self.compile_s: float | None = None
        self.decode = _block_forward
        self.graphs = CudaGraphCheck(config.compile)
        if config.compile != "none":
            self.decode = compiled_forward(_block_forward, config.compile, backend)
            self.graphs.mark_static(self.storage.device_buffers())
            self._warm_up()
            self.graphs.check_captured()

    def _warm_up(self) -> None:
        """Compile the block forward before the run starts (`compile_s`: its wall time), on a block of padding alone
        that leaves the state as it was (its entries go to free slots, each query attends its own). A block's first
        tokens would otherwise share its compilation in their latency, past `warmup` when the block is long. CUDA graph
        trees warm up at the first call, record at the second and replay from the third: all three here."""
        self.clock.start()
        # Inference tensors, as the generation protocol's: a tensor made outside inference mode is another graph.
        with torch.inference_mode(), self.storage.rotary_table(self.model):
            ids = torch.full((1, self.block), self.PADDING_ID, dtype=torch.long, device=self.device)
            positions = torch.arange(self.block, device=self.device).unsqueeze(0)
            for _ in range(3 if self.graphs.active else 1):
                mask = self.storage.begin_block([], self.storage.claim(self.block), 0)
                self.decode(self.model, self.cache, ids, positions, mask)
        self.compile_s = self.clock.stop() / 1000

    def forward_block(self, input_ids: torch.Tensor) -> torch.Tensor:
        count = input_ids.shape[-1]
        if count > self.block:
            if not self.trace and StepwiseTarget.one_forward_is_exact(self.config, count):
                return self._forward(input_ids, count, _block_forward)
            chunks = [self.forward_block(input_ids[:, i : i + self.block]) for i in range(0, count, self.block)]
            return torch.cat(chunks)
        # Always a new tensor: a slice of a longer one (a prompt's chunk) has other strides, another compiled graph.
        padding = torch.full((1, self.block - count), self.PADDING_ID, dtype=input_ids.dtype, device=input_ids.device)
        return self._forward(torch.cat((input_ids, padding), dim=-1), count, self.decode)

    def _forward(self, input_ids: torch.Tensor, count: int, forward) -> torch.Tensor:
        """The forward of `input_ids` [1, rows] whose first `count` tokens are real (the rest padding)."""
        rows, first = input_ids.shape[-1], self.tokens_seen
        storage = self.storage
        slots = storage.claim(rows)
        order = storage.slot_of[: storage.length].copy()
        schedule = copy.copy(self.schedule)
        views, after, trace = [], [], []
        for i in range(count):
            view = np.append(order, slots[i])
            views.append(view)
            plan = schedule.step(len(view))
            order = view if plan is None else view[np.fromiter(plan.kept_slots, np.int64, plan.length_after)]
            after.append((order, copy.copy(schedule)))
            trace.append(StepTrace(first + i, len(view), plan.evicted if plan else 0))
        mask = storage.begin_block(views, slots, first)
        positions = torch.arange(first, first + rows, device=input_ids.device).unsqueeze(0)
        with storage.rotary_table(self.model):
            logits = forward(self.model, self.cache, input_ids, positions, mask)
        if forward is not _block_forward:
            logits = self.graphs.own(logits)
        storage.settle(order)
        self.schedule = schedule
        self.tokens_seen = first + count
        self.trace.extend(trace)
        self._after = after
        return logits[:count]

    def rewind(self, count: int) -> None:
        """Forget the newest `count` tokens of the last block: the state is that after its first n - count."""
        if count == 0:
            return
        if not 0 < count < len(self._after):
            raise ValueError(f"rewind({count}): only 0 <= count < the last block's {len(self._after)} tokens")
        kept = len(self._after) - count
        order, schedule = self._after[kept - 1]
        self.storage.settle(order)
        self.schedule = copy.copy(schedule)
        self.tokens_seen -= count
        del self.trace[len(self.trace) - count :]
        self._after = self._after[:kept]

    def kv_storage(self) -> tuple[int, int] | None:
        """(bytes of the ring's tensors, the anchored copies included; entries it has room for)."""
        return self.storage.peak_nbytes, self.storage.capacity


class _RingBlockCache(Cache):
    """The Cache a ring block's forward sees: each layer's update writes the block into the ring storage and returns
    its whole buffers (the forward's mask says what each query attends)."""

    def __init__(self, storage: RingBlockStorage):
        super().__init__(layers=[])
        self.storage = storage

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.storage.update(layer_idx, key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.storage.length


def _block_forward(model, cache, input_ids, positions, mask) -> torch.Tensor:
    out = model(input_ids=input_ids, position_ids=positions, attention_mask=mask, logits_to_keep=0,
                **cache_kwargs(cache))
    return out.logits[0]


def make_target(loaded: LoadedModel, config: RunConfig) -> BlockTarget:
    """The target of a generation run: a block target when drafts are verified, else the run's own stepper."""
    if config.spec == "none":
        return StepwiseTarget(loaded, config)
    if config.method == "dense":
        return DenseBlockTarget(loaded, config)
    if config.layout == "ring":
        return RingBlockTarget(loaded, config)
    return StreamingBlockTarget(loaded, config)
