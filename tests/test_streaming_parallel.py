"""The parallel protocol against the stepwise one: equal NLLs (float32, within 1e-5 on tiny models) and identical
per-step kv_len / compacted / evicted / position, for every policy kind, rope mode, prefill and chunk boundary; the
block primitive's rewind and cache contents against StreamingCache; bounded storage however long the stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streaming_llm import CompactionSchedule, LoadedModel, RunConfig, StreamingCache, evaluate
from streaming_llm.parallel import BlockStepper
from streaming_llm.rope import RotaryGeometry
from tests.conftest import TEST_DEVICE, TINY_MODELS

EXACT_COLUMNS = ("step", "position", "token_id", "target_id", "kv_len", "compacted", "evicted", "prefill")

# Each policy kind of the engine, with a chunk that puts block boundaries inside and across its compactions.
POLICIES = {
    "strict": (dict(sink=4, window=24, compress_every=1), 7),
    "lazy": (dict(sink=4, window=20, compress_every=8), 13),
    # R = 2, slack 3, max_drop 1: staged drops, cooldowns and emergencies (see test_streaming_policy's literal trace).
    "staged": (dict(sink=1, window=12, slack=3, compress_every=2, max_drop=1), 16),
    "overlap": (dict(sink=4, window=16, overlap=5, compress_every=4), 32),
    "refresh": (dict(sink=2, window=16, compress_every=4, refresh=3, refresh_policy="middle"), 9),
    "window_only": (dict(sink=0, window=20, compress_every=5), 64),
}


def run(loaded, **knobs):
    config = RunConfig(model=loaded.name, attn_implementation="eager", device=TEST_DEVICE, **knobs)
    return evaluate(config, loaded=loaded)


def assert_same_rows(parallel, stepwise, atol: float) -> None:
    for column in EXACT_COLUMNS:
        assert parallel.tokens.column(column).to_pylist() == stepwise.tokens.column(column).to_pylist(), column
    np.testing.assert_allclose(
        parallel.tokens.column("nll").to_numpy(), stepwise.tokens.column("nll").to_numpy(), rtol=0, atol=atol
    )
    events = ("step", "kv_len_before", "kv_len_after", "evicted")
    assert parallel.compactions.select(events).to_pylist() == stepwise.compactions.select(events).to_pylist()
    assert parallel.tokens.column("latency_ms").null_count == parallel.tokens.num_rows


@pytest.mark.parametrize("model", TINY_MODELS)
@pytest.mark.parametrize("rope_mode", ["realign", "exact", "absolute"])
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("prefill", [0, 37])
def test_parallel_streaming_equals_stepwise(tiny_models, model, rope_mode, policy, prefill):
    knobs, chunk = POLICIES[policy]
    common = dict(method="streaming", rope_mode=rope_mode, max_tokens=220, prefill=prefill, **knobs)
    stepwise = run(tiny_models[model], **common)
    parallel = run(tiny_models[model], protocol="parallel", chunk=chunk, **common)
    assert stepwise.summary["compaction_count"] >= 10
    assert_same_rows(parallel, stepwise, atol=1e-5)


def test_staged_case_has_emergencies_and_cooldowns(tiny_models):
    """The staged policy above compacts inside cooldowns (emergencies): the parallel path is tested on those too."""
    knobs, _ = POLICIES["staged"]
    config = RunConfig(model="tiny-llama", method="streaming", protocol="parallel", max_tokens=120, **knobs)
    result = evaluate(config, loaded=tiny_models["tiny-llama"])
    schedule, emergencies = CompactionSchedule(config.policy), 0
    for span in result.tokens.column("kv_len").to_pylist():
        cooling = schedule._cooldown > 0
        compacted = schedule.step(span) is not None
        emergencies += cooling and compacted
    assert emergencies >= 5
    assert len(set(result.compactions.column("kv_len_after").to_pylist())) >= 2  # staged targets, not one C


@pytest.mark.parametrize("model", TINY_MODELS)
@pytest.mark.parametrize("knobs", [
    dict(method="dense"), dict(method="dense", prefill=37),
    dict(method="recompute", cap=40), dict(method="recompute", cap=40, prefill=30),
])
@pytest.mark.parametrize("chunk", [16, 100])
def test_parallel_dense_and_recompute_equal_stepwise(tiny_models, model, knobs, chunk):
    stepwise = run(tiny_models[model], max_tokens=200, **knobs)
    parallel = run(tiny_models[model], max_tokens=200, protocol="parallel", chunk=chunk, **knobs)
    assert_same_rows(parallel, stepwise, atol=1e-5)


def test_strided_recompute_scores_exactly_the_steps_it_names(tiny_models):
    loaded = tiny_models["tiny-neox"]
    full = run(loaded, method="recompute", cap=30, max_tokens=150, protocol="parallel", chunk=64)
    strided = run(loaded, method="recompute", cap=30, max_tokens=150, protocol="parallel", chunk=64, score_stride=7)
    steps = strided.tokens.column("step").to_pylist()
    assert steps == list(range(0, 149, 7))
    every = dict(zip(full.tokens.column("step").to_pylist(), full.tokens.column("nll").to_pylist(), strict=True))
    np.testing.assert_allclose(strided.tokens.column("nll").to_numpy(), [every[s] for s in steps], rtol=0, atol=1e-5)
    # Elsewhere the knob means nothing, and is normalised away.
    assert RunConfig(method="recompute", cap=30, score_stride=7).score_stride == 1
    assert RunConfig(method="streaming", cap=30, protocol="parallel", score_stride=7).score_stride == 1


def test_parallel_summary_reports_throughput_never_latency(tiny_models):
    result = run(tiny_models["tiny-llama"], method="streaming", sink=4, window=24, max_tokens=100,
                 protocol="parallel", chunk=32)
    assert result.summary["protocol"] == "parallel"
    for name in ("tpot_ms_mean", "tpot_ms_median", "tpot_ms_p95", "prefill_ms", "compaction_ms_total"):
        assert result.summary[name] is None, name
    assert result.summary["eval_tokens_per_s"] > 0
    assert result.compactions.column("compaction_ms").null_count == result.compactions.num_rows


def test_protocol_knobs_are_normalised():
    stepwise = RunConfig(method="dense", chunk=64)
    assert stepwise.chunk == RunConfig(method="dense").chunk and stepwise.run_hash == RunConfig(method="dense").run_hash
    parallel = RunConfig(method="dense", protocol="parallel", warmup=3)
    assert parallel.run_hash == RunConfig(method="dense", protocol="parallel").run_hash
    assert parallel.run_hash != RunConfig(method="dense").run_hash  # a different computation, another identity
    assert RunConfig(method="dense", protocol="parallel", chunk=64).run_hash != parallel.run_hash
    # One setting, whatever the protocol, sample, repeat and stream length: quality and timing join on it.
    assert parallel.setting_hash == RunConfig(method="dense", sample=3, repeat=2, max_tokens=4096).setting_hash
    assert parallel.setting_hash != RunConfig(method="dense", dtype="bfloat16").setting_hash
    # Parallel runs time nothing: a warmup longer than the stream is no error there.
    RunConfig(method="dense", protocol="parallel", max_tokens=4)
    with pytest.raises(ValueError, match="chunk = 0 < 1"):
        RunConfig(method="dense", protocol="parallel", chunk=0)


def stepwise_cache(loaded: LoadedModel, config: RunConfig, ids: torch.Tensor) -> StreamingCache:
    model = loaded.model
    cache = StreamingCache(config.policy, RotaryGeometry.of(model), model.config.num_hidden_layers, config.rope_mode)
    with torch.inference_mode():
        for step in range(ids.shape[-1]):
            model(input_ids=ids[:, step : step + 1], position_ids=cache.next_positions(1, ids.device), cache=cache,
                  use_cache=True)
            cache.compact_pending()
    return cache


def block_stepper(loaded: LoadedModel, config: RunConfig) -> BlockStepper:
    return BlockStepper(loaded.model, config.policy, config.rope_mode)


@pytest.mark.parametrize("model", TINY_MODELS)
@pytest.mark.parametrize("rope_mode", ["realign", "absolute"])
def test_block_cache_contents_equal_streaming_cache_slot_for_slot(tiny_models, model, rope_mode):
    loaded = tiny_models[model]
    config = RunConfig(model=model, method="streaming", sink=3, window=20, compress_every=6, refresh=2,
                       refresh_policy="middle", rope_mode=rope_mode)
    ids = torch.randint(0, 256, (1, 150), generator=torch.Generator().manual_seed(0)).to(loaded.device)
    cache = stepwise_cache(loaded, config, ids)
    stepper = block_stepper(loaded, config)
    with torch.inference_mode():
        for first in range(0, 150, 23):
            stepper.forward_block(ids[:, first : first + 23])
    contents = stepper.cache_contents()
    length = cache.layers[0].length
    assert len(contents) == len(cache.layers) and contents[0][0].shape[2] == length
    for (keys, values), layer in zip(contents, cache.layers, strict=True):
        torch.testing.assert_close(keys, layer.keys[:, :, :length], rtol=0, atol=1e-5)
        torch.testing.assert_close(values, layer.values[:, :, :length], rtol=0, atol=1e-5)


@pytest.mark.parametrize("policy", ["strict", "staged", "refresh"])
def test_rewind_equals_never_having_fed_the_rejected_tokens(tiny_models, policy):
    """A block of 9, rewound by 5, is the block of 4: kept tokens, schedule (cooldown), trace and what follows."""
    loaded = tiny_models["tiny-llama"]
    knobs, _ = POLICIES[policy]
    config = RunConfig(model="tiny-llama", method="streaming", **knobs)
    ids = torch.randint(0, 256, (1, 120), generator=torch.Generator().manual_seed(1)).to(loaded.device)
    with torch.inference_mode():
        for start in range(40, 100, 9):
            rewound, straight = block_stepper(loaded, config), block_stepper(loaded, config)
            for stepper in (rewound, straight):
                stepper.forward_block(ids[:, :start])
            rewound.forward_block(ids[:, start : start + 9])
            rewound.rewind(5)
            straight.forward_block(ids[:, start : start + 4])
            assert rewound.kept_tokens() == straight.kept_tokens()
            assert rewound.trace == straight.trace
            follow_rewound = rewound.forward_block(ids[:, start + 4 : start + 20])
            follow_straight = straight.forward_block(ids[:, start + 4 : start + 20])
            torch.testing.assert_close(follow_rewound, follow_straight, rtol=0, atol=1e-5)
            assert rewound.trace == straight.trace
    with pytest.raises(ValueError, match="rewind"):
        rewound.rewind(16)


def test_storage_stays_bounded_however_long_the_stream(tiny_models):
    """Streams of any length keep the storage at the policy's span plus one block (and the evicted entries it may
    hold before dropping them): memory does not grow."""
    loaded = tiny_models["tiny-neox"]
    config = RunConfig(model="tiny-neox", method="streaming", sink=4, window=32, compress_every=8)
    stepper = block_stepper(loaded, config)
    ids = torch.randint(0, 256, (1, 3000), generator=torch.Generator().manual_seed(2)).to(loaded.device)
    capacities = []
    with torch.inference_mode():
        for first in range(0, 3000, 50):
            stepper.forward_block(ids[:, first : first + 50])
            capacities.append((stepper.keys.shape[3], stepper.rotated.shape[3], stepper.values.shape[3]))
    entries = config.policy.hard_capacity + config.compress_every + 50 + stepper.stale_limit
    copies = (config.sink + config.refresh) * 50  # at most one copy of each anchored entry per query
    assert capacities[5] == capacities[-1]
    assert capacities[-1][0] <= 2 * entries and max(capacities[-1][1:]) <= 2 * (entries + copies)


def test_embedded_model_parallel_equals_stepwise_for_strict_and_lazy():
    """SmolLM2-135M in float32 (sdpa): parallel NLLs within 1e-4 of stepwise for strict and lazy pruning."""
    loaded = LoadedModel.load(RunConfig(method="dense", device="cpu"))
    for compress_every in (1, 16):
        common = dict(method="streaming", sink=4, cap=64, compress_every=compress_every, max_tokens=200, prefill=24,
                      device="cpu")
        stepwise = evaluate(RunConfig(**common), loaded=loaded)
        parallel = evaluate(RunConfig(protocol="parallel", chunk=48, **common), loaded=loaded)
        assert stepwise.summary["compaction_count"] >= 8
        assert_same_rows(parallel, stepwise, atol=1e-4)


@pytest.mark.parametrize(("rope_mode", "knobs"), [
    ("realign", dict(sink=2, window=16, compress_every=4, refresh=2, refresh_policy="middle")),
    ("absolute", dict(sink=2, window=16, compress_every=4, refresh=2, refresh_policy="middle")),
    ("realign", dict(sink=2, window=16, slack=8, compress_every=6, max_drop=2)),  # staged: the schedule has a cooldown
])
def test_a_failed_block_leaves_the_state_as_before_it(tiny_models, rope_mode, knobs):
    """A forward that dies half-way through the layers (out of memory, an interrupt) changes nothing: a longer block
    from the same token on gives what a stepper that never failed gives, and so does everything after it."""
    loaded = tiny_models["tiny-llama"]
    config = RunConfig(model="tiny-llama", method="streaming", rope_mode=rope_mode, **knobs)
    ids = torch.randint(0, 256, (1, 90), generator=torch.Generator().manual_seed(3)).to(loaded.device)
    failing, straight = block_stepper(loaded, config), block_stepper(loaded, config)

    def die(*args):
        raise RuntimeError("out of memory (simulated)")

    with torch.inference_mode():
        for stepper in (failing, straight):
            stepper.forward_block(ids[:, :30])
        hook = loaded.model.model.layers[1].register_forward_hook(die)  # layer 0 has written its entries by then
        try:
            with pytest.raises(RuntimeError, match="simulated"):
                failing.forward_block(ids[:, 30:32])
        finally:
            hook.remove()
        for first, last in ((30, 57), (57, 90)):
            torch.testing.assert_close(failing.forward_block(ids[:, first:last]),
                                       straight.forward_block(ids[:, first:last]), rtol=0, atol=1e-6)
            assert failing.kept_tokens() == straight.kept_tokens()
            assert failing.trace == straight.trace
