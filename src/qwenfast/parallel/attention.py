"""The global part of the decoder split over ranks: each rank's share of the attention's queries.

The mid block is ResBlock → attention over all h·w latent pixels of a frame → ResBlock. The convs run
at latent resolution and are cheap next to the up blocks (about 3 of the ~175 TFLOP of a 4096² decode),
so every rank runs `vae.decode_head` on the whole latent: no halo, no message. The attention is the one
cost that must not be replicated (106 TFLOP at 4096²): each rank runs `vae.attend(a, queries=(n0, n1))`
for its share of the tokens only, against keys and values of all tokens (projected locally from the
replicated input: a small matmul instead of a message), and the attention block's output is
all-gathered. The last ResBlock (`vae.decode_tail`, reach `topology.tail_convs` px) then runs only on
the box a rank's tiles need (`tail_on_region`).

Frames stream stage by stage (all frames through the head, then the attention of all frames, then the
tail), each stage with its own frame cache: the same numbers as the single-device frame-by-frame order,
with one gather per decode instead of one per frame.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import plan

__all__ = ["split_attention", "tail_on_region"]


def split_attention(vae, z: torch.Tensor, comm, cfg=None) -> torch.Tensor:
    """Latent `z` (B, z, T, h, w), the same on every rank → the attention block's output
    (B, C_mid, T, h, w) on every rank, each rank having computed the queries of its share of tokens.
    The share (everything before the all-gather) runs through `vae.run_graphed` (a CUDA graph with
    `cfg.cuda_graph`; `cfg` defaults to `vae.vae_config`)."""
    b, t, (h, w) = z.shape[0], z.shape[2], z.shape[-2:]
    shares = plan.split_evenly(h * w, comm.world_size)
    (n0, n1), most = shares[comm.rank], max(m1 - m0 for m0, m1 in shares)

    def share(z: torch.Tensor) -> torch.Tensor:  # no collective in here: it may be a CUDA graph
        o = vae.attend(vae.decode_head(z), queries=(n0, n1))  # (B, T, n, C): this rank's token rows
        return F.pad(o, (0, 0, 0, most - (n1 - n0))).reshape(-1)  # (B·T·most·C,): equal size on every rank

    with comm.guard("global part"):
        buf = vae.run_graphed(share, z, context=("global part", comm.rank, comm.world_size), cfg=cfg, kind="segment")
    c = buf.numel() // (b * t * most)
    parts = comm.all_gather(buf)
    o = torch.cat([p.view(b, t, most, c)[:, :, :m1 - m0] for p, (m0, m1) in zip(parts, shares)], dim=2)  # (B, T, N, C)
    return o.permute(0, 3, 1, 2).unflatten(3, (h, w))  # (B, C, T, h, w)


def tail_on_region(vae, x: torch.Tensor, need: plan.Tile) -> torch.Tensor:
    """The mid block's last ResBlock on the attention output `x` (B, C, T, h, w), exact on `need`'s
    core box: computed on its window (core + the tail's reach, clipped) with its own frame cache, then
    cropped → (B, C, T, core_h, core_w)."""
    y = vae.decode_tail(x[..., need.wy0:need.wy1, need.wx0:need.wx1])
    return y[..., need.y0 - need.wy0:need.y1 - need.wy0, need.x0 - need.wx0:need.x1 - need.wx0]
