"""Video latents (T = 2 and 3 latent frames) through exact tiling and every exact parallel mode, in
float64, on the smallest decoder of the family (helpers.EXACT_ARCH: margin 5, 4x spatial, 2x temporal),
with latents larger than a tile's or a band's window so that margins bite. Used by the spawned ranks
(`run_cases`) and by the single-device test (`exact_tiled`, `shared_frame_cache`).

Each tile (and each rank's region) streams its frames with its own frame cache; the mutations show
what that and the margins guard: a margin or a level halo one row short, and one frame cache shared
by the tiles of a rank (the next tile's causal convs then see the previous tile's frames).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

import helpers
from parallel_scenarios import parallel_result
from qwenfast.config import VAEConfig
from qwenfast.vae import qwen_image
from qwenfast.vae.video import FrameCache

TILE = 8  # exact tile cores of 2 latent px: windows of 2 + 2 x 5 = 12 < the latents' 14 rows
TILES = dict(exact_tile_sample_size=TILE)
# (B, z, T, h, w). "T3 small": every tile's window is the whole latent (a core of 2 + 5 reaches 6), so tiles
# differ only in their cores and a frame cache shared between tiles fits them all: it gives wrong
# numbers, not a shape error.
SHAPES = {"T2": (1, 4, 2, 14, 13), "T3": (1, 4, 3, 14, 11), "T3 small": (1, 4, 3, 6, 6)}
MODES = {
    "tiled exact": dict(parallel_decode_mode="tiled"),
    "patch mid": dict(parallel_decode_mode="patch", patch_halo="mid"),  # (explicit: "auto" picks level for video)
    "patch level": dict(parallel_decode_mode="patch", patch_halo="level"),
}
# (name, shape key, config, mutation): every mode at both lengths, then the mutations it must catch
CASES = [(f"{mode} {t}", t, cfg, None) for mode, cfg in MODES.items() for t in ("T2", "T3")] + [
    ("tiled exact T3 small", "T3 small", MODES["tiled exact"], None),
    ("tiled exact T3 margin-1", "T3", dict(MODES["tiled exact"], tile_margin=4), None),
    ("patch mid T3 margin-1", "T3", dict(MODES["patch mid"], tile_margin=4), None),
    ("patch level T3 halo-1", "T3", MODES["patch level"], "short level halo"),
    ("tiled exact T3 small shared cache", "T3 small", MODES["tiled exact"], "shared frame cache"),
]


def tiny_vae():
    return helpers.tiny_vae(helpers.EXACT_ARCH)  # float64


def latent(key: str) -> torch.Tensor:
    return helpers.latent(SHAPES[key])


@contextlib.contextmanager
def shared_frame_cache():
    """The mutation: every stream of the block gets the same FrameCache, so the tiles of one pass
    share their causal layers' past frames (each tile's first frame resets its causal convs' past,
    but not that of the time conv of an `upsample3d`, which only sees later frames)."""
    shared = FrameCache()
    original = qwen_image.FrameCache
    qwen_image.FrameCache = lambda: shared  # what QwenImageVAE._stream builds its cache with
    try:
        yield
    finally:
        qwen_image.FrameCache = original


@contextlib.contextmanager
def short_level_halo(vae):
    """The mutation: a topology with one conv fewer at level 1, so its level halo is one row short
    (the modules still run every conv)."""
    topology = vae.topology
    levels = list(topology.levels)
    levels[1] = dataclasses.replace(levels[1], convs=levels[1].convs - 1, conv_channels=())
    vae.topology = dataclasses.replace(topology, levels=tuple(levels))
    assert vae.topology.level_halos()[1][1] == topology.level_halos()[1][1] - 1
    try:
        yield
    finally:
        vae.topology = topology


def exact_tiled(vae, z: torch.Tensor, **cfg) -> torch.Tensor:
    """Single-device exact tiling of `z` with 2 latent px tile cores."""
    vae.vae_config = VAEConfig(use_tiling=True, **TILES, **cfg)
    try:
        return vae.tiled_decode(z)
    finally:
        vae.vae_config = VAEConfig()


def run_cases(rank: int, world: int) -> dict:
    vae = tiny_vae()
    assert vae.decode_margin == 5
    results: dict = {}
    with torch.no_grad():
        refs = {key: vae.decode_untiled(latent(key)) for key in SHAPES}
        mid_collectives = {}
        for name, key, cfg, mutation in CASES:
            z = latent(key)
            with (shared_frame_cache() if mutation == "shared frame cache" else
                  short_level_halo(vae) if mutation == "short level halo" else contextlib.nullcontext()):
                results[name] = parallel_result(vae, z, cfg, refs[key], TILES)
            if name.startswith("patch mid") and "stats" in results[name]:
                mid_collectives[key] = results[name]["stats"]["collectives"]
        results["mid collectives"] = mid_collectives
        results["output frames"] = {key: vae.output_shape(latent(key))[2] for key in SHAPES}
    return results
