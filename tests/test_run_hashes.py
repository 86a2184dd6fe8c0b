"""Pins the run identities of a dozen varied configurations, computed on the code before the knob groups moved onto
RunConfig's fields (commit a661e9e): a refactor of the config or its normalisation must leave every stored run's hash
as it was, or a store would rerun (and lose track of) everything it holds."""

from __future__ import annotations

import pytest

from streaming_llm.config import RunConfig

# name: (knobs, run_hash, config_hash, group_hash, setting_hash)
PINNED = {
    "dense": (
        {"method": "dense", "max_tokens": 256},
        "2d25fd7405556d8c",
        "2d25fd7405556d8c",
        "b9cd4766eb9e77b0",
        "3057d5349f7f9511",
    ),
    "streaming_strict": (
        {"method": "streaming", "sink": 4, "window": 60, "max_tokens": 512},
        "45aa7c4337e69508",
        "73703ec53932cdf3",
        "f65006fd86f91189",
        "f07bda1d06205c7f",
    ),
    "streaming_lazy": (
        {
            "method": "streaming",
            "sink": 4,
            "cap": 128,
            "slack": 16,
            "compress_every": 8,
            "max_drop": 32,
            "max_tokens": 512,
        },
        "25f9414f3d49cdf1",
        "96f77f9b64543cd0",
        "ca88c168178952ab",
        "c1fca1f147825386",
    ),
    "streaming_soft_refresh": (
        {
            "method": "streaming",
            "sink": 4,
            "cap": 128,
            "cap_mode": "soft",
            "overlap": 8,
            "refresh": 8,
            "refresh_policy": "middle",
            "rope_mode": "exact",
            "max_tokens": 512,
        },
        "d3fdc484c52c31b4",
        "bc18ae2ce6e0267c",
        "ae3fb560cf05a3b2",
        "f6fd8af3efda7d9d",
    ),
    "recompute_parallel": (
        {"method": "recompute", "cap": 64, "protocol": "parallel", "chunk": 128, "score_stride": 4, "max_tokens": 512},
        "09a64654555b297e",
        "09a64654555b297e",
        "ca3342c874f5bd4b",
        "03564e182f065959",
    ),
    "kv_quant": (
        {
            "method": "streaming",
            "sink": 4,
            "window": 60,
            "kv_quant": "int4",
            "kv_quant_group": 16,
            "kv_quant_residual": 8,
            "kv_quant_sinks": "quantized",
        },
        "598d02520462c53b",
        "3ca69366a601a667",
        "f03bd86571b083f3",
        "55f8952a5175558a",
    ),
    "generate_spec": (
        {
            "mode": "generate",
            "method": "streaming",
            "sink": 4,
            "window": 60,
            "spec": "prompt_lookup",
            "num_draft": 6,
            "ngram_max": 2,
            "temperature": 0.7,
            "seed": 3,
            "prompt_tokens": 32,
            "new_tokens": 64,
        },
        "e1aca5a4c7645613",
        "4cc65f59edd783bd",
        "e10e3f39f7b20b81",
        "dce8908eeae3dadb",
    ),
    "generate_self_stream": (
        {"mode": "generate", "method": "dense", "spec": "self_stream", "draft_cap": 48},
        "b2226828a664f1d0",
        "b2226828a664f1d0",
        "c5b64a0d14050f06",
        "dd315ee19d777829",
    ),
    "weight_quant": (
        {
            "method": "dense",
            "weight_quant": "int8",
            "dtype": "float16",
            "dataset": "pg19",
            "sample": 2,
            "repeat": 1,
            "device": "cpu",
        },
        "0d5dc6e16037677a",
        "0d5dc6e16037677a",
        "619a338d670fcd7c",
        "6a25bb83344a4621",
    ),
    "dense_ignored_knobs": (
        {"method": "dense", "sink": 8, "compress_every": 64, "ngram_max": 5, "kv_quant_group": 8},
        "9ebc7651ac416329",
        "9ebc7651ac416329",
        "66a7ac6eeb4752cc",
        "3057d5349f7f9511",
    ),
    "generate_draft_layers": (
        {
            "mode": "generate",
            "method": "recompute",
            "cap": 96,
            "spec": "none",
            "draft_layers": 2,
            "new_tokens": 16,
            "warmup": 2,
        },
        "77cdf1bb6298b9ee",
        "77cdf1bb6298b9ee",
        "09fad691faf261cb",
        "04c4db2920808929",
    ),
    "generate_draft": (
        {"mode": "generate", "method": "streaming", "cap": 100, "spec": "draft", "draft_layers": 2, "num_draft": 3},
        "45ed6e96d76c8499",
        "fb2deff49cf0c36b",
        "acd7fd36dd6e1ce3",
        "372c5b7e3d24488a",
    ),
}


@pytest.mark.parametrize("name", list(PINNED))
def test_run_hashes_are_pinned(name: str) -> None:
    knobs, run_hash, config_hash, group_hash, setting_hash = PINNED[name]
    config = RunConfig(**knobs)
    assert (config.run_hash, config.config_hash, config.group_hash, config.setting_hash) == (
        run_hash,
        config_hash,
        group_hash,
        setting_hash,
    )
    assert RunConfig.from_dict(config.normalised()).run_hash == run_hash  # the stored JSON reads back as the same run
