"""The upsamplers' nearest-2x + 3x3 conv in its three formulations (`qwen_image.UPSAMPLE_CONV`):
"direct" (upsample, then the conv at 2x: 36 multiply-adds per output pixel and channel pair),
"transposed" (one stride-2 4x4 transposed conv) and "subpixel" (four 2x2 convs, interleaved), both
16. Both VAEs, full-size architecture, random weights, bf16, channels-last on CUDA.

Two tables: each upsampler layer alone (its input shape recorded from a real decode; median ms and
TFLOP/s counted at the direct path's FLOPs, so a faster formulation shows as > the hardware's rate),
then the whole decode per formulation (median ms, peak GiB, max|Δ| against an fp32 direct decode).

    python benchmarks/bench_upsample_conv.py --json benchmarks/results/upsample_conv_h200.json
    python benchmarks/bench_upsample_conv.py --dry-run        # tiny configs on the CPU: checks the script
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qwenfast import QwenImage21VAE, QwenImageVAE  # noqa: E402
from qwenfast.benchmarking import format_table, measure, provenance, synthetic_latent, time_ms, write_json  # noqa: E402
from qwenfast.vae import qwen_image  # noqa: E402
from qwenfast.vae.qwen_image import UPSAMPLE_CONVS, UpsampleConv2x  # noqa: E402

LAYER_COLUMNS = [("model", "model", ""), ("size", "size", ""), ("layer", "layer", ""), ("shape", "input", ""),
                 ("mode", "mode", ""), ("median_ms", "median ms", ".3f"), ("tflops", "TFLOP/s (direct FLOPs)", ".0f")]
DECODE_COLUMNS = [("model", "model", ""), ("size", "size", ""), ("mode", "mode", ""), ("median_ms", "median ms", ".2f"),
                  ("peak_gib", "peak GiB", ".2f"), ("fp32_max_err", "max|Δ| vs fp32 direct", ".2e"),
                  ("speedup", "x direct", ".3f")]
DRY = {"qwenimage": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, latents_mean=[0.0] * 4,
                        latents_std=[1.0] * 4),
       "qwenimage21": dict(base_dim=4, decoder_base_dim=6, z_dim=8, dim_mult=[1, 2, 4, 8, 8], num_res_blocks=1,
                           latents_mean=[0.0] * 8, latents_std=[1.0] * 8)}
MODELS = {"qwenimage": QwenImageVAE, "qwenimage21": QwenImage21VAE}


def upsampler_inputs(vae, z) -> list[tuple[str, tuple[int, ...]]]:
    """(name, input shape) of every UpsampleConv2x that a decode of `z` runs, in order."""
    seen, hooks = [], []
    for name, m in vae.named_modules():
        if isinstance(m, UpsampleConv2x):
            hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: seen.append((name, tuple(args[0].shape)))))
    try:
        with torch.inference_mode():
            vae.decode(z)
    finally:
        for h in hooks:
            h.remove()
    return seen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwenimage21,qwenimage", help="comma list of: qwenimage21, qwenimage")
    p.add_argument("--sizes", default="1328,2048", help="comma list of image sizes (px)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layer-repeats", type=int, default=20)
    p.add_argument("--no-fidelity", action="store_true", help="skip the fp32 reference decode")
    p.add_argument("--dry-run", action="store_true", help="tiny configs on the CPU")
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)

    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    sizes = [64] if args.dry_run else [int(s) for s in args.sizes.split(",")]
    layer_rows, decode_rows = [], []
    previous = qwen_image.UPSAMPLE_CONV
    try:
        for model in args.models.split(","):
            torch.manual_seed(0)
            cls = MODELS[model]
            vae = (cls(**DRY[model]) if args.dry_run else cls()).to(device=device, dtype=dtype).eval().requires_grad_(False)
            for size in sizes:
                z = synthetic_latent(vae, size, device).to(dtype)
                qwen_image.UPSAMPLE_CONV = "direct"
                for name, shape in upsampler_inputs(vae, z):
                    m = vae.get_submodule(name)
                    x = torch.randn(shape, device=device, dtype=dtype).contiguous(
                        memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)
                    flops = 2 * 9 * m[1].in_channels * m[1].out_channels * 4 * shape[0] * shape[2] * shape[3]
                    for mode in UPSAMPLE_CONVS:
                        qwen_image.UPSAMPLE_CONV = mode
                        with torch.inference_mode():
                            t = time_ms(lambda: m(x), device, repeats=args.layer_repeats, warmup=3)
                        layer_rows.append(dict(model=model, size=size, layer=name, shape="x".join(map(str, shape)), mode=mode,
                                               median_ms=t["median_ms"], tflops=flops / t["median_ms"] / 1e9))
                gold = None
                if not args.no_fidelity:
                    qwen_image.UPSAMPLE_CONV = "direct"
                    vae32 = vae.float()
                    with torch.inference_mode():
                        gold = vae32.decode(z.float()).float()
                    vae.to(dtype)
                for mode in UPSAMPLE_CONVS:
                    qwen_image.UPSAMPLE_CONV = mode
                    out, stats = measure(lambda: vae.decode(z), device, repeats=args.repeats, warmup=2)
                    row = dict(model=model, size=size, mode=mode, **stats)
                    if gold is not None:
                        row["fp32_max_err"] = (out.float() - gold).abs().max().item()
                    decode_rows.append(row)
                    del out
                base = next(r for r in decode_rows if r["model"] == model and r["size"] == size and r["mode"] == "direct")
                for r in decode_rows:
                    if r["model"] == model and r["size"] == size:
                        r["speedup"] = base["median_ms"] / r["median_ms"]
                del gold
            del vae
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        qwen_image.UPSAMPLE_CONV = previous
    print(format_table(layer_rows, LAYER_COLUMNS))
    print()
    print(format_table(decode_rows, DECODE_COLUMNS))
    if args.json:
        write_json(args.json, {"provenance": provenance(device), "dtype": str(dtype), "layers": layer_rows,
                               "decodes": decode_rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
