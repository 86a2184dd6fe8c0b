"""The kv_len traces the knobs produce, against the definitions: literal traces for small cases, an independent
re-statement of the rules for many cases, the cap budget, and the same traces measured through a model."""

from __future__ import annotations

import itertools

import pytest

from streaming_llm import CompactionSchedule, RunConfig, StreamingPolicy, evaluate, simulate_spans
from streaming_llm.policy import evenly_spaced, peak_span


def test_strict_and_lazy_sawtooth_literal():
    # S=1, W=2: C=3. Strict (R=1) attends C+1 and falls back to C every step.
    assert simulate_spans(StreamingPolicy(sink=1, window=2, compress_every=1), 8) == [1, 2, 3, 4, 4, 4, 4, 4]
    # Lazy R=2: grows to C+R=5, compacts back to C=3, period R.
    assert simulate_spans(StreamingPolicy(sink=1, window=2, compress_every=2), 9) == [1, 2, 3, 4, 5, 4, 5, 4, 5]


def test_staged_eviction_literal_with_cooldown_and_emergency():
    # S=1, W=3: C=4; slack 3: H=7; R=2: safe = H-(R-1) = 6 >= C; max_drop 1.
    policy = StreamingPolicy(sink=1, window=3, slack=3, compress_every=2, max_drop=1)
    # step 6: L-C=2>=R -> min(max(6-1,4),6)=5, cooldown 2 (L=6,7 no emergency since 7 <= H); step 9: L=8, due ->
    # min(7,6)=6, cooldown 2: 7, then 8 > H -> emergency to 6, which starts a new cooldown: 7, 8 -> 6, ...
    assert simulate_spans(policy, 17) == [1, 2, 3, 4, 5, 6, 6, 7, 8, 7, 8, 7, 8, 7, 8, 7, 8]


def test_staged_eviction_without_safe_room_behaves_as_plain_lazy():
    # safe = C + slack - (R - 1) = C + 2 - 7 < C: max_drop changes nothing, as in the study.
    staged = StreamingPolicy(sink=2, window=10, slack=2, compress_every=8, max_drop=3)
    plain = StreamingPolicy(sink=2, window=10, slack=2, compress_every=8, max_drop=0)
    assert not staged.staged
    assert simulate_spans(staged, 200) == simulate_spans(plain, 200)


def test_refresh_keeps_evenly_spaced_evicted_tokens_between_sinks_and_recent():
    schedule = CompactionSchedule(StreamingPolicy(sink=1, window=2, refresh=2, compress_every=1))  # C = 5
    tokens: list[int] = []
    history = []
    for token in range(9):
        tokens.append(token)
        plan = schedule.step(len(tokens))
        if plan is not None:
            tokens = [tokens[slot] for slot in plan.kept_slots]
            history.append(list(tokens))
    # First compaction at L=6: evicted span is slots 1..3 (tokens 1,2,3): keep the middles of 2 halves: 1 and 3.
    assert history[0] == [0, 1, 3, 4, 5]
    # Next: span holds tokens 1,3,4 -> 1 and 4; then 1,4,5 -> 1 and 5 ...
    assert history[1] == [0, 1, 4, 5, 6]
    assert history[2] == [0, 1, 5, 6, 7]
    assert evenly_spaced(range(10, 20), 5) == (11, 13, 15, 17, 19)
    assert evenly_spaced(range(3), 5) == (0, 1, 2)


def reference_spans(sink, window, overlap, refresh, slack, compress_every, max_drop, steps):
    """The rules of the issue, restated independently of streaming_llm.policy."""
    capacity = sink + window + overlap + refresh
    hard = capacity + slack
    safe = hard - (compress_every - 1)
    staged = max_drop > 0 and safe >= capacity
    length, cooldown, spans, events = 0, 0, [], []
    for step in range(steps):
        length += 1
        spans.append(length)
        if not staged:
            if length - capacity >= compress_every:
                events.append((step, length, capacity, "plain"))
                length = capacity
            continue
        cooling = cooldown > 0
        cooldown = max(cooldown - 1, 0)
        if (cooling and length > hard) or (not cooling and length - capacity >= compress_every):
            target = min(max(length - max_drop, capacity), safe)
            events.append((step, length, target, "emergency" if cooling else "staged"))
            length = target
            cooldown = compress_every
    return spans, events


KNOB_GRID = list(itertools.product([0, 4], [8, 21], [0, 3], [0, 2], [0, 5, 16], [1, 4, 9], [0, 2, 6]))


@pytest.mark.parametrize("sink, window, overlap, refresh, slack, compress_every, max_drop", KNOB_GRID)
def test_trace_follows_the_definitions(sink, window, overlap, refresh, slack, compress_every, max_drop):
    policy = StreamingPolicy(sink, window, overlap, refresh, slack, compress_every, max_drop)
    expected, events = reference_spans(sink, window, overlap, refresh, slack, compress_every, max_drop, 300)
    assert simulate_spans(policy, 300) == expected
    capacity = policy.soft_capacity
    if not policy.staged:
        # The sawtooth: peaks at C + R, period R, one compaction per R steps once full.
        assert max(expected) == capacity + compress_every
        assert all(before == capacity + compress_every and after == capacity for _, before, after, _ in events)
        assert len(events) == (300 - capacity) // compress_every
    else:
        assert all(capacity <= after <= policy.safe_target for _, _, after, _ in events)
        # Never two compactions within a cooldown unless the second is an emergency; never back to back normally.
        for (earlier, *_), (later, _, _, kind) in itertools.pairwise(events):
            assert later - earlier > compress_every or kind == "emergency"
            assert later - earlier >= compress_every
        assert max(expected) <= policy.hard_capacity + 1  # an emergency fires as soon as H is passed


@pytest.mark.parametrize("cap", [16, 40, 100, 257])
@pytest.mark.parametrize("knobs", [
    dict(sink=4, compress_every=1), dict(sink=4, compress_every=16), dict(sink=0, compress_every=8, overlap=3),
    dict(sink=2, compress_every=4, slack=8, max_drop=2), dict(sink=4, compress_every=8, refresh=2,
                                                               refresh_policy="middle", slack=12, max_drop=5),
])
@pytest.mark.parametrize("prefill", [0, 10])
def test_cap_mode_peak_never_exceeds_cap_and_is_the_largest_such_window(cap, knobs, prefill):
    plain = {k: v for k, v in knobs.items() if k != "refresh_policy"}
    if peak_span(StreamingPolicy(window=1, **plain), prefill) > cap:
        with pytest.raises(ValueError, match="cap_mode peak: even window = 1 peaks at"):
            RunConfig(method="streaming", cap=cap, cap_mode="peak", prefill=prefill, **knobs)
        return
    config = RunConfig(method="streaming", cap=cap, cap_mode="peak", prefill=prefill, **knobs)
    policy = config.policy
    assert peak_span(policy, prefill) <= cap
    assert max(simulate_spans(policy, 5000, prefill)) <= cap  # far past the derivation's horizon
    wider = StreamingPolicy(**{**policy.__dict__, "window": policy.window + 1})
    assert peak_span(wider, prefill) > cap


def test_cap_mode_soft_reproduces_the_study_and_can_exceed_cap():
    config = RunConfig(method="streaming", cap=256, cap_mode="soft", sink=4, slack=16, overlap=2, refresh=2,
                       refresh_policy="middle", compress_every=64)
    assert config.policy.window == 256 - 4 - 16 - 2 - 2
    assert peak_span(config.policy) > 256  # lazy pruning overshoots the soft budget by up to R


@pytest.mark.parametrize("knobs", [
    dict(sink=4, window=20, compress_every=1),
    dict(sink=4, window=20, compress_every=6, prefill=40),
    dict(sink=2, window=12, compress_every=5, slack=9, max_drop=2),
    dict(sink=1, window=10, compress_every=3, refresh=3, refresh_policy="middle", overlap=2),
])
def test_measured_trace_equals_the_schedule(tiny_models, knobs):
    config = RunConfig(model="tiny-llama", method="streaming", max_tokens=200, device="cpu",
                       attn_implementation="eager", **knobs)
    result = evaluate(config, loaded=tiny_models["tiny-llama"])
    tokens = result.tokens.to_pydict()
    decode = [span for span, prefill in zip(tokens["kv_len"], tokens["prefill"], strict=True) if not prefill]
    prefill = knobs.get("prefill", 0)
    assert decode == simulate_spans(config.policy, len(decode), prefill)
    compactions = result.compactions.to_pydict()
    decode_events = [i for i, step in enumerate(compactions["step"]) if step >= prefill]
    assert sum(tokens["compacted"]) == len(decode_events)
    assert result.summary["compaction_count"] == len(compactions["step"])
    assert all(after < before for before, after in zip(
        compactions["kv_len_before"], compactions["kv_len_after"], strict=True))
