"""The task protocol (streaming_llm.task_run) on tiny random models: the parallel path equals the stepwise one
(answers, answer NLLs, spans), the cache holds the needle tokens the schedule says, the stepwise fork leaves the cache
as the answer pass found it, and rows and summary agree."""

from __future__ import annotations

import numpy as np
import pytest

from streaming_llm import RunConfig, evaluate
from streaming_llm.task_run import TRIAL_SCHEMA, make_task_target, run_trial, task_instances
from tests.conftest import TEST_DEVICE
from tests.test_gridrun_e2e import ray_local  # noqa: F401 (a fixture)

BASE = dict(model="tiny-llama", mode="task", task="passkey", context_tokens=420, depths=[0.2, 0.95], trials=1,
            attn_implementation="eager", device=TEST_DEVICE)


@pytest.mark.parametrize("knobs", [
    dict(method="dense"),
    dict(cap=96, compress_every=16),
    dict(window=40, sink=4, overlap=4, refresh=3, refresh_policy="middle", slack=6, compress_every=4, max_drop=3),
])
def test_parallel_equals_stepwise(tiny_models, knobs):
    loaded = tiny_models["tiny-llama"]
    stepwise = evaluate(RunConfig(**BASE, **knobs), loaded)
    parallel = evaluate(RunConfig(**BASE, **knobs, protocol="parallel", chunk=64), loaded)
    for name in ("answer", "retained", "retained_at_answer", "kv_len", "instance_hash", "needle_start", "distance",
                 "score"):
        assert stepwise.trials.column(name).to_pylist() == parallel.trials.column(name).to_pylist(), name
    np.testing.assert_allclose(stepwise.trials.column("answer_nll").to_numpy(),
                               parallel.trials.column("answer_nll").to_numpy(), rtol=0, atol=1e-4)
    assert stepwise.summary["kv_len_max"] == parallel.summary["kv_len_max"]


@pytest.mark.parametrize("rope_mode", ["realign", "exact", "absolute"])
def test_ring_layout_equals_compact(tiny_models, rope_mode):
    """A task run over the ring layout (stepwise) answers as the compact cache does: the same answers, spans and
    retained tokens, answer NLLs within 1e-5."""
    loaded = tiny_models["tiny-llama"]
    knobs = dict(window=40, sink=4, refresh=3, refresh_policy="middle", compress_every=8, rope_mode=rope_mode)
    compact = evaluate(RunConfig(**BASE, **knobs), loaded)
    ring = evaluate(RunConfig(**BASE, **knobs, layout="ring"), loaded)
    for name in ("answer", "retained", "kv_len", "instance_hash", "score"):
        assert ring.trials.column(name).to_pylist() == compact.trials.column(name).to_pylist(), name
    np.testing.assert_allclose(ring.trials.column("answer_nll").to_numpy(),
                               compact.trials.column("answer_nll").to_numpy(), rtol=0, atol=1e-5)


def test_recompute_with_a_window_over_the_whole_prompt_equals_dense(tiny_models):
    loaded = tiny_models["tiny-llama"]
    dense = evaluate(RunConfig(**BASE, method="dense"), loaded)
    recompute = evaluate(RunConfig(**BASE, method="recompute", cap=512), loaded)
    narrow = evaluate(RunConfig(**BASE, method="recompute", cap=64), loaded)
    assert recompute.trials.column("answer").to_pylist() == dense.trials.column("answer").to_pylist()
    np.testing.assert_allclose(recompute.trials.column("answer_nll").to_numpy(),
                               dense.trials.column("answer_nll").to_numpy(), rtol=0, atol=1e-4)
    assert recompute.trials.column("retained").to_pylist() == dense.trials.column("retained").to_pylist()
    assert narrow.trials.column("retained").to_pylist()[0] == 0  # depth 0.2: far behind a window of 64
    assert narrow.trials.column("kv_len").to_pylist() == [64, 64]


def test_rows_and_summary(tiny_models):
    config = RunConfig(**(BASE | dict(trials=2)), cap=96, protocol="parallel", chunk=64)
    result = evaluate(config, tiny_models["tiny-llama"])
    trials = result.trials
    assert trials.schema == TRIAL_SCHEMA and trials.num_rows == 4
    assert trials.column("depth").to_pylist() == [0.2, 0.2, 0.95, 0.95]
    assert trials.column("trial").to_pylist() == [0, 1, 0, 1]
    assert result.summary["trial_count"] == 4
    assert result.summary["accuracy"] == pytest.approx(np.mean(trials.column("score").to_numpy()))
    assert result.summary["answer_nll_mean"] == pytest.approx(np.mean(trials.column("answer_nll").to_numpy()))
    retained = trials.column("retained").to_pylist()
    needle = [e - s for s, e in zip(trials.column("needle_start").to_pylist(), trials.column("needle_end").to_pylist(),
                                    strict=True)]
    assert retained[:2] == [0, 0]  # depth 0.2 of 420 tokens: far behind a cap of 96
    assert retained[2:] == needle[2:]  # right before the question: all held
    assert result.summary["kv_len_max"] <= 96
    # The instance hashes regenerate: the same trials from the same config.
    again = [instance.instance_hash for _, instance in task_instances(config, tiny_models["tiny-llama"].tokenizer)]
    assert again == trials.column("instance_hash").to_pylist()


def test_retained_at_answer_counts_what_the_question_evicted(tiny_models):
    """A needle wholly inside a cap of 96 when the question starts loses tokens to the question's own ones before the
    first answer token is predicted: `retained_at_answer` says so, `retained` (at the question's start) cannot."""
    from streaming_llm.tasks import needle_retained

    loaded = tiny_models["tiny-llama"]
    for protocol in ("parallel", "stepwise"):
        config = RunConfig(**(BASE | dict(depths=[0.9])), cap=96, protocol=protocol, chunk=64)
        trials = evaluate(config, loaded).trials
        (start,), (end,) = trials.column("needle_start").to_pylist(), trials.column("needle_end").to_pylist()
        (retained,) = trials.column("retained").to_pylist()
        (at_answer,) = trials.column("retained_at_answer").to_pylist()
        _, instance = task_instances(config, loaded.tokenizer)[0]
        assert retained == end - start  # all of it when the question starts
        assert 0 < at_answer < retained  # the question's tokens evicted its first ones
        assert at_answer == needle_retained(config.policy, len(instance.prompt_ids) - 1, start, end)
    dense = evaluate(RunConfig(**(BASE | dict(depths=[0.9])), method="dense"), loaded).trials
    assert dense.column("retained_at_answer").to_pylist() == dense.column("retained").to_pylist()


@pytest.mark.parametrize("wrong_at", ["question", "answer"])
def test_the_runtime_check_of_retained_fires_on_a_wrong_count(tiny_models, monkeypatch, wrong_at):
    """The parallel path compares the schedule's counts with the needle tokens its cache really holds, at the
    question's start and when the first answer token is predicted: a wrong count at either is refused."""
    from streaming_llm import task_run

    loaded = tiny_models["tiny-llama"]
    config = RunConfig(**(BASE | dict(depths=[0.9])), cap=96, protocol="parallel", chunk=64)
    _, instance = task_instances(config, loaded.tokenizer)[0]
    wrong_index = instance.question_start if wrong_at == "question" else len(instance.prompt_ids) - 1
    right = task_run._retained

    def off_by_one(config, instance, index):
        value = right(config, instance, index)
        return value + 1 if index == wrong_index else value

    monkeypatch.setattr(task_run, "_retained", off_by_one)
    when = "the question starts" if wrong_at == "question" else "the first answer token"
    with pytest.raises(RuntimeError, match=when):
        run_trial(config, loaded, make_task_target(loaded, config), instance)


def test_the_stepwise_fork_leaves_the_question_state_as_it_was(tiny_models):
    """The answer pass runs on a deep copy: generating afterwards gives what generating without that pass gives."""
    loaded = tiny_models["tiny-llama"]
    config = RunConfig(**BASE, cap=80, compress_every=8, kv_quant="int8", kv_quant_group=16)
    _, instance = task_instances(config, loaded.tokenizer)[1]
    with_fork = run_trial(config, loaded, make_task_target(loaded, config), instance)
    target = make_task_target(loaded, config)
    import torch

    with torch.inference_mode():
        ids = list(instance.prompt_ids)
        logits = target.forward_block(torch.tensor([ids]))
        generated = [int(logits[-1].argmax())]
        while len(generated) < instance.generate_tokens:
            generated.append(int(target.forward_block(torch.tensor([generated[-1:]]))[-1].argmax()))
    names = TRIAL_SCHEMA.names[3:]
    assert dict(zip(names, with_fork, strict=True))["answer"] == loaded.tokenizer.decode(generated)


def test_a_task_file_runs_through_the_protocol(tiny_models, tmp_path):
    import json

    path = tmp_path / "suite.jsonl"
    path.write_text("".join(json.dumps({"context": f"filler {i} " * 30, "question": "Which number?",
                                        "answers": [str(i)]}) + "\n" for i in range(3)))
    config = RunConfig(model="tiny-llama", mode="task", task_file=str(path), context_tokens=200, trials=3,
                       method="dense", protocol="parallel", device=TEST_DEVICE)
    result = evaluate(config, tiny_models["tiny-llama"])
    assert result.trials.num_rows == 3
    assert result.trials.column("retained").to_pylist() == [None] * 3
    assert result.trials.column("expected").to_pylist() == ["0", "1", "2"]
    assert np.isfinite(result.summary["answer_nll_mean"])


def test_task_metric_defaults_by_source_and_scores_a_file_with_alternatives(tiny_models, tmp_path):
    """RULER scores its QA rows (alternative answers) with string_match_part, its synthetic tasks with
    string_match_all: task_metric defaults so, and either can be asked for."""
    import json

    from streaming_llm.tasks import string_match_all, string_match_part

    assert RunConfig(**BASE, method="dense").task_metric == "all"
    assert RunConfig(cap=256).task_metric is None and "task_metric" not in RunConfig(cap=256).normalised()
    loaded = tiny_models["tiny-llama"]
    path = tmp_path / "qa.jsonl"
    knobs = dict(model="tiny-llama", mode="task", task_file=str(path), context_tokens=200, trials=1, method="dense",
                 protocol="parallel", device=TEST_DEVICE)
    path.write_text(json.dumps({"context": "filler 7 " * 30, "question": "Which number?", "answers": ["7"]}) + "\n")
    answer = evaluate(RunConfig(**knobs), loaded).trials.column("answer").to_pylist()[0]
    references = [answer[:2], "no such answer #"]  # one found in the greedy output, one not
    path.write_text(json.dumps({"context": "filler 7 " * 30, "question": "Which number?", "answers": references})
                    + "\n")
    part = RunConfig(**knobs)
    assert part.task_metric == "part" and part.run_hash != RunConfig(**knobs, task_metric="all").run_hash
    scored = {metric: evaluate(RunConfig(**knobs, task_metric=metric), loaded).trials for metric in ("all", "part")}
    assert scored["part"].column("answer").to_pylist() == scored["all"].column("answer").to_pylist()
    output = scored["part"].column("answer").to_pylist()[0]
    assert scored["part"].column("score").to_pylist() == [string_match_part(output, references)] == [1.0]
    assert scored["all"].column("score").to_pylist() == [string_match_all(output, references)] == [0.5]


# --- through the grid and the store -----------------------------------------------------------------------------------
TASK_GRID = """
name: tasks
base: {model: tiny-llama, mode: task, task: passkey, context_tokens: 420, depths: [0.2, 0.95], trials: 2,
       protocol: parallel, chunk: 64}
experiments:
  cache:
    runs: [{method: dense}, {method: streaming, cap: 96}]
  scored:
    runs: [{method: streaming, cap: 96, max_tokens: 300}]
"""


@pytest.mark.usefixtures("ray_local")
def test_a_task_grid_stores_its_trials_joined_to_its_runs(tmp_path):
    from tests.test_gridrun_e2e import query, run_grid, write_grid

    grid_path, store = write_grid(tmp_path, TASK_GRID), tmp_path / "store.duckdb"
    report, out = run_grid(grid_path, store, workers=1)
    assert report.complete and report.done == 2, out  # max_tokens is not read by a task run: the same run
    runs = query(store, "SELECT run_hash, method, task, context_tokens, depths, trials, haystack, trial_count, "
                        "accuracy, answer_nll_mean FROM runs WHERE status = 'done' ORDER BY method")
    assert [row[1:8] for row in runs] == [("dense", "passkey", 420, "[0.2, 0.95]", 2, "noise", 4),
                                          ("streaming", "passkey", 420, "[0.2, 0.95]", 2, "noise", 4)]
    assert query(store, "SELECT count(*) FROM tokens") == [(0,)]
    rows = query(store, "SELECT r.method, t.depth, t.trial, t.retained, t.needle_end - t.needle_start, t.answer_nll, "
                        "t.score, t.instance_hash FROM trials t JOIN runs r USING (run_hash) "
                        "ORDER BY r.method, t.depth, t.trial")
    assert len(rows) == 8
    dense, streaming = rows[:4], rows[4:]
    assert all(row[3] == row[4] for row in dense)  # dense holds every needle token
    assert [row[3] for row in streaming[:2]] == [0, 0]  # far behind a cap of 96
    assert [row[7] for row in dense] == [row[7] for row in streaming]  # the same instances
    for run_hash, *_, accuracy, nll in runs:
        stored = query(store, "SELECT avg(score), avg(answer_nll) FROM trials WHERE run_hash = ?", [run_hash])
        assert stored[0] == pytest.approx((accuracy, nll))

    # The stored trials are evaluate()'s.
    config = RunConfig(model="tiny-llama", mode="task", task="passkey", context_tokens=420, depths=[0.2, 0.95],
                       trials=2, protocol="parallel", chunk=64, cap=96)
    assert config.run_hash in {row[0] for row in runs}
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        direct = evaluate(config)
    finally:
        torch.set_num_threads(threads)
    stored = query(store, "SELECT answer, answer_nll, retained FROM trials WHERE run_hash = ? ORDER BY depth, trial",
                   [config.run_hash])
    assert [row[0] for row in stored] == direct.trials.column("answer").to_pylist()
    np.testing.assert_allclose([row[1] for row in stored], direct.trials.column("answer_nll").to_numpy(),
                               rtol=1e-6)  # float32 forwards, another process
    assert [row[2] for row in stored] == direct.trials.column("retained").to_pylist()

    # The query layer: accuracy per configuration and depth, with its Wilson interval, from the trials rows.
    from store import queries
    from store.stats import wilson_interval

    with queries.connect(store) as con:
        table = queries.retrieval_table(con, "tasks")
        pooled = queries.retrieval_table(con, "tasks", by_depth=False)
        assert queries.retrieval_table(con, "tasks", experiments=["nothing"]).empty
    assert len(table) == 4 and len(pooled) == 2
    assert sorted(table.method) == ["dense", "dense", "streaming", "streaming"]
    assert set(table.trials) == {2} and set(pooled.trials) == {4} and set(table.trials_per_depth) == {2}
    for row in table.itertuples():
        scores = query(store, "SELECT t.score, t.answer_nll, t.retained, t.retained_at_answer FROM trials t "
                              "JOIN runs r USING (run_hash) WHERE r.method = ? AND t.depth = ?",
                       [row.method, row.depth])
        assert row.accuracy == pytest.approx(np.mean([s[0] for s in scores]))
        assert row.answer_nll == pytest.approx(np.mean([s[1] for s in scores]))
        assert row.retained == pytest.approx(np.mean([s[2] for s in scores]))
        assert row.retained_at_answer == pytest.approx(np.mean([s[3] for s in scores]))
        assert (row.accuracy_low, row.accuracy_high) == pytest.approx(wilson_interval(sum(s[0] for s in scores), 2))
    streaming_far = table[(table.method == "streaming") & (table.depth == 0.2)].iloc[0]
    assert streaming_far.retained == 0


def test_wilson_intervals_of_hand_made_proportions():
    from store.stats import wilson_interval

    assert wilson_interval(9, 10) == pytest.approx((0.5958, 0.9821), abs=1e-4)  # Wilson's 95 % interval for 9/10
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)


def test_the_progress_digest_reads_task_knobs_of_task_runs_only():
    from gridrun.progress import KnobDigest

    score = RunConfig(model="tiny-llama", cap=64)
    tasks = [RunConfig(model="tiny-llama", mode="task", task=task, context_tokens=512, cap=64)
             for task in ("passkey", "niah")]
    digest = KnobDigest([score, *tasks])
    assert "task=niah" in digest.describe(tasks[1]) or "task=passkey" in digest.describe(tasks[0])
    assert "task" not in digest.describe(score)


def test_compile_is_refused_in_task_mode():
    with pytest.raises(ValueError, match="compile = default with mode task"):
        RunConfig(**BASE, cap=96, layout="ring", compile="default")


@pytest.mark.parametrize("knobs", [
    dict(method="dense", protocol="parallel", chunk=64),
    dict(cap=96, compress_every=16, protocol="parallel", chunk=64),
    dict(window=40, sink=4, overlap=4, refresh=3, refresh_policy="middle", slack=6, compress_every=4, max_drop=3,
         protocol="parallel", chunk=32),
    dict(cap=96, compress_every=16),
    dict(cap=80, compress_every=8, kv_quant="int4", kv_quant_group=16),
    dict(method="recompute", cap=64),
])
def test_trials_sharing_a_prefix_equal_trials_run_from_scratch(tiny_models, monkeypatch, knobs):
    """Trials of one depth share the noise haystack before the needle: fed once and forked, they give exactly the
    numbers of trials fed from an empty cache (answers, answer NLLs bit for bit, spans, retained)."""
    from streaming_llm import task_run

    loaded = tiny_models["tiny-llama"]
    config = RunConfig(**{**BASE, "trials": 3, "depths": [0.2, 0.9]}, **knobs)
    instances = [instance for _, instance in task_instances(config, loaded.tokenizer)]
    shared = [task_run.shared_prefix_length(config, part) for part in (instances[:3], instances[3:])]
    assert shared[1] > shared[0] > 0  # the needle at 0.9 lies later: more of the haystack before it is shared
    if config.protocol == "parallel":
        assert all(length % config.chunk == 0 for length in shared)
    assert shared[1] < min(instance.needle_end for instance in instances[3:])  # the pass keys differ
    forked = evaluate(config, loaded)
    monkeypatch.setattr(task_run, "shared_prefix_length", lambda config, instances: 0)
    scratch = evaluate(config, loaded)
    for name in TRIAL_SCHEMA.names:
        assert forked.trials.column(name).to_pylist() == scratch.trials.column(name).to_pylist(), name
    for key in ("kv_len_max", "kv_len_mean", "accuracy", "answer_nll_mean", "token_hash"):
        assert forked.summary[key] == scratch.summary[key], key


def test_no_prefix_is_shared_where_the_contexts_differ_or_one_forward_takes_them(tiny_models):
    """The text haystack starts each trial at its own offset: only the task's header is in common, cut to whole
    blocks. A stepwise context that one causal forward takes whole (dense) is not split."""
    from streaming_llm import task_run

    loaded = tiny_models["tiny-llama"]
    text = RunConfig(**{**BASE, "trials": 3, "depths": [0.5]}, haystack="text", cap=96, compress_every=16,
                     protocol="parallel", chunk=64)
    instances = [instance for _, instance in task_instances(text, loaded.tokenizer)]
    contexts = [instance.context_ids for instance in instances]
    common = next(i for i in range(len(contexts[0])) if len({context[i] for context in contexts}) > 1)
    assert common < instances[0].needle_start  # the haystacks differ before any needle
    assert task_run.shared_prefix_length(text, instances) == common // text.chunk * text.chunk
    dense = RunConfig(**{**BASE, "trials": 3, "depths": [0.5]}, method="dense")
    instances = [instance for _, instance in task_instances(dense, loaded.tokenizer)]
    assert task_run.shared_prefix_length(dense, instances) == 0
    assert task_run.shared_prefix_length(dense, instances[:1]) == 0


def test_a_trial_refuses_a_target_that_does_not_hold_what_fed_says(tiny_models):
    loaded = tiny_models["tiny-llama"]
    config = RunConfig(**BASE, cap=96, compress_every=16, protocol="parallel", chunk=64)
    _, instance = task_instances(config, loaded.tokenizer)[0]
    with pytest.raises(ValueError, match="holds 0 tokens, fed = 64"):
        run_trial(config, loaded, make_task_target(loaded, config), instance, fed=64)
