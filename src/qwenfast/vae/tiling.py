"""Single-device tiling, written once over the decode surface (`qwenfast.vae.surface`).

- **exact**: the global part once on the whole latent (latent resolution: small), then the local part
  tile by tile, each tile with a margin >= the receptive field, keeping its core: equal to the untiled
  decode up to re-association.
- **blend**: diffusers' scheme: overlapping tiles decoded whole (each with its own attention and frame
  cache), overlaps blended linearly. Not exact; equal to diffusers' `enable_tiling()`.
- **tiled encode**: diffusers' `tiled_encode` (blend), moments unsplit.

The parallel strategies reuse the pieces (`decode_exact_tiles`, `place_cores`, `merge_blend_tiles`).
Every function takes the model `vae` (a `DecodeSurface`) and an optional `cfg` (default `vae.vae_config`).
"""

from __future__ import annotations

import torch

from ..config import VAEConfig
from . import tiles as geometry
from .surface import progress
from .tiles import Tile

__all__ = ["single_device_decode", "tiled_decode", "tiled_decode_exact", "tiled_decode_blend", "tiled_encode",
           "tile_margin", "exact_tiles", "decode_exact_tiles", "place_cores", "blend_geometry",
           "blend_tiling_applies", "blend_boxes", "merge_blend_tiles", "as_rows"]


def single_device_decode(vae, z: torch.Tensor, cfg: VAEConfig | None = None) -> torch.Tensor:
    """What `decode` runs on one device: tiled by `cfg.use_tiling`, else untiled (unclamped)."""
    cfg = cfg or vae.vae_config
    return tiled_decode(vae, z, cfg) if cfg.use_tiling else vae.decode_untiled(z)


def tiled_decode(vae, z: torch.Tensor, cfg: VAEConfig | None = None) -> torch.Tensor:
    """Bounded-memory decode of `z` (B, z, T, h, w) in the configured flavour (unclamped)."""
    cfg = cfg or vae.vae_config
    return tiled_decode_exact(vae, z, cfg) if cfg.tiling == "exact" else tiled_decode_blend(vae, z, cfg)


# -- exact ------------------------------------------------------------------------------------------


def tile_margin(vae, cfg: VAEConfig | None = None) -> int:
    """The margin of exact tiles and patch regions: `cfg.tile_margin`, default the receptive field."""
    cfg = cfg or vae.vae_config
    return vae.topology.receptive_field() if cfg.tile_margin is None else cfg.tile_margin


def exact_tiles(vae, height: int, width: int, sample_size: int | None = None,
                cfg: VAEConfig | None = None) -> list[Tile]:
    """Exact tiles of `sample_size` output px (default `cfg.exact_tile_sample_size`) over a latent."""
    cfg = cfg or vae.vae_config
    core = (sample_size or cfg.exact_tile_sample_size) // vae.spatial_compression_ratio
    return geometry.exact_tiles(height, width, core, tile_margin(vae, cfg))


def tiled_decode_exact(vae, z: torch.Tensor, cfg: VAEConfig | None = None) -> torch.Tensor:
    """The global part once on the whole latent, then the local part tile by tile, each tile with a
    margin >= the receptive field, keeping its core: equal to the untiled decode.

    Memory: while tile i decodes, the cores of tiles < i are held as compact copies (less than the
    output, and less than a preallocated output would be), and the output is allocated once every tile
    is done and the global part's output freed (output + cores: twice the output, with no decoder
    activation alive). The memory model ranks this below both placing each core into a preallocated
    output at once and holding the decoded windows (benchmarks/memory_model.py)."""
    cfg = cfg or vae.vae_config
    h = vae.decode_global(z)  # (B, C_mid, T, h, w): latent resolution, small
    tiles = exact_tiles(vae, h.shape[-2], h.shape[-1], cfg=cfg)
    cores = decode_exact_tiles(vae, h, tiles, cfg=cfg)
    del h
    return place_cores(vae, cores, tiles, z)


def decode_exact_tiles(vae, h: torch.Tensor, tiles: list[Tile], origin: tuple[int, int] = (0, 0),
                       cfg: VAEConfig | None = None) -> list[torch.Tensor]:
    """The local part on each tile's window of the mid-block output `h` (B, C_mid, T, ., .), whose
    pixel [0, 0] is latent pixel `origin`; each tile's core, (B, C_out, T', s·core_h, s·core_w), a
    compact copy: the decoded window (core + margins) is dropped before the next tile decodes."""
    s, (oy, ox) = vae.spatial_compression_ratio, origin
    cores = []
    for tile in progress(cfg or vae.vae_config, tiles, desc="decode tiles", total=len(tiles)):
        piece = vae.decode_local(h[..., tile.wy0 - oy:tile.wy1 - oy, tile.wx0 - ox:tile.wx1 - ox])
        cy, cx = tile.crop_slices(s)
        cores.append(piece[..., cy, cx].clone())
        del piece  # before the next tile decodes: one decoded window at a time
    return cores


def place_cores(vae, cores: list[torch.Tensor], tiles: list[Tile], z: torch.Tensor) -> torch.Tensor:
    """Tile cores (B, C_out, T', ., .) into the output (B, C_out, T', s·h, s·w) of latent `z`."""
    out = z.new_empty(vae.output_shape(z))
    for tile, core in zip(tiles, cores):
        oy, ox = tile.core_slices(vae.spatial_compression_ratio)
        out[..., oy, ox] = core
    return out


# -- blend ------------------------------------------------------------------------------------------


def blend_geometry(vae, cfg: VAEConfig | None = None) -> tuple[int, int, int, int]:
    """(tile_h, tile_w, stride_h, stride_w) of blend tiling, in latent pixels."""
    cfg, s = cfg or vae.vae_config, vae.spatial_compression_ratio
    return (cfg.tile_sample_min_height // s, cfg.tile_sample_min_width // s,
            cfg.tile_sample_stride_height // s, cfg.tile_sample_stride_width // s)


def blend_tiling_applies(vae, height: int, width: int, cfg: VAEConfig | None = None) -> bool:
    """diffusers tiles only a latent larger than one tile; a smaller one decodes untiled."""
    tile_h, tile_w, _, _ = blend_geometry(vae, cfg)
    return width > tile_w or height > tile_h


def blend_boxes(vae, height: int, width: int, cfg: VAEConfig | None = None):
    """(grid, boxes): diffusers' blend tiles of a `height x width` latent as rows, and flat."""
    grid = geometry.blend_tile_grid(height, width, *blend_geometry(vae, cfg))
    return grid, [box for row in grid for box in row]


def tiled_decode_blend(vae, z: torch.Tensor, cfg: VAEConfig | None = None) -> torch.Tensor:
    """diffusers' `tiled_decode`: overlapping tiles decoded whole (each with its own attention and
    frame cache), the overlaps blended linearly. Not exact; equal to diffusers' `enable_tiling()`."""
    cfg = cfg or vae.vae_config
    height, width = z.shape[-2:]
    if not blend_tiling_applies(vae, height, width, cfg):
        return vae.decode_untiled(z)
    grid, boxes = blend_boxes(vae, height, width, cfg)
    decoded = [vae.decode_untiled(z[..., y0:y1, x0:x1])
               for y0, y1, x0, x1 in progress(cfg, boxes, desc="decode tiles", total=len(boxes))]
    return merge_blend_tiles(vae, as_rows(decoded, grid), height, width, cfg)


def merge_blend_tiles(vae, rows: list[list[torch.Tensor]], height: int, width: int,
                      cfg: VAEConfig | None = None) -> torch.Tensor:
    """The merge step of blend tiling: decoded tiles (rows of `(B, C_out, T', th, tw)`) for a
    `height x width` latent -> the output (B, C_out, T', s·height, s·width)."""
    cfg, s = cfg or vae.vae_config, vae.spatial_compression_ratio
    patch = getattr(vae, "patch_size", None) or 1
    if patch > 1:  # a patchified model (the 2.1 VAE with patch_size): diffusers blends before unpatchifying
        return vae.merge_blend_tiles_patched(rows, height, width, cfg)
    return _blend_merge(rows, cfg.tile_sample_min_height - cfg.tile_sample_stride_height,
                        cfg.tile_sample_min_width - cfg.tile_sample_stride_width,
                        cfg.tile_sample_stride_height, cfg.tile_sample_stride_width, height * s, width * s)


def tiled_encode(vae, x: torch.Tensor, cfg: VAEConfig | None = None) -> torch.Tensor:
    """diffusers' `tiled_encode` (blend; moments, unsplit): overlapping pixel tiles encoded whole,
    blended in latent space."""
    cfg, s = cfg or vae.vae_config, vae.spatial_compression_ratio
    height, width = x.shape[-2:]
    tile_h, tile_w = cfg.tile_sample_min_height, cfg.tile_sample_min_width
    stride_h, stride_w = cfg.tile_sample_stride_height, cfg.tile_sample_stride_width
    grid = geometry.blend_tile_grid(height, width, tile_h, tile_w, stride_h, stride_w)
    boxes = [box for row in grid for box in row]
    encoded = [vae.encode_untiled(x[..., y0:y1, x0:x1])
               for y0, y1, x0, x1 in progress(cfg, boxes, desc="encode tiles", total=len(boxes))]
    return _blend_merge(as_rows(encoded, grid), (tile_h - stride_h) // s, (tile_w - stride_w) // s,
                        stride_h // s, stride_w // s, height // s, width // s)


def as_rows(items: list, grid: list[list]) -> list[list]:
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
