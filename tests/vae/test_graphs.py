"""CUDA-graph decode: replays equal the eager run bit for bit, a new signature re-captures, at most
`max_graphs` are kept, `release()` frees them. The CUDA cases run where a GPU is (skipped on CPU)."""

from __future__ import annotations

import pytest
import torch

from qwenfast.vae.graphs import DecodeGraphs, graph_key

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def test_cpu_input_is_refused_in_one_line():
    with pytest.raises(ValueError, match="needs a CUDA tensor; got one on cpu"):
        DecodeGraphs()(lambda x: x * 2, torch.ones(3))


def test_max_graphs_is_checked():
    with pytest.raises(ValueError, match="max_graphs must be >= 1"):
        DecodeGraphs(max_graphs=0)


def test_key_tells_shape_dtype_strides_and_context_apart():
    x = torch.zeros(2, 3, 4)
    assert graph_key(x) != graph_key(x.double())
    assert graph_key(x) != graph_key(torch.zeros(2, 3, 5))
    assert graph_key(x) != graph_key(x.transpose(1, 2).contiguous().transpose(1, 2))
    assert graph_key(x, "exact") != graph_key(x, "blend")


@CUDA
def test_replay_equals_eager_and_recaptures_on_new_shapes():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 3, padding=1).cuda()

    def fn(x):
        return torch.nn.functional.silu(conv(x)).sum(1, keepdim=True) * 0.5

    graphs = DecodeGraphs(max_graphs=2)
    with torch.no_grad():
        for shape in [(1, 4, 16, 16), (1, 4, 16, 16), (2, 4, 8, 12), (1, 4, 16, 16), (1, 4, 5, 5)]:
            x = torch.randn(shape, device="cuda")
            eager = fn(x)
            assert torch.equal(graphs(fn, x), eager)
    assert graphs.captures == 3 and len(graphs) == 2  # the third shape pushed the oldest out
    out = graphs(fn, x)
    out.add_(1)  # a caller's output is its own: the next replay does not overwrite it
    assert not torch.equal(graphs(fn, x), out)
    graphs.release()
    assert len(graphs) == 0


def _tiny(device):
    from helpers import tiny_vae

    return tiny_vae(dtype=torch.float32).to(device)


def test_cuda_graph_option_decodes_eagerly_off_cuda():
    from qwenfast import VAEConfig

    vae = _tiny("cpu")
    z = torch.randn(1, 4, 1, 5, 6, generator=torch.Generator().manual_seed(0))
    plain = vae.decode(z)
    vae.vae_config = VAEConfig(cuda_graph=True)
    assert torch.equal(vae.decode(z), plain)
    assert "_decode_graphs" not in vae.__dict__  # nothing captured, nothing held
    vae.release_cuda_graphs()  # a no-op without graphs


@CUDA
def test_cuda_graph_decode_equals_eager_bit_for_bit():
    from qwenfast import VAEConfig

    vae = _tiny("cuda")
    for tiling in (False, True):
        for shape in [(1, 4, 1, 9, 7), (2, 4, 1, 6, 8), (1, 4, 1, 9, 7)]:
            z = torch.randn(shape, device="cuda")
            vae.vae_config = VAEConfig(use_tiling=tiling, exact_tile_sample_size=32)
            with torch.no_grad():
                eager = vae.decode(z[:, :, 0])
                vae.vae_config = VAEConfig(use_tiling=tiling, exact_tile_sample_size=32, cuda_graph=True)
                assert torch.equal(vae.decode(z[:, :, 0]), eager)
    assert vae.__dict__["_decode_graphs"].captures == 4  # (2 shapes) x (2 configs); the repeat replays
    vae.release_cuda_graphs()
    assert "_decode_graphs" not in vae.__dict__
