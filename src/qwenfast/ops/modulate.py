"""Fused LayerNorm + scale/shift (+ gate) modulation of the Qwen-Image DiT, with a per-token choice
between two parameter sets ("select01").

In every DiT block, per stream, twice:

    x_hat = LayerNorm(x)                       no affine by default, eps 1e-6, statistics in fp32
    y     = x_hat * (1 + scale) + shift        scale, shift: rows (B, C) of the timestep modulation
    gate                                       kept for the gated residual add after attention / MLP

Edit models (`zero_cond_t`) carry two parameter sets; `index[b, l] != 0` picks set 1 for a token.
The residual variant first forms `residual_out = residual + gate * x` (stored in x's dtype) and
normalises that stored value.

This file holds, top-down:
  1. argument checks shared by every path (errors name the argument and the shapes);
  2. the fp32 reference: readable, the test oracle, the CPU fallback and the benchmark baseline;
  3. the ops as `CustomOp` modules (compatible API: returns the gate) and the gate-free functional
     entry points of the DiT path (no (B, L, C) gate tensor is ever written).

Shapes: x (B, L, C), contiguous in its last dimension; parameters (B, C) with stride(-1) == 1 (row
views of a chunked (B, 6C) tensor are fine, no copies); index (B, L) int32/int64/bool.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from .custom_op import CustomOp

__all__ = [
    "FusedLayerNormScaleShiftGateSelect01",
    "FusedResidualLayerNormScaleShiftGateSelect01",
    "FusedLayerNormScaleShiftGate",
    "FusedResidualLayerNormScaleShiftGate",
    "LayerNormModulate",
    "ResidualLayerNormModulate",
    "GatedResidual",
    "layer_norm_modulate",
    "residual_layer_norm_modulate",
    "gated_residual",
    "select01",
    "check_modulate_args",
]

Tensor = torch.Tensor
INDEX_DTYPES = (torch.int32, torch.int64, torch.bool)


# ---------------------------------------------------------------------------------------------------
# 1. Checks: shapes and devices only (no data is read), so they cost nothing under torch.compile and
#    never synchronise. Every path (native, Triton, the torch.library op itself) runs them.
# ---------------------------------------------------------------------------------------------------


def _tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _same_device(name: str, t: Tensor, x: Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all tensors must share one device")


def _last_dim_contiguous(name: str, t: Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous in its last dimension (stride(-1) == 1); "
            f"got shape {tuple(t.shape)} with strides {t.stride()}"
        )


def _floating(name: str, t: Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_modulate_args(
    x: Tensor,
    *,
    index: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    vectors: dict[str, Optional[Tensor]] | None = None,
    rows: dict[str, Optional[Tensor]] | None = None,
    rows_or_full: dict[str, Optional[Tensor]] | None = None,
    set1: dict[str, Optional[Tensor]] | None = None,
) -> tuple[int, int, int]:
    """Check one call's arguments; return (B, L, C).

    vectors: `[C]` tensors or None (weight, bias). rows: `[B, C]` parameters (set 0, always given).
    rows_or_full: `[B, C]` or `[B, L, C]` (a residual gate of the compatible API). set1: the `[B, C]`
    parameters of set 1, required when `index` is given, ignored (may be None) otherwise.
    """
    _tensor("x", x)
    _floating("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must be (B, L, C), got shape {tuple(x.shape)}")
    _last_dim_contiguous("x", x)
    B, L, C = x.shape

    if index is not None:
        _tensor("index", index)
        if index.dtype not in INDEX_DTYPES:
            raise TypeError(f"index must be int32, int64 or bool, got {index.dtype}")
        if tuple(index.shape) != (B, L):
            raise ValueError(f"index must be (B, L) = {(B, L)} for x of shape {tuple(x.shape)}, got {tuple(index.shape)}")
        _same_device("index", index, x)

    if residual is not None:
        _tensor("residual", residual)
        _floating("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        _same_device("residual", residual, x)
        _last_dim_contiguous("residual", residual)

    for name, v in (vectors or {}).items():
        if v is None:
            continue
        _tensor(name, v)
        _floating(name, v)
        if tuple(v.shape) != (C,):
            raise ValueError(f"{name} must be (C,) = ({C},) for x of shape {tuple(x.shape)}, got {tuple(v.shape)}")
        _same_device(name, v, x)
        _last_dim_contiguous(name, v)

    def check_row(name: str, p: Optional[Tensor], allow_full: bool) -> None:
        _tensor(name, p)
        _floating(name, p)
        ok = tuple(p.shape) == (B, C) or (allow_full and tuple(p.shape) == (B, L, C))
        if not ok:
            want = f"(B, C) = {(B, C)}" + (f" or (B, L, C) = {(B, L, C)}" if allow_full else "")
            raise ValueError(f"{name} must be {want} for x of shape {tuple(x.shape)}, got {tuple(p.shape)}")
        _same_device(name, p, x)
        _last_dim_contiguous(name, p)

    for name, p in (rows or {}).items():
        check_row(name, p, allow_full=False)
    for name, p in (rows_or_full or {}).items():
        check_row(name, p, allow_full=True)
    for name, p in (set1 or {}).items():
        if p is None:
            if index is not None:
                raise ValueError(f"index is given, so {name} (parameter set 1) must be given too; got None")
            continue
        check_row(name, p, allow_full=False)
    return B, L, C


# ---------------------------------------------------------------------------------------------------
# 2. The fp32 reference. Three functions, one per kernel, with the kernels' exact signatures, so that
#    the modules below run either implementation through the same code.
# ---------------------------------------------------------------------------------------------------


def select01(index: Optional[Tensor], p0: Tensor, p1: Optional[Tensor]) -> Tensor:
    """The parameter of each token: p1 where index != 0, else p0. (B, C) -> broadcastable (B, L|1, C).

    A (B, L, C) p0 (a full residual gate) is returned as is; with index None (or no set 1) only set 0
    is used.
    """
    if p0.dim() == 3:
        return p0
    if index is None or p1 is None:
        return p0[:, None, :]  # (B, 1, C)
    return torch.where((index != 0)[..., None], p1[:, None, :], p0[:, None, :])  # (B, L, C)


def _layer_norm_fp32(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    # Two-pass biased variance: subtracting the mean first keeps a large common offset from cancelling.
    xf = x.float()  # (B, L, C)
    d = xf - xf.mean(-1, keepdim=True)
    x_hat = d * torch.rsqrt((d * d).mean(-1, keepdim=True) + eps)
    if weight is not None:
        x_hat = x_hat * weight.float()
    if bias is not None:
        x_hat = x_hat + bias.float()
    return x_hat


def layer_norm_modulate_native(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    scale0: Tensor,
    shift0: Tensor,
    scale1: Optional[Tensor],
    shift1: Optional[Tensor],
    index: Optional[Tensor],
    gate0: Optional[Tensor],
    gate1: Optional[Tensor],
    eps: float,
) -> tuple[Tensor, Optional[Tensor]]:
    """y = LayerNorm(x) * (1 + scale_sel) + shift_sel in x's dtype; the selected gate (B, L, C) in
    gate0's dtype when gate0 is given (None otherwise)."""
    scale = select01(index, scale0, scale1).float()
    shift = select01(index, shift0, shift1).float()
    y = (_layer_norm_fp32(x, weight, bias, eps) * (1 + scale) + shift).to(x.dtype)
    gate = None
    if gate0 is not None:
        gate = select01(index, gate0, gate1).to(gate0.dtype).expand(x.shape).contiguous()
    return y, gate


def gated_residual_native(
    x: Tensor, residual: Tensor, gate0: Tensor, gate1: Optional[Tensor], index: Optional[Tensor]
) -> Tensor:
    """residual + gate_sel * x, computed in fp32 and stored in x's dtype. gate0 (B, C) or (B, L, C)."""
    g = select01(index, gate0, gate1).float()
    return (residual.float() + g * x.float()).to(x.dtype)


def residual_layer_norm_modulate_native(
    x: Tensor,
    residual: Tensor,
    rgate0: Tensor,
    rgate1: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    scale0: Tensor,
    shift0: Tensor,
    scale1: Optional[Tensor],
    shift1: Optional[Tensor],
    index: Optional[Tensor],
    gate0: Optional[Tensor],
    gate1: Optional[Tensor],
    eps: float,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """residual_out = residual + rgate_sel * x (x's dtype); then the op above on residual_out, as
    stored (the kernel normalises the rounded value, and so does this)."""
    residual_out = gated_residual_native(x, residual, rgate0, rgate1, index)
    y, gate = layer_norm_modulate_native(
        residual_out, weight, bias, scale0, shift0, scale1, shift1, index, gate0, gate1, eps
    )
    return y, residual_out, gate


class _Impl(NamedTuple):
    """One implementation of the three kernels (native here, Triton in ops/triton/modulate.py)."""

    layer_norm_modulate: Callable[..., tuple[Tensor, Optional[Tensor]]]
    residual_layer_norm_modulate: Callable[..., tuple[Tensor, Tensor, Optional[Tensor]]]
    gated_residual: Callable[..., Tensor]


NATIVE = _Impl(layer_norm_modulate_native, residual_layer_norm_modulate_native, gated_residual_native)


def _triton_impl() -> _Impl:
    # Imported on first use: `import qwenfast.ops` must work where triton is not installed.
    from .triton import modulate as tm

    return _Impl(tm.layer_norm_modulate_triton, tm.residual_layer_norm_modulate_triton, tm.gated_residual_triton)


# ---------------------------------------------------------------------------------------------------
# 3. The ops. Each module checks its arguments once, then runs `_compute` with the implementation the
#    dispatch picked for this call's tensors.
# ---------------------------------------------------------------------------------------------------


class _ModulateOp(CustomOp):
    def check(self, *args, **kwargs) -> None:
        raise NotImplementedError

    def _compute(self, impl: _Impl, *args, **kwargs):
        raise NotImplementedError

    def forward(self, *args, **kwargs):
        self.check(*args, **kwargs)
        return super().forward(*args, **kwargs)

    def forward_native(self, *args, **kwargs):
        return self._compute(NATIVE, *args, **kwargs)

    def forward_cuda(self, *args, **kwargs):
        return self._compute(_triton_impl(), *args, **kwargs)


# --- gate-free entry points of the DiT path --------------------------------------------------------


class LayerNormModulate(_ModulateOp):
    """`(x, weight, bias, scale0, shift0, scale1=None, shift1=None, index=None, eps=1e-6) -> y`"""

    def check(self, x, weight, bias, scale0, shift0, scale1=None, shift1=None, index=None, eps=1e-6):
        check_modulate_args(
            x, index=index, vectors={"weight": weight, "bias": bias},
            rows={"scale0": scale0, "shift0": shift0}, set1={"scale1": scale1, "shift1": shift1},
        )

    def _compute(self, impl, x, weight, bias, scale0, shift0, scale1=None, shift1=None, index=None, eps=1e-6):
        y, _ = impl.layer_norm_modulate(x, weight, bias, scale0, shift0, scale1, shift1, index, None, None, eps)
        return y


class ResidualLayerNormModulate(_ModulateOp):
    """`(x, residual, gate0, weight, bias, scale0, shift0, gate1=None, scale1=None, shift1=None,
    index=None, eps=1e-6) -> (y, residual_out)`"""

    def check(self, x, residual, gate0, weight, bias, scale0, shift0, gate1=None, scale1=None, shift1=None,
              index=None, eps=1e-6):
        check_modulate_args(
            x, index=index, residual=residual, vectors={"weight": weight, "bias": bias},
            rows={"gate0": gate0, "scale0": scale0, "shift0": shift0},
            set1={"gate1": gate1, "scale1": scale1, "shift1": shift1},
        )

    def _compute(self, impl, x, residual, gate0, weight, bias, scale0, shift0, gate1=None, scale1=None,
                 shift1=None, index=None, eps=1e-6):
        y, residual_out, _ = impl.residual_layer_norm_modulate(
            x, residual, gate0, gate1, weight, bias, scale0, shift0, scale1, shift1, index, None, None, eps
        )
        return y, residual_out


class GatedResidual(_ModulateOp):
    """`(x, residual, gate0, gate1=None, index=None) -> residual + select(index, gate0, gate1) * x`"""

    def check(self, x, residual, gate0, gate1=None, index=None):
        check_modulate_args(x, index=index, residual=residual, rows={"gate0": gate0}, set1={"gate1": gate1})

    def _compute(self, impl, x, residual, gate0, gate1=None, index=None):
        return impl.gated_residual(x, residual, gate0, gate1, index)


_layer_norm_modulate = LayerNormModulate()
_residual_layer_norm_modulate = ResidualLayerNormModulate()
_gated_residual = GatedResidual()


def layer_norm_modulate(x, weight, bias, scale0, shift0, scale1=None, shift1=None, index=None, eps=1e-6):
    """y = LayerNorm(x) * (1 + scale_sel) + shift_sel; no gate tensor is written. See module docs."""
    return _layer_norm_modulate(x, weight, bias, scale0, shift0, scale1, shift1, index, eps)


def residual_layer_norm_modulate(x, residual, gate0, weight, bias, scale0, shift0, gate1=None, scale1=None,
                                 shift1=None, index=None, eps=1e-6):
    """residual_out = residual + gate_sel * x (x's dtype); y = LayerNorm(residual_out) * (1 + scale_sel)
    + shift_sel. Returns (y, residual_out); the gate pair is consumed here, never materialised."""
    return _residual_layer_norm_modulate(x, residual, gate0, weight, bias, scale0, shift0, gate1, scale1,
                                         shift1, index, eps)


def gated_residual(x, residual, gate0, gate1=None, index=None):
    """residual + select(index, gate0, gate1) * x, in x's dtype (the last residual add of a block)."""
    return _gated_residual(x, residual, gate0, gate1, index)


# --- the compatible API: returns the gate -----------------------------------------------------------


def _broadcast_gate(gate: Tensor, shape: torch.Size) -> Tensor:
    return gate[:, None, :].expand(shape)  # (B, L, C) view of a (B, C) row: no copy


class FusedLayerNormScaleShiftGateSelect01(_ModulateOp):
    """`(x, weight, bias, scale0, shift0, gate0, scale1, shift1, gate1, index, eps) -> (y, gate)`;
    gate (B, L, C) = the selected gate per token (written; prefer `layer_norm_modulate` in hot paths)."""

    def check(self, x, weight, bias, scale0, shift0, gate0, scale1, shift1, gate1, index, eps=1e-6):
        check_modulate_args(
            x, index=index, vectors={"weight": weight, "bias": bias},
            rows={"scale0": scale0, "shift0": shift0, "gate0": gate0},
            set1={"scale1": scale1, "shift1": shift1, "gate1": gate1},
        )

    def _compute(self, impl, x, weight, bias, scale0, shift0, gate0, scale1, shift1, gate1, index, eps=1e-6):
        if index is None:  # one set: the gate is a broadcast view, nothing to write
            y, _ = impl.layer_norm_modulate(x, weight, bias, scale0, shift0, None, None, None, None, None, eps)
            return y, _broadcast_gate(gate0, x.shape)
        return impl.layer_norm_modulate(x, weight, bias, scale0, shift0, scale1, shift1, index, gate0, gate1, eps)


class FusedResidualLayerNormScaleShiftGateSelect01(_ModulateOp):
    """`(x, residual, residual_gate, weight, bias, scale0, shift0, gate0, scale1, shift1, gate1, index, eps)
    -> (y, residual_out, gate)`; residual_gate (B, C) or (B, L, C), applied as given (not selected)."""

    def check(self, x, residual, residual_gate, weight, bias, scale0, shift0, gate0, scale1, shift1, gate1,
              index, eps=1e-6):
        check_modulate_args(
            x, index=index, residual=residual, vectors={"weight": weight, "bias": bias},
            rows={"scale0": scale0, "shift0": shift0, "gate0": gate0}, rows_or_full={"residual_gate": residual_gate},
            set1={"scale1": scale1, "shift1": shift1, "gate1": gate1},
        )

    def _compute(self, impl, x, residual, residual_gate, weight, bias, scale0, shift0, gate0, scale1, shift1,
                 gate1, index, eps=1e-6):
        # residual_gate is one tensor: passed as set 0 with no set 1, so `index` does not select it
        # (a (B, C) row broadcast over L, or a full (B, L, C) gate such as the one returned above).
        if index is None:
            y, residual_out, _ = impl.residual_layer_norm_modulate(
                x, residual, residual_gate, None, weight, bias, scale0, shift0, None, None, None, None, None, eps
            )
            return y, residual_out, _broadcast_gate(gate0, x.shape)
        return impl.residual_layer_norm_modulate(
            x, residual, residual_gate, None, weight, bias, scale0, shift0, scale1, shift1, index, gate0, gate1, eps
        )


class FusedLayerNormScaleShiftGate(_ModulateOp):
    """`(x, weight, bias, scale, shift, gate, eps) -> (y, gate)`; gate returned as a (B, 1, C) view."""

    def check(self, x, weight, bias, scale, shift, gate, eps=1e-6):
        check_modulate_args(
            x, vectors={"weight": weight, "bias": bias}, rows={"scale": scale, "shift": shift, "gate": gate}
        )

    def _compute(self, impl, x, weight, bias, scale, shift, gate, eps=1e-6):
        y, _ = impl.layer_norm_modulate(x, weight, bias, scale, shift, None, None, None, None, None, eps)
        return y, gate[:, None, :]


class FusedResidualLayerNormScaleShiftGate(_ModulateOp):
    """`(x, residual, residual_gate, weight, bias, scale, shift, gate, eps) -> (y, residual_out, gate)`;
    residual_gate (B, C) broadcast over L, or (B, L, C); gate returned as a (B, 1, C) view."""

    def check(self, x, residual, residual_gate, weight, bias, scale, shift, gate, eps=1e-6):
        check_modulate_args(
            x, residual=residual, vectors={"weight": weight, "bias": bias},
            rows={"scale": scale, "shift": shift, "gate": gate}, rows_or_full={"residual_gate": residual_gate},
        )

    def _compute(self, impl, x, residual, residual_gate, weight, bias, scale, shift, gate, eps=1e-6):
        y, residual_out, _ = impl.residual_layer_norm_modulate(
            x, residual, residual_gate, None, weight, bias, scale, shift, None, None, None, None, None, eps
        )
        return y, residual_out, gate[:, None, :]
