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


# Kernel names -> what they do, for `kernel_breakdown` (first match wins, lower-case substrings).
KERNEL_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("fmha", "flash", "attention", "efficient_attention")),
    ("copy / pad / layout", ("memcpy", "memset", "copy", "padding", "cat_", "catarray", "transpose")),
    ("conv (cuDNN)", ("xmma", "implicit_gemm", "implicit_convolve", "cudnn", "conv", "fprop", "dgrad")),
    ("GEMM (cuBLAS)", ("nvjet", "gemm", "cutlass", "matmul")),
    ("RMS norm (ours)", ("_rms_norm",)),
    ("bias + residual add (ours)", ("_bias_residual_add",)),
    ("upsample (ours)", ("_upsample",)),
    ("elementwise / reduce (PyTorch)", ("elementwise", "vectorized", "reduce", "fill")),
    ("other Triton (ours)", ("_kernel",)),  # ours are all named _..._kernel; PyTorch's matched above
)


def kernel_breakdown(kernels: Sequence[tuple[str, float, int]]) -> list[dict[str, Any]]:
    """(name, device µs, calls) of each kernel (`profile_kernels`) -> one row per KERNEL_CATEGORIES
    category that ran, largest first: ms, share of the total, calls, and its largest kernel."""
    rows: dict[str, dict[str, Any]] = {}
    for name, us, calls in kernels:
        low = name.lower()
        cat = next((c for c, keys in KERNEL_CATEGORIES if any(k in low for k in keys)), "other")
        row = rows.setdefault(cat, dict(category=cat, ms=0.0, calls=0, top=name, top_ms=0.0))
        row["ms"] += us / 1e3
        row["calls"] += calls
        if us / 1e3 > row["top_ms"]:
            row["top"], row["top_ms"] = name, us / 1e3
    total = sum(r["ms"] for r in rows.values()) or 1.0
    for r in rows.values():
        r["share"] = r["ms"] / total
    return sorted(rows.values(), key=lambda r: -r["ms"])


def profile_kernels(fn: Callable[[], Any], device: torch.device) -> list[tuple[str, float, int]]:
    """(name, device µs, calls) of every kernel one run of `fn()` launches (CPU ops on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    synchronize(device)
    with profile(activities=[activity]) as prof:
        fn()
        synchronize(device)
    out = []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) if device.type == "cuda" else ev.self_cpu_time_total
        if us is None:
            us = ev.cuda_time_total
        if us > 0:
            out.append((ev.key, float(us), int(ev.count)))
    return out


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


# --------------------------------------------------------------------------------------------------
# Predicted peak memory: live tensor storages, device-agnostic (runs on the meta device)
# --------------------------------------------------------------------------------------------------

CUDA_BLOCK_BYTES = 512  # the CUDA caching allocator hands out blocks in multiples of 512 B


def cuda_block_bytes(nbytes: int, block: int = CUDA_BLOCK_BYTES) -> int:
    """What the CUDA caching allocator counts as allocated for a request of `nbytes` (0 stays 0)."""
    return 0 if nbytes <= 0 else -(-nbytes // block) * block


class LiveMemory:
    """Peak bytes of live tensor storages over a block of eager code, and what was live at the peak.

    A `TorchDispatchMode` sees every aten op (composite ops decomposed): each storage an op returns
    that is new is an allocation of `cuda_block_bytes(storage.nbytes())`, counted at once; a weakref
    finalizer on the untyped storage frees it when its last tensor or view dies. The peak is taken
    after each op, so it counts the op's inputs and outputs together, as the allocator sees them.
    It needs no device memory: run the code on the `meta` device (or on the CPU at a small size).

    Not seen: memory an op takes inside its kernel and gives back before it returns (cuDNN and cuBLAS
    workspaces, which the CUDA allocator counts in its peak), the allocator's rounding beyond 512 B
    blocks (reserved segments, fragmentation), memory of other streams or libraries.

        with LiveMemory() as mem:
            mem.track(model.parameters(), "weights")  # already resident: counted, never allocated here
            out = model(x)
        mem.peak_bytes, mem.table()
    """

    def __init__(self, block: int = CUDA_BLOCK_BYTES, keep_peak: bool = True,
                 transform: Callable[..., Any] | None = None) -> None:
        """`transform(func, args, kwargs, out)`, when given, may replace an op's result before it is
        counted (a device's own choice of output strides, say); it runs outside the mode."""
        self.block = block
        self.transform = transform
        self.keep_peak = keep_peak
        self.live: dict[int, tuple[int, str, tuple, torch.dtype, int]] = {}  # key -> (id, op, shape, dtype, bytes)
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peak_op = ""
        self.peak_live: list[tuple[str, tuple, torch.dtype, int]] = []
        self.allocations = 0
        self._next_id = 0
        self._mode = None

    # -- bookkeeping ---------------------------------------------------------------------------------
    def _add(self, storage, op: str, shape: tuple, dtype: torch.dtype) -> None:
        import weakref

        key = storage._cdata
        if key in self.live:
            return
        nbytes = cuda_block_bytes(storage.nbytes(), self.block)
        self._next_id += 1
        ident = self._next_id
        self.live[key] = (ident, op, shape, dtype, nbytes)
        self.live_bytes += nbytes
        self.allocations += 1
        weakref.finalize(storage, self._free, key, ident)

    def _free(self, key: int, ident: int) -> None:
        entry = self.live.get(key)
        if entry is not None and entry[0] == ident:
            del self.live[key]
            self.live_bytes -= entry[4]

    def _check_peak(self, op: str) -> None:
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self.peak_op = op
            if self.keep_peak:
                self.peak_live = [(o, s, d, b) for _, o, s, d, b in self.live.values()]

    def track(self, tensors, label: str) -> "LiveMemory":
        """Count tensors that exist already (weights, inputs) as live under `label` until they die."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage(), label, tuple(t.shape), t.dtype)
        self._check_peak(label)
        return self

    def observe(self, out, op: str) -> None:
        """Count the new storages among `out` (a tensor or a nest of them) as allocated by `op`."""
        from torch.utils._pytree import tree_leaves

        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage(), op, tuple(t.shape), t.dtype)
        self._check_peak(op)

    # -- the mode ------------------------------------------------------------------------------------
    def __enter__(self) -> "LiveMemory":
        from torch.utils._python_dispatch import TorchDispatchMode

        meter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if meter.transform is not None:
                    out = meter.transform(func, args, kwargs or {}, out)
                meter.observe(out, str(func.overloadpacket.__name__))
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        self._mode = None

    # -- reports -------------------------------------------------------------------------------------
    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30

    def peak_breakdown(self, top: int = 8, group: set[str] | None = None) -> list[dict]:
        """The storages live at the peak, largest first: {op, shape, dtype, mib}; entries whose op is in
        `group` (e.g. {"weights"}) summed into one row each."""
        group = group or set()
        rows: list[dict] = []
        sums: dict[str, list] = {}
        for op, shape, dtype, nbytes in self.peak_live:
            if op in group:
                s = sums.setdefault(op, [0, 0, dtype])
                s[0] += nbytes
                s[1] += 1
            else:
                rows.append(dict(op=op, shape="x".join(map(str, shape)), dtype=str(dtype).removeprefix("torch."),
                                 mib=nbytes / 2**20))
        rows += [dict(op=op, shape=f"{n} tensors", dtype=str(d).removeprefix("torch."), mib=b / 2**20)
                 for op, (b, n, d) in sums.items()]
        rows.sort(key=lambda r: -r["mib"])
        if len(rows) > top:
            rest = rows[top:]
            rows = rows[:top] + [dict(op=f"({len(rest)} more)", shape="", dtype="", mib=sum(r["mib"] for r in rest))]
        return rows

    def table(self, top: int = 8, group: set[str] | None = None) -> str:
        rows = self.peak_breakdown(top, group)
        head = f"peak {self.peak_bytes / 2**20:.1f} MiB after `{self.peak_op}`"
        return head + "\n" + format_table(rows, [("op", "op", ""), ("shape", "shape", ""), ("dtype", "dtype", ""),
                                                 ("mib", "MiB", ".1f")])
