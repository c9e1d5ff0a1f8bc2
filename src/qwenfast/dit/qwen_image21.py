"""The Qwen-Image-2.1 DiT block (and the final norm) with its modulation on qwenfast's fused ops.

A diffusers `QwenImage21TransformerBlock` (0.42.1) is single-stream; per block, from the model's one
shared `modulation` tensor `(B', 4D)` = `[mod1.scale, mod1.gate, mod2.scale, mod2.gate]`:

    y = LayerNorm(h);  y = y * (1 + scale1_sel);  gate1_sel     # img_norm1 + _modulate: (B, L, D) gate
    h = h + tanh(gate1_sel) * attn(y)                            # gated residual after attention
    y = LayerNorm(h);  y = y * (1 + scale2_sel);  gate2_sel     # img_norm2 + _modulate
    h = h + tanh(gate2_sel) * mlp(y)                             # gated residual after the MLP

where `_sel` is a `torch.where` per token between the sample's row and the shared t = 0 row
(`causal_condition`, B' = B + 1, a `(L,)` target mask) or a broadcast of the sample's row (B' = B,
no mask): each parameter becomes a `(B, L, D)` tensor. Here line 1 is one pass (`layer_norm_scale`),
lines 2-3 one pass (`residual_layer_norm_scale`: add, store, normalise, scale), line 4 one pass
(`tanh_gated_residual`), and the parameters stay `Rows` views of the modulation tensor.
`QwenImage21AdaLayerNormContinuous` (the model's `norm_out`, LayerNorm * (1 + scale) with the same
selection) becomes one `layer_norm_scale` too.

`fuse_modulation(transformer)` switches a loaded `QwenImage21Transformer2DModel` to these forwards in
place (same parameters, module tree and state-dict keys); `unfuse_modulation` switches back.

Not fused across blocks: the MLP's gated add of block i and norm1 of block i + 1 (every block reads
the same modulation) could be one `residual_layer_norm_scale`, saving one read and one write of
(B, L, D) per block (~30 µs of ~7 ms at 7145 tokens on an H200), but that means owning the model's
block loop, where diffusers keeps its KV cache, gradient checkpointing and parallel hooks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffusers.models.transformers.transformer_qwenimage21 import (
    QwenImage21AdaLayerNormContinuous,
    QwenImage21Transformer2DModel,
    QwenImage21TransformerBlock,
)
from diffusers.utils.torch_utils import maybe_allow_in_graph

from ..ops import Rows, layer_norm_scale, residual_layer_norm_scale, split_rows, tanh_gated_residual
from ._swap import Fusion, name_fused_blocks, restore_block_names, unwrap

__all__ = [
    "FusedQwenImage21TransformerBlock",
    "FusedQwenImage21AdaLayerNormContinuous",
    "split_modulation",
    "fuse_modulation",
    "unfuse_modulation",
    "is_fused",
]


def split_modulation(modulation: torch.Tensor, target_token_mask: torch.Tensor | None,
                     batch: int) -> tuple[Rows, Rows, Rows, Rows]:
    """The model's `(B', 4D)` modulation as (scale1, gate1, scale2, gate2) `Rows` views (no copy), in
    diffusers' chunk order. B' = batch + 1 with a target mask (causal_condition: the last row is the
    t = 0 row), B' = batch without."""
    rows = batch + (target_token_mask is not None)
    if modulation.dim() != 2 or modulation.shape[0] != rows or modulation.shape[1] % 4:
        with_mask = "with" if target_token_mask is not None else "without"
        raise ValueError(
            f"modulation must be ({rows}, 4*D) for a batch of {batch} {with_mask} a target_token_mask; "
            f"got shape {tuple(modulation.shape)}"
        )
    return tuple(split_rows(p, target_token_mask) for p in modulation.chunk(4, dim=-1))


class FusedBlockMixin:
    """The block forward on the fused ops. Mixed in front of a `QwenImage21TransformerBlock` class;
    adds no state. Same signature (and positional order: gradient checkpointing passes it so)."""

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, L, D): the joint text + image sequence
        modulation: torch.Tensor,  # (B', 4D), shared by every block
        rotary_emb: torch.Tensor | None = None,
        attention_mask: Any | None = None,
        target_token_mask: torch.Tensor | None = None,  # (L,) bool, causal_condition only
        layer_cache: Any | None = None,
        kv_cache_mode: str | None = None,
        cache_write_slice: slice | None = None,
        segments: list[tuple[int, int, bool]] | None = None,
        key_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        scale1, gate1, scale2, gate2 = split_modulation(modulation, target_token_mask, hidden_states.shape[0])
        mask = target_token_mask

        modulated = layer_norm_scale(hidden_states, scale=scale1, target_mask=mask, eps=self.img_norm1.eps)
        attn_output = self.attn(
            hidden_states=modulated,
            attention_mask=attention_mask,
            rotary_emb=rotary_emb,
            layer_cache=layer_cache,
            kv_cache_mode=kv_cache_mode,
            cache_write_slice=cache_write_slice,
            segments=segments,
            key_valid=key_valid,
        )
        # Gated add after attention, then norm2 + scale: one pass.
        modulated2, hidden_states = residual_layer_norm_scale(
            attn_output, hidden_states, gate=gate1, scale=scale2, target_mask=mask, eps=self.img_norm2.eps
        )
        hidden_states = tanh_gated_residual(self.img_mlp(modulated2), hidden_states, gate=gate2, target_mask=mask)

        if hidden_states.dtype == torch.float16:  # as diffusers: keep fp16 finite
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states


class FusedNormOutMixin:
    """`norm_out` (LayerNorm * (1 + scale_sel), the scale from the timestep embedding) in one pass."""

    def forward(self, hidden_states: torch.Tensor, conditioning_embedding: torch.Tensor,
                target_token_mask: torch.Tensor | None = None) -> torch.Tensor:
        scale = self.linear(self.silu(conditioning_embedding).to(hidden_states.dtype))  # (B', D)
        return layer_norm_scale(hidden_states, scale=split_rows(scale, target_token_mask),
                                target_mask=target_token_mask, eps=self.norm.eps)


@maybe_allow_in_graph
class FusedQwenImage21TransformerBlock(FusedBlockMixin, QwenImage21TransformerBlock):
    """diffusers' `QwenImage21TransformerBlock` with its modulation on the fused ops (same parameters)."""


class FusedQwenImage21AdaLayerNormContinuous(FusedNormOutMixin, QwenImage21AdaLayerNormContinuous):
    """diffusers' `QwenImage21AdaLayerNormContinuous` (the final norm) on `layer_norm_scale`."""


_BLOCKS = Fusion(FusedBlockMixin, {QwenImage21TransformerBlock: FusedQwenImage21TransformerBlock})
_NORM_OUT = Fusion(FusedNormOutMixin, {QwenImage21AdaLayerNormContinuous: FusedQwenImage21AdaLayerNormContinuous})


def _parts(transformer: nn.Module) -> tuple[nn.Module, list[nn.Module], list[nn.Module]]:
    """(model, its blocks, its final norms), checked: what the fused forwards assume must hold."""
    model = unwrap(transformer)
    if not isinstance(model, QwenImage21Transformer2DModel):
        raise TypeError(
            f"expected a diffusers QwenImage21Transformer2DModel, got {type(model).__module__}.{type(model).__name__}"
        )
    blocks = [m for m in model.modules() if isinstance(m, QwenImage21TransformerBlock)]
    norms = [m for m in model.modules() if isinstance(m, QwenImage21AdaLayerNormContinuous)]
    if not blocks:
        raise ValueError("the transformer has no QwenImage21TransformerBlock to fuse")
    # The fused ops apply no affine; diffusers' 2.1 norms have none. Refuse a model whose norms do.
    names = {m: n for n, m in model.named_modules()}
    for owner, attrs in [(b, ("img_norm1", "img_norm2")) for b in blocks] + [(n, ("norm",)) for n in norms]:
        for attr in attrs:
            ln = getattr(owner, attr)
            if getattr(ln, "weight", None) is not None or getattr(ln, "bias", None) is not None:
                raise ValueError(f"{names[owner]}.{attr} has an elementwise affine, which the fused 2.1 ops do not apply")
    return model, blocks, norms


def is_fused(transformer: nn.Module) -> bool:
    """True when every block (and the final norm) of `transformer` runs the fused forward."""
    _, blocks, norms = _parts(transformer)
    return all(isinstance(b, FusedBlockMixin) for b in blocks) and all(isinstance(n, FusedNormOutMixin) for n in norms)


def fuse_modulation(transformer: nn.Module) -> nn.Module:
    """Run every block's modulation (and the final norm) of a diffusers `QwenImage21Transformer2DModel`
    on the fused ops. In place, with or without `causal_condition`, any device and dtype, KV cache
    modes unchanged: only the classes (their forwards) switch. Idempotent; returns `transformer`. Call
    it before `torch.compile` / `compile_repeated_blocks`."""
    model, blocks, norms = _parts(transformer)
    for b in blocks:
        _BLOCKS.fuse(b)
    for n in norms:
        _NORM_OUT.fuse(n)
    name_fused_blocks(model, blocks, FusedBlockMixin)
    return transformer


def unfuse_modulation(transformer: nn.Module) -> nn.Module:
    """Undo `fuse_modulation`: every module back to its diffusers class. Returns `transformer`."""
    model, blocks, norms = _parts(transformer)
    for b in blocks:
        _BLOCKS.unfuse(b)
    for n in norms:
        _NORM_OUT.unfuse(n)
    restore_block_names(model)
    return transformer
