"""Triton kernels of the modulation ops: kernels -> launchers -> torch.library ops (+ fakes) -> wrappers.

Two kernels, one per kind of op:
- `_norm_modulate_kernel`: y = LayerNorm(x') * (1 + scale_sel) + shift_sel, where x' is x, or with a
  residual, residual_out = residual + rgate_sel * x (stored); optionally the selected gate written too
  (the compatible API). Serves `layer_norm_modulate` and `residual_layer_norm_modulate`.
- `_gated_residual_kernel`: residual_out = residual + gate_sel * x alone (the block's last add).

Written for the bytes. The ops are memory-bound (a handful of FLOPs per element), so the minimum is
one read of x (and of residual) and one write of y (and of residual_out); the (B, C) parameters are
re-read per token but stay in L1/L2. One program of the norm kernel owns ROWS whole tokens: with
C <= MAX_TILE the row lives in registers and the two-pass variance costs no second read; above that
the chunked variant walks the row three times (sum, squared deviations, normalise), the later passes
hitting L2.

Semantics are those of `qwenfast.ops.modulate` (the fp32 reference): statistics in fp32, two-pass
biased variance, residual_out rounded to x's dtype before it is normalised.

The flat argument order of the launchers and the torch.library ops is the flattening of the
`Modulation` / `Select` structs of qwenfast.ops.modulate, the order of DESIGN.md §3:
(x, [residual, rgate0, rgate1,] weight, bias, scale0, shift0, gate0, scale1, shift1, gate1, index, eps).
A set-1 tensor that is None means that parameter is not selected (set 0 for every token).
"""

# No `from __future__ import annotations`: torch.library.custom_op reads the annotations as types.
import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..custom_op import launch
from ..modulate import check_modulate_args, parameter_sets
from ._support import cdiv, next_power_of_2, one_dtype, row_alignment

Tensor = torch.Tensor

# Above this padded row length the row no longer fits in registers: the chunked kernel takes over.
MAX_TILE = 8192
CHUNK = 2048


# ---------------------------------------------------------------------------------------------------
# Kernels. Tokens are the rows of x viewed as (N = B*L, C); token n is (b, l) = (n // L, n % L).
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _pick(p0_ptr, p1_ptr, off0, off1, cols, mask, sel, SELECT: tl.constexpr, ALIGN: tl.constexpr):
    """The (ROWS, BLOCK_C) fp32 parameter of each token: p1 where sel, else p0.

    p0_ptr/p1_ptr: rows of (B, C) (or (B, L, C)) tensors; off0/off1: (ROWS,) int64 element offsets of
    each token's row; sel: (ROWS,) bool. SELECT: choose the row's address, then one load (loading both
    sets and choosing per element was slower: benchmarks/results/modulate_notes.md, run 3).
    ALIGN: bytes that every row address of both sets is a multiple of (the launcher measures it).
    Triton knows the alignment of each pointer argument; Triton 3.6 keeps it through the per-token
    choice between two addresses, 3.9 loses it and, without the hint, reads the picked rows 2 bytes per
    instruction (64 scalar loads per thread and parameter at C = 3072, 4 warps, instead of 8 vector
    loads: 30-40% slower on an H100, modulate_notes.md, run 4).
    """
    if SELECT:
        row = tl.where(sel, p1_ptr + off1, p0_ptr + off0)  # (ROWS,) pointers
        if ALIGN > 0:
            row = tl.multiple_of(row, ALIGN)
        return tl.load(row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        return tl.load(p0_ptr + off0[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _gated_input(
    x_ptr, res_ptr, rg0_ptr, rg1_ptr, rout_ptr,
    x_off, rg0_off, rg1_off, out_off, cols, mask, sel,
    HAS_RESIDUAL: tl.constexpr, RG_SELECT: tl.constexpr, ALIGN: tl.constexpr,
):
    """Load a (ROWS, BLOCK_C) tile of x as fp32; with a residual (same strides as x), form
    residual + gate * x, store it (rounded to residual_out's dtype) and return the stored value, which
    is what gets normalised."""
    x = tl.load(x_ptr + x_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + x_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = _pick(rg0_ptr, rg1_ptr, rg0_off, rg1_off, cols, mask, sel, RG_SELECT, ALIGN)
        v = (r + g * x).to(rout_ptr.dtype.element_ty)
        tl.store(rout_ptr + out_off[:, None] + cols[None, :], v, mask=mask)
        x = v.to(tl.float32)
    return x


@triton.jit
def _modulate_store(
    x_hat, y_ptr, gate_ptr, w_ptr, b_ptr, sc0_ptr, sh0_ptr, g0_ptr, sc1_ptr, sh1_ptr, g1_ptr,
    p_off, out_off, cols, col_ok, mask, sel,
    SELECT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_GATE: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """y = (x_hat * weight + bias) * (1 + scale_sel) + shift_sel, stored; the selected gate too if
    asked. x_hat: (ROWS, BLOCK_C) fp32; p_off: (ROWS,) offsets of each token's parameter rows (both
    sets share the row stride); col_ok: (BLOCK_C,) columns inside C; mask: (ROWS, BLOCK_C)."""
    scale = _pick(sc0_ptr, sc1_ptr, p_off, p_off, cols, mask, sel, SELECT, ALIGN)
    shift = _pick(sh0_ptr, sh1_ptr, p_off, p_off, cols, mask, sel, SELECT, ALIGN)
    if HAS_WEIGHT:
        x_hat = x_hat * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        x_hat = x_hat + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = x_hat * (1.0 + scale) + shift
    tl.store(y_ptr + out_off[:, None] + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    if STORE_GATE:
        g = _pick(g0_ptr, g1_ptr, p_off, p_off, cols, mask, sel, SELECT, ALIGN)
        tl.store(gate_ptr + out_off[:, None] + cols[None, :], g.to(gate_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tokens(pid, N, L, sxb, sxl, idx_ptr, ANY_SELECT: tl.constexpr, ROWS: tl.constexpr):
    """Per token of this program: validity, number n, batch b, position l, the int64 offset of its row
    of x (int64 because B*L*C passes 2**31 at large batch x resolution), and whether it takes set 1
    (the (B, L) index is contiguous: token n's entry is at n)."""
    n = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    ok = n < N
    b = n // L
    l = n - b * L
    sel = ok  # unused unless selecting
    if ANY_SELECT:
        sel = tl.load(idx_ptr + n, mask=ok, other=0) != 0  # (ROWS,) bool: set 1?
    return ok, n, b, l, b * sxb + l * sxl, sel


@triton.jit
def _norm_modulate_kernel(
    y_ptr, gate_ptr, rout_ptr,  # (N, C) outputs, contiguous: y; the selected gate; residual_out
    x_ptr, res_ptr, sxb, sxl,  # (B, L, C) x and residual (same strides), stride(-1) == 1
    rg0_ptr, rg1_ptr, srgb, srgl,  # residual gate, sets 0 and 1: (B, C) rows (srgl = 0) or (B, L, C)
    w_ptr, b_ptr,  # (C,) LayerNorm affine
    sc0_ptr, sh0_ptr, g0_ptr, sc1_ptr, sh1_ptr, g1_ptr, sp,  # (B, C) rows of the two sets; one row stride
    idx_ptr,  # (B, L) int32 / int64 / uint8, contiguous
    N, L, C, eps,
    HAS_RESIDUAL: tl.constexpr, RG_SELECT: tl.constexpr, SELECT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_GATE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, CHUNKED: tl.constexpr,
    ALIGN: tl.constexpr,  # bytes every picked parameter row address is a multiple of (see _pick)
):
    pid = tl.program_id(0)
    ok, n, b, l, x_off, sel = _tokens(pid, N, L, sxb, sxl, idx_ptr, SELECT or RG_SELECT, ROWS)
    out_off = n * C  # (ROWS,) int64
    p_off = b * sp
    rg0_off = b * srgb + l * srgl
    rg1_off = rg0_off
    cols0 = tl.arange(0, BLOCK_C)

    if not CHUNKED:
        # The whole row in registers: one read of x (and residual), one write of each output.
        col_ok = cols0 < C
        mask = ok[:, None] & col_ok[None, :]  # (ROWS, BLOCK_C)
        v = _gated_input(x_ptr, res_ptr, rg0_ptr, rg1_ptr, rout_ptr, x_off, rg0_off, rg1_off, out_off,
                         cols0, mask, sel, HAS_RESIDUAL, RG_SELECT, ALIGN)
        mean = tl.sum(v, axis=1) / C
        d = tl.where(mask, v - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(d * d, axis=1) / C + eps)
        # The parameter loads after the statistics (the reductions' barriers keep them there; issuing
        # them first was within 1-2 µs either way: modulate_notes.md, run 5).
        _modulate_store(d * rstd[:, None], y_ptr, gate_ptr, w_ptr, b_ptr, sc0_ptr, sh0_ptr, g0_ptr, sc1_ptr,
                        sh1_ptr, g1_ptr, p_off, out_off, cols0, col_ok, mask, sel,
                        SELECT, HAS_WEIGHT, HAS_BIAS, STORE_GATE, ALIGN)
    else:
        # Pass 1: the mean (and residual_out, stored once).
        acc = tl.zeros((ROWS,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cols0
            mask = ok[:, None] & (cols < C)[None, :]
            v = _gated_input(x_ptr, res_ptr, rg0_ptr, rg1_ptr, rout_ptr, x_off, rg0_off, rg1_off, out_off,
                             cols, mask, sel, HAS_RESIDUAL, RG_SELECT, ALIGN)
            acc += tl.sum(v, axis=1)
        mean = acc / C
        # Later passes re-read the normalised input: x, or residual_out as this program stored it.
        src_ptr = x_ptr
        src_off = x_off
        if HAS_RESIDUAL:
            tl.debug_barrier()  # residual_out stores visible to the whole program before re-reading
            src_ptr = rout_ptr
            src_off = out_off
        # Pass 2: squared deviations from the mean (two-pass: no cancellation at large offsets).
        acc = tl.zeros((ROWS,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cols0
            mask = ok[:, None] & (cols < C)[None, :]
            v = tl.load(src_ptr + src_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, v - mean[:, None], 0.0)
            acc += tl.sum(d * d, axis=1)
        rstd = tl.rsqrt(acc / C + eps)
        # Pass 3: normalise, modulate, store.
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cols0
            col_ok = cols < C
            mask = ok[:, None] & col_ok[None, :]
            v = tl.load(src_ptr + src_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            _modulate_store((v - mean[:, None]) * rstd[:, None], y_ptr, gate_ptr, w_ptr, b_ptr, sc0_ptr, sh0_ptr,
                            g0_ptr, sc1_ptr, sh1_ptr, g1_ptr, p_off, out_off, cols, col_ok, mask, sel,
                            SELECT, HAS_WEIGHT, HAS_BIAS, STORE_GATE, ALIGN)


@triton.jit
def _gated_residual_kernel(
    out_ptr,  # (N, C) contiguous
    x_ptr, res_ptr, sxb, sxl,  # (B, L, C) x and residual (same strides), stride(-1) == 1
    g0_ptr, g1_ptr, sg,  # (B, C) gate rows of the two sets, one row stride
    idx_ptr,  # (B, L) int32 / int64 / uint8, contiguous
    N, L, C,
    SELECT: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr,
):
    # One token per program, its row in BLOCK_C-column chunks.
    ok, n, b, l, x_off, sel = _tokens(tl.program_id(0), N, L, sxb, sxl, idx_ptr, SELECT, 1)
    out_off = n * C
    g_off = b * sg
    cols0 = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        mask = ok[:, None] & (cols < C)[None, :]
        _gated_input(x_ptr, res_ptr, g0_ptr, g1_ptr, out_ptr, x_off, g_off, g_off, out_off, cols, mask, sel,
                     True, SELECT, ALIGN)


# ---------------------------------------------------------------------------------------------------
# Launchers: allocation, launch configuration, grid. They trust their caller's checks (the modules of
# qwenfast.ops.modulate in eager mode, the torch.library ops below otherwise).
# ---------------------------------------------------------------------------------------------------


class LaunchConfig(NamedTuple):
    """How one launch of the norm kernel tiles the work: ROWS tokens per program, BLOCK_C columns per
    tile, whole rows in registers or the chunked three-pass walk."""

    rows: int
    block_c: int
    num_warps: int
    chunked: bool

    def checked(self) -> "LaunchConfig":
        for name in ("rows", "block_c", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"LaunchConfig.{name} must be a power of two, got {v}")
        return self


@functools.lru_cache(maxsize=None)
def default_config(C: int) -> LaunchConfig:
    """The norm kernel's launch configuration for C channels (tuned on an H100 at C = 3072,
    benchmarks/results/modulate_*.md). Cached: it depends on C alone."""
    block = next_power_of_2(C)
    if block > MAX_TILE:
        # A row too long for registers: chunks of CHUNK columns, three passes.
        return LaunchConfig(1, CHUNK, 8, True)
    # Whole rows in registers, 4 warps for a 4096-wide tile: of 1-4 rows x 4-16 warps and chunked
    # tiles, the fastest at C = 3072 on an H100 (benchmarks/results/modulate_h100.md).
    rows = max(1, min(4, 4096 // block))
    return LaunchConfig(rows, block, max(1, min(16, rows * block // 1024)), False)


@functools.lru_cache(maxsize=None)
def gated_residual_config(C: int) -> tuple[int, int]:
    """(BLOCK_C, num_warps) of the gated residual kernel: 1024-column chunks, one 16-byte bf16 vector
    per thread and tensor; 3072 = 3 x 1024 leaves no lane idle."""
    block_c = min(next_power_of_2(C), 1024)
    return block_c, max(1, min(4, block_c // 256))


_row_alignment = row_alignment  # the name the tests and benchmarks know


def _row_stride(rows: list[Optional[Tensor]]) -> tuple[int, list[Optional[Tensor]]]:
    """One row stride for these (B, C) parameter rows: theirs when they agree (row views of one chunked
    (B, 6C) tensor do), else contiguous copies of them all (B x C elements each, never seen on the DiT
    path). With one row the stride is never used."""
    present = [t for t in rows if t is not None]
    if not present or present[0].shape[0] == 1:
        return 0, rows
    s = present[0].stride(0)
    if all(t.stride(0) == s for t in present):
        return s, rows
    return present[0].shape[1], [None if t is None else t.contiguous() for t in rows]


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return all(sa == sb or n == 1 for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


def _tokens_of(x: Tensor, residual: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """x and residual with one set of strides (the kernels index both with x's): as they are when they
    agree, else contiguous."""
    if residual is None or _same_layout(x, residual):
        return x, residual
    x, residual = x.contiguous(), residual.contiguous()
    return x, residual


def _index_of(index: Optional[Tensor]) -> Optional[Tensor]:
    """The (B, L) index as the kernels read it: contiguous, bool as uint8 (same bytes; Triton reads
    bytes, not i1)."""
    if index is None:
        return None
    if index.dtype == torch.bool:
        index = index.view(torch.uint8)
    return index if index.is_contiguous() else index.contiguous()


# Host time: the launchers below run on every eager call, so they are written straight: no lists or
# dicts built per call, and every tensor the kernel does not read (the constexpr flags off) passed as
# None. Triton specialises a None argument as a constexpr: its launcher skips it, where each tensor
# argument costs a `data_ptr()` call and a driver query of the pointer on every launch.


def _empty_tokens(x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A fresh contiguous (B, L, C) output for x's tokens (x's dtype unless given): `empty_like` when
    x has the contiguous strides itself (half the host time of `torch.empty(shape, dtype=, device=)`)."""
    B, L, C = x.shape
    if x.stride() == (L * C, C, 1):
        return torch.empty_like(x) if dtype is None else torch.empty_like(x, dtype=dtype)
    return torch.empty(x.shape, dtype=x.dtype if dtype is None else dtype, device=x.device)


def _norm_modulate_fwd(x, weight, bias, scale0, shift0, gate0, scale1, shift1, gate1, index, eps, *, residual=None,
                       rgate0=None, rgate1=None, config=None):
    """Run the norm kernel; returns (y, residual_out, gate), None where not computed.

    residual given: residual_out = residual + rgate_sel * x first (rgate0 (B, C) or (B, L, C); picked
    per token with rgate1 when rgate1 is given). gate0 given: the selected gate (B, L, C) is written
    too. scale1/shift1 (and gate1) given: the set is picked per token by index.
    """
    B, L, C = x.shape
    N = B * L
    has_res = residual is not None
    store_gate = gate0 is not None
    y = _empty_tokens(x)
    rout = _empty_tokens(x) if has_res else None
    gate = _empty_tokens(x, gate0.dtype) if store_gate else None
    if N == 0 or C == 0:
        return y, rout, gate  # nothing to compute: no launch

    select = index is not None and scale1 is not None
    rg_full = has_res and rgate0.dim() == 3
    rg_select = has_res and index is not None and rgate1 is not None and not rg_full
    if not select:
        scale1 = shift1 = gate1 = None
    elif not (scale0.dtype == scale1.dtype and shift0.dtype == shift1.dtype
              and (not store_gate or gate0.dtype == gate1.dtype)):
        # The kernel picks a set by row address: both sets in one dtype (exact promotion).
        scale0, scale1 = one_dtype(scale0, scale1)
        shift0, shift1 = one_dtype(shift0, shift1)
        gate0, gate1 = one_dtype(gate0, gate1)
    if not store_gate:
        gate1 = None
    srgb = srgl = 0
    if rg_select:  # both sets' rows in one dtype with one row stride, as the norm parameters below
        if rgate0.dtype != rgate1.dtype:
            rgate0, rgate1 = one_dtype(rgate0, rgate1)
        if B > 1:
            srgb = rgate0.stride(0)
            if rgate1.stride(0) != srgb:
                srgb, (rgate0, rgate1) = _row_stride([rgate0, rgate1])
    elif has_res:
        rgate1 = None
        srgb, srgl = rgate0.stride(0), rgate0.stride(1) if rg_full else 0
    sp = 0
    if B > 1:  # one row stride for all the norm's parameter rows (a single row needs none)
        sp = scale0.stride(0)
        if not (shift0.stride(0) == sp and (gate0 is None or gate0.stride(0) == sp)
                and (scale1 is None or scale1.stride(0) == shift1.stride(0) == sp)
                and (gate1 is None or gate1.stride(0) == sp)):
            sp, (scale0, shift0, gate0, scale1, shift1, gate1) = _row_stride([scale0, shift0, gate0, scale1, shift1,
                                                                              gate1])
    if has_res and x.stride() != residual.stride():
        x, residual = _tokens_of(x, residual)
    index = _index_of(index) if select or rg_select else None
    cfg = config.checked() if config is not None else default_config(C)
    # Only the rows picked by address need the hint; set-0-only loads keep Triton's own.
    align = 16
    if select:
        align = row_alignment(scale0, scale1, shift0, shift1, gate0, gate1)
    if rg_select:
        align = min(align, row_alignment(rgate0, rgate1))
    _norm_modulate_kernel[(cdiv(N, cfg.rows),)](
        y, gate, rout, x, residual, x.stride(0), x.stride(1), rgate0, rgate1, srgb, srgl, weight, bias,
        scale0, shift0, gate0, scale1, shift1, gate1, sp, index, N, L, C, eps,
        HAS_RESIDUAL=has_res, RG_SELECT=rg_select, SELECT=select,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, STORE_GATE=store_gate,
        ROWS=cfg.rows, BLOCK_C=cfg.block_c, CHUNKED=cfg.chunked, ALIGN=align, num_warps=cfg.num_warps,
    )
    return y, rout, gate


def layer_norm_modulate_fwd(x, weight, bias, scale0, shift0, gate0, scale1, shift1, gate1, index, eps, config=None):
    """(y, gate or None): the norm kernel without a residual."""
    y, _, gate = _norm_modulate_fwd(x, weight, bias, scale0, shift0, gate0, scale1, shift1, gate1, index, eps,
                                    config=config)
    return y, gate


def residual_layer_norm_modulate_fwd(x, residual, rgate0, rgate1, weight, bias, scale0, shift0, gate0, scale1, shift1,
                                     gate1, index, eps, config=None):
    """(y, residual_out, gate or None): the norm kernel after the gated residual add."""
    return _norm_modulate_fwd(x, weight, bias, scale0, shift0, gate0, scale1, shift1, gate1, index, eps,
                              residual=residual, rgate0=rgate0, rgate1=rgate1, config=config)


def gated_residual_fwd(x, residual, gate0, gate1, index):
    """residual + gate_sel * x in x's dtype; gate0/gate1 (B, C) rows, gate1 picked where index != 0."""
    B, L, C = x.shape
    N = B * L
    out = _empty_tokens(x)
    if N == 0 or C == 0:
        return out
    select = index is not None and gate1 is not None
    if not select:
        gate1 = index = None
    elif gate0.dtype != gate1.dtype:
        gate0, gate1 = one_dtype(gate0, gate1)
    sg = 0
    if B > 1:
        sg = gate0.stride(0)
        if gate1 is not None and gate1.stride(0) != sg:
            sg, (gate0, gate1) = _row_stride([gate0, gate1])
    if x.stride() != residual.stride():
        x, residual = _tokens_of(x, residual)
    block_c, num_warps = gated_residual_config(C)
    _gated_residual_kernel[(N,)](
        out, x, residual, x.stride(0), x.stride(1), gate0, gate1, sg, _index_of(index), N, L, C,
        SELECT=select, BLOCK_C=block_c, ALIGN=row_alignment(gate0, gate1) if select else 16, num_warps=num_warps,
    )
    return out


# ---------------------------------------------------------------------------------------------------
# torch.library ops: torch.compile keeps each as one node (no graph break) and CUDA graphs capture the
# launch. They check their arguments (they may be called directly). Outputs are fresh contiguous
# tensors; a gate that was not asked for comes back empty (0,).
# ---------------------------------------------------------------------------------------------------


def _check_flat(x, weight, bias, scale0, shift0, gate0, scale1, shift1, gate1, index, residual=None, rgate0=None,
                rgate1=None):
    rows = {"scale0": scale0, "shift0": shift0}
    set1 = {"scale1": scale1, "shift1": shift1}
    if gate0 is not None:
        rows["gate0"], set1["gate1"] = gate0, gate1
    if scale1 is None and shift1 is None and gate1 is None:
        set1 = {}  # set 0 for every token (the index may select the residual gate alone)
    if residual is not None:
        check_modulate_args(x, index=index, residual=residual, rows_or_full={"rgate0": rgate0},
                            set1={} if rgate1 is None else {"rgate1": rgate1})
    check_modulate_args(x, index=index, vectors={"weight": weight, "bias": bias}, rows=rows, set1=set1)


def _empty_gate(x: Tensor) -> Tensor:
    return x.new_empty((0,))


def _fake_gate(x: Tensor, gate0: Optional[Tensor]) -> Tensor:
    return torch.empty(x.shape, dtype=gate0.dtype, device=x.device) if gate0 is not None else _empty_gate(x)


@torch.library.custom_op("qwenfast::layer_norm_modulate", mutates_args=())
def layer_norm_modulate_op(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], scale0: Tensor, shift0: Tensor,
    gate0: Optional[Tensor], scale1: Optional[Tensor], shift1: Optional[Tensor], gate1: Optional[Tensor],
    index: Optional[Tensor], eps: float,
) -> tuple[Tensor, Tensor]:
    _check_flat(x, weight, bias, scale0, shift0, gate0, scale1, shift1, gate1, index)
    y, gate = layer_norm_modulate_fwd(x, weight, bias, scale0, shift0, gate0, scale1, shift1, gate1, index, eps)
    return y, gate if gate is not None else _empty_gate(x)


@layer_norm_modulate_op.register_fake
def _(x, weight, bias, scale0, shift0, gate0, scale1, shift1, gate1, index, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), _fake_gate(x, gate0)


@torch.library.custom_op("qwenfast::residual_layer_norm_modulate", mutates_args=())
def residual_layer_norm_modulate_op(
    x: Tensor, residual: Tensor, rgate0: Tensor, rgate1: Optional[Tensor], weight: Optional[Tensor],
    bias: Optional[Tensor], scale0: Tensor, shift0: Tensor, gate0: Optional[Tensor], scale1: Optional[Tensor],
    shift1: Optional[Tensor], gate1: Optional[Tensor], index: Optional[Tensor], eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_flat(x, weight, bias, scale0, shift0, gate0, scale1, shift1, gate1, index, residual, rgate0, rgate1)
    y, rout, gate = residual_layer_norm_modulate_fwd(x, residual, rgate0, rgate1, weight, bias, scale0, shift0, gate0,
                                                     scale1, shift1, gate1, index, eps)
    return y, rout, gate if gate is not None else _empty_gate(x)


@residual_layer_norm_modulate_op.register_fake
def _(x, residual, rgate0, rgate1, weight, bias, scale0, shift0, gate0, scale1, shift1, gate1, index, eps):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(x.shape, dtype=x.dtype, device=x.device), _fake_gate(x, gate0))


@torch.library.custom_op("qwenfast::gated_residual", mutates_args=())
def gated_residual_op(
    x: Tensor, residual: Tensor, gate0: Tensor, gate1: Optional[Tensor], index: Optional[Tensor]
) -> Tensor:
    check_modulate_args(x, index=index, residual=residual, rows={"gate0": gate0},
                        set1={} if gate1 is None else {"gate1": gate1})
    return gated_residual_fwd(x, residual, gate0, gate1, index)


@gated_residual_op.register_fake
def _(x, residual, gate0, gate1, index):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# ---------------------------------------------------------------------------------------------------
# The Triton implementation of the three ops, in the convention of the fp32 reference
# (qwenfast.ops.modulate.*_native): flattened here, once, into the launchers' / ops' order. Called by
# the modules after their checks; `launch` picks the torch.library op under torch.compile and the
# launcher in eager mode (no dispatcher round trip, no second check).
# ---------------------------------------------------------------------------------------------------


def _flat(params, with_gate: bool):
    """(scale0, shift0, gate0, scale1, shift1, gate1, index) of a Modulation / Select; gates only when
    `with_gate` (the compatible API writes the selected gate)."""
    s0, s1, index = parameter_sets(params)
    g0 = s0.gate if with_gate else None
    if s1 is None:
        return s0.scale, s0.shift, g0, None, None, None, index
    return s0.scale, s0.shift, g0, s1.scale, s1.shift, s1.gate if with_gate else None, index


def layer_norm_modulate_triton(x, params, *, weight=None, bias=None, eps=1e-6, with_gate=False):
    sc0, sh0, g0, sc1, sh1, g1, index = _flat(params, with_gate)
    y, gate = launch(layer_norm_modulate_op, layer_norm_modulate_fwd, x, weight, bias, sc0, sh0, g0, sc1, sh1, g1,
                     index, eps)
    return y, gate if g0 is not None else None


def residual_layer_norm_modulate_triton(x, residual, residual_params, params, *, weight=None, bias=None, eps=1e-6,
                                        with_gate=False):
    r0, r1, rindex = parameter_sets(residual_params)
    sc0, sh0, g0, sc1, sh1, g1, index = _flat(params, with_gate)
    y, rout, gate = launch(residual_layer_norm_modulate_op, residual_layer_norm_modulate_fwd, x, residual, r0.gate,
                           None if r1 is None else r1.gate, weight, bias, sc0, sh0, g0, sc1, sh1, g1,
                           index if index is not None else rindex, eps)
    return y, rout, gate if g0 is not None else None


def gated_residual_triton(x, residual, params):
    s0, s1, index = parameter_sets(params)
    return launch(gated_residual_op, gated_residual_fwd, x, residual, s0.gate, None if s1 is None else s1.gate, index)
