"""The MoE layer: router -> route (replayable) -> dispatch -> experts -> combine.

Shape legend: T tokens (all leading dims of x flattened), H hidden, I expert intermediate,
E experts, K experts per token.

Precision notes:
* The router is float32 (weight and logits), whatever the experts' dtype: routing decisions
  are what this library exists to make reproducible, and bf16 logits tie far more often.
* Gate weights are float32. Experts accumulate in float32; the layer returns x's dtype.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moe_replay import ops
from moe_replay.backends.base import Backend
from moe_replay.backends.registry import get_backend, registered_backends
from moe_replay.backends.torch.route import gate_weights
from moe_replay.config import MoEConfig
from moe_replay.parallel.config import EPConfig
from moe_replay.parallel.expert_parallel import DEFAULT_EP_MODE, ep_config_of, setup_expert_parallel
from moe_replay.parallel.local import local_dispatch
from moe_replay.parallel.state import full_state_dict, keep_local_experts
from moe_replay.routing.route import Routing, route
from moe_replay.routing.sites import mark_site, route_at_site, site_of
from moe_replay.types import ExpertBuckets, ExpertsModule, InputGradsHook, RowSink

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class Router(nn.Module):
    """Float32 linear router ``logits_TE = x_TH @ weight.T``, with the optional selection bias."""

    def __init__(self, cfg: MoEConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size, device=device))
        self.bias: torch.Tensor | None
        if cfg.score_bias:
            # A buffer, not a parameter: it is adjusted by load-balancing rules, not by gradients.
            self.register_buffer("bias", torch.zeros(cfg.num_experts, device=device))
        else:
            self.bias = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.weight.shape[1]))

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        return F.linear(x_TH.float(), self.weight.float())


class Experts(nn.Module):
    """E SwiGLU experts stored as two 3-D tensors (the Hugging Face transformers 5 layout).

    ``gate_up_proj [E, 2I, H]``: rows ``0..I-1`` are the gate projection, ``I..2I-1`` the up
    projection. ``down_proj [E, H, I]``. Expert e computes ``down_e(silu(gate_e x) * up_e x)``.

    Under expert parallelism the module holds this rank's ``E = num_experts`` experts, global ids
    ``first_expert:first_expert + E`` of ``num_global_experts``; ``load_state_dict`` then also
    accepts the full layer's tensors and keeps this rank's rows (``parallel.state``).
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        first_expert: int = 0,
        num_global_experts: int | None = None,
    ) -> None:
        super().__init__()
        shape_gate_up = (num_experts, 2 * intermediate_size, hidden_size)
        self.gate_up_proj = nn.Parameter(torch.empty(shape_gate_up, device=device, dtype=dtype))
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size, device=device, dtype=dtype)
        )
        self.first_expert = first_expert
        self.num_global_experts = num_experts if num_global_experts is None else num_global_experts
        self.register_load_state_dict_pre_hook(keep_local_experts)
        self.reset_parameters()

    @property
    def num_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate_up_proj, std=1.0 / math.sqrt(self.gate_up_proj.shape[2]))
        nn.init.normal_(self.down_proj, std=1.0 / math.sqrt(self.down_proj.shape[2]))

    def forward(self, x_MH: torch.Tensor, buckets: ExpertBuckets, backend: Backend) -> torch.Tensor:
        """The routed rows ``y_NH`` in bucket order."""
        return backend.expert_mlp(x_MH, buckets, self.gate_up_proj, self.down_proj)

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
        """The rows combined per token, ``y_MH``, through the backend's fused path
        (``on_input_grads``, ``out_MH``: see ``Backend.expert_mlp_combine``)."""
        return backend.expert_mlp_combine(
            x_MH, buckets, self.gate_up_proj, self.down_proj, weights_MR, out_dtype, on_input_grads, out_MH
        )


def _check_backend_name(backend: str | None) -> None:
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    if backend is not None and backend not in registered_backends():
        raise ValueError(f"backend={backend!r} is not registered; registered: {registered_backends()}")


class MoELayer(nn.Module):
    """What :class:`MoE` and :class:`moe_replay.QuantMoE` share: routing, dispatch, forward."""

    experts: ExpertsModule

    def __init__(
        self,
        cfg: MoEConfig,
        backend: str | None,
        router_device: torch.device | str | None,
        ep_group: ProcessGroup | None = None,
        ep: EPConfig | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
        _check_backend_name(backend)
        self.cfg = cfg
        self.backend = backend
        self.router = Router(cfg, device=router_device)
        # Expert parallelism (a collective when ep_group is given) only swaps the dispatcher.
        kind = type(self).__name__
        ep = EPConfig() if ep is None else ep
        self.ep = setup_expert_parallel(cfg, ep_group, ep, layer_kind=kind, router=self.router)
        self.dispatch_experts = local_dispatch if self.ep is None else self.ep.dispatcher
        mark_site(self, cfg.num_experts, cfg.top_k, route_logits=self._route_logits)

    def _route_logits(
        self,
        logits_TE: torch.Tensor,
        bias_E: torch.Tensor | None,
        forced_TK: torch.Tensor | None,
        validate: bool | None,
    ) -> Routing:
        return route(logits_TE, self.cfg, forced_TK, bias_E, validate, backend=self.backend)

    @property
    def local_experts(self) -> tuple[int, int]:
        """(global id of this rank's first expert, how many it holds): ``(0, E)`` without expert
        parallelism."""
        if self.ep is None:
            return 0, self.cfg.num_experts
        return self.ep.partition.first, self.ep.partition.num_local

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The single-process layer's state dict, all experts included, on every rank.

        Under expert parallelism a collective over the group (every rank must call it);
        ``state_dict()`` holds this rank's experts only, and ``load_state_dict`` accepts either.
        """
        return full_state_dict(self, self.ep)

    def _forced_TK(self, forced: torch.Tensor | None, lead: tuple[int, ...]) -> torch.Tensor | None:
        if forced is None:
            return None
        if not isinstance(forced, torch.Tensor):
            raise TypeError(f"forced_expert_ids must be a torch.Tensor or None, got {type(forced).__name__}")
        T, K = math.prod(lead), self.cfg.top_k
        if tuple(forced.shape) not in ((T, K), (*lead, K)):  # [3, 2, K] for x [2, 3, H] is an error
            raise ValueError(
                f"forced_expert_ids must have shape [N={T}, top_k={K}] or [*{list(lead)}, {K}] "
                f"for x of token shape {list(lead)}, got {tuple(forced.shape)}"
            )
        return forced.reshape(T, K)

    def forward(
        self,
        x: torch.Tensor,
        forced_expert_ids: torch.Tensor | None = None,
        return_routing: bool = False,
        *,
        validate: bool | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Routing]:
        """``y [..., H]`` for ``x [..., H]``; with ``return_routing``, also the :class:`Routing` used,
        shaped ``x.shape[:-1] + (K,)``.

        ``forced_expert_ids`` (``[N, K]`` with ``N = x.numel() // H``, or ``[..., K]``) forces
        experts slot by slot; ``-1`` leaves a slot to the router (see :func:`moe_replay.route`).
        ``validate`` checks them as :func:`moe_replay.route` does; the default ``None`` never
        synchronises with the GPU (there a bad row gets NaN outputs, and the ``ValueError`` naming
        it is raised by the next layer call of this thread or by this call's backward), so a
        forward with forced ids costs what a router-chosen one does and can be captured in a CUDA
        graph. ``True`` raises at once (one host synchronisation); ``False`` skips the checks.
        """
        H = self.cfg.hidden_size
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != H or not x.is_floating_point():
            raise ValueError(
                f"x must be a floating-point tensor [..., hidden_size={H}], got {x.dtype} {tuple(x.shape)}"
            )
        lead = tuple(x.shape[:-1])
        x_TH = x.reshape(-1, H)
        forced_TK = self._forced_TK(forced_expert_ids, lead)
        if torch.compiler.is_compiling():
            routing, y_TH = self._forward_compiled(x_TH, forced_TK, lead, validate)
            y = y_TH.reshape(x.shape)
            return (y, routing.reshape(*lead)) if return_routing else y
        backend = get_backend(self.backend, x.device)
        logits_TE = self.router(x_TH)

        def route_fn(forced: torch.Tensor | None, check: bool | None) -> Routing:
            return route(logits_TE, self.cfg, forced, self.router.bias, check, backend=backend.name)

        site = site_of(self)
        routing = route_at_site(site, route_fn, x_TH.shape[0], lead, forced_TK, validate=validate)
        y_TH = self.dispatch_experts(x_TH, routing, self.experts, backend)
        y = y_TH.reshape(x.shape)
        return (y, routing.reshape(*lead)) if return_routing else y

    def _forward_compiled(
        self, x_TH: torch.Tensor, forced_TK: torch.Tensor | None, lead: tuple[int, ...], validate: bool | None
    ) -> tuple[Routing, torch.Tensor]:
        """The forward as ``torch.compile`` traces it: routing and experts as custom ops
        (:mod:`moe_replay.ops`), the router and the gate weights traced."""
        if self.ep is not None or not isinstance(self.experts, Experts):
            raise RuntimeError(
                f"torch.compile supports {type(self).__name__} layers without expert parallelism and with "
                "bf16/float experts (moe_replay.MoE); run expert-parallel and quantized layers eagerly"
            )
        site = site_of(self)
        assert site is not None  # marked in __init__
        logits_TE = self.router(x_TH)
        ids_TK = ops.route_ids(
            logits_TE.detach(), self.router.bias, forced_TK, site.key, list(lead), ops.validate_code(validate)
        )
        weights_TK = gate_weights(logits_TE, ids_TK.long(), self.cfg)
        experts = self.experts
        y_TH = ops.experts(
            x_TH, ids_TK, weights_TK, experts.gate_up_proj, experts.down_proj, self.backend or ""
        )
        return Routing(ids_TK, weights_TK), y_TH

    def extra_repr(self) -> str:
        c = self.cfg
        parts = [
            f"num_experts={c.num_experts}, top_k={c.top_k}, hidden_size={c.hidden_size}",
            f"intermediate_size={c.intermediate_size}, scoring={c.scoring}",
            f"norm_topk_prob={c.norm_topk_prob}",
        ]
        if c.n_group is not None:
            parts.append(f"n_group={c.n_group}, topk_group={c.topk_group}")
        if c.score_bias:
            parts.append("score_bias=True")
        if c.routed_scaling_factor != 1.0:
            parts.append(f"routed_scaling_factor={c.routed_scaling_factor}")
        parts.append(f"backend={self.backend or 'auto'}")
        return ", ".join(parts)


class MoE(MoELayer):
    """A Mixture-of-Experts layer with replayable routing, optionally expert-parallel.

    ``y[t] = sum_j weights[t, j] * E_{ids[t, j]}(x[t])`` with ``E_e(x) = down_e(silu(gate_e x) * up_e x)``.

    Parameters: ``router.weight [E, H]`` (float32), ``router.bias [E]`` (float32 buffer, only with
    ``cfg.score_bias``), ``experts.gate_up_proj [E, 2I, H]`` and ``experts.down_proj [E, H, I]``
    (``dtype``). Initialisation: every weight ~ N(0, 1 / fan_in), so unit-variance inputs give
    unit-scale router logits and expert pre-activations; the bias starts at zero.

    ``backend``: ``None`` picks per call (``MOE_REPLAY_BACKEND``, else ``triton`` on CUDA, else
    ``torch``); a name requests that backend and raises if it cannot run on the input's device.

    Expert parallelism (``ep_group``, a ``torch.distributed`` process group; every rank of it
    constructs the layer together, with the same arguments): the router is replicated (broadcast
    from the group's first rank at construction), ``experts`` holds this rank's balanced,
    contiguous share (:attr:`local_experts`), and each rank calls the layer on its own tokens
    (counts may differ, zero included) and its own forced ids, getting its own outputs: the
    single-process layer's results on the ranks' tokens concatenated. ``ep``
    (:class:`moe_replay.EPConfig`) says how: its ``mode`` picks how rows reach the experts,
    ``"allgather"`` (every rank sees every token; simple) or ``"alltoall"`` (each token goes only
    to the ranks holding its experts, once per rank; scales), and for ``alltoall`` the transport,
    chunks and overlap switches. ``ep_mode="alltoall"`` is the shorthand for
    ``ep=EPConfig(mode="alltoall")``. See ``docs/expert-parallel.md``. Every forward and
    backward is then a collective: all ranks run them, also a rank with no tokens, whose experts
    serve the others. Expert gradients land on the owning rank; the router's gradient on each
    rank covers its own tokens only, so **all-reduce the router's gradients** over the group
    (sum) before the optimiser step, as data parallelism would.
    Tensors must be where the group's backend runs collectives: CPU for gloo, CUDA for NCCL.
    """

    experts: Experts

    def __init__(
        self,
        cfg: MoEConfig,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        ep_group: ProcessGroup | None = None,
        ep_mode: str = DEFAULT_EP_MODE,
        ep: EPConfig | None = None,
    ) -> None:
        super().__init__(cfg, backend, device, ep_group, ep_config_of(ep, ep_mode))
        first, count = self.local_experts
        H, I, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
        self.experts = Experts(count, H, I, device, dtype, first_expert=first, num_global_experts=E)
