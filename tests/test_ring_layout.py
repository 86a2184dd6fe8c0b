"""The ring layout (storage.RingStorage) and the compiled decode step: per-step NLLs within 1e-5 of the eager compact
cache's and identical kv_len / compaction traces for every policy kind, RoPE mode, with and without prefill, and far
into a stream; no recompilation after warm-up across compactions (with a control the count must catch); the compiled
recompute baseline (its full-window forward) equal to the eager one, without recompilation past the full window; the
knobs' refusals, and hashes unchanged where the knobs stay at their defaults."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest
import torch

from store.writer import StoreWriter
from streaming_llm import ConfigError, LoadedModel, RunConfig, evaluate
from streaming_llm import run as run_module
from streaming_llm.cache import StreamingCache
from streaming_llm.compat import cache_kwargs
from streaming_llm.config import _content_hash
from streaming_llm.quant import kv_quantizer
from streaming_llm.rope import RotaryGeometry, rotate_keys
from streaming_llm.steppers import RecomputeStepper, RingStepper, StreamingStepper
from streaming_llm.storage import KVQuantSpec
from tests.conftest import TEST_DEVICE

TOLERANCE = 1e-5  # float32: the issue asks 1e-4; the ring reaches ~2e-6 (summation order and float64 angles)

POLICIES = {
    "strict": dict(sink=4, window=24),
    "lazy": dict(sink=4, window=24, compress_every=8),
    "staged_emergencies": dict(sink=4, window=16, compress_every=6, slack=10, max_drop=3),
    "overlap": dict(sink=4, window=16, compress_every=4, overlap=3),
    "refresh": dict(sink=2, window=16, compress_every=4, refresh=3, refresh_policy="middle", overlap=2),
    "window_only": dict(sink=0, window=20, compress_every=5),
}
ROPE_MODES = ("realign", "exact", "absolute")


def knobs(loaded: LoadedModel, **extra) -> dict:
    return dict(model=loaded.name, attn_implementation="eager", device=TEST_DEVICE, warmup=1, **extra)


def compare(compact, ring) -> float:
    """The largest NLL difference of two runs, after checking that their traces are identical."""
    assert compact.tokens.column("kv_len").equals(ring.tokens.column("kv_len"))
    assert compact.tokens.column("evicted").equals(ring.tokens.column("evicted"))
    events = ["step", "kv_len_before", "kv_len_after", "evicted"]
    assert compact.compactions.select(events).equals(ring.compactions.select(events))
    return float(np.abs(compact.tokens.column("nll").to_numpy() - ring.tokens.column("nll").to_numpy()).max())


@pytest.mark.parametrize("prefill", [0, 40])
@pytest.mark.parametrize("rope_mode", ROPE_MODES)
@pytest.mark.parametrize("policy", list(POLICIES))
def test_ring_gives_the_compact_caches_nlls_and_traces(tiny_models, policy, rope_mode, prefill):
    loaded = tiny_models["tiny-llama"]
    base = knobs(loaded, max_tokens=160, prefill=prefill, rope_mode=rope_mode, **POLICIES[policy])
    compact = evaluate(RunConfig(**base), loaded=loaded)
    ring = evaluate(RunConfig(**base, layout="ring"), loaded=loaded)
    assert compact.compactions.num_rows >= 10
    assert compare(compact, ring) < TOLERANCE
    assert ring.summary["compile_s"] is None and compact.summary["compile_s"] is None


def test_the_staged_policy_reaches_its_emergencies():
    """The staged case above compacts during a cooldown (L > H), not only when due."""
    from streaming_llm.policy import CompactionSchedule

    config = RunConfig(method="streaming", max_tokens=160, **POLICIES["staged_emergencies"])
    schedule, length, emergencies = CompactionSchedule(config.policy), 0, 0
    for _ in range(159):
        length += 1
        in_cooldown = schedule._cooldown > 0
        target = schedule.target_length(length)
        if target is not None:
            emergencies += in_cooldown
            length = target
    assert emergencies >= 3


@pytest.mark.parametrize("rope_mode", ROPE_MODES)
@pytest.mark.parametrize("policy", ["lazy", "refresh"])
def test_ring_on_gpt_neox(tiny_models, policy, rope_mode):
    loaded = tiny_models["tiny-neox"]
    base = knobs(loaded, max_tokens=120, prefill=30, rope_mode=rope_mode, **POLICIES[policy])
    assert compare(evaluate(RunConfig(**base), loaded=loaded),
                   evaluate(RunConfig(**base, layout="ring"), loaded=loaded)) < TOLERANCE


def _stream(stepper, ids: torch.Tensor, prefill: int, first_token: int) -> tuple[np.ndarray, list]:
    """Feed `ids` to `stepper` from stream index `first_token` (a prefill, then one token per step): per-step
    logits and (span, evicted) trace."""
    stepper.cache.tokens_seen = first_token
    rows, trace = [], []
    with torch.inference_mode():
        if prefill:
            rows.append(stepper.forward(ids[:, :prefill], all_logits=True))
            plan = stepper.compact()
            trace.append((stepper.span(), plan.evicted if plan else 0))
        for step in range(prefill, ids.shape[-1]):
            rows.append(stepper.forward(ids[:, step : step + 1]))
            plan = stepper.compact()
            trace.append((stepper.span(), plan.evicted if plan else 0))
    return torch.cat(rows).log_softmax(-1).numpy(), trace


@pytest.mark.parametrize("prefill", [0, 30])
@pytest.mark.parametrize("rope_mode", ROPE_MODES)
@pytest.mark.parametrize("policy", ["strict", "refresh", "window_only"])
def test_ring_far_into_a_stream(tiny_models, policy, rope_mode, prefill):
    """A stream starting at index 200,000: queries and keys sit there in the ring (float64 angles in realign / exact),
    at small slots in a compact realign / exact cache; both attend the same distances."""
    loaded = tiny_models["tiny-llama"]
    config = RunConfig(**knobs(loaded, max_tokens=130, rope_mode=rope_mode, **POLICIES[policy]))
    ids = torch.randint(0, 200, (1, 130), generator=torch.Generator().manual_seed(3))
    compact, compact_trace = _stream(StreamingStepper(loaded, config), ids, prefill, 200_000)
    ring, ring_trace = _stream(RingStepper(loaded, config), ids, prefill, 200_000)
    assert ring_trace == compact_trace and sum(evicted > 0 for _, evicted in ring_trace) >= 10
    assert np.abs(ring - compact).max() < 1e-4  # log-probabilities of every token, not only the targets


def test_ring_without_anchored_copies_would_be_caught(tiny_models):
    """Control: a ring that attended its sinks where they were stored (the absolute frame) differs from the realign
    cache by far more than the tolerance, so the comparisons above can fail."""
    loaded = tiny_models["tiny-llama"]
    base = knobs(loaded, max_tokens=160, **POLICIES["strict"])
    realign = evaluate(RunConfig(**base, rope_mode="realign"), loaded=loaded)
    unanchored = evaluate(RunConfig(**base, rope_mode="absolute", layout="ring"), loaded=loaded)
    assert compare(realign, unanchored) > 100 * TOLERANCE


@pytest.mark.parametrize("rope_mode", ROPE_MODES)
@pytest.mark.parametrize("prompt_tokens", [20, 90])  # one prompt forward; a prompt fed token by token (compactions)
def test_ring_generates_the_compact_caches_greedy_ids(tiny_models, rope_mode, prompt_tokens):
    loaded = tiny_models["tiny-llama"]
    base = knobs(loaded, mode="generate", prompt_tokens=prompt_tokens, new_tokens=80, rope_mode=rope_mode,
                 **POLICIES["refresh"])
    compact = evaluate(RunConfig(**base), loaded=loaded)
    ring = evaluate(RunConfig(**base, layout="ring"), loaded=loaded)
    assert ring.summary["generated_hash"] == compact.summary["generated_hash"]
    assert ring.tokens.column("kv_len").equals(compact.tokens.column("kv_len"))
    assert ring.tokens.column("evicted").to_numpy().sum() > 0
    nll = [result.tokens.column("nll").to_numpy() for result in (compact, ring)]
    assert np.abs(nll[0] - nll[1]).max() < TOLERANCE


# --- the ring with kv_quant ------------------------------------------------------------------------------------------
# int8 with float sinks and no residual (the defaults); int4 with quantized sinks and a float residual of 3.
KV_QUANT = {"int8": dict(kv_quant="int8", kv_quant_group=8),
            "int4": dict(kv_quant="int4", kv_quant_group=8, kv_quant_sinks="quantized", kv_quant_residual=3)}
# The codes of an entry depend on the entry alone, so an eager quantized ring attends what the compact kv_quant cache
# attends bit for bit given the same entries (test below); through a model, a deeper layer's keys differ by the float
# rounding of attention's summation order (~1e-7), which can round one element to the next code: measured <= 4e-5.
KV_QUANT_TOLERANCE = 1e-4


@pytest.mark.parametrize("kv_quant, prefill", [("int8", 0), ("int4", 40)])
@pytest.mark.parametrize("rope_mode", ROPE_MODES)
@pytest.mark.parametrize("policy", list(POLICIES))
def test_ring_with_kv_quant_gives_the_compact_kv_quant_nlls_and_traces(tiny_models, policy, rope_mode, kv_quant,
                                                                       prefill):
    loaded = tiny_models["tiny-llama"]
    base = knobs(loaded, max_tokens=160, prefill=prefill, rope_mode=rope_mode, **POLICIES[policy], **KV_QUANT[kv_quant])
    compact = evaluate(RunConfig(**base), loaded=loaded)
    ring = evaluate(RunConfig(**base, layout="ring"), loaded=loaded)
    assert compact.compactions.num_rows >= 10
    assert compare(compact, ring) < KV_QUANT_TOLERANCE
    float_ring = evaluate(RunConfig(**{k: v for k, v in base.items() if not k.startswith("kv_quant")}, layout="ring"),
                          loaded=loaded)
    assert compare(ring, float_ring) > 10 * KV_QUANT_TOLERANCE  # control: the codes change the numbers


def _attended_in_cache_order(cache, outputs, mask: torch.Tensor, length_before: int) -> list[tuple]:
    """What each layer's attention read in a ring step (`outputs`: its updates' keys and values over the physical
    slots), in the cache's slot order: an anchored entry's rotated copy where its original is masked."""
    storage = cache.storage
    index = storage.slot_of[: cache.layers[0].length].copy()
    for slot in range(min(length_before, storage.anchors)):
        if mask[0, 0, -1, index[slot]] != 0:
            index[slot] = storage.stored_slots + slot
    index = torch.from_numpy(index)
    return [(keys.index_select(-2, index), values.index_select(-2, index)) for keys, values in outputs]


def _feed_both(compact, ring, steps: int, layers: int, prefill: int, first_token: int):
    """The same random entries (rotated at their stream index, float64 angles) into a compact and a ring cache; yields
    per step what each layer's attention read in each, in the cache's slot order."""
    generator = torch.Generator().manual_seed(11)
    geometry = compact.geometry
    compact.tokens_seen = ring.tokens_seen = first_token
    for count in ([prefill] if prefill else []) + [1] * steps:
        compact.compact_pending()
        keys = torch.randn(layers, 1, 2, count, 16, generator=generator)
        values = torch.randn(layers, 1, 2, count, 16, generator=generator)
        cos, sin = geometry.cos_sin(compact.next_positions(count)[0], torch.device("cpu"), precise=True)
        keys = rotate_keys(keys, cos, sin)
        expected = [compact.update(keys[layer], values[layer], layer) for layer in range(layers)]
        length_before = ring.layers[0].length if ring.pending is None else ring.pending.length_after
        mask = ring.begin_step(count)
        ring.next_positions(count)
        outputs = [ring.update(keys[layer], values[layer], layer) for layer in range(layers)]
        ring.finish_step(count)
        yield expected, _attended_in_cache_order(ring, outputs, mask, length_before)


@pytest.mark.parametrize("first_token", [0, 200_000])
@pytest.mark.parametrize("kv_quant", list(KV_QUANT))
@pytest.mark.parametrize("rope_mode", ROPE_MODES)
@pytest.mark.parametrize("policy", list(POLICIES))
def test_the_quantized_ring_attends_the_compact_caches_entries_bit_for_bit(tiny_models, policy, rope_mode, kv_quant,
                                                                           first_token):
    """Fed the same entries, the quantized ring's attention reads exactly what the compact kv_quant cache's reads, at
    every step (a prefill, then 150 steps: 10+ compactions): same codes, quantized at the same step, never requantized,
    anchored copies rotated from the same dequantized keys."""
    options = KV_QUANT[kv_quant]
    spec = KVQuantSpec(kv_quantizer(kv_quant, 8), options.get("kv_quant_residual", 0),
                       options.get("kv_quant_sinks", "full") == "full")
    policy = RunConfig(**POLICIES[policy]).policy
    geometry = RotaryGeometry.of(tiny_models["tiny-llama"].model)
    compact = StreamingCache(policy, geometry, 2, rope_mode, kv_quant=spec)
    ring = StreamingCache(policy, geometry, 2, rope_mode, kv_quant=spec, layout="ring")
    like = torch.empty((1, 2, 0, 16))
    ring.allocate(like, like)
    compactions = 0
    for expected, attended in _feed_both(compact, ring, 150, 2, 37, first_token):
        for (keys, values), (ring_keys, ring_values) in zip(expected, attended, strict=True):
            assert torch.equal(ring_keys, keys) and torch.equal(ring_values, values)
        compactions += compact.last_plan is not None
        assert ring.last_plan == compact.last_plan
    assert compactions >= 10


def test_the_bit_for_bit_comparison_catches_a_requantized_entry(tiny_models):
    """Control: a ring that quantized its float sinks too (another spec) differs from the compact cache there."""
    policy = RunConfig(**POLICIES["lazy"]).policy
    geometry = RotaryGeometry.of(tiny_models["tiny-llama"].model)
    compact = StreamingCache(policy, geometry, 2, "realign", kv_quant=KVQuantSpec(kv_quantizer("int8", 8)))
    ring = StreamingCache(policy, geometry, 2, "realign", kv_quant=KVQuantSpec(kv_quantizer("int8", 8),
                                                                                full_sinks=False), layout="ring")
    like = torch.empty((1, 2, 0, 16))
    ring.allocate(like, like)
    differs = [not torch.equal(expected[0][0], attended[0][0])
               for expected, attended in _feed_both(compact, ring, 20, 2, 0, 0)]
    assert all(differs[4:])


@pytest.mark.parametrize("rope_mode", ROPE_MODES)
@pytest.mark.parametrize("kv_quant", list(KV_QUANT))
def test_ring_with_kv_quant_far_into_a_stream(tiny_models, kv_quant, rope_mode):
    loaded = tiny_models["tiny-llama"]
    config = RunConfig(**knobs(loaded, max_tokens=130, rope_mode=rope_mode, **POLICIES["refresh"],
                               **KV_QUANT[kv_quant]))
    ids = torch.randint(0, 200, (1, 130), generator=torch.Generator().manual_seed(3))
    compact, compact_trace = _stream(StreamingStepper(loaded, config), ids, 30, 200_000)
    ring, ring_trace = _stream(RingStepper(loaded, config), ids, 30, 200_000)
    assert ring_trace == compact_trace and sum(evicted > 0 for _, evicted in ring_trace) >= 10
    assert np.abs(ring - compact).max() < KV_QUANT_TOLERANCE


@pytest.mark.parametrize("kv_quant", list(KV_QUANT))
def test_ring_with_kv_quant_generates_the_compact_caches_greedy_ids(tiny_models, kv_quant):
    loaded = tiny_models["tiny-llama"]
    base = knobs(loaded, mode="generate", prompt_tokens=90, new_tokens=80, **POLICIES["refresh"], **KV_QUANT[kv_quant])
    compact = evaluate(RunConfig(**base), loaded=loaded)
    ring = evaluate(RunConfig(**base, layout="ring"), loaded=loaded)
    assert ring.summary["generated_hash"] == compact.summary["generated_hash"]
    assert ring.tokens.column("kv_len").equals(compact.tokens.column("kv_len"))
    assert ring.summary["kv_cache_peak_bytes"] == compact.summary["kv_cache_peak_bytes"]


# --- no recompilation after warm-up ---------------------------------------------------------------------------------
class CountingBackend:
    """A torch.compile backend that counts the graphs dynamo hands it and runs them as traced."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


def _compact_forward(model, cache, input_ids, positions):
    return model(input_ids=input_ids, position_ids=positions, logits_to_keep=1, **cache_kwargs(cache)).logits[0]


def _graphs_after_warmup(stepper, forward, ids: torch.Tensor, backend: CountingBackend, warmup: int):
    """Step `stepper` over `ids` (through `forward(stepper, token)`); graphs compiled after the first `warmup` steps,
    and the compactions they crossed."""
    compactions, after_warmup = 0, None
    with torch.inference_mode():
        for step in range(ids.shape[-1]):
            if step == warmup:
                after_warmup = backend.graphs
            forward(stepper, ids[:, step : step + 1])
            compactions += stepper.compact() is not None and step >= warmup
    return backend.graphs - after_warmup, compactions


@pytest.mark.parametrize("kv_quant", ["none", *KV_QUANT])
@pytest.mark.parametrize("rope_mode", ROPE_MODES)
def test_a_compiled_ring_step_never_recompiles_across_compactions(tiny_models, rope_mode, kv_quant):
    loaded = tiny_models["tiny-llama"]
    config = RunConfig(**knobs(loaded, max_tokens=200, rope_mode=rope_mode, compile="default", layout="ring",
                               **POLICIES["refresh"], **KV_QUANT.get(kv_quant, {})))
    ids = torch.randint(0, 200, (1, 120), generator=torch.Generator().manual_seed(5))
    backend = CountingBackend()
    stepper = RingStepper(loaded, config, backend=backend)
    graphs, compactions = _graphs_after_warmup(stepper, lambda s, token: s.forward(token), ids, backend, warmup=2)
    assert compactions >= 20 and backend.graphs >= 1
    assert graphs == 0


def test_the_recompilation_count_catches_a_cache_that_changes_shapes(tiny_models):
    """Control: the same count over the compact cache, whose attended length changes every step, sees recompiles."""
    loaded = tiny_models["tiny-llama"]
    config = RunConfig(**knobs(loaded, max_tokens=200, **POLICIES["refresh"]))
    ids = torch.randint(0, 200, (1, 120), generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(_compact_forward, backend=backend, dynamic=False)

    def forward(stepper, token):
        positions = stepper.cache.next_positions(1)
        return compiled(stepper.model, stepper.cache, token, positions)

    graphs, compactions = _graphs_after_warmup(StreamingStepper(loaded, config), forward, ids, backend, warmup=2)
    torch._dynamo.reset()
    assert compactions >= 20 and graphs > 0


@pytest.fixture(scope="module")
def compiled_runs(tiny_models):
    """An eager compact run and the same run compiled by the real backend (inductor: a C++ compiler on a CPU)."""
    loaded = tiny_models["tiny-llama"]
    base = knobs(loaded, max_tokens=90, prefill=20, rope_mode="realign", **POLICIES["lazy"])
    return (evaluate(RunConfig(**base), loaded=loaded),
            evaluate(RunConfig(**base, layout="ring", compile="default"), loaded=loaded))


def test_a_quantized_ring_step_compiled_by_inductor_gives_the_eager_compact_nlls(tiny_models):
    """int8 ring under inductor against the eager compact kv_quant cache: inductor's quantization and attention round
    differently, so an element can land on the next code (measured 1.5e-4 here); a quantization step is ~100x that."""
    loaded = tiny_models["tiny-llama"]
    base = knobs(loaded, max_tokens=90, prefill=20, rope_mode="realign", **POLICIES["lazy"], **KV_QUANT["int8"])
    compact = evaluate(RunConfig(**base), loaded=loaded)
    compiled = evaluate(RunConfig(**base, layout="ring", compile="default"), loaded=loaded)
    assert compare(compact, compiled) < 1e-3 and compiled.summary["compile_s"] > 0


def test_a_ring_step_compiled_by_inductor_gives_the_eager_compact_nlls(compiled_runs):
    """The compiled ring run equals the eager compact one, and its first compiled step's time is compile_s."""
    compact, compiled = compiled_runs
    assert compare(compact, compiled) < 1e-4
    assert compiled.summary["compile_s"] > 0
    latency = compiled.tokens.column("latency_ms").to_numpy(zero_copy_only=False)[20:]
    assert latency[0] > 1000 * compiled.summary["compile_s"] * 0.5  # the compiling step is the first, a warmup one


def test_layout_compile_and_compile_s_reach_the_store(tmp_path, compiled_runs):
    path = tmp_path / "store.duckdb"
    with StoreWriter(path, "v1") as writer:
        for result in compiled_runs:
            writer.record_done(result, worker="test:1", attempts=1)
    with duckdb.connect(str(path), read_only=True) as con:
        rows = [con.execute("SELECT layout, compile, compile_s FROM runs WHERE run_hash = ?",
                            [result.config.run_hash]).fetchall()[0] for result in compiled_runs]
    assert rows == [("compact", "none", None), ("ring", "default", compiled_runs[1].summary["compile_s"])]


# --- the compiled recompute baseline --------------------------------------------------------------------------------
def _recompute_graphs(stepper, forward, ids: torch.Tensor, backend: CountingBackend, warmup: int) -> tuple[int, int]:
    """Step over `ids` through `forward(stepper, token)`: graphs compiled after the first `warmup` steps, and the steps
    after warm-up that ran on a full window."""
    full_steps, after_warmup = 0, None
    with torch.inference_mode():
        for step in range(ids.shape[-1]):
            if step == warmup:
                after_warmup = backend.graphs
            forward(stepper, ids[:, step : step + 1])
            full_steps += step >= warmup and stepper.span() == stepper.window
    return backend.graphs - after_warmup, full_steps


def test_a_compiled_recompute_step_never_recompiles_past_the_full_window(tiny_models):
    loaded = tiny_models["tiny-llama"]
    config = RunConfig(**knobs(loaded, method="recompute", cap=40, max_tokens=200, compile="default"))
    ids = torch.randint(0, 200, (1, 70), generator=torch.Generator().manual_seed(5))
    backend = CountingBackend()
    stepper = RecomputeStepper(loaded, config, backend=backend)
    graphs, full_steps = _recompute_graphs(stepper, lambda s, token: s.forward(token), ids, backend, warmup=1)
    assert full_steps >= 20 and backend.graphs >= 1 and stepper.compile_s > 0
    assert graphs == 0


def test_the_recompute_count_catches_a_forward_whose_shape_changes(tiny_models):
    """Control: the same compiled forward fed the filling window (one token longer at every step) recompiles."""
    loaded = tiny_models["tiny-llama"]
    config = RunConfig(**knobs(loaded, method="recompute", cap=40, max_tokens=200, compile="default"))
    ids = torch.randint(0, 200, (1, 70), generator=torch.Generator().manual_seed(5))
    backend = CountingBackend()

    def forward(stepper, token):
        stepper.context = torch.cat((stepper.context, token), dim=-1)[:, -stepper.window :]
        return stepper.decode(stepper.model, stepper.context)

    graphs, full_steps = _recompute_graphs(RecomputeStepper(loaded, config, backend=backend), forward, ids, backend,
                                           warmup=1)
    torch._dynamo.reset()
    assert full_steps >= 20 and graphs > 0


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_the_compiled_recompute_baseline_gives_the_eager_one(tiny_models, mode):
    """Inductor's full-window forward: per-step NLLs within 1e-4 (float32) of the eager baseline, the same kv_len,
    the same greedy ids; compilation in compile_s, at the first (warmup) step, not in any timed step."""
    loaded = tiny_models["tiny-llama"]
    lengths = dict(max_tokens=90, prefill=20) if mode == "score" else dict(prompt_tokens=20, new_tokens=60)
    base = knobs(loaded, method="recompute", cap=32, mode=mode, **lengths)
    eager = evaluate(RunConfig(**base), loaded=loaded)
    compiled = evaluate(RunConfig(**base, compile="default"), loaded=loaded)
    assert compiled.tokens.column("kv_len").equals(eager.tokens.column("kv_len"))
    assert (compiled.tokens.column("kv_len").to_numpy() == 32).sum() >= 20
    nll = [result.tokens.column("nll").to_numpy() for result in (eager, compiled)]
    assert np.abs(nll[0] - nll[1]).max() < 1e-4
    if mode == "generate":
        assert compiled.summary["generated_hash"] == eager.summary["generated_hash"]
    assert eager.summary["compile_s"] is None and compiled.summary["compile_s"] > 0
    latency = compiled.tokens.column("latency_ms").to_numpy(zero_copy_only=False)
    timed = latency[~np.isnan(latency)][1:]  # past the first (warmup) step
    assert timed.max() < 1000 * compiled.summary["compile_s"] * 0.5


# --- the knobs ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (dict(layout="ring", method="dense"), "layout ring with method = dense"),
    (dict(layout="ring", protocol="parallel"), "layout ring with protocol = parallel"),
    (dict(layout="ring", mode="generate", spec="draft", draft_layers=1), "layout ring with spec = draft"),
    (dict(compile="default"), "compile = default with layout compact"),
    (dict(method="dense", compile="default"), "compile = default with method dense"),
    (dict(method="recompute", cap=64, compile="default", protocol="parallel"), "compile = default with protocol "
     "parallel"),
    (dict(method="recompute", cap=64, compile="default", warmup=0), "would be timed in TPOT"),
    (dict(method="recompute", cap=64, layout="ring"), "layout ring with method = recompute"),
    (dict(layout="ring", compile="reduce-overhead", device="cpu"), "device cpu has none"),
    (dict(layout="ring", compile="reduce-overhead", device="cuda", warmup=2), "set warmup 3 or more"),
    (dict(layout="ring", compile="default", warmup=0), "would be timed in TPOT"),
])
def test_unsupported_combinations_are_refused_in_one_line(extra, message):
    with pytest.raises(ConfigError, match=message) as error:
        RunConfig.from_dict(dict(sink=4, window=16, **extra))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("what", ["no C++ compiler", "no CUDA"])
def test_what_the_machine_lacks_is_refused_before_the_model_loads(monkeypatch, what):
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(LoadedModel, "load", classmethod(load))
    if what == "no C++ compiler":
        monkeypatch.setattr(run_module.shutil, "which", lambda name: None)
        config = RunConfig(sink=4, window=16, layout="ring", compile="default", device="cpu")
        message = "install g\\+\\+"
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        config = RunConfig(sink=4, window=16, layout="ring", compile="reduce-overhead")
        message = "CUDA graphs"
    with pytest.raises(RuntimeError, match=message):
        evaluate(config)


# Hashes of these configurations computed by the code before layout and compile existed (commit a661e9e).
PINNED = [
    (dict(sink=4, window=16, compress_every=8),
     ("daa9fed9bce641bf", "63f662f83bf36b6a", "f33d95f2e898a9d8", "eedf3291e34a458c")),
    (dict(method="dense"), ("9ebc7651ac416329", "9ebc7651ac416329", "3057d5349f7f9511", "66a7ac6eeb4752cc")),
    (dict(method="recompute", cap=64),
     ("414dfee811cf25e5", "414dfee811cf25e5", "03564e182f065959", "d716ef6c4e47e264")),
    (dict(cap=256, mode="generate", spec="prompt_lookup"),
     ("6ed73536b6b086bb", "4db950f7bbab35dc", "ab600fdc81689381", "38afc68f02cc8025")),
]


@pytest.mark.parametrize("given, hashes", PINNED)
def test_the_knobs_at_their_defaults_leave_every_hash_as_it_was(given, hashes):
    config = RunConfig(**given)
    assert config.normalised()["layout"] == "compact" and config.normalised()["compile"] == "none"
    assert (config.run_hash, config.config_hash, config.setting_hash, config.group_hash) == hashes


def test_compiled_recompute_is_its_own_run_and_keeps_layout_compact():
    eager, compiled = RunConfig(method="recompute", cap=64), RunConfig(method="recompute", cap=64, compile="default")
    assert compiled.normalised()["layout"] == "compact"
    assert compiled.run_hash != eager.run_hash == PINNED[2][1][0]
    assert eager.run_hash == _content_hash({k: v for k, v in compiled.identity().items() if k != "compile"})


def test_the_knobs_away_from_their_defaults_are_other_runs():
    base = dict(sink=4, window=16, compress_every=8)
    configs = [RunConfig(**base), RunConfig(**base, layout="ring"), RunConfig(**base, layout="ring", compile="default")]
    assert len({c.run_hash for c in configs}) == len({c.setting_hash for c in configs}) == 3
    assert configs[0].run_hash == _content_hash({k: v for k, v in configs[1].identity().items() if k != "layout"})
