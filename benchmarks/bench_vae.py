"""Single-GPU VAE decode: qwenfast (untiled fast path; exact tiling) against diffusers (untiled;
`enable_tiling()`), full-size architecture, random weights, bf16. One run, side by side.

For each size: median ms, peak GiB (allocator peak above what was in use before), max|Δ| of each
decode against the untiled decode of the same implementation, and, where an fp32 decode fits, the
fidelity of each bf16 decode against it (max and mean |Δ|): ours must not be worse than diffusers'.

    python benchmarks/bench_vae.py --sizes 1024,1328,2048,4096 --out benchmarks/results/vae_h100
    python benchmarks/bench_vae.py --profile 1328      # top CUDA kernels of our untiled decode
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qwenfast import QwenImageVAE, VAEConfig  # noqa: E402
from qwenfast.benchmarking import (  # noqa: E402
    format_table, markdown_table, measure, provenance, synthetic_latent, write_json)

COLUMNS = [("size", "size", ""), ("impl", "impl", ""), ("mode", "mode", ""), ("median_ms", "median ms", ".1f"),
           ("peak_gib", "peak GiB", ".2f"), ("max_abs_diff", "max|Δ| vs own untiled", ".2e"),
           ("fp32_max_err", "max|Δ| vs fp32", ".2e"), ("fp32_mean_err", "mean|Δ| vs fp32", ".2e"),
           ("speedup", "x diffusers untiled", ".2f")]


def build(dtype, device, seed=0):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    ref = AutoencoderKLQwenImage().to(device=device, dtype=dtype).eval().requires_grad_(False)
    ours = QwenImageVAE.from_diffusers(ref)
    return ref, ours


def profile(size, device):
    ref, ours = build(torch.bfloat16, device)
    z = synthetic_latent(ours, size, device).bfloat16()
    with torch.inference_mode():
        for _ in range(2):
            ours.decode(z)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            ours.decode(z)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1024,1328,2048,4096")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--fp32-max", type=int, default=2048, help="largest size with an fp32 reference decode")
    p.add_argument("--skip-diffusers-tiled-above", type=int, default=4096)
    p.add_argument("--out", default="benchmarks/results/vae")
    p.add_argument("--profile", type=int, default=None, help="profile our untiled decode at this size and exit")
    args = p.parse_args()
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    if args.profile:
        return profile(args.profile, device)

    ref, ours = build(torch.bfloat16, device)
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        z = synthetic_latent(ours, size, device)
        zb = z.bfloat16()
        reps = args.repeats if size < 4096 else max(2, args.repeats // 2)
        warm = args.warmup if size < 4096 else 1
        outs = {}
        cases = [
            ("diffusers", "untiled", lambda: ref.decode(zb).sample),
            ("diffusers", "enable_tiling", lambda: ref.decode(zb).sample),
            ("qwenfast", "untiled", lambda: ours.decode(zb)),
            ("qwenfast", "exact tiling", lambda: ours.decode(zb)),
        ]
        for impl, mode, fn in cases:
            if impl == "diffusers" and mode == "enable_tiling" and size > args.skip_diffusers_tiled_above:
                continue
            if mode == "enable_tiling":
                ref.enable_tiling()
            ours.vae_config = VAEConfig(use_tiling=(mode == "exact tiling"))
            try:
                out, stats = measure(fn, device, reps, warm)
            except torch.cuda.OutOfMemoryError as e:
                print(f"{size} {impl} {mode}: OOM ({str(e).splitlines()[0]})", flush=True)
                rows.append(dict(size=f"{size}²", impl=impl, mode=mode, error="OOM"))
                continue
            finally:
                ref.disable_tiling()
            outs[(impl, mode)] = out.clamp(-1, 1)
            own = outs.get((impl, "untiled")) if mode != "untiled" else None  # the reference row: not compared with itself
            row = dict(size=f"{size}²", pixels=size * size, impl=impl, mode=mode, **stats,
                       max_abs_diff=(outs[(impl, mode)].float() - own.float()).abs().max().item() if own is not None else None)
            rows.append(row)
            print(f"{size} {impl:9s} {mode:14s} {stats['median_ms']:9.1f} ms  peak {stats['peak_gib']:6.2f} GiB", flush=True)
        base = next((r["median_ms"] for r in rows if r.get("size") == f"{size}²" and r["impl"] == "diffusers"
                     and r["mode"] == "untiled" and "median_ms" in r), None)
        for r in rows:
            if r.get("size") == f"{size}²" and base and "median_ms" in r:
                r["speedup"] = base / r["median_ms"]
        if size <= args.fp32_max:  # fidelity against an fp32 decode of the same latent (ours fp32 = diffusers fp32, tested)
            ours32 = QwenImageVAE.from_diffusers(ref).float()
            with torch.inference_mode():
                gold = ours32.decode(z).float()
            del ours32
            for r in rows:
                key = (r["impl"], r["mode"])
                if r.get("size") == f"{size}²" and key in outs:
                    d = (outs[key].float() - gold).abs()
                    r["fp32_max_err"], r["fp32_mean_err"] = d.max().item(), d.mean().item()
            del gold
        del outs, z, zb
        gc.collect()
        torch.cuda.empty_cache()

    info = provenance(device, dtype="bfloat16", weights="random, full-size (diffusers default config)",
                      command=" ".join(sys.argv), cudnn_benchmark=True)
    write_json(args.out + ".json", {"provenance": info, "results": rows})
    table = markdown_table(rows, COLUMNS)
    Path(args.out + ".md").write_text(
        f"# VAE decode, single GPU\n\n{info['device']}, torch {info['torch']}, triton {info['triton']}, "
        f"diffusers {info['diffusers']}, commit {info['commit']}, bf16, random full-size weights.\n"
        f"Command: `{info['command']}`\n\n{table}\n")
    print()
    print(format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
