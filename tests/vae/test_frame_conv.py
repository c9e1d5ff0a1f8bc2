"""`qwen_image.conv2d_frame`, the one way both decoders run a 2-D conv of a frame: a 'same' conv in
exact row pieces past CONV_MAX_NUMEL elements (cuDNN's int64 fallback took 23.6 s for one 2.1 level
band at 4096²), a 1x1 conv of a channels-last frame as a matmul (POINTWISE_CONV) and a narrow output
padded with zero filters (NARROW_CONV_PAD). Each computes the same sums per output value, so float64
agrees to ~1e-13 and the decodes stay what diffusers decodes.
"""

import pytest
import torch
import torch.nn.functional as F

from helpers import TINY21, latent, max_diff, pair, pair21
from qwenfast.vae import qwen_image
from qwenfast.vae.qwen_image import POINTWISE_CONVS, conv2d_frame


def frame(shape, channels_last=False, dtype=torch.float64, seed=4):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


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
@pytest.mark.parametrize("pointwise", POINTWISE_CONVS)
@pytest.mark.parametrize("pad", [None, 8, 3])
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_every_form_equals_conv2d_fp64(monkeypatch, pointwise, pad, kernel, channels_last, with_bias):
    monkeypatch.setattr(qwen_image, "POINTWISE_CONV", pointwise)
    monkeypatch.setattr(qwen_image, "NARROW_CONV_PAD", pad)
    x = frame((2, 6, 5, 7), channels_last)
    w, b = weights(4, 6, kernel)
    b = b if with_bias else None
    y = conv2d_frame(x, w, b, padding=(kernel // 2, kernel // 2))
    ref = F.conv2d(x, w, b, 1, kernel // 2)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert max_diff(y, ref) <= 1e-13


@torch.no_grad()
def test_the_matmul_runs_only_on_a_channels_last_1x1(monkeypatch):
    monkeypatch.setattr(qwen_image, "POINTWISE_CONV", "matmul")
    linear, conv = counting(monkeypatch, "linear"), counting(monkeypatch, "conv2d")
    w, b = weights(4, 6, 1)
    y = conv2d_frame(frame((1, 6, 3, 5), channels_last=True), w, b)
    assert len(linear) == 1 and not conv
    assert y.is_contiguous(memory_format=torch.channels_last)  # the next conv reads it as it is
    conv2d_frame(frame((1, 6, 3, 5)), w, b)  # NCHW: the matmul would need a transposing copy
    w3, b3 = weights(4, 6, 3)
    conv2d_frame(frame((1, 6, 3, 5), channels_last=True), w3, b3, padding=(1, 1))
    assert len(linear) == 1 and len(conv) == 2


@torch.no_grad()
def test_a_narrow_output_runs_padded_and_comes_back_narrow(monkeypatch):
    monkeypatch.setattr(qwen_image, "NARROW_CONV_PAD", 8)
    calls = []
    real = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda x, w, *a, **k: calls.append(w.shape[0]) or real(x, w, *a, **k))
    w, b = weights(4, 6, 3)
    y = conv2d_frame(frame((1, 6, 3, 5)), w, b, padding=(1, 1))
    w16, b16 = weights(16, 6, 3)
    conv2d_frame(frame((1, 6, 3, 5)), w16, b16, padding=(1, 1))
    assert calls == [8, 16] and y.shape == (1, 4, 3, 5)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_form_keeps_the_dtype(monkeypatch, dtype):
    monkeypatch.setattr(qwen_image, "POINTWISE_CONV", "matmul")
    monkeypatch.setattr(qwen_image, "NARROW_CONV_PAD", 8)
    for k in (1, 3):
        w, b = weights(4, 6, k, dtype)
        x = frame((1, 6, 4, 5), channels_last=True, dtype=dtype)
        y = conv2d_frame(x, w, b, padding=(k // 2, k // 2))
        assert y.dtype == dtype
        assert max_diff(y, F.conv2d(x.double(), w.double(), b.double(), 1, k // 2)) <= (1e-4 if dtype == torch.float32
                                                                                          else 0.25)


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
@pytest.mark.parametrize("form", ["row pieces", "matmul and padded head"])
def test_both_vaes_decode_the_same_in_every_form_fp64(monkeypatch, form):
    ref, vae = pair()
    ref21, vae21 = pair21(TINY21)
    vae, vae21 = vae.double(), vae21.double()
    z = latent((1, 4, 1, 6, 5))
    z21 = latent((1, TINY21["z_dim"], 1, 5, 4))
    image = frame((1, 4, 1, 32, 48), seed=6)
    before = vae.decode(z), vae21.decode(z21), vae21.encode_untiled(image)
    if form == "row pieces":
        monkeypatch.setattr(qwen_image, "CONV_MAX_NUMEL", 4 * 12 * 16 * 3)  # most convs and upsamplers in pieces
    else:
        monkeypatch.setattr(qwen_image, "POINTWISE_CONV", "matmul")
        monkeypatch.setattr(qwen_image, "NARROW_CONV_PAD", 8)
        cl = lambda m: m.to(memory_format=torch.channels_last)  # noqa: E731  (the CUDA layout, on the CPU)
        monkeypatch.setattr(type(vae21), "frame_layout", lambda self, x: cl(x) if x.dim() == 4 else x)
    convs, transposed, linear = (counting(monkeypatch, n) for n in ("conv2d", "conv_transpose2d", "linear"))
    after = vae.decode(z), vae21.decode(z21), vae21.encode_untiled(image)
    for a, b in zip(after, before):
        assert max_diff(a, b) <= 1e-12
    if form == "row pieces":
        assert len(convs) + len(transposed) > sum(isinstance(m, torch.nn.Conv2d) for m in vae21.modules())  # pieces
    else:
        assert any(len(shape) == 4 for shape in linear)  # 1x1 convs ran as matmuls of (B, H, W, C) frames
    assert max_diff(after[1].float(), ref21.decode(z21.float()).sample.clamp(-1, 1)) <= 1e-5
