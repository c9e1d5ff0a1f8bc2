"""Benchmark: the Qwen-Image DiT, diffusers' blocks against qwenfast's fused modulation blocks.

Full-size transformer dims (D = 3072, 24 heads x 128, MLP 12288), random weights, bf16, 1328² image
(6889 image tokens) and 256 text tokens; t2i, and edit (zero_cond_t: 2 x 6889 image tokens, the
second half on parameter set 1). Times, eager and under torch.compile (regional: each block
compiled, as diffusers' `compile_repeated_blocks`), median of CUDA-event timings through
triton.testing.do_bench (which flushes L2 before every run: cold L2):

- `modulate`: norm1 + modulation of the image stream alone, diffusers (LayerNorm + `_modulate`)
  against `layer_norm_modulate`; the residual variant after attention likewise.
- `block`: one `QwenImageTransformerBlock` forward.
- `model`: the whole 60-block transformer forward (when it fits: ~41 GB of bf16 weights).

Correctness first, on the device: fused against diffusers on the same weights and inputs (relative
L2 difference of the block outputs, bf16 both). Prints a table last; JSON to --out.

    python benchmarks/bench_dit.py --out results.json            # GPU, full size
    python benchmarks/bench_dit.py --small --device cpu          # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from diffusers import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

from qwenfast import benchmarking
from qwenfast.dit import fuse_modulation, unfuse_modulation
from qwenfast.ops import gated_residual, layer_norm_modulate, residual_layer_norm_modulate

FULL = dict(num_layers=60, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
            in_channels=64, out_channels=16, patch_size=2, axes_dims_rope=(16, 56, 56))
SMALL = dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
             in_channels=16, out_channels=4, patch_size=2, axes_dims_rope=(4, 6, 6))


def bench(fn, device, warmup_ms: float, rep_ms: float) -> float:
    """Median ms. CUDA: triton's do_bench (events, L2 flushed before each run). CPU: wall clock."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[1]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def set_zero_cond_t(model, on: bool) -> None:
    # One set of weights serves both: t2i and edit differ only in this flag (and the inputs).
    model.zero_cond_t = on
    model.register_to_config(zero_cond_t=on)
    for b in model.transformer_blocks:
        b.zero_cond_t = on


class Case:
    """Inputs of one mode at the block level and at the model level."""

    def __init__(self, model, mode: str, side: int, txt: int, batch: int, device, dtype, gen, mask: bool = True):
        cfg = model.config
        h = w = side // 16  # latent / 2: packed tokens per side (1328 -> 83)
        shapes = [(1, h, w)] + ([(1, h, w)] if mode == "edit" else [])
        self.mode, self.edit = mode, mode == "edit"
        self.img_tokens = sum(a * b for _, a, b in shapes)
        D = model.inner_dim
        r = lambda *s: torch.randn(*s, generator=gen, device=device, dtype=dtype)  # noqa: E731
        self.model_kwargs = dict(
            hidden_states=r(batch, self.img_tokens, cfg.in_channels),
            encoder_hidden_states=r(batch, txt, cfg.joint_attention_dim),
            encoder_hidden_states_mask=torch.ones(batch, txt, dtype=torch.long, device=device) if mask else None,
            timestep=torch.full((batch,), 0.7, device=device, dtype=dtype),
            img_shapes=[shapes] * batch,
            return_dict=False,
        )
        index = None
        if self.edit:
            index = torch.tensor([[0] * (h * w) + [1] * (h * w)] * batch, device=device, dtype=torch.int)
        self.block_kwargs = dict(
            hidden_states=r(batch, self.img_tokens, D),
            encoder_hidden_states=r(batch, txt, D),
            encoder_hidden_states_mask=torch.ones(batch, txt, dtype=torch.bool, device=device) if mask else None,
            temb=r(2 * batch if self.edit else batch, D),
            image_rotary_emb=model.pos_embed([shapes] * batch, max_txt_seq_len=txt, device=device),
            modulate_index=index,
        )


def modulate_rows(block, case):
    """The pieces of the image-stream modulation calls: x, residual, the [B', 3D] mod params."""
    kw = case.block_kwargs
    with torch.no_grad():
        mod1, mod2 = block.img_mod(kw["temb"]).chunk(2, dim=-1)
    return kw["hidden_states"], torch.randn_like(kw["hidden_states"]), mod1, mod2, kw["modulate_index"]


def bench_modulate(block, case, device, warm, rep):
    """diffusers' LayerNorm + _modulate (and the gated add + LayerNorm + _modulate) vs the fused ops."""
    from qwenfast.dit.qwen_image import split_modulation

    x, attn, mod1, mod2, index = modulate_rows(block, case)
    out = {}

    def diffusers_norm1():
        return QwenImageTransformerBlock._modulate(block, block.img_norm1(x), mod1, index)

    m1, m2 = split_modulation(mod1, index), split_modulation(mod2, index)  # Modulation or Select
    gate = QwenImageTransformerBlock._modulate(block, x, mod1, index)[1]  # (B, L, D) as diffusers keeps it

    def diffusers_residual_norm2():
        h = x + gate * attn
        return QwenImageTransformerBlock._modulate(block, block.img_norm2(h), mod2, index), h

    gate2 = QwenImageTransformerBlock._modulate(block, x, mod2, index)[1]  # (B, L, D)

    def diffusers_mlp_add():  # the block's last line: residual + gate2 * mlp_output
        return x + gate2 * attn

    def fused_mlp_add():
        return gated_residual(attn, x, m2)

    def fused_norm1():
        return layer_norm_modulate(x, m1)

    def fused_residual_norm2():
        return residual_layer_norm_modulate(attn, x, m1, m2)

    with torch.no_grad():
        y_ref = diffusers_norm1()[0]
        y = fused_norm1()
        out["check_norm1_rel"] = rel(y, y_ref)
        (y2_ref, _), h_ref = diffusers_residual_norm2()
        y2, h = fused_residual_norm2()
        out["check_norm2_rel"] = rel(y2, y2_ref)
        out["check_residual_rel"] = rel(h, h_ref)
        out["norm1_diffusers_ms"] = bench(diffusers_norm1, device, warm, rep)
        out["norm1_fused_ms"] = bench(fused_norm1, device, warm, rep)
        out["norm2_diffusers_ms"] = bench(diffusers_residual_norm2, device, warm, rep)
        out["norm2_fused_ms"] = bench(fused_residual_norm2, device, warm, rep)
        out["check_mlp_add_rel"] = rel(fused_mlp_add(), diffusers_mlp_add())
        out["mlp_add_diffusers_ms"] = bench(diffusers_mlp_add, device, warm, rep)
        out["mlp_add_fused_ms"] = bench(fused_mlp_add, device, warm, rep)
    return out


def raise_recompile_limits() -> None:
    # Blocks are compiled per module (regional); the diffusers and fused classes at two token counts
    # are separate graphs: keep dynamo from falling back to eager at its default limit of 8.
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))
    # t2i and edit are two fixed token counts: two static graphs, not one dynamic-shape graph.
    cfg.automatic_dynamic_shapes = False


def compile_blocks(model, on: bool) -> None:
    for b in model.transformer_blocks:
        if on:
            b.compile(dynamic=False)
        else:
            b._compiled_call_impl = None


def build_model(config: dict, device, dtype) -> QwenImageTransformer2DModel:
    """Random weights straight into `dtype` on `device`, one block at a time: the full model is
    41 GB in bf16 but would be 82 GB if built in fp32 first."""
    from torch import nn

    with torch.device(device):
        model = QwenImageTransformer2DModel(**{**config, "num_layers": 1}).to(dtype)
        dim = model.inner_dim
        model.transformer_blocks = nn.ModuleList(
            QwenImageTransformerBlock(dim, config["num_attention_heads"], config["attention_head_dim"]).to(dtype)
            for _ in range(config["num_layers"])
        )
    model.register_to_config(num_layers=config["num_layers"])
    return model.eval()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny dims and size (smoke run)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--side", type=int, default=None, help="image side in pixels (default 1328; 64 with --small)")
    p.add_argument("--txt", type=int, default=None, help="text tokens (default 256; 7 with --small)")
    p.add_argument("--no-model", action="store_true", help="skip the whole-transformer timings")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile timings")
    p.add_argument("--no-mask", action="store_true",
                   help="pass no text mask (the pipelines pass one; without it SDPA may pick another backend)")
    p.add_argument("--repeat", type=int, default=1,
                   help="time each block variant this many times, interleaved, to see the run-to-run spread")
    p.add_argument("--warmup-ms", type=float, default=200)
    p.add_argument("--rep-ms", type=float, default=1000)
    p.add_argument("--model-rep-ms", type=float, default=3000)
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--budget-s", type=float, default=1e9,
                   help="skip the remaining whole-model timings once this many seconds have passed")
    args = p.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    side = args.side or (64 if args.small else 1328)
    txt = args.txt or (7 if args.small else 256)
    raise_recompile_limits()

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(SMALL if args.small else FULL, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"built transformer ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params) in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)

    gen = torch.Generator(device=device).manual_seed(1)
    results = {"provenance": provenance(device, args), "rows": []}
    rows = results["rows"]
    block = model.transformer_blocks[0]
    for mode in ("t2i", "edit"):
        set_zero_cond_t(model, mode == "edit")
        case = Case(model, mode, side, txt, 1, device, dtype, gen, mask=not args.no_mask)
        row = {"mode": mode, "image_tokens": case.img_tokens, "text_tokens": txt, "text_mask": not args.no_mask}
        rows.append(row)

        # Correctness on this device, then the per-op times.
        unfuse_modulation(model)
        row.update(bench_modulate(block, case, device, args.warmup_ms, args.rep_ms))
        with torch.no_grad():
            ref_txt, ref_img = block(**case.block_kwargs)
            fuse_modulation(model)
            txt_out, img_out = block(**case.block_kwargs)
        row["check_block_img_rel"], row["check_block_txt_rel"] = rel(img_out, ref_img), rel(txt_out, ref_txt)
        print(f"[{mode}] check: block img rel {row['check_block_img_rel']:.2e}, txt rel {row['check_block_txt_rel']:.2e}, "
              f"norm1 {row['check_norm1_rel']:.2e}, norm2 {row['check_norm2_rel']:.2e}", flush=True)
        if not (row["check_block_img_rel"] < 2e-2 and row["check_block_txt_rel"] < 2e-2):
            print("CHECK FAILED: fused block differs from diffusers", flush=True)
            results["check_failed"] = True

        for compiled in ((False, True) if not args.no_compile else (False,)):
            tag = "compiled" if compiled else "eager"
            for variant in ("diffusers", "fused"):
                (fuse_modulation if variant == "fused" else unfuse_modulation)(model)
                compile_blocks(model, compiled)
                with torch.no_grad():
                    t = time.perf_counter()
                    block(**case.block_kwargs)  # compile (if any) outside the timing
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    row[f"block_{tag}_{variant}_first_call_s"] = time.perf_counter() - t
                    row[f"block_{tag}_{variant}_ms"] = bench(lambda: block(**case.block_kwargs), device,
                                                             args.warmup_ms, args.rep_ms)
                    row[f"block_{tag}_{variant}_runs_ms"] = [row[f"block_{tag}_{variant}_ms"]]
                print(f"[{mode}] block {tag:8s} {variant:9s} {row[f'block_{tag}_{variant}_ms']:.3f} ms", flush=True)
                if not args.no_model and time.perf_counter() - t0 > args.budget_s:
                    row[f"model_{tag}_{variant}_skipped"] = "time budget"
                    print(f"[{mode}] model {tag} {variant}: skipped (time budget)", flush=True)
                elif not args.no_model:
                    with torch.no_grad():
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats()
                        t = time.perf_counter()
                        out = model(**case.model_kwargs)[0]
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        row[f"model_{tag}_{variant}_first_call_s"] = time.perf_counter() - t
                        row[f"model_{tag}_{variant}_finite"] = bool(torch.isfinite(out).all())
                        row[f"model_{tag}_{variant}_ms"] = bench(lambda: model(**case.model_kwargs), device,
                                                                 args.warmup_ms, args.model_rep_ms)
                        if device.type == "cuda":
                            row[f"model_{tag}_{variant}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    print(f"[{mode}] model {tag:8s} {variant:9s} {row[f'model_{tag}_{variant}_ms']:.1f} ms", flush=True)
            for _ in range(args.repeat - 1):  # interleaved re-runs: the spread says what is noise
                for variant in ("diffusers", "fused"):
                    (fuse_modulation if variant == "fused" else unfuse_modulation)(model)
                    compile_blocks(model, compiled)
                    with torch.no_grad():
                        row[f"block_{tag}_{variant}_runs_ms"].append(
                            bench(lambda: block(**case.block_kwargs), device, args.warmup_ms, args.rep_ms))
                for variant in ("diffusers", "fused"):
                    runs = row[f"block_{tag}_{variant}_runs_ms"]
                    print(f"[{mode}] block {tag:8s} {variant:9s} runs " + " ".join(f"{r:.3f}" for r in runs), flush=True)
            compile_blocks(model, False)
        if args.out:  # keep what we have if a later step dies
            write(results, args.out)

    if args.out:
        write(results, args.out)
    print(table(results))
    return 1 if results.get("check_failed") else 0


def write(results, path) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def provenance(device, args) -> dict:
    timing = ("median ms, triton.testing.do_bench (CUDA events, L2 flushed per run)" if device.type == "cuda"
              else "median of 3 wall-clock runs")
    return benchmarking.provenance(device, timing=timing)


def table(results) -> str:
    lines = ["| mode | what | diffusers eager | fused eager | Δ | diffusers compiled | fused compiled | Δ |",
             "|---|---|---|---|---|---|---|---|"]

    def cell(row, key):
        v = row.get(key)
        return "—" if v is None else f"{v:.3f}" if v < 100 else f"{v:.1f}"

    def gain(row, a, b):
        if row.get(a) is None or row.get(b) is None:
            return "—"
        return f"{(1 - row[b] / row[a]) * 100:+.1f}%"

    for row in results["rows"]:
        m = row["mode"]
        lines.append(f"| {m} | image norm1+mod (ms) | {cell(row, 'norm1_diffusers_ms')} | {cell(row, 'norm1_fused_ms')} | "
                     f"{gain(row, 'norm1_diffusers_ms', 'norm1_fused_ms')} | | | |")
        lines.append(f"| {m} | image add+norm2+mod (ms) | {cell(row, 'norm2_diffusers_ms')} | {cell(row, 'norm2_fused_ms')} | "
                     f"{gain(row, 'norm2_diffusers_ms', 'norm2_fused_ms')} | | | |")
        if row.get("mlp_add_diffusers_ms") is not None:
            lines.append(f"| {m} | image gated add after MLP (ms) | {cell(row, 'mlp_add_diffusers_ms')} | "
                         f"{cell(row, 'mlp_add_fused_ms')} | {gain(row, 'mlp_add_diffusers_ms', 'mlp_add_fused_ms')} | | | |")
        for what in ("block", "model"):
            k = lambda tag, v: f"{what}_{tag}_{v}_ms"  # noqa: E731
            if row.get(k("eager", "diffusers")) is None:
                continue
            lines.append(
                f"| {m} | {what} (ms) | {cell(row, k('eager', 'diffusers'))} | {cell(row, k('eager', 'fused'))} | "
                f"{gain(row, k('eager', 'diffusers'), k('eager', 'fused'))} | {cell(row, k('compiled', 'diffusers'))} | "
                f"{cell(row, k('compiled', 'fused'))} | {gain(row, k('compiled', 'diffusers'), k('compiled', 'fused'))} |")
    prov = results["provenance"]
    lines.append(f"\n{prov['device']}, torch {prov['torch']}, triton {prov['triton']}, diffusers {prov['diffusers']}, "
                 f"commit {prov['commit'][:12]}; Δ = time saved by fused")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
