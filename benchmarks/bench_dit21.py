"""Benchmark: the Qwen-Image-2.1 DiT block, diffusers' against qwenfast's fused modulation, and each
fused 2.1 op alone.

One full-size `QwenImage21TransformerBlock` (width 4096, 32 heads x 128, SwiGLU x3), random weights,
bf16, `causal_condition` (text tokens on the shared t = 0 row, target-image tokens on their sample's
row), B = 1, text + image tokens of a 1328² and a 2048² image (256 + 6889 = 7145, 256 + 16384 = 16640):

- `block prefill`: the whole joint sequence (the first denoising step; block-causal attention);
- `block cached`: the target tokens only, against the text keys/values cached by the prefill (every
  later step of the pipeline's KV-cache loop; the mask all-True);
each eager and compiled (`block.compile()`, what diffusers' `compile_repeated_blocks` does), diffusers'
block and the fused block on the same weights, median ms (triton.testing.do_bench, L2 flushed).

- `op`: each fused op at L = 4096, 7145, 16384 (C = 4096): GPU µs from CUDA-graph replays (cold L2),
  TB/s on its minimal bytes (x read, y written; + residual read, residual_out written) against a copy
  of x of the same L, beside diffusers' eager math and torch.compile of the fp32 reference;
- `host`: host µs per eager call at L = 8 (many calls, one sync), against a bare Triton launch.

Correctness first, on the device: fused block vs diffusers (relative L2, bf16 both), each op vs the
reference. Prints a short table last.

    python benchmarks/bench_dit21.py --json results/dit21_h200.json      # GPU, full size
    python benchmarks/bench_dit21.py --dry-run                            # tiny, CPU, seconds
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dit import bench, raise_recompile_limits, rel  # noqa: E402  (block timing, as for the Qwen-Image DiT)

from diffusers.models.transformers import transformer_qwenimage21 as tq21  # noqa: E402

from qwenfast import benchmarking, ops  # noqa: E402
from qwenfast.dit.qwen_image21 import FusedQwenImage21TransformerBlock  # noqa: E402
from qwenfast.ops import modulate21 as M  # noqa: E402

FULL = dict(dim=4096, heads=32, head_dim=128, axes=(16, 56, 56), text=256, sides=(1328, 2048), op_L=(4096, 7145, 16384))
TINY = dict(dim=64, heads=2, head_dim=32, axes=(8, 12, 12), text=8, sides=(64, 96), op_L=(16, 40))
EPS = 1e-6


# --- inputs ------------------------------------------------------------------------------------------


class BlockCase:
    """One token count: the joint sequence of `text` tokens then a side x side image (16 px a token)."""

    def __init__(self, side: int, cfg: dict, device, dtype, gen):
        self.side = side
        hw = side // 16
        self.text, self.image = cfg["text"], hw * hw
        L = self.text + self.image
        D = cfg["dim"]
        image_pad = torch.arange(L, device=device) >= self.text  # (L,) True at the image's tokens
        rope = tq21.QwenImage21Rope(theta=10000, axes_dim=list(cfg["axes"]))
        self.rotary = rope([(1, hw, hw)], image_pad, device=device)
        r = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=gen, device=device)).to(dtype)  # noqa: E731
        self.hidden = r(1, L, D)
        self.modulation = r(2, 4 * D, scale=0.5)  # B + 1 rows: the sample's, then t = 0
        self.mask = image_pad  # target tokens take the sample's row
        self.prefill = dict(hidden_states=self.hidden, modulation=self.modulation, rotary_emb=self.rotary,
                            target_token_mask=self.mask, segments=[(0, self.text, True)])
        self.cached = dict(hidden_states=self.hidden[:, self.text:].contiguous(), modulation=self.modulation,
                           rotary_emb=self.rotary[self.text:], target_token_mask=self.mask[self.text:],
                           kv_cache_mode="cached")

    def cached_kwargs(self, block):
        """The cached step's arguments, with this block's text keys/values extracted by a prefill."""
        cache = tq21.QwenImage21KVLayerCache()
        with torch.no_grad():
            block(**self.prefill, layer_cache=cache, kv_cache_mode="extract", cache_write_slice=slice(0, self.text))
        return dict(self.cached, layer_cache=cache)


def op_inputs(L: int, C: int, device, dtype, gen):
    """x, residual and the four parameters as Rows views of a (2, 4C) modulation; text then image."""
    x = torch.randn(1, L, C, generator=gen, device=device).to(dtype)
    residual = torch.randn(1, L, C, generator=gen, device=device).to(dtype)
    mod = (0.5 * torch.randn(2, 4 * C, generator=gen, device=device)).to(dtype)
    mask = torch.arange(L, device=device) >= min(256, L // 4)
    params = mod.chunk(4, dim=-1)
    return dict(x=x, residual=residual, mask=mask, scale_params=params[0], gate_params=params[1],
                scale=M.split_rows(params[0], mask), gate=M.split_rows(params[1], mask))


# --- the ops: ours, diffusers' eager math, torch.compile of the reference; minimal bytes per element ---


def op_variants(c):
    x, r, m, scale, gate = c["x"], c["residual"], c["mask"], c["scale"], c["gate"]
    norm = torch.nn.LayerNorm(x.shape[-1], eps=EPS, elementwise_affine=False)
    sel = tq21._select_modulation_rows
    sp, gp = c["scale_params"], c["gate_params"]
    return {
        "layer_norm_scale": (
            lambda: ops.layer_norm_scale(x, scale=scale, target_mask=m),
            lambda: norm(x) * (1 + sel(sp, m)),
            lambda: M.layer_norm_scale_native(x, scale=scale, target_mask=m), 2),
        "residual_layer_norm_scale": (
            lambda: ops.residual_layer_norm_scale(x, r, gate=gate, scale=scale, target_mask=m),
            lambda: (lambda h: (norm(h) * (1 + sel(sp, m)), h))(r + sel(gp, m).tanh() * x),
            lambda: M.residual_layer_norm_scale_native(x, r, gate=gate, scale=scale, target_mask=m), 4),
        "tanh_gated_residual": (
            lambda: ops.tanh_gated_residual(x, r, gate=gate, target_mask=m),
            lambda: r + sel(gp, m).tanh() * x,
            lambda: M.tanh_gated_residual_native(x, r, gate=gate, target_mask=m), 3),
    }


def gpu_us(fn, device) -> float:
    """GPU time of one call in µs: CUDA-graph replays (host overhead out), L2 flushed per replay, as
    for the Qwen-Image ops (bench_modulate.bench). CPU (dry run): wall clock."""
    if device.type != "cuda":
        return bench(fn, device, 0, 0) * 1e3
    from bench_modulate import bench as graph_us

    return graph_us(fn)


def host_us(fn, device, n: int) -> float:
    """Host time per eager call: n calls queued, one sync (tiny work: the host is the bottleneck)."""
    fn()
    benchmarking.synchronize(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t) / n * 1e6
    benchmarking.synchronize(device)
    return t


def bare_triton_launch(device):
    """A call that launches one trivial Triton kernel (8 elements): the floor of host cost per launch."""
    import triton
    import triton.language as tl

    @triton.jit
    def _copy(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)

    src = torch.zeros(8, device=device)
    dst = torch.empty_like(src)
    return lambda: _copy[(1,)](src, dst, 8, BLOCK=8)


def check_ops(c) -> dict:
    """Each op on this device against the fp32 reference (relative L2; bf16 rounds each output once)."""
    out = {}
    for name, (ours, _, ref, _) in op_variants(c).items():
        got, want = ours(), ref()
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        out[f"check_{name}_rel"] = max(rel(a, b) for a, b in zip(got, want))
    return out


def run_ops(cfg, device, dtype, gen, rows, args) -> None:
    C = cfg["dim"]
    compile_kw = {"dynamic": False, **({"backend": "aot_eager"} if args.dry_run else {})}
    for L in cfg["op_L"]:
        c = op_inputs(L, C, device, dtype, gen)
        dst = torch.empty_like(c["x"])
        t_copy = gpu_us(lambda: dst.copy_(c["x"]), device)
        copy_tbps = 2 * c["x"].numel() * c["x"].element_size() / t_copy * 1e-6
        checks = check_ops(c)
        for name, (ours, theirs, ref, per_elem) in op_variants(c).items():
            nbytes = per_elem * c["x"].numel() * c["x"].element_size()
            t_ours = gpu_us(ours, device)
            row = dict(kind="op", op=name, L=L, C=C, bytes=nbytes, ours_us=t_ours, diffusers_us=gpu_us(theirs, device),
                       copy_us=t_copy, ours_tbps=nbytes / t_ours * 1e-6, copy_tbps=copy_tbps,
                       pct_copy=100 * (nbytes / t_ours * 1e-6) / copy_tbps, check_rel=checks[f"check_{name}_rel"])
            if not args.no_compile:  # what inductor makes of the same math (static shapes: one graph per L)
                row["compiled_ref_us"] = gpu_us(torch.compile(ref, **compile_kw), device)
            rows.append(row)
            print(f"  op {name:<26} L={L:<6} ours {t_ours:8.1f} µs ({row['pct_copy']:.0f}% of copy)  diffusers "
                  f"{row['diffusers_us']:8.1f}  compiled ref {row.get('compiled_ref_us', float('nan')):8.1f}  "
                  f"check {row['check_rel']:.1e}", flush=True)
        del c, dst

    # Host cost per eager call, at a tiny L: how long the host takes to issue one call.
    c = op_inputs(8, C, device, dtype, gen)
    n = 20 if args.dry_run else 2000
    host = {"bare triton launch": host_us(bare_triton_launch(device), device, n) if device.type == "cuda" else None}
    for name, (ours, theirs, _, _) in op_variants(c).items():
        host[name] = host_us(ours, device, n)
        host[f"{name} (diffusers eager)"] = host_us(theirs, device, n)
    for what, us in host.items():
        rows.append(dict(kind="host", op=what, L=8, host_us=us))
        print(f"  host {what:<40} {us if us is not None else float('nan'):7.1f} µs/call", flush=True)


def run_sweep(cfg, device, dtype, gen, rows) -> None:
    """Launch configurations of the three kernels at the middle L (the defaults are the Qwen-Image
    kernels' shape, not yet measured at C = 4096): GPU µs each, to choose `default_config` from."""
    import triton

    from qwenfast.ops.triton import modulate21 as T

    C = cfg["dim"]
    L = cfg["op_L"][len(cfg["op_L"]) // 2]
    c = op_inputs(L, C, device, dtype, gen)
    x, r, t, s, g = c["x"], c["residual"], c["mask"], c["scale"], c["gate"]
    block = triton.next_power_of_2(C)
    configs = {"layer_norm_scale": [T.LaunchConfig(rows, block, w) for rows in (1, 2) for w in (4, 8, 16)],
               "tanh_gated_residual": [T.LaunchConfig(1, b, w) for b in (512, 1024, 2048) for w in (2, 4, 8)]}
    configs["residual_layer_norm_scale"] = configs["layer_norm_scale"]
    launches = {
        "layer_norm_scale": lambda k: T.layer_norm_scale_fwd(x, s.sample, s.shared, t, EPS, config=k),
        "residual_layer_norm_scale": lambda k: T.residual_layer_norm_scale_fwd(x, r, g.sample, g.shared, s.sample,
                                                                              s.shared, t, EPS, config=k),
        "tanh_gated_residual": lambda k: T.tanh_gated_residual_fwd(x, r, g.sample, g.shared, t, config=k),
    }
    for name, launch in launches.items():
        for k in configs[name]:
            us = gpu_us(lambda: launch(k), device)
            rows.append(dict(kind="sweep", op=name, L=L, config=repr(k), us=us,
                             default=k == T.default_config(C, normalises=name != "tanh_gated_residual")))
            print(f"  sweep {name:<26} L={L} {k!r:<55} {us:8.1f} µs", flush=True)


# --- the block -----------------------------------------------------------------------------------------


def build_block(cfg, device, dtype):
    torch.manual_seed(0)
    with torch.device(device):
        block = tq21.QwenImage21TransformerBlock(cfg["dim"], cfg["heads"], cfg["head_dim"], mlp_ratio=3, eps=EPS)
    return block.to(dtype).eval()


def run_blocks(cfg, device, dtype, gen, rows, args, results) -> None:
    compile_kw = {"dynamic": False, **({"backend": "aot_eager"} if args.dry_run else {})}
    ref = build_block(cfg, device, dtype)
    fused = copy.deepcopy(ref)
    fused.__class__ = FusedQwenImage21TransformerBlock  # what fuse_modulation does to each block
    for side in cfg["sides"]:
        case = BlockCase(side, cfg, device, dtype, gen)
        for step in ("prefill", "cached"):
            kwargs = dict(ref=case.prefill if step == "prefill" else case.cached_kwargs(ref),
                          fused=case.prefill if step == "prefill" else case.cached_kwargs(fused))
            row = dict(kind="block", step=step, side=side, tokens=kwargs["ref"]["hidden_states"].shape[1],
                       text_tokens=case.text, image_tokens=case.image)
            with torch.no_grad():
                row["check_rel"] = rel(fused(**kwargs["fused"]), ref(**kwargs["ref"]))
            if not row["check_rel"] < 2e-2:
                print(f"CHECK FAILED: fused {step} block at {side}² differs from diffusers: {row['check_rel']:.2e}")
                results["check_failed"] = True
            for tag in ("eager", "compiled") if not args.no_compile else ("eager",):
                for name, block in (("diffusers", ref), ("fused", fused)):
                    if tag == "compiled":
                        block.compile(**compile_kw)
                    with torch.no_grad():
                        t = time.perf_counter()
                        block(**kwargs["ref" if name == "diffusers" else "fused"])  # compile outside the timing
                        benchmarking.synchronize(device)
                        row[f"{tag}_{name}_first_call_s"] = time.perf_counter() - t
                        row[f"{tag}_{name}_ms"] = bench(lambda: block(**kwargs["ref" if name == "diffusers" else "fused"]),
                                                        device, args.warmup_ms, args.rep_ms)
                    block._compiled_call_impl = None
                    print(f"  block {step:<8} {side}² ({row['tokens']} tokens) {tag:<8} {name:<9} "
                          f"{row[f'{tag}_{name}_ms']:.3f} ms", flush=True)
            rows.append(row)


# --- output ----------------------------------------------------------------------------------------------


def gain(a, b) -> str:
    return "—" if a is None or b is None else f"{(1 - b / a) * 100:+.1f}%"


def table(results) -> str:
    f = lambda v, spec=".3f": "—" if v is None else format(v, spec)  # noqa: E731
    lines = ["| block | tokens | diffusers eager ms | fused eager ms | Δ | diffusers compiled ms | fused compiled ms | Δ |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in (r for r in results["rows"] if r["kind"] == "block"):
        g = r.get
        lines.append(f"| {r['step']} {r['side']}² | {r['tokens']} | {f(g('eager_diffusers_ms'))} | {f(g('eager_fused_ms'))} | "
                     f"{gain(g('eager_diffusers_ms'), g('eager_fused_ms'))} | {f(g('compiled_diffusers_ms'))} | "
                     f"{f(g('compiled_fused_ms'))} | {gain(g('compiled_diffusers_ms'), g('compiled_fused_ms'))} |")
    lines += ["", "| op | L | ours µs | TB/s | % of copy of x | diffusers eager µs | compiled reference µs |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in (r for r in results["rows"] if r["kind"] == "op"):
        lines.append(f"| {r['op']} | {r['L']} | {r['ours_us']:.1f} | {r['ours_tbps']:.2f} | {r['pct_copy']:.0f}% | "
                     f"{r['diffusers_us']:.1f} | {f(r.get('compiled_ref_us'), '.1f')} |")
    lines += ["", "| host cost per eager call (L = 8) | µs |", "|---|---:|"]
    lines += [f"| {r['op']} | {f(r['host_us'], '.1f')} |" for r in results["rows"] if r["kind"] == "host"]
    sweep = [r for r in results["rows"] if r["kind"] == "sweep"]
    if sweep:
        lines += ["", "| kernel | L | launch config | µs |", "|---|---:|---|---:|"]
        lines += [f"| {r['op']} | {r['L']} | {r['config']}{' (default)' if r['default'] else ''} | {r['us']:.1f} |"
                  for r in sweep]
    p = results["provenance"]
    lines.append(f"\n{p['device']}, torch {p['torch']}, triton {p['triton']}, diffusers {p['diffusers']}, "
                 f"commit {p['commit'][:12]}; Δ = time saved by fused")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny dims on the CPU: checks the script, times nothing real")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results (with provenance) here")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled block and compiled reference timings")
    p.add_argument("--no-ops", action="store_true", help="skip the per-op timings")
    p.add_argument("--no-blocks", action="store_true", help="skip the block timings")
    p.add_argument("--sweep", action="store_true", help="also time launch configurations of the kernels")
    p.add_argument("--warmup-ms", type=float, default=200)
    p.add_argument("--rep-ms", type=float, default=1000)
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = TINY if args.dry_run else FULL
    raise_recompile_limits()
    timing = ("block: median ms of triton.testing.do_bench (L2 flushed); ops: median µs of CUDA-graph replays"
              if device.type == "cuda" else "median of 3 wall-clock runs (dry run)")
    results = {"provenance": benchmarking.provenance(device, timing=timing, dtype=str(dtype)), "rows": []}
    gen = torch.Generator(device=device).manual_seed(1)
    if not args.no_blocks:
        run_blocks(cfg, device, dtype, gen, results["rows"], args, results)
    if not args.no_ops:
        run_ops(cfg, device, dtype, gen, results["rows"], args)
    if args.sweep and device.type != "cuda":
        print("--sweep times Triton kernels: it needs a CUDA device; skipped")
    elif args.sweep:
        run_sweep(cfg, device, dtype, gen, results["rows"])
    if args.json:
        benchmarking.write_json(args.json, results)
    print(table(results))
    return 1 if results.get("check_failed") else 0


if __name__ == "__main__":
    raise SystemExit(main())
