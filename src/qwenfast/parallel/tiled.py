"""`parallel_decode_mode="tiled"`: the tiles of single-device tiling spread over ranks, balanced by
cost (longest processing time first), each pixel gathered once. Also the exact-tiles-over-ranks core
that `patch` with `patch_halo="mid"` shares (a patch region is one big tile), and the replicated
decode (`auto`'s choice when a parallel decode would not pay).

Every function takes the model `vae` (a `qwenfast.vae.surface.DecodeSurface`), the latent `z`
(B, z, T, h, w, the same on every rank), a `comm` (qwenfast.parallel.comm) and the `VAEConfig`, and
returns the unclamped output (B, C_out, T', s·h, s·w), or None on a rank that gets no output.
Work that may fail on one rank runs under `comm.guard`, so that every rank raises together.
"""

from __future__ import annotations

import torch

from ..config import VAEConfig
from ..vae import tiling
from . import plan
from .attention import split_attention, tail_on_region
from .gather import gather_pieces

__all__ = ["parallel_tiled_decode", "exact_decode_over_ranks", "blend_decode_over_ranks", "replicated_decode",
           "piece_shapes"]


def parallel_tiled_decode(vae, z: torch.Tensor, comm, cfg: VAEConfig,
                          exact_tile_sample_size: int | None = None) -> torch.Tensor | None:
    """Tiles of the configured flavour (exact, or blend) over ranks: equal to the single-device
    `tiled_decode` of the same flavour. Exact tiles are split further while there are fewer tiles than
    ranks. `exact_tile_sample_size` (output px) forces exact tiles of that size (what `auto` picks)."""
    if cfg.tiling == "blend" and exact_tile_sample_size is None:
        return blend_decode_over_ranks(vae, z, comm, cfg)
    core = (exact_tile_sample_size or cfg.exact_tile_sample_size) // vae.spatial_compression_ratio
    tiles = plan.exact_tiles_for_ranks(z.shape[-2], z.shape[-1], core, tiling.tile_margin(vae, cfg), comm.world_size)
    assignment = plan.balance_lpt([plan.exact_tile_cost(t) for t in tiles], comm.world_size)
    return exact_decode_over_ranks(vae, z, comm, cfg, tiles, assignment)


def piece_shapes(vae, z: torch.Tensor, boxes: list[tuple[int, int, int, int]]) -> list[tuple[int, ...]]:
    """The decoded shape (B, C_out, T', s·rows, s·cols) of each `(y0, y1, x0, x1)` latent box."""
    s = vae.spatial_compression_ratio
    b, c, t = vae.output_shape(z)[:3]
    return [(b, c, t, (y1 - y0) * s, (x1 - x0) * s) for y0, y1, x0, x1 in boxes]


def exact_decode_over_ranks(vae, z: torch.Tensor, comm, cfg: VAEConfig, tiles: list[plan.Tile],
                            assignment: list[list[int]]) -> torch.Tensor | None:
    """Exact tiles with `assignment[rank]` = this rank's tile indices.

    The global part runs split over ranks (`split_attention`); then each rank runs the mid block's
    last ResBlock on the box its tiles need, the local part on its tiles, and the cores are gathered once.
    """
    height, width = z.shape[-2:]
    mine = [tiles[i] for i in assignment[comm.rank]]
    x = split_attention(vae, z, comm, cfg)  # (B, C_mid, T, h, w), after the attention block
    need = plan.bounding_window(mine, vae.topology.tail_reach(), height, width)

    def local(x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # no collective in here: it may be a CUDA graph
        h = tail_on_region(vae, x, need)  # mid-block output on need's core box
        return tuple(tiling.decode_exact_tiles(vae, h, mine, origin=(need.y0, need.x0), cfg=cfg))

    with comm.guard("local part"):
        cores = [] if need is None else list(vae.run_graphed(
            local, x, context=("local part", comm.rank, comm.world_size, tuple(mine)), cfg=cfg, kind="segment"))
        del x
    shapes = piece_shapes(vae, z, [(t.y0, t.y1, t.x0, t.x1) for t in tiles])
    cores = gather_pieces(cores, assignment, shapes, z, comm, cfg.parallel_output)
    return None if cores is None else tiling.place_cores(vae, cores, tiles, z)


def blend_decode_over_ranks(vae, z: torch.Tensor, comm, cfg: VAEConfig) -> torch.Tensor | None:
    """diffusers' blend tiles, each decoded whole on one rank, gathered, merged as on one device."""
    height, width = z.shape[-2:]
    if not tiling.blend_tiling_applies(vae, height, width, cfg):
        return replicated_decode(vae, z, comm, cfg)
    grid, boxes = tiling.blend_boxes(vae, height, width, cfg)
    assignment = plan.balance_lpt([plan.blend_tile_cost(b) for b in boxes], comm.world_size)
    with comm.guard("blend tiles"):
        decoded = [vae.decode_untiled(z[..., y0:y1, x0:x1]) for y0, y1, x0, x1 in (boxes[i] for i in assignment[comm.rank])]
    decoded = gather_pieces(decoded, assignment, piece_shapes(vae, z, boxes), z, comm, cfg.parallel_output)
    return None if decoded is None else tiling.merge_blend_tiles(vae, tiling.as_rows(decoded, grid), height, width, cfg)


def replicated_decode(vae, z: torch.Tensor, comm, cfg: VAEConfig) -> torch.Tensor | None:
    """Every rank that receives output decodes alone (the single-device path); no data moves."""
    out = None
    with comm.guard("replicated decode"):
        if cfg.parallel_output == "all" or comm.rank == 0:
            out = vae.decode_on_one_device(z, cfg)
    return out
