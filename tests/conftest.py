"""Shared test setup.

On a machine without CUDA the Triton kernels run through Triton's interpreter, so that the kernels
themselves (not only the PyTorch fallback) are checked on CPU tensors. The variable must be set
before triton is imported.
"""

import os

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
