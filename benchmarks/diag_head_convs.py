"""Two convs that cuDNN runs far from their floor in the decoders, and what replaces them: the 1x1
convs of the ResBlock shortcuts (a GEMM: `qwen_image.POINTWISE_CONV = "matmul"` runs it as F.linear over
the channels-last pixels) and the 2.1 VAE's head conv to 4 channels (a generic direct kernel in the
profiles: `NARROW_CONV_PAD = 8 / 16` pads it with zero filters). On a 4096² 2.1 decode the two took
~116 of 817 ms on an H200 (benchmarks/results/first_call_h200.log).

    PYTHONPATH=src:benchmarks python benchmarks/diag_head_convs.py --out DIR [--cudnn-benchmark]

First the two convs alone at the shapes they run at (the top kernel of each named), then whole
untiled decodes of both VAEs with each variant, bf16, random full-size weights; every variant's
max|Δ| against the default decode is printed beside its time (the same sums per value: rounding
only). A CPU run uses tiny shapes to check the script. Writes DIR/head_convs.json; a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch
import torch.nn.functional as F

import bench_parallel_decode as B
from qwenfast import benchmarking
from qwenfast.vae import qwen_image

VARIANTS = {  # name: (POINTWISE_CONV, NARROW_CONV_PAD)
    "cuDNN (default)": ("cudnn", None),
    "1x1 as matmul": ("matmul", None),
    "head padded to 8": ("cudnn", 8),
    "head padded to 16": ("cudnn", 16),
    "1x1 as matmul, head padded to 8": ("matmul", 8),
}


@contextlib.contextmanager
def variant(name: str):
    pointwise, pad = VARIANTS[name]
    previous = qwen_image.POINTWISE_CONV, qwen_image.NARROW_CONV_PAD
    qwen_image.POINTWISE_CONV, qwen_image.NARROW_CONV_PAD = pointwise, pad
    try:
        yield
    finally:
        qwen_image.POINTWISE_CONV, qwen_image.NARROW_CONV_PAD = previous


def top_kernel(fn, cuda: bool) -> str:
    if not cuda:
        return ""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, "self_device_time_total", 0))
    return events[0].key[:90] if events else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--cudnn-benchmark", action="store_true")
    p.add_argument("--sizes21", default="1328,2048,4096")
    p.add_argument("--sizes", default="1328,2048", help="Qwen-Image VAE decode sizes")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    reps = 5 if cuda else 1

    def ms(fn):
        with torch.no_grad():
            return benchmarking.time_ms(fn, dev, repeats=reps)["median_ms"]

    convs = []
    # (label, Ci, Co, k, rows, width): the 2.1 last level's shortcut (288 → 144) and head (144 → 4) on a
    # whole 1328² / 2048² frame and on a 4096² band; the Qwen-Image VAE's last-level shortcut (192 → 96)
    shapes = [(f"2.1 {k}x{k} {ci}→{co} {r}x{w}", ci, co, k, r, w)
              for ci, co, k in ((288, 144, 1), (144, 4, 3)) for r, w in ((1328, 1328), (2048, 2048), (820, 4096))]
    shapes += [(f"QI 1x1 192→96 {s}x{s}", 192, 96, 1, s, s) for s in (1328, 2048)]
    if not cuda:
        shapes = [(label, ci, co, k, 16, 16) for label, ci, co, k, _, _ in shapes[:2]]
    for label, ci, co, k, r, w in shapes:
        x = torch.randn(1, ci, r, w, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
        wt = torch.randn(co, ci, k, k, device=dev, dtype=dtype) / (ci * k * k) ** 0.5
        bias = torch.randn(co, device=dev, dtype=dtype)
        ref = F.conv2d(x, wt, bias, 1, k // 2)
        names = ["cuDNN (default)", "1x1 as matmul"] if k == 1 else ["cuDNN (default)", "head padded to 8",
                                                                        "head padded to 16"]
        for name in names:
            with variant(name):
                fn = lambda: qwen_image.conv2d_frame(x, wt, bias, padding=(k // 2, k // 2))  # noqa: E731
                t = ms(fn)
                with torch.no_grad():
                    diff = (fn().float() - ref.float()).abs().max().item()
                    kernel = top_kernel(fn, cuda)
            flop = 2 * r * w * ci * co * k * k
            convs.append(dict(conv=label, variant=name, ms=t, tflops=flop / t / 1e9, max_diff=diff, kernel=kernel))
            print(f"{label:28s} {name:20s} {t:8.3f} ms {flop / t / 1e9:7.1f} TFLOP/s  max|Δ| {diff:.3g}  {kernel}",
                  flush=True)
        del x, ref
    decodes = []
    for model_name, sizes in (("qwenimage21", args.sizes21), ("qwenimage", args.sizes)):
        B.VAE = model_name
        vae = B.model(dtype, dev)
        s = vae.spatial_compression_ratio
        for size in [int(v) for v in sizes.split(",") if v] if cuda else [64]:
            z = B.latent(size // s, size // s, 1, dev, dtype)[:, :, 0]
            with torch.no_grad():
                base = vae.decode(z)
            for name in VARIANTS:
                with variant(name):
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    t = ms(lambda: vae.decode(z))
                    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
                    with torch.no_grad():
                        diff = (vae.decode(z).float() - base.float()).abs().max().item()
                decodes.append(dict(model=model_name, size=size, variant=name, ms=t, peak_gib=peak, max_diff=diff))
                print(f"decode {model_name} {size}² {name:32s} {t:8.1f} ms  peak {peak:6.2f} GiB  max|Δ| {diff:.3g}",
                      flush=True)
            del z, base
        del vae
        if cuda:
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    info = benchmarking.provenance(dev, dtype=str(dtype), weights="random, full-size", command=" ".join(sys.argv),
                                   cudnn_benchmark=args.cudnn_benchmark)
    name = "head_convs" + ("_benchmark" if args.cudnn_benchmark else "") + ".json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(dict(provenance=info, convs=convs, decodes=decodes), f, indent=1)
    print(f"\n{'decode':28s} " + "  ".join(f"{v[:14]:>14s}" for v in VARIANTS))
    for key in dict.fromkeys((d["model"], d["size"]) for d in decodes):
        row = {d["variant"]: d["ms"] for d in decodes if (d["model"], d["size"]) == key}
        print(f"{key[0]} {key[1]}²".ljust(28) + " " + "  ".join(f"{row[v]:14.1f}" for v in VARIANTS))


if __name__ == "__main__":
    main()
