"""`decode_parallel(vae, z)`: check the latent and the decode config on every rank together, pick the
strategy, run it.

The order of collectives is the same on every rank:
(1) one all-reduce (max and min) of a failure flag, the latent's header (shape, dtype), a code of
    every decode setting that shapes the plan or the collectives (`decode_config_codes`) and the
    free memory: a bad latent on one rank, or a config or shape that differs, is refused on every
    rank before any rank-dependent collective (which would hang or abort gloo);
(2) rank 0's latent broadcast, compared bit for bit on every rank, and one all-reduce of the number
    of differing elements per rank: a latent that differs anywhere is refused on every rank;
(3) the strategy's own collectives, each stage ending in a `comm.guard` flag all-reduce, so that a
    rank that raises makes every rank raise.
Each wait is bounded by `VAEConfig.collective_timeout_s` (`CollectiveTimeoutError`).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch

from ..vae.tiling import tile_margin
from . import plan
from .group import ProcessGroupComm, get_world_size, is_initialized
from .patch import parallel_patch_decode
from .tiled import parallel_tiled_decode, replicated_decode

__all__ = ["decode_parallel", "auto_choice", "latent_header", "decode_config_codes", "count_differing",
           "LatentMismatchError", "DecodeConfigMismatchError"]

log = logging.getLogger("qwenfast.parallel")

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_logged: set = set()
_HEADER_NAMES = ("ndim", "B", "C", "T", "h", "w", "dtype")
# VAEConfig fields each rank may set for itself: they change neither the plan nor the collectives.
# cuda_graph*: each rank captures only its own compute between collectives, so ranks may differ.
_LOCAL_FIELDS = ("progress", "collective_timeout_s", "cuda_graph", "cuda_graph_capture_call")


class LatentMismatchError(ValueError):
    """The latent is not the same on every rank (every rank must call decode with the same latent)."""


class DecodeConfigMismatchError(ValueError):
    """The decode config is not the same on every rank (every rank must decode with the same VAEConfig)."""


def latent_header(z: torch.Tensor) -> torch.Tensor:
    """(7,) float64: ndim, shape (padded to 5), dtype code — what must agree before the values are compared."""
    shape = list(z.shape) + [0] * (5 - z.dim())
    code = _DTYPES.index(z.dtype) if z.dtype in _DTYPES else -1
    return torch.tensor([z.dim(), *shape, code], dtype=torch.float64)


def decode_config_codes(cfg) -> tuple[tuple[str, ...], torch.Tensor]:
    """The fields of a `VAEConfig` that must be equal on every rank (all but `_LOCAL_FIELDS`), and one
    float64 number per field: bools 0/1, numbers themselves, None -inf, a choice its index among the
    allowed values. Numbers only: they travel in the first all-reduce (max and min), nothing pickled."""
    from ..config import _CHOICES

    names, codes = [], []
    for f in dataclasses.fields(cfg):
        if f.name in _LOCAL_FIELDS:
            continue
        value = getattr(cfg, f.name)
        if value is None:
            code = -math.inf
        elif isinstance(value, str):
            code = float(_CHOICES[f.name].index(value))  # every str field is a choice (tested)
        else:
            code = float(value)
        names.append(f.name)
        codes.append(code)
    return tuple(names), torch.tensor(codes, dtype=torch.float64)


def count_differing(a: torch.Tensor, b: torch.Tensor) -> int:
    """Elements of `a` and `b` (same shape and dtype) whose bits differ. Bitwise on purpose: NaNs with
    the same bits are equal (a latent holding NaN equals its copy), -0.0 and 0.0 differ, and no
    tolerance hides a changed value."""
    width = a.element_size()
    bits_a = a.detach().contiguous().view(-1).view(torch.uint8).view(-1, width)  # (numel, bytes per element)
    bits_b = b.detach().contiguous().view(-1).view(torch.uint8).view(-1, width)
    return int((bits_a != bits_b).any(dim=1).sum().item())


def decode_parallel(vae, z: torch.Tensor, comm=None) -> torch.Tensor | None:
    """The parallel decode of `vae` (a `qwenfast.vae.surface.DecodeSurface`) on latent `z`, the same on every rank of
    `vae.process_group` (the world by default). Output (B, 3, T', 8h, 8w) unclamped, on every rank or
    on rank 0 only (`parallel_output="rank0"`: None elsewhere). One rank: the single-device decode.
    `comm` overrides the group (e.g. a `SingleRankComm` to run a strategy's code path on one device)
    and, with it, the timeout: `vae_config.collective_timeout_s` bounds the waits of the comm made here."""
    cfg = vae.vae_config
    if comm is None:
        if not is_initialized() or get_world_size(vae.process_group) == 1:
            z, _ = vae.check_latent(z)
            return vae.decode_on_one_device(z, cfg)
        comm = ProcessGroupComm(vae.process_group, timeout_s=cfg.collective_timeout_s)

    z, min_free = _agree_on_header(vae, z, comm)
    _check_same_latent(z, comm)

    mode, choice = cfg.parallel_decode_mode, None
    if mode == "auto":
        choice = auto_choice(vae, z, comm.world_size, None if min_free == float("inf") else min_free, cfg)
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


def auto_choice(vae, z: torch.Tensor, world: int, min_free: float | None, cfg) -> plan.DecodeChoice:
    """What `parallel_decode_mode="auto"` runs for latent `z` (B, z, T, h, w) on `world` ranks with
    `min_free` bytes free on the tightest (None: unknown): `plan.choose_decode` fed from the model's
    surface (its topology, and so its cost model; its halo trait) and `cfg`."""
    return plan.choose_decode(z.shape[-2], z.shape[-1], z.shape[2], world, z.dtype, min_free,
                              margin=tile_margin(vae, cfg), batch=z.shape[0], halo=cfg.patch_halo,
                              topology=vae.topology, image_level_world=vae.patch_level_image_world)


def _agree_on_header(vae, z: torch.Tensor, comm) -> tuple[torch.Tensor, float]:
    """Collective (1): the checked latent on this rank and the smallest free memory over ranks; raises
    on every rank together when a rank's latent is bad, or the decode config, shape or dtype differ."""
    names, codes = decode_config_codes(vae.vae_config)
    error, values = None, None
    try:
        z, _ = vae.check_latent(z)
        free = _free_bytes(z.device)
        values = torch.cat([latent_header(z), codes, torch.tensor([-free], dtype=torch.float64)])
    except Exception as e:  # noqa: BLE001 - raised on this rank by agree(), the others learn of it
        error = e
        values = torch.zeros(len(_HEADER_NAMES) + len(names) + 1, dtype=torch.float64)  # same size everywhere
    hi, lo = comm.agree(values, error, "check latent")
    head = slice(0, len(_HEADER_NAMES))
    conf = slice(len(_HEADER_NAMES), len(_HEADER_NAMES) + len(names))
    differ = [(n, a, b) for n, a, b in zip(names, lo[conf].tolist(), hi[conf].tolist()) if a != b]
    if differ:
        raise DecodeConfigMismatchError(
            "parallel decode needs the same VAEConfig on every rank; fields that differ between ranks: "
            + "; ".join(f"{n}={_field_value(n, a)!r} or {_field_value(n, b)!r}" for n, a, b in differ)
            + f" (only {', '.join(_LOCAL_FIELDS)} may differ)")
    if not torch.equal(hi[head], lo[head]):
        raise LatentMismatchError(
            "parallel decode needs the same latent on every rank; ranks differ in "
            + ", ".join(n for n, a, b in zip(_HEADER_NAMES, hi[head].tolist(), lo[head].tolist()) if a != b)
            + f" (this rank has shape {tuple(z.shape)}, dtype {z.dtype})")
    return z, -hi[-1].item()


def _check_same_latent(z: torch.Tensor, comm) -> None:
    """Collective (2): rank 0's latent broadcast, compared bit for bit (`count_differing`) on every
    rank, and one all-reduce of the counts, so that every rank refuses together, naming how many
    elements differ on which rank. Costs one broadcast of the latent: 1.7 MB for 1328² in fp32
    (16 x 166 x 166), 17 MB for 4096², small next to the decode's own gathers."""
    if comm.world_size == 1:
        return
    error, counts = None, torch.zeros(comm.world_size, dtype=torch.float64)
    try:
        flat = z.reshape(-1)  # sent as bytes: every backend carries uint8, whatever the latent's dtype
        reference = comm.broadcast(flat.view(torch.uint8), src=0).view(z.dtype)
        counts[comm.rank] = count_differing(flat, reference)
    except Exception as e:  # noqa: BLE001 - raised on this rank by agree(), the others learn of it
        error = e
    per_rank = comm.agree(counts, error, "compare latent")[0].tolist()  # max over ranks: each rank's count
    if any(per_rank):
        raise LatentMismatchError(
            "parallel decode needs the same latent on every rank; compared bit for bit with rank 0's, it differs in "
            + "; ".join(f"{int(n)} of {z.numel()} elements on rank {r}" for r, n in enumerate(per_rank) if n)
            + " (identical NaNs match, -0.0 and 0.0 differ)")


def _field_value(name: str, code: float):
    """A field's value back from its `decode_config_codes` code."""
    from ..config import _CHOICES, VAEConfig, _base_type

    kind = next(_base_type(f) for f in dataclasses.fields(VAEConfig) if f.name == name)
    if code == -math.inf:
        return None
    if name in _CHOICES:
        return _CHOICES[name][int(code)]
    return kind(code)


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
