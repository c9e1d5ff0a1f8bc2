"""Single-device VAE model code (no torch.distributed here)."""

from .qwen_image import FrameCache, QwenImageVAE

__all__ = ["QwenImageVAE", "FrameCache"]
