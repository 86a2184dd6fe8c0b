"""The generation protocol (`mode: generate`): a prompt from the run's text, then `new_tokens` generated through the
run's cache policy, drafted by `spec` and verified by the target one block per forward.

`generate(config)` reads top to bottom like the protocol and returns a RunResult like the score protocol: per-token rows
(the prompt's, teacher-forced, then one per generated token, with the verification forward it came from), per-forward
rows and a summary. The target is a `steppers.BlockTarget` (`forward_block(ids)` -> logits, `rewind(count)`, `trace`):
`StepwiseTarget` (the run's own stepper, one token per forward: the reference, and spec none), `DenseBlockTarget`
(HF's DynamicCache, cropped on rewind), `StreamingBlockTarget` (parallel.BlockStepper: exact blocks across
compactions, rewound state and schedule) or, in the ring layout, `RingBlockTarget` (blocks of one shape, k + 1).
The run's start and finish are the run kernel's (run.py). It writes nothing.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager, nullcontext

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from .cache import StreamingCache
from .compat import CACHE_KWARG
from .config import RunConfig
from .measure import Stopwatch
from .models import LoadedModel
from .parallel import StepTrace
from .results import COMPACTION_SCHEMA, FORWARD_SCHEMA, GENERATION_TOKEN_SCHEMA, RunResult
from .run import start_run
from .speculative import Draft, make_drafter, verify
from .steppers import DenseBlockTarget, RingBlockTarget, StepwiseTarget, StreamingBlockTarget, make_target
from .text import TokenStream

__all__ = [  # the block targets live in steppers.py; named here too, where generation callers look for them
    "FORWARD_SCHEMA", "GENERATION_TOKEN_SCHEMA", "DenseBlockTarget", "RingBlockTarget", "StepwiseTarget",
    "StreamingBlockTarget",
    "generate", "generated_hash", "hf_generate", "make_target", "streaming_positions",
]


# --- the protocol -------------------------------------------------------------------------------------------------
def generate(config: RunConfig, loaded: LoadedModel | None = None, stream: TokenStream | None = None) -> RunResult:
    """Run a `mode: generate` configuration and measure it; `loaded` and `stream` may be reused across runs."""
    if config.mode != "generate":
        raise ValueError(f"generate() runs mode generate; this config has mode {config.mode}: call evaluate()")
    run = start_run(config, loaded, stream, config.prompt_tokens, "prompt_tokens")
    device = run.device
    prompt = [int(token) for token in run.stream.ids[: config.prompt_tokens]]
    rng = torch.Generator().manual_seed(config.seed)
    target = make_target(run.loaded, config)
    drafter = make_drafter(config, run.loaded, rng)
    record = _GenerationRecorder()
    clock = Stopwatch(device)

    with run.measuring(), torch.inference_mode():
        # The prompt but its last token, as if token by token: that token starts the first verified block.
        clock.start()
        logits = target.forward_block(_ids(prompt[:-1], device))
        if drafter is not None and config.new_tokens > 1:  # one token is never drafted for
            drafter.prime(prompt[:-1])
        prompt_ms = clock.stop()
        nll = -_logprobs(logits, prompt[1:])
        for i, trace in enumerate(target.trace):
            record.token(i, trace, prompt[i], prompt[i + 1], nll[i], math.nan, None)

        history = list(prompt)
        while len(history) - len(prompt) < config.new_tokens:
            room = config.new_tokens - (len(history) - len(prompt)) - 1  # drafts past the last token are never used
            clock.start()
            draft = Draft([])
            if drafter is not None:
                drafter.accepted(history)
                draft = drafter.propose(history, min(config.num_draft, room))
            draft_ms = clock.stop()
            block = [history[-1], *draft.tokens]
            clock.start()
            logits = target.forward_block(_ids(block, device))
            accepted, following = verify(logits, draft, config.temperature, rng)
            target.rewind(len(draft.tokens) - accepted)
            verify_ms = clock.stop()
            produced = [*draft.tokens[:accepted], following]
            share = (draft_ms + verify_ms) / len(produced)
            logprobs = _logprobs(logits[: len(produced)], produced)
            first_step = len(history) - 1
            traces = target.trace[-len(produced) :]
            for j, token in enumerate(produced):
                record.token(first_step + j, traces[j], block[j], token, -logprobs[j], share, record.forwards)
            record.forward(first_step, len(draft.tokens), accepted, traces[0].kv_len, draft_ms, verify_ms)
            history.extend(produced)
            if len(target.trace) != len(history) - 1:
                raise RuntimeError(f"internal error: the target holds {len(target.trace)} tokens, the history "
                                   f"{len(history) - 1} fed")

    tokens, forwards = record.tables()
    compactions = COMPACTION_SCHEMA.empty_table()  # not timed apart from the forward: see tokens.compacted/evicted
    summary = run.summarise(tokens.drop_columns(["forward"]), compactions, prompt_ms, target.kv_storage())
    summary.update(_generation_summary(tokens, forwards, history[len(prompt) :], summary["tpot_ms_mean"]))
    summary["compile_s"] = target.compile_s
    return run.finish(summary, {"tokens": tokens, "compactions": compactions, "forwards": forwards})


def _ids(tokens: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([tokens], dtype=torch.long, device=device)


def _logprobs(logits: torch.Tensor, targets: list[int]) -> np.ndarray:
    """log p(target) under the target model (temperature 1), float32 log-softmax."""
    index = torch.tensor(targets, device=logits.device)
    rows = F.log_softmax(logits[: len(targets)].float(), dim=-1)
    return rows.gather(1, index[:, None])[:, 0].double().cpu().numpy()


def generated_hash(ids: list[int]) -> str:
    """A 16-hex-digit identity of the generated ids: equal hashes, identical outputs."""
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()[:16]


class _GenerationRecorder:
    """Per-token and per-forward rows, in order."""

    def __init__(self):
        self.rows: dict[str, list] = {name: [] for name in GENERATION_TOKEN_SCHEMA.names}
        self.forward_rows: dict[str, list] = {name: [] for name in FORWARD_SCHEMA.names}
        self.forwards = 0

    def token(self, step: int, trace: StepTrace, token: int, target: int, nll: float, latency: float,
              forward: int | None) -> None:
        prompt = forward is None
        values = (step, trace.position, token, target, float(nll), None if prompt else latency,
                  None, trace.kv_len, trace.compacted, trace.evicted, prompt, forward)
        for name, value in zip(GENERATION_TOKEN_SCHEMA.names, values, strict=True):
            self.rows[name].append(value)

    def forward(self, step: int, drafted: int, accepted: int, kv_len: int, draft_ms: float, verify_ms: float) -> None:
        values = (self.forwards, step, drafted, accepted, accepted + 1, kv_len, draft_ms, verify_ms,
                  draft_ms + verify_ms)
        for name, value in zip(FORWARD_SCHEMA.names, values, strict=True):
            self.forward_rows[name].append(value)
        self.forwards += 1

    def tables(self) -> tuple[pa.Table, pa.Table]:
        return (pa.table(self.rows, schema=GENERATION_TOKEN_SCHEMA),
                pa.table(self.forward_rows, schema=FORWARD_SCHEMA))


def _generation_summary(tokens: pa.Table, forwards: pa.Table, generated: list[int], ms_per_token: float) -> dict:
    """Totals of the run; its speed is `ms_per_token`, the run's tpot_ms_mean: each generated token after the first
    `warmup` timed as its share of its forward (the `latency_ms` of `tokens`)."""
    compacted = tokens.column("compacted").to_numpy(zero_copy_only=False)
    evicted = tokens.column("evicted").to_numpy()
    drafted = int(np.sum(forwards.column("drafted").to_numpy()))
    accepted = int(np.sum(forwards.column("accepted").to_numpy()))
    return {
        "compaction_count": int(compacted.sum()),
        "evicted_total": int(evicted.sum()),
        "compaction_ms_total": None,  # inside the forwards' latency: a block's compactions are not timed apart
        "generated_tokens": len(generated),
        "generated_hash": generated_hash(generated),
        "verify_forwards": forwards.num_rows,
        "tokens_per_s": 1000.0 / ms_per_token,
        "ms_per_token": ms_per_token,
        "draft_ms_total": float(np.sum(forwards.column("draft_ms").to_numpy())),
        "verify_ms_total": float(np.sum(forwards.column("verify_ms").to_numpy())),
        "drafted_total": drafted,
        "accepted_total": accepted,
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_accepted_length": len(generated) / forwards.num_rows,
    }


# --- HF generate() over a StreamingCache ------------------------------------------------------------------------------
@contextmanager
def streaming_positions(model):
    """While active, every forward of `model` over a StreamingCache takes its position ids from the cache.

    HF `generate()` counts positions itself, from the attention mask (absolute stream indices). A float realign /
    exact cache needs each query at its slot, and a kv_quant cache refuses a forward that its `next_positions` did
    not place; so a pre-forward hook on the base model replaces the counted ids with the cache's (`next_positions`).
    Other caches are left alone.
    """

    def use_cache_positions(module, args, kwargs):
        cache = kwargs.get(CACHE_KWARG)
        if isinstance(cache, StreamingCache):
            inputs = next(x for x in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args) if x is not None)
            kwargs["position_ids"] = cache.next_positions(inputs.shape[1], inputs.device)
        return args, kwargs

    handle = model.base_model.register_forward_pre_hook(use_cache_positions, with_kwargs=True)
    try:
        yield model
    finally:
        handle.remove()


def hf_generate(model, input_ids: torch.Tensor, cache=None, **kwargs) -> torch.Tensor:
    """`model.generate(input_ids, cache=cache, **kwargs)`, HF's own loop (greedy, sampling, its logits processors),
    with a StreamingCache in any RoPE mode. HF's prompt lookup / assisted decoding crops the cache after a rejection,
    which a cache that compacts cannot do for entries a compaction has moved: refused here, use a RunConfig with
    `mode: generate` and `spec: prompt_lookup` (its verification rolls the streaming state back exactly)."""
    if isinstance(cache, StreamingCache) and (
        kwargs.get("prompt_lookup_num_tokens") or kwargs.get("assistant_model") is not None
    ):
        raise ValueError(
            "HF's assisted / prompt-lookup decoding crops the cache after rejected drafts, which a StreamingCache "
            "cannot do once it has compacted: run streaming_llm.evaluate with mode generate and spec prompt_lookup"
        )
    if isinstance(cache, StreamingCache) and input_ids.shape[0] != 1:
        raise ValueError(f"a StreamingCache follows one stream: input_ids has batch {input_ids.shape[0]}, use 1")
    rotary = cache.rotary_table(model) if isinstance(cache, StreamingCache) else nullcontext()
    with streaming_positions(model), rotary:
        return model.generate(input_ids, **{CACHE_KWARG: cache}, **kwargs) if cache is not None else model.generate(
            input_ids, **kwargs)
