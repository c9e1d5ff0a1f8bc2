"""The VAE decoder's memory-bound passes (see qwenfast.ops.triton.elementwise for the kernels).

    bias_residual_add(x, bias, residual) -> x + bias[c] + residual     (N, C, *spatial)
    upsample_nearest2x(x) -> (N, C, 2H, 2W)                            (N, C, H, W)

Dispatch per call as every op here: CUDA tensors with Triton → the kernel; anything else → the
PyTorch reference (also the tests' oracle). `*_triton` runs the kernel itself (CPU tensors under
TRITON_INTERPRET=1) for the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .triton._support import HAS_TRITON, dispatches_to_kernel, kernel_supports, launch, require_kernel

if HAS_TRITON:
    from .triton import elementwise as _kernel

def _check_bias_residual(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> None:
    if x.dim() < 3:
        raise ValueError(f"x: expected (N, C, *spatial), got shape {tuple(x.shape)}")
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"residual: expected {tuple(x.shape)} {x.dtype} on {x.device} like x, "
                         f"got {tuple(residual.shape)} {residual.dtype} on {residual.device}")
    if bias.numel() != x.shape[1] or bias.device != x.device:
        raise ValueError(f"bias: expected {x.shape[1]} elements on {x.device}, got shape {tuple(bias.shape)} on {bias.device}")


def bias_residual_add_native(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """(x + bias) + residual, in PyTorch's order (a conv's biased output, then the shortcut)."""
    _check_bias_residual(x, bias, residual)
    return (x + bias.reshape(-1, *([1] * (x.dim() - 2))).to(x.dtype)) + residual


def _launch_bias_residual(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return launch(torch.ops.qwenfast.bias_residual_add, _kernel.bias_residual_add_fwd, x,
                  bias.reshape(-1).contiguous(), residual)


def bias_residual_add(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    _check_bias_residual(x, bias, residual)
    if dispatches_to_kernel(x) and kernel_supports(x, bias, residual):
        return _launch_bias_residual(x, bias, residual)
    return bias_residual_add_native(x, bias, residual)


def bias_residual_add_triton(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    _check_bias_residual(x, bias, residual)
    require_kernel(kernel_supports(x, bias, residual), "x", x)
    return _launch_bias_residual(x, bias, residual)


def _check_upsample(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"x: expected (N, C, H, W), got shape {tuple(x.shape)}")


def upsample_nearest2x_native(x: torch.Tensor) -> torch.Tensor:
    """diffusers' `nearest-exact` 2x upsample (at exactly 2x a pure selection, so no fp32 round trip)."""
    _check_upsample(x)
    return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


def upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    _check_upsample(x)
    if dispatches_to_kernel(x) and kernel_supports(x):
        return launch(torch.ops.qwenfast.upsample_nearest2x, _kernel.upsample_nearest2x_fwd, x)
    return upsample_nearest2x_native(x)


def upsample_nearest2x_triton(x: torch.Tensor) -> torch.Tensor:
    _check_upsample(x)
    require_kernel(kernel_supports(x), "x", x)
    return launch(torch.ops.qwenfast.upsample_nearest2x, _kernel.upsample_nearest2x_fwd, x)


__all__ = ["bias_residual_add", "bias_residual_add_native", "bias_residual_add_triton",
           "upsample_nearest2x", "upsample_nearest2x_native", "upsample_nearest2x_triton"]
