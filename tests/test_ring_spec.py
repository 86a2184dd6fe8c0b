"""The ring layout verifying prompt-lookup drafts (steppers.RingBlockTarget): greedy ids equal to eager greedy decoding
(compact and ring, spec none), per-token NLLs within 1e-4 of the compact cache's prompt-lookup run and identical
kv_len / compaction traces, for every policy kind and RoPE mode, with compactions inside verified blocks, drafts
accepted and rejected; one block shape, so a compiled verification never recompiles after warm-up across 20+
compactions; a stream starting at index 200,000; the knobs' refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import streaming_llm.generate as generate_module
from streaming_llm import ConfigError, LoadedModel, RunConfig, evaluate
from streaming_llm.steppers import RingBlockTarget, StepwiseTarget, make_target
from streaming_llm.storage import RingBlockStorage
from tests.conftest import TEST_DEVICE
from tests.test_ring_layout import POLICIES as RING_POLICIES
from tests.test_ring_layout import ROPE_MODES

TOLERANCE = 1e-4  # float32, the bound; measured ~2e-6 (summation order over the ring, float64 angles)
NUM_DRAFT = 4

POLICIES = {
    "strict": dict(sink=4, window=20),
    "lazy_long": dict(sink=4, window=16, compress_every=6),  # R > k: compactions fall inside some blocks
    "lazy_short": dict(sink=4, window=16, compress_every=3),  # R < k + 1: a block can cross two
    # the stepwise ring tests' own policies (staged with emergencies, overlap, refresh, window-only)
    **{name: RING_POLICIES[name] for name in ("staged_emergencies", "overlap", "refresh", "window_only")},
}


def knobs(loaded: LoadedModel, **extra) -> dict:
    return dict(model=loaded.name, attn_implementation="eager", device=TEST_DEVICE, mode="generate", warmup=2,
                **extra)


def generated(result) -> list[int]:
    tokens = result.tokens
    return [t for t, p in zip(tokens.column("target_id").to_pylist(), tokens.column("prefill").to_pylist(),
                              strict=True) if not p]


def compactions_inside_blocks(result) -> int:
    """Generated tokens whose step compacted and that are not the last of their verification forward: the next
    query of the same block attended the compacted cache."""
    tokens = result.tokens.to_pydict()
    last_of_forward = {}
    for index, forward in enumerate(tokens["forward"]):
        if forward is not None:
            last_of_forward[forward] = index
    return sum(1 for index, (forward, compacted) in enumerate(zip(tokens["forward"], tokens["compacted"], strict=True))
               if forward is not None and compacted and last_of_forward[forward] != index)


# --- exactness -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt_tokens", [20, 61])  # the prompt in one forward (no compaction in it), in blocks
@pytest.mark.parametrize("rope_mode", ROPE_MODES)
@pytest.mark.parametrize("policy", list(POLICIES))
def test_ring_prompt_lookup_generates_greedy_ids_with_the_compact_spec_nlls(tiny_models, policy, rope_mode,
                                                                           prompt_tokens):
    loaded = tiny_models["tiny-llama"]
    base = knobs(loaded, prompt_tokens=prompt_tokens, new_tokens=70, rope_mode=rope_mode, **POLICIES[policy])
    greedy = evaluate(RunConfig(**base), loaded=loaded)
    ring_greedy = evaluate(RunConfig(**base, layout="ring"), loaded=loaded)
    spec = dict(spec="prompt_lookup", num_draft=NUM_DRAFT, ngram_max=3)
    compact = evaluate(RunConfig(**base, **spec), loaded=loaded)
    ring = evaluate(RunConfig(**base, **spec, layout="ring"), loaded=loaded)

    assert generated(ring) == generated(greedy) == generated(ring_greedy)
    assert ring.summary["generated_hash"] == greedy.summary["generated_hash"]
    for column in ("kv_len", "evicted", "compacted"):
        assert ring.tokens.column(column).equals(compact.tokens.column(column)), column
        assert ring.tokens.column(column).equals(ring_greedy.tokens.column(column)), column
    assert ring.tokens.column("position").equals(ring_greedy.tokens.column("position"))  # stream indices
    nll = [result.tokens.column("nll").to_numpy() for result in (compact, ring)]
    assert np.abs(nll[0] - nll[1]).max() < TOLERANCE
    for column in ("step", "drafted", "accepted", "generated", "kv_len"):  # the same drafts, accepted alike
        assert ring.forwards.column(column).equals(compact.forwards.column(column)), column

    # The comparison covered what it must: compactions (inside blocks too), drafts accepted and rejected.
    assert ring.summary["compaction_count"] >= 10
    assert compactions_inside_blocks(ring) >= 1
    assert 0 < ring.summary["accepted_total"] < ring.summary["drafted_total"]
    assert ring.summary["verify_forwards"] < ring.summary["generated_tokens"]


@pytest.mark.parametrize("rope_mode", ROPE_MODES)
@pytest.mark.parametrize("policy", ["lazy_short", "refresh"])
def test_ring_prompt_lookup_on_gpt_neox(tiny_models, policy, rope_mode):
    loaded = tiny_models["tiny-neox"]
    base = knobs(loaded, prompt_tokens=40, new_tokens=60, rope_mode=rope_mode, **POLICIES[policy])
    greedy = evaluate(RunConfig(**base), loaded=loaded)
    spec = dict(spec="prompt_lookup", num_draft=NUM_DRAFT)
    compact = evaluate(RunConfig(**base, **spec), loaded=loaded)
    ring = evaluate(RunConfig(**base, **spec, layout="ring"), loaded=loaded)
    assert generated(ring) == generated(greedy)
    assert ring.tokens.column("kv_len").equals(compact.tokens.column("kv_len"))
    assert np.abs(ring.tokens.column("nll").to_numpy() - compact.tokens.column("nll").to_numpy()).max() < TOLERANCE
    assert ring.summary["accepted_total"] > 0 and ring.summary["compaction_count"] >= 10


def test_ring_without_per_query_rows_would_be_caught(tiny_models, monkeypatch):
    """Control: a block target whose queries attended the block's start cache and the block's earlier entries (a
    causal block, no replay of the compactions inside it) differs from the compact run by far more than the
    tolerance."""
    from streaming_llm.storage import RingBlockStorage

    loaded = tiny_models["tiny-llama"]
    base = knobs(loaded, prompt_tokens=48, new_tokens=60, rope_mode="realign", spec="prompt_lookup",
                 num_draft=NUM_DRAFT, **POLICIES["strict"])
    compact = evaluate(RunConfig(**base), loaded=loaded)
    begin_block = RingBlockStorage.begin_block

    def causal_over_the_first_view(self, views, slots, first_token):
        unreplayed = [np.concatenate((views[0][:-1], slots[: i + 1])) for i in range(len(views))]
        return begin_block(self, unreplayed, slots, first_token)

    monkeypatch.setattr(RingBlockStorage, "begin_block", causal_over_the_first_view)
    ring = evaluate(RunConfig(**base, layout="ring"), loaded=loaded)
    nll = [result.tokens.column("nll").to_numpy() for result in (compact, ring)]
    assert np.abs(nll[0][: len(nll[1])] - nll[1][: len(nll[0])]).max() > 100 * TOLERANCE


def test_a_rewound_block_leaves_the_state_of_its_accepted_prefix(tiny_models):
    """A block of k + 1 tokens, rewound by 3, then two more blocks: the same logits, spans and stored entries as the
    accepted prefix fed alone, with compactions inside every block (strict)."""
    loaded = tiny_models["tiny-llama"]
    config = RunConfig(**knobs(loaded, prompt_tokens=30, new_tokens=10, spec="prompt_lookup", num_draft=NUM_DRAFT,
                               layout="ring", **POLICIES["strict"]))
    ids = torch.randint(0, 200, (1, 60), generator=torch.Generator().manual_seed(7))
    rewound, direct = RingBlockTarget(loaded, config), RingBlockTarget(loaded, config)
    with torch.inference_mode():
        for target in (rewound, direct):
            target.forward_block(ids[:, :29])
        rewound.forward_block(ids[:, 29:34])
        rewound.rewind(3)
        direct.forward_block(ids[:, 29:31])
        rows = [[target.forward_block(ids[:, start : start + 5]) for start in (31, 36)] for target in (rewound,
                                                                                                         direct)]
    for left, right in zip(*rows, strict=True):
        assert torch.allclose(left, right, atol=1e-5, rtol=0)
    assert rewound.trace == direct.trace and rewound.tokens_seen == direct.tokens_seen == 41
    storages = rewound.storage, direct.storage
    assert storages[0].length == storages[1].length
    for storage in storages:
        assert sorted(storage.slot_of[: storage.length].tolist()) == np.flatnonzero(storage.valid).tolist()
    kept = [storage.position[storage.slot_of[: storage.length]].tolist() for storage in storages]
    assert kept[0] == kept[1] and sum(trace.evicted > 0 for trace in rewound.trace) >= 10


# --- far into a stream -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rope_mode", ROPE_MODES)
@pytest.mark.parametrize("policy", ["strict", "refresh"])
def test_ring_prompt_lookup_far_into_a_stream(tiny_models, monkeypatch, policy, rope_mode):
    """Both targets start at stream index 200,000 (float64 angles in realign / exact): the ring's verification gives
    the ring's stepwise greedy decoding's ids, spans and NLLs."""
    loaded = tiny_models["tiny-llama"]

    def deep(loaded, config):
        target = make_target(loaded, config)
        if isinstance(target, StepwiseTarget):
            target.stepper.cache.tokens_seen = 200_000
        else:
            target.tokens_seen = 200_000
        return target

    monkeypatch.setattr(generate_module, "make_target", deep)
    base = knobs(loaded, prompt_tokens=48, new_tokens=60, rope_mode=rope_mode, layout="ring", **POLICIES[policy])
    greedy = evaluate(RunConfig(**base), loaded=loaded)
    ring = evaluate(RunConfig(**base, spec="prompt_lookup", num_draft=NUM_DRAFT), loaded=loaded)
    assert generated(ring) == generated(greedy)
    assert ring.tokens.column("kv_len").equals(greedy.tokens.column("kv_len"))
    positions = ring.tokens.column("position").to_numpy()
    assert positions.min() >= 200_000 and ring.tokens.column("position").equals(greedy.tokens.column("position"))
    assert np.abs(ring.tokens.column("nll").to_numpy() - greedy.tokens.column("nll").to_numpy()).max() < TOLERANCE
    assert ring.summary["accepted_total"] > 0 and ring.summary["compaction_count"] >= 10


# --- one block shape: no recompilation --------------------------------------------------------------------------------
class CountingBackend:
    """A torch.compile backend that counts the graphs dynamo hands it and runs them as traced."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


@pytest.mark.parametrize("rope_mode", ROPE_MODES)
def test_a_compiled_verification_never_recompiles_across_compactions(tiny_models, monkeypatch, rope_mode):
    """Drafts of every length from 0 to k are verified (padded to k + 1): a block shape that followed the draft would
    compile a graph per length, so no graph may be compiled after the target's warm-up (the prompt's blocks, then
    every verification)."""
    loaded = tiny_models["tiny-llama"]
    backend = CountingBackend()
    after_warm_up: list[int] = []

    class Counted(RingBlockTarget):
        def __init__(self, *args):
            super().__init__(*args)
            after_warm_up.append(backend.graphs)

    monkeypatch.setattr(generate_module, "make_target", lambda loaded, config: Counted(loaded, config, backend))
    base = knobs(loaded, prompt_tokens=48, new_tokens=160, rope_mode=rope_mode, **POLICIES["refresh"],
                 spec="prompt_lookup", num_draft=NUM_DRAFT)
    compiled = evaluate(RunConfig(**base, layout="ring", compile="default"), loaded=loaded)
    torch._dynamo.reset()
    drafted = set(compiled.forwards.column("drafted").to_pylist())
    assert {0, NUM_DRAFT} <= drafted and len(drafted) >= 3
    assert compiled.summary["compaction_count"] >= 20 and backend.graphs >= 1
    assert backend.graphs == after_warm_up[0]
    monkeypatch.undo()
    eager = evaluate(RunConfig(**base, layout="ring"), loaded=loaded)
    assert compiled.summary["generated_hash"] == eager.summary["generated_hash"]
    assert np.abs(compiled.tokens.column("nll").to_numpy() - eager.tokens.column("nll").to_numpy()).max() < TOLERANCE
    assert compiled.summary["compile_s"] > 0 and eager.summary["compile_s"] is None


def test_the_count_catches_a_block_that_follows_the_draft(tiny_models):
    """Control: the same compiled block forward fed blocks as long as their drafts recompiles."""
    loaded = tiny_models["tiny-llama"]
    config = RunConfig(**knobs(loaded, prompt_tokens=48, new_tokens=40, spec="prompt_lookup", num_draft=NUM_DRAFT,
                               layout="ring", compile="default", **POLICIES["refresh"]))
    backend = CountingBackend()
    target = RingBlockTarget(loaded, config, backend)
    ids = torch.randint(0, 200, (1, 80), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        target.forward_block(ids[:, :5])
        first = backend.graphs
        start = 5
        for length in (3, 5, 2):
            target.block = length  # the unpadded block: as long as the draft + 1
            target.forward_block(ids[:, start : start + length])
            start += length
    torch._dynamo.reset()
    assert first >= 1 and backend.graphs > first


def test_a_verification_compiled_by_inductor_gives_the_eager_ids_and_nlls(tiny_models):
    loaded = tiny_models["tiny-llama"]
    base = knobs(loaded, prompt_tokens=48, new_tokens=60, rope_mode="realign", **POLICIES["lazy_short"],
                 spec="prompt_lookup", num_draft=NUM_DRAFT)
    compact = evaluate(RunConfig(**base), loaded=loaded)
    compiled = evaluate(RunConfig(**base, layout="ring", compile="default"), loaded=loaded)
    assert compiled.summary["generated_hash"] == compact.summary["generated_hash"]
    assert compiled.tokens.column("kv_len").equals(compact.tokens.column("kv_len"))
    nll = [result.tokens.column("nll").to_numpy() for result in (compact, compiled)]
    assert np.abs(nll[0] - nll[1]).max() < TOLERANCE
    assert compiled.summary["compile_s"] > 0 and compiled.summary["accepted_total"] > 0
    # Compiled when the target was built: no generated token's latency holds it (the first block's included).
    latency = compiled.tokens.column("latency_ms").to_numpy(zero_copy_only=False)
    assert np.nanmax(latency) < 1000 * compiled.summary["compile_s"] * 0.1


# --- the knobs --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [dict(), dict(compile="default")])
def test_ring_with_prompt_lookup_is_accepted_and_is_its_own_run(extra):
    base = dict(sink=4, window=16, mode="generate", spec="prompt_lookup")
    ring = RunConfig.from_dict(dict(base, layout="ring", **extra))
    assert ring.layout == "ring" and ring.run_hash != RunConfig.from_dict(base).run_hash


@pytest.mark.parametrize("extra, message", [
    (dict(spec="draft", draft_layers=1), "layout ring with spec = draft"),
    (dict(spec="self_stream"), "layout ring with spec = self_stream"),
    (dict(spec="prompt_lookup", kv_quant="int8"), "kv_quant = int8 is implemented in the stepwise cache"),
    (dict(spec="prompt_lookup", method="dense"), "layout ring with method = dense"),
])
def test_what_the_ring_does_not_verify_is_refused_in_one_line(extra, message):
    with pytest.raises(ConfigError, match=message) as error:
        RunConfig.from_dict(dict(dict(sink=4, window=16, mode="generate", layout="ring"), **extra))
    assert "\n" not in str(error.value)


def test_every_buffer_a_block_touches_is_marked_static_under_reduce_overhead(tiny_models):
    """What CUDA graphs must take as static inputs (steppers.CudaGraphCheck marks them): the ring, its copies, the
    block's mask, slots and angle buffers."""
    from streaming_llm.steppers import CudaGraphCheck

    loaded = tiny_models["tiny-llama"]
    config = RunConfig(**knobs(loaded, prompt_tokens=30, new_tokens=10, spec="prompt_lookup", num_draft=NUM_DRAFT,
                               layout="ring", **POLICIES["refresh"]))
    target = RingBlockTarget(loaded, config)
    with torch.inference_mode():
        target.forward_block(torch.zeros((1, 3), dtype=torch.long, device=loaded.device))
    storage = target.storage
    buffers = {id(buffer) for buffer in storage.device_buffers()}
    touched = [*storage.keys, *storage.values, storage.mask, storage.decode_slots, storage.write_slots,
               storage.anchor_source, storage.anchor_cos, storage.anchor_sin]
    assert all(id(buffer) in buffers for buffer in touched) and storage.write_slots is storage.decode_slots
    CudaGraphCheck("reduce-overhead").mark_static(storage.device_buffers())
    assert all(getattr(buffer, "_dynamo_static_input_type", None) == "unguarded" for buffer in touched)


# A reviewer's probe, kept: an anchored copy whose source is an entry of its own block (a refresh token chosen inside
# it) is a write then a read inside one layer's update, the pattern inductor ordered wrongly in the quantized ring.
REFRESH_IN_BLOCK = dict(sink=2, window=3, compress_every=2, refresh=3, refresh_policy="middle")


@pytest.mark.parametrize("compile", ["none", "default"])
def test_an_anchored_copy_sourced_in_its_own_block_compiled_by_inductor(tiny_models, monkeypatch, compile):
    loaded = tiny_models["tiny-llama"]
    sourced_in_block = []
    begin_block = RingBlockStorage.begin_block

    def counting(self, views, slots, first_token):
        mask = begin_block(self, views, slots, first_token)
        count = min(len(views), len(slots))
        if count:
            attended = np.flatnonzero(mask[0, 0, :count, self.capacity :].cpu().numpy().max(0) == 0)
            sourced_in_block.append(int(np.isin(self.anchor_source.cpu().numpy()[attended], slots[:count]).sum()))
        return mask

    base = knobs(loaded, prompt_tokens=30, new_tokens=60, rope_mode="realign", **REFRESH_IN_BLOCK)
    spec = dict(spec="prompt_lookup", num_draft=8, ngram_max=3)
    greedy = evaluate(RunConfig(**base), loaded=loaded)
    compact = evaluate(RunConfig(**base, **spec), loaded=loaded)
    monkeypatch.setattr(RingBlockStorage, "begin_block", counting)
    ring = evaluate(RunConfig(**base, **spec, layout="ring", compile=compile), loaded=loaded)
    assert sum(sourced_in_block) > 0
    assert generated(ring) == generated(greedy)
    assert ring.tokens.column("kv_len").equals(compact.tokens.column("kv_len"))
    nll = [result.tokens.column("nll").to_numpy() for result in (compact, ring)]
    assert np.abs(nll[0] - nll[1]).max() < 1e-4
