"""`decode_parallel(vae, z)`: check the latent on every rank together, pick the strategy, run it.

The order of collectives is the same on every rank: (1) one all-reduce that carries a failure
flag, a signature of the latent (shape, dtype, checksums) and the free memory; (2) the strategy's
own collectives, each after a `comm.guard` stage sync. So a bad latent on one rank, or a latent
that differs between ranks, is refused on every rank; a rank that raises makes every rank raise.
"""

from __future__ import annotations

import logging

import torch

from ..vae.tiling import single_device_decode, tile_margin
from . import plan
from .group import ProcessGroupComm, get_world_size, is_initialized
from .patch import parallel_patch_decode
from .tiled import parallel_tiled_decode, replicated_decode

__all__ = ["decode_parallel", "latent_signature", "LatentMismatchError"]

log = logging.getLogger("qwenfast.parallel")

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_logged: set = set()
_SIG_NAMES = ("ndim", "B", "C", "T", "h", "w", "dtype", "sum", "sum of squares", "weighted sum")


class LatentMismatchError(ValueError):
    """The latent is not the same on every rank (every rank must call decode with the same latent)."""


def latent_signature(z: torch.Tensor) -> torch.Tensor:
    """(10,) float64: ndim, shape (padded to 5), dtype, and three checksums of the values (sum, sum of
    squares, a position-weighted sum) — equal on ranks that hold the same latent."""
    shape = list(z.shape) + [0] * (5 - z.dim())
    code = _DTYPES.index(z.dtype) if z.dtype in _DTYPES else -1
    v = z.detach().double().flatten()
    ramp = torch.linspace(-1.0, 1.0, v.numel(), dtype=torch.float64, device=v.device)
    sums = torch.stack([v.sum(), (v * v).sum(), (v * ramp).sum()]).cpu()
    head = torch.tensor([z.dim(), *shape, code], dtype=torch.float64)
    return torch.cat([head, sums])


def decode_parallel(vae, z: torch.Tensor, comm=None) -> torch.Tensor | None:
    """The parallel decode of `vae` (a `qwenfast.vae.surface.DecodeSurface`) on latent `z`, the same on every rank of
    `vae.process_group` (the world by default). Output (B, 3, T', 8h, 8w) unclamped, on every rank or
    on rank 0 only (`parallel_output="rank0"`: None elsewhere). One rank: the single-device decode.
    `comm` overrides the group (e.g. a `SingleRankComm` to run a strategy's code path on one device)."""
    cfg = vae.vae_config
    if comm is None:
        if not is_initialized() or get_world_size(vae.process_group) == 1:
            z, _ = vae.check_latent(z)
            return single_device_decode(vae, z, cfg)
        comm = ProcessGroupComm(vae.process_group)

    error, values = None, None
    try:
        z, _ = vae.check_latent(z)
        free = _free_bytes(z.device)
        values = torch.cat([latent_signature(z), torch.tensor([-free], dtype=torch.float64)])
    except Exception as e:  # noqa: BLE001 - raised on this rank by agree(), the others learn of it
        error = e
        values = torch.zeros(len(_SIG_NAMES) + 1, dtype=torch.float64)  # same message size on every rank
    hi, lo = comm.agree(values, error, "check latent")
    sig_hi, sig_lo = hi[:-1], lo[:-1]
    if not torch.allclose(sig_hi, sig_lo, rtol=1e-9, atol=0.0):
        raise LatentMismatchError(
            "parallel decode needs the same latent on every rank; ranks differ in "
            + ", ".join(n for n, a, b in zip(_SIG_NAMES, sig_hi.tolist(), sig_lo.tolist()) if a != b)
            + f" (this rank has shape {tuple(z.shape)}, dtype {z.dtype})")
    min_free = -hi[-1].item()

    mode, choice = cfg.parallel_decode_mode, None
    if mode == "auto":
        choice = plan.choose_decode(z.shape[-2], z.shape[-1], z.shape[2], comm.world_size, z.dtype,
                                    None if min_free == float("inf") else min_free,
                                    margin=tile_margin(vae, cfg), batch=z.shape[0])
        _log_once(choice, tuple(z.shape), comm)
        mode = choice.mode
    vae.last_parallel_stats = None
    sent0, recv0, coll0 = comm.bytes_sent, comm.bytes_received, comm.collectives
    if mode == "patch":
        out = parallel_patch_decode(vae, z, comm, cfg)
    elif mode == "tiled":
        # auto's tiles are exact, of the size it chose
        out = parallel_tiled_decode(vae, z, comm, cfg, exact_tile_sample_size=choice and choice.tile_sample_size)
    else:  # replicated
        out = replicated_decode(vae, z, comm, cfg)
    vae.last_parallel_stats = dict(mode=mode, rank=comm.rank, world_size=comm.world_size,
                                   bytes_sent=comm.bytes_sent - sent0, bytes_received=comm.bytes_received - recv0,
                                   collectives=comm.collectives - coll0)
    return out


def _free_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    return float("inf")


def _log_once(choice: plan.DecodeChoice, shape: tuple, comm) -> None:
    key = (choice, shape, comm.world_size)
    if key in _logged:
        return
    _logged.add(key)
    if comm.rank == 0:
        log.info("parallel decode auto: %s for latent %s on %d ranks (%s)", choice.mode, shape,
                 comm.world_size, choice.reason)

