"""The decoder's fused passes: the Triton kernels (interpreted on CPU) against the PyTorch reference."""

import pytest
import torch

from qwenfast.ops.elementwise import (
    bias_channel_to_space_add_,
    bias_channel_to_space_add_native,
    bias_channel_to_space_add_triton,
    bias_residual_add,
    bias_residual_add_native,
    bias_residual_add_triton,
    upsample_nearest2x,
    upsample_nearest2x_native,
    upsample_nearest2x_triton,
)

from _device import DEVICE

FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 96, 3, 4), (1, 3, 2, 5, 3)])
def test_bias_residual_add_kernel_matches_reference(fmt, dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    r = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    if len(shape) == 4:
        x, r = x.contiguous(memory_format=FORMATS[fmt]), r.contiguous(memory_format=FORMATS[fmt])
    b = torch.randn(shape[1], generator=g).to(dtype).to(DEVICE)
    y = bias_residual_add_triton(x, b, r)
    ref = bias_residual_add_native(x, b, r)
    assert y.stride() == x.stride()
    # two roundings (x + bias, then + residual), each of which the interpreter truncates where CUDA
    # rounds to nearest: up to two bf16 ulps apart from PyTorch here, none on a GPU
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -6, atol=2 ** -6)
    torch.testing.assert_close(y.float(), ref.float(), **tol)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 96, 1, 3), (1, 1, 4, 4)])
def test_upsample_kernel_is_the_reference_bit_for_bit(fmt, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE).contiguous(memory_format=FORMATS[fmt])
    y = upsample_nearest2x_triton(x)
    assert torch.equal(y, upsample_nearest2x_native(x))
    assert y.is_contiguous(memory_format=FORMATS[fmt]) or shape[1] == 1


def test_public_functions_on_cpu_take_the_reference_path():
    x = torch.randn(1, 4, 3, 3)
    assert torch.equal(upsample_nearest2x(x), upsample_nearest2x_native(x))
    b, r = torch.randn(4), torch.randn(1, 4, 3, 3)
    assert torch.equal(bias_residual_add(x, b, r), bias_residual_add_native(x, b, r))


def test_errors_name_the_argument():
    x = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match="residual"):
        bias_residual_add(x, torch.randn(4), torch.randn(1, 4, 3, 2))
    with pytest.raises(ValueError, match="bias"):
        bias_residual_add(x, torch.randn(3), x)
    with pytest.raises(ValueError, match="x: expected"):
        upsample_nearest2x(torch.randn(4, 3, 3))


def test_opcheck():
    x = torch.randn(1, 4, 3, 3, device=DEVICE).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.qwenfast.upsample_nearest2x.default, (x,))
    torch.library.opcheck(torch.ops.qwenfast.bias_residual_add.default,
                          (x, torch.randn(4, device=DEVICE), torch.randn(1, 4, 3, 3, device=DEVICE)))


# -- the 2.1 VAE's residual up block: upsampler bias + channel-to-space shortcut in one pass ----------


def _channel_to_space_case(dtype, fmt, n=2, c=6, ci=4, h=3, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, c, 2 * h, 2 * w, generator=g).to(dtype).to(DEVICE).contiguous(memory_format=FORMATS[fmt])
    x = torch.randn(n, ci, h, w, generator=g).to(dtype).to(DEVICE).contiguous(memory_format=FORMATS[fmt])
    b = torch.randn(c, generator=g).to(dtype).to(DEVICE)
    src = torch.randint(0, ci, (c, 2, 2), generator=g, dtype=torch.int32).to(DEVICE)
    return y, b, x, src


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_bias_channel_to_space_add_kernel_matches_reference(fmt, dtype):
    y, b, x, src = _channel_to_space_case(dtype, fmt)
    want = bias_channel_to_space_add_native(y.clone(), b, x, src)
    # explicitly: y[n, c, 2h+i, 2w+j] + bias[c] + x[n, src[c, i, j], h, w], in fp64
    yd, xd = y.double(), x.double()
    for i in range(2):
        for j in range(2):
            yd[:, :, i::2, j::2] += b.double().view(-1, 1, 1) + xd[:, src[:, i, j].long()]
    got = y.clone()
    out = bias_channel_to_space_add_triton(got, b, x, src)
    assert out is got and got.stride() == y.stride()  # in place, layout kept
    # two roundings, which the interpreter truncates where CUDA rounds: a few ulps apart
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -6, atol=2 ** -5)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    torch.testing.assert_close(want.double(), yd, **tol)


def test_bias_channel_to_space_add_checks_its_arguments():
    y, b, x, src = _channel_to_space_case(torch.float32, "nchw")
    for bad, match in (((y[:, :, :-1], b, x, src), "y: expected"), ((y, b[:-1], x, src), "bias"),
                       ((y, b, x[:, :, :-1], src), "x: expected"), ((y, b, x, src.float()), "src"),
                       ((y, b, x.double(), src), "x: expected")):
        with pytest.raises(ValueError, match=match):
            bias_channel_to_space_add_(*bad)


def test_opcheck_channel_to_space():
    y, b, x, src = _channel_to_space_case(torch.float32, "channels_last")
    torch.library.opcheck(torch.ops.qwenfast.bias_channel_to_space_add_.default, (y, b, x, src))
