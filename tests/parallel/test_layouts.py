"""The layout every conv sees, as on a GPU: channels-last (3-D for video) end to end, also after the
parallel paths' row exchanges and the encoder's time downsampling. Run on the `meta` device under the
memory model's `cuda_like()` (meta tensors take CUDA's layout decisions), so it needs no GPU: a conv
handed a plain NCHW tensor on CUDA runs cuDNN's slow path or layout transforms."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import TINY, TINY21, load_benchmark
from qwenfast.config import VAEConfig
from qwenfast.parallel.patch import parallel_patch_decode
from qwenfast.parallel.rehearsal import RehearsalComm

memory_model = load_benchmark("memory_model")


class ConvInputs(TorchDispatchMode):
    """Records, per convolution, whether its input has the channels innermost (or one channel), and gives
    each meta conv output the layout cuDNN would (`memory_model.cuda_strides`). The 1x1 post-quant conv
    reading the latent as the caller gave it (NCHW; a few KiB) is left out."""

    def __init__(self, z_dim: int):
        super().__init__()
        self.z_dim = z_dim
        self.layouts: list[bool] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.convolution:
            x, w = args[0], args[1]
            if not (x.shape[1] == self.z_dim and w.shape[-1] == 1):
                self.layouts.append(x.shape[1] == 1 or x.stride(1) == 1)
        return memory_model.cuda_strides(func, args, kwargs, func(*args, **(kwargs or {})))


def conv_layouts(fn, z_dim: int = 4) -> list[bool]:
    with memory_model.cuda_like(), ConvInputs(z_dim) as spy:
        fn()
    return spy.layouts


CASES = [("qwenimage", 1), ("qwenimage", 3), ("qwenimage21", 1)]  # (model, latent frames)


def meta_vae(model: str):
    if model == "qwenimage21":
        return memory_model.meta_vae21(torch.bfloat16, TINY21)
    return memory_model.meta_qwen_vae(torch.bfloat16, TINY)


@torch.no_grad()
@pytest.mark.parametrize("halo", ["level", "mid"])
@pytest.mark.parametrize("model, frames", CASES)
def test_every_rank_convolves_channels_last_in_patch(halo, model, frames):
    """`level` once handed every level after the first an NCHW tensor (torch.cat of the received rows
    and the band), on every rank with a neighbour."""
    vae = meta_vae(model)
    cfg = VAEConfig(use_parallel_decode=True, parallel_decode_mode="patch", patch_halo=halo)
    z = torch.empty(1, vae.z_dim, frames, 40, 9, device="meta", dtype=torch.bfloat16)
    for rank in range(3):  # rank 1 has neighbours both sides (the strategy itself: the header checks read values)
        layouts = conv_layouts(lambda: parallel_patch_decode(vae, z, RehearsalComm(rank, 3, "meta"), cfg), vae.z_dim)
        assert layouts and all(layouts), f"rank {rank}: {layouts.count(False)} of {len(layouts)} convs not channels-last"


@torch.no_grad()
@pytest.mark.parametrize("model, frames", [("qwenimage", 1), ("qwenimage", 9), ("qwenimage21", 1)])
def test_encode_convolves_channels_last(model, frames):
    """The Qwen-Image VAE's encoder once ran in its input's layout: an image (or a video's first
    frame) went through it in NCHW on a GPU."""
    vae = meta_vae(model)
    x = torch.empty(1, vae.in_channels_pixels if model == "qwenimage21" else 3, frames, 32, 24, device="meta",
                    dtype=torch.bfloat16)
    layouts = conv_layouts(lambda: vae.encode(x), vae.z_dim)
    assert layouts and all(layouts), f"{layouts.count(False)} of {len(layouts)} convs not channels-last"


@pytest.mark.parametrize("fmt, dim", [(torch.channels_last, -2), (torch.channels_last_3d, 2), (torch.channels_last_3d, -2)])
def test_cat_keeping_layout_equals_cat_in_the_layout_of_like(fmt, dim):
    from qwenfast.vae.surface import cat_keeping_layout, memory_format_of

    g = torch.Generator().manual_seed(0)
    shape = (2, 5, 4, 6) if fmt == torch.channels_last else (2, 5, 3, 4, 6)
    x = torch.randn(shape, generator=g, dtype=torch.float64).contiguous(memory_format=fmt)
    band = x.narrow(dim, 1, 2)  # a crop of a channels-last tensor: torch.cat would return NCHW
    assert memory_format_of(band) == fmt and memory_format_of(x.contiguous()) == torch.contiguous_format
    edge = torch.randn(band.shape, generator=g, dtype=torch.float64)  # received rows: plain contiguous
    for parts in ([edge, band], [band, edge], [edge, band, edge]):
        out = cat_keeping_layout(parts, dim, like=band)
        assert torch.equal(out, torch.cat(parts, dim)) and out.is_contiguous(memory_format=fmt)
    assert cat_keeping_layout([band], dim, like=band) is band
    with pytest.raises(IndexError):  # a dim out of range: torch.cat's error, not a cat along dim % ndim
        cat_keeping_layout([band, band], band.dim(), like=band)
    with pytest.raises(ValueError, match="parts on \\['cpu'\\], like on meta"):
        cat_keeping_layout([band, band], dim, like=torch.empty(1, device="meta"))


SMALL_TILES = dict(exact_tile_sample_size=32, tile_sample_min_height=32, tile_sample_min_width=32,
                   tile_sample_stride_height=24, tile_sample_stride_width=24)


@torch.no_grad()
@pytest.mark.parametrize("model, frames, path", [
    ("qwenimage", 1, "exact"), ("qwenimage", 1, "blend"), ("qwenimage", 1, "parallel tiled"),
    ("qwenimage", 3, "exact"), ("qwenimage21", 1, "exact"), ("qwenimage21", 1, "blend"),
])
def test_tiled_paths_convolve_channels_last(model, frames, path):
    """The tiles are crops of channels-last tensors: each tile's convs keep the layout."""
    from qwenfast.parallel.tiled import parallel_tiled_decode

    vae = meta_vae(model)
    z = torch.empty(1, vae.z_dim, frames, 40, 9, device="meta", dtype=torch.bfloat16)
    if path == "parallel tiled":
        cfg = VAEConfig(use_parallel_decode=True, parallel_decode_mode="tiled", **SMALL_TILES)
        fn = lambda: parallel_tiled_decode(vae, z, RehearsalComm(1, 3, "meta"), cfg)  # noqa: E731
    else:
        vae.vae_config = VAEConfig(use_tiling=True, tiling=path, **SMALL_TILES)
        fn = lambda: vae.decode(z)  # noqa: E731
    layouts = conv_layouts(fn, vae.z_dim)
    assert layouts and all(layouts), f"{layouts.count(False)} of {len(layouts)} convs not channels-last"


@torch.no_grad()
def test_filled_stack_video_decode_convolves_channels_last():
    """`video.WINDOW_CONV = "stacked2d_filled"`: the stacks the norm writes are channels-last on CUDA."""
    from qwenfast.vae import video

    vae = meta_vae("qwenimage")
    vae.vae_config = VAEConfig()
    z = torch.empty(1, vae.z_dim, 3, 40, 9, device="meta", dtype=torch.bfloat16)
    previous, video.WINDOW_CONV = video.WINDOW_CONV, "stacked2d_filled"
    try:
        layouts = conv_layouts(lambda: vae.decode(z), vae.z_dim)
    finally:
        video.WINDOW_CONV = previous
    assert layouts and all(layouts), f"{layouts.count(False)} of {len(layouts)} convs not channels-last"
