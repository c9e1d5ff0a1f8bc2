"""Every op's native fallback (and the public entry point, which takes the fallback on CPU tensors)
returns its input's dtype in fp32, bf16 and fp16; and a whole tiny VAE decodes in bf16/fp16 on CPU.

A fallback that computes in fp32 must round back to the input's dtype, not to its own fp32 copy
(`x = x.float(); ...; return y.to(x.dtype)` is the bug this catches)."""

import pytest
import torch

from qwenfast import ops
from qwenfast.ops import attention, elementwise, modulate, rms_norm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _randn(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _rms_norm_cases(dtype):
    x, gamma, bias = _randn(2, 8, 3, 5, dtype=dtype), _randn(8, 1, 1, dtype=dtype, seed=1), _randn(8, dtype=dtype)
    x5 = _randn(1, 8, 2, 3, 5, dtype=dtype)
    return {
        "rms_norm_native": lambda: rms_norm.rms_norm_native(x, gamma),
        "rms_norm_native_silu_bias": lambda: rms_norm.rms_norm_native(x, gamma, silu=True, bias=bias),
        "rms_norm_native_5d": lambda: rms_norm.rms_norm_native(x5, gamma.reshape(8, 1, 1, 1)),
        "rms_norm_channels_last": lambda: rms_norm.rms_norm(x.contiguous(memory_format=torch.channels_last), gamma),
        "rms_norm": lambda: rms_norm.rms_norm(x, gamma, silu=True, bias=bias),
    }


def _elementwise_cases(dtype):
    x, bias, res = _randn(2, 4, 3, 5, dtype=dtype), _randn(4, dtype=dtype), _randn(2, 4, 3, 5, dtype=dtype, seed=2)
    return {
        "bias_residual_add_native": lambda: elementwise.bias_residual_add_native(x, bias, res),
        "bias_residual_add_native_fp32_bias": lambda: elementwise.bias_residual_add_native(x, bias.float(), res),
        "bias_residual_add": lambda: elementwise.bias_residual_add(x, bias, res),
        "upsample_nearest2x_native": lambda: elementwise.upsample_nearest2x_native(x),
        "upsample_nearest2x": lambda: elementwise.upsample_nearest2x(x),
    }


def _attention_cases(dtype):
    q, k, v = (_randn(2, 6, 16, dtype=dtype, seed=s) for s in range(3))
    return {
        "single_head_attention_native": lambda: attention.single_head_attention_native(q, k, v),
        # a tiny score budget forces the chunked loop (its own output allocation)
        "single_head_attention_native_chunked": lambda: attention.single_head_attention_native(q, k, v, score_bytes=64),
        "single_head_attention": lambda: attention.single_head_attention(q, k, v),
    }


def _modulate_cases(dtype):
    B, L, C = 2, 5, 16
    x, res = _randn(B, L, C, dtype=dtype), _randn(B, L, C, dtype=dtype, seed=1)
    w, b = _randn(C, dtype=dtype, seed=2), _randn(C, dtype=dtype, seed=3)
    s0, h0, g0, s1, h1, g1 = (_randn(B, C, dtype=dtype, seed=10 + i) for i in range(6))
    index = torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 0, 1]])
    M, S = modulate.Modulation, modulate.Select
    sel = S(M(s0, h0, g0), M(s1, h1, g1), index)
    gates = S(M(gate=g0), M(gate=g1), index)
    return {
        "layer_norm_modulate_native": lambda: modulate.layer_norm_modulate_native(
            x, sel, weight=w, bias=b, eps=1e-6, with_gate=True),
        "gated_residual_native": lambda: modulate.gated_residual_native(x, res, gates),
        "residual_layer_norm_modulate_native": lambda: modulate.residual_layer_norm_modulate_native(
            x, res, gates, sel, weight=w, bias=b, eps=1e-6, with_gate=True),
        "layer_norm_modulate": lambda: ops.layer_norm_modulate(x, sel, weight=w, bias=b),
        "residual_layer_norm_modulate": lambda: ops.residual_layer_norm_modulate(x, res, gates, sel, weight=w, bias=b),
        "gated_residual": lambda: ops.gated_residual(x, res, gates),
        "FusedLayerNormScaleShiftGateSelect01": lambda: ops.FusedLayerNormScaleShiftGateSelect01()(
            x, w, b, s0, h0, g0, s1, h1, g1, index, 1e-6),
        "FusedResidualLayerNormScaleShiftGateSelect01": lambda: ops.FusedResidualLayerNormScaleShiftGateSelect01()(
            x, res, g0, w, b, s0, h0, g0, s1, h1, g1, index, 1e-6),
        "FusedLayerNormScaleShiftGate": lambda: ops.FusedLayerNormScaleShiftGate()(x, None, None, s0, h0, g0, 1e-6),
        "FusedResidualLayerNormScaleShiftGate": lambda: ops.FusedResidualLayerNormScaleShiftGate()(
            x, res, g0, None, None, s0, h0, g0, 1e-6),
    }


CASE_BUILDERS = [_rms_norm_cases, _elementwise_cases, _attention_cases, _modulate_cases]
CASES = [(build, name) for build in CASE_BUILDERS for name in build(torch.float32)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("build,name", CASES, ids=[name for _, name in CASES])
def test_native_fallback_returns_the_input_dtype(build, name, dtype):
    out = build(dtype)[name]()
    outs = out if isinstance(out, tuple) else (out,)
    for i, t in enumerate(outs):
        assert t.dtype == dtype, f"{name} output {i}: {t.dtype}, input {dtype}"
        assert t.device.type == "cpu"
        assert torch.isfinite(t.float()).all(), f"{name} output {i} is not finite"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_native_keeps_the_input_memory_format(dtype):
    x = _randn(2, 8, 3, 5, dtype=dtype).contiguous(memory_format=torch.channels_last)
    y = rms_norm.rms_norm_native(x, _randn(8, dtype=dtype))
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@torch.no_grad()
def test_tiny_vae_decodes_and_encodes_in_half_precision_on_cpu(dtype):
    """The whole decoder on the fallbacks: bf16/fp16 in, the same dtype out, close to fp32."""
    from helpers import pair

    _, ours = pair()
    z = torch.randn(1, 4, 2, 5, 6, generator=torch.Generator().manual_seed(0))
    ref = ours.decode(z)
    half = ours.to(dtype)
    for latent in (z, z[:, :, 0]):  # video and image (fast path)
        out = half.decode(latent.to(dtype))
        assert out.dtype == dtype
        expect = ref if latent.dim() == 5 else ref[:, :, 0]
        assert (out.float() - expect).abs().max().item() < 0.1
    x = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert half.encode(x.to(dtype)).dtype == dtype
