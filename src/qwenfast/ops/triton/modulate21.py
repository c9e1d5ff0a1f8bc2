"""Triton kernels of the Qwen-Image-2.1 modulation ops: kernel -> launcher -> torch.library op (+ fake)
-> the entry points that `qwenfast.ops.modulate21` calls.

Written for the bytes: the ops are memory-bound, the minimum is one read of x (and residual) and one
write of y (and residual_out). A token's parameter row, its sample's or the shared one, is picked by
address per token and read from L1/L2 (B + 1 rows serve every token). One program owns ROWS whole
tokens of the LayerNorm kernels, the row in registers (C <= MAX_KERNEL_C), so the two-pass variance
costs no second read. The elementwise gated add tiles (token, column block) on a 2-D grid.

Semantics are those of the fp32 reference in `qwenfast.ops.modulate21`: statistics in fp32, two-pass
biased variance, residual_out rounded to x's dtype before it is normalised, tanh in fp32.
"""

# No `from __future__ import annotations`: torch.library.custom_op reads the annotations as types.
import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..modulate21 import Rows, check_modulate21_args
from ..custom_op import launch
from ._support import cdiv, next_power_of_2, one_dtype, row_alignment

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------------
# Kernels. x, residual and the outputs are (N, C) contiguous, N = B*L tokens; token n is sample
# b = n // L, position l = n % L. Parameter rows: `*_ptr` (B, C) with a row stride, `*_shared_ptr` (C,).
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _tile(col0, N, L, C, target_mask_ptr, SELECT: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's ROWS tokens x BLOCK_C columns from col0: each token's sample b and whether it
    takes its sample's row (True) or the shared row; the columns, the in-bounds mask and the (int64:
    N*C passes 2**31 at large batch x resolution) element offsets of the tile."""
    n = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    ok = n < N
    b = n // L
    takes_sample = ok
    if SELECT:
        takes_sample = tl.load(target_mask_ptr + (n - b * L), mask=ok, other=0) != 0
    cols = col0 + tl.arange(0, BLOCK_C)
    mask = ok[:, None] & (cols < C)[None, :]
    return b, takes_sample, cols, mask, n[:, None] * C + cols[None, :]


@triton.jit
def _picked_rows(p_ptr, p_stride, p_shared_ptr, b, takes_sample, cols, mask,
                 SELECT: tl.constexpr, ALIGN: tl.constexpr):
    """(ROWS, BLOCK_C) fp32: each token's parameter, from its sample's row or (SELECT) the shared row.
    ALIGN: bytes every row address is a multiple of (the launcher measures it). Triton knows each
    pointer argument's alignment but loses it through the per-token choice of address; without the
    hint it would read the rows 2 bytes per instruction (benchmarks/results/modulate_notes.md)."""
    row = p_ptr + b * p_stride  # (ROWS,) pointers
    if SELECT:
        row = tl.where(takes_sample, row, p_shared_ptr + b * 0)
        row = tl.multiple_of(row, ALIGN)
    return tl.load(row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _tanh(g):
    # tanh(g) = sign(g) (1 - e) / (1 + e), e = exp(-2|g|) in (0, 1]: finite for every g. (libdevice's
    # tanh has no implementation in Triton's interpreter, and the tests run the kernels there.) Its
    # absolute error, ~1e-7, sits far below the fp32 resolution of the residual it is added to.
    e = tl.exp(-2.0 * tl.abs(g))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(g < 0, -t, t)


@triton.jit
def _tanh_gated_sum(x_ptr, residual_ptr, gate_ptr, gate_stride, gate_shared_ptr, offs, b, takes_sample, cols, mask,
                    SELECT: tl.constexpr, ALIGN: tl.constexpr):
    """(ROWS, BLOCK_C) fp32 residual + tanh(gate_sel) * x of this program's tile (offs: its elements)."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gate = _picked_rows(gate_ptr, gate_stride, gate_shared_ptr, b, takes_sample, cols, mask, SELECT, ALIGN)
    return r + _tanh(gate) * x


@triton.jit
def _normalise(v, mask, C, eps):
    """(ROWS, BLOCK_C) fp32 -> LayerNorm without affine; two-pass variance (masked lanes excluded)."""
    mean = tl.sum(v, axis=1) / C
    d = tl.where(mask, v - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(d * d, axis=1) / C + eps)
    return d * rstd[:, None]


@triton.jit
def _layer_norm_scale_kernel(
    y_ptr,  # (N, C) out
    x_ptr,  # (N, C)
    scale_ptr, scale_stride, scale_shared_ptr,  # (B, C) rows, their row stride; (C,)
    target_mask_ptr,  # (L,) uint8
    N, L, C, eps,
    SELECT: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr,
):
    b, takes_sample, cols, mask, offs = _tile(0, N, L, C, target_mask_ptr, SELECT, ROWS, BLOCK_C)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale = _picked_rows(scale_ptr, scale_stride, scale_shared_ptr, b, takes_sample, cols, mask, SELECT, ALIGN)
    y = _normalise(x, mask, C, eps) * (1.0 + scale)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _residual_layer_norm_scale_kernel(
    y_ptr, residual_out_ptr,  # (N, C) out
    x_ptr, residual_ptr,  # (N, C)
    gate_ptr, gate_stride, gate_shared_ptr,  # (B, C) rows, their row stride; (C,)
    scale_ptr, scale_stride, scale_shared_ptr,
    target_mask_ptr,  # (L,) uint8
    N, L, C, eps,
    SELECT: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr,
):
    b, takes_sample, cols, mask, offs = _tile(0, N, L, C, target_mask_ptr, SELECT, ROWS, BLOCK_C)
    h = _tanh_gated_sum(x_ptr, residual_ptr, gate_ptr, gate_stride, gate_shared_ptr, offs, b, takes_sample, cols, mask,
                        SELECT, ALIGN)
    stored = h.to(residual_out_ptr.dtype.element_ty)
    tl.store(residual_out_ptr + offs, stored, mask=mask)
    scale = _picked_rows(scale_ptr, scale_stride, scale_shared_ptr, b, takes_sample, cols, mask, SELECT, ALIGN)
    y = _normalise(stored.to(tl.float32), mask, C, eps) * (1.0 + scale)  # the stored value, as diffusers
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tanh_gated_residual_kernel(
    out_ptr,  # (N, C) out
    x_ptr, residual_ptr,  # (N, C)
    gate_ptr, gate_stride, gate_shared_ptr,  # (B, C) rows, their row stride; (C,)
    target_mask_ptr,  # (L,) uint8
    N, L, C,
    SELECT: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr,
):
    b, takes_sample, cols, mask, offs = _tile(tl.program_id(1) * BLOCK_C, N, L, C, target_mask_ptr, SELECT, ROWS,
                                              BLOCK_C)  # this program's column block
    h = _tanh_gated_sum(x_ptr, residual_ptr, gate_ptr, gate_stride, gate_shared_ptr, offs, b, takes_sample, cols, mask,
                        SELECT, ALIGN)
    tl.store(out_ptr + offs, h.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launchers: layout, allocation, launch configuration, grid.
# ---------------------------------------------------------------------------------------------------


class LaunchConfig(NamedTuple):
    """ROWS tokens x BLOCK_C columns per program, and its warps."""

    rows: int
    block_c: int
    num_warps: int


@functools.lru_cache(maxsize=None)
def default_config(C: int, normalises: bool) -> LaunchConfig:
    """The LayerNorm kernels: whole rows, 1-4 of them per program, a warp per 1024 elements (at most
    16): the shape of the fastest configuration of the Qwen-Image kernels on an H100 at C = 3072
    (benchmarks/results/modulate_h100.md). The gated add: 1024-column blocks, one 16-byte bf16 vector a
    thread and tensor. Cached: it runs on every launch (and depends on C alone)."""
    block = next_power_of_2(max(C, 1))
    if not normalises:
        block_c = min(block, 1024)
        return LaunchConfig(1, block_c, max(1, min(4, block_c // 256)))
    rows = max(1, min(4, 4096 // block))
    return LaunchConfig(rows, block, max(1, min(16, rows * block // 1024)))


# Host time: these run on every eager call, so they are written straight (no structs, lists or dicts
# built per call), and a tensor the kernel does not read (no mask: the shared rows and the mask) is
# passed as None, which Triton specialises as a constexpr: its launcher skips it, where each tensor
# argument costs a `data_ptr()` call and a driver query of the pointer on every launch.


def _mask_bytes(target_mask: Optional[Tensor]) -> Optional[Tensor]:
    # Triton reads bytes, not i1: the same bytes as uint8.
    return None if target_mask is None else target_mask.contiguous().view(torch.uint8)


def layer_norm_scale_fwd(x: Tensor, scale: Tensor, scale_shared: Optional[Tensor], target_mask: Optional[Tensor],
                         eps: float, config: Optional[LaunchConfig] = None) -> Tensor:
    """Launch `_layer_norm_scale_kernel`; the arguments as the library op takes them (checked)."""
    B, L, C = x.shape
    x = x.contiguous()  # a no-op for the DiT's activations
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    select = target_mask is not None
    scale, scale_shared = one_dtype(scale, scale_shared if select else None)
    cfg = config or default_config(C, True)
    _layer_norm_scale_kernel[(cdiv(B * L, cfg.rows),)](
        y, x, scale, scale.stride(0), scale_shared, _mask_bytes(target_mask), B * L, L, C, eps,
        SELECT=select, ROWS=cfg.rows, BLOCK_C=cfg.block_c,
        ALIGN=row_alignment(scale, scale_shared) if select else 16, num_warps=cfg.num_warps,
    )
    return y


def residual_layer_norm_scale_fwd(x: Tensor, residual: Tensor, gate: Tensor, gate_shared: Optional[Tensor],
                                  scale: Tensor, scale_shared: Optional[Tensor], target_mask: Optional[Tensor],
                                  eps: float, config: Optional[LaunchConfig] = None) -> tuple[Tensor, Tensor]:
    """Launch `_residual_layer_norm_scale_kernel`; returns (y, residual_out), both in x's dtype."""
    B, L, C = x.shape
    x, residual = x.contiguous(), residual.contiguous()
    y, residual_out = torch.empty_like(x), torch.empty_like(x)
    if y.numel() == 0:
        return y, residual_out
    select = target_mask is not None
    gate, gate_shared = one_dtype(gate, gate_shared if select else None)
    scale, scale_shared = one_dtype(scale, scale_shared if select else None)
    cfg = config or default_config(C, True)
    _residual_layer_norm_scale_kernel[(cdiv(B * L, cfg.rows),)](
        y, residual_out, x, residual, gate, gate.stride(0), gate_shared, scale, scale.stride(0), scale_shared,
        _mask_bytes(target_mask), B * L, L, C, eps,
        SELECT=select, ROWS=cfg.rows, BLOCK_C=cfg.block_c,
        ALIGN=row_alignment(gate, gate_shared, scale, scale_shared) if select else 16, num_warps=cfg.num_warps,
    )
    return y, residual_out


def tanh_gated_residual_fwd(x: Tensor, residual: Tensor, gate: Tensor, gate_shared: Optional[Tensor],
                            target_mask: Optional[Tensor], config: Optional[LaunchConfig] = None) -> Tensor:
    """Launch `_tanh_gated_residual_kernel`; returns residual + tanh(gate_sel) * x in x's dtype."""
    B, L, C = x.shape
    x, residual = x.contiguous(), residual.contiguous()
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    select = target_mask is not None
    gate, gate_shared = one_dtype(gate, gate_shared if select else None)
    cfg = config or default_config(C, False)
    _tanh_gated_residual_kernel[(cdiv(B * L, cfg.rows), cdiv(C, cfg.block_c))](
        out, x, residual, gate, gate.stride(0), gate_shared, _mask_bytes(target_mask), B * L, L, C,
        SELECT=select, ROWS=cfg.rows, BLOCK_C=cfg.block_c,
        ALIGN=row_alignment(gate, gate_shared) if select else 16, num_warps=cfg.num_warps,
    )
    return out


# ---------------------------------------------------------------------------------------------------
# torch.library ops: torch.compile keeps each as one graph node, CUDA graphs capture the launch.
# Flat signatures (a library op takes tensors, not structs): each Rows is (rows, shared-or-None).
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("qwenfast::layer_norm_scale", mutates_args=())
def _layer_norm_scale_op(x: Tensor, scale: Tensor, scale_shared: Optional[Tensor], target_mask: Optional[Tensor],
                         eps: float) -> Tensor:
    check_modulate21_args(x, target_mask=target_mask, scale=Rows(scale, scale_shared))
    return layer_norm_scale_fwd(x, scale, scale_shared, target_mask, eps)


@_layer_norm_scale_op.register_fake
def _(x, scale, scale_shared, target_mask, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("qwenfast::residual_layer_norm_scale", mutates_args=())
def _residual_layer_norm_scale_op(x: Tensor, residual: Tensor, gate: Tensor, gate_shared: Optional[Tensor],
                                  scale: Tensor, scale_shared: Optional[Tensor], target_mask: Optional[Tensor],
                                  eps: float) -> tuple[Tensor, Tensor]:
    check_modulate21_args(x, target_mask=target_mask, residual=residual, gate=Rows(gate, gate_shared),
                          scale=Rows(scale, scale_shared))
    return residual_layer_norm_scale_fwd(x, residual, gate, gate_shared, scale, scale_shared, target_mask, eps)


@_residual_layer_norm_scale_op.register_fake
def _(x, residual, gate, gate_shared, scale, scale_shared, target_mask, eps):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(x.shape, dtype=x.dtype, device=x.device))


@torch.library.custom_op("qwenfast::tanh_gated_residual", mutates_args=())
def _tanh_gated_residual_op(x: Tensor, residual: Tensor, gate: Tensor, gate_shared: Optional[Tensor],
                            target_mask: Optional[Tensor]) -> Tensor:
    check_modulate21_args(x, target_mask=target_mask, residual=residual, gate=Rows(gate, gate_shared))
    return tanh_gated_residual_fwd(x, residual, gate, gate_shared, target_mask)


@_tanh_gated_residual_op.register_fake
def _(x, residual, gate, gate_shared, target_mask):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# ---------------------------------------------------------------------------------------------------
# Entry points with the reference's signatures. Under torch.compile through the library ops (one graph
# node each); in eager mode straight to the launcher: the dispatcher round trip would add host time
# per call, which is most of the cost at small L (`_support.launch`). `checked=True`: the caller (a
# module of qwenfast.ops.modulate21) has run the argument checks already.
# ---------------------------------------------------------------------------------------------------


def layer_norm_scale_triton(x: Tensor, *, scale: Rows, target_mask: Optional[Tensor] = None, eps: float = 1e-6,
                            checked: bool = False) -> Tensor:
    if not checked:
        check_modulate21_args(x, target_mask=target_mask, scale=scale)
    return launch(torch.ops.qwenfast.layer_norm_scale, layer_norm_scale_fwd,
                  x, scale.sample, scale.shared, target_mask, eps)


def residual_layer_norm_scale_triton(x: Tensor, residual: Tensor, *, gate: Rows, scale: Rows,
                                     target_mask: Optional[Tensor] = None, eps: float = 1e-6,
                                     checked: bool = False) -> tuple[Tensor, Tensor]:
    if not checked:
        check_modulate21_args(x, target_mask=target_mask, residual=residual, gate=gate, scale=scale)
    return launch(torch.ops.qwenfast.residual_layer_norm_scale, residual_layer_norm_scale_fwd,
                  x, residual, gate.sample, gate.shared, scale.sample, scale.shared, target_mask, eps)


def tanh_gated_residual_triton(x: Tensor, residual: Tensor, *, gate: Rows, target_mask: Optional[Tensor] = None,
                               checked: bool = False) -> Tensor:
    if not checked:
        check_modulate21_args(x, target_mask=target_mask, residual=residual, gate=gate)
    return launch(torch.ops.qwenfast.tanh_gated_residual, tanh_gated_residual_fwd,
                  x, residual, gate.sample, gate.shared, target_mask)
