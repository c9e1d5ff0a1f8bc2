"""The VAE decoder's memory-bound passes (see qwenfast.ops.triton.elementwise for the kernels).

    bias_residual_add(x, bias, residual) -> x + bias[c] + residual     (N, C, *spatial)
    upsample_nearest2x(x) -> (N, C, 2H, 2W)                            (N, C, H, W)
    bias_channel_to_space_add_(y, bias, x, src) -> y, in place:        y (N, C, 2H, 2W), x (N, Ci, H, W)
        y[n, c, 2h+i, 2w+j] += bias[c], then += x[n, src[c, i, j], h, w]

Dispatch per call as every op here (`BiasResidualAdd`, `UpsampleNearest2x`, `BiasChannelToSpaceAdd`:
`CustomOp`s): CUDA
tensors with Triton and fp16/bf16/fp32 → the kernel; anything else → the PyTorch reference (also the
tests' oracle). `*_triton` runs the kernel itself (CPU tensors under
TRITON_INTERPRET=1) for the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .custom_op import HAS_TRITON, GridKernelOp, launch

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


class BiasResidualAdd(GridKernelOp):
    """`(x, bias, residual) -> (x + bias[c]) + residual`."""

    def check(self, x, bias, residual):
        _check_bias_residual(x, bias, residual)

    def forward_native(self, x, bias, residual):
        return bias_residual_add_native(x, bias, residual)

    def forward_cuda(self, x, bias, residual):
        return launch(torch.ops.qwenfast.bias_residual_add, _kernel.bias_residual_add_fwd, x,
                      bias.reshape(-1).contiguous(), residual)


_bias_residual_add = BiasResidualAdd()


def bias_residual_add(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return _bias_residual_add.forward(x, bias, residual)


def bias_residual_add_triton(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return _bias_residual_add.forward_triton(x, bias, residual)


def _check_upsample(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"x: expected (N, C, H, W), got shape {tuple(x.shape)}")


def upsample_nearest2x_native(x: torch.Tensor) -> torch.Tensor:
    """diffusers' `nearest-exact` 2x upsample (at exactly 2x a pure selection, so no fp32 round trip)."""
    _check_upsample(x)
    return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


class UpsampleNearest2x(GridKernelOp):
    """`(x) -> nearest 2x upsample`, (N, C, H, W) -> (N, C, 2H, 2W)."""

    def check(self, x):
        _check_upsample(x)

    def forward_native(self, x):
        return upsample_nearest2x_native(x)

    def forward_cuda(self, x):
        return launch(torch.ops.qwenfast.upsample_nearest2x, _kernel.upsample_nearest2x_fwd, x)


_upsample_nearest2x = UpsampleNearest2x()


def upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    return _upsample_nearest2x.forward(x)


def upsample_nearest2x_triton(x: torch.Tensor) -> torch.Tensor:
    return _upsample_nearest2x.forward_triton(x)


def _check_channel_to_space(y: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, src: torch.Tensor) -> None:
    if y.dim() != 4 or y.shape[2] % 2 or y.shape[3] % 2:
        raise ValueError(f"y: expected (N, C, 2H, 2W), got shape {tuple(y.shape)}")
    n, c, h2, w2 = y.shape
    if x.dim() != 4 or x.shape[0] != n or tuple(x.shape[2:]) != (h2 // 2, w2 // 2) or x.dtype != y.dtype \
            or x.device != y.device:
        raise ValueError(f"x: expected ({n}, Ci, {h2 // 2}, {w2 // 2}) {y.dtype} on {y.device}, "
                         f"got {tuple(x.shape)} {x.dtype} on {x.device}")
    if bias.numel() != c or bias.device != y.device:
        raise ValueError(f"bias: expected {c} elements on {y.device}, got shape {tuple(bias.shape)} on {bias.device}")
    if tuple(src.shape) != (c, 2, 2) or src.dtype not in (torch.int32, torch.int64) or src.device != y.device:
        raise ValueError(f"src: expected ({c}, 2, 2) integers on {y.device}, got {tuple(src.shape)} {src.dtype} "
                         f"on {src.device}")


def bias_channel_to_space_add_native(y: torch.Tensor, bias: torch.Tensor, x: torch.Tensor,
                                     src: torch.Tensor) -> torch.Tensor:
    """y += bias[c], then y[:, :, i::2, j::2] += x[:, src[:, i, j]] for each phase (i, j): PyTorch's order
    (a conv's biased output, then the shortcut), one phase's selection of x alive at a time."""
    _check_channel_to_space(y, bias, x, src)
    y.add_(bias.reshape(-1, 1, 1).to(y.dtype))
    for i in range(2):
        for j in range(2):
            y[:, :, i::2, j::2].add_(x.index_select(1, src[:, i, j].long()))
    return y


class BiasChannelToSpaceAdd(GridKernelOp):
    """`(y, bias, x, src) -> y` in place: `y += bias[c]`, then the channel-to-space shortcut of x."""

    def check(self, y, bias, x, src):
        _check_channel_to_space(y, bias, x, src)

    def forward_native(self, y, bias, x, src):
        return bias_channel_to_space_add_native(y, bias, x, src)

    def forward_cuda(self, y, bias, x, src):
        launch(torch.ops.qwenfast.bias_channel_to_space_add_, _kernel.bias_channel_to_space_add_fwd,
               y, bias.reshape(-1).contiguous(), x, src.to(torch.int32).contiguous())
        return y


_bias_channel_to_space_add = BiasChannelToSpaceAdd()


def bias_channel_to_space_add_(y: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return _bias_channel_to_space_add.forward(y, bias, x, src)


def bias_channel_to_space_add_triton(y: torch.Tensor, bias: torch.Tensor, x: torch.Tensor,
                                     src: torch.Tensor) -> torch.Tensor:
    return _bias_channel_to_space_add.forward_triton(y, bias, x, src)


__all__ = ["BiasResidualAdd", "UpsampleNearest2x", "BiasChannelToSpaceAdd", "bias_residual_add",
           "bias_residual_add_native", "bias_residual_add_triton", "upsample_nearest2x", "upsample_nearest2x_native",
           "upsample_nearest2x_triton", "bias_channel_to_space_add_", "bias_channel_to_space_add_native",
           "bias_channel_to_space_add_triton"]
