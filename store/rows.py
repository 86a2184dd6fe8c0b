"""Mapping a run to the store's catalog rows: a finished run's summary, a failed run's error, an experiment's
configurations, each column for column as store/schema.py declares them, and as Arrow tables of the declared types.

Pure: it computes rows, and never touches a store.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
from sqlalchemy import Table

from streaming_llm.config import RunConfig

from .schema import CONFIGURATION_OWN, KNOB_COLUMNS, SUMMARY_COLUMNS, arrow_type


def arrow_schema(table: Table) -> pa.Schema:
    """The Arrow schema rows of `table` are built in (store/schema.py arrow_type)."""
    return pa.schema([(column.name, arrow_type(column)) for column in table.columns])


def rows_table(table: Table, rows: list[dict[str, Any]]) -> pa.Table:
    """`rows` (dicts keyed by column name) as an Arrow table of `table`'s declared columns."""
    return pa.Table.from_pylist(rows, schema=arrow_schema(table))


def run_row(config: RunConfig, summary: dict[str, Any], *, status: str, error: str | None, attempts: int,
            worker: str | None) -> dict[str, Any]:
    """The runs row of a finished run, column for column as store/schema.py declares it."""
    summary = dict(summary)
    environment = summary.pop("environment", {}) or {}
    summary["window_resolved"] = summary.pop("window", None)
    summary["device_name"] = environment.get("device")
    normalised = config.normalised()
    return {
        "run_hash": config.run_hash, "group_hash": config.group_hash, "setting_hash": config.setting_hash,
        "status": status, "error": error,
        "attempts": attempts, "config_json": json.dumps(normalised, sort_keys=True),
        **knob_values(normalised),
        **{column.name: summary.get(column.name) for column in SUMMARY_COLUMNS},
        "started_at": _timestamp(summary.get("started_at")), "ended_at": _timestamp(summary.get("ended_at")),
        "code_version": environment.get("code_version", "unknown"), "git_commit": environment.get("git_commit"),
        "environment_json": json.dumps(environment, sort_keys=True), "worker": worker,
    }


def configuration_row(grid: str, experiment: str, config: RunConfig) -> dict[str, Any]:
    """The configurations row of one configuration an experiment lists: its own knobs, window and capacities."""
    normalised = config.normalised()
    policy = config.policy if config.method == "streaming" else None
    own = dict.fromkeys(CONFIGURATION_OWN) | {"setting_hash": config.setting_hash}
    if policy is not None:
        own.update(window_resolved=policy.window, soft_capacity=policy.soft_capacity,
                   hard_capacity=policy.hard_capacity)
    return {
        "grid": grid, "experiment": experiment, "config_hash": config.config_hash,
        "config_group_hash": config.config_group_hash, "run_hash": config.run_hash,
        "config_json": json.dumps(normalised, sort_keys=True),
        **knob_values(normalised), **own,
    }


def failed_row(config: RunConfig, error: str, code_version: str, *, attempts: int, worker: str | None,
               started_at: datetime | None) -> dict[str, Any]:
    normalised = config.normalised()
    return {
        "run_hash": config.run_hash, "group_hash": config.group_hash, "setting_hash": config.setting_hash,
        "status": "failed", "error": error,
        "attempts": attempts, "config_json": json.dumps(normalised, sort_keys=True),
        **knob_values(normalised),
        "started_at": started_at, "ended_at": datetime.now(UTC), "code_version": code_version, "worker": worker,
    }


def _timestamp(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value)


def knob_values(normalised: dict[str, Any]) -> dict[str, Any]:
    """The knob columns of a normalised configuration: a knob it does not hold (the task knobs outside task runs) is
    null, and a list (depths) its JSON text."""
    values = {column.name: normalised.get(column.name) for column in KNOB_COLUMNS}
    return {name: json.dumps(value) if isinstance(value, list | tuple) else value for name, value in values.items()}
