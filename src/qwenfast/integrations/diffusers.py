"""One call that makes a diffusers Qwen-Image (or Wan 2.1 video) pipeline fast: `accelerate(pipe)`.

What changes, and what does not:
- `pipe.transformer`: every block's modulation runs on the fused ops (`qwenfast.dit.fuse_modulation`:
  the Qwen-Image DiT or the Qwen-Image-2.1 DiT), in place; parameters, module tree and state dict are
  untouched.
- `pipe.vae` stays diffusers' object (`AutoencoderKLQwenImage`, or `AutoencoderKLQwenImage21` for
  Qwen-Image-2.1): its config, `encode` (the edit pipelines' `vae.encode(image).latent_dist`; Wan: below),
  `dtype`, `.to()`, offload hooks and `save_pretrained` are diffusers' own. Only its `decode` is
  routed, for that one object, to qwenfast's VAE of the same design (`qwenfast_vae_class`) built over
  the *same* parameter tensors (no copy) with the given `VAEConfig`, so tiled and parallel decode
  (every rank calling the pipeline under torchrun) apply.
  `pipe.vae.enable_tiling()` still works: with no tiling asked for in the `VAEConfig`, it decodes
  with diffusers' own blended tiles and tile sizes, so the output is what diffusers would give.
- Wan pipelines (`WanPipeline`, `WanImageToVideoPipeline`; `AutoencoderKLWan` with the Wan 2.1
  config, which is the Qwen-Image VAE): only the VAE is routed — `decode`, and `encode` too (the
  image-to-video conditioning, `retrieve_latents(vae.encode(video), sample_mode="argmax")`), which
  returns diffusers' own `AutoencoderKLOutput` around the posterior qwenfast's VAE computes, so
  `latent_dist.mode()` and `latent_dist.sample(generator)` are what diffusers' give. The Wan
  transformer is left as it is: qwenfast has no fused blocks for it.

The pipeline's call signature and outputs are unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ..config import VAEConfig

__all__ = ["accelerate", "when_shapes_repeat", "route_vae_decode", "qwenfast_vae", "qwenfast_vae_class",
           "decode_packed_latents", "PIPELINE_CLASSES", "VAE_ONLY_PIPELINE_CLASSES", "VAE_CLASSES"]

# The pipelines whose transformer `qwenfast.dit.fuse_modulation` takes and whose VAE (one of
# VAE_CLASSES) they decode through `self.vae.decode(latents, return_dict=False)[0]`.
PIPELINE_CLASSES = ("QwenImagePipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline", "QwenImage21Pipeline")
# The pipelines of which only the VAE is routed (decode and encode): the Wan 2.1 video pipelines (and
# Wan 2.2 A14B's, which use the Wan 2.1 VAE). Their transformer (WanTransformer3DModel) is not fused.
VAE_ONLY_PIPELINE_CLASSES = ("WanPipeline", "WanImageToVideoPipeline")
# diffusers' VAE class -> qwenfast's VAE of the same design (module, class), imported on use.
# AutoencoderKLWan only with the Wan 2.1 config: QwenImageVAE refuses Wan 2.2's (naming the keys).
VAE_CLASSES = {
    "AutoencoderKLQwenImage": ("qwenfast.vae", "QwenImageVAE"),
    "AutoencoderKLQwenImage21": ("qwenfast.vae.qwen_image21", "QwenImage21VAE"),
    "AutoencoderKLWan": ("qwenfast.vae", "QwenImageVAE"),
}

_ROUTED = "_qwenfast_vae"  # instance attribute on the diffusers VAE: our VAE, out of the module tree


def accelerate(pipe, vae_config: VAEConfig | None = None, fused_modulation: bool = True, cuda_graph: bool = True):
    """Turn a diffusers `QwenImagePipeline`, `QwenImageEditPipeline`, `QwenImageEditPlusPipeline` or
    `QwenImage21Pipeline` into one whose decode runs on qwenfast's VAE (with `vae_config`) and whose
    transformer runs fused modulation blocks. In place; returns `pipe` (the VAE is routed first: if
    that fails, nothing has changed). Calling it again only updates the `VAEConfig` (and fuses if
    asked). Call before `torch.compile(pipe.transformer)` or `compile_repeated_blocks()`.
    `cuda_graph`: decode CUDA latents of the image pipelines as CUDA graphs once a shape repeats
    (`when_shapes_repeat`); False leaves `vae_config.cuda_graph` as given.

    A `WanPipeline` or `WanImageToVideoPipeline` (Wan 2.1 VAE) gets its VAE routed only, decode and
    encode; `fused_modulation` does not apply to it (it is for the Qwen-Image DiTs) and its
    transformer(s) are left untouched. A Wan 2.2 VAE (TI2V-5B) is refused. `cuda_graph` does not apply
    to these video pipelines either: a video decode runs for seconds, so its launch gaps are noise,
    while a graph would keep its whole working set (~11 GiB at 81 frames of 720p) between calls; set
    `vae_config.cuda_graph` to have one anyway."""
    name = type(pipe).__name__
    mro = [c.__name__ for c in type(pipe).__mro__]
    vae_only = any(c in VAE_ONLY_PIPELINE_CLASSES for c in mro)
    if not vae_only and not any(c in PIPELINE_CLASSES for c in mro):
        raise TypeError(f"accelerate expects one of {', '.join(PIPELINE_CLASSES + VAE_ONLY_PIPELINE_CLASSES)}; "
                        f"got {name}")
    for component in ("vae",) if vae_only else ("vae", "transformer"):
        if getattr(pipe, component, None) is None:
            raise ValueError(f"accelerate: the {name} has no {component}")
    graphs = cuda_graph and not vae_only
    route_vae_decode(pipe.vae, when_shapes_repeat(vae_config, pipe.vae) if graphs else vae_config, encode=vae_only)
    if fused_modulation and not vae_only:
        from ..dit import fuse_modulation

        fuse_modulation(pipe.transformer)
    return pipe


def when_shapes_repeat(vae_config: VAEConfig | None, vae: nn.Module) -> VAEConfig | None:
    """`vae_config` (default `VAEConfig()`) with CUDA-graph decode from the second decode of a shape
    (`cuda_graph=True, cuda_graph_capture_call=2`): a pipeline decodes once per call, so a size used
    once never pays the capture nor holds graph memory, and a served size replays from its second call.
    A config with `cuda_graph` already on is kept; None for a VAE already routed keeps its config."""
    if vae_config is None:
        if vae.__dict__.get(_ROUTED) is not None:
            return None
        vae_config = VAEConfig()
    if not isinstance(vae_config, VAEConfig):
        return vae_config  # route_vae_decode refuses it, in one line
    return vae_config if vae_config.cuda_graph else vae_config.replace(cuda_graph=True, cuda_graph_capture_call=2)


def route_vae_decode(vae: nn.Module, vae_config: VAEConfig | None = None, encode: bool = False) -> nn.Module:
    """Route `vae.decode` (a diffusers VAE of `VAE_CLASSES`) to qwenfast's VAE of the same design,
    sharing its parameters; with `encode=True` also `vae.encode` (a Qwen-Image / Wan 2.1 VAE: its
    posterior, in diffusers' `AutoencoderKLOutput`). Only this object changes (instance attributes
    shadow the class's methods)."""
    if vae_config is not None and not isinstance(vae_config, VAEConfig):
        raise TypeError(f"vae_config must be a qwenfast.VAEConfig or None; got {type(vae_config).__name__}")
    ours = vae.__dict__.get(_ROUTED)
    cls = qwenfast_vae_class(vae) if ours is None else type(ours)
    if encode and not hasattr(cls, "encode_moments"):  # refused before anything changes
        raise TypeError(f"qwenfast's {cls.__name__} has no posterior encode to route a diffusers "
                        f"{type(vae).__name__}.encode to")
    if ours is None:
        ours = _share_parameters(cls.from_diffusers(vae, vae_config=vae_config), vae)
        object.__setattr__(vae, _ROUTED, ours)  # not a submodule: the state dict stays diffusers'
        object.__setattr__(vae, "decode", _routed_decode(vae))
    elif vae_config is not None:
        ours.vae_config = vae_config
    if encode and "encode" not in vae.__dict__:
        object.__setattr__(vae, "encode", _routed_encode(vae))
    return vae


def qwenfast_vae_class(vae: nn.Module) -> type:
    """qwenfast's VAE class for a diffusers VAE, by the diffusers class's name (a subclass counts),
    imported on use. Raises TypeError for a VAE qwenfast has no model of, ImportError (naming the
    module) where that model is not in this installation."""
    import importlib

    for cls in type(vae).__mro__:
        if cls.__name__ in VAE_CLASSES:
            module, name = VAE_CLASSES[cls.__name__]
            try:
                return getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError) as e:
                raise ImportError(f"decoding a diffusers {cls.__name__} needs qwenfast's {module}.{name}, which "
                                  f"this installation lacks ({e})") from None
    raise TypeError(f"qwenfast has no VAE for a diffusers {type(vae).__name__}; it decodes {', '.join(VAE_CLASSES)}")


def qwenfast_vae(vae: nn.Module):
    """qwenfast's VAE behind a routed diffusers VAE (`pipe.vae`), re-tied to its parameters if
    `.to()` or an offload hook has moved them since; None if `vae` is not routed."""
    ours = vae.__dict__.get(_ROUTED)
    if ours is None:
        return None
    theirs = dict(vae.named_parameters())
    if any(p is not theirs[n] for n, p in ours.named_parameters()):
        # Some hook replaced diffusers' Parameter objects (accelerate's sequential offload does):
        # rebuild over the new ones (no copy, no init).
        ours = _share_parameters(type(ours).from_diffusers(vae, vae_config=ours.vae_config), vae)
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


@contextlib.contextmanager
def _running(vae: nn.Module):
    """qwenfast's VAE behind `vae` for one call: moved in first by model CPU offload's hook (if any),
    as diffusers' `apply_forward_hook` does, and with diffusers' `enable_tiling()` honoured."""
    hook = getattr(vae, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(vae)
    ours = qwenfast_vae(vae)
    config = ours.vae_config
    ours.vae_config = _effective_config(vae, config)
    try:
        yield ours
    finally:
        ours.vae_config = config


def _routed_decode(vae: nn.Module):
    from diffusers.models.autoencoders.vae import DecoderOutput

    def decode(z: torch.Tensor, return_dict: bool = True) -> Any:
        """diffusers' `decode(z, return_dict)` on qwenfast's VAE (see qwenfast.integrations.diffusers)."""
        with _running(vae) as ours:
            sample = ours.decode(z)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    return decode


def _routed_encode(vae: nn.Module):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.models.modeling_outputs import AutoencoderKLOutput

    def encode(x: torch.Tensor, return_dict: bool = True) -> Any:
        """diffusers' `encode(x, return_dict)` on qwenfast's VAE: diffusers' own
        `DiagonalGaussianDistribution` (its logvar clamp, `mode()`, `sample(generator)`) over the
        moments qwenfast's VAE computes; blended tiles when tiling is asked for, as diffusers' encode."""
        with _running(vae) as ours:
            posterior = DiagonalGaussianDistribution(ours.encode_moments(x))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    return encode


def decode_packed_latents(vae: nn.Module, latents: torch.Tensor, height: int, width: int) -> torch.Tensor | None:
    """The pipelines' last step, for a caller that asked for `output_type="latent"`: packed latents →
    unpacked, de-normalised by the VAE's latents_mean/std → decoded image `[B, C, height, width]` in
    [-1, 1] (None on ranks that get no output of a parallel decode). Qwen-Image: `[B, (h/2)(w/2),
    4·z_dim]` (2x2 packing), RGB. Qwen-Image-2.1 (`AutoencoderKLQwenImage21`): `[B, h·w, z_dim]`
    (unpatched, 16x), RGBA. (Wan latents are not packed: `vae.decode(latents * std + mean)`.)"""
    if any(c.__name__ == "AutoencoderKLWan" for c in type(vae).__mro__):
        raise TypeError(f"decode_packed_latents: a Wan pipeline's latents {tuple(latents.shape)} are not packed; "
                        "decode them with pipe.vae.decode(latents * std + mean) (latents_std/mean of pipe.vae.config)")
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1)
    if any(c.__name__ == "AutoencoderKLQwenImage21" for c in type(vae).__mro__):
        from diffusers import QwenImage21Pipeline  # diffusers >= 0.42

        z = QwenImage21Pipeline._unpack_latents(latents, height, width, 16).to(vae.dtype)  # (B, z, 1, h, w)
        z = z * std.to(z.device, z.dtype) + mean.to(z.device, z.dtype)  # the pipeline's two roundings
    else:
        from diffusers import QwenImagePipeline

        scale = 2 ** len(vae.temperal_downsample)
        z = QwenImagePipeline._unpack_latents(latents, height, width, scale).to(vae.dtype)  # (B, z, 1, h, w)
        z = z / (1.0 / std.to(z.device, z.dtype)) + mean.to(z.device, z.dtype)  # the pipeline's roundings
    image = vae.decode(z, return_dict=False)[0]
    return None if image is None else image[:, :, 0]
