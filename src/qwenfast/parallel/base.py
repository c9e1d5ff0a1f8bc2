"""`ParallelTiledVAE`: the decode strategies of the Wan-2.1 VAE family, over tiles and ranks.

A VAE of this family (the Qwen-Image VAE; the Wan 2.1 VAE) extends this class and provides the hooks
below; the strategies are written once, here. This module imports no torch.distributed: the
multi-rank strategies (tiled.py, patch.py) are imported when a parallel decode is asked for.

Hooks a subclass provides (tensors `(B, C, T, H, W)`; results unclamped):
    vae_config                     a `VAEConfig`
    spatial_compression_ratio      output pixels per latent pixel (8)
    decode_margin                  receptive field of `_decode_local`, in latent pixels
    _decode_untiled(z)             the whole decoder on `z`
    _decode_global(z)              the global part (through the mid block) on the whole latent
    _decode_local(h)               the local part on (a region of) the global part's output
    _encode_untiled(x)             the whole encoder (moments: mean and logvar)
    num_output_frames(t)           frames decoded from `t` latent frames
    _check_latent(z)               validation: (z as (B, z, T, h, w) on the model's device, was-4-D)
Parallel decode also drives the decoder's parts (`post_quant_conv`, `decoder.conv_in`,
`decoder.mid_block`, `decoder.conv_out`) and `_stream(fn, x, chunks)` / `_frame_chunks(t)`, which
run a function over time chunks with a frame cache (see qwenfast.parallel.mid).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn

from . import plan

__all__ = ["ParallelTiledVAE"]


class ParallelTiledVAE(nn.Module):
    # -- single device ------------------------------------------------------------------------------
    def tiled_decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bounded-memory decode of `z` (B, z, T, h, w) in the configured flavour (unclamped)."""
        if self.vae_config.tiling == "exact":
            return self._tiled_decode_exact(z)
        return self._tiled_decode_blend(z)

    def _tile_margin(self) -> int:
        margin = self.vae_config.tile_margin
        return self.decode_margin if margin is None else margin

    def _exact_tiles(self, height: int, width: int, sample_size: int | None = None) -> list[plan.Tile]:
        """Exact tiles of `sample_size` output px (default `vae_config.exact_tile_sample_size`)."""
        core = (sample_size or self.vae_config.exact_tile_sample_size) // self.spatial_compression_ratio
        return plan.exact_tiles(height, width, core, self._tile_margin())

    def _tiled_decode_exact(self, z: torch.Tensor) -> torch.Tensor:
        """The global part once on the whole latent, then the local part tile by tile, each tile with a
        margin >= the receptive field, keeping its core: equal to the untiled decode."""
        h = self._decode_global(z)  # (B, C_mid, T, h, w): latent resolution, small
        tiles = self._exact_tiles(h.shape[-2], h.shape[-1])
        return self._place_cores(self._decode_exact_tiles(h, tiles), tiles, z)

    def _decode_exact_tiles(self, h: torch.Tensor, tiles: list[plan.Tile],
                            origin: tuple[int, int] = (0, 0)) -> list[torch.Tensor]:
        """The local part on each tile's window of the mid-block output `h` (B, C_mid, T, ., .), whose
        pixel [0, 0] is latent pixel `origin`; each tile's core, (B, 3, T', 8·core_h, 8·core_w)."""
        s, (oy, ox) = self.spatial_compression_ratio, origin
        cores = []
        for tile in self._progress(tiles, desc="decode tiles", total=len(tiles)):
            piece = self._decode_local(h[..., tile.wy0 - oy:tile.wy1 - oy, tile.wx0 - ox:tile.wx1 - ox])
            cy, cx = tile.crop_slices(s)
            cores.append(piece[..., cy, cx])
        return cores

    def _place_cores(self, cores: list[torch.Tensor], tiles: list[plan.Tile], z: torch.Tensor) -> torch.Tensor:
        """Tile cores (B, 3, T', ., .) into the output (B, 3, T', 8h, 8w) of latent `z`."""
        out = z.new_empty(self._output_shape(z))
        for tile, core in zip(tiles, cores):
            oy, ox = tile.core_slices(self.spatial_compression_ratio)
            out[..., oy, ox] = core
        return out

    def _output_shape(self, z: torch.Tensor) -> tuple[int, ...]:
        """(B, 3, T', 8h, 8w): the decoded shape of latent `z` (B, z, T, h, w)."""
        s = self.spatial_compression_ratio
        return (z.shape[0], self.decoder.conv_out.out_channels, self.num_output_frames(z.shape[2]),
                z.shape[-2] * s, z.shape[-1] * s)

    def _blend_geometry(self) -> tuple[int, int, int, int]:
        """(tile_h, tile_w, stride_h, stride_w) of blend tiling, in latent pixels."""
        cfg, s = self.vae_config, self.spatial_compression_ratio
        return (cfg.tile_sample_min_height // s, cfg.tile_sample_min_width // s,
                cfg.tile_sample_stride_height // s, cfg.tile_sample_stride_width // s)

    def _blend_tiling_applies(self, height: int, width: int) -> bool:
        """diffusers tiles only a latent larger than one tile; a smaller one decodes untiled."""
        tile_h, tile_w, _, _ = self._blend_geometry()
        return width > tile_w or height > tile_h

    def _tiled_decode_blend(self, z: torch.Tensor) -> torch.Tensor:
        """diffusers' `tiled_decode`: overlapping tiles decoded whole (each with its own attention and
        frame cache), the overlaps blended linearly. Not exact; equal to diffusers' `enable_tiling()`."""
        height, width = z.shape[-2:]
        if not self._blend_tiling_applies(height, width):
            return self._decode_untiled(z)
        grid = plan.blend_tile_grid(height, width, *self._blend_geometry())
        boxes = [box for row in grid for box in row]
        decoded = [self._decode_untiled(z[..., y0:y1, x0:x1])
                   for y0, y1, x0, x1 in self._progress(boxes, desc="decode tiles", total=len(boxes))]
        return self._merge_blend_tiles(_as_rows(decoded, grid), height, width)

    def _merge_blend_tiles(self, rows: list[list[torch.Tensor]], height: int, width: int) -> torch.Tensor:
        """The merge step of blend tiling: decoded tiles (rows of `(B, 3, T', th, tw)`) for a
        `height x width` latent → the output (B, 3, T', 8·height, 8·width)."""
        cfg, s = self.vae_config, self.spatial_compression_ratio
        return _blend_merge(rows, cfg.tile_sample_min_height - cfg.tile_sample_stride_height,
                            cfg.tile_sample_min_width - cfg.tile_sample_stride_width,
                            cfg.tile_sample_stride_height, cfg.tile_sample_stride_width, height * s, width * s)

    def tiled_encode(self, x: torch.Tensor) -> torch.Tensor:
        """diffusers' `tiled_encode` (blend; moments, unsplit): overlapping pixel tiles encoded whole,
        blended in latent space."""
        cfg, s = self.vae_config, self.spatial_compression_ratio
        height, width = x.shape[-2:]
        tile_h, tile_w = cfg.tile_sample_min_height, cfg.tile_sample_min_width
        stride_h, stride_w = cfg.tile_sample_stride_height, cfg.tile_sample_stride_width
        grid = plan.blend_tile_grid(height, width, tile_h, tile_w, stride_h, stride_w)
        boxes = [box for row in grid for box in row]
        encoded = [self._encode_untiled(x[..., y0:y1, x0:x1])
                   for y0, y1, x0, x1 in self._progress(boxes, desc="encode tiles", total=len(boxes))]
        return _blend_merge(_as_rows(encoded, grid), (tile_h - stride_h) // s, (tile_w - stride_w) // s,
                            stride_h // s, stride_w // s, height // s, width // s)

    # -- several ranks --------------------------------------------------------------------------------
    # Each strategy takes a `comm` (qwenfast.parallel.comm): the rank, the world size and tensor-only
    # collectives. Every rank derives the same plan from shapes alone; work that may fail on one rank
    # runs under `comm.guard`, so that a failure reaches every rank before the next collective.
    def _decode_with_parallel_dispatch(self, z: torch.Tensor) -> torch.Tensor | None:
        """Decode over the ranks of the process group by `vae_config.parallel_decode_mode`; with one
        rank (or no initialised group) this is the single-device decode, bit for bit. `z` is checked
        here, on every rank together (a bad latent on one rank fails them all)."""
        from .dispatch import decode_parallel  # imports torch.distributed

        return decode_parallel(self, z)

    def set_process_group(self, group) -> None:
        """The process group parallel decode runs over (None: the world group)."""
        self.process_group = group

    process_group = None

    def parallel_tiled_decode(self, z: torch.Tensor, comm,
                              exact_tile_sample_size: int | None = None) -> torch.Tensor | None:
        """Tiles of the configured flavour (exact, or blend) balanced over ranks by cost (longest first),
        gathered once: equal to the single-device `tiled_decode` of the same flavour. Exact tiles are
        split further while there are fewer tiles than ranks.
        `exact_tile_sample_size` (output px) forces exact tiles of that size (what `auto` picks)."""
        if self.vae_config.tiling == "blend" and exact_tile_sample_size is None:
            return self._parallel_blend_decode(z, comm)
        core = (exact_tile_sample_size or self.vae_config.exact_tile_sample_size) // self.spatial_compression_ratio
        tiles = plan.exact_tiles_for_ranks(z.shape[-2], z.shape[-1], core, self._tile_margin(), comm.world_size)
        assignment = plan.balance_lpt([plan.exact_tile_cost(t) for t in tiles], comm.world_size)
        return self._parallel_exact_decode(z, comm, tiles, assignment)

    def parallel_patch_decode(self, z: torch.Tensor, comm) -> torch.Tensor | None:
        """One region per rank (uneven bands, or a 2-D grid when bands would be thinner than the
        margin), each decoded with a margin >= the receptive field: equal to the untiled decode."""
        regions = plan.patch_regions(z.shape[-2], z.shape[-1], comm.world_size, self._tile_margin())
        tiles = [r for r in regions if r is not None]
        assignment = [[r] if r < len(tiles) else [] for r in range(comm.world_size)]
        if self.vae_config.patch_halo == "level" and z.shape[-2] >= comm.world_size:
            from . import halo

            halos = halo.level_halos(self)
            bands = plan.grid_tiles(z.shape[-2], z.shape[-1], comm.world_size, 1, 0)
            if halo.bands_allow_level(bands, halos):
                return self._parallel_level_decode(z, comm, bands, halos)
        # `mid` (or bands too thin for the level halos): the full margin, once, at the mid output
        return self._parallel_exact_decode(z, comm, tiles, assignment)

    def _parallel_level_decode(self, z: torch.Tensor, comm, bands: list[plan.Tile], halos) -> torch.Tensor | None:
        """`patch` with `patch_halo="level"`: bands, halo rows exchanged at each resolution level."""
        from . import halo, mid

        x = mid.split_attention(self, z, comm)  # (B, C_mid, T, h, w) on every rank
        core = halo.decode_band_with_level_halos(self, x, bands[comm.rank], z.shape[-2], comm, halos)
        del x
        s = self.spatial_compression_ratio
        b, c, t = self._output_shape(z)[:3]
        shapes = [(b, c, t, (band.y1 - band.y0) * s, (band.x1 - band.x0) * s) for band in bands]
        assignment = [[r] for r in range(comm.world_size)]
        cores = self._process_parallel_tiled_outputs([core], assignment, shapes, z, comm)
        return None if cores is None else self._place_cores(cores, bands, z)

    def _parallel_exact_decode(self, z: torch.Tensor, comm, tiles: list[plan.Tile],
                               assignment: list[list[int]]) -> torch.Tensor | None:
        """Exact tiles (a patch region is one big tile) with `assignment[rank]` = this rank's tile indices.

        The global part runs split over ranks (`mid.split_attention`: the latent-resolution convs on
        every rank, each rank's share of the attention queries against all keys/values, the attention
        output all-gathered); then each rank runs the last mid ResBlock on the box its tiles need, the
        local part on its tiles, and the cores are gathered once.
        """
        from . import mid

        height, width = z.shape[-2:]
        mine = [tiles[i] for i in assignment[comm.rank]]
        x = mid.split_attention(self, z, comm)  # (B, C_mid, T, h, w), after the attention block
        with comm.guard("local part"):
            cores = []
            need = plan.bounding_window(mine, mid.tail_reach(self), height, width)
            if need is not None:
                h = mid.tail_on_region(self, x, need)  # mid-block output on need's core box
                cores = self._decode_exact_tiles(h, mine, origin=(need.y0, need.x0))
            del x
        s = self.spatial_compression_ratio
        b, c, t = self._output_shape(z)[:3]
        shapes = [(b, c, t, (tl.y1 - tl.y0) * s, (tl.x1 - tl.x0) * s) for tl in tiles]
        cores = self._process_parallel_tiled_outputs(cores, assignment, shapes, z, comm)
        return None if cores is None else self._place_cores(cores, tiles, z)

    def _parallel_blend_decode(self, z: torch.Tensor, comm) -> torch.Tensor | None:
        """diffusers' blend tiles, each decoded whole on one rank, gathered, merged as on one device."""
        height, width = z.shape[-2:]
        if not self._blend_tiling_applies(height, width):
            return self._replicated_decode(z, comm)
        grid = plan.blend_tile_grid(height, width, *self._blend_geometry())
        boxes = [box for row in grid for box in row]
        assignment = plan.balance_lpt([plan.blend_tile_cost(b) for b in boxes], comm.world_size)
        with comm.guard("blend tiles"):
            decoded = [self._decode_untiled(z[..., y0:y1, x0:x1])
                       for y0, y1, x0, x1 in (boxes[i] for i in assignment[comm.rank])]
        s = self.spatial_compression_ratio
        b, c, t = self._output_shape(z)[:3]
        shapes = [(b, c, t, (y1 - y0) * s, (x1 - x0) * s) for y0, y1, x0, x1 in boxes]
        decoded = self._process_parallel_tiled_outputs(decoded, assignment, shapes, z, comm)
        return None if decoded is None else self._merge_blend_tiles(_as_rows(decoded, grid), height, width)

    def _replicated_decode(self, z: torch.Tensor, comm) -> torch.Tensor | None:
        """Every rank that receives output decodes alone (the single-device path); no data moves."""
        out = None
        with comm.guard("replicated decode"):
            if self.vae_config.parallel_output == "all" or comm.rank == 0:
                out = self.tiled_decode(z) if self.vae_config.use_tiling else self._decode_untiled(z)
        return out

    def _process_parallel_tiled_outputs(self, pieces: list[torch.Tensor], assignment: list[list[int]],
                                        shapes: list[tuple[int, ...]], like: torch.Tensor, comm) -> list[torch.Tensor] | None:
        """The one gather step of every parallel strategy: this rank's decoded `pieces` (its tiles
        `assignment[rank]`, in order) packed into one flat buffer, padded to the longest rank's (sizes
        from `shapes`, the same on every rank: no sizes are exchanged), sent once to every rank
        (`parallel_output="all"`) or to rank 0 (`"rank0"`), unpacked into all tiles' pieces in tile
        order. Returns None on a rank that receives nothing."""
        numels = [math.prod(shape) for shape in shapes]
        lengths = [sum(numels[i] for i in a) for a in assignment]
        pad = max(lengths) - lengths[comm.rank]
        flat = [p.reshape(-1) for p in pieces] + [like.new_zeros(pad)]
        buf = torch.cat(flat) if len(flat) > 1 else flat[0]  # (max(lengths),)
        if self.vae_config.parallel_output == "all":
            parts = comm.all_gather(buf)
        else:
            parts = comm.gather(buf, dst=0)
        if parts is None:
            return None
        out: list[torch.Tensor] = [None] * len(shapes)  # type: ignore[list-item]
        for rank, indices in enumerate(assignment):
            offset = 0
            for i in indices:
                out[i] = parts[rank][offset:offset + numels[i]].view(shapes[i])
                offset += numels[i]
        return out

    # -- progress -----------------------------------------------------------------------------------
    def _progress(self, items: Iterable, desc: str, total: int, min_items: int = 2) -> Iterable:
        """A tqdm bar over `items` when `vae_config.progress` is on and there is more than a moment's work."""
        if not getattr(self.vae_config, "progress", False) or total < min_items:
            return items
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, total=total, leave=False)


def _as_rows(items: list, grid: list[list]) -> list[list]:
    """A flat list back into the row structure of `grid`."""
    it = iter(items)
    return [[next(it) for _ in row] for row in grid]


def _blend_merge(rows: list[list[torch.Tensor]], blend_h: int, blend_w: int, keep_h: int, keep_w: int,
                 out_h: int, out_w: int) -> torch.Tensor:
    """Blend tiles as diffusers does, in place and in its order (each tile with its already-blended
    upper and left neighbours), keep each tile's `keep_h x keep_w` top-left part, crop to the output."""
    out_rows = []
    for i, row in enumerate(rows):
        kept = []
        for j, tile in enumerate(row):
            if i > 0:
                _blend(rows[i - 1][j], tile, blend_h, dim=-2)
            if j > 0:
                _blend(row[j - 1], tile, blend_w, dim=-1)
            kept.append(tile[..., :keep_h, :keep_w])
        out_rows.append(torch.cat(kept, dim=-1))
    return torch.cat(out_rows, dim=-2)[..., :out_h, :out_w]


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> None:
    """In place: the first `extent` rows (dim=-2) or columns (dim=-1) of `b` become a linear ramp from
    `a`'s last ones to `b`'s own, weights `y / extent` as in diffusers' blend_v / blend_h."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent <= 0:
        return
    ramp = torch.arange(extent, dtype=torch.float64, device=b.device) / extent
    compute = b.dtype if b.dtype in (torch.float32, torch.float64) else torch.float32
    shape = (-1, 1) if dim == -2 else (-1,)
    w_b = ramp.to(compute).view(shape)
    w_a = (1 - ramp).to(compute).view(shape)
    head_b = b.narrow(dim, 0, extent)
    tail_a = a.narrow(dim, a.shape[dim] - extent, extent)
    head_b.copy_((tail_a.to(compute) * w_a + head_b.to(compute) * w_b).to(b.dtype))
