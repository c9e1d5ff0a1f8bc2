"""The Qwen-Image VAE's convs leave their biases to the fused passes that follow (PyTorch would add a
conv's bias in a pass of its own over the output): each upsampler's to the next up block's first
ResBlock, each 1x1 shortcut's to its ResBlock's final add. The decode is unchanged (float64, against
diffusers, with large biases so that a bias added twice or lost shows), and only the decoder's two
ends (post_quant_conv, conv_in, conv_out) still add one by themselves."""

import pytest
import torch
import torch.nn.functional as F

from helpers import diffusers_vae, latent, max_diff
from qwenfast import QwenImageVAE
from qwenfast.vae.qwen_image import FrameCache, ResidualBlock


def with_large_biases(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@torch.no_grad()
@pytest.mark.parametrize("frames", [1, 3])
def test_decode_equals_diffusers_with_large_biases_fp64(frames):
    ref = with_large_biases(diffusers_vae()).double()
    ours = QwenImageVAE.from_diffusers(ref)
    z = latent((1, 4, frames, 6, 7))
    # diffusers rounds each upsampler's input through fp32 (its nearest upsample casts to float32 and
    # back), so in float64 the two agree to ~2e-8 (as before the biases were folded: 5.9e-9 / 2.1e-8);
    # a bias lost or added twice moves the output by ~0.1
    assert max_diff(ours.decode(z), ref.decode(z).sample.clamp(-1, 1)) <= 1e-7
    x = ref.decode(z).sample
    assert max_diff(ours.encode_moments(x), ref.encode(x).latent_dist.parameters) <= 1e-7


@torch.no_grad()
@pytest.mark.parametrize("in_dim, out_dim", [(4, 6), (6, 6)])  # a 1x1 conv shortcut; the identity
def test_residual_block_adds_the_bias_its_input_lacks_fp64(in_dim, out_dim):
    torch.manual_seed(0)
    block = with_large_biases(ResidualBlock(in_dim, out_dim)).double().eval()
    b = torch.randn(in_dim, dtype=torch.float64)
    x = torch.randn(1, in_dim, 5, 6, dtype=torch.float64)
    assert max_diff(block(x, x_bias=b), block(x + b.view(-1, 1, 1))) <= 1e-13
    # video: a first frame, then a chunk of two with the frame cache, each pass its own cache
    v = torch.randn(1, in_dim, 3, 5, 6, dtype=torch.float64)
    outs = []
    for shift, bias in ((b.view(-1, 1, 1, 1), None), (0, b)):
        cache = FrameCache()
        first = block((v + shift)[:, :, 0], cache, x_bias=bias)
        outs.append(torch.cat([first.unsqueeze(2), block((v + shift)[:, :, 1:], cache, x_bias=bias)], dim=2))
    assert max_diff(outs[1], outs[0]) <= 1e-13


@torch.no_grad()
def test_only_the_decoders_ends_add_a_bias_by_themselves(monkeypatch):
    vae = QwenImageVAE.from_diffusers(diffusers_vae())
    biased = []
    for name in ("conv2d", "conv3d", "conv_transpose2d"):
        real = getattr(F, name)

        def spy(x, w, b=None, *a, _real=real, **k):
            if b is not None:
                biased.append(tuple(w.shape))
            return _real(x, w, b, *a, **k)

        monkeypatch.setattr(F, name, spy)
    vae.decode(latent((1, 4, 1, 6, 7), dtype=torch.float32))
    d = vae.decoder
    assert sorted(biased) == sorted([tuple(vae.post_quant_conv.weight.shape[:2]) + (1, 1),
                                     tuple(d.conv_in.weight[:, :, -1].shape), tuple(d.conv_out.weight[:, :, -1].shape)])
