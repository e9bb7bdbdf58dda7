"""Backend registry: explicit registration, explicit requests fail loudly, automatic choice logs.

Selection for a tensor on ``device``:

1. the ``backend=`` argument, else the ``MOE_REPLAY_BACKEND`` environment variable: that backend
   or a ``ValueError`` (unknown name, import failure, or cannot run on ``device``) listing the
   backends that can;
2. otherwise automatic: ``triton`` on CUDA when it imports, else ``torch``. A fallback is logged.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moe_replay.backends.base import Backend

logger = logging.getLogger(__name__)

ENV_VAR = "MOE_REPLAY_BACKEND"

_loaders: dict[str, Callable[[], Backend]] = {}
_loaded: dict[str, Backend] = {}
_load_errors: dict[str, str] = {}
_logged_fallbacks: set[tuple[str, str]] = set()
_cuda_verdicts: dict[tuple[str, torch.device], str | None] = {}  # (backend, device) -> why not


def register(name: str, loader: Callable[[], Backend]) -> None:
    """Register ``loader`` (called once, on first use) as the backend called ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"backend name must be a non-empty str, got {name!r}")
    if name in _loaders:
        raise ValueError(f"backend {name!r} is already registered")
    _loaders[name] = loader


def _module_loader(module: str) -> Callable[[], Backend]:
    return lambda: importlib.import_module(module).BACKEND


register("torch", _module_loader("moe_replay.backends.torch"))
register("triton", _module_loader("moe_replay.backends.triton"))


def registered_backends() -> list[str]:
    return list(_loaders)


def _load(name: str) -> Backend | None:
    if name not in _loaded and name not in _load_errors:
        try:
            _loaded[name] = _loaders[name]()
        except ImportError as error:  # e.g. triton is not installed
            _load_errors[name] = f"{type(error).__name__}: {error}"
    return _loaded.get(name)


def _why_not(name: str, device: torch.device) -> str | None:
    key = (name, device)
    if key in _cuda_verdicts:
        return _cuda_verdicts[key]
    backend = _load(name)
    if backend is None:
        return f"it failed to import ({_load_errors[name]})"
    reason = backend.unavailable_reason(device)
    if device.type == "cuda":  # a GPU's capability does not change within a process; asked per call
        _cuda_verdicts[key] = reason
    return reason


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the registered backends that can run on ``device``."""
    device = torch.device(device)
    return [name for name in _loaders if _why_not(name, device) is None]


def get_backend(name: str | None, device: torch.device | str) -> Backend:
    """The backend to run on ``device`` (module docstring for the rules)."""
    device = torch.device(device)
    requested, source = name, "backend"
    if requested is None and os.environ.get(ENV_VAR):
        requested, source = os.environ[ENV_VAR], ENV_VAR
    if requested is not None:
        if not isinstance(requested, str):
            raise TypeError(f"backend must be a str or None, got {type(requested).__name__}")
        if requested not in _loaders:
            raise ValueError(
                f"{source}={requested!r} is not a registered backend; registered: {registered_backends()}, "
                f"available on {device}: {available_backends(device)}"
            )
        reason = _why_not(requested, device)
        if reason is not None:
            raise ValueError(
                f"{source}={requested!r} cannot run on {device}: {reason}; "
                f"available on {device}: {available_backends(device)}"
            )
        return _loaded[requested]
    if device.type == "cuda":
        reason = _why_not("triton", device)
        if reason is None:
            return _loaded["triton"]
        if ("triton", str(device)) not in _logged_fallbacks:
            _logged_fallbacks.add(("triton", str(device)))
            logger.warning(
                "moe_replay: backend 'triton' cannot run on %s (%s); using 'torch'", device, reason
            )
    reference = _load("torch")
    if reference is None:
        raise ValueError(f"the reference backend 'torch' failed to import ({_load_errors['torch']})")
    return reference
