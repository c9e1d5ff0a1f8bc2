"""What every rank runs in the rehearsal test: the real parallel decode's counters, to compare with a
one-process rehearsal of the same rank (imported by file path in the spawned ranks)."""

from __future__ import annotations

import torch

from qwenfast.config import VAEConfig
from qwenfast.parallel.dispatch import decode_parallel
from qwenfast.parallel.group import ProcessGroupComm

from rehearsal_cases import CASES, tiny_vae, latent


def real_stats(rank: int, world: int) -> dict:
    vae = tiny_vae()
    out = {}
    with torch.no_grad():
        for name, shape, cfg in CASES:
            vae.vae_config = VAEConfig(use_parallel_decode=True, **cfg)
            comm = ProcessGroupComm()
            y = decode_parallel(vae, latent(shape), comm=comm)
            out[name] = dict(shape=None if y is None else tuple(y.shape), **comm.stats())
    return out
