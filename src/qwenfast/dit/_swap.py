"""Switching diffusers modules to their fused forward in place, and back, by their `__class__`.

A fused class is the diffusers class with a mixin in front that overrides `forward` and adds no state:
the module keeps its parameters, buffers, hooks and place in the tree, so the state dict, LoRA
loading and `save_pretrained` are untouched. diffusers' own classes map to named fused classes
(importable, so a pickled model loads); a user's subclass gets a fused subclass of its own, which
keeps its overrides. Shared by every DiT family in this package.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from diffusers.utils.torch_utils import maybe_allow_in_graph

# diffusers finds blocks by class name: `compile_repeated_blocks()` (regional torch.compile) by
# `_repeated_blocks`, device maps by `_no_split_modules`. Both are extended on the instance with the
# fused class names while fused, so that both keep working.
BLOCK_NAME_LISTS = ("_repeated_blocks", "_no_split_modules")


class Fusion:
    """Swaps modules between diffusers classes and their fused subclasses (`mixin` in front)."""

    def __init__(self, mixin: type, named: dict[type, type]):
        self.mixin = mixin
        self._fused: dict[type, type] = dict(named)  # diffusers class -> fused class

    def fused_class(self, cls: type) -> type:
        fused = self._fused.get(cls)
        if fused is None:
            fused = maybe_allow_in_graph(type(f"Fused{cls.__name__}", (self.mixin, cls), {"__module__": self.mixin.__module__}))
            self._fused[cls] = fused
        return fused

    def fuse(self, module: nn.Module) -> None:
        if not isinstance(module, self.mixin):
            module.__class__ = self.fused_class(type(module))

    def unfuse(self, module: nn.Module) -> None:
        if isinstance(module, self.mixin):
            module.__class__ = next(c for c in type(module).__mro__[1:] if not issubclass(c, self.mixin))


def name_fused_blocks(model: nn.Module, blocks: Iterable[nn.Module], mixin: type) -> None:
    """Add the fused block classes' names to the model's block-name lists (on the instance)."""
    fused = sorted({type(b).__name__ for b in blocks if isinstance(b, mixin)})
    for attr in BLOCK_NAME_LISTS:
        names = list(getattr(type(model), attr, None) or [])
        setattr(model, attr, names + [n for n in fused if n not in names])


def restore_block_names(model: nn.Module) -> None:
    """Back to the class's own block-name lists."""
    for attr in BLOCK_NAME_LISTS:
        model.__dict__.pop(attr, None)


def unwrap(transformer: nn.Module) -> nn.Module:
    """The module itself behind torch.compile's wrapper (OptimizedModule): its blocks live there."""
    return getattr(transformer, "_orig_mod", transformer)
