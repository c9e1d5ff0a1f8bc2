"""Host time per eager call of every op in qwenfast.ops, beside a bare Triton launch of the same kernel.

    PYTHONPATH=src python benchmarks/bench_host_cost.py [--calls 2000] [--json PATH]      # GPU
    PYTHONPATH=src python benchmarks/bench_host_cost.py --cpu [--profile OP]              # any machine
    PYTHONPATH=src python benchmarks/bench_host_cost.py --dry-run                         # smoke test

Each op is called many times in a row on tiny inputs (L = 16 tokens, a 2x8x8 image), then the device
is synchronised once: the GPU finishes each small kernel faster than the host issues the next, so
the wall time per call is the host's (Python, checks, allocation, dispatch, Triton's launcher).

Per op, three figures (GPU run):
- `eager`: the public call, as a model makes it;
- `bare same`: the launch that call makes, replayed alone: the same kernel, grid, arguments and
  constexprs straight through `kernel[grid](...)` (recorded from one call of the op). The fair floor:
  what Triton's launcher costs for that kernel (it grows with the argument count);
- `ours`: the op with every kernel launch replaced by a recorder that does nothing (CUDA tensors,
  real allocations): the host time that is ours alone. `eager` ~ `ours` + `bare same`.
Plus two reference launches of do-nothing-much kernels: 3 arguments (the floor of any Triton launch)
and 25 (the norm kernel's old count). Each launch's pointer arguments, scalar arguments and
constexprs are counted (a None argument and an int equal to 1 are specialised as constexprs): every
pointer costs Triton's launcher a `data_ptr()` call and a driver query of the pointer per launch.
Target (issues 10 and 13): an eager call at most a bare Triton launch; `x bare same` says how far
each op is from the fair floor of its own kernel, `x bare 3` from the floor of any launch.

--cpu: `ours` alone, on the CPU (no GPU, no interpreter; the dispatch is pointed at the kernel path
and the launches are recorded, not run): our Python overhead per call, measurable anywhere. With
--profile OP, a cProfile of that op's calls (where the time goes). Also `bind`: Triton's argument
binding/specialisation for the recorded launch (the Python part of `JITFunction.run`, for a CUDA
sm_90 target built without a GPU) — a lower bound of the bare launch's host cost.

--dry-run: no GPU needed. Triton's interpreter runs the kernels on CPU tensors (TRITON_INTERPRET=1 is
set before triton is imported) and the dispatch is pointed at the kernel path, so the very code a GPU
call runs is exercised; the times are the interpreter's, not host costs.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000, help="calls per op between the two syncs")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per op (the median is reported)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, 3 calls: checks the script")
    mode.add_argument("--cpu", action="store_true", help="our overhead alone on the CPU (launches recorded, not run)")
    ap.add_argument("--profile", default=None, metavar="OP", help="with --cpu: cProfile the op of this name")
    ap.add_argument("--breakdown", action="store_true",
                    help="also take our host time apart per op: check, dispatch, wrappers, launcher")
    ap.add_argument("--only", default=None, help="only the ops whose name contains this")
    ap.add_argument("--json", default=None, help="write the results here")
    return ap.parse_args(argv)


ARGS = parse_args()
if ARGS.dry_run:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (it reads it at decoration)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
import inspect  # noqa: E402

from triton.runtime.jit import JITFunction, KernelInterface  # noqa: E402

from qwenfast import benchmarking, ops  # noqa: E402
from qwenfast.ops import attention, custom_op, elementwise, rms_norm  # noqa: E402
from qwenfast.ops.triton import attention as k_attention  # noqa: E402
from qwenfast.ops.triton import elementwise as k_elementwise  # noqa: E402
from qwenfast.ops.triton import modulate as k_modulate  # noqa: E402
from qwenfast.ops.triton import modulate21 as k_modulate21  # noqa: E402
from qwenfast.ops.triton import rms_norm as k_rms_norm  # noqa: E402

KERNEL_MODULES = (k_modulate, k_modulate21, k_rms_norm, k_elementwise, k_attention)


@triton.jit
def _copy3(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


@triton.jit
def _copy25(x_ptr, y_ptr, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15, p16,
            i17, i18, i19, i20, i21, i22, n, eps, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


class OpCall:
    """One op called with fixed arguments, as a model calls it (`fn`, the public function or module),
    and the `CustomOp` behind it with the arguments its `check` and `dispatch` take (what --breakdown
    times apart)."""

    def __init__(self, fn, op, *args, **kwargs) -> None:
        self.fn, self.op, self.args, self.kwargs = fn, op, args, kwargs
        # The compatible modules convert their positional arguments to the convention first.
        self.op_args, self.op_kwargs = op._convert(*args) if hasattr(op, "_convert") else (args, kwargs)

    def __call__(self):
        return self.fn(*self.args, **self.kwargs)


def cases(device, L=16, C=3072, C21=4096):
    """name -> an `OpCall` (or, for the reference kernels, a `Recorded` launch), on tiny inputs shaped
    like the real ones (C = 3072 for the Qwen-Image DiT, 4096 for the 2.1 DiT)."""
    from qwenfast.ops import modulate as m, modulate21 as m21

    B = 1
    dt = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, L, C, device=device, generator=g).to(dt)
    r = torch.randn(B, L, C, device=device, generator=g).to(dt)
    mod = torch.randn(2 * B, 6 * C, device=device, generator=g).to(dt)
    p0, p1 = mod[:B].chunk(6, dim=1), mod[B:].chunk(6, dim=1)  # shift, scale, gate, shift, scale, gate
    index = (torch.arange(L, device=device) >= L // 2).long().expand(B, L).contiguous()
    m1 = ops.Modulation(p0[1], p0[0], p0[2])
    m2 = ops.Modulation(p0[4], p0[3], p0[5])
    s1 = ops.Select(m1, ops.Modulation(p1[1], p1[0], p1[2]), index)
    s2 = ops.Select(m2, ops.Modulation(p1[4], p1[3], p1[5]), index)
    sel01 = ops.FusedLayerNormScaleShiftGateSelect01()
    rsel01 = ops.FusedResidualLayerNormScaleShiftGateSelect01()
    plain = ops.FusedLayerNormScaleShiftGate()
    rplain = ops.FusedResidualLayerNormScaleShiftGate()
    # The 2.1 DiT: one (B + 1, 4 C21) modulation tensor, [mod1.scale, mod1.gate, mod2.scale, mod2.gate].
    x21 = torch.randn(B, L, C21, device=device, generator=g).to(dt)
    r21 = torch.randn(B, L, C21, device=device, generator=g).to(dt)
    mod21 = torch.randn(B + 1, 4 * C21, device=device, generator=g).to(dt).chunk(4, dim=1)
    mask = torch.arange(L, device=device) >= L // 4
    sc, gt = ops.Rows(mod21[0][:B]), ops.Rows(mod21[1][:B])
    sc_m, gt_m = ops.split_rows(mod21[0], mask), ops.split_rows(mod21[1], mask)
    img = torch.randn(1, 96, 8, 8, device=device, generator=g).to(dt).contiguous(memory_format=torch.channels_last)
    gamma = torch.rand(96, 1, 1, device=device, generator=g).to(dt)
    bias = torch.randn(96, device=device, generator=g).to(dt)
    q = torch.randn(1, L, 384, device=device, generator=g).to(dt)
    y = torch.empty_like(x)
    n = x.numel()
    ints = [x.stride(0)] * 6
    lnm, rlnm, gr = m._layer_norm_modulate, m._residual_layer_norm_modulate, m._gated_residual
    lns, rlns, tgr = m21._layer_norm_scale, m21._residual_layer_norm_scale, m21._tanh_gated_residual
    return {
        "bare launch, 3 args": Recorded(_copy3, (1,), (x, y, n), dict(BLOCK=1024)),
        "bare launch, 25 args": Recorded(_copy25, (1,), (x, y, *([x] * 15), *ints, n, 1e-6), dict(BLOCK=1024)),
        "layer_norm_modulate": OpCall(ops.layer_norm_modulate, lnm, x, m1),
        "layer_norm_modulate, select": OpCall(ops.layer_norm_modulate, lnm, x, s1),
        "residual_layer_norm_modulate": OpCall(ops.residual_layer_norm_modulate, rlnm, x, r, m1, m2),
        "residual_layer_norm_modulate, select": OpCall(ops.residual_layer_norm_modulate, rlnm, x, r, s1, s2),
        "gated_residual": OpCall(ops.gated_residual, gr, x, r, m2),
        "gated_residual, select": OpCall(ops.gated_residual, gr, x, r, s2),
        "FusedLayerNormScaleShiftGateSelect01": OpCall(sel01, sel01, x, None, None, p0[1], p0[0], p0[2], p1[1], p1[0],
                                                       p1[2], index, 1e-6),
        "FusedLayerNormScaleShiftGateSelect01, no index": OpCall(sel01, sel01, x, None, None, p0[1], p0[0], p0[2],
                                                                 None, None, None, None, 1e-6),
        "FusedResidualLayerNormScaleShiftGateSelect01": OpCall(rsel01, rsel01, x, r, p0[2], None, None, p0[4], p0[3],
                                                               p0[5], p1[4], p1[3], p1[5], index, 1e-6),
        "FusedLayerNormScaleShiftGate": OpCall(plain, plain, x, None, None, p0[1], p0[0], p0[2], 1e-6),
        "FusedResidualLayerNormScaleShiftGate": OpCall(rplain, rplain, x, r, p0[2], None, None, p0[4], p0[3], p0[5],
                                                       1e-6),
        "layer_norm_scale (2.1)": OpCall(ops.layer_norm_scale, lns, x21, scale=sc),
        "layer_norm_scale, mask (2.1)": OpCall(ops.layer_norm_scale, lns, x21, scale=sc_m, target_mask=mask),
        "residual_layer_norm_scale (2.1)": OpCall(ops.residual_layer_norm_scale, rlns, x21, r21, gate=gt, scale=sc),
        "residual_layer_norm_scale, mask (2.1)": OpCall(ops.residual_layer_norm_scale, rlns, x21, r21, gate=gt_m,
                                                        scale=sc_m, target_mask=mask),
        "tanh_gated_residual (2.1)": OpCall(ops.tanh_gated_residual, tgr, x21, r21, gate=gt),
        "tanh_gated_residual, mask (2.1)": OpCall(ops.tanh_gated_residual, tgr, x21, r21, gate=gt_m,
                                                  target_mask=mask),
        "rms_norm (VAE)": OpCall(rms_norm.rms_norm, rms_norm._rms_norm, img, gamma, True),
        "bias_residual_add (VAE)": OpCall(elementwise.bias_residual_add, elementwise._bias_residual_add, img, bias,
                                          img),
        "upsample_nearest2x (VAE)": OpCall(elementwise.upsample_nearest2x, elementwise._upsample_nearest2x, img),
        "single_head_attention (VAE)": OpCall(attention.single_head_attention, attention._attention, q, q, q),
    }


# ---------------------------------------------------------------------------------------------------
# Recording launches: every kernel of qwenfast.ops.triton replaced, for a while, by a stand-in whose
# `kernel[grid](*args, **kwargs)` keeps the launch and runs nothing.
# ---------------------------------------------------------------------------------------------------


class Recorded:
    """One kernel launch: the kernel, its grid, arguments and keyword arguments (constexprs, warps)."""

    def __init__(self, kernel: KernelInterface, grid, args, kwargs) -> None:
        self.kernel, self.grid, self.args, self.kwargs = kernel, grid, args, kwargs

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def counts(self) -> tuple[int, int, int]:
        """(pointer arguments, scalar arguments, constexprs) of this launch, as Triton's launcher sees
        them: a None argument (an absent optional pointer) and an int equal to 1 are specialised as
        constexprs. Each pointer costs the launcher a `data_ptr()` call and a driver query per launch."""
        params = _kernel_params(self.kernel)
        values = dict(zip((name for name, _ in params), self.args))
        values.update(self.kwargs)
        ptrs = scalars = const = 0
        for name, is_constexpr in params:
            v = values.get(name)
            if is_constexpr or v is None or (type(v) is int and v == 1):
                const += 1
            elif hasattr(v, "data_ptr"):
                ptrs += 1
            else:
                scalars += 1
        return ptrs, scalars, const

    def replay(self):
        return self.kernel[self.grid](*self.args, **self.kwargs)


def _kernel_params(kernel) -> list[tuple[str, bool]]:
    """(name, is constexpr) of each parameter of a Triton kernel (compiled or interpreted)."""
    if isinstance(kernel, JITFunction):
        return [(p.name, p.is_constexpr) for p in kernel.params]
    return [(name, "constexpr" in str(p.annotation)) for name, p in inspect.signature(kernel.fn).parameters.items()]


class _Recorder:
    def __init__(self, kernel: KernelInterface, sink: list) -> None:
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            if not self.sink:  # the first launch of the call (every op here makes one)
                self.sink.append(Recorded(self.kernel, grid, args, kwargs))

        return record


class no_launch:
    """Within: every kernel of qwenfast.ops.triton records its first launch into `self.launches`
    and runs nothing (the launchers, allocations and checks around it run as usual)."""

    def __enter__(self) -> "no_launch":
        self.launches: list[Recorded] = []
        self.saved = []
        for mod in KERNEL_MODULES:
            for name, v in list(vars(mod).items()):
                if isinstance(v, KernelInterface) and name.endswith("_kernel"):
                    self.saved.append((mod, name, v))
                    setattr(mod, name, _Recorder(v, self.launches))
        return self

    def __exit__(self, *exc) -> None:
        for mod, name, v in self.saved:
            setattr(mod, name, v)


class recording_launchers:
    """Within: `custom_op.launch` (the eager/compile switch every op's kernel path goes through)
    records (launcher, arguments) of each call into `self.calls`, then runs the launcher."""

    MODULES = (k_modulate, k_modulate21, rms_norm, elementwise, attention)

    def __enter__(self) -> "recording_launchers":
        self.calls: list = []

        def launch(op, launcher, *args):
            self.calls.append((launcher, args))
            return launcher(*args)

        for mod in self.MODULES:
            mod.launch = launch
        return self

    def __exit__(self, *exc) -> None:
        for mod in self.MODULES:
            mod.launch = custom_op.launch


def record_launch(fn) -> Recorded | None:
    with no_launch() as rec:
        fn()
    return rec.launches[0] if rec.launches else None


def _cuda_binder(kernel: JITFunction):
    """Triton's per-kernel argument binder for a CUDA sm_90 target (what `JITFunction.run` calls on
    every launch to specialise the arguments), built without a GPU. None where this Triton has none."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend
        from triton.runtime.jit import create_function_from_signature

        return create_function_from_signature(kernel.signature, kernel.params,
                                              CUDABackend(GPUTarget("cuda", 90, 32)))
    except Exception:  # noqa: BLE001 (another Triton version: the column stays empty)
        return None


# ---------------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------------


def host_us(fn, device, calls: int, repeats: int) -> float:
    """Median over `repeats` rounds of (wall time of `calls` calls, one sync at the end) / calls, in µs.
    --cpu: the minimum over the rounds of this thread's CPU time instead (a shared machine's other
    processes do not count; nothing runs asynchronously there)."""
    clock = time.thread_time if ARGS.cpu else time.perf_counter
    fn()
    fn()  # compiled, autotuned, allocator warm
    benchmarking.synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = clock()
        for _ in range(calls):
            fn()
        benchmarking.synchronize(device)
        times.append((clock() - t0) / calls * 1e6)
    return min(times) if ARGS.cpu else sorted(times)[len(times) // 2]


def ours_us(fn, device, calls: int, repeats: int) -> float:
    with no_launch():
        return host_us(fn, device, calls, repeats)


def breakdown(call: OpCall, rec: Recorded, device, calls: int, repeats: int) -> dict:
    """Our host time of one call taken apart, µs (launches recorded, not run): the op's `check`, its
    `dispatch` (the backend choice), the launcher (allocation, layout and launch arguments, and the
    stand-in's call), and the wrappers between them (the rest: public function, `CustomOp.forward`,
    flattening the structs, `launch`). `stand_in`: what the stand-in's `kernel[grid](...)` itself costs."""
    op, a, kw = call.op, call.op_args, call.op_kwargs
    with no_launch(), recording_launchers() as launched:
        call()
    launcher, largs = launched.calls[0]
    stand_in = _Recorder(rec.kernel, [rec])  # a sink that already holds a launch records nothing more
    with no_launch():
        out = {"total": host_us(call, device, calls, repeats),
               "check": host_us(lambda: op.check(*a, **kw), device, calls, repeats),
               "dispatch": host_us(lambda: op.dispatch(*a, **kw), device, calls, repeats),
               "launcher": host_us(lambda: launcher(*largs), device, calls, repeats),
               "stand_in": host_us(lambda: stand_in[rec.grid](*rec.args, **rec.kwargs), device, calls, repeats)}
    out["wrappers"] = out["total"] - out["check"] - out["dispatch"] - out["launcher"]
    return out


def profile(fn, calls: int, top: int = 25) -> None:
    with no_launch():
        fn()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def main() -> int:
    gpu = torch.cuda.is_available() and not (ARGS.dry_run or ARGS.cpu)
    device = torch.device("cuda" if gpu else "cpu")
    if not gpu and not (ARGS.dry_run or ARGS.cpu):
        print("no CUDA device: run with --cpu (our overhead alone) or --dry-run (interpreter) instead",
              file=sys.stderr)
        return 2
    calls, repeats = (3, 1) if ARGS.dry_run else (ARGS.calls, ARGS.repeats)
    if not gpu:  # point the one dispatch rule at the kernels, as on CUDA
        custom_op.choose_backend = lambda device, has_triton=None: "cuda"
    all_cases = cases(device, L=4, C=64, C21=64) if ARGS.dry_run else cases(device)
    if ARGS.profile:
        profile(all_cases[ARGS.profile], calls)
        return 0
    rows = []
    for name, fn in all_cases.items():
        if ARGS.only and ARGS.only not in name:
            continue
        bare = isinstance(fn, Recorded)
        rec = fn if bare else record_launch(fn)
        fn = rec.replay if bare else fn
        row = {"op": name, "kernel": rec.name if rec else "", "ptrs": None, "scalars": None, "constexprs": None}
        if rec is not None:
            row["ptrs"], row["scalars"], row["constexprs"] = rec.counts()
        if gpu or ARGS.dry_run:
            row["eager_us"] = host_us(fn, device, calls, repeats)
            row["bare_same_us"] = None if rec is None or bare else host_us(rec.replay, device, calls, repeats)
        if not bare:
            row["ours_us"] = ours_us(fn, device, calls, repeats)
        if ARGS.cpu and rec is not None:
            binder = _cuda_binder(rec.kernel)
            row["bind_us"] = None if binder is None else host_us(lambda: binder(*rec.args, **rec.kwargs), device,
                                                                 calls, repeats)
        if ARGS.breakdown and not bare:
            row.update({f"{k}_us": v for k, v in breakdown(fn, rec, device, calls, repeats).items()})
        rows.append(row)
        print("  " + "  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
    if gpu or ARGS.dry_run:
        floor = next((r["eager_us"] for r in rows if r["op"] == "bare launch, 3 args"), None)
        for r in rows:
            r["vs_bare_same"] = r["eager_us"] / r["bare_same_us"] if r.get("bare_same_us") else None
            r["vs_bare3"] = r["eager_us"] / floor if floor else None
    res = {"provenance": benchmarking.provenance(device), "calls": calls, "repeats": repeats,
           "mode": "dry-run" if ARGS.dry_run else "cpu" if ARGS.cpu else "gpu", "rows": rows}
    if ARGS.json:
        benchmarking.write_json(ARGS.json, res)
    print()
    if ARGS.cpu:
        print(f"Our host time per call on the CPU, kernel launches recorded not run (thread CPU time of {calls} "
              f"calls, the least of {repeats} rounds); bind: Triton's argument binding for the same launch "
              f"(sm_90 target)")
        cols = [("op", "op", ""), ("kernel", "kernel", ""), ("ptrs", "ptrs", "d"), ("scalars", "scalars", "d"),
                ("constexprs", "constexprs", "d"),
                ("ours_us", "ours µs", ".1f"), ("bind_us", "bind µs", ".1f")]
    else:
        print(f"Host time per eager call on {res['provenance']['device']} ({calls} calls, one sync; median of "
              f"{repeats}){' -- DRY RUN: interpreter times, not host costs' if ARGS.dry_run else ''}")
        cols = [("op", "op", ""), ("kernel", "kernel", ""), ("ptrs", "ptrs", "d"), ("scalars", "scalars", "d"),
                ("constexprs", "constexprs", "d"),
                ("eager_us", "eager µs", ".1f"), ("bare_same_us", "bare same µs", ".1f"),
                ("ours_us", "ours µs", ".1f"), ("vs_bare_same", "x bare same", ".2f"), ("vs_bare3", "x bare 3", ".2f")]
    print(benchmarking.format_table(rows, cols))
    if ARGS.breakdown:
        print()
        print("Our host time taken apart, µs (launches recorded, not run; launcher includes the stand-in's call)")
        print(benchmarking.format_table([r for r in rows if "total_us" in r], [
            ("op", "op", ""), ("total_us", "total", ".1f"), ("check_us", "check", ".1f"),
            ("dispatch_us", "dispatch", ".1f"), ("wrappers_us", "wrappers", ".1f"), ("launcher_us", "launcher", ".1f"),
            ("stand_in_us", "stand-in", ".1f")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
