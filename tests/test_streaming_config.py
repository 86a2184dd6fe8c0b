"""RunConfig: every invalid configuration names the knob and the constraint; identity is the normalised content."""

from __future__ import annotations

import pytest

from streaming_llm import ConfigError, RunConfig


@pytest.mark.parametrize("knobs, message", [
    (dict(sink=-1, window=8), "sink = -1 < 0"),
    (dict(slack=-2, window=8), "slack = -2 < 0"),
    (dict(window=0), "window = 0 < 1"),
    (dict(cap=20, sink=4, slack=10, overlap=4, refresh=2, refresh_policy="middle", cap_mode="soft"),
     "window = cap - sink - slack - overlap - refresh = 20 - 4 - 10 - 4 - 2 = 0 < 1"),
    (dict(cap=10, sink=4, compress_every=16), "cap_mode peak: even window = 1 peaks at"),
    (dict(cap=64, window=32), "exactly one of window"),
    (dict(), "exactly one of window"),
    (dict(method="sliding"), "method = 'sliding'"),
    (dict(window=8, colour="blue"), "unknown knob 'colour'"),
    (dict(window=8, compress_every=0), "compress_every = 0 < 1"),
    (dict(window=8, compress_every="4"), "compress_every = '4': Input should be a valid integer"),
    (dict(window=8, refresh=2), "refresh = 2 needs refresh_policy: middle"),
    (dict(window=8, refresh_policy="middle"), "refresh_policy: middle needs refresh >= 1"),
    (dict(window=8, refresh_policy="random", refresh=2), "refresh_policy = 'random'"),
    (dict(window=8, rope_mode="none"), "rope_mode = 'none'"),
    (dict(window=8, prefill=1024, max_tokens=1024), "prefill = 1024 >= max_tokens = 1024"),
    (dict(window=8, max_tokens=100, prefill=90, warmup=20), "warmup = 20"),
    (dict(window=8, max_tokens=1), "max_tokens = 1 < 2"),
    (dict(method="recompute"), "method recompute needs cap"),
    (dict(method="recompute", cap=16, prefill=32), "prefill = 32 > cap = 16"),
    (dict(cap=64, prefill=100), "prefill = 100 > cap = 64"),
    (dict(window=8, dataset="file"), "text_file is set exactly when dataset is 'file'"),
    (dict(window=8, dtype="float8"), "dtype = 'float8'"),
])
def test_invalid_configuration_is_refused_with_its_reason(knobs, message):
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict(knobs, where="grid.yaml: main")
    assert message in str(error.value)
    assert str(error.value).startswith("grid.yaml: main: ")


def test_knobs_a_method_ignores_do_not_change_its_identity():
    assert RunConfig(method="dense", sink=8, compress_every=64).run_hash == RunConfig(method="dense").run_hash
    assert RunConfig(method="recompute", cap=64, sink=0).run_hash == RunConfig(method="recompute", cap=64).run_hash
    assert RunConfig(window=8, sink=0).run_hash != RunConfig(window=8, sink=4).run_hash


def test_repeats_share_a_group_but_not_an_identity():
    first, second = RunConfig(window=8, repeat=0), RunConfig(window=8, repeat=1)
    assert first.run_hash != second.run_hash
    assert first.group_hash == second.group_hash


def test_config_is_frozen_hashable_and_round_trips():
    config = RunConfig(cap=128, compress_every=16, slack=8, max_drop=4)
    with pytest.raises(ValueError):
        config.sink = 0
    again = RunConfig.from_dict(config.normalised())
    assert again == config and hash(again) == hash(config) and again.run_hash == config.run_hash
    assert config.policy.window + config.sink <= 128
