"""Tile geometry from shapes alone (pure: no tensors): the regions single-device tiling decodes, and
the building blocks of `qwenfast.parallel.plan`. Coordinates in latent pixels, half-open `[start, stop)`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Tile", "split_evenly", "exact_tiles", "grid_tiles", "blend_tile_grid"]


@dataclass(frozen=True)
class Tile:
    """A region of the latent: its `core` (the pixels it owns in the output) and its `window` (the
    core plus margins, clipped to the latent: what must be decoded to get the core exactly)."""

    y0: int
    y1: int
    x0: int
    x1: int
    wy0: int
    wy1: int
    wx0: int
    wx1: int

    @property
    def core_area(self) -> int:
        return (self.y1 - self.y0) * (self.x1 - self.x0)

    @property
    def window_area(self) -> int:
        return (self.wy1 - self.wy0) * (self.wx1 - self.wx0)

    def window_slices(self) -> tuple[slice, slice]:
        return slice(self.wy0, self.wy1), slice(self.wx0, self.wx1)

    def crop_slices(self, scale: int) -> tuple[slice, slice]:
        """Where the core lies inside the decoded window, in output pixels (`scale` per latent pixel)."""
        return (slice((self.y0 - self.wy0) * scale, (self.y1 - self.wy0) * scale),
                slice((self.x0 - self.wx0) * scale, (self.x1 - self.wx0) * scale))

    def core_slices(self, scale: int) -> tuple[slice, slice]:
        """Where the core lies in the whole output, in output pixels."""
        return slice(self.y0 * scale, self.y1 * scale), slice(self.x0 * scale, self.x1 * scale)


def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    """`[0, n)` in `parts` contiguous ranges whose sizes differ by at most one (never padding).

    More parts than items gives empty ranges at the end.
    """
    if n < 0 or parts < 1:
        raise ValueError(f"split_evenly needs n >= 0 and parts >= 1; got n={n}, parts={parts}")
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def exact_tiles(height: int, width: int, core: int, margin: int) -> list[Tile]:
    """Cover a `height x width` latent with tiles whose cores are at most `core` pixels a side (as
    even as possible) and whose windows add `margin` pixels on every side that is not the border."""
    if core < 1:
        raise ValueError(f"tile core must be >= 1 latent pixel; got {core}")
    return grid_tiles(height, width, -(-height // core), -(-width // core), margin)


def grid_tiles(height: int, width: int, rows: int, cols: int, margin: int) -> list[Tile]:
    """A `rows x cols` grid of uneven cores (sizes differ by at most one; never padding), row-major,
    each window = core + `margin` on every side, clipped to the latent."""
    if not (1 <= rows <= max(height, 1) and 1 <= cols <= max(width, 1)):
        raise ValueError(f"a {rows}x{cols} grid does not fit a {height}x{width} latent")
    return [
        Tile(y0, y1, x0, x1, max(0, y0 - margin), min(height, y1 + margin),
             max(0, x0 - margin), min(width, x1 + margin))
        for y0, y1 in split_evenly(height, rows) for x0, x1 in split_evenly(width, cols)
    ]


def blend_tile_grid(height: int, width: int, tile_h: int, tile_w: int, stride_h: int,
                    stride_w: int) -> list[list[tuple[int, int, int, int]]]:
    """diffusers' overlapping tiles: rows of `(y0, y1, x0, x1)` boxes starting every stride,
    `tile_h x tile_w` in size, clipped to `height x width` (any unit: latent or pixels)."""
    return [[(i, min(i + tile_h, height), j, min(j + tile_w, width)) for j in range(0, width, stride_w)]
            for i in range(0, height, stride_h)]
