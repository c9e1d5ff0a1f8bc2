"""Fused LayerNorm + scale/shift (+ gate) modulation of the Qwen-Image DiT, with a per-token choice
between two parameter sets ("select01").

In every DiT block, per stream, twice:

    x_hat = LayerNorm(x)                       no affine by default, eps 1e-6, statistics in fp32
    y     = x_hat * (1 + scale) + shift        scale, shift: rows (B, C) of the timestep modulation
    gate                                       kept for the gated residual add after attention / MLP

Edit models (`zero_cond_t`) carry two parameter sets; `index[b, l] != 0` picks set 1 for a token.
The residual variant first forms `residual_out = residual + gate * x` (stored in x's dtype) and
normalises that stored value.

One convention for every layer (public functions, the fp32 reference, the Triton implementation):
the parameters travel as a `Modulation(scale, shift, gate)` of (B, C) rows, or as a
`Select(set0, set1, index)` of two such sets picked per token; everything optional is keyword-only.

    layer_norm_modulate(x, params, *, weight=None, bias=None, eps=1e-6) -> y
    residual_layer_norm_modulate(x, residual, residual_params, params, *, weight=None, bias=None, eps=1e-6)
        -> (y, residual_out)       residual_out = residual + residual_params.gate_sel * x
    gated_residual(x, residual, params) -> residual + params.gate_sel * x

The compatible modules (`FusedLayerNormScaleShiftGateSelect01` etc., DESIGN.md §3) keep their
positional signatures and convert to this once, at the edge. The torch.library ops
(qwenfast.ops.triton.modulate) take the flattening of the same structs, in the compatible order.

This file holds, top-down:
  1. the parameter structs and the argument checks shared by every path (errors name the argument);
  2. the fp32 reference: readable, the test oracle, the CPU fallback and the benchmark baseline;
  3. the ops as `CustomOp` modules, the gate-free functions of the DiT path (no (B, L, C) gate tensor
     is ever written) and the compatible modules (they return the gate).

Shapes: x (B, L, C), contiguous in its last dimension; parameters (B, C) with stride(-1) == 1 (row
views of a chunked (B, 6C) tensor are fine, no copies); index (B, L) int32/int64/bool.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import torch

from .custom_op import CustomOp

__all__ = [
    "Modulation",
    "Select",
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
    "parameter_sets",
    "select01",
    "check_modulate_args",
]

Tensor = torch.Tensor
INDEX_DTYPES = (torch.int32, torch.int64, torch.bool)


# ---------------------------------------------------------------------------------------------------
# 1a. The parameter structs.
# ---------------------------------------------------------------------------------------------------


class Modulation(NamedTuple):
    """One parameter set: (B, C) rows of the timestep modulation. Each op reads the fields it needs
    (scale and shift for the norm, gate for a gated add) and ignores the others."""

    scale: Optional[Tensor] = None
    shift: Optional[Tensor] = None
    gate: Optional[Tensor] = None


class Select(NamedTuple):
    """Two parameter sets picked per token: set1 where index[b, l] != 0, else set0. index (B, L)."""

    set0: Modulation
    set1: Modulation
    index: Tensor


Params = Union[Modulation, Select]  # what every op takes for its parameters


def parameter_sets(params: Params, name: str = "params") -> tuple[Modulation, Optional[Modulation], Optional[Tensor]]:
    """(set0, set1 or None, index or None) of a Modulation or a Select."""
    if type(params) is Modulation:
        return params, None, None
    if type(params) is Select:
        if type(params.set0) is not Modulation or type(params.set1) is not Modulation:
            raise TypeError(f"{name}: a Select's set0 and set1 must be Modulation, got "
                            f"{type(params.set0).__name__} and {type(params.set1).__name__}")
        if params.index is None:
            raise TypeError(f"{name}.index must be a (B, L) tensor, got None (use a Modulation for one set)")
        return params.set0, params.set1, params.index
    raise TypeError(f"{name} must be a Modulation or a Select, got {type(params).__name__}")


# ---------------------------------------------------------------------------------------------------
# 1b. Checks: shapes and devices only (no data is read), so they cost nothing under torch.compile and
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


def _fits(t: object, shape: tuple[int, ...], device: torch.device) -> bool:
    """A floating tensor of this shape on `device`, contiguous in its last dim (or of size <= 1 there)."""
    return (isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape == shape and t.device == device
            and (shape[-1] <= 1 or t.stride(-1) == 1))


def _all_fit(x, index, residual, vectors, rows, rows_or_full, set1) -> bool:
    """check_modulate_args' rules as one conjunction: True only where they all hold (False sends the
    call through the step-by-step checks, which name what broke)."""
    if not (isinstance(x, torch.Tensor) and x.dim() == 3):
        return False
    B, L, C = x.shape
    dev = x.device
    if not _fits(x, x.shape, dev):
        return False
    if index is not None and not _index_fits(index, x):
        return False
    if residual is not None and not _fits(residual, x.shape, dev):
        return False
    row, full = (B, C), (B, L, C)
    return (all(v is None or _fits(v, (C,), dev) for v in (vectors or {}).values())
            and all(_fits(p, row, dev) for p in (rows or {}).values())
            and all(_fits(p, row, dev) or _fits(p, full, dev) for p in (rows_or_full or {}).values())
            and all(_fits(p, row, dev) if p is not None else index is None for p in (set1 or {}).values()))


def _index_fits(index: object, x: Tensor) -> bool:
    return (isinstance(index, torch.Tensor) and index.dtype in INDEX_DTYPES and index.shape == x.shape[:2]
            and index.device == x.device)


def _all_rows_fit(ts: tuple, shape: tuple[int, ...], device: torch.device) -> bool:
    """`_fits` of every tensor in `ts` (one loop, no call per tensor: it runs on every eager call)."""
    any_stride = shape[-1] <= 1
    for t in ts:
        if not (isinstance(t, torch.Tensor) and t.shape == shape and t.device == device and t.is_floating_point()
                and (any_stride or t.stride(-1) == 1)):
            return False
    return True


# The parameters an op reads, as a slice of Modulation(scale, shift, gate): the fast check takes
# them as `set[fields]`, the named errors as `Modulation._fields[fields]`.
SCALE_SHIFT, GATE, ALL = slice(0, 2), slice(2, 3), slice(0, 3)


def _sets_fit(x: Tensor, s0: Modulation, s1: Optional[Modulation], index: Optional[Tensor], fields: slice,
              residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor]) -> bool:
    """`_all_fit` for one struct call, without building the dicts: the common case of every eager call
    decided in one pass (host time)."""
    if not (isinstance(x, torch.Tensor) and x.dim() == 3):
        return False
    shape = x.shape
    dev = x.device
    if not _all_rows_fit((x,) if residual is None else (x, residual), shape, dev):
        return False
    if index is not None and not _index_fits(index, x):
        return False
    if (weight is not None or bias is not None) and not _all_rows_fit(
            tuple(v for v in (weight, bias) if v is not None), shape[2:], dev):
        return False
    return _all_rows_fit(s0[fields] if s1 is None else s0[fields] + s1[fields], shape[::2], dev)


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
    if _all_fit(x, index, residual, vectors, rows, rows_or_full, set1):
        return x.shape  # the common case, decided in one pass (host time); else the named error below
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


def _check_params(x: Tensor, params: Params, fields: slice, *, name: str = "params",
                  residual: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                  bias: Optional[Tensor] = None, prefix: str = "") -> Optional[Tensor]:
    """Check one call's structured arguments (the parameters `fields` of each set: SCALE_SHIFT, GATE
    or ALL) through `check_modulate_args`, naming each parameter as the flat ops do (scale0, shift1,
    ...; `prefix` before it); return the index (or None)."""
    s0, s1, index = parameter_sets(params, name)
    if _sets_fit(x, s0, s1, index, fields, residual, weight, bias):
        return index  # the common case, decided without the dicts below
    names = Modulation._fields[fields]
    rows = {f"{prefix}{f}0": getattr(s0, f) for f in names}
    set1 = None if s1 is None else {f"{prefix}{f}1": getattr(s1, f) for f in names}
    check_modulate_args(x, index=index, residual=residual, vectors={"weight": weight, "bias": bias},
                        rows=rows, set1=set1)
    return index


def _gate_fits(gate: object, x: Tensor) -> bool:
    """A residual gate applied as given: (B, C) rows broadcast over L, or a full (B, L, C)."""
    return _all_rows_fit((gate,), x.shape[::2], x.device) or _all_rows_fit((gate,), x.shape, x.device)


def _check_residual_gate(x: Tensor, residual_params: Params, index: Optional[Tensor]) -> None:
    """The residual gate: a Modulation's gate is applied as given, (B, C) broadcast over L or a full
    (B, L, C); a Select's gates are (B, C) rows picked with the same index as the norm's parameters.
    x has been checked."""
    g0, g1, gindex = parameter_sets(residual_params, "residual_params")
    if g1 is None:
        if not _gate_fits(g0.gate, x):
            check_modulate_args(x, rows_or_full={"residual_gate": g0.gate})
        return
    if index is not None and gindex is not index:
        raise ValueError("residual_params and params select with different index tensors; "
                         "pass one index (the same tensor) to both")
    if not ((gindex is index or _index_fits(gindex, x))  # the params' index has been checked with them
            and _all_rows_fit((g0.gate, g1.gate), x.shape[::2], x.device)):
        check_modulate_args(x, index=gindex, rows={"residual_gate0": g0.gate}, set1={"residual_gate1": g1.gate})


# ---------------------------------------------------------------------------------------------------
# 2. The fp32 reference. One function per op, in the convention above; the Triton implementation
#    (qwenfast.ops.triton.modulate) has the same signatures, so the modules run either.
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


def _selected(params: Params, field: str) -> Tensor:
    s0, s1, index = parameter_sets(params)
    return select01(index, getattr(s0, field), None if s1 is None else getattr(s1, field))


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


def layer_norm_modulate_native(x: Tensor, params: Params, *, weight: Optional[Tensor] = None,
                               bias: Optional[Tensor] = None, eps: float = 1e-6,
                               with_gate: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """y = LayerNorm(x) * (1 + scale_sel) + shift_sel in x's dtype; with `with_gate`, also the selected
    gate (B, L, C) in the gate's dtype (None otherwise)."""
    scale = _selected(params, "scale").float()
    shift = _selected(params, "shift").float()
    y = (_layer_norm_fp32(x, weight, bias, eps) * (1 + scale) + shift).to(x.dtype)
    gate = None
    if with_gate:
        g = _selected(params, "gate")
        gate = g.to(parameter_sets(params)[0].gate.dtype).expand(x.shape).contiguous()
    return y, gate


def gated_residual_native(x: Tensor, residual: Tensor, params: Params) -> Tensor:
    """residual + gate_sel * x, computed in fp32 and stored in x's dtype. gate (B, C) or (B, L, C)."""
    g = _selected(params, "gate").float()
    return (residual.float() + g * x.float()).to(x.dtype)


def residual_layer_norm_modulate_native(
    x: Tensor, residual: Tensor, residual_params: Params, params: Params, *, weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None, eps: float = 1e-6, with_gate: bool = False,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """residual_out = residual + residual_params.gate_sel * x (x's dtype); then the op above on
    residual_out, as stored (the kernel normalises the rounded value, and so does this)."""
    residual_out = gated_residual_native(x, residual, residual_params)
    y, gate = layer_norm_modulate_native(residual_out, params, weight=weight, bias=bias, eps=eps, with_gate=with_gate)
    return y, residual_out, gate


class _Impl(NamedTuple):
    """One implementation of the three ops (native here, Triton in ops/triton/modulate.py)."""

    layer_norm_modulate: Callable[..., tuple[Tensor, Optional[Tensor]]]
    residual_layer_norm_modulate: Callable[..., tuple[Tensor, Tensor, Optional[Tensor]]]
    gated_residual: Callable[..., Tensor]


NATIVE = _Impl(layer_norm_modulate_native, residual_layer_norm_modulate_native, gated_residual_native)
_TRITON: list[_Impl] = []  # filled on first use: `import qwenfast.ops` must work without triton


def _triton_impl() -> _Impl:
    if not _TRITON:
        from .triton import modulate as tm

        _TRITON.append(_Impl(tm.layer_norm_modulate_triton, tm.residual_layer_norm_modulate_triton,
                             tm.gated_residual_triton))
    return _TRITON[0]


# ---------------------------------------------------------------------------------------------------
# 3. The ops. Each module checks its arguments once (`check`, run by `CustomOp.forward` before the
#    dispatch), then runs `_compute` with the implementation picked for this call's tensors.
# ---------------------------------------------------------------------------------------------------


class _ModulateOp(CustomOp):
    def _compute(self, impl: _Impl, *args, **kwargs):
        raise NotImplementedError

    def forward_native(self, *args, **kwargs):
        return self._compute(NATIVE, *args, **kwargs)

    def forward_cuda(self, *args, **kwargs):
        return self._compute(_triton_impl(), *args, **kwargs)


# --- gate-free entry points of the DiT path --------------------------------------------------------


class LayerNormModulate(_ModulateOp):
    """`(x, params, *, weight=None, bias=None, eps=1e-6) -> y`"""

    def check(self, x, params, *, weight=None, bias=None, eps=1e-6):
        _check_params(x, params, SCALE_SHIFT, weight=weight, bias=bias)

    def _compute(self, impl, x, params, *, weight=None, bias=None, eps=1e-6):
        return impl.layer_norm_modulate(x, params, weight=weight, bias=bias, eps=eps)[0]


class ResidualLayerNormModulate(_ModulateOp):
    """`(x, residual, residual_params, params, *, weight=None, bias=None, eps=1e-6) -> (y, residual_out)`"""

    def check(self, x, residual, residual_params, params, *, weight=None, bias=None, eps=1e-6):
        index = _check_params(x, params, SCALE_SHIFT, residual=residual, weight=weight, bias=bias)
        _check_residual_gate(x, residual_params, index)

    def _compute(self, impl, x, residual, residual_params, params, *, weight=None, bias=None, eps=1e-6):
        return impl.residual_layer_norm_modulate(x, residual, residual_params, params, weight=weight, bias=bias,
                                                 eps=eps)[:2]


class GatedResidual(_ModulateOp):
    """`(x, residual, params) -> residual + params.gate_sel * x`"""

    def check(self, x, residual, params):
        _check_params(x, params, GATE, residual=residual)

    def _compute(self, impl, x, residual, params):
        return impl.gated_residual(x, residual, params)


_layer_norm_modulate = LayerNormModulate()
_residual_layer_norm_modulate = ResidualLayerNormModulate()
_gated_residual = GatedResidual()
# The functions call `forward` itself: the same check + dispatch, without nn.Module's call machinery.


def layer_norm_modulate(x: Tensor, params: Params, *, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                        eps: float = 1e-6) -> Tensor:
    """y = LayerNorm(x) * (1 + scale_sel) + shift_sel; no gate tensor is written. See the module doc."""
    return _layer_norm_modulate.forward(x, params, weight=weight, bias=bias, eps=eps)


def residual_layer_norm_modulate(x: Tensor, residual: Tensor, residual_params: Params, params: Params, *,
                                 weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                                 eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """residual_out = residual + residual_params.gate_sel * x (x's dtype); y = LayerNorm(residual_out)
    * (1 + scale_sel) + shift_sel. Returns (y, residual_out); the gates are consumed here, never
    materialised. Both Selects (if both select) share one index tensor."""
    return _residual_layer_norm_modulate.forward(x, residual, residual_params, params, weight=weight, bias=bias, eps=eps)


def gated_residual(x: Tensor, residual: Tensor, params: Params) -> Tensor:
    """residual + params.gate_sel * x, in x's dtype (the last residual add of a block)."""
    return _gated_residual.forward(x, residual, params)


# --- the compatible API: returns the gate; positional signatures of DESIGN.md §3 ---------------------


def _broadcast_gate(gate: Tensor, shape: torch.Size) -> Tensor:
    return gate.unsqueeze(1).expand(shape)  # (B, L, C) view of a (B, C) row: no copy


def _select01_params(scale0, shift0, gate0, scale1, shift1, gate1, index) -> Params:
    set0 = Modulation(scale0, shift0, gate0)
    return set0 if index is None else Select(set0, Modulation(scale1, shift1, gate1), index)


class _CompatibleOp(_ModulateOp):
    """The compatible signature, converted once to the convention above: `forward` converts, checks,
    dispatches; forward_native / forward_cuda take the converted arguments."""

    def _convert(self, *args) -> tuple[tuple, dict]:
        raise NotImplementedError

    def forward(self, *args):
        a, kw = self._convert(*args)
        return super().forward(*a, **kw)

    def forward_triton(self, *args):
        a, kw = self._convert(*args)
        return super().forward_triton(*a, **kw)


class FusedLayerNormScaleShiftGateSelect01(_CompatibleOp):
    """`(x, weight, bias, scale0, shift0, gate0, scale1, shift1, gate1, index, eps) -> (y, gate)`;
    gate (B, L, C) = the selected gate per token (written; prefer `layer_norm_modulate` in hot paths).
    With index None: set 0 only, gate a (B, L, C) broadcast view of gate0."""

    def _convert(self, x, weight, bias, scale0, shift0, gate0, scale1, shift1, gate1, index, eps=1e-6):
        params = _select01_params(scale0, shift0, gate0, scale1, shift1, gate1, index)
        return (x, params), dict(weight=weight, bias=bias, eps=eps)

    def check(self, x, params, *, weight=None, bias=None, eps=1e-6):
        _check_params(x, params, ALL, weight=weight, bias=bias)

    def _compute(self, impl, x, params, *, weight=None, bias=None, eps=1e-6):
        if type(params) is Modulation:  # one set: the gate is a broadcast view, nothing to write
            y, _ = impl.layer_norm_modulate(x, params, weight=weight, bias=bias, eps=eps)
            return y, _broadcast_gate(params.gate, x.shape)
        return impl.layer_norm_modulate(x, params, weight=weight, bias=bias, eps=eps, with_gate=True)


class FusedResidualLayerNormScaleShiftGateSelect01(_CompatibleOp):
    """`(x, residual, residual_gate, weight, bias, scale0, shift0, gate0, scale1, shift1, gate1, index, eps)
    -> (y, residual_out, gate)`; residual_gate (B, C) or (B, L, C), applied as given (not selected)."""

    def _convert(self, x, residual, residual_gate, weight, bias, scale0, shift0, gate0, scale1, shift1, gate1, index,
                 eps=1e-6):
        params = _select01_params(scale0, shift0, gate0, scale1, shift1, gate1, index)
        return (x, residual, Modulation(gate=residual_gate), params), dict(weight=weight, bias=bias, eps=eps)

    def check(self, x, residual, residual_params, params, *, weight=None, bias=None, eps=1e-6):
        _check_params(x, params, ALL, residual=residual, weight=weight, bias=bias)
        _check_residual_gate(x, residual_params, None)

    def _compute(self, impl, x, residual, residual_params, params, *, weight=None, bias=None, eps=1e-6):
        kw = dict(weight=weight, bias=bias, eps=eps)
        if type(params) is Modulation:
            y, residual_out, _ = impl.residual_layer_norm_modulate(x, residual, residual_params, params, **kw)
            return y, residual_out, _broadcast_gate(params.gate, x.shape)
        return impl.residual_layer_norm_modulate(x, residual, residual_params, params, with_gate=True, **kw)


class FusedLayerNormScaleShiftGate(_CompatibleOp):
    """`(x, weight, bias, scale, shift, gate, eps) -> (y, gate)`; gate returned as a (B, 1, C) view."""

    def _convert(self, x, weight, bias, scale, shift, gate, eps=1e-6):
        return (x, Modulation(scale, shift, gate)), dict(weight=weight, bias=bias, eps=eps)

    def check(self, x, params, *, weight=None, bias=None, eps=1e-6):
        if not _sets_fit(x, params, None, None, ALL, None, weight, bias):
            check_modulate_args(x, vectors={"weight": weight, "bias": bias},
                                rows={"scale": params.scale, "shift": params.shift, "gate": params.gate})

    def _compute(self, impl, x, params, *, weight=None, bias=None, eps=1e-6):
        y, _ = impl.layer_norm_modulate(x, params, weight=weight, bias=bias, eps=eps)
        return y, params.gate.unsqueeze(1)  # (B, 1, C)


class FusedResidualLayerNormScaleShiftGate(_CompatibleOp):
    """`(x, residual, residual_gate, weight, bias, scale, shift, gate, eps) -> (y, residual_out, gate)`;
    residual_gate (B, C) broadcast over L, or (B, L, C); gate returned as a (B, 1, C) view."""

    def _convert(self, x, residual, residual_gate, weight, bias, scale, shift, gate, eps=1e-6):
        return ((x, residual, Modulation(gate=residual_gate), Modulation(scale, shift, gate)),
                dict(weight=weight, bias=bias, eps=eps))

    def check(self, x, residual, residual_params, params, *, weight=None, bias=None, eps=1e-6):
        if not (_sets_fit(x, params, None, None, ALL, residual, weight, bias)
                and _gate_fits(residual_params.gate, x)):
            check_modulate_args(x, residual=residual, vectors={"weight": weight, "bias": bias},
                                rows={"scale": params.scale, "shift": params.shift, "gate": params.gate},
                                rows_or_full={"residual_gate": residual_params.gate})

    def _compute(self, impl, x, residual, residual_params, params, *, weight=None, bias=None, eps=1e-6):
        y, residual_out, _ = impl.residual_layer_norm_modulate(x, residual, residual_params, params, weight=weight,
                                                               bias=bias, eps=eps)
        return y, residual_out, params.gate.unsqueeze(1)
