"""RunConfig: one evaluation run as plain, validated, frozen data, hashed from its normalised content.

The hash is the run's identity everywhere (store, grid, files). Validation happens at construction, so an invalid
configuration never reaches a model. This module does no I/O.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from .policy import StreamingPolicy, peak_span
from .text import DATASETS

Method = Literal["dense", "streaming", "recompute"]
Protocol = Literal["stepwise", "parallel"]

# Knobs each method reads; the others are reset to their defaults so that equivalent runs share one identity.
CACHE_KNOBS = (
    "sink", "window", "cap", "cap_mode", "overlap", "refresh", "refresh_policy",
    "slack", "compress_every", "max_drop", "rope_mode",
)
# Quantization: the kv_quant_* details matter only when kv_quant quantizes (kv_quant_sinks only when there are sinks).
KV_QUANT_KNOBS = ("kv_quant_group", "kv_quant_residual", "kv_quant_sinks")
KNOBS_USED_BY: dict[str, tuple[str, ...]] = {
    "dense": (),
    "streaming": CACHE_KNOBS,
    "recompute": ("cap",),
}


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
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    model: str = "smollm2-135m"
    dataset: str = "shakespeare"
    text_file: str | None = None
    dataset_source: str | None = None
    sample: int = 0
    max_tokens: int = 1024
    prefill: int = 0
    warmup: int = 8
    protocol: Protocol = "stepwise"
    chunk: int = 256
    score_stride: int = 1

    method: Method = "streaming"
    sink: int = 4
    window: int | None = None
    cap: int | None = None
    cap_mode: Literal["peak", "soft"] = "peak"
    overlap: int = 0
    refresh: int = 0
    refresh_policy: Literal["none", "middle"] = "none"
    slack: int = 0
    compress_every: int = 1
    max_drop: int = 0
    rope_mode: Literal["realign", "exact", "absolute"] = "realign"

    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    repeat: int = 0

    # Quantization (README "Quantization"): the streaming cache's storage, and the model's linear layers (torchao).
    kv_quant: Literal["none", "int8", "int4"] = "none"
    kv_quant_group: int = 32
    kv_quant_residual: int = 0
    kv_quant_sinks: Literal["quantized", "full"] = "full"
    weight_quant: Literal["none", "int8", "int8_dynamic", "int4"] = "none"

    @model_validator(mode="wrap")
    @classmethod
    def _normalise(cls, data: Any, handler) -> RunConfig:
        """Validate every given knob, then reset those the method does not read (and cap_mode without a cap)."""
        validated = handler(data)
        _check_signs(validated)  # on every knob given, even those the method ignores: a negative value is a mistake
        ignored = _ignored_knobs(validated)
        if not any(k in validated.model_fields_set for k in ignored):
            return validated
        return handler({k: v for k, v in validated.model_dump().items() if k not in ignored})

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.max_tokens < 2:
            raise ConfigError(f"max_tokens = {self.max_tokens} < 2: a run needs at least one token to predict")
        if self.prefill >= self.max_tokens:
            raise ConfigError(
                f"prefill = {self.prefill} >= max_tokens = {self.max_tokens}: prefill must leave decode steps; "
                "lower prefill or raise max_tokens"
            )
        if self.chunk < 1:
            raise ConfigError(f"chunk = {self.chunk} < 1: a parallel forward reads at least one token")
        if self.score_stride < 1:
            raise ConfigError(f"score_stride = {self.score_stride} < 1: score every step (1) or every k-th (k > 1)")
        decode_steps = self.max_tokens - 1 - self.prefill
        if self.protocol == "stepwise" and self.warmup >= decode_steps:
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
        return self

    def _check_kv_quant(self) -> None:
        """What can be checked without the model; kv_quant_group | head_dim is checked when the cache is built."""
        if self.kv_quant == "none":
            return
        if self.method != "streaming":
            raise ConfigError(f"kv_quant = {self.kv_quant} quantizes the streaming cache; method {self.method} uses "
                              "none: use method streaming (a window holding everything compares with dense)")
        if self.protocol == "parallel":
            raise ConfigError(f"kv_quant = {self.kv_quant} is implemented in the stepwise protocol's cache; protocol "
                              "parallel holds none: use protocol stepwise")
        if self.kv_quant_group < 1:
            raise ConfigError(f"kv_quant_group = {self.kv_quant_group} < 1: a group holds 1 or more elements")
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
        _ = self.policy  # derives the window, raising if none fits

    @cached_property
    def policy(self) -> StreamingPolicy:
        """The resolved policy of a streaming run (window derived from cap when cap is given)."""
        if self.method != "streaming":
            raise ConfigError(f"method {self.method} has no streaming policy")
        knobs = dict(
            sink=self.sink, overlap=self.overlap, refresh=self.refresh, slack=self.slack,
            compress_every=self.compress_every, max_drop=self.max_drop,
        )
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

    def normalised(self) -> dict[str, Any]:
        """The content that identifies the run: every field, in a fixed order, irrelevant knobs at their defaults."""
        return self.model_dump(mode="json")

    @cached_property
    def run_hash(self) -> str:
        """A 16-hex-digit identity of the normalised content."""
        return _content_hash(self.normalised())

    @cached_property
    def group_hash(self) -> str:
        """The identity shared by all repeats of one configuration (the hash with `repeat` left out)."""
        return _content_hash({k: v for k, v in self.normalised().items() if k != "repeat"})

    @cached_property
    def setting_hash(self) -> str:
        """The setting apart from how and on how much text it was measured: shared by its text samples, repeats,
        protocols and stream lengths. Quality (over samples) and timing (over repeats) of one setting join on it."""
        measurement = {"sample", "repeat", "protocol", "chunk", "score_stride", "warmup", "max_tokens", "prefill"}
        return _content_hash({k: v for k, v in self.normalised().items() if k not in measurement})

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> RunConfig:
        """Build from plain data (YAML, JSON, flags), turning validation failures into one readable ConfigError."""
        try:
            return cls(**data)
        except ValidationError as exc:
            raise ConfigError(f"{where}: {describe_validation_error(exc)}") from None


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


def _content_hash(content: dict[str, Any]) -> str:
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _check_signs(config: RunConfig) -> None:
    for knob in ("sink", "overlap", "refresh", "slack", "max_drop", "prefill", "warmup", "sample", "repeat", "chunk",
                 "score_stride", "kv_quant_residual"):
        if getattr(config, knob) < 0:
            raise ConfigError(f"{knob} = {getattr(config, knob)} < 0: {knob} must be 0 or more")


def _largest_window_within(cap: int, prefill: int, knobs: dict[str, int]) -> StreamingPolicy:
    """cap_mode peak: the largest W whose largest attention span (simulated) stays within cap."""

    def fits(window: int) -> bool:
        return peak_span(StreamingPolicy(window=window, **knobs), prefill) <= cap

    if not fits(1):
        span = peak_span(StreamingPolicy(window=1, **knobs), prefill)
        raise ConfigError(
            f"cap_mode peak: even window = 1 peaks at {span} > cap = {cap} (sink {knobs['sink']} + overlap "
            f"{knobs['overlap']} + refresh {knobs['refresh']} + 1, plus compress_every {knobs['compress_every']} "
            f"or slack {knobs['slack']} of growth): raise cap or lower sink/overlap/refresh/compress_every/slack"
        )
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
