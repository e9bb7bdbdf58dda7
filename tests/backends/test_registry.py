"""Backend selection: the backend= argument, else MOE_REPLAY_BACKEND, else automatic.

An explicit request that cannot run raises a ValueError listing what can; only the automatic
choice falls back, and it logs why. Tests register fake backends into a private copy of the
registry's tables, so nothing leaks between tests.
"""

from __future__ import annotations

import logging

import pytest
import torch

import moe_replay as mr
from moe_replay.backends import registry
from moe_replay.backends.torch import TorchBackend


class FakeBackend(TorchBackend):
    """The reference backend under another name, optionally unable to run, counting its routings."""

    def __init__(self, name: str, reason: str | None = None) -> None:
        self.name = name
        self.reason = reason
        self.routed = 0

    def unavailable_reason(self, device: torch.device) -> str | None:
        return self.reason

    def route(
        self,
        logits_TE: torch.Tensor,
        cfg: mr.MoEConfig,
        forced_TK: torch.Tensor | None,
        bias_E: torch.Tensor | None,
    ) -> mr.Routing:
        self.routed += 1
        return super().route(logits_TE, cfg, forced_TK, bias_E)


def failing_import() -> FakeBackend:
    raise ImportError("No module named 'fancy_kernels'")


@pytest.fixture(autouse=True)
def private_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_loaders", dict(registry._loaders))
    # empty caches: every backend is loaded afresh through the (possibly replaced) loaders
    monkeypatch.setattr(registry, "_loaded", {})
    monkeypatch.setattr(registry, "_load_errors", {})
    monkeypatch.setattr(registry, "_logged_fallbacks", set())
    monkeypatch.setattr(registry, "_cuda_verdicts", {})
    monkeypatch.delenv(registry.ENV_VAR, raising=False)


def test_torch_and_triton_are_registered_and_torch_runs_on_cpu() -> None:
    assert {"torch", "triton"} <= set(registry.registered_backends())
    assert "torch" in registry.available_backends("cpu")
    assert registry.get_backend("torch", "cpu").name == "torch"


def test_automatic_choice_on_cpu_is_torch() -> None:
    # also when the Triton interpreter makes 'triton' runnable on the CPU: automatic CPU choice is torch
    assert registry.get_backend(None, torch.device("cpu")).name == "torch"


def test_unknown_explicit_backend_raises_listing_available() -> None:
    with pytest.raises(
        ValueError,
        match=r"backend='nope' is not a registered backend; registered: \[.*\], available on cpu: \[.*'torch",
    ):
        registry.get_backend("nope", "cpu")


def test_unavailable_explicit_backend_raises_with_reason() -> None:
    registry.register("tpu", lambda: FakeBackend("tpu", reason="needs a TPU"))
    with pytest.raises(
        ValueError, match=r"backend='tpu' cannot run on cpu: needs a TPU; available on cpu: \[.*'torch'"
    ):
        registry.get_backend("tpu", "cpu")
    assert "tpu" not in registry.available_backends("cpu")


def test_backend_that_fails_to_import_raises_when_requested() -> None:
    registry.register("fancy", failing_import)
    with pytest.raises(
        ValueError, match=r"backend='fancy' cannot run on cpu: it failed to import \(ImportError: No module"
    ):
        registry.get_backend("fancy", "cpu")
    assert "fancy" in registry.registered_backends() and "fancy" not in registry.available_backends("cpu")


def test_environment_variable_selects_and_the_argument_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeBackend("fake")
    registry.register("fake", lambda: fake)
    monkeypatch.setenv(registry.ENV_VAR, "fake")
    assert registry.get_backend(None, "cpu") is fake
    assert registry.get_backend("torch", "cpu").name == "torch"  # the argument beats the variable
    monkeypatch.setenv(registry.ENV_VAR, "nope")
    with pytest.raises(
        ValueError, match=r"MOE_REPLAY_BACKEND='nope' is not a registered backend.*available on cpu"
    ):
        registry.get_backend(None, "cpu")
    monkeypatch.setenv(registry.ENV_VAR, "")  # empty: unset
    assert registry.get_backend(None, "cpu").name == "torch"


def test_automatic_choice_on_cuda_prefers_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.device("cuda") needs no GPU; the fake 'triton' says it can run there
    fake_triton = FakeBackend("triton")
    monkeypatch.setitem(registry._loaders, "triton", lambda: fake_triton)
    assert registry.get_backend(None, torch.device("cuda")) is fake_triton


@pytest.mark.parametrize(
    ("loader", "reason"),
    [
        (failing_import, "it failed to import"),  # triton not installed
        (lambda: FakeBackend("triton", reason="needs compute capability >= 8.0"), "needs compute capability"),
    ],
)
def test_automatic_choice_on_cuda_falls_back_to_torch_and_logs_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, loader, reason: str
) -> None:
    monkeypatch.setitem(registry._loaders, "triton", loader)
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        assert registry.get_backend(None, torch.device("cuda")).name == "torch"
        assert registry.get_backend(None, torch.device("cuda")).name == "torch"
    warnings = [r.getMessage() for r in caplog.records if r.name == registry.__name__]
    assert len(warnings) == 1
    assert "backend 'triton' cannot run on cuda" in warnings[0] and reason in warnings[0]
    assert "using 'torch'" in warnings[0]
    # an explicit request does not fall back
    with pytest.raises(ValueError, match=r"backend='triton' cannot run on cuda"):
        registry.get_backend("triton", torch.device("cuda"))


def test_register_rejects_duplicates_and_bad_names() -> None:
    with pytest.raises(ValueError, match=r"backend 'torch' is already registered"):
        registry.register("torch", lambda: FakeBackend("torch"))
    with pytest.raises(ValueError, match=r"backend name must be a non-empty str, got ''"):
        registry.register("", lambda: FakeBackend(""))


def test_backend_must_be_a_string() -> None:
    with pytest.raises(TypeError, match=r"backend must be a str or None, got int"):
        registry.get_backend(3, "cpu")


def test_the_layer_uses_the_selected_backend_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeBackend("fake")
    registry.register("fake", lambda: fake)
    registry.register("tpu", lambda: FakeBackend("tpu", reason="needs a TPU"))
    cfg = mr.MoEConfig(num_experts=4, top_k=2, hidden_size=8, intermediate_size=8)
    x = torch.randn(3, 8)
    moe = mr.MoE(cfg, backend="fake")
    moe(x, forced_expert_ids=torch.tensor([[0, -1]] * 3))  # replay goes through the chosen backend
    assert fake.routed == 1
    auto = mr.MoE(cfg)
    monkeypatch.setenv(registry.ENV_VAR, "fake")
    auto(x)
    assert fake.routed == 2
    with pytest.raises(ValueError, match=r"backend='tpu' cannot run on cpu: needs a TPU"):
        mr.MoE(cfg, backend="tpu")(x)
