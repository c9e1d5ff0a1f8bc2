"""The cases the rehearsal is compared on (shared by the test and the spawned ranks)."""

from __future__ import annotations

import torch

from qwenfast.config import VAEConfig
from qwenfast.parallel.dispatch import decode_parallel
from qwenfast.vae.qwen_image import QwenImageVAE

TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, latents_mean=[0] * 4, latents_std=[1] * 4)

# (name, latent shape (B, z, T, h, w), VAEConfig fields)
CASES = [
    ("patch", (1, 4, 1, 13, 21), dict(parallel_decode_mode="patch")),
    ("patch level", (1, 4, 1, 40, 9), dict(parallel_decode_mode="patch", patch_halo="level")),
    ("tiled exact", (2, 4, 1, 13, 21), dict(parallel_decode_mode="tiled", exact_tile_sample_size=64)),
    ("tiled blend rank0", (1, 4, 1, 9, 15), dict(parallel_decode_mode="tiled", tiling="blend", parallel_output="rank0",
                                                tile_sample_min_height=64, tile_sample_min_width=64,
                                                tile_sample_stride_height=48, tile_sample_stride_width=48)),
    ("patch video", (1, 4, 3, 6, 9), dict(parallel_decode_mode="patch", patch_halo="mid")),
]


def tiny_vae() -> QwenImageVAE:
    torch.manual_seed(0)
    return QwenImageVAE(**TINY).eval()


def latent(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def stats_of_every_case(make_comm) -> dict:
    """Per case: the output shape and the counters of a fresh `make_comm()` after one parallel decode
    (a real group's comm in the spawned ranks, a RehearsalComm in the test: the same loop for both)."""
    vae = tiny_vae()
    out = {}
    with torch.no_grad():
        for name, shape, cfg in CASES:
            vae.vae_config = VAEConfig(use_parallel_decode=True, **cfg)
            comm = make_comm()
            y = decode_parallel(vae, latent(shape), comm=comm)
            out[name] = dict(shape=None if y is None else tuple(y.shape), **comm.stats())
    return out
