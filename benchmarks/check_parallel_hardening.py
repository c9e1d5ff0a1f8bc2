"""The parallel decode's safety checks on real GPUs: their cost, and the collective timeout (issue 9).

    torchrun --nproc-per-node N benchmarks/check_parallel_hardening.py [--sizes 1328 2048 4096] [--timeout 5] --json OUT.json

1. Cost of what runs before every parallel decode: the header all-reduce (failure flag, latent shape
   and dtype, the decode config's codes, free memory), rank 0's latent broadcast with the bitwise
   compare, and the verdict all-reduce. Median ms (slowest rank) over --reps, bf16 and fp32, next to
   one plain flag all-reduce (`comm.agree`), which is what the checksum check cost before.
2. A silent rank (N >= 2): rank N-1 sleeps --timeout + 5 s instead of entering the check; the others
   must raise `CollectiveTimeoutError` after about --timeout s (the group's own timeout is 120 s).
   Rank N-1 then joins the pending all-reduce, so that every rank leaves in step. Run last.

Under torchrun the group is NCCL with CUDA, gloo without (a CPU run checks the script, not the speed).
Rank 0 prints a table last and writes --json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from qwenfast import benchmarking
from qwenfast.config import VAEConfig
from qwenfast.parallel import dispatch
from qwenfast.parallel.comm import CollectiveTimeoutError
from qwenfast.parallel.group import ProcessGroupComm
from qwenfast.vae.qwen_image import QwenImageVAE


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[1328, 2048, 4096], help="square image sizes (px)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--timeout", type=float, default=5.0, help="collective_timeout_s of the silent-rank case")
    p.add_argument("--tiny", action="store_true", help="a tiny model (a CPU check of the script)")
    p.add_argument("--json", default=None)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=120))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    comm = ProcessGroupComm(timeout_s=60.0)
    arch = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1) if args.tiny else {}
    vae = QwenImageVAE(**arch, vae_config=VAEConfig(use_parallel_decode=True)).to(device).eval()

    rows = []
    for size in args.sizes:
        for dtype in (torch.bfloat16, torch.float32):
            vae.to(dtype)
            z = torch.randn(1, 16, 1, size // 8, size // 8, generator=torch.Generator().manual_seed(size)).to(device, dtype)
            flag = torch.zeros(1, dtype=torch.float64)

            def checks():
                checked, _ = dispatch._agree_on_header(vae, z, comm)
                dispatch._check_same_latent(checked, comm)

            row = dict(size=f"{size}²", dtype=str(dtype).replace("torch.", ""), latent_mb=z.numel() * z.element_size() / 2**20)
            for key, fn in (("checks_ms", checks), ("one_agree_ms", lambda: comm.agree(flag, None, "bench"))):
                times = []
                for i in range(args.reps + 2):
                    benchmarking.synchronize(device)
                    dist.barrier()
                    t0 = time.perf_counter()
                    fn()
                    benchmarking.synchronize(device)
                    if i >= 2:  # two warm-up runs
                        times.append((time.perf_counter() - t0) * 1e3)
                row[key] = max(all_values(statistics.median(times), device))  # the slowest rank
            rows.append(row)

    silent = []
    if comm.world_size >= 2:
        vae.to(torch.float32)
        vae.vae_config = VAEConfig(use_parallel_decode=True, collective_timeout_s=args.timeout)
        z = torch.zeros(1, 16, 1, 8, 8, device=device)
        header_size = len(dispatch._HEADER_NAMES) + len(dispatch.decode_config_codes(vae.vae_config)[0]) + 1
        late = comm.world_size - 1
        dist.barrier()
        t0 = time.monotonic()
        if comm.rank == late:
            time.sleep(args.timeout + 5.0)
            kind = "joined late"
            ProcessGroupComm(timeout_s=args.timeout + 30.0).agree(torch.zeros(header_size, dtype=torch.float64), None, "late")
        else:
            try:
                dispatch._agree_on_header(vae, z, ProcessGroupComm(timeout_s=args.timeout))
                kind = "no error (wrong)"
            except CollectiveTimeoutError:
                kind = "CollectiveTimeoutError"
            except Exception as e:  # noqa: BLE001 - reported in the table
                kind = f"{type(e).__name__}: {e}"
                print(f"rank {comm.rank}: {kind}", flush=True)
        elapsed = time.monotonic() - t0
        silent = [dict(rank=r, result=k, elapsed_s=e) for r, (k, e) in enumerate(gather_results(kind, elapsed, comm))]

    if comm.rank == 0:
        if args.json:
            benchmarking.write_json(args.json, dict(provenance=benchmarking.provenance(device, gpus=comm.world_size),
                                                    checks=rows, silent_rank=silent, timeout_s=args.timeout))
        print(benchmarking.format_table(rows, [("size", "size", ""), ("dtype", "dtype", ""), ("latent_mb", "latent MB", ".2f"),
                                               ("checks_ms", "checks ms", ".3f"), ("one_agree_ms", "one agree ms", ".3f")]))
        if silent:
            print(f"\nsilent rank {comm.world_size - 1}, collective_timeout_s={args.timeout:g}:")
            print(benchmarking.format_table(silent, [("rank", "rank", ""), ("result", "result", ""), ("elapsed_s", "elapsed s", ".2f")]))
    dist.destroy_process_group()


def all_values(x: float, device) -> list[float]:
    t = torch.tensor([x], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    out = torch.empty(dist.get_world_size(), dtype=torch.float64, device=t.device)
    dist.all_gather_into_tensor(out, t)
    return out.tolist()


def gather_results(kind: str, elapsed: float, comm) -> list[tuple[str, float]]:
    """Every rank's (result, elapsed) on every rank: the result as a code, to send numbers only."""
    kinds = ["joined late", "CollectiveTimeoutError", "no error (wrong)"]
    code = kinds.index(kind) if kind in kinds else len(kinds)
    values = all_values(code, comm.device), all_values(elapsed, comm.device)
    names = kinds + ["another error (see that rank's output)"]
    return [(names[int(c)], e) for c, e in zip(*values)]


if __name__ == "__main__":
    main()
