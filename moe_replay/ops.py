"""The MoE layer as ``torch.compile`` sees it: two ``torch.library`` custom ops.

Shape legend: T tokens, E experts, K experts per token, H hidden, I expert intermediate.

Under ``torch.compile`` an :class:`moe_replay.MoE` forward is traced as

    logits_TE = router(x_TH)                                           traced (a float32 GEMM)
    ids_TK    = moe_replay::route_ids(logits_TE.detach(), bias, forced)  opaque: replay, record, checks
    weights   = gate_weights(logits_TE, ids_TK)                         traced, differentiable
    y_TH      = moe_replay::experts(x_TH, ids_TK, weights, gate_up, down) opaque, with its backward

so a whole model compiles with ``fullgraph=True``. ``route_ids`` runs the routing site's logic
(:func:`moe_replay.routing.sites.route_at_site`) eagerly at run time: open ``record`` / ``replay``
scopes are read there, never traced, so opening or closing a scope recompiles nothing. Its fake
implementation returns an int32 ``[T, K]`` tensor. ``experts`` runs the backend's dispatch, expert
MLP and combine; its backward (``experts_backward``) recomputes the stage's forward under autograd
and differentiates it: the compiled layer keeps no expert activations between forward and
backward (as if the stage were activation-checkpointed), at the price of that recompute.

Eager calls do not go through these ops: the layer calls the backend's fused stages directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moe_replay.backends.registry import get_backend
from moe_replay.routing.sites import route_at_site, site_by_key

_VALIDATE = {0: False, 1: True, 2: None}
"""``route_ids``' int code for ``validate`` (custom ops take no ``bool | None``)."""


def validate_code(validate: bool | None) -> int:
    return {False: 0, True: 1, None: 2}[validate]


@torch.library.custom_op("moe_replay::route_ids", mutates_args=())
def route_ids(
    logits_TE: torch.Tensor,
    bias_E: torch.Tensor | None,
    forced_TK: torch.Tensor | None,
    site_key: int,
    lead_shape: Sequence[int],
    validate: int,
    own_TK: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ids ``[T, K]`` (int32) the routing site ``site_key`` uses for this forward.

    ``own_TK``: the model's own ids (an attached Hugging Face router's), used where nothing forces
    the routing, so that outside scopes the model routes exactly as it would unattached."""
    site = site_by_key(site_key)
    route = site.route_logits
    if route is None:
        raise RuntimeError(f"routing site {site_key} cannot be compiled: it has no route_logits")

    def route_fn(forced: torch.Tensor | None, check: bool | None):  # type: ignore[no-untyped-def]
        if forced is None and own_TK is not None:
            forced, check = own_TK, False
        return route(logits_TE, bias_E, forced, check)

    lead = tuple(lead_shape)
    check = _VALIDATE[validate]
    routing = route_at_site(
        site, route_fn, logits_TE.shape[0], lead, forced_TK, validate=check, compiled=True
    )
    return routing.expert_ids.to(torch.int32).contiguous()


@route_ids.register_fake
def _(logits_TE, bias_E, forced_TK, site_key, lead_shape, validate, own_TK=None):  # type: ignore[no-untyped-def]
    return logits_TE.new_empty(logits_TE.shape[0], site_by_key(site_key).top_k, dtype=torch.int32)


def run_experts(
    x_TH: torch.Tensor,
    ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    gate_up_E2IH: torch.Tensor,
    down_EHI: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    """Dispatch, expert MLP and combine through ``backend`` (``""``: automatic), eagerly: what the
    ``experts`` op runs, and what an attached model's experts run outside compile."""
    impl = get_backend(backend or None, x_TH.device)
    buckets = impl.dispatch(ids_TK, gate_up_E2IH.shape[0])
    return impl.expert_mlp_combine(x_TH, buckets, gate_up_E2IH, down_EHI, weights_TK, x_TH.dtype)


@torch.library.custom_op("moe_replay::experts", mutates_args=())
def experts(
    x_TH: torch.Tensor,
    ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    gate_up_E2IH: torch.Tensor,
    down_EHI: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    """``y_TH[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t])`` through ``backend``
    (``""``: automatic)."""
    with torch.no_grad():
        return run_experts(x_TH, ids_TK, weights_TK, gate_up_E2IH, down_EHI, backend)


@experts.register_fake
def _(x_TH, ids_TK, weights_TK, gate_up_E2IH, down_EHI, backend):  # type: ignore[no-untyped-def]
    return torch.empty_like(x_TH)


def _autograd_inside_custom_op() -> torch._C._ForceDispatchKeyGuard:
    """Lift the autograd exclusion under which a custom op's implementation runs (autocast stays
    excluded, as it was for the forward being recomputed)."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor):
        exclude = exclude - torch._C.DispatchKeySet(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


@torch.library.custom_op("moe_replay::experts_backward", mutates_args=())
def experts_backward(
    dy_TH: torch.Tensor,
    x_TH: torch.Tensor,
    ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    gate_up_E2IH: torch.Tensor,
    down_EHI: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweights, dgate_up, ddown)``: the stage's forward recomputed under autograd, then
    differentiated."""
    inputs = [t.detach().requires_grad_() for t in (x_TH, weights_TK, gate_up_E2IH, down_EHI)]
    with _autograd_inside_custom_op(), torch.enable_grad():
        y_TH = run_experts(inputs[0], ids_TK, inputs[1], inputs[2], inputs[3], backend)
        grads = torch.autograd.grad(y_TH, inputs, dy_TH, allow_unused=True)
    dx, dw, dgu, dd = (torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs))
    return dx, dw, dgu, dd


@experts_backward.register_fake
def _(dy_TH, x_TH, ids_TK, weights_TK, gate_up_E2IH, down_EHI, backend):  # type: ignore[no-untyped-def]
    return (
        torch.empty_like(x_TH),
        torch.empty_like(weights_TK),
        torch.empty_like(gate_up_E2IH),
        torch.empty_like(down_EHI),
    )


def _experts_setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
    x_TH, ids_TK, weights_TK, gate_up_E2IH, down_EHI, backend = inputs
    ctx.save_for_backward(x_TH, ids_TK, weights_TK, gate_up_E2IH, down_EHI)
    ctx.backend = backend


def _experts_backward(ctx, dy_TH):  # type: ignore[no-untyped-def]
    x_TH, ids_TK, weights_TK, gate_up_E2IH, down_EHI = ctx.saved_tensors
    dx, dw, dgu, dd = experts_backward(dy_TH, x_TH, ids_TK, weights_TK, gate_up_E2IH, down_EHI, ctx.backend)
    return dx, None, dw, dgu, dd, None


experts.register_autograd(_experts_backward, setup_context=_experts_setup_context)
