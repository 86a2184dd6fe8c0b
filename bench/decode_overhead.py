"""Decode overhead of StreamingLLM compaction: median ms per token of strict (R=1) and lazy (R=16, 64) streaming and of
sliding-window recompute, as ratios to a dense cache held at a fixed span equal to C, measured side by side.

Two dense references: HF's DynamicCache (which concatenates the whole cache at every step) and the same preallocated,
append-in-place storage the streaming cache uses, never compacted; the second is the stricter one, since it isolates
the cost of compaction and re-rotation. Variants are interleaved in short rounds (rotating their order) so that drift
of the machine hits all of them alike. Each variant's mean attention span is printed next to its ratio.
Usage: python bench/decode_overhead.py [--model smollm2-135m] [--capacity 256] [--rounds 16] [--steps 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streaming_llm import LoadedModel, RunConfig  # noqa: E402
from streaming_llm.evaluate import DenseStepper, RecomputeStepper, StreamingStepper  # noqa: E402
from streaming_llm.measure import Stopwatch  # noqa: E402
from streaming_llm.policy import CompactionPlan  # noqa: E402
from streaming_llm.text import load_stream  # noqa: E402

TARGETS = {"lazy R=64": 1.05, "strict R=1": 1.15}


class FixedSpanDense(DenseStepper):
    """HF's DynamicCache held at exactly `span` entries: each step appends one entry, then the cache drops it again."""

    def __init__(self, loaded: LoadedModel, config: RunConfig, span: int, ids: torch.Tensor):
        super().__init__(loaded, config)
        self.forward(ids[:, : span - 1], all_logits=False)

    def compact(self):
        self.cache.crop(-1)
        return None


class FixedSpanInPlace(StreamingStepper):
    """The streaming cache's own storage held at exactly `span` entries, never compacted or re-rotated: each step
    appends in place, then the entry is dropped by shortening the cache (no data moves)."""

    def __init__(self, loaded: LoadedModel, config: RunConfig, span: int, ids: torch.Tensor):
        super().__init__(loaded, config)
        self.span_kept = span - 1
        self.forward(ids[:, : span - 1], all_logits=False)

    def compact(self):
        self.cache.pending = CompactionPlan(self.span_kept + 1, tuple(range(self.span_kept)))
        self.cache.compact_pending()
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--capacity", type=int, default=256, help="C = sink + window: the span of every variant")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--steps", type=int, default=16, help="timed steps per variant per round")
    parser.add_argument("--recompute-steps", type=int, default=4, help="timed recompute steps per round (slow)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    base = dict(model=args.model, dtype=args.dtype, device=args.device, max_tokens=1 << 20)
    loaded = LoadedModel.load(RunConfig(**base, method="dense"))
    need = args.capacity + 64 * 4 + args.rounds * (args.steps * 4 + args.recompute_steps) + 64
    ids = torch.as_tensor(load_stream(loaded.tokenizer, "shakespeare", need).ids, device=loaded.device).unsqueeze(0)
    window = args.capacity - args.sink

    def streaming(r: int) -> StreamingStepper:
        config = RunConfig(**base, method="streaming", sink=args.sink, window=window, compress_every=r)
        return StreamingStepper(loaded, config)

    no_eviction = RunConfig(**base, method="streaming", sink=0, window=args.capacity + 8)
    steppers: dict[str, DenseStepper] = {
        "dense fixed span C": FixedSpanDense(loaded, RunConfig(**base, method="dense"), args.capacity, ids),
        "in-place fixed span C": FixedSpanInPlace(loaded, no_eviction, args.capacity, ids),
        "strict R=1": streaming(1),
        "lazy R=16": streaming(16),
        "lazy R=64": streaming(64),
        "recompute (cap=C)": RecomputeStepper(loaded, RunConfig(**base, method="recompute", cap=args.capacity)),
    }
    cursor = {name: 0 for name in steppers}
    spans: dict[str, list[int]] = {name: [] for name in steppers}
    clock = Stopwatch(loaded.device)

    def run(name: str, count: int, record: Callable[[float], None] | None) -> None:
        stepper = steppers[name]
        for _ in range(count):
            position = cursor[name]
            cursor[name] += 1
            clock.start()
            stepper.forward(ids[:, position : position + 1])
            span = stepper.span()
            stepper.compact()
            elapsed = clock.stop()
            if record is not None:
                record(elapsed)
                spans[name].append(span)

    with torch.inference_mode():
        # Fill every streaming cache past its first compactions, so that all are in their periodic regime.
        for name in ("strict R=1", "lazy R=16", "lazy R=64"):
            run(name, args.capacity + 2 * 64, None)
        run("recompute (cap=C)", args.capacity, None)
        samples: dict[str, list[float]] = {name: [] for name in steppers}
        names = list(steppers)
        for round_index in range(args.rounds):
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for name in order:
                count = args.recompute_steps if name.startswith("recompute") else args.steps
                run(name, count, samples[name].append)

    hf_dense = statistics.median(samples["dense fixed span C"])
    in_place = statistics.median(samples["in-place fixed span C"])
    print(f"model {args.model} ({loaded.device}, {args.dtype}, {torch.get_num_threads()} threads), C = {args.capacity}"
          f" (sink {args.sink} + window {window}), {args.rounds} interleaved rounds")
    print(f"{'variant':<24}{'steps':>6}{'mean span':>10}{'median ms':>11}{'p95 ms':>9}{'vs HF dense':>13}"
          f"{'vs in-place':>13}  target (on both)")
    for name, values in samples.items():
        median = statistics.median(values)
        p95 = statistics.quantiles(values, n=20)[-1]
        ratios = (median / hf_dense, median / in_place)
        target = TARGETS.get(name)
        verdict = "" if target is None else f"<= {target:.2f}x " + "/".join(
            "met" if ratio <= target else "MISSED" for ratio in ratios)
        print(f"{name:<24}{len(values):>6}{statistics.mean(spans[name]):>10.1f}{median:>11.2f}{p95:>9.2f}"
              f"{ratios[0]:>12.3f}x{ratios[1]:>12.3f}x  {verdict}")


if __name__ == "__main__":
    main()
