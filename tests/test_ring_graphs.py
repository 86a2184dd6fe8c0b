"""What compile reduce-overhead needs from the ring cache, checked on the CPU: a ring never changes shape once decoding
began (it refuses to grow), the buffers a decode step touches are all handed to CUDA graphs as static inputs, a
fallback without graphs is an error, and logits a caller keeps survive the next replay (steppers.CudaGraphCheck)."""

from __future__ import annotations

import pytest
import torch

from streaming_llm import RunConfig
from streaming_llm.steppers import CudaGraphCheck, RingStepper
from tests.conftest import TEST_DEVICE

POLICY = dict(sink=2, window=16, compress_every=4, refresh=3, refresh_policy="middle", overlap=2)
KV_QUANT = {"none": {}, "int8": dict(kv_quant="int8", kv_quant_group=8, kv_quant_residual=4)}


def ring_stepper(tiny_models, kv_quant: str) -> RingStepper:
    loaded = tiny_models["tiny-llama"]
    config = RunConfig(model=loaded.name, attn_implementation="eager", device=TEST_DEVICE, warmup=1, max_tokens=200,
                       layout="ring", **POLICY, **KV_QUANT[kv_quant])
    return RingStepper(loaded, config)


def ids(count: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 200, (1, count), generator=torch.Generator().manual_seed(seed)).to(TEST_DEVICE)


@pytest.mark.parametrize("kv_quant", list(KV_QUANT))
def test_a_prefill_grows_the_ring_but_nothing_after_the_first_decode_step(tiny_models, kv_quant):
    stepper = ring_stepper(tiny_models, kv_quant)
    capacity = stepper.cache.capacity
    with torch.inference_mode():
        stepper.forward(ids(capacity + 10), all_logits=True)  # before decoding: the ring grows to hold it
        assert stepper.cache.capacity > capacity
        stepper.compact()
        for step in range(3):
            stepper.forward(ids(1, step))
            stepper.compact()
        with pytest.raises(RuntimeError, match="grow .* after decoding began"):
            stepper.forward(ids(2 * stepper.cache.capacity), all_logits=True)


@pytest.mark.parametrize("kv_quant", list(KV_QUANT))
def test_every_buffer_a_decode_step_touches_is_marked_static_under_reduce_overhead(tiny_models, kv_quant):
    stepper = ring_stepper(tiny_models, kv_quant)
    with torch.inference_mode():
        stepper.forward(ids(1))
    storage = stepper.cache.storage
    buffers = storage.device_buffers()
    ids_of = {id(buffer) for buffer in buffers}
    touched = [storage.mask, storage.anchor_source, storage.anchor_cos, storage.anchor_sin, *storage.tensors()]
    if kv_quant == "none":
        touched += [*storage.keys, *storage.values, storage.decode_slots, storage.write_slots]
    else:
        touched += [*storage.floats, storage.decode_indices, storage.age_source, storage.age_target,
                    storage.float_target]
    assert all(id(buffer) in ids_of for buffer in touched)
    CudaGraphCheck("default").mark_static(buffers)
    assert not any(hasattr(buffer, "_dynamo_static_input_type") for buffer in buffers)
    CudaGraphCheck("reduce-overhead").mark_static(buffers)
    assert all(getattr(buffer, "_dynamo_static_input_type", None) == "unguarded" for buffer in buffers)


def test_a_compile_that_skipped_cuda_graphs_is_an_error(monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setitem(counters["inductor"], "cudagraph_skips", 5)
    graphs, other = CudaGraphCheck("reduce-overhead"), CudaGraphCheck("default")
    graphs.check_captured()  # skips before it was made are another run's
    counters["inductor"]["cudagraph_skips"] += 1
    other.check_captured()  # compile default captures no graphs: nothing to skip
    with pytest.raises(RuntimeError, match="skipped CUDA graphs"):
        graphs.check_captured()


def test_kept_logits_are_cloned_only_where_a_replay_would_overwrite_them():
    logits = torch.arange(6.0)
    kept = CudaGraphCheck("reduce-overhead").own(logits)
    assert torch.equal(kept, logits) and kept.data_ptr() != logits.data_ptr()
    assert CudaGraphCheck("default").own(logits) is logits


def test_cuda_graphs_given_up_later_in_a_run_are_an_error_at_the_next_step(monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setitem(counters["inductor"], "cudagraph_skips", 0)
    graphs = CudaGraphCheck("reduce-overhead")
    graphs.check_captured()
    graphs.own(torch.zeros(3))
    counters["inductor"]["cudagraph_skips"] += 1  # a re-record past the limit, many steps in
    with pytest.raises(RuntimeError, match="skipped CUDA graphs"):
        graphs.own(torch.zeros(3))
