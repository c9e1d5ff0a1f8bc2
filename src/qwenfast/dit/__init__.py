"""Fused DiT blocks: `fuse_modulation(transformer)` switches a diffusers `QwenImageTransformer2DModel`
(`qwen_image`) or `QwenImage21Transformer2DModel` (`qwen_image21`) to qwenfast's fused modulation ops
in place; `unfuse_modulation` switches back; `is_fused` says which it runs."""

from __future__ import annotations

import importlib
from types import ModuleType

from torch import nn

from .qwen_image import FusedQwenImageTransformerBlock

__all__ = ["FusedQwenImageTransformerBlock", "FusedQwenImage21TransformerBlock", "fuse_modulation", "is_fused",
           "unfuse_modulation"]

# The transformer class (by name: older diffusers have no 2.1 model) -> the module that fuses it.
_FAMILIES = {"QwenImageTransformer2DModel": "qwen_image", "QwenImage21Transformer2DModel": "qwen_image21"}


def _family(transformer: nn.Module) -> ModuleType:
    model = getattr(transformer, "_orig_mod", transformer)  # through torch.compile's wrapper
    for cls in type(model).__mro__:
        if cls.__name__ in _FAMILIES:
            return importlib.import_module(f"{__name__}.{_FAMILIES[cls.__name__]}")
    raise TypeError(f"expected a diffusers {' or '.join(_FAMILIES)}, got {type(model).__module__}.{type(model).__name__}")


def fuse_modulation(transformer: nn.Module) -> nn.Module:
    """Run the transformer's modulation on the fused ops, in place (see the family's module). Returns it."""
    return _family(transformer).fuse_modulation(transformer)


def unfuse_modulation(transformer: nn.Module) -> nn.Module:
    """Undo `fuse_modulation`. Returns `transformer`."""
    return _family(transformer).unfuse_modulation(transformer)


def is_fused(transformer: nn.Module) -> bool:
    """True when every block of `transformer` runs the fused forward."""
    return _family(transformer).is_fused(transformer)


def __getattr__(name: str):
    if name == "FusedQwenImage21TransformerBlock":  # imported on use: needs diffusers >= 0.42
        from .qwen_image21 import FusedQwenImage21TransformerBlock

        return FusedQwenImage21TransformerBlock
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
