"""When may a Triton kernel of ours take a call? One rule for every kernel in this package.

A kernel runs on CUDA tensors when Triton imports. Under TRITON_INTERPRET=1 (set by the test
conftest on machines without CUDA) Triton runs the same kernels on CPU tensors through its
interpreter, so that the tests check the kernels and not only the PyTorch fallbacks. Triton reads
the variable when a kernel is decorated, that is when our kernel modules are imported: we read it
once, at import, too.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a test dependency
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_can_take(*tensors: torch.Tensor) -> bool:
    """Could a kernel run on these tensors at all: Triton is there and every tensor lives where our
    kernels run (CUDA; CPU when interpreted). The *choice* of the kernel for a call is `dispatches_to_kernel`."""
    if not HAS_TRITON:
        return False
    device_type = "cpu" if INTERPRET else "cuda"
    return all(t.device.type == device_type for t in tensors)


def launch(op: Callable[..., torch.Tensor], launcher: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """Run a kernel through its custom op while torch.compile traces, else straight through its launcher.

    The custom op is what lets torch.compile (and its fake tensors) see the kernel. In eager mode its
    dispatcher only adds host time: ~6 µs a call against ~1.5 µs for a plain call (a trivial custom
    op, measured on the CPU machine), which matters where a decoder's launches run ahead of the GPU
    by little. On the GPU (do_bench, which hides host time) both paths time the same.
    """
    if torch.compiler.is_compiling():
        return op(*args)
    return launcher(*args)


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_GRID_Y = 65535  # CUDA's limit on a grid's second axis, which carries the batch in our kernels


def kernel_supports(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Can a kernel of ours take `x` (and `others`): Triton is there, the tensors live where kernels run,
    x is fp16/bf16/fp32 and its batch (dim 0) fits a grid axis. Op-specific limits come on top."""
    return (HAS_TRITON and kernel_can_take(x, *others) and x.dtype in KERNEL_DTYPES
            and x.shape[0] <= MAX_GRID_Y)


def require_kernel(ok: bool, name: str, t: torch.Tensor) -> None:
    """The error of a `*_triton` entry point asked for what its kernel cannot take."""
    if not ok:
        raise ValueError(f"{name}: the Triton kernel cannot take {t.dtype} {tuple(t.shape)} on {t.device}")


def dispatches_to_kernel(*tensors: torch.Tensor) -> bool:
    """The per-call choice of every public op, the same rule as `CustomOp`: CUDA tensors (not ROCm)
    with Triton importable take the kernel; anything else (CPU, even under the interpreter) the
    PyTorch path. Tests run the kernels on CPU by calling their `*_triton` entry points."""
    from ..custom_op import choose_backend

    return all(choose_backend(t.device) == "cuda" for t in tensors)


def row_alignment(*rows: torch.Tensor | None) -> int:
    """The largest power of two <= 16 that every row address of these (R, C) (or (C,)) tensors is a
    multiple of, in bytes: the data pointer and, with more than one row, the row stride. What a kernel
    that picks a row per token by address may promise the compiler (`tl.multiple_of`)."""
    align = 16
    for t in rows:
        if t is None:
            continue
        for v in (t.data_ptr(), t.stride(0) * t.element_size() if t.dim() > 1 and t.shape[0] > 1 else 0):
            while v % align:
                align //= 2
    return align
