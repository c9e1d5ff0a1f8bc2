"""The device the kernel tests run on: CUDA where there is one, else the CPU through Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 there). QWENFAST_TEST_DEVICE overrides."""

import os

import torch

DEVICE = os.environ.get("QWENFAST_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
