"""The 2.1 VAE's local part in stages and row bands (`local_plan`, `stage_bands`, `decode_levels`):
equal to the levels run whole in float64, a margin one row short caught, decode() taking the bands,
and the plan of the released model (peak down, extra work within its bound)."""

from __future__ import annotations

import functools

import pytest
import torch

from helpers import ARCHS21, max_diff, pair21
from qwenfast.vae import qwen_image21 as Q
from qwenfast.vae.tiles import grid_tiles


@functools.lru_cache(maxsize=None)
def model(arch: str):
    """Ours in float64 (diffusers' random init, gammas perturbed), built once per arch for this module."""
    return pair21(ARCHS21[arch], dtype=torch.float64)[1]


def mid_output(vae, b, h, w, seed=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, vae.decoder.mid_block.dim, h, w, generator=g, dtype=torch.float64)


def whole(vae, x):
    for i in range(len(vae.topology.levels)):
        x = vae.decode_level(i, x)
    return x


def scales(topology):
    out = [1]
    for lv in topology.levels:
        out.append(out[-1] * (2 if lv.upsample else 1))
    return out


def plan_of(vae, x, ends, count):
    """Stages ending at `ends`, each in `count` bands of its own input."""
    sc, h, w = scales(vae.topology), x.shape[2], x.shape[3]
    return [(a, e, Q.stage_bands(vae.topology, a, e, h * sc[a], w * sc[a], count))
            for a, e in zip([0] + ends[:-1], ends)]


@torch.no_grad()
@pytest.mark.parametrize("arch", sorted(ARCHS21))
@pytest.mark.parametrize("per_level", [False, True])  # one stage of every level; a stage per level
def test_banded_levels_equal_whole_levels_in_float64(arch, per_level):
    ours = model(arch)
    n = len(ours.topology.levels)
    x = mid_output(ours, 2, 2 * ours.decode_margin + 5, 3)  # three bands of cores smaller than the margin
    plan = plan_of(ours, x, list(range(1, n + 1)) if per_level else [n], 3)
    assert all(len(bands) == 3 for _, _, bands in plan)
    expected = whole(ours, x)
    out = ours.decode_levels(x, plan)
    assert out.shape == expected.shape and out.is_contiguous()
    assert max_diff(out, expected) <= 1e-12


@torch.no_grad()
def test_a_margin_one_row_short_is_caught():
    ours = model("released-shape")
    n = len(ours.topology.levels)
    x = mid_output(ours, 1, 2 * ours.decode_margin + 4, 3)
    expected = whole(ours, x)
    rows, cols = x.shape[2:]
    short = [(0, n, tuple(grid_tiles(rows, cols, 3, 1, ours.decode_margin - 1)))]
    exact = [(0, n, tuple(grid_tiles(rows, cols, 3, 1, ours.decode_margin)))]
    assert max_diff(ours.decode_levels(x, exact), expected) <= 1e-12
    assert max_diff(ours.decode_levels(x, short), expected) > 1e-10


@torch.no_grad()
def test_decode_takes_the_planned_bands_and_stays_exact(monkeypatch):
    """decode() (untiled and exact-tiled) runs `local_plan`'s bands; with a free hand (any overhead) the
    plan bands every stage it can, and the output stays the untiled decode's."""
    ours = model("released-shape")
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, ours.z_dim, 1, 2 * ours.decode_margin + 3, 3, generator=g, dtype=torch.float64)
    expected = ours.decode(z)
    plans = []
    plan = Q.local_plan
    monkeypatch.setattr(Q, "local_plan", lambda *a, **k: plans.append(plan(*a, **k)) or plans[-1])
    monkeypatch.setattr(Q, "LOCAL_BAND_OVERHEAD", 100.0)
    assert max_diff(ours.decode(z), expected) <= 1e-12
    assert any(len(bands) > 1 for _, _, bands in plans[-1])


def released_topology():
    with torch.device("meta"):
        return Q.QwenImage21VAE().topology


@pytest.mark.parametrize("size, stages", [
    (512, [(0, 5, 0)]),
    (1328, [(0, 3, 0), (3, 5, 3)]),
    (2048, [(0, 2, 0), (2, 3, 2), (3, 5, 3)]),
])
def test_plan_of_the_released_model(size, stages):
    """bf16 frames of the released decoder: small images run whole; larger ones band their widest
    levels; cores partition the rows, windows add the stage's receptive field, and the margins' extra
    FLOPs stay within LOCAL_BAND_OVERHEAD of the local part's."""
    topo = released_topology()
    h = size // 16
    plan = Q.local_plan(topo, (1, 1152, h, h), 2)
    assert [(a, e, len(bands)) for a, e, bands in plan] == stages
    sc, extra = scales(topo), 0.0
    for a, e, bands in plan:
        rows, cols = h * sc[a], h * sc[a]
        if bands:
            margin = Q.DecoderTopology(tail_convs=0, levels=topo.levels[a:e]).receptive_field()
            assert bands[0].y0 == 0 and bands[-1].y1 == rows
            assert all(p.y1 == q.y0 for p, q in zip(bands, bands[1:]))
            assert all(t.wy0 == max(0, t.y0 - margin) and t.wy1 == min(rows, t.y1 + margin) for t in bands)
            assert all((t.wx0, t.wx1) == (0, cols) for t in bands)
            extra += Q.level_flops(topo.levels[a:e], 1, sum(t.wy1 - t.wy0 for t in bands) - rows, cols)
    assert extra <= Q.LOCAL_BAND_OVERHEAD * Q.level_flops(topo.levels, 1, h, h)
