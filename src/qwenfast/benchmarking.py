"""Measuring: median wall time with device synchronisation, peak memory, provenance, tables.

Shared by `qwenfast bench` and the scripts under benchmarks/, so that every number they print is
taken the same way.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median / min / max wall time of `fn()` in ms over `repeats` runs after `warmup` runs.

    On CUDA the device is synchronised around each run, so the time is the GPU's (with launch gaps);
    whole decodes run for tens of milliseconds or more, far above the timer's resolution.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "repeats": len(times)}


class PeakMemory:
    """Peak memory over a block: CUDA's allocator peak above the memory in use at entry (GiB), or on a
    CPU the process's peak resident set size so far (GiB; it never resets, so read it as an upper bound)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.gib: float = float("nan")
        self.kind = "cuda allocator peak" if device.type == "cuda" else "process peak RSS"

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            self.gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure(fn: Callable[[], Any], device: torch.device, repeats: int = 5, warmup: int = 1) -> tuple[Any, dict[str, Any]]:
    """`fn()` under inference mode, timed (`time_ms`) with its peak memory (`PeakMemory`) from a clean
    allocator: (the last run's result, {median_ms, min_ms, max_ms, repeats, peak_gib})."""
    import gc

    out = None

    def run():
        nonlocal out
        out = None  # the previous result is freed before the next run: it is not part of the peak
        with torch.inference_mode():
            out = fn()

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with PeakMemory(device) as peak:
        timing = time_ms(run, device, repeats=repeats, warmup=warmup)
    return out, dict(timing, peak_gib=peak.gib)


def synthetic_latent(vae, size: int, device: torch.device, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """A random latent (B, z_dim, 1, size/s, size/s) in fp32 with the statistics the VAE decodes
    (`N(0, 1) · latents_std + latents_mean`, as a pipeline hands it over)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n, s = vae.z_dim, vae.spatial_compression_ratio
    z = torch.randn(batch, n, 1, size // s, size // s, device=device, generator=gen)
    mean = torch.tensor(vae.config["latents_mean"][:n], device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config["latents_std"][:n], device=device).view(1, -1, 1, 1, 1)
    return z * std + mean


def git_commit() -> str:
    """The commit measured: $QWENFAST_COMMIT (a checkout sent without .git), else git, else 'unknown'."""
    commit = os.environ.get("QWENFAST_COMMIT")
    if commit:
        return commit
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except Exception:
        out = ""
    return out or "unknown"


def provenance(device: torch.device | None = None, **extra: Any) -> dict[str, Any]:
    """What a result needs to be reproduced: machine, versions, commit, command, date. `extra`
    entries are added (or override: e.g. `commit=` from a flag)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "gpus": torch.cuda.device_count() if cuda else 0,
        "sm_count": torch.cuda.get_device_properties(device).multi_processor_count if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "commit": git_commit(),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    for name in ("triton", "diffusers"):
        try:
            info[name] = __import__(name).__version__
        except Exception:
            info[name] = None
    info.update(extra)
    return info


def _cells(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> list[list[str]]:
    def cell(row, key, spec):
        v = row.get(key)
        if v is None or (isinstance(v, float) and v != v):
            return "-"
        return format(v, spec) if spec else str(v)

    return [[cell(r, k, s) for k, _, s in columns] for r in rows]


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table: `columns` are (key, header, format spec), e.g. ("median_ms", "ms", ".1f")."""
    cells = _cells(rows, columns)
    headers = [h for _, h, _ in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    line = lambda items: "  ".join(x.rjust(w) for x, w in zip(items, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(c) for c in cells])


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """The same table as GitHub markdown."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(c) + " |" for c in _cells(rows, columns)]
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path
