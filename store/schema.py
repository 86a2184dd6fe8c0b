"""The store's schema, declared once (SQLAlchemy Core, compiled for DuckDB), with its version.

Tables: grids, experiments (grid <-> run membership), configurations (every configuration an experiment lists and
the run that computes it: equivalent configurations share one), runs (one row per run hash, i.e. per computation:
knobs of the configuration that was run as typed columns, config JSON, status, summary, environment), tokens (one row
per step), compactions (one row per event), forwards (generation runs: one row per verification forward), meta, and
superseded_* (earlier results of a hash, kept when it is rerun). Since schema 4 the per-step tables and their
superseded_* live in per-run Parquet segments read through views (see "Segments" at the end). Views for shell users:
run_summaries, current_runs, experiment_runs, configuration_runs, group_summaries. Derived, never mirrored by hand:
the knob columns from RunConfig's fields, the per-step tables (tokens, compactions, forwards, trials, and any the
engine registers) from streaming_llm.results.STEP_TABLES. This module only declares; store/writer.py writes.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import pyarrow as pa
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Double,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

from streaming_llm import results
from streaming_llm.config import RunConfig

# 2: protocol, chunk, score_stride, setting_hash, eval_tokens_per_s; compaction_ms nullable
# 3: run_hash is the computation's identity (schedule fingerprint); table configurations; generation runs (mode and
#    spec knobs, generation summary, tokens.forward, the forwards table)
# 4: per-step rows (tokens, compactions, forwards and their superseded_*) in immutable per-run Parquet segments beside
#    the catalog file, read through views; runs.segment names a run's segment (see "Segments" below)
SCHEMA_VERSION = 4
MIGRATES_FROM = (2, 3)  # versions a writer upgrades in place (store/migrate.py create_schema)
APPLICATION_ID = "gridrun-store"  # meta['application_id']: tells a gridrun store from any other DuckDB file

metadata = MetaData()
# Double, not Float: SQLAlchemy's Float is DuckDB's 4-byte FLOAT, which would round every NLL and latency.
# BigInteger for byte counts and token ids: a GPU's peak memory passes 2**31.

# Keys: application_id, schema_version, code_version (of the last writer: "stale" in the views is relative to it),
# created_at.
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

# Knob columns: the RunConfig fields, typed from their annotations, in RunConfig's order: a knob added to RunConfig
# gets its column here, and in a store of an older version on its next open (StoreWriter adds missing columns, null
# in the rows recorded before it).
# The knob columns created NOT NULL before the columns were derived (frozen: a knob added since is nullable, as the
# rows recorded before it hold null). The generation knobs were added nullable: rows written without them (older
# tools, hand-made fixtures) read as score runs (queries test mode = 'generate').
NOT_NULL_KNOBS = frozenset({
    "model", "dataset", "sample", "max_tokens", "prefill", "warmup", "protocol", "chunk", "score_stride", "method",
    "sink", "cap_mode", "overlap", "refresh", "refresh_policy", "slack", "compress_every", "max_drop", "rope_mode",
    "dtype", "device", "attn_implementation", "repeat", "kv_quant", "kv_quant_group", "kv_quant_residual",
    "kv_quant_sinks", "weight_quant",
})


def _value_types(annotation: Any) -> set[type]:
    """The Python types a field's values have (None aside): `int | None` -> {int}, Literal['a', 'b'] -> {str}."""
    if get_origin(annotation) is Literal:
        return {type(value) for value in get_args(annotation)}
    if get_origin(annotation) in (Union, UnionType):
        return set().union(*(_value_types(arg) for arg in get_args(annotation))) - {type(None)}
    return {annotation}


def _knob_column_type(name: str, annotation: Any) -> type:
    """The SQL type of a RunConfig field: int -> Integer (its bound, knob_bound, fits INT32), float -> Double, bool ->
    Boolean, str or a Literal of strings -> String, a tuple -> String (its JSON text)."""
    kinds = _value_types(annotation)
    kind = kinds.pop() if len(kinds) == 1 else None
    if get_origin(kind) is tuple:
        return String  # a list knob (depths): its JSON text, as config_json holds it ("[0.1, 0.5]")
    column = {bool: Boolean, int: Integer, float: Double, str: String}.get(kind)
    if column is None:
        raise TypeError(f"RunConfig.{name}: {annotation!r} has no store column type; use int, float, bool, str or a "
                        "Literal of one of them (or add its type to store/schema.py _knob_column_type)")
    return column


def knob_columns(config_class: type[RunConfig] = RunConfig) -> list[Column]:
    """One column per field of `config_class`, typed from its annotation."""
    columns = []
    for name, field in config_class.model_fields.items():
        optional = type(None) in get_args(field.annotation)
        columns.append(Column(name, _knob_column_type(name, field.annotation),
                              nullable=optional or name not in NOT_NULL_KNOBS))
    return columns


KNOB_COLUMNS = knob_columns()


def added_column_value(name: str) -> str | None:
    """What the rows of an older store hold in a knob column declared since (as a SQL literal; None: null): the
    writer's migration adds the column with it as DEFAULT, and a reader of a store no writer has migrated yet shadows
    the table with it. Its rows were run at the knob's default (layout compact, compile none: the only behaviour
    there was), so they hold that and compare equal to new rows at the default; a knob whose default is None (the
    task knobs) stays null."""
    field = RunConfig.model_fields.get(name)
    if field is None or field.default is None or not isinstance(field.default, str | int | float):
        return None
    return sql_literal(field.default)


def sql_literal(value: str | int | float) -> str:
    """`value` as a SQL literal."""
    return f"'{sql_string(value)}'" if isinstance(value, str) else repr(value)

# Summary columns: the scalar keys of RunResult.summary (environment goes to environment_json).
SUMMARY_COLUMNS = [
    Column("text_id", String),
    Column("token_hash", String),
    Column("random_weights", Boolean),
    Column("predicted_tokens", Integer),
    Column("decode_steps", Integer),
    Column("ppl", Double),
    Column("ppl_decode", Double),
    Column("mean_nll", Double),
    Column("eval_tokens_per_s", Double),  # predicted tokens / scoring wall time, either protocol
    Column("tpot_ms_mean", Double),
    Column("tpot_ms_median", Double),
    Column("tpot_ms_p95", Double),
    Column("timed_steps", Integer),
    Column("prefill_ms", Double),
    Column("compaction_count", Integer),
    Column("compaction_ms_total", Double),
    Column("evicted_total", Integer),
    Column("kv_len_max", Integer),
    Column("kv_len_mean", Double),
    Column("kv_cache_peak_bytes", BigInteger),
    Column("window_resolved", Integer),  # summary["window"]
    Column("soft_capacity", Integer),
    Column("hard_capacity", Integer),
    Column("peak_memory_bytes", BigInteger),
    Column("peak_memory_kind", String),
    Column("device_name", String),  # summary["environment"]["device"]
    Column("wall_s", Double),
    # generation runs (null in score runs)
    Column("generated_tokens", Integer),
    Column("generated_hash", String),  # equal hashes: identical generated ids
    Column("verify_forwards", Integer),  # verification forwards of the target
    Column("tokens_per_s", Double),
    Column("ms_per_token", Double),
    Column("draft_ms_total", Double),
    Column("verify_ms_total", Double),
    Column("drafted_total", Integer),
    Column("accepted_total", Integer),
    Column("acceptance_rate", Double),  # accepted / drafted; null when nothing was drafted
    Column("mean_accepted_length", Double),  # generated tokens per verification forward (accepted drafts + 1)
    # Quantization: measured bytes (null without a cache: recompute).
    Column("kv_bytes_per_token", Double),  # kv_cache_peak_bytes / entries the cache had room for
    Column("weights_bytes", BigInteger),  # parameters + buffers after weight_quant
    Column("weights_bytes_float", BigInteger),  # the same before it
    # Task runs (null in the others): over the trials table's rows
    Column("trial_count", Integer),
    Column("accuracy", Double),  # mean RULER score (string_match_all)
    Column("answer_nll_mean", Double),  # mean teacher-forced NLL per token of the gold answers
    # compile: the compiled step's compilation wall time, never in TPOT (a warmup step's; a prompt-lookup ring
    # target's warm-up on a padding block when it is built)
    Column("compile_s", Double),
]

runs = Table(
    "runs", metadata,
    Column("run_hash", String, primary_key=True),  # RunConfig.run_hash
    Column("group_hash", String, nullable=False),  # RunConfig.group_hash: shared by the repeats of a configuration
    # RunConfig.setting_hash: shared by a setting's text samples, repeats, protocols and stream lengths
    Column("setting_hash", String, nullable=False),
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
    Column("worker", String),  # host:pid of the actor that ran it
    Column("recorded_at", DateTime(timezone=True)),  # when the driver committed the row
    Column("segment", String),  # the run's Parquet segment id (null: no per-step rows, a failed run)
    Column("segment_bytes", BigInteger),  # the size of its segment files, checked when a writer opens the store
    Column("segment_digest", String),  # of its segment files (store/segments.py new_digest), checked too
    # JSON list of its segment files, relative to the segment folder, in digest order: what the views read, and all
    # they read (a file beside them, a stray copy, is never read)
    Column("segment_files", Text),
)

# Every configuration a grid's experiment lists, with the run that computes it: equivalent configurations (same kept
# tokens at every step) map to one run_hash, and runs holds the knobs of the one that was run. Knobs, window and
# capacities here are the configuration's own.
configurations = Table(
    "configurations", metadata,
    Column("grid", String, primary_key=True),
    Column("experiment", String, primary_key=True),
    Column("config_hash", String, primary_key=True),  # RunConfig.config_hash
    Column("config_group_hash", String, nullable=False),  # RunConfig.config_group_hash: shared by its repeats
    Column("run_hash", String, nullable=False),  # RunConfig.run_hash: the computation (runs, tokens, compactions)
    Column("config_json", Text, nullable=False),  # RunConfig.normalised()
    *[Column(column.name, column.type, nullable=column.nullable) for column in KNOB_COLUMNS],
    Column("window_resolved", Integer),
    Column("soft_capacity", Integer),
    Column("hard_capacity", Integer),
    Column("setting_hash", String, nullable=False),  # RunConfig.setting_hash, the configuration's own
)
CONFIGURATION_OWN = ("window_resolved", "soft_capacity", "hard_capacity", "setting_hash")  # besides the knobs


def _superseded(table: Table, into: MetaData = metadata) -> Table:
    """A copy of `table` for results replaced by a rerun (new code version, or --force): kept, never mixed in."""
    columns = [Column(c.name, c.type, nullable=True) for c in table.columns]
    return Table(f"superseded_{table.name}", into, *columns, Column("superseded_at", DateTime(timezone=True)))


superseded_runs = _superseded(runs)


# The one Arrow type of each declared column type: rows are built in Arrow (from Python ints: int64) and DuckDB casts
# them to the declared type on insert.
ARROW_TYPES: dict[type, pa.DataType] = {
    String: pa.string(), Text: pa.string(), Integer: pa.int64(), BigInteger: pa.int64(), Double: pa.float64(),
    Boolean: pa.bool_(), DateTime: pa.timestamp("us", tz="UTC"),
}


def arrow_type(column: Column) -> pa.DataType:
    """The Arrow type rows of `column` are built in (ARROW_TYPES)."""
    return ARROW_TYPES[type(column.type)]


def _stored_type(kind: type) -> pa.DataType:
    return pa.int32() if kind is Integer else ARROW_TYPES[kind]


def stored_arrow_type(column: Column) -> pa.DataType:
    """The Arrow type of `column` in a segment file: ARROW_TYPES, except Integer as int32, as DuckDB's INTEGER is and
    as every segment written so far holds it (the views read old and new files as one column of one type)."""
    return _stored_type(type(column.type))


# The SQL type of an Arrow type the engine declares for a per-step column: the inverse of the stored types (a string
# is VARCHAR, String after Text).
_SQL_TYPES = {_stored_type(kind): kind for kind in (Text, String, Integer, BigInteger, Double, Boolean)}



# --- Per-step tables: derived from the engine's STEP_TABLES (streaming_llm/results.py) -------------------------------
def _step_table(name: str, schema: pa.Schema, into: MetaData) -> Table:
    """The store's table `name`: run_hash, then the engine's columns, typed and nullable as its Arrow fields."""
    columns = [Column("run_hash", String, nullable=False)]
    for field in schema:
        if field.type not in _SQL_TYPES:
            raise TypeError(f"streaming_llm.results.STEP_TABLES[{name!r}].{field.name}: {field.type} has no store "
                            f"column type; use one of {', '.join(map(str, _SQL_TYPES))}")
        columns.append(Column(field.name, _SQL_TYPES[field.type], nullable=field.nullable))
    return Table(name, into, *columns)


@functools.cache
def _derived(registry: tuple[tuple[str, pa.Schema], ...]) -> tuple[tuple[Table, ...], tuple[Table, ...]]:
    into = MetaData()
    tables = tuple(_step_table(name, schema, into) for name, schema in registry)
    return tables, tuple(_superseded(table, into) for table in tables)


def segment_tables() -> tuple[Table, ...]:
    """The per-step tables, in STEP_TABLES order (the order a segment's digest runs over its files): derived from the
    engine's registry when called, so that a table registered there is stored with no edit here."""
    return _derived(tuple(results.STEP_TABLES.items()))[0]


def superseded_segment_tables() -> tuple[Table, ...]:
    """superseded_<table> of each per-step table, in the same order."""
    return _derived(tuple(results.STEP_TABLES.items()))[1]


def segment_table(name: str) -> Table:
    """The per-step table `name`; KeyError names the declared ones."""
    for table in segment_tables():
        if table.name == name:
            return table
    raise KeyError(f"no per-step table {name!r} (declared: {', '.join(t.name for t in segment_tables())}: "
                   "streaming_llm.results.STEP_TABLES)")


# The built-in ones, by name, where code and tests import them.
tokens, compactions, forwards = (segment_table(name) for name in ("tokens", "compactions", "forwards"))
superseded_tokens, superseded_compactions, superseded_forwards = superseded_segment_tables()[:3]
_OWN_KNOBS = ", ".join(f'c."{name}" AS "{name}"' for name in (*(c.name for c in KNOB_COLUMNS), *CONFIGURATION_OWN))
_GROUP_KNOBS = ", ".join(f'any_value("{c.name}") AS "{c.name}"' for c in KNOB_COLUMNS if c.name != "repeat")

# Views (DuckDB SQL) for anyone's SQL shell. `stale`: made by evaluation code other than the store's last writer;
# store/queries.py compares with the reading checkout's code version instead.
VIEWS = {
    "run_summaries": """
        SELECT r.*, r.code_version <> (SELECT value FROM meta WHERE key = 'code_version') AS stale
        FROM runs r""",
    "current_runs": """
        SELECT * FROM run_summaries WHERE status = 'done' AND NOT stale""",
    "experiment_runs": """
        SELECT e.grid, e.experiment, s.* FROM experiments e JOIN run_summaries s USING (run_hash)""",
    # One row per configuration of an experiment: its own knobs, the results of the run it shares, and how many
    # configurations of the grid share that run (1: none equivalent).
    "configuration_runs": f"""
        SELECT c.grid, c.experiment, c.config_hash, c.config_group_hash,
            count(DISTINCT c.config_hash) OVER (PARTITION BY c.grid, c.run_hash) AS configurations_sharing_run,
            s.* REPLACE ({_OWN_KNOBS})
        FROM configurations c JOIN run_summaries s USING (run_hash)""",
    "group_summaries": f"""
        SELECT group_hash, {_GROUP_KNOBS},
            count(*) AS repeats, avg(ppl) AS ppl_mean, stddev_samp(ppl) AS ppl_std,
            avg(tpot_ms_mean) AS tpot_ms_mean, stddev_samp(tpot_ms_mean) AS tpot_ms_std,
            avg(peak_memory_bytes) AS peak_memory_bytes_mean, avg(compaction_count) AS compaction_count_mean
        FROM current_runs GROUP BY group_hash""",
}


# --- Segments (schema 4) ----------------------------------------------------------------------------------------------
# The per-step tables are not tables of the catalog file: each run's rows are one immutable Parquet file per table,
# <store>.segments/<table>/run_hash=<hash>/segment=<id>/data.parquet (written under a temporary name, renamed, then
# referenced by runs.segment in the catalog). The catalog's views read the files its runs rows reference, and only
# those: a segment whose catalog was never published (a killed writer) or a superseded one is never read as current.
CATALOG_TABLES = tuple(metadata.sorted_tables)  # the catalog file's tables (the per-step ones are segments)
SEGMENTS_SUFFIX = ".segments"  # the segment folder of store X is X.segments, beside it
SEGMENT_FILE = "data.parquet"
SCHEMA_SEGMENT = "_"  # run_hash=_/segment=_/schema.parquet: 0 rows, the declared columns (an empty store reads)


def segments_folder(store: Path) -> Path:
    """The segment folder of the store whose catalog is `store` (a resolved path)."""
    return store.with_name(store.name + SEGMENTS_SUFFIX)


_GLOB_CHARACTERS = set("*?[]{}")


def unsafe_segment_path(store: Path) -> str | None:
    """Why the segment folder of `store` cannot be read back faithfully, or None. DuckDB reads every `name=value`
    folder of a Parquet path as a column (hive partitioning: a parent folder `step=7` would make every step read 7),
    and a glob character would match other folders' files."""
    for part in segments_folder(store.resolve()).parts:
        if "=" in part:
            return (f"the folder {part!r} in its path holds '=', which DuckDB would read as a column of every per-step "
                    "row; put the store in a path without '='")
        if _GLOB_CHARACTERS & set(part):
            return (f"the folder {part!r} in its path holds a glob character (* ? [ ] {{ }}), which would match other "
                    "folders' files; put the store in a path without them")
        if "\\" in part or any(ord(character) < 32 or ord(character) == 127 for character in part):
            return (f"the name {part!r} in its path holds a backslash or a control character, which DuckDB reads as "
                    "a separator or an escape (it would write the store's working copy into another folder); put "
                    "the store in a path without them")
    return None


def schema_segment_file(table: str) -> str:
    """The 0-row file of `table`'s segments, relative to the segment folder (a view's list is never empty)."""
    return f"{table}/run_hash={SCHEMA_SEGMENT}/segment={SCHEMA_SEGMENT}/schema.parquet"


def segment_views(folder: str, current: dict[str, list[str]] | None = None,
                  superseded: dict[str, list[str]] | None = None) -> dict[str, str]:
    """The catalog's views over the segments in `folder` (an absolute path: it resolves from any cwd): the current
    rows, read from exactly the files `current` lists per table (those the runs rows name), and the superseded ones
    (those superseded_runs names). Explicit lists, never a glob: a file the catalog does not name is never read."""
    views = {}
    for table in segment_tables():
        columns = ", ".join(f's."{column.name}"' for column in table.columns)
        for name, files, join in (
                (table.name, (current or {}).get(table.name, []), "SEMI JOIN runs r USING (run_hash, segment)"),
                (f"superseded_{table.name}", (superseded or {}).get(table.name, []),
                 "JOIN superseded_runs r USING (run_hash, segment)")):
            listed = ", ".join(f"'{sql_string(folder + '/' + file)}'"
                               for file in (schema_segment_file(table.name), *files))
            source = (f"read_parquet([{listed}], hive_partitioning = true, "
                      "hive_types = {'run_hash': VARCHAR, 'segment': VARCHAR})")
            extra = ", r.superseded_at" if name.startswith("superseded_") else ""
            views[name] = f"SELECT {columns}{extra} FROM {source} s {join}"
    return views


def q(name: str) -> str:
    """A quoted identifier: some knob names (`window`) are SQL keywords."""
    return '"' + name.replace('"', '""') + '"'


def sql_string(text: str) -> str:
    """`text` as the inside of a SQL string literal."""
    return text.replace("'", "''")
