"""What the exact block stepper costs per step: a 1-token block through `parallel.BlockStepper` (what every
speculative streaming run verifies with) against a step of the stepwise `StreamingCache`, side by side.

Both follow the same stream on the embedded model under the same policy (realign), interleaved token by token after a
warm-up that fills the cache; each is timed per step (its forward plus its compaction), and the figure is the ratio
of the medians (and of the means, which include the block stepper's periodic work: dropping evicted entries every 64,
moving its rotary base every H + R tokens). A speculative run's gain over `spec: none` is bounded by this ratio: a
block that costs more than a step loses that much of what drafting wins.
Usage: python bench/block_step.py [--cap 128] [--compress-every 1 32] [--steps 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streaming_llm import LoadedModel, RunConfig, StreamingCache  # noqa: E402
from streaming_llm.compat import cache_kwargs  # noqa: E402
from streaming_llm.parallel import BlockStepper  # noqa: E402
from streaming_llm.rope import RotaryGeometry  # noqa: E402
from streaming_llm.text import load_stream  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cap", type=int, default=128)
    parser.add_argument("--compress-every", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--steps", type=int, default=300, help="timed steps after the cache has filled")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = LoadedModel.load(RunConfig(model=args.model, method="dense", device="cpu"))
    model = loaded.model
    warmup = args.cap + 22
    ids = torch.as_tensor(load_stream(loaded.tokenizer, "shakespeare", warmup + args.steps).ids).unsqueeze(0)
    print(f"{args.model} on cpu, {args.threads} thread(s), cap {args.cap}, realign; {args.steps} steps")
    print(f"{'policy':10} {'block ms':>9} {'step ms':>8} {'block / step':>13} {'mean ratio':>11}")
    for compress_every in args.compress_every:
        policy = RunConfig(model=args.model, method="streaming", compress_every=compress_every, cap=args.cap).policy
        block = BlockStepper(model, policy, "realign")
        cache = StreamingCache(policy, RotaryGeometry.of(model), model.config.num_hidden_layers, "realign")

        def step(t: int, cache: StreamingCache = cache) -> None:
            model(input_ids=ids[:, t : t + 1], position_ids=cache.next_positions(1), logits_to_keep=0,
                  **cache_kwargs(cache))
            cache.compact_pending()

        block_ms, step_ms = [], []
        with torch.inference_mode():
            for t in range(warmup):
                block.forward_block(ids[:, t : t + 1])
                step(t)
            for t in range(warmup, warmup + args.steps):
                start = time.perf_counter()
                block.forward_block(ids[:, t : t + 1])
                block_ms.append((time.perf_counter() - start) * 1e3)
                start = time.perf_counter()
                step(t)
                step_ms.append((time.perf_counter() - start) * 1e3)
        block_median, step_median = statistics.median(block_ms), statistics.median(step_ms)
        name = f"R={compress_every}"
        mean_ratio = statistics.fmean(block_ms) / statistics.fmean(step_ms)
        print(f"{name:10} {block_median:9.2f} {step_median:8.2f} {block_median / step_median:12.3f}x "
              f"{mean_ratio:10.3f}x")


if __name__ == "__main__":
    main()
