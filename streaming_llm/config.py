"""RunConfig: one evaluation run as plain, validated, frozen data, hashed from its normalised content.

The hash is the run's identity everywhere (store, grid, files). Validation happens at construction, so an invalid
configuration never reaches a model. This module does no I/O.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from functools import cached_property
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from .policy import StreamingPolicy, peak_span, schedule_fingerprint
from .text import DATASETS

Method = Literal["dense", "streaming", "recompute"]
Protocol = Literal["stepwise", "parallel"]

# Each group: what its knobs have in common, and who reads the group.
KNOB_GROUPS: dict[str, str] = {
    "cache": "the streaming cache's knobs: read by method streaming only (normalised to defaults otherwise)",
    "schedule": "cache knobs that act only through the compaction schedule: a streaming run's identity holds its "
                "schedule fingerprint instead of them",
    "span": "cache knobs whose sum bounds the attention span (SPAN_BUDGET)",
    "quant": "quantization of the cache or the weights: a quantized setting's float reference differs in these only",
    "kv_quant_detail": "details of kv_quant, read only when kv_quant quantizes",
    "generation": "read by mode generate only",
    "speculation": "the draft kind (spec) and its details: a generation run's reference differs in these only",
    "draft": "details of a draft kind (spec); which one reads which: DRAFT_KNOBS_USED_BY",
    "measurement": "how a setting is measured, not what it is: RunConfig.setting_hash leaves these out",
    "task": "read by mode task only (retrieval instances): unset (None) in every other run, whose identity lacks them",
}


class Groups:
    """The knob groups a RunConfig field belongs to, declared on the field (`Annotated[int, Groups("cache")]`): every
    list of knobs (here, in gridrun/progress.py and store/) is derived from these with `knobs_in`, never written out."""

    def __init__(self, *names: str):
        unknown = set(names) - set(KNOB_GROUPS)
        if unknown:
            raise ValueError(f"unknown knob group(s) {sorted(unknown)}: declare them in KNOB_GROUPS first")
        self.names = names

    def __repr__(self) -> str:
        return f"Groups{self.names!r}"


_CACHE = Groups("cache", "schedule", "span")
_DRAFT = Groups("generation", "speculation", "draft")
_KV_QUANT_DETAIL = Groups("quant", "kv_quant_detail")


def _field_groups(name: str) -> tuple[str, ...]:
    for item in RunConfig.model_fields[name].metadata:
        if isinstance(item, Groups):
            return item.names
    return ()


@functools.cache
def knobs_in(group: str) -> tuple[str, ...]:
    """The RunConfig fields declared in knob group `group`, in field order."""
    if group not in KNOB_GROUPS:
        raise ValueError(f"unknown knob group {group!r} (known: {', '.join(KNOB_GROUPS)})")
    return tuple(name for name in RunConfig.model_fields if group in _field_groups(name))


# Largest value of each integer knob. Every integer knob has one (knob_bound): at most what its store column holds
# (INT32: store/schema.py declares every integer knob column Integer; a test ties the two), and tighter where one
# machine or one run's cost sets the limit. The cache knobs share one budget: their sum bounds the attention span a
# policy can reach, and cap_mode peak's simulation (linear in it, times log2 cap) then resolves a window within about
# 2 s here; draft_cap is such a cap too (the self_stream draft's window is resolved the same way).
INT32_MAX = 2**31 - 1
KNOB_BOUNDS: dict[str, int] = {
    "max_tokens": 1 << 22, "prefill": 1 << 22, "warmup": 1 << 22, "sample": 1_000_000, "repeat": 1_000_000,
    "chunk": 1 << 22, "score_stride": 1 << 22,
    "prompt_tokens": 1 << 22, "new_tokens": 1 << 22, "num_draft": 1 << 12, "ngram_max": 1 << 12,
    "draft_layers": 1 << 12, "draft_cap": 1 << 14, "kv_quant_group": 1 << 16, "kv_quant_residual": 1 << 14,
    "context_tokens": 1 << 20, "trials": 1 << 16,
}
# Below this a temperature samples as greedy decoding does, and logits / temperature overflows float64 (the
# probabilities become NaN) from about 1e-304 on: 0 is how greedy decoding is asked for.
MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 100.0
SPAN_BUDGET = 1 << 14


class ConfigError(ValueError):
    """An invalid run configuration; the message names the knob, the constraint and the fix."""


class RunConfig(BaseModel):
    """One run: which model reads which text, with which cache policy, measured how.

    Text: `dataset` is `shakespeare` (default, embedded), `pg19`, `wikitext` or `file` (then `text_file` is the path);
    `sample` picks the book / article / play to start from; `dataset_source` overrides the `datasets` location.
    Protocol: `prefill` tokens in one forward, then one token per step until `max_tokens` tokens were read; timing
    statistics skip the first `warmup` decode steps. `protocol: parallel` computes the same per-step NLLs, spans and
    compactions in forwards of `chunk` tokens (streaming_llm.parallel) and measures no latency; there the recompute
    baseline may score every `score_stride`-th step only (steps t with t % score_stride == 0: each costs a cap-token
    forward), and comparisons with it are paired on those steps.
    Policy knobs keep the study's names; see `StreamingPolicy`. `cap` derives `window` (`cap_mode`: `peak` keeps the
    largest attention span within cap, `soft` reproduces the study's W = cap - S - slack - O - B).
    Generation (`mode: generate`, see streaming_llm.generate): the first `prompt_tokens` of the text are the prompt
    (fed as if token by token: `prefill` is read by score mode only), then `new_tokens` are generated at
    `temperature` (0 = greedy; `seed` seeds the sampling), drafted by `spec` (`none`, `prompt_lookup` with n-grams
    up to `ngram_max`, `draft` from `draft_model` or the target's first `draft_layers` layers, `self_stream`: the
    target over a strict streaming cache of `draft_cap`) `num_draft` tokens at a time and verified by the target in
    one forward. `max_tokens` too is read by score mode only.
    Retrieval tasks (`mode: task`, see streaming_llm.task_run): `trials` instances of `task` per needle depth in
    `depths`, each `context_tokens` tokens (prompt plus gold answer) over the `haystack`, or the rows of `task_file`;
    `seed` picks the instances; greedy answers through the run's cache, scored by `task_metric` (`all`: RULER's
    string_match_all, the default for generated tasks; `part`: string_match_part, any reference found, the default for
    a task_file's QA rows).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    model: str = "smollm2-135m"
    dataset: str = "shakespeare"
    text_file: str | None = None
    dataset_source: str | None = None
    sample: Annotated[int, Groups("measurement")] = 0
    max_tokens: Annotated[int, Groups("measurement")] = 1024
    prefill: Annotated[int, Groups("measurement")] = 0
    warmup: Annotated[int, Groups("measurement")] = 8
    protocol: Annotated[Protocol, Groups("measurement")] = "stepwise"
    chunk: Annotated[int, Groups("measurement")] = 256
    score_stride: Annotated[int, Groups("measurement")] = 1

    method: Method = "streaming"
    sink: Annotated[int, _CACHE] = 4
    window: Annotated[int | None, _CACHE] = None
    cap: Annotated[int | None, _CACHE] = None
    cap_mode: Annotated[Literal["peak", "soft"], Groups("cache", "schedule")] = "peak"
    overlap: Annotated[int, _CACHE] = 0
    refresh: Annotated[int, _CACHE] = 0
    refresh_policy: Annotated[Literal["none", "middle"], Groups("cache", "schedule")] = "none"
    slack: Annotated[int, _CACHE] = 0
    compress_every: Annotated[int, _CACHE] = 1
    max_drop: Annotated[int, _CACHE] = 0
    rope_mode: Annotated[Literal["realign", "exact", "absolute"], Groups("cache")] = "realign"

    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    repeat: int = 0

    # Generation and speculative decoding (streaming_llm.generate / streaming_llm.speculative); see GENERATION_DOC.
    mode: Literal["score", "generate", "task"] = "score"
    prompt_tokens: Annotated[int, Groups("generation")] = 64
    new_tokens: Annotated[int, Groups("generation")] = 128
    temperature: Annotated[float, Groups("generation")] = 0.0
    seed: Annotated[int, Groups("generation")] = 0
    spec: Annotated[Literal["none", "prompt_lookup", "draft", "self_stream"],
                    Groups("generation", "speculation")] = "none"
    num_draft: Annotated[int, _DRAFT] = 4
    ngram_max: Annotated[int, _DRAFT] = 3
    draft_model: Annotated[str | None, _DRAFT] = None
    draft_layers: Annotated[int, _DRAFT] = 0
    draft_cap: Annotated[int, _DRAFT] = 64
    # Quantization (docs/engine.md, "Quantization"): the streaming cache's storage and the model's linear layers.
    kv_quant: Annotated[Literal["none", "int8", "int4"], Groups("quant")] = "none"
    kv_quant_group: Annotated[int, _KV_QUANT_DETAIL] = 32
    kv_quant_residual: Annotated[int, _KV_QUANT_DETAIL] = 0
    kv_quant_sinks: Annotated[Literal["quantized", "full"], _KV_QUANT_DETAIL] = "full"
    weight_quant: Annotated[Literal["none", "int8", "int8_dynamic", "int4"], Groups("quant")] = "none"
    # Retrieval tasks (mode task, streaming_llm.task_run; docs/engine.md, "Retrieval tasks"); unset (None) in every
    # other mode, so no other run's identity holds them.
    task: Annotated[Literal["passkey", "niah", "niah_multikey", "vt"] | None, Groups("task")] = None
    context_tokens: Annotated[int | None, Groups("task")] = None
    depths: Annotated[tuple[float, ...] | None, Groups("task", "measurement")] = None
    trials: Annotated[int | None, Groups("task", "measurement")] = None
    haystack: Annotated[Literal["noise", "text"] | None, Groups("task")] = None
    task_file: Annotated[str | None, Groups("task")] = None
    task_metric: Annotated[Literal["all", "part"] | None, Groups("task")] = None
    # How the streaming cache is laid out and whether its decode step is compiled (docs/engine.md, "Ring layout and
    # compile"); hashed only away from these defaults (HASHED_WHEN_SET), so that earlier runs keep their identity.
    layout: Literal["compact", "ring"] = "compact"
    compile: Literal["none", "default", "reduce-overhead"] = "none"

    @model_validator(mode="wrap")
    @classmethod
    def _normalise(cls, data: Any, handler) -> RunConfig:
        """Validate every given knob, then reset those the method does not read (and cap_mode without a cap); a task
        run's unset task knobs take their task-mode defaults (TASK_DEFAULTS)."""
        if isinstance(data, dict):
            _check_bounds(data)  # before any check that simulates the schedule: its cost grows with the values
            data = _depths_as_tuple(data)
        validated = handler(data)
        _check_signs(validated)  # on every knob given, even those the method ignores: a negative value is a mistake
        ignored = _ignored_knobs(validated)
        ignored += _ignored_generation_knobs(validated)
        ignored += _ignored_task_knobs(validated)
        defaults = _task_defaults(validated)
        if not defaults and not any(k in validated.model_fields_set for k in ignored):
            return validated
        content = {k: v for k, v in validated.model_dump().items() if k not in ignored}
        return handler(content | defaults)

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.mode == "generate":
            self._check_generation()
        elif self.mode == "task":
            self._check_task()
        elif self.max_tokens < 2:
            raise ConfigError(f"max_tokens = {self.max_tokens} < 2: a run needs at least one token to predict")
        if self.mode == "score" and self.prefill >= self.max_tokens:
            raise ConfigError(
                f"prefill = {self.prefill} >= max_tokens = {self.max_tokens}: prefill must leave decode steps; "
                "lower prefill or raise max_tokens"
            )
        if self.chunk < 1:
            raise ConfigError(f"chunk = {self.chunk} < 1: a parallel forward reads at least one token")
        if self.score_stride < 1:
            raise ConfigError(f"score_stride = {self.score_stride} < 1: score every step (1) or every k-th (k > 1)")
        decode_steps = self.max_tokens - 1 - self.prefill
        if self.mode == "score" and self.protocol == "stepwise" and self.warmup >= decode_steps:
            raise ConfigError(
                f"warmup = {self.warmup} >= the {decode_steps} decode steps (max_tokens - 1 - prefill): no step would "
                "be timed; lower warmup or prefill, or raise max_tokens"
            )
        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset = '{self.dataset}' is unknown (known: {', '.join(DATASETS)})")
        if (self.dataset == "file") != (self.text_file is not None):
            raise ConfigError("text_file is set exactly when dataset is 'file' (dataset: file, text_file: PATH)")
        if self.method == "recompute":
            if self.cap is None or self.cap < 1:
                raise ConfigError(f"method recompute needs cap >= 1 (the recomputed window), got cap = {self.cap}")
            if self.prefill > self.cap:
                raise ConfigError(f"prefill = {self.prefill} > cap = {self.cap}: recompute never attends past cap")
        if self.method == "streaming":
            self._check_streaming()
        self._check_kv_quant()
        self._check_layout_and_compile()
        return self

    def _check_layout_and_compile(self) -> None:
        """What the ring layout and the compiled step support so far; what needs the machine (a CUDA device, the C++
        compiler inductor needs on a CPU) is checked by `check_compile_environment` before the model loads."""
        if self.layout == "ring":
            supported = (("method", "streaming"), ("protocol", "stepwise"))
            for knob, wanted in supported:
                if getattr(self, knob) == wanted:
                    continue
                value = getattr(self, knob)
                raise ConfigError(
                    f"layout ring with {knob} = {value}: the ring layout is implemented (and proven exact) for the "
                    "streaming cache fed one token per forward (stepwise scoring, generation with spec none) or a "
                    f"verified block of num_draft + 1 (spec prompt_lookup); set {knob} {wanted} or layout compact"
                )
            if self.mode == "generate" and self.spec not in ("none", "prompt_lookup"):
                raise ConfigError(
                    f"layout ring with spec = {self.spec}: the ring verifies drafts for spec prompt_lookup only (a "
                    "model draft keeps a cache of its own in the compact layout); set spec prompt_lookup or none, or "
                    "layout compact"
                )
        if self.compile != "none" and self.method == "dense":
            raise ConfigError(
                f"compile = {self.compile} with method dense: its cache grows by one entry (a tensor shape) at every "
                "step, so a compiled step would recompile at every one; use method streaming with layout ring, "
                "method recompute, or compile none"
            )
        if self.compile != "none" and self.method == "streaming" and self.layout != "ring":
            raise ConfigError(
                f"compile = {self.compile} with layout {self.layout}: the compact cache changes its length (a tensor "
                "shape) at every step and compaction, so a compiled step would recompile at every one; use layout "
                "ring (fixed shapes), or compile none"
            )
        if self.compile != "none" and self.protocol == "parallel":
            raise ConfigError(f"compile = {self.compile} with protocol parallel: a parallel run times no step, so "
                              "there is nothing to compile for; use protocol stepwise, or compile none")
        if self.compile != "none" and self.warmup < 1:
            raise ConfigError(f"compile = {self.compile} with warmup = 0: the first decode step compiles (seconds) "
                              "and would be timed in TPOT; set warmup 1 or more")
        if self.compile == "reduce-overhead" and self.device == "cpu":
            raise ConfigError("compile = reduce-overhead captures CUDA graphs: device cpu has none; use compile "
                              "default on a CPU, or device cuda")
        if self.compile == "reduce-overhead" and self.warmup < 3:
            # CUDA graph trees run a function once to warm up and record it at its next call: with fewer warmup
            # steps the recording would be timed.
            raise ConfigError(f"compile = reduce-overhead with warmup = {self.warmup}: CUDA graphs are recorded at "
                              "the second compiled step and replayed from the third; set warmup 3 or more")

    def _check_kv_quant(self) -> None:
        """What can be checked without the model; kv_quant_group | head_dim is checked against the model's config
        (evaluate.check_model_knobs) before its weights load."""
        if self.kv_quant == "none":
            return
        if self.method != "streaming":
            raise ConfigError(f"kv_quant = {self.kv_quant} quantizes the streaming cache; method {self.method} uses "
                              "none: use method streaming (a window holding everything compares with dense)")
        if self.protocol == "parallel":
            raise ConfigError(f"kv_quant = {self.kv_quant} is implemented in the stepwise protocol's cache; protocol "
                              "parallel holds none: use protocol stepwise")
        if self.mode == "generate" and self.spec != "none":
            raise ConfigError(f"kv_quant = {self.kv_quant} is implemented in the stepwise cache; spec = {self.spec} "
                              "verifies drafts over a block cache that holds floats: use spec none with kv_quant")
        if self.kv_quant_group < 2:
            raise ConfigError(f"kv_quant_group = {self.kv_quant_group} < 2: a group holds 2 or more elements (one "
                              "scale and zero point per element would take more bytes than the float entry)")
        if self.kv_quant == "int4" and self.kv_quant_group % 2:
            raise ConfigError(f"kv_quant int4 packs two codes per byte: kv_quant_group = {self.kv_quant_group} must be "
                              "even; use 16, 32 or 64")
        if self.kv_quant_residual > self.policy.window:
            raise ConfigError(
                f"kv_quant_residual = {self.kv_quant_residual} > window = {self.policy.window}: the float entries must "
                "be among the recent ones every compaction keeps; lower kv_quant_residual or raise window/cap"
            )

    def _check_streaming(self) -> None:
        if self.compress_every < 1:
            raise ConfigError(f"compress_every = {self.compress_every} < 1: R must be 1 (strict) or more (lazy)")
        if self.refresh_policy == "none" and self.refresh > 0:
            raise ConfigError(f"refresh = {self.refresh} needs refresh_policy: middle (refresh_policy is none)")
        if self.refresh_policy != "none" and self.refresh == 0:
            raise ConfigError(f"refresh_policy: {self.refresh_policy} needs refresh >= 1 (refresh is 0)")
        if (self.window is None) == (self.cap is None):
            raise ConfigError("method streaming needs exactly one of window (set W) or cap (derive W from a budget)")
        if self.window is not None and self.window < 1:
            raise ConfigError(f"window = {self.window} < 1: the recent window must hold at least one token")
        if self.cap is not None and self.cap_mode == "peak" and self.prefill > self.cap:
            raise ConfigError(
                f"prefill = {self.prefill} > cap = {self.cap}: with cap_mode peak the prefill's span must fit the cap"
            )
        if self.cap is not None and self.cap_mode == "peak":
            # Whether a window fits, not which: the search costs log2(cap) simulations, paid when the run is hashed,
            # so that every run of a grid is validated before any is resolved and a bad one is refused in seconds.
            _check_peak_fits(self.cap, self.prefill, tuple(self._policy_knobs().items()))
        else:
            _ = self.policy  # derives the window (arithmetic), raising if none fits

    def _check_task(self) -> None:
        if self.task is None and self.task_file is None:
            raise ConfigError(f"mode task needs task ({', '.join(TASKS)}) or task_file (a JSONL of {{context, "
                              "question, answers}})")
        if self.task is not None and self.task_file is not None:
            raise ConfigError("mode task reads task (generated instances) or task_file (a file's rows), not both: "
                              "drop one")
        if self.context_tokens is None:
            raise ConfigError("mode task needs context_tokens: the prompt plus the gold answer, in tokens (a task "
                              "file's longer rows lose their middle to fit)")
        if self.context_tokens < MIN_CONTEXT_TOKENS:
            raise ConfigError(f"context_tokens = {self.context_tokens} < {MIN_CONTEXT_TOKENS}: the header, needle, "
                              "question and answer alone take about that many; raise context_tokens")
        if self.task is not None and self.context_tokens < MIN_TASK_CONTEXT[self.task]:
            raise ConfigError(f"context_tokens = {self.context_tokens} < {MIN_TASK_CONTEXT[self.task]}, the "
                              f"{self.task} task's minimum: its header, needle(s), question and answer alone take "
                              f"about that many tokens; raise context_tokens to {MIN_TASK_CONTEXT[self.task]} or more")
        assert self.trials is not None  # _task_defaults sets it
        if self.trials < 1:
            raise ConfigError(f"trials = {self.trials} < 1: run at least one instance per depth")
        if self.task is not None:
            assert self.depths is not None
            if not self.depths:
                raise ConfigError("depths = []: give at least one needle depth (fractions of the haystack before "
                                  "the needle, e.g. [0.1, 0.5, 0.9])")
            bad = [d for d in self.depths if not 0.0 <= d <= 1.0]  # NaN fails both comparisons
            if bad:
                raise ConfigError(f"depths {bad} outside [0, 1]: a depth is the fraction of the haystack before the "
                                  "needle (0 = at its start, 1 = right before the question)")
            if len(set(self.depths)) != len(self.depths):
                raise ConfigError(f"depths {list(self.depths)} repeat a depth: list each once (raise trials for more "
                                  "instances per depth)")
        if self.temperature != 0.0:
            raise ConfigError(f"temperature = {self.temperature}: mode task decodes greedily (RULER's protocol); "
                              "use temperature 0")
        if self.compile != "none":
            raise ConfigError(f"compile = {self.compile} with mode task: a task run measures recall, not time (its "
                              "decode is never timed); use compile none")
        if self.method == "recompute" and self.protocol == "parallel":
            raise ConfigError("mode task with method recompute runs stepwise (each generated token recomputes its "
                              "window): use protocol stepwise")

    def _check_generation(self) -> None:
        if self.protocol != "stepwise":
            raise ConfigError(f"protocol = {self.protocol} with mode generate: generation has its own protocol (one "
                              "verified block per forward); set protocol stepwise (its default)")
        if self.prompt_tokens < 2:
            raise ConfigError(f"prompt_tokens = {self.prompt_tokens} < 2: a generation run needs a prompt of 2 tokens "
                              "or more (the last one starts the generation)")
        if self.new_tokens < 1:
            raise ConfigError(f"new_tokens = {self.new_tokens} < 1: generate at least one token")
        if self.warmup >= self.new_tokens:
            raise ConfigError(f"warmup = {self.warmup} >= new_tokens = {self.new_tokens}: no generated token would be "
                              "timed; lower warmup or raise new_tokens")
        self._check_temperature()
        if self.method == "recompute" and self.spec != "none":
            raise ConfigError(f"spec = {self.spec} with method recompute: a recompute window cannot verify a block "
                              "in one forward; use spec none, or method dense / streaming")
        if self.spec == "none":
            return
        if self.num_draft < 1:
            raise ConfigError(f"num_draft = {self.num_draft} < 1: draft at least one token per verification")
        if self.spec == "prompt_lookup" and self.ngram_max < 1:
            raise ConfigError(f"ngram_max = {self.ngram_max} < 1: prompt_lookup matches n-grams of 1..ngram_max")
        if self.spec == "draft" and (self.draft_model is None) == (self.draft_layers == 0):
            raise ConfigError("spec draft needs exactly one of draft_model (a separate model) or draft_layers >= 1 "
                              "(the target's first layers)")
        if self.spec == "draft" and self.draft_layers < 0:
            raise ConfigError(f"draft_layers = {self.draft_layers} < 0: use 1 or more of the target's layers")
        if self.spec == "self_stream" and self.draft_cap < self.sink + 2:
            raise ConfigError(f"draft_cap = {self.draft_cap} < sink + 2 = {self.sink + 2}: the draft's streaming cache "
                              "needs the sinks plus a window of 2 or more; raise draft_cap")

    def _check_temperature(self) -> None:
        value = self.temperature
        if value == 0.0 and math.copysign(1.0, value) < 0:
            raise ConfigError("temperature = -0.0: write 0 for greedy decoding (-0.0 would hash as another run)")
        if value != 0.0 and not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:  # NaN fails both comparisons
            raise ConfigError(
                f"temperature = {value!r}: must be 0 (greedy) or a number from {MIN_TEMPERATURE:g} to "
                f"{MAX_TEMPERATURE:g} (below {MIN_TEMPERATURE:g} sampling is greedy decoding, and logits / temperature "
                "overflows to NaN probabilities); use 0 for greedy decoding"
            )

    @cached_property
    def policy(self) -> StreamingPolicy:
        """The resolved policy of a streaming run (window derived from cap when cap is given)."""
        if self.method != "streaming":
            raise ConfigError(f"method {self.method} has no streaming policy")
        knobs = self._policy_knobs()
        if self.window is not None:
            return StreamingPolicy(window=self.window, **knobs)
        assert self.cap is not None
        if self.cap_mode == "soft":
            window = self.cap - self.sink - self.slack - self.overlap - self.refresh
            if window < 1:
                raise ConfigError(
                    f"window = cap - sink - slack - overlap - refresh = {self.cap} - {self.sink} - {self.slack} - "
                    f"{self.overlap} - {self.refresh} = {window} < 1: raise cap or lower sink/slack/overlap/refresh"
                )
            return StreamingPolicy(window=window, **knobs)
        return _largest_window_within(self.cap, self.prefill, knobs)

    def _policy_knobs(self) -> dict[str, int]:
        return dict(sink=self.sink, overlap=self.overlap, refresh=self.refresh, slack=self.slack,
                    compress_every=self.compress_every, max_drop=self.max_drop)

    def normalised(self) -> dict[str, Any]:
        """The configuration's content: every field, in a fixed order, irrelevant knobs at their defaults (what the run
        computes is `identity()`). The task knobs appear in task runs only: every other run's content (and hash) is
        what it was before they existed."""
        content = self.model_dump(mode="json")
        if self.mode != "task":
            for knob in TASK_KNOBS:
                del content[knob]
        return content

    @cached_property
    def schedule_fingerprint(self) -> str | None:
        """The hash of the kept token indices at every step of this run's stream (streaming only; see
        `policy.schedule_fingerprint`). A task run's stream is its prompt plus the generated tokens, fed from an empty
        cache: at most context_tokens + the task's GENERATION_BUDGET (the prompt is context_tokens less the gold
        answer, and the generation the budget or the gold answer + ANSWER_SLACK_TOKENS, which the budget exceeds)."""
        if self.method != "streaming":
            return None
        if self.mode == "task":
            assert self.context_tokens is not None
            budget = GENERATION_BUDGET[self.task if self.task is not None else "file"]
            return schedule_fingerprint(self.policy, self.context_tokens + max(budget, ANSWER_SLACK_TOKENS) + 1, 0)
        return schedule_fingerprint(self.policy, self.max_tokens, self.prefill)

    def identity(self) -> dict[str, Any]:
        """What the run computes: the normalised content, with a streaming run's schedule knobs replaced by its schedule
        fingerprint. Dense and recompute runs: the normalised content itself."""
        content = self.normalised()
        if self.method != "streaming":
            return content
        for knob in SCHEDULE_KNOBS:
            del content[knob]
        content["schedule"] = self.schedule_fingerprint
        return content

    @cached_property
    def run_hash(self) -> str:
        """A 16-hex-digit identity of the computation: equivalent configurations (same schedule) share it."""
        return _content_hash(self.identity())

    @cached_property
    def group_hash(self) -> str:
        """The identity shared by all repeats of one computation (the run hash with `repeat` left out)."""
        return _content_hash({k: v for k, v in self.identity().items() if k != "repeat"})

    @cached_property
    def config_hash(self) -> str:
        """A 16-hex-digit identity of the configuration itself (its normalised knobs); equals run_hash for dense and
        recompute runs."""
        return _content_hash(self.normalised())

    @cached_property
    def config_group_hash(self) -> str:
        """The identity shared by all repeats of one configuration (config_hash with `repeat` left out)."""
        return _content_hash({k: v for k, v in self.normalised().items() if k != "repeat"})

    @cached_property
    def setting_hash(self) -> str:
        """The setting apart from how and on how much text it was measured: shared by its text samples, repeats,
        protocols and stream lengths. Quality (over samples) and timing (over repeats) of one setting join on it."""
        measurement = {"repeat", *knobs_in("measurement")}
        return _content_hash({k: v for k, v in self.normalised().items() if k not in measurement})

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> RunConfig:
        """Build from plain data (YAML, JSON, flags), turning validation failures into one readable ConfigError."""
        try:
            return cls(**data)
        except ValidationError as exc:
            raise ConfigError(f"{where}: {describe_validation_error(exc)}") from None


# The groups as the code reads them (derived from the fields: see Groups). Each method reads its own knobs; the others
# are reset to their defaults so that equivalent runs share one identity.
CACHE_KNOBS = knobs_in("cache")
# Knobs that act only through the compaction schedule: a streaming run's identity holds its schedule fingerprint instead
# of them, so settings that keep the same tokens at every step share one run. Every other knob stays in the identity.
SCHEDULE_KNOBS = knobs_in("schedule")
SPAN_KNOBS = knobs_in("span")
# Quantization: the kv_quant_* details matter only when kv_quant quantizes (kv_quant_sinks only when there are sinks).
KV_QUANT_KNOBS = knobs_in("kv_quant_detail")
KNOBS_USED_BY: dict[str, tuple[str, ...]] = {
    "dense": (),
    "streaming": CACHE_KNOBS,
    "recompute": ("cap",),
}


def _ignored_knobs(config: RunConfig) -> list[str]:
    """Knobs this run never reads: cache knobs of other methods, cap_mode without a cap, the other protocol's knob,
    the kv_quant details without kv_quant (and kv_quant_sinks without sinks)."""
    used = KNOBS_USED_BY[config.method]
    ignored = [k for k in CACHE_KNOBS if k not in used or (k == "cap_mode" and config.cap is None)]
    ignored += [k for k in KV_QUANT_KNOBS if config.kv_quant == "none" or (
        k == "kv_quant_sinks" and (config.sink == 0 or "sink" in ignored))]
    # Parallel runs measure no latency (so no warmup); stepwise runs feed one token per forward (so no chunk).
    ignored.append("warmup" if config.protocol == "parallel" else "chunk")
    # Only parallel recompute can skip steps: every other path computes each step to reach the next.
    if config.method != "recompute" or config.protocol != "parallel":
        ignored.append("score_stride")
    return ignored


# Knobs added after runs were stored: at their default they are left out of every hash, so those runs keep theirs.
HASHED_WHEN_SET: dict[str, str] = {"layout": "compact", "compile": "none"}


def _content_hash(content: dict[str, Any]) -> str:
    content = {k: v for k, v in content.items() if k not in HASHED_WHEN_SET or v != HASHED_WHEN_SET[k]}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# Knobs each generation setting reads; score mode reads none of them (and generate mode does not read max_tokens).
# DRAFT_KNOBS: a draft kind's details (without `spec` itself, unlike knobs_in("speculation")).
DRAFT_KNOBS = knobs_in("draft")
DRAFT_KNOBS_USED_BY: dict[str, tuple[str, ...]] = {
    "none": (),
    "prompt_lookup": ("num_draft", "ngram_max"),
    "draft": ("num_draft", "draft_model", "draft_layers"),
    "self_stream": ("num_draft", "draft_cap"),
}
GENERATION_KNOBS = knobs_in("generation")


def _ignored_generation_knobs(config: RunConfig) -> list[str]:
    """The generation knobs `config` does not read, reset to their defaults by the normalisation."""
    if config.mode == "score":
        return list(GENERATION_KNOBS)
    if config.mode == "task":  # greedy (temperature 0, checked), no drafts; seed picks the instances
        return [k for k in GENERATION_KNOBS if k not in ("seed", "temperature")]
    used = DRAFT_KNOBS_USED_BY[config.spec]
    ignored = [k for k in DRAFT_KNOBS if k not in used]
    if config.temperature == 0.0:
        ignored.append("seed")  # greedy decoding draws nothing
    # The prompt is fed as if token by token (one block where the target verifies blocks): no prefill forward.
    return ["max_tokens", "prefill", *ignored]


# Retrieval tasks (mode task): knobs read by that mode only, unset (None) elsewhere; a task run's unset ones get these.
TASK_KNOBS = knobs_in("task")
TASK_DEFAULTS: dict[str, Any] = {"depths": (0.1, 0.5, 0.9), "trials": 10, "haystack": "noise"}
MIN_CONTEXT_TOKENS = 64  # a task file's rows: the question, the answer and some context
# The smallest context_tokens each generated task builds in (header, needles, question, answer and a haystack with room
# for niah_multikey's distractors), measured with the embedded tokenizer (SmolLM2's) over 40 seeds, both haystacks and
# depths 0 / 0.5 / 1 (passkey 73, niah 94, niah_multikey 171, vt 164), with a margin for other seeds. A tokenizer
# that spends more tokens on the same text (the tiny models' bytes) may still need more: tasks.TaskError says so.
MIN_TASK_CONTEXT = {"passkey": 96, "niah": 112, "niah_multikey": 200, "vt": 200}
ANSWER_SLACK_TOKENS = 8  # generated tokens per trial beyond the gold answer's, at least (streaming_llm.tasks uses it)
# Generated tokens per trial, at least (RULER's per-task budgets; a task file's QA answers, LongBench-like, get 64):
# the budget or the gold answer + ANSWER_SLACK_TOKENS, whichever is larger. vt's answer lists every variable.
GENERATION_BUDGET = {"passkey": 32, "niah": 32, "niah_multikey": 32, "vt": 30, "file": 64}
TASKS = ("passkey", "niah", "niah_multikey", "vt")
# What a task run reads of the rest: the model, the cache under test (method, policy, kv_quant, weight_quant), the
# protocol and chunk, seed (which instances). The text knobs (its haystack is `haystack`), the stream lengths and
# timing knobs of score mode, the generation knobs, and `repeat` are not read: a task run is deterministic (its
# instances follow the seed, its answers are greedy) and never timed, so a repeat would count the same trials again.
TASK_IGNORED = ("repeat", "dataset", "text_file", "dataset_source", "sample", "max_tokens", "prefill", "warmup",
                "prompt_tokens", "new_tokens", "spec", *DRAFT_KNOBS)


def _ignored_task_knobs(config: RunConfig) -> list[str]:
    """Outside task mode, the task knobs; in it, the knobs it does not read (and depths / haystack with a task_file,
    whose rows have neither)."""
    if config.mode != "task":
        return list(TASK_KNOBS)
    ignored = list(TASK_IGNORED)
    if config.task_file is not None:
        ignored += ["depths", "haystack"]
    return ignored


def _task_defaults(config: RunConfig) -> dict[str, Any]:
    """A task run's unset task knobs at their defaults (depths and haystack only for generated instances; the metric
    RULER scores each source with: string_match_all for generated tasks, string_match_part for a file's QA rows)."""
    if config.mode != "task":
        return {}
    wanted = {k: v for k, v in TASK_DEFAULTS.items() if config.task_file is None or k == "trials"}
    wanted["task_metric"] = "all" if config.task_file is None else "part"
    return {k: v for k, v in wanted.items() if getattr(config, k) is None}


def _depths_as_tuple(data: dict[str, Any]) -> dict[str, Any]:
    """depths from YAML / JSON is a list of numbers: held as a sorted tuple of floats (frozen, hashable), -0.0 as 0.0,
    so that [0.5, 1], (1.0, 0.5) and [0.5, 1.0] are one configuration (the trials of a depth do not depend on the
    others). One number is a list of one (a grid measurement's list expands to one run per value), and a flag's text
    "0.1,0.5" the list it spells. A task run's temperature 0 is held as 0.0, never -0.0 (another hash)."""
    if data.get("mode") == "task" and type(data.get("temperature")) in (int, float) and data["temperature"] == 0:
        data = {**data, "temperature": 0.0}
    depths = data.get("depths")
    if type(depths) in (int, float):
        depths = [depths]
    elif isinstance(depths, str):
        try:
            depths = [float(part) for part in depths.split(",")]
        except ValueError:
            raise ConfigError(f"depths = {depths!r}: numbers in [0, 1] separated by commas (e.g. 0.1,0.5,0.9)"
                              ) from None
    if not isinstance(depths, list | tuple):
        return data
    if not all(type(d) in (int, float) for d in depths):
        raise ConfigError(f"depths = {depths!r}: a list of numbers in [0, 1] (fractions of the haystack before the "
                          "needle)")
    return {**data, "depths": tuple(sorted(float(d) + 0.0 for d in depths))}  # + 0.0: -0.0 becomes 0.0


def _check_signs(config: RunConfig) -> None:
    for knob in ("sink", "overlap", "refresh", "slack", "max_drop", "prefill", "warmup", "sample", "repeat", "chunk",
                 "score_stride", "seed", "kv_quant_residual"):
        if getattr(config, knob) < 0:
            raise ConfigError(f"{knob} = {getattr(config, knob)} < 0: {knob} must be 0 or more")


def _integer_knobs() -> tuple[str, ...]:
    """The knobs whose values are integers (`int`, or `int | None`)."""
    return tuple(name for name, field in RunConfig.model_fields.items()
                 if field.annotation is int or set(get_args(field.annotation)) == {int, type(None)})


def knob_bound(knob: str) -> int:
    """The largest value integer knob `knob` may have: KNOB_BOUNDS, SPAN_BUDGET for the cache knobs (their sum is
    bounded by it), else what its INT32 store column holds."""
    return SPAN_BUDGET if knob in SPAN_KNOBS else KNOB_BOUNDS.get(knob, INT32_MAX)


def _check_bounds(knobs: dict[str, Any]) -> None:
    """Every integer knob within its bound, both ways, before anything computes with it (a value the store cannot
    hold would pass every other check and fail only when the run is registered)."""
    for knob in _integer_knobs():
        value = knobs.get(knob)
        if type(value) is not int:
            continue
        bound = knob_bound(knob)
        if value > bound and knob not in SPAN_KNOBS:  # the cache knobs' sum is checked below, with its own message
            raise ConfigError(f"{knob} = {value:,} > {bound:,}: the largest {knob} a run can have (its store column "
                              f"and one machine's memory; KNOB_BOUNDS in streaming_llm/config.py): lower {knob}")
        if value < -INT32_MAX - 1:
            raise ConfigError(f"{knob} = {value:,}: far below any value a run can have (its store column holds "
                              f"{-INT32_MAX - 1:,} to {INT32_MAX:,}); use 0 or more")
    spans = {k: knobs[k] for k in SPAN_KNOBS if type(knobs.get(k)) is int and knobs[k] > 0}
    if sum(spans.values()) > SPAN_BUDGET:
        terms = " + ".join(f"{k} {v:,}" for k, v in spans.items())
        total = f" = {sum(spans.values()):,}" if len(spans) > 1 else ""
        raise ConfigError(f"{terms}{total} > {SPAN_BUDGET:,}: the cache knobs together bound the "
                          f"attention span, at most {SPAN_BUDGET:,} tokens (SPAN_BUDGET in streaming_llm/config.py): "
                          "lower them")


@functools.lru_cache(maxsize=4096)
def _check_peak_fits(cap: int, prefill: int, knob_items: tuple[tuple[str, int], ...]) -> None:
    """cap_mode peak: raise ConfigError unless window = 1 stays within cap (then the largest window that does exists).
    Memoised: a grid's samples, repeats and stream lengths share their policy."""
    knobs = dict(knob_items)
    span = peak_span(StreamingPolicy(window=1, **knobs), prefill)
    if span > cap:
        raise ConfigError(
            f"cap_mode peak: even window = 1 peaks at {span} > cap = {cap} (sink {knobs['sink']} + overlap "
            f"{knobs['overlap']} + refresh {knobs['refresh']} + 1, plus compress_every {knobs['compress_every']} "
            f"or slack {knobs['slack']} of growth): raise cap or lower sink/overlap/refresh/compress_every/slack"
        )


def _largest_window_within(cap: int, prefill: int, knobs: dict[str, int]) -> StreamingPolicy:
    """cap_mode peak: the largest W whose largest attention span (simulated) stays within cap."""
    return _largest_window_memoised(cap, prefill, tuple(knobs.items()))


@functools.lru_cache(maxsize=4096)
def _largest_window_memoised(cap: int, prefill: int, knob_items: tuple[tuple[str, int], ...]) -> StreamingPolicy:
    knobs = dict(knob_items)

    def fits(window: int) -> bool:
        return peak_span(StreamingPolicy(window=window, **knobs), prefill) <= cap

    _check_peak_fits(cap, prefill, knob_items)
    low, high = 1, cap  # fits(low) holds; the span is at least C >= W, so W = cap cannot fit past cap
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return StreamingPolicy(window=low, **knobs)


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem: the knob, what was given, what is allowed."""
    lines = []
    for err in exc.errors():
        knob = ".".join(str(part) for part in err["loc"]) or "config"
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(RunConfig.model_fields)
            lines.append(f"unknown knob '{knob}' (known: {allowed})")
        elif err["type"] == "value_error":
            lines.append(str(err["ctx"]["error"]) if "ctx" in err else err["msg"])
        else:
            lines.append(f"{knob} = {err.get('input')!r}: {err['msg']}")
    return "; ".join(lines)
