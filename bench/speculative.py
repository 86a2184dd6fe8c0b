"""Speculative decoding on the embedded model: generated tokens/s of each draft kind against `spec: none`, under a
dense cache and under strict and lazy streaming, side by side in one process.

Every variant is a full generation run (streaming_llm.evaluate, mode generate, greedy) on the same Shakespeare prompt.
Variants are interleaved in rounds (rotating their order) so that drift of the machine hits all of them alike; the
figure of a variant is its median tokens/s over the rounds, reported as a ratio to spec none under the same policy,
with the acceptance rate, the mean accepted length (tokens per target forward) and whether the generated ids equal
spec none's. On a CPU a 135M model is weight-bound: a forward over k + 1 tokens costs little more than over one, which
is what prompt lookup exploits; a model draft (first layers, or the target over a small cache) costs a forward per
drafted token of its own, so it pays only when its acceptance is high.
Usage: python bench/speculative.py [--rounds 3] [--prompt-tokens 96] [--new-tokens 128] [--cap 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streaming_llm import LoadedModel, RunConfig, evaluate  # noqa: E402

POLICIES = {
    "dense": dict(method="dense"),
    "strict R=1": dict(method="streaming", compress_every=1),
    "lazy R=32": dict(method="streaming", compress_every=32),
}


def kinds(num_draft: int, draft_layers: int, draft_cap: int) -> dict[str, dict]:
    return {
        "none": dict(spec="none"),
        f"prompt_lookup k={num_draft}": dict(spec="prompt_lookup", num_draft=num_draft),
        f"draft layers={draft_layers} k=3": dict(spec="draft", draft_layers=draft_layers, num_draft=3),
        f"self_stream cap={draft_cap} k=3": dict(spec="self_stream", draft_cap=draft_cap, num_draft=3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--cap", type=int, default=128, help="streaming budget; generation crosses it")
    parser.add_argument("--num-draft", type=int, default=6, help="k of prompt lookup")
    parser.add_argument("--draft-layers", type=int, default=8)
    parser.add_argument("--draft-cap", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = dict(model=args.model, device=args.device, mode="generate", prompt_tokens=args.prompt_tokens,
                new_tokens=args.new_tokens, warmup=2, cap=args.cap)
    loaded = LoadedModel.load(RunConfig(**{**base, "method": "dense", "cap": None}))
    variants = {}
    for policy, knobs in POLICIES.items():
        for kind, spec in kinds(args.num_draft, args.draft_layers, args.draft_cap).items():
            config = {**base, **knobs, **spec}
            if knobs["method"] == "dense":
                config.pop("cap")
            variants[(policy, kind)] = RunConfig(**config)
    speeds: dict[tuple[str, str], list[float]] = {key: [] for key in variants}
    last = {}
    keys = list(variants)
    for index in range(args.rounds):
        shift = index % len(keys)
        for key in keys[shift:] + keys[:shift]:
            result = evaluate(variants[key], loaded=loaded)
            speeds[key].append(result.summary["tokens_per_s"])
            last[key] = result.summary
        print(f"round {index + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    print(f"{args.model}, {args.threads} thread(s), prompt {args.prompt_tokens} + {args.new_tokens} generated tokens, "
          f"streaming cap {args.cap}; median of {args.rounds} rounds")
    print(f"{'policy':<12} {'spec':<26} {'tokens/s':>9} {'vs none':>8} {'accept':>7} {'tok/fwd':>8} "
          f"{'compactions':>11} identical")
    for policy in POLICIES:
        reference = statistics.median(speeds[(policy, "none")])
        for kind in kinds(args.num_draft, args.draft_layers, args.draft_cap):
            summary = last[(policy, kind)]
            speed = statistics.median(speeds[(policy, kind)])
            acceptance = summary["acceptance_rate"]
            same = summary["generated_hash"] == last[(policy, "none")]["generated_hash"]
            print(f"{policy:<12} {kind:<26} {speed:9.2f} {speed / reference:7.2f}x "
                  f"{'-' if acceptance is None else f'{acceptance:.2f}':>7} {summary['mean_accepted_length']:8.2f} "
                  f"{summary['compaction_count']:11d} {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
