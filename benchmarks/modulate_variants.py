"""Measurement-only variants of the norm-modulate kernel (qwenfast.ops.triton.modulate), kept out of the
package: the three choices that benchmarks/results/modulate_notes.md measured and decided (runs 3-5).

- pick="both": load both parameter sets and choose per element, instead of choosing the row's address
  and loading once (run 3: slower by 1-19 µs; the package picks by address).
- early=True: the scale/shift loads issued before the statistics, instead of after (run 5: within
  1-2 µs either way, not the default).
- hint=False: no alignment hint on the picked row addresses (run 4: neutral on Triton 3.6, 30-40%
  slower on 3.9; the package always hints, measuring the alignment).

Whole rows in registers only (the configuration those runs compared: 1 row x 4 warps at C = 3072),
with or without the gated residual prologue (which the package's own helper computes, hinted the
same way). The rest of the kernel is the package's (its jit helpers); the results equal the
package kernel's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwenfast.ops.triton import modulate as T


@triton.jit
def _pick_variant(p0_ptr, p1_ptr, off, cols, mask, sel, BOTH: tl.constexpr, ALIGN: tl.constexpr):
    if BOTH:
        a = tl.load(p0_ptr + off[:, None] + cols[None, :], mask=mask, other=0.0)
        b = tl.load(p1_ptr + off[:, None] + cols[None, :], mask=mask, other=0.0)
        return tl.where(sel[:, None], b, a).to(tl.float32)
    row = tl.where(sel, p1_ptr + off, p0_ptr + off)
    if ALIGN > 0:
        row = tl.multiple_of(row, ALIGN)
    return tl.load(row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _variant_kernel(
    y_ptr, rout_ptr, x_ptr, res_ptr, sxb, sxl, rg0_ptr, rg1_ptr, srg,
    sc0_ptr, sh0_ptr, sc1_ptr, sh1_ptr, sp, idx_ptr, N, L, C, eps,
    HAS_RESIDUAL: tl.constexpr, BOTH: tl.constexpr, EARLY: tl.constexpr, ALIGN: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    ok, n, b, l, x_off, sel = T._tokens(tl.program_id(0), N, L, sxb, sxl, idx_ptr, True, ROWS)
    out_off = n * C
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = ok[:, None] & col_ok[None, :]
    v = T._gated_input(x_ptr, res_ptr, rg0_ptr, rg1_ptr, rout_ptr, x_off, b * srg, b * srg, out_off, cols, mask,
                       sel, HAS_RESIDUAL, True, ALIGN)
    if EARLY:
        scale = _pick_variant(sc0_ptr, sc1_ptr, b * sp, cols, mask, sel, BOTH, ALIGN)
        shift = _pick_variant(sh0_ptr, sh1_ptr, b * sp, cols, mask, sel, BOTH, ALIGN)
    mean = tl.sum(v, axis=1) / C
    d = tl.where(mask, v - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(d * d, axis=1) / C + eps)
    if not EARLY:
        scale = _pick_variant(sc0_ptr, sc1_ptr, b * sp, cols, mask, sel, BOTH, ALIGN)
        shift = _pick_variant(sh0_ptr, sh1_ptr, b * sp, cols, mask, sel, BOTH, ALIGN)
    y = d * rstd[:, None] * (1.0 + scale) + shift
    tl.store(y_ptr + out_off[:, None] + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def variant_fwd(x, residual, rgate0, rgate1, scale0, shift0, scale1, shift1, index, eps=1e-6, *, pick="address",
                early=False, hint=True, rows=1, num_warps=4):
    """(y, residual_out or None) of the variant: selection always on, no affine, no gate output; all
    (B, C) parameter rows with one row stride (row views of one chunked tensor), x and residual
    contiguous, index contiguous (int)."""
    B, L, C = x.shape
    N = B * L
    y = torch.empty_like(x)
    rout = torch.empty_like(x) if residual is not None else None
    rows_picked = [scale0, scale1, shift0, shift1] + ([rgate0, rgate1] if residual is not None else [])
    align = T._row_alignment(*rows_picked) if hint else 0
    sp = scale0.stride(0)
    assert all(t.stride(0) == sp for t in rows_picked), "variant: one row stride for all parameter rows"
    _variant_kernel[(triton.cdiv(N, rows),)](
        y, rout if rout is not None else x, x, residual if residual is not None else x, x.stride(0), x.stride(1),
        rgate0 if residual is not None else x, rgate1 if residual is not None else x, sp,
        scale0, shift0, scale1, shift1, sp, index, N, L, C, eps,
        HAS_RESIDUAL=residual is not None, BOTH=pick == "both", EARLY=early, ALIGN=align,
        ROWS=rows, BLOCK_C=triton.next_power_of_2(C), num_warps=num_warps,
    )
    return y, rout
