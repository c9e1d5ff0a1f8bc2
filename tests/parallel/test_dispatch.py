"""Single-process behaviour of the parallel dispatch: one rank is the single-device decode, bit for
bit; the strategies' code paths on one rank (SingleRankComm) equal it too; auto logs its choice once."""

from __future__ import annotations

import logging

import pytest
import torch

from qwenfast.config import VAEConfig
from qwenfast.parallel.comm import SingleRankComm
import dataclasses

from qwenfast.config import _CHOICES
from qwenfast.parallel.dispatch import count_differing, decode_config_codes, decode_parallel, latent_header
from parallel_scenarios import SMALL_TILES, latent, tiny_vae


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


@pytest.mark.parametrize("tiling", [False, True])
def test_no_group_is_the_single_device_decode_bit_for_bit(vae, tiling):
    z = latent((1, 4, 9, 14))
    with torch.no_grad():
        vae.vae_config = VAEConfig(use_tiling=tiling, **SMALL_TILES)
        plain = vae.decode(z)
        vae.vae_config = VAEConfig(use_tiling=tiling, use_parallel_decode=True, parallel_decode_mode="patch", **SMALL_TILES)
        par = vae.decode(z)
    assert torch.equal(plain, par)


@pytest.mark.parametrize("cfg", [dict(parallel_decode_mode="patch"), dict(parallel_decode_mode="patch", patch_halo="level"),
                                 dict(parallel_decode_mode="tiled")])
def test_strategy_paths_on_one_rank_equal_untiled(vae, cfg):
    """Each strategy's own code path (split attention, tail on a box, tiles or levels) on one rank, in
    float64, against the untiled decode (a different path: `decode_global` in one stream, `decode_local`)."""
    z = latent((1, 4, 1, 11, 6)).double()
    with torch.no_grad():
        vae.vae_config = VAEConfig()
        ref = vae.decode_untiled(z)
        vae.vae_config = VAEConfig(use_parallel_decode=True, **SMALL_TILES, **cfg)
        out = decode_parallel(vae, z, comm=SingleRankComm())
    assert vae.last_parallel_stats["mode"] == cfg["parallel_decode_mode"]  # that strategy ran, not a fallback
    assert (out - ref).abs().max().item() <= 1e-12
    assert vae.last_parallel_stats["bytes_sent"] == 0


def test_auto_on_one_rank_is_replicated(vae):
    """`auto` with one rank picks the single-device decode (no numbers to compare: it is that decode)."""
    vae.vae_config = VAEConfig(use_parallel_decode=True, parallel_decode_mode="auto")
    with torch.no_grad():
        decode_parallel(vae, latent((1, 4, 1, 11, 6)), comm=SingleRankComm())
    assert vae.last_parallel_stats["mode"] == "replicated"


def test_auto_logs_its_choice_once(vae, caplog):
    z = latent((1, 4, 1, 5, 6), seed=3)
    vae.vae_config = VAEConfig(use_parallel_decode=True, parallel_decode_mode="auto")
    with caplog.at_level(logging.INFO, logger="qwenfast.parallel"), torch.no_grad():
        decode_parallel(vae, z, comm=SingleRankComm())
        decode_parallel(vae, z, comm=SingleRankComm())
    records = [r for r in caplog.records if "auto" in r.getMessage()]
    assert len(records) == 1 and "replicated" in records[0].getMessage()


def test_latent_header_sees_the_shape_and_dtype():
    z = latent((1, 4, 1, 9, 11))
    assert not torch.equal(latent_header(z), latent_header(z.reshape(1, 4, 1, 11, 9)))
    assert not torch.equal(latent_header(z), latent_header(z.reshape(4, 1, 9, 11)))
    assert not torch.equal(latent_header(z), latent_header(z.double()))
    assert torch.equal(latent_header(z), latent_header(z.clone()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_count_differing_is_bitwise(dtype):
    z = latent((1, 4, 1, 9, 11)).to(dtype)
    swapped = z.clone().view(-1)
    swapped[[3, 4, 100, 101]] = swapped[[4, 3, 101, 100]]
    assert count_differing(z, swapped.view_as(z)) == 4  # same sum, same sum of squares
    nan = z.clone()
    nan[0, 0, 0, 0, :3] = float("nan")
    assert count_differing(nan, nan.clone()) == 0  # identical NaNs are equal
    zeros, negative = torch.zeros(5, dtype=dtype), -torch.zeros(5, dtype=dtype)
    assert count_differing(zeros, negative) == 5  # -0.0 and 0.0 differ
    ulp = z.clone()
    ulp[0, 1, 0, 2, 2] = torch.nextafter(ulp[0, 1, 0, 2, 2], torch.tensor(float("inf"), dtype=dtype))
    assert count_differing(z, ulp) == 1


def test_decode_config_codes_cover_every_shared_field():
    names, codes = decode_config_codes(VAEConfig())
    local = ("progress", "collective_timeout_s", "cuda_graph", "cuda_graph_capture_call")
    shared = [f.name for f in dataclasses.fields(VAEConfig) if f.name not in local]
    assert list(names) == shared and codes.shape == (len(shared),)
    for f in dataclasses.fields(VAEConfig):  # every str field is a choice, so that it has a number
        if isinstance(f.default, str):
            assert f.name in _CHOICES, f.name
    for change in (dict(parallel_output="rank0"), dict(patch_halo="level"), dict(exact_tile_sample_size=512),
                   dict(tiling="blend"), dict(tile_margin=13), dict(tile_margin=0), dict(use_tiling=True)):
        changed = decode_config_codes(VAEConfig(**change))[1]
        assert [n for n, a, b in zip(names, codes.tolist(), changed.tolist()) if a != b] == list(change), change
    assert torch.equal(decode_config_codes(VAEConfig(progress=True, collective_timeout_s=1.0, cuda_graph=True,
                                                 cuda_graph_capture_call=2))[1], codes)


@pytest.mark.parametrize("shape,runs", [((1, 4, 3, 24, 6), "level"), ((1, 4, 1, 24, 6), "mid")])
def test_patch_halo_auto_runs_level_for_video_and_mid_for_images(vae, shape, runs):
    """The default `patch_halo="auto"` takes the path of `level` for a video latent and of `mid` for an
    image: the same collectives, rank by rank (3 rehearsed ranks), as that halo set explicitly, and not
    those of the other (level exchanges rows at every level, mid sends nothing until the gather)."""
    from qwenfast.parallel.rehearsal import RehearsalComm

    z, other = latent(shape), {"level": "mid", "mid": "level"}[runs]
    counts = {}
    with torch.no_grad():
        for halo in ("auto", runs, other):
            vae.vae_config = VAEConfig(use_parallel_decode=True, parallel_decode_mode="patch", patch_halo=halo)
            counts[halo] = [decode_parallel(vae, z, comm=(c := RehearsalComm(r, 3))) is not None and c.stats()
                            for r in range(3)]
    assert VAEConfig().patch_halo == "auto"
    assert counts["auto"] == counts[runs] != counts[other]
