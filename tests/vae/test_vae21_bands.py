"""The 2.1 VAE's local part in stages and row bands (`local_plan`, `decode_levels`): equal to the
levels run whole in float64, a margin one row short caught, and the plan of the released model."""

from __future__ import annotations

import functools

import pytest
import torch

from helpers import ARCHS21, max_diff, pair21
from qwenfast.vae import qwen_image21 as Q


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


def smallest_banding(vae, shape) -> int:
    """A band budget small enough that every stage of `shape` runs in bands."""
    sizes = Q.level_activation_bytes(vae.topology.levels, shape[0], shape[2], shape[3], 8)
    return min(size for size, _ in sizes) - 1


@torch.no_grad()
@pytest.mark.parametrize("arch", sorted(ARCHS21))
@pytest.mark.parametrize("hold", [0, 1 << 40])  # one stage from the first level on; a stage per level
def test_banded_levels_equal_whole_levels_in_float64(arch, hold):
    ours = model(arch)
    x = mid_output(ours, 2, 4 * ours.decode_margin + 3, 3)  # room for bands of cores >= 2x the margin
    budget = smallest_banding(ours, x.shape)
    plan = Q.local_plan(ours.topology, tuple(x.shape), 8, budget, hold)
    assert sum(len(bands) >= 2 for _, _, bands in plan) >= 1  # bands really ran
    if hold == 0:
        assert [(a, b) for a, b, _ in plan] == [(0, len(ours.topology.levels))]
    expected = whole(ours, x)
    out = ours.decode_levels(x, band_bytes=budget, hold_bytes=hold)
    assert out.shape == expected.shape and out.is_contiguous()
    assert max_diff(out, expected) <= 1e-12


@torch.no_grad()
def test_a_margin_one_row_short_is_caught(monkeypatch):
    ours = model("released-shape")
    x = mid_output(ours, 1, 4 * ours.decode_margin + 2, 3)
    budget = smallest_banding(ours, x.shape)
    expected = whole(ours, x)
    assert max_diff(ours.decode_levels(x, band_bytes=budget, hold_bytes=0), expected) <= 1e-12
    short = Q.DecoderTopology.receptive_field
    monkeypatch.setattr(Q.DecoderTopology, "receptive_field", lambda self: short(self) - 1)
    assert max_diff(ours.decode_levels(x, band_bytes=budget, hold_bytes=0), expected) > 1e-10


@torch.no_grad()
def test_untiled_decode_takes_the_bands_and_stays_exact(monkeypatch):
    """decode() itself (untiled and exact-tiled) runs the banded local part once the budget says so."""
    ours = model("released-shape")
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, ours.z_dim, 1, 4 * ours.decode_margin + 1, 3, generator=g, dtype=torch.float64)
    expected = ours.decode(z)
    calls = []
    plan = Q.local_plan
    monkeypatch.setattr(Q, "local_plan", lambda *a, **k: calls.append(1) or plan(*a, **k))
    monkeypatch.setattr(Q, "LOCAL_BAND_BYTES", 1)
    monkeypatch.setattr(Q, "LOCAL_HOLD_BYTES", 0)
    assert max_diff(ours.decode(z), expected) <= 1e-12
    assert calls


def released_topology():
    with torch.device("meta"):
        return Q.QwenImage21VAE().topology


@pytest.mark.parametrize("size, stages", [
    (512, [(0, 1, 0), (1, 2, 0), (2, 3, 0), (3, 4, 0), (4, 5, 0)]),
    (1328, [(0, 1, 0), (1, 2, 0), (2, 3, 2), (3, 4, 3), (4, 5, 3)]),
    (2048, [(0, 1, 0), (1, 2, 2), (2, 3, 4), (3, 5, 7)]),
])
def test_plan_of_the_released_model(size, stages):
    """bf16 frames of the released decoder: small images run whole; from 1328² the widest levels run in
    bands (the module defaults), cores partition the rows, windows add the stage's receptive field."""
    topo = released_topology()
    h = size // 16
    plan = Q.local_plan(topo, (1, 1152, h, h), 2)
    assert [(a, b, len(bands)) for a, b, bands in plan] == stages
    scale = 1
    for a, b, bands in plan:
        rows = h * scale
        if bands:
            margin = Q.DecoderTopology(tail_convs=0, levels=topo.levels[a:b]).receptive_field()
            assert [t.y0 for t in bands][0] == 0 and bands[-1].y1 == rows
            assert all(p.y1 == q.y0 for p, q in zip(bands, bands[1:]))
            assert all(t.wy0 == max(0, t.y0 - margin) and t.wy1 == min(rows, t.y1 + margin) for t in bands)
            assert all((t.x0, t.x1) == (0, h * scale) for t in bands)
        scale *= 2 ** sum(lv.upsample for lv in topo.levels[a:b])
