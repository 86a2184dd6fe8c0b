"""The store's schema, declared once (SQLAlchemy Core, compiled for DuckDB), with its version.

Tables: grids, experiments (grid <-> run membership), runs (one row per configuration hash: knobs as typed columns,
config JSON, status, summary, environment), tokens (one row per step), compactions (one row per event), meta. The
per-token and per-compaction columns mirror streaming_llm.evaluate's TOKEN_SCHEMA / COMPACTION_SCHEMA. This module only
declares; store/ code that writes lives elsewhere.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

SCHEMA_VERSION = 1

metadata = MetaData()

meta = Table(
    "meta", metadata,
    Column("key", String, primary_key=True),
    Column("value", String, nullable=False),
)

grids = Table(
    "grids", metadata,
    Column("grid", String, primary_key=True),  # the grid's `name`
    Column("path", String, nullable=False),
    Column("spec_yaml", Text, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

experiments = Table(
    "experiments", metadata,
    Column("grid", String, primary_key=True),
    Column("experiment", String, primary_key=True),
    Column("run_hash", String, primary_key=True),
)

# Knob columns: the RunConfig fields, typed. Kept in RunConfig's order.
KNOB_COLUMNS = [
    Column("model", String, nullable=False),
    Column("dataset", String, nullable=False),
    Column("text_file", String),
    Column("dataset_source", String),
    Column("sample", Integer, nullable=False),
    Column("max_tokens", Integer, nullable=False),
    Column("prefill", Integer, nullable=False),
    Column("warmup", Integer, nullable=False),
    Column("method", String, nullable=False),
    Column("sink", Integer, nullable=False),
    Column("window", Integer),  # as set; null when derived from cap (see window_resolved)
    Column("cap", Integer),
    Column("cap_mode", String, nullable=False),
    Column("overlap", Integer, nullable=False),
    Column("refresh", Integer, nullable=False),
    Column("refresh_policy", String, nullable=False),
    Column("slack", Integer, nullable=False),
    Column("compress_every", Integer, nullable=False),
    Column("max_drop", Integer, nullable=False),
    Column("rope_mode", String, nullable=False),
    Column("dtype", String, nullable=False),
    Column("device", String, nullable=False),
    Column("attn_implementation", String, nullable=False),
    Column("repeat", Integer, nullable=False),
]

# Summary columns: the scalar keys of RunResult.summary (environment goes to environment_json).
SUMMARY_COLUMNS = [
    Column("text_id", String),
    Column("token_hash", String),
    Column("random_weights", Boolean),
    Column("predicted_tokens", Integer),
    Column("decode_steps", Integer),
    Column("ppl", Float),
    Column("ppl_decode", Float),
    Column("mean_nll", Float),
    Column("tpot_ms_mean", Float),
    Column("tpot_ms_median", Float),
    Column("tpot_ms_p95", Float),
    Column("timed_steps", Integer),
    Column("prefill_ms", Float),
    Column("compaction_count", Integer),
    Column("compaction_ms_total", Float),
    Column("evicted_total", Integer),
    Column("kv_len_max", Integer),
    Column("kv_len_mean", Float),
    Column("kv_cache_peak_bytes", Integer),
    Column("window_resolved", Integer),  # summary["window"]
    Column("soft_capacity", Integer),
    Column("hard_capacity", Integer),
    Column("peak_memory_bytes", Integer),
    Column("peak_memory_kind", String),
    Column("device_name", String),  # summary["environment"]["device"]
    Column("wall_s", Float),
]

runs = Table(
    "runs", metadata,
    Column("run_hash", String, primary_key=True),  # RunConfig.run_hash
    Column("group_hash", String, nullable=False),  # RunConfig.group_hash: shared by the repeats of a configuration
    Column("status", String, nullable=False),  # done | failed
    Column("error", Text),
    Column("attempts", Integer, nullable=False),
    Column("config_json", Text, nullable=False),  # RunConfig.normalised()
    *KNOB_COLUMNS,
    *SUMMARY_COLUMNS,
    Column("started_at", DateTime(timezone=True)),
    Column("ended_at", DateTime(timezone=True)),
    Column("code_version", String, nullable=False),  # streaming_llm.environment.code_version() of the producer
    Column("git_commit", String),
    Column("environment_json", Text),
)

tokens = Table(
    "tokens", metadata,
    Column("run_hash", String, nullable=False),
    Column("step", Integer, nullable=False),
    Column("position", Integer, nullable=False),
    Column("token_id", Integer, nullable=False),
    Column("target_id", Integer, nullable=False),
    Column("nll", Float, nullable=False),
    Column("latency_ms", Float),  # null on prefill rows
    Column("compaction_ms", Float),
    Column("kv_len", Integer, nullable=False),
    Column("compacted", Boolean, nullable=False),
    Column("evicted", Integer, nullable=False),
    Column("prefill", Boolean, nullable=False),
)

compactions = Table(
    "compactions", metadata,
    Column("run_hash", String, nullable=False),
    Column("step", Integer, nullable=False),
    Column("kv_len_before", Integer, nullable=False),
    Column("kv_len_after", Integer, nullable=False),
    Column("evicted", Integer, nullable=False),
    Column("compaction_ms", Float, nullable=False),
)
