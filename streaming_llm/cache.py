"""StreamingLLM's KV cache (sinks + recent window, Lazy Pruning) on the transformers Cache API.

`StreamingCache` is a `transformers.Cache` whose layers keep keys and values in one preallocated storage per cache
([layers, batch, kv_heads, capacity, head_dim]), so a step appends in place and a compaction moves and re-rotates every
layer at once. One layer class per RoPE mode:
- `RealignedLayer` (`realign`): stores post-RoPE keys; a compaction rotates each moved key by its shift;
- `PreRopeLayer` (`exact`): stores pre-RoPE keys and rotates all of them by slot index at every step;
- `AbsoluteLayer` (`absolute`): never re-aligns; queries keep their absolute positions.
A plain `model(input_ids, cache=cache)` works: positions default to `get_seq_length()`, the slot index that realign
and exact expect (absolute mode needs `position_ids=cache.next_positions(n)`). HF `generate()` counts positions itself
(absolute): `streaming_llm.generate.hf_generate` runs it with the cache's positions, in every mode. Tested with
transformers 5.24.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .policy import CompactionPlan, CompactionSchedule, StreamingPolicy
from .rope import RotaryGeometry, rotate_keys


@dataclass(frozen=True)
class Move:
    """Entries [source, source + count) go to [target, target + count); their slots shift by target - source."""

    source: int
    target: int
    count: int

    @property
    def shift(self) -> int:
        return self.target - self.source

    def slices(self) -> tuple[slice, slice]:
        """(target, source) slot ranges."""
        return slice(self.target, self.target + self.count), slice(self.source, self.source + self.count)


def moves_of(plan: CompactionPlan) -> list[Move]:
    """The plan as runs of consecutive kept slots; entries that stay where they are (the sinks) need no move."""
    moves: list[Move] = []
    for target, source in enumerate(plan.kept_slots):
        if source == target:
            continue
        last = moves[-1] if moves else None
        if last is not None and last.source + last.count == source and last.target + last.count == target:
            moves[-1] = Move(last.source, last.target, last.count + 1)
        else:
            moves.append(Move(source, target, 1))
    return moves


class StreamingLayer(CacheLayerMixin):
    """One layer's view of the cache's storage: `keys`/`values` are [batch, kv_heads, capacity, head_dim] slices, of
    which the first `length` entries are in use. The owning StreamingCache allocates, grows and compacts them.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: StreamingCache):
        super().__init__()
        self.cache = cache
        self.length = 0
        self.shadow: torch.Tensor | None = None  # this layer's slice of cache.shadow_keys, when the cache keeps one

    # --- the CacheLayerMixin contract -------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.cache.allocate(key_states, value_states)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new entries and return the keys and values this step attends."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, count = self.length, key_states.shape[-2]
        self.keys[:, :, start : start + count] = self.key_to_store(key_states, start)
        self.values[:, :, start : start + count] = value_states
        self.length = start + count
        return self.keys_to_attend(), self.values[:, :, : self.length]

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

    # --- what differs between RoPE modes ----------------------------------------------------------------------
    def key_to_store(self, key_states: torch.Tensor, first_slot: int) -> torch.Tensor:
        return key_states

    def keys_to_attend(self) -> torch.Tensor:
        return self.keys[:, :, : self.length]

    @classmethod
    def move_keys(cls, cache: StreamingCache, move: Move) -> None:
        """Move the keys of every layer by `move` (out of place: source and target ranges may overlap)."""
        target, source = move.slices()
        cache.all_keys[..., target, :] = cache.all_keys[..., source, :].clone()

    @classmethod
    def needs_shadow(cls, dtype: torch.dtype) -> bool:
        """Whether the cache must also keep pre-RoPE keys (`shadow_keys`) for this layer class and dtype."""
        return False


class RealignedLayer(StreamingLayer):
    """`realign`: keys are stored rotated at their slot; a compaction rotates each moved key by its shift.

    In float32 the moved keys are rotated in place of the stored ones (one matmul per move, all layers at once): the
    rounding this repeats stays ~1e-5 after a thousand compactions. In float16 / bfloat16 it would grow with every
    compaction (0.2 nats at R = 1 in bf16), biasing strict against lazy, so there the cache keeps a pre-RoPE shadow of
    the keys (+50% KV memory) and re-derives each moved key from it at its new slot: one rounding, however many moves.
    """

    def key_to_store(self, key_states: torch.Tensor, first_slot: int) -> torch.Tensor:
        if self.shadow is not None:
            self.shadow[:, :, first_slot : first_slot + key_states.shape[-2]] = _unrotate(
                key_states, first_slot, self.cache.geometry
            )
        return key_states

    @classmethod
    def move_keys(cls, cache: StreamingCache, move: Move) -> None:
        target, source = move.slices()
        geometry = cache.geometry
        if cache.shadow_keys is None:
            # A pure rotation: the model's attention_scaling was applied once, when the key was first rotated.
            keys = cache.all_keys[..., source, :]
            rotation = geometry.rotation_matrix(move.shift, keys.shape[-1], keys.device)
            cache.all_keys[..., target, :] = (keys.float() @ rotation).to(keys.dtype)
            return
        pre_rope = cache.shadow_keys[..., source, :].clone()
        cache.shadow_keys[..., target, :] = pre_rope
        slots = torch.arange(target.start, target.stop, device=pre_rope.device)
        cos, sin = geometry.cos_sin(slots, pre_rope.device)
        cache.all_keys[..., target, :] = rotate_keys(pre_rope, cos, sin, scale=geometry.attention_scaling)

    @classmethod
    def needs_shadow(cls, dtype: torch.dtype) -> bool:
        return dtype != torch.float32


class PreRopeLayer(StreamingLayer):
    """`exact`: keys are stored before RoPE and rotated by slot index at every step (the slow reference mode)."""

    def key_to_store(self, key_states: torch.Tensor, first_slot: int) -> torch.Tensor:
        return _unrotate(key_states, first_slot, self.cache.geometry)

    def keys_to_attend(self) -> torch.Tensor:
        geometry = self.cache.geometry
        slots = torch.arange(self.length, device=self.keys.device)
        cos, sin = geometry.cos_sin(slots, self.keys.device)
        return rotate_keys(self.keys[:, :, : self.length], cos, sin, scale=geometry.attention_scaling)


class AbsoluteLayer(StreamingLayer):
    """`absolute`: entries move at compaction but keep the rotation of their absolute position."""


def _unrotate(key_states: torch.Tensor, first_slot: int, geometry: RotaryGeometry) -> torch.Tensor:
    """The keys before RoPE: the model rotated them at their slots (their position ids in realign / exact mode)."""
    slots = torch.arange(first_slot, first_slot + key_states.shape[-2], device=key_states.device)
    cos, sin = geometry.cos_sin(slots, key_states.device)
    return rotate_keys(key_states, cos, -sin, scale=1.0 / geometry.attention_scaling)


LAYER_CLASSES: dict[str, type[StreamingLayer]] = {
    "realign": RealignedLayer,
    "exact": PreRopeLayer,
    "absolute": AbsoluteLayer,
}


class StreamingCache(Cache):
    """Sinks + recent window with Lazy Pruning, for every layer of one model, following one stream.

    After the last layer's update of a step, the schedule decides the compaction. It is applied to all layers at once,
    either when `compact_pending()` is called (what `evaluate` does, to time it apart from the forward) or at the start
    of the next step.
    """

    def __init__(self, policy: StreamingPolicy, geometry: RotaryGeometry, num_layers: int, rope_mode: str = "realign"):
        if rope_mode not in LAYER_CLASSES:
            raise ValueError(f"rope_mode '{rope_mode}' is unknown (known: {', '.join(LAYER_CLASSES)})")
        self.layer_class = LAYER_CLASSES[rope_mode]
        self.rope_mode = rope_mode
        self.geometry = geometry
        self.schedule = CompactionSchedule(policy)
        self.initial_capacity = policy.hard_capacity + policy.compress_every + 1
        super().__init__(layers=[self.layer_class(self) for _ in range(num_layers)])
        self.all_keys: torch.Tensor | None = None
        self.all_values: torch.Tensor | None = None
        self.shadow_keys: torch.Tensor | None = None
        self.pending: CompactionPlan | None = None
        self.tokens_seen = 0
        self.last_span = 0
        self.last_plan: CompactionPlan | None = None
        self.last_position = -1  # of the last token next_positions() placed

    # --- storage ------------------------------------------------------------------------------------------------
    def allocate(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Create the storage of every layer from the first update's shapes (all layers share them)."""
        capacity = max(self.initial_capacity, key_states.shape[-2])
        self.all_keys = key_states.new_empty((len(self.layers), *key_states.shape[:2], capacity, key_states.shape[-1]))
        self.all_values = value_states.new_empty(
            (len(self.layers), *value_states.shape[:2], capacity, value_states.shape[-1])
        )
        if self.layer_class.needs_shadow(key_states.dtype):
            self.shadow_keys = torch.empty_like(self.all_keys)
        self._bind_layers()

    def _bind_layers(self) -> None:
        for index, layer in enumerate(self.layers):
            layer.keys, layer.values = self.all_keys[index], self.all_values[index]
            layer.shadow = None if self.shadow_keys is None else self.shadow_keys[index]
            layer.device = self.all_keys.device
            layer.is_initialized = True

    def _reserve(self, needed: int) -> None:
        """Grow the storage (doubling) so that every layer can hold `needed` entries; called between steps."""
        capacity = self.all_keys.shape[-2]
        if needed <= capacity:
            return
        while capacity < needed:
            capacity *= 2
        length = self.layers[0].length
        for name in ("all_keys", "all_values", "shadow_keys"):
            old = getattr(self, name)
            if old is None:
                continue
            new = old.new_empty((*old.shape[:-2], capacity, old.shape[-1]))
            new[..., :length, :] = old[..., :length, :]
            setattr(self, name, new)
        self._bind_layers()

    # --- the Cache contract ----------------------------------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == 0:
            self.compact_pending()
            if self.all_keys is not None:
                self._reserve(self.layers[0].length + key_states.shape[-2])
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == len(self.layers) - 1:
            self._end_step(key_states.shape[-2])
        return keys, values

    def _end_step(self, new_tokens: int) -> None:
        self.tokens_seen += new_tokens
        self.last_span = self.layers[-1].length
        self.last_plan = self.pending = self.schedule.step(self.last_span)

    def compact_pending(self) -> None:
        """Apply the compaction decided at the end of the last step to every layer now (no-op if none is due)."""
        plan, self.pending = self.pending, None
        if plan is None:
            return
        for move in moves_of(plan):
            # Sources lie right of targets and moves go left to right, so each source is read before it is written;
            # within one move the copy is out of place because the two ranges may overlap.
            self.layer_class.move_keys(self, move)
            target, source = move.slices()
            self.all_values[..., target, :] = self.all_values[..., source, :].clone()
        for layer in self.layers:
            layer.length = plan.length_after

    def storage_factor(self) -> float:
        """Bytes kept per entry relative to plain keys + values: 1.5 with a pre-RoPE shadow of the keys."""
        return 1.5 if self.shadow_keys is not None else 1.0

    def next_positions(self, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Position ids [1, count] of the next `count` tokens: their slots, or their stream index in absolute mode."""
        first = self.tokens_seen if self.rope_mode == "absolute" else self.get_seq_length()
        self.last_position = first + count - 1
        return torch.arange(first, first + count, device=device).unsqueeze(0)
