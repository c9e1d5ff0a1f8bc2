"""Single-GPU Qwen-Image-2.1 VAE: qwenfast (untiled; exact tiling) against diffusers'
`AutoencoderKLQwenImage21` (untiled; `enable_tiling()`), the released architecture (diffusers'
default config), random weights, bf16. One run, side by side.

For each decode size: median ms, peak GiB (allocator peak over warm-up and timed runs: weights and
inputs included, cuDNN's benchmark trials too), steady peak GiB (the peak of one more run once
everything is warm: what a serving process sees), and max|Δ|
of each bf16 decode against an fp32 decode of the same latent (ours in fp32; equal to diffusers'
fp32 decode, tested), next to diffusers' own. Encode at --encode-sizes the same way (posterior mean).
`--attention`: the mid-block attention alone (head dim 1152, one frame of each size's latent pixels),
SDPA's forced memory-efficient kernel against our query-chunked matmul path.

    python benchmarks/bench_vae21.py --json benchmarks/results/vae21_h200.json
    python benchmarks/bench_vae21.py --attention --json benchmarks/results/vae21_attention_h200.json
    python benchmarks/bench_vae21.py --dry-run        # a tiny config on the CPU: checks the script
    python benchmarks/bench_vae21.py --diffusers-max 0 --encode-sizes "" --memory-snapshot DIR
                                                      # ours only, a CUDA memory snapshot per decode
    python benchmarks/bench_vae21.py --levels 1328    # where our decode's time goes, and exit

`--levels SIZES`: our untiled decode taken apart: each stage of the global part (head, attention, tail)
and each level of the local part, whole (unbanded), timed alone (median ms) with its 3x3 convs' FLOPs
(the upsamplers' counted as upsample-then-conv, whatever formulation runs) and TFLOP/s; then the
kernels of one whole decode (banded, as it runs) by kind.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qwenfast import QwenImage21VAE, VAEConfig  # noqa: E402
from qwenfast.benchmarking import (  # noqa: E402
    format_table, kernel_breakdown, measure, profile_kernels, provenance, synthetic_latent, time_ms, write_json)
from qwenfast.vae.bands import level_flops  # noqa: E402
from qwenfast.ops import attention as attention_ops  # noqa: E402
from qwenfast.vae import qwen_image, qwen_image21  # noqa: E402

COLUMNS = [("op", "op", ""), ("size", "size", ""), ("impl", "impl", ""), ("mode", "mode", ""),
           ("median_ms", "median ms", ".1f"), ("peak_gib", "peak GiB", ".2f"), ("steady_peak_gib", "steady peak", ".2f"),
           ("fp32_max_err", "max|Δ| vs fp32", ".2e"), ("fp32_mean_err", "mean|Δ| vs fp32", ".2e"),
           ("speedup", "x diffusers untiled", ".2f")]
ATTENTION_COLUMNS = [("tokens", "tokens", ""), ("path", "path", ""), ("median_ms", "median ms", ".2f"),
                     ("tflops", "TFLOP/s", ".0f"), ("peak_gib", "peak GiB", ".2f"), ("max_abs_err", "max|Δ| vs fp64", ".2e")]
LEVEL_COLUMNS = [("size", "size", ""), ("stage", "stage", ""), ("input", "input", ""), ("median_ms", "median ms", ".2f"),
                 ("share", "share", ".1%"), ("conv_tflop", "3x3 conv TFLOP", ".2f"), ("tflops", "TFLOP/s", ".0f")]
KERNEL_COLUMNS = [("size", "size", ""), ("category", "kernels", ""), ("ms", "ms", ".2f"), ("share", "share", ".1%"),
                  ("calls", "calls", ""), ("top", "largest", "")]
# A tiny AutoencoderKLQwenImage21 for --dry-run (the released block layout, 16x, narrow).
DRY_ARCH = dict(base_dim=4, decoder_base_dim=6, z_dim=8, dim_mult=[1, 2, 4, 8, 8], num_res_blocks=1,
                latents_mean=[0.0] * 8, latents_std=[1.0] * 8)


def build(arch: dict, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """(diffusers' model, ours over the same tensors), random weights."""
    from diffusers import AutoencoderKLQwenImage21

    torch.manual_seed(seed)
    ref = AutoencoderKLQwenImage21(**arch).to(device=device, dtype=dtype).eval().requires_grad_(False)
    return ref, QwenImage21VAE.from_diffusers(ref)


def fidelity(rows: list[dict], outs: dict, gold: torch.Tensor) -> None:
    """max / mean |Δ| of each output in `outs` ({row index: tensor}) against the fp32 `gold`."""
    for i, out in outs.items():
        d = (out.float() - gold).abs()
        rows[i]["fp32_max_err"], rows[i]["fp32_mean_err"] = d.max().item(), d.mean().item()


def run_case(rows: list[dict], op: str, size: int, impl: str, mode: str, fn, device, repeats: int, warmup: int):
    try:
        out, stats = measure(fn, device, repeats, warmup)
    except torch.cuda.OutOfMemoryError as e:
        print(f"{op} {size} {impl} {mode}: OOM ({str(e).splitlines()[0]})", flush=True)
        rows.append(dict(op=op, size=f"{size}²", impl=impl, mode=mode, error="OOM"))
        return None
    out = None  # the last run's output is not part of the next peaks
    if SNAPSHOT_DIR and impl == "qwenfast" and device.type == "cuda":
        memory_snapshot(fn, Path(SNAPSHOT_DIR) / f"{op}_{size}_{mode.replace(' ', '_')}.pickle")
    out, steady = measure(fn, device, 1, 0)  # one more run, everything warm (cuDNN's choices made)
    stats["steady_peak_gib"] = steady["peak_gib"]
    rows.append(dict(op=op, size=f"{size}²", pixels=size * size, impl=impl, mode=mode, **stats))
    print(f"{op} {size} {impl:9s} {mode:14s} {stats['median_ms']:9.1f} ms  peak {stats['peak_gib']:6.2f} GiB"
          f"  steady {stats['steady_peak_gib']:6.2f} GiB", flush=True)
    return out


SNAPSHOT_DIR: str | None = None  # --memory-snapshot


def memory_snapshot(fn, path: Path) -> None:
    """One run of `fn` under CUDA's allocator history; the snapshot (open it at pytorch.org/memory_viz)
    shows every block live at the peak, cuDNN workspaces included."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=200000)
    try:
        with torch.inference_mode():
            fn()
        torch.cuda.synchronize()
        torch.cuda.memory._dump_snapshot(str(path))
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    print(f"memory snapshot: {path}", flush=True)


OUR_MODES = ("untiled", "untiled, two-pass shortcut", "untiled, direct upsamplers", "untiled, whole", "exact tiling")


def decode_rows(ref, ours, sizes, args, device) -> list[dict]:
    rows: list[dict] = []
    our_modes = OUR_MODES if args.modes is None else tuple(m.strip() for m in args.modes)
    if unknown := [m for m in our_modes if m not in OUR_MODES]:
        raise SystemExit(f"--modes: unknown {unknown}; choose from {list(OUR_MODES)}")
    exact = VAEConfig(use_tiling=True, exact_tile_sample_size=args.exact_tile)
    for size in sizes:
        z = synthetic_latent(ours, size, device)
        zb = z.to(ours.dtype)
        reps = args.repeats if size < 4096 else max(2, args.repeats // 2)
        warm = args.warmup if size < 4096 else 1
        outs: dict[int, torch.Tensor] = {}
        # "untiled, whole": the local part unbanded (band_local_part off), beside the default banded
        # one: what the bands cost in time and save in memory, side by side
        # "untiled, two-pass shortcut": the residual up blocks' upsampler bias and shortcut added by
        # PyTorch in two passes, beside our one (qwen_image21.FUSED_SHORTCUT_ADD, on by default)
        # "untiled, direct upsamplers": upsample-then-conv (qwen_image.UPSAMPLE_CONV = "direct") beside
        # the default transposed convs, which run under cudnn.deterministic (is that free?)
        cases = [("diffusers", "untiled"), ("diffusers", "enable_tiling")] + [("qwenfast", m) for m in OUR_MODES]
        for impl, mode in cases:
            if impl == "diffusers" and size > args.diffusers_max:
                continue
            if impl == "qwenfast" and mode not in our_modes:
                continue
            ours.vae_config = exact if mode == "exact tiling" else VAEConfig()
            if mode == "enable_tiling":
                ref.enable_tiling()
            if mode == "untiled, whole":
                ours.band_local_part = False  # an instance attribute over the class's True
            fused = qwen_image21.FUSED_SHORTCUT_ADD
            qwen_image21.FUSED_SHORTCUT_ADD = fused and mode != "untiled, two-pass shortcut"
            upsample_conv = qwen_image.UPSAMPLE_CONV
            if mode == "untiled, direct upsamplers":
                qwen_image.UPSAMPLE_CONV = "direct"
            fn = (lambda: ref.decode(zb).sample) if impl == "diffusers" else (lambda: ours.decode(zb))
            try:
                out = run_case(rows, "decode", size, impl, mode, fn, device, reps, warm)
            finally:
                qwen_image.UPSAMPLE_CONV = upsample_conv
                ref.disable_tiling()
                ours.__dict__.pop("band_local_part", None)
                qwen_image21.FUSED_SHORTCUT_ADD = fused
            if out is not None:
                outs[len(rows) - 1] = out
        base = next((r["median_ms"] for r in rows if r["size"] == f"{size}²" and r["impl"] == "diffusers"
                     and r["mode"] == "untiled" and "median_ms" in r), None)
        for r in rows:
            if r["size"] == f"{size}²" and base and "median_ms" in r:
                r["speedup"] = base / r["median_ms"]
        if size <= args.fp32_max:
            ours.vae_config = VAEConfig()
            ours32 = QwenImage21VAE.from_diffusers(ref).float()  # a copy in fp32: ref stays in its dtype
            with torch.inference_mode():
                gold = ours32.decode(z).float()
            del ours32
            fidelity(rows, outs, gold)
            del gold
        del outs, z, zb
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def encode_rows(ref, ours, sizes, args, device) -> list[dict]:
    rows: list[dict] = []
    ours.vae_config = VAEConfig()
    for size in sizes:
        gen = torch.Generator(device=device).manual_seed(1)
        x = torch.rand(1, ours.in_channels_pixels, 1, size, size, device=device, generator=gen) * 2 - 1
        xb = x.to(ours.dtype)
        outs = {}
        for impl, fn in (("diffusers", lambda: ref.encode(xb).latent_dist.mode()), ("qwenfast", lambda: ours.encode(xb))):
            out = run_case(rows, "encode", size, impl, "untiled", fn, device, args.repeats, args.warmup)
            if out is not None:
                outs[len(rows) - 1] = out
        if rows[-2].get("median_ms") and rows[-1].get("median_ms"):
            rows[-1]["speedup"] = rows[-2]["median_ms"] / rows[-1]["median_ms"]
            rows[-2]["speedup"] = 1.0
        ours32 = QwenImage21VAE.from_diffusers(ref).float()
        with torch.inference_mode():
            gold = ours32.encode(x).float()
        del ours32
        fidelity(rows, outs, gold)
    return rows


def attention_rows(sizes, args, device, dtype, dim: int = 1152, ratio: int = 16) -> list[dict]:
    """One frame's mid-block attention at each size (N = (size/16)² tokens), each CUDA path forced."""
    rows = []
    for size in sizes:
        n = (size // ratio) ** 2
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, n, dim, device=device, generator=g).to(dtype) for _ in range(3))
        gold = None
        if n <= args.attention_fp64_max:
            gold = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
        for path in ("sdpa_efficient", "chunked"):
            attention_ops.WIDE_HEAD_PATH = path
            fn = (lambda: attention_ops.single_head_attention(q, k, v)) if device.type == "cuda" else (
                lambda: attention_ops.single_head_attention_chunked(q, k, v))
            out, stats = measure(fn, device, args.repeats, args.warmup)
            row = dict(tokens=n, path=path if device.type == "cuda" else "chunked (cpu)", **stats,
                       tflops=4 * n * n * dim / stats["median_ms"] / 1e9)
            if gold is not None:
                row["max_abs_err"] = (out.double() - gold).abs().max().item()
            rows.append(row)
            print(f"attention N={n:6d} {row['path']:14s} {stats['median_ms']:8.2f} ms {row['tflops']:6.0f} TFLOP/s", flush=True)
        attention_ops.WIDE_HEAD_PATH = "sdpa_efficient"
        del q, k, v, gold
    return rows


def level_rows(ours, sizes, args, device) -> tuple[list[dict], list[dict]]:
    """Each stage of our untiled decode timed alone, and the kernels of one whole decode by kind."""
    rows, kernels = [], []
    ours.vae_config = VAEConfig()
    topo = ours.topology
    mid = topo.levels[0].conv_pairs()[0][0]  # the mid block's width: the tail ResBlock's convs
    for size in sizes:
        z = synthetic_latent(ours, size, device).to(ours.dtype)
        b, _, _, h, w = z.shape
        with torch.inference_mode():
            a = ours.decode_head(z)
            o = ours.attend(a)
            stages = [("head (post_quant, conv_in, ResBlock)", lambda: ours.decode_head(z), z, None),
                      ("attention", lambda: ours.attend(a), a, None),
                      ("tail ResBlock", lambda: ours.decode_tail(o), o, topo.tail_convs * 2 * 9 * mid * mid * b * h * w)]
            x = ours.decode_tail(o)[:, :, 0]  # the local part's input frame (B, C, h, w)
            for i, lv in enumerate(topo.levels):
                xi = x
                stages.append((f"level {i}" + (" + head" if lv.head_convs else ""),
                               lambda i=i, xi=xi: ours.decode_level(i, xi), xi,
                               level_flops((lv,), b, xi.shape[-2], xi.shape[-1])))
                x = ours.decode_level(i, x)
            start = len(rows)
            for name, fn, inp, flop in stages:
                t = time_ms(fn, device, args.repeats, args.warmup)
                row = dict(size=f"{size}²", stage=name, input="x".join(map(str, inp.shape)), median_ms=t["median_ms"])
                if flop:
                    row.update(conv_tflop=flop / 1e12, tflops=flop / t["median_ms"] / 1e9)
                rows.append(row)
                print(f"levels {size} {name:40s} {t['median_ms']:8.2f} ms", flush=True)
            total = sum(r["median_ms"] for r in rows[start:])
            for r in rows[start:]:
                r["share"] = r["median_ms"] / total
            del a, o, x, stages
            ours.decode(z)  # warm (cuDNN's choices for the banded shapes)
            for r in kernel_breakdown(profile_kernels(lambda: ours.decode(z), device)):
                kernels.append(dict(size=f"{size}²", **r))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, kernels


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1024,1328,2048,4096", help="decode sizes (px, square)")
    p.add_argument("--encode-sizes", default="1328")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--exact-tile", type=int, default=512, help="exact tiling: kept tile side in output px")
    p.add_argument("--modes", action="append", default=None, metavar="MODE",
                   help="one of our decode rows to run, repeatable (default: all of "
                   + "; ".join(repr(m) for m in OUR_MODES) + ")")
    p.add_argument("--fp32-max", type=int, default=2048, help="largest size with an fp32 reference decode")
    p.add_argument("--diffusers-max", type=int, default=2048, help="largest size diffusers decodes")
    p.add_argument("--wide-head-path", choices=("sdpa_efficient", "chunked"), default=None,
                   help="the mid-block attention path our decode uses (default: the library's)")
    p.add_argument("--attention", action="store_true", help="benchmark the d=1152 attention alone and exit")
    p.add_argument("--levels", default=None, metavar="SIZES",
                   help="time each stage and level of our untiled decode at these sizes, and its kernels by kind; exit")
    p.add_argument("--attention-fp64-max", type=int, default=7000, help="most tokens with an fp64 check")
    p.add_argument("--json", default=None, help="write the results with provenance here")
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="cudnn.benchmark off (its trials allocate workspaces)")
    p.add_argument("--memory-snapshot", default=None, metavar="DIR",
                   help="write a CUDA memory snapshot of one run of each of our decodes into DIR")
    p.add_argument("--dry-run", action="store_true", help="a tiny config on the CPU, to check the script")
    args = p.parse_args(argv)

    if args.dry_run:
        device, dtype, arch = torch.device("cpu"), torch.bfloat16, DRY_ARCH
        args.sizes, args.encode_sizes = "64,96", "64"
        args.repeats, args.warmup, args.exact_tile, args.attention_fp64_max = 1, 0, 32, 10**9
    else:
        device, dtype, arch = torch.device("cuda"), torch.bfloat16, {}
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    if args.wide_head_path:
        attention_ops.WIDE_HEAD_PATH = args.wide_head_path
    global SNAPSHOT_DIR
    SNAPSHOT_DIR = args.memory_snapshot
    sizes = [int(s) for s in args.sizes.split(",") if s]

    if args.attention:
        rows = attention_rows(sizes, args, device, dtype)
        columns, payload = ATTENTION_COLUMNS, {"attention": rows}
    elif args.levels:
        _, ours = build(arch, dtype, device)
        level_sizes = [64] if args.dry_run else [int(s) for s in args.levels.split(",") if s]
        rows, kernels = level_rows(ours, level_sizes, args, device)
        columns, payload = LEVEL_COLUMNS, {"levels": rows, "kernels": kernels}
        print()
        print(format_table(kernels, KERNEL_COLUMNS))
    else:
        ref, ours = build(arch, dtype, device)
        # the encode first (short), so that a run cut during the long decode rows still has it
        encoded = encode_rows(ref, ours, [int(s) for s in args.encode_sizes.split(",") if s], args, device)
        rows = decode_rows(ref, ours, sizes, args, device) + encoded
        columns, payload = COLUMNS, {"results": rows}
    info = provenance(device, dtype=str(dtype).removeprefix("torch."), model="AutoencoderKLQwenImage21",
                      weights="random, " + ("tiny dry-run config" if args.dry_run else "full-size (diffusers default config)"),
                      exact_tile_sample_size=args.exact_tile, wide_head_path=attention_ops.WIDE_HEAD_PATH,
                      cudnn_benchmark=device.type == "cuda" and not args.no_cudnn_benchmark)
    if args.json:
        write_json(args.json, {"provenance": info, **payload})
    print()
    print(format_table(rows, columns))
    return rows


if __name__ == "__main__":
    main()
