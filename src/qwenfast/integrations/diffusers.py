"""One call that makes a diffusers Qwen-Image pipeline fast: `accelerate(pipe)`.

What changes, and what does not:
- `pipe.transformer`: every block's modulation runs on the fused ops (`qwenfast.dit.fuse_modulation`),
  in place; parameters, module tree and state dict are untouched.
- `pipe.vae` stays diffusers' `AutoencoderKLQwenImage` object: its config, `encode` (the edit
  pipelines' `vae.encode(image).latent_dist`), `dtype`, `temperal_downsample`, `.to()`, offload hooks
  and `save_pretrained` are diffusers' own. Only its `decode` is routed, for that one object, to a
  `qwenfast.QwenImageVAE` built over the *same* parameter tensors (no copy) with the given
  `VAEConfig`, so tiled and parallel decode (every rank calling the pipeline under torchrun) apply.
  `pipe.vae.enable_tiling()` still works: with no tiling asked for in the `VAEConfig`, it decodes
  with diffusers' own blended tiles and tile sizes, so the output is what diffusers would give.

The pipeline's call signature and outputs are unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import VAEConfig

__all__ = ["accelerate", "route_vae_decode", "qwenfast_vae", "decode_packed_latents", "PIPELINE_CLASSES"]

# The pipelines whose transformer is a QwenImageTransformer2DModel and whose VAE is an
# AutoencoderKLQwenImage decoded through `self.vae.decode(latents, return_dict=False)[0]`.
PIPELINE_CLASSES = ("QwenImagePipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline")

_ROUTED = "_qwenfast_vae"  # instance attribute on the diffusers VAE: our VAE, out of the module tree


def accelerate(pipe, vae_config: VAEConfig | None = None, fused_modulation: bool = True):
    """Turn a diffusers `QwenImagePipeline`, `QwenImageEditPipeline` or `QwenImageEditPlusPipeline`
    into one whose decode runs on `qwenfast.QwenImageVAE` (with `vae_config`) and whose transformer
    runs fused modulation blocks. In place; returns `pipe`. Calling it again only updates the
    `VAEConfig` (and fuses if asked). Call before `torch.compile(pipe.transformer)`."""
    name = type(pipe).__name__
    if not any(c.__name__ in PIPELINE_CLASSES for c in type(pipe).__mro__):
        raise TypeError(f"accelerate expects one of {', '.join(PIPELINE_CLASSES)}; got {name}")
    for component in ("vae", "transformer"):
        if getattr(pipe, component, None) is None:
            raise ValueError(f"accelerate: the {name} has no {component}")
    route_vae_decode(pipe.vae, vae_config)
    if fused_modulation:
        from ..dit import fuse_modulation

        fuse_modulation(pipe.transformer)
    return pipe


def route_vae_decode(vae: nn.Module, vae_config: VAEConfig | None = None) -> nn.Module:
    """Route `vae.decode` (a diffusers `AutoencoderKLQwenImage`) to a `QwenImageVAE` sharing its
    parameters. Only this object changes (an instance attribute shadows the class's method)."""
    from ..vae import QwenImageVAE

    if vae_config is not None and not isinstance(vae_config, VAEConfig):
        raise TypeError(f"vae_config must be a qwenfast.VAEConfig or None; got {type(vae_config).__name__}")
    ours = vae.__dict__.get(_ROUTED)
    if ours is None:
        ours = _share_parameters(QwenImageVAE.from_diffusers(vae, vae_config=vae_config), vae)  # raises on a foreign VAE
        object.__setattr__(vae, _ROUTED, ours)  # not a submodule: the state dict stays diffusers'
        object.__setattr__(vae, "decode", _routed_decode(vae))
    elif vae_config is not None:
        ours.vae_config = vae_config
    return vae


def qwenfast_vae(vae: nn.Module):
    """The `QwenImageVAE` behind a routed diffusers VAE (`pipe.vae`), re-tied to its parameters if
    `.to()` or an offload hook has moved them since; None if `vae` is not routed."""
    ours = vae.__dict__.get(_ROUTED)
    if ours is None:
        return None
    theirs = dict(vae.named_parameters())
    if any(p is not theirs[n] for n, p in ours.named_parameters()):
        # Some hook replaced diffusers' Parameter objects (accelerate's sequential offload does):
        # rebuild over the new ones (no copy, no init).
        from ..vae import QwenImageVAE

        ours = _share_parameters(QwenImageVAE.from_diffusers(vae, vae_config=ours.vae_config), vae)
        object.__setattr__(vae, _ROUTED, ours)
    return ours


def _share_parameters(ours: nn.Module, vae: nn.Module) -> nn.Module:
    """Make `ours` hold diffusers' own Parameter objects (same names). `.to()`, `.half()` and model
    CPU offload change a Parameter's data in place, so both modules follow without a copy and no
    stale device copy is kept alive."""
    theirs = dict(vae.named_parameters())
    for name, _ in list(ours.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        setattr(ours.get_submodule(owner), leaf, theirs[name])
    return ours


def _effective_config(vae: nn.Module, config: VAEConfig) -> VAEConfig:
    # `pipe.enable_vae_tiling()` sets diffusers' flags; honour them with diffusers' own blended tiles
    # unless the VAEConfig already asks for tiling or parallel decode.
    if getattr(vae, "use_tiling", False) and not (config.use_tiling or config.use_parallel_decode):
        return config.replace(
            use_tiling=True, tiling="blend",
            tile_sample_min_height=int(vae.tile_sample_min_height), tile_sample_min_width=int(vae.tile_sample_min_width),
            tile_sample_stride_height=int(vae.tile_sample_stride_height), tile_sample_stride_width=int(vae.tile_sample_stride_width),
        )
    return config


def _routed_decode(vae: nn.Module):
    from diffusers.models.autoencoders.vae import DecoderOutput

    def decode(z: torch.Tensor, return_dict: bool = True) -> Any:
        """diffusers' `decode(z, return_dict)` on qwenfast's VAE (see qwenfast.integrations.diffusers)."""
        hook = getattr(vae, "_hf_hook", None)  # model CPU offload: move the VAE in first, as diffusers does
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(vae)
        ours = qwenfast_vae(vae)
        config = ours.vae_config
        ours.vae_config = _effective_config(vae, config)
        try:
            sample = ours.decode(z)
        finally:
            ours.vae_config = config
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    return decode


def decode_packed_latents(vae: nn.Module, latents: torch.Tensor, height: int, width: int) -> torch.Tensor | None:
    """The pipelines' last step, for a caller that asked for `output_type="latent"`: packed latents
    `[B, (h/2)(w/2), 4·z_dim]` → unpacked, de-normalised by the VAE's latents_mean/std → decoded
    image `[B, 3, height, width]` in [-1, 1] (None on ranks that get no output of a parallel decode)."""
    from diffusers import QwenImagePipeline

    scale = 2 ** len(vae.temperal_downsample)
    z = QwenImagePipeline._unpack_latents(latents, height, width, scale).to(vae.dtype)  # (B, z, 1, h, w)
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
    z = z / inv_std + mean  # the same two roundings as the pipelines
    image = vae.decode(z, return_dict=False)[0]
    return None if image is None else image[:, :, 0]
