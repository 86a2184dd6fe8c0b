"""The eviction policy of StreamingLLM with Lazy Pruning, as pure integer logic.

`CompactionSchedule` decides, after each step, whether the cache is compacted and which slots it keeps. It never touches
a tensor: the cache layers apply its plans, and `simulate_spans` runs it alone to derive windows and check traces.
"""

from __future__ import annotations

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
