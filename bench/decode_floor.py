"""Decode time against the weight-read floor: median ms per token of fixed-span dense, strict (R=1), lazy (R=16, 64),
recompute and int8 KV, each as eager compact, eager ring and compiled ring where it runs, side by side in one process,
as ratios to the floor and to fixed-span dense under the same setting.

The floor is measured, not computed: one pass over every weight matrix of the model (F.linear of one token over each,
the tied embedding once) plus the KV bytes a step at span C must read (one query against C keys and values per
layer). Variants are interleaved in short rounds (rotating their order) so that drift of a shared machine hits all of
them alike. Compiled variants compile on their first step, before any round (their compile time is printed apart).
int8 KV runs lazy at the largest R in every setting (the ring holds its codes in fixed slots); the recompute baseline
has no cache, so it has no ring: eager, and under `compiled` its full-window forward compiled (`compile` without
`layout`). Every stepper is filled (a prefill of C tokens, then past its first compactions) before the rounds.
Usage: python bench/decode_floor.py [--capacity 256] [--rounds 8] [--steps 8] [--settings compact,ring,compiled]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streaming_llm import LoadedModel, RunConfig  # noqa: E402
from streaming_llm.measure import Stopwatch  # noqa: E402
from streaming_llm.policy import CompactionPlan  # noqa: E402
from streaming_llm.steppers import RecomputeStepper, RingStepper, StreamingStepper  # noqa: E402
from streaming_llm.text import load_stream  # noqa: E402

SETTINGS = {"compact": "eager compact", "ring": "eager ring", "compiled": "compiled ring"}
TARGETS = {  # the targets on a CPU: (variant, setting, reference: floor, dense or a variant) -> ratio
    ("lazy R=64", "compiled", "floor"): 1.3,
    ("strict R=1", "ring", "dense"): 1.05,
    ("int8 KV R=64", "compiled", "lazy R=64"): 1.05,
}


class FixedSpanCompact(StreamingStepper):
    """The compact cache held at exactly `span` entries, never compacted or re-rotated: each step appends in place,
    then the entry is dropped by shortening the cache (no data moves)."""

    def __init__(self, loaded: LoadedModel, config: RunConfig, span: int, ids: torch.Tensor):
        super().__init__(loaded, config)
        self.kept = span - 1
        self.forward(ids[:, :self.kept], all_logits=False)

    def compact(self):
        self.cache.pending = CompactionPlan(self.kept + 1, tuple(range(self.kept)))
        self.cache.compact_pending()
        return None


class FixedSpanRing(RingStepper):
    """The ring held at exactly `span` entries: each step writes one slot, then frees it (`drop_newest`)."""

    def __init__(self, loaded: LoadedModel, config: RunConfig, span: int, ids: torch.Tensor):
        super().__init__(loaded, config)
        self.forward(ids[:, : span - 1], all_logits=True)

    def compact(self):
        self.cache.drop_newest(1)
        return None


def floor_pass(loaded: LoadedModel, span: int) -> Callable[[], None]:
    """One read of every weight matrix (F.linear of one token) and of the KV a step at `span` attends."""
    model, config = loaded.model, loaded.model.config
    weights = {id(p): p for p in model.parameters() if p.dim() == 2}.values()  # a tied embedding once
    inputs = [torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device) for w in weights]
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    shape = (config.num_hidden_layers, kv_heads, span, head_dim)
    keys = torch.randn(shape, dtype=model.dtype, device=loaded.device)
    values = torch.randn(shape, dtype=model.dtype, device=loaded.device)
    query = torch.randn((config.num_hidden_layers, kv_heads, 1, head_dim), dtype=model.dtype, device=loaded.device)

    def run() -> None:
        for weight, x in zip(weights, inputs, strict=True):
            F.linear(x, weight)
        scores = query @ keys.transpose(-1, -2)
        _ = scores.softmax(-1) @ values

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--capacity", type=int, default=256, help="C = sink + window: the span of every variant")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant per round")
    parser.add_argument("--recompute-steps", type=int, default=2, help="timed recompute steps per round (slow)")
    parser.add_argument("--settings", default="compact,ring,compiled", help="comma-separated: compact, ring, compiled")
    parser.add_argument("--lazy", default="16,64", help="comma-separated R values of the lazy variants")
    parser.add_argument("--no-recompute", action="store_true", help="leave the recompute baseline out (slow at 2048)")
    parser.add_argument("--kv-quant-group", type=int, default=32, help="int8 KV: elements per scale (divides head_dim)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    settings = [s for s in args.settings.split(",") if s]
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        parser.error(f"--settings {', '.join(sorted(unknown))}: known are {', '.join(SETTINGS)}")

    base = dict(model=args.model, dtype=args.dtype, device=args.device, max_tokens=1 << 20)
    loaded = LoadedModel.load(RunConfig(**base, method="dense"))
    lazy = [int(r) for r in args.lazy.split(",") if r]
    longest = max([1, *lazy])
    per_round = args.steps * (2 + len(lazy)) * len(settings) + args.steps + args.recompute_steps
    need = args.capacity + 2 * longest + args.rounds * per_round + 64
    ids = torch.as_tensor(load_stream(loaded.tokenizer, "shakespeare", need).ids, device=loaded.device).unsqueeze(0)
    window = args.capacity - args.sink

    def config(setting: str, method: str = "streaming", **knobs) -> RunConfig:
        layout = dict(compact={}, ring=dict(layout="ring"), compiled=dict(layout="ring", compile="default"))[setting]
        if method == "recompute":
            layout = dict(compile="default") if setting == "compiled" else {}
        return RunConfig(**base, method=method, **layout, **knobs)

    steppers: dict[tuple[str, str], object] = {}
    for setting in settings:
        no_eviction = config(setting, sink=0, window=args.capacity + 8)
        dense = FixedSpanCompact if setting == "compact" else FixedSpanRing
        steppers["dense fixed span", setting] = dense(loaded, no_eviction, args.capacity, ids)
        for r in [1, *lazy]:
            name = "strict R=1" if r == 1 else f"lazy R={r}"
            policy = config(setting, sink=args.sink, window=window, compress_every=r)
            steppers[name, setting] = (StreamingStepper if setting == "compact" else RingStepper)(loaded, policy)
        quantized = config(setting, sink=args.sink, window=window, compress_every=longest, kv_quant="int8",
                           kv_quant_group=args.kv_quant_group)
        steppers[f"int8 KV R={longest}", setting] = (StreamingStepper if setting == "compact" else RingStepper)(
            loaded, quantized)
        if not args.no_recompute and setting != "ring":
            steppers["recompute", setting] = RecomputeStepper(loaded, config(setting, "recompute", cap=args.capacity))

    cursor = dict.fromkeys(steppers, 0)
    clock = Stopwatch(loaded.device)
    floor = floor_pass(loaded, args.capacity)

    def run(key, count: int, record: Callable[[float], None] | None) -> None:
        stepper = steppers[key]
        for _ in range(count):
            if stepper is None:
                clock.start()
                floor()
                elapsed = clock.stop()
            else:
                position = cursor[key]
                cursor[key] += 1
                clock.start()
                stepper.forward(ids[:, position : position + 1])
                stepper.compact()
                elapsed = clock.stop()
            if record is not None:
                record(elapsed)

    compile_s: dict[tuple[str, str], float] = {}
    with torch.inference_mode():
        # Fill every streaming cache in one prefill, then past its first compactions (its periodic regime); the
        # compiled ones compile on their first decode step, here.
        for key, stepper in steppers.items():
            started = time.perf_counter()
            if not key[0].startswith("dense"):  # the recompute baseline too: its window full, as at every step after
                stepper.forward(ids[:, : args.capacity], all_logits=True)
                stepper.compact()
                cursor[key] = args.capacity
                run(key, 2 if key[0] == "recompute" else 2 * longest, None)  # recompute has no compaction period
            else:
                run(key, 2, None)
            if key[1] == "compiled":
                compile_s[key] = time.perf_counter() - started
            print(f"filled {key[0]} ({SETTINGS[key[1]]}) in {time.perf_counter() - started:.0f} s", file=sys.stderr,
                  flush=True)
        steppers["floor", "-"] = None
        cursor["floor", "-"] = 0
        samples: dict[tuple[str, str], list[float]] = {key: [] for key in steppers}
        keys = list(steppers)
        for round_index in range(args.rounds):
            order = keys[round_index % len(keys) :] + keys[: round_index % len(keys)]
            for key in order:
                count = args.recompute_steps if key[0] == "recompute" else args.steps
                run(key, count, samples[key].append)

    median = {key: statistics.median(values) for key, values in samples.items()}
    mean = {key: statistics.mean(values) for key, values in samples.items()}
    floor_ms = median["floor", "-"]
    print(f"model {args.model} ({loaded.device}, {args.dtype}, {torch.get_num_threads()} threads), C = "
          f"{args.capacity} (sink {args.sink} + window {window}), {args.rounds} interleaved rounds of {args.steps} "
          f"steps; floor (weights once + KV at C) {floor_ms:.2f} ms")
    print(f"{'variant':<18}{'setting':<15}{'median ms':>10}{'mean ms':>9}{'x floor':>9}{'x dense':>9}  target")
    for key in steppers:
        if key[0] == "floor":
            continue
        variant, setting = key
        dense = median.get(("dense fixed span", setting))
        ratios = {"floor": median[key] / floor_ms, "dense": median[key] / dense if dense else float("nan")}
        target = next(((reference, limit) for (v, s, reference), limit in TARGETS.items()
                       if (v, s) == key), None)
        verdict = ""
        if target is not None and (target[0] in ratios or (target[0], setting) in median):
            ratio = ratios[target[0]] if target[0] in ratios else median[key] / median[target[0], setting]
            verdict = f"{ratio:.2f}x {target[0]}, target <= {target[1]:.2f}x: " + ("met" if ratio <= target[1]
                                                                                   else "MISSED")
        label = "compiled" if variant == "recompute" and setting == "compiled" else SETTINGS[setting]
        print(f"{variant:<18}{label:<15}{median[key]:>10.2f}{mean[key]:>9.2f}{ratios['floor']:>8.2f}x"
              f"{ratios['dense']:>8.2f}x  {verdict}")
    for key, seconds in compile_s.items():
        print(f"compile + warm-up of {key[0]} ({key[1]}): {seconds:.1f} s")
    print("not run: recompute in the ring layout (it holds no cache)")


if __name__ == "__main__":
    main()
