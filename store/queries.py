"""The read-only query layer over the gridrun store: one function per number the dashboard shows or the paper prints.

Connections come from store/opening.py (read-only, retried while a snapshot is swapped in) and the SQL box from
store/sandbox.py; both are re-exported here, where readers import them. It never writes, and per-token data is
aggregated or downsampled in SQL before it leaves DuckDB.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import duckdb
import pandas as pd
import yaml

# Readers (the dashboard, paper/, gridrun/, tests) import these from here; they are declared in store/opening.py and
# store/sandbox.py.
from store.opening import DEFAULT_STORE, SegmentsChanged, StoreError, connect, read, signature  # noqa: F401
from store.sandbox import (  # noqa: F401
    SQL_BOX_MEMORY,
    SQL_BOX_ROW_LIMIT,
    SQL_BOX_SECONDS,
    QueryLimit,
    WriteRefused,
    check_read_only,
    run_user_sql,
)
from store.schema import CONFIGURATION_OWN, KNOB_COLUMNS, q
from store.stats import t_half_width, wilson_interval
from streaming_llm.config import knobs_in

# Knobs a sweep or a chart can vary (RunConfig fields, `repeat` aside: repeats are aggregated, never a knob).
KNOBS: tuple[str, ...] = tuple(column.name for column in KNOB_COLUMNS if column.name != "repeat")
# What makes two runs comparable for a speedup or a ΔPPL: same text, model, protocol, device and evaluation code.
CONTEXT: tuple[str, ...] = (
    "model", "dataset", "token_hash", "max_tokens", "prefill", "warmup", "dtype", "attn_implementation",
    "device_name", "code_version",
)
BASELINE_METHOD = "recompute"


@functools.cache
def current_code_version() -> str:
    """The evaluation code's version now; runs made by another version are stale."""
    from streaming_llm.environment import code_version  # imports torch: deferred to the first query that needs it

    return code_version()


# --- grids and status -----------------------------------------------------------------------------------------------
def grid_names(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Grids with at least one member, most recently updated first."""
    rows = con.execute(
        "SELECT e.grid FROM experiments e LEFT JOIN grids g USING (grid) GROUP BY e.grid "
        "ORDER BY max(g.updated_at) DESC NULLS LAST, e.grid"
    ).fetchall()
    return [row[0] for row in rows]


def experiment_names(con: duckdb.DuckDBPyConnection, grid: str) -> list[str]:
    rows = con.execute("SELECT DISTINCT experiment FROM experiments WHERE grid = ? ORDER BY 1", [grid]).fetchall()
    return [row[0] for row in rows]


def status_counts(con: duckdb.DuckDBPyConnection, grid: str | None = None) -> pd.DataFrame:
    """Per grid and experiment: member runs done (by the current code), stale (done by other code), failed, pending."""
    return con.execute(
        """
        SELECT e.grid, e.experiment, count(*) AS runs,
            count(*) FILTER (r.status = 'done' AND r.code_version = $cv) AS done,
            count(*) FILTER (r.status = 'done' AND r.code_version <> $cv) AS stale,
            count(*) FILTER (r.status = 'failed') AS failed,
            count(*) FILTER (r.run_hash IS NULL OR r.status NOT IN ('done', 'failed')) AS pending
        FROM experiments e LEFT JOIN runs r USING (run_hash)
        WHERE $grid IS NULL OR e.grid = $grid
        GROUP BY ALL ORDER BY e.grid, e.experiment
        """,
        {"cv": current_code_version(), "grid": grid},
    ).df()


def grid_overview(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Per grid: its experiments and its distinct member runs by status (a run in several experiments counts once):
    done (by the current code), stale (done by other code), failed, pending."""
    return con.execute(
        """
        SELECT m.grid, any_value(m.experiments) AS experiments, count(*) AS runs,
            count(*) FILTER (r.status = 'done' AND r.code_version = $cv) AS done,
            count(*) FILTER (r.status = 'done' AND r.code_version <> $cv) AS stale,
            count(*) FILTER (r.status = 'failed') AS failed,
            count(*) FILTER (r.run_hash IS NULL OR r.status NOT IN ('done', 'failed')) AS pending,
            any_value(g.updated_at) AS updated_at
        FROM (SELECT DISTINCT grid, run_hash, count(DISTINCT experiment) OVER (PARTITION BY grid) AS experiments
              FROM experiments) m
        LEFT JOIN runs r USING (run_hash) LEFT JOIN grids g USING (grid)
        GROUP BY m.grid ORDER BY max(g.updated_at) DESC NULLS LAST, m.grid
        """,
        {"cv": current_code_version()},
    ).df()


def grid_totals(con: duckdb.DuckDBPyConnection, grid: str) -> dict[str, int]:
    """Distinct member runs of `grid` by status, as in grid_overview."""
    rows = grid_overview(con)
    row = rows[rows.grid == grid]
    if row.empty:
        return {"runs": 0, "done": 0, "stale": 0, "failed": 0, "pending": 0}
    return {name: int(row.iloc[0][name]) for name in ("runs", "done", "stale", "failed", "pending")}


def missing_runs(con: duckdb.DuckDBPyConnection, grid: str, experiments: Sequence[str],
                 include_stale: bool = False) -> pd.DataFrame:
    """Members of `experiments` with no usable result (pending, failed, or stale when stale runs are excluded)."""
    return con.execute(
        """
        SELECT e.experiment, e.run_hash, coalesce(r.status, 'pending') AS status,
            coalesce(r.status = 'done' AND r.code_version <> $cv, false) AS stale, r.method, r.error
        FROM experiments e LEFT JOIN runs r USING (run_hash)
        WHERE e.grid = $grid AND list_contains($experiments, e.experiment)
          AND (r.run_hash IS NULL OR r.status <> 'done' OR (r.code_version <> $cv AND NOT $include_stale))
        ORDER BY e.experiment, e.run_hash
        """,
        {"cv": current_code_version(), "grid": grid, "experiments": list(experiments), "include_stale": include_stale},
    ).df()


# --- run and group summaries ----------------------------------------------------------------------------------------
_KNOB_SELECT = ", ".join(f"r.{q(k)}" for k in KNOBS)


_OWN = (*(column.name for column in KNOB_COLUMNS), *CONFIGURATION_OWN)  # a configuration's own columns


def _configurations_sql() -> str:
    """Every (grid, experiment, configuration) and its run. A membership without configuration rows (a store of schema
    1) is its run's own configuration, as it was then."""
    own = ", ".join(q(name) for name in _OWN)
    return f"""
        SELECT grid, experiment, config_hash, config_group_hash, run_hash, {own} FROM configurations
        UNION ALL
        SELECT e.grid, e.experiment, r.run_hash, r.group_hash, r.run_hash, {", ".join(f"r.{q(n)}" for n in _OWN)}
        FROM experiments e JOIN runs r USING (run_hash)
        WHERE NOT EXISTS (SELECT 1 FROM configurations c
                          WHERE c.grid = e.grid AND c.experiment = e.experiment AND c.run_hash = e.run_hash)
    """


def _members_sql(grid_filter: str) -> str:
    """The configurations of each grid with their experiments and the results of their run, as a CTE body: knobs,
    window and capacities are the configuration's own, `group_hash` its repeats' (configurations sharing a run keep
    theirs), `run_group_hash` the computation's; `sharing` counts the grid's configurations that share the run
    (1: no equivalent). Stale means produced by other evaluation code."""
    own = ", ".join(f"any_value({q(name)}) AS {q(name)}" for name in _OWN)
    replaced = ", ".join(f"m.{q(name)} AS {q(name)}" for name in _OWN)
    return f"""
        SELECT m.grid, m.experiments, m.config_hash, r.group_hash AS run_group_hash,
            count(*) OVER (PARTITION BY m.grid, m.run_hash) AS sharing,
            r.* REPLACE (m.config_group_hash AS group_hash, {replaced}), r.code_version <> $cv AS stale
        FROM (SELECT grid, config_hash, any_value(config_group_hash) AS config_group_hash,
                  any_value(run_hash) AS run_hash, {own},
                  list(DISTINCT experiment ORDER BY experiment) AS experiments
              FROM ({_configurations_sql()}) WHERE {grid_filter} GROUP BY grid, config_hash) m
        JOIN runs r USING (run_hash)
    """


def run_table(con: duckdb.DuckDBPyConnection, grid: str | None = None, include_stale: bool = False) -> pd.DataFrame:
    """One row per configuration of a run and grid (all statuses): knobs, the run's own measurements (PPL over the
    tokens it scored, TPOT over its timed steps, peak memory), the number of repeats done, the stale flag and the error
    text. No comparison: a run's ΔPPL and speedup are a setting's, paired on the same tokens (setting_table)."""
    sql = f"""
        WITH members AS ({_members_sql("$grid IS NULL OR grid = $grid")}),
        repeats AS (SELECT grid, group_hash, code_version, count(*) AS repeats FROM members
                    WHERE status = 'done' GROUP BY ALL)
        SELECT x.grid, array_to_string(x.experiments, ', ') AS experiments, x.run_hash, x.config_hash, x.group_hash,
            x.setting_hash, x.sharing, x.status, x.stale, {_KNOB_SELECT.replace("r.", "x.")}, x.ppl, x.tpot_ms_mean,
            x.peak_memory_bytes / 2^20 AS peak_memory_mib, x.compaction_count, x.kv_len_max, x.compile_s,
            coalesce(rp.repeats, 0) AS repeats, x.device_name, x.code_version, x.ended_at, x.error
        FROM members x
        LEFT JOIN repeats rp ON rp.grid = x.grid AND rp.group_hash = x.group_hash AND rp.code_version = x.code_version
        WHERE $include_stale OR NOT x.stale OR x.status <> 'done'
        ORDER BY x.grid, x.experiments, x.method, x.run_hash, x.config_hash
    """
    table = con.execute(sql, {"cv": current_code_version(), "grid": grid, "include_stale": include_stale}).df()
    return table.assign(equivalent_to=equivalent_to(table, ["grid", "run_hash"]))


def equivalent_to(frame: pd.DataFrame, same: list[str]) -> pd.Series:
    """Per row, the other rows of `frame` that share its computation (equal `same` columns: the same kept tokens at
    every step, so one run), as the knob settings that tell them apart: 'overlap=8; overlap=16'. Empty when none."""
    notes = pd.Series("", index=frame.index, dtype=object)
    if frame.empty:
        return notes
    for _, block in frame.groupby(same, dropna=False, sort=False):
        if len(block) < 2:
            continue
        knobs = [k for k in KNOBS if k in block and block[k].astype(str).nunique() > 1]
        settings = {index: ", ".join(f"{k}={row[k]}" for k in knobs) for index, row in block.iterrows()}
        for index in block.index:
            notes[index] = "; ".join(text for other, text in settings.items() if other != index)
    return notes


# How a setting was measured, not what it is (streaming_llm.config.RunConfig.setting_hash leaves these out).
MEASUREMENT_KNOBS: tuple[str, ...] = knobs_in("measurement")
SETTING_KNOBS: tuple[str, ...] = tuple(k for k in KNOBS if k not in MEASUREMENT_KNOBS)
# A quantized setting's reference is the setting equal in every other knob, in float (kv_quant none, weights none).
QUANT_KNOBS: tuple[str, ...] = knobs_in("quant")
POLICY_KNOBS: tuple[str, ...] = tuple(k for k in SETTING_KNOBS if k not in QUANT_KNOBS)
# What a setting's numbers are comparable within (its baseline and its Pareto frontier).
SETTING_CONTEXT: tuple[str, ...] = ("model", "dataset", "dtype", "attn_implementation", "device_name", "code_version")
_BASELINE_KEYS = ("grid", "model", "dtype", "attn_implementation", "device_name", "code_version", "cap", "token_hash",
                  "prefill", "weight_quant")
_BASELINE_MATCH = " AND ".join(f"b.{q(k)} IS NOT DISTINCT FROM x.{q(k)}" for k in _BASELINE_KEYS)
# A setting's timing baseline: the recompute timing on the same tokens with the same warmup and the same `compile`
# (compiled against compiled: a compiled step's TPOT over an eager recompute's would mix two settings), one per
# setting (the most repeats, then the smallest group hash); none with its `compile`: no speedup, never another's.
# The quality pairing (ΔPPL) ignores `compile`: a compiled step gives eager's NLLs.
_TIMING_BASELINE_KEYS: tuple[str, ...] = (*_BASELINE_KEYS, "warmup", "compile")
_TIMING_BASELINE = (f"SELECT * FROM timings WHERE method = '{BASELINE_METHOD}' QUALIFY row_number() OVER ("
                    f"PARTITION BY {', '.join(q(k) for k in _TIMING_BASELINE_KEYS)} "
                    "ORDER BY n_repeats DESC, group_hash) = 1")
_TIMING_BASELINE_MATCH = " AND ".join(f"b.{q(k)} IS NOT DISTINCT FROM x.{q(k)}" for k in _TIMING_BASELINE_KEYS)
# The float reference of a quantized setting: every policy knob equal (policy_key), the same tokens and code.
_FLOAT_MATCH = ("b.policy_key = x.policy_key AND b.grid = x.grid AND b.code_version = x.code_version "
                "AND b.device_name IS NOT DISTINCT FROM x.device_name "
                "AND b.token_hash = x.token_hash AND b.prefill = x.prefill AND b.kv_quant = 'none' "
                "AND b.weight_quant = 'none' AND (x.kv_quant <> 'none' OR x.weight_quant <> 'none')")
_POLICY_KEY = "md5(concat_ws('|', " + ", ".join(
    f"coalesce(CAST({q(k)} AS VARCHAR), '<null>')" for k in POLICY_KNOBS) + "))"
# How the cache is stored and whether its decode step is compiled: a ring or compiled setting's timing reference is the
# setting equal in every other knob at layout compact, compile none (its compact eager twin), on the same tokens.
STORAGE_KNOBS: tuple[str, ...] = ("layout", "compile")
_STORAGE_KEY = "md5(concat_ws('|', " + ", ".join(
    f"coalesce(CAST({q(k)} AS VARCHAR), '<null>')" for k in SETTING_KNOBS if k not in STORAGE_KNOBS) + "))"
_COMPACT_MATCH = ("c.storage_key = x.storage_key AND c.grid = x.grid AND c.code_version = x.code_version "
                  "AND c.device_name IS NOT DISTINCT FROM x.device_name AND c.token_hash = x.token_hash "
                  "AND c.prefill = x.prefill AND c.warmup = x.warmup "
                  "AND (x.layout <> 'compact' OR x.compile <> 'none')")
# The comparisons a setting is paired in: (name, how a reference sample matches, the order that picks one reference
# run per pair: the densest scoring, the same protocol, then the smallest hash).
_COMPARISONS = (
    ("base", f"b.method = '{BASELINE_METHOD}' AND {_BASELINE_MATCH}", "b.score_stride, b.run_hash"),
    ("float", _FLOAT_MATCH, "b.protocol <> x.protocol, b.score_stride, b.run_hash"),
)
# Per comparison, the columns setting_table returns: the mean paired ΔPPL %, its sample std, the pair count, pairs
# agreeing with the mean's sign, the half-width of its 95 % t interval, its bounds, and whether it excludes zero.
DELTA_COLUMNS = {"base": "delta_ppl_pct", "float": "delta_float_pct"}


def _paired_sql(name: str, match: str, order: str, key: str) -> str:
    """CTEs `{name}_paired`: per setting, ΔPPL % paired per text sample with a reference run on the same tokens, over
    the steps both scored (a parallel recompute may score every k-th step only)."""
    column = DELTA_COLUMNS[name]
    return f"""
        {name}_runs AS (
            SELECT x.grid, x.setting_hash, x.code_version, x.sample, x.run_hash,
                any_value(x.mean_nll) AS mean_nll, any_value(x.score_stride) AS score_stride,
                any_value(x.predicted_tokens) AS predicted_tokens,
                list({{'run_hash': b.run_hash, 'mean_nll': b.mean_nll, 'score_stride': b.score_stride,
                       'predicted_tokens': b.predicted_tokens}} ORDER BY {order})[1] AS base
            FROM quality_samples x JOIN per_sample b ON {match}
            GROUP BY x.grid, x.setting_hash, x.code_version, x.sample, x.run_hash, x.protocol
        ),
        {name}_pairs AS (
            -- Both scored every step of the same tokens: the runs' mean NLLs (the mean over exactly those rows) ...
            SELECT grid, setting_hash, code_version, sample, 100 * (exp(mean_nll - base.mean_nll) - 1) AS delta
            FROM {name}_runs
            WHERE score_stride = 1 AND base.score_stride = 1 AND predicted_tokens = base.predicted_tokens
            UNION ALL
            -- ... else token by token, on the steps both scored.
            SELECT p.grid, p.setting_hash, p.code_version, p.sample, 100 * (exp(avg(t.nll) - avg(b.nll)) - 1) AS delta
            FROM {name}_runs p JOIN tokens b ON b.run_hash = p.base.run_hash
            JOIN tokens t ON t.run_hash = p.run_hash AND t.step = b.step
            WHERE NOT (p.score_stride = 1 AND p.base.score_stride = 1 AND p.predicted_tokens = p.base.predicted_tokens)
                AND b.nll IS NOT NULL AND t.nll IS NOT NULL
            GROUP BY p.grid, p.setting_hash, p.code_version, p.sample
        ),
        {name}_paired AS (
            SELECT {key}, avg(delta) AS {column}, stddev_samp(delta) AS {column}_std, count(*) AS {name}_pairs_n,
                count(*) FILTER (agrees) AS {name}_agree
            FROM (SELECT *, sign(delta) = sign(avg(delta) OVER (PARTITION BY {key})) AS agrees FROM {name}_pairs)
            GROUP BY {key}
        )"""


def setting_table(con: duckdb.DuckDBPyConnection, grid: str, experiments: Sequence[str] | None = None,
                  include_stale: bool = False) -> pd.DataFrame:
    """One row per setting (RunConfig.setting_hash) of the done score runs of `grid`, optionally only those in
    `experiments`: every number a reader shows of a setting (the dashboard's views and the paper's tables alike).

    Quality is a statistic over text samples: one PPL per sample (its repeats averaged: the same NLLs), from the
    setting's preferred measurement (the parallel protocol if it has one, then the most samples, the longest stream);
    `ppl` is their mean, `ppl_std` their sample std, `n_samples` their count.
    ΔPPL % is paired per sample with the recompute baseline of the same cap on the same tokens, over the steps both
    scored (all, or every k-th with the baseline's `score_stride`): `delta_ppl_pct` is the mean over pairs,
    `delta_ppl_pct_std` their sample std, `n_pairs` their count, `agree` the pairs whose sign is the mean's, and
    `delta_ppl_ci` the half-width of the 95 % Student-t interval over pairs (t_{0.975, n-1} * std / sqrt(n); NaN for
    one pair), `delta_ppl_low` / `delta_ppl_high` its bounds, `delta_ppl_resolved` whether it excludes zero.
    A quantized setting (kv_quant or weight_quant) is paired the same way with the setting equal in every other knob in
    float, on the same tokens: `delta_float_pct` (and `_std`, `_ci`, `_low`, `_high`, `_resolved`, `n_float_pairs`,
    `float_agree`), and `tpot_ratio`, its TPOT over the float setting's on the same tokens. A ring or compiled setting
    (layout, compile) is timed against its compact eager twin, the setting equal in every other knob at layout
    compact and compile none (the same `storage_key`), on the same tokens: `compact_ratio`, its TPOT over the twin's
    (NaN without one);
    `compile_s` (and `_std`) is the mean over its timing repeats of the first compiled step's wall time (seconds, a
    warmup step: never in TPOT; NaN for an eager setting). `measurement` names the
    quality measurement in words (protocol, samples, tokens, prefill): ΔPPLs compare (and the Pareto frontier is drawn)
    within one measurement, cap and weight quantization; `ppl_steps` says which steps its PPL is over (a strided
    recompute baseline scores every k-th only, so its PPL is not comparable with the others': its ΔPPL is 0).
    With `experiments`, a setting's measurements are chosen among its runs in those experiments (a long-stream
    experiment does not replace the main table's measurement); a chosen measurement pools all its runs in the grid, and
    references may come from anywhere in the grid.
    Timing is a statistic over repeats of the setting's stepwise runs (`tpot_ms`, `tpot_ms_std`, `n_repeats`, speedup:
    the baseline's stepwise TPOT on the same tokens over this one's, the baseline run with the same `compile`: a
    compiled setting against the compiled recompute, an eager one against the eager; NaN without one, never the
    other's); parallel runs never give a TPOT. A sample's PPL is never averaged with another setting's. Generation
    runs are compared in speculation_table.
    """
    setting_knobs = ", ".join(f"any_value({q(k)}) AS {q(k)}" for k in SETTING_KNOBS if k not in SETTING_CONTEXT)
    context = ", ".join(f"any_value({q(k)}) AS {q(k)}" for k in SETTING_CONTEXT if k != "code_version")
    run_context = ", ".join(f"any_value({q(k)}) AS {q(k)}" for k in (
        "cap", "model", "dtype", "attn_implementation", "device_name", "weight_quant", "kv_quant", "policy_key",
        "layout", "compile", "storage_key"))
    key = "grid, setting_hash, code_version"
    paired = ",".join(_paired_sql(name, match, order, key) for name, match, order in _COMPARISONS)
    sql = f"""
        WITH members AS ({_members_sql("grid = $grid")}),
        done AS (
            SELECT *, $experiments IS NULL OR list_has_any(experiments, $experiments) AS selected,
                {_POLICY_KEY} AS policy_key, {_STORAGE_KEY} AS storage_key
            -- generation runs: speculation_table; task runs: retrieval_table
            FROM members WHERE status = 'done' AND coalesce(mode, 'score') = 'score'
                AND ($include_stale OR NOT stale)
        ),
        per_sample AS (
            SELECT {key}, protocol, max_tokens, prefill, sample, token_hash, score_stride, any_value(method) AS method,
                {run_context}, avg(ppl) AS ppl, min(run_hash) AS run_hash,
                -- repeats of one measurement score the same tokens with the same NLLs
                any_value(mean_nll) AS mean_nll, any_value(predicted_tokens) AS predicted_tokens,
                bool_or(selected) AS selected
            FROM done GROUP BY {key}, protocol, max_tokens, prefill, sample, token_hash, score_stride
        ),
        measures AS (  -- a setting's own numbers come from the selected experiments' runs; references from the grid's
            SELECT {key}, protocol, max_tokens, prefill, score_stride, row_number() OVER (
                PARTITION BY {key}
                ORDER BY protocol = 'parallel' DESC, count(*) DESC, max_tokens DESC, score_stride, prefill
            ) AS preference
            FROM per_sample WHERE selected GROUP BY {key}, protocol, max_tokens, prefill, score_stride
        ),
        quality_samples AS (
            SELECT p.* FROM per_sample p JOIN measures m USING ({key}, protocol, max_tokens, prefill, score_stride)
            WHERE m.preference = 1
        ),
        quality AS (
            SELECT {key}, avg(ppl) AS ppl, stddev_samp(ppl) AS ppl_std, count(*) AS n_samples,
                any_value(protocol) AS quality_protocol, any_value(max_tokens) AS quality_tokens,
                any_value(prefill) AS quality_prefill, any_value(score_stride) AS quality_stride
            FROM quality_samples GROUP BY ALL
        ),
        {paired},
        timings AS (
            SELECT {key}, group_hash, any_value(method) AS method, count(*) AS n_repeats,
                avg(tpot_ms_mean) AS tpot_ms, stddev_samp(tpot_ms_mean) AS tpot_ms_std,
                avg(peak_memory_bytes) / 2^20 AS peak_memory_mib,
                stddev_samp(peak_memory_bytes) / 2^20 AS peak_memory_mib_std,
                avg(compaction_count) AS compactions, avg(kv_len_max) AS kv_len_max,
                avg(kv_bytes_per_token) AS kv_bytes_per_token, avg(kv_cache_peak_bytes) AS kv_cache_peak_bytes,
                avg(weights_bytes) AS weights_bytes, avg(kv_cache_peak_bytes + weights_bytes) AS total_bytes,
                avg(compile_s) AS compile_s, stddev_samp(compile_s) AS compile_s_std,
                list(run_hash ORDER BY "repeat") AS run_hashes, any_value(token_hash) AS token_hash,
                any_value(prefill) AS prefill, any_value(warmup) AS warmup, {run_context},
                bool_or(selected) AS selected
            FROM done WHERE protocol = 'stepwise' GROUP BY {key}, group_hash
        ),
        own_timings AS (
            SELECT *, row_number() OVER (PARTITION BY {key} ORDER BY n_repeats DESC, group_hash) AS preference
            FROM timings WHERE selected
        ),
        timing AS (
            SELECT x.*, b.tpot_ms / x.tpot_ms AS speedup, x.tpot_ms / f.tpot_ms AS tpot_ratio,
                x.tpot_ms / c.tpot_ms AS compact_ratio
            FROM (SELECT * EXCLUDE (preference) FROM own_timings WHERE preference = 1) x
            LEFT JOIN ({_TIMING_BASELINE}) b ON {_TIMING_BASELINE_MATCH}
            LEFT JOIN (SELECT * FROM timings WHERE kv_quant = 'none' AND weight_quant = 'none'
                       QUALIFY row_number() OVER (
                           PARTITION BY grid, code_version, device_name, policy_key, token_hash, prefill, warmup
                           ORDER BY n_repeats DESC, group_hash) = 1) f
                ON {_FLOAT_MATCH.replace("b.", "f.")} AND f.warmup = x.warmup
            LEFT JOIN (SELECT * FROM timings WHERE layout = 'compact' AND compile = 'none'
                       QUALIFY row_number() OVER (
                           PARTITION BY grid, code_version, device_name, storage_key, token_hash, prefill, warmup
                           ORDER BY n_repeats DESC, group_hash) = 1) c
                ON {_COMPACT_MATCH}
        ),
        settings AS (
            SELECT {key}, {setting_knobs}, {context}, any_value(stale) AS stale, any_value(policy_key) AS policy_key,
                any_value(storage_key) AS storage_key,
                list_distinct(flatten(list(experiments))) AS experiments,
                list(run_hash ORDER BY protocol, sample, "repeat") AS all_run_hashes,
                -- the computations it was measured by: settings with equal ones are equivalent (one set of runs)
                array_to_string(list_sort(list_distinct(list(run_group_hash))), ',') AS run_groups
            FROM done WHERE selected GROUP BY {key}
        ),
        chosen AS (
            SELECT s.*, s.method = '{BASELINE_METHOD}' AS is_baseline,
                qu.ppl, qu.ppl_std, qu.n_samples, qu.quality_protocol, qu.quality_tokens, qu.quality_prefill,
                qu.quality_stride,
                pa.delta_ppl_pct, pa.delta_ppl_pct_std, coalesce(pa.base_pairs_n, 0) AS n_pairs, pa.base_agree AS agree,
                fl.delta_float_pct, fl.delta_float_pct_std, coalesce(fl.float_pairs_n, 0) AS n_float_pairs,
                fl.float_agree,
                coalesce(t.n_repeats, 0) AS n_repeats, t.tpot_ms, t.tpot_ms_std, t.speedup, t.tpot_ratio,
                t.peak_memory_mib, t.peak_memory_mib_std, t.compactions, t.kv_len_max, t.kv_bytes_per_token,
                t.kv_cache_peak_bytes, t.weights_bytes, t.total_bytes, t.group_hash AS timing_group_hash,
                t.compact_ratio, t.compile_s, t.compile_s_std,
                coalesce(t.run_hashes, s.all_run_hashes) AS run_hashes
            FROM settings s JOIN quality qu USING ({key})
            LEFT JOIN base_paired pa USING ({key}) LEFT JOIN float_paired fl USING ({key})
            LEFT JOIN timing t USING ({key})
        )
        -- The frontier compares paired ΔPPLs against one baseline only (same protocol, tokens, prefill, samples; same
        -- cap and weights: the recompute they are relative to), against TPOT.
        SELECT * EXCLUDE (all_run_hashes), CASE WHEN tpot_ms IS NOT NULL AND delta_ppl_pct IS NOT NULL
            THEN delta_ppl_pct < coalesce(min(delta_ppl_pct) OVER (
                PARTITION BY {", ".join(q(k) for k in SETTING_CONTEXT)}, tpot_ms IS NULL OR delta_ppl_pct IS NULL,
                quality_protocol, quality_tokens, quality_prefill, n_samples, cap, weight_quant
                ORDER BY tpot_ms, delta_ppl_pct RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW EXCLUDE GROUP),
                'inf') END
            AS pareto  -- equivalent settings (one set of runs, equal numbers) are on the frontier together or not
        FROM chosen ORDER BY method, {", ".join(q(k) for k in SETTING_KNOBS if k != "method")}
    """
    params = {"cv": current_code_version(), "grid": grid, "include_stale": include_stale,
              "experiments": list(experiments) if experiments is not None else None}
    settings = con.execute(sql, params).df()
    settings = settings.assign(measurement=[
        f"{protocol}, {int(samples)} sample{'s' if samples != 1 else ''} × {int(tokens):,} tokens"
        + (f" after a {int(prefill):,}-token prefill" if prefill else "")
        for protocol, samples, tokens, prefill in zip(settings.quality_protocol, settings.n_samples,
                                                      settings.quality_tokens, settings.quality_prefill, strict=True)],
        ppl_steps=["every step" if stride == 1 else f"every {_ordinal(int(stride))} step"
                   for stride in settings.quality_stride])
    settings = _with_intervals(settings, "delta_ppl", "delta_ppl_pct", "n_pairs")
    settings = _with_intervals(settings, "delta_float", "delta_float_pct", "n_float_pairs")
    return settings.assign(equivalent_to=equivalent_to(settings, ["grid", "run_groups", "code_version"]))


def _ordinal(number: int) -> str:
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


# A paired mean within this of zero (in percent) is never called resolved: identical computations give a ΔPPL of
# float rounding with a zero spread, a zero-width interval that would "exclude" zero.
RESOLVED_TOLERANCE_PCT = 1e-6


def _with_intervals(frame: pd.DataFrame, prefix: str, mean: str, count: str) -> pd.DataFrame:
    """`{prefix}_ci` (the 95 % t half-width over the pairs), `_low`, `_high` and `_resolved` (the interval excludes
    zero and the mean is not zero within RESOLVED_TOLERANCE_PCT; false without an interval) for the paired mean
    `mean` over `count` pairs."""
    half = pd.Series([t_half_width(std, n) for std, n in zip(frame[f"{mean}_std"], frame[count], strict=True)],
                     index=frame.index, dtype=float)
    low, high = frame[mean] - half, frame[mean] + half
    resolved = (((low > 0) | (high < 0)) & (frame[mean].abs() > RESOLVED_TOLERANCE_PCT)).fillna(False).astype(bool)
    return frame.assign(**{f"{prefix}_ci": half, f"{prefix}_low": low, f"{prefix}_high": high,
                           f"{prefix}_resolved": resolved})


def declared_sweep(con: duckdb.DuckDBPyConnection, grid: str, experiment: str) -> tuple[str, ...]:
    """The knobs `experiment`'s `grid:` block declares in the grid file the store recorded (empty when it has none)."""
    found = con.execute("SELECT spec_yaml FROM grids WHERE grid = ?", [grid]).fetchone()
    if found is None:
        return ()
    try:
        spec = yaml.safe_load(found[0])
    except yaml.YAMLError:
        return ()
    block = spec.get("experiments", {}).get(experiment, {}) if isinstance(spec, dict) else {}
    declared = block.get("grid") if isinstance(block, dict) else None
    return tuple(str(k) for k in declared) if isinstance(declared, dict) else ()


def sweep_knob(declared: Sequence[str], experiment: str, settings: pd.DataFrame) -> str | None:
    """The knob `experiment` sweeps among its `settings`: the one knob its grid file's `grid:` block declares (see
    declared_sweep) when that one varies, else the setting knob named like the experiment ('max_drop_sweep',
    'cap_mode'), else the setting knob with the most distinct values; None when no setting knob varies. Never a
    measurement knob (sample, protocol, ...)."""
    varying = [k for k in SETTING_KNOBS if k in settings and settings[k].astype(str).nunique() > 1
               and k != "method"]
    if not varying:
        return None
    declared = [k for k in declared if k in varying]
    if len(declared) == 1:
        return declared[0]
    named = [k for k in varying if experiment in (k, f"{k}_sweep")]
    if named:
        return named[0]
    return max(varying, key=lambda k: (settings[k].astype(str).nunique(), -varying.index(k)))


def varying_knobs(groups: pd.DataFrame) -> list[str]:
    """The knobs that take more than one value among `groups` (what a sweep or a legend is about)."""
    return [k for k in KNOBS if k in groups and groups[k].nunique(dropna=False) > 1]


# --- per-token series, downsampled in SQL ---------------------------------------------------------------------------
@dataclass(frozen=True)
class StepRange:
    first: int
    last: int

    def stride(self, points: int) -> int:
        return max(1, math.ceil((self.last - self.first + 1) / points))


def step_range(con: duckdb.DuckDBPyConnection, run_hashes: Sequence[str]) -> StepRange:
    first, last = con.execute(
        "SELECT min(step), max(step) FROM tokens WHERE list_contains($runs, run_hash)", {"runs": list(run_hashes)}
    ).fetchone()
    if first is None:
        raise StoreError(f"no per-token rows for runs {', '.join(run_hashes)}: they failed or are not in this store")
    return StepRange(int(first), int(last))


def token_series(con: duckdb.DuckDBPyConnection, run_hashes: Sequence[str], steps: StepRange, *,
                 points: int = 1500, rolling: int = 64) -> pd.DataFrame:
    """Per run, at most `points` buckets of consecutive steps in `steps`: rolling NLL (mean of the last `rolling`
    tokens, computed at full resolution), latency mean and max, kv_len min and max (the measured sawtooth: exact when
    a bucket is one step) and the compactions in the bucket."""
    rolling = int(rolling)
    if rolling < 1:
        raise ValueError(f"rolling = {rolling} < 1: the rolling NLL needs a window of at least one token")
    sql = f"""
        WITH rolled AS (
            SELECT run_hash, step, latency_ms, kv_len, compacted,
                avg(nll) OVER (PARTITION BY run_hash ORDER BY step
                               ROWS BETWEEN {rolling - 1} PRECEDING AND CURRENT ROW) AS nll_rolling
            FROM tokens
            WHERE list_contains($runs, run_hash) AND step BETWEEN $first - {rolling} AND $last
        )
        SELECT run_hash, min(step) AS step, avg(nll_rolling) AS nll_rolling, avg(latency_ms) AS latency_ms,
            max(latency_ms) AS latency_ms_max, min(kv_len) AS kv_len_min, max(kv_len) AS kv_len_max,
            count(*) FILTER (compacted) AS compactions
        FROM rolled WHERE step >= $first
        GROUP BY run_hash, (step - $first) // $stride ORDER BY run_hash, step
    """
    params = {"runs": list(run_hashes), "first": steps.first, "last": steps.last, "stride": steps.stride(points)}
    return con.execute(sql, params).df()


def compaction_marks(con: duckdb.DuckDBPyConnection, run_hashes: Sequence[str], steps: StepRange, *,
                     points: int = 400) -> pd.DataFrame:
    """Compaction events to mark on a chart: at most one per bucket of `points` per run (the first of the bucket),
    with how many events the bucket holds and the tokens they evicted."""
    sql = """
        SELECT run_hash, min(step) AS step, count(*) AS events, sum(evicted) AS evicted,
            max(compaction_ms) AS compaction_ms_max
        FROM compactions WHERE list_contains($runs, run_hash) AND step BETWEEN $first AND $last
        GROUP BY run_hash, (step - $first) // $stride ORDER BY run_hash, step
    """
    params = {"runs": list(run_hashes), "first": steps.first, "last": steps.last, "stride": steps.stride(points)}
    return con.execute(sql, params).df()


def block_ppl(con: duckdb.DuckDBPyConnection, run_hashes: Sequence[str], block: int) -> pd.DataFrame:
    """Per run and block of `block` consecutive positions (steps) of its stream: the block's first step, its perplexity
    (exp of the mean NLL over the block's tokens) and its token count. The long-stream figure: flat under streaming,
    rising for dense attention past the model's trained length."""
    block = int(block)
    if block < 1:
        raise ValueError(f"block = {block} < 1: a block holds at least one position")
    sql = """
        SELECT run_hash, (step // $block) * $block AS block_start, exp(avg(nll)) AS ppl, count(*) AS tokens
        FROM tokens WHERE list_contains($runs, run_hash)
        GROUP BY run_hash, step // $block ORDER BY run_hash, block_start
    """
    return con.execute(sql, {"runs": list(run_hashes), "block": block}).df()


# --- compaction spikes ----------------------------------------------------------------------------------------------
_SPIKE_CTE = """
    events AS (
        SELECT c.run_hash, c.step FROM compactions c JOIN runs r USING (run_hash)
        WHERE list_contains($runs, c.run_hash) AND c.step >= r.prefill + r.warmup + $radius
        -- evenly spaced, at most $max_events per run: a strict run compacts every step
        QUALIFY row_number() OVER (PARTITION BY c.run_hash ORDER BY c.step)
                % greatest(1, ceil(count(*) OVER (PARTITION BY c.run_hash) / $max_events)::BIGINT) = 0
    ),
    timed AS (
        SELECT t.run_hash, t.step, t.nll, t.latency_ms FROM tokens t JOIN runs r USING (run_hash)
        WHERE list_contains($runs, t.run_hash) AND NOT t.prefill AND t.step >= r.prefill + r.warmup
    ),
    medians AS (
        SELECT run_hash, median(nll) AS nll_median, median(latency_ms) AS latency_ms_median FROM timed GROUP BY ALL
    ),
    probes AS (  -- each event's steps as a column: the join below is then a hash join on (run_hash, step)
        SELECT e.run_hash, o.range AS "offset", (e.step + o.range)::INTEGER AS step
        FROM events e CROSS JOIN range(-$radius, $radius + 1) o
    ),
    windows AS (
        SELECT $series[list_position($runs, p.run_hash)] AS series, p.run_hash, p."offset", t.nll,
            t.latency_ms, t.nll - m.nll_median AS nll_excess, t.latency_ms - m.latency_ms_median AS latency_ms_excess
        FROM probes p
        JOIN timed t ON t.run_hash = p.run_hash AND t.step = p.step
        JOIN medians m ON m.run_hash = p.run_hash
    ),
    profile AS (
        SELECT series, "offset", count(*) AS events, count(DISTINCT run_hash) AS runs,
            avg(nll) AS nll, stddev_samp(nll) AS nll_std,
            avg(nll_excess) AS nll_excess, stddev_samp(nll_excess) AS nll_excess_std,
            avg(latency_ms) AS latency_ms, stddev_samp(latency_ms) AS latency_ms_std,
            avg(latency_ms_excess) AS latency_ms_excess, stddev_samp(latency_ms_excess) AS latency_ms_excess_std
        FROM windows GROUP BY ALL
    )
"""
SPIKE_METRICS = ("nll", "latency_ms")


def spike_profile(con: duckdb.DuckDBPyConnection, run_hashes: Sequence[str], *, series: Sequence[str] | None = None,
                  radius: int = 16, max_events: int = 2000) -> pd.DataFrame:
    """Per series and offset from a compaction (-radius..radius steps; 0 is the step whose latency includes the
    compaction): the number of events and runs, and mean and std over events of NLL and latency, raw and as the excess
    over each run's median (over all its timed steps). `series[i]` names the series of `run_hashes[i]` (default: the
    run itself); runs sharing a name, such as repeats, pool their events."""
    sql = f"WITH {_SPIKE_CTE} SELECT * FROM profile ORDER BY series, \"offset\""
    return con.execute(sql, _spike_params(run_hashes, series, radius, max_events)).df()


def spike_metrics(con: duckdb.DuckDBPyConnection, run_hashes: Sequence[str], *, series: Sequence[str] | None = None,
                  radius: int = 16, max_events: int = 2000) -> pd.DataFrame:
    """Per series (see spike_profile), for the mean NLL and the mean latency around compactions: the peak excess over
    the median (and its offset), the area above the median (sum over offsets of the positive excess, in unit x steps)
    and the width (steps whose excess is at least half the peak excess: the full width at half maximum)."""
    profile = spike_profile(con, run_hashes, series=series, radius=radius, max_events=max_events)
    return spike_metrics_of(con, profile)


def spike_metrics_of(con: duckdb.DuckDBPyConnection, profile: pd.DataFrame) -> pd.DataFrame:
    """`spike_metrics` from a `spike_profile` already read: a view that shows both reads the tokens once, not twice."""
    peaks = ", ".join(f"max({m}_excess) OVER (PARTITION BY series) AS {m}_peak" for m in SPIKE_METRICS)
    measures = ", ".join(f"""
            any_value({m}_peak) AS {m}_peak_excess, arg_max("offset", {m}_excess) AS {m}_peak_offset,
            sum(greatest({m}_excess, 0)) AS {m}_area,
            CASE WHEN any_value({m}_peak) > 0
                 THEN count(*) FILTER ({m}_excess >= {m}_peak / 2) ELSE 0 END AS {m}_width"""
        for m in SPIKE_METRICS)
    sql = f"""
        WITH scored AS (SELECT *, {peaks} FROM spike_profile_rows)
        SELECT series, max(events) AS events, max(runs) AS runs, {measures}
        FROM scored GROUP BY series ORDER BY series
    """
    con.register("spike_profile_rows", profile)
    try:
        return con.execute(sql).df()
    finally:
        con.unregister("spike_profile_rows")


def _spike_params(run_hashes: Sequence[str], series: Sequence[str] | None, radius: int, max_events: int) -> dict:
    if radius < 1 or max_events < 1:
        raise ValueError(f"radius = {radius}, max_events = {max_events}: both must be 1 or more")
    series = list(run_hashes) if series is None else list(series)
    if len(series) != len(run_hashes):
        raise ValueError(f"{len(series)} series names for {len(run_hashes)} runs: give one name per run")
    return {"runs": list(run_hashes), "series": series, "radius": int(radius), "max_events": int(max_events)}


# --- per-token profile (the paper's cost breakdown) ----------------------------------------------------------------
def cost_profile(con: duckdb.DuckDBPyConnection, grid: str, group_hashes: Sequence[str],
                 include_stale: bool = False) -> pd.DataFrame:
    """Per configuration (repeats: mean, std, n): compactions, and per timed decode token the forward ms, the
    compaction ms and their total (the TPOT)."""
    sql = f"""
        WITH members AS ({_members_sql("grid = $grid")}),
        per_run AS (
            SELECT m.group_hash, m.code_version, m.run_hash, any_value(m.compaction_count) AS compactions,
                avg(t.latency_ms - coalesce(t.compaction_ms, 0)) AS forward_ms,
                avg(coalesce(t.compaction_ms, 0)) AS compaction_ms, avg(t.latency_ms) AS total_ms
            FROM members m JOIN tokens t USING (run_hash)
            WHERE m.status = 'done' AND ($include_stale OR NOT m.stale) AND list_contains($groups, m.group_hash)
              AND NOT t.prefill AND t.step >= m.prefill + m.warmup
            GROUP BY ALL
        )
        SELECT group_hash, code_version, count(*) AS n,
            avg(compactions) AS compactions, stddev_samp(compactions) AS compactions_std,
            avg(forward_ms) AS forward_ms, stddev_samp(forward_ms) AS forward_ms_std,
            avg(compaction_ms) AS compaction_ms, stddev_samp(compaction_ms) AS compaction_ms_std,
            avg(total_ms) AS total_ms, stddev_samp(total_ms) AS total_ms_std
        FROM per_run GROUP BY ALL ORDER BY group_hash
    """
    params = {"cv": current_code_version(), "grid": grid, "groups": list(group_hashes),
              "include_stale": include_stale}
    return con.execute(sql, params).df()


# --- generation runs: speculative decoding ---------------------------------------------------------------------------
# The draft kind and its details (`spec` included, unlike streaming_llm.config.DRAFT_KNOBS); a generation run's
# reference is the spec-none run equal in every other knob.
SPECULATION_KNOBS: tuple[str, ...] = knobs_in("speculation")


def speculation_table(con: duckdb.DuckDBPyConnection, grid: str, experiments: Sequence[str] | None = None,
                      include_stale: bool = False) -> pd.DataFrame:
    """One row per generation configuration (repeats aggregated) of `grid`'s done runs, optionally only those in
    `experiments`: tokens/s (mean, std), ms per token, acceptance rate, mean accepted length, speedup in tokens/s vs
    the `spec: none` configuration with every other knob equal (same policy, prompt, device and code), `outputs`
    (distinct generated-id hashes among the repeats) and `identical`: whether it generated exactly the reference's ids
    (null without a reference)."""
    knobs = ", ".join(f"any_value({q(k)}) AS {q(k)}" for k in KNOBS)
    same = [k for k in KNOBS if k not in SPECULATION_KNOBS] + ["device_name", "code_version"]
    join = " AND ".join(f"r.{q(k)} IS NOT DISTINCT FROM x.{q(k)}" for k in same)
    sql = f"""
        WITH members AS ({_members_sql("grid = $grid")}),
        groups AS (
            SELECT group_hash, code_version, any_value(device_name) AS device_name, {knobs},
                any_value(stale) AS stale, list_distinct(flatten(list(experiments))) AS experiments, count(*) AS n,
                avg(tokens_per_s) AS tokens_per_s, stddev_samp(tokens_per_s) AS tokens_per_s_std,
                avg(ms_per_token) AS ms_per_token, avg(acceptance_rate) AS acceptance_rate,
                avg(mean_accepted_length) AS mean_accepted_length, avg(compaction_count) AS compactions,
                count(DISTINCT generated_hash) AS outputs, any_value(generated_hash) AS generated_hash
            FROM members WHERE status = 'done' AND mode = 'generate' AND ($include_stale OR NOT stale)
            GROUP BY group_hash, code_version
        )
        SELECT x.*, r.group_hash AS reference_hash, x.tokens_per_s / r.tokens_per_s AS speedup,
            CASE WHEN r.group_hash IS NULL THEN NULL
                 ELSE x.outputs = 1 AND r.outputs = 1 AND x.generated_hash = r.generated_hash END AS identical
        FROM groups x LEFT JOIN groups r ON r.spec = 'none' AND {join}
        WHERE $experiments IS NULL OR list_has_any(x.experiments, $experiments)
        ORDER BY x.method, x.compress_every, x.cap, x.spec <> 'none', x.spec, x.num_draft, x.group_hash
    """
    params = {"cv": current_code_version(), "grid": grid, "include_stale": include_stale,
              "experiments": list(experiments) if experiments is not None else None}
    return con.execute(sql, params).df()


def retrieval_table(con: duckdb.DuckDBPyConnection, grid: str, experiments: Sequence[str] | None = None,
                    by_depth: bool = True, include_stale: bool = False) -> pd.DataFrame:
    """One row per task configuration of `grid`'s done runs (repeats pooled), and per needle depth with `by_depth`
    (depth null for a task file's rows, and in every row without it): its knobs, `trials` (rows of the trials table:
    the interval's n, not the knob of that name, which is renamed `trials_per_depth`), `accuracy` (mean RULER score)
    with its Wilson 95 % interval (`accuracy_low`, `accuracy_high`; the interval treats a fractional score as that
    share of a success: an approximation for vt's and multi-reference rows, whose scores are not Bernoulli), the mean
    teacher-forced `answer_nll`, and the needle's mean `retained` tokens (when the question starts),
    `retained_at_answer` (when the first answer token is predicted) and `distance`."""
    knobs = ", ".join(f"any_value(m.{q(k)}) AS {q(k)}" for k in KNOBS if k != "trials")
    depth = "t.depth" if by_depth else "NULL::DOUBLE"
    sql = f"""
        WITH members AS ({_members_sql("grid = $grid")})
        SELECT m.group_hash, {knobs}, any_value(m.trials) AS trials_per_depth, {depth} AS depth,
            list_distinct(flatten(list(m.experiments))) AS experiments, bool_or(m.stale) AS stale,
            count(*) AS trials, sum(t.score) AS correct, avg(t.score) AS accuracy, avg(t.answer_nll) AS answer_nll,
            avg(t.retained) AS retained, avg(t.retained_at_answer) AS retained_at_answer, avg(t.distance) AS distance,
            avg(t.needle_end - t.needle_start) AS needle_tokens
        FROM members m JOIN trials t USING (run_hash)
        WHERE m.status = 'done' AND m.mode = 'task' AND ($include_stale OR NOT m.stale)
        GROUP BY m.group_hash, {depth}
        HAVING $experiments IS NULL OR list_has_any(list_distinct(flatten(list(m.experiments))), $experiments)
        ORDER BY any_value(m.task), any_value(m.context_tokens), any_value(m.method), any_value(m.cap),
            any_value(m.compress_every), m.group_hash, {depth}
    """
    params = {"cv": current_code_version(), "grid": grid, "include_stale": include_stale,
              "experiments": list(experiments) if experiments is not None else None}
    frame = con.execute(sql, params).df()
    intervals = [wilson_interval(float(c), int(n)) for c, n in zip(frame["correct"], frame["trials"], strict=True)]
    frame["accuracy_low"] = [low for low, _ in intervals]
    frame["accuracy_high"] = [high for _, high in intervals]
    return frame

