"""Flash-attention forward for one head with a wide head dim (the Qwen-Image VAE mid block: D = 384).

FlashAttention and cuDNN refuse D = 384, so PyTorch's SDPA falls back to its memory-efficient
backend (70-120 TFLOP/s on an H100, measured). This kernel is the textbook online-softmax forward,
shaped for wide heads:

- A program owns BLOCK_M query rows: their Q tile stays (in shared memory) and their (BLOCK_M, D)
  fp32 accumulator stays in registers for the whole sweep over the keys; K and V tiles of
  (BLOCK_N, D) stream through shared memory, num_stages deep.
- `tl.arange` needs power-of-two extents and 384 is not one, so the head dim is cut into at most four
  power-of-two chunks (384 = 3 x 128): S = Q K^T is the sum of one product per chunk, and each chunk
  has its own slice of the output accumulator.
- Softmax in base 2 with the scale folded into one multiply (D**-0.5 * log2 e), statistics in fp32;
  P is cast to the operands' dtype for the P V product, as every flash kernel does.
- The sweep over the keys runs unmasked over the full blocks and masks only the last, partial one.

Layering: `_attention_fwd_kernel` -> `attention_fwd` (checks, allocation, grid) -> the custom op
`qwenfast::single_head_attention` (with a fake for torch.compile) -> `qwenfast.ops.attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._support import INTERPRET, MAX_GRID_Y, cdiv

_LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 512
_MAX_CHUNKS = 4


def split_head_dim(d: int, cap: int = 128) -> tuple[int, ...] | None:
    """Cut the head dim into <= 4 power-of-two chunks, greedily, each <= cap (None: the kernel can't).

    384 -> (128, 128, 128); 96 -> (64, 32); 512 -> (128,) * 4; 480 needs cap 256: (256, 128, 64, 32).
    """
    if d <= 0 or d % 16 or d > MAX_HEAD_DIM:
        return None
    for c in sorted({cap, 256, 512}):
        if c < cap:
            continue
        chunks, rest = [], d
        while rest:
            chunks.append(min(c, 1 << (rest.bit_length() - 1)))
            rest -= chunks[-1]
        if len(chunks) <= _MAX_CHUNKS:
            return tuple(chunks)
    return None


def supports_head_dim(d: int) -> bool:
    return split_head_dim(d) is not None


@dataclass(frozen=True)
class AttentionConfig:
    """Tile shape and launch parameters; `default_config` picks them, benchmarks sweep them."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    chunk_cap: int = 128  # largest head-dim chunk (see split_head_dim)


def default_config(d: int, dtype: torch.dtype) -> AttentionConfig:
    """Measured on one H100 for D = 384 (benchmarks/results/vae_kernels.md); the rest by the same rule.

    The (BLOCK_M, D) fp32 accumulator lives in registers: at D = 384, 128 rows take 8 warps (255
    registers a thread, no spills). Shared memory holds the Q tile and num_stages K and V tiles of
    (BLOCK_N, D): 96 KB + 2 x 48 KB at D = 384, BLOCK_N = 32; BLOCK_N = 64 would need 288 KB (the
    H100 has 227 KB a block). That config ran 331-397 TFLOP/s at N = 27556-262144; the runner-up,
    64 rows with 4 warps and 3 stages, 294 at N = 27556.
    """
    if dtype == torch.float32:  # not the fast path (fp32 dots on CUDA cores); tiles twice the bytes
        if d > 256:  # Q 48 KB + 2 x (K + V) 48 KB
            return AttentionConfig(block_m=32, block_n=16, num_warps=4, num_stages=2)
        return AttentionConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    if d > 256:
        return AttentionConfig(block_m=128, block_n=32, num_warps=8, num_stages=2)
    if d > 128:  # not measured: Q 32 KB + 2 x 64 KB at D = 256
        return AttentionConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)
    return AttentionConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)


@triton.jit
def _load_rows(
    base, offs, stride, col0, WIDTH: tl.constexpr, row_ok, MASKED: tl.constexpr, UPCAST: tl.constexpr
):
    """Rows `offs` of a row-major tile, columns [col0, col0 + WIDTH): (len(offs), WIDTH).

    UPCAST (interpreter only): Triton's interpreter gets bf16 arithmetic and bf16 dot products wrong,
    so there the operands go to fp32 after the load; values are the same, products are exact in fp32.
    """
    ptrs = base + offs[:, None] * stride + (col0 + tl.arange(0, WIDTH))[None, :]
    if MASKED:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        x = tl.load(ptrs)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _attention_block(
    acc0, acc1, acc2, acc3,  # (BLOCK_M, D_i) fp32: the output accumulator, one slice per chunk
    m_i, l_i,  # (BLOCK_M,) fp32: running max (base 2) and running sum of the softmax
    q0, q1, q2, q3,  # (BLOCK_M, D_i): the query tile, one slice per chunk
    k_blk, v_blk,  # pointers to key / value row `start_n` of this batch element
    stride_kn, stride_vn, n_left, qk_scale,
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
    BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One step of the online softmax over keys [start_n, start_n + BLOCK_N)."""
    offs_n = tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_left  # only read when MASK_N (the last, partial block)

    # S = Q K^T, summed over the head-dim chunks: (BLOCK_M, BLOCK_N) fp32
    k = _load_rows(k_blk, offs_n, stride_kn, 0, D0, n_ok, MASK_N, UPCAST)
    s = tl.dot(q0, tl.trans(k), input_precision=DOT_PRECISION)
    if D1 > 0:
        k = _load_rows(k_blk, offs_n, stride_kn, D0, D1, n_ok, MASK_N, UPCAST)
        s = tl.dot(q1, tl.trans(k), s, input_precision=DOT_PRECISION)
    if D2 > 0:
        k = _load_rows(k_blk, offs_n, stride_kn, D0 + D1, D2, n_ok, MASK_N, UPCAST)
        s = tl.dot(q2, tl.trans(k), s, input_precision=DOT_PRECISION)
    if D3 > 0:
        k = _load_rows(k_blk, offs_n, stride_kn, D0 + D1 + D2, D3, n_ok, MASK_N, UPCAST)
        s = tl.dot(q3, tl.trans(k), s, input_precision=DOT_PRECISION)
    s = s * qk_scale
    if MASK_N:
        s = tl.where(n_ok[None, :], s, float("-inf"))

    # Every block holds at least one real key, so m_new is finite and alpha = 0 on the first block.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(v_blk.dtype.element_ty)  # P rounded as the tensor cores take it
    if UPCAST:
        p = p.to(tl.float32)

    # acc = acc * alpha + P V, chunk by chunk
    v = _load_rows(v_blk, offs_n, stride_vn, 0, D0, n_ok, MASK_N, UPCAST)
    acc0 = tl.dot(p, v, acc0 * alpha[:, None], input_precision=DOT_PRECISION)
    if D1 > 0:
        v = _load_rows(v_blk, offs_n, stride_vn, D0, D1, n_ok, MASK_N, UPCAST)
        acc1 = tl.dot(p, v, acc1 * alpha[:, None], input_precision=DOT_PRECISION)
    if D2 > 0:
        v = _load_rows(v_blk, offs_n, stride_vn, D0 + D1, D2, n_ok, MASK_N, UPCAST)
        acc2 = tl.dot(p, v, acc2 * alpha[:, None], input_precision=DOT_PRECISION)
    if D3 > 0:
        v = _load_rows(v_blk, offs_n, stride_vn, D0 + D1 + D2, D3, n_ok, MASK_N, UPCAST)
        acc3 = tl.dot(p, v, acc3 * alpha[:, None], input_precision=DOT_PRECISION)
    return acc0, acc1, acc2, acc3, m_new, l_i


@triton.jit
def _store_rows(base, offs, stride, col0, WIDTH: tl.constexpr, row_ok, acc, inv_l):
    ptrs = base + offs[:, None] * stride + (col0 + tl.arange(0, WIDTH))[None, :]
    tl.store(ptrs, (acc * inv_l[:, None]).to(base.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _attention_fwd_kernel(
    q_ptr,  # (B, Nq, D), last dim contiguous
    k_ptr,  # (B, Nk, D), last dim contiguous
    v_ptr,  # (B, Nk, D), last dim contiguous
    o_ptr,  # (B, Nq, D), last dim contiguous
    Nq, Nk, qk_scale,  # qk_scale = D**-0.5 * log2(e): the softmax runs in base 2
    stride_qb, stride_qn, stride_kb, stride_kn, stride_vb, stride_vn, stride_ob, stride_on,
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,  # head-dim chunks (0: none)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    row0 = tl.program_id(0) * BLOCK_M
    pid_b = tl.program_id(1).to(tl.int64)
    # Tile base pointers in int64 (B x N x D may pass 2**31 elements); offsets inside a tile in int32.
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = row0 + offs_m < Nq
    q_base = q_ptr + pid_b * stride_qb + row0.to(tl.int64) * stride_qn
    k_blk = k_ptr + pid_b * stride_kb
    v_blk = v_ptr + pid_b * stride_vb

    # The query tile, chunk by chunk; absent chunks get a placeholder that the loop leaves untouched
    # (the compiler drops it).
    q0 = _load_rows(q_base, offs_m, stride_qn, 0, D0, m_ok, True, UPCAST)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    q1, q2, q3 = q0, q0, q0
    acc1, acc2, acc3 = acc0, acc0, acc0
    if D1 > 0:
        q1 = _load_rows(q_base, offs_m, stride_qn, D0, D1, m_ok, True, UPCAST)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    if D2 > 0:
        q2 = _load_rows(q_base, offs_m, stride_qn, D0 + D1, D2, m_ok, True, UPCAST)
        acc2 = tl.zeros([BLOCK_M, D2], dtype=tl.float32)
    if D3 > 0:
        q3 = _load_rows(q_base, offs_m, stride_qn, D0 + D1 + D2, D3, m_ok, True, UPCAST)
        acc3 = tl.zeros([BLOCK_M, D3], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    n_full = (Nk // BLOCK_N) * BLOCK_N
    for _start_n in range(0, n_full, BLOCK_N):
        acc0, acc1, acc2, acc3, m_i, l_i = _attention_block(
            acc0, acc1, acc2, acc3, m_i, l_i, q0, q1, q2, q3, k_blk, v_blk,
            stride_kn, stride_vn, BLOCK_N, qk_scale,
            D0, D1, D2, D3, BLOCK_N, False, DOT_PRECISION, UPCAST,
        )
        k_blk += BLOCK_N * stride_kn
        v_blk += BLOCK_N * stride_vn
    if n_full < Nk:
        acc0, acc1, acc2, acc3, m_i, l_i = _attention_block(
            acc0, acc1, acc2, acc3, m_i, l_i, q0, q1, q2, q3, k_blk, v_blk,
            stride_kn, stride_vn, Nk - n_full, qk_scale,
            D0, D1, D2, D3, BLOCK_N, True, DOT_PRECISION, UPCAST,
        )

    inv_l = 1.0 / l_i
    o_base = o_ptr + pid_b * stride_ob + row0.to(tl.int64) * stride_on
    _store_rows(o_base, offs_m, stride_on, 0, D0, m_ok, acc0, inv_l)
    if D1 > 0:
        _store_rows(o_base, offs_m, stride_on, D0, D1, m_ok, acc1, inv_l)
    if D2 > 0:
        _store_rows(o_base, offs_m, stride_on, D0 + D1, D2, m_ok, acc2, inv_l)
    if D3 > 0:
        _store_rows(o_base, offs_m, stride_on, D0 + D1 + D2, D3, m_ok, acc3, inv_l)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: AttentionConfig | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for q (B, Nq, D), k and v (B, Nk, D); returns a contiguous (B, Nq, D).

    The caller (qwenfast.ops.attention) has checked ranks, shapes, dtypes and devices; this checks what
    is particular to the kernel.
    """
    B, Nq, D = q.shape
    Nk = k.shape[1]
    if q.dtype not in _DTYPES:
        raise ValueError(f"q: the kernel takes {_DTYPES}, got {q.dtype}")
    config = config or default_config(D, q.dtype)
    chunks = split_head_dim(D, config.chunk_cap)
    if chunks is None:
        raise ValueError(f"q: head dim {D} is not one the kernel supports (multiple of 16, <= {MAX_HEAD_DIM})")
    # The kernel steps through rows with one stride and reads each row as one contiguous run.
    q, k, v = (t if t.stride(2) == 1 else t.contiguous() for t in (q, k, v))
    o = torch.empty((B, Nq, D), dtype=q.dtype, device=q.device)
    if o.numel() == 0:
        return o
    if Nk == 0:
        raise ValueError(f"k: no keys to attend to (shape {tuple(k.shape)})")
    if B > MAX_GRID_Y:
        raise ValueError(f"q: batch {B} is over the {MAX_GRID_Y} programs a grid's second axis takes")
    d = chunks + (0,) * (_MAX_CHUNKS - len(chunks))
    grid = (cdiv(Nq, config.block_m), B)
    _attention_fwd_kernel[grid](
        q, k, v, o, Nq, Nk, D**-0.5 * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        D0=d[0], D1=d[1], D2=d[2], D3=d[3],
        BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        # fp32 operands stay fp32 (tf32 would cost ~1e-3 relative error); 16-bit ones use the tensor cores.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=INTERPRET and q.dtype == torch.bfloat16,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return o


@torch.library.custom_op("qwenfast::single_head_attention", mutates_args=())
def single_head_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return attention_fwd(q, k, v)


@single_head_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)  # contiguous, like attention_fwd's output


def attention_flops(b: int, nq: int, nk: int, d: int) -> float:
    """Two matrix products of 2 * nq * nk * d FLOP each, per batch element."""
    return 4.0 * b * nq * nk * d


__all__ = [
    "AttentionConfig",
    "attention_flops",
    "attention_fwd",
    "default_config",
    "single_head_attention_op",
    "split_head_dim",
    "supports_head_dim",
]
