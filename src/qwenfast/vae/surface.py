"""The decode surface: what every VAE of the family offers to tiling and to the parallel strategies.

A VAE of the family (the Qwen-Image VAE = the Wan 2.1 VAE; the Qwen-Image-2.1 VAE) is a plain
single-device `nn.Module` that subclasses `DecodeSurface` and implements its abstract methods.
Single-device tiling (`qwenfast.vae.tiling`) and every parallel strategy (`qwenfast.parallel`) are
written once over this surface: they never touch a model's private methods or submodule names.

The decoder is seen as two parts. The **global part** (post_quant_conv, conv_in, the mid block with
the only non-local operator, the attention over all latent pixels of a frame) runs at latent
resolution on the whole latent; the **local part** (up blocks, head) has a finite receptive field
and can run on windows. The global part is exposed in three stages so that a strategy can split
the attention's queries over ranks:

    decode_untiled(z) == decode_local(decode_global(z))
    decode_global(z)  == decode_tail(attend(decode_head(z)))        (up to re-association)
    decode_local(h)   == stream(lambda x, cache: level_n(...level_0(x, cache)...), h)
                      == stream(lambda x, cache: decode_levels(x, plan, cache), h)   (any plan: exact)

`DecoderTopology` describes the local part once; the receptive field (the exact tile margin), the
per-level halos of `patch_halo="level"`, the tail's reach and the cost model's levels are all read
from it. Tensors are `(B, C, T, H, W)` (an image is T = 1); results are unclamped.

A model whose `band_local_part` is on runs the local part of a large frame in stages and row bands
(`decode_levels`, planned by `qwenfast.vae.bands.local_plan`): exact as exact tiling is, in a
fraction of the memory.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn

from ..config import VAEConfig

__all__ = ["Level", "DecoderTopology", "DecodeSurface", "cat_keeping_layout", "constant_tensor", "memory_format_of",
           "progress"]


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The layout to allocate a tensor like `x` (other spatial size) in: channels-last (3-D for a 5-D
    `x`) where x's channels are innermost — a channels-last tensor or a crop of one — and x is not
    also plainly contiguous; else contiguous."""
    if x.dim() in (4, 5) and x.shape[1] > 1 and x.stride(1) == 1 and not x.is_contiguous():
        return torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


def constant_tensor(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` (nested sequences of numbers) as a tensor for a model's cache of device constants: made
    outside inference mode, so that a decode with autograd on may save it for backward after a decode
    in inference mode made it. Cache the result: a host-to-device copy cannot run inside a CUDA-graph
    capture (the graphs' eager warm-up makes it first)."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype, device=device)


def cat_keeping_layout(parts: list[torch.Tensor], dim: int, like: torch.Tensor) -> torch.Tensor:
    """torch.cat(parts, dim) in `like`'s layout (`memory_format_of`), with cat's type promotion. torch.cat
    itself returns a contiguous tensor as soon as one part is plainly contiguous (e.g. [received rows, a
    channels-last band]), and every conv after it would then run in cuDNN's NCHW path or transpose
    first; and `torch.cat(..., out=)` into a channels-last result runs a strided gather kernel that took
    17 ms for a 4096² Qwen-Image band on an H200 (a third of the rank's level path,
    benchmarks/results/level_halo_cat_h200.md). So: one copy per part into its slice of the result
    (a plain copy where the part already has the layout). With autograd recording, plain torch.cat."""
    if len(parts) == 1:
        return parts[0]
    if torch.is_grad_enabled() and any(p.requires_grad for p in parts):
        return torch.cat(parts, dim)
    n = parts[0].dim()
    if not -n <= dim < n:
        return torch.cat(parts, dim)  # a dim out of range (or 0-d parts): torch.cat's own error
    d = dim % n
    other_dims = parts[0].shape[:d] + parts[0].shape[d + 1:]
    if any(p.dim() != n or p.shape[:d] + p.shape[d + 1:] != other_dims for p in parts):
        return torch.cat(parts, dim)  # mismatched parts: torch.cat's own error
    if any(p.device != like.device for p in parts):
        raise ValueError(f"cat_keeping_layout: parts on {sorted({str(p.device) for p in parts})}, like on {like.device}")
    shape = list(parts[0].shape)
    shape[d] = sum(p.shape[d] for p in parts)
    dtype = functools.reduce(torch.promote_types, (p.dtype for p in parts))
    out = torch.empty(shape, dtype=dtype, device=like.device, memory_format=memory_format_of(like))
    start = 0
    for part in parts:
        out.narrow(d, start, part.shape[d]).copy_(part)
        start += part.shape[d]
    return out


# --------------------------------------------------------------------------------------------------
# Topology of the local part
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    """One up block of the local part, at its input resolution.

    A 3x3 conv reaches one pixel each side; a 2x upsample (nearest, or channel-to-space) maps output
    pixel j to input pixel j // 2.
    """

    scale: int  # resolution at the level's input, in multiples of the latent (1, 2, 4, ...)
    channels: int  # channel width inside the level
    convs: int  # 3x3 convs at the input resolution (ResBlocks: 2 each)
    upsample: bool  # ends with a 2x spatial upsample
    convs_after_up: int  # 3x3 convs after that upsample, at 2x (the Resample's conv: 1)
    head_convs: int = 0  # the last level also carries the head (conv_out: 1)
    # (c_in, c_out) of every 3x3 conv in order: `convs` at the input resolution, then
    # `convs_after_up`, then `head_convs` (for the cost model; empty: `channels` -> `channels` each)
    conv_channels: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        n = self.convs + self.convs_after_up + self.head_convs
        if self.conv_channels and len(self.conv_channels) != n:
            raise ValueError(f"Level: conv_channels names {len(self.conv_channels)} convs; the level has {n}")
        if self.convs_after_up and not self.upsample:
            raise ValueError("Level: convs_after_up without an upsample")

    def conv_pairs(self) -> list[tuple[int, int]]:
        """(c_in, c_out) of every 3x3 conv of the level in order: `conv_channels`, or `channels` ->
        `channels` each where it is not given."""
        n = self.convs + self.convs_after_up + self.head_convs
        return list(self.conv_channels) or [(self.channels, self.channels)] * n


@dataclass(frozen=True)
class DecoderTopology:
    """The local part of a decoder (after the attention), from which every reach is derived."""

    tail_convs: int  # 3x3 convs of the mid block's last ResBlock (between the attention and the local part)
    levels: tuple[Level, ...]

    @property
    def scale(self) -> int:
        """Output pixels per latent pixel along one side (the spatial compression)."""
        return 2 ** sum(lv.upsample for lv in self.levels)

    def _layers(self) -> list[str]:
        """The local part in forward order: "conv" (3x3, stride 1) or "up" (2x)."""
        layers: list[str] = []
        for lv in self.levels:
            layers += ["conv"] * lv.convs
            if lv.upsample:
                layers += ["up"] + ["conv"] * lv.convs_after_up
            layers += ["conv"] * lv.head_convs
        return layers

    def receptive_field(self) -> int:
        """How far (latent pixels of the mid-block output) any output pixel of the local part looks, on
        either side: the exact margin a tile needs (13 for Qwen-Image).

        Walks the layers backwards from each of the `scale` output pixels over one latent pixel,
        growing an interval by 1 per 3x3 conv and mapping it through each 2x upsample (j -> j // 2).
        """
        layers = self._layers()
        reach = 0
        for o in range(self.scale):
            lo, hi = o, o
            for layer in reversed(layers):
                lo, hi = (lo - 1, hi + 1) if layer == "conv" else (lo // 2, hi // 2)
            reach = max(reach, -lo, hi)
        return reach

    def tail_reach(self) -> int:
        """Latent pixels the mid block's last ResBlock looks each side: one per 3x3 conv."""
        return self.tail_convs

    def level_halos(self) -> list[tuple[int, int]]:
        """Per level: (scale at its input, halo rows at that scale) for `patch_halo="level"`. A 3x3 conv
        reaches one row; one after the level's 2x upsample half a row of its input, rounded up; the
        head's convs count at the last level."""
        return [(lv.scale, lv.convs + math.ceil(lv.convs_after_up / 2) + lv.head_convs) for lv in self.levels]

    def cost_levels(self) -> list[dict]:
        """For the cost model (`parallel.plan.patch_halo_costs`): one entry per resolution, `scale` and
        its 3x3 convs `(c_in, c_out)` in order (a level's convs after its upsample count at 2x)."""
        out: list[dict] = []

        def add(scale: int, convs: list[tuple[int, int]]) -> None:
            if out and out[-1]["scale"] == scale:
                out[-1]["convs"] += convs
            else:
                out.append(dict(scale=scale, convs=list(convs)))

        for lv in self.levels:
            ch = lv.conv_pairs()
            a, b = lv.convs, lv.convs + lv.convs_after_up
            add(lv.scale, ch[:a])
            if lv.upsample:
                add(2 * lv.scale, ch[a:b])
            if lv.head_convs:
                add(2 * lv.scale if lv.upsample else lv.scale, ch[b:])
        return out


# --------------------------------------------------------------------------------------------------
# The surface
# --------------------------------------------------------------------------------------------------


def progress(vae_config: VAEConfig, items: Iterable, desc: str, total: int, min_items: int = 2) -> Iterable:
    """A tqdm bar over `items` when `vae_config.progress` is on and there is more than a moment's work."""
    if not getattr(vae_config, "progress", False) or total < min_items:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, leave=False)


class DecodeSurface(nn.Module, metaclass=abc.ABCMeta):
    """The small public surface of a VAE of the family; see the module docstring.

    A subclass sets, in `__init__`: `vae_config` (a `VAEConfig`), `spatial_compression_ratio`,
    `z_dim`, `topology` (a `DecoderTopology`, built once from its own module tree), and provides
    `out_channels`, `dtype`, `device` and the abstract methods below. `decode` (the public entry:
    untiled, tiled or parallel by `vae_config`), `decode_local` (the levels over `stream`, banded where
    `band_local_part` is on: `decode_levels`), `tiled_decode` and `tiled_encode` come with the base.
    """

    vae_config: VAEConfig
    spatial_compression_ratio: int  # output px per latent px (8 or 16)
    z_dim: int  # latent channels
    topology: DecoderTopology
    process_group = None  # the process group parallel decode runs over (None: the world group)
    last_parallel_stats: dict | None = None  # mode, bytes and collectives of the last parallel decode
    # Whether `decode_levels` bands a cache-free 4-D frame by `bands.local_plan` (else runs it whole).
    # Off by default: a model turns it on where its local part has been measured banded.
    band_local_part: bool = False
    # From how many ranks `patch_halo="auto"` exchanges halos per level on images too (video always
    # does); None: never. A measured trait of the model, not of its shapes (parallel.plan.choose_patch_halo).
    patch_level_image_world: int | None = None

    # -- what a model provides --------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def out_channels(self) -> int:
        """Decoded channels (3 RGB, 4 RGBA)."""

    @property
    @abc.abstractmethod
    def dtype(self) -> torch.dtype: ...

    @property
    @abc.abstractmethod
    def device(self) -> torch.device: ...

    @abc.abstractmethod
    def check_latent(self, z: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Validate `z`; (z as (B, z_dim, T, h, w) on the model's device and dtype, whether it was 4-D).
        One clear error naming the shape or dtype that broke the rule."""

    @abc.abstractmethod
    def num_output_frames(self, t: int) -> int:
        """Frames decoded from `t` latent frames."""

    @abc.abstractmethod
    def decode_untiled(self, z: torch.Tensor) -> torch.Tensor:
        """(B, z_dim, T, h, w) -> (B, out_channels, T', s·h, s·w): the whole decoder, unclamped."""

    @abc.abstractmethod
    def encode_untiled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> moments (mean, logvar stacked on dim 1): the whole encoder + quant_conv."""

    @abc.abstractmethod
    def decode_head(self, z: torch.Tensor) -> torch.Tensor:
        """(B, z_dim, T, h, w) -> the attention's input (B, C_mid, T, h, w): post_quant_conv, conv_in,
        the mid block's first ResBlock."""

    @abc.abstractmethod
    def attend(self, a: torch.Tensor, queries: tuple[int, int] | None = None) -> torch.Tensor:
        """The mid-block attention block (norm, qkv, attention, proj, + its input), frame by frame, on
        `a` (B, C_mid, T, h, w). `queries=None`: all tokens, (B, C_mid, T, h, w). `queries=(n0, n1)`:
        only tokens n0..n1-1 of each frame (row-major pixel order) attend, against the keys and values
        of all tokens: their rows (B, T, n1 - n0, C_mid)."""

    @abc.abstractmethod
    def decode_tail(self, o: torch.Tensor) -> torch.Tensor:
        """The attention's output (B, C_mid, T, h, w) -> the mid-block output: its last ResBlock
        (reach `topology.tail_convs` px), frames streamed with one fresh frame cache."""

    @abc.abstractmethod
    def decode_global(self, z: torch.Tensor) -> torch.Tensor:
        """(B, z_dim, T, h, w) -> the mid-block output (B, C_mid, T, h, w) (= decode_tail(attend(decode_head(z))))."""

    @abc.abstractmethod
    def decode_level(self, i: int, x: torch.Tensor, cache) -> torch.Tensor:
        """Level i of the local part (`topology.levels[i]`; the last one includes the head) on ONE time
        chunk `x` (a 4-D first frame, or 5-D) with the frame cache of this pass (from `stream`)."""

    @abc.abstractmethod
    def stream(self, fn: Callable, x: torch.Tensor, desc: str) -> torch.Tensor:
        """`fn(chunk, cache)` over the decoder's time chunks of `x` (B, C, T, H, W): the first frame alone
        (4-D: the image fast path), then the model's chunking, with one fresh frame cache; the results
        concatenated in time. The only way a strategy touches frame caches."""

    @abc.abstractmethod
    def frame_layout(self, x: torch.Tensor) -> torch.Tensor:
        """The model's preferred layout for a 4-D frame (channels-last on CUDA); identity where none."""

    # -- what the base derives from it --------------------------------------------------------------
    def decode_local(self, h: torch.Tensor) -> torch.Tensor:
        """The mid-block output (B, C_mid, T, h, w) (or a window of it) -> pixels (B, out_channels, T', s·h, s·w),
        unclamped; receptive field `topology.receptive_field()` latent px each side. The levels over
        `stream`'s chunks (`decode_levels`); a model may override it with its own fused path."""
        return self.stream(lambda x, cache: self.decode_levels(x, cache=cache), h, desc="decode (local)")

    def decode_levels(self, x: torch.Tensor, plan=None, cache=None) -> torch.Tensor:
        """The local part on ONE time chunk `x` (B, C_mid, h, w) (a 4-D frame, or 5-D) with its frame
        cache, stage by stage (`plan`, a `bands.local_plan`; default: `local_plan`'s where
        `band_local_part` is on and `x` is a cache-free 4-D frame, else every level whole). A banded
        stage decodes each band's window and writes its core rows into the stage's output, allocated
        once, in the layout `decode_level` gives (channels-last on CUDA, the last level contiguous).
        Bands split rows only, so a chunk with a frame cache (which holds whole frames) runs whole."""
        from . import bands as planner

        if plan is None:
            banded = self.band_local_part and cache is None and x.dim() == 4
            plan = planner.local_plan(self.topology, tuple(x.shape), x.element_size()) if banded \
                else planner.whole_plan(self.topology)
        for first, end, bands in plan:
            if not bands:
                for i in range(first, end):
                    x = self.decode_level(i, x, cache)
                continue
            out = None
            for tile in bands:
                y = x[..., tile.wy0:tile.wy1, :]
                for i in range(first, end):
                    y = self.decode_level(i, y, cache)
                f = y.shape[-2] // (tile.wy1 - tile.wy0)  # output rows per input row of the stage
                if out is None:
                    out = torch.empty((*y.shape[:-2], x.shape[-2] * f, y.shape[-1]), dtype=y.dtype, device=y.device,
                                      memory_format=memory_format_of(y))
                (oy, _), (cy, _) = tile.core_slices(f), tile.crop_slices(f)  # bands span the width: rows only
                out[..., oy, :] = y[..., cy, :]
                del y
            x = out
        return x

    def level_plan(self, i: int, x: torch.Tensor, cache=None) -> tuple[tuple[int, int, tuple], ...]:
        """The plan for `decode_levels` that runs level i alone on its input `x` (a band of a parallel
        decode's `level` halos): in row bands with level i's own receptive field as margin where
        `decode_levels` would band (`band_local_part`, a cache-free 4-D frame; `bands.local_plan` of
        that one level), else whole. A 2.1 level share at 4096² on 2 ranks held 13.5 GiB running each
        level whole: the band plan of the single decode, one level at a time."""
        from . import bands as planner

        if not (self.band_local_part and cache is None and x.dim() == 4):
            return ((i, i + 1, ()),)
        one = dataclasses.replace(self.topology, tail_convs=0, levels=self.topology.levels[i:i + 1])
        ((_, _, bands),) = planner.local_plan(one, tuple(x.shape), x.element_size())
        return ((i, i + 1, bands),)

    def output_shape(self, z: torch.Tensor) -> tuple[int, ...]:
        """(B, out_channels, T', s·h, s·w): the decoded shape of latent `z` (B, z_dim, T, h, w)."""
        s = self.spatial_compression_ratio
        return (z.shape[0], self.out_channels, self.num_output_frames(z.shape[2]), z.shape[-2] * s, z.shape[-1] * s)

    @property
    def decode_margin(self) -> int:
        """The receptive field of the local part, in latent pixels: the margin exact tiles use by default."""
        return self.topology.receptive_field()

    def decode(self, z: torch.Tensor) -> torch.Tensor | None:
        """Latents `[B, z_dim, T, h, w]` (or `[B, z_dim, h, w]`) -> pixels in [-1, 1], 5-D (or 4-D).
        Untiled, tiled or parallel by `vae_config`; None on ranks that get no output
        (`parallel_output="rank0"`)."""
        if self.vae_config.use_parallel_decode:
            # Checked inside, on every rank together: a bad latent on one rank must fail every rank,
            # not leave the others waiting in a collective.
            image = isinstance(z, torch.Tensor) and z.dim() == 4
            out = self._decode_with_parallel_dispatch(z)
        else:
            z, image = self.check_latent(z)
            out = self.decode_on_one_device(z)
        if out is None:  # parallel decode with output on rank 0 only
            return None
        out = out.clamp_(-1.0, 1.0)
        return out[:, :, 0] if image else out

    def decode_on_one_device(self, z: torch.Tensor, cfg: VAEConfig | None = None) -> torch.Tensor:
        """What one device runs for a checked latent `z` (untiled or tiled by `cfg`, default
        `vae_config`), through `run_graphed`: unclamped. `decode` and the parallel strategies' "one
        rank decodes it all" paths."""
        from .tiling import single_device_decode

        cfg = cfg or self.vae_config
        return self.run_graphed(lambda x: single_device_decode(self, x, cfg), z, cfg=cfg)

    # CUDA graphs held per kind: whole single-device decodes, or the parallel strategies' segments (two
    # per decode: a rank's global part, its local part), each kind bounded (`DecodeGraphs.max_graphs`).
    _GRAPH_KINDS = {"decode": ("_decode_graphs", 2), "segment": ("_segment_graphs", 4)}

    def run_graphed(self, fn: Callable, x: torch.Tensor, context: tuple = (), cfg: VAEConfig | None = None,
                    kind: str = "decode"):
        """`fn(x)`, replayed from a CUDA graph when `cfg.cuda_graph` is on (default `vae_config`) and `x` is
        on CUDA, captured on the `cfg.cuda_graph_capture_call`-th call with the same signature (x's shape,
        dtype, device and strides, the config, `context`); eagerly otherwise. The single-device decode
        (`kind="decode"`) and each rank's compute between two collectives of a parallel decode
        (`kind="segment"`: `fn` must not call a collective) go through it. Same numbers either way."""
        cfg = cfg or self.vae_config
        if not cfg.cuda_graph:
            return fn(x)
        attr, max_graphs = self._GRAPH_KINDS[kind]
        graphs = self.__dict__.get(attr)  # a plain attribute: not a module, not in the state dict
        if graphs is None:
            if not x.is_cuda:
                return fn(x)  # nothing to capture on this device: nothing created, nothing held
            from .graphs import DecodeGraphs

            graphs = self.__dict__[attr] = DecodeGraphs(max_graphs=max_graphs)
        if not graphs.applies(x):
            return fn(x)
        # A graph reads the weights at the addresses it was captured with: weights moved since (`.to()`,
        # an offload hook) make another signature, never a replay over freed memory.
        weights = tuple(t.data_ptr() for t in itertools.chain(self.parameters(), self.buffers()))
        return graphs(fn, x, context=(kind, *dataclasses.astuple(cfg), weights, *context),
                      capture_call=cfg.cuda_graph_capture_call)

    def release_cuda_graphs(self) -> None:
        """Free the CUDA graphs `VAEConfig.cuda_graph` captured (and the memory they hold)."""
        for attr, _ in self._GRAPH_KINDS.values():
            graphs = self.__dict__.pop(attr, None)
            if graphs is not None:
                graphs.release()

    def tiled_decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bounded-memory decode of `z` (B, z_dim, T, h, w) in the configured flavour (unclamped)."""
        from .tiling import tiled_decode

        return tiled_decode(self, z)

    def tiled_encode(self, x: torch.Tensor) -> torch.Tensor:
        """diffusers' blended tiled encode of `x` (B, C, T, H, W) -> moments."""
        from .tiling import tiled_encode

        return tiled_encode(self, x)

    # -- parallel decode: reached from outside, through qwenfast.parallel ----------------------------
    def set_process_group(self, group) -> None:
        """The process group parallel decode runs over (None: the world group)."""
        self.process_group = group

    def _decode_with_parallel_dispatch(self, z: torch.Tensor) -> torch.Tensor | None:
        """Decode over the ranks of `process_group` by `vae_config.parallel_decode_mode`; with one rank
        (or no initialised group) the single-device decode, bit for bit. `z` is checked there, on
        every rank together. (The seed's entry point; the strategies live in qwenfast.parallel.)"""
        from ..parallel.dispatch import decode_parallel  # imports torch.distributed

        return decode_parallel(self, z)
