"""StreamingLLM's KV cache (sinks + recent window, Lazy Pruning) on the transformers Cache API.

`StreamingCache` is a `transformers.Cache` whose layers keep keys and values in preallocated buffers and apply the
compactions a `CompactionSchedule` decides. One layer class per RoPE mode:
- `RealignedLayer` (`realign`): stores post-RoPE keys and re-rotates the kept ones to their new slots at compaction;
- `PreRopeLayer` (`exact`): stores pre-RoPE keys and rotates all of them by slot index at every step;
- `AbsoluteLayer` (`absolute`): never re-aligns; queries keep their absolute positions.
A plain `model(input_ids, cache=cache)` works: positions default to `get_seq_length()`, which is the slot index the
realign and exact modes expect (absolute mode needs `position_ids=cache.next_positions(n)`). Tested with
transformers 5.24 (see compat.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .policy import CompactionPlan, CompactionSchedule, StreamingPolicy
from .rope import RotaryGeometry, rotate_keys


@dataclass(frozen=True)
class PreparedCompaction:
    """A plan turned into tensors once for all layers: entries from `first_moved` on are gathered from `sources`."""

    plan: CompactionPlan
    first_moved: int
    sources: torch.Tensor  # slots gathered into first_moved .. length_after
    cos: torch.Tensor | None = None  # realign: rotation by (new slot - old slot) of each gathered entry
    sin: torch.Tensor | None = None


class StreamingLayer(CacheLayerMixin):
    """One layer's keys and values in buffers of shape [batch, kv_heads, capacity, head_dim], `length` of them used.

    Buffers are written in place and grown by doubling, so a step appends without reallocating the cache.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, geometry: RotaryGeometry, initial_capacity: int = 256):
        super().__init__()
        self.geometry = geometry
        self.initial_capacity = initial_capacity
        self.length = 0
        self.pending: PreparedCompaction | None = None

    # --- the CacheLayerMixin contract -------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        capacity = max(self.initial_capacity, key_states.shape[-2])
        self.keys = key_states.new_empty((*key_states.shape[:2], capacity, key_states.shape[-1]))
        self.values = value_states.new_empty((*value_states.shape[:2], capacity, value_states.shape[-1]))
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new entries (after any pending compaction) and return the keys and values to attend."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.apply_pending()
        start, count = self.length, key_states.shape[-2]
        self._reserve(start + count)
        self.keys[:, :, start : start + count] = self._key_to_store(key_states, start)
        self.values[:, :, start : start + count] = value_states
        self.length = start + count
        return self._keys_to_attend(), self.values[:, :, : self.length]

    def get_seq_length(self) -> int:
        """Entries the next step will see before its own: the length after any pending compaction."""
        return self.pending.plan.length_after if self.pending is not None else self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = 0
        self.pending = None
        super().reset()

    # --- compaction --------------------------------------------------------------------------------------------
    @classmethod
    def prepare(cls, plan: CompactionPlan, geometry: RotaryGeometry, device: torch.device) -> PreparedCompaction:
        kept = plan.kept_slots
        first_moved = next((i for i, slot in enumerate(kept) if slot != i), len(kept))
        sources = torch.tensor(kept[first_moved:], dtype=torch.long, device=device)
        return PreparedCompaction(plan=plan, first_moved=first_moved, sources=sources)

    def apply_pending(self) -> None:
        if self.pending is None:
            return
        prepared, self.pending = self.pending, None
        start, end = prepared.first_moved, prepared.plan.length_after
        if end > start:
            keys = self.keys.index_select(2, prepared.sources)
            self.keys[:, :, start:end] = self._moved_keys(keys, prepared)
            self.values[:, :, start:end] = self.values.index_select(2, prepared.sources)
        self.length = end

    # --- what differs between RoPE modes ----------------------------------------------------------------------
    def _key_to_store(self, key_states: torch.Tensor, first_slot: int) -> torch.Tensor:
        return key_states

    def _keys_to_attend(self) -> torch.Tensor:
        return self.keys[:, :, : self.length]

    def _moved_keys(self, keys: torch.Tensor, prepared: PreparedCompaction) -> torch.Tensor:
        return keys

    def _reserve(self, needed: int) -> None:
        capacity = self.keys.shape[-2]
        if needed <= capacity:
            return
        while capacity < needed:
            capacity *= 2
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:2], capacity, old.shape[-1]))
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)


class RealignedLayer(StreamingLayer):
    """`realign`: keys are stored rotated at their slot; a compaction rotates each moved key by its shift."""

    @classmethod
    def prepare(cls, plan: CompactionPlan, geometry: RotaryGeometry, device: torch.device) -> PreparedCompaction:
        base = super().prepare(plan, geometry, device)
        new_slots = torch.arange(base.first_moved, plan.length_after, device=device)
        cos, sin = geometry.cos_sin(new_slots - base.sources, device)
        return PreparedCompaction(plan, base.first_moved, base.sources, cos, sin)

    def _moved_keys(self, keys: torch.Tensor, prepared: PreparedCompaction) -> torch.Tensor:
        # A pure rotation: the model's attention_scaling was applied once, when the key was first rotated.
        return rotate_keys(keys, prepared.cos, prepared.sin)


class PreRopeLayer(StreamingLayer):
    """`exact`: keys are stored before RoPE and rotated by slot index at every step (the slow reference mode)."""

    def _key_to_store(self, key_states: torch.Tensor, first_slot: int) -> torch.Tensor:
        # The model rotated the new keys at their slot (their position id in this mode): undo it.
        slots = torch.arange(first_slot, first_slot + key_states.shape[-2], device=key_states.device)
        cos, sin = self.geometry.cos_sin(slots, key_states.device)
        return rotate_keys(key_states, cos, -sin, scale=1.0 / self.geometry.attention_scaling)

    def _keys_to_attend(self) -> torch.Tensor:
        slots = torch.arange(self.length, device=self.keys.device)
        cos, sin = self.geometry.cos_sin(slots, self.keys.device)
        return rotate_keys(self.keys[:, :, : self.length], cos, sin, scale=self.geometry.attention_scaling)


class AbsoluteLayer(StreamingLayer):
    """`absolute`: entries move at compaction but keep the rotation of their absolute position."""


LAYER_CLASSES: dict[str, type[StreamingLayer]] = {
    "realign": RealignedLayer,
    "exact": PreRopeLayer,
    "absolute": AbsoluteLayer,
}


class StreamingCache(Cache):
    """Sinks + recent window with Lazy Pruning, for every layer of one model, following one stream.

    After the last layer's update of a step, the schedule decides the compaction; layers apply it lazily at their next
    update, or at once when `compact_pending()` is called (what `evaluate` does, to time it apart from the forward).
    """

    def __init__(self, policy: StreamingPolicy, geometry: RotaryGeometry, num_layers: int, rope_mode: str = "realign"):
        if rope_mode not in LAYER_CLASSES:
            raise ValueError(f"rope_mode '{rope_mode}' is unknown (known: {', '.join(LAYER_CLASSES)})")
        self.layer_class = LAYER_CLASSES[rope_mode]
        self.rope_mode = rope_mode
        self.geometry = geometry
        self.schedule = CompactionSchedule(policy)
        capacity = policy.hard_capacity + policy.compress_every + 1
        super().__init__(layers=[self.layer_class(geometry, capacity) for _ in range(num_layers)])
        self.tokens_seen = 0
        self.last_span = 0
        self.last_plan: CompactionPlan | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == len(self.layers) - 1:
            self._end_step(key_states.shape[-2], key_states.device)
        return keys, values

    def _end_step(self, new_tokens: int, device: torch.device) -> None:
        self.tokens_seen += new_tokens
        self.last_span = self.layers[-1].length
        self.last_plan = self.schedule.step(self.last_span)
        if self.last_plan is not None:
            prepared = self.layer_class.prepare(self.last_plan, self.geometry, device)
            for layer in self.layers:
                layer.pending = prepared

    def compact_pending(self) -> None:
        """Apply the compaction decided at the end of the last step to every layer now."""
        for layer in self.layers:
            layer.apply_pending()

    def next_positions(self, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Position ids [1, count] of the next `count` tokens: their slots, or their stream index in absolute mode."""
        first = self.tokens_seen if self.rope_mode == "absolute" else self.get_seq_length()
        return torch.arange(first, first + count, device=device).unsqueeze(0)

    def kv_bytes(self) -> int:
        """Bytes of the keys and values in use (not the buffers' spare room)."""
        return sum(
            2 * layer.length * layer.keys[:, :, :1].numel() * layer.keys.element_size()
            for layer in self.layers
            if layer.is_initialized
        )
