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

from typing import Any, NamedTuple

import torch
from torch import nn

from diffusers.models.transformers.transformer_qwenimage import (
    QwenImageTransformer2DModel,
    QwenImageTransformerBlock,
)
from diffusers.utils.torch_utils import maybe_allow_in_graph

from ..ops import gated_residual, layer_norm_modulate, residual_layer_norm_modulate
from ._swap import Fusion, name_fused_blocks, restore_block_names, unwrap

__all__ = ["FusedQwenImageTransformerBlock", "fuse_modulation", "unfuse_modulation", "is_fused"]


class Modulation(NamedTuple):
    """One (shift, scale, gate) triple as `[B, D]` rows; the `*1` rows are the second parameter set
    (edit models with `zero_cond_t`: the t = 0 rows, picked by tokens whose index is non-zero) or
    None when every token takes set 0."""

    shift0: torch.Tensor
    scale0: torch.Tensor
    gate0: torch.Tensor
    shift1: torch.Tensor | None = None
    scale1: torch.Tensor | None = None
    gate1: torch.Tensor | None = None


class Gate(NamedTuple):
    """A gate kept as its `[B, D]` rows (and the second set's rows, or None) for a later gated add."""

    gate0: torch.Tensor
    gate1: torch.Tensor | None = None


def split_modulation(mod_params: torch.Tensor, index: torch.Tensor | None) -> Modulation:
    """`[B', 3D]` parameters (a chunk of the block's `[B', 6D]` `*_mod` output) into row views.

    Order shift, scale, gate, as diffusers chunks them. Without `index` every row is set 0
    (B' = B). With `index` (`[B, L]`) the edit models' layout: B' = 2B, rows `[:B]` set 0 (the real
    timestep), rows `[B:]` set 1 (t = 0). No copy: every tensor is a view with last-dim stride 1."""
    if mod_params.dim() != 2 or mod_params.shape[-1] % 3:
        raise ValueError(f"mod_params must be [B, 3*D]; got shape {tuple(mod_params.shape)}")
    shift, scale, gate = mod_params.chunk(3, dim=-1)  # each (B', D)
    if index is None:
        return Modulation(shift, scale, gate)
    if index.dim() != 2:
        raise ValueError(f"modulate_index must be [B, L]; got shape {tuple(index.shape)}")
    b = index.shape[0]
    if mod_params.shape[0] != 2 * b:
        raise ValueError(
            f"with modulate_index of batch {b} (shape {tuple(index.shape)}) the modulation parameters "
            f"must have 2*{b} rows (zero_cond_t: real timestep, then t=0); got {mod_params.shape[0]}"
        )
    return Modulation(shift[:b], scale[:b], gate[:b], shift[b:], scale[b:], gate[b:])


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
        residual_gate: Gate | None = None,
    ):
        """`norm` + modulation of one stream in one pass.

        x: `[B, L, D]`, the stream itself; or with `is_scale_residual`, the attention output that is
        first added to `residual` (`[B, L, D]`) through `residual_gate` (the previous modulation's
        gate rows). mod_params: `[B', 3D]`; index: `[B, L]` or None (see `split_modulation`).

        Returns `(y, gate)`, or `(y, residual_out, gate)` with `is_scale_residual`: y `[B, L, D]`
        in x's dtype, residual_out the stored sum (the block's new hidden state), gate a `Gate` of
        rows for the next gated add: no `[B, L, D]` gate is written."""
        mod = split_modulation(mod_params, index)
        if mod.shift1 is None:
            index = None  # one parameter set: the plain op
        if is_scale_residual:
            if residual is None or residual_gate is None:
                raise ValueError("is_scale_residual=True needs `residual` and `residual_gate`")
            y, residual_out = residual_layer_norm_modulate(
                x, residual, residual_gate.gate0, norm.weight, norm.bias,
                mod.scale0, mod.shift0, residual_gate.gate1, mod.scale1, mod.shift1, index, norm.eps,
            )
            return y, residual_out, Gate(mod.gate0, mod.gate1)
        y = layer_norm_modulate(x, norm.weight, norm.bias, mod.scale0, mod.shift0, mod.scale1, mod.shift1, index, norm.eps)
        return y, Gate(mod.gate0, mod.gate1)

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
        img_index = modulate_index if img_gate2.gate1 is not None else None
        hidden_states = gated_residual(self.img_mlp(img_modulated2), hidden_states, img_gate2.gate0, img_gate2.gate1, img_index)
        encoder_hidden_states = gated_residual(self.txt_mlp(txt_modulated2), encoder_hidden_states, txt_gate2.gate0)

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
