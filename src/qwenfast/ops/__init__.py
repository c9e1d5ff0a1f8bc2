"""Fused DiT modulation ops: LayerNorm + scale/shift (+ gate), optionally after a gated residual add,
with a per-token choice between two parameter sets ("select01").

Triton kernels on CUDA, PyTorch everywhere else, chosen per call by `CustomOp` (the one dispatch rule
of every op in this package, VAE ops included). Parameters travel as `Modulation(scale, shift, gate)`
of (B, C) rows, or `Select(set0, set1, index)`: set1 where index[b, l] != 0. Public API:

Gate-free functions of the DiT path (no (B, L, C) gate is ever written):
    layer_norm_modulate(x, params, *, weight=None, bias=None, eps=1e-6) -> y
    residual_layer_norm_modulate(x, residual, residual_params, params, *, weight=None, bias=None, eps=1e-6)
        -> (y, residual_out)            residual_out = residual + residual_params.gate_sel * x
    gated_residual(x, residual, params) -> residual + params.gate_sel * x

Modules (compatible API of DESIGN.md §3, positional; return the gate):
    FusedLayerNormScaleShiftGateSelect01()(x, weight, bias, scale0, shift0, gate0, scale1, shift1, gate1, index, eps)
        -> (y, gate)
    FusedResidualLayerNormScaleShiftGateSelect01()(x, residual, residual_gate, weight, bias,
        scale0, shift0, gate0, scale1, shift1, gate1, index, eps) -> (y, residual_out, gate)
    FusedLayerNormScaleShiftGate()(x, weight, bias, scale, shift, gate, eps) -> (y, gate (B, 1, C) view)
    FusedResidualLayerNormScaleShiftGate()(x, residual, residual_gate, weight, bias, scale, shift, gate, eps)
        -> (y, residual_out, gate (B, 1, C) view)
"""

from . import modulate as _modulate
from .custom_op import CustomOp, choose_backend, triton_available
from .modulate import *  # noqa: F403  (the public names are listed once, in modulate.__all__)

__all__ = ["CustomOp", "choose_backend", "triton_available", *_modulate.__all__]

from .modulate21 import *  # noqa: E402,F403  the Qwen-Image-2.1 variant (Rows, layer_norm_scale, ...)
from .modulate21 import __all__ as _all21  # noqa: E402

__all__ += _all21
