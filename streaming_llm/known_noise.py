"""Drops the known-harmless start-up messages of the libraries underneath, so that what a run prints is about the run.

Importing this module installs one logging filter per entry of KNOWN_HARMLESS, on that library's own logger and for
that message alone: anything else those loggers say still prints (`drop_messages` does the same for callers' own
entries). It never touches the root logger, handlers or the warnings module.
"""

from __future__ import annotations

import logging
import re

# (logger, message pattern): each one printed on every run, before anything else, and each one harmless here.
KNOWN_HARMLESS = (
    # torchao 0.18 tries its optional prebuilt kernels (_C_mxfp8: a CPython 3.10 build; _C_cutlass_90a: CUDA sm90a)
    # at import and logs each one that cannot load. Nothing here calls them: streaming_llm/quant.py uses torchao's
    # Python ops. transformers imports torchao whenever it is installed (its quantizer registry, on first model load),
    # so every run printed "Failed to load ...", which a user reads as an error.
    ("torchao", re.compile(r"^Failed to load \S*torchao/_C\S*\.so: ")),
    # torchao 0.18 registers its Enum options as pytree constants, which torch 2.13 deprecates in favour of native Enum
    # support in torch.compile: a note to torchao's authors, and nothing in this project compiles.
    ("torch.utils._pytree", re.compile(r"is an Enum subclass and is now natively supported by torch\.compile")),
)


class _DropKnownHarmless(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def drop_messages(logger_name: str, pattern: re.Pattern[str]) -> None:
    """Drop what `logger_name` itself logs whose message matches `pattern` (installed once however often called)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(each, _DropKnownHarmless) and each.pattern is pattern for each in logger.filters):
        logger.addFilter(_DropKnownHarmless(pattern))


for _logger_name, _pattern in KNOWN_HARMLESS:
    drop_messages(_logger_name, _pattern)
