"""Per-pixel RMS norm (+ SiLU) of the Qwen-Image VAE, fused: one read of x, one write of y (or of each
of y's copies).

diffusers computes `F.normalize(x.float(), dim=1).to(x.dtype) * sqrt(C) * gamma` and then SiLU: four
to six passes over a decoder-sized tensor, two of them in fp32. Here one program takes BLOCK_S pixels
x all C channels, sums the squares in fp32, scales, applies gamma (and SiLU) and writes once.

Any memory format: x is seen as (N, C, S) with S the spatial dims merged (H*W, or T*H*W for 5-D),
which both NCHW and channels_last allow. Triton specialises a stride equal to 1, so the same kernel
reads a row of channels per pixel when channels are contiguous (channels_last, the decoder's GPU
layout, the fast case) and runs of pixels per channel when they are not (NCHW).

Layering: `_rms_norm_kernel` -> `rms_norm_fwd` (checks, allocation, grid) -> the custom op
`qwenfast::rms_norm` (with a fake for torch.compile) -> `qwenfast.ops.rms_norm`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._support import MAX_GRID_Y, cdiv, next_power_of_2

EPS = 1e-12  # F.normalize's floor on the norm: a zero pixel maps to 0
_INT32_MAX = 2**31 - 1


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # (N, C, S), strides (sxn, sxc, sxs)
    gamma_ptr,  # (C,)
    bias_ptr,  # (C,) added to x before the statistics (the preceding conv's bias), or unused
    y_ptr,  # (COPIES, N, C, S), strides (syr, syn, syc, sys): y keeps x's memory format
    C, S, scale, eps,  # scale = sqrt(C)
    sxn, sxc, sxs, syr, syn, syc, sys,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, SILU: tl.constexpr, INT64: tl.constexpr,
    HAS_BIAS: tl.constexpr, COPIES: tl.constexpr,  # y written COPIES times, syr elements apart
):
    pid_s = tl.program_id(0)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)  # (BLOCK_S,) pixels
    offs_c = tl.arange(0, BLOCK_C)  # (BLOCK_C,) channels, C rounded up to a power of two
    c_ok = offs_c < C
    if INT64:  # offsets inside one image may pass 2**31 elements (video, huge images; NCHW channels)
        offs_s = offs_s.to(tl.int64)
        offs_c = offs_c.to(tl.int64)
    mask = (offs_s < S)[:, None] & c_ok[None, :]

    x = tl.load(x_ptr + pid_n * sxn + offs_s[:, None] * sxs + offs_c[None, :] * sxc, mask=mask, other=0.0)
    x = x.to(tl.float32)  # (BLOCK_S, BLOCK_C)
    if HAS_BIAS:  # in fp32: the conv's output plus its bias is never rounded to x's dtype
        x += tl.load(bias_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    # F.normalize: x / max(||x||_2, eps) over the channels; masked lanes add zeros.
    inv = scale / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), eps)  # (BLOCK_S,)
    gamma = tl.load(gamma_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)  # (BLOCK_C,)
    y = x * inv[:, None] * gamma[None, :]
    if SILU:
        y = y * tl.sigmoid(y)
    y = y.to(y_ptr.dtype.element_ty)
    y_at = y_ptr + pid_n * syn + offs_s[:, None] * sys + offs_c[None, :] * syc  # copy 0
    for _ in tl.static_range(COPIES):  # the video path's stacked windows: each frame in three time-tap slots
        tl.store(y_at, y, mask=mask)
        y_at += syr  # a pointer step (64-bit), not r * syr in the arguments' int32


def merged_spatial_strides(x: torch.Tensor) -> tuple[int, int, int] | None:
    """The strides of x (N, C, *spatial) viewed as (N, C, S) without a copy, or None when its strides
    don't allow it. NCHW, channels_last and their 5-D versions all allow it: the spatial dims nest in
    memory. (No view is made: the kernels take x itself with these strides, which saves the host time
    of an `as_strided` per tensor and launch.)"""
    stride = x.stride()
    merged, inner = 1, None  # inner: (size, stride) of the next inner spatial dim of size > 1
    for size, st in zip(reversed(x.shape[2:]), reversed(stride[2:])):
        if size == 1:
            continue  # places nothing
        if inner is None:
            merged = st
        elif st != inner[0] * inner[1]:  # each dim's stride must be the next inner one's x its size
            return None
        inner = (size, st)
    return stride[0], stride[1], merged


def merged_spatial_view(x: torch.Tensor) -> torch.Tensor | None:
    """x (N, C, *spatial) as (N, C, S) without a copy, or None when its strides don't allow it."""
    strides = merged_spatial_strides(x)
    return None if strides is None else x.as_strided((*x.shape[:2], math.prod(x.shape[2:])), strides)


def _nesting(x: torch.Tensor) -> torch.Tensor:
    """x itself when its spatial dims merge, else a contiguous copy (a transposed view, say)."""
    return x if merged_spatial_strides(x) is not None else x.contiguous()


def _empty_output(x: torch.Tensor) -> torch.Tensor:
    """y in x's memory format (empty_like); NCHW when that layout would not merge (x not dense)."""
    y = torch.empty_like(x)
    return y if merged_spatial_strides(y) is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def default_blocks(c: int, channels_contiguous: bool) -> tuple[int, int, int]:
    """(BLOCK_S, BLOCK_C, num_warps): 4096 elements per program, 4 warps.

    On one H100, channels_last bf16: 96 x 1328² ran at 98% of the copy bandwidth with any tile from 16
    to 128 pixels; at 384 x 166² (42 MB) 8 pixels x 512 lanes with 4 warps beat 16 x 512 with 8
    warps (21 vs 23 µs) and 32 x 512 (32 µs): fewer, fatter programs starve a small tensor.
    """
    block_c = next_power_of_2(c)
    block_s = max(1, 4096 // block_c)
    if not channels_contiguous:  # NCHW: a run of >= 32 pixels per channel keeps the reads coalesced
        block_s = max(32, block_s)
    return block_s, block_c, 4


def rms_norm_fwd(
    x: torch.Tensor, gamma: torch.Tensor, silu: bool, bias: torch.Tensor | None = None,
    blocks: tuple[int, int, int] | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x' / max(||x'||_channels, 1e-12) * sqrt(C) * gamma (then SiLU), x' = x (+ bias per channel),
    in x's dtype and memory format, or written into `out` and returned: x's shape and dtype, any
    strides whose spatial dims nest (a slice of frames of a channels-last window, say), or (R, *x.shape)
    to write y into each out[r] from one read of x (the time-tap slots of a stacked window: out[r]
    equally strided, out.stride(0) apart).

    x (N, C, *spatial), gamma and bias (C,) contiguous. The caller (qwenfast.ops.rms_norm) has
    checked ranks, shapes and devices.
    """
    x = _nesting(x)
    if out is None:
        y = first = _empty_output(x)
        n_copies, syr = 1, 0
    else:
        if out.numel() == 0:
            return out
        y = out
        copies = out.dim() == x.dim() + 1  # out (R, *x.shape): y written into each out[r]
        first, n_copies, syr = (out[0], out.shape[0], out.stride(0)) if copies else (out, 1, 0)
        if merged_spatial_strides(first) is None:  # strides the kernel cannot write: a copy
            return out.copy_(rms_norm_fwd(x, gamma, silu, bias, blocks))
    if y.numel() == 0:
        return y
    (sxn, sxc, sxs), (syn, syc, sys) = merged_spatial_strides(x), merged_spatial_strides(first)
    n, c = x.shape[:2]
    s = math.prod(x.shape[2:])
    block_s, block_c, num_warps = blocks or default_blocks(c, sxc == 1)
    if block_c < c:
        raise ValueError(f"blocks: BLOCK_C = {block_c} must cover all {c} channels")
    if n > MAX_GRID_Y:
        raise ValueError(f"x: batch {n} is over the {MAX_GRID_Y} programs a grid's second axis takes")
    # the farthest element of one image (of one copy: the kernel steps its pointer from copy to copy), in
    # elements: past int32, the kernel indexes in int64
    reach = (s - 1) * max(sxs, sys) + (c - 1) * max(sxc, syc)
    _rms_norm_kernel[(cdiv(s, block_s), n)](
        x, gamma, bias, y, c, s, float(c) ** 0.5, EPS, sxn, sxc, sxs, syr, syn, syc, sys,
        BLOCK_S=block_s, BLOCK_C=block_c, SILU=silu, INT64=reach > _INT32_MAX, HAS_BIAS=bias is not None,
        COPIES=n_copies, num_warps=num_warps,
    )
    return y


@torch.library.custom_op("qwenfast::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, gamma: torch.Tensor, silu: bool, bias: torch.Tensor | None = None) -> torch.Tensor:
    return rms_norm_fwd(x, gamma, silu, bias=bias)


@rms_norm_op.register_fake
def _(x: torch.Tensor, gamma: torch.Tensor, silu: bool, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _empty_output(_nesting(x))


@torch.library.custom_op("qwenfast::rms_norm_out", mutates_args=("out",))
def rms_norm_out_op(x: torch.Tensor, gamma: torch.Tensor, silu: bool, bias: torch.Tensor | None,
                    out: torch.Tensor) -> None:
    """`rms_norm` written into `out` (the video path's frame windows)."""
    rms_norm_fwd(x, gamma, silu, bias=bias, out=out)


@rms_norm_out_op.register_fake
def _(x: torch.Tensor, gamma: torch.Tensor, silu: bool, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    return None


def rms_norm_bytes(x: torch.Tensor) -> int:
    """The fewest bytes the op can move: read x once, write y once."""
    return 2 * x.numel() * x.element_size()


__all__ = ["EPS", "default_blocks", "merged_spatial_strides", "merged_spatial_view", "rms_norm_bytes", "rms_norm_fwd", "rms_norm_op", "rms_norm_out_op"]
