"""Parallel decode of the Qwen-Image-2.1 VAE on gloo ranks (2 and 3): every mode equal to the
single-device decode in float64 (tiled exact, patch with both halos — `level` also with its levels in
row bands —, auto: the untiled decode; tiled blend: the single-device blend tiling), rank0-only output,
the public decode, a bad latent."""

from __future__ import annotations

from pathlib import Path

import pytest

from parallel_harness import case_results_fixture

SCENARIOS = str(Path(__file__).with_name("parallel_scenarios21.py"))
NAMES = ["tiled exact B2", "tiled blend", "patch mid B2", "patch level", "auto", "patch mid rank0",
         "patch level p2", "tiled exact p2", "tiled blend p2", "patch level banded",
         "patch level banded p2"]


case_results = case_results_fixture(SCENARIOS, [2, 3])


@pytest.mark.parametrize("name", NAMES)
def test_mode_equals_single_device(case_results, name):
    world, per_rank = case_results
    for rank, results in enumerate(per_rank):
        r = results[name]
        assert "error" not in r, f"rank {rank}: {r.get('error')}"
        if name.endswith("rank0") and rank > 0:
            assert r["none"], f"rank {rank} got output with parallel_output=rank0"
            continue
        assert not r["none"] and r["max_abs"] <= 1e-12, (rank, r)
        assert r["stats"]["world_size"] == world


def test_level_halos_really_exchanged(case_results):
    _, per_rank = case_results
    assert all(results["patch level"]["stats"]["mode"] == "patch" for results in per_rank)


def test_public_decode_and_bad_latent(case_results):
    _, per_rank = case_results
    for results in per_rank:
        assert results["public decode"]["shape"] == (1, 4, 80, 72)
        assert results["public decode"]["max_abs"] <= 1e-12
        error = results["bad latent"]["error"]
        assert error and "6 latent channels" in error and "\n" not in error


@pytest.mark.parametrize("model", ["qwenimage", "qwenimage21"])
def test_auto_halo_on_images_follows_the_model(monkeypatch, model):
    """`patch_halo="auto"` on an image latent: the 2.1 VAE exchanges level halos from 2 ranks on, the
    Qwen-Image VAE from 4 (their `patch_level_image_world`); a video latent (Qwen-Image) always does. The strategy
    functions are replaced by recorders: only the choice is under test (the decodes are, above)."""
    import torch

    from helpers import tiny_vae as tiny_qwen_image
    from parallel_scenarios21 import tiny_vae as tiny_21
    from qwenfast.config import VAEConfig
    from qwenfast.parallel import patch
    from qwenfast.parallel.rehearsal import RehearsalComm

    vae = tiny_21("tiny") if model == "qwenimage21" else tiny_qwen_image()
    calls = []
    monkeypatch.setattr(patch, "level_decode_over_ranks", lambda *a, **k: calls.append("level"))
    monkeypatch.setattr(patch, "exact_decode_over_ranks", lambda *a, **k: calls.append("mid"))
    cfg = VAEConfig(use_parallel_decode=True, parallel_decode_mode="patch")
    cases = [(1, 2), (1, 3), (1, 4)] + ([(2, 2)] if model == "qwenimage" else [])  # 2.1: images only
    for frames, world in cases:
        z = torch.zeros(1, vae.z_dim, frames, 40, 7, dtype=torch.float64)
        patch.parallel_patch_decode(vae, z, RehearsalComm(0, world, "cpu"), cfg)
    assert calls == (["level", "level", "level"] if model == "qwenimage21" else ["mid", "mid", "level", "level"])


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_a_level_share_runs_its_levels_in_bands_and_equals_them_whole(monkeypatch, rank):
    """Each level of a `level` share runs through `level_plan`: whole at this size, in row bands (the
    level's own receptive field as margin) when the planner may spend more work; the share is the same."""
    import torch

    from helpers import max_diff
    from parallel_scenarios21 import tiny_vae
    from qwenfast.config import VAEConfig
    from qwenfast.parallel.dispatch import decode_parallel
    from qwenfast.parallel.rehearsal import RehearsalComm
    from qwenfast.vae import bands

    vae = tiny_vae("tiny")
    vae.vae_config = VAEConfig(use_parallel_decode=True, parallel_decode_mode="patch", patch_halo="level")
    z = torch.randn(1, vae.z_dim, 1, 30, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plans = []
    plan = type(vae).level_plan
    monkeypatch.setattr(type(vae), "level_plan", lambda self, *a: plans.append(plan(self, *a)) or plans[-1])
    with torch.no_grad():
        whole = decode_parallel(vae, z, comm=RehearsalComm(rank, 3, "cpu"))
        assert plans and all(len(bands_) == 0 for p in plans for _, _, bands_ in p)
        plans.clear()
        monkeypatch.setattr(bands, "LOCAL_BAND_OVERHEAD", 100.0)
        banded = decode_parallel(vae, z, comm=RehearsalComm(rank, 3, "cpu"))
    assert len(plans) == len(vae.topology.levels) and all(p[0][:2] == (i, i + 1) for i, p in enumerate(plans))
    assert sum(len(bands_) > 1 for p in plans for _, _, bands_ in p) >= 2
    assert max_diff(banded, whole) <= 1e-12
