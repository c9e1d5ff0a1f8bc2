"""Single-head attention with a wide head dim: the Qwen-Image VAE mid block (one head, D = 384).

    single_head_attention(q, k, v) -> o        q (B, Nq, D), k and v (B, Nk, D), o (B, Nq, D)

softmax(q k^T / sqrt(D)) v, non-causal, no mask. B is batch x frames, N the h*w latent pixels of a
frame (27556 at 1328², 262144 at 4096²). Nq may differ from Nk: a rank of the patch-parallel decode
attends from its own pixels to the keys of every rank.

Dispatch per call by `SingleHeadAttention`, a `CustomOp` (the rule of every op here): the Triton flash kernel
(qwenfast.ops.triton.attention) for CUDA tensors with Triton importable, when the dtype is
fp16/bf16/fp32 and the head dim is one it supports (a multiple of 16 up to 512 that splits into <= 4
power-of-two chunks: 16..128, 192, 256, 384, 512 and most others); other CUDA tensors (the
Qwen-Image-2.1 VAE's head dim 1152, which no SDPA flash backend takes either) →
`single_head_attention_chunked`; anything else → `single_head_attention_native`.
`single_head_attention_triton` runs the kernel itself (CPU tensors under TRITON_INTERPRET=1: the tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .custom_op import HAS_TRITON, GridKernelOp, launch

if HAS_TRITON:
    from .triton import attention as _kernel

SCORE_BYTES_BUDGET = 256 << 20  # the most the native path lets one chunk of fp32 scores take
# CUDA head dims the Triton kernel does not take (1152): "sdpa_efficient" (SDPA's memory-efficient
# kernel, forced; measured) or "chunked" (`single_head_attention_chunked`: bf16 cuBLAS matmuls with
# fp32 scores; benchmarks/bench_vae21.py --attention compares the two). A module setting, not a knob.
WIDE_HEAD_PATH = "sdpa_efficient"


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


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q kᵀ (B, n, Nk) in fp32 (fp64 stays fp64): fp16/bf16 on CUDA through cuBLAS with an fp32 output
    (fp32 accumulation, no rounding of the logits to 8 bits), elsewhere in the compute dtype."""
    compute = torch.promote_types(q.dtype, torch.float32)
    kt = k.transpose(1, 2)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        try:
            return torch.bmm(q, kt, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # a torch without bmm's out_dtype: bf16 logits
            return torch.bmm(q, kt).float()
    return torch.bmm(q.to(compute), kt.to(compute))


def single_head_attention_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_bytes: int = SCORE_BYTES_BUDGET
) -> torch.Tensor:
    """Exact attention over chunks of queries, as plain matmuls: per chunk S = q kᵀ / sqrt(D) in fp32,
    P = softmax(S) in fp32, o = P v (P rounded to v's dtype for the matmul, as flash kernels do).

    For head dims no flash kernel takes (1152: the Qwen-Image-2.1 VAE): the chunk's fp32 scores stay
    under `score_bytes` (the full N x N of a 2048² frame is 1 GiB, of a 4096² frame 16 GiB), and the
    two matmuls run at cuBLAS speed instead of SDPA's math backend upcasting everything to fp32.
    """
    _check_qkv(q, k, v)
    B, Nq, D = q.shape
    Nk = k.shape[1]
    rows = max(1, min(Nq, score_bytes // (4 * max(Nk, 1))))
    scale = D**-0.5
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for b in range(B):
        for r0 in range(0, Nq, rows):
            s = _scores(q[b : b + 1, r0 : r0 + rows], k[b : b + 1])  # (1, n, Nk) fp32
            s.mul_(scale)
            p = torch.softmax(s, dim=-1)
            del s
            o[b : b + 1, r0 : r0 + rows] = torch.bmm(p.to(v.dtype), v[b : b + 1])
            del p
    return o


def _memory_efficient_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """CUDA head dims our kernel does not take (1152, the Qwen-Image-2.1 VAE's): SDPA's memory-efficient
    kernel, which never materialises the scores. Left to itself SDPA picks the math backend for
    d > 256 (N² scores); forced, the memory-efficient one runs d = 1152 at 84-135 TFLOP/s on an H200,
    2.5-3x the chunked math path (benchmarks/results/explore_attention_graphs_h200.json)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            # SDPA's fused kernels take (B, heads, N, D) only: a 3-D call is refused ("No available
            # kernel") and would quietly take the chunked math path below. One head, as a view.
            return F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
    except RuntimeError as e:  # refused before any work (dtype, strides): the chunked path takes it
        if "No available kernel" not in str(e):
            raise
    return single_head_attention_native(q, k, v)


class SingleHeadAttention(GridKernelOp):
    """`(q, k, v) -> o`; see `single_head_attention`."""

    def kernel_takes(self, q, k, v):
        return super().kernel_takes(q) and _kernel.supports_head_dim(q.shape[2])

    def check(self, q, k, v):
        _check_qkv(q, k, v)

    def forward_native(self, q, k, v):
        if q.is_cuda and q.shape[1] > 0:  # CUDA calls the kernel does not take (head dim 1152, say)
            if WIDE_HEAD_PATH == "chunked":
                return single_head_attention_chunked(q, k, v)
            return _memory_efficient_sdpa(q, k, v)
        return single_head_attention_native(q, k, v)

    def forward_cuda(self, q, k, v):
        return launch(torch.ops.qwenfast.single_head_attention, _kernel.attention_fwd, q, k, v)


_attention = SingleHeadAttention()


def single_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v; q (B, Nq, D), k and v (B, Nk, D) -> (B, Nq, D) in q's dtype.

    Strided views are fine (q/k/v slices of one packed qkv tensor, say); a last dim that is not
    contiguous costs a copy on the kernel path.
    """
    return _attention.forward(q, k, v)


def single_head_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The Triton kernel itself, whatever the device (CPU tensors under TRITON_INTERPRET=1): for tests."""
    return _attention.forward_triton(q, k, v)


__all__ = ["SCORE_BYTES_BUDGET", "SingleHeadAttention", "single_head_attention", "single_head_attention_chunked",
           "single_head_attention_native",
           "single_head_attention_triton"]
