"""StreamingLLM's KV cache (sinks + recent window, Lazy Pruning) on the transformers Cache API.

`StreamingCache` is a `transformers.Cache` that follows one stream: it owns the layers' lengths, the compaction
schedule and the positions, and keeps its entries in one storage strategy (storage.py: `FloatStorage` in the RoPE
mode's frame, or `QuantizedStorage` with `kv_quant`), to which each `StreamingLayer` hands its appends and reads.
A plain `model(input_ids, cache=cache)` works for a float cache in realign / exact mode: positions default to
`get_seq_length()`, the slot index they expect. Absolute mode and every `kv_quant` cache need
`position_ids=cache.next_positions(n)` (stream indices). HF `generate()` counts positions itself (absolute):
`streaming_llm.generate.hf_generate` runs it with the cache's positions, in every mode. Tested with transformers 5.24.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .policy import CompactionPlan, CompactionSchedule, StreamingPolicy
from .rope import RotaryGeometry
from .storage import KVQuantSpec, KVStorage, Move, QuantizedStorage, RingStorage, make_storage, moves_of

__all__ = ["KVQuantSpec", "Move", "StreamingCache", "StreamingLayer", "moves_of"]


class StreamingLayer(CacheLayerMixin):
    """One layer of a StreamingCache: its `length` (the first `length` slots are in use), and its reads and writes,
    which the cache's storage does. `keys`/`values` are this layer's [batch, kv_heads, capacity, head_dim] views of a
    float storage (None for codes)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: StreamingCache, index: int):
        super().__init__()
        self.cache = cache
        self.index = index
        self.length = 0

    # --- the CacheLayerMixin contract -------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.cache.allocate(key_states, value_states)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new entries and return the keys and values this step attends."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cache, start, count = self.cache, self.length, key_states.shape[-2]
        if self.index == 0:
            cache.step_offset = cache.tokens_seen - start
            cache.storage.start_step(start, cache.tokens_seen, count, cache.last_position)
        cache.storage.append(self.index, start, key_states, value_states)
        self.length = start + count
        return cache.storage.attend(self.index, self.length)

    def get_seq_length(self) -> int:
        """Entries the next step will see before its own: the length after any pending compaction."""
        pending = self.cache.pending
        return pending.length_after if pending is not None else self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = 0
        super().reset()

    # --- between steps (after `compact_pending`) ------------------------------------------------------------------
    def keys_to_attend(self) -> torch.Tensor:
        """The keys as the next query will attend them."""
        return self.cache.storage.keys_to_attend(self.index, self.length, self.cache.tokens_seen)

    def values_to_attend(self) -> torch.Tensor:
        return self.cache.storage.values_to_attend(self.index, self.length)


class StreamingCache(Cache):
    """Sinks + recent window with Lazy Pruning, for every layer of one model, following one stream.

    After the last layer's update of a step, the schedule decides the compaction. It is applied to all layers at once,
    either when `compact_pending()` is called (what the score protocol does, to time it apart from the forward) or at
    the start of the next step. `storage` holds the entries (storage.KVStorage; by default the one `make_storage`
    picks for `rope_mode` and `kv_quant`).
    """

    def __init__(self, policy: StreamingPolicy, geometry: RotaryGeometry, num_layers: int, rope_mode: str = "realign",
                 kv_quant: KVQuantSpec | None = None, storage: KVStorage | None = None, layout: str = "compact"):
        if storage is not None and kv_quant is not None:
            raise ValueError("StreamingCache takes a kv_quant spec or a storage, not both: the storage decides the "
                             "format")
        if storage is None:
            storage = make_storage(policy, geometry, num_layers, rope_mode, kv_quant, layout)
        self.storage = storage
        # A ring cache keeps fixed shapes: its host work is in begin_step / finish_step, its update is tensors only.
        self.ring = isinstance(storage, RingStorage)
        self.rope_mode = rope_mode
        self.geometry = geometry
        self.policy = policy
        self.kv_quant = kv_quant
        self.anchors_by_slot = rope_mode != "absolute"  # anchored entries sit at slot distance from a query
        self.schedule = CompactionSchedule(policy)
        self.initial_capacity = policy.hard_capacity + policy.compress_every + 1
        super().__init__(layers=[StreamingLayer(self, index) for index in range(num_layers)])
        self.pending: CompactionPlan | None = None
        self.tokens_seen = 0
        self.last_span = 0
        self.last_plan: CompactionPlan | None = None
        self.last_position = -1  # of the last token next_positions() placed
        self.step_offset = 0  # the current step's stream index - slot

    # --- storage ------------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Entries the storage has room for."""
        return self.storage.capacity

    @property
    def peak_nbytes(self) -> int:
        """The most bytes the storage's tensors ever held together."""
        return self.storage.peak_nbytes

    @property
    def quantized(self) -> QuantizedStorage | None:
        """The storage when it is the quantized one (its codes, step sizes and positions), else None."""
        return self.storage if isinstance(self.storage, QuantizedStorage) else None

    def allocate(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Create the storage of every layer from the first update's shapes (all layers share them)."""
        self.storage.allocate(key_states, value_states, max(self.initial_capacity, key_states.shape[-2]))
        self._bind_layers()

    def _bind_layers(self) -> None:
        device = self.storage.tensors()[0].device
        for index, layer in enumerate(self.layers):
            layer.keys, layer.values = self.storage.layer_views(index)
            layer.device = device
            layer.is_initialized = True

    def storage_tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds (keys, values, any shadow; or codes, scales, zero points and float entries)."""
        return self.storage.tensors()

    # --- the Cache contract ----------------------------------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ring:
            return self.storage.update(layer_idx, key_states, value_states)
        if layer_idx == 0:
            self.compact_pending()
            # Grown between steps (doubling), so that every layer can hold the step's entries.
            length = self.layers[0].length
            if self.storage.capacity and self.storage.reserve(length + key_states.shape[-2], length):
                self._bind_layers()
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == len(self.layers) - 1:
            self._end_step(key_states.shape[-2])
        return keys, values

    def _end_step(self, new_tokens: int) -> None:
        self.tokens_seen += new_tokens
        self.last_span = self.layers[-1].length
        self.storage.end_step(self.last_span)
        self.last_plan = self.pending = self.schedule.step(self.last_span)

    # --- the ring layout's step: host work around a forward whose shapes never change --------------------------------
    def begin_step(self, count: int) -> torch.Tensor:
        """Before a ring cache's forward of `count` tokens (at `next_positions(count)`): apply the pending
        compaction and place the step's entries; the attention mask the forward must take (`attention_mask=`)."""
        if not self.ring:
            raise RuntimeError("begin_step drives a ring cache (layout ring); a compact cache steps inside update()")
        self.compact_pending()
        length = self.layers[0].length
        if self.storage.reserve(length + count, length):  # a prefill longer than the ring: before any decode step
            self._bind_layers()
        mask = self.storage.begin_step(length, self.tokens_seen, count)
        self.step_offset = self.tokens_seen - length
        return mask

    def finish_step(self, count: int) -> None:
        """After a ring cache's forward: every layer holds the step's entries; the schedule decides the compaction."""
        for layer in self.layers:
            layer.length += count
        self._end_step(count)

    def compact_pending(self) -> None:
        """Apply the compaction decided at the end of the last step to every layer now (no-op if none is due)."""
        plan, self.pending = self.pending, None
        if plan is None:
            return
        for move in moves_of(plan):
            # Sources lie right of targets and moves go left to right, so each source is read before it is written;
            # within one move the copy is out of place because the two ranges may overlap.
            self.storage.move(move)
        self.storage.compacted(plan.length_after)
        for layer in self.layers:
            layer.length = plan.length_after

    def drop_newest(self, count: int) -> None:
        """Forget the newest `count` entries (and tokens): a speculative draft's rollback after rejected drafts.

        Any pending compaction is applied first. The schedule is not rewound: this is not the exact rollback of a
        verification (that is `parallel.BlockStepper.rewind`); the newest entries survive any compaction, so dropping
        them is right, and a schedule a few steps off only changes which old entries later steps see.
        """
        if count < 0:
            raise ValueError(f"drop_newest({count}): the count of entries to drop must be >= 0")
        self.compact_pending()
        for layer in self.layers:
            layer.length = max(layer.length - count, 0)
        self.storage.truncate(self.layers[0].length)
        self.tokens_seen -= count

    def anchored_keys(self, length: int, offset: int, device: torch.device) -> torch.Tensor | bool:
        """The storage's anchored keys re-rotated for a query `offset` past its slot (storage.KVStorage)."""
        return self.storage.anchored_keys(length, offset, device)

    def rotary_table(self, model: torch.nn.Module) -> AbstractContextManager:
        """The context a forward of `model` over this cache runs in (a quantized realign / exact cache computes the
        model's rotary table from float64 angles: storage.QuantizedStorage.rotary_table)."""
        return self.storage.rotary_table(model)

    def next_positions(self, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Position ids [1, count] of the next `count` tokens: their slots in a float realign / exact cache, their
        stream index in absolute mode and in every kv_quant cache."""
        first = self.tokens_seen if self.storage.positions_by_stream else self.get_seq_length()
        self.last_position = first + count - 1
        return torch.arange(first, first + count, device=device).unsqueeze(0)
