"""grids/paper.yaml's retrieval experiment holds the cells its description promises: at least 10 trials each, the
needle beyond every window at depth 0.5 (the schedule keeps none of it under strict, all of it under dense) and
inside strict's window at 0.78 and 0.9, on the embedded model's own tokenizer."""

from __future__ import annotations

from pathlib import Path

from gridrun.spec import load_grid
from streaming_llm.models import load_tokenizer
from streaming_llm.task_run import _retained, task_instances

ROOT = Path(__file__).resolve().parent.parent


def test_retrieval_cells_put_the_needle_where_the_grid_says():
    grid = load_grid(ROOT / "grids" / "paper.yaml")
    configs = [run.config for run in grid.runs if "retrieval" in run.experiments]
    assert configs and all(c.mode == "task" and c.trials >= 10 and c.context_tokens == 1024 for c in configs)
    tokenizer = load_tokenizer(configs[0].model)
    retained: dict[tuple, set[int]] = {}
    for config in configs:
        kind = (config.method, config.compress_every, config.refresh, config.kv_quant)
        for _, instance in task_instances(config, tokenizer):
            needle = instance.needle_end - instance.needle_start
            held = _retained(config, instance, instance.question_start)
            retained.setdefault((*kind, instance.depth), set()).add(held / needle)
    assert retained[("dense", 1, 0, "none", 0.5)] == {1.0}
    assert retained[("streaming", 1, 0, "none", 0.5)] == {0.0}  # beyond strict's window: none of it
    assert retained[("streaming", 1, 0, "none", 0.78)] == retained[("streaming", 1, 0, "none", 0.9)] == {1.0}
    assert retained[("streaming", 64, 0, "none", 0.9)] == {1.0}
    assert ("streaming", 64, 0, "none", 0.78) in retained and ("streaming", 64, 32, "none", 0.5) in retained
    assert all(c.protocol == "parallel" for c in configs)  # stepwise (kv_quant) trials cost minutes each here
