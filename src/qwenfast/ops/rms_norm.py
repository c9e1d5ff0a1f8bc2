"""Per-pixel RMS norm (+ SiLU) of the Qwen-Image VAE.

    rms_norm(x, gamma, silu=False, bias=None, out=None) -> y

y = x / max(||x||_2 over channels, 1e-12) * sqrt(C) * gamma, then SiLU when `silu`; with `bias`
(C elements: the preceding conv's bias, left out of that conv) x + bias is normalised instead, in
fp32, which saves the conv's separate bias pass over its output: diffusers'
`QwenImageRMS_norm` (channel_first) followed by the decoder's SiLU, with the statistics and the
arithmetic in fp32 and one rounding to x's dtype at the end (diffusers rounds the normalised value
to x's dtype before scaling: a difference of one bf16 rounding). x is (N, C, H, W) or (B, C, T, H, W)
in any memory format; y has x's dtype and memory format. gamma has C elements: diffusers' (C, 1, 1)
or (C, 1, 1, 1) parameter, or (C,). With `out` (x's shape, dtype and device, any strides) y is written there and `out` returned:
the video path normalises a chunk of frames straight into the frame window of the conv that reads it.
`out` may also be (R, *x.shape): y written into each out[r] from one read of x (the three time-tap
slots of a stacked window, video.py).

Dispatch per call by `RMSNorm`, a `CustomOp` (the rule of every op here): the fused Triton kernel
(qwenfast.ops.triton.rms_norm) for CUDA tensors with Triton importable and x fp16/bf16/fp32; otherwise
`rms_norm_native`. `rms_norm_triton` runs the kernel itself (CPU tensors under TRITON_INTERPRET=1: the tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .custom_op import HAS_TRITON, GridKernelOp, launch

if HAS_TRITON:
    from .triton import rms_norm as _kernel


def _check(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() not in (4, 5):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected (N, C, H, W) or (B, C, T, H, W), got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor, got {x.dtype}")
    if not isinstance(gamma, torch.Tensor) or gamma.numel() != x.shape[1]:
        shape = tuple(gamma.shape) if isinstance(gamma, torch.Tensor) else type(gamma).__name__
        raise ValueError(f"gamma: expected {x.shape[1]} elements (one per channel of x), got shape {shape}")
    if any(s != 1 for s in gamma.shape[1:]):
        raise ValueError(f"gamma: expected shape (C,), (C, 1, 1) or (C, 1, 1, 1), got {tuple(gamma.shape)}")
    if gamma.device != x.device:
        raise ValueError(f"gamma: on {gamma.device}, x on {x.device}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.numel() != x.shape[1] or bias.device != x.device):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias: expected {x.shape[1]} elements on {x.device} (one per channel of x), got {shape}")
    if out is not None and (not isinstance(out, torch.Tensor) or out.shape[out.dim() - x.dim():] != x.shape
                            or out.dim() - x.dim() not in (0, 1) or out.dtype != x.dtype or out.device != x.device):
        got = f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"out: expected {tuple(x.shape)} (or R copies of it, (R, *x.shape)) {x.dtype} on {x.device} "
                         f"like x, got {got}")


def rms_norm_native(x: torch.Tensor, gamma: torch.Tensor, silu: bool = False,
                    bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The reference and the fallback: diffusers' formula in fp32 (fp64 stays fp64), rounded once to x's dtype."""
    _check(x, gamma, bias, out)
    C, dtype = x.shape[1], x.dtype
    compute = torch.promote_types(x.dtype, torch.float32)
    per_channel = (C, *([1] * (x.dim() - 2)))  # broadcast over the spatial dims
    xc = x.to(compute)  # a new name: the result is rounded to the *input's* dtype, not to this copy's
    if bias is not None:
        xc = xc + bias.reshape(per_channel).to(compute)
    y = F.normalize(xc, dim=1) * C**0.5 * gamma.reshape(per_channel).to(compute)
    if silu:
        y = F.silu(y)
    if out is not None:
        return out.copy_(y)  # (R, *x.shape): broadcast into each copy
    return y.to(dtype)  # .to() keeps x's memory format


class RMSNorm(GridKernelOp):
    """`(x, gamma, silu=False, bias=None, out=None) -> y`; see the module doc."""

    def check(self, x, gamma, silu=False, bias=None, out=None):
        _check(x, gamma, bias, out)

    def forward_native(self, x, gamma, silu=False, bias=None, out=None):
        return rms_norm_native(x, gamma, silu, bias, out)

    def forward_cuda(self, x, gamma, silu=False, bias=None, out=None):
        b = None if bias is None else bias.reshape(-1).contiguous()  # (C,)
        g = gamma.reshape(-1).contiguous()
        if out is None:
            return launch(torch.ops.qwenfast.rms_norm, _kernel.rms_norm_fwd, x, g, bool(silu), b)
        if torch.compiler.is_compiling():
            torch.ops.qwenfast.rms_norm_out(x, g, bool(silu), b, out)
            return out
        return _kernel.rms_norm_fwd(x, g, bool(silu), b, out=out)


_rms_norm = RMSNorm()


def rms_norm(x: torch.Tensor, gamma: torch.Tensor, silu: bool = False,
             bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """RMS norm over the channels (dim 1) of x (+ bias), times gamma, then SiLU if `silu`; see the module doc."""
    return _rms_norm.forward(x, gamma, silu, bias, out)


def rms_norm_triton(x: torch.Tensor, gamma: torch.Tensor, silu: bool = False,
                    bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel itself, whatever the device (CPU tensors under TRITON_INTERPRET=1): for tests."""
    return _rms_norm.forward_triton(x, gamma, silu, bias, out)


__all__ = ["RMSNorm", "rms_norm", "rms_norm_native", "rms_norm_triton"]
