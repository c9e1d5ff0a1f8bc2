"""The video path (qwenfast.vae.video): decode and encode of T > 1 against diffusers, and every way of
streaming (chunk sizes, window-conv formulations, exact tiles with their own frame caches) against
the frame-by-frame stream in float64."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from helpers import decoding_with, max_diff, pair
from qwenfast.vae import video
from qwenfast.vae.tiling import exact_tiles

TOL_FP32 = 1e-5  # against diffusers, fp32
TOL_FP64 = 1e-12  # re-association only, float64


@pytest.fixture(scope="module")
def tiny():
    return pair()


@pytest.fixture(scope="module")
def tiny64():
    ref, ours = pair()
    return ref.double(), ours.double()


@contextlib.contextmanager
def streaming(vae, decode_chunk_frames=1, encode_chunk_frames=None, window_conv="conv3d", stacked_max_channels=None):
    previous = vae.decode_chunk_frames, vae.encode_chunk_frames, video.WINDOW_CONV, video.STACKED_MAX_CHANNELS
    vae.decode_chunk_frames, vae.encode_chunk_frames, video.WINDOW_CONV, video.STACKED_MAX_CHANNELS = (
        decode_chunk_frames, encode_chunk_frames, window_conv, stacked_max_channels)
    try:
        yield vae
    finally:
        vae.decode_chunk_frames, vae.encode_chunk_frames, video.WINDOW_CONV, video.STACKED_MAX_CHANNELS = previous


def latent(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def pixels(shape, seed, dtype=torch.float32):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1).to(dtype)


@torch.no_grad()
@pytest.mark.parametrize("frames,h,w", [(2, 7, 9), (3, 5, 11), (5, 9, 5)])
def test_video_decode_matches_diffusers_fp32(tiny, frames, h, w):
    ref, ours = tiny
    z = latent((2, 4, frames, h, w), seed=frames)
    expected = ref.decode(z).sample
    out = ours.decode(z)
    assert out.shape == (2, 3, 1 + 4 * (frames - 1), 8 * h, 8 * w)
    assert max_diff(out, expected) <= TOL_FP32


@torch.no_grad()
@pytest.mark.parametrize("frames,h,w", [(5, 7, 9), (9, 5, 3), (17, 3, 5)])  # 2, 3, 5 latent frames
def test_video_encode_matches_diffusers_fp32(tiny, frames, h, w):
    ref, ours = tiny
    x = pixels((2, 3, frames, 8 * h, 8 * w), seed=frames)
    expected = ref.encode(x).latent_dist.mode()
    out = ours.encode(x)
    assert out.shape == (2, 4, 1 + (frames - 1) // 4, h, w)
    assert max_diff(out, expected) <= TOL_FP32


@torch.no_grad()
def test_video_decode_and_encode_match_diffusers_fp64(tiny64):
    """In float64: frame windows, fused norms and 2-D first-frame convs compute diffusers' sums. The
    encoder matches to re-association; diffusers' decoder upsamples through float32
    (`forward(x.float()).type_as(x)`), so its float64 decode carries float32 roundings (~1e-7)."""
    ref, ours = tiny64
    z = latent((1, 4, 3, 5, 6), seed=20, dtype=torch.float64)
    assert max_diff(ours.decode(z), ref.decode(z).sample) <= 1e-6
    x = pixels((1, 3, 9, 24, 32), seed=21, dtype=torch.float64)
    assert max_diff(ours.encode(x), ref.encode(x).latent_dist.mode()) <= TOL_FP64


@torch.no_grad()
@pytest.mark.parametrize("chunk", [2, 3, 6])
def test_chunked_decode_equals_frame_by_frame_fp64(tiny64, chunk):
    """Several latent frames per step (6: the whole video after the first frame in one step) give the
    frame-by-frame numbers: the frame cache carries exactly what the next chunk needs."""
    _, ours = tiny64
    z = latent((2, 4, 7, 5, 6), seed=22, dtype=torch.float64)
    with streaming(ours):
        frame_by_frame = ours.decode(z)
    with streaming(ours, decode_chunk_frames=chunk):
        assert max_diff(ours.decode(z), frame_by_frame) <= TOL_FP64


@torch.no_grad()
@pytest.mark.parametrize("chunk", [8, 12])
def test_chunked_encode_equals_four_at_a_time_fp64(tiny64, chunk):
    _, ours = tiny64
    x = pixels((1, 3, 17, 16, 24), seed=23, dtype=torch.float64)
    with streaming(ours):
        four = ours.encode(x)
    with streaming(ours, encode_chunk_frames=chunk):
        assert max_diff(ours.encode(x), four) <= TOL_FP64


def test_encode_chunks_must_be_a_multiple_of_the_time_compression(tiny):
    _, ours = tiny
    with streaming(ours, encode_chunk_frames=6), pytest.raises(ValueError, match="multiple of 4; got 6"):
        ours.encode(pixels((1, 3, 9, 16, 16), seed=24))


@torch.no_grad()
@pytest.mark.parametrize("window_conv", ["taps2d", "stacked2d", "stacked2d_filled"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_window_conv_formulations_equal_conv3d_fp64(tiny64, window_conv, chunk):
    """The three temporal taps as three 2-D convs, or stacked along channels into one (copied there, or
    written there by the norm before the conv): the same sums. B = 2 takes the 3-D conv."""
    _, ours = tiny64
    z = latent((1, 4, 4, 6, 5), seed=25, dtype=torch.float64)
    z2 = latent((2, 4, 3, 5, 4), seed=27, dtype=torch.float64)
    with streaming(ours):
        reference, reference2 = ours.decode(z), ours.decode(z2)
    with streaming(ours, decode_chunk_frames=chunk, window_conv=window_conv):
        assert max_diff(ours.decode(z), reference) <= TOL_FP64
        assert max_diff(ours.decode(z2), reference2) <= TOL_FP64


@torch.no_grad()
def test_filled_stack_on_the_narrow_levels_only_equals_conv3d_fp64(tiny64):
    """`STACKED_MAX_CHANNELS`: the <= 8-channel convs read stacks, the 16-channel ones windows, in one decode
    and one encode (the stacks' past handed on to a window conv and back would show here)."""
    _, ours = tiny64
    z = latent((1, 4, 4, 6, 5), seed=28, dtype=torch.float64)
    x = pixels((1, 3, 9, 16, 24), seed=29, dtype=torch.float64)
    with streaming(ours):
        reference, moments = ours.decode(z), ours.encode(x)
    calls = []
    original = video._stacked_window
    with streaming(ours, window_conv="stacked2d_filled", stacked_max_channels=8):
        video._stacked_window = lambda conv, *a: calls.append(conv.in_channels) or original(conv, *a)
        try:
            assert max_diff(ours.decode(z), reference) <= TOL_FP64
            assert max_diff(ours.encode(x), moments) <= TOL_FP64
        finally:
            video._stacked_window = original
    assert calls and max(calls) == 8  # stacks were used, and only where C <= 8 (conv_in's 3 or 4 too)


@torch.no_grad()
def test_filled_stack_holds_each_input_frame_in_each_tap_slot():
    """`stacked2d_filled`'s stack: position t's slot k holds input frame t - 2 + k (the past's two frames
    included), and the conv's next past is the chunk's last two input frames."""
    from qwenfast.vae.qwen_image import CausalConv3d

    conv = CausalConv3d(3, 2, 3, padding=1).double()
    past = torch.randn(1, 3, 2, 4, 5, dtype=torch.float64)
    for t in (1, 2, 4):
        x = torch.randn(1, 3, t, 4, 5, dtype=torch.float64)
        frames = torch.cat([past, x], dim=2)[0]  # (C, 2 + T, H, W): input frames -2 .. T-1
        cache = video.FrameCache()
        cache.set(conv, past.clone())
        previous, video.WINDOW_CONV = video.WINDOW_CONV, "stacked2d_filled"
        try:
            stack = video.causal_window(conv, x, cache)
            for p in range(t):
                for k in range(3):
                    assert torch.equal(stack[p, k * 3:(k + 1) * 3], frames[:, p + k])  # frame p - 2 + k
            y = video.convolve_causal_window(conv, stack, cache, conv.bias)
        finally:
            video.WINDOW_CONV = previous
        expected = torch.nn.functional.conv3d(frames[None], conv.weight, conv.bias, 1, (0, 1, 1))
        assert max_diff(y, expected) <= TOL_FP64
        assert torch.equal(cache.get(conv), frames[None, :, t:t + 2])
        past = cache.get(conv).clone()


def test_unknown_window_conv_is_refused(tiny):
    _, ours = tiny
    with streaming(ours, window_conv="fft"), pytest.raises(ValueError, match="WINDOW_CONV .* got 'fft'"):
        ours.decode(latent((1, 4, 2, 4, 4), seed=26))


@torch.no_grad()
def test_exact_tiling_on_video_equals_untiled_fp64(tiny64):
    """Each tile streams all frames with its own frame cache (here 2 latent frames a step, against the
    untiled frame-by-frame decode): equal to the untiled decode."""
    _, ours = tiny64
    z = latent((1, 4, 4, 6, 10), seed=27, dtype=torch.float64)
    untiled = ours.decode(z)
    with decoding_with(ours, use_tiling=True, exact_tile_sample_size=40), streaming(ours, decode_chunk_frames=2):
        assert len(exact_tiles(ours, 6, 10)) == 4
        assert max_diff(ours.decode(z), untiled) <= TOL_FP64


@torch.no_grad()
def test_video_decode_builds_no_pad_or_cat_of_chunks(tiny, monkeypatch):
    """The spy that proves the window path ran: a video decode calls neither torch.cat nor F.pad
    (the old path called both per causal conv per chunk), and every causal conv reads a window."""
    _, ours = tiny
    calls = {"cat": 0, "pad": 0, "window": 0}
    cat, pad, window = torch.cat, F.pad, video.causal_window

    def count(name, fn):
        def spy(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return spy

    monkeypatch.setattr(torch, "cat", count("cat", cat))
    monkeypatch.setattr(F, "pad", count("pad", pad))
    monkeypatch.setattr(video, "causal_window", count("window", window))
    out = ours.decode(latent((1, 4, 3, 4, 5), seed=28))
    assert out.shape == (1, 3, 9, 32, 40)
    assert calls["cat"] == 0 and calls["pad"] == 0
    causal = sum(1 for m in ours.decoder.modules() if getattr(m, "is_causal_in_time", False))
    assert calls["window"] == causal * 2  # every causal conv of the decoder, for each of the 2 later frames


@torch.no_grad()
def test_stream_writes_into_one_preallocated_result(tiny):
    """Outputs of unequal chunks (a short last one) land in their places; lengths are checked."""
    _, ours = tiny
    x = latent((1, 2, 6, 3, 3), seed=29)
    out = ours._stream(lambda c, cache: torch.cat([c, c], dim=2) if c.dim() == 5 else c * 1, x,
                       ours._frame_chunks(6, size=2), desc="test")
    # the first frame once, then each chunk of two (and the last of one) twice over
    expected = torch.cat([x[:, :, :1]] + [x[:, :, t0:t1].repeat(1, 1, 2, 1, 1) for t0, t1 in [(1, 3), (3, 5), (5, 6)]],
                         dim=2)
    assert torch.equal(out, expected)
    with pytest.raises(RuntimeError, match="wrote 10 of 11 output frames"):
        ours._stream(lambda c, cache: c if c.dim() == 4 or c.shape[2] < 2 else torch.cat([c, c], dim=2), x,
                     ours._frame_chunks(6, size=2), desc="test")
