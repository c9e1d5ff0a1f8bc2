"""A small custom-op dispatch: one module, three implementations, chosen per call.

A `CustomOp` subclass writes `forward_native` (plain PyTorch: the readable reference, and the path on
CPUs and anywhere Triton is missing), `forward_cuda` (Triton kernels) and, optionally, `forward_hip`
(ROCm; the native path until a kernel has been shown to work there). `forward(...)` looks at the
tensors of *this* call, so one module serves CPU and GPU inputs alike, and a model moved between
devices needs no re-initialisation.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["CustomOp", "Backend", "choose_backend", "triton_available"]

Backend = str  # one of "cuda", "hip", "native"


# Looked up once at import (triton is an optional dependency). A plain constant, not a cached
# function: torch.compile traces `forward`, and a constant costs it nothing.
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether `import triton` can succeed."""
    return _HAS_TRITON


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    return None


def choose_backend(device: torch.device | None, has_triton: bool | None = None) -> Backend:
    """The implementation for tensors on `device`.

    CUDA device + triton importable -> "cuda"; a CUDA device of a ROCm build -> "hip"; anything else
    (CPU, meta, MPS, no triton, no tensor at all) -> "native".
    """
    if has_triton is None:
        has_triton = triton_available()
    if device is None or device.type != "cuda":
        return "native"
    if torch.version.hip is not None:  # ROCm builds report their GPUs as "cuda" devices
        return "hip"
    return "cuda" if has_triton else "native"


class CustomOp(nn.Module):
    """Base of the fused ops: subclasses implement `forward_native` and `forward_cuda`."""

    def forward_native(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def forward_cuda(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def forward_hip(self, *args: Any, **kwargs: Any) -> Any:
        # No kernel has been validated on ROCm yet: the PyTorch path is the honest default.
        return self.forward_native(*args, **kwargs)

    def dispatch(self, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        """The bound implementation that `forward` would run for these arguments."""
        t = _first_tensor(args, kwargs)
        backend = choose_backend(None if t is None else t.device)
        if backend == "cuda":
            return self.forward_cuda
        if backend == "hip":
            return self.forward_hip
        return self.forward_native

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.dispatch(*args, **kwargs)(*args, **kwargs)
