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


@CUDA
@pytest.mark.parametrize("model", ["qwenimage", "qwenimage21"])
@pytest.mark.parametrize("form", ["direct", "transposed", "subpixel"])
def test_every_vae_and_upsampler_form_captures(model, form):
    """The decode is deterministic and its capture holds no host-to-device copy (the summed upsampler
    weights are recomputed inside the graph from the live weights; the 2.1 VAE's default transposed form
    once failed here, and once replayed up to 1.3e-5 away from eager through cuDNN's atomics)."""
    from helpers import pair21
    from qwenfast import VAEConfig
    from qwenfast.vae import qwen_image

    vae = _tiny("cuda") if model == "qwenimage" else pair21()[1].cuda()
    z = torch.randn(1, vae.z_dim, 1, 6, 5, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    previous, qwen_image.UPSAMPLE_CONV = qwen_image.UPSAMPLE_CONV, form
    try:
        with torch.no_grad():
            vae.vae_config = VAEConfig()
            eager = vae.decode(z)
            assert torch.equal(vae.decode(z), eager)  # deterministic (cuDNN's transposed convs need the flag)
            vae.vae_config = VAEConfig(cuda_graph=True)
            for _ in range(2):
                assert torch.equal(vae.decode(z), eager)
        assert vae.__dict__["_decode_graphs"].captures == 1
    finally:
        qwen_image.UPSAMPLE_CONV = previous
        vae.release_cuda_graphs()


# -- the bookkeeping on the CPU: a stand-in for torch.cuda.CUDAGraph --------------------------------


class _ReplayedOnCPU:
    """Stands in for a captured graph: `replay()` re-runs the captured function on the static input and
    writes its result into the static output in place, as a graph writes into its pool; while it runs
    (capture or replay) `CPUGraphs.active` is set, so a collective inside a segment can be caught."""

    def __init__(self, fn, static_in, static_out):
        self.fn, self.static_in, self.static_out = fn, static_in, static_out

    def replay(self):
        with CPUGraphs.running():
            out = self.fn(self.static_in)
        for static, new in zip(_as_list(self.static_out), _as_list(out)):
            static.copy_(new)


def _as_list(out):
    return [out] if isinstance(out, torch.Tensor) else list(out)


class CPUGraphs(DecodeGraphs):
    """DecodeGraphs whose graphs are `_ReplayedOnCPU`: the same keys, bound, eviction, call counting,
    static input and output copies, on any device."""

    active = False

    @classmethod
    def running(cls):
        import contextlib

        @contextlib.contextmanager
        def flag():
            cls.active = True
            try:
                yield
            finally:
                cls.active = False

        return flag()

    def applies(self, x):
        return True

    def _capture(self, fn, x):
        from qwenfast.vae.graphs import _Captured

        static_in = x.clone()
        with CPUGraphs.running():
            static_out = fn(static_in)
        return _Captured(_ReplayedOnCPU(fn, static_in, static_out), static_in, static_out)


def _counting(fn):
    calls = []

    def wrapped(x):
        calls.append(tuple(x.shape))
        return fn(x)

    return wrapped, calls


def test_capture_on_the_second_call_when_the_shape_repeats():
    graphs = CPUGraphs(max_graphs=2)
    fn, calls = _counting(lambda x: x * 2 + 1)
    x = torch.arange(6.0).view(2, 3)
    assert torch.equal(graphs(fn, x, capture_call=2), x * 2 + 1)  # first call: eager, nothing held
    assert (graphs.eager_calls, graphs.captures, len(graphs)) == (1, 0, 0)
    assert torch.equal(graphs(fn, x + 1, capture_call=2), (x + 1) * 2 + 1)  # second: captured and replayed
    assert (graphs.eager_calls, graphs.captures, graphs.replays, len(graphs)) == (1, 1, 1, 1)
    assert torch.equal(graphs(fn, x - 1, capture_call=2), (x - 1) * 2 + 1)  # later: replays only
    assert (graphs.captures, graphs.replays) == (1, 2)
    out = graphs(fn, x, capture_call=2)
    out.add_(100)  # a caller's output is its own copy of the static output
    assert torch.equal(graphs(fn, x, capture_call=2), x * 2 + 1)
    assert torch.equal(graphs(fn, torch.ones(4), capture_call=1), torch.full((4,), 3.0))  # capture_call=1: at once
    assert graphs.captures == 2
    with pytest.raises(ValueError, match="capture_call must be >= 1; got 0"):
        graphs(fn, x, capture_call=0)


def test_one_off_shapes_neither_capture_nor_evict_and_the_bound_holds():
    graphs = CPUGraphs(max_graphs=2, max_seen=3)
    fn = lambda x: x.sum(0, keepdim=True)  # noqa: E731
    a, b = torch.ones(2, 2), torch.ones(3, 2)
    for x in (a, a, b, b):
        graphs(fn, x, capture_call=2)
    assert (graphs.captures, len(graphs)) == (2, 2)
    for n in range(4, 10):  # six one-off shapes: eager, the two graphs stay
        graphs(fn, torch.ones(n, 2), capture_call=2)
    assert (graphs.captures, len(graphs), graphs.eager_calls) == (2, 2, 8)
    assert len(graphs._seen) == 3  # at most max_seen counted signatures
    graphs(fn, a, capture_call=2), graphs(fn, b, capture_call=2)
    assert (graphs.captures, graphs.replays) == (2, 4)  # both still held: replayed, not re-captured
    c = torch.ones(20, 2)
    graphs(fn, c, capture_call=2), graphs(fn, c, capture_call=2)  # a repeated new shape: captured ...
    assert (graphs.captures, len(graphs)) == (3, 2)  # ... and the least recently used graph (a) goes
    graphs(fn, b, capture_call=2)
    assert graphs.captures == 3
    graphs(fn, a, capture_call=2)  # a was evicted: counted afresh (eager), not replayed
    assert graphs.captures == 3 and graphs.eager_calls == 10


def test_release_frees_graphs_and_counts():
    graphs = CPUGraphs(max_graphs=2)
    x = torch.ones(3)
    for _ in range(3):
        graphs(lambda x: x + 1, x, capture_call=2)
    assert len(graphs) == 1
    graphs.release()
    assert len(graphs) == 0 and not graphs._seen
    graphs(lambda x: x + 1, x, capture_call=2)
    assert (graphs.captures, len(graphs)) == (1, 0)  # counted again from the first call


def test_tuple_outputs_are_cloned_and_other_outputs_refused():
    graphs = CPUGraphs()
    x = torch.arange(4.0)
    first, second = graphs(lambda x: (x + 1, x[:2] * 3), x)
    assert torch.equal(first, x + 1) and torch.equal(second, x[:2] * 3)
    with pytest.raises(TypeError, match="a tensor or a tuple/list of tensors; got dict"):
        graphs(lambda x: {"y": x}, torch.ones(5))


def test_vae_decode_with_repeat_policy_captures_from_the_second_call():
    from qwenfast import VAEConfig

    vae = _tiny("cpu")
    z = torch.randn(1, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    plain = vae.decode(z)
    graphs = vae.__dict__["_decode_graphs"] = CPUGraphs(max_graphs=2)
    assert torch.equal(vae.decode(z), plain) and graphs.eager_calls + graphs.captures == 0  # cuda_graph off: unused
    vae.vae_config = VAEConfig(cuda_graph=True, cuda_graph_capture_call=2)
    assert torch.equal(vae.decode(z), plain)
    assert (graphs.eager_calls, graphs.captures) == (1, 0)
    for _ in range(2):
        assert torch.equal(vae.decode(z), plain)  # bit for bit the eager decode
    assert (graphs.captures, graphs.replays) == (1, 2)
    moved = next(vae.parameters())
    moved.data = moved.data.clone()  # weights at another address (as `.to()` or an offload hook leaves them)
    assert torch.equal(vae.decode(z), plain)
    assert (graphs.captures, graphs.replays, graphs.eager_calls) == (1, 2, 2)  # not a replay of the old graph
    vae.release_cuda_graphs()
    assert "_decode_graphs" not in vae.__dict__ and len(graphs) == 0


# -- each rank's segments of a parallel decode, rehearsed on the CPU --------------------------------


@pytest.mark.parametrize("name,shape,fields,segments", [
    ("patch mid", (1, 4, 1, 30, 9), dict(parallel_decode_mode="patch", patch_halo="mid"), 2),
    ("tiled exact", (2, 4, 1, 13, 21), dict(parallel_decode_mode="tiled", exact_tile_sample_size=64), 2),
    ("patch auto halo, video: level", (1, 4, 3, 24, 6), dict(parallel_decode_mode="patch"), 2),
    ("auto", (1, 4, 1, 13, 21), dict(parallel_decode_mode="auto"), None),
])
def test_parallel_segments_replay_equal_eager_per_rank_with_collectives_outside(name, shape, fields, segments):
    """Every rank r of 3 (RehearsalComm: r's own kernels and shapes): with cuda_graph on, its global and
    local segments are captured once per (rank, shape) and replayed bit for bit equal to the eager
    decode, and no collective runs inside a segment (the comm refuses while a segment runs)."""
    from qwenfast import VAEConfig
    from qwenfast.parallel.dispatch import decode_parallel
    from qwenfast.parallel.rehearsal import RehearsalComm

    from helpers import latent, tiny_vae

    class NoCollectiveInSegments(RehearsalComm):
        def _count(self, sent, received):
            assert not CPUGraphs.active, "a collective ran inside a captured segment"
            super()._count(sent, received)

    vae, z, world = tiny_vae(), latent(shape), 3
    graphs = vae.__dict__["_segment_graphs"] = CPUGraphs(max_graphs=2 * world)
    whole = vae.__dict__["_decode_graphs"] = CPUGraphs(max_graphs=2)
    with torch.no_grad():
        for r in range(world):
            vae.vae_config = VAEConfig(use_parallel_decode=True, **fields)
            eager = decode_parallel(vae, z, comm=NoCollectiveInSegments(r, world))
            mode = vae.last_parallel_stats["mode"]
            vae.vae_config = VAEConfig(use_parallel_decode=True, cuda_graph=True, **fields)
            for _ in range(2):
                assert torch.equal(decode_parallel(vae, z, comm=NoCollectiveInSegments(r, world)), eager), (name, r)
    if segments is None:  # auto on a tiny latent: every rank decodes alone, as one whole-decode graph
        assert mode == "replicated" and whole.captures == 1 and graphs.captures == 0
        return
    assert graphs.captures == segments * world  # one graph per segment and rank: ranks never share one
    assert graphs.replays == 2 * segments * world and len(graphs) == segments * world


def test_accelerate_policy_is_graphs_when_shapes_repeat():
    """`accelerate(pipe)` (its `when_shapes_repeat`): graphs from the second decode of a shape, over the
    given config; a config with graphs on is kept; re-calling with None keeps a routed VAE's config."""
    from qwenfast import VAEConfig
    from qwenfast.integrations.diffusers import when_shapes_repeat

    plain = torch.nn.Module()
    assert when_shapes_repeat(None, plain) == VAEConfig(cuda_graph=True, cuda_graph_capture_call=2)
    tiled = when_shapes_repeat(VAEConfig(use_tiling=True), plain)
    assert (tiled.use_tiling, tiled.cuda_graph, tiled.cuda_graph_capture_call) == (True, True, 2)
    mine = VAEConfig(cuda_graph=True)
    assert when_shapes_repeat(mine, plain) is mine  # capture on the first call, as asked
    routed = torch.nn.Module()
    routed.__dict__["_qwenfast_vae"] = object()
    assert when_shapes_repeat(None, routed) is None
    assert VAEConfig().cuda_graph is False  # direct VAE use: eager unless asked


@CUDA
@pytest.mark.parametrize("shape,fields", [
    ((1, 4, 1, 30, 9), dict(parallel_decode_mode="patch", patch_halo="mid")),
    ((2, 4, 1, 13, 21), dict(parallel_decode_mode="tiled", exact_tile_sample_size=64)),
    ((1, 4, 3, 24, 6), dict(parallel_decode_mode="patch", patch_halo="level")),
])
def test_parallel_segments_replayed_on_cuda_equal_eager_bit_for_bit(shape, fields):
    """Real CUDA graphs of each rehearsed rank's segments (capture from the second call, as accelerate
    does): every replay equals the rank's eager share bit for bit."""
    from qwenfast import VAEConfig
    from qwenfast.parallel.dispatch import decode_parallel
    from qwenfast.parallel.rehearsal import RehearsalComm

    vae, world = _tiny("cuda"), 3
    z = torch.randn(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        for r in range(world):
            vae.vae_config = VAEConfig(use_parallel_decode=True, **fields)
            eager = decode_parallel(vae, z, comm=RehearsalComm(r, world, "cuda"))
            vae.vae_config = VAEConfig(use_parallel_decode=True, cuda_graph=True, cuda_graph_capture_call=2, **fields)
            for _ in range(3):  # eager, captured and replayed, replayed
                assert torch.equal(decode_parallel(vae, z, comm=RehearsalComm(r, world, "cuda")), eager), r
    graphs = vae.__dict__["_segment_graphs"]
    assert graphs.captures == 2 * world and graphs.eager_calls == 2 * world
    vae.release_cuda_graphs()
    assert "_segment_graphs" not in vae.__dict__
