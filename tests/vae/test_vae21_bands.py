"""The local part in stages and row bands (`vae.bands.local_plan`, `stage_bands`; the surface's
`decode_levels`): equal to the levels run whole in float64 (the 2.1 VAE, and the Qwen-Image VAE's image
frame through the same executor), a margin one row short caught, decode() taking the bands where
`band_local_part` is on (and only there), and the plan of the released model (peak down, extra work
within its bound)."""

from __future__ import annotations

import functools

import pytest
import torch

from helpers import ARCHS21, max_diff, pair21, tiny_vae
from qwenfast.vae import bands as B
from qwenfast.vae import qwen_image21 as Q
from qwenfast.vae.surface import DecoderTopology
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
    return [(a, e, B.stage_bands(vae.topology, a, e, h * sc[a], w * sc[a], count))
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
    out = ours.decode_levels(x, plan=plan)
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
    assert max_diff(ours.decode_levels(x, plan=exact), expected) <= 1e-12
    assert max_diff(ours.decode_levels(x, plan=short), expected) > 1e-10


@torch.no_grad()
def test_decode_takes_the_planned_bands_and_stays_exact(monkeypatch):
    """decode() (untiled and exact-tiled) runs `local_plan`'s bands; with a free hand (any overhead) the
    plan bands every stage it can, and the output stays the untiled decode's."""
    ours = model("released-shape")
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, ours.z_dim, 1, 2 * ours.decode_margin + 3, 3, generator=g, dtype=torch.float64)
    expected = ours.decode(z)
    plans = []
    plan = B.local_plan
    monkeypatch.setattr(B, "local_plan", lambda *a, **k: plans.append(plan(*a, **k)) or plans[-1])
    monkeypatch.setattr(B, "LOCAL_BAND_OVERHEAD", 100.0)
    assert max_diff(ours.decode(z), expected) <= 1e-12
    assert any(len(bands) > 1 for _, _, bands in plans[-1])


def test_only_a_model_with_band_local_part_plans_bands(monkeypatch):
    """The 2.1 VAE bands its local part; the Qwen-Image VAE (its own fused decode_local, measured fast
    unbanded) never asks for a plan, and the surface's executor runs its levels whole by default."""
    from qwenfast import QwenImageVAE

    assert Q.QwenImage21VAE.band_local_part is True and QwenImageVAE.band_local_part is False
    plans = []
    monkeypatch.setattr(B, "local_plan", lambda *a, **k: plans.append(a) or B.whole_plan(a[0]))
    vae = tiny_vae()
    with torch.no_grad():
        vae.decode(torch.randn(1, vae.z_dim, 2, 4, 5, dtype=torch.float64))
        h = torch.randn(1, vae.topology.levels[0].conv_pairs()[0][0], 3, 4, dtype=torch.float64)
        vae.decode_levels(h)
    assert plans == []


@torch.no_grad()
def test_the_executor_serves_the_qwen_image_vae_too():
    """`decode_levels` is generic over `decode_level`: bands of a Qwen-Image VAE image frame (4-D, no
    frame cache) equal its own fused local part in float64."""
    vae = tiny_vae()
    n, m = len(vae.topology.levels), vae.decode_margin
    x = torch.randn(1, vae.topology.levels[0].conv_pairs()[0][0], 2 * m + 5, 3, dtype=torch.float64)
    expected = vae.decode_local(x.unsqueeze(2))[:, :, 0]
    plan = [(0, 1, tuple(B.stage_bands(vae.topology, 0, 1, *x.shape[2:], 3))), (1, n, ())]
    assert max_diff(vae.decode_levels(x, plan=plan), expected) <= 1e-12


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
    plan = B.local_plan(topo, (1, 1152, h, h), 2)
    assert [(a, e, len(bands)) for a, e, bands in plan] == stages
    sc, extra = scales(topo), 0.0
    for a, e, bands in plan:
        rows, cols = h * sc[a], h * sc[a]
        if bands:
            margin = DecoderTopology(tail_convs=0, levels=topo.levels[a:e]).receptive_field()
            assert bands[0].y0 == 0 and bands[-1].y1 == rows
            assert all(p.y1 == q.y0 for p, q in zip(bands, bands[1:]))
            assert all(t.wy0 == max(0, t.y0 - margin) and t.wy1 == min(rows, t.y1 + margin) for t in bands)
            assert all((t.wx0, t.wx1) == (0, cols) for t in bands)
            extra += B.level_flops(topo.levels[a:e], 1, sum(t.wy1 - t.wy0 for t in bands) - rows, cols)
    assert extra <= B.LOCAL_BAND_OVERHEAD * B.level_flops(topo.levels, 1, h, h)
