"""Single-head attention with a wide head dim: the Qwen-Image VAE mid block (one head, D = 384).

    single_head_attention(q, k, v) -> o        q (B, Nq, D), k and v (B, Nk, D), o (B, Nq, D)

softmax(q k^T / sqrt(D)) v, non-causal, no mask. B is batch x frames, N the h*w latent pixels of a
frame (27556 at 1328², 262144 at 4096²). Nq may differ from Nk: a rank of the patch-parallel decode
attends from its own pixels to the keys of every rank.

Dispatch per call, the rule of every op here (`CustomOp`'s): the Triton flash kernel
(qwenfast.ops.triton.attention) for CUDA tensors with Triton importable, when the dtype is
fp16/bf16/fp32 and the head dim is one it supports (a multiple of 16 up to 512 that splits into <= 4
power-of-two chunks: 16..128, 192, 256, 384, 512 and most others); otherwise
`single_head_attention_native`. `single_head_attention_triton` runs the kernel itself (CPU tensors
under TRITON_INTERPRET=1: the tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .triton import _support
from .triton._support import HAS_TRITON, dispatches_to_kernel, launch, require_kernel

if HAS_TRITON:
    from .triton import attention as _kernel

SCORE_BYTES_BUDGET = 256 << 20  # the most the native path lets one chunk of fp32 scores take


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name}: expected (B, N, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"v: shape {tuple(v.shape)} differs from k's {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"k: shape {tuple(k.shape)} does not match q's {tuple(q.shape)} in batch (dim 0) and head dim (dim 2)"
        )
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name}: on {t.device}, q on {q.device}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: dtype {t.dtype}, q has {q.dtype}")
    if k.shape[1] == 0 and q.shape[1] > 0:
        raise ValueError(f"k: no keys to attend to (shape {tuple(k.shape)})")


def single_head_attention_native(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_bytes: int = SCORE_BYTES_BUDGET
) -> torch.Tensor:
    """The reference, and the fallback: PyTorch's SDPA over chunks of queries (and of the batch).

    A chunk's scores (batch chunk x query chunk x Nk, counted as fp32) stay under `score_bytes`, so
    that a 4K decode on a CPU, or on a GPU where SDPA's math backend runs, does not materialise the
    N² matrix (262144² x 4 B = 256 GiB). In fp32/fp64 it serves as the tests' oracle.
    """
    _check_qkv(q, k, v)
    B, Nq, _ = q.shape
    Nk = k.shape[1]
    rows = max(1, score_bytes // (4 * max(Nk, 1)))  # query rows per chunk, for one batch element
    if rows >= Nq:  # whole frames fit: take several batch elements at once
        batch = max(1, score_bytes // (4 * max(Nk * Nq, 1)))
        rows = Nq
    else:
        batch = 1
    if batch >= B and rows >= Nq:
        return F.scaled_dot_product_attention(q, k, v)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for b0 in range(0, B, batch):
        kb, vb = k[b0 : b0 + batch], v[b0 : b0 + batch]
        for r0 in range(0, Nq, rows):
            o[b0 : b0 + batch, r0 : r0 + rows] = F.scaled_dot_product_attention(
                q[b0 : b0 + batch, r0 : r0 + rows], kb, vb
            )
    return o


def kernel_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Can the Triton kernel run on these (already checked) tensors (CUDA, or CPU when interpreted)?"""
    return _support.kernel_supports(q, k, v) and _kernel.supports_head_dim(q.shape[2])


def kernel_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Would `single_head_attention` run the Triton kernel on these (already checked) tensors?"""
    return dispatches_to_kernel(q, k, v) and kernel_supports(q, k, v)


def single_head_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The Triton kernel itself, whatever the device (CPU tensors under TRITON_INTERPRET=1): for tests."""
    _check_qkv(q, k, v)
    require_kernel(kernel_supports(q, k, v), "q", q)
    return launch(torch.ops.qwenfast.single_head_attention, _kernel.attention_fwd, q, k, v)


def single_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v; q (B, Nq, D), k and v (B, Nk, D) -> (B, Nq, D) in q's dtype.

    Strided views are fine (q/k/v slices of one packed qkv tensor, say); a last dim that is not
    contiguous costs a copy on the kernel path.
    """
    _check_qkv(q, k, v)
    if kernel_takes(q, k, v):
        return launch(torch.ops.qwenfast.single_head_attention, _kernel.attention_fwd, q, k, v)
    if q.is_cuda and q.shape[1] > 0:
        return _memory_efficient_sdpa(q, k, v)
    return single_head_attention_native(q, k, v)


def _memory_efficient_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """CUDA head dims our kernel does not take (1152, the Qwen-Image-2.1 VAE's): SDPA's memory-efficient
    kernel, which never materialises the scores. Left to itself SDPA picks the math backend for
    d > 256 (N² scores); forced, the memory-efficient one runs d = 1152 at 84-135 TFLOP/s on an H200,
    2.5-3x the chunked math path (benchmarks/results/explore_attention_graphs_h200.json)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v)
    except RuntimeError as e:  # refused before any work (dtype, strides): the chunked path takes it
        if "No available kernel" not in str(e):
            raise
    return single_head_attention_native(q, k, v)


__all__ = ["SCORE_BYTES_BUDGET", "kernel_supports", "kernel_takes", "single_head_attention",
           "single_head_attention_native", "single_head_attention_triton"]
