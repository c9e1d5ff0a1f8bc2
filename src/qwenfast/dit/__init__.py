"""Fused Qwen-Image DiT blocks: `fuse_modulation(transformer)` switches a diffusers
`QwenImageTransformer2DModel` to qwenfast's fused modulation ops in place."""

from .qwen_image import FusedQwenImageTransformerBlock, fuse_modulation, is_fused, unfuse_modulation

__all__ = ["FusedQwenImageTransformerBlock", "fuse_modulation", "is_fused", "unfuse_modulation"]
