"""Our VAE against diffusers' AutoencoderKLQwenImage, fp32 on the CPU: every decode path ≤ 1e-4."""

import pytest
import torch

from qwenfast.vae.tiling import exact_tiles
from helpers import ARCHS, decoding_with, diffusers_tiling, max_diff, pair

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    return pair()


@torch.no_grad()
@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("frames,h,w", [(1, 13, 21), (2, 9, 7), (5, 6, 5)])
def test_decode_matches_diffusers(arch, frames, h, w):
    ref, ours = pair(ARCHS[arch])
    z = torch.randn(2, ref.config.z_dim, frames, h, w, generator=torch.Generator().manual_seed(1))
    expected = ref.decode(z).sample
    out = ours.decode(z)
    assert out.shape == expected.shape
    assert max_diff(out, expected) <= TOL
    assert out.abs().max() <= 1.0  # clamped


@torch.no_grad()
@pytest.mark.parametrize("frames", [1, 2])
def test_image_fast_path_equals_reference_path(tiny, frames):
    """The folded 2-D path (no frame cache) against the plain 3-D path with a cache, as diffusers runs."""
    _, ours = tiny
    z = torch.randn(1, 4, frames, 11, 9, generator=torch.Generator().manual_seed(2))
    fast = ours.decode(z)
    with decoding_with(ours, image_fast_path=False):
        slow = ours.decode(z)
    assert max_diff(fast, slow) <= TOL


@torch.no_grad()
def test_image_latent_4d_gives_4d_image(tiny):
    ref, ours = tiny
    z = torch.randn(3, 4, 13, 21, generator=torch.Generator().manual_seed(3))
    out = ours.decode(z)
    assert out.shape == (3, 3, 104, 168)
    assert max_diff(out, ref.decode(z.unsqueeze(2)).sample[:, :, 0]) <= TOL


@torch.no_grad()
@pytest.mark.parametrize("frames,h,w", [(1, 13, 21), (2, 9, 7), (5, 6, 5)])
def test_exact_tiling_equals_untiled(tiny, frames, h, w):
    """Exact tiles (8 latent px cores here, so that there are many) with the derived margin."""
    _, ours = tiny
    z = torch.randn(2, 4, frames, h, w, generator=torch.Generator().manual_seed(4))
    untiled = ours.decode(z)
    with decoding_with(ours, use_tiling=True, exact_tile_sample_size=32):
        assert len(exact_tiles(ours, h, w)) > 1
        tiled = ours.decode(z)
    assert max_diff(tiled, untiled) <= TOL


@torch.no_grad()
def test_exact_tiling_needs_the_whole_margin(tiny):
    """One latent pixel short of the receptive field is measurably worse than the derived margin
    (the farthest taps weigh little, so the gap is relative: ~2e-5 against ~2e-6 here)."""
    _, ours = tiny
    z = torch.randn(1, 4, 1, 20, 20, generator=torch.Generator().manual_seed(5))
    untiled = ours.decode(z)
    errors = []
    for margin in (ours.decode_margin, ours.decode_margin - 1):
        with decoding_with(ours, use_tiling=True, exact_tile_sample_size=40, tile_margin=margin):
            errors.append(max_diff(ours.decode(z), untiled))
    assert errors[1] > 4 * max(errors[0], 1e-6)


@torch.no_grad()
@pytest.mark.parametrize("frames,h,w", [(1, 45, 37), (2, 30, 41)])
def test_blend_tiling_matches_diffusers_enable_tiling(tiny, frames, h, w):
    ref, ours = tiny
    z = torch.randn(1, 4, frames, h, w, generator=torch.Generator().manual_seed(6))
    with diffusers_tiling(ref):
        # diffusers' tiled path returns its output unclamped; qwenfast clamps every decode.
        expected = ref.decode(z).sample.clamp(-1, 1)
    with decoding_with(ours, use_tiling=True, tiling="blend"):
        out = ours.decode(z)
    assert max_diff(out, expected) <= TOL
    assert max_diff(out, ours.decode(z)) > 1e-2  # blend is not exact: the check above means something


@torch.no_grad()
def test_blend_tiling_small_latent_decodes_untiled(tiny):
    """Like diffusers, a latent that fits in one tile is decoded untiled."""
    _, ours = tiny
    z = torch.randn(1, 4, 1, 20, 32, generator=torch.Generator().manual_seed(7))
    untiled = ours.decode(z)
    with decoding_with(ours, use_tiling=True, tiling="blend"):
        assert torch.equal(ours.decode(z), untiled)


@torch.no_grad()
@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("frames", [1, 5])
def test_encode_matches_diffusers(arch, frames):
    ref, ours = pair(ARCHS[arch])
    s = 2 ** len(ARCHS[arch]["temperal_downsample"])
    t_ratio = 2 ** sum(ARCHS[arch]["temperal_downsample"])
    frames = 1 + (frames - 1) // t_ratio * t_ratio
    x = torch.rand(2, 3, frames, 5 * s, 3 * s, generator=torch.Generator().manual_seed(8)) * 2 - 1
    expected = ref.encode(x).latent_dist.mode()
    assert max_diff(ours.encode(x), expected) <= TOL
    if frames == 1:
        assert max_diff(ours.encode(x[:, :, 0]), expected[:, :, 0]) <= TOL


@torch.no_grad()
def test_tiled_encode_matches_diffusers(tiny):
    ref, ours = tiny
    x = torch.rand(1, 3, 1, 300, 420, generator=torch.Generator().manual_seed(9)) * 2 - 1
    with diffusers_tiling(ref):
        expected = ref.encode(x).latent_dist.mode()
    with decoding_with(ours, use_tiling=True):
        assert max_diff(ours.encode(x), expected) <= TOL


@torch.no_grad()
def test_encoder_attention_runs_where_diffusers_fails():
    """attn_scales puts attention in the encoder; diffusers' encoder calls it with the frame cache
    arguments and fails (0.42.1). Ours encodes, and decodes exactly like diffusers."""
    arch = dict(ARCHS["tiny"], attn_scales=[1.0, 0.5])
    ref, ours = pair(arch)
    x = torch.rand(1, 3, 1, 32, 32, generator=torch.Generator().manual_seed(10)) * 2 - 1
    assert ours.encode(x).shape == (1, 4, 1, 4, 4)
    z = torch.randn(1, 4, 2, 5, 6, generator=torch.Generator().manual_seed(11))
    assert max_diff(ours.decode(z), ref.decode(z).sample) <= TOL


def test_bad_latents_are_refused(tiny):
    _, ours = tiny
    for z, err in [(torch.randn(1, 4, 8), ValueError), (torch.randn(1, 5, 1, 4, 4), ValueError),
                   (torch.zeros(1, 4, 0, 4, 4), ValueError), (torch.ones(1, 4, 4, 4, dtype=torch.long), TypeError),
                   ([[1.0]], TypeError)]:
        with pytest.raises(err):
            ours.decode(z)
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        ours.encode(torch.rand(1, 3, 3, 16, 16))
    with pytest.raises(ValueError, match="3 channels"):
        ours.encode(torch.rand(1, 4, 1, 16, 16))
