"""Inputs and the fp64 oracle shared by the modulation tests (native and Triton)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def make_case(B=2, L=7, C=96, dtype=torch.float32, *, seed=0, index="mixed", index_dtype=torch.int64,
              affine=True, offset=0.0, constant_rows=False, param_dtype=None, device="cpu"):
    """x, residual, weight/bias and two parameter sets as row views of one chunked (2B, 6C) tensor,
    the way the DiT hands them over: rows [:B] are set 0, rows [B:] set 1; the chunks are shift,
    scale, gate (norm1) and shift, scale, gate (norm2)."""
    g = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype
    x = (torch.randn(B, L, C, generator=g) * 2 + offset)
    if constant_rows and L > 0:
        x[:, ::2, :] = 3.25  # every other token constant: zero variance
    residual = torch.randn(B, L, C, generator=g)
    mod = (torch.randn(2 * B, 6 * C, generator=g) * 0.5).to(param_dtype).to(device)  # (2B, 6C)
    s0, s1 = mod[:B].chunk(6, dim=1), mod[B:].chunk(6, dim=1)  # (B, C) views, row stride 6C
    p = dict(shift0=s0[0], scale0=s0[1], gate0=s0[2], shift1=s1[3], scale1=s1[4], gate1=s1[5])
    if index == "none":
        idx = None
    elif index == "zeros":
        idx = torch.zeros(B, L, dtype=torch.int64)
    elif index == "ones":
        idx = torch.ones(B, L, dtype=torch.int64)
    elif index == "prefix":  # the first tokens are the generated image, the rest the reference image
        idx = (torch.arange(L) >= L // 3).long().expand(B, L).contiguous()
    else:  # mixed, values other than 1 count as "set 1" too
        idx = torch.randint(0, 3, (B, L), generator=g)
    if idx is not None:
        idx = idx.bool() if index_dtype == torch.bool else idx.to(index_dtype)
    weight = (1 + 0.1 * torch.randn(C, generator=g)).to(dtype) if affine else None
    bias = (0.1 * torch.randn(C, generator=g)).to(dtype) if affine else None
    # Moved to `device` before the parameter views are taken (moving a view copies it contiguous).
    out = dict(x=x.to(dtype), residual=residual.to(dtype), weight=weight, bias=bias, index=idx)
    out = {k: (v.to(device) if v is not None else None) for k, v in out.items()}
    return dict(out, mod=mod, **p)


def sel64(p0, p1, index, B, L):
    """Selected parameter per token in fp64, (B, L, C), by explicit masking (not torch.where)."""
    if p0.dim() == 3:
        return p0.double()
    out = p0.double()[:, None, :].repeat(1, L, 1)
    if index is not None and p1 is not None:
        m = index != 0
        out[m] = p1.double()[:, None, :].repeat(1, L, 1)[m]
    return out


def oracle_modulate(x, weight, bias, scale, shift, eps=1e-6):
    """LayerNorm in fp64 through F.layer_norm, then scale/shift (given per token, fp64)."""
    C = x.shape[-1]
    xh = F.layer_norm(x.double(), (C,), None if weight is None else weight.double(),
                      None if bias is None else bias.double(), eps)
    return xh * (1 + scale) + shift


def oracle_residual(x, residual, gate):
    """residual + gate * x in fp64, rounded to x's dtype as the op stores it."""
    return (residual.double() + gate * x.double()).to(x.dtype)


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# Relative error of a result stored in `dtype` against fp64 (rounding of the output dominates).
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def params_of(c, index="case", gate=True):
    """The case's parameters as the ops take them: a Select of its two sets by its index, or set 0
    alone (a Modulation) where the case has no index (or index=None is asked for)."""
    from qwenfast.ops import Modulation, Select

    index = c["index"] if isinstance(index, str) else index
    set0 = Modulation(c["scale0"], c["shift0"], c["gate0"] if gate else None)
    if index is None:
        return set0
    return Select(set0, Modulation(c["scale1"], c["shift1"], c["gate1"] if gate else None), index)
