"""Shared fixtures: tiny random models built in code (byte tokenizer, no download), loaded once per session."""

from __future__ import annotations

import pytest
import torch

from streaming_llm import LoadedModel, RunConfig

TINY_MODELS = ("tiny-llama", "tiny-neox")


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(1)  # tiny models are faster on one thread, and runs stay reproducible


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, LoadedModel]:
    """LoadedModel per tiny model name, eager attention so that every comparison uses one attention kernel."""
    return {
        name: LoadedModel.load(RunConfig(model=name, method="dense", attn_implementation="eager", device="cpu"))
        for name in TINY_MODELS
    }
