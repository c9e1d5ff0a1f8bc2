"""The decoder's fused passes: the Triton kernels (interpreted on CPU) against the PyTorch reference."""

import pytest
import torch

from qwenfast.ops.elementwise import (
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
