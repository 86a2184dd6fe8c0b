"""The dashboard's access to the store: store/queries.py calls, cached per published snapshot, plus row labels.

Each cache key holds the snapshot's signature, so a new snapshot (a grid that finished more runs) is read on the next
rerun while unchanged data is never queried twice. Nothing here writes or computes a statistic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import streamlit as st

from store import queries, retrieval

Signature = tuple[int, int, int]
# Short names of knobs in labels, as the study writes them.
SHORT = {"compress_every": "R", "max_drop": "max_drop", "cap_mode": "cap_mode"}


@dataclass(frozen=True)
class Source:
    """One published snapshot of the store and the reader's choices that every view shares."""

    path: Path
    signature: Signature
    grid: str
    include_stale: bool


@st.cache_data(max_entries=64, show_spinner=False)
def grid_names(path: Path, signature: Signature) -> list[str]:
    return queries.read(path, queries.grid_names)


@st.cache_data(max_entries=64, show_spinner=False)
def experiment_names(path: Path, signature: Signature, grid: str) -> list[str]:
    return queries.read(path, lambda con: queries.experiment_names(con, grid))


@st.cache_data(max_entries=64, show_spinner=False)
def status_counts(path: Path, signature: Signature, grid: str | None) -> pd.DataFrame:
    return queries.read(path, lambda con: queries.status_counts(con, grid))


@st.cache_data(max_entries=64, show_spinner=False)
def grid_overview(path: Path, signature: Signature) -> pd.DataFrame:
    return queries.read(path, queries.grid_overview)


@st.cache_data(max_entries=64, show_spinner=False)
def grid_totals(path: Path, signature: Signature, grid: str) -> dict[str, int]:
    return queries.read(path, lambda con: queries.grid_totals(con, grid))


@st.cache_data(max_entries=64, show_spinner=False)
def run_table(path: Path, signature: Signature, grid: str, include_stale: bool) -> pd.DataFrame:
    return queries.read(path, lambda con: with_labels(queries.run_table(con, grid, include_stale)))


@st.cache_data(max_entries=64, show_spinner=False)
def step_range(path: Path, signature: Signature, run_hashes: tuple[str, ...]) -> queries.StepRange:
    return queries.read(path, lambda con: queries.step_range(con, run_hashes))


@st.cache_data(max_entries=64, show_spinner=False)
def token_series(path: Path, signature: Signature, run_hashes: tuple[str, ...], steps: queries.StepRange,
                 rolling: int, points: int, marks: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    return queries.read(path, lambda con: (queries.token_series(con, run_hashes, steps, points=points, rolling=rolling),
            queries.compaction_marks(con, run_hashes, steps, points=marks)))


@st.cache_data(max_entries=64, show_spinner=False)
def spikes(path: Path, signature: Signature, run_hashes: tuple[str, ...],
           radius: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    def profile_and_metrics(con):
        profile = queries.spike_profile(con, run_hashes, radius=radius)
        return profile, queries.spike_metrics_of(con, profile)

    return queries.read(path, profile_and_metrics)


@st.cache_data(max_entries=64, show_spinner=False)
def speculation_table(path: Path, signature: Signature, grid: str, include_stale: bool) -> pd.DataFrame:
    return queries.read(path, lambda con: queries.speculation_table(con, grid, None, include_stale))


@st.cache_data(max_entries=64, show_spinner=False)
def retrieval_table(path: Path, signature: Signature, grid: str, include_stale: bool) -> pd.DataFrame:
    return queries.read(path, lambda con: retrieval.retrieval_cells(con, grid, None, include_stale))


@st.cache_data(max_entries=64, show_spinner=False)
def retrieval_trials(path: Path, signature: Signature, grid: str, group_hash: str, depth: float | None,
                     include_stale: bool) -> pd.DataFrame:
    return queries.read(path, lambda con: retrieval.trial_rows(con, grid, group_hash, depth, include_stale))


def with_labels(frame: pd.DataFrame) -> pd.DataFrame:
    """Add `label` (the method, R, and the knobs whose value differs from the most common one among rows of the same
    method; then '≡' and the settings of the configurations that share its run; the hash when rows would share a
    label) and `context` (what a speedup is relative to). Knobs that do not apply to a row are missing values (NA,
    None or NaN, by pandas version and dtype): a missing value equals only another missing value."""
    if frame.empty:
        return frame.assign(label=pd.Series(dtype=str), context=pd.Series(dtype=str))
    varying = [k for k in queries.varying_knobs(frame) if k not in ("method", "compress_every")]
    if "repeat" in frame and frame["repeat"].nunique() > 1:  # a run's repeats are told apart by their number
        varying.append("repeat")
    records = frame.to_dict("records")
    usual: dict[object, dict[str, object]] = {}
    for method in dict.fromkeys(row["method"] for row in records):
        rows = [row for row in records if row["method"] == method]
        usual[method] = {k: _most_common([row[k] for row in rows]) for k in varying}
    labels = pd.Series([_label(row, varying, usual[row["method"]]) for row in records], index=frame.index, dtype=object)
    if "equivalent_to" in frame:  # configurations that share one run are labelled as such, never as separate results
        labels = labels.where(frame["equivalent_to"] == "", labels + " ≡ " + frame["equivalent_to"].astype(str))
    hash_column = next(c for c in ("config_hash", "run_hash", "setting_hash") if c in frame)
    shared = labels.duplicated(keep=False)
    labels = labels.where(~shared, labels + " #" + frame[hash_column].astype(str).str[:6])
    context = frame["model"].astype(str) + " / " + frame["dataset"].astype(str) + " / " + frame["device_name"].astype(
        str)
    return frame.assign(label=labels, context=context)


def _missing(value: object) -> bool:
    return value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and value != value)


def _same(a: object, b: object) -> bool:
    if _missing(a) or _missing(b):
        return _missing(a) and _missing(b)
    return bool(a == b)


def _most_common(values: list[object]) -> object:
    """The most frequent value (missing values count as one value), the first seen among equals."""
    counts: list[list] = []
    for value in values:
        for entry in counts:
            if _same(entry[0], value):
                entry[1] += 1
                break
        else:
            counts.append([value, 1])
    return max(counts, key=lambda entry: entry[1])[0]


def _label(row: dict, knobs: list[str], usual: dict[str, object]) -> str:
    parts = [str(row["method"])]
    if row["method"] == "streaming":
        parts.append(f"R={row['compress_every']}")
    if row["method"] in ("streaming", queries.BASELINE_METHOD):
        parts += [f"{SHORT.get(k, k)}={row[k]}" for k in knobs if not _missing(row[k]) and not _same(row[k], usual[k])]
    return " ".join(parts)


@st.cache_data(max_entries=64, show_spinner=False)
def setting_table(path: Path, signature: Signature, grid: str, experiments: tuple[str, ...] | None,
                  include_stale: bool) -> pd.DataFrame:
    frame = queries.read(path, lambda con: queries.setting_table(con, grid, experiments, include_stale))
    return with_labels(frame)


@st.cache_data(max_entries=64, show_spinner=False)
def block_ppl(path: Path, signature: Signature, run_hashes: tuple[str, ...], block: int) -> pd.DataFrame:
    return queries.read(path, lambda con: queries.block_ppl(con, run_hashes, block))


@st.cache_data(max_entries=64, show_spinner=False)
def declared_sweep(path: Path, signature: Signature, grid: str, experiment: str) -> tuple[str, ...]:
    return queries.read(path, lambda con: queries.declared_sweep(con, grid, experiment))
