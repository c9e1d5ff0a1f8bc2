"""qwenfast.ops.rms_norm: the fused Triton kernel (interpreted on CPU) vs the native formula vs fp64,
and the native formula vs diffusers' QwenImageRMS_norm.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenfast.ops.rms_norm import RMSNorm, rms_norm, rms_norm_native, rms_norm_triton
from qwenfast.ops.triton import rms_norm as K

from _device import DEVICE

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Kernel vs native in the same dtype: both round one fp32 value once, so they differ by at most one
# ulp of the output (relative 2**-7 in bf16, 2**-10 in fp16). One ulp, not half: Triton's interpreter
# rounds fp32 -> bf16 toward zero where the GPU rounds to nearest.
ULP = {torch.float32: 2e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}
# relative L2 error vs the fp64 oracle: one (truncating, in bf16) rounding of the output
ORACLE_TOL = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}

LAYOUTS = {
    # name: (shape, memory format)
    "nchw": ((2, 24, 5, 7), torch.contiguous_format),
    "channels_last": ((2, 24, 5, 7), torch.channels_last),
    "channels_last_c96": ((1, 96, 3, 11), torch.channels_last),  # C not a power of two
    "ncdhw": ((1, 16, 3, 4, 5), torch.contiguous_format),
    "channels_last_3d": ((2, 16, 2, 3, 5), torch.channels_last_3d),
    "one_pixel": ((1, 8, 1, 1), torch.contiguous_format),
}


def oracle(x: torch.Tensor, gamma: torch.Tensor, silu: bool) -> torch.Tensor:
    """fp64, written out: x / max(||x||, 1e-12) * sqrt(C) * gamma (then x * sigmoid(x))."""
    x = x.double()
    c = x.shape[1]
    g = gamma.double().reshape(c, *([1] * (x.dim() - 2)))
    y = x / x.pow(2).sum(1, keepdim=True).sqrt().clamp_min(1e-12) * c**0.5 * g
    return y * torch.sigmoid(y) if silu else y


def make(shape, fmt, dtype, seed, offset=0.0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + offset).to(dtype).to(device).to(memory_format=fmt)
    gamma = (torch.rand(shape[1], *([1] * (len(shape) - 2)), generator=g) + 0.5).to(dtype).to(device)
    return x, gamma


def assert_within_ulp(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype):
    out, ref = out.double(), ref.double()
    excess = (out - ref).abs() - (ULP[dtype] * ref.abs() + 1e-30)
    assert excess.max().item() <= 0, excess.max().item()


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_kernel_matches_native_and_oracle(layout, dtype, silu):
    shape, fmt = LAYOUTS[layout]
    x, gamma = make(shape, fmt, dtype, seed=len(layout) + shape[1])
    y = rms_norm_triton(x, gamma, silu=silu)
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()  # x's memory format
    assert torch.isfinite(y).all()
    assert_within_ulp(y, rms_norm_native(x, gamma, silu=silu), dtype)
    ref = oracle(x, gamma, silu)
    assert ((y.double() - ref).norm() / ref.norm()).item() < ORACLE_TOL[dtype]


def test_many_programs_and_a_partial_last_block():
    # 3 x 37 pixels in tiles of 8: five programs per image, the last one partial
    x, gamma = make((3, 20, 37, 1), torch.channels_last, torch.float32, seed=1)
    y = K.rms_norm_fwd(x, gamma.reshape(-1), True, blocks=(8, 32, 4))
    torch.testing.assert_close(y, rms_norm_native(x, gamma, True), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("gamma_shape", [(24,), (24, 1, 1), (24, 1, 1, 1)])
def test_gamma_shapes(gamma_shape):
    x, gamma = make((1, 24, 3, 4), torch.channels_last, torch.float32, seed=2)
    y = rms_norm_triton(x, gamma.reshape(gamma_shape), silu=True)
    torch.testing.assert_close(y, rms_norm_native(x, gamma, silu=True))


def test_large_common_offset():
    # every pixel ~ 3000 + noise: the norm is large, the direction still matters to 1e-6
    x, gamma = make((1, 32, 6, 6), torch.channels_last, torch.float32, seed=3, offset=3000.0)
    torch.testing.assert_close(rms_norm_triton(x, gamma), oracle(x, gamma, False).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("silu", [False, True])
def test_constant_and_zero_pixels(silu):
    x, gamma = make((1, 12, 3, 3), torch.channels_last, torch.float32, seed=4)
    x[:, :, 0, 0] = 0.0  # F.normalize maps a zero vector to 0 (the norm is floored at 1e-12)
    x[:, :, 1, 1] = -2.5  # a constant pixel normalises to -1/sqrt(C), times sqrt(C): -gamma
    y = rms_norm_triton(x, gamma, silu=silu)
    assert (y[:, :, 0, 0] == 0).all()
    expect = -gamma.reshape(1, 12)
    torch.testing.assert_close(y[:, :, 1, 1], F.silu(expect) if silu else expect)


@pytest.mark.parametrize(
    "view",
    [
        lambda x: x.transpose(2, 3),  # spatial dims that do not nest: copied first
        lambda x: x[:, :, ::2],  # strided rows
        lambda x: x[:, 4:20],  # a channel slice
    ],
    ids=["transposed", "strided_rows", "channel_slice"],
)
def test_views(view):
    x0, _ = make((2, 24, 6, 5), torch.contiguous_format, torch.float32, seed=5)
    x = view(x0)
    gamma = (torch.rand(x.shape[1], 1, 1) + 0.5).to(DEVICE)
    y = rms_norm_triton(x, gamma, silu=True)
    torch.testing.assert_close(y, rms_norm_native(x.contiguous(), gamma, silu=True))


def test_native_matches_diffusers():
    diffusers_vae = pytest.importorskip("diffusers.models.autoencoders.autoencoder_kl_qwenimage")
    norm = diffusers_vae.QwenImageRMS_norm(24, images=True).to(DEVICE)
    with torch.no_grad():
        norm.gamma.copy_((torch.rand(24, 1, 1) + 0.5).to(DEVICE))
    x, _ = make((2, 24, 5, 7), torch.channels_last, torch.float32, seed=6)
    with torch.no_grad():
        ref = norm(x)
        torch.testing.assert_close(rms_norm_native(x, norm.gamma), ref)
        torch.testing.assert_close(rms_norm_triton(x, norm.gamma, silu=True), F.silu(ref))


def test_fp64_takes_the_native_path():
    x, gamma = make((1, 8, 3, 3), torch.contiguous_format, torch.float64, seed=7)
    op = RMSNorm()
    assert not op.kernel_takes(x, gamma)
    with pytest.raises(ValueError, match="RMSNorm: the Triton kernel cannot take torch.float64"):
        rms_norm_triton(x, gamma)
    torch.testing.assert_close(rms_norm(x, gamma, silu=True), oracle(x, gamma, True))


def test_merged_spatial_view():
    x = torch.empty(2, 8, 3, 4).to(memory_format=torch.channels_last)
    assert K.merged_spatial_view(x).stride() == (96, 1, 8)
    assert K.merged_spatial_view(torch.empty(2, 8, 3, 4)).stride() == (96, 12, 1)
    assert K.merged_spatial_view(torch.empty(2, 8, 3, 4).transpose(2, 3)) is None
    # size-1 dims place nothing, whatever their stride
    assert K.merged_spatial_view(torch.empty(2, 8, 5, 1, 4)).stride() == (160, 20, 1)


def test_opcheck():
    x, gamma = make((2, 16, 3, 5), torch.channels_last, torch.float32, seed=8)
    torch.library.opcheck(torch.ops.qwenfast.rms_norm.default, (x, gamma.reshape(-1), True))


def test_errors_name_the_argument():
    x, gamma = make((1, 8, 3, 3), torch.contiguous_format, torch.float32, seed=9)
    with pytest.raises(ValueError, match="x: expected \\(N, C, H, W\\)"):
        rms_norm(x[0], gamma)
    with pytest.raises(ValueError, match="gamma: expected 8 elements"):
        rms_norm(x, gamma[:4])
    with pytest.raises(ValueError, match="gamma: expected shape"):
        rms_norm(x, gamma.reshape(1, 8, 1))
    with pytest.raises(ValueError, match="gamma: on meta"):
        rms_norm(x, gamma.to("meta"))
    with pytest.raises(ValueError, match="x: expected a floating-point"):
        rms_norm(x.long(), gamma)


def test_public_function_on_cpu_takes_the_native_path():
    """One dispatch rule for every op (CustomOp's): CPU tensors run PyTorch, even when interpreted."""
    x, gamma = make((2, 8, 3, 5), torch.channels_last, torch.float32, seed=3, device="cpu")
    op = RMSNorm()
    assert op.kernel_takes(x, gamma) and op.dispatch(x, gamma) == op.forward_native
    torch.testing.assert_close(rms_norm(x, gamma, silu=True), rms_norm_native(x, gamma, silu=True), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", ["triton", "native"])
def test_out_writes_into_a_frame_window(impl, dtype):
    """`out=`: a chunk of frames normalised straight into the new-frame slots of a channels-last 3-D
    window (the video path's causal convs); the past slots are left alone."""
    x, gamma = make((2, 24, 3, 4, 5), torch.channels_last_3d, dtype, seed=11)
    bias = torch.randn(24, generator=torch.Generator().manual_seed(12)).to(x.device, dtype)
    window = torch.full((2, 24, 5, 4, 5), 7.0, dtype=dtype, device=x.device).to(memory_format=torch.channels_last_3d)
    fn = rms_norm_triton if impl == "triton" else rms_norm_native
    y = fn(x, gamma, silu=True, bias=bias, out=window[:, :, 2:])
    assert y.data_ptr() == window[:, :, 2:].data_ptr()
    assert_within_ulp(window[:, :, 2:], rms_norm_native(x, gamma, silu=True, bias=bias), dtype)
    assert torch.all(window[:, :, :2] == 7.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", ["triton", "native"])
def test_out_copies_fill_each_slot_of_a_stack(impl, dtype):
    """`out` (R, *x.shape): y written into each out[r] (the video path's stacked windows: one frame chunk
    in three channel slots, each shifted one frame); the slots' neighbours are left alone."""
    from qwenfast.vae import video

    x, gamma = make((1, 24, 3, 4, 5), torch.channels_last_3d, dtype, seed=16)
    stack = torch.full((5, 72, 4, 5), 7.0, dtype=dtype, device=x.device).to(memory_format=torch.channels_last)
    views = [stack[2 - k:5 - k, 24 * k:24 * (k + 1)].transpose(0, 1).unsqueeze(0) for k in (2, 1, 0)]
    fn = rms_norm_triton if impl == "triton" else rms_norm_native
    fn(x, gamma, silu=True, out=video._as_copies(views))
    expected = rms_norm_native(x, gamma, silu=True)
    for v in views:
        assert_within_ulp(v, expected, dtype)
    untouched = torch.ones(5, 72, dtype=torch.bool)
    for k in range(3):
        untouched[2 - k:5 - k, 24 * k:24 * (k + 1)] = False
    assert torch.all(stack[untouched] == 7.0)


def test_out_with_strides_the_kernel_cannot_write():
    x, gamma = make((1, 8, 3, 4), torch.contiguous_format, torch.float32, seed=13)
    out = torch.zeros(1, 8, 4, 3, device=x.device).transpose(2, 3)  # spatial dims that do not nest
    rms_norm_triton(x, gamma, out=out)
    torch.testing.assert_close(out, rms_norm_native(x, gamma))
    copies = torch.zeros(2, 1, 8, 4, 3, device=x.device).transpose(3, 4)  # the same, as two copies
    rms_norm_triton(x, gamma, out=copies)
    for copy in copies:
        torch.testing.assert_close(copy, rms_norm_native(x, gamma))


def test_native_keeps_the_input_dtype():
    """Statistics in fp32, the result in x's dtype (bf16 in, bf16 out), as the kernel."""
    x, gamma = make((1, 8, 3, 4), torch.channels_last, torch.bfloat16, seed=14)
    y = rms_norm_native(x, gamma, silu=True)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)


def test_out_opcheck_and_errors():
    x, gamma = make((1, 16, 2, 3, 5), torch.channels_last_3d, torch.float32, seed=15)
    out = torch.empty_like(x)
    torch.library.opcheck(torch.ops.qwenfast.rms_norm_out.default, (x, gamma.reshape(-1), True, None, out))
    copies = torch.empty((2, *x.shape), dtype=x.dtype, device=x.device)
    torch.library.opcheck(torch.ops.qwenfast.rms_norm_out.default, (x, gamma.reshape(-1), True, None, copies))
    with pytest.raises(ValueError, match="out: expected \\(1, 16, 2, 3, 5\\)"):
        rms_norm(x, gamma, out=out[:, :, :1])
    with pytest.raises(ValueError, match="out: expected .* torch.float32"):
        rms_norm(x, gamma, out=out.double())
    with pytest.raises(ValueError, match="out: expected .*R copies"):
        rms_norm(x, gamma, out=out[None, None])  # two leading dims: not copies of x
