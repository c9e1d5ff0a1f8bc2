"""The video path's causal-conv machinery: a frame cache and frame windows instead of pad/cat copies.

A causal conv with a 3-tap time kernel reads, for output frame t, input frames t-2, t-1, t. Over a
chunk of T new frames it needs the chunk's last two predecessors (its *past*): zeros at the start of
a video, else the last two input frames of the previous chunk. diffusers builds
`F.pad(torch.cat([past, x]))` per conv per chunk: two copies of the whole chunk (plus its spatial
padding) before the conv reads it. Here each conv reads one *window* (B, C, 2 + T, H, W):

    window[:, :, :2]  = past            (a copy of 2 frames)
    window[:, :, 2:]  = the new frames  (written there by whoever produces them: the RMS norm that
                                         precedes every conv of a ResidualBlock writes its output
                                         straight into the window, so the chunk is written once)
    y = conv(window), spatial padding inside the conv (cuDNN pads for free)
    past <- window[:, :, T:]             (a copy of 2 frames, into the cache's own buffer)

Windows are allocated per call and freed after the conv: PyTorch's caching allocator hands back the
same block next time, and at any moment only the windows of one conv are alive. On CUDA everything is
channels-last 3-D ((B, T, H, W, C) in memory): the layout cuDNN's fast 3-D kernels and our per-pixel
fused ops want, and the one whose frames flatten to a channels-last 4-D batch without a copy
(`frames_as_images`).

How the window is convolved is `WINDOW_CONV` (measured on the GPU, see benchmarks/bench_video.py):
- "conv3d": one cuDNN 3-D conv over the window;
- "taps2d": the three temporal taps as three 2-D convs over overlapping frame slices of the window
  (B = 1), summed in place;
- "stacked2d": the three frames stacked along channels (a copy), one 2-D conv with the weight
  reshaped to (out, 3·in, kh, kw) (B = 1);
- "stacked2d_filled": the same conv over a stack that the window's producer fills itself: instead of
  one window, `causal_window` builds the stack S (T + 2, 3·C, H, W) — position t holds input frames
  t-2, t-1, t in its three channel slots — and the producer (the RMS norm before the conv) writes
  its T frames into each slot, frame-shifted (one read of its input, three writes: the slots are one
  evenly strided view; B = 1). S is three windows' memory. `STACKED_MAX_CHANNELS` limits it to the
  narrow convs.
Measured on one H200 (benchmarks/results/video_h200.md, 81x720p): "conv3d" is the fastest whole
decode. The 2-D conv over a stack beats cuDNN's channels-last conv3d only on the 96-channel
full-resolution level (530 against 405 TFLOP/s; at 192 and 384 channels it is 4-11% slower), and the
stack's extra writes and memory cost more than that saves: 1755 ms with every conv stacked, 1663 with
the 96-channel ones only, against conv3d's 1616 (taps2d and a copied stack lost earlier).
All four are the same sums re-associated: exact to rounding.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CACHE_T", "FrameCache", "STACKED_MAX_CHANNELS", "WINDOW_CONV", "WINDOW_CONVS", "causal_window",
           "convolve_causal_window", "first_frame_past", "frames_as_images", "images_as_frames", "video_layout",
           "pointwise_conv3d"]

CACHE_T = 2  # a causal 3-tap time conv needs the last two input frames of the previous chunk

WINDOW_CONV = "conv3d"  # "conv3d" | "taps2d" | "stacked2d" | "stacked2d_filled": how a window is convolved
WINDOW_CONVS = ("conv3d", "taps2d", "stacked2d", "stacked2d_filled")
# "stacked2d_filled" only for convs of at most this many input channels (None: all); the others conv3d
# (on an H200 the stacked 2-D conv wins only at 96 channels, not enough to pay for the stack: above).
STACKED_MAX_CHANNELS: int | None = None


class FrameCache:
    """What each causal layer carries from one chunk of frames to the next, keyed by the layer.

    One cache serves one pass over one video (a decode, an encode, or one tile of them). A layer
    that finds no entry is at the first frame: its past is zero padding. A causal conv's entry is
    its past, (B, C, 2, H, W), updated in place chunk after chunk.
    """

    def __init__(self) -> None:
        self._state: dict[nn.Module, Any] = {}

    def get(self, layer: nn.Module) -> Any:
        return self._state.get(layer)

    def set(self, layer: nn.Module, value: Any) -> None:
        self._state[layer] = value


def video_layout(device: torch.device) -> torch.memory_format:
    """The memory format of the video path's 5-D tensors: channels-last 3-D on CUDA (cuDNN's fast 3-D
    kernels, per-pixel fused ops), contiguous elsewhere (the CPU's convs take both)."""
    return torch.channels_last_3d if device.type == "cuda" else torch.contiguous_format


def first_frame_past(frame: torch.Tensor) -> torch.Tensor:
    """The past a causal conv keeps after the first frame (B, C, H, W): (B, C, 2, H, W) = [0, frame]."""
    b, c, h, w = frame.shape
    past = torch.empty((b, c, CACHE_T, h, w), dtype=frame.dtype, device=frame.device,
                       memory_format=video_layout(frame.device))
    past[:, :, 0].zero_()
    past[:, :, 1].copy_(frame)
    return past


def frames_as_images(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) → (B·T, C, H, W), frames batch-major; a view when x is channels-last 3-D."""
    return x.transpose(1, 2).flatten(0, 1)


def images_as_frames(y: torch.Tensor, b: int) -> torch.Tensor:
    """(B·T, C, H, W) → (B, C, T, H, W); a channels-last y gives a channels-last 3-D view."""
    return y.unflatten(0, (b, -1)).transpose(1, 2)


def pointwise_conv3d(conv: nn.Conv3d, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1x1 conv on (B, C, T, H, W) as the 1x1 2-D conv of its frames (cuDNN's best-tuned GEMM path)."""
    y = F.conv2d(frames_as_images(x), conv.weight[:, :, 0], bias)
    return images_as_frames(y, x.shape[0])


def causal_window(conv: nn.Conv3d, x: torch.Tensor, cache: FrameCache,
                  produce: Callable[[torch.Tensor], Any] | None = None) -> torch.Tensor:
    """The window (B, C, 2 + T, H, W) that causal `conv` (3 time taps, stride 1 in time) reads for chunk
    `x` (B, C, T, H, W): its past from `cache` (zeros at the start), its new frames `x`, or what
    `produce(out)` writes into them (`x` then only gives the shape). `convolve_causal_window` runs the
    conv over it; once it is filled `x` is no longer needed, and a caller that drops it before the conv
    holds one chunk-sized tensor fewer."""
    b, c, t, h, w = x.shape
    if (WINDOW_CONV == "stacked2d_filled" and b == 1 and conv.kernel_size[0] == 1 + CACHE_T
            and (STACKED_MAX_CHANNELS is None or c <= STACKED_MAX_CHANNELS)):
        return _stacked_window(conv, x, cache, produce)
    window = torch.empty((b, c, CACHE_T + t, h, w), dtype=x.dtype, device=x.device,
                         memory_format=video_layout(x.device))  # (B, C, 2 + T, H, W)
    past = cache.get(conv)
    if past is None:  # the start of the video (or of this conv's own stream): zero padding
        window[:, :, :CACHE_T].zero_()
    else:
        window[:, :, :CACHE_T].copy_(past)
    if produce is None:
        window[:, :, CACHE_T:].copy_(x)
    else:
        produce(window[:, :, CACHE_T:])
    return window


def _stacked_window(conv: nn.Conv3d, x: torch.Tensor, cache: FrameCache,
                    produce: Callable[[torch.Tensor], Any] | None) -> torch.Tensor:
    """"stacked2d_filled"'s window: S (2 + T, 3·C, H, W), position t's slot k (channels k·C .. (k+1)·C)
    holding input frame t - 2 + k (k = 0, 1, 2: the time taps in order); positions T, T + 1 are spare
    room for the shifted writes (never convolved). x (1, C, T, H, W)."""
    _, c, t, h, w = x.shape
    stack = _empty_stack(CACHE_T + t, x[0, :, 0])
    past = cache.get(conv)  # (1, C, 2, H, W): input frames -2, -1 (None: zeros, the start of the video)
    for k in range(CACHE_T):  # the slots that read the past: frame -2 + k + p lands at position p
        for p in range(CACHE_T - k):
            slot = stack[p, k * c:(k + 1) * c]
            if past is None:
                slot.zero_()
            else:
                slot.copy_(past[0, :, k + p])
    # input frame j lands at position j + 2 - k of slot k: the three slots' frame views (1, C, T, H, W)
    # lie equally far apart in memory, so they are one view (3, 1, C, T, H, W) that the producer fills
    # from one read of its input
    slots = _as_copies([stack[CACHE_T - k:CACHE_T - k + t, k * c:(k + 1) * c].transpose(0, 1).unsqueeze(0)
                        for k in reversed(range(1 + CACHE_T))])
    if produce is None:
        slots.copy_(x)  # broadcast into each slot
    else:
        produce(slots)
    return stack


def _as_copies(views: list[torch.Tensor]) -> torch.Tensor:
    """Views of one storage with one shape and strides, whose offsets step evenly, as one view (R, *shape)."""
    first, step = views[0], views[1].storage_offset() - views[0].storage_offset()
    if step <= 0 or any(v.shape != first.shape or v.stride() != first.stride() or
                        v.storage_offset() != first.storage_offset() + r * step for r, v in enumerate(views)):
        raise AssertionError("the stack's slot views do not step evenly")  # a bug: the stack is built here
    return first.as_strided((len(views), *first.shape), (step, *first.stride()), first.storage_offset())


def _empty_stack(positions: int, frame: torch.Tensor) -> torch.Tensor:
    """A stack (positions, 3·C, H, W) for frames like `frame` (C, H, W): each position's three time-tap
    slots side by side, channels-last on CUDA (the layout of cuDNN's fast 2-D convs)."""
    c, h, w = frame.shape
    return torch.empty((positions, (1 + CACHE_T) * c, h, w), dtype=frame.dtype, device=frame.device,
                       memory_format=torch.channels_last if frame.is_cuda else torch.contiguous_format)


def _conv_over_stack(conv: nn.Conv3d, stack: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The 3-tap time conv as one 2-D conv over a stack (T, 3·C, H, W) whose slot k holds each output
    frame's tap-k input frame: the weight tap-major (O, 3·C, kh, kw) → (T, O, H', W')."""
    ph, pw = conv._pad[2], conv._pad[0]  # the spatial padding (CausalConv3d keeps it in _pad)
    weight = conv.weight.transpose(1, 2).flatten(1, 2)  # (O, 3·C, kh, kw): tap k's input channels at k·C
    return F.conv2d(stack, weight, bias, conv.stride[1:], (ph, pw))


def _stacked_input_frame(stack: torch.Tensor, c: int, j: int) -> torch.Tensor:
    """Input frame j (-2 <= j < T) of a `_stacked_window`, (C, H, W): in slot 2 at position j, or for
    the past in slot 2 + j at position 0."""
    return stack[j, CACHE_T * c:] if j >= 0 else stack[0, (CACHE_T + j) * c:(CACHE_T + j + 1) * c]


def convolve_causal_window(conv: nn.Conv3d, window: torch.Tensor, cache: FrameCache,
                           bias: torch.Tensor | None) -> torch.Tensor:
    """The conv over a filled `causal_window` → (B, O, T, H', W'), and the window's last two frames kept
    in `cache` as the next chunk's past."""
    if window.dim() == 4:  # a "stacked2d_filled" stack (2 + T, 3·C, H, W)
        return _convolve_stack(conv, window, cache, bias)
    t = window.shape[2] - CACHE_T
    y = _convolve_window(conv, window, bias)  # (B, O, T, H', W')
    past = cache.get(conv)
    if past is None:
        past = torch.empty_like(window[:, :, :CACHE_T], memory_format=video_layout(window.device))
        cache.set(conv, past)
    past.copy_(window[:, :, t:])
    return y


def _convolve_stack(conv: nn.Conv3d, stack: torch.Tensor, cache: FrameCache,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """`convolve_causal_window` for a `_stacked_window`: one 2-D conv over its T positions with the weight
    tap-major (O, 3·C, kh, kw) → (1, O, T, H', W'); input frames T-2, T-1 kept as the next past."""
    t, c = stack.shape[0] - CACHE_T, stack.shape[1] // (1 + CACHE_T)
    y = _conv_over_stack(conv, stack[:t], bias)  # (T, O, H', W')
    past = cache.get(conv)
    if past is None:
        past = torch.empty((1, c, CACHE_T, *stack.shape[2:]), dtype=stack.dtype, device=stack.device,
                           memory_format=video_layout(stack.device))
        cache.set(conv, past)
    for i, j in enumerate(range(t - CACHE_T, t)):
        past[0, :, i].copy_(_stacked_input_frame(stack, c, j))
    return y.transpose(0, 1).unsqueeze(0)


def _convolve_window(conv: nn.Conv3d, window: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(B, C, 2 + T, H, W) → (B, O, T, H', W'): the 3-tap time conv without time padding."""
    kt, kh, kw = conv.kernel_size
    ph, pw = conv._pad[2], conv._pad[0]  # the spatial padding (CausalConv3d keeps it in _pad)
    mode = WINDOW_CONV
    if mode not in WINDOW_CONVS:
        raise ValueError(f"WINDOW_CONV must be one of {', '.join(map(repr, WINDOW_CONVS))}; got {mode!r}")
    if mode in ("conv3d", "stacked2d_filled") or window.shape[0] != 1 or kt != 3:
        return F.conv3d(window, conv.weight, bias, conv.stride, (0, ph, pw), conv.dilation, conv.groups)
    frames = window[0].transpose(0, 1)  # (2 + T, C, H, W); channels-last when the window is
    t = frames.shape[0] - (kt - 1)
    stride = conv.stride[1:]
    if mode == "taps2d":
        y = F.conv2d(frames[kt - 1:], conv.weight[:, :, kt - 1], bias, stride, (ph, pw))
        for k in range(kt - 1):
            y += F.conv2d(frames[k:k + t], conv.weight[:, :, k], None, stride, (ph, pw))
    elif mode == "stacked2d":
        c = frames.shape[1]
        stacked = _empty_stack(t, frames[0])
        for k in range(kt):
            stacked[:, k * c:(k + 1) * c].copy_(frames[k:k + t])
        y = _conv_over_stack(conv, stacked, bias)
    return y.transpose(0, 1).unsqueeze(0)  # (1, O, T, H', W')
