"""The Triton kernels themselves against the PyTorch path.

Without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 and the kernels run on CPU tensors through
Triton's interpreter; on a GPU the same tests run on CUDA (set QWENFAST_TEST_DEVICE=cuda).
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from qwenfast import ops  # noqa: E402
from qwenfast.ops import custom_op  # noqa: E402
from qwenfast.ops import modulate as M  # noqa: E402
from qwenfast.ops.triton import modulate as T  # noqa: E402

from _device import DEVICE  # noqa: E402
from _launches import LaunchRecorder  # noqa: E402
from _modulate_cases import make_case, oracle_modulate, params_of, rel_err, sel64  # noqa: E402

if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("CPU tensors need TRITON_INTERPRET=1 (set by tests/conftest.py)", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Two results rounded to the same dtype differ by an ulp where fp32 intermediates differ in the last
# bit (fused multiply-add, reduction order): relative tolerance of about two ulps.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}


def case(**kw):
    return make_case(**kw, device=DEVICE)


def assert_close(out, ref, dtype):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])


def flat(c, with_gate=True):
    """(scale0, shift0, gate0, scale1, shift1, gate1, index): the case's parameters in the launchers'
    order (set 1 only where the case has an index)."""
    sel = c["index"] is not None
    return (c["scale0"], c["shift0"], c["gate0"] if with_gate else None, c["scale1"] if sel else None,
            c["shift1"] if sel else None, c["gate1"] if with_gate and sel else None, c["index"])


def run_ln(c, with_gate=True, config=None):
    if config is not None:
        return T.layer_norm_modulate_fwd(c["x"], c["weight"], c["bias"], *flat(c, with_gate), 1e-6, config=config)
    return T.layer_norm_modulate_triton(c["x"], params_of(c), weight=c["weight"], bias=c["bias"], with_gate=with_gate)


def check_gate(gate, gate_ref, exact):
    if exact:  # a selection of stored values: bit-exact
        torch.testing.assert_close(gate, gate_ref, rtol=0, atol=0)
    else:  # rounded from a wider dtype: Triton's interpreter truncates fp32 -> bf16, CUDA rounds to nearest
        torch.testing.assert_close(gate, gate_ref, rtol=2**-7, atol=0)


def check_ln(c, dtype, config=None, gate_exact=True):
    y, gate = run_ln(c, config=config)
    y_ref, gate_ref = M.layer_norm_modulate_native(c["x"], params_of(c), weight=c["weight"], bias=c["bias"],
                                                   with_gate=True)
    assert_close(y, y_ref, dtype)
    check_gate(gate, gate_ref, gate_exact)


def check_residual(c, dtype, rgate_full=False, config=None, gate_exact=True):
    rp = params_of(c)
    if rgate_full:  # one full (B, L, C) gate, applied as given
        rp = ops.Modulation(gate=M.select01(c["index"], c["gate0"], c["gate1"]).expand(c["x"].shape).contiguous())
    kw = dict(weight=c["weight"], bias=c["bias"], with_gate=True)
    if config is None:
        y, r, gate = T.residual_layer_norm_modulate_triton(c["x"], c["residual"], rp, params_of(c), **kw)
    else:
        r0, r1, _ = M.parameter_sets(rp)
        y, r, gate = T.residual_layer_norm_modulate_fwd(c["x"], c["residual"], r0.gate, r1 and r1.gate, c["weight"],
                                                        c["bias"], *flat(c), 1e-6, config=config)
    _, r_ref, gate_ref = M.residual_layer_norm_modulate_native(c["x"], c["residual"], rp, params_of(c), **kw)
    assert_close(r, r_ref, dtype)
    # The LayerNorm part on the kernel's own residual_out (an ulp of difference in residual_out would
    # otherwise move y by more than y's own rounding).
    y_ref, _ = M.layer_norm_modulate_native(r, params_of(c), weight=c["weight"], bias=c["bias"])
    assert_close(y, y_ref, dtype)
    check_gate(gate, gate_ref, gate_exact)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index", ["zeros", "ones", "mixed", "prefix", "none"])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_modulate_matrix(dtype, index, affine):
    # 2 x 13 tokens: not a multiple of the rows per program; C = 96 is not a power of two.
    check_ln(case(B=2, L=13, C=96, dtype=dtype, index=index, affine=affine, seed=11), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index", ["mixed", "prefix", "none"])
@pytest.mark.parametrize("rgate_full", [False, True])
def test_residual_matrix(dtype, index, rgate_full):
    check_residual(case(B=2, L=9, C=80, dtype=dtype, index=index, seed=12), dtype, rgate_full)


@pytest.mark.parametrize("C,L", [(3072, 3), (1536, 5), (97, 1), (1, 4), (9000, 2)])
def test_channel_counts(C, L):
    # 9000 > MAX_TILE: the chunked kernel (the default config for long rows).
    dtype = torch.bfloat16
    c = case(B=2, L=L, C=C, dtype=dtype, index="mixed", seed=13)
    check_ln(c, dtype)
    check_residual(c, dtype)


@pytest.mark.parametrize("rows,block_c", [(1, 32), (2, 64)])
def test_chunked_kernel_at_small_C(rows, block_c):
    # Force the chunked kernel (3 passes over C in chunks): C = 150 is not a multiple of the chunk.
    cfg = T.LaunchConfig(rows=rows, block_c=block_c, num_warps=1, chunked=True)
    for dtype in (torch.float32, torch.bfloat16):
        c = case(B=2, L=7, C=150, dtype=dtype, index="mixed", seed=14)
        check_ln(c, dtype, config=cfg)
        check_residual(c, dtype, config=cfg)


def test_whole_rows_several_per_program():
    cfg = T.LaunchConfig(rows=2, block_c=128, num_warps=2, chunked=False)
    for dtype in (torch.float32, torch.bfloat16):
        c = case(B=2, L=9, C=96, dtype=dtype, index="mixed", seed=26)
        check_ln(c, dtype, config=cfg)
        check_residual(c, dtype, config=cfg)
    with pytest.raises(ValueError, match="LaunchConfig.rows must be a power of two, got 3"):
        run_ln(c, config=T.LaunchConfig(3, 128, 2, False))


@pytest.mark.parametrize("chunked", [False, True])
def test_large_offset_and_constant_rows(chunked):
    cfg = T.LaunchConfig(1, 64, 1, True) if chunked else None
    c = case(B=2, L=6, C=256, dtype=torch.float32, index="mixed", offset=1e4, constant_rows=True, affine=False,
             seed=15)
    y, _ = run_ln(c, config=cfg)
    # Near 1e4 the fp32 mean itself is rounded (~3e-4 relative on y, in a different order than the
    # reference's): judge against fp64. A one-pass variance would be off by O(1) (see the native test).
    ref = oracle_modulate(c["x"], c["weight"], c["bias"], sel64(c["scale0"], c["scale1"], c["index"], 2, 6),
                          sel64(c["shift0"], c["shift1"], c["index"], 2, 6))
    assert rel_err(y, ref) < 2e-3
    shift = M.select01(c["index"], c["shift0"], c["shift1"])
    torch.testing.assert_close(y[:, ::2], shift[:, ::2], rtol=0, atol=1e-6)  # zero variance -> y = shift


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64, torch.bool])
def test_index_dtypes_and_strided_inputs(index_dtype):
    c = case(B=2, L=6, C=64, dtype=torch.bfloat16, index="mixed", index_dtype=index_dtype, seed=16)
    # x and residual strided over L (stride(1) = 2C), index strided too: no copies of x needed.
    big = torch.randn(2, 12, 64, device=DEVICE, dtype=torch.bfloat16)
    c["x"], c["residual"] = big[:, ::2], big[:, 1::2]
    c["index"] = torch.stack([c["index"], c["index"]], dim=-1)[..., 0]
    assert c["index"].stride(1) == 2 and c["scale0"].stride(0) == 6 * 64
    check_ln(c, torch.bfloat16)
    check_residual(c, torch.bfloat16)
    out = T.gated_residual_triton(c["x"], c["residual"], params_of(c))
    assert_close(out, M.gated_residual_native(c["x"], c["residual"], params_of(c)), torch.bfloat16)


def test_residual_and_parameters_of_other_strides():
    # residual contiguous while x is strided, parameter rows of different row strides: the launcher
    # brings them to one layout (copies), same results.
    c = case(B=2, L=6, C=64, dtype=torch.float32, index="mixed", seed=29)
    c["x"] = torch.randn(2, 12, 64, device=DEVICE)[:, ::2]
    c["scale1"] = c["scale1"].contiguous()
    assert c["scale1"].stride(0) != c["scale0"].stride(0) and c["x"].stride() != c["residual"].stride()
    check_ln(c, torch.float32)
    check_residual(c, torch.float32)
    c["gate1"] = c["gate1"].contiguous()
    out = T.gated_residual_triton(c["x"], c["residual"], params_of(c))
    assert_close(out, M.gated_residual_native(c["x"], c["residual"], params_of(c)), torch.float32)


def test_gated_residual_kernel():
    for dtype in DTYPES:
        c = case(B=3, L=5, C=72, dtype=dtype, index="mixed", seed=17)
        for p in (params_of(c), params_of(c, None)):
            out = T.gated_residual_triton(c["x"], c["residual"], p)
            assert_close(out, M.gated_residual_native(c["x"], c["residual"], p), dtype)


def test_one_selected_side_of_the_residual_op():
    # The residual gate picked per token while the norm's parameters are one set, and the reverse.
    c = case(B=2, L=6, C=48, dtype=torch.bfloat16, index="mixed", seed=28)
    sel, plain = params_of(c), params_of(c, None)
    for rp, p in ((sel, plain), (plain, sel)):
        y, r, _ = T.residual_layer_norm_modulate_triton(c["x"], c["residual"], rp, p)
        _, r_ref, _ = M.residual_layer_norm_modulate_native(c["x"], c["residual"], rp, p)
        assert_close(r, r_ref, torch.bfloat16)
        assert_close(y, M.layer_norm_modulate_native(r, p)[0], torch.bfloat16)


def test_int64_offsets_past_2_31_elements():
    # x's second batch starts 2**31 elements into its storage: the kernel must address past 2**31. The
    # storage is allocated but untouched except for the two small slabs written (pages map lazily).
    # (Outputs past 2**31 elements need a real 4 GB tensor: benchmarks/bench_modulate.py checks that
    # on the GPU.)
    if DEVICE != "cpu":
        pytest.skip("on a GPU, see benchmarks/bench_modulate.py --check")
    L, C = 3, 64
    storage = torch.empty(2**31 + L * C, dtype=torch.float16)
    x = storage.as_strided((2, L, C), (2**31, C, 1))
    c = case(B=2, L=L, C=C, dtype=torch.float16, index="mixed", seed=18)
    x.copy_(c["x"])
    c["x"] = x
    check_ln(c, torch.float16)
    del storage, x, c


def test_empty_inputs_launch_nothing(monkeypatch):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("launched a kernel for an empty input")

    monkeypatch.setattr(T, "_norm_modulate_kernel", NoLaunch())
    monkeypatch.setattr(T, "_gated_residual_kernel", NoLaunch())
    for L, C in ((0, 3072), (4, 0)):
        c = case(B=2, L=L, C=C, dtype=torch.bfloat16, index="mixed", seed=19)
        y, gate = run_ln(c)
        y2, r, gate2 = T.residual_layer_norm_modulate_triton(c["x"], c["residual"], params_of(c), params_of(c))
        out = T.gated_residual_triton(c["x"], c["residual"], params_of(c))
        assert y.shape == gate.shape == y2.shape == r.shape == out.shape == (2, L, C) and gate2 is None


def test_errors_on_the_triton_path(monkeypatch):
    c = case(B=2, L=5, C=12, index="mixed", seed=20)
    with pytest.raises(ValueError, match=r"scale0 must be \(B, C\)"):
        torch.ops.qwenfast.layer_norm_modulate(c["x"], None, None, c["scale0"][:, :5], c["shift0"], None, c["scale1"],
                                               c["shift1"], None, c["index"], 1e-6)
    with pytest.raises(ValueError, match="scale1 .parameter set 1. must be given"):
        torch.ops.qwenfast.layer_norm_modulate(c["x"], None, None, c["scale0"], c["shift0"], None, None,
                                               c["shift1"], None, c["index"], 1e-6)
    with pytest.raises(TypeError, match="index must be int32, int64 or bool"):
        torch.ops.qwenfast.gated_residual(c["x"], c["residual"], c["gate0"], c["gate1"], c["index"].float())
    with pytest.raises(ValueError, match="residual must have x's shape"):
        torch.ops.qwenfast.residual_layer_norm_modulate(c["x"], c["residual"][:1], c["gate0"], None, None, None,
                                                        c["scale0"], c["shift0"], None, None, None, None, None, 1e-6)
    # The module checks before it dispatches, whichever path it picks.
    monkeypatch.setattr(custom_op, "choose_backend", lambda device, has_triton=None: "cuda")
    mod = ops.FusedLayerNormScaleShiftGateSelect01()
    assert mod.dispatch(c["x"]) == mod.forward_cuda
    with pytest.raises(ValueError, match=r"index must be \(B, L\)"):
        mod(c["x"], None, None, c["scale0"], c["shift0"], c["gate0"], c["scale1"], c["shift1"], c["gate1"],
            c["index"][:, :2], 1e-6)


COMPATIBLE = ["FusedLayerNormScaleShiftGateSelect01", "FusedResidualLayerNormScaleShiftGateSelect01",
              "FusedLayerNormScaleShiftGate", "FusedResidualLayerNormScaleShiftGate"]


def compatible_args(c, name):
    full_gate = c["gate0"][:, None, :].expand(c["x"].shape)
    return {
        "FusedLayerNormScaleShiftGateSelect01": (c["x"], c["weight"], c["bias"], c["scale0"], c["shift0"], c["gate0"],
                                                 c["scale1"], c["shift1"], c["gate1"], c["index"], 1e-6),
        "FusedResidualLayerNormScaleShiftGateSelect01": (c["x"], c["residual"], full_gate, c["weight"], c["bias"],
                                                         c["scale0"], c["shift0"], c["gate0"], c["scale1"], c["shift1"],
                                                         c["gate1"], c["index"], 1e-6),
        "FusedLayerNormScaleShiftGate": (c["x"], None, None, c["scale0"], c["shift0"], c["gate0"], 1e-6),
        "FusedResidualLayerNormScaleShiftGate": (c["x"], c["residual"], c["gate0"], None, None, c["scale0"],
                                                 c["shift0"], c["gate1"], 1e-6),
    }[name]


@pytest.mark.parametrize("name", COMPATIBLE)
def test_compatible_modules_on_the_triton_path_match_native(monkeypatch, name):
    c = case(B=2, L=6, C=48, dtype=torch.bfloat16, index="mixed", seed=21)
    mod = getattr(ops, name)()
    args = compatible_args(c, name)
    monkeypatch.setattr(custom_op, "choose_backend", lambda device, has_triton=None: "cuda")
    fused = mod(*args)
    monkeypatch.setattr(custom_op, "choose_backend", lambda device, has_triton=None: "native")
    native = mod(*args)
    assert len(native) == len(fused)
    for u, v in zip(fused, native):
        assert_close(u, v, torch.bfloat16)
    for u, v in zip(mod.forward_triton(*args), fused):  # the tests' entry point: the same kernel path
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_opcheck():
    c = case(B=2, L=5, C=40, dtype=torch.float32, index="mixed", seed=22)
    torch.library.opcheck(torch.ops.qwenfast.layer_norm_modulate.default,
                          (c["x"], c["weight"], c["bias"], c["scale0"], c["shift0"], c["gate0"], c["scale1"],
                           c["shift1"], c["gate1"], c["index"], 1e-6))
    torch.library.opcheck(torch.ops.qwenfast.residual_layer_norm_modulate.default,
                          (c["x"], c["residual"], c["gate0"], c["gate1"], None, None, c["scale0"], c["shift0"], None,
                           c["scale1"], c["shift1"], None, c["index"], 1e-6))
    torch.library.opcheck(torch.ops.qwenfast.gated_residual.default,
                          (c["x"], c["residual"], c["gate0"], None, None))


def test_compile_keeps_one_graph():
    # fullgraph=True fails on any graph break; aot_eager needs no C++ compiler on the test machine.
    c = case(B=1, L=4, C=32, dtype=torch.float32, index="mixed", seed=23)
    p = params_of(c)

    def block(x, residual):
        y, r, _ = T.residual_layer_norm_modulate_triton(x, residual, p, p)
        return T.gated_residual_triton(y, r, p)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(c["x"], c["residual"]), block(c["x"], c["residual"]), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["native", "cuda"])
def test_compile_public_api_fullgraph(monkeypatch, backend):
    # The modules' checks and per-call dispatch trace without a graph break, on either path.
    monkeypatch.setattr(custom_op, "choose_backend", lambda device, has_triton=None: backend)
    c = case(B=2, L=5, C=32, dtype=torch.float32, index="mixed", seed=24)
    sel_gate = ops.FusedLayerNormScaleShiftGateSelect01()
    p = params_of(c)

    def block(x, residual):
        y, r = ops.residual_layer_norm_modulate(x, residual, p, p)
        y2, g = sel_gate(y, None, None, c["scale0"], c["shift0"], c["gate0"], c["scale1"], c["shift1"], c["gate1"],
                         c["index"], 1e-6)
        return ops.gated_residual(y2, r, p), g

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    for u, v in zip(compiled(c["x"], c["residual"]), block(c["x"], c["residual"])):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_parameter_sets_of_different_dtypes():
    # Set 0 in bf16, set 1 in fp32 (promoted exactly in the launcher; the kernel picks by address).
    c = case(B=2, L=7, C=64, dtype=torch.bfloat16, index="mixed", seed=25)
    for k in ("scale1", "shift1", "gate1"):
        c[k] = c[k].float() + 1e-3  # not representable in bf16: a lossy cast would show
    check_ln(c, torch.bfloat16, gate_exact=False)
    check_residual(c, torch.bfloat16, gate_exact=False)


def test_row_alignment_of_picked_parameters():
    # The kernel tells the compiler how aligned the picked rows are: measured, never assumed.
    mod = torch.zeros(4, 6 * 64 + 8, dtype=torch.bfloat16, device=DEVICE)  # row stride 784 B: 16-aligned
    assert T._row_alignment(mod[:2, :64], mod[2:, 64:128]) == 16
    assert T._row_alignment(mod[:2, 4:68]) == 8  # 8-byte offset
    assert T._row_alignment(mod[:2, 1:65], None) == 2  # odd element offset
    assert T._row_alignment(mod[:, :64].float()[:1, 1:]) == 4  # one row: only the pointer counts
    odd = torch.zeros(4, 6 * 64 + 1, dtype=torch.bfloat16, device=DEVICE)  # row stride 770 B
    assert T._row_alignment(odd[:2, :64]) == 2


def test_picked_rows_at_odd_offsets():
    # Parameter rows 2 bytes aligned (views at an odd element offset): the measured hint is 2, the
    # results right (on CUDA a wrong 16-byte hint would read the wrong elements).
    c = case(B=2, L=9, C=96, dtype=torch.bfloat16, index="mixed", seed=27)
    mod = torch.randn(4, 6 * 96 + 1, device=DEVICE).to(torch.bfloat16)[:, 1:]
    for k, (rows, j) in {"scale0": (slice(0, 2), 0), "shift0": (slice(0, 2), 1), "gate0": (slice(0, 2), 2),
                         "scale1": (slice(2, 4), 3), "shift1": (slice(2, 4), 4), "gate1": (slice(2, 4), 5)}.items():
        c[k] = mod[rows, j * 96:(j + 1) * 96]
    assert T._row_alignment(c["scale0"], c["scale1"]) == 2
    check_ln(c, torch.bfloat16)
    check_residual(c, torch.bfloat16)


def test_launchers_pass_only_the_tensors_the_kernel_reads(monkeypatch):
    # Host time: every tensor argument costs Triton's launcher a data_ptr() call and a driver query of
    # the pointer per launch, so a tensor the kernel does not read (its constexpr flag off) goes as None.
    norm, add = LaunchRecorder(), LaunchRecorder()
    monkeypatch.setattr(T, "_norm_modulate_kernel", norm)
    monkeypatch.setattr(T, "_gated_residual_kernel", add)
    c = case(B=2, L=5, C=64, index="mixed")
    x, r, one, two = c["x"], c["residual"], params_of(c, index=None, gate=False), params_of(c, gate=False)
    T.layer_norm_modulate_triton(x, one)  # y, x, scale0, shift0
    T.layer_norm_modulate_triton(x, two)  # + scale1, shift1, index
    T.residual_layer_norm_modulate_triton(x, r, ops.Modulation(gate=c["gate0"]), one)  # + rout, residual, rgate0
    T.layer_norm_modulate_triton(x, params_of(c, index=None), weight=c["weight"], bias=c["bias"], with_gate=True)
    T.gated_residual_triton(x, r, params_of(c, index=None))  # out, x, residual, gate0
    T.gated_residual_triton(x, r, params_of(c))  # + gate1, index
    assert norm.tensors_passed() == [4, 7, 7, 8]
    assert add.tensors_passed() == [4, 6]
