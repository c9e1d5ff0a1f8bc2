"""`accelerate(pipe)` on tiny random Wan 2.1 pipelines built here (no download): the same video before
and after, fp32, max|Δ| ≤ 1e-5, for text-to-video (`WanPipeline`, from a prompt through a tiny
tokenizer and UMT5 encoder) and image-to-video (`WanImageToVideoPipeline`, with a tiny CLIP image
encoder), with a spy proving that qwenfast's VAE decoded (and, for I2V, encoded the conditioning).

The tokenizer is a word-level `tokenizers` model made in memory (a real UMT5 tokenizer needs a
download); the I2V prompt is passed as `prompt_embeds` (its prompt cleaning needs `ftfy`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from PIL import Image  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from helpers import TINY, _perturb_gammas, count_calls, diffusers_vae21, max_diff  # noqa: E402
from qwenfast import QwenImageVAE, VAEConfig  # noqa: E402
from qwenfast.integrations.diffusers import (  # noqa: E402
    accelerate,
    decode_packed_latents,
    qwenfast_vae,
    route_vae_decode,
)
from qwenfast.vae.weights import WeightsError  # noqa: E402

TOL = 1e-5
H, W, FRAMES = 16, 32, 9  # a 2 x 4 latent (Wan needs multiples of 16 px), 3 latent frames
WORDS = ["<pad>", "</s>", "<unk>", "a", "cat", "on", "the", "moon", "blurry"]
TEXT_DIM, TOKENS = 16, 8


def tiny_wan_vae(**overrides) -> AutoencoderKLWan:
    # helpers.TINY: z_dim 4, non-trivial latents_mean/std (a missing de-normalisation shows)
    torch.manual_seed(0)
    return _perturb_gammas(AutoencoderKLWan(**{**TINY, **overrides}).eval())


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")


def tiny_text_encoder() -> transformers.UMT5EncoderModel:
    torch.manual_seed(1)
    config = transformers.UMT5Config(vocab_size=len(WORDS), d_model=TEXT_DIM, d_kv=4, d_ff=32, num_layers=1,
                                     num_heads=2, relative_attention_num_buckets=8)
    return transformers.UMT5EncoderModel(config).eval()


def tiny_transformer(in_channels: int, image_dim: int | None = None) -> WanTransformer3DModel:
    torch.manual_seed(2)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                 in_channels=in_channels, out_channels=TINY["z_dim"], text_dim=TEXT_DIM, freq_dim=16,
                                 ffn_dim=32, num_layers=1, rope_max_seq_len=32, image_dim=image_dim,
                                 added_kv_proj_dim=None if image_dim is None else 16).eval()


def t2v_pipeline(vae: AutoencoderKLWan | None = None) -> WanPipeline:
    pipe = WanPipeline(tokenizer=tiny_tokenizer(), text_encoder=tiny_text_encoder(), vae=vae or tiny_wan_vae(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=tiny_transformer(TINY["z_dim"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def i2v_pipeline() -> WanImageToVideoPipeline:
    # CLIPImageProcessorPil: the processor without torchvision (transformers >= 5); CLIPImageProcessor before.
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    torch.manual_seed(3)
    image_encoder = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=8, projection_dim=8, num_hidden_layers=1, num_attention_heads=2, image_size=16,
        intermediate_size=16, patch_size=4)).eval()
    z = TINY["z_dim"]  # the transformer reads [latents, 4 mask channels (4x temporal), condition latents]
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=tiny_wan_vae(),
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                   image_processor=processor_cls(crop_size=16, size=16), image_encoder=image_encoder,
                                   transformer=tiny_transformer(z + 4 + z, image_dim=8))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def t2v(pipe) -> torch.Tensor:
    return pipe(prompt="a cat on the moon", negative_prompt="blurry", height=H, width=W, num_frames=FRAMES,
                num_inference_steps=2, max_sequence_length=TOKENS, generator=torch.Generator().manual_seed(5),
                output_type="pt").frames


def i2v(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    image = Image.fromarray((np.random.RandomState(0).rand(H, W, 3) * 255).astype(np.uint8))
    return pipe(image=image, prompt_embeds=torch.randn(1, TOKENS, TEXT_DIM, generator=g),
                negative_prompt_embeds=torch.randn(1, TOKENS, TEXT_DIM, generator=g), height=H, width=W,
                num_frames=FRAMES, num_inference_steps=2, generator=torch.Generator().manual_seed(5),
                output_type="pt").frames


@pytest.fixture
def calls(monkeypatch):
    """Every decode / encode qwenfast's VAE ran (so a test cannot pass on diffusers' own)."""
    return count_calls(monkeypatch, QwenImageVAE, ["decode", "encode_moments"])


def test_t2v_same_video_untiled_and_tiled(calls):
    pipe = t2v_pipeline()
    expected = t2v(pipe)
    assert expected.shape == (1, FRAMES, 3, H, W) and expected.std() > 0.05
    modules = [(n, type(m), m.forward) for n, m in pipe.transformer.named_modules()]
    weights = dict(pipe.transformer.named_parameters())
    assert accelerate(pipe) is pipe  # fused_modulation=True: not for Wan, and no failure
    assert type(pipe.vae) is AutoencoderKLWan  # diffusers' object: config, save, hooks stay its own
    # no CUDA graphs for the video pipelines (seconds per decode; a graph would hold its working set)
    assert qwenfast_vae(pipe.vae).vae_config.cuda_graph is False
    # the transformer untouched: the same modules, classes, forwards and Parameter objects
    assert [(n, type(m), m.forward) for n, m in pipe.transformer.named_modules()] == modules
    assert all(p is weights[n] for n, p in pipe.transformer.named_parameters())
    assert max_diff(t2v(pipe), expected) <= TOL
    # the VAEConfig reaches the routed decode: exact tiling (16 px tile centres, two tiles a frame)
    accelerate(pipe, vae_config=VAEConfig(use_tiling=True, exact_tile_sample_size=16))
    assert max_diff(t2v(pipe), expected) <= TOL
    assert calls == ["decode", "decode"]


def test_i2v_same_video_with_the_conditioning_encoded_by_qwenfast(calls):
    pipe = i2v_pipeline()
    expected = i2v(pipe)
    assert expected.shape == (1, FRAMES, 3, H, W)
    accelerate(pipe)
    assert max_diff(i2v(pipe), expected) <= TOL
    assert calls == ["encode_moments", "decode"]


@torch.no_grad()
def test_routed_encode_returns_diffusers_posterior():
    ref = tiny_wan_vae()
    video = torch.rand(2, 3, 5, 24, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    expected = ref.encode(video).latent_dist
    route_vae_decode(ref, encode=True)
    assert "encode" in ref.__dict__ and qwenfast_vae(ref) is not None
    got = ref.encode(video).latent_dist
    assert type(got) is type(expected)
    assert max_diff(got.mode(), expected.mode()) <= TOL and max_diff(got.std, expected.std) <= TOL
    sample = [d.sample(torch.Generator().manual_seed(7)) for d in (got, expected)]
    assert max_diff(*sample) <= TOL and max_diff(sample[0], got.mode()) > 0.01  # a sample, not the mean
    (posterior,) = ref.encode(video, return_dict=False)
    assert max_diff(posterior.mean, expected.mean) <= TOL
    # diffusers' enable_tiling(): its blended tiled encode, as diffusers' own
    ref.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16, tile_sample_stride_height=8,
                      tile_sample_stride_width=8)
    tiled = AutoencoderKLWan.encode(ref, video).latent_dist.mode()
    assert max_diff(tiled, expected.mode()) > 1e-3  # blending changes it: the check below can fail
    assert max_diff(ref.encode(video).latent_dist.mode(), tiled) <= TOL


def test_wan22_vae_is_refused_in_one_line_and_nothing_changes():
    vae = tiny_wan_vae(base_dim=8, decoder_base_dim=16, z_dim=8, is_residual=True, patch_size=2, in_channels=12,
                       out_channels=12, latents_mean=[0.0] * 8, latents_std=[1.0] * 8, scale_factor_spatial=16)
    pipe = t2v_pipeline(vae)
    match = (r"^the diffusers AutoencoderKLWan: a Wan 2\.2 VAE \(decoder_base_dim=16, is_residual=True, .*patch_size=2"
             r".* is not supported by QwenImageVAE, which is the Wan 2\.1 design")
    with pytest.raises(WeightsError, match=match) as e:
        accelerate(pipe)
    assert "\n" not in str(e.value)
    assert "decode" not in vae.__dict__ and "encode" not in vae.__dict__ and qwenfast_vae(vae) is None


def test_accelerate_names_the_wan_pipelines_it_takes():
    with pytest.raises(TypeError, match="WanPipeline, WanImageToVideoPipeline; got Linear"):
        accelerate(torch.nn.Linear(2, 2))


def test_encode_route_refused_where_qwenfast_has_no_posterior_and_wan_latents_are_not_packed():
    vae21 = diffusers_vae21()
    with pytest.raises(TypeError, match="QwenImage21VAE has no posterior encode"):
        route_vae_decode(vae21, encode=True)
    assert "decode" not in vae21.__dict__  # refused before anything changed
    with pytest.raises(TypeError, match=r"latents \(1, 4, 3, 2, 4\) are not packed"):
        decode_packed_latents(tiny_wan_vae(), torch.zeros(1, 4, 3, 2, 4), H, W)
