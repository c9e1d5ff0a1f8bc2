"""Parallel decode benchmark: every mode against our own single-GPU decode, in one run.

    torchrun --nproc-per-node N benchmarks/bench_parallel_decode.py [--sizes 1328 2048 4096] [--video-frames 21]
    python benchmarks/bench_parallel_decode.py --rehearse 2 4 8 [--graphs]     # one GPU: predicted N-GPU times

Runs unchanged on 1, 2, 4 and 8 GPUs. Under torchrun the script always makes a NCCL group (even of
one rank) and runs the parallel strategies through it, so a one-GPU run exercises the real collectives.
Random weights (seeded: the same on every rank), bf16. For each size:

- `single untiled` and `single tiled (exact)`: our single-device decode, on rank 0 alone (the others wait);
- `patch` (halo `mid`), `patch (level)`, `tiled (exact)`, `tiled (blend)` (with --blend), `auto`: over all ranks, output on every rank.

Reported per mode: median ms (slowest rank, over --reps after a warm-up), speed-up over the single-GPU
untiled decode (and over single-GPU exact tiling for `tiled`), per-rank peak memory, max|Δ| on rank 0
against the single-GPU untiled decode (bf16 both), bytes sent and received per rank, and with
`--profile-collectives` each rank's time in collectives (one more run under the profiler). Videos:
`--video-frames` latent frames at each of `--video-sizes` (1280x720 by default; 832x480 too). Before timing,
an fp32 check on a small latent gives each mode's max|Δ| where rounding does not hide errors.
Rank 0 writes JSON + markdown with provenance to --out.

`--rehearse N ...` (one process, one GPU, no torchrun): for each N, runs the share of every rank r < N
of every mode through `qwenfast.parallel.rehearsal.RehearsalComm` (collectives keep their shapes and
byte counts, move no data), times each rank's compute (eager; with `--graphs` also with
VAEConfig.cuda_graph, each segment between collectives a CUDA graph, checked bit for bit against the
eager share), and prints per mode and size the slowest rank's compute, the imbalance (slowest /
mean), the redundant work (sum of rank times / single-GPU time), each rank's peak and bytes, and a
PREDICTED speed-up = single-GPU untiled time / (slowest rank's compute + its bytes / --link-gbps).
The link bandwidth is an assumption (stated in the output): NVLink 4 moves 450 GB/s per direction
per GPU; NCCL's large all-gathers reach about 80% of that as bus bandwidth, hence 360 GB/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

from qwenfast import benchmarking
from qwenfast.config import VAEConfig
from qwenfast.parallel import group as pg
from qwenfast.parallel.dispatch import decode_parallel
from qwenfast.vae.qwen_image import QwenImageVAE
from qwenfast.vae.qwen_image21 import QwenImage21VAE

VAES = {"qwenimage": QwenImageVAE, "qwenimage21": QwenImage21VAE}  # --vae: the released architectures

PARALLEL_MODES = {
    "patch": dict(parallel_decode_mode="patch", patch_halo="mid"),  # explicit: the default "auto" is one of these two
    "patch (level)": dict(parallel_decode_mode="patch", patch_halo="level"),
    "tiled (exact)": dict(parallel_decode_mode="tiled", tiling="exact"),
    "tiled (blend)": dict(parallel_decode_mode="tiled", tiling="blend"),
    "auto": dict(parallel_decode_mode="auto"),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vae", choices=sorted(VAES), default="qwenimage",
                   help="the Qwen-Image (= Wan 2.1) VAE, or the Qwen-Image-2.1 VAE (images only: no video case)")
    p.add_argument("--sizes", type=int, nargs="*", default=[1328, 2048, 4096], help="square image sizes (px)")
    p.add_argument("--video-frames", type=int, default=21, help="latent frames of each video (21 = 81 frames; 0 skips)")
    p.add_argument("--video-sizes", nargs="*", default=["1280x720"], metavar="WxH",
                   help="frame sizes of the videos (px, each a multiple of 8), e.g. 1280x720 832x480")
    p.add_argument("--profile-collectives", action="store_true",
                   help="time each rank's collectives in one more run of every parallel mode under the profiler "
                        "(NCCL kernels on a GPU, gloo's ops on a CPU): the measured side of the rehearsal's gap")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--video-reps", type=int, default=1)
    p.add_argument("--blend", action="store_true", help="also time blend tiling (slow, not exact)")
    p.add_argument("--check-size", type=int, default=48, help="latent side of the fp32 check (0 skips)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="", help="added to the result file names")
    p.add_argument("--commit", default=None, help="git commit (when the checkout has no .git)")
    p.add_argument("--rehearse", type=int, nargs="*", default=None, metavar="N",
                   help="one GPU: rehearse N ranks (each rank's share timed alone) and predict the speed-up")
    p.add_argument("--graphs", action="store_true",
                   help="also run every parallel mode with VAEConfig.cuda_graph (each rank's segments between "
                        "collectives as CUDA graphs), checked bit for bit against the eager run")
    p.add_argument("--modes", action="append", default=None, metavar="MODE",
                   choices=sorted(m for m in PARALLEL_MODES if m != "auto"),  # auto is one of the others
                   help="--rehearse: only these modes (repeatable; default: all but blend unless --blend)")
    p.add_argument("--keep", default=None, metavar="JSON",
                   help="--rehearse: an earlier rehearsal's JSON whose rows this run does not redo (other modes, "
                        "other cases) are kept in the tables and the plot, each with its own commit")
    p.add_argument("--render", nargs=2, metavar=("JSON", "STEM"), default=None,
                   help="write STEM.md/.png/.json from a rehearsal's JSON again (no GPU)")
    p.add_argument("--keep-commit", default=None,
                   help="--render: the commit of the kept rows (the others are re-based on them, see --keep)")
    p.add_argument("--link-gbps", type=float, default=360.0,
                   help="--rehearse: assumed per-GPU collective bandwidth, GB/s (default: 80%% of NVLink 4's 450)")
    return p.parse_args()


def make_comm():
    """A NCCL group even for one rank under torchrun (so the collectives run); None without torchrun."""
    import torch.distributed as dist

    if "RANK" not in os.environ:
        return None
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return pg.ProcessGroupComm()


CUDA = torch.cuda.is_available()  # a CPU run (gloo) checks the script, not the speed (--graphs: eager there)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


VAE = "qwenimage"  # set by main from --vae


def model(dtype: torch.dtype, device):
    torch.manual_seed(0)
    return VAES[VAE]().to(device=device, dtype=dtype).eval()


def latent(h: int, w: int, t: int, device, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234 + h * 7 + w * 3 + t)
    return torch.randn(1, 64 if VAE == "qwenimage21" else 16, t, h, w, generator=g).to(device=device, dtype=dtype)


def vae_tag(args) -> str:
    """Part of the result files' names: none for the Qwen-Image VAE (as before), "_qwenimage21" else."""
    return "" if args.vae == "qwenimage" else f"_{args.vae}"


def cases_of(args, vae) -> list[tuple]:
    """(label, latent h, latent w, latent frames, repeats) of every case: the square sizes, and the
    videos (`--video-sizes`, e.g. "720p video, 81 frames") for the Qwen-Image VAE (the 2.1 VAE is an
    image model)."""
    s = vae.spatial_compression_ratio
    cases = [(f"{n}x{n}", n // s, n // s, 1, args.reps) for n in args.sizes]
    if args.video_frames and VAE == "qwenimage":
        for size in args.video_sizes:
            w, h = video_size(size, s)
            cases.append((f"{h * s}p video, {1 + 4 * (args.video_frames - 1)} frames", h, w, args.video_frames,
                          args.video_reps))
    return cases


def video_size(text: str, scale: int) -> tuple[int, int]:
    """"WxH" in pixels → the latent (w, h); both must be multiples of `scale`."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--video-sizes takes WxH in pixels, e.g. 1280x720; got {text!r}") from None
    if w <= 0 or h <= 0 or w % scale or h % scale:
        raise SystemExit(f"--video-sizes: {text} must be positive multiples of {scale} px")
    return w // scale, h // scale


def all_max(x: float, comm) -> float:
    if comm is None or comm.world_size == 1:
        return x
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64, device=comm.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def all_values(x: float, comm) -> list[float]:
    if comm is None or comm.world_size == 1:
        return [x]
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64, device=comm.device)
    out = torch.empty(comm.world_size, dtype=torch.float64, device=comm.device)
    dist.all_gather_into_tensor(out, t)
    return out.tolist()


def barrier(comm) -> None:
    pg.barrier(getattr(comm, "group", None))  # none without a group (a SingleRankComm has none)


def time_decode(fn, reps: int, comm, everyone: bool) -> tuple[float, list[float], object]:
    """Median ms of `fn()` (the slowest rank per rep), per-rank peak GiB, the last output.
    `everyone=False`: rank 0 runs alone while the others wait."""
    runs = (comm is None or comm.rank == 0) or everyone
    out = None
    times = []
    sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if CUDA else 0
    for i in range(reps + 1):  # the first is the warm-up
        barrier(comm)
        del out
        out = None
        sync()
        t0 = time.perf_counter()
        if runs:
            with torch.no_grad():
                out = fn()
        sync()
        dt = (time.perf_counter() - t0) * 1e3
        if not everyone:  # only rank 0's time counts
            dt = dt if runs else 0.0
        if i:
            times.append(all_max(dt, comm))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if CUDA else 0.0
    return statistics.median(times), all_values(peak, comm), out


def fp32_check(side: int, comm, device) -> dict:
    """max|Δ| of each parallel mode against the single-device untiled decode, fp32, a small latent."""
    vae = model(torch.float32, device)
    z = latent(side, side + 5, 1, device, torch.float32)
    result = {}
    # TF32 off: with it, cuDNN's conv algorithms differ by shape at ~1e-3 and hide what is being checked
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        ref = vae.decode_untiled(z)
        vae.vae_config = VAEConfig(use_tiling=True, tiling="blend")
        ref_blend = vae.tiled_decode(z)
        for name, cfg in PARALLEL_MODES.items():
            vae.vae_config = VAEConfig(use_parallel_decode=True, **cfg)
            out = decode_parallel(vae, z, comm=comm)
            against = ref_blend if name == "tiled (blend)" else ref
            result[name] = all_max((out - against).abs().max().item(), comm)
        vae.vae_config = VAEConfig(use_tiling=True)
        result["single tiled (exact)"] = all_max((vae.tiled_decode(z) - ref).abs().max().item(), comm)
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return result


def provenance(args, comm) -> dict:
    extra = {"commit": args.commit} if args.commit else {}
    return benchmarking.provenance(gpus=comm.world_size if comm else 1, vae=args.vae, **extra)


def collective_ms(fn, comm) -> list[float]:
    """Each rank's time in collectives during one more `fn()`, from the profiler: NCCL's kernels on a
    GPU (their device time), gloo's ops on a CPU (their host time)."""
    from torch.profiler import ProfilerActivity, profile

    barrier(comm)
    with profile(activities=[ProfilerActivity.CUDA if CUDA else ProfilerActivity.CPU]) as prof, torch.no_grad():
        fn()
        sync()
    if CUDA:
        us = sum(e.self_device_time_total for e in prof.key_averages() if "nccl" in e.key.lower())
    else:
        us = sum(e.cpu_time_total for e in prof.key_averages() if e.key.lower().startswith("gloo:"))
    return all_values(us / 1e3, comm)


def bench_case(label: str, h: int, w: int, t: int, reps: int, modes: dict, comm, vae, device,
               graphs: bool = False, profile_collectives: bool = False) -> list[dict]:
    rank0 = comm is None or comm.rank == 0
    z = latent(h, w, t, device, vae.dtype)
    rows = []

    def single(cfg):
        vae.vae_config = cfg
        return lambda: vae.decode(z[:, :, 0] if t == 1 else z)

    ms_untiled, peak, ref = time_decode(single(VAEConfig()), reps, comm, everyone=False)
    # the reference row: max|Δ| None (not compared with itself)
    rows.append(dict(case=label, mode="single untiled", ms=ms_untiled, speedup=1.0, peak_gib=peak[:1], max_abs=None,
                     bytes_sent=[0], bytes_received=[0]))
    ms_tiled1, peak, out = time_decode(single(VAEConfig(use_tiling=True)), reps, comm, everyone=False)
    rows.append(dict(case=label, mode="single tiled (exact)", ms=ms_tiled1, speedup=ms_untiled / ms_tiled1,
                     peak_gib=peak[:1], max_abs=(out - ref).abs().max().item() if rank0 else None,
                     bytes_sent=[0], bytes_received=[0]))
    del out
    runs = [(name, cfg) for name, cfg in modes.items()]
    output_gib = math.prod(vae.output_shape(z)) * z.element_size() / 2**30  # the decoded output, on every rank
    if graphs:  # each mode again with its segments as CUDA graphs, collectives outside (a CPU decodes eagerly)
        runs += [(f"{name} +graphs", dict(cfg, cuda_graph=True)) for name, cfg in modes.items()]
    eager_out = {}
    for name, cfg in runs:
        vae.vae_config = VAEConfig(use_parallel_decode=True, **cfg)

        def fn():
            out = decode_parallel(vae, z, comm=comm)
            return out.clamp_(-1, 1) if out is not None else None

        if CUDA:
            torch.cuda.empty_cache()
        ms, peak, out = time_decode(fn, reps, comm, everyone=True)
        stats = vae.last_parallel_stats or {}
        against = ref if ref is not None else None
        if out is not None and t == 1:
            out = out[:, :, 0]
        row = dict(case=label, mode=name, ran=stats.get("mode"), ms=ms, speedup=ms_untiled / ms, peak_gib=peak,
                   output_gib=output_gib,
                   max_abs=(out - against).abs().max().item() if (rank0 and against is not None and name != "tiled (blend)") else None,
                   bytes_sent=all_values(stats.get("bytes_sent", 0), comm),
                   bytes_received=all_values(stats.get("bytes_received", 0), comm))
        if name == "tiled (exact)":
            row["speedup_vs_single_tiled"] = ms_tiled1 / ms
        if cfg.get("cuda_graph"):  # bit for bit the eager run of the same mode, on every rank
            base = eager_out.pop(name[:-len(" +graphs")], None)
            row["graph_equal_eager"] = all_max(float(not (out is None and base is None or torch.equal(out, base))), comm) == 0
            vae.release_cuda_graphs()
        elif graphs:
            eager_out[name] = out
        if profile_collectives and not cfg.get("cuda_graph"):  # after the timed runs: the profiler costs time
            row["collective_ms"] = collective_ms(fn, comm)
        rows.append(row)
        del out
    del ref, z
    if CUDA:
        torch.cuda.empty_cache()
    return rows


def markdown(prov: dict, check: dict, rows: list[dict]) -> str:
    lines = [f"# Parallel decode, {prov['gpus']} x {prov['device']}", "",
             f"torch {prov['torch']} (CUDA {prov['cuda']}), triton {prov['triton']}, commit `{prov['commit']}`, "
             f"{prov['date_utc']}", f"`{prov['command']}`", "",
             "bf16, random weights. ms: median of the slowest rank; speed-up over our single-GPU untiled decode; "
             "peak: per rank, GiB above the model; max|Δ|: rank 0 vs single-GPU untiled (bf16); "
             "MiB sent: per rank.", ""]
    if check:
        lines += ["fp32 check (small latent): max|Δ| vs single-device untiled (blend: vs single-device blend): "
                  + ", ".join(f"{k} {v:.2e}" for k, v in check.items()), ""]
    coll = any("collective_ms" in r for r in rows)
    lines += ["| case | mode | ran | ms | speed-up | peak GiB (per rank) | max abs diff | MiB sent (per rank) |"
              + (" collectives ms (per rank) |" if coll else ""),
              "|---|---|---|---:|---:|---|---:|---|" + ("---|" if coll else "")]
    for r in rows:
        peaks = ", ".join(f"{p:.2f}" for p in r["peak_gib"])
        sent = ", ".join(f"{b / 2**20:.1f}" for b in r["bytes_sent"])
        mad = "" if r["max_abs"] is None else f"{r['max_abs']:.2e}"
        sp = f"{r['speedup']:.2f}" + (f" ({r['speedup_vs_single_tiled']:.2f} vs tiled)" if "speedup_vs_single_tiled" in r else "")
        ran = r.get("ran", "") or ""
        if "graph_equal_eager" in r:
            ran += ", bit for bit = eager" if r["graph_equal_eager"] else ", DIFFERS FROM EAGER"
        lines.append(f"| {r['case']} | {r['mode']} | {ran} | {r['ms']:.1f} | {sp} | {peaks} | {mad} | {sent} |"
                     + (f" {', '.join(f'{c:.2f}' for c in r.get('collective_ms', []))} |" if coll else ""))
    return "\n".join(lines) + "\n"


def rehearse_case(label: str, h: int, w: int, t: int, worlds: list[int], modes: dict, vae, device, reps: int,
                  graphs: bool, link_gbps: float, single_ms: float | None = None):
    """Every rank's share of every mode, timed alone on this device (see the module docstring): yields
    one row per (N, mode) as it finishes, so that a run cut by a time limit keeps every finished row
    (a 4096² case of the 2.1 VAE spends minutes in cuDNN's autotuning of its band shapes). `single_ms`:
    the single-GPU time of the case from an earlier run (`--keep`), instead of timing it again."""
    from qwenfast.parallel.rehearsal import RehearsalComm

    z = latent(h, w, t, device, vae.dtype)
    zin = z[:, :, 0] if t == 1 else z
    vae.vae_config = VAEConfig()
    single = single_ms or benchmarking.time_ms(lambda: vae.decode(zin), device, repeats=reps)["median_ms"]
    for n in worlds:
        for name, cfg in modes.items():
            if name == "auto":
                continue  # auto picks one of the others (or replicates): rehearse those
            vae.vae_config = VAEConfig(use_parallel_decode=True, **cfg)
            ranks = []
            for r in range(n):
                comm = RehearsalComm(r, n, device)

                def share(x, comm=comm):
                    return decode_parallel(vae, x, comm=comm)

                if CUDA:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() if CUDA else 0
                with torch.no_grad():
                    ms = benchmarking.time_ms(lambda: share(z), device, repeats=reps)["median_ms"]
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if CUDA else 0.0
                sent, received = comm.bytes_sent / (reps + 1), comm.bytes_received / (reps + 1)
                ms_graph = graph_equal = None
                if graphs:  # VAEConfig.cuda_graph: the rank's segments as graphs, collectives outside (CPU: eager)
                    with torch.no_grad():
                        eager = decode_parallel(vae, z, comm=RehearsalComm(r, n, device))
                        vae.vae_config = VAEConfig(use_parallel_decode=True, cuda_graph=True, **cfg)
                        ms_graph = benchmarking.time_ms(lambda: decode_parallel(vae, z, comm=RehearsalComm(r, n, device)),
                                                        device, repeats=reps)["median_ms"]  # the warm-up captures
                        graph_equal = torch.equal(decode_parallel(vae, z, comm=RehearsalComm(r, n, device)), eager)
                    del eager
                    vae.release_cuda_graphs()
                    vae.vae_config = VAEConfig(use_parallel_decode=True, **cfg)
                    if not graph_equal:
                        print(f"MISMATCH: {label} N={n} {name} rank {r}: graph replay != eager share", flush=True)
                ranks.append(dict(rank=r, ms=ms, ms_graph=ms_graph, graph_equal_eager=graph_equal, peak_gib=peak,
                                  bytes_sent=sent, bytes_received=received))
            slowest = max(ranks, key=lambda x: x["ms"])
            moved = max(max(x["bytes_sent"], x["bytes_received"]) for x in ranks)
            link_ms = moved / (link_gbps * 1e9) * 1e3
            row = dict(case=label, mode=name, world=n, single_ms=single, single_kept=single_ms is not None,
                       slowest_ms=slowest["ms"],
                       imbalance=slowest["ms"] / (sum(x["ms"] for x in ranks) / n),
                       redundancy=sum(x["ms"] for x in ranks) / single, link_ms=link_ms,
                       predicted_speedup=single / (slowest["ms"] + link_ms), ranks=ranks, link_gbps=link_gbps)
            if graphs:
                slow_g = max(x["ms_graph"] for x in ranks)
                row.update(slowest_graph_ms=slow_g, predicted_speedup_graph=single / (slow_g + link_ms))
            print(f"{label} N={n} {name}: slowest rank {slowest['ms']:.1f} ms, link {link_ms:.2f} ms, "
                  f"predicted {row['predicted_speedup']:.2f}x", flush=True)
            yield row
    del z


def rehearsal_markdown(prov: dict, rows: list[dict]) -> str:
    lines = [f"# Parallel decode rehearsed on one {prov['device']} (PREDICTED multi-GPU speed-ups)", "",
             f"torch {prov['torch']} (CUDA {prov['cuda']}), triton {prov['triton']}, commit `{prov['commit']}`, "
             f"{prov['date_utc']}", f"`{prov['command']}`", "",
             "Each rank's share run alone on one GPU through RehearsalComm (collectives keep shapes and bytes, move "
             "no data). predicted = single-GPU untiled ms / (slowest rank's compute + its bytes at "
             f"{rows[0]['link_gbps'] if rows else '?'} GB/s, an assumption: ~80% of NVLink 4's 450 GB/s per "
             "direction). imbalance = slowest / mean rank; redundancy = sum of rank times / single-GPU time.", "",
             "| case | mode | N | single ms | slowest rank ms | graph ms | imbalance | redundancy | link ms | "
             "peak GiB (max rank) | MiB sent (max rank) | predicted speed-up | predicted / N |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    commits = list(dict.fromkeys(r.get("commit", prov["commit"]) for r in rows))
    if len(commits) > 1:  # --keep: rows of an earlier run beside this run's
        lines[-2] += " commit |"
        lines[-1] += "---|"
    for r in rows:
        g = r.get("slowest_graph_ms")
        peak = max(x["peak_gib"] for x in r["ranks"])
        sent = max(x["bytes_sent"] for x in r["ranks"]) / 2**20
        lines.append(f"| {r['case']} | {r['mode']} | {r['world']} | {r['single_ms']:.1f} | {r['slowest_ms']:.1f} | "
                     f"{'' if g is None else f'{g:.1f}'} | {r['imbalance']:.2f} | {r['redundancy']:.2f} | "
                     f"{r['link_ms']:.2f} | {peak:.2f} | {sent:.1f} | {r['predicted_speedup']:.2f} | "
                     f"{r['predicted_speedup'] / r['world']:.2f} |" + (f" `{r.get('commit', prov['commit'])}` |"
                                                                        if len(commits) > 1 else ""))
    own = [r for r in rows if "single_ms_own" in r]
    if own or any(r.get("single_kept") for r in rows):
        lines += ["", "Rows of a later run (commit column) are predicted against the kept run's single-GPU time of "
                      "their case" + ("; their own single-GPU medians were " + ", ".join(
                          f"{c} {ms:.1f}" for c, ms in dict((r["case"], r["single_ms_own"]) for r in own).items())
                          + " ms" if own else "") + "."]
    shares = [(r, x) for r in rows for x in r["ranks"] if x.get("graph_equal_eager") is not None]
    if shares:
        bad = [f"{r['case']} {r['mode']} N={r['world']} rank {x['rank']}" for r, x in shares if not x["graph_equal_eager"]]
        lines += ["", "graph ms: VAEConfig.cuda_graph (each rank's segments between collectives as CUDA graphs). Graph "
                      f"replay bit for bit equal to the eager share: {len(shares) - len(bad)} of {len(shares)} rank shares"
                      + (f"; DIFFERENT: {'; '.join(bad)}" if bad else "")]
    return "\n".join(lines) + "\n"


def main() -> int:
    global VAE
    args = parse_args()
    VAE = args.vae
    if args.render:
        return render(*args.render, args.keep_commit)
    if args.rehearse:
        return main_rehearse(args)
    comm = make_comm()
    device = torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")
    rank0 = comm is None or comm.rank == 0
    if comm is None:  # without torchrun: the strategies through a one-rank comm
        from qwenfast.parallel.comm import SingleRankComm

        comm_or_single = SingleRankComm()
    else:
        comm_or_single = comm
    modes = {k: v for k, v in PARALLEL_MODES.items() if args.blend or k != "tiled (blend)"}
    check = fp32_check(args.check_size, comm_or_single, device) if args.check_size else {}
    if rank0 and check:
        print("fp32 check:", json.dumps(check), flush=True)
    vae = model(torch.bfloat16 if CUDA else torch.float32, device)
    rows = []
    for label, h, w, t, reps in cases_of(args, vae):
        rows += bench_case(label, h, w, t, reps, modes, comm_or_single, vae, device, args.graphs,
                           args.profile_collectives)
        if rank0:
            r = rows[-1]
            print(f"{label}: " + ", ".join(f"{x['mode']} {x['ms']:.1f} ms" for x in rows if x["case"] == label), flush=True)
    if rank0:
        prov = provenance(args, comm)
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"parallel_decode_{prov['gpus']}gpu{vae_tag(args)}{args.tag}")
        with open(stem + ".json", "w") as f:
            json.dump(dict(provenance=prov, fp32_check=check, results=rows), f, indent=1)
        md = markdown(prov, check, rows)
        with open(stem + ".md", "w") as f:
            f.write(md)
        print(md)
    if comm is not None:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def main_rehearse(args) -> int:
    device = torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")
    vae = model(torch.bfloat16 if CUDA else torch.float32, device)
    modes = {k: v for k, v in PARALLEL_MODES.items()
             if (k in args.modes if args.modes else args.blend or k != "tiled (blend)")}
    rows: list[dict] = []
    prov = provenance(args, None)
    kept = kept_rows(args.keep, cases_of(args, vae), modes, args.rehearse)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"parallel_rehearsal{vae_tag(args)}{args.tag}")
    singles = kept_singles(kept)
    for label, h, w, t, reps in cases_of(args, vae):
        for row in rehearse_case(label, h, w, t, args.rehearse, modes, vae, device, reps, args.graphs, args.link_gbps,
                                 single_ms=singles.get(label)):
            rows.append(dict(row, commit=prov["commit"]))
            # written after every row: a run cut by a time limit keeps the rows it finished
            write_rehearsal(stem, dict(provenance=prov, kept_from=args.keep), merge_kept(kept, rows))
    if not rows:
        print("no cases to rehearse (--sizes and --video-frames select none)", flush=True)
        return 2
    rows = merge_kept(kept, rows)
    rehearsal_plot(rows, stem + ".png")
    print(rehearsal_markdown(prov, rows))
    return 0


def write_rehearsal(stem: str, header: dict, rows: list[dict]) -> None:
    """STEM.json (`header` and the rows) and STEM.md, each written whole (`write_replacing`)."""
    write_replacing(stem + ".json", json.dumps(dict(header, results=rows), indent=1))
    write_replacing(stem + ".md", rehearsal_markdown(header["provenance"], rows))


def write_replacing(path: str, text: str) -> None:
    """`text` into `path` whole or not at all (a run killed by its time limit mid-write leaves the previous
    file): written beside it, then renamed over it."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def kept_rows(path: str | None, cases: list[tuple], modes: dict, worlds: list[int]) -> list[dict]:
    """The rows of an earlier rehearsal (`--keep`) that this run does not redo, each tagged with the commit
    it ran at (a row that carries none gets its file's)."""
    if not path:
        return []
    with open(path) as f:
        old = json.load(f)
    redo = {(label, mode, n) for label, *_ in cases for mode in modes for n in worlds}
    commit = old.get("provenance", {}).get("commit", "?")
    return [dict(r, commit=r.get("commit", commit)) for r in old["results"]
            if (r["case"], r["mode"], r["world"]) not in redo]


def kept_singles(kept: list[dict]) -> dict[str, float]:
    """The kept run's single-GPU time of each case (its first row's): the one reference per case."""
    singles: dict[str, float] = {}
    for r in kept:
        singles.setdefault(r["case"], r["single_ms"])
    return singles


def merge_kept(kept: list[dict], rows: list[dict]) -> list[dict]:
    """kept + rows in the tables' order: by case as first met, then N, then mode as in PARALLEL_MODES.

    One single-GPU reference per case: a row of this run whose case has kept rows is predicted against
    the kept run's single-GPU time (its own is kept as `single_ms_own`), so that the modes of one case
    compare on their ranks' times alone (the single decode's median of 2 moved by up to 11% run to run)."""
    reference = kept_singles(kept)
    rebased = []
    for r in rows:
        if r["case"] in reference and "single_ms_own" not in r and not r.get("single_kept"):
            single = reference[r["case"]]
            r = dict(r, single_ms_own=r["single_ms"], single_ms=single,
                     predicted_speedup=single / (r["slowest_ms"] + r["link_ms"]))
            if "redundancy" in r:  # the sum of rank times over the single decode: the same reference
                r["redundancy"] = r["redundancy"] * r["single_ms_own"] / single
            if "slowest_graph_ms" in r:
                r["predicted_speedup_graph"] = single / (r["slowest_graph_ms"] + r["link_ms"])
        rebased.append(r)
    order = list(PARALLEL_MODES)
    cases = list(dict.fromkeys(r["case"] for r in kept + rebased))
    return sorted(kept + rebased, key=lambda r: (cases.index(r["case"]), r["world"], order.index(r["mode"])))


def render(path: str, stem: str, commit: str | None) -> int:
    """`--render`: the markdown and plot of a rehearsal's JSON again (no GPU). With --keep-commit, the rows
    of that commit are taken as kept and the others re-based on them (`merge_kept`)."""
    with open(path) as f:
        data = json.load(f)
    rows = data["results"]
    if commit:
        rows = merge_kept([r for r in rows if r.get("commit") == commit], [r for r in rows if r.get("commit") != commit])
    write_rehearsal(stem, {k: v for k, v in data.items() if k != "results"}, rows)
    rehearsal_plot(rows, stem + ".png")
    return 0


def rehearsal_plot(rows: list[dict], path: str) -> None:
    """Predicted speed-up against N, one line per (case, mode), with the ideal N and the 0.85·N target."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return
    worlds = sorted({r["world"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in dict.fromkeys((r["case"], r["mode"]) for r in rows):
        pts = sorted((r["world"], r.get("predicted_speedup_graph") or r["predicted_speedup"])
                     for r in rows if (r["case"], r["mode"]) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} {key[1]}")
    ax.plot(worlds, worlds, "k--", lw=1, label="ideal (N)")
    ax.plot(worlds, [0.85 * n for n in worlds], "k:", lw=1, label="target 0.85·N")
    ax.set_xlabel("GPUs (N)")
    ax.set_ylabel("PREDICTED speed-up over one GPU")
    ax.set_title("Parallel decode rehearsed on one GPU (predictions, not measurements)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
