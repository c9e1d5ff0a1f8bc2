"""The Qwen-Image VAE (the Wan-2.1 VAE family), top-down: parts first, the model last.

Parameter names and shapes are those of diffusers' `AutoencoderKLQwenImage`, so state dicts load with
`strict=True` in both directions. The computation differs where it can without changing the numbers:

- **Image fast path.** A frame whose past is all zero padding (the first frame; every frame of an
  image) runs through 4-D `[B, C, H, W]` tensors: each causal 3x3x3 conv is the 3x3 conv2d with its
  weight's last temporal slice (18 of 27 taps multiply zeros), and no frame cache is kept.
- **Video.** Frames stream through the decoder (the first frame alone, then `decode_chunk_frames`
  latent frames at a time; encoder: 1, then `encode_chunk_frames`) with an explicit `FrameCache`
  holding, per causal conv, the last two input frames the next chunk needs. Each causal conv reads
  one window [past, new frames] that the preceding RMS norm writes into (qwenfast.vae.video): no
  pad or cat of whole chunks; channels-last 3-D on CUDA; each chunk's output written straight into
  the preallocated result.
- **Split decoder.** `Decoder3d.forward_global` (conv_in + mid block, which holds the only non-local
  operator, the attention) and `Decoder3d.forward_local` (up blocks + head, level by level, a fixed
  receptive field read from `Decoder3d.topology()`) are separate; `QwenImageVAE` exposes them as the
  decode surface (`qwenfast.vae.surface`) over which tiling and the parallel strategies are written.

Shapes: B batch, C channels, T frames, H x W pixels at the current resolution.
"""

from __future__ import annotations

import contextlib
import functools
from fractions import Fraction
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import VAEConfig
from ..ops.attention import single_head_attention
from ..ops.elementwise import bias_residual_add, upsample_nearest2x
from ..ops.rms_norm import rms_norm
from . import video
from .surface import DecodeSurface, DecoderTopology, Level, constant_tensor, memory_format_of, progress
from .weights import WEIGHT_DTYPES, PretrainedVAE, WeightsError, arch_int, arch_list, arch_number
from .video import CACHE_T, FrameCache

__all__ = ["FrameCache", "QwenImageVAE", "DEFAULT_ARCH", "validate_arch"]

# Default architecture of the released Qwen-Image VAE (diffusers' defaults).
DEFAULT_ARCH: dict[str, Any] = dict(
    base_dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
    input_channels=3,
    latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                  0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160],
)

# diffusers' AutoencoderKLWan takes these keys too. With these values (its Wan 2.1 defaults, or what
# the architecture above implies) it is this model, key for key; anything else is another design.
WAN21_KEYS: dict[str, str] = dict(
    decoder_base_dim="None or base_dim", is_residual="False", in_channels="input_channels",
    out_channels="input_channels", patch_size="None or 1", scale_factor_temporal="None or 2**sum(temperal_downsample)",
    scale_factor_spatial="None or 2**len(temperal_downsample)",
)
# Inputs decode/encode take: fp8 (and integers) cannot be computed with; they are refused, not cast.
COMPUTE_DTYPES = tuple(WEIGHT_DTYPES.values())
MAX_CHANNELS = 8192  # the widest layer, base_dim * max(dim_mult): the released model has 384


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def validate_arch(arch: dict[str, Any]) -> None:
    """Refuse, before anything is built, an architecture this model cannot be (types, ranges, sizes;
    keys of other designs such as the Wan 2.2 VAE); keys left out take DEFAULT_ARCH's values."""
    a = {**DEFAULT_ARCH, **arch}
    base_dim = arch_int(a, "base_dim", 1, 1024)
    z_dim = arch_int(a, "z_dim", 1, 1024)
    dim_mult = arch_list(a, "dim_mult", "int", 1, 8, lo=1, hi=64)
    arch_int(a, "num_res_blocks", 0, 32)  # 0: one ResBlock per up block (diffusers builds it)
    arch_list(a, "attn_scales", "number", 0, 8, lo=0, hi=1)
    n = len(dim_mult) - 1
    temperal = arch_list(a, "temperal_downsample", "bool", n, n)
    arch_number(a, "dropout", 0, 1, hi_open=True)
    channels = arch_int(a, "input_channels", 1, 64)
    for key in ("latents_mean", "latents_std"):
        arch_list(a, key, "number", z_dim, z_dim)
    if base_dim * max(dim_mult) > MAX_CHANNELS:
        raise WeightsError(f"base_dim * max(dim_mult) = {base_dim} * {max(dim_mult)} = {base_dim * max(dim_mult)} "
                           f"channels; at most {MAX_CHANNELS} are allowed")
    implied = dict(decoder_base_dim=(None, base_dim), is_residual=(False,), in_channels=(channels,),
                   out_channels=(channels,), patch_size=(None, 1),
                   scale_factor_temporal=(None, 2 ** sum(temperal)), scale_factor_spatial=(None, 2 ** len(temperal)))
    differ = [k for k, ok in implied.items() if k in a and (isinstance(a[k], bool) != isinstance(ok[-1], bool)
                                                            or a[k] not in ok)]
    if differ:
        got = ", ".join(f"{k}={a[k]!r}" for k in differ)
        want = ", ".join(f"{k}={WAN21_KEYS[k]}" for k in differ)
        if a.get("is_residual") is True or a.get("patch_size") not in (None, 1):
            raise WeightsError(f"a Wan 2.2 VAE ({got}, z_dim={z_dim}) is not supported by QwenImageVAE, "
                               f"which is the Wan 2.1 design ({want})")
        raise WeightsError(f"QwenImageVAE cannot build {got}: it needs {want}")


_FIRST_FRAME_PASSED = "first-frame-passed"  # Resample state: the first frame skipped the time conv


# --------------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------------


# The most elements one conv call reads or writes (`conv_in_row_pieces`). With a batch of one, torch
# hands cuDNN a larger tensor whole, and cuDNN falls back to direct int64 kernels: 23.6 s for the
# transposed upsampler writing (1, 288, 2160, 4096) in a 2.1 level band at 4096² on 2 ranks on an
# H200, where pieces within the limit take milliseconds (benchmarks/results/first_call_h200.md).
CONV_MAX_NUMEL = 2**31 - 1


def conv_in_row_pieces(conv: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, out_channels: int,
                       reach: int, scale: int = 1) -> torch.Tensor:
    """`conv(x)` for a conv whose output rows scale·r0 .. scale·r1 - 1 read input rows r0 - reach ..
    r1 - 1 + reach (zero padding at the true border): a 'same' conv with kernel 2·reach + 1 (scale 1),
    or the upsamplers' stride-2 4x4 transposed conv (reach 1, scale 2). (B, Ci, H, W) → (B, Co, s·H,
    s·W), run in row pieces whose input and output stay within CONV_MAX_NUMEL elements when the whole
    would not: each piece runs on its rows plus `reach` rows each side and keeps its core, so every
    output pixel gets the same sums — exact. One call where the whole fits (or a row alone does not)."""
    b, ci, h, w = x.shape
    per_row = b * w * max(ci, out_channels * scale * scale)  # elements per input row, in or out
    fits = CONV_MAX_NUMEL // per_row - 2 * reach  # core rows per piece
    if per_row * h <= CONV_MAX_NUMEL or fits < 1:
        return conv(x)
    out = torch.empty((b, out_channels, scale * h, scale * w), dtype=x.dtype, device=x.device,
                      memory_format=memory_format_of(x))
    for r0 in range(0, h, fits):
        r1 = min(h, r0 + fits)
        s0, s1 = max(0, r0 - reach), min(h, r1 + reach)
        out[:, :, scale * r0:scale * r1] = conv(x[:, :, s0:s1])[:, :, scale * (r0 - s0):scale * (r1 - s0)]
    return out


def conv2d_frame(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride=(1, 1),
                 padding=(0, 0), dilation=(1, 1), groups: int = 1) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, padding, dilation, groups) of a frame (B, Ci, H, W), as both
    decoders run their frame convs (the Qwen-Image VAE's on first frames and its direct upsamplers, the
    2.1 VAE's `Conv`s): a 'same' conv (odd square kernel, stride 1, padding k // 2, no dilation or
    groups) in row pieces where it would pass 2**31 elements (`conv_in_row_pieces`); any other conv in
    one call. (Measured and dropped, benchmarks/results/head_convs_h200.md: 1x1 convs as matmuls and
    narrow outputs padded with zero filters gained nothing in whole decodes.)"""
    co, _, kh, kw = weight.shape

    def conv(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    def pair(v) -> tuple:  # F.conv2d's int-or-pair arguments, as a pair
        return (v, v) if isinstance(v, int) else tuple(v)

    same = (x.dim() == 4 and not isinstance(padding, str) and pair(stride) == (1, 1) and pair(dilation) == (1, 1)
            and groups == 1 and kh == kw and kh % 2 == 1 and pair(padding) == (kh // 2, kw // 2))
    return conv_in_row_pieces(conv, x, co, reach=kh // 2) if same else conv(x)  # else one call: F.conv2d's rules


class CausalConv3d(nn.Conv3d):
    """3-D conv, causal in time: `2·pad_t` zero frames in front, none behind.

    `forward(x)` takes a 4-D first frame (its past is zero padding: the 2-D conv with the last
    temporal tap), or a 5-D chunk of frames with a `FrameCache` holding the previous chunk's last
    input frames (None at the first chunk). `norm` (an `RMSNorm`, run with SiLU, adding `norm_bias`
    first) is applied to x before the conv: with a cache its output goes straight into the conv's
    frame window (qwenfast.vae.video), a whole pass fewer than normalising, then copying.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        pt, ph, pw = self.padding
        self._pad = (pw, pw, ph, ph, 2 * pt, 0)  # F.pad order: W, H, then T (all in front)
        self.padding = (0, 0, 0)

    @property
    def is_causal_in_time(self) -> bool:
        return self._pad[4] > 0

    def takes_window(self, x: torch.Tensor, cache: FrameCache | None) -> bool:
        """Whether `forward(x, cache)` runs on a frame window (a chunk of a video, with its cache)."""
        return x.dim() == 5 and cache is not None and self.is_causal_in_time

    def window(self, x: torch.Tensor, cache: FrameCache, norm: "RMSNorm | None" = None,
               norm_bias: torch.Tensor | None = None) -> torch.Tensor:
        """The frame window (B, C, 2 + T, H, W) this conv reads for chunk `x` (see `takes_window`), `norm`
        (with SiLU, `norm_bias` added first) written straight into its new frames."""
        if self.stride[0] != 1 or self.kernel_size[0] != 1 + CACHE_T:
            raise ValueError(f"a cached causal conv needs {1 + CACHE_T} time taps at stride 1; "
                             f"got kernel {self.kernel_size}, stride {self.stride}")
        produce = None if norm is None else (lambda out: norm(x, silu=True, bias=norm_bias, out=out))
        return video.causal_window(self, x, cache, produce)

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None, with_bias: bool = True,
                norm: "RMSNorm | None" = None, norm_bias: torch.Tensor | None = None) -> torch.Tensor:
        """`with_bias=False` leaves the bias out for the next fused op to add (saving a pass on CUDA)."""
        bias = self.bias if with_bias else None
        if x.dim() == 4:  # (B, C, H, W), a first frame
            if norm is not None:
                x = norm(x, silu=True, bias=norm_bias)
            if cache is not None and self.is_causal_in_time:
                cache.set(self, video.first_frame_past(x))
            pw, _, ph = self._pad[:3]
            return conv2d_frame(x, self.weight[:, :, -1], bias, self.stride[1:], (ph, pw), self.dilation[1:],
                                self.groups)
        # (B, C, T, H, W)
        if self.takes_window(x, cache):
            return video.convolve_causal_window(self, self.window(x, cache, norm, norm_bias), cache, bias)
        if norm is not None:
            x = norm(x, silu=True, bias=norm_bias)
        if self.kernel_size == (1, 1, 1) and self.stride == (1, 1, 1):
            return video.pointwise_conv3d(self, x, bias)
        padded = F.pad(x, self._pad) if any(self._pad) else x  # (the encoder's strided time conv pads nothing)
        return F.conv3d(padded, self.weight, bias, self.stride, 0, self.dilation, self.groups)


class RMSNorm(nn.Module):
    """Per-pixel RMS norm over channels (dim 1): `x / max(‖x‖₂, 1e-12) · √C · γ`, statistics in fp32.

    `gamma` is `(C, 1, 1)` for images (`images=True`, the attention's norm) or `(C, 1, 1, 1)`: the
    shapes diffusers stores. It broadcasts over 4-D and 5-D inputs alike.
    """

    def __init__(self, dim: int, images: bool = True) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor, silu: bool = False, bias: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """`bias`: the preceding conv's bias, left out of it and added here (one pass fewer on CUDA);
        `out`: where to write the result (a conv's frame window)."""
        return rms_norm(x, self.gamma, silu=silu, bias=bias, out=out)  # one fused pass on CUDA


class Upsample2x(nn.Module):
    """Nearest-exact 2x spatial upsampling. (A pure selection: diffusers' fp32 round trip changes nothing.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_nearest2x(x)  # a Triton kernel on CUDA: PyTorch's is slow channels-last


# How `UpsampleConv2x` computes nearest-2x-upsample + 3x3 conv: "direct" (as diffusers: upsample, then
# the conv at 2x), "transposed" (one stride-2 4x4 transposed conv of the input) or "subpixel" (four
# 2x2 convs, one per output phase, interleaved). The last two do 16 multiply-adds per output pixel and
# channel pair instead of 36. Each VAE builds its upsamplers with the formulation measured fastest for
# it (benchmarks/results/upsample_conv_h200.md, one H200, bf16): "direct" here (the Qwen-Image VAE: the
# transposed conv is 3% slower at 1328², 3% faster at 2048²), "transposed" for the 2.1 VAE (1.5% / 8.5%
# faster decodes). UPSAMPLE_CONV, when set, overrides every upsampler (for benchmarks and tests).
UPSAMPLE_CONV: str | None = None
UPSAMPLE_CONVS = ("direct", "transposed", "subpixel")

# Along one axis, output pixel 2i+a of upsample-then-3-tap-conv reads input pixels i-1, i (a = 0) or
# i, i+1 (a = 1): the 3 taps fall on 2 input pixels, two of them on the same one. Row p of PHASE_TAPS[a]
# sums the taps that land on the p-th of those two pixels.
PHASE_TAPS = (((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1)))
# The same sums as the taps k = 0..3 of a stride-2, padding-1 transposed conv, y[2i - 1 + k] += x[i]·K[k]:
# k = 3, 1 make the even outputs (from x[i-1], x[i]), k = 2, 0 the odd ones (from x[i], x[i+1]).
TRANSPOSED_TAPS = (PHASE_TAPS[1][1], PHASE_TAPS[0][1], PHASE_TAPS[1][0], PHASE_TAPS[0][0])


# Output channels summed at a time: the fp32 temporaries of a 1152x1152 weight summed whole are ~0.25
# GiB, alive while the decode's largest activations are (the memory model saw +0.34 GiB at 1328²).
TAP_SUM_CHUNK = 128


@functools.lru_cache(maxsize=None)
def _tap_matrix(taps: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`taps` as a tensor on `device`, made once per (taps, dtype, device) (`constant_tensor`)."""
    return constant_tensor(taps, dtype, device)


def _sum_taps(weight: torch.Tensor, taps: tuple, equation: str) -> torch.Tensor:
    """einsum(equation, m, weight, m) with m = `taps`, in fp32 at least, rounded once to the weight's
    dtype; `o` (the weight's output channels) is summed TAP_SUM_CHUNK channels at a time."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    # traced by torch.compile: a constant of the graph (Dynamo would not look inside the cache)
    m = (torch.tensor(taps, dtype=acc, device=weight.device) if torch.compiler.is_compiling()
         else _tap_matrix(taps, acc, weight.device))
    o = equation.split("->")[1].index("o")  # where the output channels land in the result
    chunks = [torch.einsum(equation, m, weight[i:i + TAP_SUM_CHUNK].to(acc), m).to(weight.dtype)
              for i in range(0, weight.shape[0], TAP_SUM_CHUNK)]
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=o)


def phase_weights(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 conv weight (Co, Ci, 3, 3) as the weights of the four 2x2 convs, one per output phase
    (a, b) of upsample-then-conv: (2, 2, Co, Ci, 2, 2)."""
    return _sum_taps(weight, PHASE_TAPS, "ayk,oikl,bxl->aboiyx")


def transposed_weight(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 conv weight (Co, Ci, 3, 3) as the stride-2 4x4 transposed conv weight (Ci, Co, 4, 4) of
    upsample-then-conv."""
    return _sum_taps(weight, TRANSPOSED_TAPS, "yk,oikl,xl->ioyx")


@contextlib.contextmanager
def deterministic_cudnn(on: bool = True) -> Iterator[None]:
    """Within (where `on`): cuDNN restricted to deterministic algorithms. A transposed conv runs on
    cuDNN's data-gradient algorithms, some of which sum with atomics: on an H200 a tiny 2.1 decode with
    transposed upsamplers differed from itself run to run by up to 1.7e-5 (fp32), and so did its graph
    replay from the eager decode; with the flag, 0 (benchmarks/results/gpu_round_2026-12-01.md). A
    decode gives the same image every time. At the released sizes the algorithms cuDNN's benchmark
    picked were deterministic already (every graphed rank share equal to eager). Not while torch.compile
    traces: a compiled decode reads the global flag when it runs, so it is deterministic only where the
    caller sets `torch.backends.cudnn.deterministic` around it."""
    if not on or torch.compiler.is_compiling():
        yield
        return
    previous = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic = previous


class UpsampleConv2x(nn.Sequential):
    """diffusers' upsampler `resample`: nearest 2x upsampling, then a 3x3 conv with padding 1 (the
    parameters keep diffusers' names, `1.weight` and `1.bias`). (B, Ci, H, W) -> (B, Co, 2H, 2W).

    Every output pixel (2i+a, 2j+b) reads a 2x2 block of input pixels, so the same map is four 2x2
    convs of the un-upsampled input, one per phase (a, b), with the taps that fall on one input pixel
    summed (`phase_weights`) — or, equivalently, one stride-2 4x4 transposed conv whose kernel holds
    those four 2x2 kernels interleaved. Equal to the direct path up to rounding (the weight sums and the
    order of the adds), 2.25x fewer FLOPs. `form` is the formulation (`UPSAMPLE_CONV` overrides it)."""

    def __init__(self, in_channels: int, out_channels: int, form: str = "direct") -> None:
        if form not in UPSAMPLE_CONVS:
            raise ValueError(f"form must be one of {', '.join(UPSAMPLE_CONVS)}; got {form!r}")
        super().__init__(Upsample2x(), nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.form = form

    def forward(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """`with_bias=False` leaves the conv's bias out for the consumer to add (see `UpBlock`)."""
        mode = self.form if UPSAMPLE_CONV is None else UPSAMPLE_CONV
        conv = self[1]
        bias = conv.bias if with_bias else None
        if mode == "direct":
            return conv2d_frame(self[0](x), conv.weight, bias, padding=(1, 1))
        if mode not in UPSAMPLE_CONVS:
            raise ValueError(f"UPSAMPLE_CONV must be one of {', '.join(UPSAMPLE_CONVS)}; got {mode!r}")
        # The summed weights are recomputed per call from the live weight (an einsum beside the conv,
        # inside the measured times): a cached copy would go stale in a captured CUDA graph when the
        # weights are loaded in place.
        if mode == "transposed":
            w = transposed_weight(conv.weight)
            with deterministic_cudnn(x.is_cuda):
                return conv_in_row_pieces(lambda x: F.conv_transpose2d(x, w, bias, stride=2, padding=1), x,
                                          conv.out_channels, reach=1, scale=2)
        w = phase_weights(conv.weight)  # (a, b, Co, Ci, 2, 2)
        bsz, _, h, wd = x.shape
        out = torch.empty((bsz, conv.out_channels, 2 * h, 2 * wd), dtype=x.dtype, device=x.device,
                          memory_format=memory_format_of(x))
        xp = F.pad(x, (1, 1, 1, 1))  # (B, Ci, H+2, W+2): phase a reads padded rows a .. a+H
        for a in range(2):
            for b in range(2):
                out[:, :, a::2, b::2] = F.conv2d(xp[:, :, a:a + h + 1, b:b + wd + 1], w[a, b], bias)
        return out


def spatial_resample(resample: nn.Module, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
    """A Resample's spatial part on (B, C, H, W) frames (both VAEs): an `UpsampleConv2x`, whose bias
    `with_bias=False` leaves to the consumer, or a downsampling conv, which always adds its own."""
    if isinstance(resample, UpsampleConv2x):
        return resample(x, with_bias=with_bias)
    if not with_bias:
        raise ValueError("a downsampling Resample always adds its bias")
    return resample(x)


class Resample(nn.Module):
    """Spatial 2x up/down sampling (frame by frame), with a causal time conv in the `*3d` modes.

    `upsample3d`: the first frame of a video passes without the time conv; every later frame goes
    through a causal (3,1,1) conv to 2C channels, read as two frames (so T frames become 1 + 2(T-1)).
    `downsample3d`: the first frame passes; later chunks are strided by 2 in time, each strided window
    starting at the last frame of the previous chunk (which is why the encoder takes 1, then 4 frames).
    """

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.dim = dim
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = UpsampleConv2x(dim, dim // 2)
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        else:
            raise ValueError(f"Resample mode must be up/downsample2d/3d; got {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None, with_bias: bool = True) -> torch.Tensor:
        """`with_bias=False` (the up modes): the spatial conv's bias is left for the consumer to add."""
        if x.dim() == 4:  # a first frame: no time conv in either direction
            if cache is not None and self.mode == "upsample3d":
                cache.set(self, _FIRST_FRAME_PASSED)
            x = spatial_resample(self.resample, x, with_bias)
            if cache is not None and self.mode == "downsample3d":
                cache.set(self, x.unsqueeze(2).clone())
            return x

        if self.mode == "upsample3d" and cache is not None:
            x = self._time_upsample(x, cache)
        # (B·T, C', H', W'): a view when channels-last
        y = spatial_resample(self.resample, video.frames_as_images(x), with_bias)
        y = video.images_as_frames(y, x.shape[0])  # (B, C', T, H', W')
        if self.mode == "downsample3d" and cache is not None:
            y = self._time_downsample(y, cache)
        return y

    def _time_upsample(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        if cache.get(self) is None:  # the first frame of the video, as a 5-D chunk of one frame
            if x.shape[2] != 1:
                raise ValueError("the first chunk of a video must be a single frame")
            cache.set(self, _FIRST_FRAME_PASSED)
            return x
        # The time conv sees only frames after the first, zero-padded in front: its own cache slot
        # (the time_conv module) starts empty when the first frame passed.
        b, c, t, h, w = x.shape
        y = self.time_conv(x, cache)  # (B, 2C, T, H, W): channel k·C + c is frame 2t + k's channel c
        out = torch.empty((b, c, 2 * t, h, w), dtype=y.dtype, device=y.device,
                          memory_format=video.video_layout(y.device))
        out.unflatten(2, (t, 2)).copy_(y.unflatten(1, (2, c)).permute(0, 2, 3, 1, 4, 5))  # one pass, layout kept
        return out

    def _time_downsample(self, y: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        last = cache.get(self)
        cache.set(self, y[:, :, -1:].clone())
        if last is None:  # the first chunk passes unchanged
            return y
        return self.time_conv(torch.cat([last[:, :, -1:], y], dim=2))


def residual_bias(conv2_bias: torch.Tensor, shortcut: nn.Module | None,
                  x_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The per-channel bias of a ResBlock's final add when its convs run without theirs: conv2's, plus
    the 1x1 `shortcut` conv's bias (None: the identity), plus the image through the shortcut of a bias
    `x_bias` the block's input lacks (W·x_bias, or x_bias itself). Summed in fp32 (float64 for float64)."""
    if shortcut is None and x_bias is None:
        return conv2_bias  # nothing to sum: no small kernels launched
    acc = torch.float64 if conv2_bias.dtype == torch.float64 else torch.float32
    b = conv2_bias.to(acc)
    if shortcut is not None:
        b = b + shortcut.bias.to(acc)
        if x_bias is not None:
            b = b + shortcut.weight.flatten(1).to(acc) @ x_bias.to(acc)  # (O, I·1·1) @ (I,)
    elif x_bias is not None:
        b = b + x_bias.to(acc)
    return b.to(conv2_bias.dtype)


class ResidualBlock(nn.Module):
    """RMSNorm → SiLU → causal conv → RMSNorm → SiLU → (dropout) → causal conv, plus a (1x1x1) shortcut."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.norm1 = RMSNorm(in_dim, images=False)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim, images=False)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None,
                x_bias: torch.Tensor | None = None) -> torch.Tensor:
        """`x_bias` (C_in,): a per-channel bias `x` still lacks (the upsampler conv before this block
        ran without it): added inside norm1 and, through the shortcut, in the final fused add."""
        # Every conv runs without its bias: conv1's is added inside norm2, conv2's and the shortcut's
        # (and x_bias) in the final fused add, so no pass of its own is spent on any (PyTorch adds a
        # conv's bias in a pass of its own). Each norm runs inside the conv that reads it, writing into
        # its frame window (video.py).
        shortcut = self.conv_shortcut if isinstance(self.conv_shortcut, CausalConv3d) else None  # None: identity
        h = x if shortcut is None else shortcut(x, with_bias=False)
        y = self.conv1(x, cache, with_bias=False, norm=self.norm1, norm_bias=x_bias)
        if self.dropout.training and self.dropout.p > 0:  # dropout sits between norm2 and conv2
            y = self.dropout(self.norm2(y, silu=True, bias=self.conv1.bias))
            y = self.conv2(y, cache, with_bias=False)
        elif self.conv2.takes_window(y, cache):
            # conv2's window filled (norm2 writing into it), then conv1's output dropped before the
            # conv runs: one chunk-sized tensor fewer at the video path's peak (the same ops in order).
            window = self.conv2.window(y, cache, norm=self.norm2, norm_bias=self.conv1.bias)
            del y
            y = video.convolve_causal_window(self.conv2, window, cache, None)
            del window
        else:
            y = self.conv2(y, cache, with_bias=False, norm=self.norm2, norm_bias=self.conv1.bias)
        return bias_residual_add(y, residual_bias(self.conv2.bias, shortcut, x_bias), h)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels of each frame (head dim = C), plus the input.

    The only operator of the model that is not local in space.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None,
                queries: tuple[int, int] | None = None) -> torch.Tensor:
        """`x` (B, C, H, W) or (B, C, T, H, W) → the same shape; with `queries=(n0, n1)`, only tokens
        n0..n1-1 (row-major pixels) of each frame attend, against all keys and values: their rows
        (B, n1 - n0, C), or (B, T, n1 - n0, C) for 5-D `x` (what one rank of a split attention computes)."""
        if x.dim() == 5:  # frame by frame: (B, C, T, H, W) → (B·T, C, H, W)
            y = self.forward(video.frames_as_images(x), queries=queries)
            return y.unflatten(0, (x.shape[0], -1)) if queries is not None else video.images_as_frames(y, x.shape[0])
        n, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, N, C); a view when channels_last
        weight, bias = self.to_qkv.weight.view(3 * c, c), self.to_qkv.bias
        if queries is None:
            q, k, v = F.linear(tokens, weight, bias).split(c, dim=-1)  # (B, N, 3C) → 3 x (B, N, C)
        else:
            n0, n1 = queries
            q = F.linear(tokens[:, n0:n1], weight[:c], None if bias is None else bias[:c])  # (B, n, C)
            k, v = F.linear(tokens, weight[c:], None if bias is None else bias[c:]).split(c, dim=-1)  # (B, N, C)
        o = single_head_attention(q, k, v)  # (B, n, C): flash attention for head dim 384 on CUDA
        o = F.linear(o, self.proj.weight.view(c, c), self.proj.bias)
        if queries is None:
            return o.transpose(1, 2).unflatten(2, (h, w)) + x
        return o + x.flatten(2).transpose(1, 2)[:, n0:n1]  # the block's residual, as token rows


class MidBlock(nn.Module):
    """ResidualBlock → AttentionBlock → ResidualBlock (at the lowest resolution)."""

    def __init__(self, dim: int, dropout: float = 0.0, num_layers: int = 1) -> None:
        super().__init__()
        self.dim = dim
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, dropout)])
        self.attentions = nn.ModuleList()
        for _ in range(num_layers):
            self.attentions.append(AttentionBlock(dim))
            self.resnets.append(ResidualBlock(dim, dim, dropout))

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        x = self.resnets[0](x, cache)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x), cache)
        return x


class Encoder3d(nn.Module):
    """Pixels → (mean, logvar) latents: conv_in, down blocks (ResBlocks, optional attention, Resample),
    mid block, RMSNorm, SiLU, conv_out."""

    def __init__(self, dim=96, z_dim=32, dim_mult=(1, 2, 4, 4), num_res_blocks=2, attn_scales=(),
                 temperal_downsample=(False, True, True), dropout=0.0, input_channels=3) -> None:
        super().__init__()
        dims = [dim * u for u in [1, *dim_mult]]
        scale = 1.0
        self.conv_in = CausalConv3d(input_channels, dims[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                self.down_blocks.append(ResidualBlock(in_dim, out_dim, dropout))
                if scale in attn_scales:
                    self.down_blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                mode = "downsample3d" if temperal_downsample[i] else "downsample2d"
                self.down_blocks.append(Resample(out_dim, mode=mode))
                scale /= 2.0
        self.mid_block = MidBlock(out_dim, dropout, num_layers=1)
        self.norm_out = RMSNorm(out_dim, images=False)
        self.conv_out = CausalConv3d(out_dim, z_dim, 3, padding=1)

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        x = self.conv_in(x, cache)
        for layer in self.down_blocks:
            x = layer(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(x, cache, norm=self.norm_out)


def chain(steps, x: torch.Tensor) -> torch.Tensor:
    """x through `steps` (calls, each taking the previous output), holding only the current value."""
    for step in steps:
        x = step(x)
    return x


class UpBlock(nn.Module):
    """`num_res_blocks + 1` ResBlocks, then an optional 2x Resample."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float = 0.0,
                 upsample_mode: str | None = None) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        dims = [in_dim] + [out_dim] * num_res_blocks
        self.resnets = nn.ModuleList([ResidualBlock(d, out_dim, dropout) for d in dims])
        self.upsamplers = None
        if upsample_mode is not None:
            self.upsamplers = nn.ModuleList([Resample(out_dim, mode=upsample_mode)])

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None,
                x_bias: torch.Tensor | None = None) -> torch.Tensor:
        """The output of an up block with an upsampler lacks the upsampler conv's bias (`output_bias`):
        the next block's first ResBlock adds it in its fused passes (PyTorch would spend a pass of its
        own on the bias of a tensor this size). `x_bias`: what `x` lacks, from the block before."""
        return chain(self.steps(cache, x_bias), x)

    def steps(self, cache: FrameCache | None = None, x_bias: torch.Tensor | None = None) -> Iterator[Callable]:
        """The block as calls in order, each taking the previous one's output (`forward` chains them). A
        caller that chains them itself holds nothing but the current input: the block's input is freed
        once its first ResBlock returns, where `block(x)` keeps it (the caller's reference and
        nn.Module.__call__'s arguments) until the whole block returns — at the 81x720p decode's peak,
        the last block's input is a 675 MiB tensor."""
        yield lambda x: self.resnets[0](x, cache, x_bias=x_bias)
        for resnet in self.resnets[1:]:
            yield lambda x, resnet=resnet: resnet(x, cache)
        if self.upsamplers is not None:
            yield lambda x: self.upsamplers[0](x, cache, with_bias=False)

    @property
    def output_bias(self) -> torch.Tensor | None:
        """The per-channel bias `forward`'s output lacks (None: it lacks nothing)."""
        return None if self.upsamplers is None else self.upsamplers[0].resample[1].bias


class Decoder3d(nn.Module):
    """Latents → pixels, in two parts: global (conv_in, mid block with the attention) at latent
    resolution, then local (up blocks, RMSNorm, SiLU, conv_out), whose receptive field is finite."""

    def __init__(self, dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2, attn_scales=(),
                 temperal_upsample=(True, True, False), dropout=0.0, input_channels=3) -> None:
        super().__init__()
        dims = [dim * u for u in [dim_mult[-1], *dim_mult[::-1]]]
        self.conv_in = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], dropout, num_layers=1)
        self.up_blocks = nn.ModuleList()
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim = in_dim // 2  # the previous block's Resample halved the channels
            mode = None
            if i != len(dim_mult) - 1:
                mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
            self.up_blocks.append(UpBlock(in_dim, out_dim, num_res_blocks, dropout, mode))
        self.norm_out = RMSNorm(out_dim, images=False)
        self.conv_out = CausalConv3d(out_dim, input_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        return self.forward_local(self.forward_global(x, cache), cache)

    def forward_global(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        """(B, z, [T,] h, w) → mid-block output (B, C_mid, [T,] h, w)."""
        return self.mid_block(self.conv_in(x, cache), cache)

    def forward_local(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        """Mid-block output (B, C_mid, [T,] h, w) → pixels (B, 3, [T',] 8h, 8w), unclamped. The levels'
        steps chained here, so that each level's input is freed after its first ResBlock
        (`UpBlock.steps`): forward hooks on the up blocks do not fire (those on their ResBlocks do)."""
        return chain((step for i in range(len(self.up_blocks)) for step in self.level_steps(i, cache)), x)

    def forward_level(self, i: int, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        """Up block `i` of the local part; the last one also runs the head (RMSNorm, SiLU, conv_out).
        A level's output lacks its upsampler's bias, which the next level adds (`UpBlock`): every
        consumer of a level output is the next level, so the local part's output is unchanged."""
        return chain(self.level_steps(i, cache), x)

    def level_steps(self, i: int, cache: FrameCache | None = None) -> Iterator[Callable]:
        """`forward_level(i)` as calls in order (`UpBlock.steps`, then the head after the last block)."""
        yield from self.up_blocks[i].steps(cache, x_bias=self.up_blocks[i - 1].output_bias if i > 0 else None)
        if i == len(self.up_blocks) - 1:
            # the norm writes into conv_out's frame window
            yield lambda x: self.conv_out(x, cache, norm=self.norm_out, norm_bias=self.up_blocks[i].output_bias)

    def topology(self) -> DecoderTopology:
        """The local part (and the mid block's tail) read from the module tree: per up block its 3x3
        convs before and after its Resample (nearest 2x, then a 3x3 conv), the last one with conv_out.
        The one description every margin, halo and cost is derived from."""
        def convs3(*modules: nn.Module) -> list[tuple[int, int]]:  # (c_in, c_out) of each 3x3 conv, in order
            return [(m.in_channels, m.out_channels) for mod in modules for m in mod.modules()
                    if isinstance(m, (nn.Conv2d, nn.Conv3d)) and m.kernel_size[-1] == 3]

        levels, scale = [], 1
        for i, block in enumerate(self.up_blocks):
            before = convs3(block.resnets)
            after = convs3(block.upsamplers) if block.upsamplers is not None else []
            head = convs3(self.conv_out) if i == len(self.up_blocks) - 1 else []
            levels.append(Level(scale=scale, channels=block.out_dim, convs=len(before),
                                upsample=block.upsamplers is not None, convs_after_up=len(after),
                                head_convs=len(head), conv_channels=tuple(before + after + head)))
            scale *= 2 if block.upsamplers is not None else 1
        return DecoderTopology(tail_convs=len(convs3(self.mid_block.resnets[-1])), levels=tuple(levels))

    def receptive_field(self) -> int:
        """How far (latent pixels of the mid-block output) any output pixel of `forward_local` looks,
        on either side: the exact margin a tile needs (13 for Qwen-Image). Read from `topology()`."""
        return self.topology().receptive_field()


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class QwenImageVAE(DecodeSurface, PretrainedVAE):
    """The Qwen-Image VAE: weight-compatible with diffusers' `AutoencoderKLQwenImage`.

    `decode(z)` takes unscaled latents `[B, z_dim, T, h, w]` (or `[B, z_dim, h, w]` for images) and
    returns what diffusers' `vae.decode(z).sample` returns, clamped to [-1, 1]; `encode(x)` returns
    the posterior mean. How to decode (tiling, parallel decode) is set by `vae_config`. The decode
    surface (`qwenfast.vae.surface.DecodeSurface`) is implemented below the public API.
    """

    # patch_halo="auto" exchanges halos per level on images from 4 ranks on (video: always). Rehearsed on
    # one H200 (plan.choose_patch_halo): the slowest rank's ms with `level` against `mid` at N = 4 was
    # 11.6 / 15.4 at 1328², 18.1 / 20.8 at 2048², 119.2 / 124.0 at 4096²; at N = 2 a tie (within 4%) with
    # up to 17% more memory per rank.
    patch_level_image_world = 4

    def __init__(self, base_dim: int = 96, z_dim: int = 16, dim_mult=(1, 2, 4, 4), num_res_blocks: int = 2,
                 attn_scales=(), temperal_downsample=(False, True, True), dropout: float = 0.0,
                 input_channels: int = 3, latents_mean=None, latents_std=None,
                 vae_config: VAEConfig | None = None) -> None:
        super().__init__()
        latents_mean = list(DEFAULT_ARCH["latents_mean"] if latents_mean is None else latents_mean)
        latents_std = list(DEFAULT_ARCH["latents_std"] if latents_std is None else latents_std)
        self.validate_arch(dict(base_dim=base_dim, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=num_res_blocks,
                                attn_scales=attn_scales, temperal_downsample=temperal_downsample, dropout=dropout,
                                input_channels=input_channels, latents_mean=latents_mean, latents_std=latents_std))
        dim_mult, attn_scales = list(dim_mult), list(attn_scales)
        temperal_downsample = list(temperal_downsample)
        self.config = dict(base_dim=base_dim, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=num_res_blocks,
                           attn_scales=attn_scales, temperal_downsample=temperal_downsample, dropout=dropout,
                           input_channels=input_channels, latents_mean=latents_mean, latents_std=latents_std)
        self.z_dim = z_dim
        self.temperal_downsample = temperal_downsample
        self.temperal_upsample = temperal_downsample[::-1]
        self.spatial_compression_ratio = 2 ** len(temperal_downsample)
        self.temporal_compression_ratio = 2 ** sum(temperal_downsample)
        self.vae_config = vae_config or VAEConfig()

        self.encoder = Encoder3d(base_dim, z_dim * 2, dim_mult, num_res_blocks, attn_scales,
                                 temperal_downsample, dropout, input_channels)
        self.quant_conv = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.post_quant_conv = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(base_dim, z_dim, dim_mult, num_res_blocks, attn_scales,
                                 self.temperal_upsample, dropout, input_channels)
        self.topology = self.decoder.topology()  # read once from the module tree

    # -- loading (weights.py): what it reads of a diffusers config, and how it checks it -------------
    diffusers_class_names = ("AutoencoderKLQwenImage", "AutoencoderKLWan")
    arch_keys = tuple(DEFAULT_ARCH)
    checked_keys = tuple(WAN21_KEYS)

    @classmethod
    def validate_arch(cls, arch: dict[str, Any]) -> None:
        """Raise WeightsError naming the first key of `arch` (a diffusers config) this model cannot build."""
        validate_arch(arch)

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    @property
    def out_channels(self) -> int:
        return self.decoder.conv_out.out_channels

    # -- public API (decode: DecodeSurface.decode) -------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels `[B, 3, T, H, W]` (T = 1 + 4k) or `[B, 3, H, W]` in [-1, 1] → posterior mean
        `[B, z_dim, 1 + k, H/8, W/8]` (or 4-D), as diffusers' `encode(x).latent_dist.mode()`."""
        return self.encode_moments(x)[:, : self.z_dim]

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """As `encode`, but the whole posterior: moments `[B, 2·z_dim, 1 + k, H/8, W/8]` (or 4-D), the
        mean then the log-variance, unclamped — what diffusers wraps in `DiagonalGaussianDistribution`
        (`qwenfast.integrations.diffusers` does, for a routed `encode`)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"encode expects a torch.Tensor; got {type(x).__name__}")
        if x.dtype not in COMPUTE_DTYPES:
            raise TypeError(f"encode expects pixels as floats in [-1, 1] ({_names(COMPUTE_DTYPES)}); got {x.dtype}"
                            + (" (uint8 images: x.float() / 127.5 - 1)" if x.dtype == torch.uint8 else ""))
        if x.dim() not in (4, 5):
            raise ValueError(f"encode expects [B, C, H, W] or [B, C, T, H, W]; got shape {tuple(x.shape)}")
        image = x.dim() == 4
        x = x.unsqueeze(2) if image else x
        channels = self.config["input_channels"]
        if x.shape[1] != channels:
            raise ValueError(f"encode expects {channels} channels; got shape {tuple(x.shape)}")
        if (x.shape[2] - 1) % self.temporal_compression_ratio:
            raise ValueError(
                f"encode needs 1 + {self.temporal_compression_ratio}k frames; got T = {x.shape[2]}"
            )
        x = x.to(device=self.device, dtype=self.dtype)
        cfg = self.vae_config
        if cfg.use_tiling and (x.shape[-1] > cfg.tile_sample_min_width or x.shape[-2] > cfg.tile_sample_min_height):
            moments = self.tiled_encode(x)
        else:
            moments = self.encode_untiled(x)
        return moments[:, :, 0] if image else moments

    def num_output_frames(self, num_latent_frames: int) -> int:
        return 1 + self.temporal_compression_ratio * (num_latent_frames - 1)

    # -- the decode surface (qwenfast.vae.surface) -------------------------------------------------
    def check_latent(self, z: torch.Tensor) -> tuple[torch.Tensor, bool]:
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"decode expects a torch.Tensor; got {type(z).__name__}")
        if z.dim() not in (4, 5):
            raise ValueError(f"decode expects latents [B, {self.z_dim}, T, h, w] or [B, {self.z_dim}, h, w]; "
                             f"got shape {tuple(z.shape)}")
        if z.shape[1] != self.z_dim:
            raise ValueError(f"decode expects {self.z_dim} latent channels (dim 1); got shape {tuple(z.shape)}")
        if z.numel() == 0:
            raise ValueError(f"decode got an empty latent, shape {tuple(z.shape)}")
        if z.dtype not in COMPUTE_DTYPES:
            raise TypeError(f"decode expects latents of dtype {_names(COMPUTE_DTYPES)}; got {z.dtype}")
        image = z.dim() == 4
        z = z.unsqueeze(2) if image else z
        return z.to(device=self.device, dtype=self.dtype), image

    def stream(self, fn: Callable, x: torch.Tensor, desc: str) -> torch.Tensor:
        """`fn(chunk, cache)` over the decoder's chunks of `x` (B, C, T, H, W): the first frame alone, then
        `decode_chunk_frames` frames at a time, outputs written into one preallocated result."""
        return self._stream(fn, x, self._frame_chunks(x.shape[2]), desc)

    def frame_layout(self, x: torch.Tensor) -> torch.Tensor:
        """A 4-D frame on CUDA runs channels-last: cuDNN's bf16/fp16 convs are fastest so, and the
        per-pixel norms and the attention read each pixel's channels contiguously."""
        if x.is_cuda and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        if x.is_cuda and x.dim() == 5:  # a chunk of frames: channels-last 3-D (qwenfast.vae.video)
            return x.contiguous(memory_format=torch.channels_last_3d)
        return x

    def decode_head(self, z: torch.Tensor) -> torch.Tensor:
        """(B, z, T, h, w) → the attention's input (B, C_mid, T, h, w), streamed over frames."""
        decoder = self.decoder

        def fn(x, cache):
            return decoder.mid_block.resnets[0](decoder.conv_in(self.frame_layout(self.post_quant_conv(x)), cache), cache)

        return self.stream(fn, z, desc="decode (head)")

    def attend(self, a: torch.Tensor, queries: tuple[int, int] | None = None) -> torch.Tensor:
        return self.decoder.mid_block.attentions[0](a, queries=queries)

    def decode_tail(self, o: torch.Tensor) -> torch.Tensor:
        """The attention's output (B, C_mid, T, h, w) → the mid-block output, streamed over frames."""
        resnet = self.decoder.mid_block.resnets[-1]
        return self.stream(lambda x, cache: resnet(self.frame_layout(x), cache), o, desc="decode (mid)")

    def decode_global(self, z: torch.Tensor) -> torch.Tensor:
        """(B, z, T, h, w) → mid-block output (B, C_mid, T, h, w): the whole global part frame by frame
        (= decode_tail(attend(decode_head(z))), in one stream)."""
        def fn(x, cache):
            return self.decoder.forward_global(self.frame_layout(self.post_quant_conv(x)), cache)

        return self.stream(fn, z, desc="decode (global)")

    def decode_local(self, h: torch.Tensor) -> torch.Tensor:
        """Mid-block output (B, C_mid, T, h, w) → pixels (B, 3, T', 8h, 8w), unclamped."""
        def fn(x, cache):
            return self.decoder.forward_local(self.frame_layout(x), cache).contiguous()

        return self.stream(fn, h, desc="decode (local)")

    def decode_level(self, i: int, x: torch.Tensor, cache: FrameCache | None) -> torch.Tensor:
        return self.decoder.forward_level(i, x, cache)

    def decode_untiled(self, z: torch.Tensor) -> torch.Tensor:
        """(B, z, T, h, w) → pixels (B, 3, T', 8h, 8w), unclamped. Each layer keeps its own frame
        cache, so running the global part over all frames before the local part changes nothing."""
        return self.decode_local(self.decode_global(z))

    def encode_untiled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) → moments (B, 2z, 1 + (T-1)/4, H/8, W/8): frames 1, then 4 at a time."""
        def fn(chunk, cache):  # channels-last on CUDA, as the decoder (the pixels come in NCHW); the
            # moments handed back contiguous, as the 2.1 VAE's and diffusers'
            return self.quant_conv(self.encoder(self.frame_layout(chunk), cache)).contiguous()

        size = self.encode_chunk_frames or self.temporal_compression_ratio
        if size % self.temporal_compression_ratio:
            raise ValueError(f"encode_chunk_frames must be a multiple of {self.temporal_compression_ratio}; got {size}")
        chunks = self._frame_chunks(x.shape[2], first=1, size=size)
        return self._stream(fn, x, chunks, desc="encode")

    # -- internals ---------------------------------------------------------------------------------
    def _stream(self, fn: Callable, x: torch.Tensor, chunks: list[tuple[int, int]], desc: str) -> torch.Tensor:
        """Run `fn(chunk, cache)` over the time chunks of `x` (B, C, T, H, W), each output written
        straight into its place in one preallocated result (no concatenation at the end).

        The first chunk must be the first frame alone: with the image fast path it runs as a 4-D
        image, and an image (T = 1) keeps no frame cache at all. Output frames are linear in input
        frames after the first (decode: 4 per latent frame, encode: 1 per 4, the global part: 1), so
        the second chunk's output gives the result's length; the result takes the first chunk's
        memory format (channels-last 3-D inside the decoder on CUDA).
        """
        fast = self.vae_config.image_fast_path
        cache = FrameCache() if (x.shape[2] > 1 or not fast) else None
        out, first, written = None, None, 0
        for i, (t0, t1) in enumerate(progress(self.vae_config, chunks, desc=desc, total=len(chunks), min_items=2)):
            y = fn(x[:, :, 0], cache).unsqueeze(2) if (t0 == 0 and fast) else fn(x[:, :, t0:t1], cache)
            if i == 0:
                if len(chunks) == 1:
                    return y
                first, written = y, y.shape[2]
                continue
            if out is None:  # output frames per input frame, from the first chunk after the first
                total = written + Fraction(y.shape[2], t1 - t0) * (x.shape[2] - chunks[0][1])
                if total.denominator != 1:
                    raise RuntimeError(f"{desc}: chunks {chunks} of {x.shape[2]} frames give a fractional output length")
                out = torch.empty((*y.shape[:2], int(total), *y.shape[3:]), dtype=y.dtype, device=y.device,
                                  memory_format=memory_format_of(first))
                out[:, :, :written].copy_(first)
                first = None
            if written + y.shape[2] > out.shape[2]:
                raise RuntimeError(f"{desc}: chunk {(t0, t1)} overruns the {out.shape[2]} output frames")
            out[:, :, written:written + y.shape[2]].copy_(y)
            written += y.shape[2]
            del y
        if written != out.shape[2]:
            raise RuntimeError(f"{desc}: wrote {written} of {out.shape[2]} output frames over chunks {chunks}")
        return out

    # Latent frames per decode step after the first frame, and pixel frames per encode step after the
    # first (a multiple of the temporal compression; None: the compression, as diffusers). Any sizes
    # give the same numbers (the frame cache carries exactly what the next chunk needs: tested);
    # larger ones trade memory for fewer, larger convs.
    decode_chunk_frames: int = 1
    encode_chunk_frames: int | None = None

    def _frame_chunks(self, num_frames: int, first: int = 1, size: int | None = None) -> list[tuple[int, int]]:
        """[(0, first), then `size` frames at a time (default `decode_chunk_frames`)]."""
        size = self.decode_chunk_frames if size is None else size
        if size < 1:
            raise ValueError(f"chunks need at least one frame; got size {size}")
        chunks = [(0, min(first, num_frames))]
        chunks += [(t, min(t + size, num_frames)) for t in range(first, num_frames, size)]
        return chunks

    def extra_repr(self) -> str:
        c = self.config
        return (f"base_dim={c['base_dim']}, z_dim={c['z_dim']}, dim_mult={c['dim_mult']}, "
                f"num_res_blocks={c['num_res_blocks']}, receptive_field={self.topology.receptive_field()}")
