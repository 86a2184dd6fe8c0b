"""The exact multi-token step: a block of tokens through the model in one forward, as if fed one at a time.

Under every policy of this package the query at stream index t attends a set of entries fixed by the schedule alone:
the sinks and refresh tokens (anchored: their rotary distance is query slot - their slot, in `realign` / `exact`) and a
contiguous recent suffix (whose distance is the true t - j). `BlockStepper` replays `CompactionSchedule` over the
block's tokens, gives each query its own visibility row and each anchored entry a copy at the position it needs, so
one forward yields the NLLs of n stepwise steps, compactions inside the block included. It never measures latency.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache

from .compat import cache_kwargs
from .policy import CompactionSchedule, StreamingPolicy
from .rope import RotaryGeometry, rotate_keys


@dataclass(frozen=True)
class StepTrace:
    """One token's step: the query's position id, its attention span, and the compaction that followed it."""

    position: int
    kv_len: int
    evicted: int  # entries the compaction after this step dropped; 0 when none was due

    @property
    def compacted(self) -> bool:
        return self.evicted > 0


@dataclass
class BlockPlan:
    """What one forward attends: per-query visibility over the key axis [stored entries, copies], and the copies.

    Columns [0, stored) are the stored entries at their natural position (stream index - base); each copy is a stored
    entry again at another position (an anchored entry seen from a query whose slot distance differs from t - j).
    """

    visible: np.ndarray  # bool [n, stored + copies]
    copy_sources: np.ndarray  # int64 [copies], indices into the stored entries
    copy_positions: np.ndarray  # int64 [copies], rotary positions (already rebased)
    kept_after: list[np.ndarray]  # per query: stored indices kept (slot order) after its step
    schedules_after: list[CompactionSchedule | None]  # per query: the schedule's state after its step
    trace: list[StepTrace]


class BlockStepper:
    """Feeds blocks of tokens through the model exactly as if they were fed one at a time under the run's policy.

    `policy` None is dense attention (DynamicCache's positions 0, 1, 2, ...). Stored entries live in one preallocated
    storage per stepper ([layers, batch, kv_heads, capacity, head_dim]): in `realign` / `exact` the keys before RoPE
    (they are rotated per block, relative to the block's first token, so angles stay as small as the stepwise path's);
    in `absolute` and dense, the keys as the model rotated them at their stream index (positions never change there).
    """

    def __init__(self, model: Any, policy: StreamingPolicy | None, rope_mode: str = "realign"):
        self.model = model
        self.policy = policy
        self.relative = policy is not None and rope_mode in ("realign", "exact")
        self.geometry = RotaryGeometry.of(model) if self.relative else None
        self.schedule = CompactionSchedule(policy) if policy is not None else None
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.stored = 0  # entries in use in the storage: the kept ones [0, kept) after `_settle`, plus a pending block
        self.stored_tokens = np.empty(0, dtype=np.int64)  # stream index of each stored entry
        self.kept = np.empty(0, dtype=np.int64)  # stored indices of the cached entries, in slot order
        self.tokens_seen = 0
        self.trace: list[StepTrace] = []
        self._last_block: BlockPlan | None = None

    # --- the contract -----------------------------------------------------------------------------------------------
    def forward_block(self, input_ids: torch.Tensor, one_step: bool = False) -> torch.Tensor:
        """Logits [n, vocab] of the n tokens of `input_ids` [1, n], equal to feeding them one by one.

        `one_step` makes the block a single step of the schedule (a prefill: causal inside, one compaction decision at
        its end), as the stepwise protocol's prefill forward is. Afterwards the state holds all n tokens.
        """
        self._settle()
        count = input_ids.shape[-1]
        first = self.tokens_seen
        base = first if self.relative else 0
        settled_tokens = self.stored_tokens
        self.stored_tokens = np.concatenate((settled_tokens, np.arange(first, first + count, dtype=np.int64)))
        try:
            plan = self._plan(count, base, one_step)
            mask = torch.zeros(plan.visible.shape, dtype=self.model.dtype, device=input_ids.device)
            mask.masked_fill_(torch.from_numpy(~plan.visible).to(input_ids.device), torch.finfo(self.model.dtype).min)
            positions = torch.arange(first - base, first - base + count, device=input_ids.device).unsqueeze(0)
            block_cache = _BlockCache(self, plan, base, count)
            out = self.model(
                input_ids=input_ids, position_ids=positions, attention_mask=mask[None, None], logits_to_keep=0,
                **cache_kwargs(block_cache),
            )
        except BaseException:
            # A failed forward (out of memory, an interrupt) leaves the state as it was before the block (settled:
            # the block before it can no longer be rewound): entries it wrote lie beyond `stored`, unreferenced, the
            # schedule is untouched (_plan steps a copy), and the block can be fed again.
            self.stored_tokens = settled_tokens
            raise
        self.stored += count
        self.tokens_seen += count
        self.trace.extend(plan.trace)
        self._last_block = plan
        self.kept = plan.kept_after[-1]
        if plan.schedules_after[-1] is not None:
            self.schedule = copy.copy(plan.schedules_after[-1])
        return out.logits[0]

    def rewind(self, count: int) -> None:
        """Forget the last `count` tokens of the last block: the state is that after its first n - count tokens."""
        plan = self._last_block
        if count == 0:
            return
        if plan is None or not 0 < count < len(plan.trace):
            raise ValueError(f"rewind({count}): only 0 <= count < the last block's {self._block_len()} tokens")
        kept_steps = len(plan.trace) - count
        self.kept = plan.kept_after[kept_steps - 1]
        if plan.schedules_after[kept_steps - 1] is not None:
            self.schedule = copy.copy(plan.schedules_after[kept_steps - 1])
        del self.trace[len(self.trace) - count :]
        self.tokens_seen -= count
        # The rewound entries stay in storage unreferenced until `_settle` drops them; never kept, never attended.
        plan.trace = plan.trace[:kept_steps]
        plan.kept_after = plan.kept_after[:kept_steps]
        plan.schedules_after = plan.schedules_after[:kept_steps]

    def kept_tokens(self) -> list[int]:
        """Stream indices of the cached entries in slot order (what StreamingCache holds between steps)."""
        return self.stored_tokens[self.kept].tolist()

    def cache_contents(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) [batch, kv_heads, kv_len, head_dim] as StreamingCache holds them in slot order."""
        with torch.inference_mode():  # the storage is made of inference tensors, updated in place here
            self._settle()
        if self.keys is None:
            return []
        keys, values = self.keys[:, :, :, : self.stored], self.values[:, :, :, : self.stored]
        if self.relative:
            with torch.inference_mode():
                keys = self._rotate(keys, torch.arange(self.stored, device=keys.device))
        return [(keys[layer], values[layer]) for layer in range(keys.shape[0])]

    # --- the schedule, replayed ---------------------------------------------------------------------------------------
    def _plan(self, count: int, base: int, one_step: bool) -> BlockPlan:
        """Each query's visible entries, and the anchored copies they need, from the schedule alone."""
        first_new = self.stored
        stored = first_new + count
        kept = self.kept
        schedule = copy.copy(self.schedule) if self.schedule is not None else None  # forward_block adopts it on success
        rows: list[np.ndarray] = []
        copies: dict[tuple[int, int], int] = {}
        copy_rows: list[tuple[int, int]] = []  # (query, copy column)
        kept_after: list[np.ndarray] = []
        schedules_after: list[CompactionSchedule | None] = []
        trace: list[StepTrace] = []
        for i in range(count):
            token = self.tokens_seen + i
            visible = np.append(kept, first_new + i) if not one_step else np.concatenate(
                (self.kept, np.arange(first_new, first_new + i + 1, dtype=np.int64)))
            span = len(visible)
            query_slot = span - 1
            if self.relative:
                slot_distance = query_slot - np.arange(span)
                natural = (token - self.stored_tokens[visible]) == slot_distance
                rows.append(visible[natural])
                for source, distance in zip(visible[~natural].tolist(), slot_distance[~natural].tolist(), strict=True):
                    key = (source, token - base - distance)
                    column = copies.setdefault(key, len(copies))
                    copy_rows.append((i, column))
                position = query_slot
            else:
                rows.append(visible)
                position = token
            decides = schedule is not None and (not one_step or i == count - 1)
            step_plan = schedule.step(span) if decides else None
            if step_plan is not None:
                kept = visible[np.fromiter(step_plan.kept_slots, dtype=np.int64, count=step_plan.length_after)]
            else:
                kept = visible
            kept_after.append(kept)
            schedules_after.append(copy.copy(schedule) if schedule is not None else None)
            trace.append(StepTrace(position=position, kv_len=span, evicted=step_plan.evicted if step_plan else 0))
        visible_matrix = np.zeros((count, stored + len(copies)), dtype=bool)
        for i, row in enumerate(rows):
            visible_matrix[i, row] = True
        for i, column in copy_rows:
            visible_matrix[i, stored + column] = True
        keys = np.array(list(copies), dtype=np.int64).reshape(-1, 2)
        return BlockPlan(visible_matrix, keys[:, 0], keys[:, 1], kept_after, schedules_after, trace)

    # --- storage ------------------------------------------------------------------------------------------------------
    def _settle(self) -> None:
        """Keep only the cached entries, in slot order, at the front of the storage (after a block or a rewind)."""
        if self.keys is None or (len(self.kept) == self.stored and np.array_equal(self.kept, np.arange(self.stored))):
            return
        index = torch.from_numpy(self.kept).to(self.keys.device)
        self.keys[:, :, :, : len(self.kept)] = self.keys.index_select(3, index)
        self.values[:, :, :, : len(self.kept)] = self.values.index_select(3, index)
        self.stored_tokens = self.stored_tokens[self.kept]
        self.stored = len(self.kept)
        self.kept = np.arange(self.stored, dtype=np.int64)
        self._last_block = None  # a rewind must not reach behind a settled state

    def _reserve(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        if self.keys is not None and self.keys.shape[3] >= needed:
            return
        capacity = max(needed, 2 * self.keys.shape[3] if self.keys is not None else needed)
        layers = self.model.config.num_hidden_layers
        new_keys = key_states.new_empty((layers, *key_states.shape[:2], capacity, key_states.shape[-1]))
        new_values = value_states.new_empty((layers, *value_states.shape[:2], capacity, value_states.shape[-1]))
        if self.keys is not None:
            new_keys[:, :, :, : self.stored] = self.keys[:, :, :, : self.stored]
            new_values[:, :, :, : self.stored] = self.values[:, :, :, : self.stored]
        self.keys, self.values = new_keys, new_values

    def _rotate(self, pre_rope: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self.geometry.cos_sin(positions, pre_rope.device)
        return rotate_keys(pre_rope, cos, sin, scale=self.geometry.attention_scaling)

    def _block_len(self) -> int:
        return 0 if self._last_block is None else len(self._last_block.trace)


class _BlockCache(Cache):
    """The Cache a block's forward sees: stores the block's entries, returns the key axis its mask was built for."""

    def __init__(self, stepper: BlockStepper, plan: BlockPlan, base: int, count: int):
        super().__init__(layers=[])
        self.stepper, self.plan, self.base, self.count = stepper, plan, base, count
        self.first = stepper.stored  # storage index of the block's first entry
        # cos / sin of every stored entry's rotary position (realign / exact) and of the anchored copies': the same
        # for every layer of the block, computed at the first
        self._stored_angles: tuple[torch.Tensor, torch.Tensor] | None = None
        self._copy_angles: tuple[torch.Tensor, torch.Tensor] | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.first

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        stepper, end = self.stepper, self.first + self.count
        if layer_idx == 0:
            stepper._reserve(key_states, value_states, end)
        keys, values = stepper.keys[layer_idx], stepper.values[layer_idx]
        block = slice(self.first, end)
        if not stepper.relative:
            keys[:, :, block], values[:, :, block] = key_states, value_states
            natural_keys = keys[:, :, :end]
        else:
            cos, sin = self._angles(key_states.device)
            scaling = stepper.geometry.attention_scaling
            keys[:, :, block] = rotate_keys(key_states, cos[block], -sin[block], scale=1.0 / scaling)
            values[:, :, block] = value_states
            # The block's own keys are used as the model rotated them; the stored ones are rotated at stream index -
            # base, so every natural distance is t - j as in the stepwise cache.
            stored_keys = rotate_keys(keys[:, :, : self.first], cos[: self.first], sin[: self.first], scale=scaling)
            natural_keys = torch.cat((stored_keys, key_states), 2)
        copies = len(self.plan.copy_sources)
        if copies == 0:
            return natural_keys, values[:, :, :end]
        sources = torch.from_numpy(self.plan.copy_sources).to(keys.device)
        if self._copy_angles is None:
            copy_positions = torch.from_numpy(self.plan.copy_positions).to(keys.device)
            self._copy_angles = stepper.geometry.cos_sin(copy_positions, keys.device)
        cos, sin = self._copy_angles
        copy_keys = rotate_keys(keys.index_select(2, sources), cos, sin, scale=stepper.geometry.attention_scaling)
        copy_values = values.index_select(2, sources)
        return torch.cat((natural_keys, copy_keys), 2), torch.cat((values[:, :, :end], copy_values), 2)

    def _angles(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stored_angles is None:
            positions = torch.from_numpy(self.stepper.stored_tokens - self.base).to(device)
            self._stored_angles = self.stepper.geometry.cos_sin(positions, device)
        return self._stored_angles


def recompute_blocks(model: Any, ids: torch.Tensor, cap: int, chunk: int,
                     steps: Sequence[int]) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(steps, logits [len(steps), vocab]) of the sliding-window recompute baseline for the given ascending `steps`.

    Step t's logits are the model's, run without cache on its window ids[max(0, t - cap + 1) : t + 1] (positions from
    0), as `RecomputeStepper` does. Windows that start at the first token are prefixes of one causal sequence, so
    they come from dense blocks; the full windows come `chunk // cap` (at least one) to a batched forward.
    """
    prefix_steps = [t for t in steps if t < cap]
    if prefix_steps:
        dense = BlockStepper(model, None)
        for first in range(0, prefix_steps[-1] + 1, chunk):
            last = min(first + chunk, prefix_steps[-1] + 1)
            logits = dense.forward_block(ids[:, first:last])
            wanted = [t for t in prefix_steps if first <= t < last]
            if wanted:
                yield wanted, logits[[t - first for t in wanted]]
    full_steps = [t for t in steps if t >= cap]
    windows_per_forward = max(1, chunk // cap)
    for index in range(0, len(full_steps), windows_per_forward):
        batch = full_steps[index : index + windows_per_forward]
        windows = torch.stack([ids[0, t - cap + 1 : t + 1] for t in batch])
        yield batch, model(input_ids=windows, use_cache=False, logits_to_keep=1).logits[:, -1]
