"""Single-device VAE model code (no torch.distributed here)."""

from .qwen_image import FrameCache, QwenImageVAE
from .qwen_image21 import QwenImage21VAE

__all__ = ["QwenImageVAE", "QwenImage21VAE", "FrameCache"]
