"""Checks that need the machine, not only the grid file: every text file, GPU, model and dataset a run would load.

`python -m gridrun` calls `check_runnable` before Ray starts and before the store is opened for writing, so a run that
could only fail is refused in seconds. It reads (files, the local hub cache), never downloads or writes.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from streaming_llm import RunConfig

from .spec import GridError, PlannedRun

HUB_TIMEOUT_S = 3.0  # connecting to the hub; an unreachable one answers within this


def check_runnable(runs: list[PlannedRun] | tuple[PlannedRun, ...], grid_path: Path, *, local: bool) -> None:
    """Raise GridError for the first run whose text file, device, model or dataset cannot be found here.

    `local`: the runs execute on this machine (no --address), so its GPUs are the ones that count.
    """
    checked: set[tuple[str, str | None]] = set()
    for run in runs:
        config = run.config
        where = f"{grid_path}: experiment '{run.experiments[0]}'"
        for key, problem in _problems(config, local, checked):
            raise GridError(f"{where}: {key}: {problem}")


def _problems(config: RunConfig, local: bool, checked: set[tuple[str, str | None]]):
    if config.text_file is not None and ("text_file", config.text_file) not in checked:
        checked.add(("text_file", config.text_file))
        path = Path(config.text_file)
        if not path.is_file():
            yield "text_file", (f"{config.text_file!r} is not a file (relative paths are read from {Path.cwd()}): "
                                "fix the path")
        elif not os.access(path, os.R_OK):
            yield "text_file", f"{config.text_file!r} cannot be read (permissions): fix its permissions"
        else:
            problem = _text_problem(path, config.text_file)
            if problem:
                yield "text_file", problem
    if local and config.device == "cuda" and not _has_cuda():
        yield "device", ("cuda, but this machine has no CUDA GPU (torch.cuda.is_available() is false): use device: "
                         "auto or cpu, or join a GPU cluster with --address")
    if ("model", config.model) not in checked:
        checked.add(("model", config.model))
        problem = _model_problem(config.model)
        if problem:
            yield "model", problem
    knobs = ("kv_quant_group", f"{config.model}|{config.kv_quant}|{config.kv_quant_group}")
    if config.kv_quant != "none" and knobs not in checked:
        checked.add(knobs)
        problem = _architecture_problem(config)
        if problem:
            yield "kv_quant_group", problem
    if config.dataset in ("pg19", "wikitext") and ("dataset", config.dataset_source) not in checked:
        checked.add(("dataset", config.dataset_source))
        problem = _dataset_problem(config.dataset, config.dataset_source)
        if problem:
            yield "dataset_source", problem
    if config.dataset == "shakespeare" and ("dataset", "shakespeare") not in checked:
        checked.add(("dataset", "shakespeare"))
        from streaming_llm.text import TextError, shakespeare_plays

        try:
            shakespeare_plays()
        except TextError as exc:
            yield "dataset", f"shakespeare: {exc}"


def _text_problem(path: Path, name: str) -> str | None:
    """Whether the file's first block reads as UTF-8 text (a binary file fails there; the run reads it the same way,
    streaming_llm.text, as far as its tokens need)."""
    from streaming_llm.text import TextError, read_text_blocks

    blocks = read_text_blocks(path, name)
    try:
        next(blocks, None)
    except TextError as exc:
        return str(exc).removeprefix(f"text_file '{name}': ")
    except OSError as exc:
        return f"{name!r} cannot be read ({exc.strerror}): fix the path or its permissions"
    finally:
        blocks.close()
    return None


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _model_problem(name: str) -> str | None:
    from streaming_llm.models import EMBEDDED_MODEL, RANDOM_MODELS, ModelLoadError, _packaged_gguf

    if name in RANDOM_MODELS:
        return None
    if name == EMBEDDED_MODEL:
        try:
            _packaged_gguf()
        except ModelLoadError as exc:
            return str(exc)
        return None
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            return f"{name!r} is a folder without config.json: pass a saved transformers model folder"
        from streaming_llm.models import check_model_folder

        try:
            check_model_folder(name)
        except ModelLoadError as exc:
            return str(exc)
        return None
    if name.startswith((".", "/", "~")) or local.exists() or name.count("/") > 1:
        return f"{name!r} is not a model folder (nor a hub id like org/name): fix the path"
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except Exception as exc:  # an id the hub library refuses (bad characters)
        return f"{name!r} is not a valid hub id ({exc}): pass org/name or a local folder"
    if isinstance(cached, str):
        return None
    if constants.HF_HUB_OFFLINE:
        return (f"{name!r} is not in the local hub cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set: "
                "download it where the hub is reachable, or pass a local folder or a built-in model")
    if not _hub_reachable(constants.ENDPOINT):
        return (f"{name!r} is neither a built-in model, a local folder, nor in the local hub cache "
                f"({constants.HF_HUB_CACHE}), and the hub ({constants.ENDPOINT}) is unreachable: download it "
                "where the hub is reachable, or pass a local folder or a built-in model")
    return None


@functools.cache
def _architecture(name: str):
    from streaming_llm.models import model_config

    return model_config(name, local_files_only=True)  # never a download from here: the worker checks it again


def _architecture_problem(config: RunConfig) -> str | None:
    """What the model's architecture (its config, not its weights) refuses of `config`. A model that cannot be found
    is _model_problem's to report; a config that is not local or cannot be read here, the worker's."""
    from streaming_llm import ConfigError
    from streaming_llm.evaluate import check_model_knobs

    if _model_problem(config.model):
        return None
    try:
        check_model_knobs(config, _architecture(config.model))
    except ConfigError as exc:
        return str(exc)
    except Exception:  # not in the local cache, or a config this check cannot read
        return None
    return None


def _dataset_problem(dataset: str, source: str | None) -> str | None:
    from streaming_llm.text import HUB_SOURCES

    path = source or HUB_SOURCES[dataset][0]
    local = Path(path).expanduser()
    if local.is_dir():
        if not any(f.suffix in (".parquet", ".txt", ".jsonl", ".json") for f in local.rglob("*")):
            return f"{path!r} holds no .parquet/.txt/.jsonl/.json files: pass a folder of the dataset's files"
        return None
    if path.startswith((".", "/", "~")) or local.exists():
        return f"{path!r} is not a folder: pass a folder of parquet / text files or a hub dataset id"
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or not _hub_reachable(constants.ENDPOINT):
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"the hub ({constants.ENDPOINT}) is unreachable"
        return (f"{dataset} reads {path!r} from the hub, and {why}: pass dataset_source: a local folder of its parquet "
                "files")
    return None


@functools.cache
def _hub_reachable(endpoint: str) -> bool:
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=HUB_TIMEOUT_S):
            return True
    except OSError:
        return False
