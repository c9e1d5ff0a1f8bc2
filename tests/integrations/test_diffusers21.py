"""`accelerate(pipe)` on a tiny random `QwenImage21Pipeline` built here (no download): the same image
before and after, fp32, max|Δ| ≤ 1e-4, with and without `causal_condition`, KV cache on and off,
two prompts (one padded).

The pipeline needs a Qwen3-VL processor only for two constructor calls (the system prompt's length,
the image-pad token id); the text encoder is skipped by passing `prompt_embeds`. So a stub stands in
for the processor: a tokenizer cannot be built without a download.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("diffusers.pipelines.qwenimage21")
from diffusers import AutoencoderKLQwenImage, AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers import QwenImage21Pipeline  # noqa: E402

from qwenfast.dit import fuse_modulation, is_fused  # noqa: E402
from qwenfast.integrations.diffusers import (  # noqa: E402
    VAE_CLASSES,
    accelerate,
    decode_packed_latents,
    qwenfast_vae,
    qwenfast_vae_class,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dit"))
from test_qwen_image21 import make_transformer  # noqa: E402

TOL = 1e-4
H, W = 64, 96  # output pixels: a 4 x 6 latent (16x), 24 target tokens
HAS_VAE21 = importlib.util.find_spec("qwenfast.vae.qwen_image21") is not None
NO_VAE21 = "qwenfast.vae.qwen_image21 (qwenfast's Qwen-Image-2.1 VAE) is not in this branch yet"


class _StubProcessor:
    """What QwenImage21Pipeline.__init__ asks of its Qwen3-VL processor, and nothing else."""

    class tokenizer:  # noqa: N801
        @staticmethod
        def encode(text):
            return [151655]  # <|image_pad|>

    @staticmethod
    def apply_chat_template(messages, tokenize=True, return_dict=False):
        return [[0] * 12]  # the system message's tokens (only their count is used)


def tiny_vae(seed: int = 0) -> AutoencoderKLQwenImage21:
    # z_dim 8 = the transformer's in_channels (2.1 is unpatched); 5 levels: 16x; latents_mean/std
    # non-trivial, so a missing de-normalisation shows.
    torch.manual_seed(seed)
    return AutoencoderKLQwenImage21(
        base_dim=8, decoder_base_dim=8, z_dim=8, dim_mult=[1, 2, 2, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True, True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0, 0.5, -0.1, 0.2, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0, 1.2, 0.8, 1.0, 2.5],
    ).eval()


def tiny_pipeline(causal_condition: bool = True) -> QwenImage21Pipeline:
    pipe = QwenImage21Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), text_encoder=None,
                               processor=_StubProcessor(), transformer=make_transformer(causal_condition))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, use_kv_cache=True, **kw):
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False  # the second prompt is padded
    return pipe(prompt_embeds=torch.randn(2, 7, 24, generator=g), prompt_embeds_mask=mask, height=H, width=W,
                num_inference_steps=2, generator=torch.Generator().manual_seed(5), use_kv_cache=use_kv_cache,
                output_type=kw.pop("output_type", "pt"), **kw).images


@pytest.mark.parametrize("causal_condition,use_kv_cache", [(True, True), (True, False), (False, False)])
def test_fused_transformer_same_image(causal_condition, use_kv_cache):
    pipe = tiny_pipeline(causal_condition)
    expected = generate(pipe, use_kv_cache)
    assert expected.shape == (2, 4, H, W)  # RGBA
    fuse_modulation(pipe.transformer)
    assert is_fused(pipe.transformer)
    assert (generate(pipe, use_kv_cache) - expected).abs().max().item() <= TOL


@pytest.mark.skipif(not HAS_VAE21, reason=NO_VAE21)
def test_accelerate_same_image(monkeypatch):
    vae_cls = qwenfast_vae_class(tiny_vae())
    decodes = []
    original = vae_cls.decode
    monkeypatch.setattr(vae_cls, "decode", lambda self, z: decodes.append(1) or original(self, z))
    pipe = tiny_pipeline()
    expected = generate(pipe)
    assert accelerate(pipe) is pipe
    assert is_fused(pipe.transformer)
    assert type(pipe.vae) is AutoencoderKLQwenImage21  # diffusers' object: config, encode, save stay its own
    assert (generate(pipe) - expected).abs().max().item() <= TOL
    assert decodes == [1]


def test_accelerate_routes_the_21_vae_by_its_class(monkeypatch):
    # The routing itself, whatever qwenfast's 2.1 VAE is: a stand-in with the surface routing uses
    # (`from_diffusers(module, vae_config=)` over the same parameter names, `vae_config`, `decode(z)`)
    # is picked for the diffusers class, gets diffusers' own Parameter objects and decodes the image.
    import types

    class StandIn(AutoencoderKLQwenImage21):
        decodes = 0

        @classmethod
        def from_diffusers(cls, module, vae_config=None):
            ours = copy.deepcopy(module)
            ours.__class__, ours.vae_config = cls, vae_config
            return ours

        def decode(self, z):
            StandIn.decodes += 1
            return AutoencoderKLQwenImage21.decode(self, z).sample.clamp(-1, 1)

    module = types.ModuleType("standin_vae21")
    module.StandIn = StandIn
    monkeypatch.setitem(sys.modules, "standin_vae21", module)
    monkeypatch.setitem(VAE_CLASSES, "AutoencoderKLQwenImage21", ("standin_vae21", "StandIn"))
    pipe = tiny_pipeline()
    expected = generate(pipe)
    accelerate(pipe)
    assert is_fused(pipe.transformer) and type(pipe.vae) is AutoencoderKLQwenImage21
    ours = qwenfast_vae(pipe.vae)
    assert type(ours) is StandIn and ours.decoder.conv_in.weight is pipe.vae.decoder.conv_in.weight
    assert (generate(pipe) - expected).abs().max().item() <= TOL
    assert StandIn.decodes == 1


@pytest.mark.skipif(HAS_VAE21, reason="qwenfast's 2.1 VAE is there: test_accelerate_same_image runs instead")
def test_accelerate_without_the_21_vae_fails_clearly_and_changes_nothing():
    pipe = tiny_pipeline()
    with pytest.raises(ImportError, match=r"AutoencoderKLQwenImage21 needs qwenfast's qwenfast\.vae\.qwen_image21"):
        accelerate(pipe)
    assert not is_fused(pipe.transformer)  # the VAE is routed first: nothing was half done
    assert "decode" not in pipe.vae.__dict__


def test_decode_packed_latents_is_the_pipelines_last_step():
    # On diffusers' own VAE (the routing is tested above): unpack (unpatched, 16x), latents * std +
    # mean, decode, keep the frame; RGBA out.
    pipe = tiny_pipeline()
    latents = generate(pipe, output_type="latent")  # packed (2, 24, 8)
    assert latents.shape == (2, 24, 8)
    expected = generate(pipe)  # output_type "pt" maps [-1, 1] to [0, 1]
    with torch.no_grad():
        image = decode_packed_latents(pipe.vae, latents, H, W)
    assert image.shape == (2, 4, H, W)
    assert ((image / 2 + 0.5).clamp(0, 1) - expected).abs().max().item() <= TOL


def test_qwenfast_vae_class_by_diffusers_class_name():
    from qwenfast import QwenImageVAE

    qwen = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False])
    assert qwenfast_vae_class(qwen) is QwenImageVAE
    with pytest.raises(TypeError, match="qwenfast has no VAE for a diffusers Linear"):
        qwenfast_vae_class(torch.nn.Linear(2, 2))
    if HAS_VAE21:
        assert qwenfast_vae_class(tiny_vae()).__name__ == "QwenImage21VAE"
    else:
        with pytest.raises(ImportError, match="qwenfast.vae.qwen_image21"):
            qwenfast_vae_class(tiny_vae())
