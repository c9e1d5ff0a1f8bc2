"""Benchmark of the VAE kernels on one GPU: attention (D = 384), RMS norm (+SiLU), and cuDNN convs.

One call does everything the lease allows: the two ceilings (copy bandwidth, bf16 matrix product),
correctness on CUDA, then timings, and a short markdown table printed last. Full numbers go to
<out>/vae_kernels.json and <out>/vae_kernels.md (out = $OUT on the device machine, else
benchmarks/results).

    PYTHONPATH=src python benchmarks/bench_vae_kernels.py [--sections attn,rms,conv] [--sweep]

Shapes are the decoder's: attention over N = h*w latent pixels at 1328², 2048², 4096² (N = 27556,
65536, 262144; one head of dim 384), RMS norm at the up blocks' resolutions, convs 3x3 at the same.
Timings: triton.testing.do_bench, median, L2 flushed between runs (do_bench's default).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from qwenfast import benchmarking
from qwenfast.ops.attention import single_head_attention, single_head_attention_native
from qwenfast.ops.rms_norm import rms_norm, rms_norm_native
from qwenfast.ops.triton import attention as attn_k
from qwenfast.ops.triton import rms_norm as rms_k

GiB = 1 << 30


def log(*a):
    print(*a, flush=True)


def bench_ms(fn, rep_ms=200, warmup_ms=50) -> float:
    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def provenance() -> dict:
    return benchmarking.provenance()


# --- ceilings -------------------------------------------------------------------------------------


def ceilings() -> dict:
    x = torch.randn(GiB // 2, dtype=torch.bfloat16, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x))
    copy_gbs = 2 * x.numel() * 2 / ms / 1e6
    del x, y
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms_mm = bench_ms(lambda: a @ b)
    del a, b
    out = {"copy_GBps": copy_gbs, "bf16_matmul_TFLOPs": 2 * 8192**3 / ms_mm / 1e9}
    log(f"ceilings: copy {copy_gbs:.0f} GB/s, bf16 matmul {out['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    return out


# --- attention ------------------------------------------------------------------------------------


def sdpa_backend(q4: torch.Tensor) -> str:
    """Which backend F.scaled_dot_product_attention picks for this (1, 1, N, D) input."""
    try:
        from torch.nn.attention import SDPBackend

        choice = torch._fused_sdp_choice(q4, q4, q4)
        return SDPBackend(choice).name
    except Exception as e:  # pragma: no cover - private API
        return f"unknown ({type(e).__name__})"


def kernel_report(fn) -> list[dict]:
    """Registers, spills and shared memory of each compiled variant (Triton's cache; best effort)."""
    rows = []
    try:
        for cache in fn.device_caches.values():
            for key, k in cache[0].items():
                rows.append(
                    {"n_regs": getattr(k, "n_regs", None), "n_spills": getattr(k, "n_spills", None),
                     "shared": getattr(getattr(k, "metadata", None), "shared", None),
                     "num_warps": getattr(getattr(k, "metadata", None), "num_warps", None),
                     "key": str(key)[:300]}
                )
    except Exception as e:
        rows.append({"error": repr(e)})
    return rows


SWEEP = [  # (block_m, block_n, num_warps, num_stages, chunk_cap); at D = 384 64-key tiles with 2 stages
    # overflow the 227 KB of shared memory (Q 48-96 KB + 2 x (K + V) 96 KB): run 2 showed it
    (128, 32, 8, 2, 128),
    (128, 32, 8, 2, 256),
    (128, 32, 8, 1, 128),
    (128, 16, 8, 3, 128),
    (128, 64, 8, 1, 128),
    (64, 32, 4, 3, 128),
    (64, 32, 8, 3, 128),
    (64, 32, 4, 2, 128),
    (64, 64, 4, 1, 128),
]


def attention_section(sweep: bool, sizes: list[int]) -> dict:
    res: dict = {"correctness": [], "sweep": [], "sizes": []}
    D = 384
    torch.manual_seed(0)
    # Correctness on CUDA: odd N, B > 1, every dtype, against an fp64 oracle (upcast native).
    for dt, B, Nq, Nk in [(torch.bfloat16, 2, 1000, 1531), (torch.float16, 1, 4099, 4099), (torch.float32, 1, 777, 777),
                          (torch.bfloat16, 1, 27556, 27556)]:
        q, k, v = (torch.randn(B, n, D, device="cuda", dtype=dt) for n in (Nq, Nk, Nk))
        o = single_head_attention(q, k, v)
        if Nq <= 5000:
            ref = single_head_attention_native(q.double(), k.double(), v.double())
        else:
            ref = single_head_attention_native(q.float(), k.float(), v.float())
        row = {"dtype": str(dt), "B": B, "Nq": Nq, "Nk": Nk, "rel_err": rel_err(o, ref),
               "nan": bool(o.isnan().any()), "max_abs_err": float((o.double() - ref.double()).abs().max())}
        res["correctness"].append(row)
        log("attn correctness", row)
    # under torch.compile the kernel runs through the custom op (its fake gives the output's metadata)
    q, k, v = (torch.randn(2, 1234, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    compiled = torch.compile(single_head_attention, fullgraph=True)
    diff = compiled(q, k, v).float() - single_head_attention(q, k, v).float()
    res["compiled_max_abs_vs_eager"] = float(diff.abs().max())
    log("attn compiled vs eager", res["compiled_max_abs_vs_eager"])

    def inputs(n):
        g = torch.Generator(device="cuda").manual_seed(n)
        return [torch.randn(1, n, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]

    configs = [attn_k.AttentionConfig(*c) for c in SWEEP] if sweep else []
    default = attn_k.default_config(D, torch.bfloat16)
    if default not in configs:
        configs.insert(0, default)
    n_sweep = sizes[0]
    q, k, v = inputs(n_sweep)
    ref = F.scaled_dot_product_attention(q[None], k[None], v[None])[0]
    ranked = []
    for cfg in configs:
        row = {"config": cfg.__dict__, "N": n_sweep}
        try:
            t0 = time.time()
            o = attn_k.attention_fwd(q, k, v, cfg)
            torch.cuda.synchronize()
            row["compile_s"] = time.time() - t0
            row["max_abs_vs_sdpa"] = float((o.float() - ref.float()).abs().max())
            ms = bench_ms(lambda: attn_k.attention_fwd(q, k, v, cfg), rep_ms=300)
            row["ms"] = ms
            row["TFLOPs"] = attn_k.attention_flops(1, n_sweep, n_sweep, D) / ms / 1e9
            ranked.append((ms, cfg))
        except Exception as e:  # out of shared memory / registers: a config the chip can't take
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        res["sweep"].append(row)
        log("attn sweep", row)
    res["kernel_report"] = kernel_report(attn_k._attention_fwd_kernel)
    ranked.sort(key=lambda t: t[0])
    best = [c for _, c in ranked[:2]]
    res["best_config"] = best[0].__dict__ if best else None

    for n in sizes:
        q, k, v = inputs(n)
        q4, k4, v4 = q[None], k[None], v[None]  # (1, 1, N, D) as diffusers calls it
        flops = attn_k.attention_flops(1, n, n, D)
        rep = 300 if n < 100_000 else 1500
        row = {"N": n, "D": D, "dtype": "bfloat16", "sdpa_backend": sdpa_backend(q4)}
        ref = F.scaled_dot_product_attention(q4, k4, v4)[0]
        ms = bench_ms(lambda: F.scaled_dot_product_attention(q4, k4, v4), rep_ms=rep, warmup_ms=1)
        row["sdpa_ms"], row["sdpa_TFLOPs"] = ms, flops / ms / 1e9
        for cfg in best if n != n_sweep else best[:1]:
            o = attn_k.attention_fwd(q, k, v, cfg)
            ms = bench_ms(lambda: attn_k.attention_fwd(q, k, v, cfg), rep_ms=rep, warmup_ms=1)
            row.setdefault("ours", []).append(
                {"config": cfg.__dict__, "ms": ms, "TFLOPs": flops / ms / 1e9,
                 "max_abs_vs_sdpa": float((o.float() - ref.float()).abs().max())}
            )
        # the public function (dispatch + custom op) with the default config
        ms = bench_ms(lambda: single_head_attention(q, k, v), rep_ms=rep, warmup_ms=1)
        row["ours_default_ms"], row["ours_default_TFLOPs"] = ms, flops / ms / 1e9
        res["sizes"].append(row)
        log("attn size", row)
        del q, k, v, q4, k4, v4, ref
        torch.cuda.empty_cache()
    return res


# --- RMS norm -------------------------------------------------------------------------------------


def diffusers_rms_silu(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """What diffusers runs: QwenImageRMS_norm (channel_first, images) then SiLU."""
    y = F.normalize(x.float(), dim=1).to(x.dtype) * x.shape[1] ** 0.5 * gamma
    return F.silu(y)


RMS_SHAPES = [(96, 1328), (192, 664), (384, 166), (96, 4096)]
RMS_BLOCK_SWEEP = [(16, 4), (32, 4), (32, 8), (64, 8), (128, 8)]  # (BLOCK_S, num_warps) at C=96 -> BLOCK_C 128


def rms_section(copy_gbs: float, sweep: bool, compile_: bool) -> dict:
    res: dict = {"rows": [], "sweep": []}
    compiled = torch.compile(diffusers_rms_silu, dynamic=False) if compile_ else None
    for c, hw in RMS_SHAPES:
        torch.manual_seed(c)
        x = (torch.randn(1, c, hw, hw, device="cuda", dtype=torch.bfloat16) * 3 + 0.5).to(
            memory_format=torch.channels_last
        )
        gamma = (torch.rand(c, 1, 1, device="cuda", dtype=torch.bfloat16) + 0.5)
        nbytes = rms_k.rms_norm_bytes(x)
        row = {"C": c, "H": hw, "W": hw, "layout": "channels_last", "dtype": "bfloat16", "MB_moved": nbytes / 1e6}
        # correctness: against the fp32 native formula, rounded once (expect <= 1 bf16 ulp apart)
        y = rms_norm(x, gamma, silu=True)
        ref = rms_norm_native(x, gamma, silu=True)
        row["max_abs_vs_native"] = float((y.float() - ref.float()).abs().max())
        row["same_strides"] = y.stride() == x.stride()
        row["max_abs_diffusers_vs_native"] = float((diffusers_rms_silu(x, gamma).float() - ref.float()).abs().max())
        compiled_ours = torch.compile(rms_norm, fullgraph=True)
        row["compiled_ours_max_abs_vs_eager"] = float((compiled_ours(x, gamma, True).float() - y.float()).abs().max())
        del y, ref
        rep = 200 if hw < 4096 else 600
        out = torch.empty_like(x)
        g1 = gamma.reshape(-1).contiguous()
        variants = {
            "copy": lambda: out.copy_(x),
            "ours_silu": lambda: rms_norm(x, gamma, silu=True),
            "ours": lambda: rms_norm(x, gamma, silu=False),
            "ours_custom_op_silu": lambda: torch.ops.qwenfast.rms_norm(x, g1, True),  # + dispatcher
            "diffusers_eager_silu": lambda: diffusers_rms_silu(x, gamma),
            "native_fp32_eager_silu": lambda: rms_norm_native(x, gamma, silu=True),
        }
        if compiled is not None:
            variants["diffusers_compiled_silu"] = lambda: compiled(x, gamma)
        for name, fn in variants.items():
            try:
                if name == "diffusers_compiled_silu":
                    t0 = time.time()
                    fn()
                    torch.cuda.synchronize()
                    row["compile_s"] = time.time() - t0
                ms = bench_ms(fn, rep_ms=rep)
                row[name + "_us"] = ms * 1e3
                row[name + "_GBps"] = nbytes / ms / 1e6
            except Exception as e:
                row[name + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        # the same op on contiguous NCHW (correct for any layout; not the fast case)
        xc = x.contiguous()
        yc = rms_norm(xc, gamma, silu=True)
        row["nchw_max_abs_vs_channels_last"] = float((yc.float() - rms_norm(x, gamma, silu=True).float()).abs().max())
        ms = bench_ms(lambda: rms_norm(xc, gamma, silu=True), rep_ms=rep)
        row["ours_silu_nchw_us"], row["ours_silu_nchw_GBps"] = ms * 1e3, nbytes / ms / 1e6
        del xc, yc
        row["copy_ceiling_GBps"] = copy_gbs
        res["rows"].append(row)
        log("rms", row)
        if sweep and hw in (1328, 166):
            g = gamma.reshape(-1).contiguous()
            block_c = triton.next_power_of_2(c)
            for bs, nw in RMS_BLOCK_SWEEP:
                bs_c = max(1, bs * 128 // block_c)  # same elements per program at every C
                try:
                    ms = bench_ms(lambda: rms_k.rms_norm_fwd(x, g, True, blocks=(bs_c, block_c, nw)), rep_ms=rep)
                    res["sweep"].append({"C": c, "H": hw, "BLOCK_S": bs_c, "BLOCK_C": block_c, "num_warps": nw,
                                         "us": ms * 1e3, "GBps": nbytes / ms / 1e6})
                except Exception as e:
                    res["sweep"].append({"C": c, "BLOCK_S": bs_c, "num_warps": nw, "error": repr(e)[:200]})
                log("rms sweep", res["sweep"][-1])
        del x, out
        torch.cuda.empty_cache()
    return res


# --- convs (a reference for the decoder's layout choice) ------------------------------------------


CONV_SHAPES = [(384, 166), (192, 664), (96, 1328)]


def conv_section() -> dict:
    torch.backends.cudnn.benchmark = True
    rows = []
    for c, hw in CONV_SHAPES:
        torch.manual_seed(c)
        x = torch.randn(1, c, hw, hw, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(c, c, 3, 3, device="cuda", dtype=torch.bfloat16) * (c * 9) ** -0.5
        flops = 2 * c * c * 9 * hw * hw
        row = {"Cin": c, "Cout": c, "H": hw, "W": hw, "kernel": "3x3", "padding": 1, "dtype": "bfloat16"}
        outs = {}
        for layout, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            xl, wl = x.to(memory_format=fmt), w.to(memory_format=fmt)
            outs[layout] = F.conv2d(xl, wl, padding=1)
            ms = bench_ms(lambda: F.conv2d(xl, wl, padding=1), rep_ms=300)
            row[layout + "_us"], row[layout + "_TFLOPs"] = ms * 1e3, flops / ms / 1e9
            row[layout + "_out_channels_last"] = outs[layout].is_contiguous(memory_format=torch.channels_last)
        row["max_abs_nchw_vs_cl"] = float((outs["nchw"].float() - outs["channels_last"].float()).abs().max())
        rows.append(row)
        log("conv", row)
    return {"rows": rows}


# --- report ---------------------------------------------------------------------------------------


def markdown(res: dict) -> str:
    p = res["provenance"]
    lines = [
        "# VAE kernels on one GPU",
        "",
        f"{p['device']} ({p['sm_count']} SMs), torch {p['torch']}, triton {p['triton']}, CUDA {p['cuda']}, "
        f"cuDNN {p['cudnn']}; commit `{p['commit']}`; {p['date_utc']}.",
        f"Command: `{p['command']}`. Medians of triton.testing.do_bench (L2 flushed between runs).",
        "",
    ]
    if "ceilings" in res:
        c = res["ceilings"]
        lines += [f"Ceilings: device copy {c['copy_GBps']:.0f} GB/s (read + write), "
                  f"bf16 8192³ matmul {c['bf16_matmul_TFLOPs']:.0f} TFLOP/s.", ""]
    if "attention" in res:
        a = res["attention"]
        lines += ["## Single-head attention, D = 384, bf16, B = 1", "",
                  "| N | SDPA backend | SDPA ms | SDPA TFLOP/s | ours ms | ours TFLOP/s | speed-up "
                  "| max abs diff vs SDPA |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in a["sizes"]:
            best = min(r.get("ours", []), key=lambda o: o["ms"], default=None)
            if best is None:
                continue
            lines.append(
                f"| {r['N']} | {r['sdpa_backend']} | {r['sdpa_ms']:.2f} | {r['sdpa_TFLOPs']:.0f} | {best['ms']:.2f} | "
                f"{best['TFLOPs']:.0f} | {r['sdpa_ms'] / best['ms']:.1f}x | {best['max_abs_vs_sdpa']:.2e} |"
            )
        lines += ["", f"Config of the rows above (best of the sweep): `{a.get('best_config')}`; "
                  f"the public function with the default config: "
                  + ", ".join(f"N={r['N']}: {r['ours_default_ms']:.2f} ms" for r in a["sizes"]), ""]
        if a["sweep"]:
            lines += [f"Sweep at N = {a['sweep'][0]['N']}:", "",
                      "| BLOCK_M | BLOCK_N | warps | stages | chunk cap | ms | TFLOP/s |",
                      "|---|---|---|---|---|---|---|"]
            for r in a["sweep"]:
                c = r["config"]
                t = f"{r['ms']:.2f} | {r['TFLOPs']:.0f}" if "ms" in r else f"failed | {r.get('error', '')[:60]}"
                lines.append(
                    f"| {c['block_m']} | {c['block_n']} | {c['num_warps']} | {c['num_stages']} | "
                    f"{c['chunk_cap']} | {t} |"
                )
            lines.append("")
        lines += ["Correctness on CUDA (vs an fp64 oracle, fp32 for N = 27556): "
                  + "; ".join(f"{r['dtype'].split('.')[-1]} B={r['B']} Nq={r['Nq']} Nk={r['Nk']}: "
                              f"rel {r['rel_err']:.1e}"
                              for r in a["correctness"]), ""]
    if "rms" in res:
        lines += ["## RMS norm + SiLU, bf16, channels_last (bytes = read x + write y)", "",
                  "| C x H x W | MB | copy µs | ours µs | ours GB/s | diffusers eager µs | diffusers compiled µs "
                  "| ours NCHW µs | ours via custom op µs |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in res["rms"]["rows"]:
            def f(k):
                return f"{r[k]:.0f}" if k in r else "-"
            lines.append(
                f"| {r['C']} x {r['H']} x {r['W']} | {r['MB_moved']:.0f} | {f('copy_us')} | {f('ours_silu_us')} | "
                f"{f('ours_silu_GBps')} | {f('diffusers_eager_silu_us')} | {f('diffusers_compiled_silu_us')} | "
                f"{f('ours_silu_nchw_us')} | "
                f"{f('ours_custom_op_silu_us')} |"
            )
        lines.append("")
    if "conv" in res:
        lines += ["## cuDNN conv2d 3x3, padding 1, bf16 (reference for the decoder's layout)", "",
                  "| Cin→Cout @ H x W | NCHW µs | NCHW TFLOP/s | channels_last µs | channels_last TFLOP/s |",
                  "|---|---|---|---|---|"]
        for r in res["conv"]["rows"]:
            lines.append(f"| {r['Cin']}→{r['Cout']} @ {r['H']}² | {r['nchw_us']:.0f} | {r['nchw_TFLOPs']:.0f} | "
                         f"{r['channels_last_us']:.0f} | {r['channels_last_TFLOPs']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="attn,rms,conv")
    ap.add_argument("--sweep", action="store_true", help="sweep attention configs and RMS-norm blocks")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--attn-sizes", default="27556,65536,262144")
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(os.path.dirname(__file__), "results")))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_vae_kernels: needs a CUDA GPU")
    sections = set(args.sections.split(","))
    res: dict = {"provenance": provenance()}
    log(res["provenance"])
    t0 = time.time()
    res["ceilings"] = ceilings()
    os.makedirs(args.out, exist_ok=True)

    def save():
        with open(os.path.join(args.out, "vae_kernels.json"), "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.join(args.out, "vae_kernels.md"), "w") as f:
            f.write(markdown(res))

    if "attn" in sections:
        res["attention"] = attention_section(args.sweep, [int(s) for s in args.attn_sizes.split(",")])
        save()
        log(f"[{time.time() - t0:.0f} s]")
    if "rms" in sections:
        res["rms"] = rms_section(res["ceilings"]["copy_GBps"], args.sweep, not args.no_compile)
        save()
        log(f"[{time.time() - t0:.0f} s]")
    if "conv" in sections:
        res["conv"] = conv_section()
        save()
    res["wall_s"] = time.time() - t0
    save()
    log(markdown(res))


if __name__ == "__main__":
    main()
