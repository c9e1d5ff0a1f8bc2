"""The pure planning functions: partitions, balancing, halo costs and auto's decision table."""

from __future__ import annotations

import pytest
import torch

from qwenfast.parallel import plan


def covers_once(tiles, height, width):
    seen = [[0] * width for _ in range(height)]
    for t in tiles:
        assert 0 <= t.wy0 <= t.y0 < t.y1 <= t.wy1 <= height and 0 <= t.wx0 <= t.x0 < t.x1 <= t.wx1 <= width
        for y in range(t.y0, t.y1):
            for x in range(t.x0, t.x1):
                seen[y][x] += 1
    return all(v == 1 for row in seen for v in row)


@pytest.mark.parametrize("height,width,world,margin", [
    (166, 166, 3, 13), (116, 208, 8, 13), (13, 21, 4, 9), (1, 40, 4, 9), (9, 7, 3, 9), (2, 2, 8, 13),
    (512, 512, 8, 13), (40, 5, 4, 9),
])
def test_patch_regions_cover_the_latent_once_without_padding(height, width, world, margin):
    regions = plan.patch_regions(height, width, world, margin)
    assert len(regions) == world
    tiles = [r for r in regions if r is not None]
    assert regions[len(tiles):] == [None] * (world - len(tiles))  # idle ranks are the last ones
    assert covers_once(tiles, height, width)
    for t in tiles:  # windows: the core plus the margin, clipped to the latent (never beyond it)
        assert (t.wy0, t.wy1) == (max(0, t.y0 - margin), min(height, t.y1 + margin))
        assert (t.wx0, t.wx1) == (max(0, t.x0 - margin), min(width, t.x1 + margin))


def test_patch_regions_bands_when_thick_enough_grid_otherwise():
    bands = plan.patch_regions(166, 166, 4, 13)
    assert [(t.y0, t.y1) for t in bands] == [(0, 42), (42, 84), (84, 125), (125, 166)]  # uneven, no padding
    assert all((t.x0, t.x1) == (0, 166) for t in bands)
    grid = plan.patch_regions(40, 200, 8, 13)  # bands of 5 rows < margin 13: a 2-D grid
    assert any(t.x1 - t.x0 < 200 for t in grid if t is not None)
    wide = plan.patch_regions(1, 40, 4, 9)  # a world larger than the number of rows: columns
    assert [(t.x0, t.x1) for t in wide] == [(0, 10), (10, 20), (20, 30), (30, 40)]


def test_balance_lpt_is_deterministic_and_balanced():
    costs = [7, 7, 5, 5, 4, 3, 3, 2]
    bins = plan.balance_lpt(costs, 3)
    assert sorted(i for b in bins for i in b) == list(range(len(costs)))
    loads = [sum(costs[i] for i in b) for b in bins]
    assert max(loads) - min(loads) <= max(costs)  # no rank has two tiles' more work than another
    assert max(loads) <= sum(costs) / 3 + max(costs)  # LPT's bound; here 13 against the ideal 12
    assert bins == plan.balance_lpt(costs, 3)
    assert plan.balance_lpt([1.0], 4) == [[0], [], [], []]  # a rank with no tile is fine


def test_exact_tiles_balanced_over_ranks_by_window_cost():
    tiles = plan.exact_tiles(256, 256, 128, 13)  # 4 tiles, equal windows
    bins = plan.balance_lpt([plan.exact_tile_cost(t) for t in tiles], 4)
    assert sorted(len(b) for b in bins) == [1, 1, 1, 1]


def qwen_image_topology():
    """The full-size Qwen-Image decoder's topology, read from the model's module tree (no weights)."""
    from qwenfast import QwenImageVAE

    with torch.device("meta"):
        return QwenImageVAE().topology


def test_halo_costs_level_trades_compute_for_messages():
    topology = qwen_image_topology()
    mid = plan.patch_halo_costs(512, 512, 8, "mid", topology)
    level = plan.patch_halo_costs(512, 512, 8, "level", topology)
    assert mid["messages_per_rank"] == 0 and mid["halo_bytes_per_rank"] == 0
    assert 1.3 < mid["redundancy"] < 1.5  # a 64-row band decodes 90 rows: ~1.4x
    assert level["redundancy"] < 1.1 and level["messages_per_rank"] == 8
    assert level["flops_single"] == mid["flops_single"]
    assert mid["flops_single"] == 65490735071232.0  # the seed's count (architecture numbers), unchanged
    assert plan.patch_halo_costs(512, 512, 1, "mid", topology)["redundancy"] == 1.0


GIB = 2**30


@pytest.mark.parametrize("height,width,frames,world,dtype,free,mode,tile", [
    (166, 166, 1, 1, "bfloat16", None, "replicated", None),      # one rank
    (64, 64, 1, 2, "bfloat16", None, "replicated", None),        # 512²: gain too small
    (32, 32, 1, 8, "bfloat16", 80 * GIB, "replicated", None),
    (166, 166, 1, 2, "bfloat16", 80 * GIB, "patch", None),       # 1328²
    (166, 166, 1, 4, "bfloat16", 80 * GIB, "tiled", 1024),       # 2x2 tiles beat 4 thin bands (rehearsal: 1.86x vs 1.52x)
    (166, 166, 1, 8, "bfloat16", 80 * GIB, "patch", None),       # more than tiled_max_world ranks
    (256, 256, 1, 2, "bfloat16", 80 * GIB, "patch", None),       # 2048²
    (256, 256, 1, 4, "bfloat16", 80 * GIB, "tiled", 1024),       # rehearsal: 3.18x vs 2.79x
    (512, 512, 1, 4, "bfloat16", 80 * GIB, "patch", None),       # 4096²
    (512, 512, 1, 8, "bfloat16", 80 * GIB, "patch", None),
    (90, 160, 21, 2, "bfloat16", 80 * GIB, "patch", None),       # 720p, 81 frames: patch with level halos
    (90, 160, 21, 4, "bfloat16", 80 * GIB, "patch", None),
    (90, 160, 21, 8, "bfloat16", 80 * GIB, "patch", None),
    (512, 512, 1, 4, "bfloat16", 4 * GIB, "tiled", 1024),        # patch does not fit: the largest tile that does
    (512, 512, 1, 4, "bfloat16", 1 * GIB, "tiled", 256),
    (512, 512, 1, 2, "float32", 8 * GIB, "tiled", 1024),
    (512, 512, 1, 2, "float32", 4 * GIB, "tiled", 512),
    (64, 64, 1, 2, "bfloat16", 0.1 * GIB, "tiled", 256),         # small gain, but replicated does not fit
])
def test_auto_decision_table(height, width, frames, world, dtype, free, mode, tile):
    choice = plan.choose_decode(height, width, frames, world, dtype, free, topology=qwen_image_topology())
    assert (choice.mode, choice.tile_sample_size) == (mode, tile), choice.reason
    if free is not None and mode == "patch":
        assert choice.est_peak_bytes <= free


def test_auto_is_pure_and_rejects_bad_sizes():
    a = plan.choose_decode(256, 256, 1, 4, "bfloat16", 40 * GIB)
    assert a == plan.choose_decode(256, 256, 1, 4, "bfloat16", 40 * GIB)
    with pytest.raises(ValueError, match="world=0"):
        plan.choose_decode(256, 256, 1, 0, "bfloat16", None)


@pytest.mark.parametrize("height,width,core,world,expect", [
    (166, 166, 128, 8, 8),    # 1328², 1024-px tiles: 4 tiles for 8 ranks → split to 8
    (512, 512, 128, 8, 16),   # enough tiles already: unchanged
    (1, 40, 128, 4, 4),       # one row: columns
    (2, 2, 128, 8, 1),        # fewer pixels than ranks: as exact_tiles
    (20, 3, 128, 4, 4),
])
def test_exact_tiles_for_ranks_has_a_tile_per_rank_where_it_can(height, width, core, world, expect):
    tiles = plan.exact_tiles_for_ranks(height, width, core, 13, world)
    assert len(tiles) == expect
    assert covers_once(tiles, height, width)


@pytest.mark.parametrize("frames,halo,world,image_level_world,expect", [
    (1, "auto", 8, None, "mid"), (21, "auto", 2, None, "level"), (2, "auto", 2, None, "level"),  # Qwen-Image
    (1, "auto", 2, 4, "mid"), (1, "auto", 4, 4, "level"), (1, "auto", 8, 4, "level"),  # Qwen-Image images
    (1, "auto", 2, 2, "level"), (1, "auto", 1, 2, "mid"),  # the 2.1 VAE's images (one rank: nothing to exchange)
    (1, "level", 2, None, "level"), (21, "mid", 8, 4, "mid"), (1, "mid", 8, 4, "mid"),  # explicit: as given
])
def test_patch_halo_auto_follows_the_rehearsal(frames, halo, world, image_level_world, expect):
    assert plan.choose_patch_halo(frames, halo, world=world, image_level_world=image_level_world) == expect


def test_each_model_declares_when_its_images_take_level_halos():
    from qwenfast import QwenImage21VAE, QwenImageVAE

    assert QwenImageVAE.patch_level_image_world == 4  # a tie at N = 2, level ahead from 4 ranks on
    assert QwenImage21VAE.patch_level_image_world == 2  # level ahead at every N rehearsed


def test_patch_halo_choice_rejects_bad_values():
    with pytest.raises(ValueError, match="patch_halo must be 'auto', 'mid' or 'level'; got 'wide'"):
        plan.choose_patch_halo(1, "wide", world=2, image_level_world=None)
    with pytest.raises(ValueError, match="frames >= 1 and world >= 1; got frames=0, world=1"):
        plan.choose_patch_halo(0, world=1, image_level_world=None)
    with pytest.raises(ValueError, match="got frames=1, world=0"):
        plan.choose_patch_halo(1, "auto", world=0, image_level_world=None)
    with pytest.raises(TypeError):  # the world and the model's trait are the contract: never defaulted
        plan.choose_patch_halo(1, "auto")


def test_auto_estimates_patch_with_the_halo_it_will_use():
    """81x720p on 4 ranks: `mid`'s 13-row margins on 22-row bands cost 2.2x the work, so estimated as
    `mid` the tiles win; with the `level` halos that `auto` picks for video (and the decoder's
    topology for their rows), `patch` does, as the rehearsal predicted (3.34x against 2.39x)."""
    topology = qwen_image_topology()
    as_level = plan.choose_decode(90, 160, 21, 4, "bfloat16", None, topology=topology)
    as_mid = plan.choose_decode(90, 160, 21, 4, "bfloat16", None, topology=topology, halo="mid")
    assert (as_level.mode, as_mid.mode) == ("patch", "tiled")
    assert "patch (level)" in as_level.reason
    assert plan.choose_decode(90, 160, 21, 4, "bfloat16", None).mode == "tiled"  # no topology: estimated as mid
    # 3 latent rows per band cannot carry level 0's 7-row halo: estimated (and decoded) as mid
    assert plan.level_bands(12, 16, 4, topology.level_halos()) is None
    assert len(plan.level_bands(90, 160, 4, topology.level_halos())) == 4


def test_cost_model_counts_each_decoder_from_its_topology():
    """The cost model's sizes come from the decoder it plans for: for the Qwen-Image VAE its defaults,
    for the 2.1 VAE its own (16x, 1152 mid channels, ~15.5e6 FLOP per output px); `choose_decode`
    derives it from the topology it is given. Estimated as a Qwen-Image latent, a 1328² 2.1 decode on 2
    ranks with `mid` halos was judged not worth splitting (1.10x)."""
    from qwenfast import QwenImage21VAE, QwenImageVAE

    with torch.device("meta"):
        qi, v21 = QwenImageVAE(), QwenImage21VAE()
    base = plan.CostModel()
    counted = base.for_topology(qi.topology)
    assert counted.scale == 8 and counted.mid_channels == 384
    assert counted.local_flop_per_px == pytest.approx(base.local_flop_per_px, rel=1e-12)
    for name in ("video_local_flop_per_px", "global_flop_per_latent_px"):
        assert abs(getattr(counted, name) / getattr(base, name) - 1) < 0.05, name
    m21 = base.for_topology(v21.topology)
    assert m21.scale == 16 and m21.mid_channels == 1152 and 15e6 < m21.local_flop_per_px < 17e6
    kw = dict(margin=13, topology=v21.topology, image_level_world=v21.patch_level_image_world)
    # the old estimate (with mid, which auto then chose on 2 ranks)
    assert plan.choose_decode(83, 83, 1, 2, "bfloat16", None, model=base, halo="mid", **kw).mode == "replicated"
    as_mid = plan.choose_decode(83, 83, 1, 2, "bfloat16", None, halo="mid", **kw)  # the model from the topology
    two = plan.choose_decode(83, 83, 1, 2, "bfloat16", None, **kw)
    four = plan.choose_decode(83, 83, 1, 4, "bfloat16", None, **kw)
    assert (as_mid.mode, two.mode, four.mode) == ("patch", "patch", "patch")  # the rehearsal's best: level
    assert "patch (mid)" in as_mid.reason and "patch (level)" in two.reason and "patch (level)" in four.reason
    assert two == plan.choose_decode(83, 83, 1, 2, "bfloat16", None, model=m21, **kw)


@pytest.mark.parametrize("model, world, expect", [
    ("qwenimage21", 2, "patch (level)"), ("qwenimage21", 4, "patch (level)"), ("qwenimage", 2, "patch (mid)"),
    ("qwenimage", 8, "patch (level)"),
])
def test_dispatch_plans_auto_from_the_models_surface(model, world, expect):
    """`auto` as dispatch runs it (`dispatch.auto_choice`): the topology, cost model and halo trait of
    the VAE at hand, at the released sizes (meta: no weights)."""
    from qwenfast import QwenImage21VAE, QwenImageVAE
    from qwenfast.config import VAEConfig
    from qwenfast.parallel.dispatch import auto_choice

    with torch.device("meta"):
        vae = QwenImage21VAE() if model == "qwenimage21" else QwenImageVAE()
    side = 1328 // vae.spatial_compression_ratio
    z = torch.empty(1, vae.z_dim, 1, side, side, device="meta", dtype=torch.bfloat16)
    choice = auto_choice(vae, z, world, None, VAEConfig(use_parallel_decode=True, parallel_decode_mode="auto"))
    assert choice.mode == "patch" and expect in choice.reason, choice
