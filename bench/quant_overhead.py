"""Cost of quantization: TPOT and bytes of each kv_quant and weight_quant setting as ratios to float, side by side in
one process on the embedded model, at a cap of 256 and 2048 (lazy R = 64 streaming, prefill filling the cap).

Each setting is one StreamingStepper on its own LoadedModel (weights quantized once); settings are interleaved in short
rounds, rotating their order, so that machine drift hits all alike. Bytes are the measured ones (nbytes of the cache's
tensors; parameters and buffers of the model). Target: int8 KV within 1.2x of float KV's TPOT at the same span.
Usage: python bench/quant_overhead.py [--caps 256 2048] [--rounds 6] [--steps 8] [--threads 1]
                                      [--model random-pythia-2.8b --device cuda --dtype float16] [--settings ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streaming_llm import LoadedModel, RunConfig  # noqa: E402
from streaming_llm.evaluate import StreamingStepper  # noqa: E402
from streaming_llm.measure import Stopwatch  # noqa: E402
from streaming_llm.models import ModelLoadError  # noqa: E402
from streaming_llm.quant import model_nbytes  # noqa: E402
from streaming_llm.text import load_stream  # noqa: E402

SETTINGS = {
    "float": {},
    "kv int8": {"kv_quant": "int8"},
    "kv int4": {"kv_quant": "int4"},
    "weights int8": {"weight_quant": "int8"},
    "weights int8_dynamic": {"weight_quant": "int8_dynamic"},
    "weights int4": {"weight_quant": "int4"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--caps", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--kv-quant-group", type=int, default=32, help="must divide the model's head_dim")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = {name: SETTINGS[name] for name in dict.fromkeys(["float", *args.settings])}
    common = dict(model=args.model, device=args.device, dtype=args.dtype)
    models: dict[str, LoadedModel] = {}
    for name, knobs in list(settings.items()):
        weight_quant = knobs.get("weight_quant", "none")
        if weight_quant in models:
            continue
        try:
            models[weight_quant] = LoadedModel.load(RunConfig(method="dense", weight_quant=weight_quant, **common))
        except ModelLoadError as exc:
            if weight_quant == "none":
                raise
            print(f"{name}: not measured, torchao refuses it here: {exc}")
            del settings[name]
    device = models["none"].device
    tokenizer = models["none"].tokenizer
    longest = max(args.caps) + args.rounds * args.steps + 1
    ids = torch.as_tensor(load_stream(tokenizer, "shakespeare", longest).ids[:longest], device=device).unsqueeze(0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} thread(s)"
    print(f"model {args.model} {args.dtype} on {where}, lazy R=64, {args.rounds} rounds x {args.steps} steps")
    print(f"{'cap':>5} {'setting':<22} {'TPOT ms':>8} {'TPOT x':>7} {'KV B/token':>10} {'KV x':>6} {'weights MiB':>11} "
          f"{'weights x':>9}")
    for cap in args.caps:
        steppers, clock, times = {}, Stopwatch(device), {name: [] for name in settings}
        for name, knobs in settings.items():
            config = RunConfig(method="streaming", cap=cap, compress_every=64, prefill=cap - 64, max_tokens=longest,
                               kv_quant_group=args.kv_quant_group, **common, **knobs)
            stepper = StreamingStepper(models[knobs.get("weight_quant", "none")], config)
            with torch.inference_mode():
                stepper.forward(ids[:, : cap - 64], all_logits=False)
                stepper.compact()
            steppers[name] = stepper
        position = cap - 64
        for round_index in range(args.rounds):
            order = list(settings)[round_index % len(settings):] + list(settings)[: round_index % len(settings)]
            for name in order:
                with torch.inference_mode():
                    for step in range(position, position + args.steps):
                        clock.start()
                        steppers[name].forward(ids[:, step : step + 1])
                        steppers[name].compact()
                        times[name].append(clock.stop())
            position += args.steps
        float_tpot = statistics.median(times["float"])
        float_kv = _kv_per_token(steppers["float"])
        float_weights = model_nbytes(models["none"].model)
        for name, knobs in settings.items():
            tpot, kv = statistics.median(times[name]), _kv_per_token(steppers[name])
            weights = model_nbytes(models[knobs.get("weight_quant", "none")].model)
            print(f"{cap:5d} {name:<22} {tpot:8.2f} {tpot / float_tpot:7.2f} {kv:10.0f} {kv / float_kv:6.3f} "
                  f"{weights / 2**20:11.1f} {weights / float_weights:9.3f}")


def _kv_per_token(stepper: StreamingStepper) -> float:
    peak, entries = stepper.kv_storage()
    return peak / entries


if __name__ == "__main__":
    main()
