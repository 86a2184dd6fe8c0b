"""How a StreamingCache holds its entries: one strategy per storage format behind the `KVStorage` contract, chosen once
when the cache is built (`make_storage`).

- `FloatStorage` keeps keys and values in the model's dtype; its RoPE mode decides how keys are framed:
  `RealignedFloatStorage` (`realign`), `PreRopeFloatStorage` (`exact`), `FloatStorage` itself (`absolute`).
- `QuantizedStorage` keeps int8 / int4 codes (`kv_quant`) of keys as the model rotated them at their stream index.
- `RingStorage` / `QuantizedRingStorage` (`layout: ring`): the same entries in fixed slots that never move.
A storage never decides what to keep: the cache's schedule does, and hands it the moves (`moves_of`) to apply.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .policy import CompactionPlan, StreamingPolicy
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


class KVStorage(Protocol):
    """Every layer's entries of one StreamingCache. Slots are the cache's: the layers' lengths, the schedule and the
    positions are the cache's; the storage stores, reads, moves and counts bytes.

    A step calls, in order: `start_step` (first layer), `append` then `attend` (each layer), `end_step` (after the
    last layer). Between steps the cache applies a compaction: `move` for each of its moves, then `compacted`.
    """

    capacity: int  # entries every layer has room for; 0 before `allocate`
    peak_nbytes: int  # the most bytes its tensors ever held together
    positions_by_stream: bool  # whether queries and keys take their stream index as position id (else their slot)

    def allocate(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
        """Create the tensors for `capacity` entries per layer, shaped after the first update's states."""
        ...

    def reserve(self, needed: int, length: int) -> bool:
        """Room for `needed` entries per layer, keeping slots [0, length); whether the tensors were reallocated."""
        ...

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the storage holds (its bytes are the cache's)."""
        ...

    def layer_views(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(keys, values) [batch, kv_heads, capacity, head_dim] of `layer` as stored, or (None, None) where the
        entries are not held as keys and values (codes)."""
        ...

    def start_step(self, first_slot: int, first_token: int, count: int, last_position: int) -> None:
        """A step appends `count` entries at slots [first_slot, ...), stream indices [first_token, ...); the last
        position id `StreamingCache.next_positions` placed is `last_position`."""
        ...

    def append(self, layer: int, start: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Store the step's entries of `layer` (as the model hands them) at slots [start, start + n)."""
        ...

    def attend(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inside a step, after `append`: the keys and values its queries attend, slots [0, length)."""
        ...

    def keys_to_attend(self, layer: int, length: int, tokens_seen: int) -> torch.Tensor:
        """Between steps: the keys of slots [0, length) as the next query (stream index `tokens_seen`) attends them."""
        ...

    def values_to_attend(self, layer: int, length: int) -> torch.Tensor:
        """Between steps: the values of slots [0, length)."""
        ...

    def end_step(self, length: int) -> None:
        """After the last layer's update: every layer holds `length` entries."""
        ...

    def move(self, move: Move) -> None:
        """Apply one move of a compaction to every layer (moves come left to right; ranges may overlap)."""
        ...

    def compacted(self, length_after: int) -> None:
        """After the last move: every layer holds `length_after` entries."""
        ...

    def truncate(self, length: int) -> None:
        """Every layer now holds only slots [0, length) (the newest entries were dropped: a rollback)."""
        ...

    def anchored_keys(self, length: int, offset: int, device: torch.device) -> torch.Tensor | bool:
        """The keys of the anchored entries (sinks, refresh tokens) among slots [0, length), every layer's, rotated to
        where a query at `offset` past its slot attends them: [layers, batch, heads, n, head_dim]; False when the
        storage keeps them where queries attend them already."""
        ...

    def rotary_table(self, model: torch.nn.Module) -> AbstractContextManager:
        """The context a forward of `model` over this storage runs in."""
        ...


def _grown(capacity: int, needed: int) -> int:
    """`capacity` doubled until it holds `needed` entries."""
    while capacity < needed:
        capacity *= 2
    return capacity


def _unrotate(key_states: torch.Tensor, first_slot: int, geometry: RotaryGeometry) -> torch.Tensor:
    """The keys before RoPE: the model rotated them at their slots (their position ids in realign / exact mode)."""
    slots = torch.arange(first_slot, first_slot + key_states.shape[-2], device=key_states.device)
    cos, sin = geometry.cos_sin(slots, key_states.device)
    return rotate_keys(key_states, cos, -sin, scale=1.0 / geometry.attention_scaling)


# --- float ------------------------------------------------------------------------------------------------------------
class FloatStorage:
    """Keys and values in the model's dtype, one preallocated tensor each for all layers ([layers, batch, kv_heads,
    capacity, head_dim]), so a step appends in place and a compaction moves every layer at once.

    This class is the `absolute` frame: entries move at compaction but keep the rotation of their absolute position
    (queries keep theirs). Subclasses override the key hooks (`key_to_store`, `attended_keys`, `move_keys`).
    """

    positions_by_stream = True

    def __init__(self, geometry: RotaryGeometry, num_layers: int):
        self.geometry = geometry
        self.num_layers = num_layers
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.shadow: torch.Tensor | None = None  # pre-RoPE keys, where the frame needs them (needs_shadow)
        self.capacity = 0
        self.peak_nbytes = 0
        self._layer_keys: list[torch.Tensor] = []
        self._layer_values: list[torch.Tensor] = []
        self._layer_shadows: list[torch.Tensor] = []

    def allocate(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
        self.keys = key_states.new_empty((self.num_layers, *key_states.shape[:2], capacity, key_states.shape[-1]))
        self.values = value_states.new_empty(
            (self.num_layers, *value_states.shape[:2], capacity, value_states.shape[-1])
        )
        if self.needs_shadow(key_states.dtype):
            self.shadow = torch.empty_like(self.keys)
        self._allocated()

    def reserve(self, needed: int, length: int) -> bool:
        if needed <= self.capacity:
            return False
        capacity = _grown(self.capacity, needed)
        for name in ("keys", "values", "shadow"):
            old = getattr(self, name)
            if old is None:
                continue
            new = old.new_empty((*old.shape[:-2], capacity, old.shape[-1]))
            new[..., :length, :] = old[..., :length, :]
            setattr(self, name, new)
        self._allocated()
        return True

    def _allocated(self) -> None:
        self.capacity = self.keys.shape[-2]
        self.peak_nbytes = max(self.peak_nbytes, sum(t.nbytes for t in self.tensors()))
        # Per-layer views, made once per allocation rather than at every step of every layer.
        self._layer_keys = [self.keys[index] for index in range(self.num_layers)]
        self._layer_values = [self.values[index] for index in range(self.num_layers)]
        self._layer_shadows = [] if self.shadow is None else [self.shadow[index] for index in range(self.num_layers)]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.keys, self.values, self.shadow) if t is not None]

    def layer_views(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self._layer_keys[layer], self._layer_values[layer]

    def start_step(self, first_slot: int, first_token: int, count: int, last_position: int) -> None:
        return None

    def append(self, layer: int, start: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        count = key_states.shape[-2]
        self._layer_keys[layer][:, :, start : start + count] = self.key_to_store(layer, key_states, start)
        self._layer_values[layer][:, :, start : start + count] = value_states

    def attend(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attended_keys(layer, length), self._layer_values[layer][:, :, :length]

    def keys_to_attend(self, layer: int, length: int, tokens_seen: int) -> torch.Tensor:
        return self.attended_keys(layer, length)

    def values_to_attend(self, layer: int, length: int) -> torch.Tensor:
        return self._layer_values[layer][:, :, :length]

    def end_step(self, length: int) -> None:
        return None

    def move(self, move: Move) -> None:
        self.move_keys(move)
        target, source = move.slices()
        self.values[..., target, :] = self.values[..., source, :].clone()

    def compacted(self, length_after: int) -> None:
        return None

    def truncate(self, length: int) -> None:
        return None  # entries past a layer's length are never read

    def anchored_keys(self, length: int, offset: int, device: torch.device) -> torch.Tensor | bool:
        return False  # every key is stored in the frame its queries attend it in

    def rotary_table(self, model: torch.nn.Module) -> AbstractContextManager:
        return nullcontext()

    # --- what differs between RoPE modes ----------------------------------------------------------------------------
    def needs_shadow(self, dtype: torch.dtype) -> bool:
        """Whether the storage must also keep pre-RoPE keys (`shadow`) for keys of this dtype."""
        return False

    def key_to_store(self, layer: int, key_states: torch.Tensor, first_slot: int) -> torch.Tensor:
        return key_states

    def attended_keys(self, layer: int, length: int) -> torch.Tensor:
        return self._layer_keys[layer][:, :, :length]

    def move_keys(self, move: Move) -> None:
        """Move the keys of every layer by `move` (out of place: source and target ranges may overlap)."""
        target, source = move.slices()
        self.keys[..., target, :] = self.keys[..., source, :].clone()


class RealignedFloatStorage(FloatStorage):
    """`realign`: keys are stored rotated at their slot; a compaction rotates each moved key by its shift.

    In float32 the moved keys are rotated in place of the stored ones (one matmul per move, all layers at once): the
    rounding this repeats stays ~1e-5 after a thousand compactions. In float16 / bfloat16 it would grow with every
    compaction (0.2 nats at R = 1 in bf16), biasing strict against lazy, so there the storage keeps a pre-RoPE shadow
    of the keys (+50% KV memory) and re-derives each moved key from it at its new slot: one rounding, however many
    moves.
    """

    positions_by_stream = False

    def needs_shadow(self, dtype: torch.dtype) -> bool:
        return dtype != torch.float32

    def key_to_store(self, layer: int, key_states: torch.Tensor, first_slot: int) -> torch.Tensor:
        if self.shadow is not None:
            self._layer_shadows[layer][:, :, first_slot : first_slot + key_states.shape[-2]] = _unrotate(
                key_states, first_slot, self.geometry
            )
        return key_states

    def move_keys(self, move: Move) -> None:
        target, source = move.slices()
        geometry = self.geometry
        if self.shadow is None:
            # A pure rotation: the model's attention_scaling was applied once, when the key was first rotated.
            keys = self.keys[..., source, :]
            rotation = geometry.rotation_matrix(move.shift, keys.shape[-1], keys.device)
            self.keys[..., target, :] = (keys.float() @ rotation).to(keys.dtype)
            return
        pre_rope = self.shadow[..., source, :].clone()
        self.shadow[..., target, :] = pre_rope
        slots = torch.arange(target.start, target.stop, device=pre_rope.device)
        cos, sin = geometry.cos_sin(slots, pre_rope.device)
        self.keys[..., target, :] = rotate_keys(pre_rope, cos, sin, scale=geometry.attention_scaling)


class PreRopeFloatStorage(FloatStorage):
    """`exact`: keys are stored before RoPE and rotated by slot index at every step (the slow reference mode)."""

    positions_by_stream = False

    def __init__(self, geometry: RotaryGeometry, num_layers: int):
        super().__init__(geometry, num_layers)
        self._slot_angles: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin of slots 0, 1, ...

    def key_to_store(self, layer: int, key_states: torch.Tensor, first_slot: int) -> torch.Tensor:
        return _unrotate(key_states, first_slot, self.geometry)

    def attended_keys(self, layer: int, length: int) -> torch.Tensor:
        return self.rotate_by_slot(self._layer_keys[layer][:, :, :length])

    def rotate_by_slot(self, keys: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE keys [..., length, head_dim] rotated at slots 0 .. length - 1."""
        length = keys.shape[-2]
        if self._slot_angles is None or len(self._slot_angles[0]) < length:
            # Every layer of every step asks again: keep the table for the capacity (the same numbers, sliced).
            slots = torch.arange(max(length, self.capacity), device=keys.device)
            self._slot_angles = self.geometry.cos_sin(slots, keys.device)
        cos, sin = (table[:length] for table in self._slot_angles)
        return rotate_keys(keys, cos, sin, scale=self.geometry.attention_scaling)


FLOAT_STORAGES: dict[str, type[FloatStorage]] = {
    "realign": RealignedFloatStorage,
    "exact": PreRopeFloatStorage,
    "absolute": FloatStorage,
}


# --- quantized --------------------------------------------------------------------------------------------------------
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

    def write_at(self, layer: int, slots: torch.Tensor, entries: torch.Tensor) -> None:
        """Quantize `entries` [..., n, head_dim] into the n slots `slots` (an index tensor) of `layer`."""
        for stored, part in zip(self.tensors(), self.quantizer.quantize(entries), strict=True):
            stored[layer].index_copy_(-2, slots, part)

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


class _LayerCodes:
    """Quantized entries as `_Codes` holds them, but in one tensor per layer (payload, scale, zero point): what a
    compiled ring step updates in place (RingStorage.keys says why not views of one base)."""

    def __init__(self, quantizer: KVQuantizer, like: torch.Tensor, layers: int, capacity: int):
        *lead, _, head_dim = like.shape
        self.quantizer = quantizer
        shapes = ((quantizer.payload_dim(head_dim), torch.uint8), (head_dim // quantizer.group, torch.float32),
                  (head_dim // quantizer.group, torch.uint8))
        # Zeros, not empty: masked slots are still read, and uninitialised memory may hold NaN.
        self.payload, self.scale, self.zero = (
            [torch.zeros((*lead, capacity, last), dtype=dtype, device=like.device) for _ in range(layers)]
            for last, dtype in shapes)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.payload, *self.scale, *self.zero]

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.payload[layer], self.scale[layer], self.zero[layer]

    def write_at(self, layer: int, slots: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
        """Quantize `entries` [..., n, head_dim] into the n slots `slots` (an index tensor) of `layer`; what they
        dequantize to, in the entries' dtype."""
        parts = self.quantizer.quantize(entries)
        for stored, part in zip(self.layer(layer), parts, strict=True):
            stored.index_copy_(-2, slots, part)
        dequantized = torch.empty_like(entries)
        self.quantizer.dequantize_into(*parts, dequantized)
        return dequantized

    def grow(self, capacity: int, keep: int) -> None:
        """Room for `capacity` slots; the first `keep` keep their codes, the new ones are zeros."""
        for layers in (self.payload, self.scale, self.zero):
            for index, old in enumerate(layers):
                layers[index] = old.new_zeros((*old.shape[:-2], capacity, old.shape[-1]))
                layers[index][..., :keep, :] = old[..., :keep, :]


KEYS, VALUES = 0, 1  # the K / V axis of QuantizedStorage's tensors


class QuantizedStorage:
    """Every layer's entries in three runs of slots: [0, sunk) sinks in the model's dtype (`full_sinks`), then
    `quantized` entries as codes, then the newest ones in the model's dtype (`recent`: the residual, plus what the
    current step appended). Keys and values share every tensor ([layers, 2, batch, heads, slots, ...], KEYS then
    VALUES), so that a step dequantizes both with one set of operations.

    Every mode feeds it queries and keys at their stream position (`positions_by_stream`), and it stores each key as
    the model rotated them, quantized once; attention reads the entries dequantized. That frame makes every recent
    entry's distance to the query the true one, t - j, which is what all three modes attend, with no rotation at any
    step: a realign / exact cache would otherwise rotate every key by its slot at every step, as much work as the
    attention itself. Only the anchored entries (sinks, refresh tokens: slots below sink + refresh) sit elsewhere in
    realign / exact, at slot distance query slot - their slot; they are few, and each step rotates them, after
    dequantization, by (their slot + offset - their stream position), where offset = query's stream index - query's
    slot. Codes are never re-rotated or requantized: the error stays that of one rounding however many compactions
    pass (realign and exact are one path). Angles are float64 (the model's through `rotary_table`,
    `cos_sin(precise=True)` here), so positions of any size are rotated as accurately as small ones.

    `end_step()` quantizes, for all layers at once, what the step pushed past the residual. A step that appends more
    than one entry (a prefill) quantizes its own overflow in its layer's `append`, so that the float part never holds
    more than residual + 1 entries and the bytes stay those of the format.
    """

    positions_by_stream = True

    def __init__(self, spec: KVQuantSpec, policy: StreamingPolicy, geometry: RotaryGeometry, rope_mode: str,
                 num_layers: int):
        if spec.residual > policy.window:
            raise ValueError(f"kv_quant residual = {spec.residual} > window = {policy.window}: the float entries "
                             "must be among those every compaction keeps; lower the residual")
        self.spec = spec
        self.policy = policy
        self.geometry = geometry
        self.num_layers = num_layers
        self.anchors_by_slot = rope_mode != "absolute"  # anchored entries sit at slot distance (realign / exact)
        self.sink_slots = policy.sink if spec.full_sinks else 0
        self.recent_capacity = spec.residual + 1
        self.capacity = 0
        self.peak_nbytes = 0
        self.codes: _Codes | None = None
        self.sinks: torch.Tensor | None = None
        self.recent: torch.Tensor | None = None
        self.quantized = [0] * num_layers  # entries held as codes, per layer (equal between steps)
        self.positions = np.zeros(0, dtype=np.int64)  # stream index of the entry in each slot
        self.step_offset = 0  # the current step's stream index - slot
        self.step_anchored: torch.Tensor | bool | None = None  # its anchored keys, all layers (False: none moved)

    def allocate(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
        if key_states.shape != value_states.shape:
            raise ValueError(f"kv_quant stores keys and values alike: shapes {tuple(key_states.shape)} and "
                             f"{tuple(value_states.shape)} differ")
        entries = torch.stack((key_states, value_states))
        self.codes = _Codes(self.spec.quantizer, entries, self.num_layers,
                            max(1, capacity - self.sink_slots - self.spec.residual))
        float_shape = (self.num_layers, *entries.shape[:-2])
        self.sinks = key_states.new_empty((*float_shape, self.sink_slots, key_states.shape[-1]))
        self.recent = key_states.new_empty((*float_shape, self.recent_capacity, key_states.shape[-1]))
        self.positions = np.zeros(capacity, dtype=np.int64)
        self.capacity = capacity
        self.peak_nbytes = max(self.peak_nbytes, sum(t.nbytes for t in self.tensors()))

    def reserve(self, needed: int, length: int) -> bool:
        """Room for `needed` slots in all (grows the codes by doubling, like the float storage)."""
        if needed <= self.capacity:
            return False
        entries = _grown(self.capacity, needed)
        if entries > len(self.positions):
            self.positions = np.concatenate((self.positions, np.zeros(entries - len(self.positions), np.int64)))
        needed_codes = entries - self.sink_slots - self.spec.residual
        capacity = self.codes.payload.shape[-2]
        if needed_codes > capacity:
            self.codes.grow(_grown(capacity, needed_codes), max(self.quantized))
        self.capacity = entries
        self.peak_nbytes = max(self.peak_nbytes, sum(t.nbytes for t in self.tensors()))
        return True

    def tensors(self) -> list[torch.Tensor]:
        return [*self.codes.tensors(), self.sinks, self.recent]

    def layer_views(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return None, None  # held as codes: `attend` dequantizes them

    def start_step(self, first_slot: int, first_token: int, count: int, last_position: int) -> None:
        if last_position != first_token + count - 1:
            raise ValueError(
                "a kv_quant StreamingCache takes every token at its stream index: pass "
                "position_ids=cache.next_positions(n) to each forward (streaming_llm.generate.hf_generate does "
                "for HF generate()); the default positions are slots, which would misplace every key"
            )
        self.place(first_slot, first_token, count)
        self.step_offset = first_token - first_slot
        self.step_anchored = None

    def append(self, layer: int, start: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Store entries for slots [start, start + n) of `layer`: sinks first, then the newest as floats, and what
        does not fit in the residual + 1 float slots quantized right away."""
        entries = torch.stack((key_states, value_states))
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

    def attend(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.read(layer, length)  # one dequantization for both
        if self.step_anchored is None:  # the first layer of the step: every layer's, in one rotation
            self.step_anchored = self.anchored_keys(length, self.step_offset, keys.device)
        anchored = self.step_anchored
        if anchored is not False:
            keys[..., : anchored.shape[-2], :] = anchored[layer]
        return keys, values

    def keys_to_attend(self, layer: int, length: int, tokens_seen: int) -> torch.Tensor:
        keys = self.read(layer, length)[0]
        anchored = self.anchored_keys(length, tokens_seen - length, keys.device)
        if anchored is not False:
            keys[..., : anchored.shape[-2], :] = anchored[layer]
        return keys

    def values_to_attend(self, layer: int, length: int) -> torch.Tensor:
        return self.read(layer, length)[1]

    def end_step(self, length: int) -> None:
        """Quantize the oldest float entries past the residual (all layers at `length`), in one call."""
        sunk, quantized = min(length, self.sink_slots), self.quantized[0]
        recent = length - sunk - quantized
        overflow = recent - self.spec.residual
        if overflow <= 0:
            return
        self.codes.write(slice(None), quantized, self.recent[..., :overflow, :])
        self.recent[..., : self.spec.residual, :] = self.recent[..., overflow:recent, :].clone()
        self.quantized = [quantized + overflow] * len(self.quantized)

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

    def truncate(self, length: int) -> None:
        """The dropped entries are the newest: the float ones first, then codes (slots past `length` are unused)."""
        held = length - min(length, self.sink_slots)
        self.quantized = [min(quantized, held) for quantized in self.quantized]

    def anchored_keys(self, length: int, offset: int, device: torch.device) -> torch.Tensor | bool:
        count = min(length, self.policy.sink + self.policy.refresh)
        if not self.anchors_by_slot or count == 0:
            return False
        shifts = np.arange(count) + offset - self.positions[:count]
        if not shifts.any():
            return False
        cos, sin = self.geometry.cos_sin(torch.from_numpy(shifts), device, precise=True)
        return rotate_keys(self.read_front(count), cos, sin)

    def rotary_table(self, model: torch.nn.Module) -> AbstractContextManager:
        """Queries at their stream index, where the model's float32 angles would drift with the stream: in realign /
        exact the model's rotary table is computed from float64 angles (`precise_rotary`); absolute runs it as is."""
        if self.anchors_by_slot:
            return precise_rotary(model, self.geometry)
        return nullcontext()

    # --- reading the formats ----------------------------------------------------------------------------------------
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

    def place(self, start: int, first_token: int, count: int) -> None:
        """Slots [start, start + count) now hold stream indices first_token, first_token + 1, ..."""
        self.positions[start : start + count] = np.arange(first_token, first_token + count)

    def step_sizes(self, layer: int, length: int, values: bool = False) -> torch.Tensor:
        """The largest quantization step (scale) of each of slots [0, length) of `layer`'s keys (or values), 0 where
        it is held in the model's dtype: a dequantized entry is within half of it of what was stored.
        [batch, heads, length]."""
        sunk, quantized = min(length, self.sink_slots), self.quantized[layer]
        scales = self.codes.scale[layer][VALUES if values else KEYS][..., :quantized, :].amax(-1).float()
        zeros = scales.new_zeros
        return torch.cat((zeros((*scales.shape[:-1], sunk)), scales,
                          zeros((*scales.shape[:-1], length - sunk - quantized))), dim=-1)


def make_storage(policy: StreamingPolicy, geometry: RotaryGeometry, num_layers: int, rope_mode: str,
                 kv_quant: KVQuantSpec | None, layout: str = "compact") -> KVStorage:
    """The storage of a cache in `rope_mode`: quantized with a `kv_quant` spec, else float in that mode's frame;
    `layout` ring: the RingStorage (QuantizedRingStorage with a `kv_quant` spec)."""
    if rope_mode not in FLOAT_STORAGES:
        raise ValueError(f"rope_mode '{rope_mode}' is unknown (known: {', '.join(FLOAT_STORAGES)})")
    if layout not in ("compact", "ring"):
        raise ValueError(f"layout '{layout}' is unknown (known: compact, ring)")
    if layout == "ring":
        if kv_quant is not None:
            return QuantizedRingStorage(kv_quant, policy, geometry, num_layers, rope_mode)
        return RingStorage(policy, geometry, num_layers, rope_mode)
    if kv_quant is not None:
        return QuantizedStorage(kv_quant, policy, geometry, rope_mode, num_layers)
    return FLOAT_STORAGES[rope_mode](geometry, num_layers)


# --- ring -------------------------------------------------------------------------------------------------------------
class RingStorage:
    """Float keys and values in fixed-capacity buffers that never move: `layout: ring`.

    Every entry is stored once, as the model rotated it at its stream index (queries too: `positions_by_stream`),
    in a free physical slot; a compaction only rewrites the host's slot map (`slot_of`: the physical slot of each of
    the cache's slots) and the validity mask. Attention reads the whole buffer under an additive mask, so every step
    of a run has the same shapes (what torch.compile and CUDA graphs need). A recent entry's rotary distance to the
    query is then the true one, t - j, which is what every RoPE mode attends; only the anchored entries (the cache's
    first sink + refresh slots) sit at slot distance in realign / exact, so each step writes rotated copies of them
    (from the stored keys, one rotation: no drift) into `anchors` extra slots past the ring and masks their originals.
    Angles are float64 (`rotary_table`), so a stream at index 200,000 is rotated as accurately as one at 0.

    Host bookkeeping happens in `begin_step` (outside any compiled region); `update` does tensor work only, on index,
    angle and mask buffers whose shapes never change. It never decides what to keep: the cache's schedule does.
    """

    positions_by_stream = True

    def __init__(self, policy: StreamingPolicy, geometry: RotaryGeometry, num_layers: int, rope_mode: str):
        self.policy = policy
        self.geometry = geometry
        self.num_layers = num_layers
        self.anchors_by_slot = rope_mode != "absolute"
        self.anchors = policy.sink + policy.refresh if self.anchors_by_slot else 0
        self.copies = self.anchors  # columns past the ring for the anchored copies
        self.query_rows = 1  # queries of a compiled forward: one decode step
        self.capacity = 0
        self.peak_nbytes = 0
        # One tensor per layer [batch, kv_heads, capacity + anchors, head_dim], never views of one [layers, ...] base:
        # a compiled step that writes a view of a shared base copies the whole base per write (every layer's entries,
        # at every layer: measured 100x slower under inductor), while a layer's own tensor is updated in place.
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.slot_of = np.zeros(0, dtype=np.int64)  # physical slot of each cache slot
        self.position = np.zeros(0, dtype=np.int64)  # stream index of the entry in each physical slot
        self.valid = np.zeros(0, dtype=bool)  # physical ring slots holding a live entry
        self.free: list[int] = []  # physical ring slots holding no entry, lowest last (popped first)
        self.length = 0
        self.decoding = False  # a one-token step ran: a compiled step may hold these buffers, they never change shape
        # Static device buffers, rewritten in place by begin_step.
        self.mask: torch.Tensor | None = None  # [1, 1, query_rows, capacity + copies], additive
        self.decode_slots: torch.Tensor | None = None  # [query_rows] physical slots of a compiled forward's entries
        self.write_slots: torch.Tensor | None = None  # [count] physical slots of the step's entries
        self.anchor_source: torch.Tensor | None = None  # [anchors] physical slots of the anchored entries
        self.anchor_cos: torch.Tensor | None = None  # [anchors, rotary_dim] rotation of their copies
        self.anchor_sin: torch.Tensor | None = None

    # --- buffers ----------------------------------------------------------------------------------------------------
    def allocate(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
        columns = capacity + self.copies
        shape = (*key_states.shape[:2], columns)
        # Zeros, not empty: masked slots are still multiplied, and uninitialised memory may hold NaN.
        self.keys = [key_states.new_zeros((*shape, key_states.shape[-1])) for _ in range(self.num_layers)]
        self.values = [value_states.new_zeros((*shape, value_states.shape[-1])) for _ in range(self.num_layers)]
        device = key_states.device
        self.mask = torch.zeros((1, 1, self.query_rows, columns), dtype=key_states.dtype, device=device)
        self.decode_slots = torch.zeros(self.query_rows, dtype=torch.long, device=device)
        self.write_slots = self.decode_slots
        self.anchor_source = torch.zeros(self.copies, dtype=torch.long, device=device)
        self.anchor_cos = torch.ones((self.copies, self.geometry.rotary_dim), dtype=torch.float32, device=device)
        self.anchor_sin = torch.zeros((self.copies, self.geometry.rotary_dim), dtype=torch.float32, device=device)
        self.slot_of = np.zeros(capacity, dtype=np.int64)
        self.position = np.zeros(capacity, dtype=np.int64)
        self.valid = np.zeros(capacity, dtype=bool)
        self.free = list(range(capacity - 1, -1, -1))
        self.capacity = capacity
        self.peak_nbytes = max(self.peak_nbytes, sum(t.nbytes for t in self.tensors()))

    def reserve(self, needed: int, length: int) -> bool:
        """Room for `needed` live entries: a larger ring (a new shape: only ever before the decode steps, for a
        prefill longer than the policy's capacity). Entries keep their physical slots."""
        if needed <= self.capacity:
            return False
        self._check_growable(needed)
        old_capacity, old_keys, old_values = self.capacity, self.keys, self.values
        slot_of, position, valid, free = self.slot_of, self.position, self.valid, self.free
        capacity = _grown(old_capacity, needed)
        self.allocate(old_keys[0][..., :0, :], old_values[0][..., :0, :], capacity)
        for new_layers, old_layers in ((self.keys, old_keys), (self.values, old_values)):
            for new, old in zip(new_layers, old_layers, strict=True):
                new[..., :old_capacity, :] = old[..., :old_capacity, :]
        self.slot_of[:old_capacity] = slot_of
        self.position[:old_capacity] = position
        self.valid[:old_capacity] = valid
        self.free = list(range(capacity - 1, old_capacity - 1, -1)) + free
        return True

    def tensors(self) -> list[torch.Tensor]:
        return [*self.keys, *self.values]

    def device_buffers(self) -> list[torch.Tensor]:
        """Every tensor a decode step reads or writes in place (entries, mask, index and angle buffers): what CUDA
        graphs must take as static inputs (torch._dynamo.mark_static_address), not copy at every replay."""
        found = list(self.tensors())
        for value in vars(self).values():
            found.extend(item for item in (value if isinstance(value, (tuple, list)) else (value,))
                         if isinstance(item, torch.Tensor))
        return found

    def layer_views(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.keys[layer], self.values[layer]

    # --- a step: host plan, then tensor work ----------------------------------------------------------------------
    def begin_step(self, length: int, first_token: int, count: int) -> torch.Tensor:
        """Place the step's `count` entries (stream indices first_token, ...) after the cache's `length` slots and
        write the static buffers; the additive attention mask [1, 1, count, capacity + anchors] its forward takes."""
        self._check_length(length)
        self.decoding |= count == 1
        slots = np.array([self.free.pop() for _ in range(count)], dtype=np.int64)
        self.slot_of[length : length + count] = slots
        self.position[slots] = np.arange(first_token, first_token + count)
        self.valid[slots] = True
        if count == 1:
            self.decode_slots.copy_(torch.from_numpy(slots))
            self.write_slots = self.decode_slots
        else:
            self.write_slots = torch.from_numpy(slots).to(self.mask.device)
        mask = self._anchors_and_mask(slots, length, first_token, count)
        self.length = length + count
        return mask

    def _check_growable(self, needed: int) -> None:
        if self.decoding:
            raise RuntimeError(f"internal error: the ring would grow from {self.capacity} to hold {needed} entries "
                               "after decoding began (a new shape under a compiled step); it is sized before the "
                               "first decode step")

    def _check_length(self, length: int) -> None:
        if length != self.length:
            raise RuntimeError(f"internal error: ring storage holds {self.length} entries, the cache {length}")

    @property
    def stored_slots(self) -> int:
        """Physical slots before the anchored copies (the ring)."""
        return self.capacity

    def _anchors_and_mask(self, slots: np.ndarray, length: int, first_token: int, count: int) -> torch.Tensor:
        """After the step's entries are placed (`slots`, physical) and `valid` updated: the anchored copies' sources
        and angles into their static buffers; the additive mask of the step's queries."""
        # Attended by the step's queries: the live entries (the step's own included), and the anchored copies that
        # replace anchored entries not where the query attends them (their originals masked).
        attended = np.concatenate((self.valid, np.zeros(self.anchors, dtype=bool)))
        offset = first_token - length  # the step's stream index - slot
        anchored = min(length, self.anchors)
        source = np.zeros(self.anchors, dtype=np.int64)
        shifts = np.zeros(self.anchors, dtype=np.int64)
        if anchored:
            source[:anchored] = self.slot_of[:anchored]
            shifts[:anchored] = np.arange(anchored) + offset - self.position[source[:anchored]]
            moved = np.flatnonzero(shifts[:anchored])
            attended[source[moved]] = False
            attended[self.stored_slots + moved] = True
        if self.anchors:
            cos, sin = self.geometry.cos_sin(torch.from_numpy(shifts), self.mask.device, precise=True)
            self.anchor_cos.copy_(cos)
            self.anchor_sin.copy_(sin)
            self.anchor_source.copy_(torch.from_numpy(source))
        minimum = torch.finfo(self.mask.dtype).min
        if count == 1:
            self.mask.copy_(torch.from_numpy(np.where(attended, 0.0, minimum)))
            return self.mask
        # A prefill: causal among its own entries (a mask of its own shape, outside the compiled decode step).
        allowed = np.repeat(attended[None, :], count, axis=0)
        for query in range(count - 1):
            allowed[query, slots[query + 1 :]] = False
        return torch.from_numpy(np.where(allowed, 0.0, minimum)).to(self.mask.device, self.mask.dtype)[None, None]

    def update(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the step's entries of `layer` at its slots and return the whole buffers (the mask hides the rest).
        Tensor work only, on the static buffers: this is what a compiled decode step traces."""
        keys, values = self.keys[layer], self.values[layer]
        if self.anchors:
            self.write_anchor_copies(keys, values)
        keys.index_copy_(2, self.write_slots, key_states)
        values.index_copy_(2, self.write_slots, value_states)
        return keys, values

    def write_anchor_copies(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """A layer's anchored entries, rotated by their shifts, into its copy columns past the ring (masked where
        the shift is 0: there the original is attended)."""
        ring = self.capacity
        keys[..., ring:, :] = rotate_keys(keys.index_select(2, self.anchor_source), self.anchor_cos, self.anchor_sin)
        values[..., ring:, :] = values.index_select(2, self.anchor_source)

    # --- between steps: the schedule's compaction, on the host only ---------------------------------------------------
    def move(self, move: Move) -> None:
        target, source = move.slices()
        self.slot_of[target] = self.slot_of[source].copy()

    def compacted(self, length_after: int) -> None:
        """The cache's slots [0, length_after) hold the kept entries: every other physical slot is free."""
        kept = np.zeros(self.capacity, dtype=bool)
        kept[self.slot_of[:length_after]] = True
        self.free = [int(slot) for slot in np.flatnonzero(~kept)[::-1]]
        self.valid = kept
        self.length = length_after

    def truncate(self, length: int) -> None:
        dropped = self.slot_of[length : self.length]
        self.valid[dropped] = False
        self.free.extend(int(slot) for slot in dropped[::-1])
        self.length = length

    def start_step(self, first_slot: int, first_token: int, count: int, last_position: int) -> None:
        raise RuntimeError("a ring StreamingCache steps through begin_step / finish_step (steppers.RingStepper)")

    def end_step(self, length: int) -> None:
        return None

    def rotary_table(self, model: torch.nn.Module) -> AbstractContextManager:
        """Queries and keys at their stream index: float64 angles in realign / exact (as QuantizedStorage)."""
        return precise_rotary(model, self.geometry) if self.anchors_by_slot else nullcontext()

    # --- the contract's reads, in the cache's slot order (between steps; tests, inspection) ------------------------
    def attend(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("a ring StreamingCache steps through begin_step / finish_step (steppers.RingStepper)")

    def cache_slots(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the cache's slots [0, length) of `layer` in its order, keys as stored (stream index)."""
        index = torch.from_numpy(self.slot_of[:length]).to(self.mask.device)
        return self.keys[layer].index_select(2, index), self.values[layer].index_select(2, index)

    def keys_to_attend(self, layer: int, length: int, tokens_seen: int) -> torch.Tensor:
        keys = self.cache_slots(layer, length)[0]
        anchored = self.anchored_keys(length, tokens_seen - length, keys.device)
        if anchored is not False:
            keys[..., : anchored.shape[-2], :] = anchored[layer]
        return keys

    def values_to_attend(self, layer: int, length: int) -> torch.Tensor:
        return self.cache_slots(layer, length)[1]

    def anchored_keys(self, length: int, offset: int, device: torch.device) -> torch.Tensor | bool:
        count = min(length, self.anchors)
        if count == 0:
            return False
        source = self.slot_of[:count]
        shifts = np.arange(count) + offset - self.position[source]
        if not shifts.any():
            return False
        cos, sin = self.geometry.cos_sin(torch.from_numpy(shifts), device, precise=True)
        return rotate_keys(self._stored_anchor_keys(source, length, device), cos, sin)

    def _stored_anchor_keys(self, source: np.ndarray, length: int, device: torch.device) -> torch.Tensor:
        """The anchored entries' keys as stored, all layers [layers, batch, kv_heads, count, head_dim], from their
        slots `source`."""
        index = torch.from_numpy(source).to(device)
        return torch.stack([keys.index_select(2, index) for keys in self.keys])



class QuantizedRingStorage(RingStorage):
    """`layout: ring` with `kv_quant`: the quantized entries as codes in fixed slots that never move.

    Physical slots, one index space: [0, F) float entries (the `float_sinks` sinks kept in the model's dtype, then
    `residual + 1` slots for the newest entries, the one of stream index t at float_sinks + t mod (residual + 1)),
    then code slots (the first a scratch slot, never attended), then the anchored copies. Every entry is stored as the
    model rotated it at its stream index (as QuantizedStorage and RingStorage do); an entry is quantized once, when it
    ages out of the newest residual + 1 (at the start of the step after the one that made it the oldest of them: the
    same entries a compact kv_quant cache holds as codes at every step), from its float copy into a free code slot,
    and its codes never move or change: a compaction rewrites the host's slot map and the mask only. Codes depend on
    the entry alone (groups along head_dim), so they equal the compact kv_quant cache's bit for bit.

    A decode step's `update` does fixed-shape tensor work only: quantize one aging entry (into the scratch slot when
    none ages), write the new entry's float copy, dequantize every code slot, rotate the anchored copies; the static
    index buffers are written by `begin_step` on the host. A prefill (several entries) quantizes those already past
    the newest residual + 1 right away, as the compact cache does, so its own queries attend them as codes.
    """

    def __init__(self, spec: KVQuantSpec, policy: StreamingPolicy, geometry: RotaryGeometry, num_layers: int,
                 rope_mode: str):
        if spec.residual > policy.window:
            raise ValueError(f"kv_quant residual = {spec.residual} > window = {policy.window}: the float entries "
                             "must be among those every compaction keeps; lower the residual")
        super().__init__(policy, geometry, num_layers, rope_mode)
        self.spec = spec
        self.float_sinks = policy.sink if spec.full_sinks else 0
        self.recent_slots = spec.residual + 1
        self.float_slots = self.float_sinks + self.recent_slots  # F
        self.codes: _LayerCodes | None = None
        self.floats: list[torch.Tensor] = []  # per layer [2, batch, kv_heads, F, head_dim], KEYS then VALUES
        self.code_slots = 0  # code slots, the scratch one included
        self.free_codes: list[int] = []  # physical indices of free code slots, lowest last
        # Static buffers of a decode step: the aging entry's float slot and code slot, the new entry's float slot.
        self.age_source: torch.Tensor | None = None
        self.age_target: torch.Tensor | None = None
        self.float_target: torch.Tensor | None = None
        self.direct: tuple[torch.Tensor, torch.Tensor] | None = None  # a prefill's (entries, code slots) quantized now
        self.step_count = 1

    @property
    def stored_slots(self) -> int:
        return self.float_slots + self.code_slots

    @property
    def scratch(self) -> int:
        return self.float_slots

    def allocate(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
        if key_states.shape != value_states.shape:
            raise ValueError(f"kv_quant stores keys and values alike: shapes {tuple(key_states.shape)} and "
                             f"{tuple(value_states.shape)} differ")
        self.spec.quantizer.load()
        entries = torch.stack((key_states, value_states))
        # As many code slots as the compact kv_quant cache (capacity - sinks - residual): the live entries never
        # exceed the capacity, and the newest residual + 1 of them are floats at every step; one of them is scratch.
        self.code_slots = max(2, capacity - self.float_sinks - self.spec.residual)
        self.codes = _LayerCodes(self.spec.quantizer, entries, self.num_layers, self.code_slots)
        self.floats = [key_states.new_zeros((*entries.shape[:-2], self.float_slots, key_states.shape[-1]))
                       for _ in range(self.num_layers)]
        device = key_states.device
        stored = self.float_slots + self.code_slots
        self.mask = torch.zeros((1, 1, 1, stored + self.anchors), dtype=key_states.dtype, device=device)
        # A decode step's three indices, one static buffer (its compiled forward reads them; CUDA graphs need their
        # addresses fixed); a prefill points the step's indices at tensors of its own.
        self.decode_indices = torch.zeros(3, dtype=torch.long, device=device)
        self.decode_views = self.decode_indices.split(1)
        self.age_source, self.age_target, self.float_target = self.decode_views
        self.anchor_source = torch.zeros(self.anchors, dtype=torch.long, device=device)
        self.anchor_cos = torch.ones((self.anchors, self.geometry.rotary_dim), dtype=torch.float32, device=device)
        self.anchor_sin = torch.zeros((self.anchors, self.geometry.rotary_dim), dtype=torch.float32, device=device)
        self.slot_of = np.zeros(capacity, dtype=np.int64)
        self.position = np.zeros(stored, dtype=np.int64)
        self.valid = np.zeros(stored, dtype=bool)
        self.free_codes = list(range(stored - 1, self.scratch, -1))
        self.capacity = capacity
        self.peak_nbytes = max(self.peak_nbytes, sum(t.nbytes for t in self.tensors()))

    def reserve(self, needed: int, length: int) -> bool:
        """Room for `needed` live entries (a prefill longer than the policy's capacity, before any decode step): more
        code slots, appended after the others, so that every entry keeps its physical slot."""
        if needed <= self.capacity:
            return False
        self._check_growable(needed)
        capacity = _grown(self.capacity, needed)
        old_stored, old_codes = self.stored_slots, self.code_slots
        code_slots = max(2, capacity - self.float_sinks - self.spec.residual)
        self.codes.grow(code_slots, old_codes)
        self.code_slots = code_slots
        stored = self.stored_slots
        self.mask = self.mask.new_zeros((1, 1, 1, stored + self.anchors))
        self.slot_of = np.concatenate((self.slot_of, np.zeros(capacity - self.capacity, np.int64)))
        self.position = np.concatenate((self.position, np.zeros(stored - old_stored, np.int64)))
        self.valid = np.concatenate((self.valid, np.zeros(stored - old_stored, bool)))
        self.free_codes = list(range(stored - 1, old_stored - 1, -1)) + self.free_codes
        self.capacity = capacity
        self.peak_nbytes = max(self.peak_nbytes, sum(t.nbytes for t in self.tensors()))
        return True

    def tensors(self) -> list[torch.Tensor]:
        return [] if self.codes is None else [*self.codes.tensors(), *self.floats]

    def layer_views(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return None, None  # held as codes: `update` dequantizes them

    # --- a step: host plan, then tensor work ----------------------------------------------------------------------
    def begin_step(self, length: int, first_token: int, count: int) -> torch.Tensor:
        """Age the float entries that leave the newest residual + 1 into code slots, place the step's entries (float
        sinks, then codes for a prefill's older ones, then the float slots), write the static buffers; the mask."""
        self._check_length(length)
        self.decoding |= count == 1
        newest = length + count - self.recent_slots  # cache slots from here on are the newest residual + 1
        held = self.slot_of[: max(0, min(length, newest))]
        aging = np.flatnonzero((held >= self.float_sinks) & (held < self.float_slots))
        sources = held[aging].copy()
        targets = np.array([self._code_slot() for _ in aging], dtype=np.int64)
        self.slot_of[aging] = targets
        self.position[targets] = self.position[sources]
        self.valid[sources] = False
        self.valid[targets] = True
        slots = np.zeros(count, dtype=np.int64)
        for index in range(count):
            cache_slot, token = length + index, first_token + index
            if cache_slot < self.float_sinks:
                slots[index] = cache_slot
            elif cache_slot < newest:
                slots[index] = self._code_slot()
            else:
                slots[index] = self.float_sinks + token % self.recent_slots
                if self.valid[slots[index]]:
                    raise RuntimeError(f"internal error: float slot {slots[index]} still holds an entry")
        self.slot_of[length : length + count] = slots
        self.position[slots] = np.arange(first_token, first_token + count)
        self.valid[slots] = True
        self._write_step_buffers(sources, targets, slots)
        mask = self._anchors_and_mask(slots, length, first_token, count)
        self.length = length + count
        return mask

    def _code_slot(self) -> int:
        if not self.free_codes:
            raise RuntimeError("internal error: the quantized ring has no free code slot")
        return self.free_codes.pop()

    def _write_step_buffers(self, sources: np.ndarray, targets: np.ndarray, slots: np.ndarray) -> None:
        device = self.mask.device
        to_floats = slots < self.float_slots
        self.step_count = len(slots)
        if len(slots) == 1 and len(sources) <= 1:  # a decode step: the static buffers its compiled forward reads
            # Nothing ages: quantize float slot 0 into the scratch code slot (relative index 0), never attended.
            indices = (sources[0], targets[0] - self.float_slots) if len(sources) else (0, 0)
            self.decode_indices.copy_(torch.tensor((*indices, slots[0])))
            self.age_source, self.age_target, self.float_target = self.decode_views
            self.direct = None
            return
        index = np.arange(len(slots))
        self.age_source = torch.from_numpy(sources).to(device)
        self.age_target = torch.from_numpy(targets - self.float_slots).to(device)
        self.float_target = torch.from_numpy(slots[to_floats]).to(device)
        self.float_entries = torch.from_numpy(index[to_floats]).to(device)
        self.direct = (torch.from_numpy(index[~to_floats]).to(device),
                       torch.from_numpy(slots[~to_floats] - self.float_slots).to(device))

    def update(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize the aging entries of `layer`, store the step's entries, and return every slot dequantized, with
        the anchored copies after them (the mask hides the rest). Tensor work only."""
        entries = torch.stack((key_states, value_states))
        floats = self.floats[layer]
        # The code slots are dequantized as they were before this step, and the entries quantized now are written
        # into that copy too (the same numbers a read-back gives): the step never reads codes it wrote, which inductor
        # (torch 2.13, CPU) orders wrongly when each layer's codes are a tensor of their own.
        codes = self._dequantized(layer, floats.dtype)
        # The aging entry's float slot is the one the new entry takes: read before it is written.
        if self.direct is None or len(self.age_source):
            aged = self.codes.write_at(layer, self.age_target, floats.index_select(-2, self.age_source))
            codes.index_copy_(-2, self.age_target, aged)
        if self.direct is None:
            floats.index_copy_(-2, self.float_target, entries)
        else:
            floats.index_copy_(-2, self.float_target, entries.index_select(-2, self.float_entries))
            if len(self.direct[0]):
                direct = self.codes.write_at(layer, self.direct[1], entries.index_select(-2, self.direct[0]))
                codes.index_copy_(-2, self.direct[1], direct)
        stored = torch.cat((floats, codes), dim=-2)
        if self.anchors:
            anchored = stored.index_select(-2, self.anchor_source)
            copies = torch.stack((rotate_keys(anchored[KEYS], self.anchor_cos, self.anchor_sin), anchored[VALUES]))
            stored = torch.cat((stored, copies), dim=-2)
        return stored[KEYS], stored[VALUES]

    def _dequantized(self, layer: int, dtype: torch.dtype) -> torch.Tensor:
        """Every code slot of `layer`, keys and values, in `dtype`: [2, batch, kv_heads, code_slots, head_dim]."""
        payload, scale, zero = self.codes.layer(layer)
        head_dim = self.floats[layer].shape[-1]
        out = torch.empty((*payload.shape[:-1], head_dim), dtype=dtype, device=payload.device)
        self.codes.quantizer.dequantize_into(payload, scale, zero, out)
        return out

    # --- between steps: the schedule's compaction, on the host only ---------------------------------------------------
    def compacted(self, length_after: int) -> None:
        kept = np.zeros(self.stored_slots, dtype=bool)
        kept[self.slot_of[:length_after]] = True
        codes = np.flatnonzero(~kept[self.scratch + 1 :]) + self.scratch + 1
        self.free_codes = [int(slot) for slot in codes[::-1]]
        self.valid = kept
        self.length = length_after

    def truncate(self, length: int) -> None:
        dropped = self.slot_of[length : self.length]
        self.valid[dropped] = False
        self.free_codes.extend(int(slot) for slot in dropped[::-1] if slot > self.scratch)
        self.length = length

    # --- the contract's reads, in the cache's slot order (between steps; tests, inspection) ------------------------
    def cache_slots(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        stored = torch.cat((self.floats[layer], self._dequantized(layer, self.floats[layer].dtype)), dim=-2)
        index = torch.from_numpy(self.slot_of[:length]).to(stored.device)
        entries = stored.index_select(-2, index)
        return entries[KEYS], entries[VALUES]

    def _stored_anchor_keys(self, source: np.ndarray, length: int, device: torch.device) -> torch.Tensor:
        """Read through the slot map (floats and dequantized codes): the first entries in slot order."""
        count = len(source)
        return torch.stack([self.cache_slots(layer, length)[0][..., :count, :] for layer in range(self.num_layers)])


class RingBlockStorage(RingStorage):
    """The ring layout for blocks of `block` queries per forward (speculative verification: k + 1 tokens), each query
    attending exactly what the stepwise cache holds at its step, compactions inside the block included.

    Nothing moves on the ring, so a compaction inside a block is only a per-query mask row: the caller replays the
    schedule over the block on the host and hands `begin_block` each query's view (the physical slots of the cache's
    slots before it, in order). The block's entries go to slots that were free at its start, never to one a
    compaction inside it frees (one forward writes them all at once); the ring is sized for it. An anchored entry's
    shift depends on its query's offset (stream index - slot), which a compaction inside the block changes, and so
    may the anchored set itself: the copies past the ring are one column per distinct (entry, shift) the block's
    queries need, at most `anchors` per query, `anchors * block` in all. Each layer writes its copies after its
    block's entries, so that a copy's source may be an entry of the block itself (a refresh token chosen inside it).
    """

    def __init__(self, policy: StreamingPolicy, geometry: RotaryGeometry, num_layers: int, rope_mode: str,
                 block: int):
        super().__init__(policy, geometry, num_layers, rope_mode)
        self.block = block
        self.copies = self.anchors * block
        self.query_rows = block

    def reserve(self, needed: int, length: int) -> bool:
        if needed > self.capacity:
            raise RuntimeError(f"internal error: a ring block storage of {self.capacity} slots was asked for {needed}")
        return False

    def claim(self, count: int) -> np.ndarray:
        """`count` physical slots free now (lowest first), for a block's entries; they stay free (unattended) until
        `settle` names them among the cache's."""
        if count > len(self.free):
            raise RuntimeError(f"internal error: the ring has {len(self.free)} free slots, a block needs {count}")
        return np.array(self.free[: -count - 1 : -1], dtype=np.int64)

    def begin_block(self, views: list[np.ndarray], slots: np.ndarray, first_token: int) -> torch.Tensor:
        """Write the static buffers of a forward whose queries write their entries at `slots` (physical; stream
        indices first_token, ...), query i attending `views[i]` (the cache's slots before it, then its own entry's)
        for the first len(views) queries; the others are padding and attend their own entry only (no row is empty:
        no NaN), which no query attends. The additive mask [1, 1, len(slots), ring + copies] the forward takes (the
        static one for a block of `block` queries)."""
        rows = len(slots)
        self.position[slots[: len(views)]] = np.arange(first_token, first_token + len(views))
        ring = self.capacity
        attended = np.zeros((rows, ring + self.copies), dtype=bool)
        copies: dict[tuple[int, int], int] = {}
        for query, view in enumerate(views):
            attended[query, view] = True
            length = len(view) - 1  # the query's own entry is the last of its view
            anchored = min(length, self.anchors)
            if not anchored:
                continue
            source = view[:anchored]
            shifts = np.arange(anchored) + (first_token + query - length) - self.position[source]
            for moved in np.flatnonzero(shifts):
                attended[query, source[moved]] = False
                column = copies.setdefault((int(source[moved]), int(shifts[moved])), len(copies))
                if column >= self.copies:
                    raise RuntimeError(f"internal error: a block needs more than {self.copies} anchored copies")
                attended[query, ring + column] = True
        for query in range(len(views), rows):
            attended[query, slots[query]] = True
        if self.copies:
            pairs = np.zeros((self.copies, 2), dtype=np.int64)
            if copies:
                pairs[: len(copies)] = np.array(list(copies), dtype=np.int64)
            cos, sin = self.geometry.cos_sin(torch.from_numpy(pairs[:, 1]), self.mask.device, precise=True)
            self.anchor_cos.copy_(cos)
            self.anchor_sin.copy_(sin)
            self.anchor_source.copy_(torch.from_numpy(pairs[:, 0]))
        mask = np.where(attended, 0.0, torch.finfo(self.mask.dtype).min)
        if rows == self.block:
            self.decode_slots.copy_(torch.from_numpy(slots))
            self.write_slots = self.decode_slots
            self.mask.copy_(torch.from_numpy(mask)[None, None])
            return self.mask
        # A prompt in one forward (no anchored entry shifted: it starts the stream and no compaction precedes its last
        # query): buffers of its own shape, outside the compiled block forward.
        self.write_slots = torch.from_numpy(slots).to(self.mask.device)
        return torch.from_numpy(mask).to(self.mask.device, self.mask.dtype)[None, None]

    def settle(self, order: np.ndarray) -> None:
        """The cache's slots hold the entries at physical slots `order`, in order; every other slot is free."""
        self.slot_of[: len(order)] = order
        self.length = len(order)
        self.valid = np.zeros(self.capacity, dtype=bool)
        self.valid[order] = True
        self.free = [int(slot) for slot in np.flatnonzero(~self.valid)[::-1]]

    def update(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the block's entries of `layer` at their slots, then its anchored copies (whose sources may be among
        them); the whole buffers (the mask hides the rest). Tensor work only, on the static buffers."""
        keys, values = self.keys[layer], self.values[layer]
        keys.index_copy_(2, self.write_slots, key_states)
        values.index_copy_(2, self.write_slots, value_states)
        if self.copies:
            self.write_anchor_copies(keys, values)
        return keys, values

    def begin_step(self, length: int, first_token: int, count: int) -> torch.Tensor:
        raise RuntimeError("a ring block storage steps through begin_block (steppers.RingBlockTarget)")
