"""Formats of the quantized experts, and their (de)quantization.

Shape legend: E experts, O output features, D input features, G = D / group_size groups.

Weights are symmetric, with float32 scales:

* ``int8``: ``q = round(w / s)`` in [-127, 127], one scale per output channel (G = 1).
* ``int4``: ``q = round(w / s)`` in [-7, 7], one scale per ``group_size`` inputs of each output
  channel, packed two per byte along the input: byte ``d // 2`` holds input ``d`` (even) in its low
  nibble and ``d + 1`` in its high nibble, as two's-complement nibbles.
* ``fp8``: ``q = float8_e4m3fn(w / s)`` (round to nearest even, |q| <= 448), one scale per block
  of 128 x 128 (outputs x inputs): scales ``[E, O / 128, D / 128]``, the DeepSeek-V3 layout.

Activations are quantized right before each GEMM, symmetric with float32 scales: for int weights
per row (per token) to int8, for fp8 weights per 128 inputs of each row to e4m3 (``[n, D / 128]``
scales). A row, group or block of zeros gets scale 1, which represents it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WEIGHT_DTYPES = ("int8", "int4", "fp8")
_QMAX = {"int8": 127, "int4": 7, "fp8": 448}
FP8_BLOCK = 128
"""Outputs and inputs per fp8 weight scale, inputs per fp8 activation scale."""


@dataclass(frozen=True)
class QuantizedWeight:
    """``E`` quantized matrices of logical shape ``[O, D]``."""

    qweight: torch.Tensor
    """int8 ``[E, O, D]``, uint8 ``[E, O, D // 2]`` for int4 (two per byte), float8_e4m3fn
    ``[E, O, D]`` for fp8."""
    scale: torch.Tensor
    """float32 ``[E, O / scale_rows, G]``."""
    weight_dtype: str
    """"int8", "int4" or "fp8"."""
    group_size: int
    """Inputs sharing one scale (D for int8's per-channel scales, 128 for fp8)."""

    @property
    def scale_rows(self) -> int:
        """Outputs sharing one scale: 128 for fp8's blocks, else 1."""
        return FP8_BLOCK if self.weight_dtype == "fp8" else 1

    @property
    def in_features(self) -> int:
        return self.scale.shape[2] * self.group_size

    @property
    def out_features(self) -> int:
        return self.scale.shape[1] * self.scale_rows

    def int_weight(self, expert: int) -> torch.Tensor:
        """Expert ``expert``'s quantized weight ``[O, D]``: int8 (int4 unpacked), or fp8."""
        q = self.qweight[expert]
        return unpack_int4(q) if self.weight_dtype == "int4" else q

    def row_scales(self, expert: int) -> torch.Tensor:
        """Expert ``expert``'s scales per output, float32 ``[O, G]`` (fp8's blocks repeated)."""
        return self.scale[expert].repeat_interleave(self.scale_rows, dim=0)

    def dequantize(self) -> torch.Tensor:
        """Float32 ``[E, O, D]``: ``q * s`` (for inspection and error measurement)."""
        E, O, G = self.scale.shape[0], self.out_features, self.scale.shape[2]
        if not E:
            return torch.zeros(0, O, self.in_features, device=self.scale.device)
        q = torch.stack([self.int_weight(e) for e in range(E)]).float().view(E, O, G, self.group_size)
        scale = torch.stack([self.row_scales(e) for e in range(E)])
        return (q * scale.unsqueeze(-1)).view(E, O, -1)


def _scale(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def quantize_weight(w_EOD: torch.Tensor, weight_dtype: str, group_size: int | None) -> QuantizedWeight:
    """Quantize ``w_EOD`` (any float dtype) to ``weight_dtype``; see the module docstring."""
    E, O, D = w_EOD.shape
    if weight_dtype == "fp8":
        return _quantize_fp8(w_EOD)
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


def _quantize_fp8(w_EOD: torch.Tensor) -> QuantizedWeight:
    E, O, D = w_EOD.shape
    B = FP8_BLOCK
    if O % B or D % B:
        raise ValueError(
            f"fp8 weights take {B} x {B} blocks; both sizes must be multiples of {B}, got {O} x {D}"
        )
    w = w_EOD.detach().float().view(E, O // B, B, D // B, B)
    scale = _scale(w.abs().amax(dim=(2, 4)), _QMAX["fp8"])  # [E, O / B, D / B]
    q = (w / scale[:, :, None, :, None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(E, O, D)
    return QuantizedWeight(qweight=q, scale=scale, weight_dtype="fp8", group_size=B)


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


def quantize_row_groups(x_nD: torch.Tensor, group: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per ``group`` inputs of each row, symmetric e4m3: ``(q_nD float8_e4m3fn, scale_nG float32)``
    with ``x ≈ q * scale`` per group (``group`` must divide D)."""
    n, D = x_nD.shape
    x = x_nD.float().view(n, D // group, group)
    scale_nG = _scale(x.abs().amax(dim=2), _QMAX["fp8"])
    q = (x / scale_nG.unsqueeze(2)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.view(n, D), scale_nG
