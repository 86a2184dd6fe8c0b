"""Rotary position geometry of a model, and the rotations the cache applies to keys it has already stored.

Rotation math runs in float32 on the rotary dimensions only (partial rotary models leave the rest untouched), with
the `rotate_half` layout that HF's Llama and GPT-NeoX implementations use. Never guesses: an architecture whose keys
are positioned differently is refused by `RotaryGeometry.of`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

# Architectures whose attention applies `apply_rotary_pos_emb` with rotate_half before the cache update, with one
# static frequency table for all positions. Others are refused rather than silently mis-positioned.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt_neox")
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # not longrope/dynamic: they switch tables by length


class UnsupportedModelError(ValueError):
    """The model's positions cannot be re-aligned correctly by this package."""


@dataclass(frozen=True)
class RotaryGeometry:
    """What is needed to rotate a stored key: inverse frequencies, how many dims rotate, the cos/sin scaling."""

    inv_freq: torch.Tensor  # float32, shape [rotary_dim // 2]
    attention_scaling: float = 1.0

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    @classmethod
    def of(cls, model: torch.nn.Module) -> RotaryGeometry:
        """Read the geometry of a loaded HF causal LM, or raise UnsupportedModelError naming what is wrong."""
        config = model.config
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type '{model_type}' is not supported for streaming (supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}): its key positions could not be re-aligned safely"
            )
        layer_types = getattr(config, "layer_types", None) or []
        if any(kind != "full_attention" for kind in layer_types):
            raise UnsupportedModelError(
                f"model '{getattr(config, 'name_or_path', model_type)}' has non-full attention layers "
                f"{set(layer_types)}: streaming supports models whose every layer attends the whole cache"
            )
        if getattr(config, "sliding_window", None) is not None:
            raise UnsupportedModelError(
                f"model '{getattr(config, 'name_or_path', model_type)}' masks attention to a sliding window of "
                f"{config.sliding_window} slots, which would hide the sinks: streaming needs full attention"
            )
        rotary = getattr(model.base_model, "rotary_emb", None)
        if rotary is None or not hasattr(rotary, "inv_freq"):
            raise UnsupportedModelError(f"model_type '{model_type}' has no rotary_emb.inv_freq on its base model")
        rope_type = getattr(rotary, "rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_type '{rope_type}' changes frequencies with the sequence length; supported: "
                f"{', '.join(STATIC_ROPE_TYPES)}"
            )
        inv_freq = rotary.inv_freq.detach().to(device="cpu", dtype=torch.float32).clone()
        return cls(inv_freq=inv_freq, attention_scaling=float(getattr(rotary, "attention_scaling", 1.0)))

    def cos_sin(self, positions: torch.Tensor, device: torch.device,
                precise: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape [len(positions), rotary_dim], float32, laid out as HF's `cat((freqs, freqs))`.

        By default the angles are computed as HF computes them (float32 products), so that rotating by the model's own
        table undoes its rotation exactly. `precise` computes them in float64: at position p a float32 angle is off by
        up to p * inv_freq * 6e-8 rad (1e-3 rad at p = 20,000), an error that grows with the stream.
        """
        dtype = torch.float64 if precise else torch.float32
        freqs = positions.to(device=device, dtype=dtype)[:, None] * self.inv_freq.to(device=device, dtype=dtype)[None]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().float(), angles.sin().float()

    def rotation_matrix(self, shift: int, head_dim: int, device: torch.device) -> torch.Tensor:
        """[head_dim, head_dim] float32 matrix M with `keys @ M` = keys rotated by `shift` positions.

        Rotary dims get the rotate_half rotation (x1 cos - x2 sin, x2 cos + x1 sin); the others pass through.
        """
        half = self.rotary_dim // 2
        angles = shift * self.inv_freq.to(device)
        cos, sin = angles.cos(), angles.sin()
        matrix = torch.eye(head_dim, dtype=torch.float32, device=device)
        first, second = torch.arange(half, device=device), torch.arange(half, 2 * half, device=device)
        matrix[first, first] = cos
        matrix[second, second] = cos
        matrix[second, first] = -sin
        matrix[first, second] = sin
        return matrix


def rotate_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Rotate keys [..., T, head_dim] by per-slot angles (cos/sin [T, rotary_dim]) and multiply them by `scale`.

    Returns a new tensor in the keys' dtype; dims past rotary_dim pass through (multiplied by `scale` as well only
    where the model scales them, which it does not, so they are copied unchanged). cos/sin must be laid out as
    `RotaryGeometry.cos_sin` gives them (HF's cat((freqs, freqs))): only their first half is read.
    """
    rotary_dim = cos.shape[-1]
    half = rotary_dim // 2
    x = keys[..., :rotary_dim].float()
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[..., :half], sin[..., :half]  # both halves hold the same angles (HF's cat((freqs, freqs)))
    # out= refuses autograd (a model in training) and breaks a torch.compile graph: there, the plain formula (the
    # compiler fuses its temporaries away).
    if (torch.is_grad_enabled() and x.requires_grad) or torch.compiler.is_compiling():
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        # x * cos + rotate_half(x) * sin, written half by half into one buffer: every step of an exact-mode or
        # quantized cache rotates all its keys, so the temporaries of the plain formula cost more than the arithmetic.
        rotated = torch.empty_like(x)
        first, second = rotated[..., :half], rotated[..., half:]
        torch.mul(x1, cos, out=first).addcmul_(x2, sin, value=-1)
        torch.mul(x2, cos, out=second).addcmul_(x1, sin)
    if scale != 1.0:
        rotated.mul_(scale)
    if rotary_dim == keys.shape[-1]:
        return rotated.to(keys.dtype)
    return torch.cat((rotated.to(keys.dtype), keys[..., rotary_dim:]), dim=-1)


@contextmanager
def precise_rotary(model: torch.nn.Module, geometry: RotaryGeometry) -> Iterator[None]:
    """While active, the model's rotary table (cos, sin of every position id of a forward) is computed from float64
    angles (`RotaryGeometry.cos_sin(precise=True)`) instead of float32 ones, so that queries and keys at stream
    positions of any size are rotated as accurately as at small ones. Equal to HF's table within float32 rounding
    where HF's is accurate (tests/test_streaming_quant.py)."""
    rotary = model.base_model.rotary_emb

    def precise_table(module, args, kwargs, output):
        x = args[0] if args else kwargs["x"]
        position_ids = args[1] if len(args) > 1 else kwargs["position_ids"]
        cos, sin = geometry.cos_sin(position_ids.reshape(-1), x.device, precise=True)
        shape = (*position_ids.shape, cos.shape[-1])
        scale = geometry.attention_scaling
        return (cos * scale).to(x.dtype).reshape(shape), (sin * scale).to(x.dtype).reshape(shape)

    handle = rotary.register_forward_hook(precise_table, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
