"""The Qwen-Image-2.1 modulation ops (qwenfast.ops.modulate21): the fp32 reference against an fp64
oracle, the Triton kernels against the reference, the modules' dispatch, checks, library ops.

Parametrised by device: CPU always (the kernels through Triton's interpreter: tests/conftest.py sets
TRITON_INTERPRET=1 on machines without CUDA), CUDA when there is one.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from qwenfast import ops
from qwenfast.ops import custom_op
from qwenfast.ops import modulate21 as M
from qwenfast.ops.modulate21 import Rows, split_rows

from _launches import LaunchRecorder
from helpers import count_calls

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MASKS = ["mixed", "prefix", "all", "none_true", "no_mask"]
# Kernel vs reference, both rounding an fp32 value once: one or two ulps apart where the fp32
# intermediates differ in the last bit (FMA, reduction order). Triton's interpreter truncates
# fp32 -> bf16 where the reference rounds to nearest: up to 2 ulp in bf16.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2 * 2**-7, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}


def kernel_devices():
    """Devices where the Triton kernels can run in this process."""
    out = []
    for d in DEVICES:
        if d == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            continue
        out.append(d)
    return out


def make(B=2, L=9, C=96, dtype=torch.float32, mask="mixed", *, seed=0, device="cpu", offset=0.0,
         param_dtype=None):
    """x, residual, and the four parameters as Rows views of one (B', 4C) modulation tensor, the way
    the 2.1 model hands them over ([mod1.scale, mod1.gate, mod2.scale, mod2.gate]); B' = B + 1 with a
    target mask. mask: "mixed" random, "prefix" text then target tokens, "all" every token a target,
    "none_true" no target token, "no_mask" no causal_condition."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, C, generator=g) * 2 + offset
    residual = torch.randn(B, L, C, generator=g)
    target = {
        "mixed": torch.rand(L, generator=g) > 0.5,
        "prefix": torch.arange(L) >= L // 3,
        "all": torch.ones(L, dtype=torch.bool),
        "none_true": torch.zeros(L, dtype=torch.bool),
        "no_mask": None,
    }[mask]
    rows = B + (target is not None)
    mod = (torch.randn(rows, 4 * C, generator=g) * 0.7).to(param_dtype or dtype).to(device)
    scale1, gate1, scale2, gate2 = (split_rows(p, target) for p in mod.chunk(4, dim=-1))
    return dict(x=x.to(dtype).to(device), residual=residual.to(dtype).to(device),
                target_mask=None if target is None else target.to(device),
                scale=scale1, gate=gate1, scale2=scale2, gate2=gate2, mod=mod)


def picked64(rows: Rows, target, B, L):
    """Each token's row in fp64, (B, L, C), by an explicit loop (not the reference's torch.where)."""
    out = torch.empty(B, L, rows.sample.shape[-1], dtype=torch.float64)
    for b in range(B):
        for t in range(L):
            take_sample = target is None or bool(target[t])
            out[b, t] = (rows.sample[b] if take_sample else rows.shared).double().cpu()
    return out


def oracle(c):
    """fp64: y1 = LN(x)(1 + scale); residual_out = residual + tanh(gate) x; y2 = LN(residual_out)(1 + scale2)."""
    x, r = c["x"].double().cpu(), c["residual"].double().cpu()
    B, L, C = x.shape
    t = None if c["target_mask"] is None else c["target_mask"].cpu()
    sc, g, sc2 = (picked64(c[k], t, B, L) for k in ("scale", "gate", "scale2"))
    ln = lambda v: F.layer_norm(v, (C,), eps=1e-6)  # noqa: E731
    h = r + torch.tanh(g) * x
    return ln(x) * (1 + sc), h, ln(h) * (1 + sc2)


# --- the reference ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", MASKS)
def test_reference_matches_fp64_oracle(device, dtype, mask):
    c = make(dtype=dtype, mask=mask, seed=1, device=device)
    y1_64, h64, _ = oracle(c)
    y1 = M.layer_norm_scale_native(c["x"], scale=c["scale"], target_mask=c["target_mask"])
    h = M.tanh_gated_residual_native(c["x"], c["residual"], gate=c["gate"], target_mask=c["target_mask"])
    y2, h2 = M.residual_layer_norm_scale_native(c["x"], c["residual"], gate=c["gate"], scale=c["scale2"],
                                                target_mask=c["target_mask"])
    for out in (y1, h, y2, h2):
        assert out.dtype == dtype and out.device.type == device  # the input's dtype, always
    tol = dict(TOL[dtype], rtol=TOL[dtype]["rtol"] / 2)  # one rounding of an fp32 value: one ulp
    torch.testing.assert_close(y1.double().cpu(), y1_64, **tol)
    torch.testing.assert_close(h.double().cpu(), h64, **tol)
    assert torch.equal(h2, h)
    # y2 normalises the *stored* residual_out (as diffusers does): the oracle on the rounded value.
    B, L, _ = c["x"].shape
    t = None if c["target_mask"] is None else c["target_mask"].cpu()
    y2_64 = F.layer_norm(h2.double().cpu(), (h2.shape[-1],), eps=1e-6) * (1 + picked64(c["scale2"], t, B, L))
    torch.testing.assert_close(y2.double().cpu(), y2_64, **tol)


def test_two_pass_variance_survives_a_large_offset():
    # Offset 1e4 on values of spread ~2: a one-pass variance E[x²] - E[x]² in fp32 cancels to noise
    # (shown below, so the test can fail); two passes keep it.
    c = make(C=256, mask="mixed", seed=2, offset=1e4)
    y64 = oracle(c)[0]
    y = M.layer_norm_scale_native(c["x"], scale=c["scale"], target_mask=c["target_mask"])
    assert (y.double() - y64).abs().max().item() < 2e-3
    x = c["x"]
    one_pass_var = (x * x).mean(-1, keepdim=True) - x.mean(-1, keepdim=True) ** 2
    one_pass = (x - x.mean(-1, keepdim=True)) * torch.rsqrt(one_pass_var.clamp_min(0) + 1e-6)
    exact = F.layer_norm(x.double(), (256,), eps=1e-6)
    assert (one_pass.double() - exact).abs().max().item() > 2e-2


def test_the_mask_picks_rows():
    # A wrong row would hide if the two rows were alike: the shared and per-sample rows must give
    # different outputs, and each token the one its mask bit names.
    c = make(B=2, L=8, C=32, mask="mixed", seed=3)
    t = c["target_mask"]
    assert 0 < int(t.sum()) < t.numel()
    y = M.layer_norm_scale_native(c["x"], scale=c["scale"], target_mask=t)
    ln = F.layer_norm(c["x"], (32,), eps=1e-6)
    for b in range(2):
        for l in range(8):
            row = c["scale"].sample[b] if t[l] else c["scale"].shared
            torch.testing.assert_close(y[b, l], ln[b, l] * (1 + row), rtol=1e-5, atol=1e-5)
    y_all = M.layer_norm_scale_native(c["x"], scale=c["scale"], target_mask=torch.ones_like(t))
    assert (y_all[:, ~t] - y[:, ~t]).abs().max() > 0.1


# --- the Triton kernels -------------------------------------------------------------------------------


def kernels():
    pytest.importorskip("triton")
    from qwenfast.ops.triton import modulate21 as T

    return T


def run_kernels(c, T, config=None):
    x, r, t = c["x"], c["residual"], c["target_mask"]
    sh = lambda p: p.shared  # noqa: E731
    if config is None:
        y1 = T.layer_norm_scale_triton(x, scale=c["scale"], target_mask=t)
        h = T.tanh_gated_residual_triton(x, r, gate=c["gate"], target_mask=t)
        y2, h2 = T.residual_layer_norm_scale_triton(x, r, gate=c["gate"], scale=c["scale2"], target_mask=t)
    else:
        y1 = T.layer_norm_scale_fwd(x, c["scale"].sample, sh(c["scale"]), t, 1e-6, config=config)
        h = T.tanh_gated_residual_fwd(x, r, c["gate"].sample, sh(c["gate"]), t, config=config)
        y2, h2 = T.residual_layer_norm_scale_fwd(x, r, c["gate"].sample, sh(c["gate"]), c["scale2"].sample,
                                                 sh(c["scale2"]), t, 1e-6, config=config)
    return y1, h, y2, h2


def check_kernels(c, dtype, config=None):
    T = kernels()
    y1, h, y2, h2 = run_kernels(c, T, config)
    x, r, t = c["x"], c["residual"], c["target_mask"]
    want_y1 = M.layer_norm_scale_native(x, scale=c["scale"], target_mask=t)
    want_h = M.tanh_gated_residual_native(x, r, gate=c["gate"], target_mask=t)
    for got, want in ((y1, want_y1), (h, want_h), (h2, want_h)):
        assert got.dtype == want.dtype and got.shape == want.shape and got.device == want.device
        torch.testing.assert_close(got, want, **TOL[dtype])
    # The LayerNorm of the kernel's own residual_out (an ulp there would move y by more than y's rounding).
    want_y2 = M.layer_norm_scale_native(h2, scale=c["scale2"], target_mask=t)
    torch.testing.assert_close(y2, want_y2, **TOL[dtype])


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", MASKS)
def test_kernels_match_reference(device, dtype, mask):
    # 2 x 9 tokens: not a multiple of the 4 rows a program takes at C = 96 (not a power of two).
    check_kernels(make(dtype=dtype, mask=mask, seed=4, device=device), dtype)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("C,L", [(4096, 3), (1500, 2), (1, 5), (33, 1)])
def test_kernels_at_other_widths(device, C, L):
    # 4096: the 2.1 model's width; 1500: two column blocks of the gated add, the last one partial.
    check_kernels(make(B=2, L=L, C=C, dtype=torch.bfloat16, mask="mixed", seed=5, device=device), torch.bfloat16)


@pytest.mark.parametrize("device", kernel_devices())
def test_kernels_other_launch_configs(device):
    T = kernels()
    for cfg in (T.LaunchConfig(rows=2, block_c=128, num_warps=2), T.LaunchConfig(rows=1, block_c=128, num_warps=4)):
        c = make(B=3, L=5, C=100, dtype=torch.float32, mask="mixed", seed=6, device=device)
        check_kernels(c, torch.float32, config=cfg)


@pytest.mark.parametrize("device", kernel_devices())
def test_kernels_large_offset_strided_input_and_extreme_gates(device):
    T = kernels()
    c = make(B=2, L=6, C=128, mask="prefix", seed=7, device=device, offset=1e4)
    y64 = oracle(c)[0]
    y = T.layer_norm_scale_triton(c["x"], scale=c["scale"], target_mask=c["target_mask"])
    assert (y.double().cpu() - y64).abs().max().item() < 2e-3  # two passes in the kernel too
    # x a non-contiguous slice (the cached-KV path slices the joint sequence); gates up to ±30 (tanh
    # saturates) and down to 1e-4.
    big = make(B=2, L=12, C=128, mask="mixed", seed=8, device=device)
    c = dict(big, x=big["x"][:, 3:9], residual=big["residual"][:, 3:9], target_mask=big["target_mask"][3:9])
    assert not c["x"].is_contiguous()
    gate = c["gate"].sample.clone()
    gate[0, :4] = torch.tensor([30.0, -30.0, 1e-4, -1e-4])
    c["gate"] = Rows(gate, c["gate"].shared)
    check_kernels(c, torch.float32)


@pytest.mark.parametrize("device", kernel_devices())
def test_kernels_promote_parameter_dtypes_and_launch_nothing_when_empty(device):
    T = kernels()
    c = make(B=2, L=7, C=64, dtype=torch.bfloat16, mask="mixed", seed=9, device=device)
    for k in ("scale", "gate", "scale2"):  # the shared row in fp32, not representable in bf16
        c[k] = Rows(c[k].sample, c[k].shared.float() + 1e-3)
    check_kernels(c, torch.bfloat16)
    e = make(B=2, L=0, C=64, mask="no_mask", device=device)
    assert T.layer_norm_scale_triton(e["x"], scale=e["scale"]).shape == (2, 0, 64)
    assert T.tanh_gated_residual_triton(e["x"], e["residual"], gate=e["gate"]).shape == (2, 0, 64)


def test_opcheck():
    kernels()
    if "cpu" not in kernel_devices() and not torch.cuda.is_available():
        pytest.skip("no device runs the kernels")
    device = kernel_devices()[0]
    for mask in ("mixed", "no_mask"):
        c = make(B=2, L=5, C=40, mask=mask, seed=10, device=device)
        t, s, g = c["target_mask"], c["scale"], c["gate"]
        torch.library.opcheck(torch.ops.qwenfast.layer_norm_scale.default, (c["x"], s.sample, s.shared, t, 1e-6))
        torch.library.opcheck(torch.ops.qwenfast.residual_layer_norm_scale.default,
                              (c["x"], c["residual"], g.sample, g.shared, s.sample, s.shared, t, 1e-6))
        torch.library.opcheck(torch.ops.qwenfast.tanh_gated_residual.default,
                              (c["x"], c["residual"], g.sample, g.shared, t))


# --- the modules: dispatch, fallback, checks, torch.compile --------------------------------------------


@pytest.fixture
def on_kernel_path(monkeypatch):
    """Make the modules take the Triton path for CPU tensors (run by the interpreter) and count the
    kernel launches, so that a test cannot pass on the PyTorch path by accident."""
    T = kernels()
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors on the Triton path need TRITON_INTERPRET=1")
    monkeypatch.setattr(custom_op, "choose_backend", lambda device, has_triton=None: "cuda")
    return count_calls(monkeypatch, T, ("layer_norm_scale_fwd", "residual_layer_norm_scale_fwd", "tanh_gated_residual_fwd"))


def public_calls(c):
    t = c["target_mask"]
    y1 = ops.layer_norm_scale(c["x"], scale=c["scale"], target_mask=t)
    y2, h = ops.residual_layer_norm_scale(y1, c["residual"], gate=c["gate"], scale=c["scale2"], target_mask=t)
    return ops.tanh_gated_residual(y2, h, gate=c["gate2"], target_mask=t)


@pytest.mark.parametrize("mask", ["mixed", "no_mask"])
def test_modules_on_the_kernel_path_match_native(on_kernel_path, monkeypatch, mask):
    c = make(B=2, L=6, C=48, mask=mask, seed=11)
    got = public_calls(c)
    assert len(on_kernel_path) == 3
    monkeypatch.setattr(custom_op, "choose_backend", lambda device, has_triton=None: "native")
    torch.testing.assert_close(got, public_calls(c), rtol=1e-5, atol=1e-5)
    assert len(on_kernel_path) == 3  # the native path launched nothing


def test_rows_too_wide_for_the_kernel_run_the_reference(on_kernel_path):
    c = make(B=1, L=2, C=M.MAX_KERNEL_C + 8, mask="mixed", seed=12)
    y = ops.layer_norm_scale(c["x"], scale=c["scale"], target_mask=c["target_mask"])
    assert on_kernel_path == []
    torch.testing.assert_close(y, M.layer_norm_scale_native(c["x"], scale=c["scale"], target_mask=c["target_mask"]))
    ops.tanh_gated_residual(c["x"], c["residual"], gate=c["gate"], target_mask=c["target_mask"])
    assert on_kernel_path == ["tanh_gated_residual_fwd"]  # elementwise: any width


@pytest.mark.parametrize("backend", ["native", "cuda"])
def test_compile_public_api_fullgraph(monkeypatch, backend):
    # Checks, Rows and the per-call dispatch trace without a graph break, on either path
    # (aot_eager: no C++ compiler needed on the test machine).
    if backend == "cuda":
        kernels()
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("CPU tensors on the Triton path need TRITON_INTERPRET=1")
    monkeypatch.setattr(custom_op, "choose_backend", lambda device, has_triton=None: backend)
    c = make(B=2, L=5, C=32, mask="mixed", seed=13)
    torch._dynamo.reset()
    compiled = torch.compile(lambda: public_calls(c), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(), public_calls(c), rtol=0, atol=0)


def test_split_rows_is_diffusers_layout():
    mod = torch.randn(3, 8)
    mask = torch.tensor([False, True, True])
    r = split_rows(mod, mask)
    assert r.sample.data_ptr() == mod.data_ptr() and r.shared.data_ptr() == mod[2].data_ptr()  # views
    assert split_rows(mod, None) == Rows(mod)
    from diffusers.models.transformers.transformer_qwenimage21 import _select_modulation_rows

    assert torch.equal(M.select_rows(r, mask), _select_modulation_rows(mod, mask))
    assert torch.equal(M.select_rows(Rows(mod), None), _select_modulation_rows(mod, None))
    with pytest.raises(ValueError, match=r"B \+ 1 >= 2 rows"):
        split_rows(mod[:1], mask)
    with pytest.raises(ValueError, match=r"\(B', C\)"):
        split_rows(mod[0], None)


def test_bad_arguments_fail_with_one_clear_error():
    c = make(B=2, L=4, C=8, mask="mixed", seed=14)
    x, t, s = c["x"], c["target_mask"], c["scale"]
    cases = [
        (dict(x=x, scale=s.sample, target_mask=t), TypeError, "scale must be qwenfast.ops.Rows"),
        (dict(x=x, scale=Rows(s.sample), target_mask=t), ValueError, r"scale.shared .* must be given too"),
        (dict(x=x, scale=s, target_mask=None), ValueError, "scale.shared is given but target_mask is None"),
        (dict(x=x, scale=s, target_mask=t[:3]), ValueError, r"target_mask must be \(L,\) = \(4,\)"),
        (dict(x=x, scale=s, target_mask=t.long()), TypeError, "target_mask must be a bool tensor"),
        (dict(x=x, scale=Rows(s.sample[:1], s.shared), target_mask=t), ValueError, r"scale.sample must be \(2, 8\)"),
        (dict(x=x, scale=Rows(s.sample, s.shared[:4]), target_mask=t), ValueError, r"scale.shared must be \(8,\)"),
        (dict(x=x[0], scale=s, target_mask=t), ValueError, r"x must be \(B, L, C\)"),
        (dict(x=x.long(), scale=s, target_mask=t), TypeError, "x must be a floating-point tensor"),
        (dict(x=x, scale=Rows(s.sample.t().contiguous().t(), s.shared), target_mask=t), ValueError,
         "contiguous in its last dimension"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            ops.layer_norm_scale(kw.pop("x"), **kw)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        ops.tanh_gated_residual(x, x[:, :2], gate=c["gate"], target_mask=t)


def test_launchers_pass_only_the_tensors_the_kernel_reads(monkeypatch):
    # Host time: every tensor argument costs Triton's launcher a data_ptr() call and a driver query of
    # the pointer per launch; without a mask the shared rows and the mask go as None (constexprs).
    T = kernels()
    rec = {k: LaunchRecorder() for k in ("_layer_norm_scale_kernel", "_residual_layer_norm_scale_kernel",
                                         "_tanh_gated_residual_kernel")}
    for k, v in rec.items():
        monkeypatch.setattr(T, k, v)
    for mask in ("no_mask", "mixed"):
        run_kernels(make(B=2, L=5, C=64, mask=mask, seed=10), T)
    assert rec["_layer_norm_scale_kernel"].tensors_passed() == [3, 5]  # y, x, scale (+ its shared row, mask)
    assert rec["_residual_layer_norm_scale_kernel"].tensors_passed() == [6, 9]
    assert rec["_tanh_gated_residual_kernel"].tensors_passed() == [4, 6]
