"""Issue 9 items 2, 7, 8 over gloo: the cross-rank latent check is exact (bitwise against rank 0's
latent), decode configs that differ between ranks are refused on every rank before the first
collective of the decode, and a silent rank makes the others fail within `collective_timeout_s`."""

from __future__ import annotations

import os

import pytest

from parallel_harness import run_ranks

HERE = os.path.dirname(os.path.abspath(__file__))
SCENARIOS = os.path.join(HERE, "hardening_scenarios.py")


TIMEOUT_S = 2.0  # VAEConfig.collective_timeout_s of the silent-rank case; the group's own is 60 s


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def exact_check(request):
    world = request.param
    return world, run_ranks(world, f"{SCENARIOS}:run_hardening", TIMEOUT_S, timeout_s=120)


def _kinds(per_rank, name):
    return [r[name][0] for r in per_rank]


def test_swapped_pairs_are_refused_on_every_rank(exact_check):
    world, per_rank = exact_check
    assert _kinds(per_rank, "swapped pairs") == ["LatentMismatchError"] * world
    for r in per_rank:  # the same line everywhere: how many elements, on which rank
        assert f"4 of 396 elements on rank {world - 1}" in r["swapped pairs"][1]


def test_identical_latents_holding_nan_are_accepted(exact_check):
    world, per_rank = exact_check
    assert [r["identical nan"] for r in per_rank] == [("ok", "nan=True")] * world


def test_one_ulp_on_the_last_rank_is_refused_on_every_rank(exact_check):
    world, per_rank = exact_check
    assert _kinds(per_rank, "one ulp on the last rank") == ["LatentMismatchError"] * world
    for r in per_rank:
        message = r["one ulp on the last rank"][1]
        assert f"1 of 396 elements on rank {world - 1}" in message and message.count("elements on rank") == 1


def test_bf16_latents_are_compared_bitwise_too(exact_check):
    world, per_rank = exact_check
    assert _kinds(per_rank, "bf16 one ulp") == ["LatentMismatchError"] * world
    assert all(f"1 of 396 elements on rank {world - 1}" in r["bf16 one ulp"][1] for r in per_rank)


@pytest.mark.parametrize("name,fields", [
    ("parallel_output differs", ["parallel_output"]),
    ("patch_halo and exact_tile_sample_size differ", ["exact_tile_sample_size", "patch_halo"]),
    ("tile_margin differs", ["tile_margin"]),
])
def test_different_decode_configs_are_refused_on_every_rank(exact_check, name, fields):
    world, per_rank = exact_check
    assert _kinds(per_rank, name) == ["DecodeConfigMismatchError"] * world
    for r in per_rank:
        message = r[name][1]
        assert "\n" not in message
        listed = message.split("differ between ranks: ")[1].split(" (")[0]
        assert sorted(part.split("=")[0] for part in listed.split("; ")) == fields, message


def test_local_settings_may_differ_and_the_group_stays_usable(exact_check):
    world, per_rank = exact_check
    assert _kinds(per_rank, "progress differs") == ["ok"] * world
    assert _kinds(per_rank, "after") == ["ok"] * world


def test_a_silent_rank_fails_the_others_within_the_collective_timeout(exact_check):
    world, per_rank = exact_check
    assert per_rank[1]["silent rank"]["kind"] == "skipped"
    for rank, r in enumerate(per_rank):
        if rank == 1:
            continue
        res = r["silent rank"]
        assert res["kind"] == "CollectiveTimeoutError", res
        assert "collective_timeout_s" in res["message"] and "\n" not in res["message"]
        assert TIMEOUT_S * 0.9 <= res["elapsed"] <= TIMEOUT_S + 5.0, res["elapsed"]
