"""Quantization primitives: group-wise affine int8 / int4 for cached keys and values, and torchao weight quantization.

Quantize and pack calls go to torchao (pinned in pyproject.toml); this module chooses the layout (groups along head_dim,
uint8 zero points, int4 packed two per byte), dequantizes into a caller's buffer (`dequantize_into`, held equal to
torchao's `dequantize_affine` by the tests) and measures bytes. It never holds state.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

KV_BITS = {"int8": 8, "int4": 4}
WEIGHT_QUANT = ("none", "int8", "int8_dynamic", "int4")
WEIGHT_INT4_GROUP = 32  # torchao's default group for int4 weights


_TORCHAO: tuple | None = None


def _torchao():
    """torchao's primitives, imported on first use (its import costs ~2 s and logs optional-kernel warnings), then
    kept: a compiled decode step that quantizes (the ring layout with kv_quant) traces this call, and dynamo breaks
    the graph at `warnings.catch_warnings` (KVQuantizer.load imports them before any step)."""
    global _TORCHAO
    if _TORCHAO is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.quantization as quantization
            import torchao.quantization.quant_primitives as primitives
            from torchao.prototype.mx_formats.kernels import pack_uint4, unpack_uint4
        _TORCHAO = quantization, primitives, pack_uint4, unpack_uint4
    return _TORCHAO


@dataclass(frozen=True)
class KVQuantizer:
    """Asymmetric affine quantization of the last dimension in groups of `group` elements (one scale and one zero
    point per group, as in KIVI's per-token value quantization and HF's QuantizedCache).

    Payload: uint8, one code per byte (int8) or two per byte (int4, low nibble first). Scales: float32 whatever the
    model's dtype (a bf16 scale is 0.4% off, which pushes int8's extreme codes a whole step out). Zero points: uint8
    (they lie in [0, 2**bits - 1]).
    """

    bits: int
    group: int

    @property
    def quant_max(self) -> int:
        return (1 << self.bits) - 1

    @staticmethod
    def load() -> None:
        """Import torchao's primitives now (outside any compiled region)."""
        _torchao()

    def payload_dim(self, head_dim: int) -> int:
        return head_dim * self.bits // 8

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., head_dim] -> (payload [..., payload_dim], scale [..., head_dim / group], zero [..., groups])."""
        _, primitives, pack_uint4, _ = _torchao()
        x = x.float()  # torchao picks bf16 / fp16 inputs' scales in their own precision: a step or more off at the ends
        block = (*([1] * (x.dim() - 1)), self.group)
        scale, zero = primitives.choose_qparams_affine(
            x, primitives.MappingType.ASYMMETRIC, block, torch.uint8, 0, self.quant_max,
            scale_dtype=torch.float32, zero_point_dtype=torch.int32,
        )
        scale, zero = scale.reshape(*x.shape[:-1], -1), zero.reshape(*x.shape[:-1], -1)
        codes = primitives.quantize_affine(x, block, scale, zero, torch.uint8, 0, self.quant_max)
        if self.bits == 4:
            codes = pack_uint4(codes)
        return codes, scale, zero.to(torch.uint8)

    def dequantize(self, payload: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
        """The values the codes stand for, in `dtype`: within half a step (scale / 2) of what was quantized."""
        _, primitives, _, unpack_uint4 = _torchao()
        codes = unpack_uint4(payload.contiguous()) if self.bits == 4 else payload
        block = (*([1] * (codes.dim() - 1)), self.group)
        return primitives.dequantize_affine(
            codes, block, scale, zero.to(torch.int32), torch.uint8, 0, self.quant_max, output_dtype=dtype
        )

    def dequantize_into(self, payload: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                        out: torch.Tensor) -> None:
        """`dequantize` written into `out` [..., n, head_dim] (a slice of the buffer attention reads), the same numbers:
        (code - zero) * scale, rounded once to out's dtype. Hand-written on purpose: torchao's `dequantize_affine`
        returns a new tensor through four temporaries, and the cache dequantizes every entry of every layer at every
        step (bench/quant_overhead.py); tests hold it equal to torchao's."""
        _, _, _, unpack_uint4 = _torchao()
        codes = unpack_uint4(payload.contiguous()) if self.bits == 4 else payload
        # The codes are converted first (exact: integers below 256 in any float dtype), then shifted and scaled per
        # group in place: an op mixing uint8 and float inputs runs unvectorized on CPU, twice as slow as all three.
        out.copy_(codes)
        grouped = out.unflatten(-1, (-1, self.group))
        grouped.sub_(zero.unsqueeze(-1).float())
        grouped.mul_(scale.unsqueeze(-1))


def kv_quantizer(kv_quant: str, group: int) -> KVQuantizer:
    return KVQuantizer(bits=KV_BITS[kv_quant], group=group)


# --- weights ----------------------------------------------------------------------------------------------------------
def weight_config(weight_quant: str) -> Any:
    """The torchao config of a `weight_quant` value. int4 uses IntxWeightOnlyConfig (runs on CPU and CUDA alike):
    torchao 0.18's Int4WeightOnlyConfig needs the mslk kernels (CUDA) for every packing format."""
    quantization, _, _, _ = _torchao()
    if weight_quant == "int8":
        return quantization.Int8WeightOnlyConfig()
    if weight_quant == "int8_dynamic":
        return quantization.Int8DynamicActivationInt8WeightConfig()
    if weight_quant == "int4":
        return quantization.IntxWeightOnlyConfig(
            weight_dtype=torch.int4, granularity=quantization.PerGroup(WEIGHT_INT4_GROUP)
        )
    raise ValueError(f"weight_quant = '{weight_quant}' is unknown (known: {', '.join(WEIGHT_QUANT)})")


def quantize_weights(model: torch.nn.Module, weight_quant: str) -> dict[str, str]:
    """Quantize the decoder's linear layers in place (not lm_head: it is tied to the embedding in most small models,
    and quantizing it would untie and duplicate it). Returns what ran: config, tensor class, its layout."""
    quantization, _, _, _ = _torchao()
    config = weight_config(weight_quant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantization.quantize_(model, config, filter_fn=_decoder_linear)
    weights = [m.weight for name, m in model.named_modules() if _decoder_linear(m, name)]
    if not weights:
        raise ValueError(f"weight_quant = {weight_quant}: the model has no linear layer to quantize")
    sample = weights[0]
    inner, attributes = sample.__tensor_flatten__() if hasattr(sample, "__tensor_flatten__") else ([], {})
    return {
        "weight_quant_config": type(config).__name__,
        "weight_quant_tensor": type(sample).__name__,
        "weight_quant_layout": ", ".join(f"{name}:{getattr(sample, name).dtype}" for name in inner)
        + "".join(f"; {k}={v}" for k, v in attributes.items() if k in ("block_size", "target_dtype", "act_quant_kwargs",
                                                                     "activation_quantization")),
    }


def _decoder_linear(module: torch.nn.Module, name: str) -> bool:
    return isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")


def tensor_nbytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; for torchao's tensor subclasses, the sum over their inner tensors (data, scales, ...)."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_nbytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def model_nbytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer, each shared tensor counted once (tied embeddings)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor_nbytes(tensor)
    return total
