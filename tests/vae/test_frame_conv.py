"""`qwen_image.conv2d_frame`, the one way both decoders run a 2-D conv of a frame: a 'same' conv in
exact row pieces past CONV_MAX_NUMEL elements (cuDNN's int64 fallback took 23.6 s for one 2.1 level
band at 4096²). Each piece computes the same sums per output value, so float64 agrees to ~1e-13 and
the decodes stay what diffusers decodes.
"""

import pytest
import torch
import torch.nn.functional as F

from helpers import TINY21, frame, latent, max_diff, pair, pair21
from qwenfast.vae import qwen_image
from qwenfast.vae.qwen_image import conv2d_frame


def weights(co, ci, k, dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(co, ci, k, k, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(co, generator=g, dtype=torch.float64).to(dtype))


def counting(monkeypatch, name):
    calls = []
    real = getattr(F, name)
    monkeypatch.setattr(F, name, lambda x, *a, **k: calls.append(tuple(x.shape)) or real(x, *a, **k))
    return calls


@torch.no_grad()
@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_frame_equals_conv2d_fp64(monkeypatch, kernel, channels_last, stride):
    x = frame((2, 6, 9, 7), channels_last)
    w, b = weights(4, 6, kernel)
    ref = F.conv2d(x, w, b, stride, kernel // 2)
    monkeypatch.setattr(qwen_image, "CONV_MAX_NUMEL", 2 * 6 * 7 * (1 + 2 * (kernel // 2)))  # 1 core row a piece
    y = conv2d_frame(x, w, b, (stride, stride), (kernel // 2, kernel // 2))
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert max_diff(y, ref) <= 1e-13


@torch.no_grad()
@pytest.mark.parametrize("shape, padding, dilation, groups", [
    ((4, 6, 3, 3), (0, 0), (1, 1), 1),  # not 'same': the padding
    ((4, 6, 3, 1), (1, 0), (1, 1), 1),  # a non-square kernel
    ((4, 6, 2, 2), (1, 1), (1, 1), 1),  # an even kernel
    ((4, 6, 3, 3), (2, 2), (2, 2), 1),  # dilated
    ((4, 3, 3, 3), (1, 1), (1, 1), 2),  # grouped
    ((4, 6, 3, 3), "same", (1, 1), 1),  # padding given by name
])
def test_a_conv_that_is_not_same_runs_in_one_call_and_equals_conv2d_fp64(monkeypatch, shape, padding, dilation, groups):
    x = frame((1, 6, 9, 7))
    w = torch.randn(shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ref = F.conv2d(x, w, None, 1, padding, dilation, groups)
    monkeypatch.setattr(qwen_image, "CONV_MAX_NUMEL", 2 * 6 * 7 * 3)  # every 'same' conv would run in pieces
    calls = counting(monkeypatch, "conv2d")
    y = conv2d_frame(x, w, None, (1, 1), padding, dilation, groups)
    assert len(calls) == 1 and y.shape == ref.shape
    assert max_diff(y, ref) <= 1e-13


@torch.no_grad()
def test_int_arguments_and_an_unbatched_frame_take_what_conv2d_takes(monkeypatch):
    w, b = weights(4, 6, 3)
    x = frame((2, 6, 9, 7))
    monkeypatch.setattr(qwen_image, "CONV_MAX_NUMEL", 2 * 6 * 7 * 3)  # a 'same' conv in pieces of one row
    calls = counting(monkeypatch, "conv2d")
    y = conv2d_frame(x, w, b, 1, 1, 1)  # ints, as F.conv2d takes them: still the 'same' conv, in pieces
    assert len(calls) == 9 and max_diff(y, F.conv2d(x, w, b, 1, 1)) <= 1e-13
    calls.clear()
    y = conv2d_frame(x[0], w, b, padding=(1, 1))  # (C, H, W) unbatched: one call, as F.conv2d runs it
    assert len(calls) == 1 and max_diff(y, F.conv2d(x[0], w, b, 1, 1)) <= 1e-13


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", [1, 3])
def test_row_pieces_keep_the_dtype_and_the_whole_calls_values(monkeypatch, dtype, kernel):
    x, (w, b) = frame((2, 6, 9, 7), channels_last=True, dtype=dtype), weights(4, 6, kernel, dtype)
    whole = conv2d_frame(x, w, b, padding=(kernel // 2, kernel // 2))
    monkeypatch.setattr(qwen_image, "CONV_MAX_NUMEL", 2 * 6 * 7 * (2 + 2 * (kernel // 2)))  # 2 core rows a piece
    calls = counting(monkeypatch, "conv2d")
    pieces = conv2d_frame(x, w, b, padding=(kernel // 2, kernel // 2))
    assert len(calls) == 5 and pieces.dtype == dtype and pieces.is_contiguous(memory_format=torch.channels_last)
    # the same sums per value in the same dtype: equal to the whole call up to the kernels' order of adds
    # (the CPU: equal, or 4.8e-7 of 10 for the fp32 1x1), a few units in the last place at most
    assert max_diff(pieces, whole) <= 4 * torch.finfo(dtype).eps * whole.abs().max().item()


def test_a_21_conv_refuses_a_padding_mode_it_would_ignore():
    from qwenfast.vae.qwen_image21 import Conv

    with pytest.raises(ValueError, match="padding_mode 'reflect' is not supported"):
        Conv(2, 2, 3, padding=1, padding_mode="reflect").double()(frame((1, 2, 4, 4)))


@torch.no_grad()
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("with_bias", [True, False])
def test_a_same_conv_in_row_pieces_is_exact_fp64(monkeypatch, kernel, with_bias):
    from qwenfast.vae.qwen_image21 import Conv

    torch.manual_seed(0)
    conv = Conv(5, 7, kernel, padding=kernel // 2).double()
    x = frame((2, 5, 9, 4))
    whole = conv(x, with_bias=with_bias)
    reach = kernel // 2
    monkeypatch.setattr(qwen_image, "CONV_MAX_NUMEL", 2 * 4 * 7 * (2 + 2 * reach))  # 2 core rows a piece
    calls = counting(monkeypatch, "conv2d")
    pieces = conv(x, with_bias=with_bias)
    assert len(calls) == 5 and max(c[2] for c in calls) <= 2 + 2 * reach
    assert max_diff(pieces, whole) <= 1e-13


@torch.no_grad()
def test_both_vaes_decode_the_same_in_row_pieces_fp64(monkeypatch):
    ref, vae = pair()
    ref21, vae21 = pair21(TINY21)
    vae, vae21 = vae.double(), vae21.double()
    z = latent((1, 4, 1, 6, 5))
    z21 = latent((1, TINY21["z_dim"], 1, 5, 4))
    image = frame((1, 4, 1, 32, 48), seed=6)
    before = vae.decode(z), vae21.decode(z21), vae21.encode_untiled(image)
    monkeypatch.setattr(qwen_image, "CONV_MAX_NUMEL", 4 * 12 * 16 * 3)  # most convs and upsamplers in pieces
    convs, transposed = (counting(monkeypatch, n) for n in ("conv2d", "conv_transpose2d"))
    after = vae.decode(z), vae21.decode(z21), vae21.encode_untiled(image)
    for a, b in zip(after, before):
        assert max_diff(a, b) <= 1e-12
    pieces = len(convs) + len(transposed)
    monkeypatch.setattr(qwen_image, "CONV_MAX_NUMEL", 2**31 - 1)
    convs.clear(), transposed.clear()
    vae.decode(z), vae21.decode(z21), vae21.encode_untiled(image)
    assert pieces > len(convs) + len(transposed)  # the same decodes took more conv calls: pieces ran
    assert max_diff(after[1].float(), ref21.decode(z21.float()).sample.clamp(-1, 1)) <= 1e-5
