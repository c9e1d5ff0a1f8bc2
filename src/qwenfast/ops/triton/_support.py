"""What the kernel modules share: the interpreter flag and CUDA's grid limit.

The dispatch rule itself (which calls take a kernel) is one, in `qwenfast.ops.custom_op`; these names
are re-exported from there so that kernels and dispatch read the same constants.
"""

from __future__ import annotations

import torch

from ..custom_op import HAS_TRITON, INTERPRET, KERNEL_DTYPES, MAX_GRID_Y

__all__ = ["HAS_TRITON", "INTERPRET", "KERNEL_DTYPES", "MAX_GRID_Y", "cdiv", "next_power_of_2", "one_dtype",
           "row_alignment"]


# triton.cdiv and triton.next_power_of_2 are `constexpr_function`s (usable inside kernels too): on the
# host each call costs ~2-5 µs of Python (an import and argument unwrapping), on every launch. The
# launchers size their grids and tiles with these plain versions instead (same values).


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for a >= 0, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1); 0 for 0, as triton.next_power_of_2."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def one_dtype(a: torch.Tensor | None, b: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Two tensors a kernel picks between by address (a parameter's two sets, or its per-sample and
    shared rows) in one element type: as they are when they agree (or one is absent), else both in
    the promoted dtype (an exact copy of a few rows)."""
    if a is None or b is None or a.dtype == b.dtype:
        return a, b
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def row_alignment(*rows: torch.Tensor | None) -> int:
    """The largest power of two <= 16 that every row address of these (R, C) (or (C,)) tensors is a
    multiple of, in bytes: the data pointer and, with more than one row, the row stride. What a kernel
    that picks a row per token by address may promise the compiler (`tl.multiple_of`).

    Runs on every launch that picks rows: one OR of the values, whose lowest set bit is the largest
    power of two dividing them all."""
    bits = 16
    for t in rows:
        if t is not None:
            bits |= t.data_ptr()
            if t.dim() > 1 and t.shape[0] > 1:
                bits |= t.stride(0) * t.element_size()
    return bits & -bits
