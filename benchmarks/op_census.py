"""What a decode or encode does, counted without a GPU: per aten op and call site, the bytes it writes
and how often it runs, the convolutions' FLOPs, and whether each conv reads a channels-last input.

The path runs on the `meta` device under `memory_model.cuda_like()` (meta tensors take the layout and
dispatch decisions of CUDA tensors; conv outputs get the layout cuDNN gives them), so the counts are the
GPU's, at full size, in seconds on a CPU. Bytes are what each op writes (a copy: its destination);
views are not counted. Norm and add kernels that write into a buffer given to them are not counted.

    python benchmarks/op_census.py decode --model qwenimage --size 1328
    python benchmarks/op_census.py decode --model qwenimage --video 81 720 1280
    python benchmarks/op_census.py encode --model qwenimage --video 81 480 832
    python benchmarks/op_census.py patch --model qwenimage --size 4096 --world 4 --rank 1 --halo level
    python benchmarks/op_census.py decode --model qwenimage21 --size 1328 --top 20

(docs/parallel.md quotes the `patch` counts; the closing notes of 2026-12-01 the video ones.)
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory_model  # noqa: E402
from bench_vae21 import DRY_ARCH  # noqa: E402
from bench_video import TINY  # noqa: E402

from qwenfast.config import VAEConfig  # noqa: E402

# ops that only re-view storage (or allocate without writing): not counted
_VIEWS = ("empty", "view", "_unsafe_view", "as_strided", "slice", "select", "transpose", "permute", "unsqueeze",
          "squeeze", "expand", "alias", "detach", "narrow", "split", "t", "unflatten", "lift_fresh")


def _site(package: str = "qwenfast") -> str:
    """The innermost frame of `package` on the stack: file:line function."""
    for f in reversed(traceback.extract_stack()):
        if package in f.filename and "op_census" not in f.filename:
            return f"{Path(f.filename).name}:{f.lineno} {f.name}"
    return "?"


class Census(TorchDispatchMode):
    """Counts, per (op, call site), bytes written and calls; conv FLOPs; conv inputs not channels-last."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()
        self.conv_flop = 0.0
        self.conv_flop_by: collections.Counter = collections.Counter()  # (C_in, C_out, kernel, out H x W) -> FLOP
        self.convs = 0
        self.convs_not_channels_last: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = memory_model.cuda_strides(func, args, kwargs, func(*args, **(kwargs or {})))
        name = func.overloadpacket.__name__
        if name == "convolution":
            x, w, transposed = args[0], args[1], args[6]
            # 2 FLOP per multiply-add: each output (a normal conv) or each input (a transposed one)
            # meets one filter of w[0].numel() taps
            flop = 2.0 * (x if transposed else out).numel() * w[0].numel()
            self.conv_flop += flop
            c_in, c_out = (w.shape[0], w.shape[1]) if transposed else (w.shape[1], w.shape[0])
            kernel = "x".join(map(str, w.shape[2:])) + (" transposed" if transposed else "")
            self.conv_flop_by[(c_in, c_out, kernel, f"{out.shape[-2]}x{out.shape[-1]}")] += flop
            self.convs += 1
            if not (x.shape[1] == 1 or x.stride(1) == 1):
                self.convs_not_channels_last.append(tuple(x.shape))
            return out
        if name.startswith(_VIEWS):
            return out
        outs = out if isinstance(out, (tuple, list)) else [out]
        written = (args[0].numel() * args[0].element_size() if name == "copy_" else
                   sum(o.numel() * o.element_size() for o in outs if isinstance(o, torch.Tensor)))
        key = (name, _site())
        self.bytes[key] += written
        self.calls[key] += 1
        return out

    def table(self, top: int) -> str:
        total = sum(self.bytes.values())
        lines = [f"convs: {self.convs}, {self.conv_flop / 1e12:.2f} TFLOP, "
                 f"{len(self.convs_not_channels_last)} reading a non-channels-last input; "
                 f"other ops write {total / 2**30:.2f} GiB",
                 f"{'op':28s} {'call site':56s} {'GiB written':>11s} {'calls':>6s}"]
        for (name, site), b in self.bytes.most_common(top):
            lines.append(f"{name:28s} {site:56s} {b / 2**30:11.3f} {self.calls[(name, site)]:6d}")
        return "\n".join(lines)

    def conv_table(self) -> str:
        """Conv FLOPs per (input channels, output channels, kernel, output size), largest first."""
        lines = [f"{'C in':>5s} {'C out':>5s} {'kernel':>16s} {'out H x W':>11s} {'TFLOP':>8s} {'share':>6s}"]
        for (c_in, c_out, kernel, size), flop in self.conv_flop_by.most_common():
            lines.append(f"{c_in:5d} {c_out:5d} {kernel:>16s} {size:>11s} {flop / 1e12:8.2f} "
                         f"{flop / self.conv_flop:6.1%}")
        return "\n".join(lines)


TINY_ARCHS = {"qwenimage": TINY, "qwenimage21": DRY_ARCH}  # --tiny: the other scripts' checking configs


def build(model: str, tiny: bool):
    arch = TINY_ARCHS[model] if tiny else None
    if model == "qwenimage21":
        return memory_model.meta_vae21(torch.bfloat16, arch)
    return memory_model.meta_qwen_vae(torch.bfloat16, arch)


def run(args, vae, frames: int, h: int, w: int) -> Census:
    """`args.op` of `vae` on a (frames, h, w) video or image (frames = 1) of bf16 pixels, counted."""
    s = vae.spatial_compression_ratio
    if args.op == "encode":
        channels = vae.in_channels_pixels if args.model == "qwenimage21" else 3
        x = torch.empty(1, channels, frames, h, w, device="meta", dtype=torch.bfloat16)
    else:
        x = torch.empty(1, vae.z_dim, (frames - 1) // 4 + 1, h // s, w // s, device="meta", dtype=torch.bfloat16)
    census = Census()
    with torch.no_grad(), memory_model.cuda_like(), census:
        if args.op == "decode":
            vae.vae_config = VAEConfig(use_tiling=args.exact_tile is not None,
                                       exact_tile_sample_size=args.exact_tile or 1024)
            vae.decode(x)
        elif args.op == "encode":
            vae.vae_config = VAEConfig()
            vae.encode(x)
        else:  # one rank's share of `patch`, through a comm that keeps shapes and moves no data
            from qwenfast.parallel.patch import parallel_patch_decode
            from qwenfast.parallel.rehearsal import RehearsalComm

            cfg = VAEConfig(use_parallel_decode=True, parallel_decode_mode="patch", patch_halo=args.halo)
            parallel_patch_decode(vae, x, RehearsalComm(args.rank, args.world, "meta"), cfg)
    return census


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("op", choices=("decode", "encode", "patch"), help="what runs (patch: one rank's share)")
    p.add_argument("--model", choices=("qwenimage", "qwenimage21"), default="qwenimage")
    p.add_argument("--size", type=int, default=1328, help="square image side, px")
    p.add_argument("--video", type=int, nargs=3, metavar=("FRAMES", "H", "W"), help="a video instead (px)")
    p.add_argument("--exact-tile", type=int, default=None, help="decode with exact tiles of this side (px)")
    p.add_argument("--world", type=int, default=2, help="patch: ranks")
    p.add_argument("--rank", type=int, default=0, help="patch: the rank whose share is counted")
    p.add_argument("--halo", choices=("auto", "mid", "level"), default="auto", help="patch: VAEConfig.patch_halo")
    p.add_argument("--top", type=int, default=12, help="rows of the table")
    p.add_argument("--convs", action="store_true", help="also the conv FLOPs per channels, kernel and size")
    p.add_argument("--tiny", action="store_true", help="a tiny config (checks the script)")
    args = p.parse_args(argv)
    if not 0 <= args.rank < args.world:
        p.error(f"--rank must be in [0, {args.world}); got {args.rank}")
    frames, h, w = args.video or (1, args.size, args.size)
    vae = build(args.model, args.tiny)
    scale = vae.spatial_compression_ratio
    if frames < 1 or (frames - 1) % 4 or h < scale or w < scale or h % scale or w % scale:
        p.error(f"frames must be 1 + 4k and sides positive multiples of {scale} for {args.model}; "
                f"got {frames} frames of {h}x{w}")
    census = run(args, vae, frames, h, w)
    print(census.table(args.top))
    if args.convs:
        print(census.conv_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
