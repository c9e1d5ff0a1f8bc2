"""Video exactness over the strategies (issue 12, item 4), float64: exact tiling on one device, and
tiled exact, patch `mid` and patch `level` on 2 and 3 gloo ranks, at T = 2 and 3 latent frames, each
equal to the untiled decode to 1e-12 — every tile and every rank's region streaming its frames with its
own frame cache. Each check has its mutation beside it (a margin or a level halo one row short, one
frame cache shared by the tiles): those must be off by > 1e-11."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import max_diff
from parallel_harness import CAUGHT, EXACT_TOL, assert_exact_or_caught, case_results_fixture
from video_scenarios import CASES, SHAPES, exact_tiled, latent, shared_frame_cache, tiny_vae

SCENARIOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "video_scenarios.py")


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


@pytest.mark.parametrize("key", SHAPES)
@torch.no_grad()
def test_exact_tiling_of_video_equals_untiled(vae, key):
    z = latent(key)
    untiled = vae.decode_untiled(z)
    assert untiled.shape[2] == 1 + 2 * (z.shape[2] - 1)  # 2x temporal: 3 or 5 frames
    assert max_diff(exact_tiled(vae, z), untiled) <= EXACT_TOL
    if key == "T3 small":  # windows are the whole latent: no margin to cut, tiles share one window shape
        with shared_frame_cache():  # the tiles would read each other's past frames
            assert max_diff(exact_tiled(vae, z), untiled) > CAUGHT
    else:
        assert max_diff(exact_tiled(vae, z, tile_margin=vae.decode_margin - 1), untiled) > CAUGHT


case_results = case_results_fixture(SCENARIOS, [2, 3])


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_parallel_mode_on_video_equals_untiled(case_results, name):
    world, per_rank = case_results
    key = next(c[1] for c in CASES if c[0] == name)
    b, _, t, h, w = SHAPES[key]
    mutated = name.endswith(("margin-1", "halo-1", "shared cache"))  # wrong numbers, not an error
    for rank, results in enumerate(per_rank):
        res = results[name]
        assert "error" not in res, f"rank {rank}: {res.get('error')}"
        assert res["stats"]["world_size"] == world and not res["none"]
        assert res["shape"] == (b, 3, results["output frames"][key], 4 * h, 4 * w)
        assert_exact_or_caught(res, rank, mutated)
        if name.startswith("patch level"):  # halos really exchanged per level, not the `mid` fallback
            assert res["stats"]["collectives"] > results["mid collectives"][key]
