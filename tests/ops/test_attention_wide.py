"""Head dims the Triton kernel does not take (1152, the Qwen-Image-2.1 VAE mid block): on CUDA SDPA's
memory-efficient kernel (forced), elsewhere the chunked reference; both equal the float64 oracle."""

from __future__ import annotations

import pytest
import torch

from qwenfast.ops import attention

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_head_dim_1152_matches_float64(device, dtype, tol):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 1152, generator=g) for n in (37, 53, 53))
    ref = attention.single_head_attention_native(q.double(), k.double(), v.double())
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    out = attention.single_head_attention(*(t.to(device, dtype) for t in (q, k, v)))
    assert out.dtype == dtype and out.shape == (2, 37, 1152)
    assert (out.double().cpu() - ref).abs().max().item() <= tol


def test_cuda_wide_heads_take_the_memory_efficient_kernel(monkeypatch):
    """On a CPU the wide head goes to the chunked reference; the memory-efficient path is CUDA's."""
    called = []
    monkeypatch.setattr(attention, "_memory_efficient_sdpa", lambda *a: called.append(1))
    q = torch.randn(1, 4, 1152)
    attention.single_head_attention(q, q, q)
    assert called == []
