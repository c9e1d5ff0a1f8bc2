"""Triton kernels of the modulation ops: kernel -> launcher -> torch.library op (+ fake) -> wrappers.

Written for the bytes. The op is memory-bound (a handful of FLOPs per element), so the minimum is one
read of x (and of residual) and one write of y (and of residual_out); the (B, C) parameters are
re-read per token but stay in L1/L2. One program owns ROWS whole tokens: with C <= MAX_TILE the row
lives in registers and the two-pass variance costs no second read; above that, a chunked kernel walks
the row three times (sum, squared deviations, normalise), the later passes hitting L2.

Semantics are those of `qwenfast.ops.modulate` (the fp32 reference): statistics in fp32, two-pass
biased variance, residual_out rounded to x's dtype before it is normalised.
"""

# No `from __future__ import annotations`: torch.library.custom_op reads the annotations as types.
from typing import Optional

import torch
import triton
import triton.language as tl

from ..modulate import check_modulate_args

Tensor = torch.Tensor

# How a kernel picks a token's parameter set (see _pick).
PICK_ADDRESS, PICK_BOTH = 1, 2
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
    each token's row; sel: (ROWS,) bool. SELECT: 0 = set 0 only; PICK_ADDRESS = choose the row's
    address, then one load (no extra bytes or address arithmetic, but the load waits for the index);
    PICK_BOTH = load both sets (cache hits: the rows are shared by all tokens of a batch) and choose
    per element, so the loads do not wait for the index. (Both sets share a dtype: the launcher sees to
    it.)
    ALIGN: bytes that every row address of both sets is a multiple of (the launcher measures it; 0: no
    hint). Triton knows the alignment of each pointer argument; Triton 3.6 keeps it through the
    per-token choice between two addresses, 3.9 loses it and, without the hint, reads the picked rows
    2 bytes per instruction (64 scalar loads per thread and parameter at C = 3072, 4 warps, instead of
    8 vector loads: 30-40% slower on an H100, benchmarks/results/modulate_notes.md, run 4).
    """
    if SELECT == 1:
        row = tl.where(sel, p1_ptr + off1, p0_ptr + off0)  # (ROWS,) pointers
        if ALIGN > 0:
            row = tl.multiple_of(row, ALIGN)
        return tl.load(row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    elif SELECT == 2:
        a = tl.load(p0_ptr + off0[:, None] + cols[None, :], mask=mask, other=0.0)
        b = tl.load(p1_ptr + off1[:, None] + cols[None, :], mask=mask, other=0.0)
        return tl.where(sel[:, None], b, a).to(tl.float32)
    else:
        return tl.load(p0_ptr + off0[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _gated_input(
    x_ptr, res_ptr, rg0_ptr, rg1_ptr, rout_ptr,
    x_off, res_off, rg0_off, rg1_off, out_off, cols, mask, sel,
    HAS_RESIDUAL: tl.constexpr, RG_SELECT: tl.constexpr, ALIGN: tl.constexpr,
):
    """Load a (ROWS, BLOCK_C) tile of x as fp32; with a residual, form residual + gate * x, store it
    (rounded to residual_out's dtype) and return the stored value, which is what gets normalised."""
    x = tl.load(x_ptr + x_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + res_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = _pick(rg0_ptr, rg1_ptr, rg0_off, rg1_off, cols, mask, sel, RG_SELECT, ALIGN)
        v = (r + g * x).to(rout_ptr.dtype.element_ty)
        tl.store(rout_ptr + out_off[:, None] + cols[None, :], v, mask=mask)
        x = v.to(tl.float32)
    return x


@triton.jit
def _scale_shift(sc0_ptr, sc1_ptr, sh0_ptr, sh1_ptr, sc0_off, sc1_off, sh0_off, sh1_off, cols, mask, sel,
                 SELECT: tl.constexpr, ALIGN: tl.constexpr):
    """The picked (ROWS, BLOCK_C) fp32 scale and shift of each token (see _pick)."""
    return (_pick(sc0_ptr, sc1_ptr, sc0_off, sc1_off, cols, mask, sel, SELECT, ALIGN),
            _pick(sh0_ptr, sh1_ptr, sh0_off, sh1_off, cols, mask, sel, SELECT, ALIGN))


@triton.jit
def _modulate_store(
    x_hat, scale, shift, y_ptr, gate_ptr, w_ptr, b_ptr, g0_ptr, g1_ptr,
    g0_off, g1_off, out_off, cols, col_ok, mask, sel,
    SELECT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_GATE: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """y = (x_hat * weight + bias) * (1 + scale) + shift, stored; the selected gate too if asked.
    x_hat, scale, shift: (ROWS, BLOCK_C) fp32 (scale and shift as _pick returns them, already picked);
    col_ok: (BLOCK_C,) columns inside C; mask: (ROWS, BLOCK_C)."""
    if HAS_WEIGHT:
        x_hat = x_hat * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        x_hat = x_hat + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = x_hat * (1.0 + scale) + shift
    tl.store(y_ptr + out_off[:, None] + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    if STORE_GATE:
        g = _pick(g0_ptr, g1_ptr, g0_off, g1_off, cols, mask, sel, SELECT, ALIGN)
        tl.store(gate_ptr + out_off[:, None] + cols[None, :], g.to(gate_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _token_offsets(pid, N, L, sxb, sxl, srb, srl, sib, sil, ROWS: tl.constexpr):
    """Per token of this program: validity, batch b, and the int64 offsets of its rows
    (int64 because B*L*C passes 2**31 at large batch x resolution)."""
    n = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    ok = n < N
    b = n // L
    l = n - b * L
    return ok, n, b, b * sxb + l * sxl, b * srb + l * srl, b * sib + l * sil, l


@triton.jit
def _modulate_kernel(
    y_ptr, rout_ptr, gate_ptr,  # (N, C) outputs, contiguous
    x_ptr, sxb, sxl,  # (B, L, C), stride(-1) == 1
    res_ptr, srb, srl,  # (B, L, C)
    rg0_ptr, rg1_ptr, srg0, srg1, srgl,  # residual gate: (B, C) rows (srgl = 0) or (B, L, C)
    w_ptr, b_ptr,  # (C,)
    sc0_ptr, sh0_ptr, g0_ptr, sc1_ptr, sh1_ptr, g1_ptr,  # (B, C) rows of the two parameter sets
    ssc0, ssh0, sg0, ssc1, ssh1, sg1,  # their row strides (6C for chunks of a (B, 6C) tensor)
    idx_ptr, sib, sil,  # (B, L) int32 / int64 / uint8
    N, L, C, eps,
    HAS_RESIDUAL: tl.constexpr, RG_SELECT: tl.constexpr, DO_NORM: tl.constexpr, SELECT: tl.constexpr,  # 0/PICK_*
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_GATE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, CHUNKED: tl.constexpr, EARLY: tl.constexpr,
    ALIGN: tl.constexpr,  # bytes every picked parameter row address is a multiple of (see _pick)
):
    pid = tl.program_id(0)
    ok, n, b, x_off, res_off, idx_off, l = _token_offsets(pid, N, L, sxb, sxl, srb, srl, sib, sil, ROWS)
    out_off = n * C  # (ROWS,) int64
    rg0_off = b * srg0 + l * srgl
    rg1_off = b * srg1 + l * srgl
    sel = ok  # unused unless selecting
    if SELECT + RG_SELECT > 0:
        sel = tl.load(idx_ptr + idx_off, mask=ok, other=0) != 0  # (ROWS,) bool: set 1?
    cols0 = tl.arange(0, BLOCK_C)

    if not CHUNKED:
        # The whole row in registers: one read of x (and residual), one write of each output.
        col_ok = cols0 < C
        mask = ok[:, None] & col_ok[None, :]  # (ROWS, BLOCK_C)
        v = _gated_input(x_ptr, res_ptr, rg0_ptr, rg1_ptr, rout_ptr, x_off, res_off, rg0_off, rg1_off, out_off,
                         cols0, mask, sel, HAS_RESIDUAL, RG_SELECT, ALIGN)
        if DO_NORM:
            if EARLY:  # parameter loads issued before the statistics: their latency overlaps x's
                scale, shift = _scale_shift(sc0_ptr, sc1_ptr, sh0_ptr, sh1_ptr, b * ssc0, b * ssc1, b * ssh0, b * ssh1,
                                            cols0, mask, sel, SELECT, ALIGN)
            mean = tl.sum(v, axis=1) / C
            d = tl.where(mask, v - mean[:, None], 0.0)
            rstd = tl.rsqrt(tl.sum(d * d, axis=1) / C + eps)
            if not EARLY:  # after the statistics (the reductions' barriers keep them there)
                scale, shift = _scale_shift(sc0_ptr, sc1_ptr, sh0_ptr, sh1_ptr, b * ssc0, b * ssc1, b * ssh0, b * ssh1,
                                            cols0, mask, sel, SELECT, ALIGN)
            _modulate_store(d * rstd[:, None], scale, shift, y_ptr, gate_ptr, w_ptr, b_ptr, g0_ptr, g1_ptr,
                            b * sg0, b * sg1, out_off, cols0, col_ok, mask, sel,
                            SELECT, HAS_WEIGHT, HAS_BIAS, STORE_GATE, ALIGN)
    else:
        # Pass 1: the mean (and residual_out, stored once).
        acc = tl.zeros((ROWS,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cols0
            mask = ok[:, None] & (cols < C)[None, :]
            v = _gated_input(x_ptr, res_ptr, rg0_ptr, rg1_ptr, rout_ptr, x_off, res_off, rg0_off, rg1_off, out_off,
                             cols, mask, sel, HAS_RESIDUAL, RG_SELECT, ALIGN)
            acc += tl.sum(v, axis=1)
        if DO_NORM:
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
                scale, shift = _scale_shift(sc0_ptr, sc1_ptr, sh0_ptr, sh1_ptr, b * ssc0, b * ssc1, b * ssh0, b * ssh1,
                                            cols, mask, sel, SELECT, ALIGN)
                _modulate_store((v - mean[:, None]) * rstd[:, None], scale, shift, y_ptr, gate_ptr, w_ptr, b_ptr,
                                g0_ptr, g1_ptr, b * sg0, b * sg1, out_off, cols, col_ok, mask, sel,
                                SELECT, HAS_WEIGHT, HAS_BIAS, STORE_GATE, ALIGN)


# ---------------------------------------------------------------------------------------------------
# Launcher: checks, allocation, launch configuration, grid.
# ---------------------------------------------------------------------------------------------------


class LaunchConfig:
    """How one launch tiles the work: ROWS tokens per program, BLOCK_C columns per tile; and how a
    token's parameter set is picked (PICK_ADDRESS or PICK_BOTH, see _pick). Two options kept to measure
    against (benchmarks/results/modulate_notes.md, runs 4-5): align_hint=False withholds the alignment
    of the picked rows from the compiler (the kernel as it was before the hint); early=True loads scale
    and shift before the statistics instead of after (whole-row tiles only; +17 registers; within
    1-2 µs either way on an H100, not the default)."""

    def __init__(self, rows: int, block_c: int, num_warps: int, chunked: bool, pick: int = PICK_ADDRESS,
                 align_hint: bool = True, early: bool = False):
        for name, v in (("rows", rows), ("block_c", block_c), ("num_warps", num_warps)):
            if v < 1 or v & (v - 1):
                raise ValueError(f"LaunchConfig.{name} must be a power of two, got {v}")
        if pick not in (PICK_ADDRESS, PICK_BOTH):
            raise ValueError(f"LaunchConfig.pick must be PICK_ADDRESS (1) or PICK_BOTH (2), got {pick}")
        self.rows, self.block_c, self.num_warps, self.chunked, self.pick = rows, block_c, num_warps, chunked, pick
        self.align_hint, self.early = align_hint, early

    def __repr__(self) -> str:
        return (f"LaunchConfig(rows={self.rows}, block_c={self.block_c}, num_warps={self.num_warps}, "
                f"chunked={self.chunked}, pick={self.pick}{'' if self.align_hint else ', align_hint=False'}"
                f"{', early=True' if self.early else ''})")


def default_config(N: int, C: int, do_norm: bool = True, has_residual: bool = False) -> LaunchConfig:
    """Launch configuration for N tokens of C channels (tuned on an H100 at C = 3072, see
    benchmarks/results/modulate_*.md)."""
    block = triton.next_power_of_2(C)
    if not do_norm:
        # Elementwise (the gated residual alone): 1024-column chunks, one 16-byte bf16 vector per
        # thread and tensor; 3072 = 3 x 1024 leaves no lane idle.
        block_c = min(block, 1024)
        return LaunchConfig(1, block_c, max(1, min(4, block_c // 256)), chunked=True)
    if block > MAX_TILE:
        # A row too long for registers: chunks of CHUNK columns, three passes.
        return LaunchConfig(1, CHUNK, 8, chunked=True)
    # Whole rows in registers, 4 warps for a 4096-wide tile: of 1-4 rows x 4-16 warps and chunked
    # tiles, the fastest at C = 3072 on an H100 (benchmarks/results/modulate_h100.md).
    rows = max(1, min(4, 4096 // block))
    return LaunchConfig(rows, block, max(1, min(16, rows * block // 1024)), chunked=False)


def _one_dtype(p0: Optional[Tensor], p1: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The two sets of one parameter in their promoted dtype (a (B, C) copy only if they differ)."""
    if p0 is None or p1 is None or p0.dtype == p1.dtype:
        return p0, p1
    dt = torch.promote_types(p0.dtype, p1.dtype)
    return p0.to(dt), p1.to(dt)


def _row_alignment(*params: Optional[Tensor]) -> int:
    """The largest power of two <= 16 that every row address of these (B, C) tensors is a multiple of,
    in bytes: the data pointer and, when there is more than one row, the row stride."""
    align = 16
    for t in params:
        if t is None:
            continue
        for v in (t.data_ptr(), t.stride(0) * t.element_size() if t.shape[0] > 1 else 0):
            while v % align:
                align //= 2
    return align


def _launch(
    x: Tensor,
    residual: Optional[Tensor],
    rgate0: Optional[Tensor],
    rgate1: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    scale0: Optional[Tensor],
    shift0: Optional[Tensor],
    scale1: Optional[Tensor],
    shift1: Optional[Tensor],
    index: Optional[Tensor],
    gate0: Optional[Tensor],
    gate1: Optional[Tensor],
    eps: float,
    do_norm: bool = True,
    config: Optional[LaunchConfig] = None,
    checked: bool = False,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Run one modulation kernel; returns (y, residual_out, gate), None where not computed.

    residual/rgate0 given: residual_out = residual + rgate_sel * x first (rgate0 (B, C) or (B, L, C);
    selected by index with rgate1 when rgate1 is given). do_norm=False: only residual_out.
    gate0 given: the selected gate (B, L, C) is written too. checked=True: the caller (a module of
    qwenfast.ops.modulate) has already run the argument checks.
    """
    has_res = residual is not None
    if not checked and has_res:
        check_modulate_args(x, index=index, residual=residual, rows_or_full={"residual_gate": rgate0},
                            set1={} if rgate1 is None else {"gate1": rgate1})
    if not checked and do_norm:
        check_modulate_args(
            x, index=index, vectors={"weight": weight, "bias": bias},
            rows={"scale0": scale0, "shift0": shift0, **({} if gate0 is None else {"gate0": gate0})},
            set1={"scale1": scale1, "shift1": shift1, **({} if gate0 is None else {"gate1": gate1})},
        )
    B, L, C = x.shape
    N = B * L
    dev = x.device
    y = torch.empty((B, L, C), dtype=x.dtype, device=dev) if do_norm else None
    rout = torch.empty((B, L, C), dtype=x.dtype, device=dev) if has_res else None
    store_gate = do_norm and gate0 is not None
    gate = torch.empty((B, L, C), dtype=gate0.dtype, device=dev) if store_gate else None
    if N == 0 or C == 0:
        return y, rout, gate  # nothing to compute: no launch

    select = index is not None
    if select:  # the kernel picks a set by row address: both sets in one dtype (exact promotion)
        scale0, scale1 = _one_dtype(scale0, scale1)
        shift0, shift1 = _one_dtype(shift0, shift1)
        gate0, gate1 = _one_dtype(gate0, gate1)
        if has_res and rgate0.dim() == 2:
            rgate0, rgate1 = _one_dtype(rgate0, rgate1)
    if index is not None and index.dtype == torch.bool:
        index = index.view(torch.uint8)  # same bytes; Triton reads bytes, not i1
    cfg = config or default_config(N, C, do_norm, has_res)

    def row_stride(t: Optional[Tensor]) -> int:
        return 0 if t is None else t.stride(0)

    any_t = x  # stands in for absent tensors; never dereferenced (the constexpr flags are off)
    rg_full = has_res and rgate0.dim() == 3
    pick = cfg.pick if select and do_norm else 0
    rg_pick = cfg.pick if has_res and select and rgate1 is not None and not rg_full else 0
    # Only the rows picked by address need the hint; PICK_BOTH and set-0-only loads keep Triton's own.
    picked = [scale0, scale1, shift0, shift1] + ([gate0, gate1] if store_gate else []) if pick == PICK_ADDRESS else []
    picked += [rgate0, rgate1] if rg_pick == PICK_ADDRESS else []
    align = _row_alignment(*picked) if cfg.align_hint else 0  # 0: no hint
    _modulate_kernel[(triton.cdiv(N, cfg.rows),)](
        y if do_norm else any_t, rout if has_res else any_t, gate if store_gate else any_t,
        x, x.stride(0), x.stride(1),
        residual if has_res else any_t, row_stride(residual), residual.stride(1) if has_res else 0,
        rgate0 if has_res else any_t, rgate1 if rgate1 is not None else any_t,
        row_stride(rgate0), row_stride(rgate1), rgate0.stride(1) if rg_full else 0,
        weight if weight is not None else any_t, bias if bias is not None else any_t,
        scale0 if do_norm else any_t, shift0 if do_norm else any_t, gate0 if store_gate else any_t,
        scale1 if select and do_norm else any_t, shift1 if select and do_norm else any_t,
        gate1 if select and store_gate else any_t,
        row_stride(scale0), row_stride(shift0), row_stride(gate0),
        row_stride(scale1), row_stride(shift1), row_stride(gate1),
        index if select else any_t, row_stride(index), index.stride(1) if select else 0,
        N, L, C, eps,
        HAS_RESIDUAL=has_res, RG_SELECT=rg_pick, DO_NORM=do_norm, SELECT=pick,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, STORE_GATE=store_gate,
        ROWS=cfg.rows, BLOCK_C=cfg.block_c, CHUNKED=cfg.chunked, EARLY=cfg.early, ALIGN=align, num_warps=cfg.num_warps,
    )
    return y, rout, gate


# ---------------------------------------------------------------------------------------------------
# torch.library ops: torch.compile keeps each as one node (no graph break) and CUDA graphs capture the
# launch. Outputs are fresh contiguous tensors; a gate that was not asked for comes back empty (0,).
# ---------------------------------------------------------------------------------------------------


def _empty_gate(x: Tensor) -> Tensor:
    return x.new_empty((0,))


@torch.library.custom_op("qwenfast::layer_norm_modulate", mutates_args=())
def _layer_norm_modulate_op(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], scale0: Tensor, shift0: Tensor,
    scale1: Optional[Tensor], shift1: Optional[Tensor], index: Optional[Tensor],
    gate0: Optional[Tensor], gate1: Optional[Tensor], eps: float,
) -> tuple[Tensor, Tensor]:
    y, _, gate = _launch(x, None, None, None, weight, bias, scale0, shift0, scale1, shift1, index, gate0, gate1, eps)
    return y, gate if gate is not None else _empty_gate(x)


@_layer_norm_modulate_op.register_fake
def _(x, weight, bias, scale0, shift0, scale1, shift1, index, gate0, gate1, eps):
    gate = torch.empty(x.shape, dtype=gate0.dtype, device=x.device) if gate0 is not None else _empty_gate(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), gate


@torch.library.custom_op("qwenfast::residual_layer_norm_modulate", mutates_args=())
def _residual_layer_norm_modulate_op(
    x: Tensor, residual: Tensor, rgate0: Tensor, rgate1: Optional[Tensor], weight: Optional[Tensor],
    bias: Optional[Tensor], scale0: Tensor, shift0: Tensor, scale1: Optional[Tensor], shift1: Optional[Tensor],
    index: Optional[Tensor], gate0: Optional[Tensor], gate1: Optional[Tensor], eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    y, rout, gate = _launch(x, residual, rgate0, rgate1, weight, bias, scale0, shift0, scale1, shift1, index,
                            gate0, gate1, eps)
    return y, rout, gate if gate is not None else _empty_gate(x)


@_residual_layer_norm_modulate_op.register_fake
def _(x, residual, rgate0, rgate1, weight, bias, scale0, shift0, scale1, shift1, index, gate0, gate1, eps):
    gate = torch.empty(x.shape, dtype=gate0.dtype, device=x.device) if gate0 is not None else _empty_gate(x)
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(x.shape, dtype=x.dtype, device=x.device), gate)


@torch.library.custom_op("qwenfast::gated_residual", mutates_args=())
def _gated_residual_op(
    x: Tensor, residual: Tensor, gate0: Tensor, gate1: Optional[Tensor], index: Optional[Tensor]
) -> Tensor:
    _, rout, _ = _launch(x, residual, gate0, gate1, None, None, None, None, None, None, index, None, None, 0.0,
                         do_norm=False)
    return rout


@_gated_residual_op.register_fake
def _(x, residual, gate0, gate1, index):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# ---------------------------------------------------------------------------------------------------
# Wrappers with the signatures of the fp32 reference (qwenfast.ops.modulate.*_native), called by the
# modules after their argument checks. Under torch.compile they go through the torch.library ops (one
# graph node each); in eager mode straight to the launcher: the dispatcher round trip and a second
# check would add tens of µs of host time per call, more than the kernel takes at small L.
# ---------------------------------------------------------------------------------------------------


def layer_norm_modulate_triton(x, weight, bias, scale0, shift0, scale1, shift1, index, gate0, gate1, eps):
    if torch.compiler.is_compiling():
        y, gate = torch.ops.qwenfast.layer_norm_modulate(x, weight, bias, scale0, shift0, scale1, shift1, index,
                                                         gate0, gate1, eps)
        return y, gate if gate0 is not None else None
    y, _, gate = _launch(x, None, None, None, weight, bias, scale0, shift0, scale1, shift1, index, gate0, gate1, eps,
                         checked=True)
    return y, gate


def residual_layer_norm_modulate_triton(x, residual, rgate0, rgate1, weight, bias, scale0, shift0, scale1, shift1,
                                        index, gate0, gate1, eps):
    if torch.compiler.is_compiling():
        y, rout, gate = torch.ops.qwenfast.residual_layer_norm_modulate(
            x, residual, rgate0, rgate1, weight, bias, scale0, shift0, scale1, shift1, index, gate0, gate1, eps)
        return y, rout, gate if gate0 is not None else None
    return _launch(x, residual, rgate0, rgate1, weight, bias, scale0, shift0, scale1, shift1, index, gate0, gate1,
                   eps, checked=True)


def gated_residual_triton(x, residual, gate0, gate1, index):
    if torch.compiler.is_compiling():
        return torch.ops.qwenfast.gated_residual(x, residual, gate0, gate1, index)
    return _launch(x, residual, gate0, gate1, None, None, None, None, None, None, index, None, None, 0.0,
                   do_norm=False, checked=True)[1]
