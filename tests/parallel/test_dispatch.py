"""Single-process behaviour of the parallel dispatch: one rank is the single-device decode, bit for
bit; the strategies' code paths on one rank (SingleRankComm) equal it too; auto logs its choice once."""

from __future__ import annotations

import logging

import pytest
import torch

from qwenfast.config import VAEConfig
from qwenfast.parallel.comm import SingleRankComm
from qwenfast.parallel.dispatch import decode_parallel, latent_signature
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
                                 dict(parallel_decode_mode="tiled"), dict(parallel_decode_mode="auto")])
def test_strategy_paths_on_one_rank_equal_untiled(vae, cfg):
    z = latent((1, 4, 1, 11, 6))
    with torch.no_grad():
        vae.vae_config = VAEConfig()
        ref = vae.decode_untiled(z)
        vae.vae_config = VAEConfig(use_parallel_decode=True, **SMALL_TILES, **cfg)
        out = decode_parallel(vae, z, comm=SingleRankComm())
    assert (out - ref).abs().max().item() <= 1e-4
    assert vae.last_parallel_stats["bytes_sent"] == 0


def test_auto_logs_its_choice_once(vae, caplog):
    z = latent((1, 4, 1, 5, 6), seed=3)
    vae.vae_config = VAEConfig(use_parallel_decode=True, parallel_decode_mode="auto")
    with caplog.at_level(logging.INFO, logger="qwenfast.parallel"), torch.no_grad():
        decode_parallel(vae, z, comm=SingleRankComm())
        decode_parallel(vae, z, comm=SingleRankComm())
    records = [r for r in caplog.records if "auto" in r.getMessage()]
    assert len(records) == 1 and "replicated" in records[0].getMessage()


def test_latent_signature_sees_one_changed_value_and_the_shape():
    z = latent((1, 4, 1, 9, 11))
    changed = z.clone()
    changed[0, 2, 0, 4, 4] += 1e-3
    assert not torch.equal(latent_signature(z), latent_signature(changed))
    assert not torch.equal(latent_signature(z), latent_signature(z.reshape(1, 4, 1, 11, 9)))
    assert torch.equal(latent_signature(z), latent_signature(z.clone()))
