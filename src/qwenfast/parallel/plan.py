"""Pure planning: tile geometry and partitions, from shapes alone (no tensors, no collectives).

Every rank computes the same plan from the same shapes, which is what lets the parallel strategies
agree without pickling anything. Coordinates are in latent pixels, half-open `[start, stop)`.
The tile geometry itself (`Tile`, `grid_tiles`, ...) lives in `qwenfast.vae.tiles`, shared with
single-device tiling, and is re-exported here. Architecture numbers come in as arguments (a
`DecoderTopology` of `qwenfast.vae.surface`, a margin): this module knows no model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..config import PATCH_HALOS
from ..vae.tiles import Tile, blend_tile_grid, exact_tiles, grid_tiles, split_evenly

__all__ = ["Tile", "split_evenly", "exact_tiles", "exact_tiles_for_ranks", "blend_tile_grid", "grid_tiles", "patch_regions",
           "bounding_window", "balance_lpt", "exact_tile_cost", "blend_tile_cost", "CostModel",
           "DecodeChoice", "choose_decode", "patch_halo_costs", "choose_patch_halo", "bands_allow_level",
           "level_bands"]


def exact_tiles_for_ranks(height: int, width: int, core: int, margin: int, world: int) -> list[Tile]:
    """`exact_tiles`, split further while there are fewer tiles than ranks (a rank with no tile idles
    while others work): the grid of at least `world` tiles (no fewer rows or columns than
    `exact_tiles` has) whose slowest rank, at ⌈tiles / world⌉ tiles of the largest window, is fastest;
    ties to fewer tiles."""
    rows, cols = -(-height // core), -(-width // core)
    if rows * cols >= world or height * width < world:
        return grid_tiles(height, width, min(rows, height), min(cols, width), margin)
    best = None
    for r in range(rows, min(height, rows + world) + 1):
        for c in range(cols, min(width, cols + world) + 1):
            if r * c < world:
                continue
            tiles = grid_tiles(height, width, r, c, margin)
            key = (-(-len(tiles) // world) * max(t.window_area for t in tiles), len(tiles))
            if best is None or key < best[0]:
                best = (key, tiles)
    return best[1]


def patch_regions(height: int, width: int, world: int, margin: int) -> list[Tile | None]:
    """One region per rank for `patch` decode (None for a rank with no region), rank order.

    Uneven horizontal bands (rows are contiguous in memory, and each band has two neighbours at
    most) when every band is at least `margin` rows thick; otherwise the 2-D grid of at most
    `world` regions whose largest window (core + margin: the work of the slowest rank) is smallest,
    ties going to more regions, then to more rows.
    """
    if world < 1 or height < 1 or width < 1:
        raise ValueError(f"patch_regions needs a non-empty latent and world >= 1; got {height}x{width}, world={world}")
    if height >= world * max(margin, 1):
        grid = grid_tiles(height, width, world, 1, margin)
    else:
        best = None
        for gy in range(1, min(world, height) + 1):
            for gx in range(1, min(world // gy, width) + 1):
                tiles = grid_tiles(height, width, gy, gx, margin)
                key = (max(t.window_area for t in tiles), -gy * gx, -gy)
                if best is None or key < best[0]:
                    best = (key, tiles)
        grid = best[1]
    return list(grid) + [None] * (world - len(grid))


def bounding_window(tiles: list[Tile], grow: int, height: int, width: int) -> Tile | None:
    """The box around the tiles' windows (its core), grown by `grow` on every side and clipped (its
    window): the region of the mid-block output a rank needs (None for no tiles)."""
    if not tiles:
        return None
    y0, y1 = min(t.wy0 for t in tiles), max(t.wy1 for t in tiles)
    x0, x1 = min(t.wx0 for t in tiles), max(t.wx1 for t in tiles)
    return Tile(y0, y1, x0, x1, max(0, y0 - grow), min(height, y1 + grow), max(0, x0 - grow), min(width, x1 + grow))


def balance_lpt(costs: list[float], parts: int) -> list[list[int]]:
    """Longest processing time first: items (by index) to `parts` bins, each item in turn (largest
    cost first, ties by index) to the least loaded bin (ties to the lowest bin). Deterministic, so
    every rank computes the same assignment. Each bin's indices come back sorted."""
    if parts < 1:
        raise ValueError(f"balance_lpt needs parts >= 1; got {parts}")
    loads = [0.0] * parts
    bins: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        b = min(range(parts), key=lambda b: (loads[b], b))
        loads[b] += costs[i]
        bins[b].append(i)
    return [sorted(b) for b in bins]


def bands_allow_level(bands: list[Tile | None], halos: list[tuple[int, int]]) -> bool:
    """Whether every band is a full-width band thick enough that each of `patch_halo="level"`'s halos
    (`(scale, rows)` per level, `DecoderTopology.level_halos()`) comes from the next band alone."""
    if any(b is None for b in bands) or len({(b.x0, b.x1) for b in bands}) != 1:
        return False
    thinnest = min(b.y1 - b.y0 for b in bands)
    return all(thinnest * scale >= rows for scale, rows in halos)


def level_bands(height: int, width: int, world: int, halos: list[tuple[int, int]]) -> list[Tile] | None:
    """The full-width bands, one per rank, of `patch_halo="level"`; None where they cannot carry the level
    halos (fewer rows than ranks, or a band thinner than a halo): `patch` then decodes as `mid`."""
    if height < world:
        return None
    bands = grid_tiles(height, width, world, 1, 0)
    return bands if bands_allow_level(bands, halos) else None


def choose_patch_halo(frames: int, halo: str = "auto", *, world: int, image_level_world: int | None) -> str:
    """`VAEConfig.patch_halo` resolved for a latent of `frames` latent frames on `world` ranks: an
    explicit `"mid"` or `"level"` as given; `"auto"` → `"level"` for video (frames > 1) and for images
    on at least `image_level_world` ranks (the model's `DecodeSurface.patch_level_image_world`; None:
    never), `"mid"` otherwise.

    The rule is the one-GPU rehearsal's (benchmarks/results/parallel_rehearsal_h200.md and
    parallel_rehearsal_qwenimage21_h200.md, 2026-12-01 18:14-18:38 UTC, after the level path's halo join
    was fixed: level_halo_cat_h200.md). Predicted speed-up / N at N = 2 / 4 / 8, `level` against `mid`.
    Qwen-Image VAE, 81x720p video: 0.92 / 0.77 / 0.59 against 0.77 / 0.44 / 0.42 (thin bands of a
    90-row latent: `mid`'s 13-row margins cost 1.3-2.1x the work). Its images: 0.98 / 0.94 / 0.89
    against 0.98 / 0.90 / 0.81 at 4096², 0.92 / 0.81 / 0.47 against 0.89 / 0.71 / 0.46 at 2048², 0.78 /
    0.47 / 0.16 against 0.76 / 0.35 / 0.19 at 1328²: a tie at N = 2 (where `level` holds up to 17% more
    per rank), `level` ahead from N = 4 but for 1328² on 8 ranks (launch-bound shares of ~15 ms). The 2.1
    VAE's images (a 16x latent: the same 13-row margin is twice the share of a band): `level` ahead at
    every N, 0.93 / 0.77 / 0.62 against 0.79 / 0.53 / 0.34 at 2048², 0.82 / 0.51 / 0.27 against 0.71 /
    0.39 / 0.26 at 1328². Hence each model's `patch_level_image_world`: 4 and 2."""
    if halo not in PATCH_HALOS:
        named = f"{', '.join(map(repr, PATCH_HALOS[:-1]))} or {PATCH_HALOS[-1]!r}"
        raise ValueError(f"patch_halo must be {named}; got {halo!r}")
    if frames < 1 or world < 1:
        raise ValueError(f"choose_patch_halo needs frames >= 1 and world >= 1; got frames={frames}, world={world}")
    if halo != "auto":
        return halo
    return "level" if frames > 1 or (image_level_world is not None and world >= image_level_world) else "mid"


# --------------------------------------------------------------------------------------------------
# Cost model: what a tile or a region costs, and what `patch` halo exchanges cost
# --------------------------------------------------------------------------------------------------


def exact_tile_cost(tile: Tile) -> float:
    """Work of an exact tile: the local part over its window (the global part is shared)."""
    return float(tile.window_area)


def blend_tile_cost(box: tuple[int, int, int, int], attention_weight: float = 1.0 / 4096) -> float:
    """Work of a blend tile decoded whole: local part ∝ area, its own attention ∝ area²."""
    y0, y1, x0, x1 = box
    area = (y1 - y0) * (x1 - x0)
    return area + attention_weight * area * area


def patch_halo_costs(height: int, width: int, world: int, halo: str, topology, margin: int | None = None,
                     dtype_bytes: int = 2) -> dict:
    """FLOPs and bytes of the local part of `patch` decode over horizontal bands, per rank, for one
    frame, with `halo="mid"` (one margin of `margin` latent rows at the mid-block output, default the
    receptive field of `topology`, a `qwenfast.vae.surface.DecoderTopology`; no messages)
    or `halo="level"` (at the start of each resolution level, as many rows at that resolution as the
    level has 3x3 convs, exchanged with both neighbours). Pure counting, so the trade-off is visible
    without a GPU. Returns the slowest rank's FLOPs, the single-device FLOPs, their ratio to the ideal
    (`redundancy`: 1.0 = no redundant work), halo bytes received and messages per rank."""
    if halo not in ("mid", "level"):
        raise ValueError(f"halo must be 'mid' or 'level'; got {halo!r}")
    levels = topology.cost_levels()
    margin = topology.receptive_field() if margin is None else margin
    bands = split_evenly(height, min(world, height))
    single = rank_max = 0.0
    bytes_max = messages = 0
    for y0, y1 in bands:
        flops = 0.0
        received = 0
        n_nb = (y0 > 0) + (y1 < height)
        for lv in levels:
            s = lv["scale"]
            per_px = sum(2 * 9 * ci * co for ci, co in lv["convs"])
            rows = (y1 - y0) * s
            if halo == "mid":
                wy0, wy1 = max(0, y0 - margin), min(height, y1 + margin)
                rows_done = (wy1 - wy0) * s
            else:
                h = len(lv["convs"])
                rows_done = rows + n_nb * h  # each level re-grows a halo of h rows, shrinking by one per conv
                received += n_nb * h * width * s * lv["convs"][0][0] * dtype_bytes
            flops += per_px * rows_done * width * s
            single += per_px * rows * width * s
        rank_max = max(rank_max, flops)
        bytes_max = max(bytes_max, received)
        messages = max(messages, n_nb * (len(levels) if halo == "level" else 0))
    ideal = single / len(bands)
    return dict(halo=halo, flops_rank_max=rank_max, flops_single=single, redundancy=rank_max / ideal,
                halo_bytes_per_rank=bytes_max, messages_per_rank=messages)


# --------------------------------------------------------------------------------------------------
# auto: which strategy, from shapes, world size, dtype and free memory alone
# --------------------------------------------------------------------------------------------------


_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float64": 8}


def _dtype_bytes(dtype) -> int:
    if isinstance(dtype, int):
        return dtype
    size = getattr(dtype, "itemsize", None)
    if isinstance(size, int):
        return size
    name = str(dtype).split(".")[-1]
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]


@dataclass(frozen=True)
class CostModel:
    """Rates and sizes for the Qwen-Image decoder (one H100, bf16; fp32 runs at `fp32_slowdown`).

    Estimates from DESIGN.md §1/§4 and the folded-decode probe: the local part costs ~4.1 TFLOP per
    output megapixel (image fast path; ~10.75 for video frames after the first), the mid attention
    4·N²·384 FLOP per frame at the SDPA rate for head dim 384, ~1400 B of live activations per output
    pixel in bf16 (21.5 GiB at 4096²).
    """

    local_flop_per_px: float = 4.1e6
    video_local_flop_per_px: float = 10.75e6
    global_flop_per_latent_px: float = 1.1e7  # conv_in + two ResBlocks at latent resolution
    mid_channels: int = 384
    conv_flop_per_s: float = 250e12
    attention_flop_per_s: float = 85e12
    link_bytes_per_s: float = 100e9
    fixed_s: float = 2e-3  # per parallel decode: collectives, stage syncs, launches
    act_bytes_per_px_per_byte: float = 700.0  # live activation bytes per output px, per dtype byte
    fp32_slowdown: float = 4.0
    min_speedup: float = 1.25  # below this, `auto` decodes on every rank alone (no communication)
    # `auto` takes exact `tiled` over `patch` when its estimated time is at least `tiled_gain` lower, on
    # at most `tiled_max_world` ranks. The one-GPU rehearsal (docs/parallel.md) predicted `tiled` faster
    # at 1328² and 2048² on 4 ranks (2x2 tiles against 4 bands with 13-row margins: 1.86x against
    # 1.52x, 3.18x against 2.79x; this model: 2.64x / 2.33x, 3.25x / 3.03x) and a tie at 4096² on 8
    # (6.47x / 6.45x; model 7.03x / 6.94x, under the gain). On 8 ranks at 1328² and 2048² its eager
    # shares were slower (1.15x / 3.11x against 1.92x / 3.82x) though faster as CUDA graphs (7.1 / 13.3
    # ms against 7.9 / 14.7 ms per rank): `patch` keeps N > 4 until a multi-GPU run decides.
    tiled_gain: float = 0.05
    tiled_max_world: int = 4
    tile_sizes: tuple[int, ...] = (1024, 768, 512, 256)  # exact tile cores to try, output px
    scale: int = 8

    def for_topology(self, topology) -> CostModel:
        """This model with a decoder's own sizes, counted from its `DecoderTopology` (the rates stay:
        they are the hardware's): the local part's 3x3-conv FLOPs per output px times the Qwen-Image
        ratio of estimated work to them (4.1e6 / 3.9e6: norms, adds, upsamples; video frames in the
        same ratio to images), the mid block's channels and its two ResBlocks' convs per latent px, and
        the spatial scale. For the Qwen-Image VAE that is the defaults within 5%; the 2.1 VAE's decoder
        counts 15.5e6 FLOP per output px at 16x, 1152 mid channels (without this, `auto` estimated it as
        a Qwen-Image latent: 1.10x on 2 ranks at 1328², replicated, where the rehearsal predicted 1.45x
        for `patch`). The peak estimates keep the Qwen-Image figures (act_bytes_per_px_per_byte, 3
        output channels, 4 frames per latent frame): for the 2.1 VAE's banded decode ~2x too high."""
        conv = sum(18 * ci * co * lv["scale"] ** 2 for lv in topology.cost_levels() for ci, co in lv["convs"])
        local = conv / topology.scale ** 2 * _WORK_PER_CONV_FLOP
        mid = topology.levels[0].channels
        return replace(self, local_flop_per_px=local,
                       video_local_flop_per_px=local * self.video_local_flop_per_px / self.local_flop_per_px,
                       global_flop_per_latent_px=4 * 18 * mid * mid, mid_channels=mid, scale=topology.scale)


# The Qwen-Image decoder's estimated local work per output px (CostModel's default local_flop_per_px,
# 4.1e6) over the 3x3-conv FLOPs per output px its topology counts (3,903,552): for_topology gives the
# Qwen-Image VAE its default back
_WORK_PER_CONV_FLOP = 4.1e6 / 3_903_552


@dataclass(frozen=True)
class DecodeChoice:
    """What `auto` decided: `mode` is "replicated" (every rank decodes alone, single-device path),
    "patch" or "tiled" (exact tiles of `tile_sample_size` output px); estimates for the log."""

    mode: str
    margin: int
    tile_sample_size: int | None = None
    est_speedup: float = 1.0
    est_peak_bytes: float = 0.0
    reason: str = field(default="", compare=False)


def choose_decode(height: int, width: int, frames: int, world: int, dtype, free_bytes: float | None,
                  margin: int = 13, batch: int = 1, model: CostModel | None = None, halo: str = "auto",
                  topology=None, image_level_world: int | None = None) -> DecodeChoice:
    """`auto`: from the latent shape `(frames, height, width)` and batch, the world size, the dtype and
    the smallest free memory over ranks (None: unknown, assume it fits), the strategy and its
    parameters. `model` defaults to `CostModel().for_topology(topology)` (the defaults without a
    topology). `patch` is estimated with the halo it will use (`choose_patch_halo`, with
    `image_level_world` the model's `DecodeSurface.patch_level_image_world`); `level` needs the
    decoder's `topology`, a `qwenfast.vae.surface.DecoderTopology`, for its halo rows: without one it
    is estimated as `mid`), exact `tiled` with the largest tile that fits.
    Replicated single-device decode when the better estimated parallel speed-up is under
    `model.min_speedup` (and it fits); else `patch` when its per-rank peak fits, unless `tiled` is
    estimated `model.tiled_gain` faster on at most `model.tiled_max_world` ranks; `tiled` otherwise."""
    if min(height, width, frames, world, batch) < 1:
        raise ValueError(f"choose_decode needs positive sizes; got {height}x{width}, frames={frames}, "
                         f"world={world}, batch={batch}")
    halo = choose_patch_halo(frames, halo, world=world, image_level_world=image_level_world)
    if model is None:
        model = CostModel() if topology is None else CostModel().for_topology(topology)
    nbytes = _dtype_bytes(dtype)
    rate = 1.0 if nbytes <= 2 else model.fp32_slowdown
    s2 = model.scale ** 2
    out_frames = 1 + 4 * (frames - 1)
    local_flop = model.local_flop_per_px + (out_frames - 1) * model.video_local_flop_per_px  # per px, all frames
    n = height * width
    out_bytes = batch * 3 * out_frames * n * s2 * nbytes
    chunk_frames = 1 if frames == 1 else 6  # a latent frame becomes 4, plus the frame cache
    mid_bytes = 6 * batch * model.mid_channels * frames * n * nbytes  # latent-res maps: x, q, k, v, out, mid

    def t_local(area: float) -> float:
        return batch * area * s2 * local_flop * rate / model.conv_flop_per_s

    t_global = batch * frames * n * model.global_flop_per_latent_px * rate / model.conv_flop_per_s
    t_attn = batch * frames * 4.0 * n * n * model.mid_channels * rate / model.attention_flop_per_s
    comm_bytes = batch * frames * n * model.mid_channels * nbytes + out_bytes  # attention out + output

    def t_rank(area: float) -> float:
        """A parallel decode whose slowest rank runs the local part over `area` latent px (both modes
        split the attention's queries over every rank and gather its output and the pixels once)."""
        return t_local(area) + t_global + t_attn / world + comm_bytes / model.link_bytes_per_s + model.fixed_s

    def peak(window_area: float) -> float:
        return batch * window_area * s2 * chunk_frames * model.act_bytes_per_px_per_byte * nbytes + mid_bytes + 2 * out_bytes

    t_single = t_local(n) + t_global + t_attn
    single_peak = peak(n)

    def fits(b: float) -> bool:
        return free_bytes is None or b <= free_bytes

    def tiled_choice() -> tuple[DecodeChoice, bool]:
        """Exact tiles of the largest size whose peak fits (else the smallest), and whether it fits."""
        for size in model.tile_sizes:
            tiles = exact_tiles_for_ranks(height, width, max(1, size // model.scale), margin, world)
            loads = [sum(exact_tile_cost(tiles[i]) for i in b) for b in balance_lpt([exact_tile_cost(t) for t in tiles], world)]
            p = peak(max(t.window_area for t in tiles))
            if fits(p) or size == model.tile_sizes[-1]:
                return DecodeChoice("tiled", margin, size, t_single / t_rank(max(loads)), p), fits(p)
        raise AssertionError("unreachable")

    if world == 1:
        return DecodeChoice("replicated", margin, None, 1.0, single_peak, "one rank")
    bands = level_bands(height, width, world, topology.level_halos()) if halo == "level" and topology else None
    if bands is not None:  # the ideal band's work times level's redundancy (its halo rows at each level)
        area = n / world * patch_halo_costs(height, width, world, "level", topology, margin, nbytes)["redundancy"]
    else:  # mid (or level on bands too thin for it): the largest region's window
        halo = "mid"
        area = max(r.window_area for r in patch_regions(height, width, world, margin) if r is not None)
    patch = DecodeChoice("patch", margin, None, t_single / t_rank(area), peak(area))
    tiled, tiled_fits = tiled_choice()
    if fits(patch.est_peak_bytes):
        faster = (world <= model.tiled_max_world and tiled_fits
                  and 1 / tiled.est_speedup <= (1 - model.tiled_gain) / patch.est_speedup)
        best, why = ((tiled, f"exact tiles of {tiled.tile_sample_size} px estimated {tiled.est_speedup:.2f}x, "
                             f"patch ({halo}) {patch.est_speedup:.2f}x") if faster else
                     (patch, f"patch ({halo}) fits ({patch.est_peak_bytes / 2**30:.2f} GiB per rank), estimated "
                             f"speed-up {patch.est_speedup:.2f}"))
    else:
        best, why = tiled, (f"patch needs {patch.est_peak_bytes / 2**30:.2f} GiB per rank, more than the "
                            f"{(free_bytes or 0) / 2**30:.2f} GiB free")
    if best.est_speedup < model.min_speedup and fits(single_peak):
        return DecodeChoice("replicated", margin, None, 1.0, single_peak,
                            f"estimated {best.mode} speed-up {best.est_speedup:.2f} < {model.min_speedup}")
    return replace(best, reason=why)
