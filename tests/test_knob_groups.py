"""Knob groups are declared once, on RunConfig's fields, and every list of knobs (the engine's normalisation, the
progress digest, the query layer, the store's knob columns) is derived from them."""

from __future__ import annotations

import subprocess
import sys
from typing import Annotated, Literal

import pytest
from sqlalchemy import Double, Integer, String

from store import queries
from store.schema import KNOB_COLUMNS, knob_columns
from streaming_llm import config
from streaming_llm.config import Groups, RunConfig, knobs_in


def test_groups_are_the_lists_they_replace() -> None:
    # The hand-written lists before the groups moved onto the fields (commit a661e9e).
    cache = ("sink", "window", "cap", "cap_mode", "overlap", "refresh", "refresh_policy", "slack", "compress_every",
             "max_drop", "rope_mode")
    assert tuple(config.CACHE_KNOBS) == cache
    assert tuple(config.SCHEDULE_KNOBS) == cache[:-1]
    assert set(config.SPAN_KNOBS) == {"sink", "window", "cap", "overlap", "refresh", "slack", "compress_every",
                                      "max_drop"}
    assert tuple(config.KV_QUANT_KNOBS) == ("kv_quant_group", "kv_quant_residual", "kv_quant_sinks")
    assert tuple(config.DRAFT_KNOBS) == ("num_draft", "ngram_max", "draft_model", "draft_layers", "draft_cap")
    assert tuple(config.GENERATION_KNOBS) == ("prompt_tokens", "new_tokens", "temperature", "seed", "spec",
                                       *config.DRAFT_KNOBS)
    # and the task runs' depths and trials, which came with mode task after the lists moved
    assert set(queries.MEASUREMENT_KNOBS) == {"sample", "protocol", "chunk", "score_stride", "max_tokens", "prefill",
                                              "warmup", "depths", "trials"}
    assert tuple(queries.QUANT_KNOBS) == ("kv_quant", "kv_quant_group", "kv_quant_residual", "kv_quant_sinks",
                                   "weight_quant")
    assert tuple(queries.SPECULATION_KNOBS) == ("spec", *config.DRAFT_KNOBS)


def test_unknown_group_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown knob group 'cach'"):
        knobs_in("cach")
    with pytest.raises(ValueError, match="declare them in KNOB_GROUPS"):
        Groups("cache", "nonsense")


def test_knob_columns_follow_runconfig() -> None:
    assert [column.name for column in KNOB_COLUMNS] == list(RunConfig.model_fields)
    kinds = {column.name: type(column.type) for column in KNOB_COLUMNS}
    assert kinds["sink"] is Integer and kinds["window"] is Integer and kinds["temperature"] is Double
    assert kinds["rope_mode"] is String and kinds["draft_model"] is String
    nullable = {column.name for column in KNOB_COLUMNS if column.nullable}
    assert {"window", "cap", "text_file", "draft_model", "mode", "spec"} <= nullable
    assert not {"sink", "method", "kv_quant"} & nullable


def test_a_new_knob_gets_its_column_and_group() -> None:
    """A knob added to RunConfig (here in a subclass) gets its typed, nullable store column and joins its group with
    no edit anywhere else."""

    class Extended(RunConfig):
        layout: Annotated[Literal["contiguous", "ring"], Groups("cache")] = "contiguous"
        trials: int = 8

    columns = {column.name: column for column in knob_columns(Extended)}
    assert type(columns["layout"].type) is String and columns["layout"].nullable
    assert type(columns["trials"].type) is Integer and columns["trials"].nullable
    assert "layout" in Extended.model_fields and "layout" not in knobs_in("cache")  # RunConfig itself unchanged


def test_store_queries_does_not_import_torch() -> None:
    code = "import sys, store.queries, store.schema; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
