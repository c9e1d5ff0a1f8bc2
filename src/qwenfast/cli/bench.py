"""`qwenfast bench`: decode synthetic latents and report time, peak memory and exactness per mode."""

from __future__ import annotations

import argparse
import re

import torch

from ..config import VAEConfig
from .common import (
    CLIError,
    add_dtype_device_args,
    all_ranks_agree,
    distributed,
    out_of_memory_as_hint,
    reading_error,
    resolve_device,
    resolve_dtype,
    vae_config_from_args,
)

DESCRIPTION = """\
Benchmark the Qwen-Image VAE decode on synthetic latents (random normal, de-normalised with the VAE's
latents_mean / latents_std) with randomly initialised full-size weights (or --vae PATH). For each size
and mode: median wall time, peak memory, and max|Δ| against the untiled decode of the same latent.

modes:
  untiled     the default decode (for images: the 2-D fast path, no frame cache)
  untiled-3d  the decode as diffusers runs it (3-D causal convs, frame cache), for comparison
  exact       exact tiling (global part once, local part on tiles with a margin): equal to untiled
  blend       diffusers' blend tiling (not exact)
  tiled, patch, auto
              parallel decode over the ranks of `torchrun --nproc-per-node N -m qwenfast bench ...`
              (with one process: the single-device decode). Time = the slowest rank; peak memory
              and bytes sent are listed per rank.

On a GPU every decode runs as a CUDA graph (VAEConfig.cuda_graph: captured in the warm-up, replayed in the
timed runs; in the parallel modes each rank's compute between collectives); --no-cuda-graph times the
eager decode. On a CPU decodes run eagerly. The table's "graph" column and the JSON say which ran.
"""

EPILOG = """\
examples:
  qwenfast bench                                   # CPU: 256² and 512² in about a minute
  qwenfast bench --sizes 1328,2048,1664x928 --modes untiled,exact --dtype bf16
  qwenfast bench --frames 5 --sizes 480x832        # a video latent
  qwenfast bench --sizes 1024,1328 --no-cuda-graph # eager decodes on a GPU (launch gaps included)
  qwenfast bench --model qwenimage21 --sizes 1024,1328,2048 --dtype bf16   # the Qwen-Image-2.1 VAE
  torchrun --nproc-per-node 4 -m qwenfast bench --sizes 2048,4096 --modes untiled,patch,tiled,auto
"""

# mode name → the VAEConfig fields it sets over the --vae-config.* flags
MODES: dict[str, dict] = {
    "untiled": dict(use_tiling=False, use_parallel_decode=False),
    "untiled-3d": dict(use_tiling=False, use_parallel_decode=False, image_fast_path=False),
    "exact": dict(use_tiling=True, tiling="exact", use_parallel_decode=False),
    "blend": dict(use_tiling=True, tiling="blend", use_parallel_decode=False),
    "tiled": dict(use_parallel_decode=True, parallel_decode_mode="tiled"),
    "patch": dict(use_parallel_decode=True, parallel_decode_mode="patch"),
    "auto": dict(use_parallel_decode=True, parallel_decode_mode="auto"),
}

COLUMNS = [("size", "size", ""), ("frames", "T", "d"), ("mode", "mode", ""), ("graph", "graph", ""),
           ("median_ms", "median ms", ".1f"),
           ("peak_gib", "peak GiB", ".2f"), ("max_abs_diff", "max|Δ| vs untiled", ".2e"),
           ("ranks", "ranks", "d"), ("mib_sent", "MiB sent/rank", ".1f")]


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the VAE decode on synthetic latents", description=DESCRIPTION,
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, metavar="LIST",
                   help="output sizes in pixels, comma-separated: N (square) or WxH, multiples of 8 "
                        "(default: 256,512 on a CPU; 1024,1328,2048 on a GPU)")
    p.add_argument("--frames", type=int, default=1, metavar="T", help="latent frames (1 = images; default 1)")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="batch size (default 1)")
    p.add_argument("--modes", default="untiled,exact", metavar="LIST",
                   help=f"comma-separated, from: {', '.join(MODES)} (default: untiled,exact)")
    p.add_argument("--repeats", type=int, default=None, metavar="N", help="timed runs (default: 5 GPU, 2 CPU)")
    p.add_argument("--warmup", type=int, default=None, metavar="N", help="untimed runs first (default: 2 GPU, 0 CPU)")
    p.add_argument("--vae", default=None, metavar="PATH", help="real weights (default: random full-size weights; "
                   "the model is read from its config.json)")
    p.add_argument("--model", choices=sorted(MODELS), default="qwenimage",
                   help="the architecture of the random weights: qwenimage (default) or qwenimage21 (the "
                        "Qwen-Image-2.1 VAE: 16x, 64 latent channels, RGBA; images only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and latents (default 0)")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="on a GPU, time eager decodes (default there: CUDA-graph replays, VAEConfig.cuda_graph)")
    p.add_argument("--json", default="qwenfast-bench.json", metavar="PATH",
                   help="where to write the results (default: ./qwenfast-bench.json; replaced if it exists; "
                        "checked before the benchmark starts)")
    add_dtype_device_args(p)
    VAEConfig.add_cli_args(p)
    p.set_defaults(handler=run)


# --model → (class name in qwenfast.vae, description of its random weights)
MODELS = {"qwenimage": ("QwenImageVAE", "Qwen-Image"), "qwenimage21": ("QwenImage21VAE", "Qwen-Image-2.1")}


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'1328,1664x928' → [(1328, 1328), (928, 1664)] as (height, width)."""
    sizes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = re.fullmatch(r"(\d+)(?:x(\d+))?", item)
        if not m:
            raise CLIError(f"--sizes: {item!r} is not N or WxH")
        w = int(m.group(1))
        h = int(m.group(2)) if m.group(2) else w
        if h % 8 or w % 8 or h <= 0 or w <= 0:
            raise CLIError(f"--sizes: {item} must be positive multiples of 8 (the VAE's compression)")
        sizes.append((h, w))
    if not sizes:
        raise CLIError("--sizes is empty")
    return sizes


def bench_cuda_graph(cfg: VAEConfig, args, gpu: bool) -> VAEConfig:
    """bench's decode config: CUDA graphs on by default on a GPU (every shape repeats: warm-up, then the
    timed runs), off with --no-cuda-graph; an explicit --vae-config.cuda-graph is kept as given."""
    given = "vae_config__cuda_graph" in vars(args)
    if args.no_cuda_graph and given and cfg.cuda_graph:
        raise CLIError("--no-cuda-graph contradicts --vae-config.cuda-graph true; give one of them")
    if args.no_cuda_graph:
        return cfg.replace(cuda_graph=False)
    return cfg if given else cfg.replace(cuda_graph=gpu)


@distributed
def run(args) -> int:
    with all_ranks_agree("checking the options"):
        setup = _setup(args)
    return _bench(args, *setup)


def _setup(args):
    from pathlib import Path

    from .. import vae as models
    from ..parallel import group as pg
    from ..vae.weights import WeightsError, vae_class_for
    from . import media

    base_cfg = vae_config_from_args(args, progress_default=False)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    gpu = device.type == "cuda"
    base_cfg = bench_cuda_graph(base_cfg, args, gpu)
    sizes = parse_sizes(args.sizes or ("1024,1328,2048" if gpu else "256,512"))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise CLIError(f"--modes: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(MODES)}")
    if args.frames < 1 or args.batch < 1:
        raise CLIError("--frames and --batch must be >= 1")
    repeats = args.repeats if args.repeats is not None else (5 if gpu else 2)
    warmup = args.warmup if args.warmup is not None else (2 if gpu else 0)
    json_out = media.Output(Path(args.json), "json")
    if pg.is_rank0():  # rank 0 writes the results: fail now, not after the benchmark
        media.check_targets([json_out], overwrite=True)

    torch.manual_seed(args.seed)
    try:
        cls = vae_class_for(args.vae) if args.vae else getattr(models, MODELS[args.model][0])
        if args.frames > 1 and cls is models.QwenImage21VAE:
            raise CLIError("--frames: the Qwen-Image-2.1 VAE is an image model; use --frames 1")
        if args.vae:
            with out_of_memory_as_hint(f"loading --vae {args.vae}"):
                vae = cls.from_pretrained(args.vae, dtype=dtype, device=device)
            weights = args.vae
        else:
            with torch.device(device):
                vae = cls().to(dtype).eval().requires_grad_(False)
            weights = f"random (full-size {MODELS[args.model][1]} architecture)"
    except (OSError, WeightsError) as e:
        raise CLIError(f"--vae {args.vae}: {reading_error(e)}") from None
    s = vae.spatial_compression_ratio
    bad = [f"{w}x{h}" for h, w in sizes if h % s or w % s]
    if bad:
        raise CLIError(f"--sizes: {', '.join(bad)} must be multiples of {s} (this VAE's compression)")
    return vae, weights, base_cfg, device, dtype, sizes, modes, repeats, warmup, json_out


def _bench(args, vae, weights, base_cfg, device, dtype, sizes, modes, repeats, warmup, json_out) -> int:
    import json
    from pathlib import Path

    from ..benchmarking import PeakMemory, format_table, provenance, time_ms
    from ..parallel import group as pg
    from . import media

    rank0 = pg.is_rank0()
    say = print if rank0 else (lambda *a, **k: None)
    mean = torch.tensor(vae.config["latents_mean"], device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config["latents_std"], device=device).view(1, -1, 1, 1, 1)

    graph = "on" if base_cfg.cuda_graph and device.type == "cuda" else "off"  # CPU tensors decode eagerly
    if base_cfg.cuda_graph and device.type != "cuda":
        say(f"  CUDA graphs need a GPU: decoding eagerly on {device}")
    rows = []
    for h, w in sizes:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        s = vae.spatial_compression_ratio
        z = torch.randn(args.batch, vae.z_dim, args.frames, h // s, w // s, device=device, generator=gen)
        z = (z * std + mean).to(dtype)
        reference = None
        for mode in (["untiled"] if "untiled" not in modes else []) + modes:
            vae.vae_config = base_cfg.replace(**MODES[mode])
            out = None

            def decode():
                nonlocal out
                out = None  # free the previous output before the next decode
                with torch.inference_mode():
                    out = vae.decode(z)

            with out_of_memory_as_hint(f"benchmarking {mode} at {w}x{h}"), PeakMemory(device) as peak:
                timing = time_ms(decode, device, repeats=repeats, warmup=warmup)
            vae.release_cuda_graphs()  # one mode's graphs must not hold memory through the next
            if reference is None:
                reference = out
            if mode not in modes:
                continue
            # the untiled row is the reference: no difference against itself is reported ("-")
            diff = None if out is reference else float("nan") if out is None else (
                out.float() - reference.float()).abs().max().item()
            stats = (getattr(vae, "last_parallel_stats", None) or {}) if MODES[mode].get("use_parallel_decode") else {}
            # one gather: every rank's time, peak and bytes (time of a parallel decode = the slowest rank)
            ranks = pg.gather_floats([timing["median_ms"], peak.gib, float(stats.get("bytes_sent", 0))])
            row = dict(size=f"{w}x{h}", height=h, width=w, frames=args.frames, batch=args.batch, mode=mode,
                       graph=graph, cuda_graph=graph == "on",
                       ranks=len(ranks), peak_gib=max(r[1] for r in ranks), peak_gib_per_rank=[r[1] for r in ranks],
                       peak_kind=peak.kind, max_abs_diff=diff, mib_sent=max(r[2] for r in ranks) / 2**20,
                       bytes_sent_per_rank=[int(r[2]) for r in ranks], parallel_mode=stats.get("mode"), **timing)
            row["median_ms"] = max(r[0] for r in ranks)
            rows.append(row)
            say(f"  {w}x{h} T={args.frames} {mode:<10} graph {graph:<3} {row['median_ms']:9.1f} ms  peak {row['peak_gib']:6.2f} GiB"
                f"  max|Δ| {'(reference)' if out is reference else f'{diff:.2e}'}", flush=True)
        del reference, out, z

    if not rank0:
        return 0
    info = provenance(device, dtype=str(dtype).replace("torch.", ""), weights=weights, batch=args.batch,
                      repeats=repeats, warmup=warmup, world_size=rows[0]["ranks"] if rows else 1, cuda_graph=graph == "on",
                      vae_config=vars(base_cfg))
    text = json.dumps({"provenance": info, "results": rows}, indent=2, default=str) + "\n"
    path, = media.write_all([json_out], [lambda tmp: Path(tmp).write_text(text)])
    print()
    print(format_table(rows, COLUMNS))
    print(f"\nMeasured on {info['device']} ({info['dtype']}, torch {info['torch']}), weights: {weights}; "
          f"peak = {rows[0]['peak_kind'] if rows else '-'}; "
          + ("CUDA-graph replays (--no-cuda-graph: eager)" if graph == "on" else "eager decodes")
          + f". JSON: {path}")
    print("To decode real latents with downloaded weights (e.g. `huggingface-cli download Qwen/Qwen-Image "
          "--include 'vae/*' --local-dir Qwen-Image`):\n"
          "  qwenfast decode latents.safetensors --vae Qwen-Image -o out/   "
          "(add --vae-config.use-tiling for bounded memory)")
    return 0
