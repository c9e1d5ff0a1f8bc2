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
"""

from __future__ import annotations

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

    def _exact_tiles(self, height: int, width: int) -> list[plan.Tile]:
        core = self.vae_config.exact_tile_sample_size // self.spatial_compression_ratio
        return plan.exact_tiles(height, width, core, self._tile_margin())

    def _tiled_decode_exact(self, z: torch.Tensor) -> torch.Tensor:
        """The global part once on the whole latent, then the local part tile by tile, each tile with a
        margin >= the receptive field, keeping its core: equal to the untiled decode."""
        h = self._decode_global(z)  # (B, C_mid, T, h, w): latent resolution, small
        tiles = self._exact_tiles(h.shape[-2], h.shape[-1])
        s = self.spatial_compression_ratio
        out = None
        for tile in self._progress(tiles, desc="decode tiles", total=len(tiles)):
            wy, wx = tile.window_slices()
            piece = self._decode_local(h[..., wy, wx])  # (B, 3, T', 8·window)
            if out is None:
                out = piece.new_empty(*piece.shape[:3], h.shape[-2] * s, h.shape[-1] * s)
            cy, cx = tile.crop_slices(s)
            oy, ox = tile.core_slices(s)
            out[..., oy, ox] = piece[..., cy, cx]
        return out

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
    def _decode_with_parallel_dispatch(self, z: torch.Tensor) -> torch.Tensor | None:
        """Decode over the ranks of the process group by `vae_config.parallel_decode_mode`; with one
        rank (or no initialised group) this is the single-device decode, bit for bit."""
        from .dispatch import decode_parallel  # imports torch.distributed

        return decode_parallel(self, z)

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
