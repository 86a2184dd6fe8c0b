"""Retrieval task instances and scoring (streaming_llm.tasks): exact lengths, the needle's depth, RULER's scoring on
hand-made cases, determinism, task files, and `needle_retained` against a brute-force replay of the schedule."""

from __future__ import annotations

import itertools
import json

import pytest

from streaming_llm import RunConfig
from streaming_llm.config import GENERATION_BUDGET, ConfigError
from streaming_llm.models import ByteTokenizer
from streaming_llm.policy import CompactionSchedule, StreamingPolicy
from streaming_llm.tasks import (
    HEADERS,
    NOISE_SENTENCES,
    TASKS,
    TaskError,
    TaskInstance,
    file_instances,
    make_instance,
    needle_retained,
    string_match_all,
    string_match_part,
)

BYTES = ByteTokenizer()


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("haystack", ["noise", "text"])
@pytest.mark.parametrize("context_tokens", [700, 1000, 2047])
def test_prompt_plus_answer_is_exactly_context_tokens(task, haystack, context_tokens):
    instance = make_instance(BYTES, task, context_tokens, 0.5, 3, haystack)
    assert len(instance.prompt_ids) + len(instance.answer_ids) == context_tokens
    assert instance.question_start == len(instance.context_ids)
    # The needle's span holds the needle: its text holds the first reference answer (vt: the chain's first value).
    needle = BYTES.decode(instance.context_ids[instance.needle_start : instance.needle_end])
    assert instance.answers[0] in needle
    assert instance.distance == instance.question_start - instance.needle_end
    assert BYTES.decode(instance.answer_ids).split() == list(instance.answers)


@pytest.mark.parametrize("task", ["passkey", "niah", "vt"])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.33, 0.5, 0.9, 1.0])
def test_the_needle_starts_at_the_sentence_boundary_nearest_its_depth(task, depth):
    context_tokens = 1500
    instance = make_instance(BYTES, task, context_tokens, depth, 0, "noise")
    header = len(HEADERS[task].encode())
    needle = instance.needle_end - instance.needle_start
    room = context_tokens - header - needle - len(instance.question_ids) - len(instance.answer_ids)
    before = instance.needle_start - header  # haystack tokens before the needle
    longest_sentence = max(len(s.encode()) for s in NOISE_SENTENCES)
    assert abs(before - depth * room) <= longest_sentence / 2 + 1
    if depth == 0.0:
        assert before == 0
    if depth == 1.0:
        assert instance.distance <= longest_sentence


def test_niah_multikey_holds_the_needle_and_distractors_with_other_keys():
    instance = make_instance(BYTES, "niah_multikey", 1200, 0.4, 5)
    context = BYTES.decode(instance.context_ids)
    assert context.count("One of the special magic numbers for") == 4
    asked = BYTES.decode(instance.question_ids).split("magic number for ")[1].split(" ")[0]
    assert context.count(f"for {asked} is") == 1
    needle = BYTES.decode(instance.context_ids[instance.needle_start : instance.needle_end])
    assert f"for {asked} is: {instance.answers[0]}." in needle


def test_vt_chain_assigns_the_value_through_every_variable():
    instance = make_instance(BYTES, "vt", 800, 0.3, 2)
    needle = BYTES.decode(instance.context_ids[instance.needle_start : instance.needle_end])
    names = instance.answers
    value = needle.split(" = ")[1].split(".")[0]
    assert f"VAR {names[0]} = {value}." in needle
    for a, b in itertools.pairwise(names):
        assert f"VAR {b} = VAR {a}." in needle
    assert value in BYTES.decode(instance.question_ids)


def test_instances_are_deterministic_and_seeds_differ():
    first = make_instance(BYTES, "niah", 900, 0.25, 7, "text")
    again = make_instance(BYTES, "niah", 900, 0.25, 7, "text")
    assert first == again and first.instance_hash == again.instance_hash
    others = {make_instance(BYTES, "niah", 900, 0.25, seed, "text").instance_hash for seed in range(8)}
    assert len(others) == 8
    assert make_instance(BYTES, "niah", 900, 0.5, 7, "text").instance_hash != first.instance_hash


def test_the_embedded_tokenizer_gives_exact_lengths_too():
    from streaming_llm.models import load_tokenizer

    try:
        tokenizer = load_tokenizer("smollm2-135m")
    except Exception as exc:  # the embedded model's package is absent: the byte tokenizer tests stand
        pytest.skip(f"embedded tokenizer unavailable: {exc}")
    for task, haystack in itertools.product(TASKS, ("noise", "text")):
        instance = make_instance(tokenizer, task, 1024, 0.5, 1, haystack)
        assert len(instance.prompt_ids) + len(instance.answer_ids) == 1024
        assert instance.answers[0] in tokenizer.decode(
            list(instance.context_ids[instance.needle_start : instance.needle_end]))


def test_bad_instances_are_refused_by_name():
    with pytest.raises(TaskError, match="raise context_tokens"):
        make_instance(BYTES, "passkey", 100, 0.5, 0)
    with pytest.raises(TaskError, match="depth"):
        make_instance(BYTES, "passkey", 1000, 1.5, 0)
    with pytest.raises(TaskError, match="unknown"):
        make_instance(BYTES, "qa", 1000, 0.5, 0)


# --- RULER's scoring ------------------------------------------------------------------------------------------------
def test_string_match_all_is_the_fraction_of_references_found_case_insensitively():
    assert string_match_all(" 12345. The pass key", ["12345"]) == 1.0
    assert string_match_all(" 1234", ["12345"]) == 0.0
    assert string_match_all(" VAR abcde, VAR FGHIJ", ["ABCDE", "FGHIJ", "KLMNO", "PQRST"]) == 0.5
    assert string_match_all("KLMNO PQRST ABCDE FGHIJ", ["ABCDE", "FGHIJ", "KLMNO", "PQRST"]) == 1.0
    assert string_match_part("the answer is Paris, France", ["paris", "Lyon"]) == 1.0
    assert string_match_part("Marseille", ["paris", "Lyon"]) == 0.0
    with pytest.raises(TaskError):
        string_match_all("x", [])


def test_a_task_file_is_read_through_datasets_truncated_in_the_middle_and_scored(tmp_path):
    path = tmp_path / "suite.jsonl"
    rows = [{"context": "alpha " * 50 + "The code is 4242. " + "omega " * 50, "question": "What is the code?",
             "answers": ["4242"]},
            {"context": "short context", "question": "Anything?", "answers": ["yes", "sure"]}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    instances = file_instances(BYTES, str(path), 2, context_tokens=200)
    first, second = instances
    assert len(first.prompt_ids) + len(first.answer_ids) == 200
    context = BYTES.decode(first.context_ids)
    assert context.startswith("alpha") and context.endswith("omega ")  # its middle went
    assert second.answers == ("yes", "sure") and BYTES.decode(second.context_ids) == "short context"
    assert first.needle_start is None and first.distance is None
    assert string_match_all(" 4242", first.answers) == 1.0
    with pytest.raises(TaskError, match="trials"):
        file_instances(BYTES, str(path), 3, context_tokens=200)
    with pytest.raises(TaskError, match="does not exist"):
        file_instances(BYTES, str(tmp_path / "none.jsonl"), 1, context_tokens=200)


# --- retained: the schedule against a brute-force replay -------------------------------------------------------------
def replay_retained(policy: StreamingPolicy, question_start: int, needle: range) -> int:
    """Feed stream indices one per step, apply every compaction's kept slots to the list of held indices."""
    schedule = CompactionSchedule(policy)
    held: list[int] = []
    for token in range(question_start):
        held.append(token)
        plan = schedule.step(len(held))
        if plan is not None:
            held = [held[slot] for slot in plan.kept_slots]
    return sum(token in needle for token in held)


POLICIES = {
    "strict": StreamingPolicy(sink=4, window=24),
    "lazy": StreamingPolicy(sink=4, window=24, compress_every=8),
    "staged": StreamingPolicy(sink=4, window=24, slack=8, compress_every=4, max_drop=3),
    "overlap": StreamingPolicy(sink=4, window=20, overlap=6),
    "refresh": StreamingPolicy(sink=4, window=20, refresh=5),
    "all": StreamingPolicy(sink=2, window=16, overlap=3, refresh=4, slack=6, compress_every=5, max_drop=4),
    "no_sinks": StreamingPolicy(sink=0, window=9, compress_every=3),
}


@pytest.mark.parametrize("name", POLICIES)
def test_retained_equals_a_brute_force_replay_of_the_schedule(name):
    policy = POLICIES[name]
    for question_start in (10, 33, 47, 64, 95, 130):
        for needle_start, length in itertools.product(range(0, question_start, 3), (1, 5, 12)):
            needle_end = min(needle_start + length, question_start)
            needle = range(needle_start, needle_end)
            expected = replay_retained(policy, question_start, needle)
            assert needle_retained(policy, question_start, needle_start, needle_end) == expected, (
                name, question_start, needle_start, needle_end)


def test_retained_dense_and_recompute():
    assert needle_retained(None, 500, 100, 120) == 20
    # Recompute: the question's first query attends the cap - 1 tokens before it.
    assert needle_retained(None, 500, 100, 120, recompute_cap=401) == 20
    assert needle_retained(None, 500, 100, 120, recompute_cap=391) == 10  # holds 110 .. 499
    assert needle_retained(None, 500, 100, 120, recompute_cap=300) == 0
    with pytest.raises(TaskError):
        needle_retained(None, 50, 40, 60)


def test_a_strict_cache_holds_nothing_of_a_needle_far_behind_its_window():
    policy = StreamingPolicy(sink=4, window=252)
    assert needle_retained(policy, 1000, 280, 300) == 0  # 700 tokens back
    assert needle_retained(policy, 1000, 900, 920) == 20


# --- the config -------------------------------------------------------------------------------------------------------
def test_task_knobs_leave_every_other_run_hash_as_it_was():
    # Pinned before the task knobs existed (the same configs on the parent commit).
    assert RunConfig(cap=256).run_hash == "2ba1441bea595526"
    assert RunConfig(method="dense").run_hash == "9ebc7651ac416329"
    assert RunConfig(cap=256, mode="generate").run_hash == "02c2948cead0ea56"
    assert RunConfig(cap=256, protocol="parallel", method="recompute").run_hash == "80a231460f55a400"
    assert "task" not in RunConfig(cap=256).normalised()
    # Given outside task mode, they are reset (not read there).
    assert RunConfig(cap=256, task="passkey", trials=3, depths=[0.5]).run_hash == RunConfig(cap=256).run_hash


def test_task_config_normalises_its_knobs_and_defaults():
    given = RunConfig(mode="task", task="passkey", context_tokens=512, method="dense", depths=[0, 0.5, 1])
    same = RunConfig(mode="task", task="passkey", context_tokens=512, method="dense", depths=(0.0, 0.5, 1.0),
                     trials=10, haystack="noise", max_tokens=77, prefill=3, dataset="pg19", new_tokens=5)
    assert given.run_hash == same.run_hash
    assert given.depths == (0.0, 0.5, 1.0) and given.trials == 10 and given.haystack == "noise"
    assert given.normalised()["depths"] == [0.0, 0.5, 1.0]
    assert given.run_hash != RunConfig(mode="task", task="niah", context_tokens=512, method="dense").run_hash
    # depths and trials are how much is measured, not the setting
    assert given.setting_hash == RunConfig(mode="task", task="passkey", context_tokens=512, method="dense",
                                           depths=[0.25], trials=3).setting_hash
    # One number (a grid measurement's list expands per value) and a flag's text are lists too.
    assert RunConfig(mode="task", task="passkey", context_tokens=512, method="dense", depths=0.5).depths == (0.5,)
    assert RunConfig(mode="task", task="passkey", context_tokens=512, method="dense", depths="0,0.5,1").run_hash == (
        given.run_hash)
    filed = RunConfig(mode="task", task_file="x.jsonl", context_tokens=512, method="dense", depths=[0.3])
    assert filed.depths is None and filed.haystack is None and filed.trials == 10


@pytest.mark.parametrize(("knobs", "message"), [
    (dict(depths=[1.5]), "outside"),
    (dict(depths=[]), "at least one"),
    (dict(depths=[0.5, 0.5]), "repeat"),
    (dict(depths=["deep"]), "numbers"),
    (dict(depths="0.1;0.5"), "commas"),
    (dict(context_tokens=None), "needs context_tokens"),
    (dict(context_tokens=10), "raise context_tokens"),
    (dict(context_tokens=90), "< 96, the passkey task's minimum.*raise context_tokens to 96"),
    (dict(task="niah", context_tokens=100), "< 112, the niah task's minimum"),
    (dict(task="niah_multikey", context_tokens=150), "< 200, the niah_multikey task's minimum"),
    (dict(task="vt", context_tokens=199), "< 200, the vt task's minimum.*raise context_tokens to 200"),
    (dict(trials=0), "trials"),
    (dict(task=None), "needs task"),
    (dict(task_file="x.jsonl"), "not both"),
    (dict(temperature=0.5), "greedily"),
    (dict(method="recompute", cap=64, protocol="parallel"), "stepwise"),
])
def test_bad_task_configs_are_refused_by_name(knobs, message):
    base = dict(mode="task", task="passkey", context_tokens=512, method="dense")
    with pytest.raises((ConfigError, ValueError), match=message):
        RunConfig.from_dict(base | knobs)


def test_repeat_is_not_read_in_task_mode_so_repeats_are_one_run(tmp_path):
    # A task run is deterministic (instances from the seed, greedy answers): a repeat would count the same trials twice.
    base = dict(mode="task", task="passkey", context_tokens=512, method="dense")
    assert RunConfig(**base, repeat=2).repeat == 0
    assert RunConfig(**base, repeat=2).run_hash == RunConfig(**base).run_hash
    assert RunConfig(cap=256, repeat=2).run_hash != RunConfig(cap=256).run_hash  # still read by a timed score run
    from gridrun.spec import load_grid

    path = tmp_path / "grid.yaml"
    path.write_text("name: t\nbase: {mode: task, task: passkey, context_tokens: 512, trials: 2, repeats: 3}\n"
                    "experiments:\n  cache:\n    runs: [{method: dense}, {method: streaming, cap: 96}]\n"
                    "  timing:\n    runs: [{method: streaming, cap: 96, mode: score, max_tokens: 300}]\n")
    grid = load_grid(path)
    assert sorted((run.config.mode, run.config.repeat) for run in grid.runs) == [
        ("score", 0), ("score", 1), ("score", 2), ("task", 0), ("task", 0)]


class BosBytes(ByteTokenizer):
    """The byte tokenizer as a Llama-like one: encode() puts a BOS (id 0, a byte no text here holds) in front."""

    bos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([0] if add_special_tokens else []) + super().encode(text)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("haystack", ["noise", "text"])
def test_a_tokenizer_that_adds_bos_gets_one_bos_at_the_front_only(task, haystack):
    tokenizer = BosBytes()
    instance = make_instance(tokenizer, task, 900, 0.5, 3, haystack)
    ids = instance.prompt_ids + instance.answer_ids
    assert len(ids) == 900
    assert ids[0] == 0 and ids.count(0) == 1
    assert instance.needle_start is not None and instance.needle_end is not None
    assert BYTES.decode(instance.context_ids[instance.needle_start:instance.needle_end]).startswith(
        (" The pass key", " One of the special", " VAR"))


def test_a_task_file_row_gets_one_bos_at_the_front_only(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"context": "filler " * 200, "question": "Which?", "answers": ["7"]}) + "\n")
    (instance,) = file_instances(BosBytes(), str(path), 1, 300)
    ids = instance.prompt_ids + instance.answer_ids
    assert len(ids) == 300 and ids[0] == 0 and ids.count(0) == 1


def test_the_generation_budget_is_the_tasks_and_the_schedule_fingerprint_covers_it():
    # vt's answer lists every variable: the gold answer + 8 tokens cut it (RULER's budget for vt is 30).
    for task in TASKS:
        instance = make_instance(BYTES, task, 700, 0.5, 0)
        assert instance.generate_tokens == max(GENERATION_BUDGET[task], len(instance.answer_ids) + 8)
        assert instance.generate_tokens >= GENERATION_BUDGET[task]
        # The stream a trial feeds (its prompt, then every generated token but the last) is within the fingerprint's.
        assert len(instance.prompt_ids) + instance.generate_tokens <= 700 + GENERATION_BUDGET[task]
    short = TaskInstance("vt", 0.5, 0, (1,) * 90, (2,) * 5, (3,) * 5, ("x",), 10, 20)
    assert short.generate_tokens == 30
    from streaming_llm.config import schedule_fingerprint

    config = RunConfig(mode="task", task="vt", context_tokens=512, cap=96)
    assert config.schedule_fingerprint == schedule_fingerprint(config.policy, 512 + 30 + 1, 0)
    filed = RunConfig(mode="task", task_file="x.jsonl", context_tokens=512, cap=96)
    assert filed.schedule_fingerprint == schedule_fingerprint(filed.policy, 512 + 64 + 1, 0)


def test_depth_order_and_negative_zero_are_one_configuration():
    base = dict(mode="task", task="passkey", context_tokens=512, method="dense")
    assert RunConfig(**base, depths=[0.5, 0.1]).run_hash == RunConfig(**base, depths=[0.1, 0.5]).run_hash
    assert RunConfig(**base, depths=[0.5, 0.1]).depths == (0.1, 0.5)
    negative = RunConfig(**base, depths=[-0.0, 0.5])
    assert negative.run_hash == RunConfig(**base, depths=[0, 0.5]).run_hash
    assert str(negative.depths[0]) == "0.0"
    assert make_instance(BYTES, "passkey", 700, -0.0, 1).instance_hash == make_instance(
        BYTES, "passkey", 700, 0.0, 1).instance_hash
    # Greedy decoding: temperature -0.0 is 0.0 in task mode (one hash), any other value refused.
    zero = RunConfig(**base, temperature=-0.0)
    assert str(zero.temperature) == "0.0" and zero.run_hash == RunConfig(**base).run_hash
    assert RunConfig(**base, temperature=0).run_hash == RunConfig(**base).run_hash


def test_each_tasks_minimum_context_builds_with_the_embedded_tokenizer():
    """The minimum config validation enforces is enough for every task, seed, depth and haystack tried."""
    from streaming_llm.config import MIN_TASK_CONTEXT
    from streaming_llm.models import load_tokenizer

    try:
        tokenizer = load_tokenizer("smollm2-135m")
    except Exception as exc:  # the embedded model's package is absent
        pytest.skip(f"embedded tokenizer unavailable: {exc}")
    for task, haystack, depth, seed in itertools.product(TASKS, ("noise", "text"), (0.0, 1.0), range(100, 110)):
        instance = make_instance(tokenizer, task, MIN_TASK_CONTEXT[task], depth, seed, haystack)
        assert len(instance.prompt_ids) + len(instance.answer_ids) == MIN_TASK_CONTEXT[task]
        RunConfig(mode="task", task=task, context_tokens=MIN_TASK_CONTEXT[task], method="dense")  # accepted


def test_the_noise_haystack_joins_its_sentences_with_a_space_as_ruler_does():
    instance = make_instance(BYTES, "passkey", 1200, 1.0, 0)
    haystack = BYTES.decode(instance.context_ids[len(BYTES.encode(HEADERS["passkey"])):instance.needle_start])
    ruler = " ".join(NOISE_SENTENCES * 40)
    assert haystack == ruler[: len(haystack)]
    assert "again.The" not in haystack and haystack.count("again. The grass") >= 5
