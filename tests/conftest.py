"""Shared fixtures: tiny random models built in code (byte tokenizer, no download), loaded once per session."""

from __future__ import annotations

import os

import pytest
import torch

from streaming_llm import LoadedModel, RunConfig

TINY_MODELS = ("tiny-llama", "tiny-neox")

# The engine's exactness tests (tiny models, float32, eager attention) run on this device: cpu by default, cuda to check
# the GPU paths (GRIDRUN_TEST_DEVICE=cuda pytest tests/test_streaming_parallel.py ...).
TEST_DEVICE = os.environ.get("GRIDRUN_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(1)  # tiny models are faster on one thread, and runs stay reproducible


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, LoadedModel]:
    """LoadedModel per tiny model name, eager attention so that every comparison uses one attention kernel."""
    return {
        name: LoadedModel.load(RunConfig(model=name, method="dense", attn_implementation="eager", device=TEST_DEVICE))
        for name in TINY_MODELS
    }
