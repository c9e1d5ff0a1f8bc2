"""`parallel_decode_mode="patch"`: one region per rank, exact.

Uneven horizontal bands (a 2-D grid when bands would be thinner than the margin). Neighbour data by
`VAEConfig.patch_halo` (`auto`, the default: `level` for video and, from the model's
`patch_level_image_world` ranks on, for images; `mid` otherwise; `plan.choose_patch_halo`): `mid`
decodes each region with the full margin (the receptive field) once at the mid-block output, no
messages until the gather (`tiled.exact_decode_over_ranks` with one tile per rank); `level` exchanges
halo rows with the two neighbours at the start of each resolution level (`halo.py`), falling back to
`mid` when bands are too thin for the level halos.
"""

from __future__ import annotations

import torch

from ..config import VAEConfig
from ..vae import tiling
from . import halo, plan
from .attention import split_attention
from .gather import gather_pieces
from .tiled import exact_decode_over_ranks, piece_shapes

__all__ = ["parallel_patch_decode", "level_decode_over_ranks"]


def parallel_patch_decode(vae, z: torch.Tensor, comm, cfg: VAEConfig) -> torch.Tensor | None:
    """One region per rank, each decoded with a margin >= the receptive field (`mid`) or with halo rows
    exchanged per level (`level`): equal to the untiled decode."""
    regions = plan.patch_regions(z.shape[-2], z.shape[-1], comm.world_size, tiling.tile_margin(vae, cfg))
    tiles = [r for r in regions if r is not None]
    assignment = [[r] if r < len(tiles) else [] for r in range(comm.world_size)]
    # "auto": level for video, and for images on enough ranks where the model says so
    if plan.choose_patch_halo(z.shape[2], cfg.patch_halo, world=comm.world_size,
                              image_level_world=vae.patch_level_image_world) == "level":
        halos = vae.topology.level_halos()
        bands = plan.level_bands(z.shape[-2], z.shape[-1], comm.world_size, halos)
        if bands is not None:
            return level_decode_over_ranks(vae, z, comm, cfg, bands, halos)
    # `mid` (or bands too thin for the level halos): the full margin, once, at the mid output
    return exact_decode_over_ranks(vae, z, comm, cfg, tiles, assignment)


def level_decode_over_ranks(vae, z: torch.Tensor, comm, cfg: VAEConfig, bands: list[plan.Tile],
                            halos: list[tuple[int, int]]) -> torch.Tensor | None:
    """`patch` with `patch_halo="level"`: one band per rank, halo rows exchanged at each level."""
    x = split_attention(vae, z, comm, cfg)  # (B, C_mid, T, h, w) on every rank
    core = halo.decode_band_with_level_halos(vae, x, bands[comm.rank], z.shape[-2], comm, halos, cfg)
    del x
    shapes = piece_shapes(vae, z, [(b.y0, b.y1, b.x0, b.x1) for b in bands])
    assignment = [[r] for r in range(comm.world_size)]
    cores = gather_pieces([core], assignment, shapes, z, comm, cfg.parallel_output)
    return None if cores is None else tiling.place_cores(vae, cores, bands, z)
