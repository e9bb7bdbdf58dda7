"""QuantMoE: the MoE layer with integer expert weights (inference only).

Only the experts change: the router stays float32 and routing, replay and record behave exactly
as in :class:`moe_replay.MoE`. Formats are described in :mod:`moe_replay.quantize`.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_replay.backends.base import Backend, write_into
from moe_replay.layers.moe import MoE, MoELayer
from moe_replay.parallel.collectives import all_gather_ints, collective_device
from moe_replay.parallel.state import keep_local_experts
from moe_replay.quantize import FP8_BLOCK, WEIGHT_DTYPES, QuantizedWeight, quantize_weight
from moe_replay.routing.route import Routing
from moe_replay.types import ExpertBuckets, InputGradsHook, RowSink


class QuantExperts(nn.Module):
    """Quantized ``gate_up`` and ``down`` weights of E experts, kept as buffers.

    Under expert parallelism, this rank's experts: global ids ``first_expert:first_expert + E`` of
    ``num_global_experts`` (as :class:`moe_replay.layers.moe.Experts`).
    """

    gate_up_qweight: torch.Tensor
    gate_up_scale: torch.Tensor
    down_qweight: torch.Tensor
    down_scale: torch.Tensor

    def __init__(
        self,
        gate_up: QuantizedWeight,
        down: QuantizedWeight,
        *,
        first_expert: int = 0,
        num_global_experts: int | None = None,
    ) -> None:
        super().__init__()
        self.weight_dtype = gate_up.weight_dtype
        self.gate_up_group_size = gate_up.group_size
        self.down_group_size = down.group_size
        self.register_buffer("gate_up_qweight", gate_up.qweight)
        self.register_buffer("gate_up_scale", gate_up.scale)
        self.register_buffer("down_qweight", down.qweight)
        self.register_buffer("down_scale", down.scale)
        self.first_expert = first_expert
        self.num_global_experts = self.num_experts if num_global_experts is None else num_global_experts
        self.register_load_state_dict_pre_hook(keep_local_experts)

    @property
    def num_experts(self) -> int:
        return self.gate_up_scale.shape[0]

    def weights(self) -> tuple[QuantizedWeight, QuantizedWeight]:
        return (
            QuantizedWeight(
                self.gate_up_qweight, self.gate_up_scale, self.weight_dtype, self.gate_up_group_size
            ),
            QuantizedWeight(self.down_qweight, self.down_scale, self.weight_dtype, self.down_group_size),
        )

    def forward(self, x_MH: torch.Tensor, buckets: ExpertBuckets, backend: Backend) -> torch.Tensor:
        """The routed rows ``y_NH`` in bucket order."""
        return backend.quant_expert_mlp(x_MH, buckets, *self.weights())

    def forward_combined(
        self,
        x_MH: torch.Tensor,
        buckets: ExpertBuckets,
        weights_MR: torch.Tensor,
        backend: Backend,
        out_dtype: torch.dtype,
        on_input_grads: InputGradsHook | None = None,
        out_MH: torch.Tensor | RowSink | None = None,
    ) -> torch.Tensor:
        """The rows combined per token, ``y_MH`` (inference only: ``on_input_grads`` is never
        called, as there is no backward; ``out_MH``: see ``Backend.expert_mlp_combine``)."""
        y_MH = backend.combine(self(x_MH, buckets, backend), buckets, weights_MR, out_dtype)
        return write_into(y_MH, out_MH)

    def extra_repr(self) -> str:
        return (
            f"weight_dtype={self.weight_dtype}, gate_up_group_size={self.gate_up_group_size}, "
            f"down_group_size={self.down_group_size}"
        )


def _check_finite(moe: MoE) -> None:
    """``ValueError`` naming the expert weight with NaN or inf values, on every rank of an
    expert-parallel ``moe`` (whose ranks then agree before any of them enters a collective)."""
    names = ("gate_up_proj", "down_proj")
    bad = {}
    for name in names:
        finite_E = torch.isfinite(getattr(moe.experts, name).detach()).flatten(1).all(dim=1)
        bad[name] = torch.nonzero(~finite_E).flatten().tolist()
    ranks = {name: [0] if bad[name] else [] for name in names}
    if moe.ep is not None:
        group = moe.ep.group
        flags_W2 = all_gather_ints([int(bool(bad[n])) for n in names], group, collective_device(group))
        ranks = {name: [r for r, flags in enumerate(flags_W2) if flags[i]] for i, name in enumerate(names)}
    for name in names:
        if ranks[name]:
            where = f" in local experts {bad[name]}" if bad[name] else ""
            on = f" on ranks {ranks[name]} of ep_group" if moe.ep is not None else ""
            raise ValueError(
                f"moe.experts.{name} has non-finite values (NaN or inf){where}{on}; such weights "
                "have no integer scale"
            )


class QuantMoE(MoELayer):
    """An MoE layer with int8, int4 or fp8 experts; build it with :meth:`from_float`.

    Activations are quantized before each expert GEMM, per token to int8 (fp8 experts: per 128
    inputs of each token to e4m3); products are accumulated exactly, then scaled. Inference
    only: calling it with gradients requested (an input that requires grad, or a router weight
    set to require grad) raises ``ValueError``.
    """

    experts: QuantExperts

    def __init__(self, moe: MoE, weight_dtype: str, group_size: int | None) -> None:
        cfg = moe.cfg
        ep_group, ep = (None, None) if moe.ep is None else (moe.ep.group, moe.ep.config)
        super().__init__(cfg, moe.backend, moe.router.weight.device, ep_group, ep)
        self.router.load_state_dict(moe.router.state_dict())
        self.router.weight.requires_grad_(False)
        gate_up = quantize_weight(moe.experts.gate_up_proj, weight_dtype, group_size)
        down = quantize_weight(moe.experts.down_proj, weight_dtype, group_size)
        first, _ = self.local_experts
        self.experts = QuantExperts(gate_up, down, first_expert=first, num_global_experts=cfg.num_experts)

    @classmethod
    def from_float(cls, moe: MoE, weight_dtype: str = "int8", group_size: int | None = None) -> QuantMoE:
        """Quantize ``moe``'s experts: ``"int8"`` per output channel (``group_size`` must be None),
        or ``"int4"`` with one scale per ``group_size`` inputs (required; must divide both the
        hidden and the intermediate size, and be even), or ``"fp8"`` (e4m3) with one scale per
        128 x 128 block (``group_size`` must be None; both sizes multiples of 128). Weights must
        be finite (``ValueError`` naming the tensor otherwise; under expert parallelism every rank
        raises, naming the ranks holding such experts).

        An expert-parallel ``moe`` gives an expert-parallel layer over the same group and mode,
        holding the same experts (a collective: every rank of the group calls it together)."""
        if not isinstance(moe, MoE):
            raise TypeError(f"moe must be a moe_replay.MoE, got {type(moe).__name__}")
        if weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype!r}")
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)):
            raise TypeError(f"group_size must be an int or None, got {type(group_size).__name__}")
        if weight_dtype == "int8" and group_size is not None:
            raise ValueError(
                f"int8 weights use one scale per output channel; group_size must be None, got {group_size}"
            )
        if weight_dtype == "fp8":
            if group_size is not None:
                raise ValueError(
                    f"fp8 weights use 128 x 128 blocks; group_size must be None, got {group_size}"
                )
            for name in ("hidden_size", "intermediate_size"):
                dim = getattr(moe.cfg, name)
                if dim % FP8_BLOCK:
                    raise ValueError(f"fp8 weights need {name} to be a multiple of {FP8_BLOCK}, got {dim}")
        if weight_dtype == "int4":
            if group_size is None:
                raise ValueError("int4 weights need group_size (inputs per scale), got None")
            dims = {"hidden_size": moe.cfg.hidden_size, "intermediate_size": moe.cfg.intermediate_size}
            if group_size <= 0 or group_size % 2:
                raise ValueError(f"group_size must be a positive even number for int4, got {group_size}")
            for name, dim in dims.items():
                if dim % group_size:
                    raise ValueError(f"group_size={group_size} must divide {name}={dim}")
        _check_finite(moe)
        return cls(moe, weight_dtype, group_size)

    def forward(
        self,
        x: torch.Tensor,
        forced_expert_ids: torch.Tensor | None = None,
        return_routing: bool = False,
        *,
        validate: bool | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Routing]:
        if torch.is_grad_enabled() and (
            (isinstance(x, torch.Tensor) and x.requires_grad) or self.router.weight.requires_grad
        ):
            raise ValueError(
                "QuantMoE is inference-only and has no gradients: got "
                + (
                    "x with requires_grad=True"
                    if x.requires_grad
                    else "router.weight with requires_grad=True"
                )
                + "; run it under torch.no_grad() or use moe_replay.MoE for training"
            )
        return super().forward(x, forced_expert_ids, return_routing, validate=validate)
