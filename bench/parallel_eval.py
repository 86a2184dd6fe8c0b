"""Throughput of the parallel protocol against the stepwise one, and the largest NLL difference between them.

For each cap and method (dense, strict R=1, lazy R=64, recompute) on the embedded model, one process runs:
- stepwise: `evaluate()` with a prefill of cap - 8 tokens (so the cache is full at once) and `--steps` decode steps;
  its throughput is 1000 / median TPOT (decode tokens per second: what stepwise costs per token once warm);
- parallel: `evaluate(protocol=parallel)` over a `--tokens`-token stream without prefill (as quality runs are made);
  its throughput is predicted tokens / scoring wall time (compactions included);
- max |dNLL| between the stepwise run and the same configuration run in parallel (identical computations up to float
  rounding), over every step;
- the machine's plain prefill throughput at the same context (one forward of `--chunk` tokens over a cache of cap
  entries, no streaming): the ceiling for any chunked evaluator.
Recompute is compute-bound either way (every step re-reads cap tokens): its parallel throughput is that of
`--recompute-steps` full windows (`recompute_blocks` past the first cap steps), and its ratio is reported, not targeted.
Usage: python bench/parallel_eval.py [--caps 256 2048] [--tokens 4096] [--steps 160] [--chunk 256]
                                     [--model random-pythia-2.8b --device cuda --dtype float16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streaming_llm import LoadedModel, RunConfig, evaluate  # noqa: E402
from streaming_llm.parallel import recompute_blocks  # noqa: E402
from streaming_llm.text import load_stream  # noqa: E402

TARGET = 10.0
VARIANTS = {
    "dense": dict(method="dense"),
    "strict R=1": dict(method="streaming", sink=4, compress_every=1),
    "lazy R=64": dict(method="streaming", sink=4, compress_every=64),
    "recompute": dict(method="recompute"),
}


def synchronise(loaded: LoadedModel) -> None:
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)


def prefill_ceiling(loaded: LoadedModel, ids: torch.Tensor, context: int, chunk: int, rounds: int = 3) -> float:
    """Tokens/s of a plain forward of `chunk` tokens over a DynamicCache already holding `context` entries."""
    model = loaded.model
    best = float("inf")
    with torch.inference_mode():
        for _ in range(rounds):
            cache = DynamicCache(config=model.config)
            model(input_ids=ids[:, :context], cache=cache, use_cache=True, logits_to_keep=1)
            synchronise(loaded)
            start = time.perf_counter()
            model(input_ids=ids[:, context : context + chunk], cache=cache, use_cache=True, logits_to_keep=0)
            synchronise(loaded)
            best = min(best, time.perf_counter() - start)
    return chunk / best


def full_windows_rate(loaded: LoadedModel, ids: torch.Tensor, cap: int, steps: int, chunk: int) -> float:
    """Steps/s of parallel recompute over `steps` full windows (the steady state; the first cap steps are cheaper)."""
    with torch.inference_mode():
        synchronise(loaded)
        start = time.perf_counter()
        for _ in recompute_blocks(loaded.model, ids, cap, chunk, range(cap, cap + steps)):
            pass
        synchronise(loaded)
        return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--caps", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--tokens", type=int, default=4096, help="parallel stream length")
    parser.add_argument("--steps", type=int, default=160, help="stepwise decode steps after the prefill")
    parser.add_argument("--recompute-steps", type=int, default=24)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()

    common = dict(model=args.model, device=args.device, dtype=args.dtype)
    loaded = LoadedModel.load(RunConfig(method="dense", **common))
    stream = load_stream(loaded.tokenizer, "shakespeare", args.tokens + max(args.caps), 0)
    ids = torch.as_tensor(stream.ids, device=loaded.device).unsqueeze(0)
    where = f"{args.device} ({torch.cuda.get_device_name(loaded.device)})" if args.device == "cuda" else (
        f"cpu, torch threads {torch.get_num_threads()}")
    print(f"model {args.model} {args.dtype} on {where}, parallel stream {args.tokens} tokens, "
          f"chunk {args.chunk}, stepwise {args.steps} decode steps (recompute: {args.recompute_steps})")
    header = (f"{'cap':>5} {'variant':<11} {'stepwise tok/s':>14} {'parallel tok/s':>14} {'ratio':>7} "
              f"{'target':>7} {'max|dNLL|':>10} {'steps cmp':>9} {'% of prefill':>12}")
    print(header)
    print("-" * len(header))
    for cap in args.caps:
        ceiling = prefill_ceiling(loaded, ids, cap, args.chunk)
        for name in args.variants:
            knobs = dict(VARIANTS[name], **common, prefill=cap - 8)
            if name != "dense":
                knobs["cap"] = cap
            steps = args.recompute_steps if name == "recompute" else args.steps
            stepwise = evaluate(RunConfig(max_tokens=cap - 8 + steps + 1, warmup=4, **knobs), loaded=loaded,
                                stream=stream)
            same = evaluate(RunConfig(max_tokens=cap - 8 + steps + 1, protocol="parallel", chunk=args.chunk, **knobs),
                            loaded=loaded, stream=stream)
            compared = stepwise.tokens.num_rows
            delta = np.abs(stepwise.tokens.column("nll").to_numpy() - same.tokens.column("nll").to_numpy()).max()
            stepwise_rate = 1000.0 / stepwise.summary["tpot_ms_median"]
            if name == "recompute":
                parallel_rate = full_windows_rate(loaded, ids, cap, steps, args.chunk)
            else:
                knobs["prefill"] = 0
                parallel = evaluate(RunConfig(max_tokens=args.tokens, protocol="parallel", chunk=args.chunk, **knobs),
                                    loaded=loaded, stream=stream)
                parallel_rate = parallel.summary["eval_tokens_per_s"]
            target = "-" if name == "recompute" else ("met" if parallel_rate / stepwise_rate >= TARGET else "MISSED")
            print(f"{cap:>5} {name:<11} {stepwise_rate:>14.1f} {parallel_rate:>14.1f} "
                  f"{parallel_rate / stepwise_rate:>6.1f}x {target:>7} {delta:>10.1e} {compared:>9} "
                  f"{100 * parallel_rate / ceiling:>11.0f}%", flush=True)
        print(f"{cap:>5} plain prefill of {args.chunk} tokens over {cap} cached: {ceiling:.0f} tok/s (the ceiling)")


if __name__ == "__main__":
    main()
