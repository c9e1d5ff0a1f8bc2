"""The upsampler's nearest-2x + 3x3 conv (`UpsampleConv2x`) in each of its formulations.

"transposed" and "subpixel" sum the taps that fall on one input pixel and convolve the un-upsampled
input (2.25x fewer FLOPs): equal to the direct path up to rounding, so float64 agrees to ~1e-15, and
both VAEs still decode what diffusers decodes. Which one runs is `qwen_image.UPSAMPLE_CONV`.
"""

import contextlib

import pytest
import torch

from helpers import TINY21, frame, latent, max_diff, pair, pair21, tiny_vae
from qwenfast import VAEConfig
from qwenfast.vae import qwen_image
from qwenfast.vae.qwen_image import UPSAMPLE_CONVS, UpsampleConv2x

FAST = [m for m in UPSAMPLE_CONVS if m != "direct"]


@contextlib.contextmanager
def upsample_conv(mode):
    previous, qwen_image.UPSAMPLE_CONV = qwen_image.UPSAMPLE_CONV, mode
    try:
        yield
    finally:
        qwen_image.UPSAMPLE_CONV = previous


def module(ci=5, co=3, dtype=torch.float64):
    torch.manual_seed(0)
    m = UpsampleConv2x(ci, co).to(dtype)
    with torch.no_grad():
        m[1].bias.normal_()
    return m


@torch.no_grad()
@pytest.mark.parametrize("mode", FAST)
@pytest.mark.parametrize("shape", [(2, 5, 7, 6), (1, 5, 1, 1), (1, 5, 3, 8)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_formulations_equal_direct_fp64(mode, shape, channels_last):
    m = module()
    x = frame(shape, channels_last, seed=1)
    with upsample_conv("direct"):
        ref = m(x)
    with upsample_conv(mode):
        y = m(x)
    assert y.shape == (shape[0], 3, 2 * shape[2], 2 * shape[3]) and y.dtype == x.dtype
    assert max_diff(y, ref) <= 1e-13


@torch.no_grad()
@pytest.mark.parametrize("mode", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fast_formulations_keep_the_dtype(mode, dtype):
    m = module(dtype=dtype)
    x = torch.randn(1, 5, 4, 6).to(dtype)
    with upsample_conv("direct"):
        ref = m(x).double()
    with upsample_conv(mode):
        y = m(x)
    assert y.dtype == dtype
    # the summed weights round once more in 16 bits: a few ulps of the outputs' scale
    assert max_diff(y, ref) <= (1e-5 if dtype == torch.float32 else 0.1)


def test_unknown_formulation_is_refused():
    with upsample_conv("fft"), pytest.raises(ValueError, match="UPSAMPLE_CONV must be one of .* got 'fft'"):
        module()(torch.zeros(1, 5, 2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="form must be one of .* got 'fft'"):
        UpsampleConv2x(5, 3, form="fft")


def forms(vae):
    return {m.form for m in vae.modules() if isinstance(m, UpsampleConv2x)}


def test_each_vae_builds_its_measured_formulation():
    # the defaults follow benchmarks/results/upsample_conv_h200.md; UPSAMPLE_CONV unset lets them rule
    assert qwen_image.UPSAMPLE_CONV is None
    assert forms(tiny_vae()) == {"direct"}
    assert forms(pair21(TINY21)[1]) == {"transposed"}


@torch.no_grad()
def test_the_module_form_runs_unless_overridden():
    m = module()
    m.form = "transposed"
    x = torch.randn(1, 5, 3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    calls = []
    real = torch.nn.functional.conv_transpose2d
    try:
        torch.nn.functional.conv_transpose2d = lambda *a, **k: calls.append(1) or real(*a, **k)
        m(x)
        assert calls == [1]
        with upsample_conv("direct"):
            m(x)
        assert calls == [1]  # the override ran the direct conv
    finally:
        torch.nn.functional.conv_transpose2d = real


@torch.no_grad()
@pytest.mark.parametrize("mode", FAST)
def test_both_vaes_decode_what_diffusers_decodes(mode):
    ref, ours = pair()
    z = latent((2, 4, 1, 6, 7), dtype=torch.float32)
    ref21, ours21 = pair21(TINY21)
    z21 = latent((1, TINY21["z_dim"], 1, 3, 5), dtype=torch.float32)
    with upsample_conv(mode):
        assert max_diff(ours.decode(z), ref.decode(z).sample.clamp(-1, 1)) <= 1e-5
        assert max_diff(ours21.decode(z21), ref21.decode(z21).sample.clamp(-1, 1)) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("mode", FAST)
def test_exact_tiling_stays_exact_fp64(mode):
    vae = tiny_vae()
    z = latent((1, 4, 1, 12, 11))
    with upsample_conv(mode):
        untiled = vae.decode_untiled(z)
        vae.vae_config = VAEConfig(use_tiling=True, exact_tile_sample_size=16)
        try:
            tiled = vae.decode(z)
        finally:
            vae.vae_config = VAEConfig()
    with upsample_conv("direct"):
        assert max_diff(untiled, vae.decode_untiled(z)) <= 1e-12
    assert max_diff(tiled, untiled) <= 1e-12


def test_deterministic_cudnn_sets_the_flag_within_and_restores_it(monkeypatch):
    from qwenfast.vae.qwen_image import deterministic_cudnn

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)  # the default, whatever ran before
    with pytest.raises(RuntimeError, match="inside"):
        with deterministic_cudnn():
            assert torch.backends.cudnn.deterministic
            raise RuntimeError("inside")
    assert torch.backends.cudnn.deterministic is False  # restored on the error
    with deterministic_cudnn(False):  # off: left as it was (CPU tensors)
        assert torch.backends.cudnn.deterministic is False


@torch.no_grad()
@pytest.mark.parametrize("limit_rows", [1, 2, 3])
@pytest.mark.parametrize("shape", [(2, 5, 7, 6), (1, 5, 2, 3), (1, 5, 9, 4)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_transposed_upsample_in_row_pieces_is_exact_fp64(monkeypatch, limit_rows, shape, channels_last):
    # past CONV_MAX_NUMEL elements the transposed conv runs in row pieces (cuDNN's int64 fallback took
    # 23.6 s for one 2.1 level band at 4096²): each piece reads one input row each side
    m = module()
    x = frame(shape, channels_last, seed=3)
    with upsample_conv("transposed"):
        whole = m(x)
        b, _, h, w = shape
        rows = limit_rows + 2  # input rows of one piece: its own plus the two overlap rows
        monkeypatch.setattr(qwen_image, "CONV_MAX_NUMEL", b * 3 * 4 * w * rows)
        calls = []
        real = torch.nn.functional.conv_transpose2d
        monkeypatch.setattr(torch.nn.functional, "conv_transpose2d",
                            lambda x, *a, **k: calls.append(x.shape[2]) or real(x, *a, **k))
        pieces = m(x)
    split = h > rows  # else the whole output fits the limit: one call
    assert len(calls) == (-(-h // limit_rows) if split else 1) and (max(calls) <= rows or not split)
    assert pieces.shape == whole.shape and pieces.dtype == whole.dtype
    assert pieces.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert max_diff(pieces, whole) <= 1e-13
