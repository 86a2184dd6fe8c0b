"""`python -m streaming_llm eval ...`: run one configuration, write its per-step rows, print its summary as JSON."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

import pyarrow.parquet as pq

from .config import ConfigError, RunConfig


def _flag_type(annotation):
    """argparse type for a RunConfig field: int, float, str, or int-or-none."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args else annotation
    return base if base in (int, float) else str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m streaming_llm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("eval", help="evaluate one configuration")
    for name, field in RunConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
        run.add_argument(flag, dest=name, type=_flag_type(field.annotation), choices=choices, default=None,
                         help=f"default: {field.default}")
    run.add_argument("--out", type=Path, help="write one row per step to this Parquet file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    out = args.pop("out")
    args.pop("command")
    knobs = {name: value for name, value in args.items() if value is not None}
    if "text_file" in knobs and "dataset" not in knobs:
        knobs["dataset"] = "file"
    try:
        config = RunConfig.from_dict(knobs, where="flags")
    except ConfigError as exc:
        return _refuse(exc)
    from .evaluate import evaluate  # after validation: importing torch and transformers takes seconds
    from .models import ModelLoadError
    from .rope import UnsupportedModelError
    from .text import TextError

    try:
        result = evaluate(config)
    except (ConfigError, TextError, UnsupportedModelError, ModelLoadError, OSError) as exc:
        return _refuse(exc)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(result.tokens, out)
    print(json.dumps({"config": config.normalised(), **result.summary}, indent=2))
    return 0


def _refuse(exc: Exception) -> int:
    """An input the run cannot take: one line on stderr (transformers' and the OS's messages span lines), exit 2."""
    print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
