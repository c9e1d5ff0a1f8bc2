"""`patch_halo="level"`: the local part over horizontal bands, exchanging halo rows with the two
neighbours at the start of each resolution level instead of decoding a full margin.

With `mid`, a band decodes its rows plus the whole receptive field (13 latent px) each side: at
4096² on 8 ranks, 90 rows for 64. Here the margin at each level is only what that level's convs
reach (7 rows at its own resolution for Qwen-Image: 7, 3.5, 1.75, 0.875 latent rows), fetched from
the neighbours' freshly computed rows: ~1.07x the work for 3 messages per neighbour per frame.

Level i runs up block i (and, last, the head) on its core rows plus a halo of `H_i` rows each side
(none at the image border, where the conv's zero padding is the true border), then crops to the core
at the new resolution. Level 0's halo comes from the attention output every rank already holds (no
message). Each exchange is preceded by a stage sync, so a failing rank fails every rank.
"""

from __future__ import annotations

import torch

from ..vae.surface import cat_keeping_layout
from . import plan
from .attention import tail_on_region

__all__ = ["decode_band_with_level_halos", "exchange_rows"]


def decode_band_with_level_halos(vae, x: torch.Tensor, band: plan.Tile, height: int, comm,
                                 halos: list[tuple[int, int]], cfg=None) -> torch.Tensor:
    """The attention output `x` (B, C, T, h, w) → this rank's band of pixels (B, C_out, T', s·rows, s·w).

    Every rank of `comm` holds one band (rank order = top to bottom); `halos` from
    `vae.topology.level_halos()`. The levels run through `vae.decode_levels` (each alone, in row bands
    where the model bands its local part: `vae.level_plan`) inside one `vae.stream`.
    The mid block's tail runs through `vae.run_graphed` (a CUDA graph with `cfg.cuda_graph`); the levels
    run eagerly: an exchange sits between every two of them, inside the stream's frame loop.
    """
    levels = vae.topology.levels
    first = halos[0][1]
    y0, y1 = max(0, band.y0 - first), min(height, band.y1 + first)
    reach = vae.topology.tail_reach()
    need = plan.Tile(y0, y1, band.x0, band.x1, max(0, y0 - reach), min(height, y1 + reach), band.x0, band.x1)
    with comm.guard("mid tail"):
        h0 = vae.run_graphed(lambda x: tail_on_region(vae, x, need), x,  # (B, C, T, rows + halo, w): the mid-block output
                             context=("mid tail", comm.rank, comm.world_size, need), cfg=cfg, kind="segment")
    above, below = comm.rank > 0, comm.rank < comm.world_size - 1

    def fn(chunk: torch.Tensor, cache) -> torch.Tensor:
        x, top = vae.frame_layout(chunk), band.y0 - y0  # rows of halo above the core, at the current scale
        for i, level in enumerate(levels):
            scale, rows = halos[i]
            if i > 0:  # every rank synced at the end of the previous level's guard
                x = exchange_rows(x, rows if above else 0, rows if below else 0, comm)
                top = rows if above else 0
            with comm.guard(f"level {i}"):
                core = (band.y1 - band.y0) * scale
                rows_in = x.shape[-2]
                x = vae.decode_levels(x, plan=vae.level_plan(i, x, cache), cache=cache)  # banded where it pays
                grow = x.shape[-2] // rows_in  # 2 after an upsample; x p after a final unpatchify (2.1 VAE)
                x = x[..., top * grow:(top + core) * grow, :]  # the core at the new resolution
        return x.contiguous()

    return vae.stream(fn, h0, desc="decode (local, level halos)")


def exchange_rows(x: torch.Tensor, n_above: int, n_below: int, comm) -> torch.Tensor:
    """`x` (…, rows, w), this rank's core rows → cat(the rank above's last `n_above` rows, x, the rank
    below's first `n_below` rows); this rank sends the matching rows to its neighbours."""
    if comm.world_size == 1:
        return x
    above, below = comm.exchange_with_neighbours(
        x[..., :n_above, :] if n_above else None, x[..., x.shape[-2] - n_below:, :] if n_below else None,
        (*x.shape[:-2], n_above, x.shape[-1]), (*x.shape[:-2], n_below, x.shape[-1]))
    parts = ([above] if n_above else []) + [x] + ([below] if n_below else [])
    return cat_keeping_layout(parts, -2, like=x)  # torch.cat would hand the next level an NCHW tensor
