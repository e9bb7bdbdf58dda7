"""Integer formats of the quantized experts, and their (de)quantization.

Shape legend: E experts, O output features, D input features, G = D / group_size groups.

Weights are symmetric, with float32 scales:

* ``int8``: ``q = round(w / s)`` in [-127, 127], one scale per output channel (G = 1).
* ``int4``: ``q = round(w / s)`` in [-7, 7], one scale per ``group_size`` inputs of each output
  channel, packed two per byte along the input: byte ``d // 2`` holds input ``d`` (even) in its low
  nibble and ``d + 1`` in its high nibble, as two's-complement nibbles.

Activations are quantized per row (per token) to int8 right before each GEMM, symmetric with one
float32 scale per row. A row (or weight group) of zeros gets scale 1, which represents it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WEIGHT_DTYPES = ("int8", "int4")
_QMAX = {"int8": 127, "int4": 7}


@dataclass(frozen=True)
class QuantizedWeight:
    """``E`` quantized matrices of logical shape ``[O, D]``."""

    qweight: torch.Tensor
    """int8 ``[E, O, D]``, or uint8 ``[E, O, D // 2]`` for int4 (two per byte)."""
    scale: torch.Tensor
    """float32 ``[E, O, G]``."""
    weight_dtype: str
    """"int8" or "int4"."""
    group_size: int
    """Inputs sharing one scale (D for int8's per-channel scales)."""

    @property
    def in_features(self) -> int:
        return self.scale.shape[2] * self.group_size

    @property
    def out_features(self) -> int:
        return self.scale.shape[1]

    def int_weight(self, expert: int) -> torch.Tensor:
        """Expert ``expert``'s integer weight ``[O, D]`` as int8 (int4 unpacked)."""
        q = self.qweight[expert]
        return unpack_int4(q) if self.weight_dtype == "int4" else q

    def dequantize(self) -> torch.Tensor:
        """Float32 ``[E, O, D]``: ``q * s`` (for inspection and error measurement)."""
        E, O, G = self.scale.shape
        q = torch.stack([self.int_weight(e) for e in range(E)]) if E else self.qweight.new_zeros(0, O, 0)
        return (q.float().view(E, O, G, self.group_size) * self.scale.unsqueeze(-1)).view(E, O, -1)


def _scale(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def quantize_weight(w_EOD: torch.Tensor, weight_dtype: str, group_size: int | None) -> QuantizedWeight:
    """Quantize ``w_EOD`` (any float dtype) to ``weight_dtype``; see the module docstring."""
    E, O, D = w_EOD.shape
    if weight_dtype == "int8":
        group_size = D
    elif D % 2:
        raise ValueError(f"int4 packs two inputs per byte; the input size must be even, got {D}")
    assert group_size is not None and D % group_size == 0
    qmax = _QMAX[weight_dtype]
    w = w_EOD.detach().float().view(E, O, D // group_size, group_size)
    scale_EOG = _scale(w.abs().amax(dim=-1), qmax)
    q = torch.round(w / scale_EOG.unsqueeze(-1)).clamp(-qmax, qmax).to(torch.int8).view(E, O, D)
    qweight = pack_int4(q) if weight_dtype == "int4" else q
    return QuantizedWeight(qweight=qweight, scale=scale_EOG, weight_dtype=weight_dtype, group_size=group_size)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], ``[..., D]`` -> uint8 ``[..., D // 2]`` (low nibble = even index)."""
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., D // 2]`` -> int8 ``[..., D]``, undoing :func:`pack_int4`."""
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).to(torch.int16)
    signed = (nibbles ^ 8) - 8  # sign-extend a two's-complement nibble
    return signed.to(torch.int8).flatten(-2)


def quantize_rows(x_nD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: ``(q_nD int8, scale_n float32)`` with ``x ≈ q * scale[:, None]``."""
    x = x_nD.float()
    scale_n = _scale(x.abs().amax(dim=1) if x.shape[1] else x.new_zeros(x.shape[0]), 127)
    q = torch.round(x / scale_n.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return q, scale_n
