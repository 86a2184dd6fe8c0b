"""store/queries.py against a store filled by grids/smoke.yaml: read-only access, the numbers of the summaries
(checked against plain pandas over the raw rows), downsampling, compaction spikes and the SQL box's refusals."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from fixtures_store import READS_DURING_GRID, copy_store, create_store, insert_run, smoke_store, upgrade

from store import queries


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return smoke_store(tmp_path_factory)


@pytest.fixture
def store_copy(store, tmp_path):
    copy = tmp_path / "copy.duckdb"
    copy_store(store, copy)
    return copy


def raw_runs(path, grid: str) -> pd.DataFrame:
    """One row per configuration of the grid: its own knobs and its run's results (from the view for shell users)."""
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(
            "SELECT DISTINCT ON (config_hash) * REPLACE (config_group_hash AS group_hash) FROM configuration_runs "
            "WHERE grid = ? AND status = 'done'", [grid]).df()


def test_connections_are_read_only(store):
    with queries.connect(store) as con, pytest.raises(duckdb.Error, match="read-only"):
        con.execute("DELETE FROM runs")


def test_the_store_reads_while_a_grid_writes(store):
    """Read every 0.2 s through the query layer while grids/smoke.yaml ran: never a lock error, runs appear as they
    finish, and none is lost."""
    errors = [read for read in READS_DURING_GRID if isinstance(read, str)]
    counts = [read for read in READS_DURING_GRID if isinstance(read, int)]
    assert not errors, errors[:3]
    assert counts == sorted(counts) and len(set(counts)) >= 3, counts
    with queries.connect(store) as con:
        totals = queries.grid_totals(con, "smoke")
    assert counts[-1] <= totals["done"] == totals["runs"]


def test_missing_and_foreign_files_get_errors_naming_the_fix(tmp_path):
    with pytest.raises(queries.StoreError, match="no store at .*python -m gridrun"), queries.connect(
            tmp_path / "absent.duckdb"):
        pass
    foreign = tmp_path / "foreign.duckdb"
    duckdb.connect(str(foreign)).execute("CREATE TABLE t (x INT)").close()
    with pytest.raises(queries.StoreError, match="not a gridrun store"), queries.connect(foreign):
        pass
    garbage = tmp_path / "garbage.duckdb"
    garbage.write_bytes(b"not a database" * 500)
    with pytest.raises(queries.StoreError, match="cannot be read as a DuckDB database"), queries.connect(garbage):
        pass


def test_connect_waits_for_a_writer_to_let_go(store_copy):
    """A process holding the file read-write locks readers out; connect retries until it lets go."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import duckdb, sys, time
        con = duckdb.connect({str(store_copy)!r})
        print("locked", flush=True)
        time.sleep(1.0)
        con.close()
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(queries.StoreError, match="locked or unreadable after 2 tries"), queries.connect(
                store_copy, attempts=2):
            pass
        with queries.connect(store_copy, attempts=40) as con:
            assert con.execute("SELECT count(*) FROM runs").fetchone()[0] > 0
    finally:
        holder.wait(timeout=30)


def test_setting_table_is_mean_std_n_of_the_raw_runs(store):
    with queries.connect(store) as con:
        settings = queries.setting_table(con, "smoke").set_index("setting_hash")
    runs = raw_runs(store, "smoke")
    runs = runs[~runs["mode"].isin(["generate", "task"])]  # generation: speculation_table; task: retrieval_table
    expected = runs.groupby("setting_hash").agg(n=("run_hash", "count"), tpot=("tpot_ms_mean", "mean"),
                                                tpot_std=("tpot_ms_mean", "std"), ppl=("ppl", "mean"))
    assert sorted(settings.index) == sorted(expected.index)
    assert (settings.n_repeats == expected.n.loc[settings.index]).all()
    assert np.allclose(settings.tpot_ms, expected.tpot.loc[settings.index])
    assert np.allclose(settings.ppl, expected.ppl.loc[settings.index])  # one text sample: its repeats' PPL
    repeated = expected[expected.n > 1].index
    assert len(repeated) >= 3, "smoke's main experiment has repeats"
    assert np.allclose(settings.tpot_ms_std.loc[repeated], expected.tpot_std.loc[repeated])

    llama = runs[runs.model == "tiny-llama"]
    base = llama[llama.method == "recompute"]
    for setting in llama[llama.method == "streaming"].setting_hash.unique():
        row = settings.loc[setting]
        assert row.speedup == pytest.approx(base.tpot_ms_mean.mean() / row.tpot_ms)
        # One text sample, every step scored by both: the paired ΔPPL is the ratio of the two PPLs, with no interval.
        assert row.delta_ppl_pct == pytest.approx(100 * (row.ppl / base.ppl.mean() - 1))
        assert row.n_pairs == 1 and np.isnan(row.delta_ppl_ci) and not row.delta_ppl_resolved
    neox = settings[settings.model == "tiny-neox"]
    assert len(neox) and neox.speedup.isna().all(), "no recompute run of tiny-neox: no speedup, never another's"
    assert neox.delta_ppl_pct.isna().all()


def test_pareto_flags_the_non_dominated_settings(store):
    with queries.connect(store) as con:
        settings = queries.setting_table(con, "smoke")
    settings = settings[settings.delta_ppl_pct.notna() & settings.tpot_ms.notna()]
    assert len(settings) > 3
    # One frontier per baseline a ΔPPL is relative to: model, device, measurement, cap and weights.
    partition = ["model", "device_name", "measurement", "cap", "weight_quant"]
    for row in settings.itertuples():
        same = (settings[partition] == settings.loc[row.Index, partition]).all(axis=1)
        others = settings[same].drop(index=row.Index)
        dominated = ((others.tpot_ms <= row.tpot_ms) & (others.delta_ppl_pct <= row.delta_ppl_pct)
                     & ((others.tpot_ms < row.tpot_ms) | (others.delta_ppl_pct < row.delta_ppl_pct))).any()
        assert row.pareto == (not dominated), row.setting_hash


def test_run_table_and_counts_cover_every_member(store):
    with queries.connect(store) as con:
        table = queries.run_table(con, "smoke")
        counts = queries.status_counts(con, "smoke")
        totals = queries.grid_totals(con, "smoke")
        members = con.execute("SELECT count(DISTINCT run_hash) FROM experiments WHERE grid = 'smoke'").fetchone()[0]
        configs = con.execute(
            "SELECT count(DISTINCT config_hash) FROM configurations WHERE grid = 'smoke'").fetchone()[0]
    assert members == totals["runs"] == totals["done"] == table.run_hash.nunique()
    assert len(table) == configs > members, "smoke lists equivalent configurations: one row each, fewer runs"
    shared = table[table.sharing > 1]
    assert (shared.equivalent_to != "").all() and (table[table.sharing == 1].equivalent_to == "").all()
    for _, block in shared.groupby("run_hash"):
        assert len(block) == block.sharing.iloc[0] and block.ppl.nunique() == 1  # one run: one set of numbers
    assert set(counts.experiment) >= {"main", "r_sweep", "slack_sweep", "ladder", "cap_mode"}
    assert (counts.runs == counts.done).all() and counts[["stale", "failed", "pending"]].sum().sum() == 0


def test_stale_runs_are_hidden_unless_asked_and_never_pooled(store_copy):
    with duckdb.connect(str(store_copy)) as con:
        run_hash, setting_hash = con.execute(
            "SELECT run_hash, setting_hash FROM configurations WHERE method = 'streaming' AND \"repeat\" = 1 "
            "LIMIT 1").fetchone()
        con.execute("UPDATE runs SET code_version = 'older-code' WHERE run_hash = ?", [run_hash])
    with queries.connect(store_copy) as con:
        assert run_hash not in set(queries.run_table(con, "smoke").run_hash)
        assert run_hash in set(queries.run_table(con, "smoke", include_stale=True).run_hash)
        assert queries.grid_totals(con, "smoke")["stale"] == 1
        current = queries.setting_table(con, "smoke").set_index("setting_hash")
        both = queries.setting_table(con, "smoke", include_stale=True)
        missing = queries.missing_runs(con, "smoke", ["main"])
    assert current.loc[setting_hash].n_repeats == 1
    mine = both[both.setting_hash == setting_hash]
    assert sorted(mine.stale) == [False, True] and list(mine.n_repeats) == [1, 1]
    assert list(missing.run_hash) == [run_hash] and missing.stale.all()


def test_token_series_downsamples_exactly(store):
    with queries.connect(store) as con:
        run = con.execute("SELECT run_hash FROM runs WHERE method = 'streaming' AND compress_every = 16 "
                          "AND model = 'tiny-llama' LIMIT 1").fetchone()[0]
        raw = con.execute("SELECT * FROM tokens WHERE run_hash = ? ORDER BY step", [run]).df()
        steps = queries.step_range(con, [run])
        coarse = queries.token_series(con, [run], steps, points=10, rolling=8)
        full = queries.token_series(con, [run], steps, points=10_000, rolling=8)
    stride = steps.stride(10)
    assert len(coarse) == 10 and len(full) == len(raw)
    buckets = raw.groupby((raw.step - steps.first) // stride)
    assert list(coarse.kv_len_min) == list(buckets.kv_len.min())
    assert list(coarse.kv_len_max) == list(buckets.kv_len.max())
    assert list(coarse.compactions) == list(buckets.compacted.sum())
    assert list(full.kv_len_max) == list(raw.kv_len), "one step per bucket: the measured sawtooth itself"
    assert np.allclose(full.nll_rolling, raw.nll.rolling(8, min_periods=1).mean())


def test_spike_metrics_of_a_known_spike(tmp_path):
    """Latency 10 ms with +6 at each compaction step and +3 the step after; NLL 2 with +1 the step after."""
    path = tmp_path / "spike.duckdb"
    create_store(path)
    steps = np.arange(200, dtype=np.int32)
    events = np.arange(40, 180, 20)
    latency = np.full(200, 10.0)
    latency[events] += 6
    latency[events + 1] += 3
    nll = np.full(200, 2.0)
    nll[events + 1] += 1
    compacted = np.isin(steps, events)
    tokens = pa.table({
        "step": steps, "position": steps.astype(np.int64), "token_id": np.zeros(200, np.int64),
        "target_id": np.zeros(200, np.int64), "nll": nll, "latency_ms": latency, "compaction_ms": np.where(
            compacted, 6.0, 0.0), "kv_len": np.full(200, 32, np.int32), "compacted": compacted,
        "evicted": np.where(compacted, 8, 0).astype(np.int32), "prefill": np.zeros(200, bool),
    })
    compactions = pa.table({"step": events.astype(np.int32), "kv_len_before": np.full(len(events), 40, np.int32),
                            "kv_len_after": np.full(len(events), 32, np.int32),
                            "evicted": np.full(len(events), 8, np.int32), "compaction_ms": np.full(len(events), 6.0)})
    row = {"run_hash": "spiky", "group_hash": "spiky", "setting_hash": "spiky", "status": "done", "attempts": 1,
           "config_json": "{}", "model": "m", "dataset": "d", "sample": 0, "max_tokens": 201, "prefill": 0,
           "warmup": 4, "protocol": "stepwise", "chunk": 256, "score_stride": 1,
           "method": "streaming", "sink": 4, "cap_mode": "peak", "overlap": 0, "refresh": 0, "refresh_policy": "none",
           "slack": 0, "compress_every": 20, "max_drop": 0, "rope_mode": "realign", "dtype": "float32",
           "device": "cpu", "attn_implementation": "sdpa", "repeat": 0, "code_version": "x", "kv_quant": "none",
           "kv_quant_group": 32, "kv_quant_residual": 0, "kv_quant_sinks": "full", "weight_quant": "none"}
    with duckdb.connect(str(path)) as con:
        insert_run(con, row, tokens, compactions)
    upgrade(path)
    with queries.connect(path) as con:
        metrics = queries.spike_metrics(con, ["spiky"], radius=5).iloc[0]
        profile = queries.spike_profile(con, ["spiky"], radius=5)
    assert metrics.events == len(events) and metrics.runs == 1
    assert (metrics.latency_ms_peak_excess, metrics.latency_ms_peak_offset) == (6.0, 0)
    assert metrics.latency_ms_area == 9.0 and metrics.latency_ms_width == 2  # 6 and 3 are both >= 6 / 2
    assert (metrics.nll_peak_excess, metrics.nll_peak_offset, metrics.nll_area, metrics.nll_width) == (1.0, 1, 1.0, 1)
    assert list(profile["offset"]) == list(range(-5, 6)) and (profile.latency_ms_std.fillna(0) == 0).all()


@pytest.mark.parametrize("sql", [
    "INSERT INTO grids VALUES ('x', 'y', 'z', now())", "DELETE FROM runs", "DROP TABLE runs",
    "CREATE TABLE t AS SELECT 1", "COPY runs TO 'runs.csv'", "ATTACH 'other.duckdb'", "UPDATE runs SET ppl = 0",
    "SELECT 1; DELETE FROM runs", "SET threads = 1", "INSTALL httpfs",
])
def test_sql_box_refuses_statements_that_are_not_one_select(store, sql):
    with pytest.raises(queries.WriteRefused):
        queries.run_user_sql(store, sql)


def test_sql_box_runs_selects_in_a_sandbox(store, tmp_path):
    frame, truncated = queries.run_user_sql(store, "WITH t AS (SELECT * FROM runs) SELECT count(*) AS n FROM t")
    assert frame.n.iloc[0] > 0 and not truncated
    frame, truncated = queries.run_user_sql(store, "SELECT * FROM tokens", limit=5)
    assert len(frame) == 5 and truncated
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    with pytest.raises(duckdb.Error, match="disabled by configuration"):
        queries.run_user_sql(store, f"SELECT * FROM read_csv('{secret}')")


def test_sql_box_cannot_write_into_the_segments_it_may_read(store):
    """The box reads the store's segment folder (DuckDB's allowed_directories grants writing there too), and EXPLAIN
    ANALYZE runs what it explains: a COPY behind it must be refused, and the segments stay as they were."""
    with queries.connect(store) as con:
        run_hash, nll = con.execute("SELECT run_hash, sum(nll) FROM tokens GROUP BY ALL ORDER BY 1 LIMIT 1").fetchone()
        target = con.execute("SELECT DISTINCT filename FROM read_parquet($glob, filename = true) LIMIT 1",
                             {"glob": str(Path(store).resolve()) + ".segments/tokens/**/*.parquet"}).fetchone()[0]
    for sql in (f"EXPLAIN ANALYZE COPY (SELECT * FROM tokens WHERE run_hash = '{run_hash}') TO '{target}'",
                f"explain (format json) COPY (SELECT 1) TO '{target}'",
                f"/* profile */ EXPLAIN ANALYSE COPY (SELECT 1) TO '{target}'"):
        with pytest.raises(queries.WriteRefused, match="COPY statements are not run here"):
            queries.run_user_sql(store, sql)
    assert queries.run_user_sql(store, "EXPLAIN ANALYZE SELECT count(*) FROM tokens")[0].explain_key.tolist() == [
        "analyzed_plan"]
    with queries.connect(store) as con:
        assert con.execute("SELECT sum(nll) FROM tokens WHERE run_hash = $h", {"h": run_hash}).fetchone()[0] == nll


def test_speculation_table_compares_each_draft_kind_with_spec_none_under_its_policy(store):
    with queries.connect(store) as con:
        table = queries.speculation_table(con, "smoke")
    runs = raw_runs(store, "smoke")
    generation = runs[runs["mode"] == "generate"]
    assert sorted(table.group_hash) == sorted(generation.group_hash.unique())
    assert set(table.spec) == {"none", "prompt_lookup"} and set(table.compress_every) == {1, 16}
    for row in table.itertuples():
        reference = table[(table.spec == "none") & (table.compress_every == row.compress_every)].iloc[0]
        assert row.reference_hash == reference.group_hash
        assert row.speedup == pytest.approx(row.tokens_per_s / reference.tokens_per_s)
        assert row.identical  # greedy: speculation generates exactly spec none's ids
    lookup = table[table.spec == "prompt_lookup"]
    assert (lookup.acceptance_rate > 0).all() and (lookup.mean_accepted_length > 1).all()
