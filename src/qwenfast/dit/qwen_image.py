"""The Qwen-Image DiT block with its modulation on qwenfast's fused ops.

A diffusers `QwenImageTransformerBlock` normalises and modulates each stream twice per block, as
separate passes over `[B, L, D]` tensors, and materialises a `[B, L, D]` gate (a `torch.where` per
parameter on the edit models' image stream) for each gated residual add:

    x̂ = LayerNorm(x);  y = x̂·(1 + scale) + shift;  gate        # norm1 + modulation
    h = h + gate1 · attn(y)                                      # gated residual after attention
    x̂ = LayerNorm(h);  y = x̂·(1 + scale) + shift;  gate        # norm2 + modulation
    h = h + gate2 · mlp(y)                                       # gated residual after the MLP

Here the first line is one pass (`layer_norm_modulate`), the second and third are one pass
(`residual_layer_norm_modulate`: add, store, normalise, modulate), the last is one pass
(`gated_residual`). Gates travel as their `[B, D]` rows (two sets and the token index on the edit
models), never as a `[B, L, D]` tensor.

`fuse_modulation(transformer)` switches every block of a loaded diffusers transformer to this
forward in place: same parameters, same module tree and state-dict keys (so `save_pretrained`,
`load_state_dict` and LoRA loading keep working); `unfuse_modulation` switches back.

Not fused across blocks: the MLP's gated add could be folded into the next block's norm1 (one
`residual_layer_norm_modulate` instead of `gated_residual` + `layer_norm_modulate`). That saves one
read and one write of `[B, L, D]` per stream per block (about 14 µs of a 5 ms block at 1328² on an
H100) but needs the transformer's own forward loop replaced, which is where diffusers hangs its
controlnet residuals, caches and context-parallel hooks. Not worth owning that loop for 0.3%.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffusers.models.transformers.transformer_qwenimage import (
    QwenImageTransformer2DModel,
    QwenImageTransformerBlock,
)
from diffusers.utils.torch_utils import maybe_allow_in_graph

from ..ops import Modulation, Select, gated_residual, layer_norm_modulate, residual_layer_norm_modulate
from ._swap import Fusion, name_fused_blocks, restore_block_names, unwrap

__all__ = ["FusedQwenImageTransformerBlock", "fuse_modulation", "unfuse_modulation", "is_fused"]


def split_modulation(mod_params: torch.Tensor, index: torch.Tensor | None) -> Modulation | Select:
    """`[B', 3D]` parameters (a chunk of the block's `[B', 6D]` `*_mod` output) as the fused ops take them.

    Order shift, scale, gate, as diffusers chunks them. Without `index` every row is set 0
    (B' = B): a `Modulation`. With `index` (`[B, L]`) the edit models' layout: B' = 2B, rows `[:B]`
    set 0 (the real timestep), rows `[B:]` set 1 (t = 0): a `Select`. No copy: every tensor is a
    `[B, D]` row view with last-dim stride 1."""
    if mod_params.dim() != 2 or mod_params.shape[-1] % 3:
        raise ValueError(f"mod_params must be [B, 3*D]; got shape {tuple(mod_params.shape)}")
    shift, scale, gate = mod_params.chunk(3, dim=-1)  # each (B', D)
    if index is None:
        return Modulation(scale, shift, gate)
    if index.dim() != 2:
        raise ValueError(f"modulate_index must be [B, L]; got shape {tuple(index.shape)}")
    b = index.shape[0]
    if mod_params.shape[0] != 2 * b:
        raise ValueError(
            f"with modulate_index of batch {b} (shape {tuple(index.shape)}) the modulation parameters "
            f"must have 2*{b} rows (zero_cond_t: real timestep, then t=0); got {mod_params.shape[0]}"
        )
    return Select(Modulation(scale[:b], shift[:b], gate[:b]), Modulation(scale[b:], shift[b:], gate[b:]), index)


class FusedModulationMixin:
    """The block forward on the fused ops. Mixed in front of a `QwenImageTransformerBlock` class;
    adds no state, so an existing block switches by its `__class__`."""

    def _modulate(
        self,
        x: torch.Tensor,
        mod_params: torch.Tensor,
        index: torch.Tensor | None = None,
        *,
        norm: nn.LayerNorm,
        is_scale_residual: bool = False,
        residual: torch.Tensor | None = None,
        residual_gate: Modulation | Select | None = None,
    ):
        """`norm` + modulation of one stream in one pass.

        x: `[B, L, D]`, the stream itself; or with `is_scale_residual`, the attention output that is
        first added to `residual` (`[B, L, D]`) through `residual_gate` (the previous modulation,
        whose gate rows are used). mod_params: `[B', 3D]`; index: `[B, L]` or None (see
        `split_modulation`).

        Returns `(y, mod)`, or `(y, residual_out, mod)` with `is_scale_residual`: y `[B, L, D]` in x's
        dtype, residual_out the stored sum (the block's new hidden state), mod this modulation's
        parameters, whose gate rows serve the next gated add: no `[B, L, D]` gate is written."""
        mod = split_modulation(mod_params, index)
        affine = dict(weight=norm.weight, bias=norm.bias, eps=norm.eps)
        if is_scale_residual:
            if residual is None or residual_gate is None:
                raise ValueError("is_scale_residual=True needs `residual` and `residual_gate`")
            y, residual_out = residual_layer_norm_modulate(x, residual, residual_gate, mod, **affine)
            return y, residual_out, mod
        return layer_norm_modulate(x, mod, **affine), mod

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, L_img, D)
        encoder_hidden_states: torch.Tensor,  # (B, L_txt, D)
        encoder_hidden_states_mask: torch.Tensor,
        temb: torch.Tensor,  # (B, D), or (2B, D) with zero_cond_t
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        modulate_index: torch.Tensor | None = None,  # (B, L_img) int, zero_cond_t only
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The same math as diffusers' block, stream by stream; only the elementwise passes change.
        img_mod1, img_mod2 = self.img_mod(temb).chunk(2, dim=-1)  # each (B', 3D)
        if getattr(self, "zero_cond_t", False):
            temb = torch.chunk(temb, 2, dim=0)[0]  # the text stream takes the real timestep only
        txt_mod1, txt_mod2 = self.txt_mod(temb).chunk(2, dim=-1)  # each (B, 3D)

        img_modulated, img_gate1 = self._modulate(hidden_states, img_mod1, modulate_index, norm=self.img_norm1)
        txt_modulated, txt_gate1 = self._modulate(encoder_hidden_states, txt_mod1, norm=self.txt_norm1)

        img_attn_output, txt_attn_output = self.attn(
            hidden_states=img_modulated,
            encoder_hidden_states=txt_modulated,
            encoder_hidden_states_mask=encoder_hidden_states_mask,
            image_rotary_emb=image_rotary_emb,
            **(joint_attention_kwargs or {}),
        )

        # Gated add after attention, then norm2 + modulation: one pass per stream.
        img_modulated2, hidden_states, img_gate2 = self._modulate(
            img_attn_output, img_mod2, modulate_index, norm=self.img_norm2,
            is_scale_residual=True, residual=hidden_states, residual_gate=img_gate1,
        )
        txt_modulated2, encoder_hidden_states, txt_gate2 = self._modulate(
            txt_attn_output, txt_mod2, norm=self.txt_norm2,
            is_scale_residual=True, residual=encoder_hidden_states, residual_gate=txt_gate1,
        )

        # Gated add after the MLP, gates still as rows.
        hidden_states = gated_residual(self.img_mlp(img_modulated2), hidden_states, img_gate2)
        encoder_hidden_states = gated_residual(self.txt_mlp(txt_modulated2), encoder_hidden_states, txt_gate2)

        if encoder_hidden_states.dtype == torch.float16:  # as diffusers: keep fp16 finite
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states


@maybe_allow_in_graph
class FusedQwenImageTransformerBlock(FusedModulationMixin, QwenImageTransformerBlock):
    """diffusers' `QwenImageTransformerBlock` with its modulation on the fused ops (same parameters)."""


# diffusers' block class -> its fused class (a user's subclass gets a fused subclass of its own).
_FUSION = Fusion(FusedModulationMixin, {QwenImageTransformerBlock: FusedQwenImageTransformerBlock})


def _blocks(transformer: nn.Module) -> list[QwenImageTransformerBlock]:
    model = unwrap(transformer)
    if not isinstance(model, QwenImageTransformer2DModel):
        raise TypeError(
            f"expected a diffusers QwenImageTransformer2DModel, got {type(model).__module__}.{type(model).__name__}"
        )
    blocks = [m for m in model.modules() if isinstance(m, QwenImageTransformerBlock)]
    if not blocks:
        raise ValueError("the transformer has no QwenImageTransformerBlock to fuse")
    return blocks


def is_fused(transformer: nn.Module) -> bool:
    """True when every block of `transformer` runs the fused forward."""
    return all(isinstance(b, FusedModulationMixin) for b in _blocks(transformer))


def fuse_modulation(transformer: nn.Module) -> nn.Module:
    """Run every block's modulation of a diffusers `QwenImageTransformer2DModel` on the fused ops.

    In place, any config (t2i or edit with `zero_cond_t`), any device and dtype: the blocks keep
    their parameters and the module tree is unchanged; only each block's class (its forward and
    `_modulate`) is switched. Idempotent. Returns `transformer`. Call it before `torch.compile`.
    """
    blocks = _blocks(transformer)
    for block in blocks:
        _FUSION.fuse(block)
    name_fused_blocks(unwrap(transformer), blocks, FusedModulationMixin)
    return transformer


def unfuse_modulation(transformer: nn.Module) -> nn.Module:
    """Undo `fuse_modulation`: every block back to its diffusers class. Returns `transformer`."""
    for block in _blocks(transformer):
        _FUSION.unfuse(block)
    restore_block_names(unwrap(transformer))
    return transformer
