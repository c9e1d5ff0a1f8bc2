"""Predicted peak memory (and FLOPs) of the VAE decodes, without a GPU: the decode runs on the `meta`
device under `qwenfast.benchmarking.LiveMemory`, with every device decision taken as on CUDA.

`cuda_like()` makes meta tensors take the paths CUDA tensors take: `is_cuda` is true for them, so the
models run channels-last (`frame_layout`, `video.video_layout`); our ops dispatch to their CUDA
implementation and reach their `torch.library` op, whose fake allocates what the kernel allocates
(the output, nothing else); SDPA picks its backend as on an H200 (flash for head dim <= 256, the
memory-efficient kernel for 4-D inputs, else the math path, whose fp32 upcasts and scores are then
counted: see pytorch issue 144960 for 3-D inputs). Not seen: cuDNN/cuBLAS workspaces, allocator
segments (the CUDA peak counts the first, not the second).

Scenarios are the ones the GPU benchmarks measure (bf16, random full-size weights, diffusers' default
configs; `bench_vae21.py` for the 2.1 VAE, `bench_video.py` for the 81-frame video):

    python benchmarks/memory_model.py                       # every scenario, a table last
    python benchmarks/memory_model.py --only vae21 --top 8  # with the tensors live at each peak
    python benchmarks/memory_model.py --flops               # FLOPs per layer kind, 2.1 decode 1328²
    python benchmarks/memory_model.py --json benchmarks/results/memory_model.json
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import qwenfast  # noqa: E402
from qwenfast import QwenImageVAE, VAEConfig  # noqa: E402
from qwenfast.benchmarking import LiveMemory, format_table, provenance, write_json  # noqa: E402

GIB = 2**30
# What the H200 peaks hold beyond the live tensors, fitted per model: each measured peak is the
# predicted live peak plus k x the input of the largest 3x3 conv (the max over convs of live + output +
# k x input), most likely cuDNN workspace (cudnn.benchmark on, its trial runs inside the measured
# window). k = 3.1 fits all 8 points of the 2.1 VAE (ours before the banded local part, and
# diffusers'; within 2%); k = 1.7 the 4 of the Qwen-Image VAE's image decode (each point alone: 1.6-1.8;
# its convs are narrower). A fit, not a measurement: bench_vae21.py's
# "steady peak" and --memory-snapshot settle it. None for the video path: its one measurement (11.47
# GiB) is of an older path than the one predicted here.
WORKSPACE_PER_INPUT = {"vae21": 3.1, "diffusers21": 3.1, "image": 1.7, "video": None}
# Peaks measured on one H200 (bf16, max_memory_allocated after reset: weights and inputs included):
# the 2.1 VAE with its banded local part (bench_vae21.py at 0ebd864, vae21_round2_h200.log; exact =
# 512 px tiles; before the bands: 4.07 / 6.39 / 14.27 and 2.37 / 3.15 / 3.60 GiB) and the streamed video
# path (bench_video.py at ce6084c + the level-join fix, video_h200.json, with each up block's input
# freed after its first ResBlock; at 0ebd864, before that: 9.10 / 5.50; its peak is above the memory in
# use before the decode, so without the weights: 0.24 GiB less than this model counts; exact = 1024 px
# tiles).
MEASURED_GIB = {
    ("vae21", 1024, "untiled"): 2.59, ("vae21", 1328, "untiled"): 3.09, ("vae21", 2048, "untiled"): 6.29,
    ("vae21", 1024, "exact"): 1.66, ("vae21", 1328, "exact"): 2.10, ("vae21", 2048, "exact"): 2.40,
    ("video", 720, "untiled"): 8.77, ("video", 720, "exact"): 5.31,
}
# The old video path (main at 60b746b, before the streamed one): not what runs now, shown for reference.
MEASURED_OLD_VIDEO_GIB = {("video", 720, "untiled"): 11.47, ("video", 720, "exact"): 7.12}
# Validation points on other paths, same H200 runs: the Qwen-Image VAE's image decode (bench_vae.py,
# vae_after_refactor_h200.json, commit 3401347: the image path that runs now) and diffusers' 2.1 decode.
MEASURED_GIB.update({("image", 1328, "untiled"): 2.53, ("image", 1328, "exact"): 1.07,
                     ("image", 2048, "untiled"): 5.66, ("image", 2048, "exact"): 2.03,
                     ("diffusers21", 1024, "untiled"): 7.48, ("diffusers21", 1328, "untiled"): 12.19})
TARGET_GIB = {("vae21", 1328, "untiled"): 4.0, ("vae21", 2048, "untiled"): 8.0, ("vae21", 2048, "exact"): 2.0}
VIDEO_TARGET_BEYOND_OUT_GIB = 3.0  # issue 12: 81 x 720p untiled, peak beyond the output tensor


# --------------------------------------------------------------------------------------------------
# Meta tensors as CUDA tensors
# --------------------------------------------------------------------------------------------------


def _is_meta(args) -> bool:
    from torch.utils._pytree import tree_leaves

    return any(isinstance(a, torch.Tensor) and a.is_meta for a in tree_leaves(args))


def _sdpa_as_on_h200(original: Callable) -> Callable:
    """`F.scaled_dot_product_attention` for meta tensors, choosing the backend an H200 would: the fused
    kernels take 4-D inputs only; flash takes fp16/bf16 with head dim <= 256; the memory-efficient
    kernel a head dim that is a multiple of 8; the math path (decomposed into aten ops here, so its
    fp32 copies and N x N scores are counted) the rest. The `sdpa_kernel` context's choices hold."""
    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if not q.is_meta:
            return original(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        fused = q.dim() == 4 and attn_mask is None and dropout_p == 0.0
        d = q.shape[-1]
        if fused and torch.backends.cuda.flash_sdp_enabled() and q.dtype in (torch.float16, torch.bfloat16) and d <= 256:
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, scale=scale)[0]
        if fused and torch.backends.cuda.mem_efficient_sdp_enabled() and d % 8 == 0:
            return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False, 0.0, is_causal,
                                                                          scale=scale)[0]
        if torch.backends.cuda.math_sdp_enabled() and attn_mask is None and not is_causal:
            return _math_sdpa_as_on_cuda(q, k, v, scale)
        raise RuntimeError("No available kernel. Aborting execution.")

    return sdpa


def _math_sdpa_as_on_cuda(q, k, v, scale=None):
    """SDPA's math backend step by step, as its C++ composite runs on CUDA (the meta kernel is one op
    and would hide its temporaries): fp16/bf16 inputs upcast to fp32 unless allowed otherwise, q and k
    each scaled by sqrt(scale), the fp32 scores, their softmax, the output, and the attention weights
    rounded back (the op returns them; SDPA drops them)."""
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16) and not torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed():
        q, k, v = q.float(), k.float(), v.float()
    root = (q.shape[-1] ** -0.5 if scale is None else scale) ** 0.5
    scores = torch.matmul(q * root, k.transpose(-2, -1) * root)
    del q, k
    weights = torch.softmax(scores, dim=-1)
    del scores
    out = torch.matmul(weights, v).to(dtype)
    weights.to(dtype)
    return out


_CONVS = (torch.ops.aten.convolution, torch.ops.aten.conv2d, torch.ops.aten.conv3d, torch.ops.aten.conv_transpose2d)


def cuda_strides(func, args, kwargs, out):
    """`LiveMemory` transform: a meta convolution's output in the memory format cuDNN gives it on CUDA
    (channels-last when the input or the weight is; the meta kernel returns contiguous ones)."""
    if func.overloadpacket in _CONVS and isinstance(out, torch.Tensor) and out.is_meta:
        x, w = args[0], args[1]
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(out.dim())
        if fmt is not None and (x.is_contiguous(memory_format=fmt) and not x.is_contiguous()
                                or w.is_contiguous(memory_format=fmt) and not w.is_contiguous()):
            return torch.empty(out.shape, dtype=out.dtype, device=out.device, memory_format=fmt)
    return out


@contextlib.contextmanager
def cuda_like() -> Iterator[None]:
    """Within: meta tensors take the decisions and allocations of CUDA tensors (module doc). Written to
    also take older checkouts of qwenfast (a piece they lack is left alone), to predict their peaks."""
    import importlib

    from qwenfast.ops import custom_op

    def optional(name):
        try:
            return importlib.import_module(name)
        except ImportError:
            return None

    rms_kernel, video = optional("qwenfast.ops.triton.rms_norm"), optional("qwenfast.vae.video")
    support = optional("qwenfast.ops.triton._support")
    saved: list[tuple[Any, str, Any]] = []

    def patch(obj, name, value):
        saved.append((obj, name, obj.__dict__.get(name, _MISSING) if isinstance(obj, type) else getattr(obj, name)))
        setattr(obj, name, value)

    base_is_cuda = torch._C.TensorBase.is_cuda
    patch(torch.Tensor, "is_cuda", property(lambda t: t.is_meta or base_is_cuda.__get__(t)))
    choose = custom_op.choose_backend
    patch(custom_op, "choose_backend",
          lambda device, has_triton=None: "cuda" if device is not None and device.type == "meta" else choose(device, has_triton))
    launches = {id(f): f for f in (getattr(custom_op, "launch", None), getattr(support, "launch", None)) if f}
    for name, module in list(sys.modules.items()):
        launch = getattr(module, "launch", None) if name.startswith("qwenfast.") else None
        if launch is not None and id(launch) in launches:
            patch(module, "launch", lambda op, launcher, *args, _launch=launch:
                  op(*args) if _is_meta(args) else _launch(op, launcher, *args))
    if rms_kernel is not None:
        fwd = rms_kernel.rms_norm_fwd

        def rms_norm_fwd(x, gamma, silu, bias=None, *rest, out=None, **kw):
            if x.is_meta:  # the kernel writes into `out` (or one new tensor shaped like x)
                return out if out is not None else torch.ops.qwenfast.rms_norm(x, gamma, silu, bias)
            return fwd(x, gamma, silu, bias, *rest, out=out, **kw)

        patch(rms_kernel, "rms_norm_fwd", rms_norm_fwd)
    if video is not None:
        layout = video.video_layout
        patch(video, "video_layout", lambda device: torch.channels_last_3d if device.type == "meta" else layout(device))
    patch(F, "scaled_dot_product_attention", _sdpa_as_on_h200(F.scaled_dot_product_attention))
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            if value is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, value)


_MISSING = object()


# --------------------------------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------------------------------


def predict(fn: Callable[[], Any], resident: dict[str, list[torch.Tensor]], simulate_cuda: bool = True,
            workspace: float | None = None) -> tuple[LiveMemory, Any]:
    """Run `fn()` under inference mode and `LiveMemory`, with `resident` ({label: tensors}) counted as
    live from the start; (the meter, fn's result). The meter also gets `largest_conv_input_bytes` and
    `with_workspace_bytes` (its peak with `workspace` x each 3x3 conv's input added during that conv;
    None without a factor)."""
    mem = LiveMemory()
    mem.largest_conv_input_bytes = 0
    mem.with_workspace_bytes = 0  # max over 3x3 convs of live + output + WORKSPACE_PER_INPUT x input

    def transform(func, args, kwargs, out):
        if func.overloadpacket in _CONVS and args[1].shape[-1] > 1:  # a 3x3 (x3) conv
            x = args[0].numel() * args[0].element_size()
            mem.largest_conv_input_bytes = max(mem.largest_conv_input_bytes, x)
            y = out.numel() * out.element_size()
            if workspace is not None:
                mem.with_workspace_bytes = max(mem.with_workspace_bytes, mem.live_bytes + y + int(workspace * x))
        return cuda_strides(func, args, kwargs, out) if simulate_cuda else out

    mem.transform = transform
    ctx = cuda_like() if simulate_cuda else contextlib.nullcontext()
    with ctx, torch.inference_mode(), mem:
        for label, tensors in resident.items():
            mem.track(tensors, label)
        out = fn()
    mem.with_workspace_bytes = None if workspace is None else max(mem.with_workspace_bytes, mem.peak_bytes)
    return mem, out


def meta_vae21(dtype=torch.bfloat16, arch: dict | None = None) -> "qwenfast.QwenImage21VAE":
    """The released 2.1 VAE (diffusers' default config) on the meta device: no memory, no init."""
    with torch.device("meta"):
        return qwenfast.QwenImage21VAE(**(arch or {})).to(dtype).eval().requires_grad_(False)


def meta_qwen_vae(dtype=torch.bfloat16, arch: dict | None = None) -> QwenImageVAE:
    with torch.device("meta"):
        return QwenImageVAE(**(arch or {})).to(dtype).eval().requires_grad_(False)


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def vae21_case(vae: "qwenfast.QwenImage21VAE", size: int, mode: str, exact_tile: int = 512) -> tuple[LiveMemory, dict]:
    """The 2.1 decode of a `size`² image as bench_vae21.py runs it: the whole VAE's weights resident
    (encoder too), the fp32 latent and its bf16 copy, ours with `mode` 'untiled' or 'exact'."""
    s = vae.spatial_compression_ratio
    z = torch.empty(1, vae.z_dim, 1, size // s, size // s, device="meta")
    zb = z.to(vae.dtype)
    vae.vae_config = VAEConfig(use_tiling=True, exact_tile_sample_size=exact_tile) if mode == "exact" else VAEConfig()
    mem, out = predict(lambda: vae.decode(zb), {"weights": list(vae.parameters()), "latent": [z, zb]},
                       workspace=WORKSPACE_PER_INPUT["vae21"])
    return mem, dict(model="vae21", size=size, mode=mode, out_bytes=out.numel() * out.element_size())


def video_case(vae: QwenImageVAE, height: int, width: int, frames: int, mode: str,
               exact_tile: int = 1024) -> tuple[LiveMemory, dict]:
    """The 81-frame video decode of bench_video.py: weights, the bf16 latent, ours untiled or exact-tiled."""
    s = vae.spatial_compression_ratio
    t = (frames - 1) // 4 + 1
    z = torch.empty(1, vae.z_dim, t, height // s, width // s, device="meta", dtype=vae.dtype)
    vae.vae_config = VAEConfig(use_tiling=True, exact_tile_sample_size=exact_tile) if mode == "exact" else VAEConfig()
    mem, out = predict(lambda: vae.decode(z), {"weights": list(vae.parameters()), "latent": [z]},
                       workspace=WORKSPACE_PER_INPUT["video"])
    return mem, dict(model="video", size=height, mode=mode, out_bytes=out.numel() * out.element_size())


def image_case(vae: QwenImageVAE, size: int, mode: str) -> tuple[LiveMemory, dict]:
    """The Qwen-Image VAE's image decode as bench_vae.py runs it: weights, the fp32 latent; untiled or
    exact-tiled (VAEConfig's default tile)."""
    s = vae.spatial_compression_ratio
    z = torch.empty(1, vae.z_dim, 1, size // s, size // s, device="meta")
    vae.vae_config = VAEConfig(use_tiling=mode == "exact")
    mem, out = predict(lambda: vae.decode(z), {"weights": list(vae.parameters()), "latent": [z]},
                       workspace=WORKSPACE_PER_INPUT["image"])
    return mem, dict(model="image", size=size, mode=mode, out_bytes=out.numel() * out.element_size())


def diffusers21_case(size: int) -> tuple[LiveMemory, dict]:
    """diffusers' own 2.1 decode (bench_vae21.py's reference row), on meta: a check of the accountant
    on code that is not ours (no fused ops; NCHW; its frame caches and fp32 norms)."""
    from diffusers import AutoencoderKLQwenImage21

    with torch.device("meta"):
        ref = AutoencoderKLQwenImage21().to(torch.bfloat16).eval().requires_grad_(False)
    z = torch.empty(1, ref.config.z_dim, 1, size // 16, size // 16, device="meta")
    zb = z.to(torch.bfloat16)
    mem, out = predict(lambda: ref.decode(zb).sample, {"weights": list(ref.parameters()), "latent": [z, zb]},
                       workspace=WORKSPACE_PER_INPUT["diffusers21"])
    return mem, dict(model="diffusers21", size=size, mode="untiled", out_bytes=out.numel() * out.element_size())


def scenario_rows(only: str | None = None, top: int = 0, sizes=(1024, 1328, 2048)) -> list[dict]:
    rows = []

    def add(mem: LiveMemory, info: dict, label: str):
        key = (info["model"], info["size"], info["mode"])
        row = dict(case=label, mode=info["mode"], predicted_gib=mem.peak_gib, out_gib=info["out_bytes"] / GIB,
                   beyond_out_gib=mem.peak_gib - info["out_bytes"] / GIB, measured_gib=MEASURED_GIB.get(key),
                   measured_old_path_gib=MEASURED_OLD_VIDEO_GIB.get(key),
                   largest_conv_input_gib=mem.largest_conv_input_bytes / GIB,
                   with_workspace_gib=None if mem.with_workspace_bytes is None else mem.with_workspace_bytes / GIB,
                   target_gib=TARGET_GIB.get(key), peak_op=mem.peak_op)
        if info["model"] == "video" and info["mode"] == "untiled":
            row["target_gib"] = VIDEO_TARGET_BEYOND_OUT_GIB  # beyond the output
        row["breakdown"] = mem.peak_breakdown(top or 8, group={"weights"})
        rows.append(row)
        print(f"{label:22s} {info['mode']:8s} predicted {mem.peak_gib:6.2f} GiB (beyond output "
              f"{row['beyond_out_gib']:5.2f}), measured {row['measured_gib']}", flush=True)
        if top:
            print(mem.table(top, group={"weights"}), "\n", flush=True)

    if only in (None, "vae21"):
        vae = meta_vae21()
        print(f"2.1 VAE weights (bf16): decoder {param_bytes(vae.decoder) / GIB:.3f} GiB, "
              f"whole VAE {param_bytes(vae) / GIB:.3f} GiB", flush=True)
        for size in sizes:
            for mode in ("untiled", "exact"):
                add(*vae21_case(vae, size, mode), f"2.1 decode {size}²")
    if only in (None, "image"):
        vae = meta_qwen_vae()
        for size in (1328, 2048):
            for mode in ("untiled", "exact"):
                add(*image_case(vae, size, mode), f"image {size}² (Qwen-Image)")
    if only in (None, "diffusers21"):
        for size in (1024, 1328):
            add(*diffusers21_case(size), f"diffusers 2.1 {size}²")
    if only in (None, "video"):
        vae = meta_qwen_vae()
        print(f"Qwen-Image VAE weights (bf16): {param_bytes(vae) / GIB:.3f} GiB", flush=True)
        for mode in ("untiled", "exact"):
            add(*video_case(vae, 720, 1280, 81, mode), "video 81x1280x720")
    return rows


# --------------------------------------------------------------------------------------------------
# FLOPs per layer kind
# --------------------------------------------------------------------------------------------------


def layer_kind(name: str) -> str:
    """A FLOP counter's module path inside one stage (its root is the module called) -> a layer kind."""
    parts = name.split(".")
    leaf = parts[-1]
    if parts[0] == "AttentionBlock":
        return "attention (qkv, softmax(qk)v, proj)"
    if "upsampler" in parts or "upsamplers" in parts:
        return "upsampler 3x3 conv (after nearest 2x)"
    if leaf in ("conv1", "conv2"):
        return "ResBlock 3x3 convs"
    if leaf == "conv_shortcut":
        return "ResBlock 1x1 shortcut"
    if parts[0] == "Conv":
        return "conv_in / post_quant_conv / conv_out"
    return name


def flop_rows(size: int = 1328) -> tuple[list[dict], float]:
    """FLOPs of the 2.1 decode at `size`² per layer kind and stage (torch's FLOP counter on meta, CUDA
    paths): (rows, largest first; total FLOP). Stage "global" is everything before the up blocks."""
    from torch.utils.flop_counter import FlopCounterMode

    vae = meta_vae21()
    s = vae.spatial_compression_ratio
    z = torch.empty(1, vae.z_dim, 1, size // s, size // s, device="meta", dtype=vae.dtype)
    vae.vae_config = VAEConfig()
    kinds: dict[tuple[str, str], float] = {}

    def count(stage: str, fn):
        counter = FlopCounterMode(display=False)
        with counter:
            out = fn()
        counts = counter.get_flop_counts()
        for name, ops in counts.items():  # the deepest module that counted each op
            total = sum(ops.values())
            if name == "Global" or not total or any(o.startswith(name + ".") and sum(counts[o].values()) for o in counts):
                continue
            key = (stage, layer_kind(name))
            kinds[key] = kinds.get(key, 0.0) + total
        return out

    with cuda_like(), torch.inference_mode():
        x = count("global", lambda: vae.decode_global(z))[:, :, 0]
        for i in range(len(vae.decoder.up_blocks)):
            x = count(f"up block {i}", lambda: vae.decode_level(i, x))
    grand = sum(kinds.values())
    by_kind: dict[str, float] = {}
    for (_, kind), v in kinds.items():
        by_kind[kind] = by_kind.get(kind, 0.0) + v
    rows = [dict(kind=k, stage="all", tflop=v / 1e12, share=100 * v / grand)
            for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])]
    rows += [dict(kind=k, stage=st, tflop=v / 1e12, share=100 * v / grand)
             for (st, k), v in sorted(kinds.items(), key=lambda kv: -kv[1])]
    return rows, grand


def subpixel_saving(rows: list[dict]) -> float:
    """Share of the total a sub-pixel rewrite would save: nearest-2x + 3x3 conv at 2H x 2W costs 9 taps
    per output pixel; as four 2x2 convs on the H x W input (one per output phase) 4 taps: 5/9 saved."""
    return sum(r["share"] for r in rows if r["stage"] == "all" and r["kind"].startswith("upsampler")) * 5 / 9


# --------------------------------------------------------------------------------------------------


COLUMNS = [("case", "case", ""), ("mode", "mode", ""), ("predicted_gib", "predicted GiB", ".2f"),
           ("measured_gib", "measured (main)", ".2f"), ("measured_old_path_gib", "old path", ".2f"), ("largest_conv_input_gib", "largest 3x3 input", ".2f"),
           ("with_workspace_gib", "+ fitted workspace", ".2f"), ("beyond_out_gib", "beyond output", ".2f"),
           ("target_gib", "target", ".1f"), ("peak_op", "at op", "")]
FLOP_COLUMNS = [("kind", "layer kind", ""), ("stage", "stage", ""), ("tflop", "TFLOP", ".2f"), ("share", "% of total", ".1f")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("vae21", "image", "diffusers21", "video"), default=None)
    p.add_argument("--sizes", default="1024,1328,2048", help="2.1 decode sizes (px, square)")
    p.add_argument("--top", type=int, default=0, help="print the N largest tensors live at each peak")
    p.add_argument("--flops", action="store_true", help="FLOPs per layer kind of the 2.1 decode at 1328² and exit")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.flops:
        rows, total = flop_rows(1328)
        print(format_table(rows, FLOP_COLUMNS))
        print(f"total {total / 1e12:.2f} TFLOP; a sub-pixel upsampler conv would save {subpixel_saving(rows):.1f}% of it")
        if args.json:
            write_json(args.json, {"provenance": provenance(torch.device("cpu"), device_model="meta (CUDA paths)"),
                                   "flops": rows, "total_flop": total})
        return rows
    rows = scenario_rows(args.only, args.top, tuple(int(s) for s in args.sizes.split(",") if s))
    if args.json:
        write_json(args.json, {"provenance": provenance(torch.device("cpu"), device_model="meta (CUDA paths)"),
                               "results": rows})
    print()
    print(format_table(rows, COLUMNS))
    return rows


if __name__ == "__main__":
    main()
