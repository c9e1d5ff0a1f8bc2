"""Why the first decode of a new shape can take minutes: the wall time of the first three calls of
one share (a rank's share of a patch decode through RehearsalComm, as `bench_parallel_decode.py
--rehearse`, or the single-device untiled decode), the first call profiled on the host (top ops by
self CPU time: cuDNN's plan building, Triton's compilation and allocator calls all show there), and a
Python stack printed every --stack-every seconds while a call runs (so that a call cut by a time
limit still says where it was).

    PYTHONPATH=src:benchmarks python benchmarks/diag_first_call.py --case qwenimage21:4096:2:0:level --out DIR

A case is MODEL:SIZE:WORLD:RANK:HALO (HALO `level` or `mid`; WORLD 1: the single-device untiled decode).
cuDNN's benchmark mode stays off (the package's default) unless --cudnn-benchmark. bf16, random
full-size weights (a CPU run uses 256 px). --cuda-profile: the last call's top CUDA kernels too;
--no-deterministic: without the transposed upsamplers' cudnn.deterministic. Writes
DIR/first_call.json (first_call_nodet.json); prints a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import sys
import time

import torch

import bench_parallel_decode as B
from qwenfast import benchmarking
from qwenfast.config import VAEConfig
from qwenfast.parallel.dispatch import decode_parallel
from qwenfast.parallel.rehearsal import RehearsalComm
from qwenfast.vae import qwen_image


def parse_case(text: str) -> tuple[str, int, int, int, str]:
    """MODEL:SIZE:WORLD:RANK:HALO → its fields; ValueError(text) for anything else."""
    try:
        name, size, world, rank, halo = text.split(":")
        size, world, rank = int(size), int(world), int(rank)
    except ValueError:
        raise ValueError(repr(text)) from None
    if name not in B.VAES or halo not in ("level", "mid") or size < 1 or not 0 <= rank < world:
        raise ValueError(repr(text))
    return name, size, world, rank, halo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--case", action="append", default=None, metavar="MODEL:SIZE:WORLD:RANK:HALO",
                   help="repeatable; default qwenimage21:4096:2:0:level, ...:mid and the single decode (WORLD 1)")
    p.add_argument("--calls", type=int, default=3, help="calls timed per case (the first is profiled)")
    p.add_argument("--stack-every", type=float, default=30.0, help="seconds between stack dumps during a call")
    p.add_argument("--cudnn-benchmark", action="store_true")
    p.add_argument("--cuda-profile", action="store_true", help="also profile the last call's CUDA kernels (top by time)")
    p.add_argument("--no-deterministic", action="store_true",
                   help="the transposed upsamplers without cudnn.deterministic (qwen_image.deterministic_cudnn)")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.no_deterministic:
        qwen_image.deterministic_cudnn = lambda on=True: contextlib.nullcontext()
    default = ["qwenimage21:4096:2:0:level", "qwenimage21:4096:2:0:mid", "qwenimage21:4096:1:0:mid"]
    try:
        cases = [parse_case(c) for c in (args.case or default)]
    except ValueError as e:
        p.error(f"--case takes MODEL:SIZE:WORLD:RANK:HALO (HALO level or mid), e.g. qwenimage21:4096:2:0:level; got {e}")
    kernel_activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    results, vae, loaded = [], None, None
    for name, size, world, rank, halo in cases:
        size = size if cuda else 256
        if name != loaded:  # one model at a time on the device: the last one freed first
            vae, B.VAE, loaded = None, name, name
            vae = B.model(torch.bfloat16 if cuda else torch.float32, dev)
        s = vae.spatial_compression_ratio
        z = B.latent(size // s, size // s, 1, dev, vae.dtype)
        if world == 1:
            vae.vae_config = VAEConfig()
            fn = lambda: vae.decode(z[:, :, 0])  # noqa: E731
        else:
            vae.vae_config = VAEConfig(use_parallel_decode=True, parallel_decode_mode="patch", patch_halo=halo)
            fn = lambda: decode_parallel(vae, z, comm=RehearsalComm(rank, world, dev))  # noqa: E731
        key = f"{name} {size}² " + ("single untiled" if world == 1 else f"rank {rank} of {world}, {halo}")
        walls, table, kernels = [], "", ""
        for i in range(args.calls):
            print(f"== {key}: call {i + 1}", flush=True)
            faulthandler.dump_traceback_later(args.stack_every, repeat=True, file=sys.stdout)
            last = args.cuda_profile and i == args.calls - 1 and i > 0
            prof = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if i == 0 else
                    torch.profiler.profile(activities=[kernel_activity]) if last else None)
            t0 = time.perf_counter()
            with torch.no_grad(), (prof or contextlib.nullcontext()):
                fn()
                if cuda:
                    torch.cuda.synchronize()
            walls.append((time.perf_counter() - t0) * 1e3)
            faulthandler.cancel_dump_traceback_later()
            print(f"   {walls[-1]:.1f} ms", flush=True)
            if prof is not None and i == 0:
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60)
                print(table, flush=True)
            elif prof is not None:
                kernels = prof.key_averages().table(sort_by=f"{'cuda' if cuda else 'cpu'}_time_total", row_limit=16,
                                                    max_name_column_width=90)
                print(kernels, flush=True)
        results.append(dict(case=key, wall_ms=walls, first_call_cpu_profile=table, last_call_cuda_profile=kernels))
        del z, fn
        if cuda:
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    info = benchmarking.provenance(dev, dtype="bfloat16", weights="random, full-size",
                                   cudnn_benchmark=args.cudnn_benchmark,
                                   cudnn_deterministic_upsamplers=not args.no_deterministic, command=" ".join(sys.argv))
    name = "first_call" + ("_nodet" if args.no_deterministic else "") + ".json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(dict(provenance=info, results=results), f, indent=1)
    for r in results:
        print(f"{r['case']:60s} " + "  ".join(f"{w:10.1f}" for w in r["wall_ms"]) + " ms")


if __name__ == "__main__":
    main()
