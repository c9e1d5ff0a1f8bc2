"""Memory-bound passes of the VAE decoder, each one read and one write:

- `bias_residual_add`: out = x + bias (per channel) + residual, i.e. a ResidualBlock's second conv
  (run without its bias) plus its shortcut: one pass where PyTorch takes two (cuDNN's bias add on a
  channels-last output is a pass of its own, then the add).
- `upsample_nearest2x`: (N, C, H, W) → (N, C, 2H, 2W), each input pixel's channels read once and
  written to its four output pixels. PyTorch's channels-last nearest upsample runs several times
  slower than a copy.
- `bias_channel_to_space_add_`: y += bias (per channel), then += the channel-to-space shortcut of x
  (the 2.1 VAE's residual up block: y[n, c, 2h+i, 2w+j] += x[n, src[c, i, j], h, w]), in place: one
  pass where PyTorch takes two (the upsampler conv's bias add, then the strided shortcut add).

Both take any memory format and keep it; the decoder runs them channels-last (a pixel's C channels
contiguous). Layering: kernel → launcher (`*_fwd`) → custom op (`qwenfast::*`, with a fake) →
`qwenfast.ops.elementwise`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._support import MAX_GRID_Y, cdiv, next_power_of_2
from .rms_norm import merged_spatial_strides

_INT32_MAX = 2**31 - 1


@triton.jit
def _pixel_block(BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """This program's batch index, its BLOCK_S pixel offsets (row-major, int64 where INT64) and the
    BLOCK_C channel offsets: grid (pixel blocks, batch), as every kernel here runs."""
    pid_n = tl.program_id(1).to(tl.int64)
    offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    if INT64:
        offs_s = offs_s.to(tl.int64)
    return pid_n, offs_s, tl.arange(0, BLOCK_C)


@triton.jit
def _bias_residual_add_kernel(
    x_ptr,  # (N, C, S), strides (sxn, sxc, sxs)
    bias_ptr,  # (C,)
    r_ptr,  # (N, C, S), strides (srn, src, srs)
    y_ptr,  # (N, C, S), strides (syn, syc, sys)
    C, S,
    sxn, sxc, sxs, srn, src, srs, syn, syc, sys,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
):
    pid_n, offs_s, offs_c = _pixel_block(BLOCK_S, BLOCK_C, INT64)  # (BLOCK_S,) pixels, (BLOCK_C,) channels
    c_ok = offs_c < C
    mask = (offs_s < S)[:, None] & c_ok[None, :]
    x = tl.load(x_ptr + pid_n * sxn + offs_s[:, None] * sxs + offs_c[None, :] * sxc, mask=mask, other=0.0)
    r = tl.load(r_ptr + pid_n * srn + offs_s[:, None] * srs + offs_c[None, :] * src, mask=mask, other=0.0)
    b = tl.load(bias_ptr + offs_c, mask=c_ok, other=0.0)
    # (x + bias) rounded as the conv's biased output would be, then + residual: PyTorch's order
    xb = (x.to(tl.float32) + b.to(tl.float32)[None, :]).to(y_ptr.dtype.element_ty)
    y = xb.to(tl.float32) + r.to(tl.float32)
    tl.store(y_ptr + pid_n * syn + offs_s[:, None] * sys + offs_c[None, :] * syc, y.to(y_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _bias_channel_to_space_add_kernel(
    y_ptr,  # (N, C, 2H, 2W), strides (syn, syc, syh, syw): read and written in place
    bias_ptr,  # (C,)
    x_ptr,  # (N, Ci, H, W), strides (sxn, sxc, sxh, sxw)
    src_ptr,  # (C, 2, 2) int32, contiguous: the channel of x that output channel c takes at phase (i, j)
    C, W2, S2,  # output channels, output width, output pixels (2H·2W)
    syn, syc, syh, syw, sxn, sxc, sxh, sxw,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
):
    pid_n, offs_s, offs_c = _pixel_block(BLOCK_S, BLOCK_C, INT64)  # offs_s: output pixels
    row = offs_s // W2
    col = offs_s % W2
    phase = (row % 2) * 2 + col % 2  # (i, j) as i·2 + j
    c_ok = offs_c < C
    mask = (offs_s < S2)[:, None] & c_ok[None, :]
    src = tl.load(src_ptr + offs_c[None, :] * 4 + phase[:, None], mask=mask, other=0)  # (BLOCK_S, BLOCK_C)
    if INT64:
        src = src.to(tl.int64)  # src · sxc can pass 2³¹ on an NCHW x
    y_at = y_ptr + pid_n * syn + (row * syh + col * syw)[:, None] + offs_c[None, :] * syc
    y = tl.load(y_at, mask=mask, other=0.0)
    x = tl.load(x_ptr + pid_n * sxn + ((row // 2) * sxh + (col // 2) * sxw)[:, None] + src * sxc, mask=mask,
                other=0.0)
    b = tl.load(bias_ptr + offs_c, mask=c_ok, other=0.0)
    # (y + bias) rounded as the conv's biased output would be, then + the shortcut: PyTorch's order
    yb = (y.to(tl.float32) + b.to(tl.float32)[None, :]).to(y_ptr.dtype.element_ty)
    tl.store(y_at, (yb.to(tl.float32) + x.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _upsample_nearest2x_kernel(
    x_ptr,  # (N, C, H, W), strides (sxn, sxc, sxh, sxw)
    y_ptr,  # (N, C, 2H, 2W), strides (syn, syc, syh, syw)
    C, H, W,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
):
    pid_n, offs_s, offs_c = _pixel_block(BLOCK_S, BLOCK_C, INT64)  # offs_s: input pixels
    i = offs_s // W
    j = offs_s % W
    mask = (offs_s < H * W)[:, None] & (offs_c < C)[None, :]
    x = tl.load(x_ptr + pid_n * sxn + (i * sxh + j * sxw)[:, None] + offs_c[None, :] * sxc, mask=mask)
    base = y_ptr + pid_n * syn + (2 * i * syh + 2 * j * syw)[:, None] + offs_c[None, :] * syc
    tl.store(base, x, mask=mask)
    tl.store(base + syw, x, mask=mask)
    tl.store(base + syh, x, mask=mask)
    tl.store(base + syh + syw, x, mask=mask)


def _reach(*tensors: torch.Tensor) -> int:
    """The farthest element offset within one batch entry of these tensors (dims 1..): where it passes
    2³¹ the kernels index in int64 (the batch offset always is)."""
    return max(sum((size - 1) * st for size, st in zip(t.shape[1:], t.stride()[1:])) for t in tensors)


def _blocks(c: int, channels_contiguous: bool) -> tuple[int, int]:
    """(BLOCK_S, BLOCK_C): about 4096 elements a program, a pixel's channels in one row (as the RMS norm)."""
    block_c = next_power_of_2(c)
    block_s = max(1, 4096 // block_c)
    return (block_s if channels_contiguous else max(32, block_s)), block_c


def bias_residual_add_fwd(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """x + bias[c] + residual, in x's dtype and memory format; x and residual (N, C, *spatial)."""
    sx, sr = merged_spatial_strides(x), merged_spatial_strides(residual)
    if sx is None or sr is None:
        x, residual = x.contiguous(), residual.contiguous()
        sx, sr = merged_spatial_strides(x), merged_spatial_strides(residual)
    y = torch.empty_like(x)
    sy = merged_spatial_strides(y)
    n, c = x.shape[:2]
    s = math.prod(x.shape[2:])
    if y.numel() == 0:
        return y
    if n > MAX_GRID_Y:
        raise ValueError(f"x: batch {n} is over the {MAX_GRID_Y} programs a grid's second axis takes")
    block_s, block_c = _blocks(c, sx[1] == 1)
    reach = max((s - 1) * st[2] + (c - 1) * st[1] for st in (sx, sr, sy))
    _bias_residual_add_kernel[(cdiv(s, block_s), n)](
        x, bias, residual, y, c, s, *sx, *sr, *sy,
        BLOCK_S=block_s, BLOCK_C=block_c, INT64=reach > _INT32_MAX, num_warps=4,
    )
    return y


def bias_channel_to_space_add_fwd(y: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, src: torch.Tensor) -> None:
    """y (N, C, 2H, 2W) += bias[c] + x[n, src[c, i, j], h, w] in place; bias (C,), src (C, 2, 2) int32
    contiguous, x (N, Ci, H, W); any strides (the decoder's are channels-last)."""
    n, c, h2, w2 = y.shape
    if y.numel() == 0:
        return
    if n > MAX_GRID_Y:
        raise ValueError(f"y: batch {n} is over the {MAX_GRID_Y} programs a grid's second axis takes")
    block_s, block_c = _blocks(c, y.stride(1) == 1)
    reach = _reach(y, x)
    _bias_channel_to_space_add_kernel[(cdiv(h2 * w2, block_s), n)](
        y, bias, x, src, c, w2, h2 * w2, *y.stride(), *x.stride(),
        BLOCK_S=block_s, BLOCK_C=block_c, INT64=reach > _INT32_MAX, num_warps=4,
    )


def upsample_nearest2x_fwd(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) → (N, C, 2H, 2W) nearest (= nearest-exact at exactly 2x), in x's memory format."""
    n, c, h, w = x.shape
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and c > 1 else torch.contiguous_format
    y = torch.empty((n, c, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=fmt)
    if y.numel() == 0:
        return y
    if n > MAX_GRID_Y:
        raise ValueError(f"x: batch {n} is over the {MAX_GRID_Y} programs a grid's second axis takes")
    block_s, block_c = _blocks(c, x.stride(1) == 1)
    reach = _reach(x, y)
    _upsample_nearest2x_kernel[(cdiv(h * w, block_s), n)](
        x, y, c, h, w, *x.stride(), *y.stride(),
        BLOCK_S=block_s, BLOCK_C=block_c, INT64=reach > _INT32_MAX, num_warps=4,
    )
    return y


@torch.library.custom_op("qwenfast::bias_residual_add", mutates_args=())
def bias_residual_add_op(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return bias_residual_add_fwd(x, bias, residual)


@bias_residual_add_op.register_fake
def _(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("qwenfast::bias_channel_to_space_add_", mutates_args=("y",))
def bias_channel_to_space_add_op(y: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, src: torch.Tensor) -> None:
    bias_channel_to_space_add_fwd(y, bias, x, src)


@bias_channel_to_space_add_op.register_fake
def _(y: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, src: torch.Tensor) -> None:
    return None


@torch.library.custom_op("qwenfast::upsample_nearest2x", mutates_args=())
def upsample_nearest2x_op(x: torch.Tensor) -> torch.Tensor:
    return upsample_nearest2x_fwd(x)


@upsample_nearest2x_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and c > 1 else torch.contiguous_format
    return torch.empty((n, c, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=fmt)


__all__ = ["bias_residual_add_fwd", "upsample_nearest2x_fwd", "bias_channel_to_space_add_fwd", "bias_residual_add_op",
           "upsample_nearest2x_op", "bias_channel_to_space_add_op"]
