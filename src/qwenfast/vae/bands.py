"""The plan of a banded local part (pure: shapes in, plan out; no tensors): how the local part of a
large frame runs in stages, each whole or in row bands with the stage's receptive field as margin.
Everything is a function of the surface's `DecoderTopology`; `DecodeSurface.decode_levels` executes
the plan (for a model whose `band_local_part` is on).

A plan is a tuple of stages `(first level, end level, bands)`, `bands` a tuple of `Tile`s of full
width over the stage's input rows (empty: the stage runs whole).
"""

from __future__ import annotations

import dataclasses
import functools

from .surface import DecoderTopology, Level
from .tiles import Tile, grid_tiles

__all__ = ["LOCAL_BAND_OVERHEAD", "BAND_WORKING_SET", "MAX_BANDS", "level_activation_bytes", "level_flops",
           "stage_bands", "local_plan", "whole_plan"]

# A stage is banded where that lowers the peak: the least peak memory whose margins cost at most
# LOCAL_BAND_OVERHEAD of the local part's FLOPs. Module settings, not knobs (chosen with
# benchmarks/memory_model.py; benchmarks/results/memory_model.md has the peaks and overheads).
LOCAL_BAND_OVERHEAD = 0.03
BAND_WORKING_SET = 3  # a band's activations in flight, in units of its largest (the accountant: 2.3-3)
MAX_BANDS = 64


def level_activation_bytes(levels: tuple[Level, ...], batch: int, height: int, width: int,
                           elem: int) -> list[tuple[int, int]]:
    """Per level of `levels` (consecutive topology levels) for a (batch, ., height, width) input of the
    first: (its largest activation, its output) in bytes; activations are the conv inputs and outputs
    at each resolution the level runs at."""
    out, f, px = [], 1, batch * height * width * elem
    for lv in levels:
        ch = lv.conv_pairs()
        g = 2 * f if lv.upsample else f
        at_in = max((max(c) for c in ch[:lv.convs]), default=0) * f * f
        at_up = max((max(c) for c in ch[lv.convs:]), default=0) * g * g
        out.append((max(at_in, at_up) * px, ch[-1][1] * g * g * px))
        f = g
    return out


def level_flops(levels: tuple[Level, ...], batch: int, height: int, width: int) -> float:
    """The 3x3 convs' FLOPs of `levels` on a (batch, ., height, width) input of the first."""
    total, f = 0.0, 1
    for lv in levels:
        ch = lv.conv_pairs()
        g = 2 * f if lv.upsample else f
        total += sum(2 * 9 * ci * co for ci, co in ch[:lv.convs]) * f * f
        total += sum(2 * 9 * ci * co for ci, co in ch[lv.convs:]) * g * g
        f = g
    return total * batch * height * width


def _stage_margin(topology: DecoderTopology, first: int, end: int) -> int:
    """The receptive field of levels [first, end) alone: the margin a band of that stage needs."""
    return dataclasses.replace(topology, tail_convs=0, levels=topology.levels[first:end]).receptive_field()


def stage_bands(topology: DecoderTopology, first: int, end: int, rows: int, cols: int, count: int) -> list[Tile]:
    """`count` row bands of a stage's (rows x cols) input: Tiles of full width, window = core + the
    stage's receptive field, clipped; [] for one band (the stage runs whole)."""
    if count <= 1:
        return []
    return grid_tiles(rows, cols, count, 1, _stage_margin(topology, first, end))


def whole_plan(topology: DecoderTopology) -> tuple[tuple[int, int, tuple], ...]:
    """The plan that runs every level whole, in one stage (what an unbanded local part does)."""
    return ((0, len(topology.levels), ()),)


def local_plan(topology: DecoderTopology, shape: tuple[int, ...], elem: int,
               overhead: float | None = None) -> tuple[tuple[int, int, tuple], ...]:
    """How the local part runs on a frame of `shape` (B, C, h, w), elements of `elem` bytes: stages
    `(first level, end level, bands)`, `bands` a tuple of `stage_bands` (empty: the stage runs whole).

    Over every split of the levels into stages and every band count per stage (up to MAX_BANDS), the
    least estimated peak whose extra FLOPs (the bands' margins, counted twice) stay within `overhead`
    (default LOCAL_BAND_OVERHEAD) of the local part's. A stage's peak is its input and output, held
    whole, plus BAND_WORKING_SET x its band's largest activation."""
    return _local_plan(topology, tuple(shape), elem, LOCAL_BAND_OVERHEAD if overhead is None else overhead)


@functools.lru_cache(maxsize=256)
def _local_plan(topology: DecoderTopology, shape: tuple[int, ...], elem: int, overhead: float):
    b, _, h, w = shape
    levels, n = topology.levels, len(topology.levels)
    budget = overhead * level_flops(levels, b, h, w)
    scales = [1]
    for lv in levels:
        scales.append(scales[-1] * (2 if lv.upsample else 1))

    def options(first: int, end: int) -> list[tuple[int, float, int]]:
        """(peak bytes, extra FLOPs, band count) of each band count of stage [first, end)."""
        stage = levels[first:end]
        rows, cols = h * scales[first], w * scales[first]
        held_in = levels[first].conv_pairs()[0][0] * b * rows * cols * elem
        held_out = level_activation_bytes(stage, b, rows, cols, elem)[-1][1]
        per_row = max(size for size, _ in level_activation_bytes(stage, b, 1, cols, elem))
        flops_row = level_flops(stage, b, 1, cols)
        margin = _stage_margin(topology, first, end)
        out = []
        for count in range(1, min(rows, MAX_BANDS) + 1):
            window = min(rows, -(-rows // count) + (2 * margin if count > 1 else 0))
            extra = flops_row * min((count - 1) * rows, 2 * margin * (count - 1))
            out.append((held_in + held_out + BAND_WORKING_SET * per_row * window, extra, count))
        return out

    best = None  # (peak, extra, stages, counts)
    for mask in range(2 ** (n - 1)):  # bit i set: a stage ends after level i
        ends = [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
        stages = list(zip([0] + ends[:-1], ends))
        opts = [options(a, e) for a, e in stages]
        for limit in sorted({peak for o in opts for peak, _, _ in o}):
            picks = [min(((extra, count) for peak, extra, count in o if peak <= limit), default=None) for o in opts]
            if None in picks:
                continue
            extra = sum(p[0] for p in picks)
            if extra <= budget:
                if best is None or (limit, extra) < best[:2]:
                    best = (limit, extra, stages, [p[1] for p in picks])
                break
    _, _, stages, counts = best  # one stage, one band (the levels whole) always fits: never None
    return tuple((a, e, tuple(stage_bands(topology, a, e, h * scales[a], w * scales[a], count)))
                 for (a, e), count in zip(stages, counts))
