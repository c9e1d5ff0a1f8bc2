"""The Qwen-Image-2.1 VAE (diffusers' `AutoencoderKLQwenImage21`), top-down: parts first, the model last.

An image model in the Wan-2.2 style: RGBA in and out, 16x spatial compression, `z_dim = 64`, residual
down/up blocks whose shortcuts are parameter-free space<->channel shuffles, per-pixel RMS norms and
one single-head attention (head dim 1152) over all latent pixels in the decoder's mid block.
Parameter names and shapes are diffusers', so state dicts load with `strict=True` both ways, for
every architecture diffusers builds (`is_residual` on or off, `patch_size`, `decoder_base_dim`, ...).

How it computes (same numbers as diffusers up to float re-association; the diffusers "causal 3-D
convs" of this model already are 2-D convs on the one folded frame):
- Everything runs on 4-D frames `(B, C, H, W)`, channels-last on CUDA (cuDNN's fastest bf16 convs),
  convs with their own zero padding (no pad copies), no frame cache (the model refuses one anyway).
- Each conv bias that feeds a norm or a residual add is left out of the conv and added inside the
  next fused op (`rms_norm(..., bias=)`, `bias_residual_add`), as in the Qwen-Image VAE.
- The channel-to-space shortcut of an up block (`DupUp3D`) is one strided view of its input, added
  in place into the block's output: nothing is materialised for it.
- The mid-block attention goes through `qwenfast.ops.attention.single_head_attention`, which never
  materialises the N x N scores of a frame on the GPU (query-chunked for head dim 1152).

Shapes: B batch, C channels, T frames (always 1 here), H x W pixels at the current resolution.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import VAEConfig
from ..ops.attention import single_head_attention
from ..ops.elementwise import bias_channel_to_space_add_, bias_residual_add
from .qwen_image import AttentionBlock, RMSNorm, UpsampleConv2x, conv2d_frame, residual_bias, spatial_resample
from .surface import DecodeSurface, DecoderTopology, Level, constant_tensor
from .weights import PretrainedVAE

logger = logging.getLogger(__name__)

__all__ = ["QwenImage21VAE", "DEFAULT_ARCH"]

# The architecture of the released Qwen-Image-2.1 VAE: diffusers' defaults of AutoencoderKLQwenImage21,
# and the one list of the config keys this model reads.
DEFAULT_ARCH: dict[str, Any] = dict(
    base_dim=96,
    decoder_base_dim=144,  # None: base_dim
    z_dim=64,
    dim_mult=[1, 2, 4, 8, 8],
    num_res_blocks=2,
    attn_scales=[],  # encoder attention at these scales; only without is_residual
    temperal_downsample=[False, True, True, True],
    dropout=0.0,
    latents_mean=[0.5126, 0.7721, -0.0631, 1.3506, -0.7855, -2.1025, -0.3458, 1.3722, 1.8873, -1.7177, -0.651,
                  0.2732, 0.7562, -0.6163, -1.0277, 3.8363, 2.021, 0.0472, 0.932, 2.0087, 2.4954, -0.1391,
                  -1.4249, 1.8464, -0.5236, 1.2826, 3.7046, -1.3035, 2.7286, -1.4518, -1.9036, -1.9955,
                  -0.0342, -1.0265, -0.7636, 3.0555, 0.0746, -3.0751, -0.1076, 1.7376, -1.0914, -1.9435,
                  -0.2784, -1.368, 0.4809, -0.4433, 0.3764, 0.5729, -2.0595, 1.096, -1.326, -2.0211,
                  -5.0179, 0.5275, 4.0162, 1.8505, 0.3026, 1.9373, 1.4937, 0.2632, 0.5547, -1.7121,
                  -0.1562, 0.0304],
    latents_std=[3.2001, 3.2936, 3.4321, 3.0091, 3.1061, 4.0379, 4.0705, 3.791, 3.0785, 3.65, 3.9308, 3.0904,
                 2.8778, 3.7675, 3.732, 5.0756, 3.2864, 4.0397, 3.1317, 4.0443, 2.9249, 3.9454, 3.0988,
                 4.2489, 3.4896, 3.8513, 3.9323, 3.4719, 3.7498, 4.283, 3.5694, 4.2467, 3.9037, 3.2947,
                 5.077, 3.5075, 3.27, 3.4767, 2.8063, 5.1125, 3.5327, 4.7833, 3.1286, 4.1819, 3.8527,
                 3.8312, 3.5605, 4.3875, 3.9624, 4.0168, 3.5643, 4.055, 5.5614, 4.2963, 4.408, 3.4959,
                 3.8747, 3.7608, 3.5735, 3.149, 3.7662, 3.6746, 3.4563, 3.8161],
    is_residual=True,
    in_channels=4,  # encoder input channels after patchify (4·p² with patch_size p)
    out_channels=4,  # decoder output channels before unpatchify
    patch_size=None,
    scale_factor_temporal=8,  # unused: an image model
    scale_factor_spatial=16,  # diffusers' number; ours is derived from dim_mult and patch_size
)


# --------------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------------


class Conv(nn.Conv2d):
    """diffusers' `QwenImage21CausalConv3d`: a plain Conv2d on the folded frame (its zero padding done
    by the conv itself instead of an `F.pad` copy). `forward(x, cache)` takes the `cache` argument of
    the Wan-family layer signature and ignores it (there is no temporal context)."""

    def forward(self, x: torch.Tensor, cache: Any = None, with_bias: bool = True) -> torch.Tensor:
        """`with_bias=False` leaves the bias out for the next fused op to add."""
        if self.padding_mode != "zeros":
            raise ValueError(f"Conv: padding_mode {self.padding_mode!r} is not supported (the model pads with zeros)")
        return conv2d_frame(x, self.weight, self.bias if with_bias else None, self.stride, self.padding, self.dilation,
                            self.groups)


def _channel_to_space_map(in_dim: int, out_dim: int, factor_t: int, factor_s: int) -> list[int]:
    """`DupUp3D` on one (first) frame as a table, in pixel-shuffle order: output channel o at sub-pixel
    (i, j) of a factor_s x factor_s block reads input channel `src[(o·f_s + i)·f_s + j]`.

    diffusers repeats each input channel `r = out·f_t·f_s² / in` times, reads the result as
    (out, f_t, f_s, f_s) and keeps the last time slot (the first chunk's). Plain Python: models are
    built on the meta device.
    """
    factor = factor_t * factor_s * factor_s
    r = out_dim * factor // in_dim
    return [(o * factor + (factor_t - 1) * factor_s * factor_s + i * factor_s + j) // r
            for o in range(out_dim) for i in range(factor_s) for j in range(factor_s)]


def _as_affine(src: list[int], out_dim: int, f: int) -> tuple[int, int, int, int] | None:
    """(a, step_o, step_i, step_j) when src[o, i, j] = a + step_o·o + step_i·i + step_j·j, else None."""
    def at(o, i, j):
        return src[(o * f + i) * f + j]

    a = at(0, 0, 0)
    so = at(1, 0, 0) - a if out_dim > 1 else 0
    si = at(0, 1, 0) - a if f > 1 else 0
    sj = at(0, 0, 1) - a if f > 1 else 0
    ok = all(at(o, i, j) == a + so * o + si * i + sj * j for o in range(out_dim) for i in range(f) for j in range(f))
    return (a, so, si, sj) if ok else None


class DupUp3D(nn.Module):
    """The parameter-free channel-to-space shortcut of a residual up block (diffusers' `DupUp3D`).

    `add_to(y, x)` adds the shortcut of `x` (B, in, H, W) into `y` (B, out, f·H, f·W) in place. For the
    released model the table is affine in (o, i, j) (nearest upsampling of every channel, or of every
    other one, or one row of a 2x2 block per channel), so the shortcut is one strided view of `x`.
    """

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.factor_t, self.factor_s = factor_t, factor_s
        self.factor = factor_t * factor_s * factor_s
        if out_channels * self.factor % in_channels:
            raise ValueError(f"DupUp3D: out_channels·factor ({out_channels}·{self.factor}) must be divisible by "
                             f"in_channels ({in_channels})")
        self.repeats = out_channels * self.factor // in_channels
        self._src = _channel_to_space_map(in_channels, out_channels, factor_t, factor_s)
        self._affine = _as_affine(self._src, out_channels, factor_s)

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        """The shortcut of `x` (B, in, H, W) as a (B, out, H, f, W, f) tensor: a view when affine."""
        b, _, h, w = x.shape
        f = self.factor_s
        if self._affine is not None:
            a, so, si, sj = self._affine
            sb, sc, sh, sw = x.stride()
            return x.as_strided((b, self.out_channels, h, f, w, f), (sb, so * sc, sh, si * sc, sw, sj * sc),
                                x.storage_offset() + a * sc)
        picked = x.index_select(1, self.src_table(x.device).flatten())  # (B, out·f², H, W)
        return picked.view(b, self.out_channels, f, f, h, w).permute(0, 1, 4, 2, 5, 3)

    def add_to(self, y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """y += the shortcut of x, in place; with `bias` (the conv that made y ran without it), y += bias
        first, in the same pass (`ops.elementwise.bias_channel_to_space_add_`; 2x spatial factor)."""
        f = self.factor_s
        if bias is not None:
            if f != 2:
                raise ValueError(f"DupUp3D.add_to: a fused bias takes a spatial factor of 2, not {f}")
            return bias_channel_to_space_add_(y, bias, x, self.src_table(x.device))
        y.unflatten(3, (y.shape[3] // f, f)).unflatten(2, (y.shape[2] // f, f)).add_(self._view(x))
        return y

    def src_table(self, device: torch.device) -> torch.Tensor:
        """(out, f, f) int32: the input channel each output channel takes at each f x f phase, cached per
        device (a plain attribute: the weights load onto meta-built modules, where a buffer would stay;
        `constant_tensor`)."""
        tables = self.__dict__.setdefault("_src_tables", {})
        if device not in tables:
            f = self.factor_s
            tables[device] = constant_tensor(self._src, torch.int32, device).view(self.out_channels, f, f)
        return tables[device]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The shortcut alone, (B, out, f·H, f·W)."""
        b, _, h, w = x.shape
        return self._view(x).reshape(b, self.out_channels, h * self.factor_s, w * self.factor_s)


class AvgDown3D(nn.Module):
    """The parameter-free space-to-channel shortcut of a residual down block (diffusers' `AvgDown3D`):
    f_t·f_s² values per input channel (the f_t - 1 earlier time slots are the zero padding of an image),
    in groups of `in·f / out` consecutive ones, averaged."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.factor_t, self.factor_s = factor_t, factor_s
        self.factor = factor_t * factor_s * factor_s
        if in_channels * self.factor % out_channels:
            raise ValueError(f"AvgDown3D: in_channels·factor ({in_channels}·{self.factor}) must be divisible by "
                             f"out_channels ({out_channels})")
        self.group_size = in_channels * self.factor // out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        f, ft = self.factor_s, self.factor_t
        v = x.view(b, c, h // f, f, w // f, f).permute(0, 1, 3, 5, 2, 4).unsqueeze(2)  # (B, C, 1, f, f, h', w')
        if ft > 1:
            v = torch.cat([v.new_zeros(b, c, ft - 1, f, f, h // f, w // f), v], dim=2)
        return v.reshape(b, self.out_channels, self.group_size, h // f, w // f).mean(dim=2)


# The upsamplers as one stride-2 transposed conv (qwen_image.UpsampleConv2x): on an H200 in bf16 the
# layers run 1.0-1.8x faster than upsample-then-conv and whole decodes 1.5% (1328²) / 8.5% (2048²)
# faster (benchmarks/results/upsample_conv_h200.md); equal to it up to rounding (<= 1e-15 in float64).
UPSAMPLE_FORM = "transposed"

# A residual up block's upsampler bias and channel-to-space shortcut added in one pass of our kernel
# instead of PyTorch's two (at 1328² they run over 1.8 GiB of outputs each). On an H200 in bf16 the
# whole untiled decode is 8.6% faster at 1024², 2.2% at 1328², 7.4% at 2048², 5.1% at 4096², and its
# first-run peak is lower (no bias-added temporary): benchmarks/results/vae21_h200.md, third
# measurement. The numbers are the same either way (tested).
FUSED_SHORTCUT_ADD = True


class Resample(nn.Module):
    """2x spatial up/down sampling of a frame. The `*3d` modes carry a 1x1 `time_conv` whose weights
    diffusers stores but never applies to an image (the first frame skips it)."""

    def __init__(self, dim: int, mode: str, upsample_out_dim: int | None = None) -> None:
        super().__init__()
        self.dim, self.mode = dim, mode
        up_out = dim // 2 if upsample_out_dim is None else upsample_out_dim
        if mode in ("upsample2d", "upsample3d"):
            self.resample = UpsampleConv2x(dim, up_out, form=UPSAMPLE_FORM)
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        else:
            raise ValueError(f"Resample mode must be up/downsample2d/3d; got {mode!r}")
        if mode == "upsample3d":
            self.time_conv = Conv(dim, dim * 2, (1, 1))
        elif mode == "downsample3d":
            self.time_conv = Conv(dim, dim, (1, 1))

    def forward(self, x: torch.Tensor, cache: Any = None, with_bias: bool = True) -> torch.Tensor:
        """`with_bias=False` (the up modes): the conv's bias is left for the consumer to add."""
        return spatial_resample(self.resample, x, with_bias)


class ResidualBlock(nn.Module):
    """RMSNorm → SiLU → 3x3 conv → RMSNorm → SiLU → (dropout) → 3x3 conv, plus a (1x1) shortcut."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.norm1 = RMSNorm(in_dim, images=False)
        self.conv1 = Conv(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim, images=False)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = Conv(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Any = None) -> torch.Tensor:
        # conv1's bias is added inside norm2, conv2's and the shortcut conv's in the final fused add: no
        # pass of their own. The shortcut runs after conv1, when norm1's output is already freed: at the
        # widest ResBlock of a level (in != out) one tensor fewer is live at conv1.
        y = self.conv1(self.norm1(x, silu=True), with_bias=False)
        shortcut = self.conv_shortcut if isinstance(self.conv_shortcut, Conv) else None
        h = x if shortcut is None else shortcut(x, with_bias=False)
        y = self.norm2(y, silu=True, bias=self.conv1.bias)
        y = self.conv2(self.dropout(y), with_bias=False)
        return bias_residual_add(y, residual_bias(self.conv2.bias, shortcut), h)


class MidBlock(nn.Module):
    """ResidualBlock → AttentionBlock → ResidualBlock, at the lowest resolution."""

    def __init__(self, dim: int, dropout: float = 0.0, num_layers: int = 1) -> None:
        super().__init__()
        self.dim = dim
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, dropout)])
        self.attentions = nn.ModuleList()
        for _ in range(num_layers):
            self.attentions.append(AttentionBlock(dim))
            self.resnets.append(ResidualBlock(dim, dim, dropout))

    def forward(self, x: torch.Tensor, cache: Any = None) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x))
        return x


class ResidualDownBlock(nn.Module):
    """`num_res_blocks` ResBlocks and an optional 2x downsample, plus the space-to-channel shortcut."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float, num_res_blocks: int,
                 temperal_downsample: bool = False, down_flag: bool = False) -> None:
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, factor_t=2 if temperal_downsample else 1,
                                      factor_s=2 if down_flag else 1)
        dims = [in_dim] + [out_dim] * (num_res_blocks - 1)
        self.resnets = nn.ModuleList([ResidualBlock(d, out_dim, dropout) for d in dims])
        self.downsampler = None
        if down_flag:
            self.downsampler = Resample(out_dim, "downsample3d" if temperal_downsample else "downsample2d")

    def forward(self, x: torch.Tensor, cache: Any = None) -> torch.Tensor:
        y = x
        for resnet in self.resnets:
            y = resnet(y)
        if self.downsampler is not None:
            y = self.downsampler(y)
        return y.add_(self.avg_shortcut(x))


class Encoder(nn.Module):
    """Pixels → moments (2·z_dim channels): conv_in, down blocks, mid block, RMSNorm, SiLU, conv_out."""

    def __init__(self, in_channels: int, dim: int, z_dim: int, dim_mult, num_res_blocks: int, attn_scales,
                 temperal_downsample, dropout: float, is_residual: bool) -> None:
        super().__init__()
        dims = [dim * u for u in [1, *dim_mult]]
        last = len(dim_mult) - 1
        scale = 1.0
        self.conv_in = Conv(in_channels, dims[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if is_residual:
                self.down_blocks.append(ResidualDownBlock(
                    in_dim, out_dim, dropout, num_res_blocks,
                    temperal_downsample=temperal_downsample[i] if i != last else False, down_flag=i != last))
                continue
            for _ in range(num_res_blocks):
                self.down_blocks.append(ResidualBlock(in_dim, out_dim, dropout))
                if scale in attn_scales:
                    self.down_blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != last:
                self.down_blocks.append(Resample(out_dim, "downsample3d" if temperal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.mid_block = MidBlock(out_dim, dropout, num_layers=1)
        self.norm_out = RMSNorm(out_dim, images=False)
        self.conv_out = Conv(out_dim, z_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for layer in self.down_blocks:
            x = layer(x)
        x = self.mid_block(x)
        return self.conv_out(self.norm_out(x, silu=True))


class ResidualUpBlock(nn.Module):
    """`num_res_blocks + 1` ResBlocks and an optional 2x upsample (`upsampler`), plus the
    channel-to-space shortcut of the block's input."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float = 0.0,
                 temperal_upsample: bool = False, up_flag: bool = False) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.avg_shortcut = None
        if up_flag:
            self.avg_shortcut = DupUp3D(in_dim, out_dim, factor_t=2 if temperal_upsample else 1, factor_s=2)
        dims = [in_dim] + [out_dim] * num_res_blocks
        self.resnets = nn.ModuleList([ResidualBlock(d, out_dim, dropout) for d in dims])
        self.upsampler = None
        if up_flag:
            mode = "upsample3d" if temperal_upsample else "upsample2d"
            self.upsampler = Resample(out_dim, mode, upsample_out_dim=out_dim)

    def forward(self, x: torch.Tensor, cache: Any = None) -> torch.Tensor:
        y = x
        for resnet in self.resnets:
            y = resnet(y)
        if self.upsampler is None:
            return y
        if FUSED_SHORTCUT_ADD:  # the upsampler's bias and the shortcut in one pass
            return self.avg_shortcut.add_to(self.upsampler(y, with_bias=False), x, bias=self.upsampler.resample[1].bias)
        return self.avg_shortcut.add_to(self.upsampler(y), x)  # (B, out, 2H, 2W)

    @property
    def upsamples(self) -> bool:
        return self.upsampler is not None


class UpBlock(nn.Module):
    """`num_res_blocks + 1` ResBlocks and an optional 2x upsample (`upsamplers.0`), without a shortcut
    (`is_residual=False`)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float = 0.0,
                 upsample_mode: str | None = None) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        dims = [in_dim] + [out_dim] * num_res_blocks
        self.resnets = nn.ModuleList([ResidualBlock(d, out_dim, dropout) for d in dims])
        self.upsamplers = None
        if upsample_mode is not None:
            self.upsamplers = nn.ModuleList([Resample(out_dim, upsample_mode)])

    def forward(self, x: torch.Tensor, cache: Any = None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)

    @property
    def upsamples(self) -> bool:
        return self.upsamplers is not None


class Decoder(nn.Module):
    """Latents → decoder output channels (before unpatchify): conv_in and mid block (global: the
    attention), then up blocks, RMSNorm, SiLU, conv_out (local: a finite receptive field)."""

    def __init__(self, dim: int, z_dim: int, dim_mult, num_res_blocks: int, temperal_upsample, dropout: float,
                 out_channels: int, is_residual: bool) -> None:
        super().__init__()
        dims = [dim * u for u in [dim_mult[-1], *dim_mult[::-1]]]
        last = len(dim_mult) - 1
        self.conv_in = Conv(z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], dropout, num_layers=1)
        self.up_blocks = nn.ModuleList()
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            up = i != last
            if is_residual:
                self.up_blocks.append(ResidualUpBlock(in_dim, out_dim, num_res_blocks, dropout,
                                                      temperal_upsample=temperal_upsample[i] if up else False,
                                                      up_flag=up))
            else:
                mode = ("upsample3d" if temperal_upsample[i] else "upsample2d") if up else None
                in_dim = in_dim // 2 if i > 0 else in_dim  # the previous block's Resample halved the channels
                self.up_blocks.append(UpBlock(in_dim, out_dim, num_res_blocks, dropout, mode))
        self.norm_out = RMSNorm(out_dim, images=False)
        self.conv_out = Conv(out_dim, out_channels, 3, padding=1)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """(B, z, h, w) → the mid attention's input (B, C_mid, h, w)."""
        return self.mid_block.resnets[0](self.conv_in(x))

    def forward_level(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Up block i; the last one also runs the head (norm_out, SiLU, conv_out)."""
        x = self.up_blocks[i](x)
        if i == len(self.up_blocks) - 1:
            x = self.conv_out(self.norm_out(x, silu=True))
        return x

    def forward_local(self, x: torch.Tensor) -> torch.Tensor:
        """Mid-block output (B, C_mid, h, w) → (B, out_channels, s·h, s·w), unclamped."""
        for i in range(len(self.up_blocks)):
            x = self.forward_level(i, x)
        return x


def patchify(x: torch.Tensor, p: int | None) -> torch.Tensor:
    """(B, C, H, W) → (B, C·p², H/p, W/p), channel c·p² + j·p + i for sub-pixel (row i, column j)."""
    if not p or p == 1:
        return x
    b, c, h, w = x.shape
    return x.view(b, c, h // p, p, w // p, p).permute(0, 1, 5, 3, 2, 4).reshape(b, c * p * p, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int | None) -> torch.Tensor:
    """The inverse of `patchify`: (B, C·p², H, W) → (B, C, H·p, W·p)."""
    if not p or p == 1:
        return x
    b, cp, h, w = x.shape
    c = cp // (p * p)
    return x.view(b, c, p, p, h, w).permute(0, 1, 4, 3, 5, 2).reshape(b, c, h * p, w * p)


# --------------------------------------------------------------------------------------------------
# Topology of the local part (what tiling and parallel decode derive their margins and costs from)
# --------------------------------------------------------------------------------------------------


def _convs3x3(module: nn.Module) -> list[tuple[int, int]]:
    """(c_in, c_out) of the 3x3 convs of `module`, in forward order (registration order here)."""
    return [(m.in_channels, m.out_channels) for m in module.modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]


def decoder_topology(decoder: Decoder) -> DecoderTopology:
    """The local part's description (the surface's `DecoderTopology`), read once from the module tree."""
    levels, scale = [], 1
    last = len(decoder.up_blocks) - 1
    for i, block in enumerate(decoder.up_blocks):
        up = block.upsamples
        inner, whole = _convs3x3(block.resnets), _convs3x3(block)
        head = _convs3x3(decoder.conv_out) if i == last else []
        levels.append(Level(scale=scale, channels=block.out_dim, convs=len(inner), upsample=up,
                            convs_after_up=len(whole) - len(inner), head_convs=len(head),
                            conv_channels=tuple(inner + whole[len(inner):] + head)))
        scale *= 2 if up else 1
    return DecoderTopology(tail_convs=len(_convs3x3(decoder.mid_block.resnets[-1])), levels=tuple(levels))


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class QwenImage21VAE(DecodeSurface, PretrainedVAE):
    """The Qwen-Image-2.1 VAE: weight-compatible with diffusers' `AutoencoderKLQwenImage21`.

    `decode(z)` takes unscaled latents `[B, z_dim, h, w]` (or `[B, z_dim, 1, h, w]`) and returns what
    diffusers' `vae.decode(z).sample` returns, clamped to [-1, 1], `[B, out_channels, s·h, s·w]` (or
    5-D); `encode(x)` returns the posterior mean. How to decode (tiling) is set by `vae_config`.
    """

    diffusers_class_names: tuple[str, ...] = ("AutoencoderKLQwenImage21",)
    arch_keys: tuple[str, ...] = tuple(DEFAULT_ARCH)
    # The local part of a large frame runs in stages and row bands (the surface's `decode_local` and
    # `decode_levels`, planned by `qwenfast.vae.bands.local_plan`): exact, in a fraction of the memory.
    band_local_part = True
    # patch_halo="auto" exchanges halos per level on images from 2 ranks on: rehearsed on one H200
    # (plan.choose_patch_halo), the slowest rank's ms with `level` against `mid` at 2048² was 89.5 / 105.9,
    # 54.2 / 78.2, 33.2 / 60.9 at N = 2 / 4 / 8 (1328²: 45.9 / 53.2, 36.8 / 47.9, 35.0 / 35.9)
    patch_level_image_world = 2

    def __init__(self, base_dim: int = 96, decoder_base_dim: int | None = 144, z_dim: int = 64,
                 dim_mult=(1, 2, 4, 8, 8), num_res_blocks: int = 2, attn_scales=(),
                 temperal_downsample=(False, True, True, True), dropout: float = 0.0, latents_mean=None,
                 latents_std=None, is_residual: bool = True, in_channels: int = 4, out_channels: int = 4,
                 patch_size: int | None = None, scale_factor_temporal: int | None = 8,
                 scale_factor_spatial: int | None = 16, vae_config: VAEConfig | None = None) -> None:
        super().__init__()
        arch = dict(base_dim=base_dim, decoder_base_dim=decoder_base_dim, z_dim=z_dim, dim_mult=list(dim_mult),
                    num_res_blocks=num_res_blocks, attn_scales=list(attn_scales),
                    temperal_downsample=list(temperal_downsample), dropout=dropout,
                    latents_mean=list(DEFAULT_ARCH["latents_mean"] if latents_mean is None else latents_mean),
                    latents_std=list(DEFAULT_ARCH["latents_std"] if latents_std is None else latents_std),
                    is_residual=bool(is_residual), in_channels=in_channels, out_channels=out_channels,
                    patch_size=patch_size, scale_factor_temporal=scale_factor_temporal,
                    scale_factor_spatial=scale_factor_spatial)
        self.validate_arch(arch)
        self.config = arch
        p = patch_size or 1
        self.patch_size = patch_size
        self.z_dim = z_dim
        self.in_channels_pixels = in_channels // (p * p)  # what encode takes
        self._out_channels = out_channels // (p * p)  # what decode returns
        self.spatial_compression_ratio = 2 ** (len(dim_mult) - 1) * p
        if scale_factor_spatial is not None and scale_factor_spatial != self.spatial_compression_ratio:
            logger.warning("scale_factor_spatial=%s disagrees with the architecture (%s x spatial); using %s",
                           scale_factor_spatial, self.spatial_compression_ratio, self.spatial_compression_ratio)
        self.vae_config = vae_config or VAEConfig()

        temperal_downsample = list(temperal_downsample)
        self.encoder = Encoder(in_channels, base_dim, z_dim * 2, list(dim_mult), num_res_blocks, list(attn_scales),
                               temperal_downsample, dropout, bool(is_residual))
        self.quant_conv = Conv(z_dim * 2, z_dim * 2, 1)
        self.post_quant_conv = Conv(z_dim, z_dim, 1)
        self.decoder = Decoder(base_dim if decoder_base_dim is None else decoder_base_dim, z_dim, list(dim_mult),
                               num_res_blocks, temperal_downsample[::-1], dropout, out_channels, bool(is_residual))
        self.topology = decoder_topology(self.decoder)

    @classmethod
    def validate_arch(cls, arch: dict) -> None:
        """Fast checks of a config dict (before anything is built); a ValueError naming the key."""
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ValueError(f"{key}: {why}; got {arch.get(key)!r}")

        def positive_int(key: str, optional: bool = False) -> bool:
            v = arch.get(key)
            return (optional and v is None) or (isinstance(v, int) and not isinstance(v, bool) and v > 0)

        for key in ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
            if key in arch:
                need(positive_int(key), key, "must be a positive int")
        for key in ("decoder_base_dim", "patch_size"):
            if key in arch:
                need(positive_int(key, optional=True), key, "must be a positive int or None")
        dim_mult = arch.get("dim_mult", DEFAULT_ARCH["dim_mult"])
        need(isinstance(dim_mult, (list, tuple)) and len(dim_mult) >= 1
             and all(isinstance(u, int) and not isinstance(u, bool) and u > 0 for u in dim_mult),
             "dim_mult", "must be a non-empty list of positive ints")
        if "temperal_downsample" in arch:
            td = arch["temperal_downsample"]
            need(isinstance(td, (list, tuple)) and len(td) >= len(dim_mult) - 1, "temperal_downsample",
                 f"needs at least len(dim_mult) - 1 = {len(dim_mult) - 1} entries")
        if "dropout" in arch:
            need(isinstance(arch["dropout"], (int, float)) and 0 <= arch["dropout"] < 1, "dropout", "must be in [0, 1)")
        p = arch.get("patch_size") or 1
        for key in ("in_channels", "out_channels"):
            if key in arch:
                need(arch[key] % (p * p) == 0, key, f"must be a multiple of patch_size² = {p * p}")
        for key in ("latents_mean", "latents_std"):
            if arch.get(key) is not None:
                need(isinstance(arch[key], (list, tuple)), key, "must be a list of numbers")

    # -- loading: PretrainedVAE's from_pretrained / from_diffusers (weights.py) ---------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    @property
    def out_channels(self) -> int:
        """Decoded channels (4: RGBA for the released model)."""
        return self._out_channels

    # -- public API (decode: the surface's; untiled, tiled or parallel by vae_config) ------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels `[B, C, H, W]` (or `[B, C, 1, H, W]`) in [-1, 1] → posterior mean `[B, z_dim, H/s, W/s]`
        (or 5-D), as diffusers' `encode(x).latent_dist.mode()`."""
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        if not isinstance(x, torch.Tensor) or x.dim() not in (4, 5):
            raise ValueError(f"encode expects [B, {self.in_channels_pixels}, H, W] or [B, {self.in_channels_pixels}, 1, H, W]; "
                             f"got {shape}")
        image = x.dim() == 4
        x = x.unsqueeze(2) if image else x
        if x.shape[1] != self.in_channels_pixels:
            raise ValueError(f"encode expects {self.in_channels_pixels} channels (dim 1); got shape {shape}")
        if x.shape[2] != 1:
            raise ValueError(f"encode: the Qwen-Image-2.1 VAE is an image model, T must be 1; got shape {shape}")
        s = self.spatial_compression_ratio
        if x.shape[-1] % s or x.shape[-2] % s or x.numel() == 0:
            raise ValueError(f"encode needs H and W positive multiples of {s}; got shape {shape}")
        x = x.to(device=self.device, dtype=self.dtype)
        cfg = self.vae_config
        if cfg.use_tiling and (x.shape[-1] > cfg.tile_sample_min_width or x.shape[-2] > cfg.tile_sample_min_height):
            if self.patch_size not in (None, 1):
                raise NotImplementedError("tiled encode with patch_size is not supported; encode untiled")
            moments = self.tiled_encode(x)
        else:
            moments = self.encode_untiled(x)
        mean = moments[:, : self.z_dim]
        return mean[:, :, 0] if image else mean

    # -- the decode surface ------------------------------------------------------------------------
    def check_latent(self, z: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Validation; → (z as (B, z_dim, 1, h, w) on the model's device and dtype, whether z was 4-D)."""
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"decode expects a torch.Tensor; got {type(z).__name__}")
        shape = tuple(z.shape)
        if z.dim() not in (4, 5):
            raise ValueError(f"decode expects latents [B, {self.z_dim}, h, w] or [B, {self.z_dim}, 1, h, w]; "
                             f"got shape {shape}")
        if z.shape[1] != self.z_dim:
            raise ValueError(f"decode expects {self.z_dim} latent channels (dim 1) for this Qwen-Image-2.1 VAE; "
                             f"got shape {shape}")
        if z.dim() == 5 and z.shape[2] != 1:
            raise ValueError(f"decode: the Qwen-Image-2.1 VAE is an image model, T must be 1; got shape {shape}")
        if z.numel() == 0:
            raise ValueError(f"decode got an empty latent, shape {shape}")
        if not z.is_floating_point():
            raise TypeError(f"decode expects floating-point latents; got {z.dtype}")
        image = z.dim() == 4
        z = z.unsqueeze(2) if image else z
        return z.to(device=self.device, dtype=self.dtype), image

    def num_output_frames(self, num_latent_frames: int) -> int:
        return num_latent_frames

    def frame_layout(self, x: torch.Tensor) -> torch.Tensor:
        """A 4-D frame on CUDA runs channels-last (cuDNN's fastest bf16 convs; per-pixel norms and the
        attention then read each pixel's channels contiguously)."""
        if x.is_cuda and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def stream(self, fn: Callable, x: torch.Tensor, desc: str = "decode") -> torch.Tensor:
        """`fn(frame (B, C, H, W), cache)` over the frames of `x` (B, C, T, H, W), concatenated in time.
        An image model keeps no frame cache: every frame is a first frame (T is 1 on the public paths)."""
        outs = [fn(x[:, :, t], None).unsqueeze(2) for t in range(x.shape[2])]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def decode_head(self, z: torch.Tensor) -> torch.Tensor:
        """(B, z, T, h, w) → the mid attention's input (B, C_mid, T, h, w)."""
        return self.stream(lambda x, _: self.decoder.forward_head(self.frame_layout(self.post_quant_conv(x))), z,
                           desc="decode (head)")

    def attend(self, a: torch.Tensor, queries: tuple[int, int] | None = None) -> torch.Tensor:
        """The mid-block attention block frame by frame. `queries=None`: (B, C, T, h, w) → the same shape.
        `queries=(n0, n1)`: only tokens n0..n1-1 of each frame (row-major) attend, against all tokens:
        → (B, T, n1 - n0, C) token rows (norm, qkv, attention, proj and the residual included)."""
        block = self.decoder.mid_block.attentions[0]
        b, c, t, h, w = a.shape
        frames = self.frame_layout(a.transpose(1, 2).flatten(0, 1))  # (B·T, C, h, w)
        if queries is None:
            return block(frames).unflatten(0, (b, t)).transpose(1, 2)
        n0, n1 = queries
        if not 0 <= n0 <= n1 <= h * w:
            raise ValueError(f"attend: queries must satisfy 0 <= n0 <= n1 <= {h * w}; got {queries}")
        tokens = block.norm(frames).flatten(2).transpose(1, 2)  # (B·T, N, C)
        weight, bias = block.to_qkv.weight.view(3 * c, c), block.to_qkv.bias
        q = F.linear(tokens[:, n0:n1], weight[:c], None if bias is None else bias[:c])  # (B·T, n, C)
        kv = F.linear(tokens, weight[c:], None if bias is None else bias[c:])  # (B·T, N, 2C)
        del tokens
        k, v = kv.split(c, dim=-1)
        o = single_head_attention(q, k, v)
        del q, k, v, kv
        o = F.linear(o, block.proj.weight.view(c, c), block.proj.bias)
        o = o + frames.flatten(2).transpose(1, 2)[:, n0:n1]
        return o.unflatten(0, (b, t))  # (B, T, n, C)

    def decode_tail(self, o: torch.Tensor) -> torch.Tensor:
        """The mid block's last ResBlock on the attention output (B, C, T, h, w)."""
        tail = self.decoder.mid_block.resnets[-1]
        return self.stream(lambda x, _: tail(self.frame_layout(x)), o, desc="decode (tail)")

    def decode_global(self, z: torch.Tensor) -> torch.Tensor:
        """(B, z, T, h, w) → the mid-block output (B, C_mid, T, h, w)."""
        return self.decode_tail(self.attend(self.decode_head(z)))

    def decode_level(self, i: int, x: torch.Tensor, cache: Any = None) -> torch.Tensor:
        """Level i of the local part on one 4-D frame; the last level includes the head and unpatchify."""
        y = self.decoder.forward_level(i, self.frame_layout(x))
        if i == len(self.decoder.up_blocks) - 1:
            y = unpatchify(y, self.patch_size).contiguous()
        return y

    def decode_untiled(self, z: torch.Tensor) -> torch.Tensor:
        """(B, z, T, h, w) → pixels (B, out_channels, T, s·h, s·w), unclamped."""
        return self.decode_local(self.decode_global(z))

    def encode_untiled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) → moments (B, 2·z_dim, T, H/s, W/s): mean and logvar."""
        def fn(frame, _):
            return self.quant_conv(self.encoder(self.frame_layout(patchify(frame, self.patch_size)))).contiguous()

        return self.stream(fn, x, desc="encode")

    def merge_blend_tiles_patched(self, rows: list[list[torch.Tensor]], height: int, width: int,
                                  cfg: VAEConfig) -> torch.Tensor:
        """Blend tiling's merge with `patch_size` p (called by vae/tiling.py): diffusers blends before
        unpatchifying, at 1/p of the pixel tile geometry."""
        from .tiling import _blend_merge

        p, s = self.patch_size, self.spatial_compression_ratio
        stride_h, stride_w = cfg.tile_sample_stride_height // p, cfg.tile_sample_stride_width // p
        merged = _blend_merge([[patchify_5d(tile, p) for tile in row] for row in rows],
                              cfg.tile_sample_min_height // p - stride_h, cfg.tile_sample_min_width // p - stride_w,
                              stride_h, stride_w, height * s // p, width * s // p)
        return unpatchify_5d(merged, p)

    def extra_repr(self) -> str:
        c = self.config
        return (f"base_dim={c['base_dim']}, decoder_base_dim={c['decoder_base_dim']}, z_dim={c['z_dim']}, "
                f"dim_mult={c['dim_mult']}, num_res_blocks={c['num_res_blocks']}, is_residual={c['is_residual']}, "
                f"patch_size={c['patch_size']}, decode_margin={self.decode_margin}")


def patchify_5d(x: torch.Tensor, p: int) -> torch.Tensor:
    return torch.stack([patchify(x[:, :, t], p) for t in range(x.shape[2])], dim=2)


def unpatchify_5d(x: torch.Tensor, p: int) -> torch.Tensor:
    return torch.stack([unpatchify(x[:, :, t], p) for t in range(x.shape[2])], dim=2)
