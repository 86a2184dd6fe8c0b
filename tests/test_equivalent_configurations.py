"""Equivalent configurations: knob settings that keep the same tokens at every step share one run.

The schedule fingerprint against an independent re-statement (the kept token list of every step, built naively),
the study's equivalences, near-misses that differ in one step, dense and recompute identities left as they were, and
a fuzz on a tiny model: equal fingerprints always give equal NLLs. Then the store: a schema-2 store is refused by
readers with the fix, and migrated in place with every row kept.
"""

from __future__ import annotations

import itertools
import random

import duckdb
import numpy as np
import pytest
from fixtures_store import add_membership, create_store, insert_run

from gridrun.__main__ import main as gridrun_main
from store import queries
from store.schema import SCHEMA_VERSION
from streaming_llm import CompactionSchedule, RunConfig, StreamingPolicy, evaluate, schedule_fingerprint
from streaming_llm.config import _content_hash


def kept_every_step(policy: StreamingPolicy, tokens: int, prefill: int) -> tuple[tuple[int, ...], ...]:
    """The stream indices the cache holds after every step, built step by step from the full plans."""
    schedule = CompactionSchedule(policy)
    kept: list[int] = []
    states = []
    feeds = ([list(range(prefill))] if prefill else []) + [[index] for index in range(prefill, tokens - 1)]
    for fed in feeds:
        kept += fed
        plan = schedule.step(len(kept))
        if plan is not None:
            kept = [kept[slot] for slot in plan.kept_slots]
        states.append(tuple(kept))
    return tuple(states)


def test_fingerprints_are_equal_exactly_when_the_kept_tokens_are():
    """Every small policy (a few thousand), two stream shapes: fingerprint classes equal kept-token classes."""
    rng = random.Random(0)
    by_fingerprint: dict[tuple, set] = {}
    by_kept: dict[tuple, set] = {}
    for _ in range(3000):
        policy = StreamingPolicy(sink=rng.randint(0, 4), window=rng.randint(1, 10), overlap=rng.randint(0, 3),
                                 refresh=rng.randint(0, 3), slack=rng.randint(0, 10), compress_every=rng.randint(1, 7),
                                 max_drop=rng.randint(0, 7))
        for tokens, prefill in ((48, 0), (48, 13)):
            fingerprint = (tokens, prefill, schedule_fingerprint(policy, tokens, prefill))
            kept = (tokens, prefill, kept_every_step(policy, tokens, prefill))
            by_fingerprint.setdefault(fingerprint, set()).add(kept)
            by_kept.setdefault(kept, set()).add(fingerprint)
    assert all(len(kepts) == 1 for kepts in by_fingerprint.values())  # equal fingerprints: the same tokens
    assert all(len(prints) == 1 for prints in by_kept.values())  # the same tokens: equal fingerprints
    assert len(by_kept) < 6000, "the sample holds equivalent policies"
    # Near-misses are in the sample: kept-token histories that differ in exactly one step got different fingerprints.
    histories = [kept for kept in by_kept if kept[:2] == (48, 0)]
    one_step = sum(1 for a, b in itertools.combinations(histories[:400], 2)
                   if sum(x != y for x, y in zip(a[2], b[2], strict=True)) == 1)
    assert one_step > 0


def test_kept_runs_are_the_plan():
    schedule = CompactionSchedule(StreamingPolicy(sink=2, window=5, refresh=3, slack=6, compress_every=3, max_drop=2))
    for length, target in itertools.product(range(1, 40), range(10, 17)):
        if target < length:
            runs = schedule.kept_runs(length, target)
            assert [slot for start, stop in runs for slot in range(start, stop)] == list(
                schedule.plan(length, target).kept_slots)
            assert all(a[1] < b[0] for a, b in itertools.pairwise(runs))  # maximal runs: canonical


BASE = {"model": "tiny-llama", "max_tokens": 160, "prefill": 32, "cap": 48, "sink": 4, "method": "streaming"}


def config(**knobs) -> RunConfig:
    return RunConfig.from_dict({**BASE, **knobs})


@pytest.mark.parametrize("left, right", [
    ({"compress_every": 8}, {"compress_every": 8, "overlap": 8}),  # peak: the window shrinks by what overlap adds
    ({"compress_every": 8, "cap_mode": "soft"}, {"compress_every": 8, "cap_mode": "soft", "overlap": 8}),
    ({"compress_every": 8}, {"compress_every": 8, "slack": 16}),  # slack without max_drop: staged eviction is off
    ({"compress_every": 8, "max_drop": 4}, {"compress_every": 8, "max_drop": 4, "slack": 6}),  # safe < C: off
    # slack = R: staged eviction compacts to C + 1 under a window one smaller, from a full cache on (prefill = cap, as
    # in the paper grid; from an empty one its first compaction comes one step earlier: see the next test)
    ({"compress_every": 8, "prefill": 48}, {"compress_every": 8, "prefill": 48, "slack": 8, "max_drop": 4}),
    ({"compress_every": 8, "prefill": 48}, {"compress_every": 8, "prefill": 48, "slack": 8, "max_drop": 2}),
])
def test_the_studys_equivalences_share_one_run(left, right):
    a, b = config(**left), config(**right)
    assert a.config_hash != b.config_hash
    assert a.schedule_fingerprint == b.schedule_fingerprint and a.run_hash == b.run_hash
    assert a.group_hash == b.group_hash


@pytest.mark.parametrize("left, right", [
    ({"compress_every": 8}, {"compress_every": 8, "slack": 24, "max_drop": 4}),  # staged eviction acts
    ({"compress_every": 8}, {"compress_every": 8, "refresh": 4, "refresh_policy": "middle"}),
    ({"compress_every": 8}, {"compress_every": 8, "sink": 2}),
    ({"compress_every": 8}, {"compress_every": 8, "rope_mode": "absolute"}),  # not a schedule knob: stays identity
    ({"compress_every": 8}, {"compress_every": 8, "dtype": "bfloat16"}),
    ({"window": 40, "cap": None}, {"window": 40, "cap": None, "overlap": 8}),  # a set window: overlap adds tokens
    ({"compress_every": 8}, {"compress_every": 8, "slack": 8, "max_drop": 4}),  # slack = R, prefill < C: one step
])
def test_settings_that_change_the_computation_do_not(left, right):
    assert config(**left).run_hash != config(**right).run_hash


def test_a_difference_in_the_last_step_alone_is_not_merged():
    # C = 4 (S=1, W=3); 6 tokens: the last step reaches length 5, where R = 1 compacts and R = 2 does not.
    strict, lazy = StreamingPolicy(sink=1, window=3), StreamingPolicy(sink=1, window=3, compress_every=2)
    kept_strict, kept_lazy = kept_every_step(strict, 6, 0), kept_every_step(lazy, 6, 0)
    assert kept_strict[:-1] == kept_lazy[:-1] and kept_strict[-1] != kept_lazy[-1]
    assert schedule_fingerprint(strict, 6) != schedule_fingerprint(lazy, 6)
    assert schedule_fingerprint(strict, 5) == schedule_fingerprint(lazy, 5)  # one token fewer: never compacts


@pytest.mark.parametrize("method, knobs", [("dense", {}), ("recompute", {"cap": 48})])
def test_dense_and_recompute_identities_are_untouched(method, knobs):
    run = RunConfig.from_dict({"model": "tiny-llama", "max_tokens": 160, "method": method, **knobs})
    assert run.schedule_fingerprint is None and run.identity() == run.normalised()
    assert run.run_hash == run.config_hash == _content_hash(run.normalised())  # as before fingerprints existed


def test_the_fingerprint_takes_milliseconds_at_the_studys_size():
    import time

    policies = [StreamingPolicy(sink=4, window=2044), StreamingPolicy(sink=4, window=1900, refresh=32),
                StreamingPolicy(sink=4, window=1900, slack=128, compress_every=64, max_drop=32)]
    started = time.perf_counter()
    for policy in policies:
        schedule_fingerprint(policy, 20_480, 2048)
    assert time.perf_counter() - started < 1.0  # ~50 ms on this 2-core machine, with room for load


def random_knobs(rng: random.Random) -> dict:
    knobs = {"sink": rng.choice([0, 1, 4]), "compress_every": rng.choice([1, 2, 4, 8]),
             "overlap": rng.choice([0, 0, 4, 8]), "slack": rng.choice([0, 0, 2, 8, 16]),
             "max_drop": rng.choice([0, 0, 2, 4])}
    if rng.random() < 0.3:
        knobs.update(refresh=rng.choice([2, 4]), refresh_policy="middle")
    if rng.random() < 0.3:
        knobs["cap_mode"] = "soft"
    return knobs


def test_fuzz_equal_fingerprints_give_equal_nlls(tiny_models):
    """Random knob sets on tiny-llama; every pair with one fingerprint is evaluated: the NLLs and spans are equal."""
    rng = random.Random(11)
    loaded = tiny_models["tiny-llama"]
    base = {**BASE, "max_tokens": 96, "prefill": 16, "cap": 40, "device": "cpu", "attn_implementation": "eager"}
    classes: dict[str, dict[str, RunConfig]] = {}
    for _ in range(400):
        try:
            candidate = RunConfig.from_dict({**base, **random_knobs(rng)})
        except ValueError:
            continue  # a knob set that does not fit the cap: refused, as it should be
        classes.setdefault(candidate.run_hash, {})[candidate.config_hash] = candidate
    shared = [list(members.values())[:3] for members in classes.values() if len(members) > 1]
    assert len(shared) >= 4, "the fuzz must find equivalent configurations to compare"
    assert len(classes) >= 10, "and distinct ones"
    for members in shared[:6]:
        results = [evaluate(member, loaded=loaded) for member in members]
        reference = results[0].tokens
        for member, result in zip(members[1:], results[1:], strict=True):
            assert np.array_equal(result.tokens.column("nll").to_numpy(), reference.column("nll").to_numpy()), member
            assert result.tokens.column("kv_len").equals(reference.column("kv_len"))
            assert result.compactions.column("kv_len_after").equals(results[0].compactions.column("kv_len_after"))


# --- the store ------------------------------------------------------------------------------------------------------
def schema_2_store(path) -> str:
    """A store as gridrun wrote it before configurations existed: no such table, schema_version 2, one done run."""
    create_store(path)
    run = config(compress_every=8)
    with duckdb.connect(str(path)) as con:
        con.execute("DROP TABLE configurations")
        con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
        knobs = run.normalised()
        row = {"run_hash": run.config_hash, "group_hash": run.config_group_hash, "setting_hash": run.setting_hash,
               "status": "done", "attempts": 1,
               "config_json": "{}", **knobs, "ppl": 12.5, "tpot_ms_mean": 3.0, "code_version": "old",
               "window_resolved": run.policy.window}
        insert_run(con, row, None, None)
        add_membership(con, "old", [("main", run.config_hash)])
    return run.config_hash


def test_a_schema_2_store_is_refused_by_readers_then_migrated_with_every_row(tmp_path, capsys):
    path = tmp_path / "old.duckdb"
    old_hash = schema_2_store(path)
    with pytest.raises(queries.StoreError, match="python -m gridrun migrate --store"), queries.connect(path):
        pass
    assert gridrun_main(["migrate", "--store", str(path)]) == 0
    with queries.connect(path) as con:
        table = queries.run_table(con, "old", include_stale=True)
        version = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        migrated = con.execute("SELECT count(*) FROM meta WHERE key = 'migrated_from_2'").fetchone()[0]
    assert version == str(SCHEMA_VERSION) and migrated == 1
    assert list(table.run_hash) == list(table.config_hash) == [old_hash]  # its own configuration, as it was
    assert table.ppl.iloc[0] == 12.5 and table.equivalent_to.iloc[0] == ""


def test_dry_run_and_status_say_which_settings_share_a_run(tmp_path, capsys):
    grid = tmp_path / "eq.yaml"
    grid.write_text("name: eq\nbase: {model: tiny-llama, max_tokens: 160, prefill: 48, cap: 48, sink: 4, "
                    "method: streaming, compress_every: 8}\nexperiments:\n  overlap: {grid: {overlap: [0, 8]}}\n"
                    "  refresh: {runs: [{refresh: 4, refresh_policy: middle}]}\n")
    store = tmp_path / "none.duckdb"
    assert gridrun_main([str(grid), "--store", str(store), "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert "overlap=8 ≡ overlap=0 (same kept tokens at every step): 1 run" in listed
    assert "2 runs for 3 configurations, 2 to run" in listed and listed.count("run  ") == 2
    assert gridrun_main(["status", str(grid), "--store", str(store)]) == 0
    assert "overlap=8 ≡ overlap=0 (same kept tokens at every step): 1 run" in capsys.readouterr().out
    assert not store.exists()
