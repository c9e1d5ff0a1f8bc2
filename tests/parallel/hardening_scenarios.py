"""What every rank runs in the hardening tests (issue 9, items 2, 7, 8): latents that differ in ways a
checksum misses, decode configs that differ between ranks, a rank that never calls the collective.
Each attempt records (exception type name or "ok", message); the parent asserts over all ranks."""

from __future__ import annotations

import time

import torch

from qwenfast.config import VAEConfig
from parallel_scenarios import latent, tiny_vae

SHAPE = (1, 4, 1, 9, 11)


def _attempt(vae, z, **cfg) -> tuple[str, str]:
    vae.vae_config = VAEConfig(use_parallel_decode=True, **cfg)
    try:
        with torch.no_grad():
            out = vae._decode_with_parallel_dispatch(z)
    except Exception as e:  # noqa: BLE001 - reported, asserted by the parent
        return type(e).__name__, str(e)
    return "ok", "" if out is None else f"nan={bool(out.isnan().any())}"


def run_hardening(rank: int, world: int, timeout_s: float) -> dict:
    """The attempts below one after another on the same group; the silent rank last (it leaves the
    group unusable)."""
    vae, z, last = tiny_vae(), latent(SHAPE), world - 1
    results = {}

    # Two neighbouring pairs (x, y) and (y, x) swapped on the last rank: the sum and the sum of squares
    # stay, and so does a position-weighted sum (the two swaps move it by opposite amounts).
    swapped = z.clone()
    flat = swapped.view(-1)
    flat[[3, 4, 100, 101]] = torch.tensor([0.5, -0.25, -0.25, 0.5])
    if rank == last:
        flat[[3, 4, 100, 101]] = flat[[4, 3, 101, 100]].clone()
    results["swapped pairs"] = _attempt(vae, swapped, parallel_decode_mode="patch")

    # Identical latents holding NaN (the same bits on every rank): accepted, decoded.
    with_nan = z.clone()
    with_nan[0, 1, 0, 2, 3] = float("nan")
    results["identical nan"] = _attempt(vae, with_nan, parallel_decode_mode="patch")

    # One ulp on the last rank only.
    ulp = z.clone()
    if rank == last:
        ulp[0, 2, 0, 5, 6] = torch.nextafter(ulp[0, 2, 0, 5, 6], torch.tensor(float("inf")))
    results["one ulp on the last rank"] = _attempt(vae, ulp, parallel_decode_mode="tiled")

    # bf16 (carried as bytes): one ulp on the last rank is refused too
    half = z.to(torch.bfloat16)
    if rank == last:
        half[0, 0, 0, 0, 0] = torch.nextafter(half[0, 0, 0, 0, 0], torch.tensor(float("inf"), dtype=torch.bfloat16))
    vae.to(torch.bfloat16)
    results["bf16 one ulp"] = _attempt(vae, half, parallel_decode_mode="patch")
    vae.to(torch.float32)

    # Decode configs that differ between ranks (each hangs or aborts gloo without the check).
    results["parallel_output differs"] = _attempt(
        vae, z, parallel_decode_mode="patch", parallel_output="rank0" if rank == 1 else "all")
    results["patch_halo and exact_tile_sample_size differ"] = _attempt(
        vae, z, parallel_decode_mode="patch",
        **(dict(patch_halo="level", exact_tile_sample_size=32) if rank == last else {}))
    results["tile_margin differs"] = _attempt(vae, z, parallel_decode_mode="tiled", tile_margin=4 + (rank == 0))
    results["progress differs"] = _attempt(vae, z, parallel_decode_mode="patch", progress=False,
                                           collective_timeout_s=60.0 + rank)  # local settings: allowed

    results["after"] = _attempt(vae, z, parallel_decode_mode="patch")

    # Rank 1 never calls decode (as if stopped): the others must fail within about `timeout_s`, far
    # below the group's own timeout (60 s in the harness). Rank 1 stays alive meanwhile, so that the
    # others see a silent rank, not a closed connection.
    if rank == 1:
        time.sleep(timeout_s + 2.0)
        results["silent rank"] = dict(kind="skipped")
    else:
        t0 = time.monotonic()
        kind, message = _attempt(vae, z, parallel_decode_mode="patch", collective_timeout_s=timeout_s)
        results["silent rank"] = dict(kind=kind, message=message, elapsed=time.monotonic() - t0)
    return results
