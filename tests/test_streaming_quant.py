"""Quantization: KV codes within the format's bound, a quantized cache equal to a float cache slot for slot after many
compactions of every policy kind, no drift with the number of compactions, measured bytes, refused knobs, and torchao
weight quantization composed with streaming and kv_quant."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch

from streaming_llm import ConfigError, LoadedModel, RunConfig, StreamingCache, StreamingPolicy, evaluate
from streaming_llm.cache import KVQuantSpec
from streaming_llm.evaluate import StreamingStepper, kv_quant_spec
from streaming_llm.generate import hf_generate
from streaming_llm.quant import KVQuantizer
from streaming_llm.rope import RotaryGeometry, precise_rotary, rotate_keys
from tests.conftest import TEST_DEVICE


def run(loaded, **knobs):
    config = RunConfig(model=loaded.name, attn_implementation="eager", device=TEST_DEVICE, **knobs)
    return evaluate(config, loaded=loaded)


def nlls(result) -> np.ndarray:
    return result.tokens.column("nll").to_numpy()


# --- primitives -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits, group", [(8, 16), (8, 64), (4, 8), (4, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_dequantize_within_half_a_step(bits, group, dtype):
    x = (torch.randn(2, 3, 40, 64, generator=torch.Generator().manual_seed(bits + group)) * 3).to(dtype)
    quantizer = KVQuantizer(bits, group)
    payload, scale, zero = quantizer.quantize(x)
    assert payload.dtype == torch.uint8 and payload.shape[-1] == 64 * bits // 8  # int4: two codes per byte
    assert scale.shape[-1] == zero.shape[-1] == 64 // group and zero.dtype == torch.uint8
    restored = quantizer.dequantize(payload, scale, zero, torch.float32)
    error = (restored - x.float()).abs().reshape(*x.shape[:-1], -1, group)
    assert scale.dtype == torch.float32  # in bf16, a rounded scale would push int8's extreme codes a step out
    assert (error <= scale[..., None] / 2 * (1 + 1e-4) + 1e-6).all()
    assert error.max() > 0.2 * scale.float().min()  # the codes really are coarse: not a float copy


@pytest.mark.parametrize("bits, group", [(8, 16), (8, 64), (4, 8), (4, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_into_a_buffer_equals_torchao(bits, group, dtype):
    """The cache's own dequantization (straight into the attention buffer) gives torchao's numbers, bit for bit."""
    x = (torch.randn(2, 3, 40, 64, generator=torch.Generator().manual_seed(7 * bits + group)) * 3).to(dtype)
    quantizer = KVQuantizer(bits, group)
    payload, scale, zero = quantizer.quantize(x.to(TEST_DEVICE))
    buffer = torch.full((2, 3, 45, 64), float("nan"), dtype=dtype, device=TEST_DEVICE)
    quantizer.dequantize_into(payload, scale, zero, buffer[..., 2:42, :])
    torch.testing.assert_close(buffer[..., 2:42, :], quantizer.dequantize(payload, scale, zero, dtype), rtol=0, atol=0)
    assert buffer[..., :2, :].isnan().all() and buffer[..., 42:, :].isnan().all()  # nothing outside the slice


# --- the cache, fed directly (no model): quantized contents == float contents within the bound ------------------------
POLICIES = {
    "strict": dict(sink=4, window=24, compress_every=1),
    "lazy": dict(sink=4, window=24, compress_every=8),
    "window_only": dict(sink=0, window=20, compress_every=5),
    "refresh_overlap": dict(sink=2, window=16, compress_every=4, refresh=3, overlap=2),
    "staged": dict(sink=4, window=16, compress_every=6, slack=10, max_drop=3),
}


def _feed(cache: StreamingCache, geometry: RotaryGeometry, steps: int, layers: int, seed: int, prefill: int,
          first_token: int = 0):
    """Random pre-RoPE keys rotated at the cache's next positions (what the model hands it: slots for a float
    realign / exact cache, stream indices otherwise; float64 angles for a kv_quant realign / exact one), values as
    they are.
    Yields, after each step's updates and before its compaction, what each layer's update returned (what its
    attention read)."""
    generator = torch.Generator().manual_seed(seed)
    counts = [prefill] + [1] * steps if prefill else [1] * steps
    precise = cache.kv_quant is not None and cache.anchors_by_slot
    cache.tokens_seen = first_token  # a stream that started before: stream indices first_token, first_token + 1, ...
    for count in counts:
        cache.compact_pending()
        keys = torch.randn(layers, 1, 2, count, 16, generator=generator)
        values = torch.randn(layers, 1, 2, count, 16, generator=generator)
        cos, sin = geometry.cos_sin(cache.next_positions(count)[0], torch.device("cpu"), precise=precise)
        keys = rotate_keys(keys, cos, sin)
        yield [cache.update(keys[layer], values[layer], layer) for layer in range(layers)]
    cache.compact_pending()


@pytest.mark.parametrize("policy_name", list(POLICIES))
@pytest.mark.parametrize("rope_mode", ["realign", "exact", "absolute"])
@pytest.mark.parametrize("kv_quant, residual, full_sinks", [(8, 0, True), (4, 5, False)])
def test_quantized_cache_equals_float_cache_slot_for_slot(tiny_models, policy_name, rope_mode, kv_quant, residual,
                                                          full_sinks):
    geometry = RotaryGeometry.of(tiny_models["tiny-llama"].model)
    spec = KVQuantSpec(KVQuantizer(kv_quant, 8), residual=residual, full_sinks=full_sinks)
    _compare_with_the_float_cache(geometry, StreamingPolicy(**POLICIES[policy_name]), rope_mode, spec)


@pytest.mark.parametrize("policy_name", ["strict", "refresh_overlap"])
def test_a_quantized_cache_far_into_a_stream_equals_the_float_cache(tiny_models, policy_name):
    """A stream whose first token is 200,000 (where a float32 angle is off by up to 0.012 rad): the quantized cache
    (keys placed by stream index from float64 angles) still holds what the float cache (placed by slot) holds."""
    geometry = RotaryGeometry.of(tiny_models["tiny-llama"].model)
    spec = KVQuantSpec(KVQuantizer(8, 2))
    _compare_with_the_float_cache(geometry, StreamingPolicy(**POLICIES[policy_name]), "realign", spec, 200_000)


def test_anchored_entries_are_rotated_from_float64_angles_however_far_the_query(tiny_models):
    """200,000 tokens after its sinks a query attends them rotated by ~200,000 positions: within float32 rounding of
    the float64 truth (a float32 angle would be off by up to 0.006 rad, ~1e-2 on these keys)."""
    geometry = RotaryGeometry.of(tiny_models["tiny-llama"].model)
    policy = StreamingPolicy(**POLICIES["refresh_overlap"])
    cache = StreamingCache(policy, geometry, 2, "realign", kv_quant=KVQuantSpec(KVQuantizer(8, 8)))
    for _ in _feed(cache, geometry, 60, 2, 3, 0):
        pass
    count = policy.sink + policy.refresh
    length = cache.layers[0].length
    offset = 200_000 + cache.tokens_seen - length  # as for a query 200,000 tokens further on
    anchored = cache.anchored_keys(length, offset, torch.device("cpu"))
    stored = cache.quantized.read_front(count).double()
    shifts = torch.arange(count) + offset - torch.from_numpy(cache.quantized.positions[:count])
    assert shifts.min() > 199_000
    angles = shifts.double()[:, None] * geometry.inv_freq.double()
    cos, sin = angles.cos(), angles.sin()
    first, second = stored[..., : angles.shape[1]], stored[..., angles.shape[1] :]
    truth = torch.cat((first * cos - second * sin, second * cos + first * sin), -1)
    assert (anchored.double() - truth).abs().max() < 1e-5


def _compare_with_the_float_cache(geometry: RotaryGeometry, policy: StreamingPolicy, rope_mode: str,
                                  spec: KVQuantSpec, first_token: int = 0) -> None:
    layers, residual, full_sinks = 2, spec.residual, spec.full_sinks
    reference = StreamingCache(policy, geometry, layers, rope_mode)
    quantized = StreamingCache(policy, geometry, layers, rope_mode, kv_quant=spec)
    checked = compactions = 0
    # The quantized cache holds keys at their stream index; the float one (realign / exact) at their slot: they are
    # compared where the query attends them, offset = its stream index - its slot further on. An anchored key rotated
    # after dequantization mixes two coordinates' errors: at most sqrt(2) half steps.
    sqrt2 = math.sqrt(2) if rope_mode != "absolute" else 1.0
    for attended, attended_quantized in zip(_feed(reference, geometry, 200, layers, 7, 29, first_token),
                                            _feed(quantized, geometry, 200, layers, 7, 29, first_token), strict=True):
        # What each layer's attention read in this step (the per-step path: offset, anchored rotation, new entries)
        offset = quantized.step_offset if rope_mode != "absolute" else 0
        for layer, ((keys, values), (quantized_keys, quantized_values)) in enumerate(
                zip(attended, attended_quantized, strict=True)):
            length = keys.shape[-2]
            key_step = quantized.quantized.step_sizes(layer, length)[..., None]
            value_step = quantized.quantized.step_sizes(layer, length, values=True)[..., None]
            shifted = rotate_keys(keys, *geometry.cos_sin(torch.full((length,), offset), torch.device("cpu"),
                                                          precise=True))
            assert ((quantized_keys - shifted).abs() <= sqrt2 * key_step / 2 * (1 + 1e-4) + 1e-5).all()
            assert ((quantized_values - values).abs() <= value_step / 2 * (1 + 1e-4) + 1e-6).all()
        reference.compact_pending()
        quantized.compact_pending()
        assert quantized.layers[0].length == reference.layers[0].length
        compactions += reference.last_plan is not None
        for layer in range(layers):
            length = reference.layers[layer].length
            key_step = quantized.quantized.step_sizes(layer, length)[..., None]
            value_step = quantized.quantized.step_sizes(layer, length, values=True)[..., None]
            key_bound = sqrt2 * key_step / 2 * (1 + 1e-4) + 1e-5
            expected = reference.layers[layer].keys_to_attend()
            if rope_mode != "absolute":
                offset = torch.full((length,), reference.tokens_seen - length)
                expected = rotate_keys(expected, *geometry.cos_sin(offset, torch.device("cpu"), precise=True))
            key_error = (quantized.layers[layer].keys_to_attend() - expected).abs()
            value_error = (quantized.layers[layer].values_to_attend() - reference.layers[layer].values_to_attend())
            assert (key_error <= key_bound).all()
            assert (value_error.abs() <= value_step / 2 * (1 + 1e-4) + 1e-6).all()
            checked += 1
    assert checked == 2 * 201 and compactions >= 20
    # The float part holds exactly the sinks (when full) and the residual: the rest are codes.
    sinks = policy.sink if full_sinks else 0
    steps = quantized.quantized.step_sizes(0, quantized.layers[0].length)[0, 0]
    assert int((steps == 0).sum()) == sinks + residual


def test_a_kv_quant_cache_refuses_a_forward_without_its_positions(tiny_models):
    """Without position_ids a model counts slots; a kv_quant cache places tokens by stream index, so such a forward
    would misplace every key after the first eviction: refused at its first layer, before anything is stored."""
    model = tiny_models["tiny-llama"].model
    spec = KVQuantSpec(KVQuantizer(8, 8))
    cache = StreamingCache(StreamingPolicy(sink=4, window=24), RotaryGeometry.of(model),
                           model.config.num_hidden_layers, "realign", kv_quant=spec)
    ids = torch.arange(10, 20).unsqueeze(0).to(model.device)
    with torch.inference_mode():
        with pytest.raises(ValueError, match=r"position_ids=cache.next_positions\(n\)"):
            model(input_ids=ids, cache=cache)
        assert cache.tokens_seen == 0
        model(input_ids=ids, position_ids=cache.next_positions(10, model.device), cache=cache)
        with pytest.raises(ValueError, match="stream index"):  # positions are placed once per forward
            model(input_ids=ids[:, :1], cache=cache)
    assert cache.tokens_seen == 10 and cache.get_seq_length() == 10


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-neox"])
def test_precise_rotary_table_is_hfs_where_hfs_is_accurate(tiny_models, model):
    """The rotary table a kv_quant realign / exact stepper runs with: HF's at small positions, the float64 truth at
    stream positions where HF's float32 angles are off (a kv_quant cache places queries at their stream index)."""
    loaded = tiny_models[model].model
    geometry, rotary = RotaryGeometry.of(loaded), loaded.base_model.rotary_emb
    x = torch.zeros(1, 1, 8)
    for first, hf_accurate in ((0, True), (200_000, False)):
        positions = torch.arange(first, first + 40).unsqueeze(0)
        hf_cos, hf_sin = rotary(x, position_ids=positions)
        with precise_rotary(loaded, geometry):
            cos, sin = rotary(x, position_ids=positions)
        angles = positions[0, :, None].double() * geometry.inv_freq.double()
        truth = torch.cat((angles, angles), -1)
        assert cos.shape == hf_cos.shape and cos.dtype == hf_cos.dtype
        torch.testing.assert_close(cos[0].double(), truth.cos() * geometry.attention_scaling, rtol=0, atol=2e-7)
        torch.testing.assert_close(sin[0].double(), truth.sin() * geometry.attention_scaling, rtol=0, atol=2e-7)
        hf_error = (hf_cos[0].double() - truth.cos() * geometry.attention_scaling).abs().max()
        assert (hf_error < 1e-6) == hf_accurate, hf_error
    cos, _ = rotary(x, position_ids=positions)
    torch.testing.assert_close(cos, hf_cos, rtol=0, atol=0)  # the hook is gone once the block ends


@pytest.mark.parametrize("via", ["stepper", "hf_generate"])
def test_kv_quant_runs_take_far_positions_from_float64_angles(tiny_models, via):
    """What the attention of a kv_quant realign run receives 200,000 tokens into a stream: the float64 table
    (`precise_rotary`, installed by the stepper and by hf_generate), not HF's float32 one (off by up to 0.012 rad)."""
    loaded = tiny_models["tiny-llama"]
    model = loaded.model
    config = RunConfig(model="tiny-llama", method="streaming", sink=4, window=24, kv_quant="int8", kv_quant_group=8,
                       device=TEST_DEVICE)
    ids = torch.arange(10, 15).unsqueeze(0).to(model.device)
    tables = []

    def capture(module, args, kwargs):
        tables.append(kwargs["position_embeddings"][0][0].double().cpu())  # cos [tokens, head_dim]

    handle = model.model.layers[0].self_attn.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        if via == "stepper":
            stepper = StreamingStepper(loaded, config)
            stepper.cache.tokens_seen = 200_000
            with torch.inference_mode():
                stepper.forward(ids)
        else:
            cache = StreamingCache(config.policy, RotaryGeometry.of(model), model.config.num_hidden_layers, "realign",
                                   kv_quant_spec(config, model.config))
            cache.tokens_seen = 200_000
            hf_generate(model, ids, cache=cache, max_new_tokens=2, do_sample=False)
    finally:
        handle.remove()
    geometry = RotaryGeometry.of(model)
    angles = torch.arange(200_000, 200_005, dtype=torch.float64)[:, None] * geometry.inv_freq.double()
    truth = torch.cat((angles, angles), -1).cos() * geometry.attention_scaling
    assert (tables[0] - truth).abs().max() < 1e-6
    assert tables[0].shape == truth.shape


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-neox"])
@pytest.mark.parametrize("rope_mode", ["realign", "exact", "absolute"])
def test_fine_int8_codes_give_the_float_caches_nlls(tiny_models, model, rope_mode):
    """int8 in groups of 2 is nearly lossless, so a run's NLLs sit within 0.02 nats of the float cache's in the same
    mode (float realign / exact re-align keys by slot; the quantized cache places everything by stream index): a query
    that saw any entry one position off (a sink, a refresh token, the window) would move them by 0.2-0.5 nats."""
    loaded = tiny_models[model]
    for knobs in (dict(sink=4, window=24, compress_every=1), dict(sink=4, window=24, compress_every=8, prefill=37),
                  dict(sink=4, window=16, compress_every=6, slack=10, max_drop=3),
                  dict(sink=2, window=16, compress_every=4, refresh=3, overlap=2, refresh_policy="middle"),
                  dict(sink=0, window=20, compress_every=5)):
        common = dict(method="streaming", rope_mode=rope_mode, max_tokens=300, **knobs)
        gap = np.abs(nlls(run(loaded, kv_quant="int8", kv_quant_group=2, **common)) - nlls(run(loaded, **common)))
        assert 0 < gap.max() < 0.02, (knobs, gap.max())


@pytest.mark.parametrize("kv_quant", ["int8", "int4"])
def test_quantization_gap_does_not_grow_with_compactions(tiny_models, kv_quant):
    """Strict streaming (R = 1) compacts at every step: were kept entries requantized (or re-rotated as codes), the gap
    to the float cache would grow along the stream. Mean |gap| of the last quarter stays within 1.5x the first's."""
    loaded = tiny_models["tiny-llama"]
    knobs = dict(method="streaming", sink=4, window=32, compress_every=1, max_tokens=1000)
    gap = np.abs(nlls(run(loaded, kv_quant=kv_quant, kv_quant_group=8, **knobs)) - nlls(run(loaded, **knobs)))
    quarter = len(gap) // 4
    first, last = gap[quarter // 2 : quarter].mean(), gap[-quarter:].mean()  # the first quarter once the cache is full
    assert gap.max() > 0  # the codes change the numbers
    assert last <= 1.5 * first + 0.002, (first, last)


def test_measured_bytes_shrink_by_the_format_factor(tiny_models):
    """kv_cache_peak_bytes is the nbytes of what the cache holds: codes (head_dim * bits / 8 bytes per head), one
    scale (model dtype) + one uint8 zero point per group, sinks and residual in float, over the storage's capacity."""
    loaded = tiny_models["tiny-llama"]
    knobs = dict(method="streaming", sink=4, window=40, compress_every=8, max_tokens=200)
    float_run = run(loaded, **knobs)
    layers, kv_heads, head_dim = 2, 2, 16
    capacity = 4 + 40 + 8 + 1  # hard capacity + R + 1: what the storage preallocates
    float_entry = 2 * layers * kv_heads * head_dim * 4
    assert float_run.summary["kv_cache_peak_bytes"] == capacity * float_entry
    assert float_run.summary["kv_bytes_per_token"] == float_entry
    for kv_quant, bits, group, residual, sinks in [("int8", 8, 16, 0, "quantized"), ("int4", 4, 8, 6, "full")]:
        result = run(loaded, kv_quant=kv_quant, kv_quant_group=group, kv_quant_residual=residual,
                     kv_quant_sinks=sinks, **knobs)
        full = 4 if sinks == "full" else 0
        coded_entry = 2 * layers * kv_heads * (head_dim * bits // 8 + head_dim // group * (4 + 1))
        float_slots = full + residual + 1  # + 1: the entry a step appends before it is coded
        expected = (capacity - full - residual) * coded_entry + float_slots * float_entry
        assert result.summary["kv_cache_peak_bytes"] == expected
        assert result.summary["kv_bytes_per_token"] == expected / capacity
        assert result.summary["kv_bytes_per_token"] < float_entry / 2


def test_dense_and_recompute_bytes(tiny_models):
    loaded = tiny_models["tiny-neox"]
    dense = run(loaded, method="dense", max_tokens=60)
    assert dense.summary["kv_cache_peak_bytes"] == 59 * loaded.kv_bytes_per_token()
    recompute = run(loaded, method="recompute", cap=16, max_tokens=60)
    assert recompute.summary["kv_cache_peak_bytes"] is None and recompute.summary["kv_bytes_per_token"] is None


# --- knobs ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("knobs, message", [
    (dict(kv_quant="int4", kv_quant_group=7), "kv_quant_group = 7 must be even"),
    (dict(kv_quant="int8", kv_quant_residual=30), "kv_quant_residual = 30 > window = 24"),
    (dict(kv_quant="int8", kv_quant_residual=-1), "kv_quant_residual = -1 < 0"),
    (dict(kv_quant="int8", kv_quant_group=0), "kv_quant_group = 0 < 2"),
    (dict(kv_quant="int8", kv_quant_group=1), "kv_quant_group = 1 < 2"),
    (dict(kv_quant="int8", method="dense", window=None), "method dense uses none"),
    (dict(kv_quant="int2"), "kv_quant"),
    (dict(weight_quant="fp8"), "weight_quant"),
    (dict(kv_quant="int8", protocol="parallel"), "protocol parallel holds none"),
    (dict(kv_quant="int8", mode="generate", spec="prompt_lookup", prompt_tokens=16, new_tokens=32),
     "spec = prompt_lookup verifies drafts over a block cache that holds floats"),
])
def test_invalid_quantization_knobs_are_refused_before_any_model(knobs, message):
    base = dict(model="tiny-llama", method="streaming", sink=4, window=24)
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict({**base, **knobs})


def test_group_not_dividing_head_dim_is_refused_before_any_step(tiny_models):
    with pytest.raises(ConfigError, match="kv_quant_group = 12 does not divide head_dim = 16 .* use a divisor of 16"):
        run(tiny_models["tiny-llama"], method="streaming", sink=4, window=24, kv_quant="int8", kv_quant_group=12)


def test_kv_quant_details_are_normalised_away_when_they_cannot_matter():
    base = dict(method="streaming", sink=4, window=24)
    assert RunConfig(**base).run_hash == RunConfig(**base, kv_quant_group=8, kv_quant_residual=4,
                                                   kv_quant_sinks="quantized").run_hash
    no_sinks = dict(method="streaming", sink=0, window=24, kv_quant="int8")
    assert RunConfig(**no_sinks).run_hash == RunConfig(**no_sinks, kv_quant_sinks="quantized").run_hash
    assert RunConfig(**base, kv_quant="int8").run_hash != RunConfig(**base, kv_quant="int8",
                                                                    kv_quant_sinks="quantized").run_hash
    assert RunConfig(**base).run_hash != RunConfig(**base, weight_quant="int8").run_hash


# --- weights ----------------------------------------------------------------------------------------------------------
WEIGHT_TOLERANCE = {"int8": 0.05, "int8_dynamic": 0.05, "int4": 0.4}  # mean |NLL - float NLL| on the tiny models


@pytest.fixture(scope="module")
def quantized_models() -> dict[tuple[str, str], LoadedModel]:
    return {
        (model, weight_quant): LoadedModel.load(RunConfig(model=model, method="dense", attn_implementation="eager",
                                                          device="cpu", weight_quant=weight_quant))
        for model in ("tiny-llama", "tiny-neox") for weight_quant in WEIGHT_TOLERANCE
    }


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-neox"])
@pytest.mark.parametrize("weight_quant", list(WEIGHT_TOLERANCE))
@pytest.mark.parametrize("rope_mode", ["realign", "exact", "absolute"])
def test_weight_quant_runs_close_to_float_and_composes(tiny_models, quantized_models, model, weight_quant, rope_mode):
    loaded = quantized_models[model, weight_quant]
    wanted = RunConfig(model=model, method="dense", attn_implementation="eager", device="cpu",
                       weight_quant=weight_quant)
    assert loaded.serves(wanted) and not tiny_models[model].serves(wanted)  # the model key includes weight_quant
    knobs = dict(method="streaming", sink=4, window=24, compress_every=4, max_tokens=120, rope_mode=rope_mode,
                 weight_quant=weight_quant)
    reference = run(tiny_models[model], **{**knobs, "weight_quant": "none"})
    result = run(loaded, **knobs)
    assert np.abs(nlls(result) - nlls(reference)).mean() < WEIGHT_TOLERANCE[weight_quant]
    assert result.summary["weights_bytes"] < 0.6 * result.summary["weights_bytes_float"]
    assert result.summary["environment"]["weight_quant_backend"] == "torchao"
    assert result.summary["environment"]["weight_quant_tensor"]  # the tensor class that actually ran
    both = run(loaded, kv_quant="int8", kv_quant_group=8, **knobs)
    assert np.abs(nlls(both) - nlls(result)).mean() < 0.05


def test_non_finite_nll_fails_the_run_naming_the_step():
    loaded = LoadedModel.load(RunConfig(model="tiny-llama", method="dense", attn_implementation="eager", device="cpu"))
    config = RunConfig(model="tiny-llama", method="streaming", sink=4, window=24, attn_implementation="eager",
                       device="cpu", max_tokens=120)
    ids = evaluate(config, loaded=loaded).tokens.column("token_id").to_numpy()
    poisoned = int(ids[50])
    first = int(np.flatnonzero(ids == poisoned)[0])
    with torch.no_grad():
        loaded.model.get_input_embeddings().weight[poisoned] = float("nan")
    with pytest.raises(FloatingPointError, match=f"NLL is nan at step {first} "):
        evaluate(config, loaded=loaded)


def test_group_not_dividing_head_dim_is_refused_before_the_weights_load(monkeypatch):
    evaluate_module = importlib.import_module("streaming_llm.evaluate")  # the package's `evaluate` is the function

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights loaded before the check")

    monkeypatch.setattr(evaluate_module, "load_model", no_weights)
    config = RunConfig(model="tiny-neox", method="streaming", sink=4, window=24, kv_quant="int4", kv_quant_group=32,
                       device="cpu")
    with pytest.raises(ConfigError, match=r"does not divide head_dim = 16 .* \(2, 4, 8, 16\)"):
        LoadedModel.load(config)
