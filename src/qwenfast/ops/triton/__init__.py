"""Triton kernels of qwenfast (imported only on the CUDA path, or under TRITON_INTERPRET=1)."""
