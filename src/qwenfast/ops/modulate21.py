"""Fused modulation of the Qwen-Image-2.1 DiT: LayerNorm + scale (no shift), the tanh-gated residual
add, and both in one pass, with a per-token choice between a per-sample row and one shared row.

In every 2.1 block, twice (diffusers 0.42.1, `QwenImage21TransformerBlock`):

    y = LayerNorm(h) * (1 + scale_sel)          no shift; LayerNorm without affine, eps 1e-6
    h = h + tanh(gate_sel) * f(y)               f = attention, then the SwiGLU MLP

The parameters are rows of the model's one shared `modulation` tensor, `(B', 4C)` chunked
`[mod1.scale, mod1.gate, mod2.scale, mod2.gate]`. With `causal_condition` B' = B + 1: token l of
sample b takes row b where `target_mask[l]` (a target-image token) and the shared last row (t = 0)
otherwise (text and condition-image tokens); without it B' = B and every token takes its sample's row
(diffusers' `_select_modulation_rows`). A parameter travels as `Rows(sample, shared)`: the `(B, C)`
per-sample rows and the `(C,)` shared row (or None), views of the modulation tensor, never a
`(B, L, C)` tensor.

    layer_norm_scale(x, *, scale, target_mask=None, eps=1e-6) -> y
    residual_layer_norm_scale(x, residual, *, gate, scale, target_mask=None, eps=1e-6) -> (y, residual_out)
        residual_out = residual + tanh(gate_sel) * x, stored in x's dtype; y = the op above on the
        stored residual_out (what diffusers normalises too: its sum is rounded before its norm2)
    tanh_gated_residual(x, residual, *, gate, target_mask=None) -> residual + tanh(gate_sel) * x
    split_rows(params, target_mask) -> Rows      diffusers' (B', C) layout -> Rows

Statistics in fp32, two-pass biased variance; the arithmetic in fp32, one rounding per output.
Shapes: x, residual (B, L, C) floating point, any strides; target_mask (L,) bool; Rows.sample (B, C)
and Rows.shared (C,) with stride(-1) == 1.

Top-down: the parameter struct and its checks; the fp32 reference (the test oracle, the CPU
fallback and the benchmark baseline); the ops as `CustomOp` modules and their functions. The Triton
kernels are in `qwenfast.ops.triton.modulate21`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .custom_op import KERNEL_DTYPES, MAX_GRID_Y, CustomOp

__all__ = [
    "Rows",
    "split_rows",
    "select_rows",
    "check_modulate21_args",
    "layer_norm_scale",
    "residual_layer_norm_scale",
    "tanh_gated_residual",
    "layer_norm_scale_native",
    "residual_layer_norm_scale_native",
    "tanh_gated_residual_native",
    "LayerNormScale",
    "ResidualLayerNormScale",
    "TanhGatedResidual",
]

Tensor = torch.Tensor
# The whole row of a token lives in registers in the LayerNorm kernels: up to this many channels
# (16 K fp32 values over 16 warps is 32 a thread). Wider rows run the PyTorch path.
MAX_KERNEL_C = 16384


class Rows(NamedTuple):
    """One modulation parameter as rows: `sample` (B, C), the row of each sample; `shared` (C,), the
    one row (t = 0) that tokens outside the target mask take, or None when every token takes its
    sample's row."""

    sample: Tensor
    shared: Optional[Tensor] = None


def split_rows(params: Tensor, target_mask: Optional[Tensor]) -> Rows:
    """diffusers' `(B', C)` parameters as `Rows` (views, no copy): with a target mask (causal_condition)
    rows `[:-1]` per sample and the last row shared; without, every row per sample."""
    if not isinstance(params, torch.Tensor) or params.dim() != 2:
        got = tuple(params.shape) if isinstance(params, torch.Tensor) else type(params).__name__
        raise ValueError(f"modulation parameters must be (B', C); got {got}")
    if target_mask is None:
        return Rows(params)
    if params.shape[0] < 2:
        raise ValueError(
            f"with a target_token_mask the modulation parameters must have B + 1 >= 2 rows (the samples' rows, "
            f"then the t = 0 row); got shape {tuple(params.shape)}"
        )
    return Rows(params[:-1], params[-1])


# ---------------------------------------------------------------------------------------------------
# 1. Checks: shapes and devices only (no data is read: nothing synchronises, nothing costs under
#    torch.compile). Every path runs them: the modules, the `*_triton` entry points, the library ops.
# ---------------------------------------------------------------------------------------------------


def _floating_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t


def _on_device_of_x(name: str, t: Tensor, x: Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all tensors must share one device")


def _check_rows(name: str, rows: object, x: Tensor, has_mask: bool) -> None:
    # Written for the host time of an eager call (this runs per op call): no string is built unless
    # a rule is broken.
    if not isinstance(rows, Rows):
        raise TypeError(
            f"{name} must be qwenfast.ops.Rows(sample, shared), got {type(rows).__name__}; wrap (B, C) rows as "
            f"Rows(rows), or split diffusers' (B', C) parameters with split_rows(params, target_mask)"
        )
    B, _, C = x.shape
    sample, shared = rows
    _check_row(name, "sample", sample, (B, C), x)
    if shared is None:
        if has_mask:
            raise ValueError(f"target_mask is given, so {name}.shared (the row of the other tokens) must be given too")
    elif not has_mask:
        raise ValueError(f"{name}.shared is given but target_mask is None: which tokens take it?")
    else:
        _check_row(name, "shared", shared, (C,), x)


def _check_row(name: str, part: str, t: Tensor, shape: tuple[int, ...], x: Tensor) -> None:
    if isinstance(t, torch.Tensor) and t.shape == shape and t.is_floating_point() and t.device == x.device \
            and (shape[-1] <= 1 or t.stride(-1) == 1):
        return
    what = f"{name}.{part}"
    _floating_tensor(what, t)
    if tuple(t.shape) != shape:
        raise ValueError(f"{what} must be {shape} for x of shape {tuple(x.shape)}, got {tuple(t.shape)}")
    _on_device_of_x(what, t, x)
    raise ValueError(f"{what} must be contiguous in its last dimension; got strides {t.stride()}")


def check_modulate21_args(
    x: Tensor, *, target_mask: Optional[Tensor], residual: Optional[Tensor] = None, **params: Rows
) -> tuple[int, int, int]:
    """Check one call's arguments (x (B, L, C); residual like x; target_mask (L,) bool or None; each
    named parameter a `Rows`); return (B, L, C)."""
    _floating_tensor("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must be (B, L, C), got shape {tuple(x.shape)}")
    B, L, C = x.shape
    if residual is not None:
        _floating_tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        _on_device_of_x("residual", residual, x)
    if target_mask is not None:
        if not isinstance(target_mask, torch.Tensor) or target_mask.dtype != torch.bool:
            got = target_mask.dtype if isinstance(target_mask, torch.Tensor) else type(target_mask).__name__
            raise TypeError(f"target_mask must be a bool tensor, got {got}")
        if tuple(target_mask.shape) != (L,):
            raise ValueError(f"target_mask must be (L,) = ({L},) for x of shape {tuple(x.shape)}, "
                             f"got {tuple(target_mask.shape)}")
        _on_device_of_x("target_mask", target_mask, x)
    for name, rows in params.items():
        _check_rows(name, rows, x, target_mask is not None)
    return B, L, C


# ---------------------------------------------------------------------------------------------------
# 2. The fp32 reference: readable, the oracle of the kernels, the CPU fallback, the benchmark baseline.
# ---------------------------------------------------------------------------------------------------


def select_rows(rows: Rows, target_mask: Optional[Tensor]) -> Tensor:
    """Each token's row: (B, 1, C) without a mask, else (B, L, C) (shared where the mask is False)."""
    if target_mask is None:
        return rows.sample[:, None, :]
    return torch.where(target_mask[None, :, None], rows.sample[:, None, :], rows.shared[None, None, :])


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # fp32 (fp64 stays fp64: the oracle's precision)


def _layer_norm(x: Tensor, eps: float) -> Tensor:
    # Two-pass biased variance: subtracting the mean first keeps a large common offset from cancelling.
    xf = x.to(_compute_dtype(x))
    d = xf - xf.mean(-1, keepdim=True)
    return d * torch.rsqrt((d * d).mean(-1, keepdim=True) + eps)


def layer_norm_scale_native(x: Tensor, *, scale: Rows, target_mask: Optional[Tensor] = None,
                            eps: float = 1e-6) -> Tensor:
    """y = LayerNorm(x) * (1 + scale_sel), in fp32, stored in x's dtype."""
    s = select_rows(scale, target_mask).to(_compute_dtype(x))
    return (_layer_norm(x, eps) * (1 + s)).to(x.dtype)


def tanh_gated_residual_native(x: Tensor, residual: Tensor, *, gate: Rows,
                               target_mask: Optional[Tensor] = None) -> Tensor:
    """residual + tanh(gate_sel) * x, in fp32, stored in x's dtype."""
    dtype = _compute_dtype(x)
    g = select_rows(gate, target_mask).to(dtype)
    return (residual.to(dtype) + torch.tanh(g) * x.to(dtype)).to(x.dtype)


def residual_layer_norm_scale_native(x: Tensor, residual: Tensor, *, gate: Rows, scale: Rows,
                                     target_mask: Optional[Tensor] = None,
                                     eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """(y, residual_out): the gated add, stored; then LayerNorm * (1 + scale_sel) of the stored value."""
    residual_out = tanh_gated_residual_native(x, residual, gate=gate, target_mask=target_mask)
    return layer_norm_scale_native(residual_out, scale=scale, target_mask=target_mask, eps=eps), residual_out


# ---------------------------------------------------------------------------------------------------
# 3. The ops: check once, then the implementation `CustomOp` picks for this call's tensors. On CUDA
#    the Triton kernel, unless it cannot take the call (dtype, row width): then the reference.
# ---------------------------------------------------------------------------------------------------


def _kernels():
    # Imported on first use: `import qwenfast.ops` must work where triton is not installed.
    from .triton import modulate21

    return modulate21


def kernel_takes(x: Tensor, normalises: bool) -> bool:
    """Can the Triton kernel take x (its dtype and batch; whole rows in registers when it normalises)?
    The device is `CustomOp`'s choice, made before."""
    return (x.dtype in KERNEL_DTYPES and x.shape[0] <= MAX_GRID_Y
            and (not normalises or x.shape[-1] <= MAX_KERNEL_C))


class LayerNormScale(CustomOp):
    """`(x, *, scale: Rows, target_mask=None, eps=1e-6) -> LayerNorm(x) * (1 + scale_sel)`"""

    def check(self, x, *, scale, target_mask=None, eps=1e-6):
        check_modulate21_args(x, target_mask=target_mask, scale=scale)

    def forward(self, x, *, scale, target_mask=None, eps=1e-6):
        self.check(x, scale=scale, target_mask=target_mask)
        return self.dispatch(x)(x, scale=scale, target_mask=target_mask, eps=eps)

    def forward_native(self, x, *, scale, target_mask=None, eps=1e-6):
        return layer_norm_scale_native(x, scale=scale, target_mask=target_mask, eps=eps)

    def forward_cuda(self, x, *, scale, target_mask=None, eps=1e-6):
        if not kernel_takes(x, normalises=True):
            return self.forward_native(x, scale=scale, target_mask=target_mask, eps=eps)
        return _kernels().layer_norm_scale_triton(x, scale=scale, target_mask=target_mask, eps=eps, checked=True)


class ResidualLayerNormScale(CustomOp):
    """`(x, residual, *, gate: Rows, scale: Rows, target_mask=None, eps=1e-6) -> (y, residual_out)`"""

    def check(self, x, residual, *, gate, scale, target_mask=None, eps=1e-6):
        check_modulate21_args(x, target_mask=target_mask, residual=residual, gate=gate, scale=scale)

    def forward(self, x, residual, *, gate, scale, target_mask=None, eps=1e-6):
        self.check(x, residual, gate=gate, scale=scale, target_mask=target_mask)
        return self.dispatch(x)(x, residual, gate=gate, scale=scale, target_mask=target_mask, eps=eps)

    def forward_native(self, x, residual, *, gate, scale, target_mask=None, eps=1e-6):
        return residual_layer_norm_scale_native(x, residual, gate=gate, scale=scale, target_mask=target_mask, eps=eps)

    def forward_cuda(self, x, residual, *, gate, scale, target_mask=None, eps=1e-6):
        if not kernel_takes(x, normalises=True):
            return self.forward_native(x, residual, gate=gate, scale=scale, target_mask=target_mask, eps=eps)
        return _kernels().residual_layer_norm_scale_triton(x, residual, gate=gate, scale=scale,
                                                           target_mask=target_mask, eps=eps, checked=True)


class TanhGatedResidual(CustomOp):
    """`(x, residual, *, gate: Rows, target_mask=None) -> residual + tanh(gate_sel) * x`"""

    def check(self, x, residual, *, gate, target_mask=None):
        check_modulate21_args(x, target_mask=target_mask, residual=residual, gate=gate)

    def forward(self, x, residual, *, gate, target_mask=None):
        self.check(x, residual, gate=gate, target_mask=target_mask)
        return self.dispatch(x)(x, residual, gate=gate, target_mask=target_mask)

    def forward_native(self, x, residual, *, gate, target_mask=None):
        return tanh_gated_residual_native(x, residual, gate=gate, target_mask=target_mask)

    def forward_cuda(self, x, residual, *, gate, target_mask=None):
        if not kernel_takes(x, normalises=False):
            return self.forward_native(x, residual, gate=gate, target_mask=target_mask)
        return _kernels().tanh_gated_residual_triton(x, residual, gate=gate, target_mask=target_mask, checked=True)


_layer_norm_scale = LayerNormScale()
_residual_layer_norm_scale = ResidualLayerNormScale()
_tanh_gated_residual = TanhGatedResidual()
# The functions call `forward` itself: the same check + dispatch, without nn.Module's call machinery.


def layer_norm_scale(x: Tensor, *, scale: Rows, target_mask: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """y = LayerNorm(x) * (1 + scale_sel) in x's dtype (no affine, no shift). See the module doc."""
    return _layer_norm_scale.forward(x, scale=scale, target_mask=target_mask, eps=eps)


def residual_layer_norm_scale(x: Tensor, residual: Tensor, *, gate: Rows, scale: Rows,
                              target_mask: Optional[Tensor] = None, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """residual_out = residual + tanh(gate_sel) * x (x's dtype), y = LayerNorm(residual_out) *
    (1 + scale_sel); returns (y, residual_out). One read of x and residual, one write of each output."""
    return _residual_layer_norm_scale.forward(x, residual, gate=gate, scale=scale, target_mask=target_mask, eps=eps)


def tanh_gated_residual(x: Tensor, residual: Tensor, *, gate: Rows, target_mask: Optional[Tensor] = None) -> Tensor:
    """residual + tanh(gate_sel) * x in x's dtype (the gated add after a block's MLP)."""
    return _tanh_gated_residual.forward(x, residual, gate=gate, target_mask=target_mask)
