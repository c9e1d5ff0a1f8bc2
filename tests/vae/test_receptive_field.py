"""The receptive field that exact tiling and patch decode rely on, derived by an impulse.

An impulse at one pixel of the mid-block output reaches output pixels up to R latent pixels away on
either side; R must equal `Decoder3d.receptive_field()` (13 for the Qwen-Image topology), the margin
the tiles use."""

import pytest
import torch

from qwenfast import QwenImageVAE

QWEN_TOPOLOGY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                     temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)


def measured_reach(vae: QwenImageVAE, size: int, frames: int = 1) -> int:
    """In float64: the farthest taps' share is far below fp32 resolution but not zero."""
    vae = vae.double()
    torch.manual_seed(0)
    mid = vae.decoder.mid_block.dim
    h = torch.randn(1, mid, frames, size, size, dtype=torch.float64)
    p = size // 2
    bumped = h.clone()
    bumped[:, :, -1, p, p] += 100.0  # in the last frame: also covers the video (cached) path
    with torch.no_grad():
        delta = (vae.decode_local(bumped) - vae.decode_local(h)).abs()[0].amax(dim=(0, 1))
    ys, xs = torch.nonzero(delta > 1e-12, as_tuple=True)
    s = vae.spatial_compression_ratio
    assert ys.numel() > 0
    reach = max((ys // s - p).abs().max().item(), (xs // s - p).abs().max().item())
    assert reach < p, "the impulse reached the border: grow the map"
    return reach


@pytest.mark.parametrize("arch,expected", [(QWEN_TOPOLOGY, 13), (dict(QWEN_TOPOLOGY, num_res_blocks=1), 9)])
def test_impulse_reach_equals_derived_receptive_field(arch, expected):
    vae = QwenImageVAE(**arch).eval()
    assert vae.decode_margin == expected
    assert measured_reach(vae, size=2 * expected + 5) == expected


def test_impulse_reach_in_video_frames_is_the_same():
    vae = QwenImageVAE(**dict(QWEN_TOPOLOGY, num_res_blocks=1)).eval()
    assert measured_reach(vae, size=23, frames=2) == vae.decode_margin


def test_full_size_qwen_image_margin():
    with torch.device("meta"):
        assert QwenImageVAE().decode_margin == 13
