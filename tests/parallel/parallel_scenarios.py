"""What every rank runs in the multi-rank tests (imported by file path in the spawned ranks).

Each scenario decodes with a parallel mode and returns, per rank, max|Δ| against the single-device
decode it must equal (computed on the same rank with the same seeded model), or the exception's
type: the parent test asserts over all ranks at once. Everything in float64: exact modes land at
~1e-15 there, and the "margin-1" cases (the tile margin one latent pixel short) must be caught.
"""

from __future__ import annotations

import torch

import helpers
from qwenfast.config import VAEConfig

MARGIN = 9  # the receptive field of helpers.TINY (checked in run_cases)
# Small tiles so that tiny latents have several: exact cores of 8 latent px; blend tiles of 8, stride 6.
SMALL_TILES = dict(exact_tile_sample_size=64, tile_sample_min_height=64, tile_sample_min_width=64,
                   tile_sample_stride_height=48, tile_sample_stride_width=48)


def tiny_vae():
    return helpers.tiny_vae(helpers.TINY)  # float64


def latent(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    """fp32, as callers pass latents; `decode` casts to the model's float64 (references: `.double()`)."""
    return helpers.latent(shape, seed, dtype=torch.float32)


# (name, latent shape (B, z, T, h, w), config, reference: "untiled" | "blend")
CASES = [
    ("patch 13x21 B2", (2, 4, 1, 13, 21), dict(parallel_decode_mode="patch"), "untiled"),
    ("tiled exact 13x21 B2", (2, 4, 1, 13, 21), dict(parallel_decode_mode="tiled"), "untiled"),
    ("tiled blend 13x21", (1, 4, 1, 13, 21), dict(parallel_decode_mode="tiled", tiling="blend"), "blend"),
    ("auto 13x21", (1, 4, 1, 13, 21), dict(parallel_decode_mode="auto"), "untiled"),
    ("patch 1x40", (1, 4, 1, 1, 40), dict(parallel_decode_mode="patch"), "untiled"),
    ("tiled exact 1x40", (1, 4, 1, 1, 40), dict(parallel_decode_mode="tiled"), "untiled"),
    ("patch 9x7 rank0", (1, 4, 1, 9, 7), dict(parallel_decode_mode="patch", parallel_output="rank0"), "untiled"),
    ("tiled exact 9x7 rank0", (1, 4, 1, 9, 7), dict(parallel_decode_mode="tiled", parallel_output="rank0"), "untiled"),
    ("tiled blend 9x15 rank0", (1, 4, 1, 9, 15),
     dict(parallel_decode_mode="tiled", tiling="blend", parallel_output="rank0"), "blend"),
    ("patch video T3 6x9", (1, 4, 3, 6, 9), dict(parallel_decode_mode="patch", patch_halo="mid"), "untiled"),
    ("tiled exact video T3 6x9", (1, 4, 3, 6, 9), dict(parallel_decode_mode="tiled"), "untiled"),
    ("tiled blend video T3 6x9", (1, 4, 3, 6, 9), dict(parallel_decode_mode="tiled", tiling="blend"), "blend"),
    ("patch level 40x9 B2", (2, 4, 1, 40, 9), dict(parallel_decode_mode="patch", patch_halo="level"), "untiled"),
    ("patch level video T3 24x6", (1, 4, 3, 24, 6), dict(parallel_decode_mode="patch", patch_halo="level"), "untiled"),
    ("patch level 20x7 rank0", (1, 4, 1, 20, 7),
     dict(parallel_decode_mode="patch", patch_halo="level", parallel_output="rank0"), "untiled"),
    ("patch level 13x21 thin bands", (1, 4, 1, 13, 21), dict(parallel_decode_mode="patch", patch_halo="level"), "untiled"),
    ("patch bands 40x5", (1, 4, 1, 40, 5), dict(parallel_decode_mode="patch", patch_halo="mid"), "untiled"),
    # mutations: one pixel short of the receptive field; windows smaller than the latent, so it bites
    ("patch margin-1 40x9", (1, 4, 1, 40, 9), dict(parallel_decode_mode="patch", patch_halo="mid", tile_margin=MARGIN - 1),
     "untiled"),
    ("tiled exact margin-1 22x22", (1, 4, 1, 22, 22),
     dict(parallel_decode_mode="tiled", exact_tile_sample_size=32, tile_margin=MARGIN - 1), "untiled"),
]


def reference(vae, z: torch.Tensor, ref_kind: str, small_tiles: dict) -> torch.Tensor:
    """What a parallel mode must equal: the single-device untiled decode, or single-device blend tiling."""
    if ref_kind == "untiled":
        vae.vae_config = VAEConfig()
        return vae.decode_untiled(z)
    vae.vae_config = VAEConfig(use_tiling=True, tiling="blend", **small_tiles)
    return vae.tiled_decode(z)


def parallel_result(vae, z: torch.Tensor, cfg: dict, ref: torch.Tensor, small_tiles: dict) -> dict:
    """One parallel decode of `z` with `cfg` on this rank: its error, or (None, shape, stats, max|Δ| vs `ref`)."""
    vae.vae_config = VAEConfig(use_parallel_decode=True, **{**small_tiles, **cfg})
    try:
        out = vae._decode_with_parallel_dispatch(z)
    except Exception as e:  # noqa: BLE001 - reported, asserted by the parent
        return dict(error=f"{type(e).__name__}: {e}")
    stats = dict(vae.last_parallel_stats)
    if out is None:
        return dict(none=True, stats=stats)
    return dict(none=False, shape=tuple(out.shape), stats=stats, max_abs=(out - ref).abs().max().item())


def run_cases(rank: int, world: int) -> dict:
    vae = tiny_vae()
    assert vae.decode_margin == MARGIN
    results: dict = {}
    refs: dict = {}
    with torch.no_grad():
        for name, shape, cfg, ref_kind in CASES:
            z = latent(shape).double()
            key = (shape, ref_kind)
            if key not in refs:
                refs[key] = reference(vae, z, ref_kind, SMALL_TILES)
            results[name] = parallel_result(vae, z, cfg, refs[key], SMALL_TILES)
        # The public API: decode() with parallel decode = decode() without, clamped, 4-D in and out.
        z = latent((1, 4, 13, 21), seed=2)
        vae.vae_config = VAEConfig()
        plain = vae.decode(z)
        vae.vae_config = VAEConfig(use_parallel_decode=True, parallel_decode_mode="patch")
        par = vae.decode(z)
        results["public decode"] = dict(shape=tuple(par.shape), max_abs=(par - plain).abs().max().item())
    return results


def run_faults(rank: int, world: int) -> dict:
    """Faults, one after another on the same group (each must leave every rank in step)."""
    vae = tiny_vae()
    results = {}
    z = latent((1, 4, 1, 9, 11))

    def attempt(name, z_rank, cfg):
        vae.vae_config = VAEConfig(use_parallel_decode=True, **cfg)
        try:
            with torch.no_grad():
                vae._decode_with_parallel_dispatch(z_rank)
            results[name] = "ok"
        except Exception as e:  # noqa: BLE001
            results[name] = type(e).__name__

    # A bad input seen by rank 1 only (wrong channel count).
    attempt("bad input on rank 1", latent((1, 3, 1, 9, 11)) if rank == 1 else z, dict(parallel_decode_mode="patch"))
    # A latent that differs between ranks (same shape, one value changed on the last rank).
    z_diff = z.clone()
    if rank == world - 1:
        z_diff[0, 0, 0, 4, 5] += 1e-3
    attempt("latent differs", z_diff, dict(parallel_decode_mode="tiled"))
    # A shape that differs between ranks.
    attempt("shape differs", latent((1, 4, 1, 9, 12)) if rank == 0 else z, dict(parallel_decode_mode="patch"))
    # A rank that raises in the middle of the decode (in its local part).
    # (instance attributes shadow the surface's methods on rank 1 only; deleted after)
    if rank == 1:
        def broken(h):
            raise RuntimeError("injected failure in the local part")
        vae.decode_local = broken
    attempt("raise mid-decode patch", z, dict(parallel_decode_mode="patch"))
    attempt("raise mid-decode tiled", z, dict(parallel_decode_mode="tiled", exact_tile_sample_size=32))
    if rank == 1:
        del vae.decode_local
    # ... and in the middle of the level-halo local part (between two exchanges), on rank 1 only.
    if rank == 1:
        level = vae.decode_level

        def broken_level(i, x, cache):
            if i == 2:
                raise RuntimeError("injected failure in level 2")
            return level(i, x, cache)
        vae.decode_level = broken_level
    attempt("raise mid-decode level", latent((1, 4, 1, 20, 7)), dict(parallel_decode_mode="patch", patch_halo="level"))
    if rank == 1:
        del vae.decode_level
    # The group still works after all of that.
    attempt("after faults", z, dict(parallel_decode_mode="patch"))
    return results
