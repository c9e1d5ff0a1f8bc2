"""Video decode / encode of the Qwen-Image (= Wan 2.1) VAE on one GPU: two qwenfast checkouts (the
old path and the new one) and diffusers, side by side, bf16, random full-size weights.

One process per implementation (the two qwenfast checkouts are both called `qwenfast`), each writing
JSON; `--report` merges them, prints the table last and writes markdown with provenance:

    PYTHONPATH=src          python benchmarks/bench_video.py --impl qwenfast --label old --json /tmp/old.json
    PYTHONPATH=NEW/src      python benchmarks/bench_video.py --impl qwenfast --label new --variants \\
                            --compare /tmp/old.json --json /tmp/new.json
    PYTHONPATH=NEW/src      python benchmarks/bench_video.py --impl diffusers --label diffusers --json /tmp/d.json
    python benchmarks/bench_video.py --report /tmp/old.json /tmp/new.json /tmp/d.json --out results/video_h200

Cases: decode 81 frames at 1280x720 (latent 21x90x160) and 832x480 (21x60x104), untiled and (ours)
exact-tiled; encode 81 frames at 832x480. Per case: median ms, allocator peak above the memory in
use before (GiB) and that peak less the output tensor; max|Δ| against the first qwenfast run
(`--compare`, on frames 0, 1, T/2, T-1, bf16), and the bf16 decode against an fp32 decode of a
3-latent-frame 480p video (fp32 vs fp32 across implementations too). `--variants` also times the
new path's window convs (`WINDOW_VARIANTS`, `ENCODE_VARIANTS`) with their chunk sizes,
a 96-channel 3x3x3 conv at 720p on 4 frames in each formulation (TFLOP/s), and profiles one decode.
`--tiny` runs everything at toy sizes on the CPU (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import torch

from qwenfast import QwenImageVAE, VAEConfig
from qwenfast.benchmarking import PeakMemory, format_table, markdown_table, provenance, time_ms, write_json

TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
            temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
FULL_CASES = {"decode 81x1280x720": (21, 90, 160), "decode 81x832x480": (21, 60, 104), "encode 81x832x480": (81, 480, 832),
              "decode image 1328x1328": (1, 166, 166),  # the image path must not get slower
              "encode image 1328x1328": (1, 1328, 1328)}  # the Edit pipelines' conditioning encode
TINY_CASES = {"decode 9x64x48": (3, 8, 6), "decode 9x48x40": (3, 6, 5), "encode 9x48x40": (9, 48, 40),
              "decode image 64x64": (1, 8, 8), "encode image 64x64": (1, 64, 64)}
# (window conv, latent frames a step) of the decode variants, and (window conv, frames a step) of the encode
# ones. "taps2d" and "stacked2d" (a copy into the stack) lost on the H200 at 1 and 2 latent frames a step
# and conv3d at 4 held 21 GiB (results/video_0ebd864_h200.md): not timed again.
# A third element: video.STACKED_MAX_CHANNELS (the stack only where the conv reads at most that many
# channels: the decoder's 192- and 96-channel levels at 360x640 and 720x1280).
WINDOW_VARIANTS = [("stacked2d_filled", 1, None), ("stacked2d_filled", 1, 192), ("stacked2d_filled", 1, 96),
                   ("stacked2d_filled", 2, None), ("conv3d", 2, None)]
ENCODE_VARIANTS = [("conv3d", 8, None), ("stacked2d_filled", 4, None), ("stacked2d_filled", 4, 192),
                   ("stacked2d_filled", 8, None)]
COLUMNS = [("case", "case", ""), ("label", "impl", ""), ("mode", "mode", ""), ("median_ms", "median ms", ".1f"),
           ("peak_gib", "peak GiB", ".2f"), ("beyond_out_gib", "peak - output", ".2f"),
           ("vs_first", "max|Δ| vs old", ".2e"), ("speedup", "x diffusers", ".2f")]


def build(impl: str, arch: dict | None, dtype, device):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    ref = AutoencoderKLQwenImage(**(arch or {})).eval().requires_grad_(False)
    with torch.no_grad():  # gammas off one, so that a wrong norm scale would show
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.add_(0.1 * torch.randn_like(p))
    ref = ref.to(device=device, dtype=dtype)
    if impl == "diffusers":
        return ref
    return QwenImageVAE.from_diffusers(ref)


def inputs(kind: str, shape, z_dim: int, device, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "decode":
        return torch.randn(1, z_dim, *shape, generator=gen).to(device)
    return (torch.rand(1, 3, *shape, generator=gen) * 2 - 1).to(device)


def run_fn(impl, model, kind, x):
    if impl == "diffusers":
        if kind == "decode":
            return lambda: model.decode(x).sample
        return lambda: model.encode(x).latent_dist.mode()
    return (lambda: model.decode(x)) if kind == "decode" else (lambda: model.encode(x))


def measure(fn, device, repeats, warmup):
    box = {}

    def once():
        box.pop("out", None)
        with torch.inference_mode():
            box["out"] = fn()

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with PeakMemory(device) as peak:
        timing = time_ms(once, device, repeats=repeats, warmup=warmup)
    return box["out"], dict(timing, peak_gib=peak.gib)


def subset(out: torch.Tensor) -> torch.Tensor:
    t = out.shape[2]
    return out[:, :, sorted({0, min(1, t - 1), t // 2, t - 1})].float().cpu()


def conv_rates(device, tiny: bool) -> list[dict]:
    """A 96-channel 3x3x3 causal conv on 4 frames (a window of 6) at 720p, each formulation: TFLOP/s."""
    import torch.nn.functional as F

    from qwenfast.vae import video

    c, h, w = (8, 24, 40) if tiny else (96, 720, 1280)
    t = 4
    dtype = torch.float32 if tiny else torch.bfloat16
    conv = torch.nn.Conv3d(c, c, 3).to(device=device, dtype=dtype)
    conv._pad = (1, 1, 1, 1, 2, 0)
    win = torch.randn(1, c, t + 2, h, w, device=device, dtype=dtype)
    flop = 2 * c * c * 27 * t * h * w
    rows = []
    cases = [("conv3d NCDHW", win, "conv3d"),
             ("conv3d channels-last 3-D", win.contiguous(memory_format=torch.channels_last_3d), "conv3d"),
             ("taps2d (3 x conv2d, summed)", win.contiguous(memory_format=torch.channels_last_3d), "taps2d"),
             ("stacked2d (copy + conv2d 3C)", win.contiguous(memory_format=torch.channels_last_3d), "stacked2d")]
    for name, x, mode in cases:
        video.WINDOW_CONV = mode
        with torch.inference_mode():
            _, st = measure(lambda: video._convolve_window(conv, x, conv.bias), device, 10, 3)
        rows.append(dict(case=name, median_ms=st["median_ms"], tflops=flop / st["median_ms"] / 1e9))
    stacked = torch.randn(t, 3 * c, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w2 = torch.randn(c, 3 * c, 3, 3, device=device, dtype=dtype)
    with torch.inference_mode():
        _, st = measure(lambda: F.conv2d(stacked, w2, None, 1, 1), device, 10, 3)
    rows.append(dict(case="conv2d 3C on a prebuilt stack (no copy)", median_ms=st["median_ms"],
                     tflops=flop / st["median_ms"] / 1e9))
    video.WINDOW_CONV = "conv3d"
    del win, stacked
    # each level of the 720p decoder (channels, frames a step at 1 latent frame a step, size): cuDNN's
    # channels-last conv3d against the 2-D conv over a prebuilt stack, which decides STACKED_MAX_CHANNELS
    levels = [(8, 1, 6, 10), (8, 2, 12, 20), (8, 4, 24, 40)] if tiny else \
        [(384, 1, 90, 160), (384, 2, 180, 320), (192, 4, 360, 640), (96, 4, 720, 1280)]
    for c, t, h, w in levels:
        conv = torch.nn.Conv3d(c, c, 3, bias=False).to(device=device, dtype=dtype)
        conv._pad = (1, 1, 1, 1, 2, 0)
        win = torch.randn(1, c, t + 2, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
        stacked = torch.randn(t, 3 * c, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        flop = 2 * c * c * 27 * t * h * w
        with torch.inference_mode():
            for name, fn in ((f"level {c} ch {h}x{w} x{t}: conv3d channels-last", lambda: video._convolve_window(conv, win, None)),
                             (f"level {c} ch {h}x{w} x{t}: conv2d 3C on a stack", lambda: video._conv_over_stack(conv, stacked, None))):
                _, st = measure(fn, device, 10, 3)
                rows.append(dict(case=name, median_ms=st["median_ms"], tflops=flop / st["median_ms"] / 1e9))
        del win, stacked
    return rows


def bench(args) -> dict:
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    arch = TINY if args.tiny else None
    cases = TINY_CASES if args.tiny else FULL_CASES
    low = torch.float32 if args.tiny else torch.bfloat16  # the old checkout's CPU norm returns fp32 for bf16
    model = build(args.impl, arch, low, device)
    z_dim = (arch or {}).get("z_dim", 16)
    first_out = {}
    if args.compare and Path(args.compare + ".pt").exists():
        first_out = torch.load(args.compare + ".pt")
    elif args.compare:
        print(f"--compare {args.compare}: no outputs there (did that run fail?); no max|Δ| vs it", flush=True)
    saved: dict[str, torch.Tensor] = {}
    rows: list[dict] = []
    reps, warm = (1, 1) if args.tiny else (args.repeats, 1)
    info = provenance(device, dtype="bfloat16", label=args.label, impl=args.impl,
                      weights="random, full-size (diffusers default config), gammas perturbed",
                      qwenfast_file=__import__("qwenfast").__file__, cudnn_benchmark=device.type == "cuda")
    payload: dict = {"provenance": info, "results": rows, "fidelity": {}}

    def checkpoint():  # after every row: a run stopped by a time limit keeps what it measured
        write_json(args.json, payload)
        torch.save(saved, args.json + ".pt")

    def record(case, mode, out, stats, key=None):
        key = key or f"{case}|{mode}"
        row = dict(case=case, label=args.label, mode=mode, **stats)
        row["out_gib"] = out.numel() * out.element_size() / 2**30
        row["beyond_out_gib"] = stats["peak_gib"] - row["out_gib"]
        sub = subset(out)
        saved[key] = sub
        ref_key = f"{case}|untiled"
        if ref_key in first_out:
            row["vs_first"] = (sub - first_out[ref_key]).abs().max().item()
        rows.append(row)
        checkpoint()
        print(f"{args.label:9s} {case:22s} {mode:28s} {stats['median_ms']:9.1f} ms  peak {stats['peak_gib']:6.2f} GiB",
              flush=True)

    def variant(case, kind, x, mode, window_conv, cfg=None, decode_chunk_frames=1, encode_chunk_frames=None,
                stacked_max_channels=None):
        """One row of the new path with `video.WINDOW_CONV` and the chunk sizes set, then the defaults back."""
        from qwenfast.vae import video

        model.vae_config = cfg or VAEConfig()
        video.WINDOW_CONV, video.STACKED_MAX_CHANNELS = window_conv, stacked_max_channels
        model.decode_chunk_frames, model.encode_chunk_frames = decode_chunk_frames, encode_chunk_frames
        try:
            out, stats = measure(run_fn(args.impl, model, kind, x), device, max(1, reps - 1), warm)
            record(case, mode, out, stats)
        finally:
            model.vae_config = VAEConfig()
            video.WINDOW_CONV, video.STACKED_MAX_CHANNELS = "conv3d", None
            model.decode_chunk_frames, model.encode_chunk_frames = 1, None

    for case, shape in cases.items():
        kind = case.split()[0]
        x = inputs(kind, shape, z_dim, device).to(low)
        modes = ["untiled"]
        if kind == "decode" and args.impl == "qwenfast" and "image" not in case and not args.skip_tiling:
            modes.append("exact tiling")
            if args.variants and case == next(iter(cases)):
                modes.append("exact tiling, 512 px tiles")
        for mode in modes:
            if args.impl == "qwenfast":
                tile = 512 if "512" in mode else 1024
                if args.tiny:
                    tile //= 16
                model.vae_config = VAEConfig(use_tiling=mode != "untiled", exact_tile_sample_size=tile)
            try:
                out, stats = measure(run_fn(args.impl, model, kind, x), device, reps, warm)
            except torch.cuda.OutOfMemoryError as e:
                print(f"{case} {mode}: OOM ({str(e).splitlines()[0]})", flush=True)
                continue
            record(case, mode, out, stats)
            del out
        if args.variants and args.impl == "qwenfast" and case == next(iter(cases)):
            for conv_mode, chunk, max_c in WINDOW_VARIANTS:
                where = "" if max_c is None else f" (C <= {max_c})"
                variant(case, kind, x, f"untiled, {conv_mode}{where}, {chunk} latent fr/step", conv_mode,
                        decode_chunk_frames=chunk, stacked_max_channels=max_c)
            variant(case, kind, x, "exact tiling, stacked2d_filled", "stacked2d_filled",
                    cfg=VAEConfig(use_tiling=True, exact_tile_sample_size=64 if args.tiny else 1024))
        if args.variants and args.impl == "qwenfast" and kind == "encode" and "image" not in case:
            for conv_mode, chunk, max_c in ENCODE_VARIANTS:
                where = "" if max_c is None else f" (C <= {max_c})"
                variant(case, kind, x, f"untiled, {conv_mode}{where}, {chunk} frames/step", conv_mode,
                        encode_chunk_frames=chunk, stacked_max_channels=max_c)
        del x

    # fidelity: bf16 against fp32 (TF32 off) on a short video, each implementation against itself,
    # and the fp32 decodes across implementations
    fid_shape = (2, 8, 6) if args.tiny else (3, 60, 104)
    z = inputs("decode", fid_shape, z_dim, device, seed=1)
    with torch.inference_mode():
        bf = run_fn(args.impl, model, "decode", z.to(low))().float()
        model32 = model.float()
        gold = run_fn(args.impl, model32, "decode", z)().float()
    fidelity = payload["fidelity"]
    fidelity.update(bf16_vs_fp32_max=(bf - gold).abs().max().item(), bf16_vs_fp32_mean=(bf - gold).abs().mean().item())
    saved["fp32"] = gold.cpu()
    if "fp32" in first_out:
        fidelity["fp32_vs_first_fp32_max"] = (gold.cpu() - first_out["fp32"]).abs().max().item()
    print(f"{args.label}: fidelity {fidelity}", flush=True)
    checkpoint()
    model = model32.to(low)
    del bf, gold, model32

    if args.variants:
        payload["conv_rates"] = conv_rates(device, args.tiny)
        for r in payload["conv_rates"]:
            print(f"conv {r['case']:42s} {r['median_ms']:8.2f} ms {r['tflops']:7.1f} TFLOP/s", flush=True)
        checkpoint()
        if device.type == "cuda":
            payload["profile"] = profile(model, cases, z_dim, device)
    checkpoint()
    return payload


def profile(model, cases, z_dim, device) -> str:
    """Top CUDA kernels of one decode of the first case (a shorter video: 6 latent frames), with each
    window conv that is in question ("conv3d", the default, and "stacked2d_filled")."""
    from qwenfast.vae import video

    shape = next(iter(cases.values()))
    z = inputs("decode", (6, *shape[1:]), z_dim, device).to(torch.bfloat16)
    model.vae_config = VAEConfig()
    tables = []
    for mode in ("conv3d", "stacked2d_filled"):
        video.WINDOW_CONV = mode
        with torch.inference_mode():
            model.decode(z)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                model.decode(z)
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70)
        print(f"window conv {mode}:\n{table}", flush=True)
        tables.append(f"window conv {mode}:\n{table}")
    video.WINDOW_CONV = "conv3d"
    return "\n".join(tables)


def report(paths: list[str], out: str | None) -> None:
    runs = [json.loads(Path(p).read_text()) for p in paths if Path(p).exists()]
    rows = [r for run in runs for r in run["results"]]
    for r in rows:
        base = next((b for b in rows if b["case"] == r["case"] and b["label"] == "diffusers" and b["mode"] == "untiled"), None)
        if base:
            r["speedup"] = base["median_ms"] / r["median_ms"]
    text = format_table(rows, COLUMNS)
    lines = [f"- {run['provenance']['label']}: fidelity {run['fidelity']}" for run in runs]
    for run in runs:
        for r in run.get("conv_rates", []):
            lines.append(f"- conv {r['case']}: {r['median_ms']:.2f} ms, {r['tflops']:.0f} TFLOP/s")
    if out:
        info = runs[-1]["provenance"]
        prof = next((run["profile"] for run in runs if run.get("profile")), "")
        md = (f"# Video decode / encode, one GPU\n\n{info['device']}, torch {info['torch']}, triton {info['triton']}, "
              f"diffusers {info['diffusers']}, bf16, random full-size weights. Runs: "
              + "; ".join(f"{run['provenance']['label']} = `{run['provenance']['command']}` "
                          f"(commit {run['provenance']['commit']})" for run in runs)
              + "\n\nmax|Δ| vs old: bf16, frames 0, 1, T/2, T-1, against the old path's untiled output of the same case."
              + " peak: allocator peak above the memory in use before; peak - output: less the output tensor.\n\n"
              + markdown_table(rows, COLUMNS) + "\n\n" + "\n".join(lines) + "\n"
              + (f"\nProfile (new path, 6 latent frames):\n\n```\n{prof}\n```\n" if prof else ""))
        Path(out + ".md").write_text(md)
        write_json(out + ".json", {"runs": runs})
    print("\n".join(lines))
    print(text)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=["qwenfast", "diffusers"], default="qwenfast")
    p.add_argument("--label", default="new")
    p.add_argument("--json", default="bench_video.json")
    p.add_argument("--compare", default=None, help="JSON of an earlier run (its .pt holds its outputs)")
    p.add_argument("--variants", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-tiling", action="store_true", help="no exact-tiled decodes (saves time on the old path)")
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU: a smoke test")
    p.add_argument("--report", nargs="+", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.report:
        return report(args.report, args.out)
    bench(args)


if __name__ == "__main__":
    main()
