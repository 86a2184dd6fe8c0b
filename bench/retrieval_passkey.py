"""The passkey task on the embedded SmolLM2-135M (issue 23's acceptance check): a dense cache recovers the passkey at
1,024 tokens (at least 9 of 10 trials), and a strict streaming cache of cap 256 fails where the needle ends about 700
tokens before the question, holding none of its tokens (retained 0, from the schedule).

    PYTHONPATH=$PWD python bench/retrieval_passkey.py [--trials 2] [--protocol parallel]

Prints one line per setting (accuracy, mean answer NLL, retained, seconds) and exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import sys
import time

from streaming_llm import LoadedModel, RunConfig, evaluate
from streaming_llm.tasks import make_instance

CONTEXT = 1024
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def depth_for_distance(tokenizer, distance: int) -> float:
    """The depth whose needle ends `distance` tokens (or the nearest boundary to it) before the question."""
    low, high = 0.0, 1.0
    for _ in range(30):
        mid = (low + high) / 2
        if make_instance(tokenizer, "passkey", CONTEXT, mid, 0).distance > distance:
            low = mid
        else:
            high = mid
    return round(high, 4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2, help="per depth (5 depths: 10 trials by default)")
    parser.add_argument("--protocol", default="parallel", choices=("parallel", "stepwise"))
    parser.add_argument("--only", choices=("dense", "far", "inside"), help="run one setting (all three by default)")
    args = parser.parse_args()
    base = dict(mode="task", task="passkey", context_tokens=CONTEXT, protocol=args.protocol)
    loaded = LoadedModel.load(RunConfig(method="dense", **base))
    far = depth_for_distance(loaded.tokenizer, 700)
    settings = {
        "dense": ("dense, 5 depths", RunConfig(method="dense", depths=DEPTHS, trials=args.trials, **base)),
        "far": (f"strict cap 256, depth {far} (needle ~700 back)",
                RunConfig(cap=256, depths=[far], trials=2 * args.trials, **base)),
        "inside": ("strict cap 256, depth 0.9 (needle inside)",
                   RunConfig(cap=256, depths=[0.9], trials=2 * args.trials, **base)),
    }
    ok = True
    for key, (name, config) in settings.items():
        if args.only not in (None, key):
            continue
        started = time.perf_counter()
        result = evaluate(config, loaded)
        seconds = time.perf_counter() - started
        trials = result.trials
        correct = int(sum(score == 1.0 for score in trials.column("score").to_pylist()))
        retained = sorted(set(trials.column("retained").to_pylist()))
        distances = sorted(set(trials.column("distance").to_pylist()))
        print(f"{name}: {correct}/{trials.num_rows} correct, accuracy {result.summary['accuracy']:.2f}, answer NLL "
              f"{result.summary['answer_nll_mean']:.3f}, retained {retained}, "
              f"distance {distances[0]}..{distances[-1]}, "
              f"{seconds:.1f} s ({config.protocol}); answers {trials.column('answer').to_pylist()[:3]}")
        if key == "dense":
            ok &= correct >= 0.9 * trials.num_rows
        elif key == "far":
            ok &= correct == 0 and retained == [0]
    print("checks:", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
