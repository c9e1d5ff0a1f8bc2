"""Parallel decode on CPU over gloo, world sizes 2, 3, 4: every mode against the single-device decode
in float64 (exact: <= 1e-12; a margin one pixel short: caught), odd sizes, a world larger than the
latent's rows, B > 1, video, both output placements, faults."""

from __future__ import annotations

import os

import pytest

from parallel_harness import EXACT_TOL, assert_exact_or_caught, case_results_fixture, run_ranks
from parallel_scenarios import CASES

HERE = os.path.dirname(os.path.abspath(__file__))
SCENARIOS = os.path.join(HERE, "parallel_scenarios.py")


case_results = case_results_fixture(SCENARIOS, [2, 3, 4])


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_mode_equals_single_device(case_results, name):
    world, per_rank = case_results
    shape = next(c[1] for c in CASES if c[0] == name)
    rank0_only = "rank0" in name
    for rank, results in enumerate(per_rank):
        res = results[name]
        assert "error" not in res, f"rank {rank}: {res.get('error')}"
        if rank0_only and rank != 0:
            assert res["none"], f"rank {rank} got an output with parallel_output='rank0'"
            continue
        assert not res["none"], f"rank {rank} got None"
        b, _, t, h, w = shape
        assert res["shape"] == (b, 3, 1 + 4 * (t - 1), 8 * h, 8 * w)
        # exact modes: re-association only; blend: the same tiles and merge as on one device; a margin
        # one pixel short: the mutation the exactness check must catch
        assert_exact_or_caught(res, rank, mutated="margin-1" in name)


def test_each_pixel_sent_once(case_results):
    """Exact tiling with output everywhere: a rank sends its own tiles' pixels (plus padding to the
    longest rank), nothing else; the whole group sends at least the output once."""
    world, per_rank = case_results
    b, _, t, h, w = next(c[1] for c in CASES if c[0] == "tiled exact 13x21 B2")
    out_bytes = b * 3 * (1 + 4 * (t - 1)) * 64 * h * w * 8
    attention_bytes = 2 * 32 * h * w * 8 / world  # B·T · C_mid · tokens/rank · float64, one rank's share
    sent = [r["tiled exact 13x21 B2"]["stats"]["bytes_sent"] for r in per_rank]
    assert sum(sent) >= out_bytes
    assert max(sent) <= 2 * out_bytes / world + 2 * attention_bytes + 4096


def test_public_decode_matches_plain_decode(case_results):
    _, per_rank = case_results
    for results in per_rank:
        assert results["public decode"]["shape"] == (1, 3, 104, 168)
        assert results["public decode"]["max_abs"] <= EXACT_TOL


@pytest.mark.parametrize("world", [2, 3])
def test_faults_fail_every_rank_without_hanging(world):
    per_rank = run_ranks(world, f"{SCENARIOS}:run_faults", timeout_s=180)
    bad = per_rank[1]
    assert bad["bad input on rank 1"] == "ValueError"
    assert all(r["bad input on rank 1"] == "RemoteRankError" for i, r in enumerate(per_rank) if i != 1)
    assert all(r["latent differs"] == "LatentMismatchError" for r in per_rank)
    assert all(r["shape differs"] == "LatentMismatchError" for r in per_rank)
    for name in ("raise mid-decode patch", "raise mid-decode tiled", "raise mid-decode level"):
        assert bad[name] == "RuntimeError"
        assert all(r[name] == "RemoteRankError" for i, r in enumerate(per_rank) if i != 1), name
    assert all(r["after faults"] == "ok" for r in per_rank)


def test_level_halo_exchanges_rows_or_falls_back(case_results):
    """`patch_halo="level"` exchanges halo rows between levels (more messages than `mid`'s 4 after the
    latent check: global stage sync, attention gather, local stage sync, output gather); with bands
    thinner than a level's halo it decodes with the full margin instead."""
    world, per_rank = case_results
    mid_count = per_rank[0]["patch bands 40x5"]["stats"]["collectives"]
    for r in per_rank:
        assert r["patch level 40x9 B2"]["stats"]["collectives"] > mid_count
    thin = [r["patch level 13x21 thin bands"]["stats"]["collectives"] for r in per_rank]
    if world >= 3:  # bands of 4 rows < the tiny decoder's 5-row halo
        assert thin == [mid_count] * world
