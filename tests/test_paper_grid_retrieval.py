"""grids/paper.yaml's retrieval experiment holds the cells its description promises: at least 10 trials each, the
needle's tokens held when the question starts and when the answer starts as the description says (the cliff of strict
at its window, lazy's sawtooth, lazy's extra tokens at the soft cap, refresh, the long context, the quantized keys), on
the embedded model's own tokenizer."""

from __future__ import annotations

from pathlib import Path

from gridrun.spec import load_grid
from streaming_llm.models import load_tokenizer
from streaming_llm.steppers import StepwiseTarget
from streaming_llm.task_run import _retained, task_instances

ROOT = Path(__file__).resolve().parent.parent


def test_retrieval_cells_put_the_needle_where_the_grid_says():
    grid = load_grid(ROOT / "grids" / "paper.yaml")
    configs = [run.config for run in grid.runs if "retrieval" in run.experiments]
    assert configs and all(c.mode == "task" and c.trials >= 10 and c.task == "passkey" for c in configs)
    tokenizer = load_tokenizer(configs[0].model)
    held: dict[tuple, set[tuple[int, int, int]]] = {}
    for config in configs:
        kind = (config.method, config.compress_every, config.cap_mode, config.refresh, config.kv_quant,
                config.context_tokens)
        for _, instance in task_instances(config, tokenizer):
            assert instance.needle_end - instance.needle_start == 25
            held.setdefault((*kind, instance.depth), set()).add(
                (instance.distance, _retained(config, instance, instance.question_start),
                 _retained(config, instance, len(instance.prompt_ids) - 1)))
    # (distance, held when the question starts, held when the answer starts): one value per cell (shared haystack)
    expected = {
        ("dense", 1, "peak", 0, "none", 1024, 0.5): (477, 25, 25),
        ("dense", 1, "peak", 0, "none", 1024, 0.7): (285, 25, 25),
        ("dense", 1, "peak", 0, "none", 1024, 0.76): (227, 25, 25),
        ("streaming", 1, "peak", 0, "none", 1024, 0.76): (227, 24, 14),
        ("streaming", 1, "peak", 0, "none", 1024, 0.78): (208, 25, 25),
        ("streaming", 64, "peak", 0, "none", 1024, 0.78): (208, 25, 25),
        ("streaming", 64, "soft", 0, "none", 1024, 0.7): (285, 14, 14),
        ("streaming", 64, "soft", 0, "none", 1024, 0.72): (265, 25, 25),
        ("streaming", 64, "peak", 32, "none", 1024, 0.72): (265, 3, 3),
        ("dense", 1, "peak", 0, "none", 12288, 0.99): (120, 25, 25),
        ("streaming", 1, "peak", 0, "none", 12288, 0.99): (120, 25, 25),
        **{("streaming", 1, "peak", 0, quant, 256, 0.1): (165, 25, 25) for quant in ("none", "int8", "int4")},
    }
    assert {cell: values for cell, values in held.items()} == {cell: {value} for cell, value in expected.items()}
    kv_quant = [c for c in configs if c.context_tokens == 256]
    assert all(c.protocol == "stepwise" for c in kv_quant)  # kv_quant has no parallel path
    for config in kv_quant:  # the context in one causal forward: a token per forward would cost minutes per cell
        assert all(StepwiseTarget.one_forward_is_exact(config, len(instance.context_ids))
                   for _, instance in task_instances(config, tokenizer))
    assert all(c.protocol == "parallel" for c in configs if c not in kv_quant)
