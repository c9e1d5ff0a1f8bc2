"""qwenfast: fast Qwen-Image inference on one GPU and on many.

Public API:
    VAEConfig      runtime options of decoding (tiling, parallel decode) and their CLI flags
    QwenImageVAE   the Qwen-Image VAE, weight-compatible with diffusers' AutoencoderKLQwenImage
    QwenImage21VAE the Qwen-Image-2.1 VAE, weight-compatible with diffusers' AutoencoderKLQwenImage21
"""

from __future__ import annotations

from .config import VAEConfig

__version__ = "0.1.0"
__all__ = ["VAEConfig", "QwenImageVAE", "QwenImage21VAE", "__version__"]


def __getattr__(name: str):
    # Imported lazily: `import qwenfast` (and `qwenfast --help`) stays fast and light.
    if name in ("QwenImageVAE", "QwenImage21VAE"):
        from . import vae

        return getattr(vae, name)
    raise AttributeError(f"module 'qwenfast' has no attribute {name!r}")
