"""The eviction policy of StreamingLLM with Lazy Pruning, as pure integer logic.

`CompactionSchedule` decides, after each step, whether the cache is compacted and which slots it keeps. It never touches
a tensor: the cache layers apply its plans, and `simulate_spans` runs it alone to derive windows and check traces.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass


@dataclass(frozen=True)
class StreamingPolicy:
    """The knobs of the study, resolved (the window is set, not derived).

    Args:
        sink: S, the first tokens of the stream kept forever (attention sinks). 0 gives window attention.
        window: W, recent tokens kept after a compaction (besides `overlap`).
        overlap: O, extra recent tokens kept, so the recent part is W + O. Default 0.
        refresh: B, tokens re-selected at each compaction from the span being evicted, placed between the sinks and the
            recent tokens in their original order. Default 0.
        slack: sigma, room above the soft capacity; hard capacity H = C + slack. Default 0.
        compress_every: R, the cache is compacted once it has grown R past the soft capacity. R = 1 is strict
            StreamingLLM, R > 1 is Lazy Pruning. Default 1.
        max_drop: delta, staged eviction: drop at most this many tokens per compaction (0 = back to C). Default 0.
    """

    sink: int
    window: int
    overlap: int = 0
    refresh: int = 0
    slack: int = 0
    compress_every: int = 1
    max_drop: int = 0

    @property
    def soft_capacity(self) -> int:
        """C = S + W + O + B: the length a plain compaction returns to."""
        return self.sink + self.window + self.overlap + self.refresh

    @property
    def hard_capacity(self) -> int:
        """H = C + slack: above it, staged eviction compacts even during a cooldown."""
        return self.soft_capacity + self.slack

    @property
    def safe_target(self) -> int:
        """The longest length that can absorb R - 1 more tokens without passing H."""
        return self.hard_capacity - (self.compress_every - 1)

    @property
    def staged(self) -> bool:
        """Staged eviction is active only when max_drop > 0 and the safe target is at least C."""
        return self.max_drop > 0 and self.safe_target >= self.soft_capacity


@dataclass(frozen=True)
class CompactionPlan:
    """Which slots survive a compaction, in their new order, and where they came from."""

    length_before: int
    kept_slots: tuple[int, ...]

    @property
    def length_after(self) -> int:
        return len(self.kept_slots)

    @property
    def evicted(self) -> int:
        return self.length_before - self.length_after


class CompactionSchedule:
    """Decides compactions step by step. One instance follows one stream; `step()` is called once per forward."""

    def __init__(self, policy: StreamingPolicy):
        self.policy = policy
        self._cooldown = 0

    def target_length(self, length: int) -> int | None:
        """The length to compact to after a step that left `length` entries, or None to keep them all.

        Staged eviction: a due compaction goes to min(max(L - max_drop, C), safe) and starts a cooldown of R steps,
        during which only an emergency (L > H) compacts, to the same target, starting a new cooldown. Advances the
        cooldown, so call it exactly once per step.
        """
        p = self.policy
        capacity = p.soft_capacity
        if not p.staged:
            return capacity if length - capacity >= p.compress_every else None
        in_cooldown = self._cooldown > 0
        if in_cooldown:
            self._cooldown -= 1
        due = length > p.hard_capacity if in_cooldown else length - capacity >= p.compress_every
        if not due:
            return None
        target = min(max(length - p.max_drop, capacity), p.safe_target)
        # Every compaction starts a cooldown, an emergency one too: otherwise a compaction to `safe` would pass H on
        # the cooldown's last step and the normal rule would fire again on the very next one (back-to-back).
        self._cooldown = p.compress_every
        return target

    def plan(self, length: int, target: int) -> CompactionPlan:
        """Keep the S sinks, B refresh tokens evenly spaced over the evicted span, and the newest entries."""
        p = self.policy
        recent = target - p.sink - p.refresh
        sinks = range(min(p.sink, length))
        evicted_span = range(p.sink, length - recent)
        refreshed = evenly_spaced(evicted_span, p.refresh)
        newest = range(length - recent, length)
        return CompactionPlan(length_before=length, kept_slots=(*sinks, *refreshed, *newest))

    def kept_runs(self, length: int, target: int) -> tuple[tuple[int, int], ...]:
        """`plan(length, target).kept_slots` as maximal runs of consecutive slots [start, stop), without building it.

        Canonical: two plans keep the same slots exactly when their runs are equal.
        """
        p = self.policy
        recent = target - p.sink - p.refresh
        pieces = [(0, min(p.sink, length))]
        pieces += [(slot, slot + 1) for slot in evenly_spaced(range(p.sink, length - recent), p.refresh)]
        pieces.append((length - recent, length))
        runs: list[tuple[int, int]] = []
        for start, stop in pieces:
            if start >= stop:
                continue
            if runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], stop)
            else:
                runs.append((start, stop))
        return tuple(runs)

    def step(self, length: int) -> CompactionPlan | None:
        """The compaction due after a step that left `length` entries, if any."""
        target = self.target_length(length)
        return None if target is None else self.plan(length, target)


def evenly_spaced(span: range, count: int) -> tuple[int, ...]:
    """`count` members of `span`, one from the middle of each of `count` equal parts (all of it if it is shorter)."""
    n = len(span)
    if count >= n:
        return tuple(span)
    return tuple(span[(2 * i + 1) * n // (2 * count)] for i in range(count))


def simulate_spans(policy: StreamingPolicy, steps: int, prefill: int = 0) -> list[int]:
    """The attention span (cache length after the append) of every decode step, without running a model.

    A prefill of `prefill` tokens is one step that adds them all; its span is not part of the returned list.
    """
    schedule = CompactionSchedule(policy)
    length = 0
    if prefill:
        length = prefill
        target = schedule.target_length(length)
        length = length if target is None else target
    spans = []
    for _ in range(steps):
        length += 1
        spans.append(length)
        target = schedule.target_length(length)
        if target is not None:
            length = target
    return spans


def peak_span(policy: StreamingPolicy, prefill: int = 0) -> int:
    """The largest attention span the policy ever reaches, prefill included.

    The schedule is periodic once the cache has filled, so a horizon of a few fills and cooldowns covers every state.
    """
    horizon = 4 * (policy.hard_capacity + policy.compress_every + policy.max_drop) + 64
    return max([prefill, *simulate_spans(policy, horizon, prefill)])


def schedule_fingerprint(policy: StreamingPolicy, tokens: int, prefill: int = 0) -> str:
    """A hash of the kept token indices at every step of a stream of `tokens` tokens (the first `prefill` in one step).

    Two policies with equal fingerprints hold the same tokens in the same slots at every step, so a model computes the
    same thing under both. The cache starts empty and each step appends, so the state at every step follows from the
    compactions alone: each is hashed as (steps since the previous one, length before, kept runs of slots), never as a
    full kept list, and a repeat of the previous compaction only bumps a count. A 20k-token stream at cap 2048 takes
    milliseconds.
    """
    schedule = CompactionSchedule(policy)
    digest = hashlib.sha256(f"schedule v1: tokens {tokens}, prefill {prefill};".encode())
    runs_of: dict[tuple[int, int], tuple[int, ...]] = {}
    record: tuple[int, ...] = ()
    repeats = 0
    previous_step = -1
    # As evaluate() steps: the prefill forward (its compaction belongs to step prefill - 1), then one token per step
    # up to the last token fed, tokens - 2.
    length = prefill
    step = prefill - 1 if prefill else prefill
    last_step = tokens - 2
    if not prefill:
        length = 1
    while step <= last_step:
        target = schedule.target_length(length)
        if target is not None:
            runs = runs_of.get((length, target))
            if runs is None:
                kept = schedule.kept_runs(length, target)
                runs = runs_of[(length, target)] = (length, len(kept), *(b for run in kept for b in run))
            if runs != (length, 1, 0, length):  # a plan keeping every slot changes nothing (the schedule makes none)
                current = (step - previous_step, *runs)
                if current == record:
                    repeats += 1
                else:
                    _hash_record(digest, record, repeats)
                    record, repeats = current, 1
                previous_step = step
            length = target
        elif not policy.staged:
            # Without staged eviction the schedule keeps no state: jump to the step that reaches C + R.
            advance = min(policy.soft_capacity + policy.compress_every - length, last_step - step)
            step += advance
            length += advance
            if advance > 0:
                continue
        step += 1
        length += 1
    _hash_record(digest, record, repeats)
    return digest.hexdigest()[:16]


def _hash_record(digest, record: tuple[int, ...], repeats: int) -> None:
    if repeats:
        digest.update(array("q", [repeats, len(record), *record]))
