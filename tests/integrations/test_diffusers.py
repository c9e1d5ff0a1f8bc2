"""`accelerate(pipe)` on tiny random Qwen-Image pipelines built here (no download): the same image
before and after, fp32, max|Δ| ≤ 1e-4, for t2i (untiled, exact-tiled, diffusers' own tiling) and the
two edit pipelines. `prompt_embeds` are passed, so no tokenizer or text encoder is needed."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
)
from PIL import Image  # noqa: E402

from qwenfast import QwenImageVAE, VAEConfig  # noqa: E402
from qwenfast.dit import is_fused  # noqa: E402
from qwenfast.integrations.diffusers import accelerate, decode_packed_latents, qwenfast_vae  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dit"))
from test_qwen_image import make_transformer  # noqa: E402

TOL = 1e-4
H, W = 32, 48  # output pixels: a 4 x 6 latent, 2 x 3 packed tokens


def tiny_vae(seed: int = 0) -> AutoencoderKLQwenImage:
    # z_dim 4 -> the transformer's in_channels 16 (2x2 packing); latents_mean/std non-trivial so a
    # missing de-normalisation shows.
    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0],
    ).eval()


def tiny_pipeline(cls=QwenImagePipeline):
    parts = dict(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), text_encoder=None, tokenizer=None,
                 transformer=make_transformer(zero_cond_t=cls is not QwenImagePipeline))
    if cls is not QwenImagePipeline:
        parts["processor"] = None
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt(batch: int = 1):
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(batch, 7, dtype=torch.long)
    return dict(prompt_embeds=torch.randn(batch, 7, 24, generator=g), prompt_embeds_mask=mask)


def generate(pipe, height=H, width=W, **kw):
    return pipe(**prompt(), height=height, width=width, num_inference_steps=2,
                generator=torch.Generator().manual_seed(5), output_type="pt", **kw).images


@pytest.fixture
def count_decodes(monkeypatch):
    """How many times qwenfast's VAE decoded (so a test cannot pass on diffusers' decode)."""
    calls = []
    original = QwenImageVAE.decode

    def spy(self, z):
        calls.append(self.vae_config)
        return original(self, z)

    monkeypatch.setattr(QwenImageVAE, "decode", spy)
    return calls


def test_t2i_same_image_untiled_and_tiled(count_decodes):
    pipe = tiny_pipeline()
    expected = generate(pipe)
    assert accelerate(pipe) is pipe
    assert is_fused(pipe.transformer)
    assert type(pipe.vae) is AutoencoderKLQwenImage  # diffusers' object: config, encode, save stay its own
    assert (generate(pipe) - expected).abs().max().item() <= TOL
    # exact tiling with 16 px tile centres: several tiles over the 32 x 48 image, still exact.
    accelerate(pipe, vae_config=VAEConfig(use_tiling=True, exact_tile_sample_size=16))
    assert (generate(pipe) - expected).abs().max().item() <= TOL
    assert [c.use_tiling for c in count_decodes] == [False, True]


def test_diffusers_enable_tiling_keeps_diffusers_output(count_decodes):
    pipe = tiny_pipeline()
    pipe.vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32,
                           tile_sample_stride_height=24, tile_sample_stride_width=24)
    expected = generate(pipe, height=64, width=64)  # diffusers' blended tiles
    accelerate(pipe)
    assert (generate(pipe, height=64, width=64) - expected).abs().max().item() <= TOL
    assert count_decodes[-1].use_tiling and count_decodes[-1].tiling == "blend"
    assert not qwenfast_vae(pipe.vae).vae_config.use_tiling  # the user's config is left as it was


@pytest.mark.parametrize("cls", [QwenImageEditPipeline, QwenImageEditPlusPipeline])
def test_edit_pipelines_same_image(cls, count_decodes):
    pipe = tiny_pipeline(cls)
    image = Image.fromarray((np.random.RandomState(0).rand(24, 40, 3) * 255).astype(np.uint8))
    expected = generate(pipe, image=image)
    accelerate(pipe)
    assert is_fused(pipe.transformer) and pipe.transformer.config.zero_cond_t
    assert (generate(pipe, image=image) - expected).abs().max().item() <= TOL
    assert len(count_decodes) == 1


def test_vae_follows_pipe_to_and_decode_packed_latents():
    pipe = accelerate(tiny_pipeline(), fused_modulation=False)
    assert not is_fused(pipe.transformer)
    latents = pipe(**prompt(), height=H, width=W, num_inference_steps=2, output_type="latent",
                   generator=torch.Generator().manual_seed(5)).images  # packed (1, 6, 16)
    expected = generate(pipe)  # output_type "pt" maps [-1, 1] to [0, 1]
    image = decode_packed_latents(pipe.vae, latents, H, W)
    assert image.shape == (1, 3, H, W)
    assert ((image / 2 + 0.5).clamp(0, 1) - expected).abs().max().item() <= TOL
    # qwenfast's VAE holds diffusers' own Parameter objects: a cast (or a device move, an offload
    # hook) changes both, no copy is kept behind.
    ours = qwenfast_vae(pipe.vae)
    pipe.to(torch.float64)
    assert qwenfast_vae(pipe.vae) is ours and ours.dtype == torch.float64
    assert ours.post_quant_conv.weight is pipe.vae.post_quant_conv.weight
    # A hook that replaces the Parameter objects themselves: rebuilt over the new ones.
    pipe.vae.post_quant_conv.weight = torch.nn.Parameter(pipe.vae.post_quant_conv.weight.detach().clone())
    assert qwenfast_vae(pipe.vae).post_quant_conv.weight is pipe.vae.post_quant_conv.weight


def test_accelerate_rejects_other_objects():
    with pytest.raises(TypeError, match="QwenImagePipeline"):
        accelerate(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="vae_config"):
        accelerate(tiny_pipeline(), vae_config={"use_tiling": True})
