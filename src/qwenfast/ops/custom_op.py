"""The one dispatch path of every op in qwenfast.ops: one module, three implementations, chosen per call.

A `CustomOp` subclass writes `forward_native` (plain PyTorch: the readable reference, and the path on
CPUs and anywhere Triton is missing), `forward_cuda` (Triton kernels) and, optionally, `forward_hip`
(ROCm; the native path until a kernel has been shown to work there). `forward(...)` looks at the
tensors of *this* call, so one module serves CPU and GPU inputs alike, and a model moved between
devices needs no re-initialisation.

The rule, for every op (modulation and VAE alike):
- `HAS_TRITON`: the one Triton-present flag, read once at import.
- `choose_backend(device)`: CUDA tensors with Triton -> "cuda"; a ROCm build's GPU -> "hip"; anything
  else (CPU, meta, no Triton) -> "native". The CPU takes the PyTorch path even under TRITON_INTERPRET=1.
- `CustomOp.kernel_takes(...)`: the op's own limits on what its kernel takes (dtype, head dim, batch);
  a CUDA call outside them takes the native path.
- `launch(op, launcher, *args)`: the one eager/compile switch (the torch.library op while torch.compile
  traces, the launcher itself in eager mode).
- `CustomOp.forward_triton(...)`: the kernel whatever the device (CPU tensors under
  TRITON_INTERPRET=1): how the tests reach the kernels; an error where the kernel cannot take the call.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["CustomOp", "GridKernelOp", "Backend", "HAS_TRITON", "INTERPRET", "choose_backend", "launch",
           "triton_available"]

Backend = str  # one of "cuda", "hip", "native"

# Looked up once at import (triton is an optional dependency). Plain constants, not cached functions:
# torch.compile traces `forward`, and a constant costs it nothing.
HAS_TRITON = importlib.util.find_spec("triton") is not None
# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when our kernel modules are imported
# (tests/conftest.py sets it on machines without CUDA): read once, here, too.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_GRID_Y = 65535  # CUDA's limit on a grid's second axis, which carries the batch in the VAE kernels


def triton_available() -> bool:
    """Whether `import triton` can succeed."""
    return HAS_TRITON


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    for a in kwargs.values():
        if isinstance(a, torch.Tensor):
            return a
    return None


def choose_backend(device: torch.device | None, has_triton: bool | None = None) -> Backend:
    """The implementation for tensors on `device`.

    CUDA device + triton importable -> "cuda"; a CUDA device of a ROCm build -> "hip"; anything else
    (CPU, meta, MPS, no triton, no tensor at all) -> "native".
    """
    if has_triton is None:
        has_triton = HAS_TRITON
    if device is None or device.type != "cuda":
        return "native"
    if torch.version.hip is not None:  # ROCm builds report their GPUs as "cuda" devices
        return "hip"
    return "cuda" if has_triton else "native"


def launch(op: Callable[..., Any], launcher: Callable[..., Any], *args: Any) -> Any:
    """Run a kernel through its torch.library op while torch.compile traces, else straight through its
    launcher (the op's implementation).

    The custom op is what lets torch.compile (and its fake tensors) see the kernel. In eager mode its
    dispatcher only adds host time: ~6 µs a call against ~1.5 µs for a plain call (a trivial custom
    op, measured on the CPU machine), which matters where launches run ahead of the GPU by little.
    """
    if torch.compiler.is_compiling():
        return op(*args)
    return launcher(*args)


class CustomOp(nn.Module):
    """Base of the fused ops: subclasses implement `forward_native` and `forward_cuda` (and, where the
    kernel has limits of its own, `kernel_takes`)."""

    def forward_native(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def forward_cuda(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def forward_hip(self, *args: Any, **kwargs: Any) -> Any:
        # No kernel has been validated on ROCm yet: the PyTorch path is the honest default.
        return self.forward_native(*args, **kwargs)

    def check(self, *args: Any, **kwargs: Any) -> None:
        """Argument checks (shapes, devices; errors name the argument), run by `forward` and
        `forward_triton` before the dispatch, so every path sees the same errors. Default: none."""

    def kernel_takes(self, *args: Any, **kwargs: Any) -> bool:
        """Does our kernel take these (already checked) arguments, device aside? Default: yes."""
        return True

    def dispatch(self, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        """The bound implementation that `forward` would run for these arguments."""
        t = _first_tensor(args, kwargs)
        backend = choose_backend(None if t is None else t.device)
        if backend == "cuda" and self.kernel_takes(*args, **kwargs):
            return self.forward_cuda
        if backend == "hip":
            return self.forward_hip
        return self.forward_native

    def forward_triton(self, *args: Any, **kwargs: Any) -> Any:
        """The Triton path whatever the device: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
        (the tests). Raises where the kernel cannot take the call."""
        self.check(*args, **kwargs)
        t = _first_tensor(args, kwargs)
        where = "cpu" if INTERPRET else "cuda"
        if not (HAS_TRITON and t is not None and t.device.type == where and self.kernel_takes(*args, **kwargs)):
            what = "no tensor" if t is None else f"{t.dtype} {tuple(t.shape)} on {t.device}"
            raise ValueError(f"{type(self).__name__}: the Triton kernel cannot take {what}"
                             + ("" if HAS_TRITON else " (triton is not installed)"))
        return self.forward_cuda(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.check(*args, **kwargs)
        return self.dispatch(*args, **kwargs)(*args, **kwargs)


class GridKernelOp(CustomOp):
    """An op whose kernel takes fp16/bf16/fp32 and carries the batch (dim 0 of the first tensor) on a
    grid axis: the VAE kernels."""

    def kernel_takes(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> bool:
        return x.dtype in KERNEL_DTYPES and x.shape[0] <= MAX_GRID_Y
