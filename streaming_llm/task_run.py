"""The retrieval-task protocol (`mode: task`): per trial, the context through the cache under test, then the question,
the teacher-forced NLL of the gold answer and a greedy answer, both from the cache state the question left.

`task_run(config)` reads top to bottom like the protocol and returns a RunResult whose `trials` table holds one row per
trial (TRIAL_SCHEMA) and whose summary holds the accuracy and the mean answer NLL. `protocol: stepwise` feeds the run's
own stepper one token per forward (steppers.StepwiseTarget; the reference, and the only path of kv_quant and
recompute); `parallel` feeds blocks of `chunk` tokens through parallel.BlockStepper (streaming) or HF's DynamicCache
(dense), exact as if fed one at a time. The gold answer's pass is forked from the question's state: a block target
rewinds it, the stepwise target is deep-copied (its cache tensors, not the model). Trials that share a token prefix
(the noise haystack before the needle, at one depth) share its pass: the prefix goes through one target, and each
trial continues from a deep copy of it, fed exactly as a fresh target would be (the same blocks, the same forwards),
so its numbers are those of a trial run from scratch (tests/test_task_run.py). It writes nothing.
"""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from .config import RunConfig
from .models import LoadedModel, is_random
from .results import COMPACTION_SCHEMA, TOKEN_SCHEMA, TRIAL_SCHEMA, RunResult
from .run import cache_and_model_summary, start_run
from .steppers import BlockTarget, DenseBlockTarget, StepwiseTarget, StreamingBlockTarget
from .tasks import TaskInstance, file_instances, make_instance, needle_retained, string_match_all, string_match_part
from .text import TokenStream

METRICS = {"all": string_match_all, "part": string_match_part}  # config.task_metric -> RULER's scorer
SEED_SHIFT = 16  # instance seed = config.seed << 16 | trial (trials is at most 1 << 16: config.KNOB_BOUNDS)


def task_run(config: RunConfig, loaded: LoadedModel | None = None, stream: TokenStream | None = None) -> RunResult:
    """Run a `mode: task` configuration; `loaded` may be reused across runs (`stream` is not read: the haystack is
    built per instance)."""
    if config.mode != "task":
        raise ValueError(f"task_run() runs mode task; this config has mode {config.mode}: call evaluate()")
    run = start_run(config, loaded, stream, 1, "context_tokens")
    instances = task_instances(config, run.loaded.tokenizer)
    rows: dict[str, list] = {name: [] for name in TRIAL_SCHEMA.names}
    spans: list[int] = []
    kv_storage = None
    with run.measuring(), torch.inference_mode():
        for group in _prefix_groups(instances):
            shared = shared_prefix_length(config, [instance for _, instance in group])
            prefix_target = make_task_target(run.loaded, config)
            _feed(prefix_target, group[0][1].context_ids[:shared], config, len(group[0][1].context_ids),
                  run.loaded.device)
            for trial, instance in group:
                target = _fork(prefix_target, run.loaded, config)
                row = run_trial(config, run.loaded, target, instance, fed=shared)
                spans.extend(step.kv_len for step in target.trace)
                for name, value in zip(TRIAL_SCHEMA.names, (instance.task, instance.depth, trial, *row), strict=True):
                    rows[name].append(value)
                kv_storage = target.kv_storage()
                del target  # before the next fork: the prefix, one trial and its copy would be live at once
            del prefix_target
    trials = pa.table(rows, schema=TRIAL_SCHEMA)
    summary = _summary(config, run.loaded, instances, trials, spans, kv_storage)
    return run.finish(summary, {"tokens": TOKEN_SCHEMA.empty_table(), "compactions": COMPACTION_SCHEMA.empty_table(),
                                "trials": trials})


def task_instances(config: RunConfig, tokenizer) -> list[tuple[int, TaskInstance]]:
    """(trial index, instance) per trial, depth by depth; a task file's first `trials` rows."""
    assert config.trials is not None and config.context_tokens is not None
    if config.task_file is not None:
        return list(enumerate(file_instances(tokenizer, config.task_file, config.trials, config.context_tokens)))
    assert config.task is not None and config.depths is not None and config.haystack is not None
    return [(trial, make_instance(tokenizer, config.task, config.context_tokens, depth,
                                  (config.seed << SEED_SHIFT) | trial, config.haystack))
            for depth in config.depths for trial in range(config.trials)]


def make_task_target(loaded: LoadedModel, config: RunConfig) -> BlockTarget:
    """A fresh cache under test: the run's own stepper (stepwise), or a block target (parallel)."""
    if config.protocol == "stepwise":
        return StepwiseTarget(loaded, config)
    if config.method == "dense":
        return DenseBlockTarget(loaded, config)
    return StreamingBlockTarget(loaded, config)


def _prefix_groups(instances: list[tuple[int, TaskInstance]]) -> list[list[tuple[int, TaskInstance]]]:
    """Consecutive trials of one depth (a task file's rows: one group), the candidates for a shared prefix."""
    groups: list[list[tuple[int, TaskInstance]]] = []
    for item in instances:
        if groups and groups[-1][0][1].depth == item[1].depth:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def shared_prefix_length(config: RunConfig, instances: list[TaskInstance]) -> int:
    """How many first context tokens every one of `instances` can take from one shared pass, fed as a fresh target
    feeds them: the common prefix of their contexts, cut to whole blocks of `chunk` (a block target), or, stepwise,
    0 where a context goes in one causal forward (a split would change that forward). 0 for a single trial."""
    if len(instances) < 2:
        return 0
    first = instances[0].context_ids
    common = min(len(instance.context_ids) for instance in instances)
    for instance in instances[1:]:
        ids = instance.context_ids
        common = next((i for i in range(common) if ids[i] != first[i]), common)
    if config.protocol == "stepwise":
        if any(_one_forward(config, len(instance.context_ids)) for instance in instances):
            return 0
        return common
    return common // config.chunk * config.chunk


def _one_forward(config: RunConfig, count: int) -> bool:
    """Whether a fresh stepwise target takes a first block of `count` tokens in one causal forward."""
    return count > 1 and StepwiseTarget.one_forward_is_exact(config, count)


def _fork(target: BlockTarget, loaded: LoadedModel, config: RunConfig) -> BlockTarget:
    """A deep copy of `target`'s state (cache tensors, schedule, trace) sharing the model and the config."""
    return copy.deepcopy(target, memo={id(loaded.model): loaded.model, id(config): config})


@torch.inference_mode()
def run_trial(config: RunConfig, loaded: LoadedModel, target: BlockTarget, instance: TaskInstance,
              fed: int = 0) -> tuple:
    """One trial through `target`, which holds the context's first `fed` tokens (a fresh one: 0, or a fork of a
    shared prefix's target): the TRIAL_SCHEMA values from needle_start on."""
    device = loaded.device
    context, question, answer = instance.context_ids, instance.question_ids, instance.answer_ids
    if len(target.trace) != fed:
        raise ValueError(f"run_trial: the target holds {len(target.trace)} tokens, fed = {fed}: pass a fresh target "
                         "with fed 0, or a fork of the shared prefix's target with fed its length")
    _feed(target, context[fed:], config, len(context), device, fed)
    retained = _retained(config, instance, instance.question_start)
    _check_held(target, instance, retained, "the question starts")
    question_start = len(target.trace)
    _feed(target, question[:-1], config, len(question) - 1, device)
    # The question's last token predicts the first answer token: what it attends is what the whole question left.
    retained_at_answer = _retained(config, instance, len(instance.prompt_ids) - 1)
    _check_held(target, instance, retained_at_answer, "the first answer token is predicted")

    # The gold answer, teacher-forced from the question's last token: a fork of the state, then dropped.
    forced = [question[-1], *answer[:-1]]
    if isinstance(target, StepwiseTarget):
        fork = _fork(target, loaded, config)
        forced_logits = fork.forward_block(_ids(forced, device))
        del fork
        logits = target.forward_block(_ids(forced[:1], device))
    else:
        forced_logits = target.forward_block(_ids(forced, device))
        target.rewind(len(forced) - 1)
        logits = forced_logits[:1]
    answer_nll = float(_nll(forced_logits, answer).mean())
    kv_len = target.trace[question_start].kv_len if question_start < len(target.trace) else None

    generated = [int(logits[-1].argmax())]
    while len(generated) < instance.generate_tokens:
        logits = target.forward_block(_ids(generated[-1:], device))
        generated.append(int(logits[-1].argmax()))
    text = loaded.tokenizer.decode(generated)
    score = METRICS[config.task_metric](text, instance.answers)
    return (instance.needle_start, instance.needle_end, instance.distance, instance.question_start, text,
            instance.expected, score, answer_nll, retained, kv_len, instance.instance_hash, retained_at_answer)


def _retained(config: RunConfig, instance: TaskInstance, index: int) -> int | None:
    """Needle tokens the cache holds when the token at stream index `index` is fed (from the schedule)."""
    if instance.needle_start is None or instance.needle_end is None:
        return None
    policy = config.policy if config.method == "streaming" else None
    cap = config.cap if config.method == "recompute" else None
    return needle_retained(policy, index, instance.needle_start, instance.needle_end, cap)


def _check_held(target: BlockTarget, instance: TaskInstance, retained: int | None, when: str) -> None:
    """The schedule's count against the needle tokens a block streaming cache really holds (its stream indices);
    the stepwise StreamingCache keeps no stream index per entry, so it is checked through the parallel path's
    equality with it (tests/test_task_run.py)."""
    if not isinstance(target, StreamingBlockTarget) or instance.needle_start is None or instance.needle_end is None:
        return
    held = set(target.kept_tokens())
    actual = sum(token in held for token in range(instance.needle_start, instance.needle_end))
    if actual != retained:
        raise RuntimeError(f"internal error: when {when}, the cache holds {actual} needle tokens, the schedule says "
                           f"{retained}")


def _feed(target: BlockTarget, ids: tuple[int, ...], config: RunConfig, whole: int, device: torch.device,
          fed: int = 0) -> None:
    """`ids`, the tokens `fed` to `whole` of a piece (context or question) whose first `fed` are in `target`, fed as
    a fresh target takes the whole piece: blocks of `chunk` from the piece's start (a block target); stepwise, one
    forward for the whole piece where that is exact (fed 0), else one token per forward (a first block of one token
    keeps a shared prefix off the one-forward path)."""
    if not ids:
        return
    if not isinstance(target, StepwiseTarget):
        for first in range(fed, fed + len(ids), config.chunk):
            target.forward_block(_ids(ids[first - fed : first - fed + config.chunk], device))
        return
    if not target.trace and not _one_forward(config, whole):
        target.forward_block(_ids(ids[:1], device))
        ids = ids[1:]
    if ids:
        target.forward_block(_ids(ids, device))


def _ids(tokens, device: torch.device) -> torch.Tensor:
    return torch.tensor([list(tokens)], dtype=torch.long, device=device)


def _nll(logits: torch.Tensor, targets: tuple[int, ...]) -> np.ndarray:
    index = torch.tensor(targets, device=logits.device)
    return F.cross_entropy(logits[: len(targets)].float(), index, reduction="none").double().cpu().numpy()


def _summary(config: RunConfig, loaded: LoadedModel, instances: list[tuple[int, TaskInstance]], trials: pa.Table,
             spans: list[int], kv_storage: tuple[int, int] | None) -> dict:
    scores = trials.column("score").to_numpy()
    nll = trials.column("answer_nll").to_numpy()
    if not np.all(np.isfinite(nll)):
        raise FloatingPointError("a gold answer's NLL is not finite: the run's numbers are meaningless; check dtype / "
                                 "weight_quant / kv_quant")
    digest = hashlib.sha256("".join(instance.instance_hash for _, instance in instances).encode())
    policy = config.policy if config.method == "streaming" else None
    source = config.task_file if config.task_file is not None else f"{config.task}:{config.haystack}"
    return {
        "run_hash": config.run_hash,
        "method": config.method,
        "model": config.model,
        "random_weights": is_random(config.model),
        "text_id": f"task:{source}",
        "token_hash": digest.hexdigest()[:16],  # of every instance's hash, in order: the same trials
        "protocol": config.protocol,
        "trial_count": trials.num_rows,
        "accuracy": float(scores.mean()),
        "answer_nll_mean": float(nll.mean()),
        "kv_len_max": max(spans),
        "kv_len_mean": float(np.mean(spans)),
        **cache_and_model_summary(loaded, policy, kv_storage),
    }
