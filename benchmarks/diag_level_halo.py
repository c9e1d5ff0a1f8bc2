"""Why `patch_halo="level"` ran slower than its FLOPs on one H200: one rank's share of a patch decode
(through RehearsalComm, as `bench_parallel_decode.py --rehearse`), timed with each way of joining the
received halo rows to the band, with and without the transposed upsamplers' `cudnn.deterministic`,
and profiled (top CUDA kernels), against `mid` for the same rank.

    PYTHONPATH=src:benchmarks python benchmarks/diag_level_halo.py --out DIR

Cases: the Qwen-Image-2.1 VAE at 2048² on 2 ranks (rank 0) and the Qwen-Image VAE at 4096² on 4
ranks (rank 1), or those given by --case, bf16, random full-size weights (a CPU run uses 512² to check
the script). Joins:
"per-part copies" (`surface.cat_keeping_layout`, the package's), "cat(out=) channels-last" (what it
was: torch.cat into a channels-last result) and "cat, then channels-last" (torch.cat, NCHW, then a
layout copy). Writes DIR/level_halo_cat.json (with --case: level_halo_cases.json); prints a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

import torch

import bench_parallel_decode as B
from qwenfast import benchmarking
from qwenfast.config import VAEConfig
from qwenfast.parallel import halo
from qwenfast.parallel.dispatch import decode_parallel
from qwenfast.parallel.rehearsal import RehearsalComm
from qwenfast.vae import qwen_image, surface


def _cat_out(parts, dim, like):
    out_shape = list(parts[0].shape)
    out_shape[dim] = sum(p.shape[dim] for p in parts)
    out = torch.empty(out_shape, dtype=like.dtype, device=like.device, memory_format=surface.memory_format_of(like))
    return torch.cat(parts, dim, out=out)


JOINS = {
    "per-part copies": surface.cat_keeping_layout,
    "cat(out=) channels-last": _cat_out,
    "cat, then channels-last": lambda parts, dim, like: torch.cat(parts, dim).contiguous(
        memory_format=surface.memory_format_of(like)),
}


@contextlib.contextmanager
def patched(module, name, value):
    previous = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, previous)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--case", action="append", default=None, metavar="MODEL:SIZE:WORLD:RANK",
                   help="a share to time (repeatable; default qwenimage21:2048:2:0 and qwenimage:4096:4:1, "
                        "on a CPU at 512 px)")
    p.add_argument("--no-profile", action="store_true", help="times only")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = cuda
    cases = ([("qwenimage21", 2048, 2, 0), ("qwenimage", 4096, 4, 1)] if cuda else
             [("qwenimage21", 512, 2, 0), ("qwenimage", 512, 4, 1)])
    if args.case:
        try:
            cases = [(m, int(size), int(world), int(rank)) for m, size, world, rank in (c.split(":") for c in args.case)]
        except ValueError:
            p.error(f"--case takes MODEL:SIZE:WORLD:RANK, e.g. qwenimage21:1328:8:3; got {args.case}")
        if bad := [c for c in cases if c[0] not in B.VAES or not 0 <= c[3] < c[2]]:
            p.error(f"--case: unknown model or rank outside the world in {bad}")
    times, profiles = {}, {}

    def share(vae, z, rank, world, mode):
        vae.vae_config = VAEConfig(use_parallel_decode=True, parallel_decode_mode="patch", patch_halo=mode)
        return lambda: decode_parallel(vae, z, comm=RehearsalComm(rank, world, dev))

    def ms(fn):
        with torch.no_grad():
            return benchmarking.time_ms(fn, dev, repeats=3 if cuda else 1)["median_ms"]

    for name, size, world, rank in cases:
        B.VAE = name
        vae = B.model(torch.bfloat16 if cuda else torch.float32, dev)
        s = vae.spatial_compression_ratio
        z = B.latent(size // s, size // s, 1, dev, vae.dtype)
        key = f"{name} {size}² rank {rank} of {world}"
        times[f"{key}: mid"] = ms(share(vae, z, rank, world, "mid"))
        for join, fn in JOINS.items():
            with patched(halo, "cat_keeping_layout", fn):
                times[f"{key}: level, {join}"] = ms(share(vae, z, rank, world, "level"))
        no_det = lambda on=True: contextlib.nullcontext()  # noqa: E731
        with patched(qwen_image, "deterministic_cudnn", no_det):
            times[f"{key}: level, per-part copies, no cudnn.deterministic"] = ms(share(vae, z, rank, world, "level"))
            times[f"{key}: mid, no cudnn.deterministic"] = ms(share(vae, z, rank, world, "mid"))
        if cuda and not args.no_profile:
            for mode in ("level", "mid"):
                fn = share(vae, z, rank, world, mode)
                with torch.no_grad():
                    fn()
                    torch.cuda.synchronize()
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                        fn()
                        torch.cuda.synchronize()
                profiles[f"{key}: {mode}"] = prof.key_averages().table(
                    sort_by="cuda_time_total", row_limit=16, max_name_column_width=60)
                print(f"== {key}: {mode}\n{profiles[f'{key}: {mode}']}", flush=True)
        del vae, z
        if cuda:
            torch.cuda.empty_cache()
    info = benchmarking.provenance(dev, dtype="bfloat16", weights="random, full-size")
    os.makedirs(args.out, exist_ok=True)
    name = "level_halo_cat.json" if not args.case else "level_halo_cases.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(dict(provenance=info, median_ms=times, profiles=profiles), f, indent=1)
    for k, v in times.items():
        print(f"{k:80s} {v:8.1f} ms")


if __name__ == "__main__":
    main()
