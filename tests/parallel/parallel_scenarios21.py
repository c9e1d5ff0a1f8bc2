"""What every rank runs in the Qwen-Image-2.1 VAE's multi-rank tests (imported by file path in the
spawned ranks): each parallel mode against the single-device decode it must equal, in float64."""

from __future__ import annotations

import torch

from qwenfast.config import VAEConfig
from qwenfast.vae.qwen_image21 import QwenImage21VAE

from parallel_scenarios import parallel_result, reference  # the same per-case steps as the Qwen-Image VAE

ARCHS = {
    "tiny": dict(base_dim=4, decoder_base_dim=6, z_dim=6, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                 temperal_downsample=[False, True, True], latents_mean=[0.0] * 6, latents_std=[1.0] * 6,
                 scale_factor_spatial=8),
    "patch2": dict(base_dim=4, decoder_base_dim=4, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                   temperal_downsample=[False, True], in_channels=16, out_channels=16, patch_size=2,
                   latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_spatial=8),
}
# exact cores of 4 latent px; blend tiles of 4 latent px, stride 3 (both archs are 8x)
SMALL_TILES = dict(exact_tile_sample_size=32, tile_sample_min_height=32, tile_sample_min_width=32,
                   tile_sample_stride_height=24, tile_sample_stride_width=24)
# (name, arch, latent shape (B, z, 1, h, w) with z filled in, config, reference: "untiled" | "blend")
CASES = [
    ("tiled exact B2", "tiny", (2, 11, 9), dict(parallel_decode_mode="tiled"), "untiled"),
    ("tiled blend", "tiny", (1, 11, 9), dict(parallel_decode_mode="tiled", tiling="blend"), "blend"),
    ("patch mid B2", "tiny", (2, 11, 9), dict(parallel_decode_mode="patch"), "untiled"),
    ("patch level", "tiny", (1, 30, 7), dict(parallel_decode_mode="patch", patch_halo="level"), "untiled"),
    ("auto", "tiny", (1, 11, 9), dict(parallel_decode_mode="auto"), "untiled"),
    ("patch mid rank0", "patch2", (1, 9, 10), dict(parallel_decode_mode="patch", parallel_output="rank0"), "untiled"),
    ("patch level p2", "patch2", (1, 30, 5), dict(parallel_decode_mode="patch", patch_halo="level"), "untiled"),
    ("tiled exact p2", "patch2", (1, 9, 10), dict(parallel_decode_mode="tiled"), "untiled"),
    ("tiled blend p2", "patch2", (1, 9, 10), dict(parallel_decode_mode="tiled", tiling="blend"), "blend"),
]


def tiny_vae(arch: str) -> QwenImage21VAE:
    torch.manual_seed(0)
    vae = QwenImage21VAE(**ARCHS[arch]).eval().double()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.add_(0.3 * torch.randn_like(p))
    return vae


def run_cases(rank: int, world: int) -> dict:
    vaes = {arch: tiny_vae(arch) for arch in ARCHS}
    results: dict = {}
    with torch.no_grad():
        for name, arch, (b, h, w), cfg, ref_kind in CASES:
            vae = vaes[arch]
            z = torch.randn(b, vae.z_dim, 1, h, w, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            results[name] = parallel_result(vae, z, cfg, reference(vae, z, ref_kind, SMALL_TILES), SMALL_TILES)
        # `level` shares with every level in row bands (the 2.1 VAE bands its local part; forced here,
        # where the planner would run these tiny levels whole)
        from qwenfast.vae import bands

        cfg = dict(parallel_decode_mode="patch", patch_halo="level")
        previous, bands.LOCAL_BAND_OVERHEAD = bands.LOCAL_BAND_OVERHEAD, 100.0
        try:  # the patch_size 2 arch: its last level (head and unpatchify) banded too
            for name, arch, w in (("patch level banded", "tiny", 7), ("patch level banded p2", "patch2", 5)):
                vae = vaes[arch]
                z = torch.randn(1, vae.z_dim, 1, 30, w, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
                results[name] = parallel_result(vae, z, cfg, reference(vae, z, "untiled", SMALL_TILES), SMALL_TILES)
        finally:
            bands.LOCAL_BAND_OVERHEAD = previous
        # the public API: decode() with parallel decode = decode() without, clamped, 4-D in and out
        vae = vaes["tiny"]
        z = torch.randn(1, vae.z_dim, 10, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        vae.vae_config = VAEConfig()
        plain = vae.decode(z)
        vae.vae_config = VAEConfig(use_parallel_decode=True, parallel_decode_mode="patch")
        par = vae.decode(z)
        results["public decode"] = dict(shape=tuple(par.shape), max_abs=(par - plain).abs().max().item())
        # a latent with the wrong channels fails on every rank, in one line
        try:
            vae.decode(torch.zeros(1, 16, 4, 4, dtype=torch.float64))
            results["bad latent"] = dict(error=None)
        except Exception as e:  # noqa: BLE001
            results["bad latent"] = dict(error=f"{type(e).__name__}: {e}")
    return results
