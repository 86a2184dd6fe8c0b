"""Speculative decoding on the embedded model: generated tokens/s of each draft kind against `spec: none`, under a
dense cache and under strict and lazy streaming, side by side in one process.

Every variant is a full generation run (streaming_llm.evaluate, mode generate, greedy) on the same Shakespeare prompt.
Variants are interleaved in rounds (rotating their order) so that drift of the machine hits all of them alike; the
figure of a variant is its median tokens/s over the rounds, reported as a ratio to spec none under the same policy,
with the acceptance rate, the mean accepted length (tokens per target forward) and whether the generated ids equal
spec none's. On a CPU a 135M model is weight-bound: a forward over k + 1 tokens costs little more than over one, which
is what prompt lookup exploits; a model draft (first layers, or the target over a small cache) costs a forward per
drafted token of its own, so it pays only when its acceptance is high.

Two more rows compare with HF's own `generate()` over a DynamicCache, greedy, without and with its prompt lookup
(`prompt_lookup_num_tokens` = k, `max_matching_ngram_size` = ngram_max), in the same rounds and timed like this
package's runs (decoding only, the prompt's forward left out). How much prompt lookup can gain depends on how often the
continuation repeats the history; tokens per forward measures that for each drafting rule, tokens/s adds each
implementation's own per-step cost. HF's output is checked against this package's dense spec-none output (the same
greedy ids, or it says NO).
Usage: python bench/speculative.py [--rounds 3] [--prompt-tokens 96] [--new-tokens 128] [--cap 128] [--threads 1]
                                   [--kinds prompt_lookup draft self_stream] [--num-draft 10] [--no-hf]
                                   [--model random-pythia-2.8b --device cuda --dtype float16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streaming_llm import LoadedModel, RunConfig, evaluate  # noqa: E402
from streaming_llm.compat import CACHE_KWARG  # noqa: E402
from streaming_llm.generate import generated_hash  # noqa: E402
from streaming_llm.measure import Stopwatch  # noqa: E402
from streaming_llm.text import load_stream  # noqa: E402

POLICIES = {
    "dense": dict(method="dense"),
    "strict R=1": dict(method="streaming", compress_every=1),
    "lazy R=32": dict(method="streaming", compress_every=32),
}


def kinds(args: argparse.Namespace) -> dict[str, dict]:
    every = {
        "none": dict(spec="none"),
        f"prompt_lookup k={args.num_draft}": dict(spec="prompt_lookup", num_draft=args.num_draft),
        f"draft layers={args.draft_layers} k=3": dict(spec="draft", draft_layers=args.draft_layers, num_draft=3),
        f"self_stream cap={args.draft_cap} k=3": dict(spec="self_stream", draft_cap=args.draft_cap, num_draft=3),
    }
    return {label: spec for label, spec in every.items() if spec["spec"] in ("none", *args.kinds)}


class HFReference:
    """HF `generate()` on the same prompt, greedy, over its DynamicCache: plain, or with its prompt lookup.

    Timed like this package's runs, which sum their decoding forwards and leave the prompt out: the whole call minus
    its first forward (the prompt's) over the tokens that came after those the first forward yielded (one, or more
    when HF's prompt lookup verified drafts in it: the cache length at the second forward tells).
    HF's own per-step work (logits processors, candidate search, cache cropping) stays in, as ours does.
    """

    def __init__(self, loaded: LoadedModel, prompt: list[int], new_tokens: int, num_draft: int, ngram_max: int):
        self.model = loaded.model
        self.prompt = torch.tensor([prompt], device=loaded.device)
        self.new_tokens = new_tokens
        self.lookup = dict(prompt_lookup_num_tokens=num_draft, max_matching_ngram_size=ngram_max)
        self.clock = Stopwatch(loaded.device)

    def run(self, lookup: bool) -> tuple[float, float, str]:
        """(generated tokens/s, generated tokens per forward, hash of the generated ids)."""
        forwards: list[float] = []  # the first forward's ms, then 0 for each later one (counted, not timed apart)
        first_yield: list[int] = []  # tokens the first forward produced
        prompt_clock = Stopwatch(self.prompt.device)

        def before(module, args, kwargs):
            if not forwards:
                prompt_clock.start()
            elif len(forwards) == 1:
                first_yield.append(kwargs[CACHE_KWARG].get_seq_length() - self.prompt.shape[1] + 1)

        def after(module, args, output):
            forwards.append(prompt_clock.stop() if not forwards else 0.0)

        hooks = [self.model.register_forward_pre_hook(before, with_kwargs=True),
                 self.model.register_forward_hook(after)]
        try:
            self.clock.start()
            with torch.inference_mode():
                out = self.model.generate(
                    self.prompt, attention_mask=torch.ones_like(self.prompt), do_sample=False,
                    max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens,  # never stopped early by EOS
                    pad_token_id=0,  # unused (one sequence, never finished early); set, HF warns at every call
                    **(self.lookup if lookup else {}),
                )
            total_ms = self.clock.stop()
        finally:
            for hook in hooks:
                hook.remove()
        generated = out[0, self.prompt.shape[1] :].tolist()
        if len(generated) != self.new_tokens:
            raise RuntimeError(f"HF generate() returned {len(generated)} tokens, not {self.new_tokens}")
        if not first_yield:
            raise RuntimeError(f"HF generate() made all {self.new_tokens} tokens in one forward: nothing to time")
        decoded = self.new_tokens - first_yield[0]
        return (decoded / ((total_ms - forwards[0]) / 1000.0), decoded / (len(forwards) - 1),
                generated_hash(generated))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--cap", type=int, default=128, help="streaming budget; generation crosses it")
    parser.add_argument("--num-draft", type=int, default=10, help="k of prompt lookup (HF's usual 10)")
    parser.add_argument("--draft-layers", type=int, default=8)
    parser.add_argument("--draft-cap", type=int, default=32)
    parser.add_argument("--ngram-max", type=int, default=3, help="n-gram length of prompt lookup (ours and HF's)")
    parser.add_argument("--kinds", nargs="+", default=["prompt_lookup", "draft", "self_stream"],
                        choices=["prompt_lookup", "draft", "self_stream"], help="draft kinds to compare with none")
    parser.add_argument("--no-hf", action="store_true", help="skip HF's generate() reference rows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error(f"--new-tokens {args.new_tokens}: give 2 or more (the first comes with the prompt's forward)")
    torch.set_num_threads(args.threads)

    # warmup 0: every generated token timed, as HFReference times HF's (the rounds are the warm-up).
    base = dict(model=args.model, device=args.device, dtype=args.dtype, mode="generate",
                prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, warmup=0, cap=args.cap)
    loaded = LoadedModel.load(RunConfig(**{**base, "method": "dense", "cap": None}))
    variants = {}
    for policy, knobs in POLICIES.items():
        for kind, spec in kinds(args).items():
            config = {**base, **knobs, **spec}
            if spec["spec"] == "prompt_lookup":
                config["ngram_max"] = args.ngram_max
            if knobs["method"] == "dense":
                config.pop("cap")
            variants[(policy, kind)] = RunConfig(**config)
    prompt = [int(t) for t in load_stream(loaded.tokenizer, "shakespeare", args.prompt_tokens).ids]
    hf = HFReference(loaded, prompt, args.new_tokens, args.num_draft, args.ngram_max)
    hf_kinds = {} if args.no_hf else {"HF none": False, f"HF prompt_lookup k={args.num_draft}": True}
    evaluate(variants[("dense", "none")], loaded=loaded)  # untimed, as are the first HF calls: one-off setup costs
    for lookup in hf_kinds.values():
        hf.run(lookup)
    hf_speeds: dict[str, list[float]] = {kind: [] for kind in hf_kinds}
    hf_hashes: dict[str, str] = {}
    hf_per_forward: dict[str, float] = {}
    speeds: dict[tuple[str, str], list[float]] = {key: [] for key in variants}
    last = {}
    keys = [*variants, *hf_kinds]
    for index in range(args.rounds):
        shift = index % len(keys)
        for key in keys[shift:] + keys[:shift]:
            if key in hf_kinds:
                speed, hf_per_forward[key], hf_hashes[key] = hf.run(hf_kinds[key])
                hf_speeds[key].append(speed)
                continue
            result = evaluate(variants[key], loaded=loaded)
            speeds[key].append(result.summary["tokens_per_s"])
            last[key] = result.summary
        print(f"round {index + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    where = "cuda" if loaded.device.type == "cuda" else f"cpu, {args.threads} thread(s)"
    print(f"{args.model} {args.dtype} on {where}, prompt {args.prompt_tokens} + {args.new_tokens} generated tokens, "
          f"streaming cap {args.cap}; median of {args.rounds} rounds")
    print(f"{'policy':<12} {'spec':<26} {'tokens/s':>9} {'vs none':>8} {'accept':>7} {'tok/fwd':>8} "
          f"{'compactions':>11} identical")
    for policy in POLICIES:
        reference = statistics.median(speeds[(policy, "none")])
        for kind in kinds(args):
            summary = last[(policy, kind)]
            speed = statistics.median(speeds[(policy, kind)])
            acceptance = summary["acceptance_rate"]
            same = summary["generated_hash"] == last[(policy, "none")]["generated_hash"]
            print(f"{policy:<12} {kind:<26} {speed:9.2f} {speed / reference:7.2f}x "
                  f"{'-' if acceptance is None else f'{acceptance:.2f}':>7} {summary['mean_accepted_length']:8.2f} "
                  f"{summary['compaction_count']:11d} {'yes' if same else 'NO'}")
    ours = last[("dense", "none")]["generated_hash"]
    for kind in hf_kinds:
        hf_reference = statistics.median(hf_speeds["HF none"])
        speed = statistics.median(hf_speeds[kind])
        print(f"{'HF dense':<12} {kind:<26} {speed:9.2f} {speed / hf_reference:7.2f}x {'-':>7} "
              f"{hf_per_forward[kind]:8.2f} {'-':>11} "
              f"{'yes' if hf_hashes[kind] == ours else 'NO'}")


if __name__ == "__main__":
    main()
