"""Retrieval task instances (passkey, RULER's needle tasks, variable tracking) and their scoring, built offline.

An instance is a pure function of (task, context_tokens, depth, seed, haystack) and the model's tokenizer: its pieces
are tokenised separately and joined as token ids, so the prompt plus the gold answer is exactly `context_tokens` tokens
and the needle's token span is known exactly. `needle_retained` says, from the schedule alone, how many of the
needle's tokens a cache still holds when the question starts. This module never runs a model.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import ANSWER_SLACK_TOKENS, GENERATION_BUDGET, TASKS
from .policy import CompactionSchedule, StreamingPolicy

HAYSTACKS = ("noise", "text")

# RULER's noise haystack (and the passkey task's filler since Landmark Attention): the same sentences, repeated and
# joined by a space as RULER joins them (each but the haystack's first is tokenised with its leading space).
NOISE_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                   "There and back again.")
HEADERS = {
    "passkey": "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will "
               "quiz you about the important information there.\n",
    "niah": "Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz "
            "you about the numbers afterwards.\n",
    "vt": "Memorize and track the chain(s) of variable assignment hidden in the following text.\n",
}
HEADERS["niah_multikey"] = HEADERS["niah"]
# Keys of the needle tasks: RULER draws words; two of these make a key ("amber-falcon").
KEY_WORDS = ("amber", "falcon", "quiet", "river", "copper", "meadow", "silver", "lantern", "orchid", "thunder",
             "velvet", "harbor", "maple", "crimson", "glacier", "pepper", "saddle", "walnut", "cobalt", "ember",
             "fable", "garnet", "hollow", "ivory", "jasper", "kettle", "lilac", "marble", "nectar", "olive")
MULTIKEY_DISTRACTORS = 3  # RULER's niah_multikey_1: the needle among 3 needles with other keys
VT_HOPS = 4  # assignments after the first: VAR A = value, VAR B = VAR A, ... (RULER's default num_hops)
TEXT_HAYSTACK_SPREAD = 4  # the text haystack starts at a seeded offset within 4 context lengths of the plays' start


class TaskError(ValueError):
    """An instance that cannot be built as asked; the message names the input and the fix."""


@dataclass(frozen=True)
class TaskInstance:
    """One trial: context (haystack with the needle), question, gold answer, as token ids; the needle's span
    [needle_start, needle_end) in the context (None for a task file's rows), and what scores an answer."""

    task: str
    depth: float | None
    seed: int
    context_ids: tuple[int, ...]
    question_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]  # the gold continuation (answers joined), teacher-forced for answer_nll
    answers: tuple[str, ...]  # references: scored by the run's task_metric (string_match_all or _part)
    needle_start: int | None
    needle_end: int | None

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.context_ids + self.question_ids

    @property
    def question_start(self) -> int:
        return len(self.context_ids)

    @property
    def distance(self) -> int | None:
        """Tokens from the needle's end to the question's start (0: the needle ends right before it)."""
        return None if self.needle_end is None else self.question_start - self.needle_end

    @property
    def expected(self) -> str:
        return " ".join(self.answers)

    @property
    def generate_tokens(self) -> int:
        """The greedy answer's length: the task's budget (RULER's), or the gold answer plus some slack if longer."""
        return max(GENERATION_BUDGET[self.task], len(self.answer_ids) + ANSWER_SLACK_TOKENS)

    @property
    def instance_hash(self) -> str:
        """A 16-hex-digit hash of the prompt and answer ids and the needle's span: equal hashes, identical trials."""
        digest = hashlib.sha256(json.dumps([self.context_ids, self.question_ids, self.answer_ids,
                                            self.needle_start, self.needle_end]).encode())
        return digest.hexdigest()[:16]


# --- scoring (RULER's definitions) -----------------------------------------------------------------------------------
def string_match_all(output: str, references: Sequence[str]) -> float:
    """RULER's string_match_all for one output: the fraction of references found in it (case-insensitive)."""
    if not references:
        raise TaskError("an instance without reference answers cannot be scored")
    text = output.lower()
    return sum(reference.lower() in text for reference in references) / len(references)


def string_match_part(output: str, references: Sequence[str]) -> float:
    """RULER's string_match_part (its QA tasks): 1 when any reference is found in the output, else 0."""
    if not references:
        raise TaskError("an instance without reference answers cannot be scored")
    text = output.lower()
    return float(any(reference.lower() in text for reference in references))


# --- building instances ----------------------------------------------------------------------------------------------
def _encode(tokenizer, text: str) -> tuple[int, ...]:
    """A piece's ids without special tokens: pieces are joined as ids, and a BOS per piece would land mid-prompt."""
    return tuple(int(i) for i in tokenizer.encode(text, add_special_tokens=False))


def _bos(tokenizer) -> tuple[int, ...]:
    """The BOS a tokenizer puts at the front of a text (Llama-like ones), once per prompt; () when it adds none
    (SmolLM2's, the byte tokenizer)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return ()
    ids = tokenizer.encode("a")
    return (int(bos),) if len(ids) > 0 and int(ids[0]) == int(bos) else ()


def _decode_one(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def _noise(tokenizer, count: int) -> tuple[list[int], list[int]]:
    """`count` ids of repeated noise sentences, and the sentence starts (where a needle may go)."""
    sentences = [_encode(tokenizer, " " + s) for s in NOISE_SENTENCES]
    ids: list[int] = list(_encode(tokenizer, NOISE_SENTENCES[0]))  # right after the header's newline: no space
    starts: list[int] = [0]
    while len(ids) < count:
        for sentence in sentences[1:] + sentences[:1]:
            starts.append(len(ids))
            ids.extend(sentence)
    return ids[:count], [s for s in starts if s < count] + [count]  # the haystack's end: right before the question


def _text(tokenizer, count: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """`count` ids of the plays the project ships, from a seeded offset, and the line starts."""
    from .text import load_stream  # the text's loading does I/O: only this haystack needs it

    offset = rng.randrange(TEXT_HAYSTACK_SPREAD * max(count, 1))
    lead = len(_bos(tokenizer))  # the stream's own BOS, at its front: never part of a haystack
    stream = load_stream(tokenizer, "shakespeare", lead + offset + count)
    ids = [int(i) for i in stream.ids[lead + offset:]]
    newline_after: dict[int, bool] = {}
    starts = [0]
    for index, token in enumerate(ids[:-1]):
        if token not in newline_after:
            newline_after[token] = _decode_one(tokenizer, token).endswith("\n")
        if newline_after[token]:
            starts.append(index + 1)
    starts.append(count)
    return ids, starts


def _needles(task: str, rng: random.Random) -> tuple[list[str], str, tuple[str, ...], str]:
    """(needle texts, the first being the one asked for; the question; the reference answers; the gold answer)."""
    if task == "passkey":
        value = str(rng.randrange(10_000, 100_000))
        needle = f" The pass key is {value}. Remember it. {value} is the pass key."
        return [needle], "\nWhat is the pass key? The pass key is", (value,), f" {value}"
    if task in ("niah", "niah_multikey"):
        count = 1 + (MULTIKEY_DISTRACTORS if task == "niah_multikey" else 0)
        keys: list[str] = []
        while len(keys) < count:
            key = "-".join(rng.sample(KEY_WORDS, 2))
            if key not in keys:
                keys.append(key)
        values = [str(rng.randrange(1_000_000, 10_000_000)) for _ in keys]
        needles = [f" One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values, strict=True)]
        question = (f"\nWhat is the special magic number for {keys[0]} mentioned in the provided text? The special "
                    f"magic number for {keys[0]} mentioned in the provided text is")
        return needles, question, (values[0],), f" {values[0]}"
    if task == "vt":
        value = str(rng.randrange(10_000, 100_000))
        names: list[str] = []
        while len(names) < VT_HOPS + 1:
            name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            if name not in names:
                names.append(name)
        chain = [f" VAR {names[0]} = {value}."] + [f" VAR {b} = VAR {a}." for a, b in zip(names, names[1:],
                                                                                          strict=False)]
        question = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: "
                    f"According to the chain(s) of variable assignment in the text above, {len(names)} variables are "
                    "assigned the value " + value + ", they are:")
        return ["".join(chain)], question, tuple(names), "".join(f" {name}" for name in names)
    raise TaskError(f"task = {task!r} is unknown (known: {', '.join(TASKS)})")


def make_instance(tokenizer, task: str, context_tokens: int, depth: float, seed: int,
                  haystack: str = "noise") -> TaskInstance:
    """The trial of `task` whose prompt plus gold answer is exactly `context_tokens` tokens, the needle starting at
    the haystack boundary (sentence or line start) nearest `depth` of the haystack; distractor needles (niah_multikey)
    at seeded boundaries elsewhere. Deterministic in its arguments and the tokenizer."""
    if task not in TASKS:
        raise TaskError(f"task = {task!r} is unknown (known: {', '.join(TASKS)})")
    if haystack not in HAYSTACKS:
        raise TaskError(f"haystack = {haystack!r} is unknown (known: {', '.join(HAYSTACKS)})")
    if not 0.0 <= depth <= 1.0:
        raise TaskError(f"depth = {depth} is outside [0, 1]: it is the fraction of the haystack before the needle")
    depth = float(depth) + 0.0  # the config's normalised value (-0.0 is 0.0): equal depths, equal instances
    rng = random.Random(f"{task}:{context_tokens}:{depth!r}:{seed}:{haystack}")
    needle_texts, question_text, answers, gold = _needles(task, rng)
    header = _bos(tokenizer) + _encode(tokenizer, HEADERS[task])
    needles = [_encode(tokenizer, text) for text in needle_texts]
    question = _encode(tokenizer, question_text)
    answer = _encode(tokenizer, gold)
    fixed = len(header) + sum(map(len, needles)) + len(question) + len(answer)
    room = context_tokens - fixed
    if room < 1:
        raise TaskError(f"context_tokens = {context_tokens}: the {task} task's header, needles, question and answer "
                        f"take {fixed} tokens already; raise context_tokens above {fixed}")
    ids, starts = _noise(tokenizer, room) if haystack == "noise" else _text(tokenizer, room, rng)
    target = min(starts, key=lambda start: (abs(start - depth * room), start))
    places = [target]
    others = [s for s in starts if s != target]
    for _ in needles[1:]:
        if not others:
            raise TaskError(f"context_tokens = {context_tokens} leaves no room for {task}'s distractor needles: "
                            "raise context_tokens")
        places.append(others.pop(rng.randrange(len(others))))
    context = list(header)
    cursor = 0
    needle_start = needle_end = -1
    for place, index in sorted((p, i) for i, p in enumerate(places)):
        context.extend(ids[cursor:place])
        cursor = place
        if index == 0:
            needle_start = len(context)
        context.extend(needles[index])
        if index == 0:
            needle_end = len(context)
    context.extend(ids[cursor:])
    instance = TaskInstance(task, depth, seed, tuple(context), question, answer, answers, needle_start, needle_end)
    if len(instance.prompt_ids) + len(answer) != context_tokens:
        raise AssertionError(f"internal error: instance of {len(instance.prompt_ids) + len(answer)} tokens, "
                             f"asked for {context_tokens}")
    return instance


def file_instances(tokenizer, path: str, trials: int, context_tokens: int | None) -> list[TaskInstance]:
    """The first `trials` rows of a JSONL file of {context, question, answers} (RULER / LongBench exports), read
    through `datasets`. A context whose prompt plus gold answer passes `context_tokens` loses its middle (as LongBench
    truncates). These rows have no needle span."""
    import datasets  # heavy import, needed only for a task file

    if not Path(path).is_file():
        raise TaskError(f"task_file = {path!r} does not exist: pass a JSONL file of {{context, question, answers}}")
    rows = datasets.load_dataset("json", data_files=path, split="train")
    missing = {"context", "question", "answers"} - set(rows.column_names)
    if missing:
        raise TaskError(f"task_file {path}: rows lack {', '.join(sorted(missing))}; each row needs context, question "
                        "and answers (a list of strings)")
    if len(rows) < trials:
        raise TaskError(f"task_file {path} has {len(rows)} rows < trials = {trials}: lower trials")
    instances = []
    for index in range(trials):
        row = rows[index]
        answers = row["answers"]
        if isinstance(answers, str):
            answers = [answers]
        if not answers or not all(isinstance(a, str) and a for a in answers):
            raise TaskError(f"task_file {path}, row {index}: answers must be a non-empty list of strings")
        bos = _bos(tokenizer)
        context = _encode(tokenizer, row["context"])
        question = _encode(tokenizer, "\n" + row["question"])
        answer = _encode(tokenizer, " " + answers[0])
        if context_tokens is not None:
            keep = context_tokens - len(bos) - len(question) - len(answer)
            if keep < 2:
                raise TaskError(f"task_file {path}, row {index}: its question and answer take "
                                f"{len(bos) + len(question) + len(answer)} tokens of context_tokens = "
                                f"{context_tokens}: raise context_tokens")
            if len(context) > keep:
                context = context[: keep // 2] + context[len(context) - (keep - keep // 2):]
        context = bos + context
        instances.append(TaskInstance("file", None, index, context, question, answer, tuple(answers), None, None))
    return instances


# --- what the cache holds when the question starts -------------------------------------------------------------------
def needle_retained(policy: StreamingPolicy | None, question_start: int, needle_start: int, needle_end: int,
                    recompute_cap: int | None = None) -> int:
    """How many of the needle's tokens [needle_start, needle_end) the cache holds when the token at stream index
    `question_start` is fed (the question's first: `retained`; its last, which predicts the first answer token:
    `retained_at_answer`), the stream having been fed one token per step from an empty cache.

    `policy` None: dense (everything is held), or, with `recompute_cap`, the recompute window (the question's first
    query attends the cap - 1 tokens before it). Streaming: the schedule is replayed on slot indices of the needle's
    tokens only, compaction by compaction (kept runs), jumping over the steps where a non-staged schedule cannot act.
    """
    if not 0 <= needle_start <= needle_end <= question_start:
        raise TaskError(f"needle [{needle_start}, {needle_end}) must lie before the question at {question_start}")
    if policy is None:
        if recompute_cap is None:
            return needle_end - needle_start
        first_held = question_start - (recompute_cap - 1)
        return max(0, needle_end - max(needle_start, first_held))
    schedule = CompactionSchedule(policy)
    slots: dict[int, int] = {}  # needle token -> its slot, while held
    length = 0
    step = 0  # stream index of the token fed next
    while step < question_start:
        if not policy.staged and not slots and step < needle_start:
            # Nothing to track yet and no schedule state: jump to the step before the next compaction or the needle.
            advance = min(policy.soft_capacity + policy.compress_every - 1 - length, needle_start - step)
            if advance > 0:
                length += advance
                step += advance
                continue
        if needle_start <= step < needle_end:
            slots[step] = length
        length += 1
        step += 1
        target = schedule.target_length(length)
        if target is None:
            continue
        runs = schedule.kept_runs(length, target)
        moved: dict[int, int] = {}
        for token, slot in slots.items():
            new_slot = 0
            for start, stop in runs:
                if start <= slot < stop:
                    moved[token] = new_slot + slot - start
                    break
                new_slot += stop - start
        slots = moved
        length = target
        if not slots and step >= needle_end:
            return 0
    return len(slots)
