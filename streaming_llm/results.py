"""What a run returns (RunResult) and the per-run tables it carries, declared once: STEP_TABLES maps each table's name
to its Arrow schema, and the store derives its tables, segments and views from it, so that a new table (one row per
retrieval trial, say) is declared here, filled by its protocol, and stored with no edit in store/.

Pure data: no torch, no I/O (the store imports it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from .config import RunConfig

TOKEN_SCHEMA = pa.schema([
    ("step", pa.int32()),  # index of the token fed (its place in the text)
    ("position", pa.int64()),  # position id of the query
    ("token_id", pa.int64()),
    ("target_id", pa.int64()),
    ("nll", pa.float64()),  # of target_id, log-softmax in float32
    ("latency_ms", pa.float64()),  # forward + cache work; null for prefill rows (see summary.prefill_ms)
    ("compaction_ms", pa.float64()),
    ("kv_len", pa.int32()),  # attention span of the step
    ("compacted", pa.bool_()),
    ("evicted", pa.int32()),
    ("prefill", pa.bool_()),
])
COMPACTION_SCHEMA = pa.schema([
    ("step", pa.int32()),
    ("kv_len_before", pa.int32()),
    ("kv_len_after", pa.int32()),
    ("evicted", pa.int32()),
    ("compaction_ms", pa.float64()),
])
# Generation rows are the score rows plus the verification forward that produced the token (null on prompt rows).
GENERATION_TOKEN_SCHEMA = TOKEN_SCHEMA.append(pa.field("forward", pa.int32()))
FORWARD_SCHEMA = pa.schema([
    ("forward", pa.int32()),  # index of the verification forward in the run
    ("step", pa.int32()),  # stream index of the first token it fed (the last accepted one)
    ("drafted", pa.int32()),
    ("accepted", pa.int32()),
    ("generated", pa.int32()),  # accepted + 1: the target's own token after them
    ("kv_len", pa.int32()),  # attention span of its first query
    ("draft_ms", pa.float64()),  # drafting, and syncing the drafter with the last verification
    ("verify_ms", pa.float64()),  # the target's forward over the block, the acceptance decisions and the rollback
    ("latency_ms", pa.float64()),
])

# Task runs (streaming_llm.task_run): one row per retrieval trial.
TRIAL_SCHEMA = pa.schema([
    ("task", pa.string()),  # passkey | niah | niah_multikey | vt | file
    ("depth", pa.float64()),  # fraction of the haystack before the needle; null for a task file's rows
    ("trial", pa.int32()),  # index of the instance at its depth (its seed: seed << 16 | trial)
    ("needle_start", pa.int32()),  # the needle's token span [start, end) in the prompt; null for task-file rows
    ("needle_end", pa.int32()),
    ("distance", pa.int32()),  # tokens from the needle's end to the question's start
    ("question_start", pa.int32()),  # stream index of the question's first token (= context length)
    ("answer", pa.string()),  # the greedy output, decoded
    ("expected", pa.string()),  # the reference answers, joined by spaces
    ("score", pa.float64()),  # RULER's metric (task_metric): all = fraction of the references found, part = any
    ("answer_nll", pa.float64()),  # mean NLL per token of the gold answer, teacher-forced after the question
    ("retained", pa.int32()),  # needle tokens the cache holds when the question starts (from the schedule)
    ("kv_len", pa.int32()),  # attention span of the question's first token
    ("instance_hash", pa.string()),  # tasks.TaskInstance.instance_hash: regenerate the trial and compare
    # needle tokens the cache holds when the first answer token is predicted: after the whole question (whose tokens
    # keep evicting), at the question's last token (from the schedule)
    ("retained_at_answer", pa.int32()),
])


def stored(schema: pa.Schema, nullable: tuple[str, ...] = ()) -> pa.Schema:
    """`schema` as a stored table declares it: every column NOT NULL but those in `nullable`."""
    return pa.schema([column.with_nullable(column.name in nullable) for column in schema])


# Every per-run table a run may return, by its name in RunResult.tables and in the store (a table and a view of that
# name, and superseded_<name>; run_hash is added there). A run returns the tables it fills: a score run has no
# forwards. Columns map to SQL as int32 -> INTEGER, int64 -> BIGINT, float64 -> DOUBLE, bool -> BOOLEAN, string ->
# VARCHAR; a field's nullability is its column's. Order matters once stored (a segment's digest runs over its files
# in this order): append, never reorder.
STEP_TABLES: dict[str, pa.Schema] = {
    # A table is the union of the rows its protocols write: score runs leave `forward` null.
    "tokens": stored(GENERATION_TOKEN_SCHEMA, nullable=("latency_ms", "compaction_ms", "forward")),
    "compactions": stored(COMPACTION_SCHEMA, nullable=("compaction_ms",)),  # null in parallel runs, which time nothing
    "forwards": stored(FORWARD_SCHEMA),  # generation runs: one row per verification forward
    # Task runs: one row per trial; a task file's rows have no depth or needle, dense/recompute spans aside.
    "trials": stored(TRIAL_SCHEMA, nullable=("depth", "needle_start", "needle_end", "distance", "retained", "kv_len",
                                                      "retained_at_answer")),
}


@dataclass
class RunResult:
    """What one run produced: its config, a summary of scalars, and its per-run tables (STEP_TABLES names)."""

    config: RunConfig
    summary: dict[str, Any]
    tables: dict[str, pa.Table] = field(default_factory=dict)

    @property
    def tokens(self) -> pa.Table:
        return self.tables["tokens"]

    @property
    def compactions(self) -> pa.Table:
        return self.tables["compactions"]

    @property
    def forwards(self) -> pa.Table | None:
        """Generation runs: one row per verification forward (streaming_llm.generate); None for score runs."""
        return self.tables.get("forwards")

    @property
    def trials(self) -> pa.Table | None:
        """Task runs: one row per retrieval trial (streaming_llm.task_run); None for the other modes."""
        return self.tables.get("trials")
