"""The global part of the decoder (post_quant_conv, conv_in, mid block) split over ranks.

The mid block is ResBlock → attention over all h·w latent pixels of a frame → ResBlock. The convs run
at latent resolution and are cheap next to the up blocks (about 3 of the ~175 TFLOP of a 4096² decode),
so every rank runs the first part on the whole latent: no halo, no message. The attention is the one
cost that must not be replicated (106 TFLOP at 4096²): each rank projects queries for its share of the
tokens only, against keys and values of all tokens (projected locally from the replicated input: a
small matmul instead of a message), and the attention block's output is all-gathered. The last
ResBlock (2 px of reach) then runs only on the box a rank's tiles need.

Frames stream layer by layer (all frames through the first ResBlock, then the attention of all frames,
then the last ResBlock), each stage with its own frame cache: the same numbers as the single-device
frame-by-frame order, with one gather per decode instead of one per frame.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import plan

__all__ = ["split_attention", "tail_reach", "tail_on_region", "frame_layout"]


def split_attention(vae, z: torch.Tensor, comm) -> torch.Tensor:
    """Latent `z` (B, z, T, h, w), the same on every rank → the attention block's output
    (B, C_mid, T, h, w) on every rank, each rank having computed the queries of its share of tokens."""
    from ..ops.attention import single_head_attention as attention

    decoder = vae.decoder
    block = decoder.mid_block.attentions[0]
    with comm.guard("global part"):
        def head(x, cache):
            return decoder.mid_block.resnets[0](decoder.conv_in(frame_layout(vae, vae.post_quant_conv(x)), cache), cache)

        x = vae._stream(head, z, vae._frame_chunks(z.shape[2]), desc="decode (global)")  # (B, C, T, h, w)
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).flatten(0, 1)  # (B·T, C, h, w)
        del x
        tokens = block.norm(frames).flatten(2).transpose(1, 2)  # (B·T, N, C)
        shares = plan.split_evenly(h * w, comm.world_size)
        n0, n1 = shares[comm.rank]
        weight = block.to_qkv.weight.view(3 * c, c)
        bias = block.to_qkv.bias
        q = F.linear(tokens[:, n0:n1], weight[:c], None if bias is None else bias[:c])  # (B·T, n, C)
        kv = F.linear(tokens, weight[c:], None if bias is None else bias[c:])  # (B·T, N, 2C)
        del tokens
        k, v = kv.split(c, dim=-1)
        o = attention(q, k, v)  # (B·T, n, C)
        del q, k, v, kv
        o = F.linear(o, block.proj.weight.view(c, c), block.proj.bias)
        o = o + frames.flatten(2).transpose(1, 2)[:, n0:n1]  # the block's residual
        del frames
        most = max(n1_ - n0_ for n0_, n1_ in shares)
        buf = F.pad(o, (0, 0, 0, most - (n1 - n0))).reshape(-1)  # (B·T·most·C,): equal size on every rank
    parts = comm.all_gather(buf)
    o = torch.cat([p.view(b * t, most, c)[:, :n1_ - n0_] for p, (n0_, n1_) in zip(parts, shares)], dim=1)
    return o.transpose(1, 2).unflatten(2, (h, w)).unflatten(0, (b, t)).transpose(1, 2)  # (B, C, T, h, w)


def tail_reach(vae) -> int:
    """How far (latent px) the mid block's last ResBlock looks: one pixel per 3x3 conv in it."""
    topology = getattr(vae, "topology", None)  # a model that describes itself (the 2.1 VAE; the surface)
    if topology is not None:
        return topology.tail_convs
    return sum(1 for m in vae.decoder.mid_block.resnets[-1].modules()
               if isinstance(m, nn.Conv3d) and m.kernel_size[-1] == 3)


def tail_on_region(vae, x: torch.Tensor, need: plan.Tile) -> torch.Tensor:
    """The mid block's last ResBlock on the attention output `x` (B, C, T, h, w), exact on `need`'s
    core box: computed on its window (core + `tail_reach`, clipped) with its own frame cache, then
    cropped → (B, C, T, core_h, core_w)."""
    resnet = vae.decoder.mid_block.resnets[-1]
    sub = x[..., need.wy0:need.wy1, need.wx0:need.wx1]
    y = vae._stream(lambda chunk, cache: resnet(frame_layout(vae, chunk), cache), sub, vae._frame_chunks(x.shape[2]),
                    desc="decode (mid)")
    return y[..., need.y0 - need.wy0:need.y1 - need.wy0, need.x0 - need.wx0:need.x1 - need.wx0]


def frame_layout(vae, x: torch.Tensor) -> torch.Tensor:
    """The model's preferred memory layout for a frame (channels-last 4-D on CUDA for the Qwen-Image
    VAE), where it has one."""
    fast = getattr(vae, "_fast_layout", None)
    return x if fast is None else fast(x)
