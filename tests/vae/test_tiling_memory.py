"""Exact tiling keeps no decoded window beyond its tile: each tile's core is kept as a compact copy and
the window (core + margins) dropped before the next tile decodes (a spy on `decode_local` over the
storages it returned), for images and for video (each tile streaming all frames with its own frame
cache); the output is bit for bit what holding the windows gave, and the peak of live storages drops
by at least one output against holding them."""

from __future__ import annotations

import weakref

import pytest
import torch

from helpers import ARCHS21, latent, max_diff, pair21, tiny_vae
from qwenfast import VAEConfig
from qwenfast.benchmarking import LiveMemory
from qwenfast.vae import tiling


def case(name: str):
    """(model, latent) in float32 with 2-latent-pixel tiles: many tiles, each window mostly margin."""
    if name == "vae21":
        vae = pair21(ARCHS21["released-shape"])[1]
        z = torch.randn(1, vae.z_dim, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    else:
        vae = tiny_vae(dtype=torch.float32)
        z = latent((1, vae.z_dim, 3 if name == "video" else 1, 6, 6), seed=5, dtype=torch.float32)
    vae.vae_config = VAEConfig(use_tiling=True, exact_tile_sample_size=2 * vae.spatial_compression_ratio)
    return vae, z


def held_windows(vae, z: torch.Tensor) -> torch.Tensor:
    """The former exact tiling: every tile's core a view of its decoded window, all held until placed."""
    h = vae.decode_global(z)
    tiles = tiling.exact_tiles(vae, h.shape[-2], h.shape[-1])
    s, cores = vae.spatial_compression_ratio, []
    for tile in tiles:
        cy, cx = tile.crop_slices(s)
        cores.append(vae.decode_local(h[..., tile.wy0:tile.wy1, tile.wx0:tile.wx1])[..., cy, cx])
    return tiling.place_cores(vae, cores, tiles, z)


@torch.no_grad()
@pytest.mark.parametrize("name", ["image", "video", "vae21"])
def test_no_decoded_tile_outlives_its_placement(name, monkeypatch):
    vae, z = case(name)
    expected = held_windows(vae, z)
    pieces, alive_at_call = [], []
    decode_local = vae.decode_local

    def spy(h):
        alive_at_call.append(sum(ref() is not None for ref in pieces))
        piece = decode_local(h)
        pieces.append(weakref.ref(piece.untyped_storage()))
        return piece

    monkeypatch.setattr(vae, "decode_local", spy)
    out = tiling.tiled_decode_exact(vae, z)
    assert len(alive_at_call) == len(tiling.exact_tiles(vae, *z.shape[-2:])) > 4
    assert alive_at_call == [0] * len(alive_at_call)
    assert torch.equal(out, expected)  # bit for bit the former exact tiling
    monkeypatch.undo()
    assert max_diff(out, vae.decode_untiled(z)) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("name", ["image", "video"])
def test_peak_drops_by_at_least_one_output(name):
    vae, z = case(name)
    out_bytes = z.new_empty(vae.output_shape(z)).nbytes
    peaks = []
    for fn in (lambda: tiling.tiled_decode_exact(vae, z), lambda: held_windows(vae, z)):
        with LiveMemory(block=1) as mem:
            mem.track(list(vae.parameters()) + [z], "resident")
            fn()
        peaks.append(mem.peak_bytes)
    assert peaks[0] <= peaks[1] - out_bytes, (peaks, out_bytes)
