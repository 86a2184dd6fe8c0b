"""StreamingLLM's KV cache (sinks + recent window, Lazy Pruning) on the transformers Cache API.

`StreamingCache` is a `transformers.Cache` whose layers keep keys and values in one preallocated storage per cache
([layers, batch, kv_heads, capacity, head_dim]), so a step appends in place and a compaction moves and re-rotates every
layer at once. One layer class per RoPE mode:
- `RealignedLayer` (`realign`): stores post-RoPE keys; a compaction rotates each moved key by its shift;
- `PreRopeLayer` (`exact`): stores pre-RoPE keys and rotates all of them by slot index at every step;
- `AbsoluteLayer` (`absolute`): never re-aligns; queries keep their absolute positions.
With `kv_quant`, `QuantizedLayer` replaces them: the cache holds int8 / int4 codes (`QuantizedStorage`) of keys as the
model rotated them at their stream position, and a compaction moves codes and scales as they are (see QuantizedLayer).
A plain `model(input_ids, cache=cache)` works for a float cache in realign / exact mode: positions default to
`get_seq_length()`, the slot index they expect. Absolute mode and every `kv_quant` cache need
`position_ids=cache.next_positions(n)` (stream indices). HF `generate()` counts positions itself (absolute):
`streaming_llm.generate.hf_generate` runs it with the cache's positions, in every mode. Tested with transformers 5.24.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .policy import CompactionPlan, CompactionSchedule, StreamingPolicy
from .quant import KVQuantizer
from .rope import RotaryGeometry, precise_rotary, rotate_keys


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
        start = self.length
        self.append(key_states, value_states, start)
        self.length = start + key_states.shape[-2]
        return self.attended()

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, start: int) -> None:
        """Store the new entries at slots [start, start + count)."""
        count = key_states.shape[-2]
        self.keys[:, :, start : start + count] = self.key_to_store(key_states, start)
        self.values[:, :, start : start + count] = value_states

    def attended(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys_to_attend(), self.values_to_attend()

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

    def values_to_attend(self) -> torch.Tensor:
        return self.values[:, :, : self.length]

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
        return self.cache.rotate_by_slot(self.keys[:, :, : self.length])


class AbsoluteLayer(StreamingLayer):
    """`absolute`: entries move at compaction but keep the rotation of their absolute position."""


def _unrotate(key_states: torch.Tensor, first_slot: int, geometry: RotaryGeometry) -> torch.Tensor:
    """The keys before RoPE: the model rotated them at their slots (their position ids in realign / exact mode)."""
    slots = torch.arange(first_slot, first_slot + key_states.shape[-2], device=key_states.device)
    cos, sin = geometry.cos_sin(slots, key_states.device)
    return rotate_keys(key_states, cos, -sin, scale=1.0 / geometry.attention_scaling)


@dataclass(frozen=True)
class KVQuantSpec:
    """How the cache stores entries: `quantizer` (bits, group along head_dim); `residual`, the newest entries kept
    in the model's dtype until they age out (KIVI's residual); `full_sinks`, whether sinks stay in the model's dtype."""

    quantizer: KVQuantizer
    residual: int = 0
    full_sinks: bool = True


class _Codes:
    """Quantized entries of every layer: payload, scale and zero point along one slot dimension (the second last)."""

    def __init__(self, quantizer: KVQuantizer, like: torch.Tensor, layers: int, capacity: int):
        *lead, _, head_dim = like.shape
        groups = head_dim // quantizer.group
        self.quantizer = quantizer
        self.payload = torch.empty((layers, *lead, capacity, quantizer.payload_dim(head_dim)), dtype=torch.uint8,
                                   device=like.device)
        self.scale = torch.empty((layers, *lead, capacity, groups), dtype=torch.float32, device=like.device)
        self.zero = torch.empty((layers, *lead, capacity, groups), dtype=torch.uint8, device=like.device)

    def tensors(self) -> list[torch.Tensor]:
        return [self.payload, self.scale, self.zero]

    def write(self, layer: int | slice, start: int, entries: torch.Tensor) -> None:
        """Quantize `entries` [..., n, head_dim] into slots [start, start + n) of `layer` (an index or all: slice)."""
        target = slice(start, start + entries.shape[-2])
        for stored, part in zip(self.tensors(), self.quantizer.quantize(entries), strict=True):
            stored[layer][..., target, :] = part

    def read_into(self, layer: int | slice, out: torch.Tensor, part: int | slice = slice(None)) -> None:
        """Slots [0, n) of `layer` (and `part` of the next axis: keys, values or both), dequantized into `out`
        [..., n, head_dim]."""
        count = out.shape[-2]
        payload, scale, zero = (t[layer][part][..., :count, :] for t in self.tensors())
        self.quantizer.dequantize_into(payload, scale, zero, out)

    def move(self, target: slice, source: slice) -> None:
        """Copy codes and scales as they are: a kept entry is never requantized (out of place: ranges may overlap)."""
        for stored in self.tensors():
            stored[..., target, :] = stored[..., source, :].clone()

    def grow(self, capacity: int, keep: int) -> None:
        for name in ("payload", "scale", "zero"):
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:-2], capacity, old.shape[-1]))
            new[..., :keep, :] = old[..., :keep, :]
            setattr(self, name, new)


KEYS, VALUES = 0, 1  # the K / V axis of QuantizedStorage's tensors


class QuantizedStorage:
    """Every layer's entries in three runs of slots: [0, sunk) sinks in the model's dtype (`full_sinks`), then
    `quantized` entries as codes, then the newest ones in the model's dtype (`recent`: the residual, plus what the
    current step appended). Keys are stored as the model rotated them, at their stream index (`QuantizedLayer`).
    Keys and values share every tensor ([layers, 2, batch, heads, slots, ...], KEYS then VALUES), so that a step
    dequantizes both with one set of operations.

    `flush()` ends a step: it quantizes, for all layers at once, what the step pushed past the residual. A step that
    appends more than one entry (a prefill) quantizes its own overflow in its layer's update, so that the float part
    never holds more than residual + 1 entries and the bytes stay those of the format.
    """

    def __init__(self, spec: KVQuantSpec, sink: int, layers: int, keys: torch.Tensor, values: torch.Tensor,
                 capacity: int):
        if keys.shape != values.shape:
            raise ValueError(f"kv_quant stores keys and values alike: shapes {tuple(keys.shape)} and "
                             f"{tuple(values.shape)} differ")
        self.spec = spec
        self.sink_slots = sink if spec.full_sinks else 0
        self.recent_capacity = spec.residual + 1
        entries = torch.stack((keys, values))
        self.codes = _Codes(spec.quantizer, entries, layers, max(1, capacity - self.sink_slots - spec.residual))
        float_shape = (layers, *entries.shape[:-2])
        self.sinks = keys.new_empty((*float_shape, self.sink_slots, keys.shape[-1]))
        self.recent = keys.new_empty((*float_shape, self.recent_capacity, keys.shape[-1]))
        self.quantized = [0] * layers  # entries held as codes, per layer (equal between steps)
        self.positions = np.zeros(capacity, dtype=np.int64)  # stream index of the entry in each slot

    def tensors(self) -> list[torch.Tensor]:
        return [*self.codes.tensors(), self.sinks, self.recent]

    def reserve(self, entries: int) -> None:
        """Room for `entries` slots in all (grows the codes by doubling, like the float storage)."""
        if entries > len(self.positions):
            self.positions = np.concatenate((self.positions, np.zeros(entries - len(self.positions), np.int64)))
        needed = entries - self.sink_slots - self.spec.residual
        capacity = self.codes.payload.shape[-2]
        if needed <= capacity:
            return
        while capacity < needed:
            capacity *= 2
        self.codes.grow(capacity, max(self.quantized))

    def append(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store entries for slots [start, start + n) of `layer`: sinks first, then the newest as floats, and what
        does not fit in the residual + 1 float slots quantized right away."""
        entries = torch.stack((keys, values))
        sunk = min(start, self.sink_slots)
        into_sinks = max(0, min(entries.shape[-2], self.sink_slots - start))
        if into_sinks:
            self.sinks[layer][..., start : start + into_sinks, :] = entries[..., :into_sinks, :]
            entries = entries[..., into_sinks:, :]
        recent = start - sunk - self.quantized[layer]
        overflow = recent + entries.shape[-2] - self.recent_capacity
        if overflow > 0:
            # Oldest first: the floats held, then the new entries, until the rest fits.
            entries = torch.cat((self.recent[layer][..., :recent, :], entries), dim=-2)
            self.codes.write(layer, self.quantized[layer], entries[..., :overflow, :])
            self.quantized[layer] += overflow
            entries, recent = entries[..., overflow:, :], 0
        self.recent[layer][..., recent : recent + entries.shape[-2], :] = entries

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots [0, length) of `layer` in the model's dtype (keys as stored: at their stream
        index), two views of one new buffer."""
        sunk, quantized = min(length, self.sink_slots), self.quantized[layer]
        recent = length - sunk - quantized
        entries = self.recent.new_empty((*self.recent.shape[1:-2], length, self.recent.shape[-1]))
        if sunk:
            entries[..., :sunk, :] = self.sinks[layer][..., :sunk, :]
        self.codes.read_into(layer, entries[..., sunk : sunk + quantized, :])
        entries[..., sunk + quantized :, :] = self.recent[layer][..., :recent, :]
        return entries[KEYS], entries[VALUES]

    def read_front(self, count: int) -> torch.Tensor:
        """Keys of slots [0, count) of every layer in the model's dtype, [layers, batch, heads, count, head_dim]: sinks
        and codes only (the float entries are the newest, never among the first slots once a compaction has run)."""
        sunk = min(count, self.sink_slots)
        sinks = self.sinks[:, KEYS]
        keys = sinks.new_empty((*sinks.shape[:-2], count, sinks.shape[-1]))
        keys[..., :sunk, :] = sinks[..., :sunk, :]
        if count > sunk:
            self.codes.read_into(slice(None), keys[..., sunk:, :], part=(slice(None), KEYS))
        return keys

    def flush(self, length: int) -> None:
        """End of a step (all layers at `length`): quantize the oldest float entries past the residual, in one call."""
        sunk, quantized = min(length, self.sink_slots), self.quantized[0]
        recent = length - sunk - quantized
        overflow = recent - self.spec.residual
        if overflow <= 0:
            return
        self.codes.write(slice(None), quantized, self.recent[..., :overflow, :])
        self.recent[..., : self.spec.residual, :] = self.recent[..., overflow:recent, :].clone()
        self.quantized = [quantized + overflow] * len(self.quantized)

    def place(self, start: int, first_token: int, count: int) -> None:
        """Slots [start, start + count) now hold stream indices first_token, first_token + 1, ..."""
        self.positions[start : start + count] = np.arange(first_token, first_token + count)

    def move(self, move: Move) -> None:
        """Apply one move of a compaction to the codes. Sinks never move and the float entries are the newest, which
        every compaction keeps in order at the end (residual <= window), so only the codes' part of a move moves."""
        target, source = move.slices()
        self.positions[target] = self.positions[source].copy()
        count = min(move.count, self.sink_slots + self.quantized[0] - move.source)
        if count <= 0:
            return
        target, source = move.target - self.sink_slots, move.source - self.sink_slots
        self.codes.move(slice(target, target + count), slice(source, source + count))

    def compacted(self, length_after: int) -> None:
        """After every move: the codes hold what is neither a sink nor among the float entries."""
        recent = min(self.spec.residual, length_after - min(length_after, self.sink_slots))
        self.quantized = [length_after - min(length_after, self.sink_slots) - recent] * len(self.quantized)

    def step_sizes(self, layer: int, length: int, values: bool = False) -> torch.Tensor:
        """The largest quantization step (scale) of each of slots [0, length) of `layer`'s keys (or values), 0 where
        it is held in the model's dtype: a dequantized entry is within half of it of what was stored.
        [batch, heads, length]."""
        sunk, quantized = min(length, self.sink_slots), self.quantized[layer]
        scales = self.codes.scale[layer][VALUES if values else KEYS][..., :quantized, :].amax(-1).float()
        zeros = scales.new_zeros
        return torch.cat((zeros((*scales.shape[:-1], sunk)), scales,
                          zeros((*scales.shape[:-1], length - sunk - quantized))), dim=-1)


class QuantizedLayer(StreamingLayer):
    """A layer of a `kv_quant` cache. Every mode feeds it queries and keys at their stream position (`next_positions`)
    and it stores each key as the model rotated it, quantized once; attention reads the entries dequantized.

    That frame makes every recent entry's distance to the query the true one, t - j, which is what all three modes
    attend, with no rotation at any step: a realign / exact cache would otherwise rotate every key by its slot at every
    step, as much work as the attention itself. Only the anchored entries (sinks, refresh tokens: slots below
    sink + refresh) sit elsewhere in realign / exact, at slot distance query slot - their slot; they are few, and each
    step rotates them, after dequantization, by (their slot + offset - their stream position), where offset =
    query's stream index - query's slot. Codes are never re-rotated or requantized: the error stays that of one
    rounding however many compactions pass (realign and exact are one path). Angles are float64 (the model's through
    `StreamingCache.rotary_table`, `cos_sin(precise=True)` here), so positions of any size are rotated as accurately
    as small ones.
    """

    def __init__(self, cache: StreamingCache, index: int):
        super().__init__(cache)
        self.index = index

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, start: int) -> None:
        cache, count = self.cache, key_states.shape[-2]
        if self.index == 0:
            if cache.last_position != cache.tokens_seen + count - 1:
                raise ValueError(
                    "a kv_quant StreamingCache takes every token at its stream index: pass "
                    "position_ids=cache.next_positions(n) to each forward (streaming_llm.generate.hf_generate does "
                    "for HF generate()); the default positions are slots, which would misplace every key"
                )
            cache.quantized.place(start, cache.tokens_seen, count)
            cache.step_offset = cache.tokens_seen - start
            cache.step_anchored = None
        cache.quantized.append(self.index, start, key_states, value_states)

    def attended(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.quantized.read(self.index, self.length)  # one dequantization for both
        if self.cache.step_anchored is None:  # the first layer of the step: every layer's, in one rotation
            self.cache.step_anchored = self.cache.anchored_keys(self.length, self.cache.step_offset, keys.device)
        anchored = self.cache.step_anchored
        if anchored is not False:
            keys[..., : anchored.shape[-2], :] = anchored[self.index]
        return keys, values

    def keys_to_attend(self) -> torch.Tensor:
        """Between steps (after `compact_pending`): the keys as the next query will attend them."""
        keys = self.cache.quantized.read(self.index, self.length)[0]
        anchored = self.cache.anchored_keys(self.length, self.cache.tokens_seen - self.length, keys.device)
        if anchored is not False:
            keys[..., : anchored.shape[-2], :] = anchored[self.index]
        return keys

    def values_to_attend(self) -> torch.Tensor:
        return self.cache.quantized.read(self.index, self.length)[1]


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

    def __init__(self, policy: StreamingPolicy, geometry: RotaryGeometry, num_layers: int, rope_mode: str = "realign",
                 kv_quant: KVQuantSpec | None = None):
        if rope_mode not in LAYER_CLASSES:
            raise ValueError(f"rope_mode '{rope_mode}' is unknown (known: {', '.join(LAYER_CLASSES)})")
        if kv_quant is not None and kv_quant.residual > policy.window:
            raise ValueError(f"kv_quant residual = {kv_quant.residual} > window = {policy.window}: the float entries "
                             "must be among those every compaction keeps; lower the residual")
        self.layer_class = LAYER_CLASSES[rope_mode]
        self.rope_mode = rope_mode
        self.geometry = geometry
        self.policy = policy
        self.schedule = CompactionSchedule(policy)
        self.initial_capacity = policy.hard_capacity + policy.compress_every + 1
        self.kv_quant = kv_quant
        self.anchors_by_slot = rope_mode != "absolute"  # anchored entries sit at slot distance (QuantizedLayer)
        layers = [QuantizedLayer(self, i) if kv_quant else self.layer_class(self) for i in range(num_layers)]
        super().__init__(layers=layers)
        self.all_keys: torch.Tensor | None = None
        self.all_values: torch.Tensor | None = None
        self.shadow_keys: torch.Tensor | None = None
        self.quantized: QuantizedStorage | None = None
        self.capacity = 0  # entries the storage has room for
        self.peak_nbytes = 0  # the most bytes its tensors ever held together
        self._slot_angles: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin of slots 0, 1, ...
        self.pending: CompactionPlan | None = None
        self.tokens_seen = 0
        self.last_span = 0
        self.last_plan: CompactionPlan | None = None
        self.last_position = -1  # of the last token next_positions() placed
        self.step_offset = 0  # kv_quant: the current step's stream index - slot
        self.step_anchored: torch.Tensor | bool | None = None  # its anchored keys, all layers (False: none moved)

    # --- storage ------------------------------------------------------------------------------------------------
    def allocate(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Create the storage of every layer from the first update's shapes (all layers share them)."""
        capacity = max(self.initial_capacity, key_states.shape[-2])
        if self.kv_quant is not None:
            self.quantized = QuantizedStorage(
                self.kv_quant, self.policy.sink, len(self.layers), key_states, value_states, capacity
            )
            self.capacity = capacity
            self._bind_layers()
            return
        self.all_keys = key_states.new_empty((len(self.layers), *key_states.shape[:2], capacity, key_states.shape[-1]))
        self.all_values = value_states.new_empty(
            (len(self.layers), *value_states.shape[:2], capacity, value_states.shape[-1])
        )
        if self.layer_class.needs_shadow(key_states.dtype):
            self.shadow_keys = torch.empty_like(self.all_keys)
        self._bind_layers()

    def _bind_layers(self) -> None:
        tensors = self.storage_tensors()
        self.capacity = self.capacity if self.quantized is not None else self.all_keys.shape[-2]
        self.peak_nbytes = max(self.peak_nbytes, sum(t.nbytes for t in tensors))
        for index, layer in enumerate(self.layers):
            if self.quantized is None:
                layer.keys, layer.values = self.all_keys[index], self.all_values[index]
                layer.shadow = None if self.shadow_keys is None else self.shadow_keys[index]
            layer.device = tensors[0].device
            layer.is_initialized = True

    def storage_tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds: keys, values, any shadow; or codes, scales, zero points and float entries."""
        if self.quantized is not None:
            return self.quantized.tensors()
        return [t for t in (self.all_keys, self.all_values, self.shadow_keys) if t is not None]

    def _reserve(self, needed: int) -> None:
        """Grow the storage (doubling) so that every layer can hold `needed` entries; called between steps."""
        capacity = self.capacity
        if needed <= capacity:
            return
        while capacity < needed:
            capacity *= 2
        if self.quantized is not None:
            self.quantized.reserve(capacity)
            self.capacity = capacity
            self._bind_layers()
            return
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
            if self.capacity:
                self._reserve(self.layers[0].length + key_states.shape[-2])
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == len(self.layers) - 1:
            self._end_step(key_states.shape[-2])
        return keys, values

    def _end_step(self, new_tokens: int) -> None:
        self.tokens_seen += new_tokens
        self.last_span = self.layers[-1].length
        if self.quantized is not None:
            self.quantized.flush(self.last_span)
        self.last_plan = self.pending = self.schedule.step(self.last_span)

    def compact_pending(self) -> None:
        """Apply the compaction decided at the end of the last step to every layer now (no-op if none is due)."""
        plan, self.pending = self.pending, None
        if plan is None:
            return
        for move in moves_of(plan):
            # Sources lie right of targets and moves go left to right, so each source is read before it is written;
            # within one move the copy is out of place because the two ranges may overlap.
            if self.quantized is not None:
                self.quantized.move(move)
                continue
            self.layer_class.move_keys(self, move)
            target, source = move.slices()
            self.all_values[..., target, :] = self.all_values[..., source, :].clone()
        if self.quantized is not None:
            self.quantized.compacted(plan.length_after)
        for layer in self.layers:
            layer.length = plan.length_after

    def rotate_by_slot(self, keys: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE keys [..., length, head_dim] rotated at slots 0 .. length - 1."""
        length = keys.shape[-2]
        if self._slot_angles is None or len(self._slot_angles[0]) < length:
            # Every layer of every step asks again: keep the table for the capacity (the same numbers, sliced).
            slots = torch.arange(max(length, self.capacity), device=keys.device)
            self._slot_angles = self.geometry.cos_sin(slots, keys.device)
        cos, sin = (table[:length] for table in self._slot_angles)
        return rotate_keys(keys, cos, sin, scale=self.geometry.attention_scaling)

    def anchored_keys(self, length: int, offset: int, device: torch.device) -> torch.Tensor | bool:
        """kv_quant: the keys of the anchored entries among slots [0, length), every layer's, rotated from their
        stream position to the one a query at `offset` past its slot attends them at (realign / exact):
        [layers, batch, heads, n, head_dim]; False when none is elsewhere (absolute mode, or before any eviction)."""
        count = min(length, self.policy.sink + self.policy.refresh)
        if not self.anchors_by_slot or count == 0:
            return False
        shifts = np.arange(count) + offset - self.quantized.positions[:count]
        if not shifts.any():
            return False
        cos, sin = self.geometry.cos_sin(torch.from_numpy(shifts), device, precise=True)
        return rotate_keys(self.quantized.read_front(count), cos, sin)

    def rotary_table(self, model: torch.nn.Module) -> AbstractContextManager:
        """The context a forward of `model` over this cache runs in: a kv_quant realign / exact cache takes queries at
        their stream index, where the model's float32 angles would drift with the stream, so the model's rotary table
        is computed from float64 ones (`precise_rotary`); other caches run the model as it is."""
        if self.kv_quant is not None and self.anchors_by_slot:
            return precise_rotary(model, self.geometry)
        return nullcontext()

    def next_positions(self, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Position ids [1, count] of the next `count` tokens: their slots in a float realign / exact cache, their
        stream index in absolute mode and in every kv_quant cache."""
        by_stream = self.rope_mode == "absolute" or self.kv_quant is not None
        first = self.tokens_seen if by_stream else self.get_seq_length()
        self.last_position = first + count - 1
        return torch.arange(first, first + count, device=device).unsqueeze(0)
