"""Exactness of the single-device decode paths, in float64: equal to the untiled decode to ~1e-14.

In fp32 a tile margin one latent pixel short hides under re-association noise (~2e-6); in float64 the
exact paths land at ~1e-15 while the short margin is off by >1e-6, so a tolerance of 1e-12 separates
them. Every check here has a mutation beside it that it must catch. The decode surface's own identities
(global = tail(attend(head)), a query slice of the attention = rows of the whole, local = its levels
chained) are checked the same way: the parallel strategies are built on them.
"""

import dataclasses

import pytest
import torch

from helpers import EXACT_ARCH, latent, max_diff, tiny_vae
from qwenfast import VAEConfig
from qwenfast.vae.tiling import exact_tiles

TOL = 1e-12  # exact paths: ~1e-15 in float64
CAUGHT = 1e-11  # what a one-pixel-short margin must exceed (it lands at >1e-6)
# (B, z, T, h, w): latents wider than a tile's window (2 px core + 2 x 5 px margin), so that margins bite
SHAPES = {"image B2": (2, 4, 1, 14, 13), "video T3": (1, 4, 3, 12, 14)}
TILE = 8  # output px: 2 latent px cores


@pytest.fixture(scope="module")
def vae():
    return tiny_vae(EXACT_ARCH)  # float64


@pytest.fixture(scope="module")
def untiled(vae):
    with torch.no_grad():
        return {name: vae.decode_untiled(latent(shape)) for name, shape in SHAPES.items()}


def exact_tiled(vae, z, **cfg):
    vae.vae_config = VAEConfig(use_tiling=True, exact_tile_sample_size=TILE, **cfg)
    try:
        with torch.no_grad():
            return vae.tiled_decode(z)
    finally:
        vae.vae_config = VAEConfig()


@pytest.mark.parametrize("name", SHAPES)
def test_exact_tiling_equals_untiled_in_float64(vae, untiled, name):
    z = latent(SHAPES[name])
    vae.vae_config = VAEConfig(exact_tile_sample_size=TILE)
    tiles = exact_tiles(vae, *z.shape[-2:])
    vae.vae_config = VAEConfig()
    assert len(tiles) >= 9 and any(t.window_area < z.shape[-2] * z.shape[-1] for t in tiles)
    assert max_diff(exact_tiled(vae, z), untiled[name]) <= TOL


@pytest.mark.parametrize("name", SHAPES)
def test_exact_tiling_one_pixel_short_is_caught(vae, untiled, name):
    """The mutation the exactness check must catch: a margin of receptive field - 1."""
    z = latent(SHAPES[name])
    assert max_diff(exact_tiled(vae, z, tile_margin=vae.decode_margin - 1), untiled[name]) > CAUGHT


def test_topology_one_conv_short_is_caught(vae, untiled):
    """A topology that forgets one conv at latent resolution derives a margin one pixel short: caught too."""
    topology = vae.topology
    first = topology.levels[0]
    short = dataclasses.replace(topology, levels=(
        dataclasses.replace(first, convs=first.convs - 1, conv_channels=()),) + topology.levels[1:])
    assert short.receptive_field() == topology.receptive_field() - 1
    z = latent(SHAPES["image B2"])
    try:
        vae.topology = short
        out = exact_tiled(vae, z)
    finally:
        vae.topology = topology
    assert max_diff(out, untiled["image B2"]) > CAUGHT


@pytest.mark.parametrize("name", SHAPES)
def test_global_part_is_head_attend_tail(vae, name):
    z = latent(SHAPES[name])
    with torch.no_grad():
        staged = vae.decode_tail(vae.attend(vae.decode_head(z)))
        assert max_diff(staged, vae.decode_global(z)) <= TOL


def test_attention_query_slice_is_rows_of_the_whole(vae):
    a = latent((2, vae.topology.levels[0].channels, 2, 5, 7), seed=3)
    with torch.no_grad():
        whole = vae.attend(a)  # (B, C, T, h, w)
        rows = vae.attend(a, queries=(9, 23))  # (B, T, 14, C)
    assert rows.shape == (2, 2, 14, a.shape[1])
    assert max_diff(rows, whole.flatten(3).permute(0, 2, 3, 1)[:, :, 9:23]) <= TOL
    with torch.no_grad():
        shifted = vae.attend(a, queries=(10, 24))  # a slice off by one token is caught
    assert max_diff(shifted, whole.flatten(3).permute(0, 2, 3, 1)[:, :, 9:23]) > CAUGHT


@pytest.mark.parametrize("name", SHAPES)
def test_local_part_is_its_levels_chained(vae, name):
    h = latent((*SHAPES[name][:1], vae.topology.levels[0].channels, *SHAPES[name][2:3], 9, 8), seed=4)

    def chain(x, cache):
        for i in range(len(vae.topology.levels)):
            x = vae.decode_level(i, x, cache)
        return x

    with torch.no_grad():
        assert max_diff(vae.stream(chain, h, desc="levels"), vae.decode_local(h)) <= TOL


def test_topology_of_the_full_size_decoder():
    """Every reach the strategies use, read from the one topology of the released architecture."""
    from qwenfast import QwenImageVAE

    with torch.device("meta"):
        topology = QwenImageVAE().topology
    assert topology.receptive_field() == 13
    assert topology.tail_reach() == 2
    assert topology.level_halos() == [(1, 7), (2, 7), (4, 7), (8, 7)]
    assert topology.scale == 8
    assert [lv["scale"] for lv in topology.cost_levels()] == [1, 2, 4, 8]
