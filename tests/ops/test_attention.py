"""qwenfast.ops.attention: the Triton flash kernel (interpreted on CPU) vs the native path vs fp64.

Small shapes with 16 x 16 tiles, so that several query programs, several key blocks and a partial
last block all run through the interpreter in a few seconds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenfast.ops.attention import (
    SingleHeadAttention,
    single_head_attention,
    single_head_attention_native,
    single_head_attention_triton,
)
from qwenfast.ops.triton import attention as K

from _device import DEVICE

SMALL = K.AttentionConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
# relative L2 error vs the fp64 oracle: fp32 arithmetic; 16-bit P and output roundings
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def oracle(q, k, v) -> torch.Tensor:
    """fp64 attention written out: the softmax of the scaled scores times v."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(1, 2) * q.shape[-1] ** -0.5
    return torch.softmax(s, dim=-1) @ v


def qkv(B, Nq, Nk, D, dtype, seed, scale=1.0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Nq, D, generator=g) * scale).to(dtype).to(device)
    k = torch.randn(B, Nk, D, generator=g).to(dtype).to(device)
    v = torch.randn(B, Nk, D, generator=g).to(dtype).to(device)
    return q, k, v


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "B,Nq,Nk,D",
    [
        (2, 37, 53, 32),  # N not a multiple of the block, B > 1, Nq != Nk
        (1, 1, 1, 64),  # one query, one key: o = v
        (3, 20, 45, 96),  # D = 64 + 32: two unequal chunks
        (1, 9, 17, 384),  # the VAE's head dim: 3 x 128
        (1, 48, 48, 48),  # N a multiple of the block: no partial key block
    ],
)
def test_kernel_matches_oracle(B, Nq, Nk, D, dtype):
    q, k, v = qkv(B, Nq, Nk, D, dtype, seed=B * 1000 + Nq + D)
    ref = oracle(q, k, v)
    out = K.attention_fwd(q, k, v, SMALL)
    assert out.shape == (B, Nq, D) and out.dtype == dtype
    assert torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err < TOL[dtype], err
    # the kernel is no worse than the native path in the same dtype (up to rounding noise)
    native = single_head_attention_native(q, k, v)
    assert err <= 2 * rel_err(native, ref) + TOL[dtype] / 4, (err, rel_err(native, ref))


def test_one_key_returns_its_value():
    q, k, v = qkv(2, 5, 1, 64, torch.float32, seed=1)
    torch.testing.assert_close(K.attention_fwd(q, k, v, SMALL), v.expand(2, 5, 64), rtol=0, atol=1e-6)


def test_equal_keys_average_the_values():
    q, _, v = qkv(1, 19, 23, 32, torch.float32, seed=2)
    k = torch.zeros(1, 23, 32, device=DEVICE)
    torch.testing.assert_close(K.attention_fwd(q, k, v, SMALL), v.mean(1, keepdim=True).expand(1, 19, 32))


def test_large_scores_do_not_overflow():
    # scores of several hundred: exp would overflow without the running max
    q, k, v = qkv(1, 21, 40, 64, torch.float32, seed=3, scale=40.0)
    out = K.attention_fwd(q, k, v, SMALL)
    assert torch.isfinite(out).all()
    assert rel_err(out, oracle(q, k, v)) < 1e-5


def test_strided_views_of_a_packed_qkv():
    # q, k, v as slices of one (B, N, 3D) tensor, the way a fused qkv projection leaves them
    g = torch.Generator().manual_seed(4)
    packed = torch.randn(2, 29, 3 * 64, generator=g).to(DEVICE)
    q, k, v = packed.split(64, dim=-1)
    assert not q.is_contiguous()
    out = K.attention_fwd(q, k, v, SMALL)
    torch.testing.assert_close(out, K.attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), SMALL))
    assert rel_err(out, oracle(q, k, v)) < 1e-5


def test_non_contiguous_last_dim_is_copied():
    q, k, v = qkv(1, 17, 17, 32, torch.float32, seed=5)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, last-dim stride 17
    assert qt.stride(2) != 1
    torch.testing.assert_close(K.attention_fwd(qt, k, v, SMALL), K.attention_fwd(q, k, v, SMALL))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_entry_point_runs_the_kernel(dtype):
    q, k, v = qkv(2, 33, 33, 384, dtype, seed=6)
    out = single_head_attention_triton(q, k, v)
    torch.testing.assert_close(out, K.attention_fwd(q, k, v), rtol=0, atol=0)
    assert rel_err(out, oracle(q, k, v)) < TOL[dtype]


@pytest.mark.parametrize("D", [40, 496])
def test_unsupported_head_dims_take_the_native_path(D):
    q, k, v = qkv(1, 7, 9, D, torch.float32, seed=D)
    assert not K.supports_head_dim(D) and not SingleHeadAttention().kernel_takes(q, k, v)
    with pytest.raises(ValueError, match="cannot take"):
        single_head_attention_triton(q, k, v)
    assert rel_err(single_head_attention(q, k, v), oracle(q, k, v)) < 1e-5


def test_fp64_takes_the_native_path():
    q, k, v = qkv(1, 7, 9, 32, torch.float64, seed=7)
    assert not SingleHeadAttention().kernel_takes(q, k, v)
    assert rel_err(single_head_attention(q, k, v), oracle(q, k, v)) < 1e-12


def test_split_head_dim():
    assert K.split_head_dim(384) == (128, 128, 128)
    assert K.split_head_dim(96) == (64, 32)
    assert K.split_head_dim(480) == (256, 128, 64, 32)  # cap 128 would need 5 chunks
    assert K.split_head_dim(512) == (128,) * 4
    for d in (0, 8, 40, 496, 528):
        assert K.split_head_dim(d) is None
    for d in range(16, 513, 16):
        chunks = K.split_head_dim(d)
        if chunks is not None:
            assert sum(chunks) == d and all(c & (c - 1) == 0 for c in chunks)


def test_native_chunks_bound_the_scores():
    # a budget of 6 rows of scores: 4 chunks of queries for each of the 3 batch elements
    q, k, v = qkv(3, 21, 50, 32, torch.float64, seed=8)
    whole = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(single_head_attention_native(q, k, v, score_bytes=6 * 50 * 4), whole)
    # whole frames fit, two at a time
    torch.testing.assert_close(single_head_attention_native(q, k, v, score_bytes=2 * 21 * 50 * 4), whole)


def test_opcheck():
    q, k, v = qkv(2, 19, 21, 32, torch.float32, seed=9)
    torch.library.opcheck(torch.ops.qwenfast.single_head_attention.default, (q, k, v))


def test_errors_name_the_argument():
    q, k, v = qkv(2, 8, 8, 32, torch.float32, seed=10)
    with pytest.raises(ValueError, match="q: expected \\(B, N, D\\)"):
        single_head_attention(q[0], k, v)
    with pytest.raises(ValueError, match="v: shape"):
        single_head_attention(q, k, v[:, :5])
    with pytest.raises(ValueError, match="k: shape"):
        single_head_attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="k: shape"):
        single_head_attention(q, k[..., :16], v[..., :16])
    with pytest.raises(ValueError, match="v: dtype"):
        single_head_attention(q, k, v.half())
    with pytest.raises(ValueError, match="k: on meta"):
        single_head_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="k: no keys"):
        single_head_attention(q, k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="q: expected a floating-point"):
        single_head_attention(q.long(), k.long(), v.long())


def test_public_function_on_cpu_takes_the_native_path():
    """One dispatch rule for every op (CustomOp's): CPU tensors run PyTorch, even when interpreted."""
    q, k, v = qkv(1, 9, 9, 64, torch.float32, seed=8, device="cpu")
    op = SingleHeadAttention()
    assert op.kernel_takes(q, k, v) and op.dispatch(q, k, v) == op.forward_native
    torch.testing.assert_close(single_head_attention(q, k, v), single_head_attention_native(q, k, v), rtol=0, atol=0)


# -- the query-chunked matmul path (CUDA, head dims the kernel does not take: 1152) ----------------


@pytest.mark.parametrize(
    "B,Nq,Nk,D,score_bytes",
    [
        (2, 37, 53, 72, 4 * 53 * 5),  # 5 query rows a chunk: 8 chunks, a partial last one, B > 1
        (1, 9, 17, 1152, 1),  # the 2.1 VAE's head dim, one query row a chunk
        (1, 30, 30, 16, 1 << 30),  # one chunk
    ],
)
def test_chunked_matches_sdpa_in_float64(B, Nq, Nk, D, score_bytes):
    from qwenfast.ops.attention import single_head_attention_chunked

    q, k, v = qkv(B, Nq, Nk, D, torch.float64, seed=Nq + D, scale=3.0)
    out = single_head_attention_chunked(q, k, v, score_bytes=score_bytes)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert out.dtype == torch.float64
    assert (out - ref).abs().max().item() < 1e-12


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunked_keeps_dtype_and_accuracy(dtype, device):
    from qwenfast.ops.attention import single_head_attention_chunked

    q, k, v = qkv(2, 21, 33, 1152, dtype, seed=7)
    out = single_head_attention_chunked(*(t.to(device) for t in (q, k, v)), score_bytes=4 * 33 * 4)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out.cpu(), oracle(q, k, v).cpu()) < TOL[dtype]


def test_chunked_rejects_bad_shapes():
    from qwenfast.ops.attention import single_head_attention_chunked

    q, k, v = qkv(1, 4, 5, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match="head dim"):
        single_head_attention_chunked(q, k[..., :4], v[..., :4])


@pytest.mark.parametrize("refused", [False, True])
def test_wide_heads_reach_sdpas_fused_kernel_with_4d_inputs(monkeypatch, refused):
    """CUDA head dims our kernel does not take go to SDPA's memory-efficient kernel, which takes
    (B, heads, N, D) only: a 3-D call is refused and would silently run the chunked math path. Where
    SDPA does refuse (dtype, strides), the native path answers."""
    from qwenfast.ops import attention as A

    seen, real = [], F.scaled_dot_product_attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 24, generator=g, dtype=torch.float64) for _ in range(3))

    def sdpa(q_, k_, v_, *args, **kwargs):
        if not seen:  # the call under sdpa_kernel([EFFICIENT_ATTENTION]); the native path's come after
            seen.append((q_.dim(), k_.dim(), v_.dim()))
            if q_.dim() != 4 or refused:
                raise RuntimeError("No available kernel. Aborting execution.")
            return oracle(q_[:, 0], k_[:, 0], v_[:, 0]).unsqueeze(1).to(q_.dtype)
        return real(q_, k_, v_, *args, **kwargs)

    monkeypatch.setattr(A.F, "scaled_dot_product_attention", sdpa)
    out = A._memory_efficient_sdpa(q, k, v)
    assert seen == [(4, 4, 4)] and out.shape == q.shape
    assert (out - oracle(q, k, v)).abs().max().item() <= 1e-12
