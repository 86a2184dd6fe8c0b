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


STALE_LIMIT = 64  # evicted entries a BlockStepper's storage may hold before it drops them


class BlockStepper:
    """Feeds blocks of tokens through the model exactly as if they were fed one at a time under the run's policy.

    `policy` None is dense attention (DynamicCache's positions 0, 1, 2, ...). Stored entries live in one preallocated
    storage per stepper ([layers, batch, kv_heads, capacity, head_dim]). In `absolute` and dense, `keys` holds them as
    the model rotated them at their stream index (positions never change there). In `realign` / `exact`, `keys` holds
    them before RoPE and `rotated` as the model rotated them at stream index - `base`: every recent entry's distance
    to a query is then t - j without rotating anything per block, and each anchored copy is rotated from its pre-RoPE
    key. The base moves to the block's first token once it lags by more than H + R (at least the policy's largest
    span), and `rotated`
    is re-derived from the pre-RoPE keys (one rotation every span's worth of tokens), so that angles stay as small as
    the stepwise path's. The anchored copies a block needs are written after its entries in `rotated` / `values`, so
    that attention reads one view of each, never a concatenation.
    """

    def __init__(self, model: Any, policy: StreamingPolicy | None, rope_mode: str = "realign"):
        self.model = model
        self.policy = policy
        self.relative = policy is not None and rope_mode in ("realign", "exact")
        self.geometry = RotaryGeometry.of(model) if self.relative else None
        self.schedule = CompactionSchedule(policy) if policy is not None else None
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.rotated: torch.Tensor | None = None  # realign / exact: the keys rotated at stream index - base
        self.base = 0  # realign / exact: the rotary base of `rotated`
        # realign / exact: how far the base may lag the block's first token (every query then sits within twice the
        # policy's largest span of it, as the stepwise cache's slots do)
        self.rebase_lag = policy.hard_capacity + policy.compress_every if self.relative else 0
        # Evicted entries may stay in the storage, unattended, until this many have gathered: a settle copies every
        # storage, which per small block (speculative verification) costs more than attending a few stale columns.
        self.stale_limit = STALE_LIMIT
        self.stored = 0  # entries in the storage: the kept ones, evicted ones not dropped yet, and the last block
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
        if self.stored - len(self.kept) > self.stale_limit:
            self._settle()
        count = input_ids.shape[-1]
        first = self.tokens_seen
        if self.relative and first - self.base > self.rebase_lag:
            self._rebase(first)
        base = self.base
        settled_tokens = self.stored_tokens
        self.stored_tokens = np.concatenate((settled_tokens, np.arange(first, first + count, dtype=np.int64)))
        try:
            plan = self._plan(count, base, one_step)
            mask = torch.zeros(plan.visible.shape, dtype=self.model.dtype, device=input_ids.device)
            mask.masked_fill_(torch.from_numpy(~plan.visible).to(input_ids.device), torch.finfo(self.model.dtype).min)
            positions = torch.arange(first - base, first - base + count, device=input_ids.device).unsqueeze(0)
            block_cache = _BlockCache(self, plan, base, count)
            block_cache.copy_anchored()
            out = self.model(
                input_ids=input_ids, position_ids=positions, attention_mask=mask[None, None], logits_to_keep=0,
                **cache_kwargs(block_cache),
            )
            block_cache.store_pre_rope()
        except BaseException:
            # A failed forward (out of memory, an interrupt) leaves the state as it was before the block: entries it
            # wrote lie beyond `stored`, unreferenced, the schedule is untouched (_plan steps a copy), and the block
            # can be fed again.
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
        storages = [storage for storage in (self.keys, self.rotated, self.values) if storage is not None]
        kept = [storage.index_select(3, index) for storage in storages]  # all gathered before any is written
        for storage, entries in zip(storages, kept, strict=True):
            storage[:, :, :, : len(self.kept)] = entries
        self.stored_tokens = self.stored_tokens[self.kept]
        self.stored = len(self.kept)
        self.kept = np.arange(self.stored, dtype=np.int64)
        self._last_block = None  # a rewind must not reach behind a settled state

    def _reserve(self, key_states: torch.Tensor, value_states: torch.Tensor, entries: int, columns: int) -> None:
        """Room for `entries` stored entries in every storage, and for `columns` (the entries, then the anchored
        copies) in the ones attention reads: `rotated` and `values` in realign / exact, `keys` and `values` else.
        `key_states` / `value_states` [batch, kv_heads, n, head_dim] give the shapes and dtype of a first storage."""
        read = ("rotated", "values") if self.relative else ("keys", "values")
        for name in ("keys", "rotated", "values"):
            if name == "rotated" and not self.relative:
                continue
            old = getattr(self, name)
            needed = columns if name in read else entries
            if old is not None and old.shape[3] >= needed:
                continue
            like = value_states if name == "values" else key_states
            capacity = max(needed, 2 * old.shape[3] if old is not None else needed)
            new = like.new_empty((self.model.config.num_hidden_layers, *like.shape[:2], capacity, like.shape[-1]))
            if old is not None:
                new[:, :, :, : self.stored] = old[:, :, :, : self.stored]
            setattr(self, name, new)

    def _rebase(self, base: int) -> None:
        """Move the rotary base to `base`: `rotated` re-derived from the pre-RoPE keys at stream index - base."""
        if self.keys is not None and self.stored:
            positions = torch.from_numpy(self.stored_tokens[: self.stored] - base).to(self.keys.device)
            rotated = self._rotate(self.keys[:, :, :, : self.stored], positions)
            self.rotated[:, :, :, : self.stored] = rotated
        self.base = base

    def _rotate(self, pre_rope: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self.geometry.cos_sin(positions, pre_rope.device)
        return rotate_keys(pre_rope, cos, sin, scale=self.geometry.attention_scaling)

    def _block_len(self) -> int:
        return 0 if self._last_block is None else len(self._last_block.trace)


class _BlockCache(Cache):
    """The Cache a block's forward sees: stores the block's entries, returns the key axis its mask was built for.

    In realign / exact the anchored copies and the block's pre-RoPE keys are written for every layer at once, before
    and after the forward (`copy_anchored`, `store_pre_rope`), except when a copy's source lies in the block itself
    (a refresh token chosen by a compaction inside the block): then each layer writes both in its update.
    """

    def __init__(self, stepper: BlockStepper, plan: BlockPlan, base: int, count: int):
        super().__init__(layers=[])
        self.stepper, self.plan, self.base, self.count = stepper, plan, base, count
        self.first = stepper.stored  # storage index of the block's first entry
        self.end = self.first + count
        self.columns = self.end + len(plan.copy_sources)
        self.per_layer = bool(len(plan.copy_sources)) and (
            stepper.keys is None or int(plan.copy_sources.max()) >= self.first
        )
        # cos / sin of the block's positions (its keys before RoPE) and of the anchored copies', for every layer
        self._block_angles: tuple[torch.Tensor, torch.Tensor] | None = None
        self._copy_angles: tuple[torch.Tensor, torch.Tensor] | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.first

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        stepper, end = self.stepper, self.end
        if layer_idx == 0:
            stepper._reserve(key_states, value_states, end, self.columns)
        keys, values = stepper.keys[layer_idx], stepper.values[layer_idx]
        block = slice(self.first, end)
        values[:, :, block] = value_states
        if not stepper.relative:
            keys[:, :, block] = key_states
            return keys[:, :, :end], values[:, :, :end]  # no copies: every distance is the true one
        # The block's keys as the model rotated them, at stream index - base like every stored entry of `rotated`:
        # every natural distance is t - j, as in the stepwise cache.
        rotated = stepper.rotated[layer_idx]
        rotated[:, :, block] = key_states
        if self.per_layer:
            keys[:, :, block] = self._unrotate(key_states)
            self._write_copies(keys, rotated, values)
        return rotated[:, :, : self.columns], values[:, :, : self.columns]

    def copy_anchored(self) -> None:
        """Before the forward: every layer's anchored copies, when all their sources are stored entries."""
        stepper = self.stepper
        if not stepper.relative or self.per_layer or self.columns == self.end:
            return
        stepper._reserve(stepper.keys[0], stepper.values[0], self.end, self.columns)
        with torch.inference_mode():
            self._write_copies(stepper.keys, stepper.rotated, stepper.values, dim=3)

    def store_pre_rope(self) -> None:
        """After the forward: the block's keys before RoPE, for every layer at once (unless each layer wrote its)."""
        stepper = self.stepper
        if not stepper.relative or self.per_layer:
            return
        block = slice(self.first, self.end)
        with torch.inference_mode():
            stepper.keys[:, :, :, block] = self._unrotate(stepper.rotated[:, :, :, block])

    def _unrotate(self, model_keys: torch.Tensor) -> torch.Tensor:
        """Keys the model rotated at the block's positions (stream index - base), before RoPE."""
        geometry, device = self.stepper.geometry, model_keys.device
        if self._block_angles is None:
            positions = torch.arange(self.count, device=device) + (self.stepper.tokens_seen - self.base)
            self._block_angles = geometry.cos_sin(positions, device)
        cos, sin = self._block_angles
        return rotate_keys(model_keys, cos, -sin, scale=1.0 / geometry.attention_scaling)

    def _write_copies(self, keys: torch.Tensor, rotated: torch.Tensor, values: torch.Tensor, dim: int = 2) -> None:
        """Columns [end, columns) of `rotated` / `values`: each copy's pre-RoPE key rotated at its position, and its
        value (one layer's storages, entries along `dim` 2, or all layers', along 3)."""
        geometry, device = self.stepper.geometry, keys.device
        sources = torch.from_numpy(self.plan.copy_sources).to(device)
        if self._copy_angles is None:
            copy_positions = torch.from_numpy(self.plan.copy_positions).to(device)
            self._copy_angles = geometry.cos_sin(copy_positions, device)
        cos, sin = self._copy_angles
        copies = slice(self.end, self.columns)
        rotated.narrow(dim, copies.start, copies.stop - copies.start).copy_(
            rotate_keys(keys.index_select(dim, sources), cos, sin, scale=geometry.attention_scaling))
        values.narrow(dim, copies.start, copies.stop - copies.start).copy_(values.index_select(dim, sources))


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
