"""Draft kinds for speculative decoding, and the speculative-sampling correction that keeps the output exact.

A drafter proposes up to k tokens after the history, with the distributions it drew them from (or none: a point mass);
`verify` decides from the target's logits over the block which of them are accepted and draws the token that follows,
so that the generated tokens are distributed exactly as the target's (Leviathan et al. 2023, Chen et al. 2023) and,
greedy, are the target's argmax tokens. A drafter never touches the target's cache: it keeps its own state.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from transformers import DynamicCache

from .cache import StreamingCache
from .compat import cache_kwargs
from .config import ConfigError, RunConfig, _largest_window_within
from .models import load_model
from .rope import RotaryGeometry


@dataclass
class Draft:
    """Proposed tokens, and the distributions [len(tokens), vocab] they were drawn from (None: point masses)."""

    tokens: list[int]
    probs: torch.Tensor | None = None


class Drafter(Protocol):
    def prime(self, prompt: list[int]) -> None:
        """Read the prompt (but its last token) before the first proposal, with the target's prompt forward: its cost
        is the drafter's prefill, not the first block's."""
        ...

    def propose(self, history: list[int], count: int) -> Draft:
        """Up to `count` tokens to follow `history` (fewer, or none, when the drafter has no guess)."""
        ...

    def accepted(self, history: list[int]) -> None:
        """The history after a verification: forget whatever the drafter assumed past its common prefix."""
        ...


# --- the correction ---------------------------------------------------------------------------------------------------
def probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / temperature) in float64 on the CPU, where the sampling decisions are drawn."""
    return torch.softmax(logits.detach().to("cpu", torch.float64) / temperature, dim=-1)


def verify(logits: torch.Tensor, draft: Draft, temperature: float, rng: torch.Generator) -> tuple[int, int]:
    """(accepted, next): how many drafted tokens the target accepts, and the token it emits after them.

    `logits` [len(draft.tokens) + 1, vocab]: row j is the target's prediction after the j-th token of the block
    (the last accepted token, then the drafts). Greedy (temperature 0): drafts are accepted while they equal the
    target's argmax, and the next token is the argmax after them. Sampling: draft j is accepted with probability
    min(1, p_j(d) / q_j(d)); the first rejected one is replaced by a draw from the normalised positive part of
    p_j - q_j (for a point mass q: p_j with d removed); when all are accepted, the next token is drawn from p_k.
    """
    if temperature == 0.0:
        greedy = logits.argmax(dim=-1).tolist()
        accepted = 0
        while accepted < len(draft.tokens) and draft.tokens[accepted] == greedy[accepted]:
            accepted += 1
        return accepted, greedy[accepted]
    p = probabilities(logits, temperature)
    for j, token in enumerate(draft.tokens):
        q_token = 1.0 if draft.probs is None else float(draft.probs[j, token])
        if float(torch.rand((), generator=rng, dtype=torch.float64)) * q_token < float(p[j, token]):
            continue
        if draft.probs is None:
            residual = p[j].clone()
            residual[token] = 0.0
        else:
            residual = (p[j] - draft.probs[j].to(p.dtype)).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:  # p_j == q_j, where a rejection has probability 0 (rounding only)
            residual = p[j]
        return j, int(torch.multinomial(residual, 1, generator=rng))
    return len(draft.tokens), int(torch.multinomial(p[len(draft.tokens)], 1, generator=rng))


# --- prompt lookup -------------------------------------------------------------------------------------------------
@dataclass
class PromptLookup:
    """N-gram lookup over the token history (text, not cache: evicted tokens still count), as HF's prompt lookup, with
    the match chosen by its context.

    The last n tokens (n = ngram_max down to 1) are searched earlier in the history. Of their occurrences, the one whose
    preceding tokens agree longest with the tokens before the n-gram wins (the most recent among equals, agreement
    compared up to `context_max` tokens back): in a text that repeats with a period, that is the occurrence one period
    back, not a shorter repetition inside the period (HF takes the earliest occurrence, this class took the latest
    one; both draft the wrong phase of a line that repeats a word). Its followers are the draft, a point mass, copied
    forward as an induction head would: a match close to the end continues into the draft itself. A draft is no longer
    than the matched context (n plus the agreeing tokens before it): a bare one-token match drafts one token, not k
    that a verification pays for and rejects.
    """

    ngram_max: int = 3
    context_max: int = 64

    def propose(self, history: list[int], count: int) -> Draft:
        if count < 1:
            return Draft([])
        ids = np.asarray(history, dtype=np.int64)
        for n in range(min(self.ngram_max, len(ids) - 1), 0, -1):
            windows = sliding_window_view(ids[:-1], n)  # ngrams that have at least one follower
            starts = np.flatnonzero((windows == ids[-n:]).all(axis=1))
            if not len(starts):
                continue
            start, best = self._best_match(ids, starts, n)
            draft: list[int] = []
            for i in range(min(count, n + best)):
                source = start + n + i  # < len(ids) + i: inside the history, or a token this draft already copied
                draft.append(int(ids[source]) if source < len(ids) else draft[source - len(ids)])
            return Draft(draft)
        return Draft([])

    def _best_match(self, ids: np.ndarray, starts: np.ndarray, n: int, chunk: int = 256) -> tuple[int, int]:
        """(start, agreement) of the occurrence with the longest agreement, the latest among equals. Scanned from the
        latest back, a chunk at a time, up to the first that agrees for context_max tokens: nothing older can win, so
        a history that loops on one token (thousands of occurrences) costs one chunk, not all of them."""
        start, best = -1, -1
        for end in range(len(starts), 0, -chunk):
            candidates = starts[max(0, end - chunk) : end]
            agreement = self._agreement(ids, candidates, n)
            top = int(agreement.max())
            if top > best:  # strictly longer: an equal one in this older chunk is not the latest
                start, best = int(candidates[np.flatnonzero(agreement == top)[-1]]), top
            if best == self.context_max:
                break
        return start, best

    def _agreement(self, ids: np.ndarray, starts: np.ndarray, n: int) -> np.ndarray:
        """For each occurrence at `starts` of the last n-gram: how many tokens before it equal, in order going back,
        the tokens before the last n-gram (at most context_max)."""
        back = np.arange(1, self.context_max + 1)
        before_match = starts[:, None] - back[None, :]
        before_suffix = len(ids) - n - back
        same = (before_match >= 0) & (before_suffix >= 0)[None, :]
        same &= ids[before_match.clip(0)] == ids[before_suffix.clip(0)][None, :]
        return np.cumprod(same, axis=1).sum(axis=1)

    def prime(self, prompt: list[int]) -> None:
        return None  # the history is searched at each proposal: nothing to read ahead

    def accepted(self, history: list[int]) -> None:
        return None


# --- model drafts --------------------------------------------------------------------------------------------------
class ModelDrafter:
    """Drafts with a causal LM over its own cache: a separate model, the target's first layers, or the target over a
    small streaming cache. Greedy drafts are argmax tokens; sampled ones are drawn at the run's temperature.

    The draft's cache holds `fed` (a prefix of the history plus the drafts it fed); after a verification it is cut back
    to the common prefix with the new history, so only tokens the draft has not seen are fed at the next proposal.
    """

    def __init__(self, model, cache, temperature: float, rng: torch.Generator):
        self.model = model
        self.cache = cache
        self.temperature = temperature
        self.rng = rng
        self.fed: list[int] = []
        self.device = next(model.parameters()).device

    def _forward(self, tokens: list[int]) -> torch.Tensor:
        ids = torch.tensor([tokens], device=self.device)
        kwargs: dict[str, Any] = {}
        if isinstance(self.cache, StreamingCache):
            kwargs["position_ids"] = self.cache.next_positions(len(tokens), self.device)
        out = self.model(input_ids=ids, logits_to_keep=1, **kwargs, **cache_kwargs(self.cache))
        self.fed.extend(tokens)
        return out.logits[0, -1]

    def prime(self, prompt: list[int]) -> None:
        if prompt and not self.fed:
            self._forward(prompt)

    def propose(self, history: list[int], count: int) -> Draft:
        if count < 1:
            return Draft([])
        logits = self._forward(history[len(self.fed) :])
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        for i in range(count):
            if self.temperature == 0.0:
                token = int(logits.argmax())
            else:
                q = probabilities(logits, self.temperature)
                token = int(torch.multinomial(q, 1, generator=self.rng))
                probs.append(q)
            tokens.append(token)
            if i < count - 1:
                logits = self._forward([token])
        return Draft(tokens, torch.stack(probs) if probs else None)

    def accepted(self, history: list[int]) -> None:
        common = 0
        limit = min(len(self.fed), len(history))
        while common < limit and self.fed[common] == history[common]:
            common += 1
        if common < len(self.fed):
            drop_newest(self.cache, len(self.fed) - common)
            del self.fed[common:]


def drop_newest(cache, count: int) -> None:
    """Forget the newest `count` entries of a draft's cache: a StreamingCache's own `drop_newest` (which does not
    rewind its schedule: see there), a DynamicCache's crop."""
    if isinstance(cache, StreamingCache):
        cache.drop_newest(count)
        return
    cache.crop(-count)  # transformers 5.24: a negative value removes that many entries


def first_layers(model, count: int):
    """The target's first `count` decoder layers with its final norm and head, sharing its weights (no copy)."""
    base = model.base_model
    total = len(base.layers)
    if not 1 <= count < total:
        raise ConfigError(f"draft_layers = {count}: the target has {total} layers, use 1 to {total - 1}")
    config = copy.copy(model.config)
    config.num_hidden_layers = count
    truncated_base = copy.copy(base)
    truncated_base._modules = dict(base._modules)
    truncated_base._modules["layers"] = torch.nn.ModuleList(list(base.layers)[:count])
    truncated_base.config = config
    truncated = copy.copy(model)
    truncated._modules = dict(model._modules)
    truncated._modules[model.base_model_prefix] = truncated_base
    truncated.config = config
    return truncated


def make_drafter(config: RunConfig, loaded, rng: torch.Generator) -> Drafter | None:
    """The drafter of `config.spec` (None for spec none), its weights loaded or shared before any timing."""
    if config.spec == "none":
        return None
    if config.spec == "prompt_lookup":
        return PromptLookup(config.ngram_max)
    target = loaded.model
    if config.spec == "draft":
        if config.draft_model is not None:
            model = load_model(config.draft_model, target.dtype, loaded.device, loaded.attn_implementation)
            if model.config.vocab_size != target.config.vocab_size:
                raise ConfigError(
                    f"draft_model = {config.draft_model} has a vocabulary of {model.config.vocab_size} tokens, the "
                    f"target {config.model} {target.config.vocab_size}: a draft must share the target's tokenizer"
                )
        else:
            model = first_layers(target, config.draft_layers)
        return ModelDrafter(model, DynamicCache(config=model.config), config.temperature, rng)
    # self_stream: the target itself over a strict streaming cache of draft_cap entries (realign).
    policy = _largest_window_within(config.draft_cap, 0, dict(
        sink=config.sink, overlap=0, refresh=0, slack=0, compress_every=1, max_drop=0,
    ))
    cache = StreamingCache(policy, RotaryGeometry.of(target), target.config.num_hidden_layers, "realign")
    return ModelDrafter(target, cache, config.temperature, rng)
